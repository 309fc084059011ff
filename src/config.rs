//! The typed configuration the library runs on, and the parsing of the values that are shared by every
//! front end (durations, the backend's address, the header prefix).
//!
//! Every rule about what a value may be lives in the library: each part of [`Settings`] is valid by
//! its type, and [`Config::new`] checks how the parts fit together, returning a [`ConfigError`] that
//! names the setting. The command line lives in the binary and only translates flags into
//! [`Settings`], so a program that uses the library cannot build a configuration that fails later.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::time::Duration;

use crate::cookie::{CookieConfig, SameSite, SecureMode, SigningKeys};
pub use crate::value::InvalidValue;

/// What stickless needs to serve, as given: [`Config::new`] checks it and fills in what is left
/// to choose. Each part is valid by its type; `Config::new` checks how the parts fit together.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_listen: SocketAddr,
    /// The backend every request is forwarded to.
    pub upstream: Upstream,
    /// Where sessions live.
    pub store: StoreConfig,
    /// Keys that sign and verify session cookies; required with Redis, random by default on the
    /// embedded store (whose cookies need not outlive the process).
    pub keys: Option<SigningKeys>,
    /// Session cookie attributes.
    pub cookie: CookieConfig,
    /// Session lifetime.
    pub ttl: TtlPolicy,
    /// Header protocol settings.
    pub protocol: ProtocolConfig,
    /// Time allowed for the backend to answer with response headers.
    pub upstream_timeout: Duration,
    /// How long an idle pooled connection to the backend is kept for reuse; below the backend's
    /// own keep-alive timeout, so that stickless never picks a connection the backend is closing.
    pub upstream_idle_timeout: Duration,
    /// Time a new client connection gets, from accept, to send a complete first request head
    /// (h2's preface included).
    pub header_read_timeout: Duration,
    /// Time an idle client connection stays open: between requests on HTTP/1.1, without an open
    /// stream on h2.
    pub keep_alive_timeout: Duration,
    /// Most client connections open at once on the proxy's listener; `None` for the default that
    /// [`default_max_connections`] derives from `fd_limit`.
    pub max_connections: Option<usize>,
    /// The process's open-file limit, when known (the binary raises it to the hard limit first).
    pub fd_limit: Option<u64>,
    /// Threads serving the proxy's listener, each with its own single-threaded runtime and its
    /// own listening socket on the same port (`SO_REUSEPORT`); 1 serves it on the process's
    /// shared runtime.
    pub workers: usize,
    /// When the circuit breaker in front of Redis opens and how it probes (unused on the embedded
    /// store, which cannot be down).
    pub breaker: BreakerConfig,
    /// What a request gets when its session cannot be loaded.
    pub on_store_error: OnStoreError,
    /// From the first SIGTERM or SIGINT, how long the listeners keep accepting while `/readyz`
    /// answers 503 (so that the load balancer stops sending first); zero closes them at once.
    pub drain_delay: Duration,
    /// Once the listeners are closed, how long requests and upgraded tunnels in flight get to
    /// finish before they are dropped.
    pub shutdown_timeout: Duration,
    /// PEM file of the certificate chain for TLS on the proxy's listener; with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// PEM file of the private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

/// The certificate chain and private key that TLS on the proxy's listener serves (read by
/// [`crate::tls`] at startup and again on every reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificates: the server's first, then the intermediates.
    pub cert: PathBuf,
    /// The PEM private key of the first certificate.
    pub key: PathBuf,
}

/// The default [`Settings::drain_delay`].
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
/// The default [`Settings::shutdown_timeout`].
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest drain delay or shutdown timeout a setting may ask for: a stop is a matter of seconds
/// or minutes, and systemd kills the service at its own stop timeout anyway.
pub const MAX_STOP_DURATION: Duration = Duration::from_secs(3600);

/// Most client connections a setting may allow: bounded so that the semaphore behind it can
/// always be built.
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;
/// Most `--workers`: far more threads than any machine has cores is a mistake, not a setting.
pub const MAX_WORKERS: usize = 1024;

/// The default cap on client connections: 10 000, or fewer when the file-descriptor limit is
/// lower. Each proxied connection can hold two descriptors (the client's and one to the backend),
/// and some are set aside for the backend's idle pool, the admin listener, Redis and the process's
/// own files, so that reaching the cap never starves those.
pub fn default_max_connections(fd_limit: Option<u64>) -> usize {
    /// Descriptors kept out of the budget: up to 256 idle backend connections, 64 admin
    /// connections, Redis, the listeners, the runtime's own, with room to spare.
    const RESERVED_FDS: u64 = 512;
    const DEFAULT: u64 = 10_000;
    let budget = fd_limit.map_or(DEFAULT, |n| n.saturating_sub(RESERVED_FDS) / 2);
    budget.clamp(1, DEFAULT) as usize
}

impl Settings {
    /// The defaults, in front of `upstream`.
    pub fn new(upstream: Upstream) -> Self {
        Settings {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9180)),
            upstream,
            store: StoreConfig::Memory,
            keys: None,
            cookie: CookieConfig::default(),
            ttl: TtlPolicy::default(),
            protocol: ProtocolConfig::default(),
            upstream_timeout: Duration::from_secs(60),
            upstream_idle_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(75),
            max_connections: None,
            fd_limit: None,
            workers: 1,
            breaker: BreakerConfig::default(),
            on_store_error: OnStoreError::default(),
            drain_delay: DEFAULT_DRAIN_DELAY,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// A checked configuration: everything the library runs on. Read its [`Settings`] through
/// `Deref`; it cannot be changed once checked.
#[derive(Debug, Clone)]
pub struct Config {
    settings: Settings,
    keys: SigningKeys,
    connection_cap: usize,
    tls: Option<TlsFiles>,
}

impl Deref for Config {
    type Target = Settings;

