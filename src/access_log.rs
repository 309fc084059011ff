//! The access log: one line per proxied request, under the tracing target
//! [`TARGET`] (`stickless::access`), written when the response's body is done with (sent to its
//! end, failed, or abandoned by the client), so that its duration is the whole exchange.
//!
//! A line holds the peer, the method, the path without its query (which may carry tokens) and cut
//! to [`MAX_LOGGED_PATH`] with anything but visible ASCII escaped, the HTTP version, the status, the times (to the response head, to the
//! end of the body, and the backend's to its response head), the body bytes sent, how the body
//! ended, what happened to the session ([`SessionState`]) and the request id. Never a cookie, a
//! session id, a field name or value, or a header value other than the request id.
//!
//! The line is made by [`AccessRecord`]'s `Drop`: a record travels with the request and then with
//! the response's body ([`Logged`]), so every request gets exactly one line, whichever way it ends,
//! including a client that goes away before the answer (logged with status 499, as nginx does).

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Buf;
use http::{Method, Request, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::request_id::RequestId;

/// The tracing target of access lines: filter them with `RUST_LOG` (`stickless::access=off`).
pub const TARGET: &str = "stickless::access";

/// Longest path logged, in bytes; a longer one is cut and ends with `...`.
pub const MAX_LOGGED_PATH: usize = 256;

/// Status logged for a request whose client went away before the response head was ready.
const CLIENT_CLOSED: u16 = 499;

/// What happened to the request's session, as the access line's `session` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// No session cookie.
    None,
    /// A session cookie that failed verification (forged, or signed by a key no longer
    /// configured): treated as no session.
    Invalid,
    /// A genuine cookie whose session does not exist (expired, or destroyed).
    Unknown,
    /// The cookie of a session rotated away moments ago (within `--rotation-grace`).
    Stale,
    /// The session could not be loaded or its changes not stored: the store failed.
    Unavailable,
    /// A live session, unchanged or with its fields changed.
    Active,
    /// A new session was started (and its cookie set).
    Created,
    /// The session moved to a new id (and cookie).
    Rotated,
    /// The session was destroyed (and its cookie cleared).
    Destroyed,
}

impl SessionState {
    /// The name logged.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::None => "none",
            SessionState::Invalid => "invalid",
            SessionState::Unknown => "unknown",
            SessionState::Stale => "stale",
            SessionState::Unavailable => "unavailable",
            SessionState::Active => "active",
            SessionState::Created => "created",
            SessionState::Rotated => "rotated",
            SessionState::Destroyed => "destroyed",
        }
    }
}

/// How the response's body ended, as the access line's `outcome` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The client went away before the response head was ready.
    Cancelled,
    /// The response head is ready; its body is not done yet.
    Responding,
    /// The body was sent to its end.
    Complete,
    /// The body failed on the way (the backend cut it off, or went silent too long).
    Failed,
    /// The body was dropped before its end: the client went away.
    Aborted,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Cancelled => "cancelled",
            // Never logged: a record is only dropped once it has left this state.
            Outcome::Responding => "responding",
            Outcome::Complete => "complete",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
        }
    }
}

/// One request's access line in the making; written when dropped.
pub struct AccessRecord {
    started: Instant,
    peer: SocketAddr,
    method: Method,
    /// The request's target (sharing its buffer): the path is made loggable only when a line is
    /// written.
    uri: Uri,
    version: Version,
    request_id: RequestId,
    /// The session's state so far.
    pub session: SessionState,
    /// The backend's time to its response head, once the request was forwarded.
    pub backend: Option<Duration>,
    status: Option<(StatusCode, Duration)>,
    bytes: u64,
    outcome: Outcome,
}

impl AccessRecord {
    /// Starts the record of `req` from `peer`, identified by `request_id`.
    pub fn new<B>(req: &Request<B>, peer: SocketAddr, request_id: RequestId) -> Self {
        Self::started_at(req, peer, request_id, Instant::now())
    }

    /// [`AccessRecord::new`] of a request that started at `started`.
    pub fn started_at<B>(
        req: &Request<B>,
        peer: SocketAddr,
        request_id: RequestId,
        started: Instant,
    ) -> Self {
        AccessRecord {
            started,
            peer,
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            request_id,
            session: SessionState::None,
            backend: None,
            status: None,
            bytes: 0,
            outcome: Outcome::Cancelled,
        }
    }

    /// Records that the body was sent to its end, `bytes` of it.
    pub fn complete(&mut self, bytes: u64) {
        self.bytes = bytes;
        self.outcome = Outcome::Complete;
    }

    /// Records that the body failed on the way (the backend's fault) after `bytes`.
    pub fn failed(&mut self, bytes: u64) {
        self.bytes = bytes;
        self.outcome = Outcome::Failed;
    }

    /// Records that the client went away (or stopped reading) after `bytes` of the body.
    pub fn aborted(&mut self, bytes: u64) {
        self.bytes = bytes;
        self.outcome = Outcome::Aborted;
    }

    /// Records that the response head is ready with `status`.
    pub fn responded(&mut self, status: StatusCode) {
        self.responded_after(status, self.started.elapsed());
    }

