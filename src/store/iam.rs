//! ElastiCache IAM authentication (`--redis-iam`): the password of every connection is a token
//! that this machine's AWS identity signs, so no Redis password exists anywhere.
//!
//! The token is what ElastiCache documents: a SigV4 query-string presign, for the service
//! `elasticache`, of `GET http://<cache-name>/?Action=connect&User=<user-id>` (plus
//! `&ResourceType=ServerlessCache` for a serverless cache), valid 15 minutes, without the scheme.
//! It is signed by AWS's own signer (`aws-sigv4`) and checked byte for byte against botocore's
//! (`tests/data/elasticache-iam-vector.json`, made by `scripts/iam-vector.py`).
//!
//! A token is only checked by `AUTH`, so fred asks [`IamCredentials`] for a fresh one for every
//! new connection (each node of a cluster too), and sends `AUTH` again on every open connection
//! every [`REAUTH_INTERVAL`]: ElastiCache closes a connection 12 hours after its last `AUTH`.
//! The credentials come from the standard AWS chain (environment, profile, web identity, ECS,
//! the EC2 instance role through IMDSv2), are kept until shortly before they expire, and every
//! fetch is bounded by a timeout. Neither a token nor a key ever reaches a log line or a `Debug`
//! output.

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use fred::types::config::{CredentialProvider, Server};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::config::IamAuth;

/// How long a token is valid: the most ElastiCache accepts.
pub const TOKEN_VALIDITY: Duration = Duration::from_secs(900);

/// Time between two `AUTH`s on an open connection. ElastiCache closes a connection 12 hours after
/// it last authenticated; once an hour leaves eleven more chances when one fails (fred logs the
/// failure and tries again at the next interval).
pub const REAUTH_INTERVAL: Duration = Duration::from_secs(3600);

/// Bound on one fetch of credentials (IMDS answers in milliseconds; STS over HTTPS in well under a
/// second).
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on finding the region and setting up the credential chain at startup: the region may
/// come from IMDS, which off EC2 takes a few attempts to give up on.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Credentials closer to their expiry than this are fetched again: a token signed with them must
/// still be good when `AUTH` checks it.
const EXPIRY_MARGIN: Duration = Duration::from_secs(600);

/// Characters left as they are in a query value: RFC 3986's unreserved set, as SigV4 requires.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// What a token is for: the cache, the user and where they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The replication group id, or the serverless cache's name.
    pub cache_name: String,
    /// The ElastiCache user id (the username in `--redis-url`).
    pub user_id: String,
    /// The cache's region, like `us-east-1`.
    pub region: String,
    /// Whether `cache_name` names a serverless cache.
    pub serverless: bool,
}

/// A signed token: the password for one `AUTH`. Its `Debug` shows nothing of it.
pub struct Token(String);

