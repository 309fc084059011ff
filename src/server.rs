//! Listeners and their accept loops: the proxy and the admin endpoint, served by hyper (HTTP/1.1
//! and h2c from clients, or both over TLS on the proxy's listener when it has a certificate) until they are told to stop, then drained as [`crate::shutdown`]
//! describes: connections are asked to close as their responses end while the listener still
//! accepts, then the listener closes and what is in flight (upgraded tunnels included) gets the
//! shutdown timeout to finish.
//!
//! Each listener holds its connections to [`ConnLimits`]: a cap on how many are open (at the cap
//! the listener stops accepting, so the rest wait in the kernel's backlog instead of using a file
//! descriptor each), a deadline from accept to the first complete request head (the TLS
//! handshake included), and an idle
//! timeout once requests are done. The admin listener has its own small cap, so `/healthz` and
//! `/metrics` keep answering while the proxy's listener is full.
//!
//! A plain HTTP/1.1 connection is served by the proxy's direct path (`Proxy::serve_direct`) for
//! as long as its requests have no body, and by hyper from the first one that the direct path
//! does not serve; a connection that has been idle for a second is taken back from either and
//! waits for its next request without buffers (see `serve_plain`): what an idle keep-alive
//! connection holds is then about its socket.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tracing::Instrument;

use crate::admin::Admin;
use crate::config::{Config, StoreConfig};
use crate::log_limit::LogLimit;
use crate::metrics::{Listener, Metrics};
use crate::notify;
use crate::proxy::{DirectLimits, Ended, Proxy};
use crate::shutdown::{self, Drain, Phase, Shutdown};
use crate::store::breaker::Breaker;
use crate::store::memory::MemoryStore;
use crate::store::redis::{RedisSettings, RedisSetupError, RedisStore};
use crate::store::SessionStore;
use crate::tls::Tls;

/// Time in-flight requests get to finish once [`serve_http`]'s shutdown completes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Time an idle connection gets to close by itself once asked to (h2's GOAWAY exchange).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted; larger ones are answered 431 by hyper.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// h2 flow control and buffering per connection (see where they are set).
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
const H2_MAX_SEND_BUF: usize = 64 * 1024;
const H2_MAX_STREAMS: u32 = 128;
/// Most connections open at once on the admin listener: enough for scrapers and health checks,
/// few enough that it can never take the descriptors the proxy needs.
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// First and longest pause after a failed `accept` (out of file descriptors, for one): the pause
/// doubles from the first to the longest while accepts keep failing, so the loop neither spins
/// nor stays asleep long once descriptors are free again.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));
/// Shortest time between two "connection limit reached" warnings, so that a listener held at
/// its cap logs once in a while instead of once per connection.
const LIMIT_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// How long a plain HTTP/1 connection stays idle (every request answered) before it is taken back
/// from hyper, which frees hyper's buffers (16 KiB) until its next request. Not at once: a new
/// hyper connection per request costs about 2 us of CPU per request under load, while a
/// connection idle for this long is asked little enough that the cost does not count (and the
/// check runs on the connection's one timer, once per this interval at most).
const IDLE_AFTER: Duration = Duration::from_secs(1);

/// Most response body bytes an HTTP/1 connection hands to hyper ahead of what the client's socket
/// has taken: a client that reads slowly holds at most this much (plus one chunk) in the proxy,
/// however large hyper's own write queue may grow.
const MAX_UNSENT_BYTES: u64 = 8 * 1024;

/// Bounds on the client connections of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Most connections open at once; at the cap the listener stops accepting.
    pub max_connections: usize,
    /// Time from accept to a complete first request head (the TLS handshake and h2's preface
    /// included); past it the connection is closed. hyper's own header timeout only starts once
    /// the first byte has arrived, so a connection that never sends one would otherwise be held
    /// for ever.
    pub header_read_timeout: Duration,
    /// Time a connection stays open without a request in flight once it has served one:
    /// HTTP/1.1 keep-alive, and h2 with no open stream (hyper keeps those open for as long as the
    /// client answers pings). Also how long an HTTP/1 response may wait on a client that has
    /// stopped reading it (looked at when the connection's timer fires: up to twice this).
    pub keep_alive_timeout: Duration,
}

impl Default for ConnLimits {
    /// The flags' defaults. The keep-alive timeout is longer than an ELB's default idle timeout
    /// (60 s): a proxy that closes idle connections before the load balancer does makes the load
    /// balancer answer 502 now and then.
    fn default() -> Self {
        ConnLimits {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(75),
        }
    }
}

impl ConnLimits {
    /// The proxy listener's limits from the configuration.
    pub fn proxy(config: &Config) -> Self {
        ConnLimits {
            max_connections: config.connection_cap(),
            header_read_timeout: config.header_read_timeout,
            keep_alive_timeout: config.keep_alive_timeout,
        }
    }

    /// The admin listener's limits: the same timeouts, its own small cap.
    pub fn admin(config: &Config) -> Self {
        ConnLimits {
            max_connections: ADMIN_MAX_CONNECTIONS,
            ..Self::proxy(config)
        }
    }
}

/// Builds the store the configuration asks for: Redis behind a circuit breaker, or the embedded
/// store (which cannot be down, so it needs none).
///
/// # Errors
/// [`RedisSetupError`] for an unusable Redis URL.
pub async fn build_store(config: &Config) -> Result<Arc<dyn SessionStore>, RedisSetupError> {
    Ok(match &config.store {
        StoreConfig::Memory => Arc::new(MemoryStore::new(config.ttl, config.protocol.clone())),
        StoreConfig::Redis {
            url,
            key_prefix,
            timeout,
            durability,
            iam,
            local_cache,
            local_cache_bytes,
            read_from,
        } => {
            let redis = RedisStore::connect(RedisSettings {
                url: url.clone(),
                key_prefix: key_prefix.clone(),
                timeout: *timeout,
                ttl: config.ttl,
                limits: config.protocol.clone(),
                durability: *durability,
                iam: iam.clone(),
                local_cache: *local_cache,
                local_cache_bytes: *local_cache_bytes,
                read_from: *read_from,
            })
            .await?;
            Arc::new(Breaker::new(Arc::new(redis), config.breaker))
        }
    })
}

