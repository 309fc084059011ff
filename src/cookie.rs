//! Session ids, the signed session cookie, and the `Cookie` / `Set-Cookie` headers around it.
//!
//! A session id is 256 bits from the operating system's CSPRNG, written base64url (43 characters).
//! The cookie value is `<id>.<tag>`, where the tag is HMAC-SHA256 over the id under the first
//! signing key. Every configured key verifies, so keys can be rotated: add the new key in front,
//! keep the old one behind it until the idle timeout has passed, then drop it. Tags are compared in
//! constant time, and a cookie whose tag fails is never looked up in the store.
//!
//! Beside it, when a load may be answered by a copy (`--local-cache`, `--read-from replica`), the
//! *version cookie* `<name>_v=<version>.<tag>` carries the version of the session the user's last
//! acknowledged change wrote, so that no instance serves them a copy older than that. Its tag is
//! HMAC-SHA256 over the id and the version (so it is worthless with any other session), cut to
//! 128 bits. It is a separate cookie so that a late response can never replace the session cookie
//! a concurrent login has just set: the worst it can do is lower the version, which only allows a
//! copy that the invalidation (or the replication) is already bringing up to date.
//!
//! The cookie's settings ([`CookieConfig`]) live here too: a name and attributes that can only be
//! built valid, so that writing `Set-Cookie` can never fail.

use std::fmt;
use std::ops::Range;
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Mac, SimpleHmac};
use http::HeaderValue;
use rand::RngCore;
use sha2::Sha256;

use crate::value::InvalidValue;

type HmacSha256 = SimpleHmac<Sha256>;

/// Bytes of entropy in a session id.
pub const ID_BYTES: usize = 32;
/// Length of an id written base64url without padding.
pub const ID_LEN: usize = 43;
const TAG_LEN: usize = 43;
/// Bytes of a version cookie's tag, and their length written base64url.
const VERSION_TAG_BYTES: usize = 16;
const VERSION_TAG_LEN: usize = 22;
/// What the version cookie's name adds to the session cookie's.
pub const VERSION_COOKIE_SUFFIX: &str = "_v";
/// Shortest secret key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// A session id. Its `Debug` output is redacted: an id is a bearer credential.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    /// A fresh id: 256 bits from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = [0u8; ID_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        SessionId(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The id as written in the cookie and the store key.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn parse(s: &str) -> Option<Self> {
        let mut bytes = [0u8; ID_BYTES];
        (s.len() == ID_LEN
            && URL_SAFE_NO_PAD.decode_slice(s, &mut bytes) == Ok(ID_BYTES)
            // Reject non-canonical encodings so that one id has exactly one spelling.
            && URL_SAFE_NO_PAD.encode(bytes) == s)
            .then(|| SessionId(s.to_owned()))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionId(<redacted>)")
    }
}

/// The keys that sign (the first) and verify (all) session cookies.
///
/// ```
/// use stickless::cookie::{generate_key, SessionId, SigningKeys};
/// let (old, new) = (generate_key(), generate_key());
/// let before = SigningKeys::parse(&old).unwrap();
/// let rotated = SigningKeys::parse(&format!("{new},{old}")).unwrap();
/// let id = SessionId::generate();
/// // A cookie signed before the rotation still verifies after it.
/// assert_eq!(rotated.verify(&before.sign(&id)), Some(id.clone()));
/// // A tampered cookie does not.
/// assert_eq!(rotated.verify(&before.sign(&id).replace('.', ".x")), None);
/// ```
#[derive(Clone)]
pub struct SigningKeys {
    keys: Vec<HmacSha256>,
}

impl fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKeys(<{} redacted>)", self.keys.len())
    }
}

/// Why a list of secret keys was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// No key at all.
    #[error("no key given")]
    Empty,
    /// A key shorter than [`MIN_KEY_BYTES`]; `position` counts from 1.
    #[error("key {position} is {len} bytes; keys must be at least {MIN_KEY_BYTES} bytes")]
    TooShort {
        /// 1-based position in the list.
        position: usize,
        /// Its length in bytes.
        len: usize,
    },
}

