//! The direct path: plain HTTP/1.1 keep-alive requests without a body (nearly every request a
//! session proxy sees) served without hyper, the head parsed in place ([`crate::h1`]), its
//! headers rewritten by the same steps as every request ([`Proxy::open`],
//! [`Proxy::backend_headers`], [`Proxy::settle`], [`Proxy::set_cookies`]) and written to a backend
//! connection that the client connection holds while it is busy.
//!
//! hyper's server and client cost several microseconds of CPU per request (its dispatchers, the
//! pooled client's connection task and the channels between them, a body polled frame by frame
//! through its wrappers), more than stickless's own work on a request and more than nginx spends
//! on a whole one. Here a request costs one read of its head, one write to the backend, one read
//! of the answer and one write to the client.
//!
//! Anything the direct path does not serve goes to hyper from the same bytes: a request with a
//! body, HTTP/1.0, an upgrade, `Expect`, a malformed or oversized head. The connection then
//! stays with hyper until it has been idle for a second, as before.
//!
//! The bounds are the same as hyper's path: the request head by `--header-read-timeout`, the
//! backend's answer by `--upstream-timeout` (and its connect by at most 5 s of it), each read of
//! the backend's body by `--upstream-timeout`, the backend's head by the size a session's changes
//! need; plus each write to the client by `--keep-alive-timeout`, so that a client that stops
//! reading cannot hold a connection for ever.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tracing::Instrument;

use super::{check_host, error_headers, PeerIp, Proxy, ProxyError};
use crate::access_log::{AccessRecord, SessionState};
use crate::body::BoxError;
use crate::h1::{self, Chunk, ChunkedDecoder, Framing, Parsed, RequestHead, ResponseHead};
use crate::hop;
use crate::metrics::UpstreamFailure;
use crate::request_id::{RequestId, X_REQUEST_ID};
use crate::request_scope::Scope;
use crate::shutdown::Drain;

/// Most bytes read from the backend at once, as on hyper's path: everything read goes out to the
/// client before the next read, so a client that reads slowly holds about this much unsent.
const READ_BYTES: usize = 8 * 1024;
/// Largest read buffer an idle backend connection keeps.
const MAX_POOLED_BUFFER: usize = 2 * READ_BYTES;

/// The bounds of a client connection on the direct path.
#[derive(Debug, Clone, Copy)]
pub struct DirectLimits {
    /// From the first byte of a request head to its end.
    pub header_read_timeout: Duration,
    /// Between requests; also the longest a write to the client may make no progress.
    pub keep_alive_timeout: Duration,
    /// How long the connection waits here for its next request before it is handed back to
    /// wait without buffers.
    pub idle_after: Duration,
    /// Largest request head: a larger one goes to hyper, which refuses it.
    pub max_head: usize,
}

/// How [`Proxy::serve_direct`] left a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Closed (or to be dropped): nothing more to do.
    Closed,
    /// Every request answered and none for a while, since the instant given: the connection can
    /// wait for its next request without buffers.
    Idle(Instant),
    /// The bytes in the buffer start a request that hyper serves.
    Other,
}

/// A connection to the backend, held by one request at a time.
struct Backend {
    stream: TcpStream,
    /// Bytes read and not yet used: always empty between requests.
    buf: BytesMut,
    /// The header lines of the last response head, when it was plain ([`h1::parse_response`]).
    lines: Vec<u8>,
}

/// Backend connections between requests, for the next request that needs one, as nginx's
/// upstream keepalive and hyper's pool keep them: one pool per worker (never contended: a
/// worker's tasks run on its one thread), at most `max` connections, none kept past
/// `idle_timeout` (`--upstream-idle-timeout`).
pub(super) struct Pool {
    idle: Mutex<VecDeque<(Backend, Instant)>>,
    max: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub(super) fn new(max: usize, idle_timeout: Duration) -> Self {
        Pool {
            idle: Mutex::new(VecDeque::new()),
            max,
            idle_timeout,
        }
    }