impl Token {
    /// The token, to send as the password.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Why no token could be made.
#[derive(Debug, thiserror::Error)]
pub enum IamError {
    /// The AWS signer refused the request.
    #[error("could not sign the ElastiCache IAM token")]
    Sign(#[source] aws_sigv4::http_request::SigningError),
    /// The signing parameters were incomplete.
    #[error("could not build the SigV4 signing parameters")]
    Params(#[source] v4::signing_params::BuildError),
    /// The credential chain failed.
    #[error("no AWS credentials from the standard chain (environment, profile, web identity, ECS, EC2 instance role)")]
    Credentials(#[source] aws_credential_types::provider::error::CredentialsError),
    /// The credential chain did not answer in time.
    #[error("the AWS credential chain did not answer within {0:?}")]
    CredentialsTimeout(Duration),
}

/// Signs a token for `request` with `credentials`, at `now`.
///
/// # Errors
/// [`IamError`] when the signer refuses the request (a cache name that is not a host name).
pub fn presign(
    request: &TokenRequest,
    credentials: &Credentials,
    now: SystemTime,
) -> Result<Token, IamError> {
    let mut operation = vec![("Action", "connect"), ("User", request.user_id.as_str())];
    if request.serverless {
        operation.push(("ResourceType", "ServerlessCache"));
    }
    let operation = encode_query(operation.iter().map(|(k, v)| (*k, Cow::Borrowed(*v))));
    let url = format!("http://{}/?{operation}", request.cache_name);

    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(TOKEN_VALIDITY);
    let identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&request.region)
        .name("elasticache")
        .time(now)
        .settings(settings)
        .build()
        .map_err(IamError::Params)?
        .into();
    let signable = SignableRequest::new(
        "GET",
        url.as_str(),
        std::iter::empty(),
        // The hash of the empty body, as botocore signs it (not UNSIGNED-PAYLOAD).
        SignableBody::empty(),
    )
    .map_err(IamError::Sign)?;
    // The signer traces the canonical request, session token included: silenced whatever
    // RUST_LOG says (signing is synchronous, so the thread's own dispatcher covers all of it).
    let signed =
        tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::new(), || {
            sign(signable, &params)
        });
    let (instructions, _signature) = signed.map_err(IamError::Sign)?.into_parts();
    // The signer returns the signature before the session token; botocore, AWS's reference,
    // puts the signature last. The order does not change what is signed (SigV4 sorts the query),
    // and keeping botocore's makes the token comparable byte for byte.
    let mut auth: Vec<_> = instructions
        .params()
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    auth.sort_by_key(|(k, _)| *k == "X-Amz-Signature");
    let token = format!("{}/?{operation}&{}", request.cache_name, encode_query(auth));
    Ok(Token(token))
}

fn encode_query<'a>(pairs: impl IntoIterator<Item = (&'a str, Cow<'a, str>)>) -> String {
    pairs
        .into_iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                utf8_percent_encode(k, QUERY_VALUE),
                utf8_percent_encode(&v, QUERY_VALUE)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Why IAM authentication could not be set up at startup.
#[derive(Debug, thiserror::Error)]
pub enum IamSetupError {
    /// No `--redis-iam-region`, and none in the standard chain.
    #[error("no region: none in AWS_REGION, AWS_DEFAULT_REGION, the AWS profile or the EC2 instance metadata; give the cache's region, like us-east-1")]
    NoRegion,
    /// The chain did not answer in time.
    #[error("the AWS configuration (region, credential chain) was not found within {0:?}; give --redis-iam-region, or check the instance metadata service")]
    Timeout(Duration),
    /// The chain has no credential provider (which the default configuration always has).
    #[error("the AWS configuration has no credential provider")]
    NoCredentialProvider,
}

impl IamSetupError {
    /// The setting to change, spelled as its flag without the leading dashes.
    pub fn setting(&self) -> &'static str {
        match self {
            IamSetupError::NoRegion | IamSetupError::Timeout(_) => "redis-iam-region",
            IamSetupError::NoCredentialProvider => "redis-iam",
        }
    }
}

/// fred's credential provider for IAM authentication: a fresh token for every `AUTH`.
pub struct IamCredentials {
    request: TokenRequest,
    chain: SharedCredentialsProvider,
    /// The last credentials fetched, reused until [`EXPIRY_MARGIN`] before they expire. The lock
    /// is held across a fetch, so that the nodes of a cluster connecting at once ask the chain
    /// once.
    cached: tokio::sync::Mutex<Option<Credentials>>,
}

impl fmt::Debug for IamCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Credentials' own Debug redacts the secret key and the session token; the cache is left
        // out all the same.
        f.debug_struct("IamCredentials")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

impl IamCredentials {
    /// Finds the region (the setting's, or the standard chain's) and sets up the standard
    /// credential chain, within a bound. Credentials are fetched on the first `AUTH`.
    ///
    /// # Errors
    /// [`IamSetupError`] when no region can be found.
    pub async fn from_standard_chain(
        iam: &IamAuth,
        user_id: String,
    ) -> Result<Self, IamSetupError> {
        // IMDS is plain HTTP; STS (web identity) and ECS may be HTTPS: rustls on ring, which the
        // Redis client already uses.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
        if let Some(region) = &iam.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let sdk = tokio::time::timeout(SETUP_TIMEOUT, loader.load())
            .await
            .map_err(|_| IamSetupError::Timeout(SETUP_TIMEOUT))?;
        let region = sdk.region().ok_or(IamSetupError::NoRegion)?.to_string();
        let chain = sdk
            .credentials_provider()
            .ok_or(IamSetupError::NoCredentialProvider)?;
        Ok(IamCredentials::new(
            TokenRequest {
                cache_name: iam.cache_name.clone(),
                user_id,
                region,
                serverless: iam.serverless,
            },
            chain,
        ))
    }