/// Runs the proxy on `listener` and the admin endpoint on `admin_listener` until `shutdown` is
/// requested, then drains for `config.drain_delay` and lets what is in flight finish within
/// `config.shutdown_timeout`. Tells systemd `READY=1` once the store answers (the listeners are
/// bound already), and `STOPPING=1` as the drain begins.
///
/// `workers` are more listening sockets on the proxy's port (bound with `SO_REUSEPORT`, so that
/// the kernel spreads connections over them): each is served by its own thread on a
/// single-threaded runtime, with its own [`Proxy`] (and so its own backend connections), under
/// the same connection cap, drain and metrics as `listener`.
pub async fn serve_proxy(
    config: Config,
    store: Arc<dyn SessionStore>,
    listener: TcpListener,
    workers: Vec<std::net::TcpListener>,
    tls: Option<Arc<Tls>>,
    admin_listener: TcpListener,
    shutdown: Shutdown,
) {
    let metrics = Metrics::new();
    let proxy_limits = ConnLimits::proxy(&config);
    let admin_limits = ConnLimits::admin(&config);
    let proxy_open = metrics.open_connections(Listener::Proxy);
    let admin_open = metrics.open_connections(Listener::Admin);
    let (control, drain) = Drain::new();
    let proxy = Arc::new(Proxy::new(&config, store.clone(), metrics.clone()));
    // One cap for the port, whichever thread accepted the connection.
    let slots = Arc::new(Semaphore::new(proxy_limits.max_connections));
    let mut workers_done = Vec::with_capacity(workers.len());
    for (i, worker) in workers.into_iter().enumerate() {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let (config, store, metrics) = (config.clone(), store.clone(), metrics.clone());
        let (tls, open, drain, slots) = (
            tls.clone(),
            proxy_open.clone(),
            drain.clone(),
            slots.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("stickless-worker-{}", i + 1))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a worker's runtime; its listener is closed");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(worker) {
                        Ok(listener) => listener,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot serve a worker's listener; it is closed");
                            return;
                        }
                    };
                    let proxy = Arc::new(Proxy::new(&config, store, metrics));
                    serve_http_shared(
                        listener,
                        (tls, Some(proxy.clone())),
                        proxy_limits,
                        (slots, true),
                        Some(open),
                        move |req, peer| {
                            let proxy = proxy.clone();
                            async move { proxy.handle(req, peer).await }
                        },
                        drain,
                    )
                    .await;
                });
                drop(done_tx);
            });
        match spawned {
            Ok(_) => workers_done.push(done_rx),
            Err(e) => {
                tracing::error!(error = %e, "cannot start a worker thread; its listener is closed")
            }
        }
    }
    let admin = Arc::new(Admin::new(store.clone(), metrics, drain.clone()));
    let ready = tokio::spawn(notify::ready_when_store_answers(store, drain.clone()));
    let stop = tokio::spawn(shutdown::run(
        shutdown,
        control,
        config.drain_delay,
        config.shutdown_timeout,
        notify::phase,
    ));
    let proxy_server = serve_http_shared(
        listener,
        (tls, Some(proxy.clone())),
        proxy_limits,
        (slots, !workers_done.is_empty()),
        Some(proxy_open),
        move |req, peer| {
            let proxy = proxy.clone();
            async move { proxy.handle(req, peer).await }
        },
        drain.clone(),
    );
    let admin_server = serve_http_with(
        admin_listener,
        None,
        admin_limits,
        Some(admin_open),
        move |req, _| {
            let admin = admin.clone();
            async move { admin.handle(req).await }
        },
        drain,
    );
    tokio::join!(proxy_server, admin_server);
    for done in workers_done {
        // An error is the worker's end: its sender dropped.
        let _ = done.await;
    }
    ready.abort();
    stop.abort();
}

/// Accepts connections on `listener` and serves each with `handler` until `shutdown` completes,
/// with the default [`ConnLimits`].
pub async fn serve_http<F, Fut, B>(
    listener: TcpListener,
    handler: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (control, drain) = Drain::new();
    let server = serve_http_with(listener, None, ConnLimits::default(), None, handler, drain);
    tokio::pin!(server);
    let stop = async {
        shutdown.await;
        control.enter(Phase::Closing);
        tokio::time::sleep(DRAIN_TIMEOUT).await;
        control.enter(Phase::Cut);
    };
    tokio::select! {
        () = &mut server => return,
        () = stop => {}
    }
    server.await;
}

/// Accepts connections on `listener` within `limits` and serves each with `handler`, following
/// `drain`: from [`Phase::Draining`] connections close as their responses end (HTTP/1 responses
/// say `Connection: close`, h2 connections get a GOAWAY) while the listener still accepts; at
/// [`Phase::Closing`] the listener closes and this waits for every connection, upgraded ones
/// included, to end; at [`Phase::Cut`] it returns, and connections still open are dropped.
/// With `tls`, each connection starts with a TLS handshake, which holds a slot under the cap and
/// must end within `limits.header_read_timeout`. `open`, when given, follows the number of open
/// connections.
pub async fn serve_http_with<F, Fut, B>(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    limits: ConnLimits,
    open: Option<IntGauge>,
    handler: F,
    drain: Drain,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let plain = (tls, None);
    serve_http_shared(
        listener,
        plain,
        limits,
        (slots, false),
        open,
        handler,
        drain,
    )
    .await;
}