    /// The most recently used connection that is still fresh and open, if any.
    fn take(&self, now: Instant) -> Option<Backend> {
        let mut idle = self.idle.lock().ok()?;
        self.expire(&mut idle, now);
        while let Some((backend, _)) = idle.pop_back() {
            if still_open(&backend.stream) {
                return Some(backend);
            }
        }
        None
    }

    /// Keeps `backend` for the next request, if there is room. Its buffer (empty: the response
    /// was read to its end and nothing followed) goes with it, to be used again.
    fn put(&self, mut backend: Backend, now: Instant) {
        if backend.buf.capacity() > MAX_POOLED_BUFFER {
            // Grown for a large head: not kept for ever.
            backend.buf = BytesMut::new();
        }
        if backend.lines.capacity() > MAX_POOLED_BUFFER {
            backend.lines = Vec::new();
        }
        if let Ok(mut idle) = self.idle.lock() {
            self.expire(&mut idle, now);
            if idle.len() < self.max {
                idle.push_back((backend, now));
            }
        }
    }

    /// Drops the connections idle for longer than the idle timeout at `now` (the oldest are in
    /// front).
    fn expire(&self, idle: &mut VecDeque<(Backend, Instant)>, now: Instant) {
        while idle
            .front()
            .is_some_and(|(_, since)| now.saturating_duration_since(*since) >= self.idle_timeout)
        {
            idle.pop_front();
        }
    }
}

/// Whether an idle backend connection can still carry a request: nothing arrived on it since
/// its last response (a close, or bytes that belong to no request). Costs no system call unless
/// the socket was reported readable.
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// A backend's answer, ready for the client, and the connection its body comes on.
struct Answer {
    head: ResponseHead,
    backend: Backend,
    /// Whether the connection may be kept for another request: not one opened to retry, as
    /// hyper's path does not keep those either (a backend that closed one connection under a
    /// request may be closing others).
    keep: bool,
}

/// How relaying a body failed.
enum Relay {
    /// The backend cut it off, sent a broken one or went silent.
    Backend,
    /// The client went away or stopped reading.
    Client,
}

/// Why one attempt to get a backend's response head failed.
struct Attempt {
    /// Whether any byte of the response had arrived: a request is sent again only if not.
    answered: bool,
    error: BoxError,
}