    /// Records that the response head was ready with `status`, `elapsed` after the start.
    pub fn responded_after(&mut self, status: StatusCode, elapsed: Duration) {
        self.status = Some((status, elapsed));
        self.outcome = Outcome::Responding;
    }
}

impl std::fmt::Debug for AccessRecord {
    /// What the line would say of the request: never its query.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessRecord")
            .field("peer", &self.peer)
            .field("method", &self.method)
            .field("path", &loggable_path(self.uri.path()))
            .field("request_id", &self.request_id)
            .field("session", &self.session)
            .field("status", &self.status)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        if self.outcome == Outcome::Responding {
            self.outcome = Outcome::Aborted;
        }
        let (status, head) = match self.status {
            Some((status, head)) => (status.as_u16(), Some(millis(head))),
            None => (CLIENT_CLOSED, None),
        };
        tracing::info!(
            target: TARGET,
            peer = %self.peer,
            method = %self.method,
            path = %loggable_path(self.uri.path()),
            version = ?self.version,
            status,
            head_ms = head,
            duration_ms = millis(self.started.elapsed()),
            backend_ms = self.backend.map(millis),
            bytes = self.bytes,
            outcome = %self.outcome.as_str(),
            session = %self.session.as_str(),
            request_id = %self.request_id,
            "request"
        );
    }
}

/// Milliseconds to the microsecond.
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

/// The path as one plain token: every byte outside visible ASCII (spaces, control bytes, UTF-8,
/// which a log viewer may show as a line break or a blank) and `"` written as `%XX`, so that a
/// request cannot fake a field or a line of the text log; cut to [`MAX_LOGGED_PATH`] bytes
/// (never inside an escape) and marked when cut.
fn loggable_path(path: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(path.len().min(MAX_LOGGED_PATH + 3));
    for &b in path.as_bytes() {
        let escaped = !(0x21..0x7f).contains(&b) || b == b'"';
        let width = if escaped { 3 } else { 1 };
        if out.len() + width > MAX_LOGGED_PATH {
            out.push_str("...");
            break;
        }
        if escaped {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        } else {
            out.push(b as char);
        }
    }
    out
}

pin_project! {
    /// A response body that carries its request's [`AccessRecord`]: counts the bytes sent and
    /// notes how the body ended, and the line is written when the body is dropped.
    pub struct Logged<B> {
        #[pin]
        inner: B,
        record: AccessRecord,
    }
}

impl<B: Body> Logged<B> {
    /// Wraps `inner`, the body of the response `record` describes.
    pub fn new(inner: B, mut record: AccessRecord) -> Self {
        // A body with nothing to send, or that must not be sent (a HEAD's, a 204's, a 304's),
        // is dropped by hyper without a poll.
        let bodiless = record.method == Method::HEAD
            || matches!(
                record.status,
                Some((StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED, _))
            );
        if bodiless || inner.is_end_stream() {
            record.outcome = Outcome::Complete;
        }
        Logged { inner, record }
    }
}

impl<B: Body> Body for Logged<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.record.bytes += data.remaining() as u64;
                }
                // hyper stops at a body that says it has ended, without polling it once more.
                if this.inner.is_end_stream() {
                    this.record.outcome = Outcome::Complete;
                }
            }
            Poll::Ready(Some(Err(_))) => this.record.outcome = Outcome::Failed,
            Poll::Ready(None) => this.record.outcome = Outcome::Complete,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_are_cut_whole() {
        assert_eq!(loggable_path("/a/b"), "/a/b");
        let exact = "/".repeat(MAX_LOGGED_PATH);
        assert_eq!(loggable_path(&exact), exact);
        let long = format!("/{}", "x".repeat(2 * MAX_LOGGED_PATH));
        let cut = loggable_path(&long);
        assert_eq!(cut.len(), MAX_LOGGED_PATH + 3);
        assert!(cut.ends_with("..."));
        // An escape straddling the bound is left out whole.
        let straddling = format!("{}é", "x".repeat(MAX_LOGGED_PATH - 4));
        assert_eq!(
            loggable_path(&straddling),
            format!("{}%C3...", "x".repeat(MAX_LOGGED_PATH - 4))
        );
    }

    #[test]
    fn paths_cannot_fake_fields_or_lines() {
        assert_eq!(
            loggable_path("/x\u{2028}status=200"),
            "/x%E2%80%A8status=200"
        );
        assert_eq!(
            loggable_path("/x\u{a0}session=none \"a\""),
            "/x%C2%A0session=none%20%22a%22"
        );
        assert_eq!(loggable_path("/a\r\nb\x7f"), "/a%0D%0Ab%7F");
        assert_eq!(loggable_path("/cart?"), "/cart?");
        assert_eq!(loggable_path("/caf%C3%A9"), "/caf%C3%A9");
    }

    #[test]
    fn durations_in_milliseconds() {
        assert_eq!(millis(Duration::from_micros(1_234)), 1.234);
        assert_eq!(millis(Duration::from_secs(2)), 2000.0);
    }
}
