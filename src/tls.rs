//! TLS on the proxy's own listener: the certificate chain and key read from PEM files, the rustls
//! server configuration (TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`), and the reload of the
//! certificate on SIGHUP.
//!
//! One [`rustls::ServerConfig`] lives for the whole process; it asks [`Tls`]'s resolver for the
//! certificate on every handshake. A reload swaps the certificate inside the resolver, so new
//! connections get the new one while open connections, whose handshake is done, keep theirs and are
//! never dropped. A reload that fails (a file missing, half written, or a key that does not match)
//! is logged and changes nothing: the previous certificate is served until a reload succeeds.
//!
//! No key material reaches a log line or an error message: errors name the file and what is wrong
//! with it, never its content.

use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// Largest PEM file read: a certificate chain is a few KiB; anything this large is not one.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Most bytes of TLS records a connection buffers ahead of its socket. The proxy already holds a
/// response back while the client lags (see `server.rs`, which counts what the socket has taken),
/// so this only needs room for a couple of full records (16 KiB of plaintext each), not rustls'
/// default of 64 KiB.
const SEND_BUFFER_LIMIT: usize = 32 * 1024;

/// The ALPN protocols offered, in the server's order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a certificate or key could not be loaded. Names the file and the setting, never its
/// content.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// `tls-cert` or `tls-key`.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is far larger than any PEM certificate or key.
    #[error("{} is larger than 1 MiB; expected a PEM file", path.display())]
    TooLarge {
        /// `tls-cert` or `tls-key`.
        setting: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The certificate file holds no certificate, or broken PEM.
    #[error("{} holds no PEM certificate (expected -----BEGIN CERTIFICATE----- sections, the server's certificate first)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no private key, or broken PEM.
    #[error("{} holds no PEM private key (expected a -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY section)", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// A private key of a type or size rustls does not sign with.
    #[error("{}: not a usable private key (RSA of 2048 bits or more, ECDSA P-256 or P-384, or Ed25519)", path.display())]
    UnusableKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is not the one of the first certificate, or that certificate cannot be parsed.
    #[error("the private key in {} does not belong to the first certificate in {} ({reason})", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls found.
        reason: rustls::Error,
    },
    /// rustls refused the server configuration (the crypto provider lacks TLS 1.2 or 1.3).
    #[error("cannot set up TLS 1.2 and 1.3: {0}")]
    Setup(#[source] rustls::Error),
}

impl TlsError {
    /// The setting to fix, spelled as its flag without the leading dashes.
    pub fn setting(&self) -> &'static str {
        match self {
            TlsError::Read { setting, .. } | TlsError::TooLarge { setting, .. } => setting,
            TlsError::NoCertificate { .. } | TlsError::Setup(_) => "tls-cert",
            TlsError::NoKey { .. } | TlsError::UnusableKey { .. } | TlsError::Mismatch { .. } => {
                "tls-key"
            }
        }
    }
}

/// What a loaded certificate is, for the log: never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// SHA-256 of the server's certificate, in hex (as `openssl x509 -fingerprint -sha256`
    /// prints it, without the colons).
    pub fingerprint: String,
    /// Certificates in the chain, the server's included.
    pub chain_len: usize,
}

/// TLS for the proxy's listener: the handshakes' configuration and the certificate it serves,
/// which [`Tls::reload`] replaces.
pub struct Tls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: Arc<Current>,
    acceptor: TlsAcceptor,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the certificate chain and key of `files` and builds the server configuration.
    ///
    /// # Errors
    /// [`TlsError`] naming the file at fault and the setting that names it.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = read_certified_key(files, &provider)?;
        let current = Arc::new(Current(RwLock::new(Arc::new(certified))));
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Tls {
            files: files.clone(),
            provider,
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The certificate served now.
    pub fn summary(&self) -> CertSummary {
        summarize(&self.current.get())
    }

    /// Reads the files again and serves what they hold from the next handshake on. Reads files:
    /// call it from a blocking context ([`tokio::task::spawn_blocking`]).
    ///
    /// # Errors
    /// [`TlsError`] when the files do not make a certificate; the previous one is then kept.
    pub fn reload(&self) -> Result<CertSummary, TlsError> {
        let certified = Arc::new(read_certified_key(&self.files, &self.provider)?);
        let summary = summarize(&certified);
        self.current.set(certified);
        Ok(summary)
    }

    /// The TLS handshake on an accepted connection. Bound it with a timeout: a client that never
    /// finishes would otherwise hold the connection.
    ///
    /// # Errors
    /// The handshake's failure (a client that speaks no TLS, or offers no common version,
    /// cipher suite or ALPN protocol).
    pub async fn accept<S>(&self, stream: S) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.acceptor
            .accept_with(stream, |conn| {
                conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT))
            })
            .await
    }
}