/// [`serve_http_with`] under a cap that may be shared with other listeners (`shared`): `slots`
/// holds `limits.max_connections` permits, one taken by each connection open on any of them.
/// Once closing, this waits until every connection under the cap has ended (or the cut). With
/// `direct`, plain HTTP/1.1 requests without a body go through the proxy's direct path (see
/// `serve_plain`).
#[allow(clippy::too_many_arguments)]
async fn serve_http_shared<F, Fut, B>(
    listener: TcpListener,
    (tls, direct): (Option<Arc<Tls>>, Option<Arc<Proxy>>),
    limits: ConnLimits,
    (slots, shared): (Arc<Semaphore>, bool),
    open: Option<IntGauge>,
    handler: F,
    mut drain: Drain,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Bounds the head of every later request on a kept-alive connection, and so also the
        // time between requests; the first one is bounded by `limits.header_read_timeout` below.
        .header_read_timeout(limits.keep_alive_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        // What one h2 connection may make stickless hold: a client uploads at most a stream
        // window per stream and a connection window in all before waiting for the backend to
        // take it, and each stream's download is buffered up to the send buffer before hyper
        // stops reading the backend (hyper's defaults: 1 MiB windows, ~400 KiB send buffers).
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_MAX_SEND_BUF)
        .max_concurrent_streams(H2_MAX_STREAMS);
    let builder = Arc::new(builder);
    // Plain connections that turn out to be HTTP/1 are served by hyper's HTTP/1 server alone, so
    // that an idle one can be taken back from it (see `serve_plain`). The same settings as the
    // auto builder's HTTP/1 side.
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.keep_alive_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        // The buffer's bound alone lets a larger head through when one read brings all of it
        // (the socket waited readable before hyper's first read).
        .max_header_size(MAX_HEADER_BYTES);
    let http1 = Arc::new(http1);
    // One permit per open connection: held by the socket itself, so also by an upgraded tunnel.
    // Under a shared cap, the connections of this listener are counted apart as well, so that
    // it waits for (and cuts, and reports) its own: the shared permits of another listener that
    // is waiting for all of them to come back are not this one's.
    let mine = if shared {
        Arc::new(Semaphore::new(limits.max_connections))
    } else {
        slots.clone()
    };
    // Told by this loop, once it has counted them, to the connections still open at the cut.
    let (cut_tx, cut_rx) = watch::channel(false);
    let mut backoff = ACCEPT_BACKOFF.0;
    // Reached over and over under a flood: warn at most every ten seconds.
    let limit_warnings = LogLimit::new(LIMIT_WARNING_INTERVAL.as_millis() as u64);
    let closing = {
        let mut drain = drain.clone();
        async move { drain.reached(Phase::Closing).await }
    };
    tokio::pin!(closing);
    loop {
        // Alone under its cap, a slot first, then the accept: at the cap, clients wait in the
        // kernel's backlog. Sharing the cap with other listeners, the accept first: a listener
        // waiting for a slot with no client would take the slot freed for a client waiting on
        // another listener. Each listener then holds at most one accepted client that waits for
        // a slot; the others wait in the kernel's backlog.
        let early = if shared {
            None
        } else {
            match slot(&slots, &limits, &limit_warnings, &mut closing).await {
                Some(permit) => Some(permit),
                None => break,
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff = ACCEPT_BACKOFF.0;
                    accepted
                }
                Err(e) => {
                    // Out of file descriptors and the like: the pending connection stays queued,
                    // so retrying at once would spin.
                    tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut closing => break,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                    continue;
                }
            },
            () = &mut closing => break,
        };
        let permit = match early {
            Some(permit) => permit,
            None => match slot(&slots, &limits, &limit_warnings, &mut closing).await {
                Some(permit) => permit,
                None => break,
            },
        };
        let _ = stream.set_nodelay(true);
        let accepted = Instant::now();
        // (Never refused: this listener holds no more connections than the cap.)
        let own = shared
            .then(|| mine.clone().try_acquire_owned().ok())
            .flatten();
        let stream = Counted::new(stream, (permit, own), open.clone());
        let (builder, http1, handler, drain, cut, direct) = (
            builder.clone(),
            http1.clone(),
            handler.clone(),
            drain.clone(),
            cut_rx.clone(),
            direct.clone(),
        );
        let span = tracing::debug_span!("conn", %peer);
        // Two tasks rather than one with a branch: a task's future is as large as its largest
        // state, and the TLS one (rustls' connection state, the handshake) is several times the
        // size of a plain connection's, which would otherwise pay for it too.
        match tls.clone() {
            None => {
                let serve = async move {
                    let http = (builder, http1, direct);
                    serve_plain(http, stream, handler, peer, limits, accepted, drain, cut).await;
                };
                tokio::spawn(serve.instrument(span));
            }
            Some(tls) => {
                let _ = (http1, direct);
                let serve = async move {
                    let deadline = accepted + limits.header_read_timeout;
                    let handshake = handshake(&tls, stream, deadline, drain.clone());
                    if let Some(stream) = handshake.await {
                        let io = TokioIo::new(stream);
                        serve_connection(builder, io, handler, peer, limits, accepted, drain, cut)
                            .await;
                    }
                };
                tokio::spawn(serve.instrument(span));
            }
        }
    }
    drop(listener);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let open_now = || limits.max_connections - mine.available_permits();
    if open_now() > 0 {
        tracing::info!(
            open = open_now(),
            "listener closed; waiting for the connections still open"
        );
    }
    tokio::select! {
        // Every permit back: every connection, tunnels included, has ended.
        _ = mine.acquire_many(all) => {}
        () = drain.reached(Phase::Cut) => {
            let cut = open_now();
            if cut > 0 {
                tracing::warn!(cut, "shutdown timeout reached: dropping the connections still open");
            }
            let _ = cut_tx.send(true);
        }
    }
}

