//! Prometheus metrics: one registry per running proxy, with every labelled series resolved once at
//! start-up, so the request path only increments and every series is exported from the start (at
//! 0), which an alert on its rate needs. Labels never carry a session id, value or cookie.
//! Beside stickless's own families the registry holds `stickless_build_info` (the version) and,
//! on Linux, the standard `process_*` families (memory, CPU, file descriptors and their limit).
//!
//! Every label is an enum declared with the `labels!` macro: the enum, its list of values and their
//! spelling come from one list, so a series can never be filed under another's label.

use std::time::Duration;

use prometheus::core::Collector;
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

/// Declares a label enum: its variants, `ALL` (in declaration order, which is also the order of
/// the discriminants) and `as_str`, from one list.
macro_rules! labels {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }
        }
    };
}

labels! {
    /// Store operations, as the `op` label.
    StoreOp {
        /// Read and renew.
        Load => "load",
        /// Write changes.
        Apply => "apply",
        /// Read and delete (rotation).
        Take => "take",
        /// Delete.
        Destroy => "destroy",
        /// Health check.
        Ping => "ping",
    }
}

labels! {
    /// Outcome of resolving a request's session, as the `result` label.
    Lookup {
        /// A session was found.
        Hit => "hit",
        /// No cookie, or a valid cookie for a session that no longer exists.
        Miss => "miss",
        /// A cookie that failed verification (never looked up).
        Invalid => "invalid",
        /// The store failed.
        Error => "error",
    }
}

labels! {
    /// Outcome of a lookup in the local cache, as the `result` label.
    CacheLookup {
        /// Served from the cache: no round trip to Redis.
        Hit => "hit",
        /// Not cached (or the cache is not live): read from Redis.
        Miss => "miss",
        /// Cached, but older than the version the user's cookie names: read from Redis.
        Outdated => "outdated",
        /// Served by another request's read of the same session, in flight when this one
        /// looked: no round trip of its own.
        Joined => "joined",
    }
}

labels! {
    /// Where a session load went with `--read-from replica`, as the `result` label.
    ReplicaRead {
        /// Answered by the replica.
        Replica => "replica",
        /// The replica's copy was older than the user's own last change (or it had no copy of a
        /// session the user has seen): read from the primary.
        Behind => "behind",
        /// No replica could answer (none known, not connected, failed, too slow): read from the
        /// primary.
        PrimaryFallback => "primary_fallback",
    }
}

labels! {
    /// Session events, as the `event` label.
    Event {
        /// A new session was stored.
        Created => "created",
        /// A session was destroyed by the backend.
        Destroyed => "destroyed",
        /// A session moved to a new id.
        Rotated => "rotated",
        /// A backend response broke the protocol or a limit.
        ProtocolError => "protocol_error",
        /// Changes to a session that ended while the request was in flight, not applied.
        Dropped => "dropped",
    }
}

labels! {
    /// Why the backend did not answer, as the `reason` label.
    UpstreamFailure {
        /// No connection could be made.
        Connect => "connect",
        /// No response head within `--upstream-timeout`.
        Timeout => "timeout",
        /// The connection failed before a response head arrived.
        Response => "response",
    }
}

labels! {
    /// Requests refused as the client's fault, as the `reason` label.
    ClientFault {
        /// An HTTP/1.1 request without `Host`.
        MissingHost => "missing_host",
        /// More than one `Host` header.
        SeveralHosts => "several_hosts",
        /// A request target that cannot be forwarded.
        Target => "target",
        /// A malformed or cut-off request body.
        Body => "body",
    }
}

labels! {
    /// The listeners whose connections are counted, as the `listener` label.
    Listener {
        /// The proxy's own port (`--listen`).
        Proxy => "proxy",
        /// The admin port (`--admin-listen`).
        Admin => "admin",
    }
}

