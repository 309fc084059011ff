//! The admin listener: `/metrics` (Prometheus text format), `/healthz` (the process is up) and
//! `/readyz` (the session store answers a PING; while the store's circuit breaker is open, not
//! ready at once, without waiting on a timeout; from the start of a stop, not ready, so that the
//! load balancer takes the instance out while it drains). Kept off the proxy's port so that neither the
//! backend's routes nor the public can reach it by default.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::metrics::{Metrics, StoreOp};
use crate::shutdown::Drain;
use crate::store::SessionStore;

/// Answers admin requests.
pub struct Admin {
    store: Arc<dyn SessionStore>,
    metrics: Metrics,
    drain: Drain,
}

impl Admin {
    /// An admin endpoint over this store and these metrics. The store records its own state
    /// (its circuit breaker's) into `metrics` from now on, so that `/metrics` shows it. `/readyz`
    /// answers 503 once `drain` says a stop has begun.
    pub fn new(store: Arc<dyn SessionStore>, metrics: Metrics, drain: Drain) -> Self {
        store.record_into(&metrics);
        Admin {
            store,
            metrics,
            drain,
        }
    }

    /// Serves one admin request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let mut resp = Response::new(Full::new(Bytes::from(self.metrics.render())));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if self.drain.is_draining() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining: stickless is stopping\n",
            ),
            "/readyz" => {
                let started = Instant::now();
                let pinged = self.store.ping().await;
                self.metrics.store(StoreOp::Ping, started.elapsed());
                match pinged {
                    Ok(()) => text(StatusCode::OK, "ready\n"),
                    Err(e) => {
                        tracing::warn!(error = %e, "readiness check failed");
                        text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "session store unavailable\n",
                        )
                    }
                }
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /healthz or /readyz\n",
            ),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