/// A slot under the cap for the next connection, waiting for one while the cap is reached (and
/// saying so in the log now and then); `None` once the listener is closing.
async fn slot(
    slots: &Arc<Semaphore>,
    limits: &ConnLimits,
    limit_warnings: &LogLimit,
    closing: &mut Pin<&mut impl Future<Output = ()>>,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    if let Some(held_back) = limit_warnings.allow() {
        tracing::warn!(
            max_connections = limits.max_connections,
            held_back,
            "connection limit reached: not accepting until a connection closes"
        );
    }
    tokio::select! {
        // (An error is a closed semaphore: never, so nothing left to accept with.)
        permit = slots.clone().acquire_owned() => permit.ok(),
        () = closing => None,
    }
}

/// What a connection is doing, for its deadlines. Written by the requests as they start and end
/// (atomics: no wakeup of the connection's task per request) and read by the connection's one
/// timer when it fires.
#[derive(Debug)]
struct Activity {
    /// When the connection was accepted: the origin of `idle_since`.
    origin: Instant,
    /// Whether a request head has arrived yet.
    started: AtomicBool,
    /// Requests whose response is not yet fully sent (open streams, on h2).
    in_flight: AtomicUsize,
    /// When a request last ended, in nanoseconds from `origin` (read once `in_flight` is zero).
    idle_since: AtomicU64,
    /// Whether the last request's answer leaves the connection reusable with nothing of it left
    /// to read: HTTP/1.1 kept alive, no request body (one that is not read to its end is
    /// skipped or makes hyper close, which must not be raced), no upgrade. Written before the
    /// request stops counting as in flight.
    reusable: AtomicBool,
    /// Whether hyper's end of the connection leaves the socket open: it is being taken back.
    keep_open: AtomicBool,
}

impl Activity {
    fn new(origin: Instant) -> Self {
        Activity {
            origin,
            started: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            reusable: AtomicBool::new(false),
            keep_open: AtomicBool::new(false),
        }
    }

    /// Whether every request is answered and the last one left the connection reusable.
    fn reusable(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.reusable.load(Ordering::Acquire)
    }

    /// When the last request ended (the origin if none has).
    fn idle_since(&self) -> Instant {
        self.origin + Duration::from_nanos(self.idle_since.load(Ordering::Acquire))
    }

    /// What the connection's deadline is now: `None` for a request head not yet in by its
    /// deadline (`first_head`) or an idle connection past `keep_alive`, otherwise when to look
    /// again.
    fn next_deadline(&self, now: Instant, first_head: Instant, keep_alive: Duration) -> Deadline {
        if !self.started.load(Ordering::Acquire) {
            return if now >= first_head {
                Deadline::FirstHeadMissed
            } else {
                Deadline::At(first_head)
            };
        }
        // A response still streaming (or a request body still arriving) has its own bounds in
        // the request path: look again a keep-alive timeout later.
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Deadline::At(now + keep_alive);
        }
        let at = self.idle_since() + keep_alive;
        if now >= at {
            Deadline::Idle
        } else {
            Deadline::At(at)
        }
    }
}

/// What [`Activity::next_deadline`] found.
#[derive(Debug, PartialEq, Eq)]
enum Deadline {
    At(Instant),
    FirstHeadMissed,
    Idle,
}

/// Counts one request as in flight until dropped: with the response body once there is one, or
/// with the handler's future if the client goes away first.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.started.store(true, Ordering::Release);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        // Before the count falls: whoever sees it at zero sees this end (or a later one).
        let since = Instant::now().saturating_duration_since(a.origin);
        a.idle_since.fetch_max(
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX),
            Ordering::AcqRel,
        );
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What an HTTP/1 connection's response bodies have handed to hyper and what its socket has taken,
/// so that a body waits while the client lags by more than [`MAX_UNSENT_BYTES`]. (h2 streams
/// are bounded by h2's own send buffers and windows, per stream: one slow stream must not hold
/// back the others, so they are not paced here.)
#[derive(Default)]
struct Backlog {
    handed: AtomicU64,
    written: AtomicU64,
    /// The body waiting for the socket to take more, and whether there is one (so that a
    /// write takes the lock only then).
    waiting: Mutex<Option<Waker>>,
    has_waiting: AtomicBool,
}

impl Backlog {
    /// Bytes the socket has taken.
    fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    fn unsent(&self) -> u64 {
        self.handed
            .load(Ordering::Acquire)
            .saturating_sub(self.written.load(Ordering::SeqCst))
    }

