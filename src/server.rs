//! Listeners and their accept loops: the proxy and the admin endpoint, served by hyper (HTTP/1.1
//! and h2c from clients) until the shutdown future completes, then drained.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::admin::Admin;
use crate::config::{Config, StoreConfig};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::store::memory::MemoryStore;
use crate::store::redis::{RedisSettings, RedisSetupError, RedisStore};
use crate::store::SessionStore;

/// Time a client gets to send a request's headers, counted from when the connection is ready for
/// one, so it is also the keep-alive idle timeout. It bounds slow-loris connections, and it is
/// longer than an ELB's default idle timeout (60 s): a proxy that closes idle connections before
/// the load balancer does makes the load balancer answer 502 now and then.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(75);
/// Time in-flight requests get to finish once shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted; larger ones are answered 431 by hyper.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Builds the store the configuration asks for.
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
        } => Arc::new(
            RedisStore::connect(RedisSettings {
                url: url.clone(),
                key_prefix: key_prefix.clone(),
                timeout: *timeout,
                ttl: config.ttl,
                limits: config.protocol.clone(),
            })
            .await?,
        ),
    })
}

/// Runs the proxy on `listener` and the admin endpoint on `admin_listener` until `shutdown`
/// completes, then lets in-flight requests finish.
pub async fn run(
    config: Config,
    store: Arc<dyn SessionStore>,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let metrics = Metrics::new();
    let proxy = Arc::new(Proxy::new(&config, store.clone(), metrics.clone()));
    let admin = Arc::new(Admin::new(store, metrics));
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let proxy_server = serve(
        listener,
        move |req, peer| {
            let proxy = proxy.clone();
            async move { proxy.handle(req, peer).await }
        },
        stopped(rx.clone()),
    );
    let admin_server = serve(
        admin_listener,
        move |req, _| {
            let admin = admin.clone();
            async move { admin.handle(req).await }
        },
        stopped(rx),
    );
    tokio::join!(proxy_server, admin_server);
}

/// Accepts connections on `listener` and serves each with `handler` until `shutdown` completes.
pub async fn serve<F, Fut, B>(listener: TcpListener, handler: F, shutdown: impl Future<Output = ()>)
where
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
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req, peer).await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("gave up waiting for in-flight requests"),
    }
}
