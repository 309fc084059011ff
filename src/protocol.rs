//! The header protocol between stickless and the backend.
//!
//! To the backend, every request carries `X-Session: active` and one `X-Session-Field-<name>`
//! header per field, or `X-Session: none`. Any header a client sent that looks like a protocol
//! header (read by [`canonical`]: any case, and any character other than a letter or digit read as
//! `-`, as CGI-style frameworks read header names) is removed first.
//!
//! From the backend, response headers `X-Session-Set-<name>`, `X-Session-Incr-<name>`,
//! `X-Session-Delete`, `X-Session-Destroy` and `X-Session-Rotate` describe changes; they are parsed
//! into [`Changes`] and removed before the response goes on.
//!
//! Values are UTF-8 and travel percent-encoded: `%`, control bytes, non-ASCII bytes and a leading
//! or trailing space are written `%XX`, so a plain ASCII value passes unchanged.

use std::collections::BTreeMap;
use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::ProtocolConfig;

/// A session's fields, by name.
pub type Fields = BTreeMap<String, String>;

/// Longest field name.
pub const MAX_NAME_LEN: usize = 64;

/// The largest magnitude a counter may reach (2^53 - 1, the range every JSON parser keeps exact).
pub const MAX_COUNTER: i64 = (1 << 53) - 1;

/// Reads a name the way CGI-style frameworks read header names: ASCII letters lower-cased, and
/// every character other than a letter or a digit read as `-` (`X_Session.Field-user` and
/// `x-session-field-user` are one name to a backend that sees `HTTP_X_SESSION_FIELD_USER`). The one
/// rule for header names and for field names in every operation.
pub fn canonical(name: &str) -> std::borrow::Cow<'_, str> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if plain {
        return name.into();
    }
    name.chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            'a'..='z' | '0'..='9' => c,
            _ => '-',
        })
        .collect::<String>()
        .into()
}

/// Whether `name` is a valid field name: 1 to 64 of `a-z 0-9 -`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Parses a stored counter the way Redis' `HINCRBY` does (no sign `+`, no leading zeros), limited
/// to [`MAX_COUNTER`]. `None` when the value is not such an integer.
pub fn parse_counter(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let canonical = s == "0"
        || (!digits.is_empty()
            && digits.len() <= 16
            && !digits.starts_with('0')
            && digits.bytes().all(|b| b.is_ascii_digit()));
    if !canonical {
        return None;
    }
    let n: i64 = s.parse().ok()?;
    (n.abs() <= MAX_COUNTER).then_some(n)
}