    fn wrote(&self, n: usize) {
        // SeqCst here and in `must_wait`: each side writes one flag and then reads the other's,
        // and one of them must see the other's write, or a waiting body would never be woken.
        self.written.fetch_add(n as u64, Ordering::SeqCst);
        if !self.has_waiting.swap(false, Ordering::SeqCst) {
            return;
        }
        let waker = self.waiting.lock().map(|mut w| w.take()).unwrap_or(None);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether the body must wait; if so, it is woken once the socket takes more.
    fn must_wait(&self, cx: &Context<'_>) -> bool {
        if self.unsent() < MAX_UNSENT_BYTES {
            return false;
        }
        if let Ok(mut w) = self.waiting.lock() {
            *w = Some(cx.waker().clone());
        }
        self.has_waiting.store(true, Ordering::SeqCst);
        // A write may have landed between the check and the registration.
        self.unsent() >= MAX_UNSENT_BYTES
    }
}

pin_project! {
    /// A response body that keeps its request counted as in flight until it is sent or dropped,
    /// and, on HTTP/1, waits while the client lags too far behind.
    struct Tracked<B> {
        #[pin]
        inner: B,
        in_flight: InFlight,
        backlog: Option<Arc<Backlog>>,
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        use bytes::Buf;
        let this = self.project();
        if let Some(backlog) = this.backlog.as_deref() {
            if backlog.must_wait(cx) {
                return Poll::Pending;
            }
        }
        let polled = this.inner.poll_frame(cx);
        if let (Some(backlog), Poll::Ready(Some(Ok(frame)))) = (this.backlog.as_deref(), &polled) {
            if let Some(data) = frame.data_ref() {
                backlog
                    .handed
                    .fetch_add(data.remaining() as u64, Ordering::AcqRel);
            }
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

/// The TLS handshake of an accepted connection, by `deadline` (the first request's, which the
/// handshake counts against) and abandoned once the listener closes at shutdown. `None` when it
/// fails: there is no one to answer, and a scanner's failed handshakes are worth no more than a
/// debug line.
async fn handshake(
    tls: &Tls,
    stream: Counted,
    deadline: Instant,
    mut drain: Drain,
) -> Option<TlsStream<Counted>> {
    tokio::select! {
        done = tokio::time::timeout_at(deadline, tls.accept(stream)) => match done {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!("no TLS handshake in time; closing");
                None
            }
        },
        () = drain.reached(Phase::Closing) => None,
    }
}

/// Serves a plain connection. One that starts with HTTP/1 is served request after request by the
/// proxy's direct path (`direct`, for the proxy's listener) while its requests have no body, and
/// by hyper's HTTP/1 server from the first one the direct path hands over (a body, an upgrade,
/// HTTP/1.0, a malformed head); either gives it back each time it has answered everything it was
/// asked and stayed idle for [`IDLE_AFTER`]: an idle keep-alive connection then holds no buffer
/// and no hyper connection (whose read and response-head buffers are 8 KiB each, kept for its
/// whole life), only its socket and the bytes of a next request hyper had already read. It waits
/// for its next request without a buffer, and goes back to the direct path when the socket turns
/// readable, as nginx allocates a keep-alive connection's buffers again when its next request
/// arrives. A connection that starts with what
/// may be h2's preface is served by the auto builder as a TLS connection is, for its whole life.
///
/// The deadlines are those of [`serve_connection`], on both paths: the keep-alive timeout from
/// the end of the last request while waiting, and the header read timeout from the first byte of
/// each request head (from the accept for the first).
#[allow(clippy::too_many_arguments)]
async fn serve_plain<F, Fut, B>(
    (builder, http1, direct): (
        Arc<auto::Builder<TokioExecutor>>,
        Arc<http1::Builder>,
        Option<Arc<Proxy>>,
    ),
    mut stream: Counted,
    handler: F,
    peer: SocketAddr,
    limits: ConnLimits,
    accepted: Instant,
    mut drain: Drain,
    mut cut: watch::Receiver<bool>,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let first_head = accepted + limits.header_read_timeout;
    if !wait_for_bytes(&stream, first_head, false, &mut drain, &mut cut).await {
        tracing::debug!(timeout = ?limits.header_read_timeout, "no request in time, or the listener closed; closing");
        return;
    }
    if may_be_h2(&stream, first_head).await {
        let io = TokioIo::new(stream);
        // Boxed, so that it does not make every plain connection's task as large as its own.
        Box::pin(serve_connection(
            builder, io, handler, peer, limits, accepted, drain, cut,
        ))
        .await;
        return;
    }
    let mut unread = Bytes::new();
    let mut start = accepted;
    let direct_limits = DirectLimits {
        header_read_timeout: limits.header_read_timeout,
        keep_alive_timeout: limits.keep_alive_timeout,
        idle_after: IDLE_AFTER,
        max_head: MAX_HEADER_BYTES,
    };
    loop {
        if let Some(proxy) = &direct {
            let mut buf = bytes::BytesMut::from(&unread[..]);
            let head_by = start + limits.header_read_timeout;
            let serving = proxy.serve_direct(
                &mut stream.stream,
                &mut buf,
                peer,
                direct_limits,
                head_by,
                &mut drain,
            );
            // Boxed, as hyper's connection is: held only while it serves.
            let serving = Box::pin(serving);
            let ended = tokio::select! {
                ended = serving => ended,
                // (An error is a sender gone: only once every connection has ended.)
                Ok(_) = cut.wait_for(|c| *c) => return,
            };
            match ended {
                Ended::Closed => return,
                Ended::Idle(idle_since) => {
                    // It waits with nothing but its socket.
                    drop(buf);
                    let idle_by = idle_since + limits.keep_alive_timeout;
                    if !wait_for_bytes(&stream, idle_by, true, &mut drain, &mut cut).await {
                        tracing::debug!(timeout = ?limits.keep_alive_timeout, "idle past the keep-alive timeout, or draining; closing");
                        return;
                    }
                    (unread, start) = (Bytes::new(), Instant::now());
                    continue;
                }
                Ended::Other => (unread, start) = (buf.freeze(), Instant::now()),
            }
        }
        // Boxed: the hyper connection and its state are held only while it serves, and the
        // connection's task stays small while it waits for its next request.
        let serving = serve_http1(
            &http1,
            (stream, unread),
            &handler,
            peer,
            (limits, start),
            &mut drain,
            &mut cut,
        );
        let Some((idle, rest, idle_since)) = Box::pin(serving).await else {
            return;
        };
        (stream, unread) = (idle, rest);
        let idle_by = idle_since + limits.keep_alive_timeout;
        if unread.is_empty() && !wait_for_bytes(&stream, idle_by, true, &mut drain, &mut cut).await
        {
            tracing::debug!(timeout = ?limits.keep_alive_timeout, "idle past the keep-alive timeout, or draining; closing");
            return;
        }
        start = Instant::now();
    }
}

/// Serves requests on `stream` (after its `unread` bytes) with one hyper HTTP/1 connection,
/// started at `start`, until it ends ([`drive`]). Once it has been idle long enough to be taken
/// back: the socket, what hyper had read and not used, and when its last request ended.
async fn serve_http1<F, Fut, B>(
    http1: &http1::Builder,
    (stream, unread): (Counted, Bytes),
    handler: &F,
    peer: SocketAddr,
    (limits, start): (ConnLimits, Instant),
    drain: &mut Drain,
    cut: &mut watch::Receiver<bool>,
) -> Option<(Counted, Bytes, Instant)>
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::new(start));
    let backlog = stream.backlog();
    let watched = backlog.clone();
    let io = Rewind {
        unread,
        stream,
        activity: activity.clone(),
    };
    let (tracker, draining, handler) = (activity.clone(), drain.clone(), handler.clone());
    let service = service_fn(move |req: Request<Incoming>| {
        respond(req, &handler, peer, &tracker, &backlog, &draining)
    });
    let mut conn = http1
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let head_by = start + limits.header_read_timeout;
    let served = drive(
        Pin::new(&mut conn),
        |c| c.graceful_shutdown(),
        (&activity, &watched),
        (limits, head_by, true),
        drain,
        cut,
    )
    .await;
    if served == Served::Closed {
        return None;
    }
    // (None: upgraded, the socket is the tunnel's now.)
    let parts = conn.into_parts()?;
    let rewind = parts.io.into_inner();
    // Copied out: `read_buf` shares hyper's whole read buffer, which is what must not be held.
    // (Usually empty; a next request's first bytes otherwise.)
    let unread = if parts.read_buf.is_empty() {
        rewind.unread
    } else {
        let mut both = bytes::BytesMut::with_capacity(parts.read_buf.len() + rewind.unread.len());
        // What hyper had read came first.
        both.extend_from_slice(&parts.read_buf);
        both.extend_from_slice(&rewind.unread);
        both.freeze()
    };
    Some((rewind.stream, unread, activity.idle_since()))
}

/// Whether the first bytes of a plain connection may be h2's connection preface (all of it, or
/// as much as has arrived): such a connection goes to the auto builder, which tells them apart.
/// Looked at once the socket is readable, by the first request head's deadline.
async fn may_be_h2(stream: &Counted, deadline: Instant) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut first = [0u8; PREFACE.len()];
    match tokio::time::timeout_at(deadline, stream.stream.peek(&mut first)).await {
        Ok(Ok(n)) => n > 0 && first[..n] == PREFACE[..n],
        // An error, or nothing yet: the auto builder finds out as well.
        _ => true,
    }
}

