//! Failure paths and multi-instance guarantees, through the real `stickless` process: a backend
//! that refuses or hangs, a Redis that dies, freezes or starts late, session lifetimes, restarts,
//! several instances on one Redis and concurrent changes to one session.

mod support;

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use support::*;

/// Runs `f` and checks that it took at most `limit`. Two cores shared by a whole parallel test
/// run can stall any process for a moment, which would fail a wall-clock bound that the proxy
/// itself kept: a miss is measured again, up to three times in all, before it counts. So `f` must
/// be safe to repeat. Returns what the last run returned.
async fn within<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let v = f().await;
        let took = t.elapsed();
        if took <= limit {
            return v;
        }
        times.push(took);
    }
    panic!("{what} took {times:?}, three times more than {limit:?}");
}

/// The Redis key of a cookie's session.
fn key_of(cookie: &str) -> String {
    format!("stickless:{}", id_of(cookie))
}

/// A client that sends this session cookie (and keeps whatever replaces it).
fn client_with(cookie: &str) -> Http {
    let mut h = Http::with_jar();
    h.sid = Some(cookie.to_owned());
    h
}

/// Logs in through `proxy` (the backend sets `user`) and returns the new session cookie.
async fn login(http: &mut Http, proxy: &Stickless, user: &str) -> String {
    let set = format!("x-session-set-user: {user}");
    let r = http.get_replying(&proxy.url("/login"), &[&set]).await;
    assert_eq!(r.status, 200, "login: {}", r.text());
    let cookie = r.sid().expect("login sets the session cookie");
    assert!(!cookie.is_empty());
    cookie
}

/// Status of an admin endpoint.
async fn admin_status(proxy: &Stickless, path: &str) -> u16 {
    Http::new()
        .get(&proxy.admin_url(path))
        .await
        .status
        .as_u16()
}

