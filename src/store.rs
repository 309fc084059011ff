//! The session store: the [`SessionStore`] trait the proxy talks to, its error type, and the two
//! implementations, Redis (ElastiCache, Valkey) in [`redis`] and the embedded in-memory default in
//! [`memory`].
//!
//! A session is a set of fields plus its creation time. Every operation is atomic in the store:
//! a load renews the sliding TTL in the same step, and a change applies field by field, all or
//! nothing, and never brings back a session that expired in the meantime.

pub mod memory;
pub mod redis;

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::config::TtlPolicy;
use crate::cookie::SessionId;
use crate::protocol::{Changes, Fields, Rejection};

/// The hash field that holds a session's creation time in milliseconds since the Unix epoch.
/// Its `_` keeps it apart from every protocol field name.
pub const CREATED_FIELD: &str = "_created";

/// A loaded session.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    /// The fields the backend sees.
    pub fields: Fields,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .field("created_ms", &self.created_ms)
            .finish()
    }
}

/// Which session a change goes to.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A session that was loaded for this request. If it has expired since, nothing is written.
    Existing,
    /// A session created under a fresh id, starting from `base` (the fields moved by a rotation)
    /// or empty.
    New {
        /// Fields and creation time carried over, if any.
        base: Option<&'a Session>,
    },
}

/// What became of a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Stored and acknowledged. `created_ms` is the session's creation time.
    Stored {
        /// Creation time of the session written to.
        created_ms: u64,
    },
    /// The existing session had expired or been deleted: nothing was written.
    Gone,
    /// Refused by the limits or by an impossible increment: nothing was written.
    Rejected(Rejection),
}

/// A store call that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No answer within the configured bound.
    #[error("the session store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store ran the call after its deadline, when the caller had already given up (a
    /// stalled store answering late): nothing was changed.
    #[error("the session store ran the call after its deadline of {0:?}; nothing was changed")]
    Late(Duration),
    /// The Redis client reported an error.
    #[error("redis error")]
    Redis(#[from] fred::error::Error),
    /// Redis answered something the store cannot read.
    #[error("unexpected reply from the session store: {0}")]
    Unexpected(&'static str),
}

/// Where sessions live. Implementations bound every call by their own timeout.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Loads a session and renews its idle TTL in the same atomic step (one round trip).
    /// `None` when it does not exist or has reached its absolute timeout.
    async fn load(&self, id: &SessionId) -> Result<Option<Session>, StoreError>;

    /// Applies field changes atomically, checking the limits against what is stored at that
    /// moment, and renews the TTL.
    async fn apply(
        &self,
        id: &SessionId,
        target: Target<'_>,
        changes: &Changes,
    ) -> Result<Applied, StoreError>;

    /// Reads and deletes a session in one atomic step (the first half of a rotation).
    async fn take(&self, id: &SessionId) -> Result<Option<Session>, StoreError>;

    /// Deletes a session.
    async fn destroy(&self, id: &SessionId) -> Result<(), StoreError>;

    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The TTL a session gets now: the idle timeout, cut short by the absolute timeout.
/// `None` when the absolute timeout has passed.
pub(crate) fn ttl_now(ttl: &TtlPolicy, created_ms: u64, now_ms: u64) -> Option<Duration> {
    let idle = ttl.idle;
    match ttl.absolute {
        None => Some(idle),
        Some(abs) => {
            let end = created_ms.saturating_add(abs.as_millis() as u64);
            (end > now_ms).then(|| idle.min(Duration::from_millis(end - now_ms)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_cut_by_the_absolute_timeout() {
        let mut p = TtlPolicy {
            idle: Duration::from_secs(60),
            absolute: None,
        };
        assert_eq!(ttl_now(&p, 0, 10_000_000), Some(Duration::from_secs(60)));
        p.absolute = Some(Duration::from_secs(100));
        assert_eq!(ttl_now(&p, 1_000, 2_000), Some(Duration::from_secs(60)));
        assert_eq!(ttl_now(&p, 1_000, 91_000), Some(Duration::from_secs(10)));
        assert_eq!(ttl_now(&p, 1_000, 101_000), None);
        assert_eq!(ttl_now(&p, 1_000, 200_000), None);
    }
}
