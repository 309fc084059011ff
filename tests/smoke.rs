//! The shortest path through every real part: Redis, stickless as a process, a backend.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn login_visit_logout_on_redis() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();

    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert!(r.sid().is_none());

    let r = http
        .get_replying(&proxy.url("/login"), &["x-session-set-user: alice"])
        .await;
    assert_eq!(r.status, 200);
    let cookie = http.sid.clone().expect("a session cookie");
    let key = format!("stickless:{}", id_of(&cookie));
    let stored = hgetall(&redis, &key).await;
    assert_eq!(stored.get("user").map(String::as_str), Some("alice"));
    assert!(pttl(&redis, &key).await > 0);

    let r = http.get(&proxy.url("/")).await;
    let seen = r.seen();
    assert_eq!(seen.header("x-session"), Some("active"));
    assert_eq!(seen.fields().get("user").map(String::as_str), Some("alice"));
    assert!(
        seen.header("cookie").is_none(),
        "the session cookie does not reach the backend"
    );

    let r = http
        .get_replying(&proxy.url("/logout"), &["x-session-destroy: true"])
        .await;
    assert_eq!(r.sid().as_deref(), Some(""));
    assert_eq!(pttl(&redis, &key).await, -2);
}
