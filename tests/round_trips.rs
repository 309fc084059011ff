//! The cost in Redis commands of each kind of request, watched with MONITOR on a real server: a
//! request that only reads its session is exactly one round trip (read and TTL renewal in one
//! script), a change is exactly one more, and a request without a session cookie is none.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn one_round_trip_to_read_one_more_to_change_none_without_a_session() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    // Uncached: with the local cache (on by default), a read of a cached session costs none.
    let proxy = Stickless::on_redis(&backend.url(), &redis, &["--local-cache", "0"]);
    let mut http = Http::with_jar();
    http.get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    // The first use of each script may cost a NOSCRIPT and a reload: warm both up.
    http.get_replying(&proxy.url("/"), &["x-session-incr-n: 1"])
        .await;

    let mut monitor = Monitor::start(&redis).await;

    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.seen().header("x-session"), Some("active"));
    assert_eq!(
        monitor.drain().await,
        ["evalsha"],
        "a read is one round trip"
    );

    http.get_replying(&proxy.url("/"), &["x-session-incr-n: 1"])
        .await;
    assert_eq!(
        monitor.drain().await,
        ["evalsha", "evalsha"],
        "a read and a change are two"
    );

    let r = Http::new().get(&proxy.url("/")).await;
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert!(monitor.drain().await.is_empty(), "no cookie, no Redis");

    let stored = hgetall(
        &redis,
        &format!("stickless:{}", id_of(http.sid.as_ref().unwrap())),
    )
    .await;
    assert_eq!(stored.get("n").map(String::as_str), Some("2"));
}
