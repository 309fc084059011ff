//! The local cache (`--local-cache`) against real redis-server processes: two stickless instances
//! on one Redis, each with its cache. A change or a logout through one is seen through the other
//! once Redis's invalidation arrives; a restarted Redis empties the cache; a hit costs no
//! command at all in Redis; a copy older than the version in the user's cookie is never served;
//! and a drill of users writing through one instance and reading through the other checks that
//! no read misses the user's own acknowledged write, and measures how long a logout takes to be
//! seen by the other instance.

#[path = "support/scrape.rs"]
mod scrape;
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use scrape::Scrape;
use stickless::cookie::SigningKeys;
use support::*;
use tokio::io::AsyncBufReadExt;

const CACHE: &[&str] = &["--local-cache", "1000"];

async fn hits(proxy: &Stickless) -> f64 {
    Scrape::of(proxy)
        .await
        .value(r#"stickless_local_cache_lookups_total{result="hit"}"#)
        .unwrap_or(0.0)
}

fn field(r: &Reply, name: &str) -> Option<String> {
    r.seen().fields().get(name).cloned()
}

/// Reads through `proxy` until a read is served from its cache (the invalidation channel is up
/// and the session is cached), and returns the field `name` as that read saw it.
async fn read_until_cached(http: &mut Http, proxy: &Stickless, name: &str) -> Option<String> {
    eventually(
        "a read served from the local cache",
        Duration::from_secs(10),
        || {
            let mut http = http.clone();
            async move {
                let before = hits(proxy).await;
                let r = http.get(&proxy.url("/")).await;
                (hits(proxy).await > before).then(|| field(&r, name))
            }
        },
    )
    .await
}

/// Two instances, each with its cache, on one Redis, and a user (`http`'s jar) whose session,
/// `user=alice`, was made through the first.
async fn two_instances_with_alice() -> (RedisServer, TestBackend, Stickless, Stickless, Http) {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let a = Stickless::on_redis(&backend.url(), &redis, CACHE);
    let b = Stickless::on_redis(&backend.url(), &redis, CACHE);
    let mut http = Http::with_jar();
    http.get_replying(&a.url("/"), &["x-session-set-user: alice"])
        .await;
    (redis, backend, a, b, http)
}

/// One instance started with `args`, on its own Redis, and a user (`http`'s jar) whose session,
/// `user=alice`, it has made and holds in its cache.
async fn one_instance_with_alice_cached(
    args: &[&str],
) -> (RedisServer, TestBackend, Stickless, Http) {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, args);
    let mut http = Http::with_jar();
    http.get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    read_until_cached(&mut http, &proxy, "user").await;
    (redis, backend, proxy, http)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_through_one_instance_is_seen_through_the_other() {
    let (_redis, _backend, a, b, mut http) = two_instances_with_alice().await;
    assert_eq!(
        read_until_cached(&mut http, &b, "user").await.as_deref(),
        Some("alice")
    );

    let r = http
        .get_replying(&a.url("/"), &["x-session-set-user: bob"])
        .await;
    assert_eq!(r.status, 200);
    seen_through(&http, &b, "user", "bob").await;
    // And keeps seeing it from its cache.
    assert_eq!(
        read_until_cached(&mut http, &b, "user").await.as_deref(),
        Some("bob")
    );
    let invalidations = Scrape::of(&b)
        .await
        .value("stickless_local_cache_invalidations_total")
        .unwrap_or(0.0);
    assert!(invalidations >= 1.0, "B counted the invalidation");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_logout_through_one_instance_is_seen_through_the_other() {
    let (_redis, _backend, a, b, mut http) = two_instances_with_alice().await;
    let sid = http.sid.clone().expect("a session cookie");
    read_until_cached(&mut http, &b, "user").await;

    http.get_replying(&a.url("/"), &["x-session-destroy: true"])
        .await;
    // The logged-out cookie, replayed against B.
    let mut replay = Http::with_jar();
    replay.keep_cookies = true;
    eventually(
        "B no longer knows the session destroyed through A",
        Duration::from_secs(5),
        || {
            let mut replay = replay.clone();
            replay.sid = Some(sid.clone());
            let b = &b;
            async move {
                let r = replay.get(&b.url("/")).await;
                (r.seen().header("x-session") != Some("active")).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_redis_empties_the_cache() {
    let (mut redis, _backend, a, mut http) = one_instance_with_alice_cached(CACHE).await;

    // A new, empty Redis on the same port: the session is gone, and no invalidation said so.
    let port = redis.port;
    redis.kill();
    let _redis = RedisServer::start_on(port);
    eventually("the store reconnected", Duration::from_secs(10), || async {
        let s = Scrape::of(&a).await;
        (s.value("stickless_store_reconnections_total")
            .unwrap_or(0.0)
            >= 1.0)
            .then_some(())
    })
    .await;
    let r = http.get(&a.url("/")).await;
    assert_ne!(
        r.seen().header("x-session"),
        Some("active"),
        "a session from before the restart was served from the cache"
    );
    let flushes = Scrape::of(&a)
        .await
        .value("stickless_local_cache_flushes_total")
        .unwrap_or(0.0);
    assert!(flushes >= 1.0);
}

/// Reads through `proxy` with the user's session cookie only (no version cookie, so that only an
/// invalidation can make a cached copy go), until the field `name` reads `value`.
async fn seen_through(http: &Http, proxy: &Stickless, name: &str, value: &str) {
    eventually(
        &format!("{name}={value} seen through the other instance"),
        Duration::from_secs(5),
        || {
            let mut http = http.clone();
            http.sid_v = None;
            async move {
                (field(&http.get(&proxy.url("/")).await, name).as_deref() == Some(value))
                    .then_some(())
            }
        },
    )
    .await;
}

/// On a cluster each primary broadcasts the invalidations of its own slots only: sessions on all
/// three shards, changed through A, are seen through B's cache; after a switchover on one shard
/// B drops its cache, follows the new primary, and sees changes there too.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_cluster_changes_on_every_shard_are_seen_through_the_other_instance() {
    let cluster = blocking(RedisCluster::start);
    let backend = TestBackend::start().await;
    let a = Stickless::on_redis_url(&backend.url(), &cluster.url(), CACHE);
    let b = Stickless::on_redis_url(&backend.url(), &cluster.url(), CACHE);
    // Session ids are random: users are added until every shard holds a session (12 users
    // leave one shard empty about once in 40 runs; 48 about once in 100 million).
    let mut users = Vec::new();
    let mut shards = cluster.keys_by_primary("stickless:*");
    while users.len() < 12 || (users.len() < 48 && shards.values().any(|keys| keys.is_empty())) {
        let mut http = Http::with_jar();
        let i = users.len();
        http.get_replying(&a.url("/"), &[&format!("x-session-set-user: u{i}")])
            .await;
        users.push(http);
        shards = cluster.keys_by_primary("stickless:*");
    }
    assert_eq!(
        shards.values().filter(|keys| !keys.is_empty()).count(),
        3,
        "sessions on every shard: {shards:?}"
    );

    let change_all = |round: &'static str| {
        let (a, b, users) = (&a, &b, users.clone());
        async move {
            for (i, mut http) in users.into_iter().enumerate() {
                assert!(read_until_cached(&mut http, b, "user").await.is_some());
                let value = format!("{round}{i}");
                let r = http
                    .get_replying(&a.url("/"), &[&format!("x-session-set-user: {value}")])
                    .await;
                assert_eq!(r.status, 200);
                seen_through(&http, b, "user", &value).await;
            }
        }
    };
    change_all("v").await;

    let flushes = r#"stickless_local_cache_flushes_total"#;
    let before = b.metric(flushes).await;
    let (&victim, _) = shards.iter().max_by_key(|(_, k)| k.len()).unwrap();
    blocking(|| cluster.switchover(victim));
    eventually(
        "B drops its cache after the switchover",
        Duration::from_secs(10),
        || async { (b.metric(flushes).await > before).then_some(()) },
    )
    .await;
    change_all("w").await;
}

/// Behind Sentinel the invalidation client follows the primary the sentinels name: a change
/// through A is seen through B's cache; after a switchover both drop their caches, follow the new
/// primary, and changes made there are seen through B's cache again.
#[tokio::test(flavor = "multi_thread")]
async fn behind_sentinel_changes_are_seen_through_the_other_instance_across_a_switchover() {
    let group = blocking(SentinelGroup::start);
    let backend = TestBackend::start().await;
    let args = [CACHE, &["--redis-timeout", "1s"]].concat();
    let a = Stickless::on_redis_url(&backend.url(), &group.url(), &args);
    let b = Stickless::on_redis_url(&backend.url(), &group.url(), &args);
    let mut http = Http::with_jar();
    http.get_replying(&a.url("/"), &["x-session-set-user: alice"])
        .await;
    read_until_cached(&mut http, &b, "user").await;
    http.get_replying(&a.url("/"), &["x-session-set-user: bob"])
        .await;
    seen_through(&http, &b, "user", "bob").await;
    wait_for(
        "the session on the replica",
        Duration::from_secs(10),
        || replicated(group.primary.port, 1).then_some(()),
    );

    let flushes = "stickless_local_cache_flushes_total";
    let before = b.metric(flushes).await;
    blocking(|| group.switchover());
    change_until_stored(&mut http, &a.url("/"), "x-session-set-user: carol").await;
    assert!(b.metric(flushes).await > before, "B dropped its cache");
    assert_eq!(
        read_until_cached(&mut http, &b, "user").await.as_deref(),
        Some("carol")
    );
    http.get_replying(&a.url("/"), &["x-session-set-user: dave"])
        .await;
    seen_through(&http, &b, "user", "dave").await;
}

/// A failover done the ElastiCache way (the replica promoted, the old primary made its replica,
/// the endpoint moved): a change written on the new primary afterwards, as another instance
/// would, is seen; the cache does not keep serving what it held from the old primary. (Here the
/// demoted node, now a replica, still sends the invalidation of the replicated change on the
/// tracking connection that stayed on it; the flush on reconnection is tested with a restart.)
#[tokio::test(flavor = "multi_thread")]
async fn after_a_failover_changes_on_the_new_primary_are_seen() {
    let no_delay = ["--repl-diskless-sync-delay", "0"];
    let primary = RedisServer::start_with(&no_delay);
    let port = primary.port.to_string();
    let replica =
        RedisServer::start_with(&[&no_delay[..], &["--replicaof", "127.0.0.1", &port]].concat());
    eventually("the replica in sync", Duration::from_secs(15), || async {
        let info: String = cmd(&replica, &["INFO", "replication"]).await;
        info.contains("master_link_status:up").then_some(())
    })
    .await;
    let endpoint = Endpoint::start(addr(&primary));
    let backend = TestBackend::start().await;
    let url = format!("redis://127.0.0.1:{}", endpoint.port);
    let proxy = Stickless::on_redis_url(&backend.url(), &url, CACHE);
    let mut http = Http::with_jar();
    http.get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    let key = format!("stickless:{}", id_of(http.sid.as_ref().unwrap()));
    read_until_cached(&mut http, &proxy, "user").await;
    let synced: i64 = cmd(&primary, &["WAIT", "1", "2000"]).await;
    assert_eq!(synced, 1);

    fail_over(&primary, &replica, &endpoint).await;
    let _: i64 = cmd(&replica, &["HSET", &key, "user", "bob"]).await;

    eventually(
        "the change on the new primary seen through the cache",
        Duration::from_secs(10),
        || {
            let mut http = http.clone();
            let proxy = &proxy;
            async move {
                // A read during the switch may be answered 503 (the store reconnecting): not yet.
                let r = http.get(&proxy.url("/")).await;
                (r.status == 200 && field(&r, "user").as_deref() == Some("bob")).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_read_costs_no_command_in_redis() {
    let (redis, _backend, proxy, mut http) = one_instance_with_alice_cached(CACHE).await;

    let mut monitor = Monitor::start(&redis).await;
    for _ in 0..20 {
        let r = http.get(&proxy.url("/")).await;
        assert_eq!(field(&r, "user").as_deref(), Some("alice"));
    }
    assert_eq!(
        sent_by_stickless(&mut monitor).await,
        Vec::<String>::new(),
        "cached reads sent commands to Redis"
    );

    // A change: its read is served from the cache, its write is one script, which leaves the
    // written session in this instance's cache until Redis's invalidation of that write
    // arrives; the next read is served from that copy, or goes to Redis (HGETALL and PTTL, no
    // renewal due) once the invalidation has removed it.
    http.get_replying(&proxy.url("/"), &["x-session-set-user: bob"])
        .await;
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(field(&r, "user").as_deref(), Some("bob"));
    let sent = sent_by_stickless(&mut monitor).await;
    assert!(
        sent == ["evalsha"] || sent == ["evalsha", "hgetall", "pttl"],
        "{sent:?}"
    );
}

/// Reads that arrive while a change of their session is in flight wait for it and are served
/// what it wrote, without a read of their own: Redis holds the change (CLIENT PAUSE WRITE lets
/// reads through) while a burst of reads of the session arrives.
#[tokio::test(flavor = "multi_thread")]
async fn reads_during_a_change_are_served_what_it_wrote() {
    let (redis, _backend, a, http) =
        one_instance_with_alice_cached(&["--local-cache", "1000", "--redis-timeout", "5s"]).await;

    // A load is HGETALL and PTTL; the change's script reads the hash too, but never its TTL.
    let loads = calls(&redis, "pttl").await;
    let _: String = cmd(&redis, &["CLIENT", "PAUSE", "1000", "WRITE"]).await;
    let change = {
        let (mut http, url) = (http.clone(), a.url("/"));
        tokio::spawn(async move {
            http.get_replying(&url, &["x-session-set-user: bob"])
                .await
                .status
        })
    };
    // Until Redis holds the change's script (a paused client counts as blocked).
    eventually(
        "the change held in Redis",
        Duration::from_secs(5),
        || async {
            let info: String = cmd(&redis, &["INFO", "clients"]).await;
            info.lines()
                .find_map(|l| l.strip_prefix("blocked_clients:"))
                .and_then(|n| n.trim().parse::<u32>().ok())
                .filter(|n| *n >= 1)
                .map(|_| ())
        },
    )
    .await;
    let joined_before = a.metric(JOINED).await;
    for (r, _) in reads_at_once(&http, &a.url("/"), 4).await {
        assert_eq!(r.status, 200);
        assert_eq!(field(&r, "user").as_deref(), Some("bob"));
    }
    assert_eq!(change.await.expect("no panic"), 200);
    assert_eq!(
        calls(&redis, "pttl").await,
        loads,
        "the reads during the change read Redis"
    );
    assert_eq!(
        a.metric(JOINED).await - joined_before,
        4.0,
        "every read during the change waited for it"
    );
}

/// Lookups that waited for another request's read or change, and were served what it brought.
const JOINED: &str = r#"stickless_local_cache_lookups_total{result="joined"}"#;

/// Runs `change`, then waits until `proxy` has dropped a copy on Redis's invalidation.
async fn after_invalidation<F: std::future::Future>(proxy: &Stickless, change: F) -> F::Output {
    const INVALIDATIONS: &str = "stickless_local_cache_invalidations_total";
    let before = proxy.metric(INVALIDATIONS).await;
    let done = change.await;
    eventually(
        "a copy dropped on Redis's invalidation",
        Duration::from_secs(5),
        || async { (proxy.metric(INVALIDATIONS).await > before).then_some(()) },
    )
    .await;
    done
}

/// `n` GETs of `url` with `http`'s cookies, sent at once: each reply and how long it took.
async fn reads_at_once(http: &Http, url: &str, n: usize) -> Vec<(Reply, Duration)> {
    let reads: Vec<_> = (0..n)
        .map(|_| {
            let (mut http, url) = (http.clone(), url.to_owned());
            tokio::spawn(async move {
                let started = Instant::now();
                let r = http.get(&url).await;
                (r, started.elapsed())
            })
        })
        .collect();
    let mut replies = Vec::with_capacity(n);
    for read in reads {
        replies.push(read.await.expect("no panic"));
    }
    replies
}

/// Requests that find a read of their session in flight wait for it instead of each sending
/// their own: Redis is paused while a burst of reads of one session (just changed through the
/// other instance, so not in this one's cache) arrives, and runs one HGETALL for all of them.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_reads_of_an_uncached_session_send_one_read() {
    const BURST: usize = 8;
    let (redis, _backend, a, b, mut http) = two_instances_with_alice().await;
    read_until_cached(&mut http, &a, "user").await;

    // A change through B: A's copy goes when Redis's invalidation arrives, and none is pending.
    after_invalidation(
        &a,
        http.get_replying(&b.url("/"), &["x-session-set-user: bob"]),
    )
    .await;

    let reads = hgetall_calls(&redis).await;
    let _: String = cmd(&redis, &["CLIENT", "PAUSE", "500", "ALL"]).await;
    for (r, _) in reads_at_once(&http, &a.url("/"), BURST).await {
        assert_eq!(field(&r, "user").as_deref(), Some("bob"));
    }
    assert_eq!(
        hgetall_calls(&redis).await - reads,
        1,
        "one read of the session for the whole burst"
    );
    assert_eq!(
        a.metric(JOINED).await,
        (BURST - 1) as f64,
        "the others waited for it"
    );
}

/// A burst of requests with the cookie of a session that is gone sends one read: the others
/// wait for it and are told what it found, no session (Redis is paused while the burst arrives).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_reads_of_a_session_that_is_gone_send_one_read() {
    const BURST: usize = 8;
    let (redis, _backend, a, http) = one_instance_with_alice_cached(CACHE).await;

    // The session ends outside stickless: A's copy goes when Redis's invalidation arrives.
    let sessions = keys(&redis, "*").await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let _: i64 = after_invalidation(&a, cmd(&redis, &["DEL", &sessions[0]])).await;

    let loads = calls(&redis, "pttl").await;
    let joined_before = a.metric(JOINED).await;
    let _: String = cmd(&redis, &["CLIENT", "PAUSE", "500", "ALL"]).await;
    for (r, _) in reads_at_once(&http, &a.url("/"), BURST).await {
        assert_eq!(r.status, 200);
        assert_eq!(field(&r, "user"), None, "the session is gone");
    }
    assert_eq!(
        calls(&redis, "pttl").await - loads,
        1,
        "one read of the session for the whole burst"
    );
    assert_eq!(a.metric(JOINED).await - joined_before, (BURST - 1) as f64);
}

/// A request that waits for another's read of its session has no more time than its own read
/// would have had: with Redis stalled past `--redis-timeout`, a burst of reads of one session is
/// answered (without the session) within about one timeout, not one timeout for the read it
/// waited for and another for its own.
#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_another_read_stays_within_the_redis_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    // The cache is live and holds the session; a change through A then drops A's copy once
    // Redis's invalidation of it arrives.
    let (redis, _backend, a, mut http) =
        one_instance_with_alice_cached(&["--local-cache", "1000", "--redis-timeout", "1s"]).await;
    after_invalidation(
        &a,
        http.get_replying(&a.url("/"), &["x-session-set-user: bob"]),
    )
    .await;
    let _: String = cmd(&redis, &["CLIENT", "PAUSE", "3000", "ALL"]).await;
    for (r, took) in reads_at_once(&http, &a.url("/"), 6).await {
        assert!(r.status == 200 || r.status == 503, "{}", r.status);
        assert!(
            took < TIMEOUT + TIMEOUT / 2,
            "answered after {took:?} with --redis-timeout {TIMEOUT:?}"
        );
    }
}

/// With the cache, every acknowledged change tells the user its version in `sid_v` (same
/// attributes and lifetime as `sid`); a logout clears it; it never reaches the backend; and
/// without the cache it is never set.
#[tokio::test(flavor = "multi_thread")]
async fn the_version_cookie_follows_changes_only_with_the_cache() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(
        &backend.url(),
        &redis,
        &["--local-cache", "1000", "--absolute-timeout", "1h"],
    );
    let mut http = Http::with_jar();
    let r = http
        .get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    let (sid, sid_v) = (r.sid().expect("sid"), r.sid_v().expect("sid_v"));
    assert!(
        sid_v.starts_with("1."),
        "a new session is version 1: {sid_v}"
    );
    let attributes = |name: &str| {
        let c = r
            .set_cookies()
            .into_iter()
            .find(|c| c.starts_with(&format!("{name}=")))
            .unwrap();
        c.split_once(';').unwrap().1.to_owned()
    };
    assert_eq!(attributes("sid"), attributes("sid_v"), "same attributes");
    assert!(
        attributes("sid_v").contains("Max-Age="),
        "{}",
        attributes("sid_v")
    );

    let r = http
        .send(
            Method::GET,
            &proxy.url("/"),
            &[
                ("cookie", "other=1"),
                ("x-test-reply", "x-session-incr-n: 1"),
            ],
            Bytes::new(),
        )
        .await;
    let cookie = r.seen().header("cookie").unwrap_or_default().to_owned();
    assert!(
        !cookie.contains("sid") && cookie.contains("other=1"),
        "the backend got: {cookie}"
    );
    assert_eq!(r.sid(), None, "a change keeps the session cookie");
    assert!(r.sid_v().expect("a new sid_v").starts_with("2."));
    let r = http.get(&proxy.url("/")).await;
    assert!(r.set_cookies().is_empty(), "a read sets nothing");
    let r = http
        .get_replying(&proxy.url("/"), &["x-session-destroy: true"])
        .await;
    assert_eq!(
        (r.sid().as_deref(), r.sid_v().as_deref()),
        (Some(""), Some(""))
    );
    assert_ne!(sid, "");

    let plain = Stickless::on_redis(&backend.url(), &redis, &["--local-cache", "0"]);
    let mut http = Http::with_jar();
    for change in [
        "x-session-set-user: alice",
        "x-session-incr-n: 1",
        "x-session-destroy: true",
    ] {
        let r = http.get_replying(&plain.url("/"), &[change]).await;
        assert_eq!(
            r.sid_v(),
            None,
            "no version cookie without the cache ({change})"
        );
    }
}

/// A cached copy older than the version in the user's cookie is not served: the session is read
/// from Redis. A version cookie of another session, or a forged one, counts for nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_cached_copy_older_than_the_cookies_version_is_read_again() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, CACHE);
    let keys = SigningKeys::parse(TEST_KEY).unwrap();
    let mut http = Http::with_jar();
    http.get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    let id = keys.verify(http.sid.as_deref().unwrap()).unwrap();
    let mut other = Http::with_jar();
    other
        .get_replying(&proxy.url("/"), &["x-session-set-user: bob"])
        .await;
    let other_id = keys.verify(other.sid.as_deref().unwrap()).unwrap();
    read_until_cached(&mut http, &proxy, "user").await;

    let mut monitor = Monitor::start(&redis).await;
    // Reads alice's session with this version cookie; how many copies were refused as outdated.
    let read_with = |version: String| {
        let mut http = http.clone();
        http.sid_v = Some(version);
        let proxy = &proxy;
        async move {
            let outdated = r#"stickless_local_cache_lookups_total{result="outdated"}"#;
            let before = proxy.metric(outdated).await;
            let r = http.get(&proxy.url("/")).await;
            assert_eq!(field(&r, "user").as_deref(), Some("alice"));
            proxy.metric(outdated).await - before
        }
    };
    // Version 1 is what the cache holds: served from it.
    assert_eq!(read_with(keys.sign_version(&id, 1)).await, 0.0);
    assert_eq!(sent_by_stickless(&mut monitor).await, Vec::<String>::new());
    // Version 5 of this session (say, written through another instance): read again.
    assert_eq!(read_with(keys.sign_version(&id, 5)).await, 1.0);
    assert_eq!(sent_by_stickless(&mut monitor).await, ["hgetall", "pttl"]);
    // Another session's version cookie, or a forged one: as if there were none.
    read_until_cached(&mut http.clone(), &proxy, "user").await;
    monitor.drain().await;
    let forged = keys.sign_version(&id, 5).replacen('5', "6", 1);
    for cookie in [keys.sign_version(&other_id, 5), forged, "9".into()] {
        assert_eq!(read_with(cookie).await, 0.0);
    }
    assert_eq!(sent_by_stickless(&mut monitor).await, Vec::<String>::new());
}

/// The commands seen by `monitor`, without the invalidation channel's periodic check (`INFO
/// replication` twice a second).
async fn sent_by_stickless(monitor: &mut Monitor) -> Vec<String> {
    let mut seen = monitor.drain().await;
    seen.retain(|c| c != "info");
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_reads_keep_the_session_alive_with_few_renewals() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    // Copies live, and the TTL may fall, an eighth of this: 500 ms.
    let proxy = Stickless::on_redis(
        &backend.url(),
        &redis,
        &["--local-cache", "1000", "--idle-timeout", "4s"],
    );
    let mut http = Http::with_jar();
    http.get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    read_until_cached(&mut http, &proxy, "user").await;

    let mut monitor = Monitor::start(&redis).await;
    let end = Instant::now() + Duration::from_secs(6);
    let watch = tokio::spawn(async move {
        // Renewals (PEXPIRE inside the renewal script) until the reads end.
        let mut renewals = 0;
        let stop = tokio::time::Instant::from_std(end + Duration::from_millis(500));
        loop {
            let mut line = String::new();
            match tokio::time::timeout_at(stop, monitor.lines.read_line(&mut line)).await {
                Ok(Ok(n)) if n > 0 => {
                    if line.contains("[0 lua]") && line.to_ascii_lowercase().contains("\"pexpire\"")
                    {
                        renewals += 1;
                    }
                }
                _ => return renewals,
            }
        }
    });
    // Reads for longer than the idle timeout, one every 100 ms.
    let mut reads = 0;
    while Instant::now() < end {
        let r = http.get(&proxy.url("/")).await;
        assert_eq!(
            field(&r, "user").as_deref(),
            Some("alice"),
            "the session expired while in use"
        );
        reads += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewals = watch.await.expect("monitor");
    // One renewal per 500 ms at most (the read that finds the copy too old and the TTL more
    // than 500 ms short), not one per read.
    assert!(
        (1..=6 * 2 + 2).contains(&renewals) && renewals < reads,
        "{renewals} renewals for {reads} reads"
    );
}

/// Users write through A and read through B as fast as they can. The version cookie each write
/// sets makes B refuse a cached copy older than the user's own last acknowledged write, so no
/// read through B may miss it, even while the write's invalidation is still on its way to B.
/// At the end each user logs out through A, and the logged-out cookie is replayed against B
/// until B no longer knows the session: how long that took is measured and printed, with how
/// many reads B's cache answered and how many copies it refused as outdated
/// (`cargo nextest run --test local_cache drill --no-capture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drill_reads_through_another_instance_never_miss_the_users_own_writes() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let a = Stickless::on_redis(&backend.url(), &redis, CACHE);
    let b = Stickless::on_redis(&backend.url(), &redis, CACHE);
    let (a_url, b_url) = (a.url("/"), b.url("/"));
    // B's cache must be live before the drill counts anything.
    let mut warm = Http::with_jar();
    warm.get_replying(&a_url, &["x-session-set-user: warm"])
        .await;
    read_until_cached(&mut warm, &b, "user").await;
    let hits_before = hits(&b).await;
    let outdated = r#"stickless_local_cache_lookups_total{result="outdated"}"#;
    let outdated_before = b.metric(outdated).await;

    let users = 16;
    let run_for = Duration::from_secs(3);
    let mut tasks = Vec::new();
    for _ in 0..users {
        let (a_url, b_url) = (a_url.clone(), b_url.clone());
        tasks.push(tokio::spawn(async move {
            let mut http = Http::with_jar();
            http.get_replying(&a_url, &["x-session-set-n: 0"]).await;
            let (mut writes, mut reads, mut stale) = (0u64, 0u64, 0u64);
            let end = Instant::now() + run_for;
            while Instant::now() < end {
                let r = http.get_replying(&a_url, &["x-session-incr-n: 1"]).await;
                assert_eq!(r.status, 200);
                assert!(r.sid_v().is_some(), "a write sets the version cookie");
                writes += 1;
                // The second and third read of an iteration are the ones a cache can answer.
                for _ in 0..3 {
                    let r = http.get(&b_url).await;
                    assert_eq!(r.status, 200);
                    reads += 1;
                    let n: u64 = field(&r, "n").and_then(|n| n.parse().ok()).unwrap_or(0);
                    if n < writes {
                        stale += 1;
                    }
                }
            }
            // Logout through A; the old cookie replayed against B until B forgets it.
            let old = http.clone();
            let r = http
                .get_replying(&a_url, &["x-session-destroy: true"])
                .await;
            assert_eq!(
                r.sid_v().as_deref(),
                Some(""),
                "a logout clears the version cookie"
            );
            let logged_out = Instant::now();
            loop {
                let r = old.clone().get(&b_url).await;
                if r.seen().header("x-session") != Some("active") {
                    break;
                }
                assert!(
                    logged_out.elapsed() < Duration::from_secs(5),
                    "B still serves a session five seconds after its logout through A"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (writes, reads, stale, logged_out.elapsed())
        }));
    }
    let (mut writes, mut reads, mut stale, mut logouts) = (0, 0, 0, Vec::new());
    for t in tasks {
        let (w, r, s, l) = t.await.expect("a drill user");
        writes += w;
        reads += r;
        stale += s;
        logouts.push(l);
    }
    logouts.sort();
    let cache_hits = hits(&b).await - hits_before;
    let refused = b.metric(outdated).await - outdated_before;
    eprintln!(
        "drill: {users} users, {writes} writes through A, {reads} reads through B ({cache_hits} from its cache, \
         {refused} cached copies refused as older than the user's version), {stale} stale reads; \
         a logout through A seen by B within: max {:?}, median {:?}",
        logouts.last().copied().unwrap_or_default(),
        logouts.get(logouts.len() / 2).copied().unwrap_or_default(),
    );
    assert!(writes > 0 && reads > 0);
    assert!(cache_hits > 0.0, "the drill never read from B's cache");
    assert_eq!(
        stale, 0,
        "reads through B that missed the user's own acknowledged write"
    );
}

/// With the cache on (the default) and a Redis that refuses `CLIENT TRACKING` (an ACL without
/// `CLIENT` here; a server older than 6 alike), stickless serves every session from Redis, says
/// so once, and asks again less and less often.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_that_refuses_tracking_leaves_the_cache_off_and_sessions_served() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let () = cmd(
        &redis,
        &[
            "ACL",
            "SETUSER",
            "app",
            "on",
            ">app-pass",
            "~*",
            "+@all",
            "-client",
        ],
    )
    .await;
    let url = format!("redis://app:app-pass@127.0.0.1:{}", redis.port);
    let proxy = Stickless::on_redis_url(&backend.url(), &url, &[]);
    let mut http = Http::with_jar();
    let r = http
        .get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    assert_eq!(r.status, 200);

    let loads_before = hgetall_calls(&redis).await;
    let () = cmd(&redis, &["ACL", "LOG", "RESET"]).await;
    let started = Instant::now();
    for _ in 0..20 {
        let r = http.get(&proxy.url("/")).await;
        assert_eq!(field(&r, "user").as_deref(), Some("alice"));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let elapsed = started.elapsed();
    let loads = hgetall_calls(&redis).await - loads_before;
    assert!(loads >= 20, "every read went to Redis: {loads} loads");
    assert_eq!(
        hits(&proxy).await,
        0.0,
        "nothing served from a cache that is off"
    );
    // Refused attempts back off: at a fixed 100 ms pause there would be one every 100 ms.
    // (MONITOR does not show a command the ACL refuses; the ACL log counts them.)
    let log: Vec<Vec<redis::Value>> = cmd(&redis, &["ACL", "LOG"]).await;
    let attempts: usize = log
        .iter()
        .filter_map(|entry| {
            let at = entry
                .iter()
                .position(|v| matches!(v, redis::Value::BulkString(k) if k == b"count"))?;
            match entry.get(at + 1) {
                Some(redis::Value::Int(n)) => usize::try_from(*n).ok(),
                _ => None,
            }
        })
        .sum();
    assert!(attempts > 0, "the ACL refused no CLIENT TRACKING: {log:?}");
    let fixed_pace = (elapsed.as_millis() / 100) as usize;
    assert!(
        attempts * 2 < fixed_pace,
        "{attempts} CLIENT TRACKING attempts in {elapsed:?}"
    );
    let logs = proxy.logs();
    assert_eq!(
        logs.matches("could not turn on redis client tracking")
            .count(),
        1,
        "one warning: {logs}"
    );
}

/// How many HGETALL `redis` has run (`INFO commandstats`), scripts' own included.
async fn hgetall_calls(redis: &RedisServer) -> usize {
    calls(redis, "hgetall").await
}

/// How many times `redis` has run `command` (lower case), scripts' own calls included.
async fn calls(redis: &RedisServer, command: &str) -> usize {
    let info: String = cmd(redis, &["INFO", "commandstats"]).await;
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
