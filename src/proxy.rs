//! The request path, phase by phase, in the order of the README's "How a request flows":
//! check the request, resolve the cookie and load the session, prepare the backend's request
//! (strip the client's session headers, inject the real ones), forward it, take the backend's
//! changes, store them, answer (set or clear the cookie).
//!
//! Bodies stream through in both directions; only headers are touched. Every failure becomes a
//! [`ProxyError`], and [`ProxyError::into_response`] is the one place that turns failures into
//! status codes.
//!
//! A session that cannot be loaded (the store failed, or its circuit breaker is open) is a 503,
//! unless `--on-store-error fail-open`: then the request goes on without a session, marked
//! `unavailable`, and only a response that would change the session is answered 503.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{self, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tracing::Instrument;

use crate::access_log::{AccessRecord, Logged, SessionState};
use crate::body::{BoxError, ClientBody, Detached, IdleTimeout, StripTrailers};
use crate::config::{Config, OnStoreError, TtlPolicy, Upstream};
use crate::cookie::{split_cookies, CookieWriter, SessionId, SigningKeys, VerifiedCookies};
use crate::h1;
use crate::hop;
use crate::log_limit::LogLimit;
use crate::metrics::{ClientFault, Event, Lookup, Metrics, StoreOp, UpstreamFailure};
use crate::protocol::{apply_to_fields, Changes, Protocol, ProtocolError, Rejection};
use crate::request_id::{RequestId, X_REQUEST_ID};
use crate::request_scope::{in_request, Scope};
use crate::store::{now_ms, Applied, Loaded, Session, SessionStore, StoreError, Target};
use crate::tunnel;
use crate::upstream::Connector;

mod direct;
pub use direct::{DirectLimits, Ended};

/// The body of every response stickless sends: the backend's, streamed (and cut off if the
/// backend goes silent for the upstream timeout), or its own short text.
pub type ProxyBody = Either<IdleTimeout<StripTrailers<Detached<Incoming>>>, Full<Bytes>>;

/// The body of a request on its way to the backend: the client's, or none for a retry.
type UpstreamBody = Either<ClientBody<StripTrailers<Incoming>>, Empty<Bytes>>;

/// How long clients are asked to wait before retrying when the store is unavailable.
const RETRY_AFTER_SECS: HeaderValue = HeaderValue::from_static("1");

/// Session cookies of one name checked per request. Browsers send one per matching path and
/// domain, so a handful covers every real case; past that a forged flood costs nothing more.
pub const MAX_SESSION_COOKIES: usize = crate::cookie::KEPT_COOKIE_VALUES;

/// Cookie values remembered as verified, per worker (a slot each; a few hundred KiB when all
/// are used).
const VERIFIED_COOKIES: usize = 1024;

/// Most idle backend connections kept for reuse, per pool.
const MAX_IDLE_BACKENDS: usize = 256;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Warnings a client can cause at will: at most one line a second of each.
static FORGED_WARNINGS: LogLimit = LogLimit::new(1000);
static SPOOF_WARNINGS: LogLimit = LogLimit::new(1000);
static CLIENT_ERROR_WARNINGS: LogLimit = LogLimit::new(1000);
/// While the store's circuit breaker is open, a 503 costs nothing and clients retry as fast as
/// they like: one line a second of each is enough (the breaker logs when it opens and closes).
static STORE_DOWN_WARNINGS: LogLimit = LogLimit::new(1000);
/// With fail-open, every request during an outage would log one.
static FAIL_OPEN_WARNINGS: LogLimit = LogLimit::new(1000);

/// Why a request could not be served normally.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The session store failed or timed out.
    #[error("session store unavailable")]
    Store(#[from] StoreError),
    /// The backend could not be reached.
    #[error("backend unreachable")]
    UpstreamConnect(#[source] BoxError),
    /// The backend failed while answering.
    #[error("backend failed")]
    Upstream(#[source] BoxError),
    /// The backend sent no response headers in time.
    #[error("backend did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    /// The backend's response broke the header protocol.
    #[error("backend response broke the session protocol")]
    Protocol(#[from] ProtocolError),
    /// The backend's changes would break a limit or increment a non-counter.
    #[error("backend's session changes were refused")]
    Rejected(#[from] Rejection),
    /// The backend switched protocols without being asked to (or without saying to what).
    #[error("backend switched protocols unasked")]
    UnexpectedUpgrade,
    /// The request itself cannot be forwarded.
    #[error("bad request")]
    BadRequest(#[from] BadRequest),
    /// The client's request body was malformed or cut off on its way to the backend.
    #[error("the client's request body failed")]
    ClientBody(#[source] hyper_util::client::legacy::Error),
}

/// What is wrong with a request that is refused with 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// An HTTP/1.1 request without `Host`.
    #[error("an HTTP/1.1 request without a Host header")]
    MissingHost,
    /// More than one `Host` header.
    #[error("more than one Host header")]
    SeveralHosts,
    /// A request target that cannot be turned into the backend's.
    #[error("a request target that cannot be forwarded")]
    Target,
}

impl ProxyError {
    /// The response for this error: a status and a short plain-text body, never a detail that
    /// could leak session data. `close` asks the client to close an HTTP/1 connection whose state
    /// is in doubt (a request body that may not have been read to its end).
    pub fn into_response(self, close: bool) -> Response<ProxyBody> {
        let (status, text) = self.status_and_text();
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
            text.as_bytes(),
        ))));
        *resp.status_mut() = status;
        error_headers(status, close, resp.headers_mut());
        resp
    }

    /// The status of this error's response and its plain-text body.
    fn status_and_text(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::Store(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "session store unavailable, retry shortly\n",
            ),
            ProxyError::UpstreamConnect(_) => (StatusCode::BAD_GATEWAY, "backend unavailable\n"),
            ProxyError::Upstream(_) | ProxyError::UnexpectedUpgrade => {
                (StatusCode::BAD_GATEWAY, "backend failed\n")
            }
            ProxyError::UpstreamTimeout(_) => (StatusCode::GATEWAY_TIMEOUT, "backend timed out\n"),
            ProxyError::Protocol(_) | ProxyError::Rejected(_) => (
                StatusCode::BAD_GATEWAY,
                "backend sent invalid session headers\n",
            ),
            ProxyError::BadRequest(BadRequest::MissingHost) => {
                (StatusCode::BAD_REQUEST, "bad request: no Host header\n")
            }
            ProxyError::BadRequest(BadRequest::SeveralHosts) => (
                StatusCode::BAD_REQUEST,
                "bad request: more than one Host header\n",
            ),
            ProxyError::BadRequest(BadRequest::Target) => {
                (StatusCode::BAD_REQUEST, "bad request\n")
            }
            ProxyError::ClientBody(_) => (StatusCode::BAD_REQUEST, "bad request: malformed body\n"),
        }
    }
}

