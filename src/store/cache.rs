//! The local cache (`--local-cache`): sessions loaded from Redis, kept in this process so that a
//! read of a hot session costs no round trip.
//!
//! A cached copy is only as good as the invalidations that would have removed it, so the cache
//! trusts nothing it cannot vouch for:
//! - it answers only while its invalidation channel is known to be up ([`LocalCache::go_live`], [`LocalCache::set_down`]),
//!   and is emptied whenever that channel may have missed a message (a reconnection, a failover,
//!   a lagging receiver, a failed health check) — [`LocalCache::flush`];
//! - a load fills it through a [`Fill`] taken *before* the read is sent: an invalidation or a
//!   flush that arrives while the read is in flight cancels the fill, so a reply that raced with
//!   a change elsewhere is never kept;
//! - one load per session at a time: a lookup that finds another request's load of the same
//!   session in flight waits for it ([`Lookup::Wait`]) instead of sending a read of its own, and
//!   is served what that load read ([`LocalCache::handed_over`]), even if an invalidation
//!   arrived meanwhile: a request joins only a load that no invalidation or flush has touched
//!   since it began, so what it is handed is never older than a copy the cache could have
//!   served it when it arrived, which is served until its invalidation arrives. A hot session dropped
//!   by a change is read again once, not once per request that arrives before the first read is
//!   back. A load that finds no session hands that over too ([`Handed::Absent`]); one that
//!   fails, or whose request goes away, wakes its waiters, which then read for themselves: one of
//!   them through the cache, the others beside it, none waiting twice;
//! - a change made through this process to a session it holds (or has room for) takes the slot
//!   the same way ([`LocalCache::begin_change`]) and keeps the session as the change left it:
//!   the requests that arrive while it is in flight wait for it and are served what it wrote.
//!   Redis's invalidation of that change then drops the copy like any other: it cannot be told
//!   from a change made elsewhere in the same instant;
//! - it keeps no copy older than a version it has read or written since (versions only grow):
//!   a load or change that finds its slot taken drops an older copy there, and a load still in
//!   flight there neither keeps nor hands its waiters anything older;
//! - an entry lives at most [`LocalCache::max_age`] (an eighth of the idle timeout), so that
//!   even a missed invalidation cannot serve stale data for long, and a session read only from
//!   the cache still has its idle TTL renewed in Redis by the load that follows;
//! - it never serves a session past its absolute timeout;
//! - it never serves a copy older than the version the user's cookie names (their own last
//!   acknowledged change): such a copy is dropped and the session read from Redis, which
//!   gives read-your-writes across instances even while an invalidation is still on its way.
//!
//! Keys are the Redis keys (`<prefix><id>`): that is what invalidation messages carry. Neither
//! keys nor values ever reach a log line or a `Debug` output.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

use super::{now_ms, ttl_now, Loaded, Session};
use crate::config::TtlPolicy;
use crate::metrics::{CacheLookup, Metrics};

/// A bounded map of loaded sessions, invalidated by Redis.
pub struct LocalCache {
    slots: Mutex<Slots>,
    capacity: usize,
    /// Bound on the sum of the entries' [`footprint`]s.
    max_bytes: u64,
    max_age: Duration,
    ttl: TtlPolicy,
    /// Whether the invalidation channel is up: without it, no lookup hits and no fill is kept.
    live: AtomicBool,
    /// Moves on every flush: a fill taken before a flush is not kept after it.
    epoch: AtomicU64,
    next_token: AtomicU64,
    metrics: OnceLock<Metrics>,
}

/// What a lookup found.
pub enum Lookup<'a> {
    /// A copy that may be served.
    Hit(Session),
    /// Another request is loading (or changing) this session: wait for it (bounded), take what
    /// it read or wrote
    /// ([`LocalCache::handed_over`]), or else look again with `joined` set.
    Wait(Pending),
    /// Read it from Redis, and keep the result through the fill (none while the cache is not
    /// live).
    Load(Option<Fill<'a>>),
}

/// A wait for another request's load (or change) of the same session.
pub struct Pending {
    notified: OwnedNotified,
    waiters: Arc<Waiters>,
}

impl Pending {
    /// Waits until that load ends; then what it found (whether the cache kept it or not), unless
    /// it failed or went away.
    pub async fn ended(self) -> Option<Handed> {
        self.notified.await;
        match self.waiters.handed.get() {
            Some(Handed::Live(session)) if session.version < self.waiters.floor() => None,
            handed => handed.cloned(),
        }
    }
}

/// What a load (or change) found, handed to the requests that waited for it.
#[derive(Clone)]
pub enum Handed {
    /// The session it read or wrote.
    Live(Session),
    /// No session under that id (never created, expired or destroyed): an id whose key is gone
    /// never comes back, since new sessions take new ids.
    Absent {
        /// The answer came from the primary, so it holds for any user; a replica's may only be
        /// behind, and holds only for a user who has seen no change of the session (no version
        /// cookie).
        any_version: bool,
    },
}

