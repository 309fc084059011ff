//! A circuit breaker in front of a store, so that a store that is down costs each request
//! nothing instead of the store timeout.
//!
//! - **Closed**: calls go to the store. A failure of the store itself — no answer in time
//!   ([`StoreError::Timeout`]) or a failed client ([`StoreError::Backend`]: a lost or refused
//!   connection, an error reply) — counts; anything the store answers, a refused change or a
//!   script refused as late included, resets the count. [`BreakerConfig::failures`] failures in
//!   a row open the breaker.
//! - **Open**: every call fails at once with [`StoreError::CircuitOpen`]. A probe task pings the
//!   store [`BreakerConfig::probe_interval`] after the breaker opened, and again that long after
//!   each failed probe: a fixed interval, so a store that comes back is in use again within about
//!   one interval, and a store that stays down gets one ping per interval at most.
//! - **Half-open**: a probe is in flight (one at a time, as it is a single task); calls still fail
//!   at once. A probe that succeeds closes the breaker, one that fails opens it again.
//!
//! Calls that were already in flight when the breaker opened finish as they will; their outcome
//! does not move the breaker: only the probe closes it. The timers are tokio's, so the tests run
//! on paused time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Applied, Loaded, Session, SessionStore, StoreError, Target};
use crate::config::BreakerConfig;
use crate::cookie::SessionId;
use crate::metrics::{BreakerState, BreakerTransition, Metrics, StoreFailure};
use crate::protocol::Changes;
use crate::request_scope::in_request;

/// A [`SessionStore`] that fails calls at once while the store it wraps is known to be down.
pub struct Breaker {
    shared: Arc<Shared>,
}

/// What the breaker and its probe task share. The probe holds it weakly, so that it ends with the
/// breaker.
struct Shared {
    inner: Arc<dyn SessionStore>,
    config: BreakerConfig,
    // A std mutex: it is held for a few instructions, never across an await.
    state: Mutex<State>,
    /// Mirrors of the state, written under the lock and read without it by every call: whether
    /// the breaker is closed, and whether any failure is counted. A call that finds it closed
    /// with nothing counted, and succeeds, takes no lock.
    closed: AtomicBool,
    failing: AtomicBool,
    metrics: OnceLock<Metrics>,
}

struct State {
    now: BreakerState,
    /// Consecutive failures while closed.
    failures: usize,
    /// When the breaker last opened, for the log line that says how long the outage lasted.
    opened_at: Option<Instant>,
}

impl Breaker {
    /// A closed breaker in front of `inner`.
    pub fn new(inner: Arc<dyn SessionStore>, config: BreakerConfig) -> Self {
        Breaker {
            shared: Arc::new(Shared {
                inner,
                config,
                state: Mutex::new(State {
                    now: BreakerState::Closed,
                    failures: 0,
                    opened_at: None,
                }),
                closed: AtomicBool::new(true),
                failing: AtomicBool::new(false),
                metrics: OnceLock::new(),
            }),
        }
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        self.shared.lock().now
    }

    /// Runs `call` on the store unless the breaker is open, and counts its outcome. The future is
    /// only built, never polled, when the breaker is open.
    async fn guard<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !self.shared.closed.load(Ordering::Acquire) {
            self.shared.count_error(&StoreError::CircuitOpen);
            return Err(StoreError::CircuitOpen);
        }
        let result = call.await;
        if let Err(e) = &result {
            self.shared.count_error(e);
        }
        let outage = matches!(result, Err(StoreError::Timeout(_) | StoreError::Backend(_)));
        if self.shared.after_call(outage) {
            tokio::spawn(probe(
                Arc::downgrade(&self.shared),
                self.shared.config.probe_interval,
            ));
        }
        result
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is valid after any panic: each change is a single assignment.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a call's outcome while closed; true when this failure opened the breaker.
    fn after_call(&self, outage: bool) -> bool {
        if !outage && !self.failing.load(Ordering::Acquire) {
            return false;
        }
        let mut state = self.lock();
        if state.now != BreakerState::Closed {
            return false;
        }
        if !outage {
            state.failures = 0;
            self.failing.store(false, Ordering::Release);
            return false;
        }
        state.failures += 1;
        self.failing.store(true, Ordering::Release);
        if state.failures < self.config.failures {
            return false;
        }
        state.now = BreakerState::Open;
        self.closed.store(false, Ordering::Release);
        state.opened_at = Some(Instant::now());
        drop(state);
        in_request(|| {
            tracing::warn!(
            failures = self.config.failures,
            "session store down: circuit breaker open, store calls fail at once until a probe succeeds"
        )
        });
        self.record(BreakerState::Open, Some(BreakerTransition::Open));
        true
    }

