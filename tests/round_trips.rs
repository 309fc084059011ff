//! The cost in Redis commands of each kind of request, watched with MONITOR on a real server: a
//! request that only reads its session is exactly one round trip (`HGETALL` and `PTTL` pipelined,
//! no script), a change is exactly one more, and a request without a session cookie is none.
//! Background checks (the role check's `INFO replication`) are not a request's and are left out.

mod support;

use support::*;

/// The commands of MONITOR lines that a request sent: without the background role check.
fn requests_commands(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| !l.to_ascii_lowercase().contains("\"info\" \"replication\""))
        .filter_map(|l| command_name(l))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_round_trip_to_read_one_more_to_change_none_without_a_session() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    // Uncached: with the local cache (on by default), a read of a cached session costs none.
    let proxy = Stickless::on_redis(&backend.url(), &redis, &["--local-cache", "0"]);
    let mut http = Http::with_jar();
    http.get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    // The first use of each script may cost a NOSCRIPT and a reload: warm it up.
    http.get_replying(&proxy.url("/"), &["x-session-incr-n: 1"])
        .await;

    let mut monitor = Monitor::start(&redis).await;

    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.seen().header("x-session"), Some("active"));
    let lines = monitor.drain_lines().await;
    assert_eq!(
        requests_commands(&lines),
        ["hgetall", "pttl"],
        "a read is HGETALL and PTTL, no script"
    );
    // Pipelined on one connection: PTTL does not wait for HGETALL's answer. (fred writes each
    // command of a pipeline as soon as it is queued when nothing else is waiting, so an idle
    // Redis may read them in two reads; under load they share one.)
    let connections: std::collections::BTreeSet<_> = lines
        .iter()
        .filter(|l| requests_commands(std::slice::from_ref(*l)).len() == 1)
        .filter_map(|l| l.split(['[', ']']).nth(1))
        .collect();
    assert_eq!(connections.len(), 1, "one connection: {lines:?}");

    http.get_replying(&proxy.url("/"), &["x-session-incr-n: 1"])
        .await;
    assert_eq!(
        requests_commands(&monitor.drain_lines().await),
        ["hgetall", "pttl", "evalsha"],
        "a read and a change are two round trips"
    );

    let r = Http::new().get(&proxy.url("/")).await;
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert!(
        requests_commands(&monitor.drain_lines().await).is_empty(),
        "no cookie, no Redis"
    );

    let stored = hgetall(
        &redis,
        &format!("stickless:{}", id_of(http.sid.as_ref().unwrap())),
    )
    .await;
    assert_eq!(stored.get("n").map(String::as_str), Some("2"));
}

/// With the local cache (on by default): the read after a load is served from memory, and a
/// change is one round trip; the next read loads the changed session again.
#[tokio::test(flavor = "multi_thread")]
async fn by_default_a_cached_read_costs_no_round_trip() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();
    http.get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    // The change's own invalidation may still be on its way: read until a read is served from
    // memory (at most a few loads).
    let mut monitor = Monitor::start(&redis).await;
    let mut cached = false;
    for _ in 0..50 {
        let r = http.get(&proxy.url("/")).await;
        assert_eq!(r.seen().fields(), user("alice"));
        if requests_commands(&monitor.drain_lines().await).is_empty() {
            cached = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(cached, "no read was served from the local cache");
    for _ in 0..5 {
        let r = http.get(&proxy.url("/")).await;
        assert_eq!(r.seen().fields(), user("alice"));
    }
    assert!(
        requests_commands(&monitor.drain_lines().await).is_empty(),
        "cached reads cost no round trip"
    );

    http.get_replying(&proxy.url("/"), &["x-session-set-user: bob"])
        .await;
    let commands = requests_commands(&monitor.drain_lines().await);
    assert_eq!(
        commands.iter().filter(|c| *c == "evalsha").count(),
        1,
        "a change is one script: {commands:?}"
    );
    // Read-your-writes: the next read sees bob, from Redis or from a copy loaded after the change.
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.seen().fields(), user("bob"));
}

fn user(name: &str) -> std::collections::BTreeMap<String, String> {
    [("user".to_owned(), name.to_owned())].into()
}