/// The requests waiting for one fill: woken when it ends, however it ends (kept, cancelled,
/// failed, dropped), and handed what it found.
struct Waiters {
    notify: Arc<Notify>,
    handed: OnceLock<Handed>,
    /// The lowest version the fill's session may have to be kept or handed over: raised by a
    /// fill of the same key that lost its slot to this one, and found a newer version.
    floor: AtomicU64,
}

impl Waiters {
    fn floor(&self) -> u64 {
        self.floor.load(Ordering::Acquire)
    }
}

/// The right to store the result of one load (or change), taken before it is sent. Dropped without
/// [`LocalCache::finish_fill`] (the request went away), it frees its slot and wakes the requests
/// waiting for it.
pub struct Fill<'a> {
    cache: &'a LocalCache,
    key: String,
    token: u64,
    epoch: u64,
    started: Instant,
    waiters: Arc<Waiters>,
    finished: bool,
}

impl Drop for Fill<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.cache.abandon(&self.key, self.token);
            self.waiters.notify.notify_waiters();
        }
    }
}

#[derive(Default)]
struct Slots {
    map: HashMap<String, Slot>,
    /// Insertion order, for eviction: `(key, token)`; an item whose token is no longer the key's
    /// is stale and skipped.
    order: VecDeque<(String, u64)>,
    /// The sum of the ready entries' footprints.
    bytes: u64,
}

enum Slot {
    /// A load is in flight; its [`Fill`] holds this token, and wakes the requests that joined it
    /// through `waiters` when it ends, even after an invalidation or another fill took the slot.
    Filling { token: u64, waiters: Arc<Waiters> },
    Ready {
        token: u64,
        session: Session,
        loaded: Instant,
        /// Its [`footprint`].
        size: u64,
    },
}

/// What an entry holds in memory, about: its key, its fields' names and values, and the
/// bookkeeping around them (map nodes, string headers, the order queue).
fn footprint(key: &str, session: &Session) -> u64 {
    const PER_ENTRY: usize = 192;
    const PER_FIELD: usize = 64;
    let fields: usize = session
        .fields
        .iter()
        .map(|(k, v)| k.len() + v.len() + PER_FIELD)
        .sum();
    (2 * key.len() + fields + PER_ENTRY) as u64
}

impl Slot {
    fn token(&self) -> u64 {
        match self {
            Slot::Filling { token: t, .. } | Slot::Ready { token: t, .. } => *t,
        }
    }
}

impl Slots {
    /// Whether `key` is still reserved for the fill holding `token`.
    fn filling(&self, key: &str, token: u64) -> bool {
        matches!(self.map.get(key), Some(Slot::Filling { token: t, .. }) if *t == token)
    }

    /// Drops a copy of `key` older than `version`, and has a fill of it in flight keep or hand
    /// over nothing older.
    fn outdate(&mut self, key: &str, version: u64) {
        match self.map.get(key) {
            Some(Slot::Ready { session, .. }) if session.version < version => {
                self.remove(key);
            }
            Some(Slot::Filling { waiters, .. }) => {
                waiters.floor.fetch_max(version, Ordering::AcqRel);
            }
            _ => {}
        }
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.map.remove(key) {
            Some(slot) => {
                self.forget(&slot);
                true
            }
            None => false,
        }
    }

    /// Takes a removed slot's size off the total.
    fn forget(&mut self, slot: &Slot) {
        if let Slot::Ready { size, .. } = slot {
            self.bytes = self.bytes.saturating_sub(*size);
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
        self.bytes = 0;
    }

    /// Drops the oldest entries, `keep` excepted, until the total is within `max_bytes`.
    fn shrink_to(&mut self, max_bytes: u64, keep: &str) {
        let mut turns = self.order.len();
        while self.bytes > max_bytes && turns > 0 {
            turns -= 1;
            let Some((old, token)) = self.order.pop_front() else {
                break;
            };
            if old == keep {
                self.order.push_back((old, token));
            } else if self.map.get(&old).is_some_and(|s| s.token() == token) {
                self.remove(&old);
            }
        }
    }

    /// Drops stale order items once they outnumber the live ones, so that the order stays
    /// bounded by twice the capacity.
    fn compact(&mut self, capacity: usize) {
        if self.order.len() > 2 * capacity + 16 {
            let map = &self.map;
            self.order
                .retain(|(k, t)| map.get(k).is_some_and(|s| s.token() == *t));
        }
    }
}

impl LocalCache {
    /// A cache of at most `capacity` sessions and about `max_bytes` under `ttl`; it answers
    /// nothing until [`LocalCache::go_live`], [`LocalCache::set_down`] says its invalidation
    /// channel is up.
    pub fn new(capacity: usize, max_bytes: u64, ttl: TtlPolicy) -> Self {
        LocalCache {
            slots: Mutex::new(Slots::default()),
            capacity: capacity.max(1),
            max_bytes,
            max_age: ttl.idle / 8,
            ttl,
            live: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            next_token: AtomicU64::new(0),
            metrics: OnceLock::new(),
        }
    }

