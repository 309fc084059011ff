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
//! A replica cannot run the load script (it writes), so a replica read is `HGETALL` and `PTTL` in
//! one round trip, and what the script decides is decided here: a tombstone is rotated, a session
//! past its absolute timeout is absent, and the idle TTL is renewed on the primary only when the
//! replica shows it fell more than a slack below its full value.

use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::config::{Server, ServerConfig};
use fred::types::Value;
use tokio::sync::Semaphore;

use super::super::{ttl_now, Loaded, Session, CREATED_FIELD, ROTATED_FIELD, VERSION_FIELD};
use crate::config::TtlPolicy;
use crate::protocol::Fields;

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

/// What a replica answered for one key.
#[derive(Debug, PartialEq, Eq)]
pub struct ReplicaCopy {
    /// The load's result, as the load script would give it.
    pub loaded: Loaded,
    /// With a live session: the TTL to set on the primary, if the one the replica shows has
    /// fallen more than the slack below it (or the key has none).
    pub renew: Option<Duration>,
}

/// Decides what the load script would: `hash` is the replica's `HGETALL`, `pttl` its `PTTL` (in
/// milliseconds; negative for no TTL or no key). Renewal is due when the TTL fell more than
/// `slack` below what a renewal would set, or is longer than that (a changed policy), or missing.
pub fn judge(
    hash: Vec<(String, String)>,
    pttl: i64,
    ttl: &TtlPolicy,
    slack: Duration,
    now_ms: u64,
) -> ReplicaCopy {
    let absent = ReplicaCopy {
        loaded: Loaded::Absent,
        renew: None,
    };
    // -2: the key expired or went between the two reads.
    if hash.is_empty() || pttl == -2 {
        return absent;
    }
    let mut fields = Fields::new();
    let mut created_ms = None;
    let mut version = 0;
    for (k, v) in hash {
        if k == ROTATED_FIELD {
            return ReplicaCopy {
                loaded: Loaded::Rotated,
                renew: None,
            };
        } else if k == CREATED_FIELD {
            created_ms = v.parse().ok();
        } else if k == VERSION_FIELD {
            version = v.parse().unwrap_or(0);
        } else {
            fields.insert(k, v);
        }
    }
    // Like the script: a session without a creation time is not cut by the absolute timeout.
    let full = match created_ms {
        Some(created) => match ttl_now(ttl, created, now_ms) {
            Some(full) => full,
            None => return absent,
        },
        None => ttl.idle,
    };
    let full_ms = full.as_millis() as i64;
    let due = pttl < 0 || pttl > full_ms || pttl < full_ms - slack.as_millis() as i64;
    ReplicaCopy {
        loaded: Loaded::Live(Session {
            fields,
            created_ms: created_ms.unwrap_or(now_ms),
            version,
        }),
        renew: due.then_some(full),
    }
}

/// How long reads skip a replica that failed or did not answer in time, before trying it again:
/// a frozen replica stays listed by the primary until [`MAX_LAG`], and without the pause every
/// read meanwhile would wait for it first.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Most TTL renewals in flight at once; past it a due renewal is left to a later read.
pub const MAX_RENEWALS: usize = 256;

/// The client of the replica being read from, if any.
pub struct ReplicaReader {
    current: RwLock<Option<(Listed, Client)>>,
    /// Set by a failed read: no read goes to the replica before this instant.
    paused_until: Mutex<Option<Instant>>,
    /// Renewals on the primary in flight ([`MAX_RENEWALS`]).
    pub renewals: Arc<Semaphore>,
}

impl Default for ReplicaReader {
    fn default() -> Self {
        ReplicaReader {
            current: RwLock::new(None),
            paused_until: Mutex::new(None),
            renewals: Arc::new(Semaphore::new(MAX_RENEWALS)),
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
        let read = async {
            let pipeline = client.pipeline();
            let _: () = pipeline.hgetall(key).await?;
            let _: () = pipeline.pttl(key).await?;
            let (hash, pttl): (Value, i64) = pipeline.all().await?;
            let hash: Vec<(String, String)> = match hash {
                Value::Map(map) => map
                    .inner()
                    .into_iter()
                    .map(|(k, v)| Ok((k.into_string().unwrap_or_default(), v.convert()?)))
                    .collect::<Result<_, fred::error::Error>>()?,
                Value::Array(flat) => flat
                    .chunks_exact(2)
                    .map(|kv| Ok((kv[0].clone().convert()?, kv[1].clone().convert()?)))
                    .collect::<Result<_, fred::error::Error>>()?,
                Value::Null => Vec::new(),
                _ => {
                    return Err(fred::error::Error::new(
                        fred::error::ErrorKind::Protocol,
                        "unexpected HGETALL reply",
                    ))
                }
            };
            Ok::<_, fred::error::Error>((hash, pttl))
        };
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

    fn policy() -> TtlPolicy {
        TtlPolicy {
            idle: Duration::from_secs(800),
            absolute: Some(Duration::from_secs(10_000)),
            ..TtlPolicy::default()
        }
    }

    fn hash(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

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

    #[test]
    fn a_replica_copy_is_judged_like_the_load_script() {
        let p = policy();
        let slack = Duration::from_secs(100);
        let now = 1_000_000;
        // Nothing, or gone between the two reads.
        assert_eq!(judge(vec![], -2, &p, slack, now).loaded, Loaded::Absent);
        let live = hash(&[("_created", "999000"), ("_v", "3"), ("a", "1")]);
        assert_eq!(
            judge(live.clone(), -2, &p, slack, now).loaded,
            Loaded::Absent
        );
        // A tombstone.
        let tomb = hash(&[("_created", "999000"), ("_rotated", "1"), ("a", "1")]);
        assert_eq!(
            judge(tomb, 5_000, &p, slack, now),
            ReplicaCopy {
                loaded: Loaded::Rotated,
                renew: None
            }
        );
        // Past the absolute timeout.
        let old = hash(&[("_created", "1"), ("a", "1")]);
        assert_eq!(
            judge(old.clone(), 5_000, &p, slack, 10_000_001).loaded,
            Loaded::Absent
        );
        assert!(matches!(
            judge(old, 5_000, &p, slack, 9_999_999).loaded,
            Loaded::Live(_)
        ));
        // Live, TTL within the slack: no renewal.
        let copy = judge(live.clone(), 750_000, &p, slack, now);
        let Loaded::Live(s) = &copy.loaded else {
            panic!("{copy:?}")
        };
        assert_eq!((s.version, s.created_ms, s.fields.len()), (3, 999_000, 1));
        assert_eq!(copy.renew, None);
        // Fell more than the slack below: renew to the full idle TTL.
        assert_eq!(
            judge(live.clone(), 650_000, &p, slack, now).renew,
            Some(Duration::from_secs(800))
        );
        // No TTL at all.
        assert_eq!(
            judge(live, -1, &p, slack, now).renew,
            Some(Duration::from_secs(800))
        );
        // Near the absolute timeout the full TTL is what is left of it.
        let late = hash(&[("_created", "1"), ("a", "1")]);
        assert_eq!(
            judge(late, 1_000, &p, slack, 9_500_001).renew,
            Some(Duration::from_millis(500_000))
        );
    }
}
