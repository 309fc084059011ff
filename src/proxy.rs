//! The request path: resolve the cookie, load the session, strip and inject headers, forward,
//! read the backend's changes, store them, set or clear the cookie, answer.
//!
//! Bodies stream through in both directions; only headers are touched. Every failure becomes a
//! [`ProxyError`], and [`ProxyError::into_response`] is the one place that turns failures into
//! status codes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::body::{IdleTimeout, StripTrailers};
use crate::config::{Config, TtlPolicy, Upstream};
use crate::cookie::{split_cookies, CookieWriter, SessionId, SigningKeys};
use crate::metrics::{Event, Lookup, Metrics, StoreOp};
use crate::protocol::{apply_to_fields, Changes, Protocol, ProtocolError, Rejection};
use crate::store::{now_ms, Applied, Session, SessionStore, StoreError, Target};
use crate::tunnel;

/// The body of every response stickless sends: the backend's, streamed (and cut off if the
/// backend goes silent for the upstream timeout), or its own short text.
pub type ProxyBody = Either<IdleTimeout<StripTrailers<Incoming>>, Full<Bytes>>;

/// How long clients are asked to wait before retrying when the store is unavailable.
const RETRY_AFTER_SECS: HeaderValue = HeaderValue::from_static("1");

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Why a request could not be served normally.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The session store failed or timed out.
    #[error("session store unavailable")]
    Store(#[from] StoreError),
    /// The backend could not be reached.
    #[error("backend unreachable")]
    UpstreamConnect(#[source] hyper_util::client::legacy::Error),
    /// The backend failed while answering.
    #[error("backend failed")]
    Upstream(#[source] hyper_util::client::legacy::Error),
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
    /// The request cannot be forwarded.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
}

impl ProxyError {
    /// The response for this error: a status and a short plain-text body, never a detail that
    /// could leak session data.
    pub fn into_response(self) -> Response<ProxyBody> {
        let (status, text) = match &self {
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
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad request\n"),
        };
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
            text.as_bytes(),
        ))));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, RETRY_AFTER_SECS);
        }
        resp
    }
}

/// What to do with the session cookie in the response.
#[derive(Debug)]
enum CookieAction {
    Keep,
    Set { id: SessionId, created_ms: u64 },
    Clear,
}

/// Everything the request path needs, shared by all connections.
pub struct Proxy {
    store: Arc<dyn SessionStore>,
    keys: SigningKeys,
    cookies: CookieWriter,
    protocol: Arc<Protocol>,
    ttl: TtlPolicy,
    upstream: Upstream,
    upstream_timeout: Duration,
    client: Client<HttpConnector, StripTrailers<Incoming>>,
    metrics: Metrics,
}