/// Waits until `stream` has bytes to read (or is closed by the peer): `false` when `deadline`
/// passes first, when the listener closes, at the cut, or, for an `idle` connection (one that
/// has answered all it was asked), as soon as the drain begins.
async fn wait_for_bytes(
    stream: &Counted,
    deadline: Instant,
    idle: bool,
    drain: &mut Drain,
    cut: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        let phase = drain.phase_and_mark_seen();
        if phase >= Phase::Closing || (idle && phase >= Phase::Draining) {
            return false;
        }
        tokio::select! {
            biased;
            ready = stream.stream.readable() => return ready.is_ok(),
            () = tokio::time::sleep_until(deadline) => return false,
            () = drain.changed() => continue,
            // (An error is a sender gone: only once every connection has ended.)
            Ok(_) = cut.wait_for(|c| *c) => return false,
        }
    }
}

/// Serves one connection with the auto builder (HTTP/1 or h2, TLS or not) until it ends or
/// misses a deadline of `limits`, as [`drive`] describes.
#[allow(clippy::too_many_arguments)]
async fn serve_connection<I, F, Fut, B>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: TokioIo<I>,
    handler: F,
    peer: SocketAddr,
    limits: ConnLimits,
    accepted: Instant,
    mut drain: Drain,
    mut cut: watch::Receiver<bool>,
) where
    I: Socket,
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::new(accepted));
    let tracker = activity.clone();
    let backlog = io.inner().backlog();
    let watched = backlog.clone();
    let draining = drain.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        respond(req, &handler, peer, &tracker, &backlog, &draining)
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let first_head = accepted + limits.header_read_timeout;
    let limits = (limits, first_head, false);
    drive(
        conn,
        |c| c.graceful_shutdown(),
        (&activity, &watched),
        limits,
        &mut drain,
        &mut cut,
    )
    .await;
}

/// How [`drive`] left a hyper connection.
#[derive(Debug, PartialEq, Eq)]
enum Served {
    /// Ended: closed, upgraded, or dropped.
    Closed,
    /// Ended without closing the socket, every request answered: the socket can wait for its
    /// next request without it.
    Idle,
}