impl SigningKeys {
    /// Builds the key set from a comma-separated list; the first key signs, all verify.
    /// Each key is used as the bytes it is written with (`stickless gen-key` prints suitable ones).
    ///
    /// # Errors
    /// [`KeyError`] when the list is empty or a key is too short.
    pub fn parse(list: &str) -> Result<Self, KeyError> {
        let parts: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .collect();
        if parts.is_empty() {
            return Err(KeyError::Empty);
        }
        let mut keys = Vec::with_capacity(parts.len());
        for (i, k) in parts.iter().enumerate() {
            if k.len() < MIN_KEY_BYTES {
                return Err(KeyError::TooShort {
                    position: i + 1,
                    len: k.len(),
                });
            }
            keys.push(
                HmacSha256::new_from_slice(k.as_bytes()).expect("HMAC takes keys of any size"),
            );
        }
        Ok(SigningKeys { keys })
    }

    /// A single random key, for the embedded store where cookies need not outlive the process.
    pub fn random() -> Self {
        SigningKeys::parse(&generate_key()).expect("a generated key is long enough")
    }

    fn tag(mac: &HmacSha256, id: &SessionId) -> HmacSha256 {
        let mut mac = mac.clone();
        mac.update(id.as_str().as_bytes());
        mac
    }

    /// The cookie value for `id`, signed with the first key.
    pub fn sign(&self, id: &SessionId) -> String {
        let tag = Self::tag(&self.keys[0], id).finalize().into_bytes();
        let mut out = String::with_capacity(ID_LEN + 1 + TAG_LEN);
        out.push_str(id.as_str());
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(tag, &mut out);
        out
    }

    fn version_tag(mac: &HmacSha256, id: &SessionId, version: u64) -> HmacSha256 {
        let mut mac = mac.clone();
        // A prefix of its own: no version tag is ever the tag of a session cookie.
        mac.update(b"stickless version\0");
        mac.update(id.as_str().as_bytes());
        mac.update(b"\0");
        mac.update(&version.to_be_bytes());
        mac
    }

    /// The version cookie's value for `version` of the session `id`, signed with the first key.
    pub fn sign_version(&self, id: &SessionId, version: u64) -> String {
        let tag = Self::version_tag(&self.keys[0], id, version)
            .finalize()
            .into_bytes();
        let mut out = version.to_string();
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&tag[..VERSION_TAG_BYTES], &mut out);
        out
    }

    /// The version in a version cookie's value, if it verifies for the session `id` under any
    /// key: a cookie of another session, or a forged one, is `None`.
    pub fn verify_version(&self, id: &SessionId, value: &str) -> Option<u64> {
        let (version, tag) = value.split_once('.')?;
        if tag.len() != VERSION_TAG_LEN || version.len() > 20 {
            return None;
        }
        let version: u64 = version.parse().ok()?;
        let mut tag_bytes = [0u8; VERSION_TAG_BYTES];
        if URL_SAFE_NO_PAD.decode_slice(tag, &mut tag_bytes) != Ok(VERSION_TAG_BYTES) {
            return None;
        }
        self.keys
            .iter()
            .any(|k| {
                Self::version_tag(k, id, version)
                    .verify_truncated_left(&tag_bytes)
                    .is_ok()
            })
            .then_some(version)
    }

    /// The session id in a cookie value, if its tag verifies under any key.
    pub fn verify(&self, value: &str) -> Option<SessionId> {
        let (id, tag) = value.split_once('.')?;
        if tag.len() != TAG_LEN {
            return None;
        }
        let id = SessionId::parse(id)?;
        let mut tag_bytes = [0u8; 32];
        if URL_SAFE_NO_PAD.decode_slice(tag, &mut tag_bytes) != Ok(32) {
            return None;
        }
        // `verify_slice` compares in constant time.
        self.keys
            .iter()
            .any(|k| Self::tag(k, &id).verify_slice(&tag_bytes).is_ok())
            .then_some(id)
    }
}

/// Cookie values that verified lately: a user's next requests skip the HMAC and the decoding of
/// the id. A pure function remembered (a value verifies, or not, whatever the time, under the
/// keys given at startup), in a table of a fixed number of slots, each holding the last value
/// that verified there. A value is found by comparing it whole, in constant time; a value that
/// does not verify is never kept, so a forged cookie costs its HMAC every time and can at most
/// push a real one out of its slot (which then costs one HMAC again).
pub struct VerifiedCookies {
    slots: Box<[Mutex<Option<Verified>>]>,
}

