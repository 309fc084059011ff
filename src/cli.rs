//! The command line: clap definitions, and their translation into the library's [`Settings`].
//! Every rule about values lives in the library (the value types' parsers and [`Config::new`]);
//! this module only names flags. Every flag can also be set by an environment variable
//! `STICKLESS_<FLAG>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use stickless::config::{
    self, AccessLog, BreakerConfig, Config, Durability, HeaderPrefix, IamAuth, InvalidValue,
    LogFormat, OnStoreError, ProtocolConfig, ReadFrom, Settings, StoreConfig, TtlPolicy, Upstream,
    DEFAULT_LOCAL_CACHE,
};
use stickless::cookie::{
    CookieAttribute, CookieConfig, CookieName, KeyError, SameSite, SecureMode, SigningKeys,
};

/// A session proxy: shared sessions on Redis / ElastiCache for any web app, without sticky
/// sessions or a session library.
#[derive(Debug, Parser)]
#[command(name = "stickless", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

// Parsed once at start-up: the size of the enum does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Print a fresh random secret key for --secret-keys.
    GenKey,
    /// Run the proxy on the embedded store in front of a built-in demo app, and print its address.
    Demo(DemoArgs),
}

fn duration(s: &str) -> Result<Duration, InvalidValue> {
    config::parse_duration(s)
}
fn duration_or_zero(s: &str) -> Result<Duration, InvalidValue> {
    config::parse_duration_or_zero(s)
}
/// A duration or `off`. A named type, because clap reads a bare `Option` as "flag may be absent".
#[derive(Debug, Clone, Copy)]
pub struct MaybeDuration(pub Option<Duration>);

fn optional_duration(s: &str) -> Result<MaybeDuration, InvalidValue> {
    config::parse_optional_duration(s).map(MaybeDuration)
}
fn count(s: &str) -> Result<usize, InvalidValue> {
    s.parse::<usize>()
        .map_err(|_| InvalidValue::new(s, "a whole number"))
}