/// Takes over SIGHUP, whose default would end the process (and systemd counts a death by SIGHUP
/// as a clean exit, so it would not restart it): call it first thing, before anything that can
/// take time, and hand the result to [`reload_on_hangup`]. `None` (logged) when the signal cannot
/// be taken over.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: the TLS certificate will not be reloaded");
            None
        }
    }
}

/// Reloads `tls` on every SIGHUP from [`hangups`] until the process ends, logging the outcome.
/// Without TLS, a SIGHUP is logged and otherwise ignored.
pub async fn reload_on_hangup(hangups: Option<tokio::signal::unix::Signal>, tls: Option<Arc<Tls>>) {
    let Some(mut hangups) = hangups else { return };
    while hangups.recv().await.is_some() {
        let Some(tls) = tls.clone() else {
            tracing::info!("SIGHUP: no TLS certificate to reload (no --tls-cert)");
            continue;
        };
        match tokio::task::spawn_blocking(move || tls.reload()).await {
            Ok(Ok(cert)) => tracing::info!(
                fingerprint_sha256 = %cert.fingerprint,
                chain = cert.chain_len,
                "SIGHUP: TLS certificate reloaded; new connections get it"
            ),
            Ok(Err(e)) => tracing::error!(
                error = %e,
                flag = %format_args!("--{}", e.setting()),
                "SIGHUP: TLS certificate not reloaded; still serving the previous one"
            ),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: TLS reload did not finish; still serving the previous one")
            }
        }
    }
}

/// The certificate every handshake gets, replaced as a whole by a reload.
struct Current(RwLock<Arc<CertifiedKey>>);

impl Current {
    fn get(&self) -> Arc<CertifiedKey> {
        // Nothing panics while the lock is held, so it cannot be poisoned; if it were, the value
        // inside is still a whole certificate.
        match self.0.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, certified: Arc<CertifiedKey>) {
        match self.0.write() {
            Ok(mut c) => *c = certified,
            Err(poisoned) => *poisoned.into_inner() = certified,
        }
    }
}

impl fmt::Debug for Current {
    // The signing key never goes into a Debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Current").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

fn summarize(certified: &CertifiedKey) -> CertSummary {
    let fingerprint = certified
        .cert
        .first()
        .map(|c| {
            Sha256::digest(c.as_ref())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .unwrap_or_default();
    CertSummary {
        fingerprint,
        chain_len: certified.cert.len(),
    }
}

/// Reads both files and checks that the key is the first certificate's.
fn read_certified_key(
    files: &TlsFiles,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = parse_chain(&read_bounded(&files.cert, "tls-cert")?).ok_or_else(|| {
        TlsError::NoCertificate {
            path: files.cert.clone(),
        }
    })?;
    let key = parse_key(&read_bounded(&files.key, "tls-key")?).ok_or_else(|| TlsError::NoKey {
        path: files.key.clone(),
    })?;
    let signing_key =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|_| TlsError::UnusableKey {
                path: files.key.clone(),
            })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // ring can always tell a key's public half, so `Unknown` does not happen with it; were it
        // to, a mismatch would show as failed handshakes rather than a refused start.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(reason) => Err(TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason,
        }),
    }
}

/// The certificates of a PEM file, in order; `None` when there is none or the PEM is broken.
fn parse_chain(pem_bytes: &[u8]) -> Option<Vec<CertificateDer<'static>>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem_bytes)
        .collect::<Result<_, pem::Error>>()
        .ok()?;
    (!chain.is_empty()).then_some(chain)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1); `None` when there is none or the
/// PEM is broken. The PEM error is dropped unread: it may quote a line of the key.
fn parse_key(pem_bytes: &[u8]) -> Option<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem_bytes).ok()
}

fn read_bounded(path: &Path, setting: &'static str) -> Result<Vec<u8>, TlsError> {
    let read_error = |source| TlsError::Read {
        setting,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge {
            setting,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_neither_a_chain_nor_a_key() {
        assert!(parse_chain(b"").is_none());
        assert!(parse_chain(b"not pem at all").is_none());
        assert!(
            parse_chain(b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n").is_none()
        );
        assert!(
            parse_key(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_none()
        );
        assert!(parse_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n").is_none());
    }

    #[test]
    fn errors_name_the_setting_and_never_quote_the_key() {
        let key = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0IGtleSBtYXRlcmlhbA\n";
        assert!(parse_key(key.as_bytes()).is_none());
        let e = TlsError::NoKey {
            path: "/etc/stickless/key.pem".into(),
        };
        assert_eq!(e.setting(), "tls-key");
        assert!(!e.to_string().contains("c2VjcmV0"), "{e}");
        let e = TlsError::Read {
            setting: "tls-cert",
            path: "/nowhere/cert.pem".into(),
            source: io::ErrorKind::NotFound.into(),
        };
        assert_eq!(e.setting(), "tls-cert");
        assert!(e.to_string().contains("/nowhere/cert.pem"), "{e}");
    }
}