/// Why a backend response broke the protocol. The text never includes a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A field name outside `a-z 0-9 -` or longer than 64.
    #[error("invalid field name in `{header}` (use 1 to 64 of a-z 0-9 -)")]
    InvalidName {
        /// The header that carried it.
        header: String,
    },
    /// A value that is not valid percent-encoded UTF-8.
    #[error("value of `{header}` is not percent-encoded UTF-8: {reason}")]
    BadValue {
        /// The header.
        header: String,
        /// What was wrong.
        reason: DecodeError,
    },
    /// A value longer than the limit.
    #[error("value of `{header}` is {len} bytes, more than the limit of {max}")]
    ValueTooLong {
        /// The header.
        header: String,
        /// Its decoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An increment that is not an integer within range.
    #[error("`{header}` is not an integer between -{MAX_COUNTER} and {MAX_COUNTER}")]
    BadIncrement {
        /// The header.
        header: String,
    },
    /// `Destroy` or `Rotate` with something other than `true` or `false`.
    #[error("`{header}` must be `true` or `false`")]
    BadFlag {
        /// The header.
        header: String,
    },
    /// The same field set or incremented twice.
    #[error("field `{name}` is changed by more than one Set or Incr header")]
    Duplicate {
        /// The field.
        name: String,
    },
    /// More Set and Incr headers than a session may hold fields.
    #[error("{count} fields set or incremented, more than the limit of {max}")]
    TooManyFields {
        /// How many.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More fields named in Delete headers than a session may hold.
    #[error("{count} fields deleted, more than a session may hold ({max})")]
    TooManyDeletes {
        /// How many.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A header with the prefix that is not an operation.
    #[error("unknown session header `{header}`")]
    Unknown {
        /// The header.
        header: String,
    },
}

/// Why a percent-encoded value could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// `%` not followed by two hex digits.
    #[error("`%` at byte {0} is not followed by two hex digits")]
    BadEscape(usize),
    /// The decoded bytes are not UTF-8.
    #[error("the decoded bytes are not UTF-8")]
    NotUtf8,
    /// A raw byte that must have been escaped.
    #[error("byte {0} must be percent-encoded")]
    Unescaped(usize),
}

fn must_escape(b: u8, first: bool, last: bool) -> bool {
    !(0x20..0x7f).contains(&b) || b == b'%' || (b == b' ' && (first || last))
}

/// Encodes a value for a header: `%`, control bytes, non-ASCII bytes and leading or trailing
/// spaces become `%XX`; everything else passes unchanged.
///
/// ```
/// use stickless::protocol::{decode_value, encode_value};
/// assert_eq!(encode_value("alice"), "alice");
/// assert_eq!(encode_value("Zoë 100%"), "Zo%C3%AB 100%25");
/// assert_eq!(decode_value(b"Zo%C3%AB 100%25").unwrap(), "Zoë 100%");
/// ```
pub fn encode_value(value: &str) -> HeaderValue {
    let bytes = value.as_bytes();
    let n = bytes.len();
    let needs = bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| must_escape(b, i == 0, i + 1 == n));
    if !needs {
        return HeaderValue::from_str(value).expect("visible ASCII and inner spaces are valid");
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(n + 16);
    for (i, &b) in bytes.iter().enumerate() {
        if must_escape(b, i == 0, i + 1 == n) {
            out.extend_from_slice(&[b'%', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
        } else {
            out.push(b);
        }
    }
    HeaderValue::from_bytes(&out).expect("only visible ASCII and inner spaces remain")
}

/// Decodes a header value written by [`encode_value`] (or by a backend following the protocol).
///
/// # Errors
/// [`DecodeError`] for a malformed escape, a raw byte that must have been escaped, or bytes that
/// are not UTF-8.
pub fn decode_value(raw: &[u8]) -> Result<String, DecodeError> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                raw.get(i + 1).copied().and_then(hex),
                raw.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(DecodeError::BadEscape(i));
            };
            out.push(h << 4 | l);
            i += 3;
        } else if b < 0x20 && b != b'\t' || b >= 0x7f {
            return Err(DecodeError::Unescaped(i));
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| DecodeError::NotUtf8)
}

/// The changes one backend response asks for. Applied in this order: Destroy, Rotate, Delete, Set,
/// Incr. Set and Incr create a session when there is none (or after Destroy).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Delete the current session and clear its cookie.
    pub destroy: bool,
    /// Move the session to a new id.
    pub rotate: bool,
    /// Fields to remove.
    pub delete: Vec<String>,
    /// Fields to set, with their decoded values.
    pub set: Vec<(String, String)>,
    /// Fields to increment, with the amount.
    pub incr: Vec<(String, i64)>,
}