/// One remembered value: for a version cookie (`version` is then `Some`), the session it
/// belongs to and its version.
struct Verified {
    value: Box<str>,
    id: SessionId,
    version: Option<u64>,
}

impl VerifiedCookies {
    /// A table of `slots` slots (at least one).
    pub fn new(slots: usize) -> Self {
        VerifiedCookies {
            slots: (0..slots.max(1)).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// The slot of `value`: from its last bytes, the tag (random for a real cookie). A forged
    /// value can aim at any slot, which costs it nothing and gains it nothing.
    fn slot(&self, value: &str) -> &Mutex<Option<Verified>> {
        let b = value.as_bytes();
        let tail = &b[b.len().saturating_sub(8)..];
        let mut word = [0u8; 8];
        word[..tail.len()].copy_from_slice(tail);
        let mixed = u64::from_le_bytes(word).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.slots[(mixed >> 32) as usize % self.slots.len()]
    }

    /// [`SigningKeys::verify`] of `value`, remembered.
    pub fn session(&self, keys: &SigningKeys, value: &str) -> Option<SessionId> {
        let slot = self.slot(value);
        if let Ok(held) = slot.lock() {
            let found = held
                .as_ref()
                .filter(|v| v.version.is_none() && same(&v.value, value));
            if let Some(v) = found {
                return Some(v.id.clone());
            }
        }
        let id = keys.verify(value)?;
        if let Ok(mut held) = slot.lock() {
            *held = Some(Verified {
                value: value.into(),
                id: id.clone(),
                version: None,
            });
        }
        Some(id)
    }

    /// [`SigningKeys::verify_version`] of `value` for the session `id`, remembered.
    pub fn version(&self, keys: &SigningKeys, id: &SessionId, value: &str) -> Option<u64> {
        let slot = self.slot(value);
        if let Ok(held) = slot.lock() {
            let found = held.as_ref().and_then(|v| {
                let mine = same(&v.value, value) && same(v.id.as_str(), id.as_str());
                v.version.filter(|_| mine)
            });
            if found.is_some() {
                return found;
            }
        }
        let version = keys.verify_version(id, value)?;
        if let Ok(mut held) = slot.lock() {
            *held = Some(Verified {
                value: value.into(),
                id: id.clone(),
                version: Some(version),
            });
        }
        Some(version)
    }
}

/// Whether `a` and `b` are the same, in time that depends on their lengths only: every byte is
/// compared, the differences gathered, and the result looked at once (hidden from the optimizer,
/// so that no early exit is made of it).
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A fresh random secret key: 256 bits, base64url.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Values kept of one cookie name: browsers send one per matching path and domain, so a handful
/// covers every real case; past that a forged flood costs nothing more.
pub const KEPT_COOKIE_VALUES: usize = 4;

/// The first [`KEPT_COOKIE_VALUES`] values of one cookie name, in order: where each is in its
/// header, which is shared (no allocation).
#[derive(Default)]
pub struct CookieValues {
    values: [Option<(HeaderValue, Range<usize>)>; KEPT_COOKIE_VALUES],
    len: usize,
}

impl CookieValues {
    fn push(&mut self, header: &HeaderValue, at: Range<usize>) {
        if let Some(slot) = self.values.get_mut(self.len) {
            *slot = Some((header.clone(), at));
            self.len += 1;
        }
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The values, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.values
            .iter()
            .flatten()
            .filter_map(|(header, at)| std::str::from_utf8(header.as_bytes().get(at.clone())?).ok())
    }
}

/// What the request's `Cookie` headers held, once the session cookie is taken out. Its `Debug`
/// output shows no value.
#[derive(Default)]
pub struct RequestCookies {
    /// The first values of the cookies with the session cookie's name, in order.
    pub session_values: CookieValues,
    /// The first values of the version cookies (the session cookie's name and `_v`), in order.
    pub version_values: CookieValues,
    /// The other cookies, rejoined, or `None` when nothing else is left.
    pub rest: Option<HeaderValue>,
}

impl fmt::Debug for RequestCookies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestCookies")
            .field("session_values", &self.session_values.len)
            .field("version_values", &self.version_values.len)
            .field("rest", &self.rest.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Splits the `Cookie` header values into the session cookie(s), the version cookie(s)
/// (`<name>_v`) and the rest. Pairs that cannot be parsed are passed through to the backend
/// unchanged.
pub fn split_cookies<'a>(
    headers: impl Iterator<Item = &'a HeaderValue>,
    name: &str,
) -> RequestCookies {
    let mut out = RequestCookies::default();
    let mut rest: Vec<&[u8]> = Vec::new();
    for value in headers {
        let start = value.as_bytes().as_ptr() as usize;
        for pair in value.as_bytes().split(|&b| b == b';') {
            let pair = trim_ascii(pair);
            if pair.is_empty() {
                continue;
            }
            let (k, v) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (trim_ascii(&pair[..i]), trim_ascii(&pair[i + 1..])),
                None => (pair, &b""[..]),
            };
            let ours = if k == name.as_bytes() {
                Some(&mut out.session_values)
            } else if k.strip_prefix(name.as_bytes()) == Some(VERSION_COOKIE_SUFFIX.as_bytes()) {
                Some(&mut out.version_values)
            } else {
                None
            };
            if let Some(values) = ours {
                let v = v
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v);
                if std::str::from_utf8(v).is_ok() {
                    let at = v.as_ptr() as usize - start;
                    values.push(value, at..at + v.len());
                }
            } else {
                rest.push(pair);
            }
        }
    }
    if !rest.is_empty() {
        let joined = rest.join(&b"; "[..]);
        // Every byte came from a valid header value and `; ` is valid, so this cannot fail.
        out.rest = HeaderValue::from_bytes(&joined).ok();
    }
    out
}