#[derive(Clone, Args)]
pub struct ServeArgs {
    /// Address the proxy listens on.
    #[arg(
        long,
        env = "STICKLESS_LISTEN",
        default_value = "0.0.0.0:8080",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// The backend every request goes to.
    #[arg(long, env = "STICKLESS_UPSTREAM", default_value = "http://127.0.0.1:5000", value_name = "URL", value_parser = Upstream::parse)]
    pub upstream: Upstream,
    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "STICKLESS_ADMIN_LISTEN",
        default_value = "127.0.0.1:9180",
        value_name = "ADDR"
    )]
    pub admin_listen: SocketAddr,
    /// Redis, Valkey or ElastiCache URL: redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] or rediss://
    /// for TLS. Also read from REDIS_URL. Without it sessions live in this process's memory.
    #[arg(
        long,
        env = "STICKLESS_REDIS_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub redis_url: Option<String>,
    /// ElastiCache IAM authentication: the replication group id (or serverless cache name) to
    /// sign tokens for. The user id is the username in --redis-url (rediss://USER-ID@HOST:PORT,
    /// no password); credentials come from the standard AWS chain.
    #[arg(long, env = "STICKLESS_REDIS_IAM", value_name = "CACHE-NAME")]
    pub redis_iam: Option<String>,
    /// Region of the --redis-iam cache (default: the standard AWS chain's: AWS_REGION,
    /// AWS_DEFAULT_REGION, the profile, the EC2 instance metadata).
    #[arg(
        long,
        env = "STICKLESS_REDIS_IAM_REGION",
        value_name = "REGION",
        requires = "redis_iam"
    )]
    pub redis_iam_region: Option<String>,
    /// The --redis-iam cache is a serverless cache.
    #[arg(long, env = "STICKLESS_REDIS_IAM_SERVERLESS", requires = "redis_iam")]
    pub redis_iam_serverless: bool,
    /// Comma-separated secret keys: the first signs new cookies, all verify (for rotation).
    /// Make one with `stickless gen-key`. Required with --redis-url.
    #[arg(
        long,
        env = "STICKLESS_SECRET_KEYS",
        hide_env_values = true,
        value_name = "KEYS"
    )]
    pub secret_keys: Option<String>,
    /// Name of the session cookie.
    #[arg(long, env = "STICKLESS_COOKIE_NAME", default_value = "sid", value_parser = CookieName::parse)]
    pub cookie_name: CookieName,
    /// Domain attribute of the cookie (default: none, the cookie stays on the request's host).
    #[arg(long, env = "STICKLESS_COOKIE_DOMAIN", value_parser = CookieAttribute::parse)]
    pub cookie_domain: Option<CookieAttribute>,
    /// Path attribute of the cookie.
    #[arg(long, env = "STICKLESS_COOKIE_PATH", default_value = "/", value_parser = CookieAttribute::parse)]
    pub cookie_path: CookieAttribute,
    /// Secure attribute: auto (when the request came over TLS or with X-Forwarded-Proto: https),
    /// true or false.
    #[arg(long, env = "STICKLESS_COOKIE_SECURE", default_value = "auto", value_parser = SecureMode::parse)]
    pub cookie_secure: SecureMode,
    /// SameSite attribute: lax, strict or none.
    #[arg(long, env = "STICKLESS_COOKIE_SAME_SITE", default_value = "lax", value_parser = SameSite::parse)]
    pub cookie_same_site: SameSite,
    /// Sliding session lifetime: a request that uses the session renews it (in Redis, once the
    /// TTL fell an eighth of it short) (e.g. 30m, 12h).
    #[arg(long, env = "STICKLESS_IDLE_TIMEOUT", default_value = "30m", value_parser = duration)]
    pub idle_timeout: Duration,
    /// Lifetime from creation that no activity extends (e.g. 12h), or off.
    #[arg(long, env = "STICKLESS_ABSOLUTE_TIMEOUT", default_value = "off", value_parser = optional_duration)]
    pub absolute_timeout: MaybeDuration,
    /// After a rotation (login), how long the old session id is remembered as rotated: a request
    /// still carrying the old cookie then gets no session and cannot replace the new cookie.
    /// At least 1s, and with Redis at least twice --redis-timeout.
    #[arg(long, env = "STICKLESS_ROTATION_GRACE", default_value = "60s", value_parser = duration)]
    pub rotation_grace: Duration,
    /// Prefix of the protocol headers between stickless and the backend.
    #[arg(long, env = "STICKLESS_HEADER_PREFIX", default_value = "x-session-", value_parser = HeaderPrefix::parse)]
    pub header_prefix: HeaderPrefix,
    /// Prefix of the Redis keys (sessions are <prefix><id>).
    #[arg(long, env = "STICKLESS_KEY_PREFIX", default_value = "stickless:")]
    pub key_prefix: String,
    /// When a change counts as stored: acknowledged (by the primary) or replicated (also on a
    /// replica, WAIT 1, so that a failover cannot erase it; 503 when no replica confirms in time).
    #[arg(long, env = "STICKLESS_DURABILITY", default_value = "acknowledged", value_parser = Durability::parse)]
    pub durability: Durability,
    /// Sessions kept in this process's local cache in front of Redis (0: off). Redis tells every
    /// instance when a session changes (client-side caching); a hit costs no round trip.
    /// Default: 10000, or off with --read-from replica
    #[arg(long, env = "STICKLESS_LOCAL_CACHE")]
    pub local_cache: Option<usize>,
    /// Memory the local cache may hold, about (names, values and keys of the sessions in it, and
    /// their bookkeeping): a number of bytes, or with KiB, MiB or GiB. The oldest sessions go first
    #[arg(long, env = "STICKLESS_LOCAL_CACHE_BYTES", default_value = "32MiB", value_parser = config::parse_bytes)]
    pub local_cache_bytes: u64,
    /// Where session loads go: primary, or replica (a replica of the primary; a copy older than
    /// the user's own last change, or no replica answering, sends the load to the primary).
    /// Changes always go to the primary.
    #[arg(long, env = "STICKLESS_READ_FROM", default_value = "primary", value_parser = ReadFrom::parse)]
    pub read_from: ReadFrom,
    /// Bound on every Redis call; past it the request is answered 503.
    #[arg(long, env = "STICKLESS_REDIS_TIMEOUT", default_value = "1s", value_parser = duration)]
    pub redis_timeout: Duration,
    /// Time the backend gets to send its response headers; past it the request is answered 504.
    #[arg(long, env = "STICKLESS_UPSTREAM_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub upstream_timeout: Duration,
    /// How long an idle connection to the backend is kept for reuse. Keep it below the backend's
    /// keep-alive timeout (gunicorn 2s, Node.js 5s, uvicorn 5s).
    #[arg(long, env = "STICKLESS_UPSTREAM_IDLE_TIMEOUT", default_value = "1s", value_parser = duration)]
    pub upstream_idle_timeout: Duration,
    /// Most fields a session may hold.
    #[arg(long, env = "STICKLESS_MAX_FIELDS", default_value = "64", value_parser = count)]
    pub max_fields: usize,
    /// Longest field value, in bytes.
    #[arg(long, env = "STICKLESS_MAX_VALUE_BYTES", default_value = "4096", value_parser = count)]
    pub max_value_bytes: usize,
    /// Largest session (field names plus values), in bytes.
    #[arg(long, env = "STICKLESS_MAX_SESSION_BYTES", default_value = "16384", value_parser = count)]
    pub max_session_bytes: usize,
    /// Time a new client connection gets, from accept, to send a complete first request head
    /// (h2's connection preface included); past it the connection is closed.
    #[arg(long, env = "STICKLESS_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub header_read_timeout: Duration,
    /// Time an idle client connection stays open (between requests on HTTP/1.1, without an
    /// open stream on h2, pings or not). Keep it above the idle timeout of a load balancer in
    /// front (an ELB's is 60 s).
    #[arg(long, env = "STICKLESS_KEEP_ALIVE_TIMEOUT", default_value = "75s", value_parser = duration)]
    pub keep_alive_timeout: Duration,
    /// Most client connections open at once; at the cap the proxy stops accepting until one
    /// closes. Default: 10000, or fewer when the file-descriptor limit is lower.
    #[arg(long, env = "STICKLESS_MAX_CONNECTIONS", value_name = "N", value_parser = count)]
    pub max_connections: Option<usize>,
    /// Threads serving the proxy's port, each with its own listening socket (SO_REUSEPORT) and
    /// its own single-threaded runtime, so that a request stays on one thread. 1 serves it on one
    /// runtime shared by all cores. --max-connections counts the connections of all of them.
    /// Default: one per core.
    #[arg(long, env = "STICKLESS_WORKERS", value_name = "N", value_parser = count)]
    pub workers: Option<usize>,
    /// Consecutive Redis timeouts or connection failures after which the circuit breaker opens:
    /// calls then fail at once (503) instead of each waiting --redis-timeout.
    #[arg(long, env = "STICKLESS_BREAKER_FAILURES", default_value = "3", value_name = "N", value_parser = count)]
    pub breaker_failures: usize,
    /// While the circuit breaker is open, the pause between two pings of Redis; the first that
    /// succeeds closes it.
    #[arg(long, env = "STICKLESS_BREAKER_PROBE_INTERVAL", default_value = "500ms", value_parser = duration)]
    pub breaker_probe_interval: Duration,
    /// When a request's session cannot be loaded: fail-closed answers 503; fail-open forwards it
    /// with `X-Session: unavailable` and no fields, and answers 503 only if the response changes
    /// the session.
    #[arg(long, env = "STICKLESS_ON_STORE_ERROR", default_value = "fail-closed", value_name = "MODE", value_parser = OnStoreError::parse)]
    pub on_store_error: OnStoreError,
    /// Log lines as text, or json (one object a line, for CloudWatch Logs and the like).
    #[arg(long, env = "STICKLESS_LOG_FORMAT", default_value = "text", value_name = "FORMAT", value_parser = LogFormat::parse)]
    pub log_format: LogFormat,
    /// One log line per request (target stickless::access): on or off.
    #[arg(long, env = "STICKLESS_ACCESS_LOG", default_value = "on", value_name = "ON|OFF", value_parser = AccessLog::parse)]
    pub access_log: AccessLog,
    /// On SIGTERM or SIGINT, how long the proxy keeps accepting new connections while /readyz
    /// answers 503, so that the load balancer stops sending first; 0 closes the listener at once.
    /// A second SIGTERM or SIGINT cuts it short.
    #[arg(long, env = "STICKLESS_DRAIN_DELAY", default_value = "5s", value_parser = duration_or_zero)]
    pub drain_delay: Duration,
    /// Once the listener is closed, how long requests and upgraded connections (WebSocket) in
    /// flight get to finish; past it they are dropped and stickless exits.
    #[arg(long, env = "STICKLESS_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub shutdown_timeout: Duration,
    /// PEM file with the certificate chain (the server's certificate first, then intermediates):
    /// serves HTTPS (h2 and HTTP/1.1, TLS 1.2 and 1.3) on --listen instead of plain HTTP; needs
    /// --tls-key too. Both files are read again on SIGHUP.
    #[arg(long, env = "STICKLESS_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert (PKCS#8, RSA or EC).
    #[arg(long, env = "STICKLESS_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
}

