//! A TCP forwarder standing in for ElastiCache's primary endpoint (a DNS name), for failover
//! drills: new connections go to the current target, connections already made stay where they are.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::{RedisServer, ReservedPort};

/// The forwarder, on a port of its own; stopped on drop.
pub struct Endpoint {
    pub port: u16,
    target: Arc<Mutex<SocketAddr>>,
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
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = *current.lock().unwrap();
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Endpoint { port, target, task }
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

/// The loopback address of `redis`.
pub fn addr(redis: &RedisServer) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], redis.port))
}
