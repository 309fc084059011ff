//! Stopping and starting as a service: SIGTERM drains (not ready, still accepting for the drain
//! delay, Connection: close), then closes the listener and lets what is in flight finish within
//! the shutdown timeout, and exits 0; systemd's notifications (READY=1, STOPPING=1) as systemd
//! would receive them, on a datagram socket in NOTIFY_SOCKET.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use support::*;

/// Long enough never to end by itself during a test: the test ends the drain with a second
/// SIGTERM.
const LONG: &str = "600s";

/// Waits until the backend has received the one request the test sent.
async fn backend_has_the_request(backend: &TestBackend) {
    eventually(
        "the request to reach the backend",
        Duration::from_secs(10),
        || {
            let hits = backend.hits();
            async move { (hits == 1).then_some(()) }
        },
    )
    .await;
}

/// Sends `GET path` through `proxy` and returns once the backend has it (and is slow to answer).
async fn slow_request_in_flight(
    proxy: &Stickless,
    backend: &TestBackend,
    path: &str,
) -> tokio::task::JoinHandle<Reply> {
    let url = proxy.url(path);
    let slow = tokio::spawn(async move { Http::new().get(&url).await });
    backend_has_the_request(backend).await;
    slow
}

/// The readiness endpoint's status and body.
async fn readyz(proxy: &Stickless) -> (u16, String) {
    let r = Http::new().get(&proxy.admin_url("/readyz")).await;
    (r.status.as_u16(), r.text())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_request_in_flight_at_sigterm_completes_and_the_process_exits_0() {
    let backend = TestBackend::start().await;
    let mut proxy = Stickless::start(
        &backend.url(),
        &["--drain-delay", "1s", "--shutdown-timeout", "20s"],
    );
    let slow = slow_request_in_flight(&proxy, &backend, "/slow/1500").await;
    proxy.terminate();
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().path, "/slow/1500", "the whole body arrived");
    assert_eq!(
        r.headers.get("connection").map(|v| v.to_str().unwrap()),
        Some("close"),
        "a response sent while draining sends the client elsewhere"
    );
    let status = proxy.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", proxy.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn while_draining_readyz_is_503_and_new_connections_are_served_until_the_listener_closes() {
    let backend = TestBackend::start().await;
    let mut proxy = Stickless::start(
        &backend.url(),
        &["--drain-delay", LONG, "--shutdown-timeout", "20s"],
    );
    assert_eq!(readyz(&proxy).await.0, 200);
    // Keep-alive connections that have served a request and sit idle: one long enough to have
    // been taken back from hyper (a second), one not.
    let mut buf = [0u8; 4096];
    let mut one_request = || {
        let mut idle = TcpStream::connect(proxy.addr).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        idle.write_all(b"GET /before HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let n = idle.read(&mut buf).unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        idle
    };
    let mut idle_longer = one_request();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut idle = one_request();

    proxy.terminate();
    // The signal is handled by a task of its own: a /readyz that reaches the admin listener in
    // the same instant may still be answered before it.
    let p = &proxy;
    let body = eventually(
        "/readyz says 503 once asked to stop",
        // Generous: on a loaded machine the signal's task may wait for a core.
        Duration::from_secs(10),
        move || async move {
            let (status, body) = readyz(p).await;
            (status == 503).then_some(body)
        },
    )
    .await;
    assert!(body.contains("draining"), "{body}");

    // Idle keep-alive connections are closed, so that their clients reconnect elsewhere.
    for idle in [&mut idle, &mut idle_longer] {
        let closed = blocking(|| loop {
            match idle.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        });
        assert!(closed, "an idle keep-alive connection was not closed");
    }

    // New connections are still served during the drain delay, and told to close.
    let r = Http::new().get(&proxy.url("/during")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen().path, "/during");
    assert_eq!(
        r.headers.get("connection").map(|v| v.to_str().unwrap()),
        Some("close")
    );
    assert!(
        proxy.exited().is_none(),
        "still running during the drain delay"
    );

    // A second SIGTERM skips the rest of the delay: the listener closes and the process exits.
    proxy.terminate();
    let status = proxy.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", proxy.logs());
    assert!(
        TcpStream::connect(proxy.addr).is_err(),
        "new connections are refused once the listener is closed"
    );
    assert!(
        proxy.logs().contains("drain delay cut short"),
        "{}",
        proxy.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_drain_delay_the_listener_closes_while_a_request_is_still_in_flight() {
    let backend = TestBackend::start().await;
    let mut proxy = Stickless::start(
        &backend.url(),
        &["--drain-delay", "0", "--shutdown-timeout", "30s"],
    );
    let slow = slow_request_in_flight(&proxy, &backend, "/slow/3000").await;
    proxy.terminate();
    // The listener is closed while the slow request is still being answered.
    eventually("the listener to close", Duration::from_secs(10), || {
        let refused = TcpStream::connect(proxy.addr).is_err();
        async move { refused.then_some(()) }
    })
    .await;
    assert!(
        !slow.is_finished(),
        "the slow request ended before the listener closed"
    );
    let r = slow.await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.seen().path),
        (200, "/slow/3000".to_owned())
    );
    assert_eq!(proxy.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shutdown_timeout_cuts_a_request_that_takes_longer_and_the_process_still_exits_0() {
    let backend = TestBackend::start().await;
    let mut proxy = Stickless::start(
        &backend.url(),
        &["--drain-delay", "0", "--shutdown-timeout", "1s"],
    );
    let hung = tokio::spawn({
        let url = proxy.url("/slow/60000");
        async move {
            Http::new()
                .try_get_replying(&url, &[], Duration::from_secs(30))
                .await
        }
    });
    backend_has_the_request(&backend).await;
    proxy.terminate();
    assert_eq!(proxy.wait_exit(Duration::from_secs(15)).code(), Some(0));
    let cut = hung.await.unwrap();
    assert!(cut.is_err(), "the hung request was answered: {cut:?}");
    let logs = proxy.logs();
    assert!(
        logs.contains("shutdown timeout reached") && logs.contains("cut=1"),
        "the cut is logged with how many connections: {logs}"
    );
}

/// A datagram socket standing in for systemd's notification socket.
struct NotifySocket {
    socket: UnixDatagram,
    _dir: TempDir,
    path: String,
}

impl NotifySocket {
    fn bind() -> Self {
        let dir = TempDir::new("notify");
        let path = dir.path.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            socket,
            path: path.to_str().unwrap().to_owned(),
            _dir: dir,
        }
    }

    /// The next message, or `None` after `wait`.
    fn next(&self, wait: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        blocking(|| self.socket.recv(&mut buf))
            .ok()
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Waits for a message with `line` among its lines, and returns it.
    fn expect(&self, line: &str, wait: Duration) -> String {
        let end = std::time::Instant::now() + wait;
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
            match self.next(left) {
                Some(m) if m.lines().any(|l| l == line) => return m,
                Some(m) => seen.push(m),
                None => break,
            }
        }
        panic!("no {line} within {wait:?}; got {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_once_serving_and_stopping_at_sigterm() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let notify = NotifySocket::bind();
    let mut proxy = Stickless::start_with_env(
        &backend.url(),
        &[
            "--redis-url",
            &redis.url(),
            "--secret-keys",
            TEST_KEY,
            "--drain-delay",
            LONG,
        ],
        &[("NOTIFY_SOCKET", &notify.path)],
    );
    let ready = notify.expect("READY=1", Duration::from_secs(20));
    assert!(ready.contains("STATUS=serving"), "{ready}");
    assert_eq!(readyz(&proxy).await.0, 200, "ready as systemd was told");
    assert_eq!(Http::new().get(&proxy.url("/")).await.status, 200);

    proxy.terminate();
    notify.expect("STOPPING=1", Duration::from_secs(10));
    proxy.terminate();
    assert_eq!(proxy.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_only_once_the_store_answers() {
    let backend = TestBackend::start().await;
    let notify = NotifySocket::bind();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let _proxy = Stickless::start_with_env(
        &backend.url(),
        &["--redis-url", &url, "--secret-keys", TEST_KEY],
        &[("NOTIFY_SOCKET", &notify.path)],
    );
    // Nothing listens on the store's port yet: stickless serves, but is not ready.
    assert_eq!(
        notify.next(Duration::from_secs(2)),
        None,
        "READY=1 before the store answered"
    );
    let _redis = RedisServer::start_on(port);
    notify.expect("READY=1", Duration::from_secs(15));
}

/// A SIGHUP that arrives while stickless is still starting (here: waiting for a Redis that does
/// not answer yet) does not end it: its default action would, and systemd counts a death by
/// SIGHUP as a clean exit, so `Restart=on-failure` would leave the service down.
#[test]
fn a_sighup_during_start_up_does_not_end_the_process() {
    let nothing_there = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stickless"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--upstream", "http://127.0.0.1:9"])
        .args(["--redis-url", &format!("redis://127.0.0.1:{nothing_there}")])
        .args(["--secret-keys", TEST_KEY])
        .env_remove("REDIS_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("stickless starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    // The first warning about Redis: start-up has begun and is waiting (about 2 s) for it.
    let mut log = Vec::new();
    let waiting = loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => {
                let ready = line.contains("stickless ready");
                let redis = line.contains("redis connection error");
                log.push(line);
                if ready || redis {
                    break redis;
                }
            }
            Err(_) => break false,
        }
    };
    assert!(
        waiting,
        "no Redis warning before ready:\n{}",
        log.join("\n")
    );
    signal(child.id(), "HUP");
    let ready = loop {
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(line) => {
                let ready = line.contains("stickless ready");
                log.push(line);
                if ready {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let alive = matches!(child.try_wait(), Ok(None));
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        ready && alive,
        "stickless did not survive a SIGHUP during start-up:\n{}",
        log.join("\n")
    );
}
