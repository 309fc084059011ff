//! The session store: the [`SessionStore`] trait the proxy talks to, its error type, and the two
//! implementations, Redis (ElastiCache, Valkey) in [`redis`] and the embedded in-memory default in
//! [`memory`]. Redis sits behind the circuit breaker of [`breaker`], which fails calls at once
//! while the store is known to be down, and can authenticate to ElastiCache with IAM tokens
//! ([`iam`]) instead of a password, and may keep hot sessions in a local cache ([`cache`]) that
//! Redis invalidates.
//!
//! A session is a set of fields plus its creation time. Every operation is atomic in the store:
//! a load renews the sliding TTL in the same step, and a change applies field by field, all or
//! nothing, and never brings back a session that expired in the meantime.
//!
//! A rotation takes a session from its old id and writes it under a new one. The take leaves a
//! *tombstone* under the old id for [`TtlPolicy::rotation_grace`]: the old fields, marked
//! rotated, never the new id's. A request that still carries the old cookie loads it as
//! [`Loaded::Rotated`], so the proxy can refuse it a session without handing it a cookie that
//! would replace the new one; and a rotation whose second step fails is undone from it with
//! [`SessionStore::restore`].

pub mod breaker;
pub mod cache;
pub mod iam;
pub mod memory;
pub mod redis;

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use http::{HeaderName, HeaderValue};

use crate::config::TtlPolicy;
use crate::cookie::SessionId;
use crate::metrics::Metrics;
use crate::protocol::{Changes, Fields, Rejection};

/// The hash field that holds a session's creation time in milliseconds since the Unix epoch.
/// Its `_` keeps it apart from every protocol field name.
pub const CREATED_FIELD: &str = "_created";

/// The hash field that holds a session's version: 1 when it is created, one more with every
/// change. A cached copy older than the version a user's cookie names is not served to them.
/// Sessions written before versions existed have none, which reads as 0.
pub const VERSION_FIELD: &str = "_v";

/// The hash field that marks a tombstone: a session rotated away from this id. It holds the time
/// of the rotation in milliseconds since the Unix epoch.
pub const ROTATED_FIELD: &str = "_rotated";

/// What a load found under an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// A live session, whose idle TTL the load has renewed.
    Live(Session),
    /// A session rotated away from this id within the rotation grace: no session for this
    /// request, and no new one either.
    Rotated,
    /// Nothing: never created, expired, destroyed, or rotated longer ago than the grace.
    Absent,
}

impl Loaded {
    /// The session, if live.
    pub fn live(self) -> Option<Session> {
        match self {
            Loaded::Live(s) => Some(s),
            Loaded::Rotated | Loaded::Absent => None,
        }
    }
}

/// A loaded session.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    /// The fields the backend sees.
    pub fields: SessionFields,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The version: 1 when created, one more with every change ([`VERSION_FIELD`]).
    pub version: u64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .field("created_ms", &self.created_ms)
            .field("version", &self.version)
            .finish()
    }
}

/// A session's fields, shared: a copy served from the local cache is not copied again for each
/// request, and the request headers made from it are made once ([`SessionFields::headers`]).
#[derive(Clone, Default)]
pub struct SessionFields(Arc<SharedFields>);

#[derive(Default)]
struct SharedFields {
    fields: Fields,
    headers: OnceLock<FieldHeaders>,
}

/// The request headers of a session's fields, made once per copy.
pub struct FieldHeaders {
    /// One header per field.
    pub pairs: Box<[(HeaderName, HeaderValue)]>,
    /// The same headers as they go on the wire (`name: value` and CRLF each), for a request head
    /// written directly.
    pub wire: Box<[u8]>,
}

impl FieldHeaders {
    /// The headers `pairs`, and their wire form.
    pub fn new(pairs: Vec<(HeaderName, HeaderValue)>) -> Self {
        let len = pairs
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        let mut wire = Vec::with_capacity(len);
        for (name, value) in &pairs {
            wire.extend_from_slice(name.as_str().as_bytes());
            wire.extend_from_slice(b": ");
            wire.extend_from_slice(value.as_bytes());
            wire.extend_from_slice(b"\r\n");
        }
        FieldHeaders {
            pairs: pairs.into_boxed_slice(),
            wire: wire.into_boxed_slice(),
        }
    }
}

impl SessionFields {
    /// The request headers made from these fields by `make`, which runs once per copy: later
    /// requests get clones that share the first one's bytes.
    pub fn headers(
        &self,
        make: impl FnOnce(&Fields) -> Vec<(HeaderName, HeaderValue)>,
    ) -> &FieldHeaders {
        self.0
            .headers
            .get_or_init(|| FieldHeaders::new(make(&self.0.fields)))
    }
}

