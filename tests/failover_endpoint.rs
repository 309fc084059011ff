//! The failover drill of an ElastiCache replication group's primary endpoint, on loopback: a
//! primary with one replica, reached through a forwarder that stands in for the endpoint's DNS
//! name. The failover is done the way ElastiCache does it: the replica is promoted, the old
//! primary is made its replica, and new connections go to the new primary, while connections
//! already open stay on the old node, which now answers every write with `READONLY`.
//!
//! During it, 20 logged-in users increment a counter through stickless without pause. The drill
//! measures, and prints (`cargo nextest run --test failover_endpoint --no-capture`): the time from
//! the failover to the last failed request, failed requests by status, hung requests, sessions
//! lost, and acknowledged increments lost.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

const USERS: usize = 20;
/// How long each user keeps going after the failover.
const AFTER: Duration = Duration::from_secs(8);
/// A request that takes longer than this counts as hung.
const HUNG: Duration = Duration::from_secs(5);

/// What one user saw.
#[derive(Default)]
struct Tally {
    acknowledged: u64,
    failed: BTreeMap<String, u64>,
    hung: u64,
    /// When the last failure happened.
    last_failure: Option<Instant>,
}

struct Report {
    recovery: Option<Duration>,
    failed: BTreeMap<String, u64>,
    hung: u64,
    sessions_lost: usize,
    increments_lost: u64,
    acknowledged: u64,
}

async fn drill(durability: &str) -> Report {
    // A full resync (the demoted primary has writes the new one lacks) starts at once rather than
    // after Redis's default 5 s wait for more replicas.
    let no_delay = ["--repl-diskless-sync-delay", "0"];
    let primary = RedisServer::start_with(&no_delay);
    let port = primary.port.to_string();
    let replica =
        RedisServer::start_with(&[&no_delay[..], &["--replicaof", "127.0.0.1", &port]].concat());
    wait_until_synced(&replica).await;
    let endpoint = Endpoint::start(addr(&primary));
    let backend = TestBackend::start().await;
    let url = format!("redis://127.0.0.1:{}", endpoint.port);
    let proxy = Stickless::on_redis_url(
        &backend.url(),
        &url,
        &["--redis-timeout", "1s", "--durability", durability],
    );

    // Log everyone in, and make sure the replica has their sessions before the failover.
    let mut users = Vec::new();
    for i in 0..USERS {
        let mut http = Http::with_jar();
        let r = http
            .get_replying(
                &proxy.url("/login"),
                &[&format!("x-session-set-user: u{i}")],
            )
            .await;
        assert_eq!(r.status, 200, "login: {}", r.text());
        users.push(http);
    }
    let replicas: i64 = cmd(&primary, &["WAIT", "1", "2000"]).await;
    assert_eq!(replicas, 1, "the replica has the sessions");

    let failover_at = Arc::new(Mutex::new(None::<Instant>));
    let stop_at = Instant::now() + Duration::from_secs(1) + AFTER;
    let mut tasks = Vec::new();
    for mut http in users {
        let url = proxy.url("/");
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::default();
            while Instant::now() < stop_at {
                let sent = Instant::now();
                let reply =
                    tokio::time::timeout(HUNG, http.get_replying(&url, &["x-session-incr-n: 1"]))
                        .await;
                match reply {
                    Err(_) => {
                        t.hung += 1;
                        t.last_failure = Some(sent);
                    }
                    Ok(r) if r.status == 200 => t.acknowledged += 1,
                    Ok(r) => {
                        let retry_after = r.headers.contains_key("retry-after");
                        let kind = format!(
                            "{}{}",
                            r.status.as_u16(),
                            if retry_after { " + Retry-After" } else { "" }
                        );
                        *t.failed.entry(kind).or_default() += 1;
                        t.last_failure = Some(Instant::now());
                        // A browser would not hammer; a short pause keeps the count readable.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (http, t)
        }));
    }

    // The failover, one second into the load.
    tokio::time::sleep(Duration::from_secs(1)).await;
    *failover_at.lock().unwrap() = Some(Instant::now());
    fail_over(&primary, &replica, &endpoint).await;
    let failover = failover_at.lock().unwrap().unwrap();

    let mut report = Report {
        recovery: None,
        failed: BTreeMap::new(),
        hung: 0,
        sessions_lost: 0,
        increments_lost: 0,
        acknowledged: 0,
    };
    let mut last_failure: Option<Instant> = None;
    for task in tasks {
        let (http, t) = task.await.unwrap();
        report.hung += t.hung;
        report.acknowledged += t.acknowledged;
        for (k, n) in t.failed {
            *report.failed.entry(k).or_default() += n;
        }
        last_failure = last_failure.max(t.last_failure);
        // What the new primary holds for this user.
        let sid = http.sid.clone().expect("a session cookie");
        let stored = hgetall(&replica, &format!("stickless:{}", id_of(&sid))).await;
        if !stored.contains_key("user") {
            report.sessions_lost += 1;
        }
        let counted: u64 = stored.get("n").and_then(|n| n.parse().ok()).unwrap_or(0);
        report.increments_lost += t.acknowledged.saturating_sub(counted);
    }
    report.recovery = last_failure.map(|l| l.saturating_duration_since(failover));
    println!(
        "\nendpoint failover drill, --durability {durability}: {USERS} users for {:?} after the failover\n\
         acknowledged increments: {}\n\
         time from the failover to the last failed request: {}\n\
         failed requests by status: {:?}\n\
         hung requests (no answer within {HUNG:?}): {}\n\
         sessions lost: {}\n\
         acknowledged increments lost: {}\n\
         store reconnections / failovers seen / retries: {} / {} / {}",
        AFTER,
        report.acknowledged,
        report
            .recovery
            .map_or("no failure".into(), |d| format!("{d:?}")),
        report.failed,
        report.hung,
        report.sessions_lost,
        report.increments_lost,
        proxy.metric("stickless_store_reconnections_total").await,
        proxy.metric("stickless_store_failovers_total").await,
        proxy.metric("stickless_store_retries_total").await,
    );
    report
}

