//! Failover drill on a cluster: users, whose sessions are spread over the three shards, increment
//! their counters through stickless (given the cluster as a `redis-cluster://` URL) while one
//! primary is killed and the cluster promotes its replica. Run with `--no-capture` to see the
//! figures.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Users, each with a request in flight at every moment.
const USERS: usize = 24;
/// Each request's bound on the client side: past it the request counts as hung.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The bound on recovery that the drill asserts; the goal is under 5 s.
const RECOVERY_LIMIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread")]
async fn cluster_failover_costs_only_bounded_503s_and_no_replicated_session() {
    let mut cluster = blocking(RedisCluster::start);
    let backend = TestBackend::start().await;
    let url = cluster.url();
    let proxy = Stickless::start(
        &backend.url(),
        &[
            "--redis-url",
            &url,
            "--secret-keys",
            TEST_KEY,
            "--redis-timeout",
            "1s",
        ],
    );
    let cookies = log_in_users(&proxy, USERS).await;

    let shards = cluster.keys_by_primary("stickless:*");
    let spread: Vec<usize> = shards.values().map(Vec::len).collect();
    println!("sessions per shard: {spread:?}");
    assert_eq!(
        spread.iter().sum::<usize>(),
        USERS,
        "every session is in the cluster"
    );
    assert!(
        spread.iter().filter(|&&n| n > 0).count() >= 2,
        "sessions spread over at least two shards: {spread:?}"
    );
    // The shard with the most sessions is the one to lose.
    let (&victim, victim_keys) = shards.iter().max_by_key(|(_, k)| k.len()).unwrap();
    let on_victim = victim_keys.len();
    // The logins are on the replicas before the kill: a session lost after it is not the
    // cluster's asynchronous replication.
    wait_for(
        "the logins on the replicas",
        Duration::from_secs(10),
        || cluster.replicated().then_some(()),
    );

    let load = Load::start(proxy.url("/"), cookies.clone(), CLIENT_TIMEOUT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kill = Instant::now();
    cluster.node(victim).kill();
    load.settle(kill, Duration::from_secs(3), Duration::from_secs(30))
        .await;
    let runs = load.stop().await;

    blocking(|| cluster.wait_ok(Duration::from_secs(10)));
    let counters = final_counters(&proxy, &cookies).await;
    let report = DrillReport::new(kill, &runs, &counters);
    report.print("cluster failover (one primary SIGKILLed)");
    println!(
        "killed primary :{victim} with {on_victim} of {USERS} sessions; primaries now {:?}",
        cluster.primaries()
    );

    print_warnings(&proxy);
    assert!(!cluster.primaries().contains(&victim));
    assert!(
        report.acked > 0 && runs.iter().all(|r| r.acked > 0),
        "every user got through"
    );
    assert!(
        report.unexpected.is_empty(),
        "failed requests other than 503 with Retry-After: {:?}\nstickless log:\n{}",
        report.unexpected,
        proxy.logs()
    );
    let recovery = report.recovery.unwrap_or_default();
    assert!(
        recovery <= RECOVERY_LIMIT,
        "recovered in {recovery:?}; stickless log:\n{}",
        proxy.logs()
    );
    assert_eq!(report.sessionless, 0, "a request found no session");
    // Every session was on its replica before the kill.
    assert_eq!(report.sessions_lost, 0, "sessions lost");
}
