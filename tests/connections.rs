//! Client connections through the real `stickless` process: silent connections are closed after
//! `--header-read-timeout`, idle ones (h2 included, pings or not) after `--keep-alive-timeout`,
//! `--max-connections` stops the accepting without starving the admin listener, and the flags
//! refuse values that make no sense.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The h2 connection preface a client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits until the server closes `stream` (end of file or a reset), failing after `deadline`.
/// Anything the server sends first (an h2 SETTINGS frame, a GOAWAY) is read and ignored.
async fn closed_by_server(stream: &mut TcpStream, deadline: Duration) {
    let end = tokio::time::Instant::now() + deadline;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(end, stream.read(&mut buf)).await {
            Err(_) => panic!("the connection is still open after {deadline:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
        }
    }
}

async fn open_connections(proxy: &Stickless) -> f64 {
    proxy
        .metric("stickless_open_connections{listener=\"proxy\"}")
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_connections_are_closed_after_the_header_read_timeout() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(&backend.url(), &["--header-read-timeout", "1s"]);

    // Nothing at all; half a request head; a byte that could start h2's preface; the whole
    // preface and nothing after it.
    let sends: [&[u8]; 4] = [b"", b"GET / HTTP/1.1\r\nHost: x\r\n", b"P", H2_PREFACE];
    let started = Instant::now();
    let mut conns = Vec::new();
    for send in sends {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(send).await.unwrap();
        conns.push(s);
    }
    eventually("4 open connections", Duration::from_secs(5), || async {
        (open_connections(&proxy).await == 4.0).then_some(())
    })
    .await;
    for s in &mut conns {
        closed_by_server(s, Duration::from_secs(10)).await;
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    eventually("no open connection", Duration::from_secs(5), || async {
        (open_connections(&proxy).await == 0.0).then_some(())
    })
    .await;

    // A client that sends its request in time is served as before.
    let r = Http::new().get(&proxy.url("/after")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().path, "/after");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_after_the_keep_alive_timeout_h2_pings_or_not() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(&backend.url(), &["--keep-alive-timeout", "1s"]);

    // An h2c client that pings every 100 ms, idle or not, and answers the server's pings.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(100))
        .keep_alive_while_idle(true)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let get = |path: &str| {
        Request::get(format!("http://{}{path}", proxy.addr))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };

    // A stream that stays open for longer than the timeout (20 chunks, 50 ms apart) is not cut.
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(get("/stream/40")),
    )
    .await
    .expect("response headers in time")
    .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("body in time")
        .unwrap()
        .to_bytes();
    assert!(body.ends_with(b"chunk 39\n"), "{body:?}");

    // Then nothing is asked: the server closes the connection, pings notwithstanding.
    let idle = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the idle h2 connection is closed by the server");
    let took = idle.elapsed();
    assert!(ended.is_ok(), "{ended:?}");
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    assert!(sender.is_closed() || sender.ready().await.is_err());

    // HTTP/1.1: a long response is not cut, then the idle connection is closed.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /stream/40 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !got.ends_with(b"chunk 39\n\r\n0\r\n\r\n") {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!(
                "response cut short ({other:?}): {}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    let idle = Instant::now();
    closed_by_server(&mut s, Duration::from_secs(10)).await;
    assert!(idle.elapsed() >= Duration::from_millis(900));
}