    /// How long an entry is served at most.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// Counts into `metrics` from now on.
    pub fn record_into(&self, metrics: &Metrics) {
        let _ = self.metrics.set(metrics.clone());
    }

    /// Looks `key` up for a user who has seen `min_version` of it: a copy to serve, a load in
    /// flight to wait for, or a load to send (reserved here, in the same step, so that
    /// concurrent lookups of one session send one read). `joined`: this request already waited
    /// once, and does not wait again.
    pub fn lookup(&self, key: &str, min_version: u64, joined: bool) -> Lookup<'_> {
        self.lookup_at(key, min_version, joined, Instant::now(), self.clock_ms())
    }

    fn lookup_at(
        &self,
        key: &str,
        min_version: u64,
        joined: bool,
        now: Instant,
        now_ms: u64,
    ) -> Lookup<'_> {
        if !self.live.load(Ordering::Acquire) {
            self.record(CacheLookup::Miss);
            return Lookup::Load(None);
        }
        let mut slots = self.lock();
        let result = match slots.map.get_mut(key) {
            Some(Slot::Ready {
                session, loaded, ..
            }) => {
                if now.saturating_duration_since(*loaded) >= self.max_age
                    || ttl_now(&self.ttl, session.created_ms, now_ms).is_none()
                {
                    slots.remove(key);
                    CacheLookup::Miss
                } else if session.version < min_version {
                    // The user's own change is not in it yet: its invalidation is on the way.
                    slots.remove(key);
                    CacheLookup::Outdated
                } else {
                    let session = session.clone();
                    drop(slots);
                    self.record(if joined {
                        CacheLookup::Joined
                    } else {
                        CacheLookup::Hit
                    });
                    return Lookup::Hit(session);
                }
            }
            Some(Slot::Filling { waiters, .. }) if !joined => {
                // Made while the lock is held: the end of the load, which takes the slot under
                // the lock before it wakes its waiters, cannot come before it.
                return Lookup::Wait(Pending {
                    notified: Arc::clone(&waiters.notify).notified_owned(),
                    waiters: Arc::clone(waiters),
                });
            }
            Some(Slot::Filling { .. }) => {
                // Waited once already: read without a fill rather than replace the one in
                // flight, which would throw its read away and hold up its waiters again.
                drop(slots);
                self.record(CacheLookup::Miss);
                return Lookup::Load(None);
            }
            _ => CacheLookup::Miss,
        };
        let fill = self.reserve(&mut slots, key, now);
        drop(slots);
        self.record(result);
        Lookup::Load(Some(fill))
    }

    /// What a load (or change) this request waited for found ([`Pending::ended`]), if it may be
    /// served to a user who has seen `min_version`, even if an invalidation has dropped it from
    /// the cache since: the request joined that load before any invalidation touched it, so it
    /// is never older than a copy the cache could have served the request when it arrived. A
    /// session found absent stays absent (new sessions take new ids). Counted as joined.
    pub fn handed_over(&self, handed: Option<Handed>, min_version: u64) -> Option<Loaded> {
        let loaded = match handed? {
            Handed::Absent { any_version } if any_version || min_version == 0 => Loaded::Absent,
            Handed::Absent { .. } => return None,
            Handed::Live(session) => {
                if session.version < min_version
                    || ttl_now(&self.ttl, session.created_ms, self.clock_ms()).is_none()
                {
                    return None;
                }
                Loaded::Live(session)
            }
        };
        self.record(CacheLookup::Joined);
        Some(loaded)
    }

    /// The wall clock in milliseconds, read only when an absolute timeout needs it (0 otherwise).
    fn clock_ms(&self) -> u64 {
        if self.ttl.absolute.is_some() {
            now_ms()
        } else {
            0
        }
    }

    fn record(&self, result: CacheLookup) {
        if let Some(m) = self.metrics.get() {
            m.local_cache_lookup(result);
        }
    }

    /// Reserves `key` for a load about to be sent, whatever the slot holds, as a lookup that
    /// misses does; `None` while the cache is not live.
    #[cfg(test)]
    fn begin_fill(&self, key: &str) -> Option<Fill<'_>> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        let mut slots = self.lock();
        Some(self.reserve(&mut slots, key, Instant::now()))
    }

    /// Reserves `key` for a change about to be sent by this process, whatever the slot holds: a
    /// copy or another fill in flight is let go (that fill still hands its result to its own
    /// waiters). The session the change wrote is kept through this fill: like a load's reply, it
    /// was the session in Redis when the change ran, and any later change, made by anyone (this
    /// one's own invalidation included), sends an invalidation that arrives after the fill began
    /// and so cancels or removes it. `None` while the cache is not live, and when the session is
    /// not held and the cache is full: a change evicts nothing.
    pub fn begin_change(&self, key: &str) -> Option<Fill<'_>> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        let mut slots = self.lock();
        if slots.map.len() >= self.capacity && !slots.map.contains_key(key) {
            return None;
        }
        Some(self.reserve(&mut slots, key, Instant::now()))
    }

    /// Puts a placeholder for a new load of `key`, evicting the oldest entry if the cache is
    /// full.
    fn reserve(&self, slots: &mut Slots, key: &str, now: Instant) -> Fill<'_> {
        let fill = Fill {
            cache: self,
            key: key.to_owned(),
            token: self.next_token.fetch_add(1, Ordering::Relaxed),
            epoch: self.epoch.load(Ordering::Acquire),
            started: now,
            waiters: Arc::new(Waiters {
                notify: Arc::new(Notify::new()),
                handed: OnceLock::new(),
                floor: AtomicU64::new(0),
            }),
            finished: false,
        };
        if slots.map.len() >= self.capacity && !slots.map.contains_key(key) {
            while let Some((old, token)) = slots.order.pop_front() {
                if slots.map.get(&old).is_some_and(|s| s.token() == token) {
                    slots.remove(&old);
                    break;
                }
            }
        }
        let reserved = Slot::Filling {
            token: fill.token,
            waiters: Arc::clone(&fill.waiters),
        };
        // A lookup reserves only a free slot; whatever else stood here is let go.
        if let Some(replaced) = slots.map.insert(fill.key.clone(), reserved) {
            slots.forget(&replaced);
        }
        slots.order.push_back((fill.key.clone(), fill.token));
        slots.compact(self.capacity);
        fill
    }

    /// Ends a load: keeps `session` unless the key was invalidated or the cache flushed since
    /// the fill began. `None` (the load failed, or found no live session) just frees the slot.
    /// Either way the requests waiting for the load are woken, and handed `session`: it was the
    /// session in Redis while they waited, kept or not.
    /// Returns whether the slot was still this fill's (whether it kept `session`, or freed the
    /// slot for a `None`).
    pub fn finish_fill(&self, fill: Fill<'_>, session: Option<Session>) -> bool {
        let handed = session.clone().map(Handed::Live);
        self.end(fill, handed, session)
    }

    /// Ends a load that found no session under its id: frees the slot, and hands that to the
    /// requests waiting for it, so that a burst of requests with a dead cookie sends one read.
    /// `any_version`: see [`Handed::Absent`].
    pub fn finish_absent(&self, fill: Fill<'_>, any_version: bool) {
        self.end(fill, Some(Handed::Absent { any_version }), None);
    }

    /// Ends `fill`: hands `handed` to its waiters, keeps `session` ([`LocalCache::keep`]), then
    /// wakes the waiters. Returns whether the slot was still the fill's.
    fn end(&self, mut fill: Fill<'_>, handed: Option<Handed>, session: Option<Session>) -> bool {
        fill.finished = true;
        let key = std::mem::take(&mut fill.key);
        if let Some(handed) = handed {
            let _ = fill.waiters.handed.set(handed);
        }
        let own = self.keep(&mut self.lock(), key, &fill, session);
        fill.waiters.notify.notify_waiters();
        own
    }

    /// Keeps `session` in the slot if it is still this fill's. If it is not (an invalidation
    /// freed it and another fill took it), whatever holds it now was read separately, possibly
    /// before this fill's session was in Redis (a load on another connection, or before the
    /// change this fill made ran): a copy older than `session` is dropped, and a fill in flight
    /// keeps or hands over nothing older. Versions only grow, so older is stale.
    fn keep(
        &self,
        slots: &mut Slots,
        key: String,
        fill: &Fill<'_>,
        session: Option<Session>,
    ) -> bool {
        if !slots.filling(&key, fill.token) {
            if let Some(found) = &session {
                slots.outdate(&key, found.version);
            }
            return false;
        }
        let valid = self.live.load(Ordering::Acquire)
            && self.epoch.load(Ordering::Acquire) == fill.epoch
            && session
                .as_ref()
                .is_some_and(|s| s.version >= fill.waiters.floor());
        let sized = session
            .filter(|_| valid)
            .map(|session| (footprint(&key, &session), session));
        match sized {
            // A session larger than the whole cache is not kept.
            Some((size, session)) if size <= self.max_bytes => {
                slots.bytes += size;
                slots.shrink_to(self.max_bytes, &key);
                let filled = Slot::Ready {
                    token: fill.token,
                    session,
                    // The TTL was renewed when the load ran, after this.
                    loaded: fill.started,
                    size,
                };
                slots.map.insert(key, filled);
            }
            _ => {
                slots.remove(&key);
            }
        }
        true
    }

    /// A fill dropped unfinished: its slot is freed, if still its own.
    fn abandon(&self, key: &str, token: u64) {
        let mut slots = self.lock();
        if slots.filling(key, token) {
            slots.remove(key);
        }
    }

    /// Drops `key` (an invalidation message, or a change made by this process).
    pub fn invalidate(&self, key: &str) {
        let removed = self.lock().remove(key);
        if removed {
            if let Some(m) = self.metrics.get() {
                m.local_cache_invalidated();
            }
        }
    }

    /// Drops everything, and every fill in flight.
    pub fn flush(&self) {
        let mut slots = self.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        slots.clear();
        drop(slots);
        if let Some(m) = self.metrics.get() {
            m.local_cache_flushed();
        }
    }

    /// The invalidation channel is down, or may have missed messages: nothing is served or kept
    /// until [`LocalCache::go_live`], and everything held is dropped.
    pub fn set_down(&self) {
        let mut slots = self.lock();
        let was_live = self.live.swap(false, Ordering::AcqRel);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        slots.clear();
        drop(slots);
        if was_live {
            if let Some(m) = self.metrics.get() {
                m.local_cache_flushed();
            }
        }
    }

    /// The moment to pass to [`LocalCache::go_live`], taken before tracking is turned on.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Tracking was turned on: the cache answers from now on, starting empty, unless the channel
    /// went down (or the cache was flushed) since `since`, when the caller must try again.
    pub fn go_live(&self, since: u64) -> bool {
        let mut slots = self.lock();
        if self.epoch.load(Ordering::Acquire) != since {
            return false;
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        slots.clear();
        self.live.store(true, Ordering::Release);
        true
    }

    /// Whether the cache answers now.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // Nothing panics while the lock is held; a poisoned map is still a valid map.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The copy a lookup would serve, if any (a load it would start is dropped at once).
    #[cfg(test)]
    fn get(&self, key: &str, min_version: u64) -> Option<Session> {
        self.get_at(key, min_version, Instant::now(), now_ms())
    }

    #[cfg(test)]
    fn get_at(&self, key: &str, min_version: u64, now: Instant, now_ms: u64) -> Option<Session> {
        match self.lookup_at(key, min_version, false, now, now_ms) {
            Lookup::Hit(session) => Some(session),
            Lookup::Wait(_) | Lookup::Load(_) => None,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Fields;

    fn session(v: &str) -> Session {
        let mut fields = Fields::new();
        fields.insert("user".into(), v.into());
        Session {
            fields: fields.into(),
            created_ms: now_ms(),
            version: 1,
        }
    }

    fn cache(capacity: usize) -> LocalCache {
        cache_of(capacity, u64::MAX)
    }

    fn cache_of(capacity: usize, max_bytes: u64) -> LocalCache {
        let c = LocalCache::new(
            capacity,
            max_bytes,
            TtlPolicy {
                idle: Duration::from_secs(400),
                absolute: None,
                ..TtlPolicy::default()
            },
        );
        assert!(c.go_live(c.epoch()));
        c
    }

    /// The `user` field of the copy a lookup of `key` would serve.
    fn user_in(c: &LocalCache, key: &str) -> Option<String> {
        c.get(key, 0).map(|s| s.fields["user"].clone())
    }

    fn fill(c: &LocalCache, key: &str, v: &str) {
        let f = c.begin_fill(key).expect("live");
        c.finish_fill(f, Some(session(v)));
    }

    /// The byte bound: the oldest entries go first, the total never passes it, and a session
    /// larger than the whole cache is not kept.
    #[test]
    fn the_cache_holds_no_more_bytes_than_its_bound() {
        let one = footprint("k0", &session("v"));
        let c = cache_of(1000, 3 * one);
        for i in 0..10 {
            fill(&c, &format!("k{i}"), "v");
            assert!(
                c.lock().bytes <= 3 * one,
                "{} > {}",
                c.lock().bytes,
                3 * one
            );
        }
        assert_eq!(c.len(), 3);
        assert!(c.get("k6", 0).is_none(), "the oldest went first");
        assert!(c.get("k9", 0).is_some() && c.get("k7", 0).is_some());
        let total: u64 = c
            .lock()
            .map
            .values()
            .map(|s| match s {
                Slot::Ready { size, .. } => *size,
                Slot::Filling { .. } => 0,
            })
            .sum();
        assert_eq!(c.lock().bytes, total, "the total follows the entries");

        // Invalidations and flushes give the bytes back.
        c.invalidate("k9");
        assert_eq!(c.lock().bytes, 2 * one);
        c.flush();
        assert_eq!(c.lock().bytes, 0);

        let big = session(&"x".repeat(4 * one as usize));
        let f = c.begin_fill("big").expect("live");
        c.finish_fill(f, Some(big));
        assert!(c.get("big", 0).is_none(), "larger than the cache: not kept");
        assert_eq!(c.lock().bytes, 0);
    }

    #[test]
    fn a_finished_fill_is_served() {
        let c = cache(10);
        assert_eq!(c.get("k", 0), None);
        fill(&c, "k", "a");
        assert_eq!(user_in(&c, "k").as_deref(), Some("a"));
    }

    #[test]
    fn an_invalidation_during_the_load_cancels_the_fill() {
        let c = cache(10);
        let f = c.begin_fill("k").expect("live");
        c.invalidate("k");
        c.finish_fill(f, Some(session("stale")));
        assert!(c.get("k", 0).is_none());
    }

    #[test]
    fn a_flush_during_the_load_cancels_the_fill() {
        let c = cache(10);
        let f = c.begin_fill("k").expect("live");
        c.flush();
        // A later fill of the same key must not let the earlier one through either.
        c.finish_fill(f, Some(session("stale")));
        assert!(c.get("k", 0).is_none());
    }

    #[test]
    fn an_older_fill_cannot_overwrite_a_newer_one() {
        let c = cache(10);
        let old = c.begin_fill("k").expect("live");
        let new = c.begin_fill("k").expect("live");
        c.finish_fill(new, Some(session("new")));
        c.finish_fill(old, Some(session("old")));
        assert_eq!(user_in(&c, "k").as_deref(), Some("new"));
    }

    #[test]
    fn nothing_is_served_or_kept_while_the_channel_is_down() {
        let c = cache(10);
        fill(&c, "k", "a");
        let f = c.begin_fill("j").expect("live");
        c.set_down();
        assert!(c.get("k", 0).is_none());
        assert!(c.begin_fill("k").is_none());
        c.finish_fill(f, Some(session("b")));
        assert!(c.go_live(c.epoch()));
        assert!(c.get("k", 0).is_none(), "a reconnection empties the cache");
        assert!(c.get("j", 0).is_none());
    }

    #[test]
    fn a_channel_that_went_down_while_tracking_was_turned_on_stays_down() {
        let c = cache(10);
        c.set_down();
        let since = c.epoch();
        // The store reconnects (a failover) while CLIENT TRACKING is on its way.
        c.set_down();
        assert!(!c.go_live(since));
        assert!(!c.is_live());
        assert!(c.go_live(c.epoch()));
    }

    #[test]
    fn entries_expire_after_an_eighth_of_the_idle_timeout() {
        let c = cache(10);
        assert_eq!(c.max_age(), Duration::from_secs(50));
        fill(&c, "k", "a");
        let now = Instant::now();
        assert!(c
            .get_at("k", 0, now + Duration::from_secs(49), now_ms())
            .is_some());
        assert!(c
            .get_at("k", 0, now + Duration::from_secs(51), now_ms())
            .is_none());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn no_session_is_served_past_its_absolute_timeout() {
        let c = LocalCache::new(
            10,
            u64::MAX,
            TtlPolicy {
                idle: Duration::from_secs(400),
                absolute: Some(Duration::from_secs(60)),
                ..TtlPolicy::default()
            },
        );
        assert!(c.go_live(c.epoch()));
        fill(&c, "k", "a");
        assert!(c
            .get_at("k", 0, Instant::now(), now_ms() + 59_000)
            .is_some());
        assert!(c
            .get_at("k", 0, Instant::now(), now_ms() + 61_000)
            .is_none());
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let c = cache(3);
        for i in 0..1000 {
            fill(&c, &format!("k{i}"), "a");
            c.invalidate(&format!("k{}", i / 2));
        }
        assert!(c.len() <= 3);
        assert!(c.lock().order.len() <= 2 * 3 + 16);
        assert!(c.get("k999", 0).is_some(), "the newest entry is kept");
    }

    #[test]
    fn a_failed_load_frees_its_slot() {
        let c = cache(10);
        let f = c.begin_fill("k").expect("live");
        c.finish_fill(f, None);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn a_copy_older_than_the_users_version_is_not_served() {
        let c = cache(10);
        fill(&c, "k", "a");
        assert!(c.get("k", 1).is_some(), "the copy has version 1");
        assert!(c.get("k", 2).is_none(), "the user saw version 2");
        assert_eq!(c.len(), 0, "and the old copy is dropped");
        assert!(c.get("k", 0).is_none());
    }

    fn load<'a>(c: &'a LocalCache, key: &str, joined: bool) -> Fill<'a> {
        match c.lookup(key, 0, joined) {
            Lookup::Load(Some(fill)) => fill,
            _ => panic!("expected a load to send"),
        }
    }

    fn wait(c: &LocalCache, key: &str) -> Pending {
        match c.lookup(key, 0, false) {
            Lookup::Wait(pending) => pending,
            _ => panic!("expected a load in flight to wait for"),
        }
    }

    /// Whether the wait ended (within 200 ms), and what it was handed.
    async fn woken_with(waiting: Pending) -> Option<Option<Session>> {
        let handed = tokio::time::timeout(Duration::from_millis(200), waiting.ended())
            .await
            .ok()?;
        Some(match handed {
            Some(Handed::Live(session)) => Some(session),
            _ => None,
        })
    }

    /// The `user` field of the session the wait was handed.
    async fn handed_user(waiting: Pending) -> String {
        let handed = woken_with(waiting).await.expect("woken");
        handed.expect("handed a session").fields["user"].clone()
    }

    async fn woken(waiting: Pending) -> bool {
        woken_with(waiting).await.is_some()
    }

    /// One load per session at a time: the lookups that arrive while it is in flight wait for
    /// it, and are then served by it.
    #[tokio::test]
    async fn lookups_during_a_load_wait_for_it_and_are_served_by_it() {
        let c = cache(10);
        let f = load(&c, "k", false);
        let waiting = [wait(&c, "k"), wait(&c, "k")];
        c.finish_fill(f, Some(session("a")));
        for w in waiting {
            assert!(woken(w).await);
            match c.lookup("k", 0, true) {
                Lookup::Hit(s) => assert_eq!(s.fields["user"], "a"),
                _ => panic!("served by the load it waited for"),
            }
        }
    }

    /// A load that ends without keeping anything wakes its waiters: cancelled by an
    /// invalidation or a flush, it still hands them what it read (the session in Redis while
    /// they waited); failed or dropped with its request, it hands nothing, and they load for
    /// themselves, one of them at a time again.
    #[tokio::test]
    async fn a_load_that_keeps_nothing_wakes_its_waiters() {
        type End = fn(&LocalCache, Fill<'_>);
        let ends: [(&str, End, bool); 4] = [
            (
                "invalidated",
                |c, f| {
                    c.invalidate("k");
                    c.finish_fill(f, Some(session("read")));
                },
                true,
            ),
            (
                "flushed",
                |c, f| {
                    c.flush();
                    c.finish_fill(f, Some(session("read")));
                },
                true,
            ),
            (
                "failed",
                |c, f| {
                    c.finish_fill(f, None);
                },
                false,
            ),
            ("dropped", |_, f| drop(f), false),
        ];
        for (how, end, hands) in ends {
            let c = cache(10);
            let f = load(&c, "k", false);
            let w = wait(&c, "k");
            end(&c, f);
            let handed = woken_with(w).await;
            assert!(handed.is_some(), "{how}: the waiter is woken");
            assert_eq!(
                handed.flatten().map(|s| s.fields["user"].clone()).is_some(),
                hands,
                "{how}"
            );
            assert!(c.get("k", 0).is_none(), "{how}: nothing kept");
            let again = load(&c, "k", true);
            assert!(
                matches!(c.lookup("k", 0, false), Lookup::Wait(_)),
                "{how}: the next load is the only one"
            );
            c.finish_fill(again, Some(session("b")));
            assert!(c.get("k", 0).is_some(), "{how}");
        }
    }

    /// A load that found no session hands that to its waiters: a burst of requests with a dead
    /// cookie sends one read.
    #[tokio::test]
    async fn a_load_that_finds_no_session_hands_that_over() {
        let c = cache(10);
        let f = load(&c, "k", false);
        let w = wait(&c, "k");
        c.finish_absent(f, true);
        let handed = tokio::time::timeout(Duration::from_millis(200), w.ended())
            .await
            .expect("woken");
        assert!(matches!(handed, Some(Handed::Absent { any_version: true })));
        assert!(c.get("k", 0).is_none(), "nothing kept");
        assert!(
            matches!(c.lookup("k", 0, false), Lookup::Load(Some(_))),
            "slot freed"
        );
    }

    /// A request that already waited once and finds another load in flight reads without a
    /// fill: it neither waits again nor throws that load away.
    #[tokio::test]
    async fn a_request_waits_once() {
        let c = cache(10);
        let first = load(&c, "k", false);
        let w = wait(&c, "k");
        assert!(matches!(c.lookup("k", 0, true), Lookup::Load(None)));
        c.finish_fill(first, Some(session("a")));
        assert!(woken(w).await);
        assert_eq!(user_in(&c, "k").as_deref(), Some("a"));
    }

    /// A fill that replaces one in flight (a change made here; never a lookup's: a lookup
    /// reserves only a free slot): the replaced one keeps nothing, but still hands what it read
    /// to the requests that waited for it; later lookups wait for the new one.
    #[tokio::test]
    async fn a_replaced_fill_keeps_nothing_and_still_serves_its_waiters() {
        let c = cache(10);
        let first = load(&c, "k", false);
        let w = wait(&c, "k");
        let second = c.begin_change("k").expect("live");
        let w2 = wait(&c, "k");
        c.finish_fill(first, Some(session("old")));
        assert_eq!(handed_user(w).await, "old");
        assert!(c.get("k", 0).is_none());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), w2.ended())
                .await
                .is_err(),
            "a waiter of the second fill waits for it"
        );
        let w2 = wait(&c, "k");
        c.finish_fill(second, Some(session("new")));
        assert_eq!(handed_user(w2).await, "new");
        assert_eq!(user_in(&c, "k").as_deref(), Some("new"));
    }

    /// A change takes the slot of a session the cache holds, or a free one, but evicts nothing;
    /// it says whether the slot was still its own when it ended.
    #[test]
    fn a_change_evicts_nothing() {
        let c = cache(2);
        fill(&c, "k1", "a");
        fill(&c, "k2", "b");
        assert!(c.begin_change("k3").is_none(), "full, and k3 not held");
        let change = c.begin_change("k1").expect("held");
        assert!(c.finish_fill(change, Some(session("a2"))));
        assert_eq!(user_in(&c, "k1").as_deref(), Some("a2"));
        assert!(c.get("k2", 0).is_some(), "nothing evicted");
        let change = c.begin_change("k2").expect("held");
        c.invalidate("k2");
        assert!(
            !c.finish_fill(change, Some(session("b2"))),
            "its slot was taken"
        );
        assert!(c.get("k2", 0).is_none());
    }

    fn at_version(v: &str, version: u64) -> Session {
        Session {
            version,
            ..session(v)
        }
    }

    /// A change whose own invalidation came before its reply lost its slot to the load that
    /// followed; that load read the session after the change ran (the version it wrote, or a
    /// later one), and the end of the change, before or after the load's, leaves its copy alone.
    #[test]
    fn a_change_that_lost_its_slot_leaves_a_load_as_new_as_it_alone() {
        let c = cache(10);
        for change_ends_first in [true, false] {
            for read_version in [7, 8] {
                let change = c.begin_change("k").expect("room");
                c.invalidate("k");
                let read = load(&c, "k", false);
                let read_after = at_version("read after", read_version);
                if change_ends_first {
                    assert!(!c.finish_fill(change, Some(at_version("changed", 7))));
                    assert!(c.finish_fill(read, Some(read_after)));
                } else {
                    assert!(c.finish_fill(read, Some(read_after)));
                    assert!(!c.finish_fill(change, Some(at_version("changed", 7))));
                }
                assert_eq!(user_in(&c, "k").as_deref(), Some("read after"));
                c.invalidate("k");
            }
        }
    }

    /// A load that took a change's slot after an unrelated invalidation, and read the session
    /// before the change ran (another connection), is neither kept nor handed to its waiters
    /// once the change has ended: its copy is older than what the change wrote.
    #[tokio::test]
    async fn a_load_older_than_a_change_that_lost_its_slot_to_it_is_not_kept() {
        let c = cache(10);
        // The change ends first: the load in flight keeps and hands over nothing older.
        let change = c.begin_change("k").expect("room");
        c.invalidate("k");
        let read = load(&c, "k", false);
        let waiting = wait(&c, "k");
        assert!(!c.finish_fill(change, Some(at_version("changed", 7))));
        assert!(c.finish_fill(read, Some(at_version("read before", 6))));
        assert!(c.get("k", 0).is_none(), "the older copy is not kept");
        assert!(
            matches!(woken_with(waiting).await, Some(None)),
            "woken, and handed nothing"
        );
        // The load ends first: its copy goes when the change ends.
        let change = c.begin_change("k").expect("room");
        c.invalidate("k");
        let read = load(&c, "k", false);
        assert!(c.finish_fill(read, Some(at_version("read before", 6))));
        assert_eq!(user_in(&c, "k").as_deref(), Some("read before"));
        assert!(!c.finish_fill(change, Some(at_version("changed", 7))));
        assert!(c.get("k", 0).is_none(), "the older copy is dropped");
    }

    /// What a waiter is handed passes the same checks as a copy in the cache: not older than
    /// the user's own last change, not past the absolute timeout.
    #[test]
    fn a_handed_over_session_is_checked_like_a_copy() {
        let c = cache(10);
        let mut s = session("a");
        s.version = 3;
        let live = |s: &Session| Some(Handed::Live(s.clone()));
        assert!(c.handed_over(live(&s), 3).is_some());
        assert!(
            c.handed_over(live(&s), 4).is_none(),
            "older than the cookie"
        );
        assert!(c.handed_over(None, 0).is_none());
        // Absent: from the primary for anyone; a replica's only for a user with no version.
        let absent = |any_version| Some(Handed::Absent { any_version });
        assert!(matches!(
            c.handed_over(absent(true), 7),
            Some(Loaded::Absent)
        ));
        assert!(matches!(
            c.handed_over(absent(false), 0),
            Some(Loaded::Absent)
        ));
        assert!(
            c.handed_over(absent(false), 1).is_none(),
            "the replica may be behind"
        );
        let c = LocalCache::new(
            10,
            1 << 20,
            TtlPolicy {
                idle: Duration::from_secs(400),
                absolute: Some(Duration::from_secs(60)),
                ..TtlPolicy::default()
            },
        );
        s.created_ms = now_ms() - 61_000;
        assert!(
            c.handed_over(live(&s), 0).is_none(),
            "past the absolute timeout"
        );
    }
}
