//! TLS on stickless's own listener, driven by a real TLS client (rustls) trusting a CA made at test
//! time: h2 and HTTP/1.1 by ALPN, TLS 1.2 and 1.3 only, the cookie `Secure`, the certificate
//! reloaded on SIGHUP while older connections keep working, a bad new file kept out, a handshake
//! that never comes not holding a slot, and startup errors that name the flag.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ProtocolVersion, RootCertStore, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use support::*;

/// Bound on every network step of these tests.
const STEP: Duration = Duration::from_secs(20);

const BOTH: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// stickless over TLS with the certificate and key at these paths, in front of `backend`.
fn start_tls(backend: &TestBackend, cert: &str, key: &str, extra: &[&str]) -> Stickless {
    let mut args = vec!["--tls-cert", cert, "--tls-key", key];
    args.extend_from_slice(extra);
    Stickless::start(&backend.url(), &args)
}

/// A TLS client that trusts only the test CA, offering `alpn` and `versions`.
fn client(
    certs: &Certs,
    alpn: &[&[u8]],
    versions: &[&'static SupportedProtocolVersion],
) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&std::fs::read(certs.path("ca.pem")).unwrap()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// A TLS connection to the proxy, the server's certificate checked against the test CA.
async fn connect(proxy: &Stickless, client: &TlsConnector) -> TlsStream<TcpStream> {
    tokio::time::timeout(STEP, async {
        let tcp = TcpStream::connect(proxy.addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        client.connect(name, tcp).await
    })
    .await
    .expect("TLS handshake in time")
    .expect("TLS handshake")
}

/// The certificate the server presented on `conn`.
fn served(conn: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    conn.get_ref().1.peer_certificates().expect("a certificate")[0]
        .clone()
        .into_owned()
}

/// The first certificate of a PEM file.
fn first_cert(path: &str) -> CertificateDer<'static> {
    CertificateDer::pem_slice_iter(&std::fs::read(path).unwrap())
        .next()
        .unwrap()
        .unwrap()
}

/// An HTTP/1.1 client connection over `conn`.
async fn http1(conn: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .unwrap();
    tokio::spawn(driver);
    sender
}

/// An h2 client connection over `conn`.
async fn http2(conn: TlsStream<TcpStream>) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let (sender, driver) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(conn))
            .await
            .unwrap();
    tokio::spawn(driver);
    sender
}

