//! The embedded in-memory store: the default when no Redis URL is given, for trying stickless on
//! one machine. Sessions are local to this process and lost when it stops.
//!
//! It keeps the semantics of the Redis store exactly (sliding and absolute TTL, all-or-nothing
//! changes, atomic increments, no resurrection of an expired session), because the two share one
//! definition of a change ([`crate::protocol::apply_to_fields`]) and one conformance test suite.
//!
//! Every expiry decision reads the time from a [`Clock`], the system's wall clock unless another
//! is given to [`MemoryStore::with_clock`], so that tests move time instead of sleeping through a
//! TTL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{ttl_now, Applied, Loaded, Session, SessionStore, StoreError, Target};
use crate::config::{ProtocolConfig, TtlPolicy};
use crate::cookie::SessionId;
use crate::protocol::{apply_to_fields, Changes};

/// How many writes between two sweeps of expired sessions.
const SWEEP_EVERY: u64 = 4096;

struct Entry {
    session: Session,
    expires_ms: u64,
    /// A tombstone: the session was rotated away from this id (see [`super::ROTATED_FIELD`]).
    rotated: bool,
}

/// Where the memory store reads the time.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch. Creation times are stored in it, and compared with the
    /// proxy's wall clock for the cookie's `Max-Age`, so it must track the wall clock in
    /// production.
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        super::now_ms()
    }
}

/// Sessions in a map behind a mutex.
pub struct MemoryStore {
    // A std mutex: nothing awaits while it is held, and every critical section is short.
    sessions: Mutex<HashMap<SessionId, Entry>>,
    ttl: TtlPolicy,
    limits: ProtocolConfig,
    writes: AtomicU64,
    clock: Arc<dyn Clock>,
}

impl MemoryStore {
    /// An empty store with these lifetimes and limits, on the system's wall clock.
    pub fn new(ttl: TtlPolicy, limits: ProtocolConfig) -> Self {
        Self::with_clock(ttl, limits, Arc::new(SystemClock))
    }