    fn deref(&self) -> &Settings {
        &self.settings
    }
}

/// Why settings do not make a configuration. [`ConfigError::setting`] names the setting to
/// change, in the spelling of its flag without the dashes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Redis needs keys that every instance shares.
    #[error("required with Redis, so that every instance signs and verifies the same cookies")]
    KeysRequired,
    /// `SameSite=None` with `Secure` never.
    #[error("none requires a Secure cookie (browsers drop the cookie otherwise); use a secure mode of auto or true")]
    SameSiteNoneWithoutSecure,
    /// A single value could be larger than a whole session.
    #[error(
        "{value} is more than the largest session ({session}); lower it or raise the session limit"
    )]
    ValueLargerThanSession {
        /// The longest value.
        value: usize,
        /// The largest session.
        session: usize,
    },
    /// A count outside its range.
    #[error("{value} is not from {min} to {max}")]
    OutOfRange {
        /// Which setting.
        setting: &'static str,
        /// The value given.
        value: usize,
        /// Smallest allowed.
        min: usize,
        /// Largest allowed.
        max: usize,
    },
    /// A duration of zero.
    #[error("zero is not allowed; give a positive duration")]
    ZeroDuration {
        /// Which setting.
        setting: &'static str,
    },
    /// The admin listener on the proxy's own address.
    #[error("{0} is also the proxy's address; give the admin listener its own port")]
    AdminOnProxyAddress(SocketAddr),
    /// A Redis URL of a form stickless does not speak.
    #[error("expected redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] (one endpoint), \
             redis-cluster://[[USER]:PASSWORD@]HOST[:PORT][?node=HOST:PORT...] (a cluster) or \
             redis-sentinel://[[USER]:PASSWORD@]HOST[:PORT][/DB]?sentinelServiceName=NAME[&node=HOST:PORT...] \
             (Sentinel); rediss, rediss-cluster and rediss-sentinel for TLS")]
    RedisUrl,
    /// A rotation grace too short for the tombstone to outlive a rotation's second step.
    #[error("{given:?} is shorter than {least:?}: the old session, kept marked as rotated, must outlive a rotation's second step and its undo (at least 1s, and twice --redis-timeout with Redis)")]
    RotationGraceTooShort {
        /// The grace given.
        given: Duration,
        /// The least allowed.
        least: Duration,
    },
    /// A duration longer than its setting allows.
    #[error("{given:?} is more than {most:?}")]
    TooLong {
        /// Which setting.
        setting: &'static str,
        /// The duration given.
        given: Duration,
        /// The longest allowed.
        most: Duration,
    },
    /// A Redis key prefix with spaces or control characters, or too long.
    #[error("use at most 128 characters without spaces or control characters")]
    KeyPrefix,
    /// A cache name that ElastiCache would not give.
    #[error("expected the replication group id or serverless cache name: 1 to 40 letters, digits and hyphens")]
    IamCacheName,
    /// A region that is not an AWS region's name.
    #[error("expected an AWS region, like us-east-1")]
    IamRegion,
    /// IAM authentication over a plain connection.
    #[error("ElastiCache accepts IAM authentication only with in-transit encryption: use a rediss:// or rediss-cluster:// URL")]
    IamNeedsTls,
    /// IAM authentication through Sentinel, which ElastiCache does not have.
    #[error("ElastiCache has no Sentinel: use its primary endpoint (rediss://USER@HOST:PORT), which fails over by itself, or its configuration endpoint (rediss-cluster://USER@HOST:PORT)")]
    IamWithSentinel,
    /// IAM authentication without the user to authenticate as.
    #[error(
        "the ElastiCache user id goes in --redis-url as its username: rediss://USER-ID@HOST:PORT"
    )]
    IamNeedsUser,
    /// IAM authentication with a password as well.
    #[error("the password is a token stickless signs: leave it out of --redis-url (rediss://USER-ID@HOST:PORT)")]
    IamWithPassword,
    /// Replica reads from a Redis cluster, whose replica routing is not tested yet.
    #[error("replica is not supported with redis-cluster:// yet: use primary")]
    ReplicaReadsWithCluster,
    /// The local cache with replica reads: a cache miss read from a lagging replica could bring
    /// back a copy older than an invalidation that has already passed, and keep it.
    #[error("cannot be combined with --read-from replica: a copy read from a lagging replica could outlive the invalidation meant to remove it; use one of them (the local cache saves more round trips)")]
    CacheWithReplicaReads,
    /// One of the TLS certificate and key without the other.
    #[error("required with --{given}: TLS needs both the certificate chain (--tls-cert) and its private key (--tls-key), as PEM files")]
    TlsHalfGiven {
        /// The setting that was given.
        given: &'static str,
        /// The setting that is missing.
        missing: &'static str,
    },
}

impl ConfigError {
    /// The setting to change, spelled as its flag without the leading dashes.
    pub fn setting(&self) -> &'static str {
        match self {
            ConfigError::KeysRequired => "secret-keys",
            ConfigError::SameSiteNoneWithoutSecure => "cookie-same-site",
            ConfigError::ValueLargerThanSession { .. } => "max-value-bytes",
            ConfigError::OutOfRange { setting, .. }
            | ConfigError::ZeroDuration { setting }
            | ConfigError::TooLong { setting, .. } => setting,
            ConfigError::AdminOnProxyAddress(_) => "admin-listen",
            ConfigError::RedisUrl => "redis-url",
            ConfigError::KeyPrefix => "key-prefix",
            ConfigError::RotationGraceTooShort { .. } => "rotation-grace",
            ConfigError::IamRegion => "redis-iam-region",
            ConfigError::IamCacheName
            | ConfigError::IamNeedsTls
            | ConfigError::IamWithSentinel
            | ConfigError::IamNeedsUser
            | ConfigError::IamWithPassword => "redis-iam",
            ConfigError::TlsHalfGiven { missing, .. } => missing,
            ConfigError::ReplicaReadsWithCluster => "read-from",
            ConfigError::CacheWithReplicaReads => "local-cache",
        }
    }
}

/// The URL forms of `--redis-url`: one endpoint (ElastiCache's primary endpoint), a cluster (its
/// configuration endpoint, nodes discovered with `CLUSTER SLOTS`) and a Sentinel group, each
/// plain or over TLS. fred reads the topology from the scheme's suffix and would take any
/// `*-cluster` or `*-sentinel` scheme, so the check is on the whole scheme.
const REDIS_SCHEMES: [&str; 6] = [
    "redis://",
    "rediss://",
    "redis-cluster://",
    "rediss-cluster://",
    "redis-sentinel://",
    "rediss-sentinel://",
];

/// Most fields a session may hold, as a setting: bounded so that one change always fits in one
/// script call.
pub const MAX_FIELDS_LIMIT: usize = 1000;
/// Sessions `--local-cache` holds when not told: the hot sessions of a busy instance, in a few
/// MiB (each is at most `--max-session-bytes` and its key).
pub const DEFAULT_LOCAL_CACHE: usize = 10_000;
/// Bytes the local cache holds at most when not told (`--local-cache-bytes`): with sessions of
/// up to 3 KiB, the default 10,000 of them.
pub const DEFAULT_LOCAL_CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// Bounds of `--local-cache-bytes`.
pub const LOCAL_CACHE_BYTES_RANGE: (u64, u64) = (64 * 1024, 64 * 1024 * 1024 * 1024);
/// The most sessions `--local-cache` may hold.
pub const MAX_LOCAL_CACHE: usize = 10_000_000;