/// GET `path` with these headers; the response read whole.
fn get(path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut req = Request::get(format!("https://localhost{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(Bytes::new())).unwrap()
}

async fn read(resp: hyper::Result<http::Response<hyper::body::Incoming>>) -> Reply {
    let (parts, body) = resp.expect("a response").into_parts();
    let body = tokio::time::timeout(STEP, body.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn send1(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Reply {
    let mut req = req;
    req.headers_mut()
        .insert(http::header::HOST, "localhost".parse().unwrap());
    // HTTP/1.1 puts the path, not the whole URI, on the request line.
    *req.uri_mut() = req
        .uri()
        .path_and_query()
        .unwrap()
        .as_str()
        .parse()
        .unwrap();
    // The connection takes the next request only once it has finished the previous one, which
    // its driver task may not have seen yet when the body was read.
    tokio::time::timeout(STEP, sender.ready())
        .await
        .expect("connection ready in time")
        .expect("connection ready");
    read(
        tokio::time::timeout(STEP, sender.send_request(req))
            .await
            .expect("answer in time"),
    )
    .await
}

async fn send2(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Reply {
    read(
        tokio::time::timeout(STEP, sender.send_request(req))
            .await
            .expect("answer in time"),
    )
    .await
}

const LOG_IN: (&str, &str) = ("x-test-reply", "x-session-set-user: alice");

#[tokio::test(flavor = "multi_thread")]
async fn h2_and_http1_over_tls_with_a_secure_cookie() {
    let certs = Certs::make();
    let backend = TestBackend::start().await;
    let proxy = start_tls(
        &backend,
        &certs.path("server.pem"),
        &certs.path("server.key"),
        &[],
    );

    // h2, chosen by ALPN over http/1.1 when the client offers both.
    let conn = connect(&proxy, &client(&certs, &[b"h2", b"http/1.1"], BOTH)).await;
    assert_eq!(conn.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(served(&conn), first_cert(&certs.path("server.pem")));
    let mut h2 = http2(conn).await;
    let r = send2(&mut h2, get("/", &[LOG_IN])).await;
    assert_eq!(r.status, 200, "{}", proxy.logs());
    let cookie = r.set_cookies().join("\n");
    assert!(cookie.starts_with("sid="), "{cookie}");
    assert!(
        cookie.contains("; Secure"),
        "a session made over TLS has a Secure cookie: {cookie}"
    );
    // The backend is told the client came over HTTPS.
    assert_eq!(r.seen().header("x-forwarded-proto"), Some("https"));
    let sid = r.sid().unwrap();
    let r = send2(&mut h2, get("/", &[("cookie", &format!("sid={sid}"))])).await;
    assert_eq!(
        r.seen().fields().get("user").map(String::as_str),
        Some("alice")
    );

    // HTTP/1.1 by ALPN, and without ALPN at all.
    for alpn in [&[&b"http/1.1"[..]][..], &[]] {
        let conn = connect(&proxy, &client(&certs, alpn, BOTH)).await;
        let expected = alpn.first().copied();
        assert_eq!(conn.get_ref().1.alpn_protocol(), expected);
        let mut h1 = http1(conn).await;
        // A load balancer's word on the scheme is kept, but the cookie is Secure on this listener
        // whatever a header says.
        let r = send1(&mut h1, get("/", &[LOG_IN, ("x-forwarded-proto", "http")])).await;
        assert_eq!(r.status, 200, "{}", proxy.logs());
        assert_eq!(r.seen().header("x-forwarded-proto"), Some("http"));
        let cookie = r.set_cookies().join("\n");
        assert!(cookie.contains("; Secure"), "{cookie}");
        // The connection carries a second request.
        let r = send1(&mut h1, get("/again", &[])).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.seen().header("x-forwarded-proto"), Some("https"));
    }

    // A client that speaks plain HTTP to the TLS port gets no HTTP answer.
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(STEP, tcp.read_to_end(&mut answer))
        .await
        .expect("closed in time");
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_1_2_and_1_3_only() {
    let certs = Certs::make();
    let backend = TestBackend::start().await;
    let proxy = start_tls(
        &backend,
        &certs.path("server.pem"),
        &certs.path("server.key"),
        &[],
    );
    for (version, name) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        let conn = connect(&proxy, &client(&certs, &[b"http/1.1"], &[version])).await;
        assert_eq!(conn.get_ref().1.protocol_version(), Some(name));
        let r = send1(&mut http1(conn).await, get("/", &[])).await;
        assert_eq!(r.status, 200, "{name:?}");
    }

    // A ClientHello as a TLS 1.1 client sends it (legacy version 3.2, no supported_versions
    // extension) is refused with an alert, protocol_version; the same hello saying 3.3 (TLS 1.2)
    // gets a ServerHello, so it is the version that is refused.
    let proxy_addr = proxy.addr;
    let answer = |version| async move {
        let mut tcp = TcpStream::connect(proxy_addr).await.unwrap();
        tcp.write_all(&client_hello(version)).await.unwrap();
        let mut answer = vec![0; 7];
        tokio::time::timeout(STEP, tcp.read_exact(&mut answer))
            .await
            .expect("an answer in time")
            .expect("an answer");
        answer
    };
    let tls12 = answer([3, 3]).await;
    assert_eq!(tls12[0], 0x16, "a handshake record: {tls12:02x?}");
    assert_eq!(tls12[5], 0x02, "a ServerHello: {tls12:02x?}");
    let tls11 = answer([3, 2]).await;
    assert_eq!(tls11[0], 0x15, "an alert record: {tls11:02x?}");
    assert_eq!(tls11[6], 70, "protocol_version: {tls11:02x?}");
}

/// A TLS 1.2-style ClientHello saying `version`, without the supported_versions extension of TLS
/// 1.3: ECDHE-RSA-AES128-GCM-SHA256 and ECDHE-RSA-AES128-SHA, P-256 and X25519, RSA signatures.
fn client_hello(version: [u8; 2]) -> Vec<u8> {
    fn with_len16(bytes: &[u8]) -> Vec<u8> {
        let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        out
    }
    let mut extensions = Vec::new();
    // supported_groups: x25519, secp256r1
    extensions.extend([0x00, 0x0a]);
    extensions.extend(with_len16(&with_len16(&[0x00, 0x1d, 0x00, 0x17])));
    // ec_point_formats: uncompressed
    extensions.extend([0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    // signature_algorithms: rsa_pss_rsae_sha256, rsa_pkcs1_sha256
    extensions.extend([0x00, 0x0d]);
    extensions.extend(with_len16(&with_len16(&[0x08, 0x04, 0x04, 0x01])));
    let mut body = version.to_vec();
    body.extend([0x42; 32]); // random
    body.push(0); // no session id
    body.extend(with_len16(&[0xc0, 0x2f, 0xc0, 0x13]));
    body.extend([0x01, 0x00]); // no compression
    body.extend(with_len16(&extensions));
    let mut handshake = vec![0x01, 0x00];
    handshake.extend(with_len16(&body));
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend(with_len16(&handshake));
    record
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_certificate_without_dropping_a_connection() {
    let certs = Certs::make();
    certs.issue("second", "localhost", "ec");
    let (cert, key) = (certs.path("live.pem"), certs.path("live.key"));
    std::fs::copy(certs.path("server.pem"), &cert).unwrap();
    std::fs::copy(certs.path("server.key"), &key).unwrap();
    let backend = TestBackend::start().await;
    let proxy = start_tls(&backend, &cert, &key, &[]);
    // A new client for every connection: a client resuming its TLS session would not be shown a
    // certificate at all, and would report the one of the session it resumed.
    let tls = || client(&certs, &[b"h2", b"http/1.1"], BOTH);
    let first = first_cert(&certs.path("server.pem"));
    let second = first_cert(&certs.path("second.pem"));

    let before = connect(&proxy, &tls()).await;
    assert_eq!(served(&before), first);
    let mut before = http2(before).await;
    assert_eq!(send2(&mut before, get("/", &[])).await.status, 200);

    // The new certificate and key replace the old at the same paths, then SIGHUP.
    std::fs::copy(certs.path("second.pem"), &cert).unwrap();
    std::fs::copy(certs.path("second.key"), &key).unwrap();
    hangup(&proxy);
    eventually("the reload is logged", STEP, || async {
        proxy
            .logs()
            .contains("TLS certificate reloaded")
            .then_some(())
    })
    .await;
    let after = connect(&proxy, &tls()).await;
    assert_eq!(
        served(&after),
        second,
        "new connections get the new certificate"
    );
    let mut after = http2(after).await;
    assert_eq!(send2(&mut after, get("/", &[])).await.status, 200);
    // The connection opened before the reload still serves requests.
    assert_eq!(send2(&mut before, get("/still", &[])).await.status, 200);

    // A broken file is refused and logged; the certificate in use stays.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64 !\n").unwrap();
    hangup(&proxy);
    eventually("the failed reload is logged", STEP, || async {
        proxy
            .logs()
            .contains("TLS certificate not reloaded")
            .then_some(())
    })
    .await;
    let logs = proxy.logs();
    assert!(logs.contains("--tls-cert"), "the flag is named: {logs}");
    let conn = connect(&proxy, &tls()).await;
    assert_eq!(served(&conn), second, "the previous certificate is kept");
    assert_eq!(
        send2(&mut http2(conn).await, get("/", &[])).await.status,
        200
    );
    assert_eq!(send2(&mut before, get("/still", &[])).await.status, 200);
    assert_eq!(send2(&mut after, get("/still", &[])).await.status, 200);

    // A key that is not the certificate's is refused too.
    std::fs::copy(certs.path("server.pem"), &cert).unwrap();
    hangup(&proxy);
    eventually("the mismatch is logged", STEP, || async {
        proxy
            .logs()
            .contains("does not belong to the first certificate")
            .then_some(())
    })
    .await;
    let conn = connect(&proxy, &tls()).await;
    assert_eq!(served(&conn), second);
    assert_no_key_logged(&proxy, &certs, &["server.key", "second.key"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handshake_that_never_comes_does_not_hold_a_slot() {
    let certs = Certs::make();
    let backend = TestBackend::start().await;
    let proxy = start_tls(
        &backend,
        &certs.path("server.pem"),
        &certs.path("server.key"),
        &["--max-connections", "1", "--header-read-timeout", "1s"],
    );
    // The only slot, taken by a client that connects and never says a word.
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(STEP, silent.read(&mut buf))
        .await
        .expect("a silent client is closed at the header read timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The slot is free again: a real client is served.
    let conn = connect(&proxy, &client(&certs, &[b"http/1.1"], BOTH)).await;
    let r = send1(&mut http1(conn).await, get("/", &[])).await;
    assert_eq!(r.status, 200);
}

#[test]
fn startup_errors_exit_2_and_name_the_flag() {
    let certs = Certs::make();
    certs.issue("other", "127.0.0.1", "ec");
    let garbage = certs.path("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let missing = certs.path("missing.pem");
    let (cert, key) = (certs.path("server.pem"), certs.path("server.key"));
    let cases: &[(&[&str], &str, &str)] = &[
        (&["--tls-cert", &cert], "--tls-key", "key missing"),
        (&["--tls-key", &key], "--tls-cert", "certificate missing"),
        (
            &["--tls-cert", &missing, "--tls-key", &key],
            "--tls-cert",
            "no such certificate file",
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &missing],
            "--tls-key",
            "no such key file",
        ),
        (
            &["--tls-cert", &garbage, "--tls-key", &key],
            "--tls-cert",
            "a certificate that is not PEM",
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &garbage],
            "--tls-key",
            "a key that is not PEM",
        ),
        // The key file given as the certificate: PEM, but no certificate in it.
        (
            &["--tls-cert", &key, "--tls-key", &key],
            "--tls-cert",
            "a key as the certificate",
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &cert],
            "--tls-key",
            "a certificate as the key",
        ),
        (
            &["--tls-cert", &cert, "--tls-key", &certs.path("other.key")],
            "--tls-key",
            "another certificate's key",
        ),
    ];
    for (args, flag, what) in cases {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stickless"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("STICKLESS_")) {
            command.env_remove(k);
        }
        let mut child = command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(["--upstream", "http://127.0.0.1:1"])
            .args(*args)
            .env_remove("REDIS_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = String::new();
        let mut pipe = child.stderr.take().unwrap();
        // A process that starts despite the bad flag is killed, and the test fails below.
        let end = std::time::Instant::now() + STEP;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > end {
                let _ = child.kill();
                break child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        pipe.read_to_string(&mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{what}: {stderr}");
        assert!(
            stderr.contains(&format!("'{flag}'")),
            "{what}: does not name {flag}: {stderr}"
        );
        assert!(!stderr.contains("stickless ready"), "{what}: {stderr}");
        for key in ["server.key", "other.key"] {
            for line in key_lines(&certs, key) {
                assert!(!stderr.contains(&line), "{what}: key material in: {stderr}");
            }
        }
    }
}

/// Sends SIGHUP to the stickless process.
fn hangup(proxy: &Stickless) {
    let status = Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The base64 lines of a key file.
fn key_lines(certs: &Certs, name: &str) -> Vec<String> {
    std::fs::read_to_string(certs.path(name))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .map(str::to_owned)
        .collect()
}

fn assert_no_key_logged(proxy: &Stickless, certs: &Certs, keys: &[&str]) {
    let logs = proxy.logs();
    for key in keys {
        for line in key_lines(certs, key) {
            assert!(!logs.contains(&line), "key material of {key} in the log");
        }
    }
}
