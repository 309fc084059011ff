//! Upgraded connections (WebSocket and other `Upgrade` protocols) pass through with the session:
//! the backend sees the session headers on the upgrade request, its changes are stored before the
//! protocol switches, and bytes then flow both ways until a side closes or the tunnel goes idle.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// A backend speaking a line-echo protocol after `Upgrade: echo`: it greets with the session's
/// user, then echoes every line. `/login` sets the user; `/rogue` switches protocols unasked.
async fn echo_backend() -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(stickless::server::serve_http(
        listener,
        |mut req: Request<Incoming>, _| async move {
            let mut resp = Response::new(Full::new(Bytes::new()));
            let user = req
                .headers()
                .get("x-session-field-user")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_else(|| "nobody".into());
            match req.uri().path() {
                "/login" => {
                    resp.headers_mut()
                        .insert("x-session-set-user", "alice".parse().unwrap());
                }
                "/rogue" => {
                    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    resp.headers_mut()
                        .insert("upgrade", "echo".parse().unwrap());
                    resp.headers_mut()
                        .insert("connection", "upgrade".parse().unwrap());
                }
                _ if req.headers().get("upgrade").is_some_and(|v| v == "echo") => {
                    let upgraded = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let io = TokioIo::new(upgraded.await.expect("upgrade"));
                        let (r, mut w) = tokio::io::split(io);
                        w.write_all(format!("hello {user}\n").as_bytes())
                            .await
                            .unwrap();
                        let mut lines = BufReader::new(r).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                                break;
                            }
                        }
                    });
                    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    let h = resp.headers_mut();
                    h.insert("upgrade", "echo".parse().unwrap());
                    h.insert("connection", "upgrade".parse().unwrap());
                    h.insert("x-session-incr-sockets", "1".parse().unwrap());
                }
                _ => {}
            }
            resp
        },
        async {
            let _ = stopped.await;
        },
    ));
    (url, stop)
}

/// Sends an upgrade request on a raw connection and returns the response head and the reader.
async fn upgrade(
    proxy: &Stickless,
    path: &str,
    sid: &str,
) -> (String, BufReader<tokio::net::TcpStream>) {
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\nCookie: sid={sid}\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(conn);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
            .await
            .expect("response head within 10 s")
            .unwrap();
        if n == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    (head, reader)
}

/// A response head read line by line, lowercased.
async fn head(reader: &mut BufReader<tokio::net::TcpStream>) -> String {
    let mut lines = String::new();
    loop {
        let l = line(reader).await;
        if l.is_empty() || l == "\r\n" {
            return lines.to_ascii_lowercase();
        }
        lines.push_str(&l);
    }
}

async fn line(reader: &mut BufReader<tokio::net::TcpStream>) -> String {
    let mut s = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut s))
        .await
        .expect("a line within 10 s")
        .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_carries_the_session_and_its_changes() {
    let redis = RedisServer::start();
    let (backend, _stop) = echo_backend().await;
    let proxy = Stickless::on_redis(&backend, &redis, &[]);
    let mut http = Http::with_jar();
    http.get(&proxy.url("/login")).await;
    let sid = http.sid.clone().expect("logged in");

    let (head, mut reader) = upgrade(&proxy, "/ws", &sid).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(!head.contains("x-session"), "{head}");
    assert_eq!(
        line(&mut reader).await,
        "hello alice\n",
        "the backend saw the session"
    );
    for msg in ["ping", "second message", "é ✓"] {
        reader
            .get_mut()
            .write_all(format!("{msg}\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(line(&mut reader).await, format!("{msg}\n"));
    }
    // The 101's session change was stored before the protocol switched.
    let stored = hgetall(&redis, &format!("stickless:{}", id_of(&sid))).await;
    assert_eq!(stored.get("sockets").map(String::as_str), Some("1"));
    assert_eq!(stored.get("user").map(String::as_str), Some("alice"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_tunnel_is_closed_after_the_upstream_timeout() {
    let (backend, _stop) = echo_backend().await;
    let proxy = Stickless::start(&backend, &["--upstream-timeout", "500ms"]);
    let (head, mut reader) = upgrade(&proxy, "/ws", "none").await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(line(&mut reader).await, "hello nobody\n");
    // Traffic keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        reader.get_mut().write_all(b"keepalive\n").await.unwrap();
        assert_eq!(line(&mut reader).await, "keepalive\n");
    }
    // ...silence closes it.
    let started = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the tunnel was not closed");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed too early"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_switching_protocols_unasked_is_a_502() {
    let (backend, _stop) = echo_backend().await;
    let proxy = Stickless::start(&backend, &[]);
    let r = Http::new().get(&proxy.url("/rogue")).await;
    assert_eq!(r.status, 502);
}

/// An upgrade asked on a kept-alive connection that sat idle long enough to be taken back from
/// hyper (a second) and served again by a new one: the tunnel works as on a fresh connection.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_after_an_idle_pause_on_a_kept_alive_connection_works() {
    let (backend, _stop) = echo_backend().await;
    let proxy = Stickless::start(&backend, &[]);
    let conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut reader = BufReader::new(conn);
    reader
        .get_mut()
        .write_all(b"GET /plain HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let first = head(&mut reader).await;
    assert!(first.starts_with("http/1.1 200"), "{first}");
    assert!(first.contains("content-length: 0"), "{first}");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    reader
        .get_mut()
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let second = head(&mut reader).await;
    assert!(second.starts_with("http/1.1 101"), "{second}");
    assert_eq!(line(&mut reader).await, "hello nobody\n");
    reader.get_mut().write_all(b"ping\n").await.unwrap();
    assert_eq!(line(&mut reader).await, "ping\n");
}
