//! Hop-by-hop headers and the HTTP/1.1 upgrade handshake that rides on them: the `Connection`
//! token parsing that both the removal of hop-by-hop headers and the detection of an upgrade use,
//! so that the proxy and the tunnel can never read `Connection` two different ways.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The comma-separated tokens of every `Connection` header, trimmed.
pub fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Removes the hop-by-hop headers of RFC 9110 section 7.6.1: those named in `Connection`, and
/// `Connection`, `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding` and `Upgrade`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none of them: one look at each name (standard names compare as
    // numbers) instead of a lookup per hop-by-hop header.
    if !headers.keys().any(|n| {
        n == header::CONNECTION
            || n == PROXY_CONNECTION
            || n == KEEP_ALIVE
            || n == header::TE
            || n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
    }) {
        return;
    }
    // Most requests name nothing in `Connection` (or send no such header): no allocation then.
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        &header::CONNECTION,
        &PROXY_CONNECTION,
        &KEEP_ALIVE,
        &header::TE,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        headers.remove(n);
    }
}

/// Whether a request asks to switch protocols: HTTP/1.1 with `Connection: upgrade` and an
/// `Upgrade` header. Returns the requested protocol.
pub fn requested_upgrade(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = version == Version::HTTP_11
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Puts back the two headers that carry an upgrade across this hop.
pub fn mark_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn detects_upgrade_requests() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(
            requested_upgrade(Version::HTTP_11, &h).unwrap(),
            "websocket"
        );
        assert!(requested_upgrade(Version::HTTP_10, &h).is_none());
        assert!(requested_upgrade(Version::HTTP_2, &h).is_none());
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(requested_upgrade(Version::HTTP_11, &h).is_none());
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.remove(header::UPGRADE);
        assert!(requested_upgrade(Version::HTTP_11, &h).is_none());
    }
}