    /// Tokens for `request`, signed with credentials from `chain`.
    pub fn new(request: TokenRequest, chain: SharedCredentialsProvider) -> Self {
        IamCredentials {
            request,
            chain,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// What the tokens are for.
    pub fn request(&self) -> &TokenRequest {
        &self.request
    }

    /// Credentials that are good for a while: the cached ones, or a fresh fetch. When a fetch
    /// fails, cached credentials that have not expired yet are still used.
    ///
    /// # Errors
    /// [`IamError`] when the chain fails or does not answer in time, with nothing usable cached.
    pub async fn credentials(&self) -> Result<Credentials, IamError> {
        let mut cached = self.cached.lock().await;
        let now = SystemTime::now();
        let good_until = |c: &Credentials, margin: Duration| {
            c.expiry().is_none_or(|expiry| expiry > now + margin)
        };
        if let Some(c) = cached.as_ref().filter(|c| good_until(c, EXPIRY_MARGIN)) {
            return Ok(c.clone());
        }
        let fetched =
            match tokio::time::timeout(CREDENTIALS_TIMEOUT, self.chain.provide_credentials()).await
            {
                Ok(Ok(c)) => Ok(c),
                Ok(Err(e)) => Err(IamError::Credentials(e)),
                Err(_) => Err(IamError::CredentialsTimeout(CREDENTIALS_TIMEOUT)),
            };
        match fetched {
            Ok(c) => {
                *cached = Some(c.clone());
                Ok(c)
            }
            Err(e) => match cached.as_ref().filter(|c| good_until(c, Duration::ZERO)) {
                Some(c) => {
                    tracing::warn!(error = %Causes(&e), "could not refresh the AWS credentials; signing with the current ones until they expire");
                    Ok(c.clone())
                }
                None => Err(e),
            },
        }
    }

    /// A token signed now.
    ///
    /// # Errors
    /// [`IamError`] when there are no credentials or the signer refuses.
    pub async fn token(&self) -> Result<Token, IamError> {
        let credentials = self.credentials().await?;
        presign(&self.request, &credentials, SystemTime::now())
    }
}

/// An error with its causes, `: `-separated, for a log line (none of them carries a secret: the
/// AWS crates redact credentials in their errors too).
pub(crate) struct Causes<'a>(pub(crate) &'a dyn std::error::Error);

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl CredentialProvider for IamCredentials {
    async fn fetch(
        &self,
        _server: Option<&Server>,
    ) -> Result<(Option<String>, Option<String>), fred::error::Error> {
        match self.token().await {
            Ok(token) => Ok((Some(self.request.user_id.clone()), Some(token.0))),
            // fred logs it as the connection's error, and tries again at its next attempt.
            Err(e) => Err(fred::error::Error::new(
                fred::error::ErrorKind::Auth,
                format!("no ElastiCache IAM token: {}", Causes(&e)),
            )),
        }
    }

    fn refresh_interval(&self) -> Option<Duration> {
        Some(REAUTH_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// `tests/data/elasticache-iam-vector.json`, made by botocore (`scripts/iam-vector.py`).
    #[derive(serde::Deserialize)]
    struct Vector {
        access_key_id: String,
        secret_access_key: String,
        signed_at_unix: u64,
        expires_seconds: u64,
        cases: Vec<Case>,
    }

    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        cache_name: String,
        user_id: String,
        region: String,
        serverless: bool,
        session_token: Option<String>,
        token: String,
    }

    fn vector() -> Vector {
        serde_json::from_str(include_str!("../../tests/data/elasticache-iam-vector.json"))
            .expect("the vector parses")
    }

    fn request(case: &Case) -> TokenRequest {
        TokenRequest {
            cache_name: case.cache_name.clone(),
            user_id: case.user_id.clone(),
            region: case.region.clone(),
            serverless: case.serverless,
        }
    }

    fn credentials(v: &Vector, case: &Case) -> Credentials {
        Credentials::new(
            &v.access_key_id,
            &v.secret_access_key,
            case.session_token.clone(),
            None,
            "test",
        )
    }

    #[test]
    fn tokens_are_byte_for_byte_botocores() {
        let v = vector();
        assert_eq!(v.expires_seconds, TOKEN_VALIDITY.as_secs());
        assert!(v.cases.iter().any(|c| c.serverless));
        assert!(v.cases.iter().any(|c| c.session_token.is_some()));
        assert!(v.cases.iter().any(|c| c.session_token.is_none()));
        let at = UNIX_EPOCH + Duration::from_secs(v.signed_at_unix);
        for case in &v.cases {
            let token = presign(&request(case), &credentials(&v, case), at).unwrap();
            assert_eq!(token.expose(), case.token, "{}", case.name);
        }
    }

    #[test]
    fn a_token_depends_on_the_time_and_the_credentials() {
        let v = vector();
        let case = &v.cases[0];
        let at = UNIX_EPOCH + Duration::from_secs(v.signed_at_unix);
        let later = presign(
            &request(case),
            &credentials(&v, case),
            at + Duration::from_secs(1),
        )
        .unwrap();
        assert_ne!(later.expose(), case.token);
        let other = Credentials::new(&v.access_key_id, "another secret", None, None, "test");
        assert_ne!(
            presign(&request(case), &other, at).unwrap().expose(),
            case.token
        );
    }

    #[test]
    fn debug_shows_no_secret() {
        let v = vector();
        let case = &v.cases[0];
        let creds = credentials(&v, case);
        let at = UNIX_EPOCH + Duration::from_secs(v.signed_at_unix);
        let token = presign(&request(case), &creds, at).unwrap();
        let provider =
            IamCredentials::new(request(case), SharedCredentialsProvider::new(creds.clone()));
        for shown in [format!("{token:?}"), format!("{provider:?}")] {
            assert!(!shown.contains("X-Amz-Signature"), "{shown}");
            assert!(!shown.contains(&v.secret_access_key), "{shown}");
            assert!(!shown.contains("IQoJb3JpZ2lu"), "{shown}");
        }
    }

    /// A log buffer for a subscriber that records everything, trace included.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn signing_logs_nothing_even_at_trace() {
        let v = vector();
        let case = &v.cases[0];
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        let at = UNIX_EPOCH + Duration::from_secs(v.signed_at_unix);
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!("before signing");
            presign(&request(case), &credentials(&v, case), at).unwrap();
        });
        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("before signing"), "the capture works: {logs}");
        let session_token = case.session_token.as_deref().unwrap();
        let encoded = "IQoJb3JpZ2luX2VjEXAMPLE%2Fsession";
        for secret in [session_token, encoded, &v.secret_access_key] {
            assert!(!logs.contains(secret), "{logs}");
        }
    }

    #[tokio::test]
    async fn the_provider_gives_the_user_and_a_fresh_token() {
        let v = vector();
        let case = &v.cases[1];
        let provider = IamCredentials::new(
            request(case),
            SharedCredentialsProvider::new(credentials(&v, case)),
        );
        let (user, password) = provider.fetch(None).await.unwrap();
        assert_eq!(user.as_deref(), Some(case.user_id.as_str()));
        let password = password.unwrap();
        assert!(
            password.starts_with(&format!(
                "{}/?Action=connect&User={}&ResourceType=ServerlessCache&X-Amz-Algorithm=AWS4-HMAC-SHA256&",
                case.cache_name, case.user_id
            )),
            "{password}"
        );
        assert!(password.contains("&X-Amz-Expires=900&"));
        assert_eq!(provider.refresh_interval(), Some(REAUTH_INTERVAL));
        assert!(REAUTH_INTERVAL < Duration::from_secs(12 * 3600));
    }
}
