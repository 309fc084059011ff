//! `--read-from replica` against real redis-server processes: a primary and a replica that
//! replicates through a forwarder the test can stall, so that the replica falls behind while it
//! keeps answering reads. Loads go to the replica (MONITOR sees them there, not on the primary),
//! the TTL is renewed on the primary only when it fell far enough; a user whose own last change
//! has not reached the replica is read from the primary, while other users still read from the
//! replica; a replica too far behind is left for the primary; tombstones, the absolute timeout
//! and missing sessions read as they do on the primary; and a dead or frozen replica leaves the
//! reads to the primary.

mod support;

use std::time::Duration;

use support::*;

const REPLICA: &[&str] = &["--read-from", "replica"];

/// A primary and a replica that replicates through `link`, a forwarder that can stall.
struct LaggingPair {
    primary: RedisServer,
    replica: RedisServer,
    link: Endpoint,
}

impl LaggingPair {
    fn start() -> Self {
        let primary = RedisServer::start();
        let link = Endpoint::start(addr(&primary));
        let port = link.port.to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
        wait_for("the replica's first sync", Duration::from_secs(20), || {
            (info(replica.port, "replication")
                .get("master_link_status")
                .map(String::as_str)
                == Some("up"))
            .then_some(())
        });
        LaggingPair {
            primary,
            replica,
            link,
        }
    }

    /// Waits until the replica has everything the primary has.
    fn in_sync(&self) {
        wait_for("the replica in sync", Duration::from_secs(10), || {
            replicated(self.primary.port, 1).then_some(())
        });
    }
}

async fn counted(proxy: &Stickless, result: &str) -> f64 {
    proxy
        .metric(&format!(
            "stickless_replica_reads_total{{result=\"{result}\"}}"
        ))
        .await
}

fn user(r: &Reply) -> Option<String> {
    r.seen().fields().get("user").cloned()
}

/// Reads through `proxy` until a read is counted as answered by the replica (the replica has
/// been found), and returns what that read saw.
async fn read_from_replica(http: &Http, proxy: &Stickless) -> Reply {
    eventually(
        "a read answered by the replica",
        Duration::from_secs(10),
        || {
            let mut http = http.clone();
            async move {
                let before = counted(proxy, "replica").await;
                let r = http.get(&proxy.url("/")).await;
                (counted(proxy, "replica").await > before).then_some(r)
            }
        },
    )
    .await
}

fn key(http: &Http) -> String {
    format!(
        "stickless:{}",
        id_of(http.sid.as_deref().expect("a session cookie"))
    )
}