/// The headers of an error response with `status`; `close` asks an HTTP/1 client to close.
fn error_headers(status: StatusCode, close: bool, h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(header::RETRY_AFTER, RETRY_AFTER_SECS);
    }
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// The session a request goes to the backend with.
enum Resolved {
    /// A live session.
    Live(SessionId, Session),
    /// No session: no cookie, or an unknown, expired or forged one (which of them, for the log).
    NoSession(SessionState),
    /// A cookie whose session was rotated away within the grace: no session, and no cookie may
    /// be set.
    Rotated,
    /// The session could not be loaded and the request goes on without it (fail-open): no
    /// session, and no change can be stored.
    Unavailable(StoreError),
}

impl Resolved {
    /// The session's state as the access log says it, before the backend's changes.
    fn state(&self) -> SessionState {
        match self {
            Resolved::Live(..) => SessionState::Active,
            Resolved::NoSession(why) => *why,
            Resolved::Rotated => SessionState::Stale,
            Resolved::Unavailable(_) => SessionState::Unavailable,
        }
    }
}

/// What to do with the session cookie (and the version cookie) in the response.
#[derive(Debug)]
enum CookieAction {
    Keep,
    /// The session's fields changed: the version cookie says which version this response
    /// acknowledges (when the store serves copies).
    Changed {
        id: SessionId,
        created_ms: u64,
        version: u64,
    },
    Set {
        id: SessionId,
        created_ms: u64,
        version: u64,
        /// The session was moved from another id, rather than started.
        rotated: bool,
    },
    Clear,
}

/// Everything the request path needs, shared by all connections.
pub struct Proxy {
    store: Arc<dyn SessionStore>,
    keys: SigningKeys,
    /// Cookie values that verified lately, per worker.
    verified: VerifiedCookies,
    cookies: CookieWriter,
    protocol: Arc<Protocol>,
    ttl: TtlPolicy,
    upstream: Upstream,
    upstream_timeout: Duration,
    on_store_error: OnStoreError,
    /// Whether the listener serves TLS itself: every request then came over HTTPS.
    tls: bool,
    /// Whether the store may answer with a copy (a local cache): each change's version then goes
    /// to the user in the version cookie, and a copy older than it is not served to them.
    versions: bool,
    /// Pooled connections to the backend.
    client: Client<Connector, UpstreamBody>,
    /// Fresh connections only, for a retry.
    fresh: Client<Connector, UpstreamBody>,
    /// Idle backend connections of the direct path.
    pool: direct::Pool,
    /// Longest a new backend connection may take.
    connect_timeout: Duration,
    /// Largest response head the backend may send.
    response_head_limit: usize,
    metrics: Metrics,
}