    /// An empty store that reads the time from `clock`.
    pub fn with_clock(ttl: TtlPolicy, limits: ProtocolConfig, clock: Arc<dyn Clock>) -> Self {
        MemoryStore {
            sessions: Mutex::new(HashMap::new()),
            ttl,
            limits,
            writes: AtomicU64::new(0),
            clock,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Entry>> {
        // A panic while holding the lock cannot leave a half-written entry (every write is one
        // insert or remove), so a poisoned lock is still consistent.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live<'a>(
        map: &'a mut HashMap<SessionId, Entry>,
        id: &SessionId,
        now: u64,
    ) -> Option<&'a mut Entry> {
        if map.get(id).is_some_and(|e| e.expires_ms <= now) {
            map.remove(id);
        }
        map.get_mut(id)
    }

    fn sweep_sometimes(&self, map: &mut HashMap<SessionId, Entry>, now: u64) {
        if self.writes.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            map.retain(|_, e| e.expires_ms > now);
        }
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn load(&self, id: &SessionId) -> Result<Loaded, StoreError> {
        let now = self.clock.now_ms();
        let mut map = self.lock();
        let Some(entry) = Self::live(&mut map, id, now) else {
            return Ok(Loaded::Absent);
        };
        if entry.rotated {
            return Ok(Loaded::Rotated);
        }
        match ttl_now(&self.ttl, entry.session.created_ms, now) {
            Some(ttl) => {
                entry.expires_ms = now + ttl.as_millis() as u64;
                Ok(Loaded::Live(entry.session.clone()))
            }
            None => {
                map.remove(id);
                Ok(Loaded::Absent)
            }
        }
    }

    async fn apply(
        &self,
        id: &SessionId,
        target: Target<'_>,
        changes: &Changes,
    ) -> Result<Applied, StoreError> {
        let now = self.clock.now_ms();
        let mut map = self.lock();
        self.sweep_sometimes(&mut map, now);
        let base = match target {
            Target::Existing => match Self::live(&mut map, id, now) {
                Some(e) if !e.rotated => e.session.clone(),
                _ => return Ok(Applied::Gone),
            },
            // A new id starts at version 0 (so 1 once written), whatever the moved session had.
            Target::New { base } => Session {
                version: 0,
                ..base.cloned().unwrap_or_else(|| Session {
                    fields: Default::default(),
                    created_ms: now,
                    version: 0,
                })
            },
        };
        let Some(ttl) = ttl_now(&self.ttl, base.created_ms, now) else {
            map.remove(id);
            return Ok(Applied::Gone);
        };
        let fields = match apply_to_fields(&base.fields, changes, &self.limits) {
            Ok(f) => f,
            Err(r) => return Ok(Applied::Rejected(r)),
        };
        let (created_ms, version) = (base.created_ms, base.version + 1);
        map.insert(
            id.clone(),
            Entry {
                session: Session {
                    fields: fields.into(),
                    created_ms,
                    version,
                },
                expires_ms: now + ttl.as_millis() as u64,
                rotated: false,
            },
        );
        Ok(Applied::Stored {
            created_ms,
            version,
        })
    }

    async fn take(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let now = self.clock.now_ms();
        let mut map = self.lock();
        match Self::live(&mut map, id, now) {
            Some(entry) if !entry.rotated => {
                entry.rotated = true;
                entry.expires_ms = now + self.ttl.rotation_grace.as_millis() as u64;
                Ok(Some(entry.session.clone()))
            }
            _ => Ok(None),
        }
    }

    async fn restore(&self, id: &SessionId) -> Result<Applied, StoreError> {
        let now = self.clock.now_ms();
        let mut map = self.lock();
        let Some(entry) = Self::live(&mut map, id, now) else {
            return Ok(Applied::Gone);
        };
        let (created_ms, version) = (entry.session.created_ms, entry.session.version);
        if !entry.rotated {
            return Ok(Applied::Stored {
                created_ms,
                version,
            });
        }
        match ttl_now(&self.ttl, created_ms, now) {
            Some(ttl) => {
                entry.rotated = false;
                entry.expires_ms = now + ttl.as_millis() as u64;
                Ok(Applied::Stored {
                    created_ms,
                    version,
                })
            }
            None => {
                map.remove(id);
                Ok(Applied::Gone)
            }
        }
    }

    async fn destroy(&self, id: &SessionId) -> Result<(), StoreError> {
        self.lock().remove(id);
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::Loaded;

    /// A clock that moves only when told to.
    struct ManualClock(AtomicU64);

    impl ManualClock {
        fn advance(&self, ms: u64) {
            self.0.fetch_add(ms, Ordering::Relaxed);
        }
    }

    impl Clock for ManualClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    const START: u64 = 1_700_000_000_000;
    const SECOND: u64 = 1_000;

    fn store(idle_s: u64, absolute_s: Option<u64>) -> (MemoryStore, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock(AtomicU64::new(START)));
        let ttl = TtlPolicy {
            idle: Duration::from_secs(idle_s),
            absolute: absolute_s.map(Duration::from_secs),
            rotation_grace: Duration::from_secs(60),
        };
        let store = MemoryStore::with_clock(ttl, ProtocolConfig::default(), clock.clone());
        (store, clock)
    }

    fn set(name: &str, value: &str) -> Changes {
        Changes {
            set: vec![(name.into(), value.into())],
            ..Changes::default()
        }
    }

    /// A new session, created now by `clock`.
    async fn create(store: &MemoryStore, clock: &ManualClock) -> SessionId {
        let id = SessionId::generate();
        let applied = store
            .apply(&id, Target::New { base: None }, &set("user", "alice"))
            .await
            .unwrap();
        assert_eq!(
            applied,
            Applied::Stored {
                created_ms: clock.now_ms(),
                version: 1
            }
        );
        id
    }

    fn is_live(loaded: Loaded) -> bool {
        matches!(loaded, Loaded::Live(_))
    }

    #[tokio::test]
    async fn every_load_renews_the_idle_timeout_and_idleness_ends_the_session() {
        let (s, clock) = store(30 * 60, None);
        let id = create(&s, &clock).await;
        // Used every 29 minutes for a day: never idle for 30.
        for _ in 0..50 {
            clock.advance(29 * 60 * SECOND);
            assert!(is_live(s.load(&id).await.unwrap()));
        }
        clock.advance(30 * 60 * SECOND - 1);
        assert!(is_live(s.load(&id).await.unwrap()), "one ms before");
        clock.advance(30 * 60 * SECOND);
        assert_eq!(s.load(&id).await.unwrap(), Loaded::Absent);
        assert_eq!(
            s.apply(&id, Target::Existing, &set("x", "1"))
                .await
                .unwrap(),
            Applied::Gone,
            "an idle session is not brought back"
        );
        assert_eq!(s.load(&id).await.unwrap(), Loaded::Absent);
    }

    #[tokio::test]
    async fn a_change_renews_the_idle_timeout_too() {
        let (s, clock) = store(60, None);
        let id = create(&s, &clock).await;
        clock.advance(50 * SECOND);
        s.apply(&id, Target::Existing, &set("x", "1"))
            .await
            .unwrap();
        clock.advance(50 * SECOND);
        assert!(is_live(s.load(&id).await.unwrap()));
    }

    #[tokio::test]
    async fn the_absolute_timeout_ends_a_session_in_use() {
        let (s, clock) = store(60, Some(150));
        let id = create(&s, &clock).await;
        for _ in 0..4 {
            clock.advance(30 * SECOND);
            assert!(is_live(s.load(&id).await.unwrap()));
        }
        // 120 s in: a change is still stored, but the TTL is cut to the 30 s left.
        clock.advance(29 * SECOND);
        assert_eq!(
            s.apply(&id, Target::Existing, &set("x", "1"))
                .await
                .unwrap(),
            Applied::Stored {
                created_ms: START,
                version: 2
            }
        );
        clock.advance(SECOND);
        assert_eq!(s.load(&id).await.unwrap(), Loaded::Absent, "at 150 s");
        assert_eq!(
            s.apply(&id, Target::Existing, &set("x", "2"))
                .await
                .unwrap(),
            Applied::Gone
        );

        // A base past its absolute timeout is not revived under a new id.
        let old = Session {
            fields: Default::default(),
            created_ms: clock.now_ms() - 150 * SECOND,
            version: 3,
        };
        let new = SessionId::generate();
        assert_eq!(
            s.apply(&new, Target::New { base: Some(&old) }, &set("x", "1"))
                .await
                .unwrap(),
            Applied::Gone
        );
        assert_eq!(s.load(&new).await.unwrap(), Loaded::Absent);
    }

    #[tokio::test]
    async fn a_tombstone_lasts_the_grace_and_restore_respects_the_absolute_timeout() {
        let (s, clock) = store(60 * 60, Some(120));
        let id = create(&s, &clock).await;
        assert!(s.take(&id).await.unwrap().is_some());
        clock.advance(60 * SECOND - 1);
        assert_eq!(s.load(&id).await.unwrap(), Loaded::Rotated);
        clock.advance(1);
        assert_eq!(
            s.load(&id).await.unwrap(),
            Loaded::Absent,
            "after the grace"
        );
        assert_eq!(s.restore(&id).await.unwrap(), Applied::Gone);

        // Restored within the grace, the TTL is the idle timeout cut by the absolute one.
        let id = create(&s, &clock).await;
        assert!(s.take(&id).await.unwrap().is_some());
        clock.advance(10 * SECOND);
        let created_ms = START + 60 * SECOND;
        assert_eq!(
            s.restore(&id).await.unwrap(),
            Applied::Stored {
                created_ms,
                version: 1
            }
        );
        clock.advance(109 * SECOND);
        assert!(is_live(s.load(&id).await.unwrap()));
        clock.advance(SECOND);
        assert_eq!(s.load(&id).await.unwrap(), Loaded::Absent);

        // Past the absolute timeout, a tombstone within its grace is not restored.
        let id = create(&s, &clock).await;
        clock.advance(100 * SECOND);
        assert!(s.take(&id).await.unwrap().is_some());
        clock.advance(30 * SECOND);
        assert_eq!(
            s.load(&id).await.unwrap(),
            Loaded::Rotated,
            "within the grace"
        );
        assert_eq!(s.restore(&id).await.unwrap(), Applied::Gone);
        assert_eq!(s.load(&id).await.unwrap(), Loaded::Absent, "deleted");
    }
}