impl fmt::Debug for Changes {
    // Values stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Changes")
            .field("destroy", &self.destroy)
            .field("rotate", &self.rotate)
            .field("delete", &self.delete)
            .field("set", &self.set.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field(
                "incr",
                &self.incr.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Changes {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        !self.destroy
            && !self.rotate
            && self.delete.is_empty()
            && self.set.is_empty()
            && self.incr.is_empty()
    }

    /// Whether the changes write fields, and so create a session when there is none.
    pub fn writes_fields(&self) -> bool {
        !self.set.is_empty() || !self.incr.is_empty()
    }

    /// The same changes without Destroy and Rotate: what is applied to the session that remains.
    pub fn field_changes(&self) -> Changes {
        Changes {
            destroy: false,
            rotate: false,
            ..self.clone()
        }
    }
}

/// Why applying changes to a session's fields was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The session would hold too many fields.
    #[error("the session would hold {count} fields, more than the limit of {max}")]
    TooManyFields {
        /// Resulting count.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The session would be too large.
    #[error("the session would be {size} bytes, more than the limit of {max}")]
    TooLarge {
        /// Resulting size (names and values).
        size: usize,
        /// The limit.
        max: usize,
    },
    /// An increment of a field that does not hold an integer counter, or that would leave range.
    #[error("field `{name}` does not hold an integer that can be incremented by that amount")]
    NotACounter {
        /// The field.
        name: String,
    },
}

/// Applies field changes to a copy of `fields`, checking the limits: the one definition of what a
/// change does, which the memory store runs and the Redis store's script mirrors.
///
/// # Errors
/// [`Rejection`] when a limit would be broken or an increment is impossible; then nothing changes.
pub fn apply_to_fields(
    fields: &Fields,
    changes: &Changes,
    limits: &ProtocolConfig,
) -> Result<Fields, Rejection> {
    let mut out = fields.clone();
    for name in &changes.delete {
        out.remove(name);
    }
    for (name, value) in &changes.set {
        out.insert(name.clone(), value.clone());
    }
    for (name, by) in &changes.incr {
        let current = match out.get(name) {
            None => 0,
            Some(v) => {
                parse_counter(v).ok_or_else(|| Rejection::NotACounter { name: name.clone() })?
            }
        };
        let next = current + by;
        if next.abs() > MAX_COUNTER {
            return Err(Rejection::NotACounter { name: name.clone() });
        }
        out.insert(name.clone(), next.to_string());
    }
    check_limits(&out, limits)?;
    Ok(out)
}

/// Checks a session's fields against the count and size limits.
///
/// # Errors
/// [`Rejection::TooManyFields`] or [`Rejection::TooLarge`].
pub fn check_limits(fields: &Fields, limits: &ProtocolConfig) -> Result<(), Rejection> {
    if fields.len() > limits.max_fields {
        return Err(Rejection::TooManyFields {
            count: fields.len(),
            max: limits.max_fields,
        });
    }
    let size: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > limits.max_session_bytes {
        return Err(Rejection::TooLarge {
            size,
            max: limits.max_session_bytes,
        });
    }
    Ok(())
}

/// The protocol's header names for one prefix, built once at start-up.
#[derive(Debug, Clone)]
pub struct Protocol {
    config: ProtocolConfig,
    /// `x-session`: the status header.
    status: HeaderName,
    /// `x-session-field-`
    field_prefix: String,
    set_prefix: String,
    incr_prefix: String,
    delete: String,
    destroy: String,
    rotate: String,
}

const ACTIVE: HeaderValue = HeaderValue::from_static("active");
const NONE: HeaderValue = HeaderValue::from_static("none");
const UNAVAILABLE: HeaderValue = HeaderValue::from_static("unavailable");

impl Protocol {
    /// Header names for `config.header_prefix` (lower case, ending in `-`).
    pub fn new(config: ProtocolConfig) -> Self {
        let p = config.header_prefix.as_str().to_owned();
        // A `HeaderPrefix` is letters, digits and `-`, starting with a letter: a header name.
        let status = HeaderName::from_bytes(p.trim_end_matches('-').as_bytes())
            .expect("a HeaderPrefix is a header name");
        Protocol {
            status,
            field_prefix: format!("{p}field-"),
            set_prefix: format!("{p}set-"),
            incr_prefix: format!("{p}incr-"),
            delete: format!("{p}delete"),
            destroy: format!("{p}destroy"),
            rotate: format!("{p}rotate"),
            config,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &ProtocolConfig {
        &self.config
    }

    /// Whether a header name belongs to the protocol (the status header or any name with the prefix).
    pub fn is_protocol_header(&self, name: &HeaderName) -> bool {
        let n = canonical(name.as_str());
        n.starts_with(self.config.header_prefix.as_str()) || n == self.status.as_str()
    }

    /// [`Protocol::is_protocol_header`] for a name as it came on the wire (any case), without
    /// building the name or its canonical form.
    pub fn is_protocol_name(&self, name: &[u8]) -> bool {
        let same = |name: &[u8], canonical: &[u8]| {
            name.iter().zip(canonical).all(|(&b, &c)| {
                let b = match b {
                    b'A'..=b'Z' => b.to_ascii_lowercase(),
                    b'a'..=b'z' | b'0'..=b'9' => b,
                    _ => b'-',
                };
                b == c
            })
        };
        let prefix = self.config.header_prefix.as_str().as_bytes();
        let status = self.status.as_str().as_bytes();
        (name.len() >= prefix.len() && same(&name[..prefix.len()], prefix))
            || (name.len() == status.len() && same(name, status))
    }

    /// Removes every protocol header a client sent; returns how many there were.
    pub fn strip(&self, headers: &mut HeaderMap) -> usize {
        let names: Vec<HeaderName> = headers
            .keys()
            .filter(|n| self.is_protocol_header(n))
            .cloned()
            .collect();
        let mut count = 0;
        for n in names {
            if let http::header::Entry::Occupied(e) = headers.entry(n) {
                count += e.remove_entry_mult().1.count();
            }
        }
        count
    }

    /// Adds the session headers for the backend: the status and `fields`, the headers made by
    /// [`Protocol::field_headers`].
    pub fn inject(&self, headers: &mut HeaderMap, fields: Option<&[(HeaderName, HeaderValue)]>) {
        match fields {
            None => {
                headers.insert(self.status.clone(), NONE);
            }
            Some(fields) => {
                headers.insert(self.status.clone(), ACTIVE);
                for (name, value) in fields {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
    }

    /// The request headers of a session's fields, one per field. Fields whose names are not
    /// valid protocol names (which only a direct write to the store can make) are skipped.
    pub fn field_headers(&self, fields: &Fields) -> Vec<(HeaderName, HeaderValue)> {
        let mut name = String::with_capacity(self.field_prefix.len() + 16);
        let mut made = Vec::with_capacity(fields.len());
        for (k, v) in fields {
            if !is_valid_name(k) {
                continue;
            }
            name.clear();
            name.push_str(&self.field_prefix);
            name.push_str(k);
            if let Ok(h) = HeaderName::from_bytes(name.as_bytes()) {
                made.push((h, encode_value(v)));
            }
        }
        made
    }

    /// The status header of a live session whose field headers are written to the request head
    /// directly (see [`crate::store::FieldHeaders::wire`]), as a line of that head.
    pub fn write_active(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.status.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(ACTIVE.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// Marks the request as sent while the session could not be loaded (`X-Session: unavailable`,
    /// no fields): the store is down and stickless fails open.
    pub fn inject_unavailable(&self, headers: &mut HeaderMap) {
        headers.insert(self.status.clone(), UNAVAILABLE);
    }

    /// Takes the protocol headers out of a backend response and parses them.
    /// All of them are removed, whether or not they parse.
    ///
    /// # Errors
    /// [`ProtocolError`] for the first header that breaks the protocol or a limit.
    pub fn take_changes(&self, headers: &mut HeaderMap) -> Result<Changes, ProtocolError> {
        let names: Vec<HeaderName> = headers
            .keys()
            .filter(|n| self.is_protocol_header(n))
            .cloned()
            .collect();
        let mut result = Ok(Changes::default());
        for name in names {
            let http::header::Entry::Occupied(e) = headers.entry(name) else {
                continue;
            };
            let (name, values) = e.remove_entry_mult();
            if let Ok(changes) = &mut result {
                for value in values {
                    if let Err(e) = self.parse_one(changes, &name, &value) {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        let changes = result?;
        let writes = changes.set.len() + changes.incr.len();
        if writes > self.config.max_fields {
            return Err(ProtocolError::TooManyFields {
                count: writes,
                max: self.config.max_fields,
            });
        }
        Ok(changes)
    }

    fn parse_one(
        &self,
        changes: &mut Changes,
        name: &HeaderName,
        value: &HeaderValue,
    ) -> Result<(), ProtocolError> {
        let n = canonical(name.as_str());
        let header = || name.as_str().to_owned();
        // `n` is already canonical, and so is every name taken from it; a Delete list's names go
        // through the same rule.
        let field = |rest: &str| -> Result<String, ProtocolError> {
            let rest = canonical(rest);
            if is_valid_name(&rest) {
                Ok(rest.into_owned())
            } else {
                Err(ProtocolError::InvalidName { header: header() })
            }
        };
        let duplicate = |c: &Changes, f: &str| {
            c.set.iter().any(|(k, _)| k == f) || c.incr.iter().any(|(k, _)| k == f)
        };
        if let Some(rest) = n.strip_prefix(&self.set_prefix) {
            let f = field(rest)?;
            let v = decode_value(value.as_bytes()).map_err(|reason| ProtocolError::BadValue {
                header: header(),
                reason,
            })?;
            if v.len() > self.config.max_value_bytes {
                return Err(ProtocolError::ValueTooLong {
                    header: header(),
                    len: v.len(),
                    max: self.config.max_value_bytes,
                });
            }
            if duplicate(changes, &f) {
                return Err(ProtocolError::Duplicate { name: f });
            }
            changes.set.push((f, v));
        } else if let Some(rest) = n.strip_prefix(&self.incr_prefix) {
            let f = field(rest)?;
            let by = value
                .to_str()
                .ok()
                .map(str::trim)
                .and_then(|s| s.strip_prefix('+').unwrap_or(s).parse::<i64>().ok())
                .filter(|n| n.abs() <= MAX_COUNTER)
                .ok_or_else(|| ProtocolError::BadIncrement { header: header() })?;
            if duplicate(changes, &f) {
                return Err(ProtocolError::Duplicate { name: f });
            }
            changes.incr.push((f, by));
        } else if n == self.delete {
            let list = value
                .to_str()
                .map_err(|_| ProtocolError::InvalidName { header: header() })?;
            for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let f = field(item)?;
                if !changes.delete.contains(&f) {
                    changes.delete.push(f);
                }
                if changes.delete.len() > self.config.max_fields {
                    return Err(ProtocolError::TooManyDeletes {
                        count: changes.delete.len(),
                        max: self.config.max_fields,
                    });
                }
            }
        } else if n == self.destroy || n == self.rotate {
            let on = match value.to_str().map(|s| s.trim().to_ascii_lowercase()) {
                Ok(s) if s == "true" => true,
                Ok(s) if s == "false" => false,
                _ => return Err(ProtocolError::BadFlag { header: header() }),
            };
            if n == self.destroy {
                changes.destroy |= on;
            } else {
                changes.rotate |= on;
            }
        } else if n == self.status.as_str() || n.starts_with(&self.field_prefix) {
            // A backend that echoes the request's session headers changes nothing; they are dropped.
        } else {
            return Err(ProtocolError::Unknown { header: header() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn protocol() -> Protocol {
        Protocol::new(ProtocolConfig::default())
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    proptest! {
        /// A name as it came on the wire is the protocol's exactly when its header name is.
        #[test]
        fn wire_names_are_judged_as_header_names(name in prop_oneof![
            "[A-Za-z0-9_.!#$%&'*+^`|~-]{1,24}",
            "[xX][-_.][sS][eE][sS][sS][iI][oO][nN][-_.A-Za-z0-9]{0,12}",
        ]) {
            let p = protocol();
            let header = HeaderName::from_bytes(name.as_bytes()).unwrap();
            prop_assert_eq!(p.is_protocol_name(name.as_bytes()), p.is_protocol_header(&header));
        }
    }

    #[test]
    fn wire_names_of_the_protocol() {
        let p = protocol();
        for name in [
            "X-Session-Set-user",
            "x_session_incr_n",
            "X-SESSION",
            "x.session",
        ] {
            assert!(p.is_protocol_name(name.as_bytes()), "{name}");
        }
        for name in ["X-Sessions", "x-sessio", "content-length", "x-request-id"] {
            assert!(!p.is_protocol_name(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn plain_ascii_passes_unchanged() {
        for v in [
            "alice",
            "a b c",
            "{\"json\":[1,2]}",
            "x=1&y=2",
            "~!@#$^&*()",
        ] {
            assert_eq!(encode_value(v), v);
        }
    }

    #[test]
    fn escapes() {
        assert_eq!(encode_value("50%"), "50%25");
        assert_eq!(encode_value("é"), "%C3%A9");
        assert_eq!(encode_value("a\r\nb"), "a%0D%0Ab");
        assert_eq!(encode_value(" x "), "%20x%20");
        assert_eq!(encode_value("\u{7f}"), "%7F");
        assert_eq!(decode_value(b"%c3%a9").unwrap(), "é");
        assert_eq!(decode_value(b"%2"), Err(DecodeError::BadEscape(0)));
        assert_eq!(decode_value(b"a%zz"), Err(DecodeError::BadEscape(1)));
        assert_eq!(decode_value(b"%FF"), Err(DecodeError::NotUtf8));
        assert_eq!(decode_value(b"\x01"), Err(DecodeError::Unescaped(0)));
        assert_eq!(decode_value(b"a\tb").unwrap(), "a\tb");
    }

    proptest! {
        #[test]
        fn codec_round_trips(s in any::<String>()) {
            let h = encode_value(&s);
            prop_assert_eq!(decode_value(h.as_bytes()).unwrap(), s);
        }

        #[test]
        fn encoded_values_are_plain_ascii(s in any::<String>()) {
            let h = encode_value(&s);
            let b = h.as_bytes();
            prop_assert!(b.iter().all(|&c| (0x20..0x7f).contains(&c)));
            prop_assert!(b.first() != Some(&b' ') && b.last() != Some(&b' '));
        }

        #[test]
        fn ascii_without_percent_is_unchanged(s in "[ -$&-~]*") {
            let trimmed = s.trim_matches(' ');
            let encoded = encode_value(trimmed);
            prop_assert_eq!(encoded.as_bytes(), trimmed.as_bytes());
        }

        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_value(&b);
        }
    }

    #[test]
    fn names() {
        assert!(is_valid_name("user"));
        assert!(is_valid_name("cart-2"));
        assert!(is_valid_name(&"a".repeat(64)));
        assert!(!is_valid_name(&"a".repeat(65)));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("User"));
        assert!(!is_valid_name("a_b"));
        assert!(!is_valid_name("_created"));
    }

    #[test]
    fn one_rule_for_names_in_every_operation() {
        assert_eq!(canonical("user"), "user");
        assert_eq!(canonical("My_Field.2"), "my-field-2");
        let p = protocol();
        let mut h = map(&[
            ("x-session-set-my_field", "1"),
            ("x-session-incr-other.count", "1"),
            ("x-session-delete", "My_Field, stale.flag"),
        ]);
        let c = p.take_changes(&mut h).unwrap();
        assert_eq!(c.set, vec![("my-field".to_owned(), "1".to_owned())]);
        assert_eq!(c.incr, vec![("other-count".to_owned(), 1)]);
        assert_eq!(c.delete, vec!["my-field", "stale-flag"]);
    }

    #[test]
    fn counters_parse_like_redis() {
        assert_eq!(parse_counter("0"), Some(0));
        assert_eq!(parse_counter("-12"), Some(-12));
        assert_eq!(parse_counter("9007199254740991"), Some(MAX_COUNTER));
        for bad in [
            "",
            "-",
            "-0",
            "007",
            "+1",
            "1.0",
            " 1",
            "x",
            "9007199254740992",
            "99999999999999999999",
        ] {
            assert_eq!(parse_counter(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn strips_spoofed_headers_in_any_spelling() {
        let p = protocol();
        let mut h = map(&[
            ("x-session", "active"),
            ("x-session-field-user", "admin"),
            ("X_Session_Field_user", "admin"),
            ("X.Session.Field.user", "admin"),
            ("x-session.set~role", "admin"),
            ("x-session-set-role", "admin"),
            ("x_session", "active"),
            ("x-sessionfoo", "kept"),
            ("accept", "*/*"),
        ]);
        assert_eq!(p.strip(&mut h), 7);
        assert_eq!(h.len(), 2);
        assert!(h.contains_key("x-sessionfoo"));
    }

    #[test]
    fn injects_fields() {
        let p = protocol();
        let mut h = HeaderMap::new();
        p.inject(&mut h, None);
        assert_eq!(h["x-session"], "none");
        let mut f = Fields::new();
        f.insert("user".into(), "zoë".into());
        f.insert("_created".into(), "1".into());
        let mut h = HeaderMap::new();
        p.inject(&mut h, Some(&p.field_headers(&f)));
        assert_eq!(h["x-session"], "active");
        assert_eq!(h["x-session-field-user"], "zo%C3%AB");
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn parses_every_operation_and_removes_the_headers() {
        let p = protocol();
        let mut h = map(&[
            ("x-session-set-user", "alice"),
            ("x-session-set-note", "50%25"),
            ("x-session-incr-visits", "1"),
            ("x-session-incr-score", "-5"),
            ("x-session-delete", "cart, flash"),
            ("x-session-delete", "Tmp"),
            ("x-session-rotate", "true"),
            ("x-session-destroy", "False"),
            ("x-session-field-user", "echoed"),
            ("set-cookie", "theirs=1"),
        ]);
        let mut c = p.take_changes(&mut h).unwrap();
        c.set.sort();
        c.incr.sort();
        assert_eq!(h.len(), 1, "only the backend's own Set-Cookie is left");
        assert!(c.rotate && !c.destroy);
        assert_eq!(c.delete, vec!["cart", "flash", "tmp"]);
        assert_eq!(
            c.set,
            vec![
                ("note".into(), "50%".into()),
                ("user".into(), "alice".into())
            ]
        );
        assert_eq!(c.incr, vec![("score".into(), -5), ("visits".into(), 1)]);
        assert!(c.writes_fields());
        assert!(!format!("{c:?}").contains("alice"));
    }

    #[test]
    fn protocol_errors() {
        let p = protocol();
        let cases: &[(&str, &str)] = &[
            ("x-session-set-", "v"),
            (
                "x-session-set-a_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "v",
            ),
            ("x-session-set-user", "%zz"),
            ("x-session-incr-n", "one"),
            ("x-session-incr-n", "9007199254740992"),
            ("x-session-destroy", "yes"),
            ("x-session-rotate", ""),
            (
                "x-session-delete",
                "a, bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
            ),
            ("x-session-frobnicate", "1"),
        ];
        for (k, v) in cases {
            let mut h = map(&[(k, v), ("x-session-set-ok", "1")]);
            assert!(p.take_changes(&mut h).is_err(), "{k}: {v}");
            assert!(h.is_empty(), "headers removed even on error");
        }
        let many: Vec<String> = (0..65).map(|i| format!("f{i}")).collect();
        let mut h = map(&[("x-session-delete", &many.join(", "))]);
        assert!(matches!(
            p.take_changes(&mut h),
            Err(ProtocolError::TooManyDeletes { count: 65, .. })
        ));
        let mut h = map(&[("x-session-set-a", "1"), ("x-session-incr-a", "1")]);
        assert_eq!(
            p.take_changes(&mut h),
            Err(ProtocolError::Duplicate { name: "a".into() })
        );
        let long = "x".repeat(4097);
        let mut h = map(&[("x-session-set-a", &long)]);
        assert!(matches!(
            p.take_changes(&mut h),
            Err(ProtocolError::ValueTooLong { len: 4097, .. })
        ));
        let mut h = HeaderMap::new();
        for i in 0..65 {
            h.insert(
                HeaderName::from_bytes(format!("x-session-set-f{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        assert!(matches!(
            p.take_changes(&mut h),
            Err(ProtocolError::TooManyFields { count: 65, .. })
        ));
    }

    #[test]
    fn field_changes_and_limits() {
        let limits = ProtocolConfig {
            max_fields: 3,
            max_session_bytes: 20,
            ..ProtocolConfig::default()
        };
        let mut f = Fields::new();
        f.insert("a".into(), "1".into());
        f.insert("b".into(), "x".into());
        let c = Changes {
            delete: vec!["b".into()],
            set: vec![("b".into(), "y".into())],
            incr: vec![("a".into(), 41)],
            ..Changes::default()
        };
        let out = apply_to_fields(&f, &c, &limits).unwrap();
        assert_eq!(out["a"], "42");
        assert_eq!(out["b"], "y");
        let c = Changes {
            incr: vec![("b".into(), 1)],
            ..Changes::default()
        };
        assert!(matches!(
            apply_to_fields(&f, &c, &limits),
            Err(Rejection::NotACounter { .. })
        ));
        let c = Changes {
            set: vec![("c".into(), "1".into()), ("d".into(), "1".into())],
            ..Changes::default()
        };
        assert!(matches!(
            apply_to_fields(&f, &c, &limits),
            Err(Rejection::TooManyFields { count: 4, max: 3 })
        ));
        let c = Changes {
            set: vec![("c".into(), "x".repeat(20))],
            ..Changes::default()
        };
        assert!(matches!(
            apply_to_fields(&f, &c, &limits),
            Err(Rejection::TooLarge { .. })
        ));
        let mut big = Fields::new();
        big.insert("n".into(), MAX_COUNTER.to_string());
        let c = Changes {
            incr: vec![("n".into(), 1)],
            ..Changes::default()
        };
        assert!(apply_to_fields(&big, &c, &limits).is_err());
    }
}