impl std::fmt::Debug for ServeArgs {
    // The Redis URL may hold a password and the keys are secrets: neither is ever printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeArgs")
            .field("listen", &self.listen)
            .field("upstream", &self.upstream)
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<redacted>"))
            .field(
                "secret_keys",
                &self.secret_keys.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Address the demo listens on.
    #[arg(
        long,
        env = "STICKLESS_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "STICKLESS_ADMIN_LISTEN",
        default_value = "127.0.0.1:9180",
        value_name = "ADDR"
    )]
    pub admin_listen: SocketAddr,
}

/// A configuration error: the flag it concerns and what to do.
#[derive(Debug)]
pub struct ConfigError {
    pub flag: String,
    pub message: String,
}

impl ServeArgs {
    /// `--workers`, or one per core the process may run on (at most the limit) when not given.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(stickless::config::MAX_WORKERS)
        })
    }

    /// Turns the flags into a [`Config`]. `env_redis_url` is `REDIS_URL`, used when no
    /// `--redis-url` / `STICKLESS_REDIS_URL` is given; `fd_limit` is the process's open-file
    /// limit, which the default `--max-connections` is derived from.
    pub fn into_config(
        self,
        env_redis_url: Option<String>,
        fd_limit: Option<u64>,
    ) -> Result<Config, ConfigError> {
        let workers = self.worker_count();
        let redis_url = self
            .redis_url
            .or(env_redis_url)
            .filter(|u| !u.trim().is_empty());
        let iam = self.redis_iam.map(|cache_name| IamAuth {
            cache_name,
            region: self.redis_iam_region,
            serverless: self.redis_iam_serverless,
        });
        let store = match (redis_url, iam) {
            (None, None) if self.read_from == ReadFrom::Replica => {
                return Err(ConfigError {
                    flag: "--read-from".into(),
                    message: "replica needs --redis-url: the embedded store has no replicas"
                        .into(),
                })
            }
            (None, None) => StoreConfig::Memory,
            (None, Some(_)) => {
                return Err(ConfigError {
                    flag: "--redis-iam".into(),
                    message: "authenticates to ElastiCache, and needs --redis-url (rediss://USER-ID@HOST:PORT)".into(),
                })
            }
            (Some(url), iam) => StoreConfig::Redis {
                url,
                key_prefix: self.key_prefix,
                timeout: self.redis_timeout,
                durability: self.durability,
                iam,
                // Replica reads serve copies of their own: the cache is then off unless asked
                // for (and refused if it is).
                local_cache: self.local_cache.unwrap_or(match self.read_from {
                    ReadFrom::Replica => 0,
                    ReadFrom::Primary => DEFAULT_LOCAL_CACHE,
                }),
                local_cache_bytes: self.local_cache_bytes,
                read_from: self.read_from,
            },
        };
        let keys = match &self.secret_keys {
            None => None,
            Some(list) => Some(SigningKeys::parse(list).map_err(|e| ConfigError {
                flag: "--secret-keys".into(),
                message: match e {
                    KeyError::Empty => "no key given; make one with `stickless gen-key`".into(),
                    e => format!("{e}; make one with `stickless gen-key`"),
                },
            })?),
        };
        if let Some(abs) = self.absolute_timeout.0 {
            if abs < self.idle_timeout {
                tracing::info!("--absolute-timeout is shorter than --idle-timeout: sessions end at the absolute timeout");
            }
        }
        let mut settings = Settings::new(self.upstream);
        settings.listen = self.listen;
        settings.admin_listen = self.admin_listen;
        settings.store = store;
        settings.keys = keys;
        settings.cookie = CookieConfig {
            name: self.cookie_name,
            domain: self.cookie_domain,
            path: self.cookie_path,
            secure: self.cookie_secure,
            same_site: self.cookie_same_site,
        };
        settings.ttl = TtlPolicy {
            idle: self.idle_timeout,
            absolute: self.absolute_timeout.0,
            rotation_grace: self.rotation_grace,
        };
        settings.protocol = ProtocolConfig {
            header_prefix: self.header_prefix,
            max_fields: self.max_fields,
            max_value_bytes: self.max_value_bytes,
            max_session_bytes: self.max_session_bytes,
        };
        settings.upstream_timeout = self.upstream_timeout;
        settings.upstream_idle_timeout = self.upstream_idle_timeout;
        settings.header_read_timeout = self.header_read_timeout;
        settings.keep_alive_timeout = self.keep_alive_timeout;
        settings.max_connections = self.max_connections;
        settings.fd_limit = fd_limit;
        settings.workers = workers;
        settings.breaker = BreakerConfig {
            failures: self.breaker_failures,
            probe_interval: self.breaker_probe_interval,
        };
        settings.on_store_error = self.on_store_error;
        settings.drain_delay = self.drain_delay;
        settings.shutdown_timeout = self.shutdown_timeout;
        settings.tls_cert = self.tls_cert;
        settings.tls_key = self.tls_key;
        Config::new(settings).map_err(|e| {
            let hint = match e {
                config::ConfigError::KeysRequired => {
                    "; make one with `stickless gen-key` and give the same key to every instance \
                     (also readable from STICKLESS_SECRET_KEYS)"
                }
                _ => "",
            };
            ConfigError {
                flag: format!("--{}", e.setting()),
                message: format!("{e}{hint}"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("stickless").chain(args.iter().copied()))
    }

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_and_subcommands() {
        let cli = parse(&[]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen.to_string(), "0.0.0.0:8080");
        let cfg = cli.serve.into_config(None, None).unwrap();
        assert!(matches!(cfg.store, StoreConfig::Memory));
        assert_eq!(cfg.ttl.idle, Duration::from_secs(1800));
        assert_eq!(cfg.ttl.rotation_grace, config::DEFAULT_ROTATION_GRACE);
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(cfg.workers, cores, "one worker per core by default");
        let one = parse(&["--workers", "1"]).unwrap().serve;
        assert_eq!(one.into_config(None, None).unwrap().workers, 1);
        assert!(matches!(
            parse(&["gen-key"]).unwrap().command,
            Some(Command::GenKey)
        ));
        assert!(matches!(
            parse(&["serve", "--listen", "127.0.0.1:1"])
                .unwrap()
                .command,
            Some(Command::Serve(_))
        ));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let cli = parse(&[
            "--redis-url",
            "redis://:hunter2hunter2@h:6379",
            "--secret-keys",
            &"k".repeat(40),
        ])
        .unwrap();
        let shown = format!("{cli:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains(&"k".repeat(40)),
            "{shown}"
        );
    }

    #[test]
    fn redis_requires_keys() {
        let cli = parse(&["--redis-url", "redis://127.0.0.1:6379"]).unwrap();
        let err = cli.serve.into_config(None, None).unwrap_err();
        assert_eq!(err.flag, "--secret-keys");
        assert!(err.message.contains("stickless gen-key"));
        let cli = parse(&[]).unwrap();
        let err = cli
            .serve
            .into_config(Some("redis://h".into()), None)
            .unwrap_err();
        assert_eq!(err.flag, "--secret-keys");
        let cli = parse(&["--redis-url", "http://h", "--secret-keys", &"k".repeat(32)]).unwrap();
        assert_eq!(
            cli.serve.into_config(None, None).unwrap_err().flag,
            "--redis-url"
        );
        let cli = parse(&[
            "--redis-url",
            "redis://h",
            "--secret-keys",
            &"k".repeat(32),
            "--redis-timeout",
            "2s",
            "--rotation-grace",
            "1s",
        ])
        .unwrap();
        assert_eq!(
            cli.serve.into_config(None, None).unwrap_err().flag,
            "--rotation-grace"
        );
        let cli = parse(&["--secret-keys", "short"]).unwrap();
        assert_eq!(
            cli.serve.into_config(None, None).unwrap_err().flag,
            "--secret-keys"
        );
    }

    #[test]
    fn iam_flags() {
        let keys = "k".repeat(32);
        let url = "rediss://stickless@master.my-sessions.abc123.use1.cache.amazonaws.com:6379";
        let cfg = parse(&[
            "--redis-url",
            url,
            "--secret-keys",
            &keys,
            "--redis-iam",
            "my-sessions",
            "--redis-iam-region",
            "us-east-1",
            "--redis-iam-serverless",
        ])
        .unwrap()
        .serve
        .into_config(None, None)
        .unwrap();
        let StoreConfig::Redis { iam, .. } = &cfg.store else {
            panic!("a Redis store");
        };
        assert_eq!(
            iam.as_ref(),
            Some(&IamAuth {
                cache_name: "my-sessions".into(),
                region: Some("us-east-1".into()),
                serverless: true,
            })
        );
        let cfg = parse(&["--redis-url", url, "--secret-keys", &keys])
            .unwrap()
            .serve
            .into_config(None, None)
            .unwrap();
        assert!(matches!(cfg.store, StoreConfig::Redis { iam: None, .. }));
        // Refused by the library's checks, named by the flag.
        for (args, flag) in [
            (&["--redis-iam", "my-sessions"][..], "--redis-iam"),
            (
                &[
                    "--redis-url",
                    "redis://stickless@h:6379",
                    "--redis-iam",
                    "c",
                ][..],
                "--redis-iam",
            ),
            (
                &["--redis-url", "rediss://h:6379", "--redis-iam", "c"][..],
                "--redis-iam",
            ),
            (
                &["--redis-url", "rediss://u:p@h:6379", "--redis-iam", "c"][..],
                "--redis-iam",
            ),
            (
                &[
                    "--redis-url",
                    url,
                    "--redis-iam",
                    "c",
                    "--redis-iam-region",
                    "nowhere!",
                ][..],
                "--redis-iam-region",
            ),
        ] {
            let err = parse(args)
                .unwrap()
                .serve
                .secret(&keys)
                .into_config(None, None)
                .unwrap_err();
            assert_eq!(err.flag, flag, "{args:?}: {}", err.message);
        }
        // The region and serverless flags only go with --redis-iam.
        for args in [
            &["--redis-iam-region", "us-east-1"][..],
            &["--redis-iam-serverless"][..],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains("--redis-iam"), "{err}");
        }
    }

    impl ServeArgs {
        fn secret(mut self, keys: &str) -> Self {
            self.secret_keys = Some(keys.into());
            self
        }
    }

    #[test]
    fn bad_values_name_the_flag() {
        // Refused by the value's parser, as clap errors (exit 2).
        for (flag, value) in [
            ("--idle-timeout", "soon"),
            ("--upstream", "ftp://x"),
            ("--cookie-same-site", "sometimes"),
            ("--cookie-name", "s;d"),
            ("--header-prefix", "x"),
            ("--listen", "nowhere"),
            ("--max-fields", "many"),
            ("--keep-alive-timeout", "0"),
            ("--header-read-timeout", "soon"),
            ("--max-connections", "many"),
            ("--breaker-failures", "some"),
            ("--breaker-probe-interval", "0"),
            ("--on-store-error", "ignore"),
            ("--log-format", "xml"),
            ("--access-log", "maybe"),
            ("--drain-delay", "soon"),
            ("--shutdown-timeout", "0"),
        ] {
            let err = parse(&[flag, value]).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains(flag), "{err}");
        }
        // Refused by the library's checks, named by the flag.
        for (args, flag) in [
            (&["--max-fields", "0"][..], "--max-fields"),
            (&["--max-fields", "1001"][..], "--max-fields"),
            (&["--max-value-bytes", "0"][..], "--max-value-bytes"),
            (&["--rotation-grace", "500ms"][..], "--rotation-grace"),
            (&["--max-connections", "0"][..], "--max-connections"),
            (&["--max-connections", "1000001"][..], "--max-connections"),
            (&["--breaker-failures", "0"][..], "--breaker-failures"),
            (&["--breaker-failures", "1001"][..], "--breaker-failures"),
            (&["--drain-delay", "2h"][..], "--drain-delay"),
            (&["--shutdown-timeout", "2h"][..], "--shutdown-timeout"),
            (
                &["--max-value-bytes", "10", "--max-session-bytes", "5"][..],
                "--max-value-bytes",
            ),
            (
                &["--cookie-same-site", "none", "--cookie-secure", "false"][..],
                "--cookie-same-site",
            ),
            (
                &[
                    "--listen",
                    "127.0.0.1:7000",
                    "--admin-listen",
                    "127.0.0.1:7000",
                ][..],
                "--admin-listen",
            ),
        ] {
            let err = parse(args)
                .unwrap()
                .serve
                .into_config(None, None)
                .unwrap_err();
            assert_eq!(err.flag, flag, "{args:?}: {}", err.message);
        }
    }

    #[test]
    fn store_failure_handling() {
        let cfg = parse(&[]).unwrap().serve.into_config(None, None).unwrap();
        assert_eq!(cfg.breaker, BreakerConfig::default());
        assert_eq!(cfg.breaker.failures, 3);
        assert_eq!(cfg.breaker.probe_interval, Duration::from_millis(500));
        assert_eq!(cfg.on_store_error, OnStoreError::FailClosed);
        let cfg = parse(&[
            "--breaker-failures",
            "5",
            "--breaker-probe-interval",
            "1s",
            "--on-store-error",
            "fail-open",
        ])
        .unwrap()
        .serve
        .into_config(None, None)
        .unwrap();
        assert_eq!(cfg.breaker.failures, 5);
        assert_eq!(cfg.breaker.probe_interval, Duration::from_secs(1));
        assert_eq!(cfg.on_store_error, OnStoreError::FailOpen);
    }

    #[test]
    fn logging() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.serve.log_format, LogFormat::Text);
        assert_eq!(cli.serve.access_log, AccessLog::On);
        let cli = parse(&["--log-format", "json", "--access-log", "off"]).unwrap();
        assert_eq!(cli.serve.log_format, LogFormat::Json);
        assert_eq!(cli.serve.access_log, AccessLog::Off);
    }

    #[test]
    fn stopping() {
        let cfg = parse(&[]).unwrap().serve.into_config(None, None).unwrap();
        assert_eq!(cfg.drain_delay, Duration::from_secs(5));
        assert_eq!(cfg.shutdown_timeout, Duration::from_secs(30));
        let cfg = parse(&["--drain-delay", "0", "--shutdown-timeout", "2m"])
            .unwrap()
            .serve
            .into_config(None, None)
            .unwrap();
        assert_eq!(cfg.drain_delay, Duration::ZERO);
        assert_eq!(cfg.shutdown_timeout, Duration::from_secs(120));
    }

    #[test]
    fn connection_limits() {
        let cfg = parse(&[]).unwrap().serve.into_config(None, None).unwrap();
        assert_eq!(cfg.header_read_timeout, Duration::from_secs(30));
        assert_eq!(cfg.keep_alive_timeout, Duration::from_secs(75));
        assert_eq!(cfg.connection_cap(), 10_000);
        let cfg = parse(&[])
            .unwrap()
            .serve
            .into_config(None, Some(1024))
            .unwrap();
        assert_eq!(cfg.connection_cap(), 256);
        let cfg = parse(&["--max-connections", "50"])
            .unwrap()
            .serve
            .into_config(None, Some(1024))
            .unwrap();
        assert_eq!(cfg.connection_cap(), 50);
    }
}