/// Most consecutive failures a setting may ask the breaker to wait for: past a few dozen, every
/// one of them is a client waiting out the store timeout for nothing.
pub const MAX_BREAKER_FAILURES: usize = 1000;

impl Config {
    /// Checks `settings` and completes them (a random key for the embedded store when none is
    /// given).
    ///
    /// # Errors
    /// [`ConfigError`] for the first setting that does not fit, naming it.
    pub fn new(settings: Settings) -> Result<Self, ConfigError> {
        let p = &settings.protocol;
        if !(1..=MAX_FIELDS_LIMIT).contains(&p.max_fields) {
            return Err(ConfigError::OutOfRange {
                setting: "max-fields",
                value: p.max_fields,
                min: 1,
                max: MAX_FIELDS_LIMIT,
            });
        }
        for (setting, value) in [
            ("max-value-bytes", p.max_value_bytes),
            ("max-session-bytes", p.max_session_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::OutOfRange {
                    setting,
                    value,
                    min: 1,
                    max: usize::MAX,
                });
            }
        }
        if p.max_value_bytes > p.max_session_bytes {
            return Err(ConfigError::ValueLargerThanSession {
                value: p.max_value_bytes,
                session: p.max_session_bytes,
            });
        }
        if !(1..=MAX_BREAKER_FAILURES).contains(&settings.breaker.failures) {
            return Err(ConfigError::OutOfRange {
                setting: "breaker-failures",
                value: settings.breaker.failures,
                min: 1,
                max: MAX_BREAKER_FAILURES,
            });
        }
        let mut durations = vec![
            ("idle-timeout", settings.ttl.idle),
            ("upstream-timeout", settings.upstream_timeout),
            ("upstream-idle-timeout", settings.upstream_idle_timeout),
            ("header-read-timeout", settings.header_read_timeout),
            ("keep-alive-timeout", settings.keep_alive_timeout),
            ("breaker-probe-interval", settings.breaker.probe_interval),
            ("shutdown-timeout", settings.shutdown_timeout),
        ];
        if let StoreConfig::Redis { timeout, .. } = &settings.store {
            durations.push(("redis-timeout", *timeout));
        }
        if let Some((setting, _)) = durations.iter().find(|(_, d)| d.is_zero()) {
            return Err(ConfigError::ZeroDuration { setting });
        }
        for (setting, given) in [
            ("drain-delay", settings.drain_delay),
            ("shutdown-timeout", settings.shutdown_timeout),
        ] {
            if given > MAX_STOP_DURATION {
                return Err(ConfigError::TooLong {
                    setting,
                    given,
                    most: MAX_STOP_DURATION,
                });
            }
        }
        // The tombstone a rotation leaves is what a failed rotation is undone from: it must outlive
        // the rotation's second step and the undo, each bounded by the store timeout.
        let least = match &settings.store {
            StoreConfig::Redis { timeout, .. } => (2 * *timeout).max(Duration::from_secs(1)),
            StoreConfig::Memory => Duration::from_secs(1),
        };
        if settings.ttl.rotation_grace < least {
            return Err(ConfigError::RotationGraceTooShort {
                given: settings.ttl.rotation_grace,
                least,
            });
        }
        if settings.cookie.same_site == SameSite::None
            && settings.cookie.secure == SecureMode::Never
        {
            return Err(ConfigError::SameSiteNoneWithoutSecure);
        }
        if settings.listen == settings.admin_listen && settings.listen.port() != 0 {
            return Err(ConfigError::AdminOnProxyAddress(settings.listen));
        }
        if let StoreConfig::Redis {
            url,
            key_prefix,
            iam,
            local_cache,
            local_cache_bytes,
            read_from,
            ..
        } = &settings.store
        {
            let Some(scheme) = REDIS_SCHEMES.iter().find(|scheme| {
                url.get(..scheme.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
            }) else {
                return Err(ConfigError::RedisUrl);
            };
            if *local_cache > MAX_LOCAL_CACHE {
                return Err(ConfigError::OutOfRange {
                    setting: "local-cache",
                    value: *local_cache,
                    min: 0,
                    max: MAX_LOCAL_CACHE,
                });
            }
            let (min, max) = LOCAL_CACHE_BYTES_RANGE;
            if !(min..=max).contains(local_cache_bytes) {
                return Err(ConfigError::OutOfRange {
                    setting: "local-cache-bytes",
                    value: usize::try_from(*local_cache_bytes).unwrap_or(usize::MAX),
                    min: min as usize,
                    max: max as usize,
                });
            }
            // fred's replica routing is made for clusters, but stickless's tests cover replicas of
            // one primary only (and Sentinel groups): a cluster's replicas are not trusted yet.
            if *read_from == ReadFrom::Replica && scheme.contains("cluster") {
                return Err(ConfigError::ReplicaReadsWithCluster);
            }
            if *read_from == ReadFrom::Replica && *local_cache > 0 {
                return Err(ConfigError::CacheWithReplicaReads);
            }
            if let Some(iam) = iam {
                if !valid_cache_name(&iam.cache_name) {
                    return Err(ConfigError::IamCacheName);
                }
                if iam.region.as_deref().is_some_and(|r| !valid_region(r)) {
                    return Err(ConfigError::IamRegion);
                }
                if !scheme.starts_with("rediss") {
                    return Err(ConfigError::IamNeedsTls);
                }
                if scheme.contains("sentinel") {
                    return Err(ConfigError::IamWithSentinel);
                }
                match url_credentials(url) {
                    (None, _) => return Err(ConfigError::IamNeedsUser),
                    (Some(_), true) => return Err(ConfigError::IamWithPassword),
                    (Some(_), false) => {}
                }
            }
            if key_prefix.len() > 128
                || key_prefix
                    .bytes()
                    .any(|b| b.is_ascii_control() || b == b' ')
            {
                return Err(ConfigError::KeyPrefix);
            }
        }
        let safe_connections = default_max_connections(settings.fd_limit);
        let connection_cap = match settings.max_connections {
            None => safe_connections,
            Some(n) if (1..=MAX_CONNECTIONS_LIMIT).contains(&n) => {
                if n > safe_connections {
                    tracing::warn!(
                        max_connections = n,
                        fd_limit = settings.fd_limit,
                        "--max-connections is above what the file-descriptor limit leaves room for: \
                         accepts may fail for want of descriptors before the cap is reached"
                    );
                }
                n
            }
            Some(n) => {
                return Err(ConfigError::OutOfRange {
                    setting: "max-connections",
                    value: n,
                    min: 1,
                    max: MAX_CONNECTIONS_LIMIT,
                })
            }
        };
        if !(1..=MAX_WORKERS).contains(&settings.workers) {
            return Err(ConfigError::OutOfRange {
                setting: "workers",
                value: settings.workers,
                min: 1,
                max: MAX_WORKERS,
            });
        }
        let tls = match (&settings.tls_cert, &settings.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::TlsHalfGiven {
                    given: "tls-cert",
                    missing: "tls-key",
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::TlsHalfGiven {
                    given: "tls-key",
                    missing: "tls-cert",
                })
            }
        };
        let keys = match (&settings.keys, &settings.store) {
            (Some(keys), _) => keys.clone(),
            (None, StoreConfig::Memory) => SigningKeys::random(),
            (None, StoreConfig::Redis { .. }) => return Err(ConfigError::KeysRequired),
        };
        Ok(Config {
            settings,
            keys,
            connection_cap,
            tls,
        })
    }

    /// The keys that sign and verify session cookies.
    pub fn keys(&self) -> &SigningKeys {
        &self.keys
    }

    /// Most client connections open at once on the proxy's listener: `max_connections`, or the
    /// default for the file-descriptor limit.
    pub fn connection_cap(&self) -> usize {
        self.connection_cap
    }

    /// The certificate and key of TLS on the proxy's listener; `None` for plain HTTP.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }
}