impl From<Fields> for SessionFields {
    fn from(fields: Fields) -> Self {
        SessionFields(Arc::new(SharedFields {
            fields,
            headers: OnceLock::new(),
        }))
    }
}

impl std::ops::Deref for SessionFields {
    type Target = Fields;

    fn deref(&self) -> &Fields {
        &self.0.fields
    }
}

impl PartialEq for SessionFields {
    fn eq(&self, other: &Self) -> bool {
        self.0.fields == other.0.fields
    }
}

impl Eq for SessionFields {}

impl PartialEq<Fields> for SessionFields {
    fn eq(&self, other: &Fields) -> bool {
        &self.0.fields == other
    }
}

/// Names only: values never reach a `Debug` output.
impl fmt::Debug for SessionFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.fields.keys()).finish()
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
        /// The session's version after the change.
        version: u64,
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
    /// The store's client failed: a lost connection, an error reply, a refused login. The source
    /// is the client's own error; it stays boxed so that no client crate shows through the trait.
    #[error("session store error")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// Redis answered something the store cannot read.
    #[error("unexpected reply from the session store: {0}")]
    Unexpected(&'static str),
    /// The change was stored on the primary but no replica confirmed it in time, so a failover
    /// could still erase it (`--durability replicated`).
    #[error("no replica confirmed the change in time")]
    NotReplicated,
    /// Not tried: the store is known to be down (its circuit breaker is open) until a probe finds
    /// it answering again.
    #[error("the session store is down; the call was not tried")]
    CircuitOpen,
}

/// Where sessions live. Implementations bound every call by their own timeout.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Loads a session and renews its idle TTL in the same atomic step (one round trip).
    /// [`Loaded::Absent`] when it does not exist or has reached its absolute timeout,
    /// [`Loaded::Rotated`] for a tombstone (whose TTL is left alone).
    async fn load(&self, id: &SessionId) -> Result<Loaded, StoreError>;

    /// [`SessionStore::load`], for a user who has been told of `min_version` of this session: a
    /// copy older than that (in a local cache) is not served, the store itself is asked.
    async fn load_since(&self, id: &SessionId, min_version: u64) -> Result<Loaded, StoreError> {
        let _ = min_version;
        self.load(id).await
    }

    /// Whether a load may answer with a copy older than the store's (a local cache), so that the
    /// proxy must tell each user the version their changes reached: the version cookie.
    fn serves_copies(&self) -> bool {
        false
    }

    /// Applies field changes atomically, checking the limits against what is stored at that
    /// moment, and renews the TTL. A tombstone is [`Applied::Gone`] for [`Target::Existing`].
    async fn apply(
        &self,
        id: &SessionId,
        target: Target<'_>,
        changes: &Changes,
    ) -> Result<Applied, StoreError>;

    /// Reads a session and turns it into a tombstone for the rotation grace, in one atomic step
    /// (the first half of a rotation). `None` when there is no live session, tombstones included:
    /// of concurrent rotations of one session, one gets it.
    async fn take(&self, id: &SessionId) -> Result<Option<Session>, StoreError>;

    /// Undoes a take whose rotation failed: the tombstone becomes the live session again, with a
    /// renewed TTL. [`Applied::Stored`] when a session is live under `id` afterwards (a live one
    /// is left as it is), [`Applied::Gone`] when the tombstone expired or the absolute timeout
    /// has passed.
    async fn restore(&self, id: &SessionId) -> Result<Applied, StoreError>;

    /// Deletes a session (or a tombstone).
    async fn destroy(&self, id: &SessionId) -> Result<(), StoreError>;

    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Has the store record its own state into `metrics` from now on: a circuit breaker's state,
    /// transitions and failed calls. A store without such state has nothing to record.
    fn record_into(&self, _metrics: &Metrics) {}
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
    fn backend_errors_keep_their_source() {
        let e = StoreError::Backend(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset",
        )));
        let source = std::error::Error::source(&e).expect("the client's error is the source");
        assert_eq!(source.to_string(), "connection reset");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
    }

    #[test]
    fn ttl_is_cut_by_the_absolute_timeout() {
        let mut p = TtlPolicy {
            idle: Duration::from_secs(60),
            absolute: None,
            ..TtlPolicy::default()
        };
        assert_eq!(ttl_now(&p, 0, 10_000_000), Some(Duration::from_secs(60)));
        p.absolute = Some(Duration::from_secs(100));
        assert_eq!(ttl_now(&p, 1_000, 2_000), Some(Duration::from_secs(60)));
        assert_eq!(ttl_now(&p, 1_000, 91_000), Some(Duration::from_secs(10)));
        assert_eq!(ttl_now(&p, 1_000, 101_000), None);
        assert_eq!(ttl_now(&p, 1_000, 200_000), None);
    }
}
