//! The cost in Redis commands of each kind of request, watched with MONITOR on a real server: a
//! request that only reads its session is exactly one round trip (read and TTL renewal in one
//! script), a change is exactly one more, and a request without a session cookie is none.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Top-level commands that clients sent, as seen by MONITOR (commands run inside a script are
/// shown as `[0 lua]` and are not round trips).
struct Monitor {
    lines: BufReader<tokio::net::TcpStream>,
}

impl Monitor {
    async fn start(redis: &RedisServer) -> Self {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", redis.port))
            .await
            .unwrap();
        // MONITOR is renamed away on the test servers; the harness knows its private name.
        let monitor = format!("{}\r\n", private_name("MONITOR"));
        conn.write_all(monitor.as_bytes()).await.unwrap();
        let mut lines = BufReader::new(conn);
        let mut ok = String::new();
        lines.read_line(&mut ok).await.unwrap();
        assert_eq!(ok, "+OK\r\n");
        Monitor { lines }
    }

    /// The client commands seen until nothing more arrives for a short while.
    async fn drain(&mut self) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let mut line = String::new();
            match tokio::time::timeout(Duration::from_millis(300), self.lines.read_line(&mut line))
                .await
            {
                Ok(Ok(n)) if n > 0 => {
                    if !line.contains("[0 lua]") {
                        // `+<time> [<db> <addr>] "<command>" ...`: keep the command name.
                        let name = line
                            .split('"')
                            .nth(1)
                            .unwrap_or_default()
                            .to_ascii_lowercase();
                        seen.push(name);
                    }
                }
                _ => return seen,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_round_trip_to_read_one_more_to_change_none_without_a_session() {
    let redis = RedisServer::start();
    let backend = TestBackend::start().await;
    let proxy = Stickless::on_redis(&backend.url(), &redis, &[]);
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
