//! The typed configuration the library runs on, and the parsing of the values that are shared by every
//! front end (durations, cookie attributes, keys).
//!
//! The command line lives in the binary; it turns flags into a [`Config`] through the constructors and
//! parsers here, so that every rule about what a value may be lives in one place and is unit tested.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::cookie::SigningKeys;

/// Everything stickless needs to serve.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_listen: SocketAddr,
    /// The backend every request is forwarded to.
    pub upstream: Upstream,
    /// Where sessions live.
    pub store: StoreConfig,
    /// Keys that sign and verify session cookies.
    pub keys: SigningKeys,
    /// Session cookie attributes.
    pub cookie: CookieConfig,
    /// Session lifetime.
    pub ttl: TtlPolicy,
    /// Header protocol settings.
    pub protocol: ProtocolConfig,
    /// Time allowed for the backend to answer with response headers.
    pub upstream_timeout: Duration,
    /// Time a new client connection gets, from accept, to send a complete first request head
    /// (h2's preface included).
    pub header_read_timeout: Duration,
    /// Time an idle client connection stays open: between requests on HTTP/1.1, without an open
    /// stream on h2.
    pub keep_alive_timeout: Duration,
    /// Most client connections open at once on the proxy's listener.
    pub max_connections: usize,
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
    /// A message saying what is accepted, for anything else.
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s
            .parse()
            .map_err(|_| format!("`{s}` is not a URL; expected http://HOST:PORT"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "scheme `{other}` is not supported; expected http://HOST:PORT (stickless talks plain HTTP to a local backend)"
                ))
            }
            None => return Err(format!("`{s}` has no scheme; expected http://HOST:PORT")),
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "`{s}` has a path; expected http://HOST:PORT without a path"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{s}` has no host; expected http://HOST:PORT"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{s}` carries credentials; expected http://HOST:PORT"
            ));
        }
        let authority = if authority.port().is_some() {
            authority.clone()
        } else {
            format!("{}:80", authority.host())
                .parse()
                .map_err(|_| format!("`{s}` has an invalid host"))?
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
        /// `redis://` or `rediss://` URL, possibly with credentials.
        url: String,
        /// Prefix of every session key.
        key_prefix: String,
        /// Bound on every store call.
        timeout: Duration,
    },
}

impl fmt::Debug for StoreConfig {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Memory => f.write_str("Memory"),
            StoreConfig::Redis {
                key_prefix,
                timeout,
                ..
            } => f
                .debug_struct("Redis")
                .field("url", &"<redacted>")
                .field("key_prefix", key_prefix)
                .field("timeout", timeout)
                .finish(),
        }
    }
}

/// When the cookie carries the `Secure` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecureMode {
    /// Set when the request came over TLS or with `X-Forwarded-Proto: https`.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

impl SecureMode {
    /// Parses `auto`, `true` or `false`.
    ///
    /// # Errors
    /// A message listing what is accepted.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(SecureMode::Auto),
            "true" | "yes" | "on" | "always" => Ok(SecureMode::Always),
            "false" | "no" | "off" | "never" => Ok(SecureMode::Never),
            _ => Err(format!("`{s}` is not one of auto, true, false")),
        }
    }
}

/// The cookie's `SameSite` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    /// `SameSite=Lax`
    Lax,
    /// `SameSite=Strict`
    Strict,
    /// `SameSite=None` (browsers require `Secure` with it).
    None,
}

impl SameSite {
    /// Parses `lax`, `strict` or `none`.
    ///
    /// # Errors
    /// A message listing what is accepted.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "lax" => Ok(SameSite::Lax),
            "strict" => Ok(SameSite::Strict),
            "none" => Ok(SameSite::None),
            _ => Err(format!("`{s}` is not one of lax, strict, none")),
        }
    }

    /// The attribute's value as written in `Set-Cookie`.
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

/// Attributes of the session cookie. It is always `HttpOnly`.
#[derive(Debug, Clone)]
pub struct CookieConfig {
    /// Cookie name.
    pub name: String,
    /// `Domain` attribute, when set.
    pub domain: Option<String>,
    /// `Path` attribute.
    pub path: String,
    /// When to add `Secure`.
    pub secure: SecureMode,
    /// `SameSite` attribute.
    pub same_site: SameSite,
}