    /// Moves between open and half-open, or closes, as the probe finds.
    fn set(&self, to: BreakerState) {
        let mut state = self.lock();
        let from = std::mem::replace(&mut state.now, to);
        self.closed
            .store(to == BreakerState::Closed, Ordering::Release);
        let outage = if to == BreakerState::Closed {
            state.failures = 0;
            self.failing.store(false, Ordering::Release);
            state.opened_at.take().map(|t| t.elapsed())
        } else {
            None
        };
        drop(state);
        let transition = match (from, to) {
            (BreakerState::Closed, _) | (_, BreakerState::Open | BreakerState::HalfOpen) => None,
            (_, BreakerState::Closed) => Some(BreakerTransition::Closed),
        };
        if transition.is_some() {
            in_request(
                || tracing::info!(down_for = ?outage, "session store answers again: circuit breaker closed"),
            );
        }
        self.record(to, transition);
    }

    fn record(&self, state: BreakerState, transition: Option<BreakerTransition>) {
        if let Some(m) = self.metrics.get() {
            m.breaker_state(state);
            if let Some(t) = transition {
                m.breaker_transition(t);
            }
        }
    }

    fn count_error(&self, e: &StoreError) {
        if let Some(m) = self.metrics.get() {
            m.store_error(failure_kind(e));
        }
    }
}

/// The `kind` label of a failed call.
fn failure_kind(e: &StoreError) -> StoreFailure {
    match e {
        StoreError::Timeout(_) => StoreFailure::Timeout,
        StoreError::Backend(_) => StoreFailure::Connection,
        StoreError::CircuitOpen => StoreFailure::CircuitOpen,
        StoreError::NotReplicated => StoreFailure::NotReplicated,
        StoreError::Late(_) | StoreError::Unexpected(_) => StoreFailure::Other,
    }
}

/// Pings the store every `interval` while the breaker is open, one ping at a time, until one
/// succeeds (the breaker closes) or the breaker is gone.
async fn probe(shared: Weak<Shared>, interval: std::time::Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.set(BreakerState::HalfOpen);
        // The store bounds the ping by its own timeout.
        match shared.inner.ping().await {
            Ok(()) => {
                shared.set(BreakerState::Closed);
                return;
            }
            Err(e) => {
                shared.count_error(&e);
                shared.set(BreakerState::Open);
            }
        }
    }
}

#[async_trait]
impl SessionStore for Breaker {
    async fn load(&self, id: &SessionId) -> Result<Loaded, StoreError> {
        self.guard(self.shared.inner.load(id)).await
    }

    async fn load_since(&self, id: &SessionId, min_version: u64) -> Result<Loaded, StoreError> {
        self.guard(self.shared.inner.load_since(id, min_version))
            .await
    }

    fn serves_copies(&self) -> bool {
        self.shared.inner.serves_copies()
    }

    async fn apply(
        &self,
        id: &SessionId,
        target: Target<'_>,
        changes: &Changes,
    ) -> Result<Applied, StoreError> {
        self.guard(self.shared.inner.apply(id, target, changes))
            .await
    }