fn count(seen: &[String], command: &str) -> usize {
    seen.iter().filter(|c| *c == command).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn loads_go_to_the_replica_and_the_ttl_is_renewed_now_and_then() {
    let pair = LaggingPair::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(
        &backend.url(),
        &pair.primary,
        &["--read-from", "replica", "--idle-timeout", "60s"],
    );
    let mut http = Http::with_jar();
    http.get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    pair.in_sync();
    read_from_replica(&http, &proxy).await;

    let mut on_primary = Monitor::start(&pair.primary).await;
    let mut on_replica = Monitor::start(&pair.replica).await;
    for _ in 0..10 {
        let r = http.get(&proxy.url("/")).await;
        assert_eq!(user(&r).as_deref(), Some("alice"));
    }
    let primary = on_primary.drain().await;
    let replica = on_replica.drain().await;
    assert!(count(&replica, "hgetall") >= 10, "replica saw {replica:?}");
    assert_eq!(count(&primary, "hgetall"), 0, "primary saw {primary:?}");
    // A fresh TTL: no renewal due.
    assert_eq!(count(&primary, "evalsha"), 0, "primary saw {primary:?}");

    // As if 30s had passed without a read: the next read renews, on the primary.
    let key = key(&http);
    let _: () = query(
        pair.primary.port,
        redis::cmd("PEXPIRE").arg(&key).arg(30_000),
    )
    .unwrap();
    pair.in_sync();
    http.get(&proxy.url("/")).await;
    eventually(
        "the TTL renewed on the primary",
        Duration::from_secs(5),
        || {
            let primary = &pair.primary;
            let key = &key;
            async move { (pttl(primary, key).await > 50_000).then_some(()) }
        },
    )
    .await;
    assert!(count(&on_primary.drain().await, "evalsha") >= 1);
    // Once the replica has the renewal, reads write nothing again.
    pair.in_sync();
    for _ in 0..10 {
        http.get(&proxy.url("/")).await;
    }
    let primary = on_primary.drain().await;
    assert_eq!(count(&primary, "evalsha"), 0, "primary saw {primary:?}");
    assert_eq!(count(&primary, "hgetall"), 0, "primary saw {primary:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lagging_replica_never_hides_a_users_own_last_change() {
    let pair = LaggingPair::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &pair.primary, REPLICA);
    let mut alice = Http::with_jar();
    alice
        .get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    let mut bob = Http::with_jar();
    bob.get_replying(&proxy.url("/"), &["x-session-set-user: bob"])
        .await;
    pair.in_sync();
    read_from_replica(&bob, &proxy).await;

    pair.link.stall(true);
    let r = alice
        .get_replying(&proxy.url("/"), &["x-session-set-user: alice2"])
        .await;
    assert_eq!(r.status, 200);
    assert!(!replicated(pair.primary.port, 1), "the replica is behind");
    let behind = counted(&proxy, "behind").await;
    let r = alice.get(&proxy.url("/")).await;
    assert_eq!(user(&r).as_deref(), Some("alice2"), "alice sees her change");
    assert_eq!(counted(&proxy, "behind").await, behind + 1.0);
    // Bob changed nothing: the lagging replica still answers him.
    let r = read_from_replica(&bob, &proxy).await;
    assert_eq!(user(&r).as_deref(), Some("bob"));
    // A session created while the replica lags: not on the replica at all.
    let mut carol = Http::with_jar();
    carol
        .get_replying(&proxy.url("/"), &["x-session-set-user: carol"])
        .await;
    let r = carol.get(&proxy.url("/")).await;
    assert_eq!(
        user(&r).as_deref(),
        Some("carol"),
        "carol sees her new session"
    );
    assert_eq!(counted(&proxy, "behind").await, behind + 2.0);

    // A replica that has not acknowledged the stream for too long is no longer read at all.
    eventually(
        "the stalled replica left for the primary",
        Duration::from_secs(30),
        || {
            let mut bob = bob.clone();
            let proxy = &proxy;
            async move {
                let before = counted(proxy, "primary_fallback").await;
                let r = bob.get(&proxy.url("/")).await;
                assert_eq!(user(&r).as_deref(), Some("bob"));
                (counted(proxy, "primary_fallback").await > before).then_some(())
            }
        },
    )
    .await;
    pair.link.stall(false);
    pair.in_sync();
    let r = read_from_replica(&alice, &proxy).await;
    assert_eq!(user(&r).as_deref(), Some("alice2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn tombstones_absolute_timeouts_and_missing_sessions_read_as_on_the_primary() {
    let pair = LaggingPair::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(
        &backend.url(),
        &pair.primary,
        &["--read-from", "replica", "--absolute-timeout", "1h"],
    );
    // A tombstone: the old cookie after a rotation gets no session and no new cookie.
    let mut http = Http::with_jar();
    http.get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    pair.in_sync();
    read_from_replica(&http, &proxy).await;
    // The clone keeps the old cookie (a tab that has not seen the rotation).
    let mut old = http.clone();
    http.get_replying(&proxy.url("/"), &["x-session-rotate: true"])
        .await;
    assert_ne!(http.sid, old.sid, "rotated");
    pair.in_sync();
    let replica_reads = counted(&proxy, "replica").await;
    let r = old.get(&proxy.url("/")).await;
    assert_eq!(r.status, 200);
    assert_ne!(r.seen().header("x-session"), Some("active"));
    assert_eq!(r.sid(), None, "no cookie for a rotated id");
    assert!(
        counted(&proxy, "replica").await > replica_reads,
        "read on the replica: {} {} {}",
        counted(&proxy, "replica").await,
        counted(&proxy, "behind").await,
        counted(&proxy, "primary_fallback").await
    );

    // Past the absolute timeout (created two hours ago), though the key still lives.
    let mut late = Http::with_jar();
    late.get_replying(&proxy.url("/"), &["x-session-set-user: late"])
        .await;
    let _: () = query(
        pair.primary.port,
        redis::cmd("HSET")
            .arg(key(&late))
            .arg("_created")
            .arg(1_000),
    )
    .unwrap();
    pair.in_sync();
    late.sid_v = None;
    let replica_reads = counted(&proxy, "replica").await;
    let r = late.get(&proxy.url("/")).await;
    assert_ne!(r.seen().header("x-session"), Some("active"));
    assert!(
        counted(&proxy, "replica").await > replica_reads,
        "read on the replica"
    );

    // Destroyed: gone on the replica too once it has the delete.
    let mut gone = Http::with_jar();
    gone.get_replying(&proxy.url("/"), &["x-session-set-user: gone"])
        .await;
    let mut replay = gone.clone();
    gone.get_replying(&proxy.url("/"), &["x-session-destroy: true"])
        .await;
    pair.in_sync();
    let r = replay.get(&proxy.url("/")).await;
    assert_ne!(r.seen().header("x-session"), Some("active"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_or_dead_replica_leaves_the_reads_to_the_primary() {
    let mut pair = LaggingPair::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(
        &backend.url(),
        &pair.primary,
        &["--read-from", "replica", "--redis-timeout", "1s"],
    );
    let mut http = Http::with_jar();
    http.get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    pair.in_sync();
    read_from_replica(&http, &proxy).await;

    // Frozen: connected, answering nothing. Each read waits half the store timeout for it.
    pair.replica.pause();
    let fallbacks = counted(&proxy, "primary_fallback").await;
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(user(&r).as_deref(), Some("alice"));
    assert_eq!(counted(&proxy, "primary_fallback").await, fallbacks + 1.0);
    pair.replica.resume();
    // Tried again once it answers.
    read_from_replica(&http, &proxy).await;
    let fallbacks = counted(&proxy, "primary_fallback").await;

    // Dead.
    pair.replica.kill();
    for _ in 0..5 {
        let r = http.get(&proxy.url("/")).await;
        assert_eq!(r.status, 200);
        assert_eq!(user(&r).as_deref(), Some("alice"));
    }
    assert!(counted(&proxy, "primary_fallback").await >= fallbacks + 5.0);
}

/// Through Sentinel, and across a switchover: the demoted primary becomes the replica read from,
/// and a user's change made on the new primary is read back at once.
#[tokio::test(flavor = "multi_thread")]
async fn through_sentinel_reads_follow_a_switchover_to_the_new_replica() {
    let group = blocking(SentinelGroup::start);
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis_url(&backend.url(), &group.url(), REPLICA);
    let mut alice = Http::with_jar();
    alice
        .get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    wait_for("the replica in sync", Duration::from_secs(10), || {
        replicated(group.primary.port, 1).then_some(())
    });
    let mut on_replica = Monitor::start(&group.replica).await;
    let r = read_from_replica(&alice, &proxy).await;
    assert_eq!(user(&r).as_deref(), Some("alice"));
    assert!(count(&on_replica.drain().await, "hgetall") >= 1);

    let ok: String = query(
        group.sentinels[0].port,
        redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(SentinelGroup::SERVICE),
    )
    .expect("SENTINEL FAILOVER");
    assert_eq!(ok, "OK");
    let (new_primary, old_primary) = (group.replica.port, group.primary.port);
    wait_for("the switchover", Duration::from_secs(15), || {
        (group.primary_port() == Some(new_primary)).then_some(())
    });
    wait_for(
        "the old primary's demotion",
        Duration::from_secs(15),
        || {
            (info(old_primary, "replication")
                .get("role")
                .map(String::as_str)
                == Some("slave"))
            .then_some(())
        },
    );
    // Her change, on the new primary, is read back whichever node answers.
    change_until_stored(&mut alice, &proxy.url("/"), "x-session-set-user: alice2").await;
    alice
        .get_replying(&proxy.url("/"), &["x-session-set-user: alice3"])
        .await;
    let r = alice.get(&proxy.url("/")).await;
    assert_eq!(user(&r).as_deref(), Some("alice3"));
    // The demoted primary is now the replica read from.
    wait_for(
        "the demoted primary in sync",
        Duration::from_secs(10),
        || replicated(new_primary, 1).then_some(()),
    );
    let mut on_old_primary = Monitor::start(&group.primary).await;
    let r = read_from_replica(&alice, &proxy).await;
    assert_eq!(user(&r).as_deref(), Some("alice3"));
    let seen = on_old_primary.drain().await;
    assert!(
        count(&seen, "hgetall") >= 1,
        "the demoted primary saw {seen:?}"
    );
}

/// A drill: users write through one instance and read at once through another, while the
/// replica's link stalls every other 100 ms; no read may miss the user's own acknowledged write
/// (`cargo nextest run --test replica_reads drill --no-capture` prints the counts).
#[tokio::test(flavor = "multi_thread")]
async fn drill_reads_from_a_lagging_replica_never_miss_the_users_own_writes() {
    let pair = LaggingPair::start();
    let backend = TestBackend::start().await;
    let a = Stickless::on_redis(&backend.url(), &pair.primary, REPLICA);
    let b = Stickless::on_redis(&backend.url(), &pair.primary, REPLICA);
    let (a_url, b_url) = (a.url("/"), b.url("/"));
    let mut warm = Http::with_jar();
    warm.get_replying(&a_url, &["x-session-set-user: warm"])
        .await;
    pair.in_sync();
    read_from_replica(&warm, &b).await;
    let (replica_before, behind_before) =
        (counted(&b, "replica").await, counted(&b, "behind").await);

    let run_for = Duration::from_secs(3);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let link = &pair.link;
    let stalls = {
        let stop = stop.clone();
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                link.stall(true);
                tokio::time::sleep(Duration::from_millis(100)).await;
                link.stall(false);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let users = 8;
    let drill = async {
        let mut tasks = Vec::new();
        for _ in 0..users {
            let (a_url, b_url) = (a_url.clone(), b_url.clone());
            tasks.push(tokio::spawn(async move {
                let mut http = Http::with_jar();
                http.get_replying(&a_url, &["x-session-set-n: 0"]).await;
                let (mut writes, mut reads, mut stale) = (0u64, 0u64, 0u64);
                let end = std::time::Instant::now() + run_for;
                while std::time::Instant::now() < end {
                    let r = http.get_replying(&a_url, &["x-session-incr-n: 1"]).await;
                    assert_eq!(r.status, 200);
                    writes += 1;
                    for _ in 0..3 {
                        let r = http.get(&b_url).await;
                        assert_eq!(r.status, 200);
                        reads += 1;
                        let n: u64 = r
                            .seen()
                            .fields()
                            .get("n")
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        if n < writes {
                            stale += 1;
                        }
                    }
                }
                (writes, reads, stale)
            }));
        }
        let (mut writes, mut reads, mut stale) = (0, 0, 0);
        for t in tasks {
            let (w, r, s) = t.await.expect("a drill user");
            writes += w;
            reads += r;
            stale += s;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (writes, reads, stale)
    };
    let ((writes, reads, stale), ()) = tokio::join!(drill, stalls);
    pair.link.stall(false);
    let from_replica = counted(&b, "replica").await - replica_before;
    let behind = counted(&b, "behind").await - behind_before;
    eprintln!(
        "drill: {users} users, {writes} writes through A, {reads} reads through B \
         ({from_replica} from the replica, {behind} sent to the primary as behind), {stale} stale reads"
    );
    assert_eq!(stale, 0, "reads missed the user's own write");
    assert!(from_replica > 0.0, "the drill never read from the replica");
    assert!(behind > 0.0, "the replica was never behind");
}

/// Over TLS (ElastiCache's in-transit encryption): the replica is found on the port it announces
/// for TLS replication, and read over TLS with the primary's settings.
#[tokio::test(flavor = "multi_thread")]
async fn over_tls_the_replica_is_found_on_its_tls_port_and_read_over_tls() {
    let certs = Certs::make();
    let (primary, primary_tls) = tls_server(&certs, &[]);
    let (replica, _) = tls_server(
        &certs,
        &[
            "--tls-replication",
            "yes",
            "--replicaof",
            "127.0.0.1",
            &primary_tls,
        ],
    );
    wait_for("the replica's first sync", Duration::from_secs(20), || {
        (info(replica.port, "replication")
            .get("master_link_status")
            .map(String::as_str)
            == Some("up"))
        .then_some(())
    });
    let backend = TestBackend::start().await;
    let ca = certs.path("ca.pem");
    let url = format!("rediss://127.0.0.1:{primary_tls}");
    let proxy = Stickless::start_with_env(
        &backend.url(),
        &[
            "--redis-url",
            &url,
            "--secret-keys",
            TEST_KEY,
            "--read-from",
            "replica",
        ],
        &[("SSL_CERT_FILE", &ca)],
    );
    let mut alice = Http::with_jar();
    alice
        .get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    wait_for("the replica in sync", Duration::from_secs(10), || {
        replicated(primary.port, 1).then_some(())
    });
    let mut on_replica = Monitor::start(&replica).await;
    let r = read_from_replica(&alice, &proxy).await;
    assert_eq!(user(&r).as_deref(), Some("alice"));
    assert!(count(&on_replica.drain().await, "hgetall") >= 1);
}