#[tokio::test(flavor = "multi_thread")]
async fn at_max_connections_the_admin_answers_and_the_proxy_serves_again_after_the_timeout() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(
        &backend.url(),
        &["--max-connections", "20", "--header-read-timeout", "2s"],
    );

    // 40 silent clients: 20 are accepted, the rest wait in the kernel's backlog.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    eventually("20 open connections", Duration::from_secs(5), || async {
        (open_connections(&proxy).await == 20.0).then_some(())
    })
    .await;

    // The admin listener has its own cap: health checks and scrapes still answer.
    for _ in 0..5 {
        let r = Http::new().get(&proxy.admin_url("/healthz")).await;
        assert_eq!(r.status, 200);
        assert!(open_connections(&proxy).await <= 20.0);
    }
    assert!(
        proxy.logs().contains("connection limit reached"),
        "{}",
        proxy.logs()
    );

    // A real client queues behind the silent ones and is served once their time is up.
    let started = Instant::now();
    let r = Http::new().get(&proxy.url("/queued")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().path, "/queued");
    assert!(started.elapsed() >= Duration::from_secs(1));
    for s in &mut silent {
        closed_by_server(s, Duration::from_secs(15)).await;
    }
    drop(silent);

    // With the silent ones gone, requests go straight through.
    let started = Instant::now();
    let r = Http::new().get(&proxy.url("/again")).await;
    assert_eq!(r.status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn bad_connection_flags_exit_2_naming_the_flag() {
    for (flag, value) in [
        ("--header-read-timeout", "0"),
        ("--header-read-timeout", "soon"),
        ("--keep-alive-timeout", "0s"),
        ("--keep-alive-timeout", "1.5s"),
        ("--max-connections", "0"),
        ("--max-connections", "lots"),
        ("--max-connections", "-5"),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stickless"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("STICKLESS_")) {
            command.env_remove(k);
        }
        let mut child = command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .arg(format!("{flag}={value}"))
            .env_remove("REDIS_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A value that was wrongly accepted leaves the proxy running: stop it rather than wait.
        let end = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("stickless {flag}={value} is still running: the value was accepted");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{flag}={value}: {stderr}");
        assert!(stderr.contains(flag), "{flag}={value}: {stderr}");
    }
}

/// Appends what `s` reads next to `pending`, failing at `end` or the end of the stream.
async fn read_more(s: &mut TcpStream, pending: &mut Vec<u8>, end: tokio::time::Instant) {
    let mut buf = [0u8; 4096];
    match tokio::time::timeout_at(end, s.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => pending.extend_from_slice(&buf[..n]),
        other => panic!(
            "no whole response ({other:?}): {}",
            String::from_utf8_lossy(pending)
        ),
    }
}

/// One HTTP/1.1 response from `s`, whose body has a Content-Length: its head and its body.
/// Bytes read past it stay in `pending` for the next call.
async fn read_response(s: &mut TcpStream, pending: &mut Vec<u8>) -> (String, String) {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let head_len = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(s, pending, end).await;
    };
    let head = String::from_utf8_lossy(&pending[..head_len]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no Content-Length: {head}"));
    while pending.len() < head_len + length {
        read_more(s, pending, end).await;
    }
    let body = String::from_utf8_lossy(&pending[head_len..head_len + length]).into_owned();
    pending.drain(..head_len + length);
    (head, body)
}

/// An idle HTTP/1.1 connection is served again by a new hyper connection when its next request
/// comes (the previous one is ended once everything is answered): requests pipelined in one
/// write, or cut anywhere, are answered in order, and the kept-alive connection is still closed
/// after `--keep-alive-timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_and_slow_requests_on_a_kept_alive_connection_are_answered_in_order() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(
        &backend.url(),
        &["--keep-alive-timeout", "3s", "--header-read-timeout", "5s"],
    );
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut pending = Vec::new();

    // Two requests and the start of a third in one write.
    let mut write = [get("/one"), get("/two")].concat();
    let third = get("/three");
    write.extend_from_slice(&third[..7]);
    s.write_all(&write).await.unwrap();
    for path in ["/one", "/two"] {
        let (head, body) = read_response(&mut s, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(body.contains(&format!("\"path\":\"{path}\"")), "{body}");
    }
    // The rest of the third after a pause, long enough for the connection to be taken back from
    // hyper with the start of the third read.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(&third[7..]).await.unwrap();
    let (_, body) = read_response(&mut s, &mut pending).await;
    assert!(body.contains("\"path\":\"/three\""), "{body}");

    // Idle long enough to be taken back, then a request byte by byte.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for b in get("/four") {
        s.write_all(&[b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (head, body) = read_response(&mut s, &mut pending).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("\"path\":\"/four\""), "{body}");
    assert!(pending.is_empty(), "{}", String::from_utf8_lossy(&pending));

    // Then nothing: closed after the keep-alive timeout.
    let idle = Instant::now();
    closed_by_server(&mut s, Duration::from_secs(10)).await;
    assert!(idle.elapsed() >= Duration::from_millis(2900));
    assert_eq!(backend.hits(), 4);
}

/// The head of a request after the first on a kept-alive connection must be complete within
/// `--header-read-timeout` of its first byte, not merely within the keep-alive timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_second_request_head_is_cut_by_the_header_read_timeout() {
    let backend = TestBackend::start().await;
    let proxy = Stickless::start(
        &backend.url(),
        &["--keep-alive-timeout", "60s", "--header-read-timeout", "1s"],
    );
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut pending = Vec::new();
    s.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s, &mut pending).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // A head that never ends, a header line every 100 ms: cut long before the keep-alive
    // timeout.
    s.write_all(b"GET /second HTTP/1.1\r\n").await.unwrap();
    let started = Instant::now();
    let mut cut = false;
    for i in 0..200 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(format!("X-{i}: y\r\n").as_bytes())
            .await
            .is_err()
        {
            cut = true;
            break;
        }
        let mut buf = [0u8; 1024];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::ZERO, s.read(&mut buf)).await {
            cut = true;
            break;
        }
    }
    assert!(cut, "still open after {:?}", started.elapsed());
    assert_eq!(backend.hits(), 1);
}
