//! Failover drill on a Sentinel group: users increment their counters through stickless (given
//! the group as a `redis-sentinel://` URL) while the primary is killed and the sentinels promote
//! the replica. Run with `--no-capture` to see the figures.

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
async fn sentinel_failover_costs_only_bounded_503s_and_no_session() {
    let mut group = blocking(SentinelGroup::start);
    let backend = TestBackend::start().await;
    let url = group.url();
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
    // The logins are on the replica before the kill: a session lost after it is stickless's doing.
    wait_for("the logins on the replica", Duration::from_secs(10), || {
        replicated(group.primary.port, 1).then_some(())
    });

    let load = Load::start(proxy.url("/"), cookies.clone(), CLIENT_TIMEOUT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old_primary = group.primary.port;
    let kill = Instant::now();
    group.primary.kill();
    load.settle(kill, Duration::from_secs(3), Duration::from_secs(30))
        .await;
    let runs = load.stop().await;

    let new_primary = group.primary_port();
    let counters = final_counters(&proxy, &cookies).await;
    let report = DrillReport::new(kill, &runs, &counters);
    report.print("sentinel failover (primary SIGKILLed)");
    println!(
        "primary before: {old_primary}, after: {new_primary:?} (replica {})",
        group.replica.port
    );

    assert_eq!(
        new_primary,
        Some(group.replica.port),
        "the sentinels promoted the replica"
    );
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
    assert_eq!(report.sessions_lost, 0, "sessions lost");
}
