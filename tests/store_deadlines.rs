//! A write answered 503 must leave the session as it was. When Redis stalls, the proxy gives up
//! after `--redis-timeout`, but the script it sent is still queued on the connection and runs
//! when Redis resumes. Each script therefore carries a deadline in Redis's clock and refuses to
//! act once Redis's `TIME` is past it. These tests freeze a real `redis-server` (SIGSTOP) while
//! the backend is working, so that the write that follows the backend's answer is queued behind
//! the stall, then resume it and check with the independent client that nothing changed.

mod support;

use std::time::{Duration, Instant};

use support::*;

const TIMEOUT: &str = "300ms";
/// Long enough for the test to see the request reach the backend and freeze Redis.
const BACKEND_WAIT: &str = "/slow/700";

fn key_of(cookie: &str) -> String {
    format!("stickless:{}", id_of(cookie))
}

/// A client that sends this session cookie and never replaces it.
fn client_with(cookie: &str) -> Http {
    let mut h = Http::with_jar();
    h.sid = Some(cookie.to_owned());
    h.keep_cookies = true;
    h
}

/// Sends a request to the slow backend path with these replies, freezes Redis as soon as the
/// request has reached the backend (so its session was loaded before the freeze), and returns
/// the response, which comes while Redis is still frozen.
async fn answered_while_redis_is_frozen(
    redis: &RedisServer,
    backend: &TestBackend,
    proxy: &Stickless,
    cookie: &str,
    replies: &[&str],
) -> Reply {
    let before = backend.hits();
    let url = proxy.url(BACKEND_WAIT);
    let replies: Vec<String> = replies.iter().map(|s| s.to_string()).collect();
    let mut http = client_with(cookie);
    let request = tokio::spawn(async move {
        let replies: Vec<&str> = replies.iter().map(String::as_str).collect();
        http.get_replying(&url, &replies).await
    });
    eventually(
        "the request to reach the backend",
        Duration::from_secs(5),
        || async { (backend.hits() > before).then_some(()) },
    )
    .await;
    redis.pause();
    let started = Instant::now();
    let r = request.await.expect("the request task");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered after {:?}",
        started.elapsed()
    );
    r
}

/// Resumes Redis and waits until the proxy serves this cookie again. The proxy's connection is
/// one ordered stream, so once a later load through it is answered, whatever the refused request
/// had queued before it has been run (or refused) by Redis.
async fn resume_and_settle(redis: &RedisServer, proxy: &Stickless, cookie: &str) -> Seen {
    redis.resume();
    eventually(
        "the proxy to serve again",
        Duration::from_secs(15),
        || async {
            let r = client_with(cookie).get(&proxy.url("/")).await;
            (r.status == 200).then(|| r.seen())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_increment_answered_503_is_not_applied_when_redis_resumes() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &["--redis-timeout", TIMEOUT]);
    let mut http = Http::with_jar();
    let r = http
        .get_replying(&proxy.url("/"), &["x-session-incr-n: 1"])
        .await;
    assert_eq!(r.status, 200);
    let cookie = http.sid.clone().expect("a session cookie");
    let key = key_of(&cookie);
    assert_eq!(hgetall(&redis, &key).await["n"], "1");

    let r =
        answered_while_redis_is_frozen(&redis, &backend, &proxy, &cookie, &["x-session-incr-n: 1"])
            .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.sid().is_none(), "no cookie on a 503");

    let seen = resume_and_settle(&redis, &proxy, &cookie).await;
    assert_eq!(
        seen.fields().get("n").map(String::as_str),
        Some("1"),
        "the increment answered 503 ran after Redis resumed: a retry would count twice"
    );
    assert_eq!(hgetall(&redis, &key).await["n"], "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_answered_503_keeps_the_session_it_started_from() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &["--redis-timeout", TIMEOUT]);
    let mut http = Http::with_jar();
    let r = http
        .get_replying(&proxy.url("/"), &["x-session-set-cart: 3"])
        .await;
    assert_eq!(r.status, 200);
    // A first rotation loads the scripts into Redis: a script's first use is answered NOSCRIPT
    // and sent again, which a frozen Redis would answer too late to be sent again.
    let r = http
        .get_replying(&proxy.url("/"), &["x-session-rotate: true"])
        .await;
    assert_eq!(r.status, 200);
    let cookie = http.sid.clone().expect("a session cookie");
    let key = key_of(&cookie);
    let before = hgetall(&redis, &key).await;
    assert_eq!(before["cart"], "3");

    let r = answered_while_redis_is_frozen(
        &redis,
        &backend,
        &proxy,
        &cookie,
        &["x-session-rotate: true", "x-session-set-user: alice"],
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.sid().is_none(), "no cookie on a 503");

    let seen = resume_and_settle(&redis, &proxy, &cookie).await;
    assert_eq!(
        seen.header("x-session"),
        Some("active"),
        "the login answered 503 logged the user out"
    );
    assert_eq!(seen.fields().get("cart").map(String::as_str), Some("3"));
    assert_eq!(seen.fields().get("user"), None);
    assert_eq!(
        hgetall(&redis, &key).await,
        before,
        "the session the login started from is unchanged"
    );
    for k in keys(&redis, "stickless:*").await {
        assert!(
            !hgetall(&redis, &k).await.contains_key("user"),
            "a session was created by the refused login"
        );
    }
}
