//! Redis's MONITOR as a test sees it: the top-level commands clients send, to count round trips.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{private_name, RedisServer};

/// Top-level commands that clients sent, as seen by MONITOR (commands run inside a script are
/// shown as `[0 lua]` and are not round trips).
pub struct Monitor {
    pub lines: BufReader<tokio::net::TcpStream>,
}

impl Monitor {
    pub async fn start(redis: &RedisServer) -> Self {
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

    /// The names (lower case) of the client commands seen until nothing more arrives for a short
    /// while, without the commands run inside scripts.
    pub async fn drain(&mut self) -> Vec<String> {
        self.drain_lines()
            .await
            .iter()
            .filter_map(|line| command_name(line))
            .collect()
    }

    /// The MONITOR lines seen until nothing more arrives for a short while.
    pub async fn drain_lines(&mut self) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let mut line = String::new();
            match tokio::time::timeout(Duration::from_millis(300), self.lines.read_line(&mut line))
                .await
            {
                Ok(Ok(n)) if n > 0 => seen.push(line),
                _ => return seen,
            }
        }
    }
}

/// The command of a MONITOR line (`+<time> [<db> <addr>] "<command>" ...`), lower case; `None`
/// for a command run inside a script.
pub fn command_name(line: &str) -> Option<String> {
    if line.contains("[0 lua]") {
        return None;
    }
    Some(
        line.split('"')
            .nth(1)
            .unwrap_or_default()
            .to_ascii_lowercase(),
    )
}
