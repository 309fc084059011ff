//! The request id, `X-Request-Id`: the client's own when it sent a well-formed one (a load
//! balancer's or another proxy's, so that one id follows the request through every hop), a fresh
//! random one otherwise. It goes to the backend in place of whatever the client sent, comes back
//! on every response (stickless's own error responses included), and is logged with the request.
//!
//! Well-formed is deliberately narrow, since the id is written into log lines and handed to the
//! backend as trusted: one header, 1 to [`MAX_REQUEST_ID_LEN`] characters from
//! `A-Z a-z 0-9 - _ . : ; = / +`. That covers hex ids (nginx's `$request_id`), UUIDs, base64
//! and AWS's trace ids (`Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1`); an id with spaces,
//! quotes or control characters could forge a field of a text log line, and is replaced.

use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The header that carries the request id, both ways.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client request id kept: room for any id scheme in use (a UUID is 36 characters, an
/// AWS trace id with a parent and sampling about 90), short enough to cost nothing in a log line.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A request's id: a valid header value made only of the characters a well-formed id allows.
#[derive(Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The id the client sent in `headers` when there is exactly one and it is well-formed; a
    /// fresh one otherwise.
    pub fn from_client(headers: &HeaderMap) -> Self {
        let mut sent = headers.get_all(&X_REQUEST_ID).iter();
        match (sent.next(), sent.next()) {
            (Some(id), None) if well_formed(id.as_bytes()) => RequestId(id.clone()),
            _ => Self::generate(),
        }
    }

    /// A fresh id: 128 random bits in 32 hex digits, like nginx's `$request_id`. From the
    /// thread's CSPRNG (seeded from the OS): unpredictable, without a system call per request.
    pub fn generate() -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bits: u128 = rand::random();
        let mut text = [0u8; 32];
        for (i, digit) in text.iter_mut().enumerate() {
            *digit = HEX[((bits >> (4 * (31 - i))) & 0xf) as usize];
        }
        // Hex digits are always a valid header value.
        RequestId(HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("0")))
    }

    /// The id as a header value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever kept or made.
        self.0.to_str().unwrap_or_default()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.as_str())
    }
}

/// 1 to [`MAX_REQUEST_ID_LEN`] characters, each a letter, a digit or one of `-_.:;=/+`.
fn well_formed(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-_.:;=/+".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(X_REQUEST_ID.clone(), HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn well_formed_ids_are_kept() {
        let longest = "a".repeat(MAX_REQUEST_ID_LEN);
        for id in [
            "7f3a9c2e4b1d4e6f8a0b1c2d3e4f5a6b",
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1",
            "YWJjZGVm+/==",
            "svc.a:b_c",
            "x",
            &longest,
        ] {
            assert_eq!(RequestId::from_client(&sent(&[id.as_bytes()])).as_str(), id);
        }
    }

    #[test]
    fn anything_else_is_replaced() {
        let too_long = "a".repeat(MAX_REQUEST_ID_LEN + 1);
        for bad in [
            &b""[..],
            too_long.as_bytes(),
            b"has space",
            b"quote\"d",
            b"back\\slash",
            b"key=value, other",
            b"caf\xc3\xa9",
            b"tab\there",
            b"<script>",
        ] {
            let id = RequestId::from_client(&sent(&[bad]));
            assert_ne!(id.as_str().as_bytes(), bad);
            assert_eq!(id.as_str().len(), 32, "{:?}", String::from_utf8_lossy(bad));
        }
        // Two ids: which one to trust is anybody's guess.
        let two = RequestId::from_client(&sent(&[b"one", b"two"]));
        assert!(two.as_str() != "one" && two.as_str() != "two");
    }

    #[test]
    fn generated_ids_are_hex_and_distinct() {
        let a = RequestId::from_client(&HeaderMap::new());
        let b = RequestId::generate();
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert_eq!(id.as_str().len(), 32);
            assert!(id.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
            assert!(well_formed(id.as_str().as_bytes()));
        }
    }
}