impl Proxy {
    /// Serves requests on `client` (its first bytes, if any, in `buf`) for as long as the direct
    /// path serves them: the first head is due by `head_by`.
    pub(crate) async fn serve_direct(
        &self,
        client: &mut TcpStream,
        buf: &mut BytesMut,
        peer: SocketAddr,
        limits: DirectLimits,
        head_by: Instant,
        drain: &mut Drain,
    ) -> Ended {
        // Heads and body bytes on their way out, reused from request to request.
        let mut out = Vec::new();
        let ended = self
            .serve_requests(client, buf, peer, limits, head_by, drain, &mut out)
            .await;
        if ended == Ended::Closed {
            // The responses are out: close politely, so that no unread byte turns the close
            // into a reset that could destroy the last response before the client reads it.
            let _ = tokio::time::timeout(limits.keep_alive_timeout, client.shutdown()).await;
        }
        ended
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve_requests(
        &self,
        client: &mut TcpStream,
        buf: &mut BytesMut,
        peer: SocketAddr,
        limits: DirectLimits,
        head_by: Instant,
        drain: &mut Drain,
        out: &mut Vec<u8>,
    ) -> Ended {
        // The deadline of the head being read; for a later request, set only once its head
        // turns out not to have come whole in its first read (which saves a clock read).
        let mut head_by = Some(head_by);
        let mut served = false;
        let ip = PeerIp::of(peer);
        let mut idle_since = Instant::now();
        // One timer for the waits between requests and one for the backend's answers, each only
        // ever moved later, which costs next to nothing (a timer is looked at again only when it
        // fires): no timer is made and dropped per request.
        let idle = tokio::time::sleep_until(idle_since);
        let upstream = tokio::time::sleep_until(idle_since + self.upstream_timeout);
        tokio::pin!(idle, upstream);
        loop {
            let head = loop {
                if !buf.is_empty() {
                    match h1::parse_request(buf) {
                        Parsed::Direct(head) => break head,
                        Parsed::Other => return Ended::Other,
                        // hyper answers it 431.
                        Parsed::Partial if buf.len() >= limits.max_head => return Ended::Other,
                        Parsed::Partial => {}
                    }
                }
                if buf.capacity() - buf.len() < READ_BYTES / 2 {
                    buf.reserve(READ_BYTES);
                }
                let waiting = served && buf.is_empty();
                let read = if waiting {
                    // A stop is noticed as each request ends, and by a connection that waits for
                    // its next one when it is handed back, at most `idle_after` later.
                    if drain.is_draining() {
                        return Ended::Idle(idle_since);
                    }
                    let until = idle_since + limits.idle_after.min(limits.keep_alive_timeout);
                    idle.as_mut().reset(until);
                    tokio::select! {
                        biased;
                        read = client.read_buf(buf) => read,
                        () = idle.as_mut() => return Ended::Idle(idle_since),
                    }
                } else {
                    let by =
                        *head_by.get_or_insert_with(|| Instant::now() + limits.header_read_timeout);
                    match tokio::time::timeout_at(by, client.read_buf(buf)).await {
                        Ok(read) => read,
                        Err(_) => {
                            tracing::debug!(timeout = ?limits.header_read_timeout, "no complete request head in time; closing");
                            return Ended::Closed;
                        }
                    }
                };
                match read {
                    Ok(0) | Err(_) => return Ended::Closed,
                    Ok(_) if waiting => head_by = None,
                    Ok(_) => {}
                }
            };
            served = true;
            let exchange = (&mut *client, (peer, &ip), limits, &*drain);
            let keep = self.exchange(head, exchange, upstream.as_mut(), out).await;
            // The keep-alive timeout counts from the end of the answer (a long download must not
            // use it up).
            idle_since = Instant::now();
            if !keep {
                return Ended::Closed;
            }
            // A pipelined next head already in part in the buffer is due from now.
            head_by = None;
        }
    }

    /// Serves one request and writes its response: whether the connection can carry another.
    async fn exchange(
        &self,
        head: RequestHead,
        (client, (peer, ip), limits, drain): (
            &mut TcpStream,
            (SocketAddr, &PeerIp),
            DirectLimits,
            &Drain,
        ),
        timer: Pin<&mut Sleep>,
        out: &mut Vec<u8>,
    ) -> bool {
        let start = Instant::now();
        let RequestHead {
            request,
            close,
            trailers,
        } = head;
        let id = RequestId::from_client(request.headers());
        let mut log = AccessRecord::started_at(&request, peer, id.clone(), start.into_std());
        let scope = Scope::new(
            peer,
            request.method().clone(),
            request.uri().clone(),
            id.clone(),
        );
        let span = scope.eager_span();
        let work = scope
            .run(async {
                let answered = self
                    .respond_direct(request, (peer, ip, &id), &mut log, timer, out)
                    .await;
                if let Err(e) = &answered {
                    self.report(e);
                }
                answered
            })
            .instrument(span);
        // A client that goes away before its answer is ready is not answered (its access line
        // says 499), as on hyper's path.
        let answered = tokio::select! {
            biased;
            answered = work => Some(answered),
            () = gone(client) => None,
        };
        let Some(answered) = answered else {
            return false;
        };
        let keep = !close && !drain.is_draining();
        out.clear();
        let relayed = match answered {
            Ok(Answer {
                head: mut resp,
                backend: mut from,
                keep: pool,
            }) => {
                let head = start.elapsed();
                self.metrics.request(resp.status.as_u16(), head);
                log.responded_after(resp.status, head);
                let framing = resp.framing;
                let chunked = match framing {
                    Framing::Chunked | Framing::Close => {
                        resp.headers.remove(header::CONTENT_LENGTH);
                        "transfer-encoding: chunked\r\n"
                    }
                    Framing::None | Framing::Length(_) => "",
                };
                // The backend's own request id (a head that has one is not plain) gives way to ours.
                resp.headers.remove(&X_REQUEST_ID);
                h1::write_response_head(
                    out,
                    resp.status,
                    (&from.lines, &resp.headers, resp.dated),
                    id.header_value(),
                    &[if keep { "" } else { "connection: close\r\n" }, chunked],
                );
                let relayed = self
                    .relay(
                        (framing, trailers),
                        &mut from,
                        client,
                        out,
                        limits.keep_alive_timeout,
                    )
                    .await;
                if pool && relayed.is_ok() && resp.reusable && from.buf.is_empty() {
                    self.pool.put(from, start + head);
                }
                relayed
            }
            Err(e) => {
                if matches!(e, ProxyError::Store(_)) {
                    log.session = SessionState::Unavailable;
                }
                let (status, text) = e.status_and_text();
                let mut headers = http::HeaderMap::new();
                error_headers(status, !keep, &mut headers);
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
                let head = start.elapsed();
                self.metrics.request(status.as_u16(), head);
                log.responded_after(status, head);
                h1::write_response_head(
                    out,
                    status,
                    (&[], &headers, false),
                    id.header_value(),
                    &[],
                );
                out.extend_from_slice(text.as_bytes());
                if write_all(client, out, limits.keep_alive_timeout).await {
                    Ok(text.len() as u64)
                } else {
                    Err((Relay::Client, 0))
                }
            }
        };
        match relayed {
            Ok(bytes) => {
                log.complete(bytes);
                keep
            }
            Err((Relay::Backend, bytes)) => {
                log.failed(bytes);
                false
            }
            Err((Relay::Client, bytes)) => {
                log.aborted(bytes);
                false
            }
        }
    }

    /// The request's path on the direct path, phase by phase as [`Proxy::respond`] takes it.
    async fn respond_direct(
        &self,
        request: Request<()>,
        (peer, ip, id): (SocketAddr, &PeerIp, &RequestId),
        log: &mut AccessRecord,
        timer: Pin<&mut Sleep>,
        out: &mut Vec<u8>,
    ) -> Result<Answer, ProxyError> {
        check_host(&request)?;
        let https = self.is_https(request.headers());
        let (mut parts, ()) = request.into_parts();
        let resolved = self.open(&mut parts.headers, log).await?;
        let fields = self.backend_headers(&mut parts.headers, peer, id, &resolved, true);
        out.clear();
        self.write_backend_head(out, &mut parts, fields, (ip, id));
        let (forwarded, waited) = self.forward_direct(&parts.method, timer, out).await;
        log.backend = Some(waited);
        let Answer {
            head: mut resp,
            backend,
            keep,
        } = forwarded?;
        if resp.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ProxyError::UnexpectedUpgrade);
        }
        let changes = self.protocol.take_changes(&mut resp.headers)?;
        hop::remove_hop_by_hop(&mut resp.headers);
        let action = self.settle(resolved, &changes, log).await?;
        self.set_cookies(&mut resp.headers, action, https);
        Ok(Answer {
            head: resp,
            backend,
            keep,
        })
    }

    /// Sends the request head in `out` to the backend and reads its response head, within
    /// `--upstream-timeout` in all (on the connection's `timer`); also how long that took. As on
    /// hyper's path, an idempotent request that failed before any of its answer arrived is sent
    /// once more, on a new connection.
    async fn forward_direct(
        &self,
        method: &Method,
        mut timer: Pin<&mut Sleep>,
        out: &[u8],
    ) -> (Result<Answer, ProxyError>, Duration) {
        let started = Instant::now();
        let idempotent = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        let attempts = async {
            let mut first = match self.pool.take(started) {
                Some(b) => b,
                None => self.connect().await?,
            };
            match self.send(&mut first, out, method).await {
                Ok(head) => Ok(Answer {
                    head,
                    backend: first,
                    keep: true,
                }),
                Err(attempt) if !attempt.answered && idempotent => {
                    drop(first);
                    self.metrics.upstream_retries.inc();
                    tracing::debug!(error = %attempt.error, "backend connection failed before the response; retrying once on a new connection");
                    let mut fresh = self.connect().await?;
                    match self.send(&mut fresh, out, method).await {
                        Ok(head) => Ok(Answer {
                            head,
                            backend: fresh,
                            keep: false,
                        }),
                        Err(attempt) => Err(ProxyError::Upstream(attempt.error)),
                    }
                }
                Err(attempt) => Err(ProxyError::Upstream(attempt.error)),
            }
        };
        timer.as_mut().reset(started + self.upstream_timeout);
        let done = tokio::select! {
            biased;
            done = attempts => Ok(done),
            () = timer => Err(()),
        };
        let waited = started.elapsed();
        self.metrics.upstream(waited);
        let answer = match done {
            Ok(Ok(answer)) => Ok(answer),
            Err(()) => {
                self.metrics.upstream_error(UpstreamFailure::Timeout);
                Err(ProxyError::UpstreamTimeout(self.upstream_timeout))
            }
            Ok(Err(e @ ProxyError::UpstreamConnect(_))) => {
                self.metrics.upstream_error(UpstreamFailure::Connect);
                Err(e)
            }
            Ok(Err(e)) => {
                self.metrics.upstream_error(UpstreamFailure::Response);
                Err(e)
            }
        };
        (answer, waited)
    }

    /// A new connection to the backend, within the connect timeout.
    async fn connect(&self) -> Result<Backend, ProxyError> {
        let connecting = TcpStream::connect(self.upstream.authority.as_str());
        let stream = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(ProxyError::UpstreamConnect(e.into())),
            Err(_) => {
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                return Err(ProxyError::UpstreamConnect(e.into()));
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(Backend {
            stream,
            buf: BytesMut::new(),
            lines: Vec::new(),
        })
    }

    /// Writes the request head in `out` to `backend` and reads the response head.
    async fn send(
        &self,
        backend: &mut Backend,
        out: &[u8],
        method: &Method,
    ) -> Result<ResponseHead, Attempt> {
        let failed = |answered: bool, error: BoxError| Attempt { answered, error };
        if let Err(e) = backend.stream.write_all(out).await {
            return Err(failed(false, e.into()));
        }
        let mut answered = false;
        // The response headers the proxy has to look at: the others are copied through as lines.
        let special = |name: &[u8]| {
            self.protocol.is_protocol_name(name) || name.eq_ignore_ascii_case(b"x-request-id")
        };
        loop {
            let parsed = h1::parse_response(
                &mut backend.buf,
                method,
                self.response_head_limit,
                (&special, &mut backend.lines),
            );
            match parsed {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err(failed(true, e.into())),
            }
            if backend.buf.capacity() - backend.buf.len() < READ_BYTES / 2 {
                backend.buf.reserve(READ_BYTES);
            }
            match backend.stream.read_buf(&mut backend.buf).await {
                Ok(0) => {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "backend closed the connection before a complete response head",
                    );
                    return Err(failed(answered, e.into()));
                }
                Ok(_) => answered = true,
                Err(e) => return Err(failed(answered, e.into())),
            }
        }
    }

    /// Writes what is in `out` (the response head) and the body that `framing` delimits to the
    /// client, as it arrives, with a chunked body's trailers if the client takes `trailers`: the
    /// body bytes sent, or how it failed (and after how many).
    async fn relay(
        &self,
        (framing, trailers): (Framing, bool),
        from: &mut Backend,
        client: &mut TcpStream,
        out: &mut Vec<u8>,
        write_timeout: Duration,
    ) -> Result<u64, (Relay, u64)> {
        let mut left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut chunks = ChunkedDecoder::new(trailers);
        let mut sent = 0u64;
        loop {
            let done = match framing {
                Framing::None => true,
                Framing::Length(_) => {
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(from.buf.len());
                    out.extend_from_slice(&from.buf[..n]);
                    from.buf.advance(n);
                    left -= n as u64;
                    sent += n as u64;
                    left == 0
                }
                Framing::Chunked => loop {
                    match chunks.next(&mut from.buf) {
                        Ok(Chunk::Data(data)) => {
                            h1::write_chunk(out, &data);
                            sent += data.len() as u64;
                        }
                        Ok(Chunk::More) => break false,
                        Ok(Chunk::End) => {
                            // Trailers go to a client that takes them, never a session header.
                            let protocol = &self.protocol;
                            h1::write_last_chunk(out, chunks.trailers(), |name| {
                                !protocol.is_protocol_header(name)
                            });
                            break true;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "backend sent a broken chunked body");
                            return Err((Relay::Backend, sent));
                        }
                    }
                },
                Framing::Close => {
                    h1::write_chunk(out, &from.buf);
                    sent += from.buf.len() as u64;
                    from.buf.clear();
                    false
                }
            };
            if done || !out.is_empty() {
                // Everything gathered goes out before waiting for the backend again.
                if !write_all(client, out, write_timeout).await {
                    return Err((Relay::Client, sent));
                }
                out.clear();
            }
            if done {
                return Ok(sent);
            }
            if from.buf.capacity() - from.buf.len() < READ_BYTES / 2 {
                from.buf.reserve(READ_BYTES);
            }
            let read = tokio::time::timeout(self.upstream_timeout, async {
                // At most one buffer's worth at a time, whatever the buffer has grown to.
                let mut limited = (&mut from.stream).take(READ_BYTES as u64);
                limited.read_buf(&mut from.buf).await
            })
            .await;
            match read {
                Ok(Ok(0)) if framing == Framing::Close => {
                    out.extend_from_slice(h1::LAST_CHUNK);
                    if !write_all(client, out, write_timeout).await {
                        return Err((Relay::Client, sent));
                    }
                    out.clear();
                    return Ok(sent);
                }
                Ok(Ok(0)) | Ok(Err(_)) => return Err((Relay::Backend, sent)),
                Err(_) => {
                    tracing::debug!(timeout = ?self.upstream_timeout, "backend went silent in the middle of a body; closing");
                    return Err((Relay::Backend, sent));
                }
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// Writes all of `data` to `client`, within `timeout` once the socket takes no more at once:
/// whether it all went out. A write the socket takes whole at once (nearly every response
/// head and small body) needs no timer.
async fn write_all(client: &mut TcpStream, mut data: &[u8], timeout: Duration) -> bool {
    match client.try_write(data) {
        Ok(n) if n == data.len() => return true,
        Ok(n) => data = &data[n..],
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(_) => return false,
    }
    matches!(
        tokio::time::timeout(timeout, client.write_all(data)).await,
        Ok(Ok(()))
    )
}

/// Completes when the client closes its connection (or it fails) while its request is handled.
/// Bytes of a next request end the watch: the client is still there.
async fn gone(client: &TcpStream) {
    let mut byte = [0u8; 1];
    let seen = std::future::poll_fn(|cx| {
        let mut buf = ReadBuf::new(&mut byte);
        match client.poll_peek(cx, &mut buf) {
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(buf.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    if let Ok(1..) = seen {
        std::future::pending::<()>().await;
    }
}
