//! Logs and request ids, end to end: a whole protocol run through the real binary on Redis, in
//! both log formats and at `RUST_LOG=debug`, after which nothing the process wrote may hold a
//! session id, a cookie, a signature, a field value or a query; one access line per request with
//! the right fields; and `X-Request-Id` kept, replaced or generated, both ways and on stickless's
//! own error responses.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The fields every access line has, in both formats (`backend_ms` only once forwarded).
const ACCESS_FIELDS: [&str; 12] = [
    "peer",
    "method",
    "path",
    "version",
    "status",
    "head_ms",
    "duration_ms",
    "bytes",
    "outcome",
    "session",
    "request_id",
    "backend_ms",
];

/// One access line's fields, as text.
type Access = BTreeMap<String, String>;

/// The access lines of `logs`, in either format.
fn access_lines(logs: &str) -> Vec<Access> {
    logs.lines()
        .filter_map(|line| {
            if let Ok(serde_json::Value::Object(o)) = serde_json::from_str(line) {
                if o.get("target")?.as_str()? != "stickless::access" {
                    return None;
                }
                return Some(
                    o.iter()
                        .map(|(k, v)| {
                            let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                            (k.clone(), v)
                        })
                        .collect(),
                );
            }
            let (_, fields) = line.split_once(" stickless::access: request ")?;
            Some(
                fields
                    .split_whitespace()
                    .filter_map(|f| f.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            )
        })
        .collect()
}

/// The access line of the request with `id`, once it is written (when its body is done).
fn access_line(proxy: &Stickless, id: &str) -> Access {
    wait_for(
        &format!("the access line of {id}"),
        Duration::from_secs(10),
        || {
            let mut lines = access_lines(&proxy.logs());
            lines.retain(|l| l.get("request_id").map(String::as_str) == Some(id));
            assert!(lines.len() <= 1, "one line per request: {lines:?}");
            lines.pop()
        },
    )
}

/// The request header that names a request, so that its access line can be found.
fn named(id: &str) -> (&'static str, &str) {
    ("x-request-id", id)
}

/// What a request of the run should leave in the access log.
struct Expected {
    id: &'static str,
    method: &'static str,
    path: &'static str,
    status: u16,
    session: &'static str,
}

/// Everything a run used that must never be logged, and the access lines it expects.
struct Used {
    secrets: Vec<String>,
    expected: Vec<Expected>,
}

/// The protocol run: a login that starts a session, a second login that rotates it, reads, an
/// increment, a delete, the old cookie after the rotation, a forged cookie made from the real id,
/// spoofed session headers, a query holding a token, a protocol error, a logout, and the cookie
/// after the logout.
async fn protocol_run(proxy: &Stickless) -> Used {
    const NAME: &str = "Zelda-Pennywhistle-4417";
    const ROLE: &str = "role-quartermaster-9931";
    const TOKEN: &str = "csrf-gT7qLm2Vx9";
    const COUNT: &str = "8052938471";
    const QUERY: &str = "qtok-Wz83HfPq01";
    const SPOOF: &str = "spoofed-admin-7730";
    const NOT_A_NUMBER: &str = "twelve-Kq7RbbZ";
    let mut secrets: Vec<String> = [
        NAME,
        ROLE,
        TOKEN,
        COUNT,
        QUERY,
        SPOOF,
        NOT_A_NUMBER,
        TEST_KEY,
    ]
    .map(str::to_owned)
    .to_vec();
    let mut expected = Vec::new();
    let mut expect = |id, method, path, status, session| {
        expected.push(Expected {
            id,
            method,
            path,
            status,
            session,
        })
    };
    let mut http = Http::with_jar();
    let get = Method::GET;

    let r = http
        .send(
            get.clone(),
            &proxy.url("/login"),
            &[
                named("run-01"),
                ("x-test-reply", &format!("x-session-set-user: {NAME}")),
                ("x-test-reply", "x-session-rotate: true"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    let first = http.sid.clone().expect("a session");
    expect("run-01", "GET", "/login", 200, "created");

    let r = http
        .send(
            Method::POST,
            &proxy.url("/login/again"),
            &[
                named("run-02"),
                ("x-test-reply", "x-session-rotate: true"),
                ("x-test-reply", &format!("x-session-set-role: {ROLE}")),
                ("x-test-reply", &format!("x-session-set-csrf: {TOKEN}")),
            ],
            Bytes::from_static(b"user=zelda&password=hunter2"),
        )
        .await;
    assert_eq!(r.status, 200);
    let second = http.sid.clone().expect("a session");
    assert_ne!(first, second, "rotated");
    expect("run-02", "POST", "/login/again", 200, "rotated");

    let r = http
        .send(
            get.clone(),
            &proxy.url("/"),
            &[named("run-03")],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        r.seen().fields().get("user").map(String::as_str),
        Some(NAME)
    );
    expect("run-03", "GET", "/", 200, "active");

    let r = http
        .send(
            get.clone(),
            &proxy.url("/count"),
            &[
                named("run-04"),
                ("x-test-reply", &format!("x-session-incr-visits: {COUNT}")),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    expect("run-04", "GET", "/count", 200, "active");

    let r = http
        .send(
            get.clone(),
            &proxy.url("/count"),
            &[named("run-05"), ("x-test-reply", "x-session-delete: csrf")],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        r.seen().fields().get("visits").map(String::as_str),
        Some(COUNT)
    );
    expect("run-05", "GET", "/count", 200, "active");

    let r = http
        .send(
            get.clone(),
            &proxy.url(&format!("/search?access_token={QUERY}&q=x")),
            &[named("run-06"), ("x-session-field-user", SPOOF)],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        r.seen().fields().get("user").map(String::as_str),
        Some(NAME)
    );
    expect("run-06", "GET", "/search", 200, "active");

    let r = http
        .send(
            get.clone(),
            &proxy.url("/count"),
            &[
                named("run-07"),
                (
                    "x-test-reply",
                    &format!("x-session-incr-visits: {NOT_A_NUMBER}"),
                ),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 502, "a protocol error");
    expect("run-07", "GET", "/count", 502, "active");

    // The cookie from before the rotation, and a forged one built on the real id.
    let mut other = Http::new();
    let r = other
        .send(
            get.clone(),
            &proxy.url("/"),
            &[named("run-08"), ("cookie", &format!("sid={first}"))],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.seen().header("x-session"), Some("none"));
    expect("run-08", "GET", "/", 200, "stale");
    let forged_tag = "AAAAforgedtagBBBBforgedtagCCCCforgedtagDDDD";
    let forged = format!("{}.{forged_tag}", id_of(&second));
    let r = other
        .send(
            get.clone(),
            &proxy.url("/"),
            &[named("run-09"), ("cookie", &format!("sid={forged}"))],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.seen().header("x-session"), Some("none"));
    expect("run-09", "GET", "/", 200, "invalid");

    let r = http
        .send(
            Method::DELETE,
            &proxy.url("/session"),
            &[named("run-10"), ("x-test-reply", "x-session-destroy: true")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.sid().as_deref(), Some(""), "cookie cleared");
    expect("run-10", "DELETE", "/session", 200, "destroyed");

    let r = other
        .send(
            get.clone(),
            &proxy.url("/"),
            &[named("run-11"), ("cookie", &format!("sid={second}"))],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.seen().header("x-session"), Some("none"));
    expect("run-11", "GET", "/", 200, "unknown");

    for cookie in [&first, &second] {
        let (id, tag) = cookie.split_once('.').expect("id.tag");
        secrets.extend([cookie.to_string(), id.to_owned(), tag.to_owned()]);
    }
    secrets.extend([forged, forged_tag.to_owned()]);
    // Also cut short, as a truncated or partly escaped echo would show it.
    let pieces: Vec<String> = secrets
        .iter()
        .filter(|s| s.len() >= 24)
        .flat_map(|s| [s[..16].to_owned(), s[s.len() - 16..].to_owned()])
        .collect();
    secrets.extend(pieces);
    Used { secrets, expected }
}

/// Runs the protocol through stickless on Redis with these log settings, then checks the logs:
/// no secret, and the access line of every request.
async fn run_and_scan(format: &str, rust_log: &str) -> String {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::start_with_env(
        &backend.url(),
        &[
            "--redis-url",
            &redis.url(),
            "--secret-keys",
            TEST_KEY,
            "--log-format",
            format,
        ],
        &[("RUST_LOG", rust_log)],
    );
    let used = protocol_run(&proxy).await;
    for e in &used.expected {
        let line = access_line(&proxy, e.id);
        let field = |k: &str| line.get(k).map(String::as_str).unwrap_or("");
        assert_eq!(field("method"), e.method, "{}: {line:?}", e.id);
        assert_eq!(field("path"), e.path, "{}: {line:?}", e.id);
        assert_eq!(field("status"), e.status.to_string(), "{}: {line:?}", e.id);
        assert_eq!(field("session"), e.session, "{}: {line:?}", e.id);
        assert_eq!(field("outcome"), "complete", "{}: {line:?}", e.id);
        for k in ACCESS_FIELDS {
            assert!(line.contains_key(k), "{}: no {k} in {line:?}", e.id);
        }
    }
    let logs = proxy.logs();
    let leaked: Vec<&String> = used.secrets.iter().filter(|s| logs.contains(*s)).collect();
    assert!(
        leaked.is_empty(),
        "the logs ({format}, RUST_LOG={rust_log}) hold {leaked:?}:\n{logs}"
    );
    logs
}

#[tokio::test(flavor = "multi_thread")]
async fn text_logs_hold_no_session_data() {
    let logs = run_and_scan("text", "info").await;
    // The warnings the run caused are there, without what caused them.
    for warning in [
        "removed client headers that used the session header prefix",
        "session cookie failed verification",
        "broke the session protocol",
    ] {
        assert!(logs.contains(warning), "no {warning:?} in:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_hold_no_session_data_and_every_line_parses() {
    let logs = run_and_scan("json", "info").await;
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        for k in ["timestamp", "level", "target", "message"] {
            assert!(v.get(k).is_some(), "no {k} in {line}");
        }
    }
    // Typed values, for queries: numbers are numbers.
    let line = logs
        .lines()
        .find(|l| l.contains("\"request_id\":\"run-03\"") && l.contains("stickless::access"))
        .expect("the access line of run-03");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["status"], 200);
    assert!(
        v["duration_ms"].is_f64() && v["backend_ms"].is_f64(),
        "{line}"
    );
    assert!(v["bytes"].as_u64().is_some_and(|b| b > 0), "{line}");
    // A warning raised while serving a request carries the request's id.
    let warning = logs
        .lines()
        .find(|l| l.contains("broke the session protocol"))
        .expect("the protocol error's warning");
    let v: serde_json::Value = serde_json::from_str(warning).unwrap();
    assert_eq!(v["span"]["request_id"], "run-07", "{warning}");
}

#[tokio::test(flavor = "multi_thread")]
async fn debug_and_trace_logs_hold_no_session_data_either() {
    // The libraries' own lines too: hyper's, h2's, fred's.
    let debug = run_and_scan("text", "debug").await;
    assert!(debug.contains(" DEBUG "), "no debug line:\n{debug}");
    let trace = run_and_scan("json", "trace").await;
    for library in ["\"target\":\"hyper", "\"target\":\"fred"] {
        assert!(trace.contains(library), "no {library} line:\n{trace}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_can_be_turned_off() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(&backend.url(), &["--access-log", "off"]);
    let r = Http::new()
        .send(
            Method::GET,
            &proxy.url("/"),
            &[named("quiet-1")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 200);
    // A request after it on a proxy with the log on is written: the first is not just late.
    let loud = Stickless::start(&backend.url(), &[]);
    Http::new()
        .send(
            Method::GET,
            &loud.url("/"),
            &[named("loud-1")],
            Bytes::new(),
        )
        .await;
    access_line(&loud, "loud-1");
    assert!(access_lines(&proxy.logs()).is_empty(), "{}", proxy.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_body_and_client_gone_are_logged_as_such() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(&backend.url(), &[]);
    let r = Http::new()
        .send(
            Method::GET,
            &proxy.url("/stream/3"),
            &[named("stream-1")],
            Bytes::new(),
        )
        .await;
    let line = access_line(&proxy, "stream-1");
    assert_eq!(line["outcome"], "complete");
    assert_eq!(line["bytes"], r.body.len().to_string());
    let (head, total): (f64, f64) = (
        line["head_ms"].parse().unwrap(),
        line["duration_ms"].parse().unwrap(),
    );
    assert!(head <= total, "{line:?}");

    // A client that leaves while the backend is still working: 499, as nginx logs it.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /slow/3000 HTTP/1.1\r\nHost: x\r\nX-Request-Id: gone-1\r\n\r\n")
        .await
        .unwrap();
    wait_for("the backend to get it", Duration::from_secs(10), || {
        (backend.hits() >= 2).then_some(())
    });
    drop(s);
    let line = access_line(&proxy, "gone-1");
    assert_eq!(line["status"], "499", "{line:?}");
    assert_eq!(line["outcome"], "cancelled", "{line:?}");
}

// ---------------------------------------------------------------------------------------------
// X-Request-Id
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_well_formed_client_id_is_kept_end_to_end() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(&backend.url(), &[]);
    for id in [
        "client-id-42.a:b",
        "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1",
        &"z".repeat(128),
    ] {
        let r = Http::new()
            .send(Method::GET, &proxy.url("/"), &[named(id)], Bytes::new())
            .await;
        let seen = r.seen();
        assert_eq!(seen.headers["x-request-id"], vec![id.to_owned()], "backend");
        assert_eq!(r.headers["x-request-id"], id, "client");
        access_line(&proxy, id);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_client_id_is_replaced() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(&backend.url(), &[]);
    let too_long = "z".repeat(129);
    let cases: [&[(&str, &str)]; 4] = [
        &[("x-request-id", "has space-Vq81")],
        &[("x-request-id", "quote\"d-Vq82")],
        &[("x-request-id", &too_long)],
        &[
            ("x-request-id", "first-Vq83"),
            ("x-request-id", "second-Vq84"),
        ],
    ];
    for sent in cases {
        let r = Http::new()
            .send(Method::GET, &proxy.url("/"), sent, Bytes::new())
            .await;
        let seen = r.seen();
        let at_backend = &seen.headers["x-request-id"];
        assert_eq!(
            at_backend.len(),
            1,
            "one id reaches the backend: {at_backend:?}"
        );
        let id = &at_backend[0];
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "a generated id: {id}"
        );
        assert_eq!(r.headers["x-request-id"], id.as_str());
        access_line(&proxy, id);
    }
    let logs = proxy.logs();
    for marker in ["Vq81", "Vq82", "Vq83", "Vq84", &too_long] {
        assert!(!logs.contains(marker), "{marker} logged:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_absent_id_is_generated_and_unique() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(&backend.url(), &[]);
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r = Http::new().get(&proxy.url("/")).await;
        let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(r.seen().header("x-request-id"), Some(id.as_str()));
        assert_eq!(id.len(), 32, "{id}");
        ids.insert(id);
    }
    assert_eq!(ids.len(), 20, "every request its own id");
    // Lines are written in batches, a few milliseconds after the request.
    for id in &ids {
        access_line(&proxy, id);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stickless_own_error_responses_carry_the_id() {
    // Nothing listens on the backend's port: 502.
    let proxy = Stickless::start(&format!("http://127.0.0.1:{}", free_port()), &[]);
    let r = Http::new()
        .send(
            Method::GET,
            &proxy.url("/x"),
            &[named("down-1")],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.headers["x-request-id"], "down-1");
    let line = access_line(&proxy, "down-1");
    assert_eq!(line["status"], "502");
    assert_eq!(line["outcome"], "complete");
    let r = Http::new().get(&proxy.url("/y")).await;
    assert_eq!(r.status, 502);
    let id = r.headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32);
    access_line(&proxy, id);

    // An HTTP/1.1 request without Host: 400, answered by stickless itself.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nX-Request-Id: nohost-1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 400"), "{answer}");
    assert!(answer.contains("x-request-id: nohost-1\r\n"), "{answer}");
    assert_eq!(access_line(&proxy, "nohost-1")["status"], "400");
}