/// The backend's base address: scheme `http`, a host and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `host:port`, as used in the request URI and for connecting.
    pub authority: http::uri::Authority,
}

impl Upstream {
    /// Parses `http://host:port` (a trailing `/` is allowed; the port defaults to 80).
    ///
    /// # Errors
    /// [`InvalidValue`] saying what is accepted, for anything else.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        const FORM: &str = "a URL of the form http://HOST:PORT";
        let uri: http::Uri = s.parse().map_err(|_| InvalidValue::new(s, FORM))?;
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            // Never echo credentials.
            return Err(InvalidValue::redacted(
                "http://HOST:PORT without credentials",
            ));
        }
        match uri.scheme_str() {
            Some("http") => {}
            Some(_) => {
                return Err(InvalidValue::new(
                    s,
                    "an http:// URL (stickless talks plain HTTP to a local backend); use http://HOST:PORT",
                ))
            }
            None => return Err(InvalidValue::new(s, FORM)),
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(InvalidValue::new(s, "http://HOST:PORT without a path"));
        }
        let authority = uri.authority().ok_or_else(|| InvalidValue::new(s, FORM))?;
        let authority = if authority.port().is_some() {
            authority.clone()
        } else {
            format!("{}:80", authority.host())
                .parse()
                .map_err(|_| InvalidValue::new(s, FORM))?
        };
        Ok(Upstream { authority })
    }
}

/// Where sessions are kept.
#[derive(Clone)]
pub enum StoreConfig {
    /// The embedded in-memory store: sessions are local to this process.
    Memory,
    /// A Redis, Valkey or ElastiCache endpoint.
    Redis {
        /// `redis://`, `redis-cluster://` or `redis-sentinel://` URL (`rediss` for TLS), possibly
        /// with credentials.
        url: String,
        /// Prefix of every session key.
        key_prefix: String,
        /// Bound on every store call.
        timeout: Duration,
        /// When a change counts as stored.
        durability: Durability,
        /// ElastiCache IAM authentication instead of a password; the user is the URL's username.
        iam: Option<IamAuth>,
        /// Sessions kept in the local cache (`--local-cache`); 0 for none.
        local_cache: usize,
        /// Bytes the local cache may hold at most (`--local-cache-bytes`), about.
        local_cache_bytes: u64,
        /// Where session loads go (`--read-from`).
        read_from: ReadFrom,
    },
}

/// ElastiCache IAM authentication (`--redis-iam`): every connection authenticates with a token
/// signed by this machine's AWS identity (see [`crate::store::iam`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamAuth {
    /// The replication group id, or the serverless cache's name.
    pub cache_name: String,
    /// The cache's region; `None` for the standard AWS chain's (environment, profile, EC2 instance
    /// metadata).
    pub region: Option<String>,
    /// Whether `cache_name` names a serverless cache.
    pub serverless: bool,
}

/// The user and whether a password is given, from a Redis URL's `USER:PASSWORD@`.
fn url_credentials(url: &str) -> (Option<&str>, bool) {
    let rest = url.split_once("://").map_or("", |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return (None, false);
    };
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    (Some(user).filter(|u| !u.is_empty()), !password.is_empty())
}

/// A replication group id or serverless cache name: 1 to 40 letters, digits and hyphens (what
/// ElastiCache allows), which also makes it the host of the signed request.
fn valid_cache_name(name: &str) -> bool {
    (1..=40).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// An AWS region such as `us-east-1` or `us-gov-west-1`.
fn valid_region(region: &str) -> bool {
    (1..=32).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl fmt::Debug for StoreConfig {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Memory => f.write_str("Memory"),
            StoreConfig::Redis {
                key_prefix,
                timeout,
                durability,
                iam,
                local_cache,
                local_cache_bytes,
                read_from,
                ..
            } => f
                .debug_struct("Redis")
                .field("url", &"<redacted>")
                .field("key_prefix", key_prefix)
                .field("timeout", timeout)
                .field("durability", durability)
                .field("iam", iam)
                .field("local_cache", local_cache)
                .field("local_cache_bytes", local_cache_bytes)
                .field("read_from", read_from)
                .finish(),
        }
    }
}

/// When a change counts as stored (`--durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// When the primary has applied it: Redis's own acknowledgement. A failover right after can
    /// lose it, since replication is asynchronous.
    #[default]
    Acknowledged,
    /// When at least one replica has it too (`WAIT 1`), so that a failover cannot erase it.
    Replicated,
}

impl Durability {
    /// Parses `acknowledged` or `replicated`.
    ///
    /// # Errors
    /// [`InvalidValue`] naming what is accepted.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        match s.to_ascii_lowercase().as_str() {
            "acknowledged" => Ok(Durability::Acknowledged),
            "replicated" => Ok(Durability::Replicated),
            _ => Err(InvalidValue::new(s, "one of acknowledged, replicated")),
        }
    }
}