impl Proxy {
    /// A proxy for `config` on `store`, recording into `metrics`.
    pub fn new(config: &Config, store: Arc<dyn SessionStore>, metrics: Metrics) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.upstream_timeout.min(Duration::from_secs(5))));
        // The backend's response is read at the client's pace, one buffer at a time, and the
        // buffer is capped (hyper's default is ~400 KiB) so that a slow client, or an idle
        // pooled connection, pins little memory. The cap is also the largest response head the
        // backend may send: room for a whole session's changes escaped (three bytes a byte at
        // worst) plus its other headers, and never less than the 64 KiB clients get.
        let response_head_limit =
            (config.protocol.max_session_bytes.saturating_mul(3) + 16 * 1024).max(64 * 1024);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .http1_max_buf_size(response_head_limit)
            .build(connector);
        Proxy {
            store,
            keys: config.keys.clone(),
            cookies: CookieWriter::new(config.cookie.clone()),
            protocol: Arc::new(Protocol::new(config.protocol.clone())),
            ttl: config.ttl,
            upstream: config.upstream.clone(),
            upstream_timeout: config.upstream_timeout,
            client,
            metrics,
        }
    }

    /// Serves one request from `peer`. Never fails: errors become responses.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let start = Instant::now();
        let resp = match self.serve(req, peer).await {
            Ok(resp) => resp,
            Err(e) => {
                match &e {
                    ProxyError::Protocol(reason) => {
                        self.metrics.event(Event::ProtocolError);
                        tracing::warn!(%reason, "backend response broke the session protocol; nothing stored");
                    }
                    ProxyError::Rejected(reason) => {
                        self.metrics.event(Event::ProtocolError);
                        tracing::warn!(%reason, "backend's session changes refused; nothing stored");
                    }
                    other => {
                        tracing::warn!(error = %other, source = ?std::error::Error::source(other), "request failed")
                    }
                }
                e.into_response()
            }
        };
        self.metrics
            .request(resp.status().as_u16(), start.elapsed());
        resp
    }

    async fn serve(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let https = req
            .headers()
            .get(&X_FORWARDED_PROTO)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));

        // A WebSocket (or other) upgrade keeps its two hop-by-hop headers across this hop.
        let upgrade = tunnel::requested_upgrade(req.version(), req.headers())
            .map(|protocol| (protocol, hyper::upgrade::on(&mut req)));

        // The client's hop-by-hop headers go first: a `Connection` header naming a header could
        // otherwise remove one that stickless injects below.
        remove_hop_by_hop(req.headers_mut());

        // 1. Resolve the cookie and load the session.
        let session = self.resolve(req.headers_mut()).await?;

        // 2. Strip what the client sent in the protocol's name (headers and, as the body streams,
        // trailers), then inject the real session.
        let stripped = self.protocol.strip(req.headers_mut());
        if stripped > 0 {
            self.metrics.spoofed_headers.inc_by(stripped as u64);
            tracing::warn!(count = stripped, %peer, "removed client headers that used the session header prefix");
        }
        self.protocol
            .inject(req.headers_mut(), session.as_ref().map(|(_, s)| &s.fields));

        // 3. Forward.
        self.prepare_upstream_request(&mut req, peer)?;
        if let Some((protocol, _)) = &upgrade {
            tunnel::mark_upgrade(req.headers_mut(), protocol.clone());
        }
        let protocol = self.protocol.clone();
        let req = req.map(|body| StripTrailers::new(body, protocol));
        let started = Instant::now();
        let sent = tokio::time::timeout(self.upstream_timeout, self.client.request(req)).await;
        self.metrics.upstream(started.elapsed());
        let mut resp = match sent {
            Err(_) => {
                self.metrics.upstream_error("timeout");
                return Err(ProxyError::UpstreamTimeout(self.upstream_timeout));
            }
            Ok(Err(e)) if e.is_connect() => {
                self.metrics.upstream_error("connect");
                return Err(ProxyError::UpstreamConnect(e));
            }
            Ok(Err(e)) => {
                self.metrics.upstream_error("response");
                return Err(ProxyError::Upstream(e));
            }
            Ok(Ok(resp)) => resp,
        };

        // 4. Read the backend's changes (all protocol headers are removed), store them.
        let changes = self.protocol.take_changes(resp.headers_mut())?;
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let backend_protocol = resp.headers().get(header::UPGRADE).cloned();
        remove_hop_by_hop(resp.headers_mut());
        let tunnel = match (switching, upgrade, backend_protocol) {
            (false, _, _) => None,
            (true, Some((_, client)), Some(protocol)) => {
                tunnel::mark_upgrade(resp.headers_mut(), protocol);
                Some((client, hyper::upgrade::on(&mut resp)))
            }
            (true, _, _) => return Err(ProxyError::UnexpectedUpgrade),
        };
        let action = if changes.is_empty() {
            CookieAction::Keep
        } else {
            self.store_changes(session, &changes).await?
        };

        // 5. Set or clear the cookie beside the backend's own cookies, and answer.
        if !matches!(action, CookieAction::Keep) {
            // A response that sets a session cookie must never be cached and served to another user.
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        match action {
            CookieAction::Keep => {}
            CookieAction::Set { id, created_ms } => {
                let max_age = self.ttl.absolute.map(|abs| {
                    let end = created_ms + abs.as_millis() as u64;
                    end.saturating_sub(now_ms()).div_ceil(1000)
                });
                let value = self.cookies.set(&self.keys.sign(&id), max_age, https);
                resp.headers_mut().append(header::SET_COOKIE, value);
            }
            CookieAction::Clear => {
                resp.headers_mut()
                    .append(header::SET_COOKIE, self.cookies.clear(https));
            }
        }
        if let Some((client, backend)) = tunnel {
            // The changes are stored and the cookie set before the protocol switches.
            tokio::spawn(tunnel::run(client, backend, self.upstream_timeout));
        }
        let (idle, protocol) = (self.upstream_timeout, self.protocol.clone());
        Ok(resp
            .map(|body| Either::Left(IdleTimeout::new(StripTrailers::new(body, protocol), idle))))
    }

    /// Takes the session cookie out of the request and loads its session. A missing, malformed or
    /// forged cookie means no session; only a store failure is an error.
    async fn resolve(
        &self,
        headers: &mut HeaderMap,
    ) -> Result<Option<(SessionId, Session)>, ProxyError> {
        if !headers.contains_key(header::COOKIE) {
            self.metrics.lookup(Lookup::Miss);
            return Ok(None);
        }
        let cookies = split_cookies(headers.get_all(header::COOKIE).iter(), self.cookies.name());
        headers.remove(header::COOKIE);
        if let Some(rest) = cookies.rest {
            headers.insert(header::COOKIE, rest);
        }
        if cookies.session_values.is_empty() {
            self.metrics.lookup(Lookup::Miss);
            return Ok(None);
        }
        // Several cookies of one name can arrive (different paths or domains): the first that
        // verifies wins.
        let Some(id) = cookies
            .session_values
            .iter()
            .find_map(|v| self.keys.verify(v))
        else {
            self.metrics.lookup(Lookup::Invalid);
            tracing::warn!("session cookie failed verification; treated as no session");
            return Ok(None);
        };
        match self.timed(StoreOp::Load, self.store.load(&id)).await {
            Ok(Some(session)) => {
                self.metrics.lookup(Lookup::Hit);
                Ok(Some((id, session)))
            }
            Ok(None) => {
                self.metrics.lookup(Lookup::Miss);
                Ok(None)
            }
            Err(e) => {
                self.metrics.lookup(Lookup::Error);
                Err(e.into())
            }
        }
    }

    /// Applies the backend's changes in the documented order: Destroy, Rotate, Delete, Set, Incr.
    async fn store_changes(
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

        let mut current = session.map(|(id, _)| id);
        let mut action = CookieAction::Keep;
        if changes.destroy {
            if let Some(id) = current.take() {
                self.timed(StoreOp::Destroy, self.store.destroy(&id))
                    .await?;
                self.metrics.event(Event::Destroyed);
            }
            action = CookieAction::Clear;
        }
        // The old id and its fields, once a rotation has taken them.
        let mut moved: Option<(SessionId, Session)> = None;
        if changes.rotate {
            if let Some(old) = current.take() {
                if let Some(taken) = self.timed(StoreOp::Take, self.store.take(&old)).await? {
                    moved = Some((old, taken));
                }
            }
        }
        if let Some(id) = current {
            if fields.is_empty() {
                return Ok(action);
            }
            match self
                .timed(
                    StoreOp::Apply,
                    self.store.apply(&id, Target::Existing, &fields),
                )
                .await?
            {
                Applied::Stored { .. } => return Ok(action),
                Applied::Rejected(r) => return Err(r.into()),
                // Expired, destroyed or rotated by a concurrent request while the backend worked:
                // never brought back, and no new session either, whose cookie would replace the
                // one a concurrent login has just set.
                Applied::Gone => {
                    self.metrics.event(Event::Dropped);
                    tracing::warn!(
                        "session ended while the request was in flight; its changes were dropped"
                    );
                    return Ok(action);
                }
            }
        }
        if moved.is_none() && !fields.writes_fields() {
            return Ok(action);
        }
        let id = SessionId::generate();
        let target = Target::New {
            base: moved.as_ref().map(|(_, s)| s),
        };
        match self
            .timed(StoreOp::Apply, self.store.apply(&id, target, &fields))
            .await
        {
            Ok(Applied::Stored { created_ms }) => {
                self.metrics.event(if moved.is_some() {
                    Event::Rotated
                } else {
                    Event::Created
                });
                Ok(CookieAction::Set { id, created_ms })
            }
            Ok(Applied::Gone) => Ok(action),
            Ok(Applied::Rejected(r)) => {
                self.put_back(moved).await;
                Err(r.into())
            }
            Err(e) => {
                self.put_back(moved).await;
                Err(e.into())
            }
        }
    }

    /// A rotation took the old session but could not write the new one: the fields go back under
    /// the old id, so that a failed login does not also log the user out.
    async fn put_back(&self, moved: Option<(SessionId, Session)>) {
        let Some((old, base)) = moved else { return };
        let target = Target::New { base: Some(&base) };
        match self
            .timed(
                StoreOp::Apply,
                self.store.apply(&old, target, &Changes::default()),
            )
            .await
        {
            Ok(Applied::Stored { .. }) => {
                tracing::warn!("rotation failed; the session stays under its old id");
            }
            Ok(other) => {
                tracing::error!(outcome = ?other, "rotation failed and the session could not be put back")
            }
            Err(e) => {
                tracing::error!(error = %e, "rotation failed and the session could not be put back")
            }
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

    fn prepare_upstream_request(
        &self,
        req: &mut Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<(), ProxyError> {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let original_authority = req.uri().authority().cloned();
        *req.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(self.upstream.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|_| ProxyError::BadRequest("unusable request target"))?;
        *req.version_mut() = Version::HTTP_11;
        let headers = req.headers_mut();
        // HTTP/2 requests carry the host in the URI; the backend gets it as `Host`.
        if !headers.contains_key(header::HOST) {
            if let Some(a) = original_authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                headers.insert(header::HOST, a);
            }
        }
        let ip = peer.ip().to_string();
        // Earlier hops may have sent several headers: keep them all, in order, then this peer.
        let mut xff: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        xff.push(&ip);
        let xff = xff.join(", ");
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        // A load balancer in front (an ELB) already says how the client connected: keep its word.
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        }
        if !headers.contains_key(&X_FORWARDED_HOST) {
            if let Some(host) = headers.get(header::HOST).cloned() {
                headers.insert(X_FORWARDED_HOST.clone(), host);
            }
        }
        Ok(())
    }
}

/// The comma-separated tokens of every `Connection` header, trimmed.
pub(crate) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
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
    let named: Vec<HeaderName> = connection_tokens(headers)
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
    fn every_error_maps_to_a_status() {
        let timeout = ProxyError::UpstreamTimeout(Duration::from_secs(1)).into_response();
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        let store = ProxyError::Store(StoreError::Timeout(Duration::from_secs(1))).into_response();
        assert_eq!(store.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(store.headers()[header::RETRY_AFTER], "1");
        let protocol =
            ProxyError::Protocol(ProtocolError::BadFlag { header: "x".into() }).into_response();
        assert_eq!(protocol.status(), StatusCode::BAD_GATEWAY);
        let rejected =
            ProxyError::Rejected(Rejection::TooManyFields { count: 2, max: 1 }).into_response();
        assert_eq!(rejected.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            ProxyError::BadRequest("x").into_response().status(),
            StatusCode::BAD_REQUEST
        );
    }
}
