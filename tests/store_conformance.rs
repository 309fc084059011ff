//! The store conformance suite: every check runs twice, once against the embedded
//! [`MemoryStore`] and once against the [`RedisStore`] on a `redis-server` of its own, so the two
//! implementations of [`SessionStore`] are held to one behaviour (TTLs, all-or-nothing changes,
//! counters, no resurrection, atomic take, rotation). A lockstep test then drives both stores and
//! `protocol::apply_to_fields` with the same pseudo-random changes, which shows that the Redis Lua
//! script mirrors the Rust definition of a change. A few Redis-only tests check the raw layout in
//! Redis and the behaviour against a Redis that stops answering.
//!
//! What is stored is always checked with the independent `redis` client for Redis (HGETALL, PTTL,
//! EXISTS), never only through the store under test.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stickless::config::{ProtocolConfig, TtlPolicy};
use stickless::cookie::SessionId;
use stickless::protocol::{apply_to_fields, Changes, Fields, Rejection, MAX_COUNTER};
use stickless::store::memory::MemoryStore;
use stickless::store::redis::{RedisSettings, RedisStore};
use stickless::store::{
    Applied, Loaded, Session, SessionStore, StoreError, Target, CREATED_FIELD, ROTATED_FIELD,
    VERSION_FIELD,
};
use support::*;

const PREFIX: &str = "stickless:";

// ---------------------------------------------------------------------------------------------
// Fixtures and helpers
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Memory,
    Redis,
}

fn ttl(idle_ms: u64, absolute_ms: Option<u64>) -> TtlPolicy {
    TtlPolicy {
        idle: Duration::from_millis(idle_ms),
        absolute: absolute_ms.map(Duration::from_millis),
        ..TtlPolicy::default()
    }
}

fn limits(max_fields: usize, max_session_bytes: usize) -> ProtocolConfig {
    ProtocolConfig {
        max_fields,
        max_session_bytes,
        ..ProtocolConfig::default()
    }
}

async fn redis_store(
    redis: &RedisServer,
    ttl: TtlPolicy,
    limits: ProtocolConfig,
    timeout: Duration,
) -> RedisStore {
    RedisStore::connect(RedisSettings {
        url: redis.url(),
        key_prefix: PREFIX.into(),
        timeout,
        ttl,
        limits,
        durability: Default::default(),
        iam: None,
        local_cache: 0,
        local_cache_bytes: stickless::config::DEFAULT_LOCAL_CACHE_BYTES,
        read_from: Default::default(),
    })
    .await
    .expect("a valid Redis URL")
}

fn key(id: &SessionId) -> String {
    format!("{PREFIX}{}", id.as_str())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn fields(pairs: &[(&str, &str)]) -> Fields {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn changes(delete: &[&str], set: &[(&str, &str)], incr: &[(&str, i64)]) -> Changes {
    Changes {
        delete: delete.iter().map(|s| s.to_string()).collect(),
        set: set
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        incr: incr.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
        ..Changes::default()
    }
}

fn created_of(applied: Applied) -> u64 {
    match applied {
        Applied::Stored { created_ms, .. } => created_ms,
        other => panic!("expected the change to be stored, got {other:?}"),
    }
}

/// Creates a session with these fields under `id`; returns its creation time.
async fn create(store: &dyn SessionStore, id: &SessionId, pairs: &[(&str, &str)]) -> u64 {
    created_of(
        store
            .apply(id, Target::New { base: None }, &changes(&[], pairs, &[]))
            .await
            .expect("apply(New)"),
    )
}

async fn redis_exists(redis: &RedisServer, key: &str) -> bool {
    let mut c = redis.conn().await;
    let n: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut c)
        .await
        .expect("EXISTS");
    n == 1
}

async fn redis_hset(redis: &RedisServer, key: &str, name: &str, value: &str) {
    let mut c = redis.conn().await;
    let _: i64 = redis::cmd("HSET")
        .arg(key)
        .arg(name)
        .arg(value)
        .query_async(&mut c)
        .await
        .expect("HSET");
}

/// One store under test, with its own redis-server when it is the Redis store.
struct Fixture {
    kind: Kind,
    store: Arc<dyn SessionStore>,
    redis: Option<RedisServer>,
}

impl Fixture {
    async fn new(kind: Kind, ttl: TtlPolicy, limits: ProtocolConfig) -> Self {
        match kind {
            Kind::Memory => Fixture {
                kind,
                store: Arc::new(MemoryStore::new(ttl, limits)),
                redis: None,
            },
            Kind::Redis => {
                let redis = RedisServer::start();
                let store = redis_store(&redis, ttl, limits, Duration::from_secs(2)).await;
                Fixture {
                    kind,
                    store: Arc::new(store),
                    redis: Some(redis),
                }
            }
        }
    }

    fn store(&self) -> &dyn SessionStore {
        &*self.store
    }

    /// Everything stored for `id`, `_created` and `_v` included (empty when nothing is). For Redis this is
    /// HGETALL with the independent client; the memory store can only be read through `load`.
    async fn raw(&self, id: &SessionId) -> BTreeMap<String, String> {
        match &self.redis {
            Some(r) => hgetall(r, &key(id)).await,
            None => match self.store.load(id).await.expect("memory load") {
                Loaded::Absent => BTreeMap::new(),
                // The memory store does not show a tombstone's fields.
                Loaded::Rotated => [(ROTATED_FIELD.to_string(), String::new())].into(),
                Loaded::Live(s) => {
                    let mut m = Fields::clone(&s.fields);
                    m.insert(CREATED_FIELD.into(), s.created_ms.to_string());
                    m.insert(VERSION_FIELD.into(), s.version.to_string());
                    m
                }
            },
        }
    }

    /// Whether anything is stored for `id` (Redis: EXISTS with the independent client).
    async fn exists(&self, id: &SessionId) -> bool {
        match &self.redis {
            Some(r) => redis_exists(r, &key(id)).await,
            None => self.store.load(id).await.expect("memory load") != Loaded::Absent,
        }
    }

    /// Writes one field around the protocol's checks: HSET with the independent client for Redis,
    /// a plain Set for the memory store.
    async fn write_raw(&self, id: &SessionId, name: &str, value: &str) {
        match &self.redis {
            Some(r) => redis_hset(r, &key(id), name, value).await,
            None => {
                let a = self
                    .store
                    .apply(id, Target::Existing, &changes(&[], &[(name, value)], &[]))
                    .await
                    .expect("apply");
                assert!(matches!(a, Applied::Stored { .. }), "write_raw: {a:?}");
            }
        }
    }

    /// PTTL of the session's key (Redis only).
    async fn pttl(&self, id: &SessionId) -> Option<i64> {
        match &self.redis {
            Some(r) => Some(pttl(r, &key(id)).await),
            None => None,
        }
    }

    /// Applies `c` to an existing session, expects exactly `expected` as the rejection, and checks
    /// that nothing at all changed.
    async fn assert_rejected(&self, what: &str, id: &SessionId, c: Changes, expected: Rejection) {
        let before = self.raw(id).await;
        assert!(!before.is_empty(), "{what}: the session exists before");
        let got = self
            .store
            .apply(id, Target::Existing, &c)
            .await
            .expect("apply");
        assert_eq!(
            got,
            Applied::Rejected(expected),
            "{:?} store, {what}: wrong outcome",
            self.kind
        );
        assert_eq!(
            self.raw(id).await,
            before,
            "{:?} store, {what}: a rejected change modified the session",
            self.kind
        );
    }
}

/// Generates, for each listed check `async fn name(kind: Kind)`, one test on the memory store
/// (`memory_store::name`) and one on the Redis store (`redis_store::name`).
macro_rules! on_both_stores {
    ($($check:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(super::Kind::Memory).await;
                }
            )*
        }
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(super::Kind::Redis).await;
                }
            )*
        }
    };
}