/// Where session loads go (`--read-from`). Changes always go to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadFrom {
    /// The primary: `HGETALL` and `PTTL` in one round trip, the TTL renewed in the background
    /// when due.
    #[default]
    Primary,
    /// A replica of the primary, found in its `INFO replication`; a copy older than the user's own last
    /// change, a replica that cannot answer, and no replica at all send the load to the primary.
    Replica,
}

impl ReadFrom {
    /// Parses `primary` or `replica`.
    ///
    /// # Errors
    /// [`InvalidValue`] naming what is accepted.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        match s.to_ascii_lowercase().as_str() {
            "primary" => Ok(ReadFrom::Primary),
            "replica" => Ok(ReadFrom::Replica),
            _ => Err(InvalidValue::new(s, "one of primary, replica")),
        }
    }
}

/// How long sessions live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    /// Sliding lifetime: a request that uses the session renews it (in Redis, once the TTL fell
    /// an eighth of it short).
    pub idle: Duration,
    /// Lifetime from creation that no activity extends; `None` for no limit.
    pub absolute: Option<Duration>,
    /// How long a rotated-away id is remembered as rotated (a tombstone) rather than unknown.
    /// Within it, a request still carrying the old cookie gets no session, and its changes are
    /// dropped without a new cookie that would replace the one the rotation set.
    pub rotation_grace: Duration,
}

/// The default [`TtlPolicy::rotation_grace`]: as long as the default `--upstream-timeout`, so it
/// covers every request that was already in flight with the old cookie when a login rotated it.
pub const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(60);

impl Default for TtlPolicy {
    fn default() -> Self {
        TtlPolicy {
            idle: Duration::from_secs(30 * 60),
            absolute: None,
            rotation_grace: DEFAULT_ROTATION_GRACE,
        }
    }
}

/// When the circuit breaker in front of the store opens, and how often it probes while open (see
/// [`crate::store::breaker`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures of the store itself (timeouts, lost connections) that open the
    /// breaker. Any answer from the store resets the count.
    pub failures: usize,
    /// Time between the end of one probe and the start of the next while the breaker is open.
    pub probe_interval: Duration,
}

impl Default for BreakerConfig {
    /// 3 failures: one slow call is not an outage, three in a row are (with 20 clients at once, the
    /// first wave of timeouts). 500 ms between probes: a store that is back serves again within
    /// about half a second, and a store that is down gets two pings a second at most.
    fn default() -> Self {
        BreakerConfig {
            failures: 3,
            probe_interval: Duration::from_millis(500),
        }
    }
}

/// What a request gets when its session cannot be loaded: the store failed, or its breaker is
/// open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnStoreError {
    /// 503 with `Retry-After`: the backend never sees a request without its session.
    #[default]
    FailClosed,
    /// Forwarded with the status header `unavailable` and no fields, so that pages that need no
    /// session keep working; a response that would change the session is answered 503 instead.
    FailOpen,
}

impl OnStoreError {
    /// Parses `fail-closed` or `fail-open` (any case, `_` for `-`).
    ///
    /// # Errors
    /// [`InvalidValue`] saying what is accepted.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "fail-closed" => Ok(OnStoreError::FailClosed),
            "fail-open" => Ok(OnStoreError::FailOpen),
            _ => Err(InvalidValue::new(s, "fail-closed or fail-open")),
        }
    }
}

/// How log lines are written (`--log-format`): for the binary, which sets up logging before the
/// rest of the configuration is read (so that its warnings come out in the chosen format).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event: for a terminal, or journald.
    #[default]
    Text,
    /// One JSON object per line, fields at the top level: for CloudWatch Logs, Loki and the like.
    Json,
}

impl LogFormat {
    /// Parses `text` or `json` (any case).
    ///
    /// # Errors
    /// [`InvalidValue`] saying what is accepted.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(InvalidValue::new(s, "text or json")),
        }
    }
}

/// Whether a line is logged per request (`--access-log`), under the target
/// [`crate::access_log::TARGET`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AccessLog {
    /// One line per request.
    #[default]
    On,
    /// None (the same as `RUST_LOG=...,stickless::access=off`).
    Off,
}

impl AccessLog {
    /// Parses `on` or `off` (any case).
    ///
    /// # Errors
    /// [`InvalidValue`] saying what is accepted.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        match s.trim().to_ascii_lowercase().as_str() {
            "on" => Ok(AccessLog::On),
            "off" => Ok(AccessLog::Off),
            _ => Err(InvalidValue::new(s, "on or off")),
        }
    }
}

/// The prefix of every protocol header: lower case, letters, digits and `-`, ending in `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderPrefix(String);

impl HeaderPrefix {
    /// Parses a prefix, lower-casing it and reading `_` as `-`.
    ///
    /// # Errors
    /// [`InvalidValue`] saying what is accepted.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        let p = s.to_ascii_lowercase().replace('_', "-");
        let ok = p.len() >= 2
            && p.len() <= 64
            && p.ends_with('-')
            && p.starts_with(|c: char| c.is_ascii_alphabetic())
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if ok {
            Ok(HeaderPrefix(p))
        } else {
            Err(InvalidValue::new(
                s,
                "a header prefix of letters, digits and `-`, ending in `-` (like x-session-)",
            ))
        }
    }

    /// The prefix, lower case.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for HeaderPrefix {
    fn default() -> Self {
        HeaderPrefix("x-session-".into())
    }
}

/// The header protocol's settings and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolConfig {
    /// Prefix of every protocol header, e.g. `x-session-`.
    pub header_prefix: HeaderPrefix,
    /// Most fields one session may hold.
    pub max_fields: usize,
    /// Longest value, in bytes once decoded.
    pub max_value_bytes: usize,
    /// Largest session: the sum of its field names and values, in bytes.
    pub max_session_bytes: usize,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig {
            header_prefix: HeaderPrefix::default(),
            max_fields: 64,
            max_value_bytes: 4096,
            max_session_bytes: 16384,
        }
    }
}

/// Parses a duration such as `30m`, `1s`, `250ms`, `12h`, `7d` or `90` (seconds).
///
/// # Errors
/// [`InvalidValue`] saying what is accepted.
pub fn parse_duration(s: &str) -> Result<Duration, InvalidValue> {
    let (num, unit) = number_and_unit(s);
    let err = || {
        InvalidValue::new(
            s,
            "a duration; use a number with ms, s, m, h or d (like 30m)",
        )
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(err)?),
        "d" => Duration::from_secs(n.checked_mul(86400).ok_or_else(err)?),
        _ => return Err(err()),
    };
    if d.is_zero() {
        return Err(InvalidValue::new(s, "a positive duration"));
    }
    // Redis takes milliseconds as a signed 64-bit number; a century is plenty.
    if d > Duration::from_secs(100 * 365 * 86400) {
        return Err(InvalidValue::new(s, "a duration of at most 36500d"));
    }
    Ok(d)
}