/// Runs one hyper connection (`conn`, asked to close by `graceful_shutdown`) until it ends or
/// misses a deadline of `limits`, following `drain`: while draining it is asked to close once its
/// requests are answered, once the listener is closing a connection that has asked nothing is
/// closed, and once `cut` turns true it is dropped. With `recycle` (an HTTP/1 connection over a
/// [`Rewind`]), it is ended without a word once it has been idle for [`IDLE_AFTER`], every
/// request answered and the connection kept alive: [`Served::Idle`].
async fn drive<C, E>(
    mut conn: Pin<&mut C>,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    (activity, backlog): (&Activity, &Backlog),
    (limits, first_head, recycle): (ConnLimits, Instant, bool),
    drain: &mut Drain,
    cut: &mut watch::Receiver<bool>,
) -> Served
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    // One timer for the connection's life, looked at when it fires and set again: requests do
    // not wake this task as they start and end. It fires at the latest a keep-alive timeout
    // after any moment, so an idle connection is closed on time (and at the first request
    // head's deadline if none has come); with `recycle`, every `IDLE_AFTER` while the
    // connection may yet be taken back from hyper.
    let watching = || {
        recycle
            && (!activity.started.load(Ordering::Acquire)
                || activity.in_flight.load(Ordering::Acquire) > 0
                || activity.reusable.load(Ordering::Acquire))
    };
    let first_look = first_head.min(activity.origin + limits.keep_alive_timeout);
    let first_look = if watching() {
        first_look.min(activity.origin + IDLE_AFTER)
    } else {
        first_look
    };
    let timer = tokio::time::sleep_until(first_look);
    tokio::pin!(timer);
    let mut asked_to_close = false;
    // What the socket had taken of the responses when the timer last looked, and since when:
    // an HTTP/1 response with bytes waiting that the client has not read for the keep-alive
    // timeout (it stopped reading) ends the connection.
    let mut progress = (backlog.written(), Instant::now());
    let grace = loop {
        let phase = drain.phase_and_mark_seen();
        if phase >= Phase::Draining && !asked_to_close {
            if activity.started.load(Ordering::Acquire) {
                // HTTP/1.1 closes once its response is out (at once if idle), h2 sends GOAWAY
                // and lets its open streams finish. Not before a request has come: the protocol
                // is not known yet, and hyper would drop the connection unanswered.
                graceful_shutdown(conn.as_mut());
                asked_to_close = true;
            } else if phase >= Phase::Closing {
                tracing::debug!("listener closed before this connection asked anything; closing");
                return Served::Closed;
            }
        }
        tokio::select! {
            ended = conn.as_mut() => {
                if ended.is_ok() && activity.keep_open.load(Ordering::Acquire) {
                    return Served::Idle;
                }
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return Served::Closed;
            }
            () = timer.as_mut() => {
                let now = Instant::now();
                if recycle && !asked_to_close && activity.reusable() {
                    let idle_from = activity.idle_since() + IDLE_AFTER;
                    if now >= idle_from {
                        // Idle in hyper's eyes too (a complete message each way, nothing of a
                        // next head parsed), so it ends at once and writes nothing; the socket
                        // stays open, and what hyper had read of a next request is kept.
                        activity.keep_open.store(true, Ordering::Release);
                        graceful_shutdown(conn.as_mut());
                        asked_to_close = true;
                    } else {
                        timer.as_mut().reset(idle_from);
                    }
                    continue;
                }
                if activity.in_flight.load(Ordering::Acquire) > 0 && backlog.unsent() > 0 {
                    let written = backlog.written();
                    if written != progress.0 {
                        progress = (written, now);
                    } else if now.saturating_duration_since(progress.1) >= limits.keep_alive_timeout {
                        tracing::debug!(timeout = ?limits.keep_alive_timeout, "the client has read nothing of its response for the keep-alive timeout; closing");
                        return Served::Closed;
                    }
                } else {
                    progress = (backlog.written(), now);
                }
                match activity.next_deadline(now, first_head, limits.keep_alive_timeout) {
                    Deadline::At(at) if watching() => timer.as_mut().reset(at.min(now + IDLE_AFTER)),
                    Deadline::At(at) => timer.as_mut().reset(at),
                    Deadline::FirstHeadMissed => {
                        // Nothing was asked: there is nothing to finish, and no need to wait
                        // for a client that has been silent all along.
                        tracing::debug!(timeout = ?limits.header_read_timeout, "no complete request head in time; closing");
                        return Served::Closed;
                    }
                    Deadline::Idle => {
                        tracing::debug!(timeout = ?limits.keep_alive_timeout, "idle; closing");
                        break CLOSE_TIMEOUT;
                    }
                }
            }
            () = drain.changed() => continue,
            // (An error is a sender gone: only once every connection has ended.)
            Ok(_) = cut.wait_for(|c| *c) => {
                tracing::debug!("shutdown timeout reached; dropping the connection");
                return Served::Closed;
            }
        }
    };
    // HTTP/1.1 closes once its response is out, h2 sends GOAWAY and lets open streams finish.
    activity.keep_open.store(false, Ordering::Release);
    graceful_shutdown(conn.as_mut());
    if tokio::time::timeout(grace, conn).await.is_err() {
        tracing::debug!("connection did not close in time; dropped");
    }
    Served::Closed
}

/// Answers one request with `handler`: counts it as in flight on `tracker` until its response
/// is sent, paces an HTTP/1 response's body by the connection's `backlog`, and, while draining,
/// asks an HTTP/1 client to take its next request elsewhere.
fn respond<R, F, Fut, B>(
    req: Request<R>,
    handler: &F,
    peer: SocketAddr,
    tracker: &Arc<Activity>,
    backlog: &Arc<Backlog>,
    draining: &Drain,
) -> impl Future<Output = Result<Response<Tracked<B>>, Infallible>> + Send + 'static
where
    R: Body,
    F: Fn(Request<R>, SocketAddr) -> Fut,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
{
    let in_flight = InFlight::start(tracker);
    let http1 = req.version() <= http::Version::HTTP_11;
    // Whether the connection may be taken back from hyper once this is answered (see
    // `Activity::reusable`): HTTP/1.1 kept alive, and no request body that may still be unread.
    let reusable = req.version() == http::Version::HTTP_11
        && req.body().is_end_stream()
        && !asks_to_close(req.headers());
    let backlog = http1.then(|| backlog.clone());
    let draining = draining.clone();
    // Boxed: hyper keeps the slot for a request's future for as long as the connection is open,
    // so an unboxed one would hold its full size (a few KiB: the whole request path) on every
    // idle keep-alive connection. Boxed, it is held only while a request is in flight.
    let handling = Box::pin(handler(req, peer));
    async move {
        let mut resp = handling.await;
        // Sends the client elsewhere for its next request. (The connection is also asked to
        // close, but that may come after this response's head is out; h2 gets a GOAWAY.)
        if http1 && draining.is_draining() && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
        {
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        let reusable = reusable
            && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
            && !asks_to_close(resp.headers());
        in_flight.0.reusable.store(reusable, Ordering::Release);
        Ok(resp.map(|inner| Tracked {
            inner,
            in_flight,
            backlog,
        }))
    }
}

/// Whether a message's `Connection` header asks to close the connection after it.
fn asks_to_close(headers: &http::HeaderMap) -> bool {
    crate::hop::connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("close"))
}

