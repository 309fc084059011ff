//! End-to-end tests of the header protocol: the real `stickless` binary on a real Redis, in front
//! of the test backend. Every test asserts on what Redis really holds (through the independent
//! `redis` client) and on what the backend really received.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROTOCOL_ERRORS: &str = "stickless_session_events_total{event=\"protocol_error\"}";
const INVALID: &str = "stickless_session_lookups_total{result=\"invalid\"}";
const MISS: &str = "stickless_session_lookups_total{result=\"miss\"}";
const HIT: &str = "stickless_session_lookups_total{result=\"hit\"}";
const SPOOFED: &str = "stickless_spoofed_headers_total";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The Redis key of a session cookie value.
fn key_of(cookie: &str) -> String {
    format!("stickless:{}", id_of(cookie))
}

/// The cookie tag computed independently: base64url(HMAC-SHA256(key, id)).
fn tag_for(key: &str, id: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(id.as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// A session id is 43 base64url characters that decode to 32 bytes.
fn assert_valid_id(id: &str) {
    assert_eq!(id.len(), 43, "id length: {id}");
    let bytes = URL_SAFE_NO_PAD.decode(id).expect("the id is base64url");
    assert_eq!(bytes.len(), 32, "the id is 256 bits");
}

/// Header names that belong to the protocol with this prefix (`x-session-`), in any spelling.
fn protocol_header_names(headers: &HeaderMap, prefix: &str) -> Vec<String> {
    let status = prefix.trim_end_matches('-');
    headers
        .keys()
        .map(|k| k.as_str().replace('_', "-"))
        .filter(|k| k.starts_with(prefix) || k == status)
        .collect()
}

fn assert_no_session_headers(r: &Reply) {
    let leaked = protocol_header_names(&r.headers, "x-session-");
    assert!(
        leaked.is_empty(),
        "protocol headers reached the client: {leaked:?}"
    );
}

/// Every header the backend saw whose name (with `_` read as `-`) starts with `x-session`.
fn session_like_headers(seen: &Seen) -> BTreeMap<String, Vec<String>> {
    seen.headers
        .iter()
        .filter(|(k, _)| k.replace('_', "-").starts_with("x-session"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A stored hash without stickless's own fields, `_created` and `_v` (the version).
fn without_internal(mut h: BTreeMap<String, String>) -> BTreeMap<String, String> {
    h.remove("_created");
    h.remove("_v");
    h
}

/// Calls of EVALSHA and HGETALL so far (every apply and take is a script, every session load an
/// HGETALL), from `INFO commandstats`.
async fn store_calls(redis: &RedisServer) -> u64 {
    let mut c = redis.conn().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .expect("INFO commandstats");
    let calls = |command: &str| {
        info.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("cmdstat_{command}:calls="))?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    calls("evalsha") + calls("hgetall")
}

/// Every session hash in Redis, by key.
async fn snapshot(redis: &RedisServer) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut all = BTreeMap::new();
    for k in keys(redis, "*").await {
        all.insert(k.clone(), hgetall(redis, &k).await);
    }
    all
}

/// A request with only the given headers (no jar).
async fn get_with(url: &str, headers: &[(&str, &str)]) -> Reply {
    Http::new()
        .send(Method::GET, url, headers, Bytes::new())
        .await
}

/// The value of the cookie `name` in a Set-Cookie header list.
fn cookie_value(set_cookies: &[String], name: &str) -> Option<String> {
    set_cookies.iter().find_map(|c| {
        let pair = c.split(';').next().unwrap();
        pair.strip_prefix(&format!("{name}=")).map(str::to_owned)
    })
}

/// A backend that writes its response head byte for byte: every request header
/// `x-raw-reply: <line>` becomes the response header line `<line>`, exactly as written (case
/// included). The body is the request head it received, as text.
struct RawBackend {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break String::from_utf8_lossy(&buf[..end]).into_owned();
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let mut resp = String::from("HTTP/1.1 200 OK\r\n");
                    for line in head.lines().skip(1) {
                        if let Some((k, v)) = line.split_once(':') {
                            if k.trim().eq_ignore_ascii_case("x-raw-reply") {
                                resp.push_str(v.trim());
                                resp.push_str("\r\n");
                            }
                        }
                    }
                    resp.push_str(&format!(
                        "content-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                        head.len(),
                        head
                    ));
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        RawBackend { addr, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The values of a header in a raw request head, matched without regard to case.
fn raw_header<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn set_creates_a_session_whose_fields_reach_the_backend() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();

    let before = now_ms();
    let r = http
        .get_replying(
            &proxy.url("/login"),
            &["x-session-set-user: alice", "x-session-set-role: admin"],
        )
        .await;
    let after = now_ms();
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert!(r.seen().fields().is_empty());
    assert_no_session_headers(&r);
    assert_eq!(
        r.headers.get("cache-control").map(|v| v.to_str().unwrap()),
        Some("no-store"),
        "a response that sets the session cookie is not cacheable"
    );

    let cookies = r.set_cookies_but_versions();
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    let value = r.sid().expect("a session cookie");
    assert_eq!(
        cookies[0],
        format!("sid={value}; Path=/; HttpOnly; SameSite=Lax")
    );
    let (id, tag) = value.split_once('.').expect("<id>.<tag>");
    assert_valid_id(id);
    assert_eq!(tag, tag_for(TEST_KEY, id), "tag = HMAC-SHA256(key, id)");

    let key = key_of(&value);
    assert_eq!(keys(&redis, "*").await, vec![key.clone()]);
    let stored = hgetall(&redis, &key).await;
    let created: u64 = stored["_created"].parse().expect("_created in ms");
    assert!(
        (before..=after).contains(&created),
        "{before} <= {created} <= {after}"
    );
    assert_eq!(
        without_internal(stored),
        map(&[("user", "alice"), ("role", "admin")])
    );
    let ttl = pttl(&redis, &key).await;
    assert!(
        ttl > 1_700_000 && ttl <= 1_800_000,
        "idle timeout 30m, got {ttl}"
    );

    let r = http.get(&proxy.url("/page")).await;
    assert_eq!(r.status, 200);
    assert!(
        r.set_cookies().is_empty(),
        "an unchanged session sets no cookie"
    );
    let seen = r.seen();
    assert_eq!(seen.headers["x-session"], vec!["active"]);
    assert_eq!(seen.fields(), map(&[("user", "alice"), ("role", "admin")]));
    assert!(
        !seen.headers.keys().any(|k| k.contains("created")),
        "_created is internal: {:?}",
        seen.headers
    );
    assert_no_session_headers(&r);

    // Another client gets its own session.
    let r = Http::new()
        .get_replying(&proxy.url("/login"), &["x-session-set-user: bob"])
        .await;
    let other = r.sid().unwrap();
    assert_ne!(id_of(&other), id);
    assert_eq!(keys(&redis, "*").await.len(), 2);
    assert_eq!(
        proxy
            .metric("stickless_session_events_total{event=\"created\"}")
            .await,
        2.0
    );
    assert_eq!(proxy.metric(HIT).await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn incr_follows_hincrby_semantics() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();

    // Incr creates a session and starts from 0.
    let r = http
        .get_replying(&proxy.url("/"), &["x-session-incr-visits: 1"])
        .await;
    assert_eq!(r.status, 200);
    assert_no_session_headers(&r);
    let key = key_of(http.sid.as_ref().expect("Incr creates a session"));
    assert_eq!(hgetall(&redis, &key).await["visits"], "1");

    for (by, expected) in [("5", "6"), ("-10", "-4"), ("+3", "-1"), ("0", "-1")] {
        let r = http
            .get_replying(&proxy.url("/"), &[&format!("x-session-incr-visits: {by}")])
            .await;
        assert_eq!(r.status, 200, "incr {by}");
        assert!(r.sid().is_none(), "an existing session keeps its cookie");
        assert_eq!(hgetall(&redis, &key).await["visits"], expected, "incr {by}");
    }
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.seen().fields()["visits"], "-1");

    // A field set to an integer string is a counter; several counters in one response.
    http.get_replying(&proxy.url("/"), &["x-session-set-score: 41"])
        .await;
    let r = http
        .get_replying(
            &proxy.url("/"),
            &["x-session-incr-score: 1", "x-session-incr-fresh: -7"],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        without_internal(hgetall(&redis, &key).await),
        map(&[("visits", "-1"), ("score", "42"), ("fresh", "-7")])
    );
    assert_eq!(keys(&redis, "*").await, vec![key]);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_removes_the_listed_fields() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();

    http.get_replying(
        &proxy.url("/"),
        &[
            "x-session-set-a: 1",
            "x-session-set-b: 2",
            "x-session-set-c: 3",
            "x-session-set-d: 4",
            "x-session-set-e: 5",
        ],
    )
    .await;
    let cookie = http.sid.clone().unwrap();
    let key = key_of(&cookie);

    // A list in one header, a second header, names in any case, a field that does not exist.
    let r = http
        .get_replying(
            &proxy.url("/"),
            &["x-session-delete: a, b", "x-session-delete: C, missing"],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_no_session_headers(&r);
    assert!(r.sid().is_none(), "deleting fields keeps the cookie");
    assert_eq!(
        without_internal(hgetall(&redis, &key).await),
        map(&[("d", "4"), ("e", "5")])
    );
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.seen().fields(), map(&[("d", "4"), ("e", "5")]));
}

#[tokio::test(flavor = "multi_thread")]
async fn destroy_deletes_the_key_and_clears_the_cookie() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();

    http.get_replying(&proxy.url("/login"), &["x-session-set-user: alice"])
        .await;
    let cookie = http.sid.clone().unwrap();
    let key = key_of(&cookie);
    assert!(pttl(&redis, &key).await > 0);

    let r = http
        .get_replying(&proxy.url("/logout"), &["x-session-destroy: true"])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().header("x-session"), Some("active"));
    assert_no_session_headers(&r);
    assert_eq!(pttl(&redis, &key).await, -2, "the key is gone");
    assert!(keys(&redis, "*").await.is_empty());
    assert_eq!(
        r.set_cookies_but_versions(),
        vec!["sid=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/; HttpOnly; SameSite=Lax"]
    );
    assert_eq!(
        r.headers.get("cache-control").map(|v| v.to_str().unwrap()),
        Some("no-store")
    );
    assert!(http.sid.is_none());

    // The old cookie, replayed, is no session.
    let r = get_with(&proxy.url("/"), &[("cookie", &format!("sid={cookie}"))]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert!(r.seen().fields().is_empty());
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert_eq!(
        proxy
            .metric("stickless_session_events_total{event=\"destroyed\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_moves_the_session_to_a_new_id() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();

    http.get_replying(
        &proxy.url("/"),
        &["x-session-set-user: alice", "x-session-set-cart: 3"],
    )
    .await;
    let old = http.sid.clone().unwrap();
    let old_key = key_of(&old);
    let old_hash = hgetall(&redis, &old_key).await;
    // Make sure a re-created session would get another `_created`.
    tokio::time::sleep(Duration::from_millis(20)).await;

    let r = http
        .get_replying(&proxy.url("/"), &["x-session-rotate: true"])
        .await;
    assert_eq!(r.status, 200);
    assert_no_session_headers(&r);
    let new = r.sid().expect("a new cookie");
    assert!(!new.is_empty());
    assert_ne!(id_of(&new), id_of(&old));
    assert_valid_id(id_of(&new));
    assert_eq!(
        r.set_cookies_but_versions(),
        vec![format!("sid={new}; Path=/; HttpOnly; SameSite=Lax")]
    );
    let new_key = key_of(&new);
    // The old key is a tombstone for the rotation grace (60 s by default): the old fields, marked.
    let mut tombstone = hgetall(&redis, &old_key).await;
    assert!(tombstone.remove("_rotated").is_some(), "{tombstone:?}");
    assert_eq!(tombstone, old_hash);
    let p = pttl(&redis, &old_key).await;
    assert!(p > 50_000 && p <= 60_000, "tombstone PTTL {p}");
    assert_eq!(
        hgetall(&redis, &new_key).await,
        old_hash,
        "fields and _created moved"
    );
    assert!(pttl(&redis, &new_key).await > 1_700_000);
    let mut all = keys(&redis, "*").await;
    all.sort();
    let mut expected = vec![new_key, old_key];
    expected.sort();
    assert_eq!(all, expected);

    let r = get_with(&proxy.url("/"), &[("cookie", &format!("sid={old}"))]).await;
    assert_eq!(r.seen().header("x-session"), Some("none"));
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.seen().header("x-session"), Some("active"));
    assert_eq!(r.seen().fields(), map(&[("user", "alice"), ("cart", "3")]));
    assert_eq!(
        proxy
            .metric("stickless_session_events_total{event=\"rotated\"}")
            .await,
        1.0
    );

    // Rotate alone without a session does nothing.
    let r = Http::new()
        .get_replying(&proxy.url("/"), &["x-session-rotate: true"])
        .await;
    assert_eq!(r.status, 200);
    assert!(r.set_cookies().is_empty());
    assert_eq!(
        keys(&redis, "*").await.len(),
        2,
        "the new key and the tombstone"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_and_set_in_one_response_is_a_login() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();

    // An anonymous session with a cart, then the login.
    http.get_replying(&proxy.url("/cart"), &["x-session-set-cart: 3"])
        .await;
    let anon = http.sid.clone().unwrap();
    let created = hgetall(&redis, &key_of(&anon)).await["_created"].clone();

    let r = http
        .get_replying(
            &proxy.url("/login"),
            &["x-session-rotate: true", "x-session-set-user: alice"],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_no_session_headers(&r);
    let cookies = r.set_cookies_but_versions();
    assert_eq!(cookies.len(), 1, "one cookie: {cookies:?}");
    let logged_in = r.sid().unwrap();
    assert_ne!(id_of(&logged_in), id_of(&anon));
    let tombstone = hgetall(&redis, &key_of(&anon)).await;
    assert!(
        tombstone.contains_key("_rotated") && !tombstone.contains_key("user"),
        "the old key is a tombstone without the login's fields: {tombstone:?}"
    );
    let stored = hgetall(&redis, &key_of(&logged_in)).await;
    assert_eq!(stored["_created"], created, "_created preserved");
    assert_eq!(
        without_internal(stored),
        map(&[("cart", "3"), ("user", "alice")])
    );
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.seen().fields(), map(&[("cart", "3"), ("user", "alice")]));

    // Rotate + Set with no session at all creates one.
    let r = Http::new()
        .get_replying(
            &proxy.url("/login"),
            &["x-session-rotate: true", "x-session-set-user: bob"],
        )
        .await;
    let bob = r.sid().expect("a session");
    assert_eq!(
        without_internal(hgetall(&redis, &key_of(&bob)).await),
        map(&[("user", "bob")])
    );
    assert_eq!(
        keys(&redis, "*").await.len(),
        3,
        "alice, bob and the tombstone"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn destroy_and_set_start_a_fresh_session() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();

    http.get_replying(
        &proxy.url("/"),
        &["x-session-set-user: alice", "x-session-set-cart: 3"],
    )
    .await;
    let old = http.sid.clone().unwrap();
    let old_created: u64 = hgetall(&redis, &key_of(&old)).await["_created"]
        .parse()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let r = http
        .get_replying(
            &proxy.url("/switch"),
            &["x-session-destroy: true", "x-session-set-user: bob"],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_no_session_headers(&r);
    let sids: Vec<String> = r
        .set_cookies_but_versions()
        .into_iter()
        .filter(|c| c.starts_with("sid="))
        .collect();
    assert_eq!(sids.len(), 1, "one session cookie: {sids:?}");
    let new = r.sid().unwrap();
    assert!(!new.is_empty(), "the new session's cookie, not a clear");
    assert_ne!(id_of(&new), id_of(&old));
    assert_eq!(pttl(&redis, &key_of(&old)).await, -2);
    let stored = hgetall(&redis, &key_of(&new)).await;
    let created: u64 = stored["_created"].parse().unwrap();
    assert!(
        created > old_created,
        "a new session, not the old one moved"
    );
    assert_eq!(without_internal(stored), map(&[("user", "bob")]));
    assert_eq!(keys(&redis, "*").await, vec![key_of(&new)]);
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.seen().fields(), map(&[("user", "bob")]));
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_apply_in_the_documented_order() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();

    http.get_replying(
        &proxy.url("/"),
        &["x-session-set-user: alice", "x-session-set-n: 5"],
    )
    .await;
    let key = key_of(http.sid.as_ref().unwrap());

    // Delete comes before Set (Set wins) and before Incr (the counter restarts).
    let r = http
        .get_replying(
            &proxy.url("/"),
            &[
                "x-session-set-user: bob",
                "x-session-delete: user, n",
                "x-session-incr-n: 1",
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        without_internal(hgetall(&redis, &key).await),
        map(&[("user", "bob"), ("n", "1")])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn protocol_headers_never_reach_the_client_and_backend_cookies_pass() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();

    let r = http
        .get_replying(
            &proxy.url("/"),
            &[
                "set-cookie: theme=dark; Path=/; Max-Age=3600",
                "x-session-set-user: alice",
                "x-session-incr-visits: 1",
                "x-session-delete: nothing",
                "x-session-rotate: false",
                "x-session-destroy: false",
                "x-session-field-user: echoed",
                "x-session: active",
                "set-cookie: lang=fr",
                "x-other: kept",
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_no_session_headers(&r);
    assert_eq!(r.headers["x-other"], "kept");
    let cookies = r.set_cookies_but_versions();
    let sid = r.sid().unwrap();
    assert_eq!(cookies.len(), 3, "{cookies:?}");
    assert!(cookies.contains(&"theme=dark; Path=/; Max-Age=3600".to_string()));
    assert!(cookies.contains(&"lang=fr".to_string()));
    assert!(cookies.contains(&format!("sid={sid}; Path=/; HttpOnly; SameSite=Lax")));
    // An echoed field header is not a change.
    assert_eq!(
        without_internal(hgetall(&redis, &key_of(&sid)).await),
        map(&[("user", "alice"), ("visits", "1")])
    );

    // Without session changes the backend's cookies still pass, and stickless adds none.
    let r = http
        .get_replying(&proxy.url("/"), &["set-cookie: theme=light"])
        .await;
    assert_eq!(r.set_cookies_but_versions(), vec!["theme=light"]);
    assert_no_session_headers(&r);

    // Beside a destroy too.
    let r = http
        .get_replying(
            &proxy.url("/"),
            &["set-cookie: theme=; Max-Age=0", "x-session-destroy: true"],
        )
        .await;
    let cookies = r.set_cookies_but_versions();
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    assert!(cookies.contains(&"theme=; Max-Age=0".to_string()));
    assert_eq!(r.sid().as_deref(), Some(""));
    assert_no_session_headers(&r);
}

// ---------------------------------------------------------------------------------------------
// Value codec and names
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn values_are_stored_decoded_and_sent_encoded() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();

    let encoded = "%2050%25 caf%C3%A9 %F0%9F%98%80%01%09%0D%0Aend%20";
    let decoded = " 50% café 😀\u{1}\t\r\nend ";
    let plain = r#"{"a":[1,2]} x=1&y=2 ~!@#$^*()"#;
    let r = http
        .get_replying(
            &proxy.url("/"),
            &[
                &format!("x-session-set-note: {encoded}"),
                &format!("x-session-set-plain: {plain}"),
                "x-session-set-lower: %c3%a9t%c3%a9",
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let key = key_of(http.sid.as_ref().unwrap());
    let stored = hgetall(&redis, &key).await;
    assert_eq!(stored["note"], decoded, "stored decoded");
    assert_eq!(stored["plain"], plain, "plain ASCII stored as is");
    assert_eq!(stored["lower"], "été");

    let r = http.get(&proxy.url("/")).await;
    let fields = r.seen().fields();
    assert_eq!(fields["note"], encoded, "sent to the backend encoded again");
    assert_eq!(fields["plain"], plain, "plain ASCII passes unchanged");
    assert_eq!(fields["lower"], "%C3%A9t%C3%A9");
}

#[tokio::test(flavor = "multi_thread")]
async fn field_names_are_lower_cased() {
    let redis = RedisServer::start();
    let raw = RawBackend::start().await;
    let proxy = Stickless::on_redis(&raw.url(), &redis, &[]);
    let mut http = Http::with_jar();

    // The backend writes these header names byte for byte, mixed case.
    let r = http
        .send(
            Method::GET,
            &proxy.url("/"),
            &[
                ("x-raw-reply", "X-Session-Set-UserName: Alice"),
                ("x-raw-reply", "X-SESSION-INCR-Visits: 2"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_no_session_headers(&r);
    let key = key_of(http.sid.as_ref().expect("a session"));
    assert_eq!(
        without_internal(hgetall(&redis, &key).await),
        map(&[("username", "Alice"), ("visits", "2")])
    );

    let r = http.get(&proxy.url("/")).await;
    let head = r.text();
    assert_eq!(raw_header(&head, "x-session"), vec!["active"]);
    assert_eq!(raw_header(&head, "x-session-field-username"), vec!["Alice"]);
    assert_eq!(raw_header(&head, "x-session-field-visits"), vec!["2"]);

    let r = http
        .send(
            Method::GET,
            &proxy.url("/"),
            &[("x-raw-reply", "X-Session-Delete: UserName")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        without_internal(hgetall(&redis, &key).await),
        map(&[("visits", "2")])
    );
}

// ---------------------------------------------------------------------------------------------
// Spoofing and cookies
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn client_sent_session_headers_are_stripped() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let spoofed = [
        ("X-Session", "active"),
        ("X-Session-Field-user", "admin"),
        ("X_Session_Field_user", "admin"),
        // CGI-style frameworks map every non-alphanumeric character to `_`.
        ("X.Session.Field.user", "admin"),
        ("x-session-set-role", "admin"),
        ("x-sessionfoo", "kept"),
    ];

    // Without a session.
    let r = get_with(&proxy.url("/"), &spoofed).await;
    assert_eq!(r.status, 200);
    let seen = r.seen();
    assert_eq!(
        session_like_headers(&seen),
        [
            ("x-session".to_string(), vec!["none".to_string()]),
            ("x-sessionfoo".to_string(), vec!["kept".to_string()]),
        ]
        .into()
    );
    assert_eq!(proxy.metric(SPOOFED).await, 5.0);
    assert!(keys(&redis, "*").await.is_empty());

    // With a session: only the real fields arrive.
    let mut http = Http::with_jar();
    http.get_replying(&proxy.url("/login"), &["x-session-set-user: alice"])
        .await;
    let r = http
        .send(Method::GET, &proxy.url("/"), &spoofed, Bytes::new())
        .await;
    let seen = r.seen();
    assert_eq!(
        session_like_headers(&seen),
        [
            ("x-session".to_string(), vec!["active".to_string()]),
            (
                "x-session-field-user".to_string(),
                vec!["alice".to_string()]
            ),
            ("x-sessionfoo".to_string(), vec!["kept".to_string()]),
        ]
        .into()
    );
    assert_eq!(proxy.metric(SPOOFED).await, 10.0);
    // The spoofed `set` header changed nothing either.
    assert_eq!(
        without_internal(hgetall(&redis, &key_of(http.sid.as_ref().unwrap())).await),
        map(&[("user", "alice")])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_rule_for_field_names_in_every_operation() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();
    let r = http
        .get_replying(
            &proxy.url("/"),
            &["x-session-set-my_field: 1", "x-session-incr-My.Count: 2"],
        )
        .await;
    assert_eq!(r.status, 200);
    let key = key_of(http.sid.as_ref().unwrap());
    assert_eq!(
        without_internal(hgetall(&redis, &key).await),
        map(&[("my-count", "2"), ("my-field", "1")])
    );
    // The name the backend set the field with deletes it, in either spelling.
    let r = http
        .get_replying(&proxy.url("/"), &["x-session-delete: my_field, my.count"])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(without_internal(hgetall(&redis, &key).await).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_cookie_is_removed_from_the_cookie_header() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);

    let r = Http::new()
        .get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    let sid = r.sid().unwrap();

    let r = get_with(
        &proxy.url("/"),
        &[("cookie", &format!("a=1; sid={sid}; b=2"))],
    )
    .await;
    let seen = r.seen();
    assert_eq!(seen.header("x-session"), Some("active"));
    assert_eq!(seen.headers["cookie"], vec!["a=1; b=2"]);
    assert!(
        !r.text().contains(&sid),
        "the cookie value reached the backend"
    );

    // Only the session cookie: no Cookie header at all.
    let r = get_with(&proxy.url("/"), &[("cookie", &format!("sid={sid}"))]).await;
    assert_eq!(r.seen().header("x-session"), Some("active"));
    assert!(r.seen().header("cookie").is_none());

    // Two Cookie headers.
    let r = get_with(
        &proxy.url("/"),
        &[("cookie", "a=1"), ("cookie", &format!("sid={sid}; b=2"))],
    )
    .await;
    let seen = r.seen();
    assert_eq!(seen.header("x-session"), Some("active"));
    assert_eq!(seen.headers["cookie"], vec!["a=1; b=2"]);
    assert!(!r.text().contains(&sid));
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_cookies_are_no_session_and_never_looked_up() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);

    let r = Http::new()
        .get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    let real = r.sid().unwrap();
    let (id, tag) = real.split_once('.').unwrap();
    let flip = |s: &str, i: usize| -> String {
        let mut b = s.as_bytes().to_vec();
        b[i] = if b[i] == b'A' { b'B' } else { b'A' };
        String::from_utf8(b).unwrap()
    };
    let other_key = "another-key-0123456789abcdef0123456789abcdef";
    let forged = [
        ("flipped tag char", format!("{id}.{}", flip(tag, 10))),
        ("flipped id char", format!("{}.{tag}", flip(id, 10))),
        (
            "signed with another key",
            format!("{id}.{}", tag_for(other_key, id)),
        ),
        ("garbage", "not-a-cookie!!".to_string()),
        ("empty", String::new()),
    ];
    assert_eq!(tag, tag_for(TEST_KEY, id));

    // A real lookup first, so that the load script is cached (its first EVALSHA gets NOSCRIPT
    // and is retried, which would count twice below).
    let r = get_with(&proxy.url("/"), &[("cookie", &format!("sid={real}"))]).await;
    assert_eq!(r.seen().header("x-session"), Some("active"));

    let invalid = proxy.metric(INVALID).await;
    let before = store_calls(&redis).await;
    assert!(before > 0, "the session's creation and load reached Redis");
    for (what, cookie) in &forged {
        let r = get_with(&proxy.url("/"), &[("cookie", &format!("sid={cookie}"))]).await;
        assert_eq!(r.status, 200, "{what}");
        assert_eq!(r.seen().header("x-session"), Some("none"), "{what}");
        assert!(r.seen().fields().is_empty(), "{what}");
        assert!(r.set_cookies().is_empty(), "{what}");
    }
    assert_eq!(
        proxy.metric(INVALID).await,
        invalid + forged.len() as f64,
        "every forged cookie is counted as invalid"
    );
    assert_eq!(
        store_calls(&redis).await,
        before,
        "a forged cookie is never looked up in Redis"
    );

    // A correctly signed cookie for an id that does not exist is looked up and is a miss.
    let unknown_id = URL_SAFE_NO_PAD.encode([7u8; 32]);
    let unknown = format!("{unknown_id}.{}", tag_for(TEST_KEY, &unknown_id));
    let miss = proxy.metric(MISS).await;
    let r = get_with(&proxy.url("/"), &[("cookie", &format!("sid={unknown}"))]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert_eq!(proxy.metric(MISS).await, miss + 1.0);
    assert_eq!(store_calls(&redis).await, before + 1, "one load");
    assert!(keys(&redis, &format!("*{unknown_id}*")).await.is_empty());

    // The real session is untouched.
    let r = get_with(&proxy.url("/"), &[("cookie", &format!("sid={real}"))]).await;
    assert_eq!(r.seen().fields(), map(&[("user", "alice")]));
}

#[tokio::test(flavor = "multi_thread")]
async fn key_rotation_verifies_old_cookies_and_signs_with_the_new_key() {
    const OLD: &str = "old-key-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const NEW: &str = "new-key-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let url = redis.url();
    let both = format!("{NEW},{OLD}");
    let old_only = Stickless::start(&backend.url(), &["--redis-url", &url, "--secret-keys", OLD]);
    let rotated = Stickless::start(
        &backend.url(),
        &["--redis-url", &url, "--secret-keys", &both],
    );
    let new_only = Stickless::start(&backend.url(), &["--redis-url", &url, "--secret-keys", NEW]);

    // A cookie issued under OLD is accepted by NEW,OLD.
    let r = Http::new()
        .get_replying(&old_only.url("/"), &["x-session-set-user: alice"])
        .await;
    let c1 = r.sid().unwrap();
    let (id1, tag1) = c1.split_once('.').unwrap();
    assert_eq!(tag1, tag_for(OLD, id1));
    let r = get_with(&rotated.url("/"), &[("cookie", &format!("sid={c1}"))]).await;
    assert_eq!(r.seen().header("x-session"), Some("active"));
    assert_eq!(r.seen().fields(), map(&[("user", "alice")]));

    // New sessions from NEW,OLD are signed with NEW ...
    let r = Http::new()
        .get_replying(&rotated.url("/"), &["x-session-set-user: bob"])
        .await;
    let c2 = r.sid().unwrap();
    let (id2, tag2) = c2.split_once('.').unwrap();
    assert_eq!(tag2, tag_for(NEW, id2), "the first key signs");
    let r = get_with(&rotated.url("/"), &[("cookie", &format!("sid={c2}"))]).await;
    assert_eq!(r.seen().fields(), map(&[("user", "bob")]));
    let r = get_with(&new_only.url("/"), &[("cookie", &format!("sid={c2}"))]).await;
    assert_eq!(r.seen().fields(), map(&[("user", "bob")]));

    // ... and so are not accepted by an instance that only has OLD.
    let r = get_with(&old_only.url("/"), &[("cookie", &format!("sid={c2}"))]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert_eq!(old_only.metric(INVALID).await, 1.0);
    // Once OLD is dropped, its cookies are no longer accepted.
    let r = get_with(&new_only.url("/"), &[("cookie", &format!("sid={c1}"))]).await;
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert_eq!(new_only.metric(INVALID).await, 1.0);

    // Both sessions are still in Redis.
    assert_eq!(keys(&redis, "*").await.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Limits and protocol errors
// ---------------------------------------------------------------------------------------------

/// Sends a request whose backend response must be refused: 502 with a short text body, no session
/// header or cookie to the client, nothing changed in Redis, one more protocol error counted.
async fn assert_refused(
    proxy: &Stickless,
    redis: &RedisServer,
    http: &mut Http,
    replies: &[String],
    what: &str,
) {
    let before = snapshot(redis).await;
    let errors = proxy.metric(PROTOCOL_ERRORS).await;
    let replies: Vec<&str> = replies.iter().map(String::as_str).collect();
    let r = http.get_replying(&proxy.url("/change"), &replies).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{what}: {}", r.text());
    let ct = r.headers.get("content-type").map(|v| v.to_str().unwrap());
    assert!(
        ct.is_some_and(|c| c.starts_with("text/plain")),
        "{what}: {ct:?}"
    );
    let body = r.text();
    assert!(
        !body.trim().is_empty() && body.len() < 200,
        "{what}: short body, got {body:?}"
    );
    assert!(
        !body.contains("x-test-reply"),
        "{what}: backend body leaked"
    );
    assert_no_session_headers(&r);
    assert!(r.set_cookies().is_empty(), "{what}: {:?}", r.set_cookies());
    assert_eq!(snapshot(redis).await, before, "{what}: Redis changed");
    assert_eq!(
        proxy.metric(PROTOCOL_ERRORS).await,
        errors + 1.0,
        "{what}: protocol_error counted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_breaking_the_protocol_are_502_and_store_nothing() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();
    http.get_replying(
        &proxy.url("/"),
        &["x-session-set-user: alice", "x-session-incr-visits: 1"],
    )
    .await;
    let cookie = http.sid.clone().unwrap();
    let ok = || "x-session-set-ok: 1".to_string();

    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "65 Set headers",
            (0..65).map(|i| format!("x-session-set-f{i}: 1")).collect(),
        ),
        (
            "63 new fields beside 2 stored (65 > 64)",
            (0..63).map(|i| format!("x-session-set-f{i}: 1")).collect(),
        ),
        (
            "Rotate with too many fields (a rotation is never half done)",
            std::iter::once("x-session-rotate: true".to_string())
                .chain((0..63).map(|i| format!("x-session-set-f{i}: 1")))
                .collect(),
        ),
        (
            "Rotate with Incr of a non-integer field",
            vec![
                "x-session-rotate: true".into(),
                "x-session-incr-user: 1".into(),
            ],
        ),
        (
            "a 4097-byte value",
            vec![format!("x-session-set-big: {}", "x".repeat(4097)), ok()],
        ),
        (
            "Incr of a non-integer field",
            vec!["x-session-incr-user: 1".into(), ok()],
        ),
        (
            "a non-integer increment",
            vec!["x-session-incr-visits: abc".into(), ok()],
        ),
        (
            "a field name longer than 64",
            vec![format!("x-session-set-{}: v", "a".repeat(65)), ok()],
        ),
        (
            "Destroy: maybe",
            vec!["x-session-destroy: maybe".into(), ok()],
        ),
        (
            "Rotate: maybe",
            vec!["x-session-rotate: maybe".into(), ok()],
        ),
        (
            "an unknown operation",
            vec!["x-session-frobnicate: 1".into(), ok()],
        ),
        (
            "a bad escape",
            vec!["x-session-set-note: 100%".into(), ok()],
        ),
        (
            "escaped bytes that are not UTF-8",
            vec!["x-session-set-note: %FF".into(), ok()],
        ),
        (
            "Set and Incr of one field",
            vec![
                "x-session-set-visits: 5".into(),
                "x-session-incr-visits: 1".into(),
            ],
        ),
    ];
    for (what, replies) in &cases {
        assert_refused(&proxy, &redis, &mut http, replies, what).await;
        assert_eq!(http.sid.as_ref(), Some(&cookie), "{what}: cookie kept");
    }
    assert_eq!(
        without_internal(hgetall(&redis, &key_of(&cookie)).await),
        map(&[("user", "alice"), ("visits", "1")])
    );

    // Without a session, a refused response creates none.
    let mut anon = Http::with_jar();
    let too_many: Vec<String> = (0..65).map(|i| format!("x-session-set-f{i}: 1")).collect();
    assert_refused(&proxy, &redis, &mut anon, &too_many, "65 Sets, no session").await;
    assert!(anon.sid.is_none());
    assert_eq!(keys(&redis, "*").await.len(), 1);

    // The limits themselves are allowed.
    let r = http
        .get_replying(
            &proxy.url("/"),
            &[&format!("x-session-set-big: {}", "x".repeat(4096))],
        )
        .await;
    assert_eq!(r.status, 200, "a 4096-byte value is within the limit");
    assert_eq!(hgetall(&redis, &key_of(&cookie)).await["big"].len(), 4096);
    let sixty_four: Vec<String> = (0..64).map(|i| format!("x-session-set-f{i}: 1")).collect();
    let sixty_four: Vec<&str> = sixty_four.iter().map(String::as_str).collect();
    let r = anon.get_replying(&proxy.url("/"), &sixty_four).await;
    assert_eq!(r.status, 200, "64 fields are within the limit");
    let stored = hgetall(&redis, &key_of(anon.sid.as_ref().unwrap())).await;
    assert_eq!(without_internal(stored).len(), 64);
}

#[tokio::test(flavor = "multi_thread")]
async fn session_size_limit_is_enforced() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(
        &backend.url(),
        &redis,
        &["--max-value-bytes", "150", "--max-session-bytes", "200"],
    );
    let mut http = Http::with_jar();
    // user + alice = 9 bytes.
    http.get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    let key = key_of(http.sid.as_ref().unwrap());

    // 9 + (1 + 100) + (1 + 100) = 211 > 200, though each value is within 150.
    let over = vec![
        format!("x-session-set-a: {}", "x".repeat(100)),
        format!("x-session-set-b: {}", "y".repeat(100)),
    ];
    assert_refused(&proxy, &redis, &mut http, &over, "a 211-byte session").await;
    let value = vec![format!("x-session-set-a: {}", "x".repeat(151))];
    assert_refused(&proxy, &redis, &mut http, &value, "a 151-byte value").await;
    // A new session that would be too large from the start is not created either.
    let mut anon = Http::with_jar();
    assert_refused(&proxy, &redis, &mut anon, &over, "a new 202-byte session").await;
    assert!(anon.sid.is_none());

    // Exactly 200 bytes fit: 9 + 101 + 90.
    let r = http
        .get_replying(
            &proxy.url("/"),
            &[
                &format!("x-session-set-a: {}", "x".repeat(100)),
                &format!("x-session-set-b: {}", "y".repeat(89)),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let stored = without_internal(hgetall(&redis, &key).await);
    assert_eq!(
        stored.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>(),
        200
    );
    // And a 2-byte field more does not (c = 1: 202 bytes).
    assert_refused(
        &proxy,
        &redis,
        &mut http,
        &["x-session-incr-c: 1".to_string()],
        "a session of 202 bytes",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Forwarding and flags
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_are_set() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);

    let r = get_with(&proxy.url("/"), &[]).await;
    let seen = r.seen();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    let host = proxy.addr.to_string();
    assert_eq!(seen.header("host"), Some(host.as_str()));
    assert_eq!(seen.header("x-forwarded-host"), Some(host.as_str()));

    let r = get_with(
        &proxy.url("/"),
        &[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example"),
            ("x-test-reply", "x-session-set-user: alice"),
        ],
    )
    .await;
    let seen = r.seen();
    assert_eq!(
        seen.headers["x-forwarded-for"],
        vec!["203.0.113.7, 127.0.0.1"]
    );
    assert_eq!(seen.headers["x-forwarded-proto"], vec!["https"]);
    assert_eq!(seen.headers["x-forwarded-host"], vec!["shop.example"]);
    let sid = r.sid().unwrap();
    assert_eq!(
        r.set_cookies_but_versions(),
        vec![format!("sid={sid}; Path=/; Secure; HttpOnly; SameSite=Lax")],
        "X-Forwarded-Proto: https makes the cookie Secure"
    );
    let r = get_with(
        &proxy.url("/"),
        &[
            ("cookie", &format!("sid={sid}")),
            ("x-forwarded-proto", "https"),
            ("x-test-reply", "x-session-destroy: true"),
        ],
    )
    .await;
    assert_eq!(
        r.set_cookies_but_versions(),
        vec!["sid=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/; Secure; HttpOnly; SameSite=Lax"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_are_not_forwarded() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);

    let r = get_with(
        &proxy.url("/"),
        &[
            ("connection", "x-foo"),
            ("x-foo", "private"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "1"),
            ("x-test-reply", "connection: x-bar"),
            ("x-test-reply", "x-bar: private"),
            ("x-test-reply", "x-also-kept: 1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = r.seen();
    for h in [
        "connection",
        "x-foo",
        "keep-alive",
        "te",
        "proxy-connection",
    ] {
        assert!(
            seen.header(h).is_none(),
            "{h} forwarded: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.header("x-kept"), Some("1"));
    assert!(r.headers.get("x-bar").is_none(), "{:?}", r.headers);
    assert_eq!(r.headers["x-also-kept"], "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn cookie_flags_are_reflected_in_set_cookie() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(
        &backend.url(),
        &redis,
        &[
            "--cookie-secure",
            "true",
            "--cookie-same-site",
            "strict",
            "--cookie-domain",
            "example.com",
            "--cookie-path",
            "/app",
            "--cookie-name",
            "app_sid",
        ],
    );
    let attrs = "Path=/app; Domain=example.com; Secure; HttpOnly; SameSite=Strict";

    let r = get_with(
        &proxy.url("/app/login"),
        &[("x-test-reply", "x-session-set-user: alice")],
    )
    .await;
    assert_eq!(r.status, 200);
    let cookies = r.set_cookies_but_versions();
    let value = cookie_value(&cookies, "app_sid").expect("the app_sid cookie");
    assert_eq!(cookies, vec![format!("app_sid={value}; {attrs}")]);
    assert_eq!(
        without_internal(hgetall(&redis, &key_of(&value)).await),
        map(&[("user", "alice")])
    );

    // The configured name is the session cookie; a `sid` cookie is just another cookie.
    let r = get_with(
        &proxy.url("/app/"),
        &[("cookie", &format!("app_sid={value}; sid=decoy"))],
    )
    .await;
    let seen = r.seen();
    assert_eq!(seen.header("x-session"), Some("active"));
    assert_eq!(seen.fields(), map(&[("user", "alice")]));
    assert_eq!(seen.header("cookie"), Some("sid=decoy"));

    let r = get_with(
        &proxy.url("/app/logout"),
        &[
            ("cookie", &format!("app_sid={value}")),
            ("x-test-reply", "x-session-destroy: true"),
        ],
    )
    .await;
    assert_eq!(
        r.set_cookies_but_versions(),
        vec![format!(
            "app_sid=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; {attrs}"
        )]
    );
    assert!(keys(&redis, "*").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn header_prefix_switches_every_header_name() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &["--header-prefix", "x-app-"]);
    let mut http = Http::with_jar();

    let r = http
        .send(
            Method::GET,
            &proxy.url("/"),
            &[
                ("x-app-field-user", "admin"),
                ("x-session-field-user", "not-ours"),
                ("x-test-reply", "x-app-set-user: alice"),
                ("x-test-reply", "x-app-incr-n: 2"),
                ("x-test-reply", "x-session-set-other: 1"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = r.seen();
    assert_eq!(seen.headers["x-app"], vec!["none"]);
    assert!(seen.header("x-app-field-user").is_none(), "spoof stripped");
    assert_eq!(
        seen.header("x-session-field-user"),
        Some("not-ours"),
        "x-session-* is no longer the protocol"
    );
    assert!(seen.header("x-session").is_none());
    assert_eq!(proxy.metric(SPOOFED).await, 1.0);
    assert!(protocol_header_names(&r.headers, "x-app-").is_empty());
    assert_eq!(
        r.headers["x-session-set-other"], "1",
        "an x-session-* response header is not ours: passed on"
    );
    let key = key_of(http.sid.as_ref().expect("a session"));
    assert_eq!(
        without_internal(hgetall(&redis, &key).await),
        map(&[("user", "alice"), ("n", "2")])
    );

    let r = http.get(&proxy.url("/")).await;
    let seen = r.seen();
    assert_eq!(seen.headers["x-app"], vec!["active"]);
    assert_eq!(seen.header("x-app-field-user"), Some("alice"));
    assert_eq!(seen.header("x-app-field-n"), Some("2"));
    assert!(session_like_headers(&seen).is_empty(), "{:?}", seen.headers);

    let r = http
        .get_replying(&proxy.url("/"), &["x-app-delete: n", "x-app-rotate: true"])
        .await;
    assert_eq!(r.status, 200);
    let new_key = key_of(http.sid.as_ref().unwrap());
    assert_ne!(new_key, key);
    assert_eq!(
        without_internal(hgetall(&redis, &new_key).await),
        map(&[("user", "alice")])
    );
    let r = http
        .get_replying(&proxy.url("/"), &["x-app-destroy: true"])
        .await;
    assert_eq!(r.sid().as_deref(), Some(""));
    assert_eq!(
        keys(&redis, "*").await,
        vec![key],
        "only the rotation's tombstone is left"
    );
    let r = http
        .get_replying(&proxy.url("/"), &["x-app-frobnicate: 1"])
        .await;
    assert_eq!(r.status, 502);
}

// ---------------------------------------------------------------------------------------------
// Bodies and HTTP/2
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn bodies_stream_through() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::new();

    let body: Bytes = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect::<Vec<u8>>()
        .into();
    let r = http
        .send(Method::POST, &proxy.url("/echo-body"), &[], body.clone())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body, "the echoed body differs");

    let r = http.get(&proxy.url("/stream/5")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_prior_knowledge_works() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let send = |req: Request<Full<Bytes>>| {
        let client = client.clone();
        async move {
            let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
                .await
                .expect("response within 30 s")
                .expect("h2c response");
            let (parts, body) = resp.into_parts();
            let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
                .await
                .expect("body within 30 s")
                .expect("body")
                .to_bytes();
            (parts, body)
        }
    };

    let req = Request::get(proxy.url("/login"))
        .header("x-test-reply", "x-session-set-user: alice")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (parts, body) = send(req).await;
    assert_eq!(parts.version, Version::HTTP_2);
    assert_eq!(parts.status, 200);
    let seen: Seen = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen.header("x-session"), Some("none"));
    let host = proxy.addr.to_string();
    assert_eq!(seen.header("host"), Some(host.as_str()));
    let set_cookie = parts.headers["set-cookie"].to_str().unwrap().to_owned();
    let sid = cookie_value(&[set_cookie], "sid").unwrap();
    assert!(protocol_header_names(&parts.headers, "x-session-").is_empty());
    assert_eq!(
        without_internal(hgetall(&redis, &key_of(&sid)).await),
        map(&[("user", "alice")])
    );

    let req = Request::get(proxy.url("/"))
        .header("cookie", format!("a=1; sid={sid}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (parts, body) = send(req).await;
    assert_eq!(parts.version, Version::HTTP_2);
    let seen: Seen = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen.header("x-session"), Some("active"));
    assert_eq!(seen.fields(), map(&[("user", "alice")]));
    assert_eq!(seen.header("cookie"), Some("a=1"));

    let payload = Bytes::from(vec![b'z'; 1024 * 1024]);
    let req = Request::post(proxy.url("/echo-body"))
        .body(Full::new(payload.clone()))
        .unwrap();
    let (parts, body) = send(req).await;
    assert_eq!(parts.status, 200);
    assert!(body == payload, "h2 body echoed");

    let req = Request::get(proxy.url("/stream/3"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (_, body) = send(req).await;
    assert_eq!(&body[..], b"chunk 0\nchunk 1\nchunk 2\n");
}

// ---------------------------------------------------------------------------------------------
// Admin
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_and_no_secrets_in_metrics_or_logs() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut admin = Http::new();

    let r = admin.get(&proxy.admin_url("/healthz")).await;
    assert_eq!(r.status, 200);
    let r = admin.get(&proxy.admin_url("/readyz")).await;
    assert_eq!(r.status, 200);

    // Create, use, spoof, break the protocol with the secret in a value, forge, rotate.
    let secret = "s3cr3t-Value-42";
    let mut http = Http::with_jar();
    http.get_replying(
        &proxy.url("/login"),
        &[&format!("x-session-set-token: {secret}")],
    )
    .await;
    let first = http.sid.clone().unwrap();
    let r = http
        .send(
            Method::GET,
            &proxy.url("/"),
            &[("x-session-field-token", secret)],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.seen().fields()["token"], secret);
    let r = http
        .get_replying(&proxy.url("/"), &[&format!("x-session-destroy: {secret}")])
        .await;
    assert_eq!(r.status, 502);
    let r = http
        .get_replying(&proxy.url("/"), &[&format!("x-session-incr-n: {secret}")])
        .await;
    assert_eq!(r.status, 502);
    let (id, tag) = first.split_once('.').unwrap();
    let forged = format!(
        "{id}.{}",
        tag_for("yet-another-key-0123456789abcdef0123456789", id)
    );
    get_with(&proxy.url("/"), &[("cookie", &format!("sid={forged}"))]).await;
    http.get_replying(&proxy.url("/"), &["x-session-rotate: true"])
        .await;
    let second = http.sid.clone().unwrap();
    assert_ne!(second, first);
    http.get(&proxy.url("/")).await;

    let metrics = admin.get(&proxy.admin_url("/metrics")).await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    for family in [
        "stickless_request_duration_seconds",
        "stickless_upstream_duration_seconds",
        "stickless_store_duration_seconds",
        "stickless_session_lookups_total",
        "stickless_session_events_total",
    ] {
        assert!(text.contains(family), "missing {family} in\n{text}");
    }
    // Let the warnings reach the log before looking for what must not be there.
    wait_for("the warnings in the log", Duration::from_secs(10), || {
        let logs = proxy.logs();
        (logs.contains("broke the session protocol")
            && logs.contains("failed verification")
            && logs.contains("removed client headers"))
        .then_some(())
    });
    let logs = proxy.logs();
    let (id2, tag2) = second.split_once('.').unwrap();
    for needle in [secret, id, tag, &first, &forged, id2, tag2, TEST_KEY] {
        assert!(!text.contains(needle), "{needle} in /metrics");
        assert!(!logs.contains(needle), "{needle} in the logs:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_header_cannot_remove_injected_session_headers() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
    let mut http = Http::with_jar();
    http.get_replying(
        &proxy.url("/login"),
        &[
            "x-session-set-user: alice",
            "x-session-set-mfa-pending: yes",
        ],
    )
    .await;
    // Hop-by-hop headers named by the client are removed before the session headers go in.
    let r = http
        .send(
            Method::GET,
            &proxy.url("/"),
            &[(
                "connection",
                "x-session-field-mfa-pending, x-session, keep-alive",
            )],
            Bytes::new(),
        )
        .await;
    let seen = r.seen();
    assert_eq!(seen.header("x-session"), Some("active"));
    assert_eq!(
        seen.fields().get("mfa-pending").map(String::as_str),
        Some("yes")
    );
    assert_eq!(seen.fields().get("user").map(String::as_str), Some("alice"));
}

#[tokio::test(flavor = "multi_thread")]
async fn session_headers_sent_as_trailers_are_removed() {
    type Boxed = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;
    // A backend that reports the request trailers it received, and sends a trailer of its own.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(stickless::server::serve_http(
        listener,
        |req: Request<hyper::body::Incoming>, _| async move {
            let collected = req.into_body().collect().await.unwrap();
            let names: Vec<String> = collected
                .trailers()
                .map(|t| t.keys().map(|k| k.as_str().to_owned()).collect())
                .unwrap_or_default();
            let mut trailers = HeaderMap::new();
            trailers.insert("x-session-set-role", "admin".parse().unwrap());
            trailers.insert("x-checksum", "abc".parse().unwrap());
            let body: Boxed = Full::new(Bytes::from(names.join(",")))
                .with_trailers(async move { Some(Ok(trailers)) })
                .boxed();
            http::Response::new(body)
        },
        async {
            let _ = stopped.await;
        },
    ));
    let proxy = Stickless::start(&format!("http://{addr}"), &[]);
    let client: Client<HttpConnector, Boxed> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut trailers = HeaderMap::new();
    trailers.insert("x-session-field-user", "admin".parse().unwrap());
    trailers.insert("x_session", "active".parse().unwrap());
    trailers.insert("x-upload-md5", "ok".parse().unwrap());
    // A body of unknown length, so that it is sent chunked to the backend, trailers included.
    let (mut tx, channel) =
        http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(2);
    tokio::spawn(async move {
        let _ = tx.send_data(Bytes::from_static(b"payload")).await;
        let _ = tx.send_trailers(trailers).await;
    });
    let body: Boxed = channel.boxed();
    let req = Request::post(proxy.url("/"))
        .header("trailer", "x-session-field-user, x_session, x-upload-md5")
        .body(body)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.unwrap();
    let back = collected.trailers().cloned().unwrap_or_default();
    // (An HTTP/1.1 backend sends trailers only to a client that asks with `TE: trailers`, which
    // is hop-by-hop; whatever arrives, no session operation reaches the client.)
    assert!(
        back.get("x-session-set-role").is_none(),
        "a backend trailer reached the client"
    );
    let received = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
    assert_eq!(
        received, "x-upload-md5",
        "the backend got only the harmless trailer"
    );
    let _ = stop.send(());
}

// ---------------------------------------------------------------------------------------------
// Requests still carrying the cookie from before a login
// ---------------------------------------------------------------------------------------------

const DROPPED: &str = "stickless_session_events_total{event=\"dropped\"}";
const GRACE: Duration = Duration::from_secs(1);

/// A page's requests that were sent with the cookie from before the login (A) while the login
/// rotated it to B. They must not replace B's cookie in the browser, nor see B's fields; once the
/// grace period is over, A is simply unknown. Only HTTP is used, so this runs on both stores.
async fn old_cookie_after_a_login(proxy: &Stickless, redis: Option<&RedisServer>) {
    let mut http = Http::with_jar();
    http.get_replying(&proxy.url("/cart"), &["x-session-set-cart: 3"])
        .await;
    let a = http.sid.clone().expect("a session");
    let r = http
        .get_replying(
            &proxy.url("/login"),
            &["x-session-rotate: true", "x-session-set-user: alice"],
        )
        .await;
    let b = r.sid().expect("the login sets a new cookie");
    assert_ne!(id_of(&a), id_of(&b));
    let rotated_at = std::time::Instant::now();
    let b_fields = map(&[("cart", "3"), ("user", "alice")]);
    let old = || {
        let mut h = Http::new();
        h.sid = Some(a.clone());
        h.keep_cookies = true;
        h
    };

    // The old cookie's requests: every change dropped, no cookie, no fields.
    let dropped = proxy.metric(DROPPED).await;
    for replies in [
        &["x-session-set-x: 1"][..],
        &["x-session-incr-n: 1"],
        &["x-session-delete: cart"],
        &["x-session-rotate: true", "x-session-set-user: mallory"],
    ] {
        let r = old().get_replying(&proxy.url("/"), replies).await;
        assert_eq!(r.status, 200, "{replies:?}: {}", r.text());
        assert!(
            r.set_cookies().is_empty(),
            "{replies:?}: a request with the pre-login cookie replaced the login's cookie: {:?}",
            r.set_cookies()
        );
        assert_eq!(r.seen().header("x-session"), Some("none"), "{replies:?}");
        assert!(r.seen().fields().is_empty(), "{replies:?}");
        assert!(
            rotated_at.elapsed() < GRACE,
            "test design: the grace ran out"
        );
    }
    assert_eq!(proxy.metric(DROPPED).await, dropped + 4.0);
    // A logout with the old cookie still clears the cookie.
    let r = old()
        .get_replying(&proxy.url("/logout"), &["x-session-destroy: true"])
        .await;
    assert_eq!(r.sid().as_deref(), Some(""), "Destroy clears the cookie");

    // B is untouched.
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.seen().header("x-session"), Some("active"));
    assert_eq!(r.seen().fields(), b_fields);
    if let Some(redis) = redis {
        let stored = hgetall(redis, &key_of(&a)).await;
        assert!(
            !stored.contains_key("user") && !stored.contains_key("x"),
            "the old key never holds the login's fields: {stored:?}"
        );
    }

    // After the grace, the old cookie is an unknown session: a Set starts a new one.
    let started = std::time::Instant::now();
    let fresh = loop {
        let r = old()
            .get_replying(&proxy.url("/"), &["x-session-set-x: 1"])
            .await;
        assert_eq!(r.seen().header("x-session"), Some("none"));
        if let Some(c) = r.sid() {
            break c;
        }
        assert!(
            started.elapsed() < GRACE + Duration::from_secs(5),
            "the old cookie still counts as rotated {:?} after the login",
            rotated_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        rotated_at.elapsed() >= GRACE - Duration::from_millis(100),
        "the grace ended after {:?}",
        rotated_at.elapsed()
    );
    assert_ne!(id_of(&fresh), id_of(&a));
    assert_ne!(id_of(&fresh), id_of(&b));
    let r = http.get(&proxy.url("/")).await;
    assert_eq!(r.seen().fields(), b_fields, "B is still untouched");
    if let Some(redis) = redis {
        assert_eq!(pttl(redis, &key_of(&a)).await, -2, "the tombstone expired");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pre_login_cookie_never_replaces_the_login_on_redis() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(
        &backend.url(),
        &redis,
        &["--rotation-grace", "1s", "--redis-timeout", "300ms"],
    );
    old_cookie_after_a_login(&proxy, Some(&redis)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pre_login_cookie_never_replaces_the_login_on_the_embedded_store() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(&backend.url(), &["--rotation-grace", "1s"]);
    old_cookie_after_a_login(&proxy, None).await;
}

/// Key rotation as the README describes it. With `--secret-keys NEW,OLD`, a cookie OLD signed
/// keeps its session and is not reissued by requests that use it; a rotation (login) signs with
/// NEW. Once OLD is dropped, the cookies it signed are no session, however recently used.
#[tokio::test(flavor = "multi_thread")]
async fn secret_key_rotation_signs_with_the_first_key_and_verifies_with_all() {
    let old = "old-key-0123456789abcdef0123456789abcdef";
    let new = "new-key-0123456789abcdef0123456789abcdef";
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let with_keys = |keys: &str| {
        Stickless::start(
            &backend.url(),
            &["--redis-url", &redis.url(), "--secret-keys", keys],
        )
    };

    // Two users log in while OLD is the only key.
    let proxy = with_keys(old);
    let mut stays = Http::with_jar();
    let mut logs_in_again = Http::with_jar();
    for (http, user) in [(&mut stays, "alice"), (&mut logs_in_again, "bob")] {
        let r = http
            .get_replying(&proxy.url("/"), &[&format!("x-session-set-user: {user}")])
            .await;
        let cookie = r.sid().expect("a session cookie");
        let (id, tag) = cookie.split_once('.').unwrap();
        assert_eq!(tag, tag_for(old, id));
    }
    drop(proxy);

    // NEW first, OLD after it: both sessions go on, and no cookie is reissued.
    let proxy = with_keys(&format!("{new},{old}"));
    for (http, user) in [(&mut stays, "alice"), (&mut logs_in_again, "bob")] {
        let r = http
            .get_replying(&proxy.url("/"), &["x-session-incr-visits: 1"])
            .await;
        assert_eq!(r.seen().fields(), map(&[("user", user)]), "{user}");
        assert!(
            r.set_cookies_but_versions().is_empty(),
            "{user}'s cookie is kept"
        );
    }
    // A login rotates the session: the new cookie is signed with NEW.
    let r = logs_in_again
        .get_replying(&proxy.url("/login"), &["x-session-rotate: true"])
        .await;
    let cookie = r.sid().expect("the rotation reissues the cookie");
    let (id, tag) = cookie.split_once('.').unwrap();
    assert_eq!(tag, tag_for(new, id));
    drop(proxy);

    // OLD dropped: the rotated session goes on; the one still under OLD's cookie is over.
    let proxy = with_keys(new);
    let r = logs_in_again.get(&proxy.url("/")).await;
    assert_eq!(r.seen().header("x-session"), Some("active"));
    assert_eq!(r.seen().fields(), map(&[("user", "bob"), ("visits", "1")]));
    let r = stays.get(&proxy.url("/")).await;
    assert_eq!(r.seen().header("x-session"), Some("none"));
    assert!(r.seen().fields().is_empty());
    assert_eq!(
        proxy
            .metric("stickless_session_lookups_total{result=\"invalid\"}")
            .await,
        1.0
    );
}