/// Waits until `/readyz` answers 200, failing with the proxy's log after `deadline`.
async fn wait_ready(proxy: &Stickless, deadline: Duration) {
    let end = Instant::now() + deadline;
    while admin_status(proxy, "/readyz").await != 200 {
        assert!(
            Instant::now() < end,
            "/readyz still not 200 after {deadline:?}; stickless log:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts a short plain-text error body from stickless itself.
fn assert_plain_error(r: &Reply, status: u16, text: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.text(), text);
    let ct = r.headers.get("content-type").unwrap().to_str().unwrap();
    assert!(ct.starts_with("text/plain"), "content-type {ct}");
    assert!(r.set_cookies().is_empty(), "no cookie on an error");
}

// ---------------------------------------------------------------------------------------------
// The backend fails.
// ---------------------------------------------------------------------------------------------

/// A backend of our own on a reserved port, answering 200 `late backend` and setting `user=late`.
async fn backend_on(port: ReservedPort) -> tokio::sync::oneshot::Sender<()> {
    let listener = port.listen();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(stickless::server::serve_http(
        listener,
        |_req: Request<hyper::body::Incoming>, _| async {
            let mut resp = Response::new(Full::new(Bytes::from_static(b"late backend")));
            resp.headers_mut()
                .insert("x-session-set-user", "late".parse().unwrap());
            resp
        },
        async {
            let _ = rx.await;
        },
    ));
    tx
}

#[tokio::test(flavor = "multi_thread")]
async fn refusing_backend_gives_502_quickly_and_the_proxy_keeps_serving() {
    let redis = RedisServer::start();
    // A working path on the same Redis, to log in with.
    let backend = TestBackend::start().await;
    let good = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();
    let cookie = login(&mut http, &good, "alice").await;
    let key = key_of(&cookie);

    // Held but not listening: connections are refused, and no other process can take it.
    let dead_port = ReservedPort::new();
    let proxy = Stickless::on_redis(&format!("http://127.0.0.1:{}", dead_port.port), &redis, &[]);

    for (i, with_cookie) in [(1.0, false), (2.0, true)] {
        let client = if with_cookie {
            client_with(&cookie)
        } else {
            Http::new()
        };
        let r = within(Duration::from_secs(2), "a 502", || {
            let mut client = client.clone();
            let url = proxy.url("/");
            async move {
                client
                    .get_replying(&url, &["x-session-set-user: mallory"])
                    .await
            }
        })
        .await;
        assert_plain_error(&r, 502, "backend unavailable\n");
        assert!(
            proxy
                .metric("stickless_upstream_errors_total{reason=\"connect\"}")
                .await
                >= i
        );
    }
    // Nothing was stored or lost by the failed requests.
    assert_eq!(keys(&redis, "stickless:*").await, vec![key.clone()]);
    assert_eq!(hgetall(&redis, &key).await["user"], "alice");

    // The backend comes up on that port: the same proxy process serves it, sessions included.
    let _stop = backend_on(dead_port).await;
    let mut client = client_with(&cookie);
    let r = eventually("the late backend answers", Duration::from_secs(10), || {
        let mut client = client.clone();
        let url = proxy.url("/");
        async move { Some(client.get(&url).await).filter(|r| r.status == 200) }
    })
    .await;
    assert_eq!(r.text(), "late backend");
    assert!(r.headers.get("x-session-set-user").is_none());
    assert_eq!(hgetall(&redis, &key).await["user"], "late");
    let r = client.get(&good.url("/")).await;
    assert_eq!(
        r.seen().fields().get("user").map(String::as_str),
        Some("late")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hanging_backend_gives_504_and_its_late_changes_are_dropped() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &["--upstream-timeout", "500ms"]);

    let (r, took) = within(Duration::from_secs(2), "a 504", || async {
        let t = Instant::now();
        (Http::new().get(&proxy.url("/slow/5000")).await, t.elapsed())
    })
    .await;
    assert!(took >= Duration::from_millis(450), "took {took:?}");
    assert_plain_error(&r, 504, "backend timed out\n");
    assert!(
        proxy
            .metric("stickless_upstream_errors_total{reason=\"timeout\"}")
            .await
            >= 1.0
    );

    // A slow answer that would create a session arrives after the proxy gave up: nothing is stored.
    let t = Instant::now();
    let r = within(Duration::from_millis(1400), "a 504", || async {
        Http::new()
            .get_replying(&proxy.url("/slow/1500"), &["x-session-set-user: late"])
            .await
    })
    .await;
    assert_plain_error(&r, 504, "backend timed out\n");
    // Past the backend's late answer to the last try.
    tokio::time::sleep(Duration::from_millis(4500).saturating_sub(t.elapsed())).await;
    assert!(keys(&redis, "stickless:*").await.is_empty());

    // Fast requests still go through.
    let r = Http::new().get(&proxy.url("/fast")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().path, "/fast");
}

// ---------------------------------------------------------------------------------------------
// Redis fails.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn killed_redis_gives_503_then_the_proxy_recovers_by_itself() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &["--redis-timeout", "300ms"]);
    let mut http = Http::with_jar();
    let old = login(&mut http, &proxy, "alice").await;

    redis.kill();
    let hits = backend.hits();
    let r = within(Duration::from_secs(2), "a 503", || {
        let mut http = http.clone();
        let url = proxy.url("/");
        async move { http.get(&url).await }
    })
    .await;
    assert_plain_error(&r, 503, "session store unavailable, retry shortly\n");
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(backend.hits(), hits, "not forwarded without its session");
    assert_eq!(http.sid.as_deref(), Some(old.as_str()), "cookie kept");

    let ready = within(Duration::from_secs(2), "/readyz", || {
        admin_status(&proxy, "/readyz")
    })
    .await;
    assert_eq!(ready, 503);
    assert_eq!(admin_status(&proxy, "/healthz").await, 200);
    assert!(
        proxy
            .metric("stickless_session_lookups_total{result=\"error\"}")
            .await
            >= 1.0
    );

    // Redis comes back empty (no persistence) on the same port.
    redis = RedisServer::start_on(port);
    wait_ready(&proxy, Duration::from_secs(15)).await;
    // The old session's data is gone: its cookie now means no session.
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().header("x-session"), Some("none"));
    // New sessions are created and read again.
    let new = login(&mut http, &proxy, "bob").await;
    assert_ne!(id_of(&new), id_of(&old));
    assert_eq!(hgetall(&redis, &key_of(&new)).await["user"], "bob");
    let seen = http.get(&proxy.url("/")).await.seen();
    assert_eq!(seen.header("x-session"), Some("active"));
    assert_eq!(seen.fields().get("user").map(String::as_str), Some("bob"));
}