/// Waits until the replica reports its link to the primary up.
async fn wait_until_synced(replica: &RedisServer) {
    eventually("the replica in sync", Duration::from_secs(15), || async {
        let info: String = cmd(replica, &["INFO", "replication"]).await;
        info.contains("master_link_status:up").then_some(())
    })
    .await;
}

fn assert_only_503s(report: &Report) {
    assert_eq!(report.hung, 0, "hung requests");
    for kind in report.failed.keys() {
        assert_eq!(
            kind, "503 + Retry-After",
            "failed requests: {:?}",
            report.failed
        );
    }
    assert_eq!(report.sessions_lost, 0, "sessions lost");
    let recovery = report.recovery.unwrap_or_default();
    assert!(
        recovery < Duration::from_secs(5),
        "failures went on for {recovery:?} after the failover"
    );
    assert!(report.acknowledged > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoint_failover_with_acknowledged_writes() {
    let report = drill("acknowledged").await;
    assert_only_503s(&report);
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoint_failover_with_replicated_writes_loses_no_acknowledged_increment() {
    let report = drill("replicated").await;
    assert_only_503s(&report);
    assert_eq!(report.increments_lost, 0, "acknowledged increments lost");
}

#[tokio::test(flavor = "multi_thread")]
async fn replicated_durability_without_a_replica_is_refused_at_startup() {
    let redis = RedisServer::start();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_stickless"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--redis-url",
                &redis.url(),
                "--secret-keys",
                TEST_KEY,
                "--durability",
                "replicated",
            ])
            .env_remove("REDIS_URL")
            .output()
            .expect("stickless runs")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("'--durability'"), "{stderr}");
    assert!(stderr.contains("replica"), "{stderr}");
}

/// Loads write nothing, so a demoted primary answers them without `READONLY`: with only reads
/// after the failover, stickless must still leave the old node (its role check) rather than serve
/// its copies for as long as no write comes. Here the old node loses its link to the new primary
/// too, so what it serves falls behind: a change made on the new primary must become visible.
#[tokio::test(flavor = "multi_thread")]
async fn reads_alone_leave_a_demoted_primary() {
    let primary = RedisServer::start();
    let port = primary.port.to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    wait_until_synced(&replica).await;
    let endpoint = Endpoint::start(addr(&primary));
    let backend = TestBackend::start().await;
    let url = format!("redis://127.0.0.1:{}", endpoint.port);
    let proxy = Stickless::on_redis_url(&backend.url(), &url, &["--redis-timeout", "1s"]);
    let mut http = Http::with_jar();
    let r = http
        .get_replying(&proxy.url("/login"), &["x-session-set-user: alice"])
        .await;
    assert_eq!(r.status, 200, "login: {}", r.text());
    let replicas: i64 = cmd(&primary, &["WAIT", "1", "2000"]).await;
    assert_eq!(replicas, 1, "the replica has the session");
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(
        r.seen().fields().get("user").map(String::as_str),
        Some("alice")
    );

    fail_over(&primary, &replica, &endpoint).await;
    // The old node stays a replica, but of nothing that answers: it no longer follows.
    let replicaof = private_name("REPLICAOF");
    let _: String = cmd(
        &primary,
        &[&replicaof, "127.0.0.1", &free_port().to_string()],
    )
    .await;
    let key = format!("stickless:{}", id_of(http.sid.as_ref().unwrap()));
    let _: i64 = cmd(&replica, &["HSET", &key, "user", "bob"]).await;
    let changed = Instant::now();

    eventually(
        "reads served by the new primary",
        Duration::from_secs(10),
        || {
            let mut http = http.clone();
            let url = proxy.url("/");
            async move {
                let r = http.get(&url).await;
                (r.status == 200
                    && r.seen().fields().get("user").map(String::as_str) == Some("bob"))
                .then_some(())
            }
        },
    )
    .await;
    println!(
        "reads on the demoted node until {:?} after the change on the new primary",
        changed.elapsed()
    );
}