    async fn take(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        self.guard(self.shared.inner.take(id)).await
    }

    async fn restore(&self, id: &SessionId) -> Result<Applied, StoreError> {
        self.guard(self.shared.inner.restore(id)).await
    }

    async fn destroy(&self, id: &SessionId) -> Result<(), StoreError> {
        self.guard(self.shared.inner.destroy(id)).await
    }

    /// While open, fails at once: `/readyz` says not ready without waiting on a timeout.
    async fn ping(&self) -> Result<(), StoreError> {
        self.guard(self.shared.inner.ping()).await
    }

    fn record_into(&self, metrics: &Metrics) {
        if self.shared.metrics.set(metrics.clone()).is_ok() {
            metrics.breaker_state(self.state());
        }
        self.shared.inner.record_into(metrics);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::protocol::Rejection;

    const TIMEOUT: Duration = Duration::from_secs(1);
    const INTERVAL: Duration = Duration::from_millis(500);

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Mode {
        /// Answers at once.
        Up,
        /// Answers nothing: every call waits out the timeout.
        Stalled,
        /// The connection is refused at once.
        Refused,
        /// Answers that the script ran too late (an answer, not an outage).
        Late,
    }

    /// A store whose health the test sets, counting the calls that reach it.
    struct Fake {
        mode: Mutex<Mode>,
        ping_takes: Mutex<Duration>,
        calls: AtomicUsize,
        pings: AtomicUsize,
    }

    impl Fake {
        fn new() -> Arc<Self> {
            Arc::new(Fake {
                mode: Mutex::new(Mode::Up),
                ping_takes: Mutex::new(Duration::ZERO),
                calls: AtomicUsize::new(0),
                pings: AtomicUsize::new(0),
            })
        }

        fn set(&self, mode: Mode) {
            *self.mode.lock().unwrap() = mode;
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn pings(&self) -> usize {
            self.pings.load(Ordering::SeqCst)
        }

        async fn answer<T>(&self, value: T) -> Result<T, StoreError> {
            let mode = *self.mode.lock().unwrap();
            match mode {
                Mode::Up => Ok(value),
                Mode::Stalled => {
                    tokio::time::sleep(TIMEOUT).await;
                    Err(StoreError::Timeout(TIMEOUT))
                }
                Mode::Refused => Err(StoreError::Backend(Box::new(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                )))),
                Mode::Late => Err(StoreError::Late(TIMEOUT)),
            }
        }
    }

    #[async_trait]
    impl SessionStore for Fake {
        async fn load(&self, _: &SessionId) -> Result<Loaded, StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.answer(Loaded::Absent).await
        }
        async fn apply(
            &self,
            _: &SessionId,
            _: Target<'_>,
            _: &Changes,
        ) -> Result<Applied, StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.answer(Applied::Rejected(Rejection::TooManyFields {
                count: 2,
                max: 1,
            }))
            .await
        }
        async fn take(&self, _: &SessionId) -> Result<Option<Session>, StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.answer(None).await
        }
        async fn restore(&self, _: &SessionId) -> Result<Applied, StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.answer(Applied::Gone).await
        }
        async fn destroy(&self, _: &SessionId) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.answer(()).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.pings.fetch_add(1, Ordering::SeqCst);
            let takes = *self.ping_takes.lock().unwrap();
            tokio::time::sleep(takes).await;
            self.answer(()).await
        }
    }

    fn breaker(fake: &Arc<Fake>) -> Breaker {
        Breaker::new(
            fake.clone(),
            BreakerConfig {
                failures: 3,
                probe_interval: INTERVAL,
            },
        )
    }

    fn id() -> SessionId {
        SessionId::generate()
    }

    /// Fails `n` loads through the breaker.
    async fn fail(b: &Breaker, n: usize) {
        for _ in 0..n {
            assert!(b.load(&id()).await.is_err());
        }
    }

    /// The value of one series in `/metrics`.
    fn metric(m: &Metrics, series: &str) -> f64 {
        m.render()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(f64::NAN)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_timeouts_and_then_fails_at_once() {
        let fake = Fake::new();
        let b = breaker(&fake);
        fake.set(Mode::Stalled);
        let started = Instant::now();
        fail(&b, 2).await;
        assert_eq!(b.state(), BreakerState::Closed);
        fail(&b, 1).await;
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            started.elapsed(),
            3 * TIMEOUT,
            "each failure waited out the timeout"
        );

        let started = Instant::now();
        for _ in 0..10 {
            assert!(matches!(b.load(&id()).await, Err(StoreError::CircuitOpen)));
            assert!(matches!(
                b.apply(&id(), Target::Existing, &Changes::default()).await,
                Err(StoreError::CircuitOpen)
            ));
            assert!(matches!(b.ping().await, Err(StoreError::CircuitOpen)));
        }
        assert_eq!(started.elapsed(), Duration::ZERO, "no call waited");
        assert_eq!(fake.calls(), 3, "no call reached the store");
    }

    #[tokio::test(start_paused = true)]
    async fn refused_connections_open_it_too() {
        let fake = Fake::new();
        let b = breaker(&fake);
        fake.set(Mode::Refused);
        fail(&b, 3).await;
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn any_answer_resets_the_count() {
        let fake = Fake::new();
        let b = breaker(&fake);
        for answer in [Mode::Up, Mode::Late] {
            fake.set(Mode::Stalled);
            fail(&b, 2).await;
            fake.set(answer);
            let _ = b.load(&id()).await;
        }
        // A refused change is the store's answer, not a failure.
        fake.set(Mode::Up);
        let applied = b.apply(&id(), Target::Existing, &Changes::default()).await;
        assert!(matches!(applied, Ok(Applied::Rejected(_))));
        fake.set(Mode::Stalled);
        fail(&b, 2).await;
        assert_eq!(b.state(), BreakerState::Closed);
        // Late answers alone never open it.
        fake.set(Mode::Late);
        fail(&b, 10).await;
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn probes_once_per_interval_and_closes_when_the_store_answers() {
        let fake = Fake::new();
        let b = breaker(&fake);
        fake.set(Mode::Refused);
        fail(&b, 3).await;
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(fake.pings(), 0);

        // Still down: one ping per interval, no more, and the breaker stays open.
        tokio::time::sleep(INTERVAL * 10 + INTERVAL / 2).await;
        assert_eq!(fake.pings(), 10);
        assert_eq!(b.state(), BreakerState::Open);

        // Back up: the next probe closes it, and calls reach the store again.
        fake.set(Mode::Up);
        tokio::time::sleep(INTERVAL).await;
        assert_eq!(fake.pings(), 11);
        assert_eq!(b.state(), BreakerState::Closed);
        let calls = fake.calls();
        assert!(matches!(b.load(&id()).await, Ok(Loaded::Absent)));
        assert_eq!(fake.calls(), calls + 1);
        // The probe has ended: no more pings.
        tokio::time::sleep(INTERVAL * 4).await;
        assert_eq!(fake.pings(), 11);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_while_a_probe_is_in_flight() {
        let fake = Fake::new();
        let b = breaker(&fake);
        fake.set(Mode::Stalled);
        *fake.ping_takes.lock().unwrap() = INTERVAL * 3;
        fail(&b, 3).await;

        // The first probe starts after one interval and takes three.
        tokio::time::sleep(INTERVAL + INTERVAL / 2).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(fake.pings(), 1);
        let calls = fake.calls();
        assert!(matches!(b.load(&id()).await, Err(StoreError::CircuitOpen)));
        assert_eq!(fake.calls(), calls, "calls fail at once while half-open");
        tokio::time::sleep(INTERVAL * 2).await;
        assert_eq!(fake.pings(), 1, "one probe at a time");

        // It fails (a timeout after its slow start): open again until the next one.
        tokio::time::sleep(INTERVAL * 3).await;
        assert_eq!(b.state(), BreakerState::Open);
        fake.set(Mode::Up);
        *fake.ping_takes.lock().unwrap() = Duration::ZERO;
        tokio::time::sleep(INTERVAL).await;
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(fake.pings(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_of_calls_in_flight_when_it_opened_do_not_move_it() {
        let fake = Fake::new();
        let b = Arc::new(breaker(&fake));
        fake.set(Mode::Stalled);
        // Four calls at once: the third failure opens it, the fourth changes nothing.
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.load(&id()).await.is_err() })
            })
            .collect();
        for c in calls {
            assert!(c.await.unwrap());
        }
        assert_eq!(b.state(), BreakerState::Open);
        // Only a probe closes it; a store that answers again is found within one interval.
        fake.set(Mode::Up);
        assert!(matches!(b.load(&id()).await, Err(StoreError::CircuitOpen)));
        tokio::time::sleep(INTERVAL + INTERVAL / 2).await;
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn records_its_state_transitions_and_failures() {
        let fake = Fake::new();
        let b = breaker(&fake);
        let m = Metrics::new();
        b.record_into(&m);
        let state = |m: &Metrics| metric(m, "stickless_breaker_state");
        assert_eq!(state(&m), 0.0);

        fake.set(Mode::Stalled);
        fail(&b, 2).await;
        fake.set(Mode::Refused);
        fail(&b, 1).await;
        assert_eq!(state(&m), BreakerState::Open as i64 as f64);
        fail(&b, 2).await;
        assert_eq!(
            metric(&m, "stickless_breaker_transitions_total{to=\"open\"}"),
            1.0
        );
        assert_eq!(
            metric(&m, "stickless_store_errors_total{kind=\"timeout\"}"),
            2.0
        );
        assert_eq!(
            metric(&m, "stickless_store_errors_total{kind=\"connection\"}"),
            1.0
        );
        assert_eq!(
            metric(&m, "stickless_store_errors_total{kind=\"circuit_open\"}"),
            2.0
        );

        // A failed probe (refused: counted as such) leaves it open; re-opening is not a new trip.
        tokio::time::sleep(INTERVAL + INTERVAL / 2).await;
        assert_eq!(
            metric(&m, "stickless_store_errors_total{kind=\"connection\"}"),
            2.0
        );
        assert_eq!(state(&m), BreakerState::Open as i64 as f64);
        // A slow probe shows as half-open.
        *fake.ping_takes.lock().unwrap() = INTERVAL;
        fake.set(Mode::Up);
        tokio::time::sleep(INTERVAL + INTERVAL / 4).await;
        assert_eq!(state(&m), BreakerState::HalfOpen as i64 as f64);
        tokio::time::sleep(INTERVAL).await;
        assert_eq!(state(&m), 0.0);
        assert_eq!(
            metric(&m, "stickless_breaker_transitions_total{to=\"open\"}"),
            1.0
        );
        assert_eq!(
            metric(&m, "stickless_breaker_transitions_total{to=\"closed\"}"),
            1.0
        );
        fake.set(Mode::Late);
        fail(&b, 1).await;
        assert_eq!(
            metric(&m, "stickless_store_errors_total{kind=\"other\"}"),
            1.0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ends_its_probe_when_dropped() {
        let fake = Fake::new();
        let b = breaker(&fake);
        fake.set(Mode::Refused);
        fail(&b, 3).await;
        tokio::time::sleep(INTERVAL * 2 + INTERVAL / 2).await;
        assert_eq!(fake.pings(), 2);
        drop(b);
        tokio::time::sleep(INTERVAL * 4).await;
        assert_eq!(fake.pings(), 2);
        assert_eq!(Arc::strong_count(&fake), 1, "the probe let go of the store");
    }
}
