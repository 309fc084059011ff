//! Telling systemd how the service is doing (`Type=notify`): `READY=1` once the listeners are
//! bound and the store has answered, `STOPPING=1` when a stop begins, and `STATUS=` lines that
//! `systemctl status` shows. Sent with the `sd-notify` crate to the socket in `NOTIFY_SOCKET`;
//! without that variable (not started by systemd) every call does nothing.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::shutdown::{Drain, Phase};
use crate::store::SessionStore;

/// Longest time from start-up (see [`starting`]) to `READY=1`: by then it is sent even if the
/// store has not answered. A store that is unreachable at start-up is not fatal (stickless serves,
/// `/readyz` answers 503 until it answers), and systemd would otherwise kill the service at its
/// start timeout and restart it in a loop through a Redis outage. The unit's `TimeoutStartSec` is
/// above it.
pub const READY_WAIT: Duration = Duration::from_secs(20);

/// Pause between two pings of a store that has not answered yet.
const PING_PAUSE: Duration = Duration::from_millis(250);

/// When the process began to start, for [`READY_WAIT`].
static STARTED: OnceLock<Instant> = OnceLock::new();

/// Marks the start of start-up: [`READY_WAIT`] counts from here, so that the time spent before
/// the listeners serve (TLS files, IAM credentials, the first Redis connection) counts too.
pub fn starting() {
    let _ = STARTED.get_or_init(Instant::now);
}

/// Sends `states` to systemd; a failure is logged, never fatal.
fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// Waits until `store` answers a ping, or [`READY_WAIT`] has passed since [`starting`], then
/// sends `READY=1` with a status saying which. Call it once the listeners are bound. A stop that
/// begins first ends the wait without `READY=1` (`STOPPING=1` says the rest).
pub async fn ready_when_store_answers(store: Arc<dyn SessionStore>, mut drain: Drain) {
    let started = *STARTED.get_or_init(Instant::now);
    let wait = READY_WAIT.saturating_sub(started.elapsed());
    let answers = async {
        while store.ping().await.is_err() {
            tokio::time::sleep(PING_PAUSE).await;
        }
    };
    let answered = tokio::select! {
        answered = tokio::time::timeout(wait, answers) => answered.is_ok(),
        () = drain.reached(Phase::Draining) => return,
    };
    if answered {
        send(&[
            NotifyState::Ready,
            NotifyState::Status("serving; the session store answers"),
        ]);
    } else {
        tracing::warn!(
            wait = ?READY_WAIT,
            "the session store has not answered since start-up; serving anyway (/readyz answers 503 until it does)"
        );
        send(&[
            NotifyState::Ready,
            NotifyState::Status("serving; the session store does not answer yet (/readyz 503)"),
        ]);
    }
}

/// Tells systemd about a phase of the stop: `STOPPING=1` as the drain begins.
pub fn phase(phase: Phase) {
    match phase {
        Phase::Serving => {}
        Phase::Draining => send(&[
            NotifyState::Stopping,
            NotifyState::Status("draining: not ready, still accepting for the drain delay"),
        ]),
        Phase::Closing => send(&[NotifyState::Status(
            "closing: listeners closed, finishing requests in flight",
        )]),
        Phase::Cut => send(&[NotifyState::Status(
            "shutdown timeout reached: dropping what is left",
        )]),
    }
}