on_both_stores!(
    creates_and_loads,
    load_renews_the_idle_timeout,
    absolute_timeout_is_not_extended_by_use,
    gone_sessions_stay_gone,
    delete_set_incr_order,
    rejected_changes_change_nothing,
    take_and_destroy,
    rotation_leaves_a_tombstone_for_the_grace,
    restore_undoes_a_take,
    rotation_keeps_base_fields_and_creation_time,
    concurrent_increments_are_atomic,
);

// ---------------------------------------------------------------------------------------------
// Checks run on both stores
// ---------------------------------------------------------------------------------------------

async fn creates_and_loads(kind: Kind) {
    let f = Fixture::new(kind, ttl(60_000, None), ProtocolConfig::default()).await;
    let s = f.store();
    let id = SessionId::generate();
    assert_eq!(
        s.load(&id).await.unwrap().live(),
        None,
        "an unknown id loads as None"
    );
    assert!(
        !f.exists(&id).await,
        "a load of an unknown id creates nothing"
    );

    let text = "café 100% ☕\ttab";
    let before = now_ms();
    let applied = s
        .apply(
            &id,
            Target::New { base: None },
            &changes(
                &["never-there"],
                &[
                    ("user", "alice"),
                    ("zero", "007"),
                    ("plus", "+1"),
                    ("empty", ""),
                    ("text", text),
                ],
                &[("visits", 1), ("credit", -3)],
            ),
        )
        .await
        .unwrap();
    let after = now_ms();
    let created_ms = created_of(applied);
    assert!(
        (before..=after).contains(&created_ms),
        "created_ms {created_ms} not within [{before}, {after}]"
    );
    let expected = fields(&[
        ("user", "alice"),
        ("zero", "007"),
        ("plus", "+1"),
        ("empty", ""),
        ("text", text),
        ("visits", "1"),
        ("credit", "-3"),
    ]);
    let loaded = s
        .load(&id)
        .await
        .unwrap()
        .live()
        .expect("the new session loads");
    assert_eq!(*loaded.fields, expected);
    assert_eq!(loaded.created_ms, created_ms);
    assert_eq!(loaded.version, 1, "a new session is version 1");
    assert!(
        !loaded.fields.contains_key(CREATED_FIELD) && !loaded.fields.contains_key(VERSION_FIELD),
        "`_created` and `_v` are not fields"
    );
    let mut raw = expected.clone();
    raw.insert(CREATED_FIELD.into(), created_ms.to_string());
    raw.insert(VERSION_FIELD.into(), "1".into());
    assert_eq!(f.raw(&id).await, raw, "what is stored");

    // An Incr alone creates a session too.
    let id2 = SessionId::generate();
    created_of(
        s.apply(
            &id2,
            Target::New { base: None },
            &changes(&[], &[], &[("n", 41)]),
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        s.load(&id2)
            .await
            .unwrap()
            .live()
            .map(|s| Fields::clone(&s.fields)),
        Some(fields(&[("n", "41")]))
    );

    // A later change keeps the creation time.
    tokio::time::sleep(ms(10)).await;
    let again = s
        .apply(
            &id,
            Target::Existing,
            &changes(&[], &[("user", "bob")], &[("visits", 1)]),
        )
        .await
        .unwrap();
    assert_eq!(
        again,
        Applied::Stored {
            created_ms,
            version: 2
        },
        "each change counts the version up"
    );
    let loaded = s.load(&id).await.unwrap().live().unwrap();
    assert_eq!(loaded.created_ms, created_ms);
    assert_eq!(loaded.version, 2);
    assert_eq!(loaded.fields["user"], "bob");
    assert_eq!(loaded.fields["visits"], "2");
    assert_eq!(loaded.fields.len(), expected.len());
}

const IDLE_MS: u64 = 600;

async fn load_renews_the_idle_timeout(kind: Kind) {
    let f = Fixture::new(kind, ttl(IDLE_MS, None), ProtocolConfig::default()).await;
    for attempt in 1..=3 {
        if idle_attempt(&f).await {
            return;
        }
        eprintln!(
            "attempt {attempt}: the machine was too slow for the timing to be conclusive; retrying"
        );
    }
    panic!("three attempts in a row were too slow to be conclusive");
}

/// One run of the idle-TTL scenario; `false` when a stall made the timing inconclusive.
async fn idle_attempt(f: &Fixture) -> bool {
    let idle = ms(IDLE_MS);
    let s = f.store();
    let id = SessionId::generate();
    let s0 = Instant::now();
    create(s, &id, &[("user", "alice")]).await;
    let e0 = Instant::now();
    if let Some(p) = f.pttl(&id).await {
        if s0.elapsed() >= idle - ms(100) {
            return false;
        }
        assert!(
            p > 0 && p <= IDLE_MS as i64,
            "PTTL {p} right after creation, idle {IDLE_MS}"
        );
    }

    tokio::time::sleep(ms(320)).await;
    // Measured at least 320 ms after the creation's TTL was set.
    let p1 = f.pttl(&id).await;
    if let Some(p1) = p1 {
        assert!(
            p1 <= IDLE_MS as i64 - 300,
            "PTTL {p1} 320 ms after creation"
        );
    }
    let s1 = Instant::now();
    let r = s.load(&id).await.unwrap().live();
    let e1 = Instant::now();
    if e1 - s0 >= idle - ms(100) {
        return false;
    }
    assert!(r.is_some(), "loaded well within the idle timeout");
    if let Some(p1) = p1 {
        // Redis renews in the background, after the load's answer: the first PTTL that shows it.
        let mut p2 = f.pttl(&id).await.unwrap();
        while p2 <= p1 && s1.elapsed() < ms(200) {
            tokio::time::sleep(ms(5)).await;
            p2 = f.pttl(&id).await.unwrap();
        }
        let e2 = Instant::now();
        if e2 - s1 >= ms(200) {
            return false;
        }
        let floor = IDLE_MS as i64 - (e2 - s1).as_millis() as i64 - 20;
        assert!(
            p2 > p1 && p2 >= floor && p2 <= IDLE_MS as i64,
            "a load renews the PTTL: {p1} before, {p2} after (expected between {floor} and {IDLE_MS})"
        );
    }

    tokio::time::sleep(ms(320)).await;
    let s3 = Instant::now();
    let r = s.load(&id).await.unwrap().live();
    let e3 = Instant::now();
    if e3 - s1 >= idle - ms(100) {
        return false;
    }
    // Without the renewal by the first load, the session would have expired by now.
    assert!(s3 - e0 > idle, "test design: {:?}", s3 - e0);
    assert!(
        r.is_some(),
        "a load renews the idle timeout: the session must still be there {:?} after creation",
        s3 - e0
    );

    // Not used for longer than the idle timeout: gone.
    tokio::time::sleep_until((e3 + idle + ms(250)).into()).await;
    assert_eq!(
        s.load(&id).await.unwrap().live(),
        None,
        "a session idle for longer than the idle timeout is gone"
    );
    assert!(!f.exists(&id).await, "nothing is left in the store");
    true
}

async fn absolute_timeout_is_not_extended_by_use(kind: Kind) {
    const ABS: u64 = 800;
    let f = Fixture::new(kind, ttl(2_000, Some(ABS)), ProtocolConfig::default()).await;
    let s = f.store();
    let id = SessionId::generate();
    let s0 = Instant::now();
    create(s, &id, &[("user", "alice")]).await;
    let e0 = Instant::now();
    if let Some(p) = f.pttl(&id).await {
        // -2 only if this machine stalled for the whole absolute timeout.
        assert!(
            (p == -2 && s0.elapsed() >= ms(ABS - 20)) || (p > 0 && p <= ABS as i64),
            "PTTL {p}: the idle timeout (2 s) is cut by the absolute one ({ABS} ms)"
        );
    }
    let mut alive_loads = 0;
    let gone_after = loop {
        tokio::time::sleep(ms(100)).await;
        let s1 = Instant::now();
        let r = s.load(&id).await.unwrap().live();
        let e1 = Instant::now();
        match r {
            Some(_) => {
                alive_loads += 1;
                assert!(
                    s1 - e0 < ms(ABS + 20),
                    "loaded {:?} after creation, past the absolute timeout of {ABS} ms",
                    s1 - e0
                );
                let sp = Instant::now();
                if let Some(p) = f.pttl(&id).await {
                    let most = ABS as i64 - (sp - e0).as_millis() as i64 + 20;
                    // -2: expired in the meantime, which is fine this close to the end.
                    assert!(
                        p == -2 || (p > 0 && p <= most),
                        "PTTL {p} after a load {:?} after creation: a load must not extend the \
                         TTL past the absolute timeout (at most {most})",
                        sp - e0
                    );
                }
            }
            None => break e1 - s0,
        }
        assert!(
            s0.elapsed() < ms(3_000),
            "loads every 100 ms kept the session alive for 3 s despite an absolute timeout of {ABS} ms"
        );
    };
    assert!(
        gone_after >= ms(ABS - 20),
        "gone after {gone_after:?}, before the absolute timeout"
    );
    assert!(
        alive_loads >= 2,
        "only {alive_loads} loads before the absolute timeout"
    );

    let got = s
        .apply(
            &id,
            Target::Existing,
            &changes(&[], &[("user", "mallory")], &[("n", 1)]),
        )
        .await
        .unwrap();
    assert_eq!(got, Applied::Gone, "apply after the absolute timeout");
    assert!(!f.exists(&id).await, "nothing written after Gone");
    assert_eq!(s.load(&id).await.unwrap().live(), None);
}

async fn gone_sessions_stay_gone(kind: Kind) {
    let f = Fixture::new(kind, ttl(400, None), ProtocolConfig::default()).await;
    let s = f.store();
    let write = changes(&["user"], &[("user", "mallory")], &[("n", 1)]);

    // Never created.
    let id = SessionId::generate();
    assert_eq!(
        s.apply(&id, Target::Existing, &write).await.unwrap(),
        Applied::Gone
    );
    assert!(!f.exists(&id).await, "apply(Existing) created a session");

    // Destroyed.
    let id = SessionId::generate();
    create(s, &id, &[("user", "alice")]).await;
    s.destroy(&id).await.unwrap();
    assert_eq!(
        s.apply(&id, Target::Existing, &write).await.unwrap(),
        Applied::Gone
    );
    assert!(
        !f.exists(&id).await,
        "apply(Existing) brought back a destroyed session"
    );
    assert_eq!(s.load(&id).await.unwrap().live(), None);
    s.destroy(&id).await.expect("destroying twice is fine");

    // Taken (rotated away): the tombstone stays one.
    let id = SessionId::generate();
    create(s, &id, &[("user", "alice")]).await;
    assert!(s.take(&id).await.unwrap().is_some());
    let tombstone = f.raw(&id).await;
    assert_eq!(
        s.apply(&id, Target::Existing, &write).await.unwrap(),
        Applied::Gone
    );
    assert_eq!(
        s.load(&id).await.unwrap(),
        Loaded::Rotated,
        "apply(Existing) brought back a taken session"
    );
    assert_eq!(
        f.raw(&id).await,
        tombstone,
        "apply(Existing) wrote to a tombstone"
    );

    // Expired (nothing touches it between the expiry and the apply).
    let id = SessionId::generate();
    create(s, &id, &[("user", "alice")]).await;
    let e0 = Instant::now();
    tokio::time::sleep_until((e0 + ms(400 + 300)).into()).await;
    assert_eq!(
        s.apply(&id, Target::Existing, &write).await.unwrap(),
        Applied::Gone,
        "apply to an expired session"
    );
    assert!(
        !f.exists(&id).await,
        "apply(Existing) brought back an expired session"
    );
    assert_eq!(s.load(&id).await.unwrap().live(), None);
}

async fn delete_set_incr_order(kind: Kind) {
    let f = Fixture::new(kind, ttl(60_000, None), ProtocolConfig::default()).await;
    let s = f.store();
    let id = SessionId::generate();
    create(
        s,
        &id,
        &[("a", "old"), ("b", "keep"), ("c", "10"), ("d", "gone")],
    )
    .await;
    let load = || async { s.load(&id).await.unwrap().live().expect("session").fields };

    // Delete, then Set, then Incr: a deleted-and-set field holds the new value, a deleted-and-
    // incremented counter starts again from 0, a missing counter starts at 0.
    created_of(
        s.apply(
            &id,
            Target::Existing,
            &changes(
                &["a", "c", "d", "missing"],
                &[("a", "new")],
                &[("c", 3), ("n", 5)],
            ),
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        load().await,
        fields(&[("a", "new"), ("b", "keep"), ("c", "3"), ("n", "5")])
    );

    // Negative increments, through zero, on an existing and on a missing field.
    created_of(
        s.apply(
            &id,
            Target::Existing,
            &changes(&[], &[], &[("n", -7), ("m", -4)]),
        )
        .await
        .unwrap(),
    );
    let f1 = load().await;
    assert_eq!((f1["n"].as_str(), f1["m"].as_str()), ("-2", "-4"));
    created_of(
        s.apply(
            &id,
            Target::Existing,
            &changes(&[], &[], &[("n", 2), ("m", 0)]),
        )
        .await
        .unwrap(),
    );
    let f2 = load().await;
    assert_eq!((f2["n"].as_str(), f2["m"].as_str()), ("0", "-4"));
    created_of(
        s.apply(&id, Target::Existing, &changes(&[], &[], &[("n", -1)]))
            .await
            .unwrap(),
    );
    assert_eq!(load().await["n"], "-1", "0 is a valid counter");

    // A counter written by Set can be incremented; a plain delete removes.
    created_of(
        s.apply(
            &id,
            Target::Existing,
            &changes(&["b"], &[("s", "-12")], &[]),
        )
        .await
        .unwrap(),
    );
    created_of(
        s.apply(&id, Target::Existing, &changes(&[], &[], &[("s", 12)]))
            .await
            .unwrap(),
    );
    let f3 = load().await;
    assert_eq!(f3.get("b"), None);
    assert_eq!(f3["s"], "0");

    // Set of a field deleted in the same change, with a field written afterwards still kept.
    created_of(
        s.apply(
            &id,
            Target::Existing,
            &changes(&["a", "a"], &[("a", "again")], &[]),
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        load().await,
        fields(&[
            ("a", "again"),
            ("c", "3"),
            ("n", "-1"),
            ("m", "-4"),
            ("s", "0")
        ])
    );
    let raw = f.raw(&id).await;
    assert_eq!(raw.len(), 7, "five fields, `_created` and `_v`: {raw:?}");
}

async fn rejected_changes_change_nothing(kind: Kind) {
    let f = Fixture::new(kind, ttl(60_000, None), limits(4, 100)).await;
    let s = f.store();
    let id = SessionId::generate();
    create(s, &id, &[("a", "1"), ("b", "x"), ("n", "5")]).await; // 6 bytes
    let too_many = |count| Rejection::TooManyFields { count, max: 4 };
    let too_large = |size| Rejection::TooLarge { size, max: 100 };
    let not_counter = |name: &str| Rejection::NotACounter { name: name.into() };
    let y96 = "y".repeat(96);
    let y98 = "y".repeat(98);

    f.assert_rejected(
        "two more fields",
        &id,
        changes(&[], &[("c", "1"), ("d", "1")], &[]),
        too_many(5),
    )
    .await;
    f.assert_rejected(
        "delete one, add three",
        &id,
        changes(&["a"], &[("c", "1"), ("d", "1")], &[("e", 1), ("n", 1)]),
        too_many(5),
    )
    .await;
    f.assert_rejected(
        "an increment creating a fifth field",
        &id,
        changes(&[], &[("c", "1")], &[("d", 1)]),
        too_many(5),
    )
    .await;
    f.assert_rejected(
        "one value too large",
        &id,
        changes(&[], &[("b", &y96)], &[]),
        too_large(2 + 97 + 2),
    )
    .await;
    f.assert_rejected(
        "too large together with a delete and an increment",
        &id,
        changes(&["a"], &[("b", &y98)], &[("n", 1)]),
        too_large(99 + 2),
    )
    .await;
    f.assert_rejected(
        "incr of a non-integer among valid changes",
        &id,
        changes(&["a"], &[("c", "1")], &[("n", 1), ("b", 1)]),
        not_counter("b"),
    )
    .await;
    f.assert_rejected(
        "incr past 2^53-1",
        &id,
        changes(&["a"], &[], &[("n", MAX_COUNTER)]),
        not_counter("n"),
    )
    .await;

    // Exactly at the limits is accepted.
    let y92 = "y".repeat(92);
    created_of(
        s.apply(
            &id,
            Target::Existing,
            &changes(&[], &[("c", "1"), ("b", &y92)], &[]),
        )
        .await
        .unwrap(),
    ); // a:2 + b:93 + c:2 + n:2 = 99, 4 fields
    created_of(
        s.apply(&id, Target::Existing, &changes(&[], &[], &[("n", 5)]))
            .await
            .unwrap(),
    ); // n = "10": 100 bytes
    assert_eq!(
        f.raw(&id).await.len(),
        6,
        "4 fields (the limit), `_created` and `_v`"
    );
    f.assert_rejected(
        "one byte over",
        &id,
        changes(&[], &[], &[("n", 90)]),
        too_large(101),
    )
    .await;
    created_of(
        s.apply(&id, Target::Existing, &changes(&[], &[("b", "x")], &[]))
            .await
            .unwrap(),
    );

    // Counters at the ±(2^53-1) bounds.
    f.write_raw(&id, "n", &(MAX_COUNTER - 1).to_string()).await;
    created_of(
        s.apply(&id, Target::Existing, &changes(&[], &[], &[("n", 1)]))
            .await
            .unwrap(),
    );
    assert_eq!(f.raw(&id).await["n"], MAX_COUNTER.to_string());
    f.assert_rejected(
        "incr of 2^53-1 by 1",
        &id,
        changes(&[], &[], &[("n", 1)]),
        not_counter("n"),
    )
    .await;
    f.write_raw(&id, "n", &(1 - MAX_COUNTER).to_string()).await;
    created_of(
        s.apply(&id, Target::Existing, &changes(&[], &[], &[("n", -1)]))
            .await
            .unwrap(),
    );
    assert_eq!(f.raw(&id).await["n"], (-MAX_COUNTER).to_string());
    f.assert_rejected(
        "incr of -(2^53-1) by -1",
        &id,
        changes(&[], &[], &[("n", -1)]),
        not_counter("n"),
    )
    .await;
    created_of(
        s.apply(
            &id,
            Target::Existing,
            &changes(&[], &[], &[("n", MAX_COUNTER)]),
        )
        .await
        .unwrap(),
    );
    assert_eq!(f.raw(&id).await["n"], "0");

    // Stored values that are not canonical counters (as HINCRBY reads them).
    for v in [
        "007",
        "+1",
        "-0",
        "00",
        "-",
        "1.0",
        " 1",
        "1 ",
        "",
        "0x1",
        "1e3",
        "١",
        "9007199254740992",
        "-9007199254740992",
        "10000000000000000",
        "99999999999999999",
    ] {
        f.write_raw(&id, "b", v).await;
        f.assert_rejected(
            &format!("incr of a stored {v:?}"),
            &id,
            changes(&["a"], &[("c", "1")], &[("n", 1), ("b", 1)]),
            not_counter("b"),
        )
        .await;
    }

    // A rejected creation creates nothing.
    let id2 = SessionId::generate();
    let got = s
        .apply(
            &id2,
            Target::New { base: None },
            &changes(
                &[],
                &[("a", "1"), ("b", "1"), ("c", "1"), ("d", "1")],
                &[("e", 1)],
            ),
        )
        .await
        .unwrap();
    assert_eq!(got, Applied::Rejected(too_many(5)));
    assert!(!f.exists(&id2).await, "a rejected creation left a session");
    let got = s
        .apply(
            &id2,
            Target::New { base: None },
            &changes(&[], &[("a", &y98), ("b", "1")], &[]),
        )
        .await
        .unwrap();
    assert_eq!(got, Applied::Rejected(too_large(99 + 2)));
    assert!(!f.exists(&id2).await, "a rejected creation left a session");
}

async fn take_and_destroy(kind: Kind) {
    let f = Fixture::new(kind, ttl(60_000, None), ProtocolConfig::default()).await;
    let s = f.store();

    assert_eq!(s.take(&SessionId::generate()).await.unwrap(), None);
    s.destroy(&SessionId::generate())
        .await
        .expect("destroying a missing session is fine");

    let id = SessionId::generate();
    let created_ms = create(s, &id, &[("user", "alice"), ("cart", "3")]).await;
    let taken = s
        .take(&id)
        .await
        .unwrap()
        .expect("take returns the session");
    assert_eq!(
        taken,
        Session {
            fields: fields(&[("user", "alice"), ("cart", "3")]).into(),
            created_ms,
            version: 1
        }
    );
    assert_eq!(
        s.load(&id).await.unwrap(),
        Loaded::Rotated,
        "take leaves a tombstone"
    );
    assert_eq!(
        s.take(&id).await.unwrap(),
        None,
        "a second take finds nothing"
    );
    s.destroy(&id).await.unwrap();
    assert!(!f.exists(&id).await, "destroy deletes a tombstone");

    let id = SessionId::generate();
    create(s, &id, &[("user", "alice")]).await;
    s.destroy(&id).await.unwrap();
    assert!(!f.exists(&id).await, "destroy deletes");
    assert_eq!(s.load(&id).await.unwrap().live(), None);

    // Take is atomic: of 8 concurrent takes of one session, exactly one gets it.
    for round in 0..10 {
        let id = SessionId::generate();
        create(s, &id, &[("round", &round.to_string())]).await;
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = f.store.clone();
                let id = id.clone();
                tokio::spawn(async move { store.take(&id).await.unwrap() })
            })
            .collect();
        let mut got = Vec::new();
        for t in tasks {
            if let Some(sess) = t.await.unwrap() {
                got.push(sess);
            }
        }
        assert_eq!(
            got.len(),
            1,
            "round {round}: {} concurrent takes got the session",
            got.len()
        );
        assert_eq!(*got[0].fields, fields(&[("round", &round.to_string())]));
        assert_eq!(s.load(&id).await.unwrap(), Loaded::Rotated);
    }
}

const GRACE_MS: u64 = 500;

async fn rotation_leaves_a_tombstone_for_the_grace(kind: Kind) {
    let policy = TtlPolicy {
        rotation_grace: ms(GRACE_MS),
        ..ttl(60_000, None)
    };
    let f = Fixture::new(kind, policy, ProtocolConfig::default()).await;
    let s = f.store();
    let old = SessionId::generate();
    let created_ms = create(s, &old, &[("user", "anon"), ("cart", "3")]).await;
    let rotated_at = Instant::now();
    let base = s.take(&old).await.unwrap().expect("taken");
    let new = SessionId::generate();
    s.apply(
        &new,
        Target::New { base: Some(&base) },
        &changes(&[], &[("user", "alice")], &[]),
    )
    .await
    .unwrap();

    // Within the grace: the old id is rotated, whatever is asked of it.
    assert_eq!(s.load(&old).await.unwrap(), Loaded::Rotated);
    let write = changes(&["cart"], &[("x", "1")], &[("n", 1)]);
    assert_eq!(
        s.apply(&old, Target::Existing, &write).await.unwrap(),
        Applied::Gone
    );
    assert_eq!(
        s.take(&old).await.unwrap(),
        None,
        "a tombstone is not taken"
    );
    assert_eq!(s.load(&old).await.unwrap(), Loaded::Rotated);
    if let Some(r) = &f.redis {
        // What Redis holds under the old id: the old fields and the marker, never the new ones.
        let raw = hgetall(r, &key(&old)).await;
        let rotated_ms: u64 = raw[ROTATED_FIELD].parse().expect("the rotation time");
        assert!(rotated_ms >= created_ms && rotated_ms <= now_ms());
        let mut expected = fields(&[("user", "anon"), ("cart", "3")]);
        expected.insert(CREATED_FIELD.into(), created_ms.to_string());
        expected.insert(ROTATED_FIELD.into(), rotated_ms.to_string());
        expected.insert(VERSION_FIELD.into(), "1".into());
        assert_eq!(raw, expected);
        let p = pttl(r, &key(&old)).await;
        assert!(
            p > 0 && p <= GRACE_MS as i64,
            "PTTL {p}: a tombstone lives for the grace"
        );
    }
    assert!(rotated_at.elapsed() < ms(GRACE_MS), "test design: too slow");
    assert_eq!(
        s.load(&new)
            .await
            .unwrap()
            .live()
            .map(|s| Fields::clone(&s.fields)),
        Some(fields(&[("user", "alice"), ("cart", "3")]))
    );

    // After the grace: unknown, and a write under it is Gone as for any expired session.
    tokio::time::sleep_until((rotated_at + ms(GRACE_MS + 150)).into()).await;
    assert_eq!(s.load(&old).await.unwrap(), Loaded::Absent);
    assert!(!f.exists(&old).await, "the tombstone expired");
    assert_eq!(
        s.apply(&old, Target::Existing, &write).await.unwrap(),
        Applied::Gone
    );
    assert_eq!(s.restore(&old).await.unwrap(), Applied::Gone);
    assert!(!f.exists(&old).await);
    assert!(s.load(&new).await.unwrap().live().is_some());
}

async fn restore_undoes_a_take(kind: Kind) {
    let f = Fixture::new(kind, ttl(60_000, Some(30_000)), ProtocolConfig::default()).await;
    let s = f.store();
    assert_eq!(
        s.restore(&SessionId::generate()).await.unwrap(),
        Applied::Gone,
        "nothing to restore"
    );

    let id = SessionId::generate();
    let created_ms = create(s, &id, &[("user", "anon"), ("cart", "3")]).await;
    let before = f.raw(&id).await;
    s.take(&id).await.unwrap().expect("taken");
    assert_eq!(
        s.restore(&id).await.unwrap(),
        Applied::Stored {
            created_ms,
            version: 1
        }
    );
    assert_eq!(
        s.load(&id).await.unwrap(),
        Loaded::Live(Session {
            fields: fields(&[("user", "anon"), ("cart", "3")]).into(),
            created_ms,
            version: 1
        })
    );
    assert_eq!(f.raw(&id).await, before, "restored exactly, marker gone");
    if let Some(p) = f.pttl(&id).await {
        assert!(
            p > 25_000 && p <= 30_000,
            "PTTL {p}: the TTL is renewed, cut by the absolute timeout"
        );
    }
    // Restoring a live session changes nothing; it can be taken again.
    assert_eq!(
        s.restore(&id).await.unwrap(),
        Applied::Stored {
            created_ms,
            version: 1
        }
    );
    assert_eq!(f.raw(&id).await, before);
    assert!(s.take(&id).await.unwrap().is_some());

    // A session past its absolute timeout is not brought back.
    if let Some(r) = &f.redis {
        let id = SessionId::generate();
        create(s, &id, &[("user", "anon")]).await;
        s.take(&id).await.unwrap().expect("taken");
        age(r, &id, 40_000).await;
        assert_eq!(s.restore(&id).await.unwrap(), Applied::Gone);
        assert!(!f.exists(&id).await, "deleted, not restored");
    }
}

async fn rotation_keeps_base_fields_and_creation_time(kind: Kind) {
    const ABS: u64 = 30_000;
    let f = Fixture::new(kind, ttl(60_000, Some(ABS)), limits(8, 1000)).await;
    let s = f.store();

    let old = SessionId::generate();
    let created_ms = create(s, &old, &[("user", "alice"), ("cart", "3")]).await;
    tokio::time::sleep(ms(20)).await;
    let base = s.take(&old).await.unwrap().expect("taken");
    let new = SessionId::generate();
    let got = s
        .apply(
            &new,
            Target::New { base: Some(&base) },
            &changes(&["cart"], &[("role", "admin")], &[("visits", 1)]),
        )
        .await
        .unwrap();
    assert_eq!(
        got,
        Applied::Stored {
            created_ms,
            version: 1
        },
        "the rotated session keeps its creation time, and starts its versions again"
    );
    let loaded = s.load(&new).await.unwrap().live().expect("rotated session");
    assert_eq!(
        loaded,
        Session {
            fields: fields(&[("user", "alice"), ("role", "admin"), ("visits", "1")]).into(),
            created_ms,
            version: 1
        }
    );
    assert_eq!(s.load(&old).await.unwrap(), Loaded::Rotated);
    if let Some(r) = &f.redis {
        assert_eq!(
            hgetall(r, &key(&new)).await[CREATED_FIELD],
            created_ms.to_string()
        );
    }

    // Rotation without further changes moves the fields as they are.
    let newer = SessionId::generate();
    let base = s.take(&new).await.unwrap().unwrap();
    assert_eq!(
        s.apply(
            &newer,
            Target::New { base: Some(&base) },
            &Changes::default()
        )
        .await
        .unwrap(),
        Applied::Stored {
            created_ms,
            version: 1
        }
    );
    assert_eq!(s.load(&newer).await.unwrap().live(), Some(base));

    // An old base keeps its age: the absolute timeout counts from the original creation.
    let aged = Session {
        fields: fields(&[("user", "bob")]).into(),
        created_ms: now_ms() - 20_000,
        // What the new id has once written, whatever the base had.
        version: 1,
    };
    let id = SessionId::generate();
    assert_eq!(
        s.apply(&id, Target::New { base: Some(&aged) }, &Changes::default())
            .await
            .unwrap(),
        Applied::Stored {
            created_ms: aged.created_ms,
            version: 1
        }
    );
    assert_eq!(s.load(&id).await.unwrap().live(), Some(aged.clone()));
    if let Some(p) = f.pttl(&id).await {
        assert!(
            p > 5_000 && p <= 10_000 + 50,
            "PTTL {p}: a base created 20 s ago has at most 10 s left of its 30 s"
        );
    }

    // A base past its absolute timeout is not revived under the new id.
    let expired = Session {
        fields: fields(&[("user", "carol")]).into(),
        created_ms: now_ms() - 40_000,
        version: 1,
    };
    let id = SessionId::generate();
    assert_eq!(
        s.apply(
            &id,
            Target::New {
                base: Some(&expired)
            },
            &changes(&[], &[("x", "1")], &[])
        )
        .await
        .unwrap(),
        Applied::Gone
    );
    assert!(!f.exists(&id).await, "an expired base was revived");

    // A rotation whose changes are refused writes nothing under the new id.
    let id = SessionId::generate();
    let got = s
        .apply(
            &id,
            Target::New { base: Some(&aged) },
            &changes(&[], &[], &[("user", 1)]),
        )
        .await
        .unwrap();
    assert_eq!(
        got,
        Applied::Rejected(Rejection::NotACounter {
            name: "user".into()
        })
    );
    assert!(!f.exists(&id).await);
    let many: Vec<(String, String)> = (0..8).map(|i| (format!("f{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let got = s
        .apply(
            &id,
            Target::New { base: Some(&aged) },
            &changes(&[], &many, &[]),
        )
        .await
        .unwrap();
    assert_eq!(
        got,
        Applied::Rejected(Rejection::TooManyFields { count: 9, max: 8 })
    );
    assert!(!f.exists(&id).await);
}

async fn concurrent_increments_are_atomic(kind: Kind) {
    let f = Fixture::new(kind, ttl(60_000, None), ProtocolConfig::default()).await;
    let id = SessionId::generate();
    create(f.store(), &id, &[("user", "alice")]).await;
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let store = f.store.clone();
            let id = id.clone();
            tokio::spawn(async move {
                store
                    .apply(
                        &id,
                        Target::Existing,
                        &changes(&[], &[], &[("counter", 1), ("down", -1)]),
                    )
                    .await
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        let got = t.await.unwrap();
        assert!(matches!(got, Applied::Stored { .. }), "{got:?}");
    }
    let raw = f.raw(&id).await;
    assert_eq!(raw["counter"], "200", "200 concurrent increments by 1");
    assert_eq!(raw["down"], "-200");
    assert_eq!(raw["user"], "alice");
    assert_eq!(
        raw[VERSION_FIELD], "201",
        "one version per change, none lost"
    );
    assert_eq!(raw.len(), 5);
}

// ---------------------------------------------------------------------------------------------
// Both stores in lockstep with the reference definition
// ---------------------------------------------------------------------------------------------

/// A 64-bit linear congruential generator (Knuth's MMIX constants): deterministic, no dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const NAMES: [&str; 12] = [
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
    "i",
    "j",
    "count",
    "long-field-name-0123456789",
];

fn random_value(rng: &mut Lcg) -> String {
    let values = [
        "",
        "v",
        "0",
        "1",
        "7",
        "-3",
        "42",
        "007",
        "+1",
        "-0",
        "1.5",
        "9007199254740991",
        "-9007199254740991",
        "9007199254740990",
        "héllo wörld",
        "100%",
        "😀😀😀",
    ];
    match rng.below(10) {
        0 => "x".repeat(30),
        1 => "é".repeat(35), // 70 bytes, 35 characters
        2 => "z".repeat(120),
        _ => rng.pick(&values).to_string(),
    }
}

/// Random changes that a backend could send: Set and Incr names are distinct (the protocol
/// refuses duplicates); Delete may name anything.
fn random_changes(rng: &mut Lcg) -> Changes {
    let increments = [
        1,
        1,
        1,
        2,
        -1,
        -5,
        0,
        100,
        MAX_COUNTER,
        -MAX_COUNTER,
        MAX_COUNTER - 1,
        1 - MAX_COUNTER,
    ];
    let mut c = Changes::default();
    for _ in 0..[0, 0, 1, 2][rng.below(4)] {
        c.delete.push(rng.pick(&NAMES).to_string());
    }
    let mut used = BTreeSet::new();
    for _ in 0..rng.below(4) {
        let n = *rng.pick(&NAMES);
        if used.insert(n) {
            c.set.push((n.to_string(), random_value(rng)));
        }
    }
    for _ in 0..rng.below(3) {
        let n = *rng.pick(&NAMES);
        if used.insert(n) {
            c.incr.push((n.to_string(), *rng.pick(&increments)));
        }
    }
    c
}

/// The outcome without the creation time, which differs between two stores by a few ms, and
/// the version (compared between the stores after each step).
fn outcome(a: &Applied) -> Applied {
    match a {
        Applied::Stored { .. } => Applied::Stored {
            created_ms: 0,
            version: 0,
        },
        other => other.clone(),
    }
}

fn outcome_label(a: &Applied) -> &'static str {
    match a {
        Applied::Stored { .. } => "stored",
        Applied::Gone => "gone",
        Applied::Rejected(Rejection::TooManyFields { .. }) => "too many fields",
        Applied::Rejected(Rejection::TooLarge { .. }) => "too large",
        Applied::Rejected(Rejection::NotACounter { .. }) => "not a counter",
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Existing,
    New,
    Rotate,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_stores_apply_changes_like_apply_to_fields() {
    let lim = limits(8, 200);
    let t = ttl(600_000, None);
    let memory = MemoryStore::new(t, lim.clone());
    let redis = RedisServer::start();
    let on_redis = redis_store(&redis, t, lim.clone(), Duration::from_secs(2)).await;
    let stores: [(&str, &dyn SessionStore); 2] = [("memory", &memory), ("redis", &on_redis)];

    let mut rng = Lcg(0x0057_17c4_1e55);
    let mut id = SessionId::generate();
    let mut model: Option<Fields> = None;
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();

    for step in 0..300 {
        let roll = rng.below(100);
        if roll < 3 {
            for (_, store) in stores {
                store.destroy(&id).await.unwrap();
            }
            model = None;
            *counts.entry("destroy").or_default() += 1;
            continue;
        }
        let mut c = random_changes(&mut rng);
        let mode = if roll < 9 {
            Mode::Rotate
        } else if model.is_some() || rng.below(2) == 0 {
            Mode::Existing
        } else {
            Mode::New
        };
        if matches!(mode, Mode::New) && !c.writes_fields() {
            // Only a change that writes fields creates a session.
            c.set.push(("a".into(), "created".into()));
        }

        // What the reference definition says.
        let expected = match (mode, &model) {
            (Mode::Existing, None) => Applied::Gone,
            (_, base) => match apply_to_fields(&base.clone().unwrap_or_default(), &c, &lim) {
                Ok(_) => Applied::Stored {
                    created_ms: 0,
                    version: 0,
                },
                Err(r) => Applied::Rejected(r),
            },
        };
        let next_model = match (&expected, mode) {
            (Applied::Stored { .. }, _) => Some(
                apply_to_fields(&model.clone().unwrap_or_default(), &c, &lim)
                    .expect("accepted above"),
            ),
            (_, Mode::Rotate) => None, // taken, and the new session refused
            _ => model.clone(),
        };
        let new_id = SessionId::generate();

        for (name, store) in stores {
            let got = match mode {
                Mode::Existing => store.apply(&id, Target::Existing, &c).await.unwrap(),
                Mode::New => store
                    .apply(&id, Target::New { base: None }, &c)
                    .await
                    .unwrap(),
                Mode::Rotate => {
                    let base = store.take(&id).await.unwrap();
                    assert_eq!(
                        base.as_ref().map(|b| &*b.fields),
                        model.as_ref(),
                        "step {step}: {name}: take"
                    );
                    store
                        .apply(
                            &new_id,
                            Target::New {
                                base: base.as_ref(),
                            },
                            &c,
                        )
                        .await
                        .unwrap()
                }
            };
            assert_eq!(
                outcome(&got),
                expected,
                "step {step}: {name} store, {mode:?} with {c:?} on {:?}",
                model.as_ref().map(|m| m.keys().collect::<Vec<_>>())
            );
        }
        *counts.entry(outcome_label(&expected)).or_default() += 1;
        if matches!(mode, Mode::Rotate) {
            id = new_id;
        }
        model = next_model;

        let mut versions = Vec::new();
        for (name, store) in stores {
            let loaded = store.load(&id).await.unwrap().live();
            versions.push(loaded.as_ref().map(|s| s.version));
            assert_eq!(
                loaded.map(|s| Fields::clone(&s.fields)),
                model,
                "step {step}: {name} store holds other fields than apply_to_fields gives"
            );
        }
        assert_eq!(
            versions[0], versions[1],
            "step {step}: the stores count versions alike"
        );
        let mut raw = hgetall(&redis, &key(&id)).await;
        assert_eq!(
            raw.remove(VERSION_FIELD).map(|v| v.parse::<u64>().unwrap()),
            versions[1],
            "step {step}: `_v`"
        );
        let created = raw.remove(CREATED_FIELD);
        assert_eq!(
            created.is_some(),
            model.is_some(),
            "step {step}: `_created`"
        );
        assert_eq!(
            raw,
            model.clone().unwrap_or_default(),
            "step {step}: the raw Redis hash"
        );
    }

    eprintln!("outcomes over 300 steps: {counts:?}");
    for kind in [
        "stored",
        "gone",
        "too many fields",
        "too large",
        "not a counter",
        "destroy",
    ] {
        assert!(
            counts.get(kind).copied().unwrap_or(0) >= 3,
            "the sequence exercised `{kind}` fewer than 3 times: {counts:?}"
        );
    }
    let final_memory = memory
        .load(&id)
        .await
        .unwrap()
        .live()
        .map(|s| Fields::clone(&s.fields));
    let final_redis = on_redis
        .load(&id)
        .await
        .unwrap()
        .live()
        .map(|s| Fields::clone(&s.fields));
    assert_eq!(final_memory, final_redis);
    assert_eq!(final_memory, model);
}

// ---------------------------------------------------------------------------------------------
// Redis only
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_raw_layout_and_ping() {
    let redis = RedisServer::start();
    let store = plain_redis_store(&redis).await;
    store.ping().await.expect("ping");

    let id = SessionId::generate();
    let text = "café 100%\n☕ %41";
    let before = now_ms();
    let created_ms = created_of(
        store
            .apply(
                &id,
                Target::New { base: None },
                &changes(
                    &[],
                    &[
                        ("user", "alice"),
                        ("note", text),
                        ("empty", ""),
                        ("zero", "007"),
                    ],
                    &[("visits", 2)],
                ),
            )
            .await
            .unwrap(),
    );
    let after = now_ms();
    assert!((before..=after).contains(&created_ms));
    let k = format!("stickless:{}", id.as_str());
    assert_eq!(id.as_str().len(), 43);
    assert_eq!(keys(&redis, "*").await, vec![k.clone()], "one key");
    let mut c = redis.conn().await;
    let kind: String = redis::cmd("TYPE")
        .arg(&k)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(kind, "hash");
    let expected: BTreeMap<String, String> = [
        ("user", "alice"),
        ("note", text),
        ("empty", ""),
        ("zero", "007"),
        ("visits", "2"),
        (CREATED_FIELD, &created_ms.to_string()),
        (VERSION_FIELD, "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(
        hgetall(&redis, &k).await,
        expected,
        "values stored decoded, `_created` in ms, version 1"
    );
    let p = pttl(&redis, &k).await;
    assert!(
        p > 50_000 && p <= 60_000,
        "PTTL {p} for an idle timeout of 60 s"
    );
    let loaded = store.load(&id).await.unwrap().live().unwrap();
    assert_eq!(loaded.created_ms, created_ms);
    assert_eq!(loaded.fields["note"], text);
    assert_eq!(loaded.fields["empty"], "");
    assert_eq!(loaded.fields["zero"], "007");

    // An absolute timeout shorter than the idle one cuts the PTTL.
    let store2 = redis_store(
        &redis,
        ttl(60_000, Some(10_000)),
        ProtocolConfig::default(),
        Duration::from_secs(2),
    )
    .await;
    let id2 = SessionId::generate();
    create(&store2, &id2, &[("user", "bob")]).await;
    let p = pttl(&redis, &key(&id2)).await;
    assert!(
        p > 5_000 && p <= 10_000,
        "PTTL {p}: cut to the absolute timeout of 10 s"
    );
    store2.load(&id2).await.unwrap().live().unwrap();
    let p = pttl(&redis, &key(&id2)).await;
    assert!(p > 5_000 && p <= 10_000, "PTTL {p} after a load");
}

/// A store on `redis` with a 60 s idle timeout, no absolute timeout, the default limits and a 2 s
/// timeout.
async fn plain_redis_store(redis: &RedisServer) -> RedisStore {
    redis_store(
        redis,
        ttl(60_000, None),
        ProtocolConfig::default(),
        Duration::from_secs(2),
    )
    .await
}

/// A session stored before versions existed (no `_v`) is version 0, and its next change makes
/// it version 1: sessions survive an upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sessions_without_a_version_read_as_version_0() {
    let redis = RedisServer::start();
    let store = plain_redis_store(&redis).await;
    let id = SessionId::generate();
    create(&store, &id, &[("user", "alice")]).await;
    let mut c = redis.conn().await;
    let removed: i64 = redis::cmd("HDEL")
        .arg(key(&id))
        .arg(VERSION_FIELD)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let loaded = store.load(&id).await.unwrap().live().unwrap();
    assert_eq!(
        (loaded.version, loaded.fields["user"].as_str()),
        (0, "alice")
    );
    let applied = store
        .apply(&id, Target::Existing, &changes(&[], &[], &[("n", 1)]))
        .await
        .unwrap();
    assert!(
        matches!(applied, Applied::Stored { version: 1, .. }),
        "{applied:?}"
    );
    assert_eq!(hgetall(&redis, &key(&id)).await[VERSION_FIELD], "1");
}

/// Makes a session look `by_ms` old and gives its key a long TTL, with the independent client.
async fn age(redis: &RedisServer, id: &SessionId, by_ms: u64) {
    let k = key(id);
    let mut c = redis.conn().await;
    let _: (i64, i64) = redis::pipe()
        .cmd("HSET")
        .arg(&k)
        .arg(CREATED_FIELD)
        .arg((now_ms() - by_ms).to_string())
        .cmd("PEXPIRE")
        .arg(&k)
        .arg(60_000)
        .query_async(&mut c)
        .await
        .expect("HSET + PEXPIRE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_absolute_timeout_uses_the_stored_creation_time() {
    // Another instance (or an operator) may have left a key whose TTL outlives its absolute
    // timeout: the scripts must judge by `_created`, not only by the key's expiry.
    let redis = RedisServer::start();
    let store = redis_store(
        &redis,
        ttl(60_000, Some(5_000)),
        ProtocolConfig::default(),
        Duration::from_secs(2),
    )
    .await;
    let id = SessionId::generate();
    create(&store, &id, &[("user", "alice")]).await;
    age(&redis, &id, 10_000).await;
    assert_eq!(
        store
            .apply(
                &id,
                Target::Existing,
                &changes(&[], &[("user", "mallory")], &[])
            )
            .await
            .unwrap(),
        Applied::Gone
    );
    assert!(
        !redis_exists(&redis, &key(&id)).await,
        "the expired session is deleted, not written"
    );

    let id = SessionId::generate();
    create(&store, &id, &[("user", "alice")]).await;
    age(&redis, &id, 10_000).await;
    // A load writes nothing: the key is left to its TTL, and is absent to every load until then.
    assert_eq!(store.load(&id).await.unwrap().live(), None);
    assert!(redis_exists(&redis, &key(&id)).await);
    assert_eq!(store.load(&id).await.unwrap().live(), None);

    let id = SessionId::generate();
    create(&store, &id, &[("user", "alice")]).await;
    age(&redis, &id, 3_000).await;
    assert!(store.load(&id).await.unwrap().live().is_some());
    // The renewal goes in the background, after the load's answer.
    let p = eventually(
        "the TTL cut by a renewal",
        Duration::from_secs(5),
        || async {
            let p = pttl(&redis, &key(&id)).await;
            (p <= 2_000 + 50).then_some(p)
        },
    )
    .await;
    assert!(
        p > 0,
        "PTTL {p}: a load cuts the TTL to what is left of the absolute timeout"
    );
}

async fn expect_timeout<T: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) {
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| panic!("{what} hung for 10 s on a paused Redis"));
    let took = start.elapsed();
    match r {
        Err(StoreError::Timeout(d)) => assert_eq!(d, limit, "{what}"),
        other => panic!("{what} on a paused Redis: expected StoreError::Timeout, got {other:?}"),
    }
    assert!(
        took >= limit - ms(50) && took < limit + ms(700),
        "{what} failed after {took:?}; the configured timeout is {limit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_calls_time_out() {
    let redis = RedisServer::start();
    let limit = ms(300);
    let store = redis_store(&redis, ttl(60_000, None), ProtocolConfig::default(), limit).await;
    let id = SessionId::generate();
    create(&store, &id, &[("user", "alice")]).await;
    store.ping().await.unwrap();

    redis.pause();
    let other = SessionId::generate();
    let set_x = changes(&[], &[("x", "1")], &[]);
    expect_timeout("load", limit, store.load(&id)).await;
    expect_timeout(
        "apply(Existing)",
        limit,
        store.apply(&id, Target::Existing, &set_x),
    )
    .await;
    expect_timeout(
        "apply(New)",
        limit,
        store.apply(&other, Target::New { base: None }, &set_x),
    )
    .await;
    expect_timeout("take", limit, store.take(&other)).await;
    expect_timeout("destroy", limit, store.destroy(&other)).await;
    expect_timeout("ping", limit, store.ping()).await;
    redis.resume();

    // The store recovers by itself once Redis answers again.
    let end = Instant::now() + Duration::from_secs(10);
    let loaded = loop {
        match store.load(&id).await {
            Ok(Loaded::Live(s)) => break s,
            Ok(other) => panic!("the session disappeared while Redis was paused: {other:?}"),
            Err(e) => assert!(Instant::now() < end, "no recovery within 10 s: {e}"),
        }
        tokio::time::sleep(ms(50)).await;
    };
    assert_eq!(loaded.fields["user"], "alice");
    assert_eq!(
        loaded.fields.get("x"),
        None,
        "a write that timed out was run when Redis resumed, past its deadline"
    );
    assert!(matches!(
        store
            .apply(&id, Target::Existing, &changes(&[], &[], &[("n", 1)]))
            .await
            .unwrap(),
        Applied::Stored { .. }
    ));
    assert_eq!(hgetall(&redis, &key(&id)).await["n"], "1");
    store.ping().await.expect("ping after resume");
}