fn trim_ascii(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
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
    /// Parses `auto`, `true` or `false` (also `always`/`never`, `yes`/`no`, `on`/`off`).
    ///
    /// # Errors
    /// [`InvalidValue`] naming what is accepted.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(SecureMode::Auto),
            "true" | "yes" | "on" | "always" => Ok(SecureMode::Always),
            "false" | "no" | "off" | "never" => Ok(SecureMode::Never),
            _ => Err(InvalidValue::new(s, "one of auto, true, false")),
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
    /// [`InvalidValue`] naming what is accepted.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        match s.to_ascii_lowercase().as_str() {
            "lax" => Ok(SameSite::Lax),
            "strict" => Ok(SameSite::Strict),
            "none" => Ok(SameSite::None),
            _ => Err(InvalidValue::new(s, "one of lax, strict, none")),
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

/// A cookie name: an RFC 6265 token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieName(String);

impl CookieName {
    /// Checks `s` against RFC 6265's token grammar.
    ///
    /// # Errors
    /// [`InvalidValue`] saying what is accepted.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        let ok = !s.is_empty()
            && s.len() <= 256
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if ok {
            Ok(CookieName(s.to_owned()))
        } else {
            Err(InvalidValue::new(
                s,
                "a cookie name of letters, digits and !#$%&'*+-.^_`|~",
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A cookie attribute value (`Domain` or `Path`): visible ASCII without `;`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieAttribute(String);

impl CookieAttribute {
    /// Checks `s`.
    ///
    /// # Errors
    /// [`InvalidValue`] saying what is accepted.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        if !s.is_empty()
            && s.len() <= 1024
            && s.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b';')
        {
            Ok(CookieAttribute(s.to_owned()))
        } else {
            Err(InvalidValue::new(
                s,
                "visible ASCII characters without `;` or spaces",
            ))
        }
    }

    /// The value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Attributes of the session cookie. It is always `HttpOnly`. Every part is valid by
/// construction; [`crate::config::Config`] checks that they fit together.
#[derive(Debug, Clone)]
pub struct CookieConfig {
    /// Cookie name.
    pub name: CookieName,
    /// `Domain` attribute, when set.
    pub domain: Option<CookieAttribute>,
    /// `Path` attribute.
    pub path: CookieAttribute,
    /// When to add `Secure`.
    pub secure: SecureMode,
    /// `SameSite` attribute.
    pub same_site: SameSite,
}

impl Default for CookieConfig {
    fn default() -> Self {
        CookieConfig {
            name: CookieName("sid".into()),
            domain: None,
            path: CookieAttribute("/".into()),
            secure: SecureMode::Auto,
            same_site: SameSite::Lax,
        }
    }
}

/// Builds `Set-Cookie` values for the session cookie.
#[derive(Debug, Clone)]
pub struct CookieWriter {
    config: CookieConfig,
}

impl CookieWriter {
    /// A writer for these attributes.
    pub fn new(config: CookieConfig) -> Self {
        CookieWriter { config }
    }

    /// The cookie name.
    pub fn name(&self) -> &str {
        self.config.name.as_str()
    }

    /// Whether `Secure` is added, given whether the request came over HTTPS.
    pub fn secure(&self, request_is_https: bool) -> bool {
        match self.config.secure {
            SecureMode::Auto => request_is_https,
            SecureMode::Always => true,
            SecureMode::Never => false,
        }
    }

    /// `Set-Cookie` for a session cookie. `max_age` is the absolute timeout when there is one:
    /// otherwise the cookie lives as long as the browser, and the store decides when it expires.
    pub fn set(&self, value: &str, max_age: Option<u64>, https: bool) -> HeaderValue {
        let mut s = format!("{}={}", self.config.name.as_str(), value);
        if let Some(age) = max_age {
            s.push_str(&format!("; Max-Age={age}"));
        }
        self.attributes(&mut s, https);
        HeaderValue::from_str(&s).expect("cookie name, value and attributes are validated")
    }

    /// `Set-Cookie` that removes the session cookie from the browser.
    pub fn clear(&self, https: bool) -> HeaderValue {
        self.clear_named("", https)
    }

    /// `Set-Cookie` for the version cookie, with the session cookie's attributes and lifetime.
    pub fn set_version(&self, value: &str, max_age: Option<u64>, https: bool) -> HeaderValue {
        let mut s = format!(
            "{}{VERSION_COOKIE_SUFFIX}={value}",
            self.config.name.as_str()
        );
        if let Some(age) = max_age {
            s.push_str(&format!("; Max-Age={age}"));
        }
        self.attributes(&mut s, https);
        HeaderValue::from_str(&s).expect("cookie name, value and attributes are validated")
    }

    /// `Set-Cookie` that removes the version cookie from the browser.
    pub fn clear_version(&self, https: bool) -> HeaderValue {
        self.clear_named(VERSION_COOKIE_SUFFIX, https)
    }

    fn clear_named(&self, suffix: &str, https: bool) -> HeaderValue {
        let mut s = format!(
            "{}{suffix}=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
            self.config.name.as_str()
        );
        self.attributes(&mut s, https);
        HeaderValue::from_str(&s).expect("cookie name and attributes are validated")
    }

    fn attributes(&self, s: &mut String, https: bool) {
        s.push_str("; Path=");
        s.push_str(self.config.path.as_str());
        if let Some(d) = &self.config.domain {
            s.push_str("; Domain=");
            s.push_str(d.as_str());
        }
        // Browsers drop `SameSite=None` cookies that are not `Secure` (and the configuration
        // refuses `SameSite=None` with `Secure` never): over plain HTTP, `auto` adds it too.
        if self.secure(https) || self.config.same_site == SameSite::None {
            s.push_str("; Secure");
        }
        s.push_str("; HttpOnly; SameSite=");
        s.push_str(self.config.same_site.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "0123456789abcdef0123456789abcdef";
    const K2: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn ids_are_256_bits_and_distinct() {
        let a = SessionId::generate();
        let b = SessionId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), ID_LEN);
        assert_eq!(URL_SAFE_NO_PAD.decode(a.as_str()).unwrap().len(), 32);
        assert_eq!(format!("{a:?}"), "SessionId(<redacted>)");
    }

    #[test]
    fn sign_then_verify() {
        let keys = SigningKeys::parse(K1).unwrap();
        let id = SessionId::generate();
        let cookie = keys.sign(&id);
        assert_eq!(keys.verify(&cookie), Some(id));
    }

    #[test]
    fn rotation_old_key_still_verifies_new_key_signs() {
        let old = SigningKeys::parse(K1).unwrap();
        let rotated = SigningKeys::parse(&format!("{K2},{K1}")).unwrap();
        let id = SessionId::generate();
        assert_eq!(rotated.verify(&old.sign(&id)), Some(id.clone()));
        assert_eq!(old.verify(&rotated.sign(&id)), None);
        let dropped = SigningKeys::parse(K2).unwrap();
        assert_eq!(dropped.verify(&old.sign(&id)), None);
    }

    #[test]
    fn tampering_fails() {
        let keys = SigningKeys::parse(K1).unwrap();
        let id = SessionId::generate();
        let cookie = keys.sign(&id);
        let other = SessionId::generate();
        let (_, tag) = cookie.split_once('.').unwrap();
        assert_eq!(keys.verify(&format!("{}.{}", other.as_str(), tag)), None);
        for i in 0..cookie.len() {
            let mut b = cookie.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let s = String::from_utf8(b).unwrap();
            if s != cookie {
                assert_eq!(keys.verify(&s), None, "flipped byte {i}");
            }
        }
        for bad in [
            "",
            ".",
            "abc",
            "abc.def",
            &cookie[..cookie.len() - 1],
            &format!("{cookie}x"),
        ] {
            assert_eq!(keys.verify(bad), None);
        }
    }

    #[test]
    fn version_cookies_are_bound_to_their_session_and_version() {
        let keys = SigningKeys::parse(K1).unwrap();
        let id = SessionId::generate();
        let v = keys.sign_version(&id, 42);
        assert!(v.starts_with("42."), "{v}");
        assert_eq!(keys.verify_version(&id, &v), Some(42));
        assert_eq!(keys.verify_version(&SessionId::generate(), &v), None);
        let (_, tag) = v.split_once('.').unwrap();
        assert_eq!(keys.verify_version(&id, &format!("43.{tag}")), None);
        // Never the tag of a session cookie, nor the other way round.
        assert_eq!(keys.verify(&format!("{}.{tag}", id.as_str())), None);
        let session_tag = keys.sign(&id).split_once('.').unwrap().1.to_owned();
        assert_eq!(keys.verify_version(&id, &format!("42.{session_tag}")), None);
        // Key rotation: the old key still verifies.
        let rotated = SigningKeys::parse(&format!("{K2},{K1}")).unwrap();
        assert_eq!(rotated.verify_version(&id, &v), Some(42));
        assert_eq!(
            SigningKeys::parse(K2).unwrap().verify_version(&id, &v),
            None
        );
        for bad in [
            "",
            ".",
            "42",
            "42.",
            "x.abc",
            &format!("-1.{tag}"),
            &v[..v.len() - 1],
        ] {
            assert_eq!(keys.verify_version(&id, bad), None, "{bad}");
        }
        let big = keys.sign_version(&id, u64::MAX);
        assert_eq!(keys.verify_version(&id, &big), Some(u64::MAX));
    }

    #[test]
    fn keys_are_validated() {
        assert_eq!(SigningKeys::parse("").unwrap_err(), KeyError::Empty);
        assert_eq!(SigningKeys::parse(" , ").unwrap_err(), KeyError::Empty);
        assert_eq!(
            SigningKeys::parse(&format!("{K1},short")).unwrap_err(),
            KeyError::TooShort {
                position: 2,
                len: 5
            }
        );
        assert!(SigningKeys::parse(&generate_key()).is_ok());
        assert!(!format!("{:?}", SigningKeys::parse(K1).unwrap()).contains(K1));
    }

    #[test]
    fn same_compares_whole_values() {
        assert!(same("abc", "abc"));
        assert!(same("", ""));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "xbc"));
        assert!(!same("abc", "abcd"));
    }

    #[test]
    fn verified_cookies_are_remembered_and_forged_ones_never() {
        let keys = SigningKeys::parse(K1).unwrap();
        let other = SigningKeys::parse(K2).unwrap();
        let memo = VerifiedCookies::new(4);
        let (a, b) = (SessionId::generate(), SessionId::generate());
        let (ca, cb) = (keys.sign(&a), keys.sign(&b));
        assert_eq!(memo.session(&keys, &ca), Some(a.clone()));
        // Remembered: found even under keys that would refuse it (the keys never change).
        assert_eq!(memo.session(&other, &ca), Some(a.clone()));
        assert_eq!(memo.session(&keys, &cb), Some(b.clone()));
        // A forged value is refused and not remembered.
        let forged = other.sign(&a);
        assert_eq!(memo.session(&keys, &forged), None);
        assert_eq!(memo.session(&keys, &forged), None);
        let mut flipped = ca.clone().into_bytes();
        flipped[10] ^= 1;
        let flipped = String::from_utf8(flipped).unwrap();
        assert_eq!(memo.session(&keys, &flipped), None);
        // A version cookie is remembered for its own session only.
        let v = keys.sign_version(&a, 7);
        assert_eq!(memo.version(&keys, &a, &v), Some(7));
        assert_eq!(memo.version(&other, &a, &v), Some(7));
        assert_eq!(memo.version(&keys, &b, &v), None);
        assert_eq!(memo.version(&other, &b, &v), None);
        // A remembered version cookie is never taken for a session cookie.
        assert_eq!(memo.session(&other, &v), None);
    }

    #[test]
    fn cookies_are_split() {
        let h = [
            HeaderValue::from_static("a=1; sid=abc.def;b=2"),
            HeaderValue::from_static("sid=\"q\"; c; sid_v=3.t; sid_vv=1; xsid_v=2"),
        ];
        let c = split_cookies(h.iter(), "sid");
        assert_eq!(
            c.session_values.iter().collect::<Vec<_>>(),
            ["abc.def", "q"]
        );
        assert_eq!(c.version_values.iter().collect::<Vec<_>>(), ["3.t"]);
        assert_eq!(c.rest.unwrap(), "a=1; b=2; c; sid_vv=1; xsid_v=2");
        let only = [HeaderValue::from_static("sid=x")];
        let c = split_cookies(only.iter(), "sid");
        assert!(c.rest.is_none());
        let c = split_cookies(only.iter(), "other");
        assert!(c.session_values.is_empty());
        assert_eq!(c.rest.unwrap(), "sid=x");
        // Only the first few of one name are kept; the others are not passed on either.
        let flood = [HeaderValue::from_static(
            "sid=1; sid=2; sid=3; sid=4; sid=5; a=b",
        )];
        let c = split_cookies(flood.iter(), "sid");
        assert_eq!(
            c.session_values.iter().collect::<Vec<_>>(),
            ["1", "2", "3", "4"]
        );
        assert_eq!(c.rest.unwrap(), "a=b");
    }

    #[test]
    fn names_and_attributes_are_validated() {
        assert!(CookieName::parse("sid").is_ok());
        assert!(CookieName::parse("__Host-sid").is_ok());
        assert!(CookieName::parse("s;id").is_err());
        assert!(CookieName::parse("").is_err());
        assert!(CookieName::parse(&"s".repeat(257)).is_err());
        assert!(CookieAttribute::parse("/app").is_ok());
        assert!(CookieAttribute::parse("/a;b").is_err());
        assert!(CookieAttribute::parse("a b").is_err());
        assert_eq!(SecureMode::parse("AUTO"), Ok(SecureMode::Auto));
        assert!(SecureMode::parse("maybe").is_err());
        assert_eq!(SameSite::parse("Strict"), Ok(SameSite::Strict));
        assert!(SameSite::parse("lazy").is_err());
    }

    #[test]
    fn set_cookie_attributes() {
        let w = CookieWriter::new(CookieConfig::default());
        assert_eq!(
            w.set("v", None, false),
            "sid=v; Path=/; HttpOnly; SameSite=Lax"
        );
        assert_eq!(
            w.set("v", Some(60), true),
            "sid=v; Max-Age=60; Path=/; Secure; HttpOnly; SameSite=Lax"
        );
        assert!(w
            .clear(false)
            .to_str()
            .unwrap()
            .starts_with("sid=; Max-Age=0;"));
        assert_eq!(
            w.set_version("7.t", Some(60), false),
            "sid_v=7.t; Max-Age=60; Path=/; HttpOnly; SameSite=Lax"
        );
        assert_eq!(
            w.clear_version(false),
            "sid_v=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/; HttpOnly; SameSite=Lax"
        );
        let w = CookieWriter::new(CookieConfig {
            domain: Some(CookieAttribute::parse("example.com").unwrap()),
            same_site: SameSite::None,
            secure: SecureMode::Auto,
            ..CookieConfig::default()
        });
        assert_eq!(
            w.set("v", None, false),
            "sid=v; Path=/; Domain=example.com; Secure; HttpOnly; SameSite=None"
        );
    }
}
