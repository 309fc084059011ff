//! The embedded in-memory store: the default when no Redis URL is given, for trying stickless on
//! one machine. Sessions are local to this process and lost when it stops.
//!
//! It keeps the semantics of the Redis store exactly (sliding and absolute TTL, all-or-nothing
//! changes, atomic increments, no resurrection of an expired session), because the two share one
//! definition of a change ([`crate::protocol::apply_to_fields`]) and one conformance test suite.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{now_ms, ttl_now, Applied, Loaded, Session, SessionStore, StoreError, Target};
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

/// Sessions in a map behind a mutex.
pub struct MemoryStore {
    // A std mutex: nothing awaits while it is held, and every critical section is short.
    sessions: Mutex<HashMap<SessionId, Entry>>,
    ttl: TtlPolicy,
    limits: ProtocolConfig,
    writes: AtomicU64,
}

impl MemoryStore {
    /// An empty store with these lifetimes and limits.
    pub fn new(ttl: TtlPolicy, limits: ProtocolConfig) -> Self {
        MemoryStore {
            sessions: Mutex::new(HashMap::new()),
            ttl,
            limits,
            writes: AtomicU64::new(0),
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
        let now = now_ms();
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
        let now = now_ms();
        let mut map = self.lock();
        self.sweep_sometimes(&mut map, now);
        let base = match target {
            Target::Existing => match Self::live(&mut map, id, now) {
                Some(e) if !e.rotated => e.session.clone(),
                _ => return Ok(Applied::Gone),
            },
            Target::New { base } => base.cloned().unwrap_or_else(|| Session {
                fields: Default::default(),
                created_ms: now,
            }),
        };
        let Some(ttl) = ttl_now(&self.ttl, base.created_ms, now) else {
            map.remove(id);
            return Ok(Applied::Gone);
        };
        let fields = match apply_to_fields(&base.fields, changes, &self.limits) {
            Ok(f) => f,
            Err(r) => return Ok(Applied::Rejected(r)),
        };
        let created_ms = base.created_ms;
        map.insert(
            id.clone(),
            Entry {
                session: Session { fields, created_ms },
                expires_ms: now + ttl.as_millis() as u64,
                rotated: false,
            },
        );
        Ok(Applied::Stored { created_ms })
    }

    async fn take(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let now = now_ms();
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
        let now = now_ms();
        let mut map = self.lock();
        let Some(entry) = Self::live(&mut map, id, now) else {
            return Ok(Applied::Gone);
        };
        let created_ms = entry.session.created_ms;
        if !entry.rotated {
            return Ok(Applied::Stored { created_ms });
        }
        match ttl_now(&self.ttl, created_ms, now) {
            Some(ttl) => {
                entry.rotated = false;
                entry.expires_ms = now + ttl.as_millis() as u64;
                Ok(Applied::Stored { created_ms })
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
