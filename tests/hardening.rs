//! End-to-end tests of the request path's defences against unlucky backends and hostile clients:
//! a backend that closes idle keep-alive connections, forged-cookie floods, malformed requests
//! and bodies. The real `stickless` binary, real sockets; each test stops by itself.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLIENT_BODY_ERRORS: &str = "stickless_client_errors_total{reason=\"body\"}";
const UPSTREAM_RESPONSE_ERRORS: &str = "stickless_upstream_errors_total{reason=\"response\"}";
const RETRIES: &str = "stickless_upstream_retries_total";
const INVALID: &str = "stickless_session_lookups_total{result=\"invalid\"}";

/// Reads one request head (and a `content-length` body) from `s`; `None` at end of stream.
async fn read_request(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break String::from_utf8_lossy(&buf[..end + 4]).into_owned();
        }
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    };
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut have = buf.len() - head.len();
    while have < len {
        match s.read(&mut chunk).await {
            Ok(n) if n > 0 => have += n,
            _ => return None,
        }
    }
    Some(head)
}

/// A backend that answers the first request on each connection and keeps the connection open,
/// then closes it on the second request without answering: the race a backend with a short
/// keep-alive timeout (gunicorn's 2 s) wins now and then, made certain.
struct ClosingBackend {
    addr: std::net::SocketAddr,
    /// Requests received, answered or not.
    received: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ClosingBackend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let r = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let r = r.clone();
                tokio::spawn(async move {
                    let Some(head) = read_request(&mut s).await else {
                        return;
                    };
                    r.fetch_add(1, Ordering::SeqCst);
                    let reply: &[u8] = if head.starts_with("HEAD ") {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    };
                    let _ = s.write_all(reply).await;
                    if read_request(&mut s).await.is_some() {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                    // Closed without an answer.
                });
            }
        });
        ClosingBackend {
            addr,
            received,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ClosingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends raw bytes and reads the whole response (the connection is closed by the peer or after
/// 10 s of silence).
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                out.extend_from_slice(&chunk[..n]);
                // One response is all these tests read.
                if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if out.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotent_request_on_a_connection_the_backend_closed_is_retried_once() {
    let backend = ClosingBackend::start().await;
    // One worker, so one pool of backend connections: with several, the second request may come
    // in on another client connection, to another worker, whose pool holds nothing to meet.
    let proxy = Stickless::start(
        &backend.url(),
        &["--upstream-idle-timeout", "30s", "--workers", "1"],
    );
    let mut http = Http::new();
    for method in [http::Method::GET, http::Method::HEAD, http::Method::OPTIONS] {
        // The first request opens a connection that stays pooled; the second meets it closing.
        let first = http
            .send(method.clone(), &proxy.url("/"), &[], bytes::Bytes::new())
            .await;
        assert_eq!(first.status, 200, "{method}");
        let second = http
            .send(method.clone(), &proxy.url("/"), &[], bytes::Bytes::new())
            .await;
        assert_eq!(second.status, 200, "{method}: retried on a new connection");
    }
    assert_eq!(proxy.metric(RETRIES).await, 3.0);
    assert_eq!(proxy.metric(UPSTREAM_RESPONSE_ERRORS).await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_with_a_body_or_a_side_effect_is_never_retried() {
    let backend = ClosingBackend::start().await;
    // One worker, so one pool of backend connections: with several, the second request may come
    // in on another client connection, to another worker, whose pool holds nothing to meet.
    let proxy = Stickless::start(
        &backend.url(),
        &["--upstream-idle-timeout", "30s", "--workers", "1"],
    );
    let mut http = Http::new();
    let cases: [(http::Method, &[u8]); 3] = [
        (http::Method::POST, b""),
        (http::Method::DELETE, b""),
        (http::Method::GET, b"a body"),
    ];
    for (i, (method, body)) in cases.into_iter().enumerate() {
        // A request without a body and one with a body take different paths to the backend
        // (the direct path and hyper's), each with its own pool: the first request takes the
        // second's, so that the second meets the connection it left.
        let first = http
            .send(
                http::Method::POST,
                &proxy.url("/"),
                &[],
                bytes::Bytes::from_static(if body.is_empty() { b"" } else { b"x" }),
            )
            .await;
        assert_eq!(first.status, 200);
        let before = backend.received.load(Ordering::SeqCst);
        let second = http
            .send(
                method.clone(),
                &proxy.url("/"),
                &[],
                bytes::Bytes::from_static(body),
            )
            .await;
        assert_eq!(second.status, 502, "{method} with {} bytes", body.len());
        assert_eq!(
            backend.received.load(Ordering::SeqCst),
            before + 1,
            "{method} reached the backend once"
        );
        assert_eq!(proxy.metric(UPSTREAM_RESPONSE_ERRORS).await, (i + 1) as f64);
    }
    assert_eq!(proxy.metric(RETRIES).await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_cookies_cost_a_bounded_number_of_checks_and_log_lines() {
    let backend = TestBackend::start().await;
    let keys: Vec<String> = (0..8).map(|i| format!("{TEST_KEY}{i}")).collect();
    let proxy = Stickless::start(&backend.url(), &["--secret-keys", &keys.join(",")]);
    // A real session, signed by the first key.
    let mut http = Http::with_jar();
    let r = http
        .get_replying(&proxy.url("/"), &["x-session-set-user: alice"])
        .await;
    assert_eq!(r.status, 200);
    let good = http.sid.clone().unwrap();
    let forged = |n: usize| -> String {
        (0..n)
            .map(|i| format!("sid={}.{:0>43}", &good[..43], i))
            .collect::<Vec<_>>()
            .join("; ")
    };

    // The real cookie among the first four is found.
    let cookie = format!("{}; sid={good}", forged(3));
    let r = Http::new()
        .send(
            http::Method::GET,
            &proxy.url("/"),
            &[("cookie", &cookie)],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(r.seen().header("x-session"), Some("active"));
    // Behind 700 forged values it is never reached: the count checked is bounded.
    let cookie = format!("{}; sid={good}", forged(700));
    let requests = 200;
    for _ in 0..requests {
        let r = Http::new()
            .send(
                http::Method::GET,
                &proxy.url("/"),
                &[("cookie", &cookie)],
                bytes::Bytes::new(),
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.seen().header("x-session"), Some("none"));
    }
    assert_eq!(proxy.metric(INVALID).await, requests as f64);
    // Warned about at most once a second, whatever the rate.
    let warnings = proxy
        .logs()
        .lines()
        .filter(|l| l.contains("failed verification"))
        .count();
    assert!(
        (1..=10).contains(&warnings),
        "{warnings} warnings for {requests} forged requests"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_request_body_is_the_clients_fault() {
    // A backend that reads the head and waits for the rest of the body, never answering.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = [0u8; 4096];
                while let Ok(n) = s.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    let proxy = Stickless::start(&format!("http://{backend}"), &[]);
    let response = raw_exchange(
        proxy.addr,
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    .await;
    assert_eq!(status_of(&response), 400, "{response}");
    assert!(response.to_ascii_lowercase().contains("connection: close"));
    assert_eq!(proxy.metric(CLIENT_BODY_ERRORS).await, 1.0);
    assert_eq!(proxy.metric(UPSTREAM_RESPONSE_ERRORS).await, 0.0);
    task.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn host_must_be_there_once() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(&backend.url(), &[]);
    let cases: [(&[u8], u16); 4] = [
        (b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\n\r\n", 200),
        (b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", 200),
    ];
    for (request, status) in cases {
        let response = raw_exchange(proxy.addr, request).await;
        assert_eq!(
            status_of(&response),
            status,
            "{}",
            String::from_utf8_lossy(request)
        );
    }
    assert_eq!(backend.hits(), 2);
    assert_eq!(
        proxy
            .metric("stickless_client_errors_total{reason=\"several_hosts\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("stickless_client_errors_total{reason=\"missing_host\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_early_error_closes_a_connection_whose_body_was_not_read() {
    // Nothing listens on the backend's port: 502 before the body was read.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let proxy = Stickless::start(&format!("http://127.0.0.1:{port}"), &[]);
    let response = raw_exchange(
        proxy.addr,
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(status_of(&response), 502, "{response}");
    assert!(response.to_ascii_lowercase().contains("connection: close"));
    // Without a body, nothing is in doubt: the connection stays open.
    let response = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(status_of(&response), 502, "{response}");
    assert!(!response.to_ascii_lowercase().contains("connection: close"));
}