impl Default for CookieConfig {
    fn default() -> Self {
        CookieConfig {
            name: "sid".into(),
            domain: None,
            path: "/".into(),
            secure: SecureMode::Auto,
            same_site: SameSite::Lax,
        }
    }
}

/// Checks a cookie name against RFC 6265's token grammar.
///
/// # Errors
/// A message saying what is accepted.
pub fn validate_cookie_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not a cookie name; use letters, digits and !#$%&'*+-.^_`|~"
        ))
    }
}

/// Checks a cookie attribute value (domain or path): visible ASCII without `;`.
///
/// # Errors
/// A message saying what is accepted.
pub fn validate_cookie_attribute(s: &str) -> Result<(), String> {
    if !s.is_empty() && s.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b';') {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not allowed; use visible ASCII characters without `;` or spaces"
        ))
    }
}

/// How long sessions live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    /// Sliding lifetime: every request that uses the session renews it.
    pub idle: Duration,
    /// Lifetime from creation that no activity extends; `None` for no limit.
    pub absolute: Option<Duration>,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        TtlPolicy {
            idle: Duration::from_secs(30 * 60),
            absolute: None,
        }
    }
}

/// The header protocol's settings and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolConfig {
    /// Lower-case prefix of every protocol header, e.g. `x-session-`.
    pub header_prefix: String,
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
            header_prefix: "x-session-".into(),
            max_fields: 64,
            max_value_bytes: 4096,
            max_session_bytes: 16384,
        }
    }
}

/// Checks a header prefix: lower-cased, letters, digits and `-`, ending in `-`.
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_header_prefix(s: &str) -> Result<String, String> {
    let p = s.to_ascii_lowercase().replace('_', "-");
    let ok = p.len() >= 2
        && p.len() <= 64
        && p.ends_with('-')
        && p.starts_with(|c: char| c.is_ascii_alphabetic())
        && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(p)
    } else {
        Err(format!(
            "`{s}` is not a header prefix; use letters, digits and `-`, ending in `-` (like x-session-)"
        ))
    }
}

/// Parses a duration such as `30m`, `1s`, `250ms`, `12h`, `7d` or `90` (seconds).
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let err = || format!("`{s}` is not a duration; use a number with ms, s, m, h or d (like 30m)");
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
        return Err(format!("`{s}` is zero; give a positive duration"));
    }
    // Redis takes milliseconds as a signed 64-bit number; a century is plenty.
    if d > Duration::from_secs(100 * 365 * 86400) {
        return Err(format!("`{s}` is too long; give at most 36500d"));
    }
    Ok(d)
}

/// Parses a duration or `off`.
///
/// # Errors
/// As [`parse_duration`].
pub fn parse_optional_duration(s: &str) -> Result<Option<Duration>, String> {
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
        assert_eq!(parse_optional_duration("off"), Ok(None));
        assert_eq!(
            parse_optional_duration("12h"),
            Ok(Some(Duration::from_secs(43200)))
        );
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
    fn prefixes_and_cookie_attributes() {
        assert_eq!(parse_header_prefix("X-Session-"), Ok("x-session-".into()));
        assert_eq!(parse_header_prefix("x_app_"), Ok("x-app-".into()));
        assert!(parse_header_prefix("x-session").is_err());
        assert!(parse_header_prefix("-").is_err());
        assert!(parse_header_prefix("x sess-").is_err());
        assert!(validate_cookie_name("sid").is_ok());
        assert!(validate_cookie_name("__Host-sid").is_ok());
        assert!(validate_cookie_name("s;id").is_err());
        assert!(validate_cookie_name("").is_err());
        assert!(validate_cookie_attribute("/app").is_ok());
        assert!(validate_cookie_attribute("/a;b").is_err());
        assert_eq!(SecureMode::parse("AUTO"), Ok(SecureMode::Auto));
        assert!(SecureMode::parse("maybe").is_err());
        assert_eq!(SameSite::parse("Strict"), Ok(SameSite::Strict));
        assert!(SameSite::parse("lazy").is_err());
    }
}
