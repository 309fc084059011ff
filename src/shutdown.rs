//! Stopping: the requests to stop (SIGTERM, SIGINT) and the phases of a graceful stop that the
//! servers and the admin endpoint follow.
//!
//! A stop runs in three [`Phase`]s. **Draining** starts at the first request to stop: `/readyz`
//! answers 503 so that the load balancer takes the instance out, while the listeners keep
//! accepting (the load balancer goes on sending until its health check has failed enough times)
//! and every HTTP/1 response carries `Connection: close` (h2 connections get a GOAWAY), so that
//! clients move to other instances. After the drain delay, or at once on a second request to
//! stop, **Closing**: the listeners close and the requests and upgraded tunnels in flight get
//! the shutdown timeout to finish. Past it, **Cut**: what is left is dropped.
//!
//! The servers take their stop as an argument (a [`Shutdown`] or, for the simple servers, a
//! future), which is what lets tests stop them; the binary passes [`Shutdown::on_signals`].

use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// Where a server is in its stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Not stopping.
    Serving,
    /// Asked to stop: not ready, still accepting, closing connections as their responses end.
    Draining,
    /// Listeners closed; what is in flight may finish within the shutdown timeout.
    Closing,
    /// The shutdown timeout has passed: connections still open are dropped.
    Cut,
}

/// The phase of a stop, as the servers and the admin endpoint see it. Cloned into each of them.
#[derive(Debug, Clone)]
pub struct Drain(watch::Receiver<Phase>, Arc<AtomicBool>);

/// Moves a [`Drain`] through its phases; held by whatever runs the stop.
#[derive(Debug)]
pub struct DrainControl(watch::Sender<Phase>, Arc<AtomicBool>);

impl Drain {
    /// A drain in [`Phase::Serving`], and the control that moves it on.
    pub fn new() -> (DrainControl, Drain) {
        let (tx, rx) = watch::channel(Phase::Serving);
        // Whether the drain has begun, read by every request: an atomic, not the channel's lock.
        let draining = Arc::new(AtomicBool::new(false));
        (DrainControl(tx, draining.clone()), Drain(rx, draining))
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }

    /// Whether a stop has begun (`/readyz` then answers 503).
    pub fn is_draining(&self) -> bool {
        self.1.load(Ordering::Acquire)
    }

    /// Completes once the phase is `phase` or later. Also completes if the control is dropped
    /// without getting there: nothing can move the phase any more, so nothing is worth waiting
    /// for.
    pub async fn reached(&mut self, phase: Phase) {
        let _ = self.0.wait_for(|p| *p >= phase).await;
    }

    /// Completes at the next change of phase (never, once the control is gone).
    pub(crate) async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The phase now, marked as seen for [`Drain::changed`].
    pub(crate) fn phase_and_mark_seen(&mut self) -> Phase {
        *self.0.borrow_and_update()
    }
}

impl DrainControl {
    /// Moves to `phase`, unless the drain is already there or further on.
    pub fn enter(&self, phase: Phase) {
        if phase >= Phase::Draining {
            self.1.store(true, Ordering::Release);
        }
        self.0.send_if_modified(|p| {
            let later = phase > *p;
            if later {
                *p = phase;
            }
            later
        });
    }
}

/// Requests to stop, counted: the first begins the drain, a second cuts its delay short.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<u32>);

/// Asks a [`Shutdown`] to stop; what a test or an embedding program holds instead of a signal.
#[derive(Debug, Clone)]
pub struct Stopper(watch::Sender<u32>);

impl Stopper {
    /// One more request to stop.
    pub fn stop(&self) {
        self.0.send_modify(|n| *n = n.saturating_add(1));
    }
}

impl Shutdown {
    /// A shutdown requested through the returned [`Stopper`].
    pub fn new() -> (Stopper, Shutdown) {
        let (tx, rx) = watch::channel(0);
        (Stopper(tx), Shutdown(rx))
    }

    /// A shutdown requested by SIGTERM or SIGINT (Ctrl-C), each signal counting once. Must be
    /// called inside a tokio runtime.
    pub fn on_signals() -> Shutdown {
        let (stopper, shutdown) = Shutdown::new();
        tokio::spawn(async move {
            loop {
                signal().await;
                stopper.stop();
            }
        });
        shutdown
    }

    /// Completes once stopping has been requested `times` times. Never completes if the
    /// [`Stopper`] is gone before that.
    pub async fn requested(&mut self, times: u32) {
        if self.0.wait_for(|n| *n >= times).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Runs a stop for `drain`: waits for the first request to stop, drains for `drain_delay` (cut
/// short by a second request), then closes and, `shutdown_timeout` later, cuts. `on_phase` is
/// told of each phase as it begins (the binary reports them to systemd).
pub async fn run(
    mut shutdown: Shutdown,
    control: DrainControl,
    drain_delay: Duration,
    shutdown_timeout: Duration,
    on_phase: impl Fn(Phase),
) {
    shutdown.requested(1).await;
    tracing::info!(
        drain_delay = ?drain_delay,
        shutdown_timeout = ?shutdown_timeout,
        "stopping: not ready any more, still accepting for the drain delay (a second SIGTERM or Ctrl-C skips it)"
    );
    control.enter(Phase::Draining);
    on_phase(Phase::Draining);
    tokio::select! {
        () = tokio::time::sleep(drain_delay) => {}
        () = shutdown.requested(2) => tracing::info!("asked again to stop: drain delay cut short"),
    }
    tracing::info!("closing the listeners; waiting for requests and tunnels in flight");
    control.enter(Phase::Closing);
    on_phase(Phase::Closing);
    tokio::time::sleep(shutdown_timeout).await;
    control.enter(Phase::Cut);
    on_phase(Phase::Cut);
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM, whichever comes first.
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("interrupted; shutting down"),
        () = term => tracing::info!("terminated; shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stop_drains_then_closes_then_cuts() {
        let (stopper, shutdown) = Shutdown::new();
        let (control, mut drain) = Drain::new();
        let run = tokio::spawn(run(
            shutdown,
            control,
            Duration::from_secs(5),
            Duration::from_secs(30),
            |_| {},
        ));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            drain.phase(),
            Phase::Serving,
            "nothing happens before a request"
        );
        stopper.stop();
        drain.reached(Phase::Draining).await;
        let draining = tokio::time::Instant::now();
        assert!(drain.is_draining());
        drain.reached(Phase::Closing).await;
        assert_eq!(draining.elapsed(), Duration::from_secs(5));
        drain.reached(Phase::Cut).await;
        assert_eq!(draining.elapsed(), Duration::from_secs(35));
        run.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_request_skips_the_rest_of_the_drain_delay() {
        let (stopper, shutdown) = Shutdown::new();
        let (control, mut drain) = Drain::new();
        tokio::spawn(run(
            shutdown,
            control,
            Duration::from_secs(5),
            Duration::from_secs(30),
            |_| {},
        ));
        stopper.stop();
        drain.reached(Phase::Draining).await;
        let draining = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        stopper.stop();
        drain.reached(Phase::Closing).await;
        assert_eq!(draining.elapsed(), Duration::from_secs(1));
    }

    #[test]
    fn phases_only_move_forward() {
        let (control, drain) = Drain::new();
        control.enter(Phase::Closing);
        control.enter(Phase::Draining);
        assert_eq!(drain.phase(), Phase::Closing);
    }
}
