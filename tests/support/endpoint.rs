//! A TCP forwarder standing in for ElastiCache's primary endpoint (a DNS name), for failover
//! drills: new connections go to the current target, connections already made stay where they are.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{RedisServer, ReservedPort};

/// The forwarder, on a port of its own; stopped on drop.
pub struct Endpoint {
    pub port: u16,
    target: Arc<Mutex<SocketAddr>>,
    stalled: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    /// Starts forwarding to `target`. Needs a Tokio runtime.
    pub fn start(target: SocketAddr) -> Self {
        let reserved = ReservedPort::new();
        let port = reserved.port;
        let listener = reserved.listen();
        let target = Arc::new(Mutex::new(target));
        let current = target.clone();
        let stalled = Arc::new(AtomicBool::new(false));
        let stall = stalled.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let to = *current.lock().unwrap();
                let stall = stall.clone();
                tokio::spawn(async move {
                    if let Ok(server) = tokio::net::TcpStream::connect(to).await {
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        tokio::join!(
                            forward(client_read, server_write, &stall),
                            forward(server_read, client_write, &stall),
                        );
                    }
                });
            }
        });
        Endpoint {
            port,
            target,
            stalled,
            task,
        }
    }

    /// Holds every byte in both directions while `on` (a link that stalls: the connections stay
    /// open, nothing gets through), and passes what was held on once it is off again.
    pub fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }

    /// Sends new connections to `to` from now on (the DNS name moved).
    pub fn point_at(&self, to: SocketAddr) {
        *self.target.lock().unwrap() = to;
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` until either side closes, holding the bytes while `stall` is on.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stall: &AtomicBool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while stall.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The loopback address of `redis`.
pub fn addr(redis: &RedisServer) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], redis.port))
}

/// A failover done the ElastiCache way: `replica` is promoted, `primary` made its replica, and
/// `endpoint` (the DNS name) moved to the new primary. The test servers run with `REPLICAOF`
/// renamed away, as ElastiCache restricts it.
pub async fn fail_over(primary: &RedisServer, replica: &RedisServer, endpoint: &Endpoint) {
    let replicaof = super::private_name("REPLICAOF");
    let _: String = cmd(replica, &[&replicaof, "NO", "ONE"]).await;
    let _: String = cmd(
        primary,
        &[&replicaof, "127.0.0.1", &replica.port.to_string()],
    )
    .await;
    endpoint.point_at(addr(replica));
}

/// One command on `redis` through a fresh connection of the independent client.
pub async fn cmd<T: redis::FromRedisValue>(redis: &RedisServer, args: &[&str]) -> T {
    let mut c = redis.conn().await;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut c).await.expect("redis command")
}
