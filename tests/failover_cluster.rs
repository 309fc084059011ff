//! Failover drills on a cluster: users, whose sessions are spread over the three shards,
//! increment their counters through stickless (given the cluster as a `redis-cluster://` URL)
//! while one primary is killed, or hands over to its replica, and the cluster promotes the
//! replica. Run with `--no-capture` to see the figures.

mod support;

use std::time::{Duration, Instant};

use support::*;

use support::drill::{CLIENT_TIMEOUT, RECOVERY_LIMIT, USERS};

/// Runs the users against a fresh cluster, applies `fault` to the primary holding the most
/// sessions, and checks what they saw.
/// `durability` is `--durability`; `recovers` says whether every user must be served again
/// (not with `replicated` once a shard has no replica left: refusing writes is then the point).
async fn drill(
    name: &str,
    durability: &str,
    recovers: bool,
    fault: impl FnOnce(&mut RedisCluster, u16),
) -> DrillReport {
    let mut cluster = blocking(RedisCluster::start);
    let backend = TestBackend::start().await;
    let url = cluster.url();
    let proxy = Stickless::on_redis_url(
        &backend.url(),
        &url,
        &["--redis-timeout", "1s", "--durability", durability],
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
    let (&victim, victim_keys) = shards.iter().max_by_key(|(_, k)| k.len()).unwrap();
    let on_victim = victim_keys.len();
    // The logins are on the replicas before the fault: a session lost after it is not the
    // cluster's asynchronous replication.
    wait_for(
        "the logins on the replicas",
        Duration::from_secs(10),
        || cluster.replicated().then_some(()),
    );

    let load = Load::start(proxy.url("/"), cookies.clone(), CLIENT_TIMEOUT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = Instant::now();
    blocking(|| fault(&mut cluster, victim));
    // Without recovery to wait for, a few seconds of the refusals are enough to count.
    let settle_limit = Duration::from_secs(if recovers { 30 } else { 6 });
    load.settle(start, Duration::from_secs(3), settle_limit)
        .await;
    let runs = load.stop().await;

    blocking(|| cluster.wait_ok(Duration::from_secs(10)));
    let counters = final_counters(&proxy, &cookies).await;
    let report = DrillReport::new(start, &runs, &counters);
    report.print(name);
    println!(
        "primary :{victim} held {on_victim} of {USERS} sessions; primaries now {:?}",
        cluster.primaries()
    );
    print_warnings(&proxy);

    assert!(!cluster.primaries().contains(&victim));
    report.assert_held(&runs, recovers.then_some(RECOVERY_LIMIT), &proxy.logs());
    // Every session was on its replica before the fault.
    assert_eq!(report.sessions_lost, 0, "sessions lost");
    report
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_failover_costs_only_bounded_503s_and_no_replicated_session() {
    drill(
        "cluster failover (one primary SIGKILLed)",
        "acknowledged",
        true,
        |cluster, victim| cluster.node(victim).kill(),
    )
    .await;
}

/// A manual failover leaves the old primary running as a replica that answers `MOVED` for its
/// former slots: the routing stickless had becomes wrong without any connection dropping. With
/// one attempt per command fred does not follow the redirect itself (it answers "Too many failed
/// write attempts." after refreshing its routing); the script did not run, so stickless sends it
/// once more, to the new owner.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_switchover_costs_only_bounded_503s() {
    drill(
        "cluster switchover (CLUSTER FAILOVER on a replica)",
        "acknowledged",
        true,
        switchover,
    )
    .await;
}

/// The same switchover with `--durability replicated`: every write a user was told is stored is
/// on a replica, so none is lost, and the old primary, now a replica, keeps confirming them.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_switchover_with_replicated_writes_loses_no_acknowledged_increment() {
    let report = drill(
        "cluster switchover, --durability replicated",
        "replicated",
        true,
        switchover,
    )
    .await;
    assert_eq!(report.acked_lost, 0, "acknowledged increments lost");
}

/// `CLUSTER FAILOVER` on the victim's replica, waited for.
fn switchover(cluster: &mut RedisCluster, victim: u16) {
    cluster.switchover(victim);
}