#[tokio::test(flavor = "multi_thread")]
async fn paused_redis_gives_bounded_503_and_the_session_is_intact_after_resume() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &["--redis-timeout", "300ms"]);
    let mut http = Http::with_jar();
    let cookie = login(&mut http, &proxy, "alice").await;
    let key = key_of(&cookie);

    redis.pause();
    let hits = backend.hits();
    for _ in 0..2 {
        let r = within(Duration::from_secs(2), "a 503", || {
            let mut http = http.clone();
            let url = proxy.url("/");
            async move { http.get_replying(&url, &["x-session-incr-visits: 1"]).await }
        })
        .await;
        assert_plain_error(&r, 503, "session store unavailable, retry shortly\n");
        assert_eq!(r.headers["retry-after"], "1");
    }
    assert_eq!(backend.hits(), hits);
    let ready = within(Duration::from_secs(2), "/readyz", || {
        admin_status(&proxy, "/readyz")
    })
    .await;
    assert_eq!(ready, 503);
    assert_eq!(admin_status(&proxy, "/healthz").await, 200);

    redis.resume();
    let seen = eventually("a request served again", Duration::from_secs(15), || {
        let mut http = http.clone();
        let url = proxy.url("/");
        async move {
            let r = http.get(&url).await;
            (r.status == 200).then(|| r.seen())
        }
    })
    .await;
    assert_eq!(seen.header("x-session"), Some("active"));
    assert_eq!(seen.fields().get("user").map(String::as_str), Some("alice"));
    let stored = hgetall(&redis, &key).await;
    assert_eq!(stored["user"], "alice");
    assert!(
        !stored.contains_key("visits"),
        "the refused requests changed nothing: {stored:?}"
    );
    assert_eq!(keys(&redis, "stickless:*").await, vec![key.clone()]);
    // And changes are stored again.
    let r = http
        .get_replying(&proxy.url("/"), &["x-session-incr-visits: 1"])
        .await;
    assert_eq!(r.status, 200);
    assert!(r.sid().is_none());
    assert_eq!(hgetall(&redis, &key).await["visits"], "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_that_need_no_store_call_pass_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &["--redis-timeout", "300ms"]);
    let mut http = Http::with_jar();
    let cookie = login(&mut http, &proxy, "alice").await;
    redis.kill();

    // No cookie, and the backend changes nothing: no store call, the request passes.
    let r = Http::new().get(&proxy.url("/public")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert!(r.set_cookies().is_empty());

    // Only other cookies: they pass, still no store call.
    let r = Http::new()
        .send(
            http::Method::GET,
            &proxy.url("/public"),
            &[("cookie", "theme=dark")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = r.seen();
    assert_eq!(seen.header("x-session"), Some("none"));
    assert_eq!(seen.header("cookie"), Some("theme=dark"));

    // A forged session cookie is never looked up: no session, and it does not reach the backend.
    let forged = format!("{}.{}", "A".repeat(43), "B".repeat(43));
    let r = client_with(&forged).get(&proxy.url("/public")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert!(r.seen().header("cookie").is_none());

    // A valid cookie needs the store: 503, the backend is not called.
    let hits = backend.hits();
    let r = client_with(&cookie).get(&proxy.url("/")).await;
    assert_plain_error(&r, 503, "session store unavailable, retry shortly\n");
    assert_eq!(backend.hits(), hits);

    // No cookie, but the backend creates a session: the backend ran, the write cannot be stored,
    // and the client gets 503 (not the backend's response, and no cookie).
    let r = within(Duration::from_secs(2), "a 503", || async {
        Http::new()
            .get_replying(&proxy.url("/login"), &["x-session-set-user: bob"])
            .await
    })
    .await;
    assert_plain_error(&r, 503, "session store unavailable, retry shortly\n");
    assert_eq!(r.headers["retry-after"], "1");
    assert!(backend.hits() > hits, "the backend ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_started_before_redis_becomes_ready_when_redis_comes_up() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let backend = TestBackend::start().await;
    let t = Instant::now();
    let proxy = Stickless::start(
        &backend.url(),
        &[
            "--redis-url",
            &url,
            "--secret-keys",
            TEST_KEY,
            "--redis-timeout",
            "300ms",
        ],
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "start took {:?}",
        t.elapsed()
    );
    assert_eq!(admin_status(&proxy, "/readyz").await, 503);
    assert_eq!(admin_status(&proxy, "/healthz").await, 200);
    let r = Http::new().get(&proxy.url("/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().header("x-session"), Some("none"));
    let r = Http::new()
        .get_replying(&proxy.url("/login"), &["x-session-set-user: early"])
        .await;
    assert_eq!(r.status, 503);

    let redis = RedisServer::start_on(port);
    wait_ready(&proxy, Duration::from_secs(15)).await;
    let mut http = Http::with_jar();
    let cookie = login(&mut http, &proxy, "alice").await;
    assert_eq!(hgetall(&redis, &key_of(&cookie)).await["user"], "alice");
    let seen = http.get(&proxy.url("/")).await.seen();
    assert_eq!(seen.header("x-session"), Some("active"));
    assert_eq!(seen.fields().get("user").map(String::as_str), Some("alice"));
}

// ---------------------------------------------------------------------------------------------
// Lifetimes.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_slides_with_use_and_ends_an_idle_session() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &["--idle-timeout", "1s"]);
    let mut http = Http::with_jar();
    let start = Instant::now();
    let cookie = login(&mut http, &proxy, "alice").await;
    let mut key = key_of(&cookie);
    let ttl = pttl(&redis, &key).await;
    let since = start.elapsed().as_millis() as i64;
    assert!(
        ttl <= 1000 && ttl >= 950 - since,
        "PTTL {ttl}, {since} ms after login"
    );

    // Used every ~400 ms for well over the idle timeout: each request renews it (the TTL fell
    // more than an eighth of the idle timeout since the last). The bounds hold
    // only for the gaps the machine really kept: a stall longer than the idle timeout may end the
    // session by right, so such a step proves nothing, is not asserted, and starts over.
    let mut renewed = start;
    let mut checked = 0;
    while start.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let sent = Instant::now();
        let r = http.get(&proxy.url("/")).await;
        let received = Instant::now();
        let seen = r.seen();
        // A due renewal goes to Redis in the background, after the answer: wait a moment for it.
        let mut ttl = pttl(&redis, &key).await;
        while ttl < 950 - sent.elapsed().as_millis() as i64
            && received.elapsed() < Duration::from_millis(100)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
            ttl = pttl(&redis, &key).await;
        }
        let since_sent = sent.elapsed().as_millis() as i64;
        let active = seen.header("x-session") == Some("active");
        if received - renewed < Duration::from_millis(900) {
            checked += 1;
            assert!(active, "ended at {:?}", start.elapsed());
            assert_eq!(seen.fields().get("user").map(String::as_str), Some("alice"));
            assert!(
                ttl <= 1000 && ttl >= 950 - since_sent,
                "PTTL {ttl}, {since_sent} ms after the request was sent"
            );
        } else if !active {
            key = key_of(&login(&mut http, &proxy, "alice").await);
        }
        renewed = sent;
    }
    assert!(checked >= 3, "only {checked} steps kept their timing");

    // Idle for longer than the timeout: gone.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(pttl(&redis, &key).await, -2);
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert!(keys(&redis, "stickless:*").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn absolute_timeout_ends_a_session_in_continuous_use() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(
        &backend.url(),
        &redis,
        &["--idle-timeout", "10s", "--absolute-timeout", "2s"],
    );
    let mut http = Http::with_jar();
    let abs = Duration::from_secs(2);
    let t0 = Instant::now();
    let r = http
        .get_replying(&proxy.url("/login"), &["x-session-set-user: alice"])
        .await;
    // The session was created between t0 and t1, so it ends between t0 + 2 s and t1 + 2 s.
    let t1 = Instant::now();
    let set = r
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("sid="))
        .expect("a session cookie");
    assert!(set.contains("Max-Age=2"), "{set}");
    let cookie = http.sid.clone().unwrap();
    let key = key_of(&cookie);

    let mut active_late = false;
    let mut ended = false;
    while t0.elapsed() < Duration::from_millis(4000) {
        let sent = Instant::now();
        let r = http.get(&proxy.url("/")).await;
        let received = Instant::now();
        assert_eq!(r.status, 200);
        let active = r.seen().header("x-session") == Some("active");
        if received < t0 + abs {
            assert!(active, "ended early, {:?} after login", received - t0);
        }
        if sent > t1 + abs {
            assert!(!active, "still alive {:?} after login", sent - t1);
        }
        if ended {
            assert!(!active, "an ended session came back");
        }
        if active {
            active_late |= received > t0 + Duration::from_millis(1000);
            let before = Instant::now();
            let ttl = pttl(&redis, &key).await;
            let left = (t1 + abs).saturating_duration_since(before).as_millis() as i64;
            assert!(ttl > 0 && ttl <= 2000, "PTTL {ttl}");
            assert!(
                ttl <= left + 20,
                "PTTL {ttl}, but at most {left} ms were left"
            );
        } else {
            ended = true;
            assert_eq!(pttl(&redis, &key).await, -2);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(active_late, "the session was used for more than a second");
    assert!(ended, "the session ended");
    assert!(keys(&redis, "stickless:*").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_to_a_session_deleted_meanwhile_does_not_bring_it_back() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();
    let cookie = login(&mut http, &proxy, "alice").await;
    let key = key_of(&cookie);

    let hits = backend.hits();
    let mut h = http.clone();
    let url = proxy.url("/slow/800");
    let request =
        tokio::spawn(async move { h.get_replying(&url, &["x-session-incr-visits: 1"]).await });
    // Once the backend has the request, the session was loaded: delete it behind the proxy's back.
    let b = &backend;
    eventually(
        "the backend got the request",
        Duration::from_secs(5),
        move || async move { (b.hits() > hits).then_some(()) },
    )
    .await;
    let mut c = redis.conn().await;
    let deleted: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(deleted, 1);

    let r = request.await.unwrap();
    assert_eq!(r.status, 200);
    let seen = r.seen();
    assert_eq!(seen.header("x-session"), Some("active"));
    assert_eq!(seen.fields().get("user").map(String::as_str), Some("alice"));
    assert_eq!(
        pttl(&redis, &key).await,
        -2,
        "the deleted session stays deleted"
    );
    // No new session either: its cookie could replace one a concurrent login has just set.
    assert_eq!(r.sid(), None, "no cookie is set");
    assert!(keys(&redis, "stickless:*").await.is_empty());
    assert_eq!(
        proxy
            .metric("stickless_session_events_total{event=\"dropped\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_survives_a_restart_of_stickless() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let mut proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();
    let cookie = login(&mut http, &proxy, "alice").await;
    let r = http
        .get_replying(&proxy.url("/"), &["x-session-incr-visits: 1"])
        .await;
    assert_eq!(r.status, 200);
    let addr = proxy.addr;

    proxy.restart();
    assert_eq!(proxy.addr, addr);
    // A fresh client: the old one's pooled connection went with the old process.
    let mut http = client_with(&cookie);
    let r = http
        .get_replying(&proxy.url("/"), &["x-session-incr-visits: 1"])
        .await;
    assert_eq!(r.status, 200);
    assert!(r.sid().is_none(), "same cookie, nothing to set");
    let seen = r.seen();
    assert_eq!(seen.header("x-session"), Some("active"));
    let fields = seen.fields();
    assert_eq!(fields.get("user").map(String::as_str), Some("alice"));
    assert_eq!(fields.get("visits").map(String::as_str), Some("1"));
    let stored = hgetall(&redis, &key_of(&cookie)).await;
    assert_eq!(stored["user"], "alice");
    assert_eq!(stored["visits"], "2");
}

// ---------------------------------------------------------------------------------------------
// Several instances, concurrent changes.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_share_sessions_without_stickiness() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let a = Stickless::on_redis(&backend.url(), &redis, &[]);
    let b = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();
    let cookie = login(&mut http, &a, "alice").await;
    let key = key_of(&cookie);

    for i in 0..10 {
        let proxy = if i % 2 == 0 { &a } else { &b };
        let r = http
            .get_replying(&proxy.url("/"), &["x-session-incr-visits: 1"])
            .await;
        assert_eq!(r.status, 200);
        assert!(r.sid().is_none(), "no new cookie on request {i}");
        let seen = r.seen();
        assert_eq!(seen.header("x-session"), Some("active"));
        let fields = seen.fields();
        assert_eq!(fields.get("user").map(String::as_str), Some("alice"));
        let expected = (i > 0).then(|| i.to_string());
        assert_eq!(fields.get("visits"), expected.as_ref(), "request {i}");
        assert_eq!(hgetall(&redis, &key).await["visits"], (i + 1).to_string());
    }
    for proxy in [&a, &b] {
        let fields = http.get(&proxy.url("/")).await.seen().fields();
        assert_eq!(fields.get("visits").map(String::as_str), Some("10"));
    }

    // Logout on B ends the session on A too.
    let r = http
        .get_replying(&b.url("/logout"), &["x-session-destroy: true"])
        .await;
    assert_eq!(r.sid().as_deref(), Some(""));
    assert_eq!(pttl(&redis, &key).await, -2);
    let r = client_with(&cookie).get(&a.url("/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert!(keys(&redis, "stickless:*").await.is_empty());
}

/// Sends `per_proxy` concurrent increments of `counter` through each proxy, all with `cookie`.
async fn concurrent_increments(proxies: &[&Stickless], per_proxy: usize, cookie: &str) {
    let client = client_with(cookie);
    let mut tasks = Vec::new();
    for i in 0..per_proxy * proxies.len() {
        let url = proxies[i % proxies.len()].url("/");
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .get_replying(&url, &["x-session-incr-counter: 1"])
                .await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        // (With the local cache, each change sets the version cookie `sid_v`, never `sid`.)
        assert_eq!(r.sid(), None, "no new session");
        assert_eq!(r.seen().header("x-session"), Some("active"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_increments_through_one_proxy_all_count() {
    increments_through_one_proxy(&[]).await;
}

/// The same with the requests served by two worker threads (`--workers`), each calling the store
/// (and its local cache) that lives on the main runtime.
#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_increments_through_two_workers_and_the_local_cache_all_count() {
    increments_through_one_proxy(&["--workers", "2", "--local-cache", "1000"]).await;
}

async fn increments_through_one_proxy(args: &[&str]) {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, args);
    let mut http = Http::with_jar();
    let cookie = login(&mut http, &proxy, "alice").await;
    let hits = backend.hits();

    concurrent_increments(&[&proxy], 200, &cookie).await;

    assert_eq!(backend.hits(), hits + 200);
    let stored = hgetall(&redis, &key_of(&cookie)).await;
    assert_eq!(stored["counter"], "200");
    assert_eq!(stored["user"], "alice");
    assert_eq!(keys(&redis, "stickless:*").await, vec![key_of(&cookie)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_increments_through_two_proxies_all_count() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let a = Stickless::on_redis(&backend.url(), &redis, &[]);
    let b = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();
    let cookie = login(&mut http, &a, "alice").await;
    let hits = backend.hits();

    concurrent_increments(&[&a, &b], 100, &cookie).await;

    assert_eq!(backend.hits(), hits + 200);
    let stored = hgetall(&redis, &key_of(&cookie)).await;
    assert_eq!(stored["counter"], "200");
    assert_eq!(stored["user"], "alice");
    assert_eq!(keys(&redis, "stickless:*").await, vec![key_of(&cookie)]);
    let fields = http.get(&b.url("/")).await.seen().fields();
    assert_eq!(fields.get("counter").map(String::as_str), Some("200"));
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_request_headers_get_431_and_the_proxy_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(&backend.url(), &[]);
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let big = "x".repeat(100 * 1024);
    let req = format!("GET / HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n");
    // The proxy may answer and close before it has read everything: a failed write is fine.
    let _ = conn.write_all(req.as_bytes()).await;
    let mut head = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut head)).await;
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 431"), "got: {head:.200}");
    assert_eq!(
        backend.hits(),
        0,
        "an oversized request never reaches the backend"
    );
    let r = Http::new().get(&proxy.url("/")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_requests_finish_then_exits_cleanly() {
    let backend = TestBackend::start().await;
    let mut proxy = Stickless::start(&backend.url(), &[]);
    let hits = backend.hits();
    let url = proxy.url("/slow/700");
    let in_flight = tokio::spawn(async move { Http::new().get(&url).await });
    let b = &backend;
    eventually(
        "the backend got the request",
        Duration::from_secs(5),
        move || async move { (b.hits() > hits).then_some(()) },
    )
    .await;
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &proxy.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "the request in flight completes");
    let status = wait_for("stickless to exit", Duration::from_secs(15), || {
        proxy.exited()
    });
    assert!(status.success(), "exit status {status:?}\n{}", proxy.logs());
    assert!(proxy.logs().contains("shutting down"));
}
