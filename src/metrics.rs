//! Prometheus metrics: one registry per running proxy, with every labelled series resolved once at
//! start-up so the request path only increments. Labels never carry a session id, value or cookie.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 100 µs to 10 s: the proxy's own work sits at the low end, a slow backend
/// at the high end.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Store operations, as the `op` label.
#[derive(Debug, Clone, Copy)]
pub enum StoreOp {
    /// Read and renew.
    Load,
    /// Write changes.
    Apply,
    /// Read and delete (rotation).
    Take,
    /// Delete.
    Destroy,
    /// Health check.
    Ping,
}

/// Outcome of resolving a request's session, as the `result` label.
#[derive(Debug, Clone, Copy)]
pub enum Lookup {
    /// A session was found.
    Hit,
    /// No cookie, or a valid cookie for a session that no longer exists.
    Miss,
    /// A cookie that failed verification (never looked up).
    Invalid,
    /// The store failed.
    Error,
}

/// Session events, as the `event` label.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    /// A new session was stored.
    Created,
    /// A session was destroyed by the backend.
    Destroyed,
    /// A session moved to a new id.
    Rotated,
    /// A backend response broke the protocol or a limit.
    ProtocolError,
    /// Changes to a session that ended while the request was in flight, not applied.
    Dropped,
}

/// The listeners whose connections are counted, as the `listener` label.
#[derive(Debug, Clone, Copy)]
pub enum Listener {
    /// The proxy's own port (`--listen`).
    Proxy,
    /// The admin port (`--admin-listen`).
    Admin,
}

/// The proxy's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: [Histogram; 5],
    upstream: Histogram,
    store: [Histogram; 5],
    lookups: [IntCounter; 4],
    events: [IntCounter; 5],
    /// Client headers removed because they looked like protocol headers.
    pub spoofed_headers: IntCounter,
    upstream_errors: IntCounterVec,
    open_connections: [IntGauge; 2],
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Panics
    /// Only if the metric definitions themselves are invalid, which the unit test rules out.
    pub fn new() -> Self {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
                labels,
            )
            .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let requests = hist(
            "stickless_request_duration_seconds",
            "Time from a request's arrival to its response headers, by status class.",
            &["status"],
        );
        let upstream = hist(
            "stickless_upstream_duration_seconds",
            "Time the backend took to answer with response headers.",
            &[],
        );
        let store = hist(
            "stickless_store_duration_seconds",
            "Time of session store calls, by operation.",
            &["op"],
        );
        let lookups = counter(
            "stickless_session_lookups_total",
            "Session cookie resolutions, by result.",
            &["result"],
        );
        let events = counter(
            "stickless_session_events_total",
            "Session lifecycle events, by event.",
            &["event"],
        );
        let spoofed = counter(
            "stickless_spoofed_headers_total",
            "Client request headers removed because they used the session header prefix.",
            &[],
        );
        let upstream_errors = counter(
            "stickless_upstream_errors_total",
            "Requests the backend did not answer, by reason.",
            &["reason"],
        );
        let open_connections = IntGaugeVec::new(
            Opts::new(
                "stickless_open_connections",
                "Client connections open now, by listener (upgraded ones included).",
            ),
            &["listener"],
        )
        .expect("valid gauge");
        registry
            .register(Box::new(open_connections.clone()))
            .expect("unique metric");
        Metrics {
            open_connections: ["proxy", "admin"].map(|s| open_connections.with_label_values(&[s])),
            requests: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|s| requests.with_label_values(&[s])),
            upstream: upstream.with_label_values(&[] as &[&str]),
            store: ["load", "apply", "take", "destroy", "ping"]
                .map(|s| store.with_label_values(&[s])),
            lookups: ["hit", "miss", "invalid", "error"].map(|s| lookups.with_label_values(&[s])),
            events: [
                "created",
                "destroyed",
                "rotated",
                "protocol_error",
                "dropped",
            ]
            .map(|s| events.with_label_values(&[s])),
            spoofed_headers: spoofed.with_label_values(&[] as &[&str]),
            upstream_errors,
            registry,
        }
    }

    /// Records a finished request.
    pub fn request(&self, status: u16, elapsed: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[class].observe(elapsed.as_secs_f64());
    }

    /// Records the backend's time to response headers.
    pub fn upstream(&self, elapsed: Duration) {
        self.upstream.observe(elapsed.as_secs_f64());
    }

    /// Records a failed backend call (`connect`, `timeout`, ...).
    pub fn upstream_error(&self, reason: &'static str) {
        self.upstream_errors.with_label_values(&[reason]).inc();
    }

    /// Records a store call.
    pub fn store(&self, op: StoreOp, elapsed: Duration) {
        self.store[op as usize].observe(elapsed.as_secs_f64());
    }

    /// Counts a session lookup.
    pub fn lookup(&self, result: Lookup) {
        self.lookups[result as usize].inc();
    }

    /// Counts a session event.
    pub fn event(&self, event: Event) {
        self.events[event as usize].inc();
    }

    /// The gauge of open connections on `listener`, for its accept loop to move.
    pub fn open_connections(&self, listener: Listener) -> IntGauge {
        self.open_connections[listener as usize].clone()
    }

    /// Everything in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.request(204, Duration::from_millis(1));
        m.upstream(Duration::from_millis(1));
        m.store(StoreOp::Apply, Duration::from_millis(1));
        m.lookup(Lookup::Invalid);
        m.event(Event::ProtocolError);
        m.upstream_error("timeout");
        m.open_connections(Listener::Proxy).inc();
        let text = m.render();
        for needle in [
            "stickless_request_duration_seconds_bucket{status=\"2xx\"",
            "stickless_upstream_duration_seconds_count 1",
            "stickless_store_duration_seconds_count{op=\"apply\"} 1",
            "stickless_session_lookups_total{result=\"invalid\"} 1",
            "stickless_session_events_total{event=\"protocol_error\"} 1",
            "stickless_upstream_errors_total{reason=\"timeout\"} 1",
            "stickless_spoofed_headers_total 0",
            "stickless_open_connections{listener=\"proxy\"} 1",
            "stickless_open_connections{listener=\"admin\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