/// A client connection as hyper serves it: the counted socket, plain or inside TLS.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// What the socket itself has taken of the responses, under TLS too: the body waits for the
    /// client, not for rustls' buffer, which then never holds more than the backlog allows.
    fn backlog(&self) -> Arc<Backlog>;
}

impl Socket for Counted {
    fn backlog(&self) -> Arc<Backlog> {
        self.backlog.clone()
    }
}

impl Socket for TlsStream<Counted> {
    fn backlog(&self) -> Arc<Backlog> {
        self.get_ref().0.backlog.clone()
    }
}

/// An accepted client connection, holding its slot under the listener's cap for as long as the
/// socket is open, including after an upgrade hands it to a tunnel.
struct Counted {
    stream: TcpStream,
    /// The connection's slot under the cap, and under a shared cap its place among its own
    /// listener's connections.
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
    open: Option<IntGauge>,
    backlog: Arc<Backlog>,
}

impl Counted {
    fn new(
        stream: TcpStream,
        permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
        open: Option<IntGauge>,
    ) -> Self {
        if let Some(g) = &open {
            g.inc();
        }
        Counted {
            stream,
            _permits: permits,
            open,
            backlog: Arc::default(),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(g) = &self.open {
            g.dec();
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.backlog.wrote(n);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.backlog.wrote(n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A plain HTTP/1 connection's socket as one hyper connection serves it: the bytes the previous
/// one had read and not used (a next request's, or part of it) come first, and the socket is
/// not shut down when hyper ends the connection to hand it back (`keep_open`).
struct Rewind {
    unread: Bytes,
    stream: Counted,
    activity: Arc<Activity>,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.unread.is_empty() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.keep_open.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connection's one timer, as it fires: the first head's deadline until a request has
    /// come, then the keep-alive timeout from the end of the last request, never while one is in
    /// flight.
    #[test]
    fn a_connection_deadline_follows_its_requests() {
        let origin = Instant::now();
        let first_head = origin + Duration::from_secs(10);
        let ka = Duration::from_secs(75);
        let at = |s: u64| origin + Duration::from_secs(s);
        let a = Arc::new(Activity::new(origin));
        assert_eq!(
            a.next_deadline(at(5), first_head, ka),
            Deadline::At(first_head)
        );
        assert_eq!(
            a.next_deadline(at(10), first_head, ka),
            Deadline::FirstHeadMissed
        );

        let a = Arc::new(Activity::new(origin));
        let one = InFlight::start(&a);
        let two = InFlight::start(&a);
        // In flight past every deadline: looked at again a keep-alive timeout later.
        assert_eq!(
            a.next_deadline(at(500), first_head, ka),
            Deadline::At(at(575))
        );
        drop(one);
        assert_eq!(
            a.next_deadline(at(500), first_head, ka),
            Deadline::At(at(575))
        );
        let before = Instant::now();
        drop(two);
        let idle = origin + Duration::from_nanos(a.idle_since.load(Ordering::Acquire));
        assert!(idle >= before, "idle from the end of the last request");
        assert_eq!(
            a.next_deadline(idle, first_head, ka),
            Deadline::At(idle + ka)
        );
        assert_eq!(a.next_deadline(idle + ka, first_head, ka), Deadline::Idle);
    }

    /// A plain connection's task is as large as its largest state: the hyper connection and the
    /// auto builder's are boxed, so that one waiting for its next request holds little more than
    /// its socket.
    #[tokio::test]
    async fn a_plain_connection_task_is_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, (stream, peer)) =
            tokio::join!(client, async { listener.accept().await.unwrap() });
        let slots = Arc::new(Semaphore::new(1));
        let permit = slots.try_acquire_owned().unwrap();
        let stream = Counted::new(stream, (permit, None), None);
        let handler = |_req: Request<Incoming>, _peer: SocketAddr| async {
            Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")))
        };
        let (_control, drain) = Drain::new();
        let (_cut_tx, cut) = watch::channel(false);
        let builders = (
            Arc::new(auto::Builder::new(TokioExecutor::new())),
            Arc::new(http1::Builder::new()),
            None,
        );
        let limits = ConnLimits::default();
        let task = serve_plain(
            builders,
            stream,
            handler,
            peer,
            limits,
            Instant::now(),
            drain,
            cut,
        );
        let size = std::mem::size_of_val(&task);
        assert!(size < 2048, "a plain connection's task takes {size} bytes");
        drop((task, client));
    }

    /// hyper keeps the slot for a request's future for the connection's whole life: what the
    /// service returns must stay small however large the request path's future is, or every idle
    /// keep-alive connection holds the request path's size.
    #[tokio::test]
    async fn an_idle_connection_does_not_hold_the_request_path() {
        let handler = |_req: Request<http_body_util::Empty<Bytes>>, _peer: SocketAddr| async {
            // A future that holds 16 KiB across an await, as a long request path does.
            let state = [1u8; 16 * 1024];
            tokio::task::yield_now().await;
            Response::new(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
                &state[..1],
            )))
        };
        let tracker = Arc::new(Activity::new(Instant::now()));
        let (_control, drain) = Drain::new();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let answering = respond(
            Request::new(http_body_util::Empty::new()),
            &handler,
            peer,
            &tracker,
            &Arc::default(),
            &drain,
        );
        let size = std::mem::size_of_val(&answering);
        assert!(
            size < 1024,
            "a request's future in hyper's slot takes {size} bytes"
        );
        let resp = answering.await.unwrap();
        assert_eq!(resp.status(), http::StatusCode::OK);
        assert_eq!(
            tracker.in_flight.load(Ordering::Acquire),
            1,
            "in flight until the body is done"
        );
        drop(resp);
        assert_eq!(tracker.in_flight.load(Ordering::Acquire), 0);
    }
}
