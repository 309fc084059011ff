//! Session loads from a replica (`--read-from replica`): reads scale out to ElastiCache's
//! replicas, and changes, takes, restores and destroys stay on the primary.
//!
//! The replica gets a client of its own rather than fred's replica routing: fred routes replica
//! commands through the primary's connection task and, when a replica cannot be reached, retries
//! it there under the reconnection policy, which here never gives up; a dead replica would hold up
//! every call to the primary. On its own client a replica can only slow down the reads sent to
//! it, and each is bounded by half the store timeout before the primary is asked instead.
//!
//! Which replica: one the primary lists in `INFO replication` as online and recently heard from
//! ([`MAX_LAG`]), checked twice a second. A replica that drops off the list (it lost its link, it
//! fell behind, a failover made it the primary or took it away) is left for another, or for the
//! primary while there is none.
//!
//! A replica read is the same `HGETALL` and `PTTL` in one round trip as a read on the primary,
//! judged by the same code (the `read` module); a due renewal goes to the primary.

use std::sync::{Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::config::{Server, ServerConfig};

/// The longest a replica may go without acknowledging the primary's stream (`lag` in the
/// primary's `INFO replication`, in whole seconds) and still be read from. A replica acknowledges
/// every second; one that stopped has lost its link or stalled, and may be serving a copy from
/// before logouts and rotations made by other users.
pub const MAX_LAG: u64 = 10;

/// How often the primary is asked for its replicas.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// A replica the primary reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its address as the primary sees it.
    pub host: String,
    /// Its listening port.
    pub port: u16,
}

/// The replicas in the primary's `INFO replication` that may be read from: online, and heard
/// from within [`MAX_LAG`]. Lines look like
/// `slave0:ip=10.0.0.5,port=6379,state=online,offset=1234,lag=0`.
pub fn usable_replicas(info: &str) -> Vec<Listed> {
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.trim().split_once(':')?;
            let n = name.strip_prefix("slave")?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let field = |key: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            };
            let online = field("state") == Some("online");
            let lag = field("lag")?.parse::<u64>().ok()?;
            if !online || lag > MAX_LAG {
                return None;
            }
            Some(Listed {
                host: field("ip")?.to_owned(),
                port: field("port")?.parse().ok()?,
            })
        })
        .collect()
}

/// How long reads skip a replica that failed or did not answer in time, before trying it again:
/// a frozen replica stays listed by the primary until [`MAX_LAG`], and without the pause every
/// read meanwhile would wait for it first.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The client of the replica being read from, if any.
pub struct ReplicaReader {
    current: RwLock<Option<(Listed, Client)>>,
    /// Set by a failed read: no read goes to the replica before this instant.
    paused_until: Mutex<Option<Instant>>,
}

impl Default for ReplicaReader {
    fn default() -> Self {
        ReplicaReader {
            current: RwLock::new(None),
            paused_until: Mutex::new(None),
        }
    }
}

/// Why a replica read gave no answer; the load goes to the primary.
#[derive(Debug)]
pub enum Unavailable {
    /// No replica is listed, or its client is not connected.
    NoReplica,
    /// The replica failed or did not answer in time.
    Failed,
    /// The replica failed a moment ago and is left alone for [`PAUSE_AFTER_FAILURE`].
    Paused,
}

impl ReplicaReader {
    /// Reads `key` from the replica: `HGETALL` and `PTTL` in one round trip, bounded by `bound`.
    pub async fn read(
        &self,
        key: &str,
        bound: Duration,
    ) -> Result<(Vec<(String, String)>, i64), Unavailable> {
        let client = match self.current.read() {
            Ok(current) => current.as_ref().map(|(_, c)| c.clone()),
            Err(_) => None,
        };
        let Some(client) = client.filter(|c| c.is_connected()) else {
            return Err(Unavailable::NoReplica);
        };
        if self
            .paused_until
            .lock()
            .is_ok_and(|until| until.is_some_and(|t| Instant::now() < t))
        {
            return Err(Unavailable::Paused);
        }
        let read = super::read::hash_and_pttl(client.pipeline(), key);
        let failed = match tokio::time::timeout(bound, read).await {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "a replica read failed; reading from the primary");
                Unavailable::Failed
            }
            Err(_) => Unavailable::Failed,
        };
        if let Ok(mut until) = self.paused_until.lock() {
            *until = Some(Instant::now() + PAUSE_AFTER_FAILURE);
        }
        Err(failed)
    }

    /// Keeps the replica client on a usable replica of the primary `primary` answers for, for as
    /// long as `reader` lives. `config` is the primary's (credentials, TLS); `build` makes a
    /// connected client for a replica's config.
    pub async fn watch(
        reader: Weak<ReplicaReader>,
        primary: Client,
        config: Config,
        timeout: Duration,
        build: impl Fn(Config) -> Result<Client, fred::error::Error> + Send + 'static,
    ) {
        // TLS: the replica's certificate names the endpoint the user gave (ElastiCache's are
        // wildcards for the whole group), not the address the primary reports.
        let tls_name = match &config.server {
            ServerConfig::Centralized { server } => Some(server.host.clone()),
            _ => None,
        };
        loop {
            let Some(this) = reader.upgrade() else {
                return;
            };
            let info = tokio::time::timeout(
                timeout,
                primary.info::<String>(Some(fred::types::InfoKind::Replication)),
            )
            .await;
            // No answer: the primary may be failing over; keep what there is.
            if let Ok(Ok(info)) = info {
                let usable = usable_replicas(&info);
                let keep = this
                    .current
                    .read()
                    .ok()
                    .and_then(|c| c.as_ref().map(|(l, _)| usable.contains(l)))
                    .unwrap_or(false);
                if !keep {
                    let next = usable.into_iter().next().and_then(|listed| {
                        let mut config = config.clone();
                        let mut server = Server::new(listed.host.clone(), listed.port);
                        server.tls_server_name = tls_name.clone();
                        config.server = ServerConfig::Centralized { server };
                        match build(config) {
                            Ok(client) => Some((listed, client)),
                            Err(e) => {
                                tracing::warn!(error = %e, "could not create the redis replica client");
                                None
                            }
                        }
                    });
                    match &next {
                        Some((listed, _)) => {
                            tracing::info!(replica = %format!("{}:{}", listed.host, listed.port), "redis: session loads go to this replica")
                        }
                        None => {
                            if this.current.read().is_ok_and(|c| c.is_some()) {
                                tracing::warn!(
                                    "redis: no usable replica; session loads go to the primary"
                                )
                            }
                        }
                    }
                    let old = this.current.write().ok().and_then(|mut c| {
                        std::mem::replace(&mut *c, next).map(|(_, client)| client)
                    });
                    if let Some(old) = old {
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(timeout, old.quit()).await;
                        });
                    }
                }
            }
            drop(this);
            tokio::time::sleep(WATCH_INTERVAL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_online_replicas_heard_from_lately_are_read() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:3\r\n\
            slave0:ip=10.0.0.5,port=6379,state=online,offset=100,lag=0\r\n\
            slave1:ip=10.0.0.6,port=6380,state=wait_bgsave,offset=0,lag=0\r\n\
            slave2:ip=10.0.0.7,port=6381,state=online,offset=90,lag=11\r\n\
            master_replid:abc\r\n";
        assert_eq!(
            usable_replicas(info),
            vec![Listed {
                host: "10.0.0.5".into(),
                port: 6379
            }]
        );
        assert!(usable_replicas("role:slave\r\nmaster_host:x\r\n").is_empty());
    }
}