/// The leading digits of `s` (trimmed) and what follows them.
fn number_and_unit(s: &str) -> (&str, &str) {
    let t = s.trim();
    t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()))
}

/// Parses a size in bytes: a number, with `KiB`, `MiB` or `GiB` (like `32MiB`).
///
/// # Errors
/// [`InvalidValue`] saying what is accepted.
pub fn parse_bytes(s: &str) -> Result<u64, InvalidValue> {
    let (num, unit) = number_and_unit(s);
    let err = || {
        InvalidValue::new(
            s,
            "a size; use a number of bytes, or with KiB, MiB or GiB (like 32MiB)",
        )
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    let scale: u64 = match unit.trim() {
        "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(err()),
    };
    n.checked_mul(scale).ok_or_else(err)
}

/// Parses a duration as [`parse_duration`] does, and also zero (`0`, `0s`, `0ms`...).
///
/// # Errors
/// As [`parse_duration`].
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, InvalidValue> {
    let (num, unit) = number_and_unit(s);
    let zero = !num.is_empty() && num.bytes().all(|b| b == b'0');
    if zero && matches!(unit.trim(), "" | "ms" | "s" | "m" | "h" | "d") {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

/// Parses a duration or `off`.
///
/// # Errors
/// As [`parse_duration`].
pub fn parse_optional_duration(s: &str) -> Result<Option<Duration>, InvalidValue> {
    match s.trim().to_ascii_lowercase().as_str() {
        "off" | "none" | "0" => Ok(None),
        _ => parse_duration(s).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_bytes("32MiB"), Ok(32 << 20));
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        for bad in [
            "",
            "32MB",
            "32 mib",
            "-1",
            "1.5MiB",
            "99999999999999999999GiB",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("99999999999999999d").is_err());
        assert_eq!(parse_duration_or_zero("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("00ms"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("5s"), Ok(Duration::from_secs(5)));
        assert!(parse_duration_or_zero("0w").is_err());
        assert!(parse_duration_or_zero("").is_err());
        assert!(parse_duration_or_zero("-0").is_err());
        assert_eq!(parse_optional_duration("off"), Ok(None));
        assert_eq!(
            parse_optional_duration("12h"),
            Ok(Some(Duration::from_secs(43200)))
        );
    }

    #[test]
    fn store_error_modes() {
        assert_eq!(
            OnStoreError::parse("fail-closed"),
            Ok(OnStoreError::FailClosed)
        );
        assert_eq!(OnStoreError::parse("Fail_Open"), Ok(OnStoreError::FailOpen));
        assert!(OnStoreError::parse("open").is_err());
        assert_eq!(OnStoreError::default(), OnStoreError::FailClosed);
    }

    #[test]
    fn upstreams() {
        let u = Upstream::parse("http://127.0.0.1:5000").unwrap();
        assert_eq!(u.authority.as_str(), "127.0.0.1:5000");
        let u = Upstream::parse("http://backend/").unwrap();
        assert_eq!(u.authority.as_str(), "backend:80");
        assert!(Upstream::parse("https://x:1").is_err());
        assert!(Upstream::parse("127.0.0.1:5000").is_err());
        assert!(Upstream::parse("http://x:1/app").is_err());
        assert!(Upstream::parse("http://u:p@x:1").is_err());
        assert!(Upstream::parse("not a url").is_err());
    }

    #[test]
    fn credentials_in_an_upstream_are_never_echoed() {
        let e = Upstream::parse("http://user:hunter2@x:1").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn prefixes() {
        assert_eq!(
            HeaderPrefix::parse("X-Session-").unwrap().as_str(),
            "x-session-"
        );
        assert_eq!(HeaderPrefix::parse("x_app_").unwrap().as_str(), "x-app-");
        assert!(HeaderPrefix::parse("x-session").is_err());
        assert!(HeaderPrefix::parse("-").is_err());
        assert!(HeaderPrefix::parse("x sess-").is_err());
    }

    fn settings() -> Settings {
        Settings::new(Upstream::parse("http://127.0.0.1:5000").unwrap())
    }

    fn redis() -> StoreConfig {
        StoreConfig::Redis {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "stickless:".into(),
            timeout: Duration::from_secs(1),
            durability: Durability::Acknowledged,
            iam: None,
            local_cache: 0,
            local_cache_bytes: DEFAULT_LOCAL_CACHE_BYTES,
            read_from: ReadFrom::Primary,
        }
    }

    #[test]
    fn the_connection_cap_follows_the_file_descriptor_limit() {
        assert_eq!(default_max_connections(None), 10_000);
        assert_eq!(default_max_connections(Some(1024)), 256);
        assert_eq!(default_max_connections(Some(100)), 1);
        assert_eq!(default_max_connections(Some(1 << 20)), 10_000);
        let mut s = settings();
        s.fd_limit = Some(1024);
        assert_eq!(Config::new(s.clone()).unwrap().connection_cap(), 256);
        s.max_connections = Some(5000);
        assert_eq!(Config::new(s).unwrap().connection_cap(), 5000);
    }

    #[test]
    fn workers_are_at_least_one_and_at_most_the_limit() {
        let mut s = settings();
        for (workers, ok) in [
            (0, false),
            (1, true),
            (MAX_WORKERS, true),
            (MAX_WORKERS + 1, false),
        ] {
            s.workers = workers;
            match Config::new(s.clone()) {
                Ok(c) => assert!(ok && c.workers == workers, "{workers} accepted"),
                Err(e) => {
                    assert!(!ok, "{workers} refused: {e}");
                    assert!(matches!(
                        e,
                        ConfigError::OutOfRange {
                            setting: "workers",
                            ..
                        }
                    ));
                }
            }
        }
    }

    #[test]
    fn defaults_make_a_config() {
        let c = Config::new(settings()).unwrap();
        assert!(matches!(c.store, StoreConfig::Memory));
        assert_eq!(c.ttl.idle, Duration::from_secs(1800));
    }

    #[test]
    fn every_redis_topology_has_a_url_form_and_other_schemes_are_refused() {
        let with_url = |url: &str| {
            let mut s = settings();
            s.keys = Some(SigningKeys::random());
            s.store = StoreConfig::Redis {
                url: url.into(),
                key_prefix: "k:".into(),
                timeout: Duration::from_secs(1),
                durability: Durability::Acknowledged,
                iam: None,
                local_cache: 0,
                local_cache_bytes: DEFAULT_LOCAL_CACHE_BYTES,
                read_from: ReadFrom::Primary,
            };
            Config::new(s)
        };
        for url in [
            "redis://127.0.0.1:6379",
            "REDISS://user:pass@cache.example.com:6380/2",
            "redis-cluster://cfg.example.com:6379?node=10.0.0.2:6379",
            "rediss-cluster://:pass@cfg.example.com:6379",
            "redis-sentinel://s1:26379/0?sentinelServiceName=mymaster&node=s2:26379",
            "rediss-sentinel://u:p@s1:26379?sentinelServiceName=m&sentinelPassword=q",
        ] {
            assert!(with_url(url).is_ok(), "{url}");
        }
        for url in [
            "http://127.0.0.1",
            "redis:/h",
            "redis-clusters://h",
            "valkey-cluster://h",
            "unix-sentinel://h",
            "redis+unix:///tmp/r.sock",
            "",
        ] {
            let e = with_url(url).unwrap_err();
            assert_eq!((e.setting(), &e), ("redis-url", &ConfigError::RedisUrl));
            assert!(
                !e.to_string().contains(url) || url.is_empty(),
                "never echoed"
            );
        }
    }

    #[test]
    fn iam_authentication_needs_tls_a_user_and_no_password() {
        let with = |url: &str, iam: IamAuth| {
            let mut s = settings();
            s.keys = Some(SigningKeys::random());
            s.store = StoreConfig::Redis {
                url: url.into(),
                key_prefix: "k:".into(),
                timeout: Duration::from_secs(1),
                durability: Durability::Acknowledged,
                iam: Some(iam),
                local_cache: 0,
                local_cache_bytes: DEFAULT_LOCAL_CACHE_BYTES,
                read_from: ReadFrom::Primary,
            };
            Config::new(s)
        };
        let iam = IamAuth {
            cache_name: "my-sessions".into(),
            region: None,
            serverless: false,
        };
        for url in [
            "rediss://stickless@master.my-sessions.abc123.use1.cache.amazonaws.com:6379",
            "REDISS://stickless@h:6379/0",
            "rediss-cluster://stickless@clustercfg.my-sessions.abc123.use1.cache.amazonaws.com:6379",
            "rediss-cluster://stickless@cfg:6379?node=other:6379",
            "rediss://stickless:@h:6379",
        ] {
            assert!(with(url, iam.clone()).is_ok(), "{url}");
        }
        let serverless = IamAuth {
            cache_name: "sessions".into(),
            region: Some("eu-west-3".into()),
            serverless: true,
        };
        assert!(with(
            "rediss://app@sessions-abc.serverless.euw3.cache.amazonaws.com:6379",
            serverless
        )
        .is_ok());
        for (url, iam, error) in [
            (
                "redis://stickless@h:6379",
                iam.clone(),
                ConfigError::IamNeedsTls,
            ),
            (
                "redis-cluster://stickless@h:6379",
                iam.clone(),
                ConfigError::IamNeedsTls,
            ),
            (
                "rediss-sentinel://stickless@s1:26379?sentinelServiceName=m",
                iam.clone(),
                ConfigError::IamWithSentinel,
            ),
            ("rediss://h:6379", iam.clone(), ConfigError::IamNeedsUser),
            (
                "rediss://:hunter2@h:6379",
                iam.clone(),
                ConfigError::IamNeedsUser,
            ),
            (
                "rediss://h:6379/0?x=a@b",
                iam.clone(),
                ConfigError::IamNeedsUser,
            ),
            (
                "rediss://stickless:hunter2@h:6379",
                iam.clone(),
                ConfigError::IamWithPassword,
            ),
            (
                "rediss://stickless@h:6379",
                IamAuth {
                    cache_name: "my cache".into(),
                    ..iam.clone()
                },
                ConfigError::IamCacheName,
            ),
            (
                "rediss://stickless@h:6379",
                IamAuth {
                    cache_name: String::new(),
                    ..iam.clone()
                },
                ConfigError::IamCacheName,
            ),
            (
                "rediss://stickless@h:6379",
                IamAuth {
                    region: Some("US East".into()),
                    ..iam.clone()
                },
                ConfigError::IamRegion,
            ),
        ] {
            let e = with(url, iam).unwrap_err();
            assert_eq!(e, error, "{url}");
            assert!(e.setting().starts_with("redis-iam"), "{url}");
            assert!(!e.to_string().contains("hunter2"), "never echoed");
        }
        assert_eq!(ConfigError::IamRegion.setting(), "redis-iam-region");
        assert_eq!(ConfigError::IamNeedsTls.setting(), "redis-iam");
    }

    #[test]
    fn the_store_debug_shows_iam_settings_but_not_the_url() {
        let store = StoreConfig::Redis {
            url: "rediss://stickless@secret-host:6379".into(),
            key_prefix: "k:".into(),
            timeout: Duration::from_secs(1),
            durability: Durability::Acknowledged,
            iam: Some(IamAuth {
                cache_name: "my-sessions".into(),
                region: None,
                serverless: false,
            }),
            local_cache: 0,
            local_cache_bytes: DEFAULT_LOCAL_CACHE_BYTES,
            read_from: ReadFrom::Primary,
        };
        let shown = format!("{store:?}");
        assert!(
            shown.contains("my-sessions") && !shown.contains("secret-host"),
            "{shown}"
        );
    }

    #[test]
    fn settings_that_do_not_fit_together_are_refused_by_name() {
        let refused = |f: &dyn Fn(&mut Settings)| {
            let mut s = settings();
            f(&mut s);
            Config::new(s).unwrap_err()
        };
        let e = refused(&|s| s.store = redis());
        assert_eq!((e.setting(), e), ("secret-keys", ConfigError::KeysRequired));
        let e = refused(&|s| {
            s.cookie.same_site = SameSite::None;
            s.cookie.secure = SecureMode::Never;
        });
        assert_eq!(e.setting(), "cookie-same-site");
        let e = refused(&|s| s.protocol.max_value_bytes = s.protocol.max_session_bytes + 1);
        assert_eq!(e.setting(), "max-value-bytes");
        let e = refused(&|s| s.protocol.max_fields = 0);
        assert_eq!(e.setting(), "max-fields");
        let e = refused(&|s| s.protocol.max_fields = MAX_FIELDS_LIMIT + 1);
        assert_eq!(e.setting(), "max-fields");
        let e = refused(&|s| s.protocol.max_session_bytes = 0);
        assert_eq!(e.setting(), "max-session-bytes");
        let e = refused(&|s| s.ttl.idle = Duration::ZERO);
        assert_eq!(e.setting(), "idle-timeout");
        let e = refused(&|s| s.upstream_idle_timeout = Duration::ZERO);
        assert_eq!(e.setting(), "upstream-idle-timeout");
        let e = refused(&|s| s.ttl.rotation_grace = Duration::from_millis(500));
        assert_eq!(e.setting(), "rotation-grace");
        let e = refused(&|s| {
            s.keys = Some(SigningKeys::random());
            s.store = StoreConfig::Redis {
                url: "redis://h".into(),
                key_prefix: "k:".into(),
                timeout: Duration::from_secs(2),
                durability: Durability::Acknowledged,
                iam: None,
                local_cache: 0,
                local_cache_bytes: DEFAULT_LOCAL_CACHE_BYTES,
                read_from: ReadFrom::Primary,
            };
            s.ttl.rotation_grace = Duration::from_secs(3);
        });
        assert_eq!(e.setting(), "rotation-grace");
        let e = refused(&|s| s.admin_listen = s.listen);
        assert_eq!(e.setting(), "admin-listen");
        let e = refused(&|s| {
            s.keys = Some(SigningKeys::random());
            s.store = StoreConfig::Redis {
                url: "http://127.0.0.1".into(),
                key_prefix: "k:".into(),
                timeout: Duration::from_secs(1),
                durability: Durability::Acknowledged,
                iam: None,
                local_cache: 0,
                local_cache_bytes: DEFAULT_LOCAL_CACHE_BYTES,
                read_from: ReadFrom::Primary,
            };
        });
        assert_eq!(e.setting(), "redis-url");
        let e = refused(&|s| {
            s.keys = Some(SigningKeys::random());
            s.store = StoreConfig::Redis {
                url: "redis://h".into(),
                key_prefix: "a b".into(),
                timeout: Duration::from_secs(1),
                durability: Durability::Acknowledged,
                iam: None,
                local_cache: 0,
                local_cache_bytes: DEFAULT_LOCAL_CACHE_BYTES,
                read_from: ReadFrom::Primary,
            };
        });
        assert_eq!(e.setting(), "key-prefix");
        for (url, size) in [
            ("redis-cluster://h", MAX_LOCAL_CACHE + 1),
            ("redis://h", MAX_LOCAL_CACHE + 1),
        ] {
            let e = refused(&|s| {
                s.keys = Some(SigningKeys::random());
                s.store = StoreConfig::Redis {
                    url: url.into(),
                    key_prefix: "k:".into(),
                    timeout: Duration::from_secs(1),
                    durability: Durability::Acknowledged,
                    iam: None,
                    local_cache: size,
                    local_cache_bytes: DEFAULT_LOCAL_CACHE_BYTES,
                    read_from: ReadFrom::Primary,
                };
            });
            assert_eq!(e.setting(), "local-cache");
        }
        for bytes in [0, 1024, 65 * 1024 * 1024 * 1024] {
            let e = refused(&|s| {
                s.keys = Some(SigningKeys::random());
                s.store = StoreConfig::Redis {
                    url: "redis://h".into(),
                    key_prefix: "k:".into(),
                    timeout: Duration::from_secs(1),
                    durability: Durability::Acknowledged,
                    iam: None,
                    local_cache: 10,
                    local_cache_bytes: bytes,
                    read_from: ReadFrom::Primary,
                };
            });
            assert_eq!(e.setting(), "local-cache-bytes", "{bytes}");
        }
        let e = refused(&|s| {
            s.keys = Some(SigningKeys::random());
            s.store = StoreConfig::Redis {
                url: "rediss-cluster://h".into(),
                key_prefix: "k:".into(),
                timeout: Duration::from_secs(1),
                durability: Durability::Acknowledged,
                iam: None,
                local_cache: 0,
                local_cache_bytes: DEFAULT_LOCAL_CACHE_BYTES,
                read_from: ReadFrom::Replica,
            };
        });
        assert_eq!(e.setting(), "read-from");
        assert!(e.to_string().contains("redis-cluster://"), "{e}");
        let e = refused(&|s| s.max_connections = Some(0));
        assert_eq!(e.setting(), "max-connections");
        let e = refused(&|s| s.header_read_timeout = Duration::ZERO);
        assert_eq!(e.setting(), "header-read-timeout");
        let e = refused(&|s| s.breaker.failures = 0);
        assert_eq!(e.setting(), "breaker-failures");
        let e = refused(&|s| s.breaker.failures = MAX_BREAKER_FAILURES + 1);
        assert_eq!(e.setting(), "breaker-failures");
        let e = refused(&|s| s.breaker.probe_interval = Duration::ZERO);
        assert_eq!(e.setting(), "breaker-probe-interval");
        let e = refused(&|s| s.shutdown_timeout = Duration::ZERO);
        assert_eq!(e.setting(), "shutdown-timeout");
        let e = refused(&|s| s.shutdown_timeout = MAX_STOP_DURATION + Duration::from_secs(1));
        assert_eq!(e.setting(), "shutdown-timeout");
        let e = refused(&|s| s.drain_delay = MAX_STOP_DURATION + Duration::from_secs(1));
        assert_eq!(e.setting(), "drain-delay");
        let mut no_delay = settings();
        no_delay.drain_delay = Duration::ZERO;
        assert!(
            Config::new(no_delay).is_ok(),
            "a drain delay of zero is allowed"
        );
        let e = refused(&|s| s.tls_cert = Some("cert.pem".into()));
        assert_eq!(e.setting(), "tls-key");
        let e = refused(&|s| s.tls_key = Some("key.pem".into()));
        assert_eq!(e.setting(), "tls-cert");
        let mut ok = settings();
        ok.keys = Some(SigningKeys::random());
        ok.store = redis();
        assert!(Config::new(ok.clone()).is_ok());
        ok.tls_cert = Some("cert.pem".into());
        ok.tls_key = Some("key.pem".into());
        let tls = Config::new(ok).unwrap().tls().cloned();
        assert_eq!(
            tls,
            Some(TlsFiles {
                cert: "cert.pem".into(),
                key: "key.pem".into()
            })
        );
    }
}