labels! {
    /// Failed session store calls, as the `kind` label.
    StoreFailure {
        /// No answer within `--redis-timeout`.
        Timeout => "timeout",
        /// The Redis client failed: a lost or refused connection, an error reply.
        Connection => "connection",
        /// Not tried: the circuit breaker is open.
        CircuitOpen => "circuit_open",
        /// Stored on the primary, but no replica confirmed it in time (`--durability replicated`).
        NotReplicated => "not_replicated",
        /// Anything else: a script refused as late, a reply that could not be read.
        Other => "other",
    }
}

labels! {
    /// The circuit breaker's states. `stickless_breaker_state` holds the position of the state in
    /// this list: 0 closed, 1 open, 2 half-open.
    BreakerState {
        /// Calls go to the store.
        Closed => "closed",
        /// The store is known to be down: calls fail at once.
        Open => "open",
        /// A probe is in flight; calls still fail at once.
        HalfOpen => "half_open",
    }
}

labels! {
    /// The circuit breaker's transitions that are counted, as the `to` label.
    BreakerTransition {
        /// Closed to open: the store was found down.
        Open => "open",
        /// Open to closed: a probe found the store answering again.
        Closed => "closed",
    }
}

/// Status classes, as the `status` label.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The proxy's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// The names of stickless's own families, in registration order: what the test of the
    /// start-up series walks, so that a family added later is checked too.
    #[cfg_attr(not(test), allow(dead_code))]
    families: Vec<String>,
    requests: Vec<Histogram>,
    upstream: Histogram,
    store: Vec<Histogram>,
    lookups: Vec<IntCounter>,
    events: Vec<IntCounter>,
    upstream_errors: Vec<IntCounter>,
    client_errors: Vec<IntCounter>,
    open_connections: Vec<IntGauge>,
    store_errors: Vec<IntCounter>,
    breaker_state: IntGauge,
    breaker_transitions: Vec<IntCounter>,
    /// Client headers removed because they looked like protocol headers.
    pub spoofed_headers: IntCounter,
    /// Requests sent to the backend a second time, on a new connection.
    pub upstream_retries: IntCounter,
    store_reconnections: IntCounter,
    store_topology_errors: IntCounter,
    store_retries: IntCounter,
    store_failovers: IntCounter,
    local_cache_lookups: Vec<IntCounter>,
    local_cache_invalidations: IntCounter,
    local_cache_flushes: IntCounter,
    replica_reads: Vec<IntCounter>,
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Panics
    /// Only if the metric definitions themselves are invalid, which the unit test rules out.
    pub fn new() -> Self {
        let registry = Registry::new();
        let families = std::cell::RefCell::new(Vec::new());
        let register = |c: Box<dyn Collector>| {
            families
                .borrow_mut()
                .extend(c.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(c).expect("unique metric");
        };
        let hist = |name: &str, help: &str, label: &str, values: &[&str]| -> Vec<Histogram> {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
                &[label],
            )
            .expect("valid histogram");
            register(Box::new(h.clone()));
            values.iter().map(|v| h.with_label_values(&[v])).collect()
        };
        let counters = |name: &str, help: &str, label: &str, values: &[&str]| -> Vec<IntCounter> {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid counter");
            register(Box::new(c.clone()));
            values.iter().map(|v| c.with_label_values(&[v])).collect()
        };
        let counter = |name: &str, help: &str| -> IntCounter {
            let c = IntCounter::new(name, help).expect("valid counter");
            register(Box::new(c.clone()));
            c
        };
        let gauges = |name: &str, help: &str, label: &str, values: &[&str]| -> Vec<IntGauge> {
            let g = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid gauge");
            register(Box::new(g.clone()));
            values.iter().map(|v| g.with_label_values(&[v])).collect()
        };
        fn names<L: Copy>(all: &[L], f: fn(L) -> &'static str) -> Vec<&'static str> {
            all.iter().map(|l| f(*l)).collect()
        }
        let breaker_state = IntGauge::new(
            "stickless_breaker_state",
            "State of the circuit breaker in front of the session store: 0 closed, 1 open, 2 half-open.",
        )
        .expect("valid gauge");
        register(Box::new(breaker_state.clone()));
        let upstream = Histogram::with_opts(
            HistogramOpts::new(
                "stickless_upstream_duration_seconds",
                "Time the backend took to answer with response headers.",
            )
            .buckets(BUCKETS.to_vec()),
        )
        .expect("valid histogram");
        register(Box::new(upstream.clone()));
        let build_info = IntGaugeVec::new(
            Opts::new(
                "stickless_build_info",
                "Always 1; the label `version` is the running stickless's version.",
            ),
            &["version"],
        )
        .expect("valid gauge");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        register(Box::new(build_info));
        // Registered directly, not through `register`: these families are the standard ones of
        // every Prometheus client, not stickless's own.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        let metrics = Metrics {
            requests: hist(
                "stickless_request_duration_seconds",
                "Time from a request's arrival to its response headers, by status class.",
                "status",
                &STATUS_CLASSES,
            ),
            upstream,
            store: hist(
                "stickless_store_duration_seconds",
                "Time of session store calls, by operation.",
                "op",
                &names(StoreOp::ALL, StoreOp::as_str),
            ),
            lookups: counters(
                "stickless_session_lookups_total",
                "Session cookie resolutions, by result.",
                "result",
                &names(Lookup::ALL, Lookup::as_str),
            ),
            events: counters(
                "stickless_session_events_total",
                "Session lifecycle events, by event.",
                "event",
                &names(Event::ALL, Event::as_str),
            ),
            upstream_errors: counters(
                "stickless_upstream_errors_total",
                "Requests the backend did not answer, by reason.",
                "reason",
                &names(UpstreamFailure::ALL, UpstreamFailure::as_str),
            ),
            client_errors: counters(
                "stickless_client_errors_total",
                "Requests refused with 400 as the client's fault, by reason.",
                "reason",
                &names(ClientFault::ALL, ClientFault::as_str),
            ),
            open_connections: gauges(
                "stickless_open_connections",
                "Client connections open now, by listener (upgraded ones included).",
                "listener",
                &names(Listener::ALL, Listener::as_str),
            ),
            store_errors: counters(
                "stickless_store_errors_total",
                "Failed session store calls, by kind (circuit_open: not tried, the breaker is open).",
                "kind",
                &names(StoreFailure::ALL, StoreFailure::as_str),
            ),
            breaker_state,
            breaker_transitions: counters(
                "stickless_breaker_transitions_total",
                "Circuit breaker transitions: to open when the store is found down, to closed when it answers again.",
                "to",
                &names(BreakerTransition::ALL, BreakerTransition::as_str),
            ),
            spoofed_headers: counter(
                "stickless_spoofed_headers_total",
                "Client request headers removed because they used the session header prefix.",
            ),
            upstream_retries: counter(
                "stickless_upstream_retries_total",
                "Idempotent requests sent again on a new connection after the first one failed before a response.",
            ),
            store_reconnections: counter(
                "stickless_store_reconnections_total",
                "Connections to the session store made again after the first (a failover, a lost or unresponsive connection).",
            ),
            store_topology_errors: counter(
                "stickless_store_topology_errors_total",
                "Store answers showing the node is no longer the primary (READONLY, MASTERDOWN): each makes the client reconnect.",
            ),
            store_retries: counter(
                "stickless_store_retries_total",
                "Store calls sent once more because their first try provably did not run (refused by a demoted or loading node).",
            ),
            store_failovers: counter(
                "stickless_store_failovers_total",
                "Failovers seen: a new primary (a new replication id) after a reconnection.",
            ),
            local_cache_lookups: counters(
                "stickless_local_cache_lookups_total",
                "Session loads looked up in the local cache (--local-cache), by result: a hit costs no round trip to Redis; outdated is a copy older than the user's own last change; joined waited for another request's read or change of the same session and was served what it read or wrote.",
                "result",
                &names(CacheLookup::ALL, CacheLookup::as_str),
            ),
            local_cache_invalidations: counter(
                "stickless_local_cache_invalidations_total",
                "Sessions dropped from the local cache by an invalidation from Redis or a change made by this instance.",
            ),
            local_cache_flushes: counter(
                "stickless_local_cache_flushes_total",
                "Times the whole local cache was dropped (a reconnection, a failover, a lost invalidation channel).",
            ),
            replica_reads: counters(
                "stickless_replica_reads_total",
                "Session loads with --read-from replica, by where they went: replica; behind (the replica's copy was older than the user's own last change, read from the primary); primary_fallback (no replica could answer).",
                "result",
                &names(ReplicaRead::ALL, ReplicaRead::as_str),
            ),
            registry,
            families: Vec::new(),
        };
        Metrics {
            families: families.into_inner(),
            ..metrics
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

    /// Counts a failed backend call.
    pub fn upstream_error(&self, reason: UpstreamFailure) {
        self.upstream_errors[reason as usize].inc();
    }

    /// Counts a request refused as the client's fault.
    pub fn client_error(&self, reason: ClientFault) {
        self.client_errors[reason as usize].inc();
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

    /// Counts a failed store call.
    pub fn store_error(&self, kind: StoreFailure) {
        self.store_errors[kind as usize].inc();
    }

    /// Records the circuit breaker's state.
    pub fn breaker_state(&self, state: BreakerState) {
        self.breaker_state.set(state as i64);
    }

    /// Counts a transition of the circuit breaker.
    pub fn breaker_transition(&self, to: BreakerTransition) {
        self.breaker_transitions[to as usize].inc();
    }

    /// The gauge of open connections on `listener`, for its accept loop to move.
    pub fn open_connections(&self, listener: Listener) -> IntGauge {
        self.open_connections[listener as usize].clone()
    }

    /// Counts a connection to the store made again (not the first).
    pub fn store_reconnected(&self) {
        self.store_reconnections.inc();
    }

    /// Counts an answer showing the store's node is no longer the primary.
    pub fn store_topology_error(&self) {
        self.store_topology_errors.inc();
    }

    /// Counts a store call sent once more because its first try provably did not run.
    pub fn store_retried(&self) {
        self.store_retries.inc();
    }

    /// Counts a failover seen: a new primary after a reconnection.
    pub fn store_failover(&self) {
        self.store_failovers.inc();
    }

    /// Counts a lookup in the local cache (`--local-cache`).
    pub fn local_cache_lookup(&self, result: CacheLookup) {
        self.local_cache_lookups[result as usize].inc();
    }

    /// Counts a session dropped from the local cache by an invalidation.
    pub fn local_cache_invalidated(&self) {
        self.local_cache_invalidations.inc();
    }

    /// Counts a flush of the whole local cache.
    pub fn local_cache_flushed(&self) {
        self.local_cache_flushes.inc();
    }

    /// Counts a session load made with `--read-from replica`, by where it went.
    pub fn replica_read(&self, result: ReplicaRead) {
        self.replica_reads[result as usize].inc();
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

    /// The value of one series in the text format.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// The label and every value of it that `family` must export from the start; `None` for a
    /// family without labels. A family missing here fails the test, so a new one cannot be
    /// added without saying what it exports.
    fn start_up_series(family: &str) -> Option<(&'static str, Vec<&'static str>)> {
        fn all<L: Copy>(
            label: &'static str,
            values: &[L],
            f: fn(L) -> &'static str,
        ) -> Option<(&'static str, Vec<&'static str>)> {
            Some((label, values.iter().map(|v| f(*v)).collect()))
        }
        match family {
            "stickless_request_duration_seconds" => Some(("status", STATUS_CLASSES.to_vec())),
            "stickless_store_duration_seconds" => all("op", StoreOp::ALL, StoreOp::as_str),
            "stickless_session_lookups_total" => all("result", Lookup::ALL, Lookup::as_str),
            "stickless_session_events_total" => all("event", Event::ALL, Event::as_str),
            "stickless_upstream_errors_total" => {
                all("reason", UpstreamFailure::ALL, UpstreamFailure::as_str)
            }
            "stickless_client_errors_total" => all("reason", ClientFault::ALL, ClientFault::as_str),
            "stickless_open_connections" => all("listener", Listener::ALL, Listener::as_str),
            "stickless_store_errors_total" => all("kind", StoreFailure::ALL, StoreFailure::as_str),
            "stickless_breaker_transitions_total" => {
                all("to", BreakerTransition::ALL, BreakerTransition::as_str)
            }
            "stickless_build_info" => Some(("version", vec![env!("CARGO_PKG_VERSION")])),
            "stickless_upstream_duration_seconds"
            | "stickless_breaker_state"
            | "stickless_spoofed_headers_total"
            | "stickless_upstream_retries_total"
            | "stickless_store_reconnections_total"
            | "stickless_store_topology_errors_total"
            | "stickless_store_retries_total"
            | "stickless_store_failovers_total"
            | "stickless_local_cache_invalidations_total"
            | "stickless_local_cache_flushes_total" => None,
            "stickless_local_cache_lookups_total" => {
                Some(("result", vec!["hit", "joined", "miss", "outdated"]))
            }
            "stickless_replica_reads_total" => {
                Some(("result", vec!["replica", "behind", "primary_fallback"]))
            }
            other => panic!("say which series {other} exports from the start"),
        }
    }

    #[test]
    fn every_family_exports_every_label_value_from_the_start() {
        use prometheus::proto::MetricType;
        let m = Metrics::new();
        let gathered = m.registry.gather();
        assert!(m.families.len() >= 18, "{:?}", m.families);
        for family in &m.families {
            let mf = gathered
                .iter()
                .find(|mf| mf.name() == family)
                .unwrap_or_else(|| panic!("{family} is registered but exports no series"));
            let mut seen: Vec<&str> = Vec::new();
            for metric in mf.get_metric() {
                let labels = metric.get_label();
                let value = match mf.get_field_type() {
                    MetricType::COUNTER => metric.get_counter().get_value(),
                    MetricType::GAUGE => metric.get_gauge().get_value(),
                    MetricType::HISTOGRAM => metric.get_histogram().get_sample_count() as f64,
                    other => panic!("{family}: unexpected type {other:?}"),
                };
                let expected = if family == "stickless_build_info" {
                    1.0
                } else {
                    0.0
                };
                assert_eq!(value, expected, "{family} {labels:?}");
                match start_up_series(family) {
                    Some((label, _)) => {
                        assert_eq!(labels.len(), 1, "{family}: {labels:?}");
                        assert_eq!(labels[0].name(), label, "{family}");
                        seen.push(labels[0].value());
                    }
                    None => assert!(labels.is_empty(), "{family}: {labels:?}"),
                }
            }
            match start_up_series(family) {
                Some((_, mut values)) => {
                    values.sort_unstable();
                    seen.sort_unstable();
                    assert_eq!(seen, values, "{family}");
                }
                None => assert_eq!(mf.get_metric().len(), 1, "{family}"),
            }
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_families_are_exported() {
        let text = Metrics::new().render();
        for family in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(value(&text, family).is_some(), "no {family} in\n{text}");
        }
        let rss = value(&text, "process_resident_memory_bytes").unwrap_or_default();
        assert!(rss > 0.0, "resident memory {rss}");
    }

    #[test]
    fn store_counters_count() {
        let m = Metrics::new();
        m.store_reconnected();
        m.store_reconnected();
        (0..4).for_each(|_| m.store_topology_error());
        (0..5).for_each(|_| m.store_retried());
        m.store_failover();
        let text = m.render();
        assert_eq!(
            value(&text, "stickless_store_reconnections_total"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "stickless_store_topology_errors_total"),
            Some(4.0)
        );
        assert_eq!(value(&text, "stickless_store_retries_total"), Some(5.0));
        assert_eq!(value(&text, "stickless_store_failovers_total"), Some(1.0));
    }

    #[test]
    fn each_value_counts_under_its_own_label() {
        let m = Metrics::new();
        for (i, op) in StoreOp::ALL.iter().enumerate() {
            for _ in 0..=i {
                m.store(*op, Duration::from_millis(1));
            }
        }
        for (i, l) in Lookup::ALL.iter().enumerate() {
            (0..=i).for_each(|_| m.lookup(*l));
        }
        for (i, e) in Event::ALL.iter().enumerate() {
            (0..=i).for_each(|_| m.event(*e));
        }
        for (i, r) in UpstreamFailure::ALL.iter().enumerate() {
            (0..=i).for_each(|_| m.upstream_error(*r));
        }
        for (i, r) in ClientFault::ALL.iter().enumerate() {
            (0..=i).for_each(|_| m.client_error(*r));
        }
        for (i, l) in Listener::ALL.iter().enumerate() {
            m.open_connections(*l).add(i as i64 + 1);
        }
        for (i, k) in StoreFailure::ALL.iter().enumerate() {
            (0..=i).for_each(|_| m.store_error(*k));
        }
        for (i, t) in BreakerTransition::ALL.iter().enumerate() {
            (0..=i).for_each(|_| m.breaker_transition(*t));
        }
        for (i, status) in [101u16, 204, 302, 404, 503].iter().enumerate() {
            (0..=i).for_each(|_| m.request(*status, Duration::from_millis(1)));
        }
        let text = m.render();
        let n = |i: usize| Some((i + 1) as f64);
        for (i, op) in StoreOp::ALL.iter().enumerate() {
            let s = format!(
                "stickless_store_duration_seconds_count{{op=\"{}\"}}",
                op.as_str()
            );
            assert_eq!(value(&text, &s), n(i), "{s}");
        }
        for (i, l) in Lookup::ALL.iter().enumerate() {
            let s = format!(
                "stickless_session_lookups_total{{result=\"{}\"}}",
                l.as_str()
            );
            assert_eq!(value(&text, &s), n(i), "{s}");
        }
        for (i, e) in Event::ALL.iter().enumerate() {
            let s = format!("stickless_session_events_total{{event=\"{}\"}}", e.as_str());
            assert_eq!(value(&text, &s), n(i), "{s}");
        }
        for (i, r) in UpstreamFailure::ALL.iter().enumerate() {
            let s = format!(
                "stickless_upstream_errors_total{{reason=\"{}\"}}",
                r.as_str()
            );
            assert_eq!(value(&text, &s), n(i), "{s}");
        }
        for (i, r) in ClientFault::ALL.iter().enumerate() {
            let s = format!("stickless_client_errors_total{{reason=\"{}\"}}", r.as_str());
            assert_eq!(value(&text, &s), n(i), "{s}");
        }
        for (i, class) in STATUS_CLASSES.iter().enumerate() {
            let s = format!("stickless_request_duration_seconds_count{{status=\"{class}\"}}");
            assert_eq!(value(&text, &s), n(i), "{s}");
        }
        for (i, l) in Listener::ALL.iter().enumerate() {
            let s = format!("stickless_open_connections{{listener=\"{}\"}}", l.as_str());
            assert_eq!(value(&text, &s), n(i), "{s}");
        }
        for (i, k) in StoreFailure::ALL.iter().enumerate() {
            let s = format!("stickless_store_errors_total{{kind=\"{}\"}}", k.as_str());
            assert_eq!(value(&text, &s), n(i), "{s}");
        }
        for (i, t) in BreakerTransition::ALL.iter().enumerate() {
            let s = format!(
                "stickless_breaker_transitions_total{{to=\"{}\"}}",
                t.as_str()
            );
            assert_eq!(value(&text, &s), n(i), "{s}");
        }
    }

    #[test]
    fn the_breaker_state_is_its_position_in_the_list() {
        let m = Metrics::new();
        for (i, state) in BreakerState::ALL.iter().enumerate() {
            m.breaker_state(*state);
            let text = m.render();
            assert_eq!(
                value(&text, "stickless_breaker_state"),
                Some(i as f64),
                "{}",
                state.as_str()
            );
        }
        assert_eq!(
            BreakerState::ALL,
            &[
                BreakerState::Closed,
                BreakerState::Open,
                BreakerState::HalfOpen
            ]
        );
    }
}