impl Proxy {
    /// A proxy for `config` on `store`, recording into `metrics`.
    pub fn new(config: &Config, store: Arc<dyn SessionStore>, metrics: Metrics) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let connect_timeout = config.upstream_timeout.min(Duration::from_secs(5));
        connector.set_connect_timeout(Some(connect_timeout));
        let connector = Connector::new(connector);
        // The backend's response is read at the client's pace, one buffer at a time, and the
        // buffer is capped (hyper's default is ~400 KiB) so that a slow client, or an idle
        // pooled connection, pins little memory. The cap is also the largest response head the
        // backend may send: room for a whole session's changes escaped (three bytes a byte at
        // worst) plus its other headers, and never less than the 64 KiB clients get.
        let response_head_limit =
            (config.protocol.max_session_bytes.saturating_mul(3) + 16 * 1024).max(64 * 1024);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.upstream_idle_timeout)
            .pool_max_idle_per_host(MAX_IDLE_BACKENDS)
            .http1_max_buf_size(response_head_limit)
            .build(connector.clone());
        // Never reuses a connection: a retry must not meet another one the backend has closed.
        let fresh = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .http1_max_buf_size(response_head_limit)
            .build(connector);
        let versions = store.serves_copies();
        // The status header is the prefix without its last `-`; a `HeaderPrefix` is a header name.
        Proxy {
            store,
            keys: config.keys().clone(),
            verified: VerifiedCookies::new(VERIFIED_COOKIES),
            cookies: CookieWriter::new(config.cookie.clone()),
            protocol: Arc::new(Protocol::new(config.protocol.clone())),
            ttl: config.ttl,
            upstream: config.upstream.clone(),
            upstream_timeout: config.upstream_timeout,
            on_store_error: config.on_store_error,
            tls: config.tls().is_some(),
            versions,
            client,
            fresh,
            pool: direct::Pool::new(MAX_IDLE_BACKENDS, config.upstream_idle_timeout),
            connect_timeout,
            response_head_limit,
            metrics,
        }
    }

    /// Serves one request from `peer`. Never fails: errors become responses. Every response
    /// carries the request's id, and its body the request's access line.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Logged<ProxyBody>> {
        let start = Instant::now();
        let id = RequestId::from_client(req.headers());
        // Written when dropped: also if the client goes away while this future waits.
        let mut log = AccessRecord::new(&req, peer, id.clone());
        // Warnings logged while the request is handled carry its peer, method, path and id.
        let scope = Scope::new(peer, req.method().clone(), req.uri().clone(), id.clone());
        let span = scope.eager_span();
        // Answered early, an HTTP/1 connection whose request body may not have been read to its
        // end cannot carry another request safely.
        let in_doubt = req.version() <= Version::HTTP_11 && !req.body().is_end_stream();
        let responded = scope
            .run(async {
                let responded = self.respond(req, peer, &id, &mut log).await;
                if let Err(e) = &responded {
                    self.report(e);
                }
                responded
            })
            .instrument(span)
            .await;
        let mut resp = match responded {
            Ok(resp) => resp,
            Err(e) => {
                if matches!(e, ProxyError::Store(_)) {
                    log.session = SessionState::Unavailable;
                }
                e.into_response(in_doubt)
            }
        };
        resp.headers_mut()
            .insert(X_REQUEST_ID.clone(), id.header_value().clone());
        self.metrics
            .request(resp.status().as_u16(), start.elapsed());
        log.responded(resp.status());
        resp.map(|body| Logged::new(body, log))
    }

    /// The request's path, phase by phase; what happens to the session, and the backend's time,
    /// go into `log`.
    async fn respond(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        id: &RequestId,
        log: &mut AccessRecord,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        check_host(&req)?;
        let https = self.is_https(req.headers());
        let upgrade = Upgrade::requested(&mut req);
        let resolved = self.open(req.headers_mut(), log).await?;
        let prepared = self.prepare(req, peer, id, &resolved, upgrade.as_ref())?;
        let sent = Instant::now();
        let forwarded = self.forward(prepared).await;
        log.backend = Some(sent.elapsed());
        let mut resp = forwarded?;

        let changes = self.protocol.take_changes(resp.headers_mut())?;
        let backend_upgrade = resp.headers().get(header::UPGRADE).cloned();
        hop::remove_hop_by_hop(resp.headers_mut());
        let tunnel = Upgrade::accept(upgrade, backend_upgrade, &mut resp)?;
        let action = self.settle(resolved, &changes, log).await?;
        Ok(self.answer(resp, action, https, tunnel))
    }

    /// Whether the request came over HTTPS: always over stickless's own TLS; otherwise as the
    /// load balancer in front says.
    fn is_https(&self, headers: &HeaderMap) -> bool {
        self.tls
            || headers
                .get(&X_FORWARDED_PROTO)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
    }

    /// The request's session: the client's hop-by-hop headers out (a `Connection` header naming
    /// a header could otherwise remove one that stickless injects), then the cookie taken and its
    /// session loaded.
    async fn open(
        &self,
        headers: &mut HeaderMap,
        log: &mut AccessRecord,
    ) -> Result<Resolved, ProxyError> {
        hop::remove_hop_by_hop(headers);
        let resolved = self.resolve(headers).await?;
        log.session = resolved.state();
        Ok(resolved)
    }

    /// Stores the backend's `changes` to the `resolved` session: what the cookies must say.
    async fn settle(
        &self,
        resolved: Resolved,
        changes: &Changes,
        log: &mut AccessRecord,
    ) -> Result<CookieAction, ProxyError> {
        let action = match resolved {
            _ if changes.is_empty() => CookieAction::Keep,
            Resolved::Rotated => self.drop_after_rotation(changes),
            // Changes to a session that could not be read can be neither checked nor stored:
            // the client is told to retry rather than have them dropped silently.
            Resolved::Unavailable(e) => return Err(e.into()),
            Resolved::Live(id, session) => self.commit(Some((id, session)), changes).await?,
            Resolved::NoSession(_) => self.commit(None, changes).await?,
        };
        log.session = match action {
            CookieAction::Keep | CookieAction::Changed { .. } => log.session,
            CookieAction::Set { rotated: true, .. } => SessionState::Rotated,
            CookieAction::Set { rotated: false, .. } => SessionState::Created,
            CookieAction::Clear => SessionState::Destroyed,
        };
        Ok(action)
    }

    /// Logs a failed request: the reason, never a value. What a client can cause at will is
    /// rate-limited.
    fn report(&self, e: &ProxyError) {
        match e {
            ProxyError::Protocol(reason) => {
                self.metrics.event(Event::ProtocolError);
                in_request(
                    || tracing::warn!(%reason, "backend response broke the session protocol; nothing stored"),
                );
            }
            ProxyError::Rejected(reason) => {
                self.metrics.event(Event::ProtocolError);
                in_request(
                    || tracing::warn!(%reason, "backend's session changes refused; nothing stored"),
                );
            }
            ProxyError::BadRequest(_) | ProxyError::ClientBody(_) => {
                self.metrics.client_error(match e {
                    ProxyError::BadRequest(BadRequest::MissingHost) => ClientFault::MissingHost,
                    ProxyError::BadRequest(BadRequest::SeveralHosts) => ClientFault::SeveralHosts,
                    ProxyError::BadRequest(BadRequest::Target) => ClientFault::Target,
                    _ => ClientFault::Body,
                });
                if let Some(held_back) = CLIENT_ERROR_WARNINGS.allow() {
                    in_request(|| tracing::warn!(error = %e, held_back, "bad request"));
                }
            }
            ProxyError::Store(StoreError::CircuitOpen) => {
                if let Some(held_back) = STORE_DOWN_WARNINGS.allow() {
                    in_request(|| {
                        tracing::warn!(
                            held_back,
                            "session store down (circuit breaker open); answered 503"
                        )
                    });
                }
            }
            other => in_request(
                || tracing::warn!(error = %other, source = ?std::error::Error::source(other), "request failed"),
            ),
        }
    }

    /// Takes the session cookie out of the request and loads its session. A missing, malformed or
    /// forged cookie means no session; a store failure is an error, or with fail-open a request
    /// that goes on without its session.
    async fn resolve(&self, headers: &mut HeaderMap) -> Result<Resolved, ProxyError> {
        if !headers.contains_key(header::COOKIE) {
            self.metrics.lookup(Lookup::Miss);
            return Ok(Resolved::NoSession(SessionState::None));
        }
        let cookies = split_cookies(headers.get_all(header::COOKIE).iter(), self.cookies.name());
        headers.remove(header::COOKIE);
        if let Some(rest) = cookies.rest {
            headers.insert(header::COOKIE, rest);
        }
        if cookies.session_values.is_empty() {
            self.metrics.lookup(Lookup::Miss);
            return Ok(Resolved::NoSession(SessionState::None));
        }
        // Several cookies of one name can arrive (different paths or domains): the first that
        // verifies wins. Only the first few are checked, so that a flood of forged values costs
        // a bounded number of HMACs.
        let Some(id) = cookies
            .session_values
            .iter()
            .take(MAX_SESSION_COOKIES)
            .find_map(|v| self.verified.session(&self.keys, v))
        else {
            self.metrics.lookup(Lookup::Invalid);
            if let Some(held_back) = FORGED_WARNINGS.allow() {
                in_request(|| {
                    tracing::warn!(
                        held_back,
                        "session cookie failed verification; treated as no session"
                    )
                });
            }
            return Ok(Resolved::NoSession(SessionState::Invalid));
        };
        // The version of this session the user's last acknowledged change wrote: no copy older
        // than that may answer. A version cookie of another session, or a forged one, is 0.
        let min_version = if self.versions {
            cookies
                .version_values
                .iter()
                .take(MAX_SESSION_COOKIES)
                .find_map(|v| self.verified.version(&self.keys, &id, v))
                .unwrap_or(0)
        } else {
            0
        };
        match self
            .timed(StoreOp::Load, self.store.load_since(&id, min_version))
            .await
        {
            Ok(Loaded::Live(session)) => {
                self.metrics.lookup(Lookup::Hit);
                Ok(Resolved::Live(id, session))
            }
            Ok(Loaded::Rotated) => {
                self.metrics.lookup(Lookup::Miss);
                Ok(Resolved::Rotated)
            }
            Ok(Loaded::Absent) => {
                self.metrics.lookup(Lookup::Miss);
                Ok(Resolved::NoSession(SessionState::Unknown))
            }
            Err(e) => {
                self.metrics.lookup(Lookup::Error);
                match self.on_store_error {
                    OnStoreError::FailClosed => Err(e.into()),
                    OnStoreError::FailOpen => {
                        if let Some(held_back) = FAIL_OPEN_WARNINGS.allow() {
                            in_request(
                                || tracing::warn!(error = %e, held_back, "session not loaded; forwarded as unavailable (fail-open)"),
                            );
                        }
                        Ok(Resolved::Unavailable(e))
                    }
                }
            }
        }
    }

    /// Builds the backend's request: the client's protocol headers out, the session's in, the
    /// target and the forwarding headers set.
    fn prepare(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        id: &RequestId,
        resolved: &Resolved,
        upgrade: Option<&Upgrade>,
    ) -> Result<Prepared, ProxyError> {
        self.set_target(&mut req)?;
        self.backend_headers(req.headers_mut(), peer, id, resolved, false);
        if let Some(upgrade) = upgrade {
            hop::mark_upgrade(req.headers_mut(), upgrade.protocol.clone());
        }
        let replay = Replay::of(&req);
        let client_failed = Arc::new(AtomicBool::new(false));
        let protocol = self.protocol.clone();
        let failed = client_failed.clone();
        let req = req
            .map(|body| Either::Left(ClientBody::new(StripTrailers::new(body, protocol), failed)));
        Ok(Prepared {
            req,
            replay,
            client_failed,
        })
    }

    /// The backend's request headers: the client's protocol headers out, the session's in, the
    /// forwarding headers and the request id set. With `wire`, for a request head written
    /// directly ([`Proxy::write_backend_head`]): a live session's field headers are not added to
    /// `headers` but returned as they go on the wire, made once per loaded copy, and the status
    /// of a live session, the forwarding headers and the request id are left to the writer.
    fn backend_headers<'r>(
        &self,
        headers: &mut HeaderMap,
        peer: SocketAddr,
        id: &RequestId,
        resolved: &'r Resolved,
        wire: bool,
    ) -> Option<&'r [u8]> {
        let stripped = self.protocol.strip(headers);
        if stripped > 0 {
            self.metrics.spoofed_headers.inc_by(stripped as u64);
            if let Some(held_back) = SPOOF_WARNINGS.allow() {
                in_request(|| {
                    tracing::warn!(
                        count = stripped,
                        held_back,
                        "removed client headers that used the session header prefix"
                    )
                });
            }
        }
        let mut written = None;
        match resolved {
            // Made once per loaded copy: a session served from the local cache shares them.
            Resolved::Live(_, session) => {
                let fields = session
                    .fields
                    .headers(|fields| self.protocol.field_headers(fields));
                if wire {
                    written = Some(&fields.wire[..]);
                } else {
                    self.protocol.inject(headers, Some(&fields.pairs))
                }
            }
            Resolved::NoSession(_) | Resolved::Rotated => self.protocol.inject(headers, None),
            Resolved::Unavailable(_) => self.protocol.inject_unavailable(headers),
        }
        if !wire {
            self.forwarding_headers(headers, peer);
            // Replaces whatever the client sent: the backend gets the one id that is logged.
            headers.insert(X_REQUEST_ID.clone(), id.header_value().clone());
        }
        written
    }

    /// Sends the request to the backend and waits for its response head, at most
    /// `--upstream-timeout` in all. A request that can be sent again safely (idempotent, without a
    /// body) and failed before any of the response arrived is retried once on a new connection:
    /// the usual cause is a pooled connection that the backend closed as the request went out.
    async fn forward(&self, prepared: Prepared) -> Result<Response<Incoming>, ProxyError> {
        let Prepared {
            req,
            replay,
            client_failed,
        } = prepared;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.upstream_timeout;
        let mut sent = tokio::time::timeout_at(deadline, self.client.request(req)).await;
        let retry = matches!(&sent, Ok(Err(e)) if !e.is_connect());
        if let (true, Some(replay)) = (retry, replay) {
            self.metrics.upstream_retries.inc();
            tracing::debug!(
                "backend connection failed before the response; retrying once on a new connection"
            );
            sent =
                tokio::time::timeout_at(deadline, self.fresh.request(replay.into_request())).await;
        }
        self.metrics.upstream(started.elapsed());
        match sent {
            Ok(Ok(resp)) => Ok(resp),
            Err(_) => {
                self.metrics.upstream_error(UpstreamFailure::Timeout);
                Err(ProxyError::UpstreamTimeout(self.upstream_timeout))
            }
            Ok(Err(e)) if client_failed.load(Ordering::Relaxed) => Err(ProxyError::ClientBody(e)),
            Ok(Err(e)) if e.is_connect() => {
                self.metrics.upstream_error(UpstreamFailure::Connect);
                Err(ProxyError::UpstreamConnect(e.into()))
            }
            Ok(Err(e)) => {
                self.metrics.upstream_error(UpstreamFailure::Response);
                Err(ProxyError::Upstream(e.into()))
            }
        }
    }

    /// Sets or clears the cookie beside the backend's own cookies, starts the tunnel of an
    /// upgrade, and streams the backend's body on.
    fn answer(
        &self,
        mut resp: Response<Incoming>,
        action: CookieAction,
        https: bool,
        tunnel: Option<(OnUpgrade, OnUpgrade)>,
    ) -> Response<ProxyBody> {
        self.set_cookies(resp.headers_mut(), action, https);
        if let Some((client, backend)) = tunnel {
            // The changes are stored and the cookie set before the protocol switches.
            tokio::spawn(tunnel::splice(client, backend, self.upstream_timeout));
        }
        let (idle, protocol) = (self.upstream_timeout, self.protocol.clone());
        resp.map(|body| {
            let body = StripTrailers::new(Detached::new(body), protocol);
            Either::Left(IdleTimeout::new(body, idle))
        })
    }

    /// Sets or clears the session cookie (and the version cookie) as `action` says, beside the
    /// backend's own cookies in `headers`.
    fn set_cookies(&self, headers: &mut HeaderMap, action: CookieAction, https: bool) {
        let max_age = |created_ms: u64| {
            self.ttl.absolute.map(|abs| {
                let end = created_ms + abs.as_millis() as u64;
                end.saturating_sub(now_ms()).div_ceil(1000)
            })
        };
        // Only when the store serves copies: otherwise no version is ever checked.
        let version = |id: &SessionId, created_ms, version| {
            self.versions.then(|| {
                self.cookies.set_version(
                    &self.keys.sign_version(id, version),
                    max_age(created_ms),
                    https,
                )
            })
        };
        let (cookie, version_cookie) = match action {
            CookieAction::Keep => (None, None),
            CookieAction::Changed {
                id,
                created_ms,
                version: v,
            } => (None, version(&id, created_ms, v)),
            CookieAction::Set {
                id,
                created_ms,
                version: v,
                ..
            } => (
                Some(
                    self.cookies
                        .set(&self.keys.sign(&id), max_age(created_ms), https),
                ),
                version(&id, created_ms, v),
            ),
            CookieAction::Clear => (
                Some(self.cookies.clear(https)),
                self.versions.then(|| self.cookies.clear_version(https)),
            ),
        };
        if cookie.is_some() || version_cookie.is_some() {
            headers.extend(
                cookie
                    .into_iter()
                    .chain(version_cookie)
                    .map(|c| (header::SET_COOKIE, c)),
            );
            // A response that sets a session cookie must never be cached and served to another user.
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
    }

    /// Applies the backend's changes in the documented order: Destroy, Rotate, Delete, Set, Incr.
    async fn commit(
        &self,
        session: Option<(SessionId, Session)>,
        changes: &Changes,
    ) -> Result<CookieAction, ProxyError> {
        let fields = changes.field_changes();
        // Refuse what cannot fit before touching the store, so that a rotation is never half done.
        let snapshot = session
            .as_ref()
            .filter(|_| !changes.destroy)
            .map(|(_, s)| &s.fields);
        apply_to_fields(
            snapshot.unwrap_or(&Default::default()),
            &fields,
            self.protocol.limits(),
        )?;

        let current = session.map(|(id, _)| id);
        match current {
            Some(id) if changes.destroy => {
                self.timed(StoreOp::Destroy, self.store.destroy(&id))
                    .await?;
                self.metrics.event(Event::Destroyed);
                // "Log out and leave a flash message": a Set or Incr starts a new session.
                self.create_if_written(&fields, CookieAction::Clear).await
            }
            None if changes.destroy => self.create_if_written(&fields, CookieAction::Clear).await,
            Some(old) if changes.rotate => self.rotate(old, &fields).await,
            Some(id) => match self.change(&id, &fields).await? {
                Some((created_ms, version)) => Ok(CookieAction::Changed {
                    id,
                    created_ms,
                    version,
                }),
                None => Ok(CookieAction::Keep),
            },
            None => self.create_if_written(&fields, CookieAction::Keep).await,
        }
    }

    /// Moves the session to a new id with the changes applied: take the old one (it becomes a
    /// tombstone), then write the new one. A failure puts the old session back.
    async fn rotate(&self, old: SessionId, fields: &Changes) -> Result<CookieAction, ProxyError> {
        let taken = match self.timed(StoreOp::Take, self.store.take(&old)).await {
            Ok(taken) => taken,
            // The take may have run and only its answer been lost.
            Err(e) => {
                self.put_back(&old).await;
                return Err(e.into());
            }
        };
        let Some(base) = taken else {
            // Gone meanwhile: there is nothing to move, only the changes to write.
            return self.create_if_written(fields, CookieAction::Keep).await;
        };
        let created = self.create(fields, Some(&base)).await;
        if created.is_err() {
            self.put_back(&old).await;
        }
        created
    }

    /// Applies field changes to the request's session. A session that expired, or was destroyed
    /// or rotated by a concurrent request while the backend worked, is never brought back, and no
    /// new session is started either, whose cookie would replace the one a concurrent login has
    /// just set: the changes are dropped. The creation time and new version of a stored change.
    async fn change(
        &self,
        id: &SessionId,
        fields: &Changes,
    ) -> Result<Option<(u64, u64)>, ProxyError> {
        if fields.is_empty() {
            return Ok(None);
        }
        match self
            .timed(
                StoreOp::Apply,
                self.store.apply(id, Target::Existing, fields),
            )
            .await?
        {
            Applied::Stored {
                created_ms,
                version,
            } => Ok(Some((created_ms, version))),
            Applied::Rejected(r) => Err(r.into()),
            Applied::Gone => {
                self.metrics.event(Event::Dropped);
                in_request(|| {
                    tracing::warn!(
                        "session ended while the request was in flight; its changes were dropped"
                    )
                });
                Ok(None)
            }
        }
    }

    /// A Set or an Incr without a session starts one; anything else leaves `otherwise`.
    async fn create_if_written(
        &self,
        fields: &Changes,
        otherwise: CookieAction,
    ) -> Result<CookieAction, ProxyError> {
        if fields.writes_fields() {
            self.create(fields, None).await
        } else {
            Ok(otherwise)
        }
    }

    /// Writes a new session under a fresh id: `base` (a rotated session's fields) with `fields`
    /// applied.
    async fn create(
        &self,
        fields: &Changes,
        base: Option<&Session>,
    ) -> Result<CookieAction, ProxyError> {
        let id = SessionId::generate();
        let target = Target::New { base };
        match self
            .timed(StoreOp::Apply, self.store.apply(&id, target, fields))
            .await?
        {
            Applied::Stored {
                created_ms,
                version,
            } => {
                self.metrics.event(if base.is_some() {
                    Event::Rotated
                } else {
                    Event::Created
                });
                Ok(CookieAction::Set {
                    id,
                    created_ms,
                    version,
                    rotated: base.is_some(),
                })
            }
            // A rotated session past its absolute timeout: nothing to carry on.
            Applied::Gone => Ok(CookieAction::Keep),
            Applied::Rejected(r) => Err(r.into()),
        }
    }

    /// A rotation took the old session (or may have) but could not write the new one: the take's
    /// tombstone, which still holds the fields, becomes the session again, so that a failed login
    /// does not also log the user out.
    async fn put_back(&self, old: &SessionId) {
        match self.timed(StoreOp::Apply, self.store.restore(old)).await {
            Ok(Applied::Stored { .. }) => {
                in_request(|| {
                    tracing::warn!("rotation failed; the session stays under its old id")
                });
            }
            Ok(other) => in_request(
                || tracing::error!(outcome = ?other, "rotation failed and the session could not be put back"),
            ),
            Err(e) => in_request(
                || tracing::error!(error = %e, "rotation failed and the session could not be put back"),
            ),
        }
    }

    /// The changes of a request whose cookie's session was rotated away moments ago, typically
    /// one of a page's requests still in flight during a login. They are dropped, and no cookie is
    /// set: a new session's cookie would replace the one the rotation set, and the login with it.
    /// A Destroy still clears the cookie.
    fn drop_after_rotation(&self, changes: &Changes) -> CookieAction {
        if changes.rotate || !changes.field_changes().is_empty() {
            self.metrics.event(Event::Dropped);
            in_request(|| {
                tracing::warn!("request carried the cookie of a session rotated meanwhile; its changes were dropped")
            });
        }
        if changes.destroy {
            CookieAction::Clear
        } else {
            CookieAction::Keep
        }
    }

    async fn timed<T>(
        &self,
        op: StoreOp,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = call.await;
        self.metrics.store(op, started.elapsed());
        result
    }

    /// Points the request at the backend.
    fn set_target(&self, req: &mut Request<Incoming>) -> Result<(), ProxyError> {
        // The path shares the request head's buffer: no copy.
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let original_authority = req.uri().authority().cloned();
        let mut target = uri::Parts::default();
        target.scheme = Some(Scheme::HTTP);
        target.authority = Some(self.upstream.authority.clone());
        target.path_and_query = Some(path);
        *req.uri_mut() =
            Uri::from_parts(target).map_err(|_| ProxyError::BadRequest(BadRequest::Target))?;
        *req.version_mut() = Version::HTTP_11;
        let headers = req.headers_mut();
        // HTTP/2 requests carry the host in the URI; the backend gets it as `Host`.
        if !headers.contains_key(header::HOST) {
            if let Some(a) = original_authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                headers.insert(header::HOST, a);
            }
        }
        Ok(())
    }

    /// Adds the forwarding headers of a request from `peer`.
    fn forwarding_headers(&self, headers: &mut HeaderMap, peer: SocketAddr) {
        // Earlier hops may have sent several headers: keep them all, in order, then this peer.
        // Written in one buffer of the exact size, and given to the header without a copy (one
        // allocation in all).
        let ip = PeerIp::of(peer);
        let earlier = || {
            headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter(|v| v.to_str().is_ok())
        };
        let len = earlier().map(|v| v.len() + 2).sum::<usize>() + ip.as_bytes().len();
        let mut xff = Vec::with_capacity(len);
        for v in earlier() {
            xff.extend_from_slice(v.as_bytes());
            xff.extend_from_slice(b", ");
        }
        xff.extend_from_slice(ip.as_bytes());
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        // A load balancer in front (an ELB) already says how the client connected: keep its word.
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(
                X_FORWARDED_PROTO.clone(),
                HeaderValue::from_static(self.proto()),
            );
        }
        if !headers.contains_key(&X_FORWARDED_HOST) {
            if let Some(host) = headers.get(header::HOST).cloned() {
                headers.insert(X_FORWARDED_HOST.clone(), host);
            }
        }
    }

    /// How clients connect to this proxy, for `X-Forwarded-Proto`.
    fn proto(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// The direct path's request head for the backend: the request line and `parts`' headers
    /// (as [`Proxy::backend_headers`] left them with `wire`), then as lines: a live session's
    /// status and `fields`, the forwarding headers as [`Proxy::forwarding_headers`] sets them,
    /// and the request id.
    fn write_backend_head(
        &self,
        out: &mut Vec<u8>,
        parts: &mut http::request::Parts,
        fields: Option<&[u8]>,
        (ip, id): (&PeerIp, &RequestId),
    ) {
        let headers = &mut parts.headers;
        let earlier: Vec<HeaderValue> = match headers.entry(&X_FORWARDED_FOR) {
            header::Entry::Occupied(e) => e
                .remove_entry_mult()
                .1
                .filter(|v| v.to_str().is_ok())
                .collect(),
            header::Entry::Vacant(_) => Vec::new(),
        };
        let proto = !headers.contains_key(&X_FORWARDED_PROTO);
        let host = match headers.contains_key(&X_FORWARDED_HOST) {
            true => None,
            false => headers.get(header::HOST).cloned(),
        };
        // Replaced: the backend gets the one id that is logged.
        headers.remove(&X_REQUEST_ID);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        h1::write_request_start(out, (&parts.method, path), headers);
        if let Some(fields) = fields {
            self.protocol.write_active(out);
            out.extend_from_slice(fields);
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        for v in &earlier {
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(ip.as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut line = |name: &[u8], value: &[u8]| {
            out.extend_from_slice(name);
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        if proto {
            line(b"x-forwarded-proto: ", self.proto().as_bytes());
        }
        if let Some(host) = &host {
            line(b"x-forwarded-host: ", host.as_bytes());
        }
        line(b"x-request-id: ", id.header_value().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// A client's address as `X-Forwarded-For` gives it, written once (a connection carries many
/// requests from the one address).
pub(crate) struct PeerIp {
    buf: [u8; 48],
    len: usize,
}

impl PeerIp {
    pub(crate) fn of(peer: SocketAddr) -> Self {
        let mut buf = [0u8; 48];
        let len = {
            let mut at = &mut buf[..];
            // 48 bytes hold the longest IPv6 address.
            let _ = write!(at, "{}", peer.ip());
            48 - at.len()
        };
        PeerIp { buf, len }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Checks `Host` as RFC 9112 section 3.2 asks: exactly one in an HTTP/1.1 request, never two.
fn check_host<B>(req: &Request<B>) -> Result<(), BadRequest> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => Err(BadRequest::SeveralHosts),
        (None, _) if req.version() == Version::HTTP_11 => Err(BadRequest::MissingHost),
        _ => Ok(()),
    }
}

/// The backend's request, ready to send.
struct Prepared {
    req: Request<UpstreamBody>,
    /// What it takes to send it again, when that is safe.
    replay: Option<Replay>,
    /// Set when the client's body fails on the way.
    client_failed: Arc<AtomicBool>,
}

/// The head of an idempotent request without a body, kept to send it again.
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Replay {
    fn of<B: Body>(req: &Request<B>) -> Option<Self> {
        let idempotent = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        (idempotent && req.body().is_end_stream()).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
        })
    }

    fn into_request(self) -> Request<UpstreamBody> {
        let mut req = Request::new(Either::Right(Empty::new()));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.headers_mut() = self.headers;
        req
    }
}

/// A client's request to switch protocols (WebSocket and the like): the one place that follows
/// an upgrade from the request to the backend's `101`.
struct Upgrade {
    protocol: HeaderValue,
    client: OnUpgrade,
}

impl Upgrade {
    /// Takes the client's side of an upgrade the request asks for.
    fn requested(req: &mut Request<Incoming>) -> Option<Self> {
        let protocol = hop::requested_upgrade(req.version(), req.headers())?;
        Some(Upgrade {
            protocol,
            client: hyper::upgrade::on(req),
        })
    }

    /// The two ends of the tunnel when the backend switched protocols as asked; nothing when it
    /// did not switch. `backend_protocol` is the backend's `Upgrade` header.
    fn accept(
        requested: Option<Upgrade>,
        backend_protocol: Option<HeaderValue>,
        resp: &mut Response<Incoming>,
    ) -> Result<Option<(OnUpgrade, OnUpgrade)>, ProxyError> {
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(None);
        }
        match (requested, backend_protocol) {
            (Some(upgrade), Some(protocol)) => {
                hop::mark_upgrade(resp.headers_mut(), protocol);
                Ok(Some((upgrade.client, hyper::upgrade::on(resp))))
            }
            _ => Err(ProxyError::UnexpectedUpgrade),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_a_status() {
        let timeout = ProxyError::UpstreamTimeout(Duration::from_secs(1)).into_response(false);
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(!timeout.headers().contains_key(header::CONNECTION));
        let store =
            ProxyError::Store(StoreError::Timeout(Duration::from_secs(1))).into_response(true);
        assert_eq!(store.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(store.headers()[header::RETRY_AFTER], "1");
        assert_eq!(store.headers()[header::CONNECTION], "close");
        let open = ProxyError::Store(StoreError::CircuitOpen).into_response(false);
        assert_eq!(open.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(open.headers()[header::RETRY_AFTER], "1");
        let protocol = ProxyError::Protocol(ProtocolError::BadFlag { header: "x".into() })
            .into_response(false);
        assert_eq!(protocol.status(), StatusCode::BAD_GATEWAY);
        let rejected = ProxyError::Rejected(Rejection::TooManyFields { count: 2, max: 1 })
            .into_response(false);
        assert_eq!(rejected.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            ProxyError::UnexpectedUpgrade.into_response(false).status(),
            StatusCode::BAD_GATEWAY
        );
        for bad in [
            BadRequest::MissingHost,
            BadRequest::SeveralHosts,
            BadRequest::Target,
        ] {
            assert_eq!(
                ProxyError::BadRequest(bad).into_response(false).status(),
                StatusCode::BAD_REQUEST
            );
        }
    }

    #[test]
    fn host_rules() {
        let req = |version, hosts: &[&str]| {
            let mut b = Request::builder().version(version).uri("/");
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).unwrap()
        };
        assert_eq!(check_host(&req(Version::HTTP_11, &["a"])), Ok(()));
        assert_eq!(
            check_host(&req(Version::HTTP_11, &[])),
            Err(BadRequest::MissingHost)
        );
        assert_eq!(
            check_host(&req(Version::HTTP_11, &["a", "b"])),
            Err(BadRequest::SeveralHosts)
        );
        assert_eq!(check_host(&req(Version::HTTP_10, &[])), Ok(()));
        assert_eq!(check_host(&req(Version::HTTP_2, &[])), Ok(()));
        assert_eq!(
            check_host(&req(Version::HTTP_2, &["a", "a"])),
            Err(BadRequest::SeveralHosts)
        );
    }

    #[test]
    fn only_idempotent_requests_without_a_body_are_replayed() {
        let req = |m: Method, body: &'static str| {
            Request::builder()
                .method(m)
                .uri("/")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap()
        };
        assert!(Replay::of(&req(Method::GET, "")).is_some());
        assert!(Replay::of(&req(Method::HEAD, "")).is_some());
        assert!(Replay::of(&req(Method::OPTIONS, "")).is_some());
        assert!(Replay::of(&req(Method::GET, "x")).is_none());
        assert!(Replay::of(&req(Method::POST, "")).is_none());
        assert!(Replay::of(&req(Method::DELETE, "")).is_none());
    }
}
