//! The Redis store: Amazon ElastiCache, Redis or Valkey, through fred.
//!
//! A session is one hash under `<key-prefix><id>`; its creation time is the hash field
//! [`CREATED_FIELD`]. A load is `HGETALL` and `PTTL` in one round trip, judged here (the `read`
//! module), with the idle TTL renewed in the background only when it fell an eighth of the idle
//! timeout below its full value; every other operation is one Lua script on one key, so it is
//! atomic, costs one round trip, and works unchanged on a cluster (one key, one slot). Scripts go
//! by `EVALSHA` and are loaded again after a `NOSCRIPT` (a restarted or newly promoted server has
//! an empty script cache). Nothing here needs `CONFIG` or any other command that ElastiCache
//! disables.
//!
//! A call that times out has not necessarily failed: a script queued behind a stalled Redis still
//! runs when Redis resumes, long after the client was answered 503. So every script carries a
//! deadline in Redis's own clock (`ARGV[1]`) and refuses to act once Redis's `TIME` is past it;
//! the ambiguous window shrinks to the network delay of the reply. The offset between this
//! machine's clock and Redis's is measured with `TIME` when a connection is made and on every
//! [`SessionStore::ping`], never in the request path.
//!
//! Failovers: when ElastiCache (or Sentinel, or a cluster) promotes a replica, connections that
//! are already open stay on the demoted node, which answers every write with `READONLY`. Such an
//! answer, and `LOADING`, `MASTERDOWN` and `CLUSTERDOWN`, make the client drop its connection and
//! connect again, resolving the endpoint's name anew; so do a connection reset and a connection
//! that stops answering (TCP keepalive and an unresponsive-connection check).
//! A call that got one of these errors provably did not run, so it is sent once more on the new
//! connection within its deadline; a call whose connection broke in flight may have run, so it is
//! never sent again (an increment must not count twice): the request gets 503.
//! Loads write nothing, so a demoted primary answers them: twice a second the node the client is
//! on is asked for its role, and a client found on a replica is made to reconnect the same way.
//!
//! With `--read-from replica`, loads go to a replica instead (the `replica` module); everything
//! else stays on the primary.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::config::{ReconnectError, UnresponsiveConfig};
use fred::types::scripts::Script;
use fred::types::{ClusterHash, CustomCommand, Value};
use tokio::sync::Semaphore;

mod read;
mod replica;

use self::read::MAX_RENEWALS;
use self::replica::{ReplicaReader, Unavailable};
use super::cache::{LocalCache, Lookup};
use super::iam::{IamCredentials, IamSetupError};
use super::{
    now_ms, Applied, Loaded, Session, SessionStore, StoreError, Target, CREATED_FIELD,
    ROTATED_FIELD, VERSION_FIELD,
};
use crate::config::{Durability, IamAuth, ProtocolConfig, ReadFrom, TtlPolicy};
use crate::cookie::SessionId;
use crate::metrics::{Metrics, ReplicaRead};
use crate::protocol::{Changes, Fields, Rejection};
use crate::request_scope::in_request;

/// The start of every script: `ARGV[1]` is a deadline in milliseconds of Redis's clock (0 for
/// none). Past it, the caller has given up and answered 503, so the script must change nothing.
/// Redis 5 and later replicate a script's effects, not the script, which is what allows `TIME`
/// before writes.
macro_rules! deadline_check {
    () => {
        r#"
local t = redis.call('TIME')
local clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = tonumber(ARGV[1])
if deadline > 0 and clock > deadline then return {'late', string.format('%d', clock)} end
"#
    };
}

/// Reads a session and turns it into a tombstone (the first half of a rotation): the fields
/// stay, so that a failed rotation can be undone, the marker `_rotated` makes every later load
/// of this id `rotated`, and the key lives for the rotation grace. A tombstone is never taken
/// again. ARGV: deadline, grace_ms, now_ms.
/// Reply: `{'absent'}` or `{'taken', name, value, ...}`.
const TAKE: &str = concat!(
    deadline_check!(),
    r#"
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return {'absent'} end
for i = 1, #h, 2 do
  if h[i] == '_rotated' then return {'absent'} end
end
redis.call('HSET', KEYS[1], '_rotated', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
table.insert(h, 1, 'taken')
return h
"#
);

/// Undoes a take: a tombstone becomes a live session again, with its TTL renewed (cut short by
/// the absolute timeout, past which it is deleted instead). A live session is left as it is.
/// ARGV: deadline, now_ms, idle_ms, absolute_ms. Reply: `{'ok', created_ms, version}` or
/// `{'gone'}`.
const RESTORE: &str = concat!(
    deadline_check!(),
    r#"
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return {'gone'} end
local now = tonumber(ARGV[2])
local created, rotated
local version = '0'
for i = 1, #h, 2 do
  if h[i] == '_created' then created = tonumber(h[i + 1])
  elseif h[i] == '_v' then version = h[i + 1]
  elseif h[i] == '_rotated' then rotated = true end
end
created = created or now
if not rotated then return {'ok', string.format('%d', created), version} end
local ttl = tonumber(ARGV[3])
local abs = tonumber(ARGV[4])
if abs > 0 then
  local left = created + abs - now
  if left <= 0 then
    redis.call('DEL', KEYS[1])
    return {'gone'}
  end
  if left < ttl then ttl = left end
end
redis.call('HDEL', KEYS[1], '_rotated')
redis.call('PEXPIRE', KEYS[1], ttl)
return {'ok', string.format('%d', created), version}
"#
);

/// Renews the idle TTL of a session a load found due for it, unless it has become a tombstone
/// since (whose TTL is the rotation grace). A key that is gone stays gone.
/// ARGV: deadline, ttl_ms. Reply: `{'ok'}`.
const RENEW: &str = concat!(
    deadline_check!(),
    r#"
if redis.call('HEXISTS', KEYS[1], '_rotated') == 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return {'ok'}
"#
);

/// Deletes a session. ARGV: deadline. Reply: `{'ok'}`.
const DESTROY: &str = concat!(
    deadline_check!(),
    r#"
redis.call('DEL', KEYS[1])
return {'ok'}
"#
);

/// Applies changes all or nothing: first works out the resulting session and checks it, then
/// writes field by field (HDEL, HSET, HINCRBY), counts the version (`_v`) up and renews the TTL.
/// It mirrors `protocol::apply_to_fields`, which the memory store runs. Reply:
/// `{'ok', created_ms, version}` (then the resulting fields as pairs when asked for them, for
/// the local cache), `{'gone'}`, or the limit broken.
/// ARGV: deadline, mode ('existing' | 'new'), now_ms, idle_ms, absolute_ms, max_fields,
/// max_bytes, created_ms (new sessions; '' for now), then counted lists: base pairs, deletes,
/// set pairs, incr pairs; last, '1' to have the fields in the reply.
const APPLY: &str = concat!(
    deadline_check!(),
    r#"
local key = KEYS[1]
local existing = ARGV[2] == 'existing'
local now = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local abs = tonumber(ARGV[5])
local max_fields = tonumber(ARGV[6])
local max_bytes = tonumber(ARGV[7])
local MAX = 9007199254740991
local cur = {}
local created
if existing then
  local h = redis.call('HGETALL', key)
  if #h == 0 then return {'gone'} end
  for i = 1, #h, 2 do
    if h[i] == '_created' then created = tonumber(h[i + 1])
    elseif h[i] == '_rotated' then return {'gone'}
    elseif h[i] ~= '_v' then cur[h[i]] = h[i + 1] end
  end
  created = created or now
else
  created = tonumber(ARGV[8]) or now
end
if abs > 0 then
  local left = created + abs - now
  if left <= 0 then
    redis.call('DEL', key)
    return {'gone'}
  end
  if left < ttl then ttl = left end
end
local i = 9
local base = {}
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  base[#base + 1] = ARGV[i]; base[#base + 1] = ARGV[i + 1]
  cur[ARGV[i]] = ARGV[i + 1]; i = i + 2
end
local dels = {}
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  dels[#dels + 1] = ARGV[i]; cur[ARGV[i]] = nil; i = i + 1
end
local sets = {}
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  sets[#sets + 1] = ARGV[i]; sets[#sets + 1] = ARGV[i + 1]
  cur[ARGV[i]] = ARGV[i + 1]; i = i + 2
end
local incrs = {}
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local f, by = ARGV[i], tonumber(ARGV[i + 1])
  local v = cur[f]
  local c = 0
  if v then
    if v ~= '0' and not (#v <= 17 and string.match(v, '^-?[1-9]%d*$')) then return {'counter', f} end
    c = tonumber(v)
  end
  local r = c + by
  if c > MAX or c < -MAX or r > MAX or r < -MAX then return {'counter', f} end
  cur[f] = string.format('%d', r)
  incrs[#incrs + 1] = f; incrs[#incrs + 1] = ARGV[i + 1]
  i = i + 2
end
local count, size = 0, 0
for k, v in pairs(cur) do count = count + 1; size = size + #k + #v end
if count > max_fields then return {'fields', tostring(count)} end
if size > max_bytes then return {'size', tostring(size)} end
if not existing then
  redis.call('HSET', key, '_created', string.format('%d', created))
  -- A new key gets its TTL at once: whatever happens next, it can never live for ever.
  redis.call('PEXPIRE', key, ttl)
  if #base > 0 then redis.call('HSET', key, unpack(base)) end
end
if #dels > 0 then redis.call('HDEL', key, unpack(dels)) end
if #sets > 0 then redis.call('HSET', key, unpack(sets)) end
for j = 1, #incrs, 2 do redis.call('HINCRBY', key, incrs[j], incrs[j + 1]) end
local version = redis.call('HINCRBY', key, '_v', 1)
redis.call('PEXPIRE', key, ttl)
local out = {'ok', string.format('%d', created), string.format('%d', version)}
if ARGV[i] == '1' then
  for k, v in pairs(cur) do out[#out + 1] = k; out[#out + 1] = v end
end
return out
"#
);

/// Settings of the Redis store.
#[derive(Clone)]
pub struct RedisSettings {
    /// `redis://`, `redis-cluster://` or `redis-sentinel://` URL (`rediss` for TLS); fred reads
    /// the topology from the scheme.
    pub url: String,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Bound on every call, including the wait for a reconnection.
    pub timeout: Duration,
    /// Session lifetimes.
    pub ttl: TtlPolicy,
    /// Field and size limits.
    pub limits: ProtocolConfig,
    /// Whether a change must reach a replica before it counts as stored.
    pub durability: Durability,
    /// ElastiCache IAM authentication: a signed token instead of a password, as the URL's user.
    pub iam: Option<IamAuth>,
    /// Sessions kept in the local cache (`--local-cache`); 0 for none.
    pub local_cache: usize,
    /// Bytes the local cache may hold, about (`--local-cache-bytes`).
    pub local_cache_bytes: u64,
    /// Where session loads go (`--read-from`).
    pub read_from: ReadFrom,
}

/// TCP settings of every connection to Redis: no Nagle delay, and keepalive probes, so that a
/// node that vanished without closing the connection (a failed host, a network partition) is
/// found by TCP itself, not after the kernel's 15 minutes.
fn tcp_config() -> TcpConfig {
    TcpConfig {
        nodelay: Some(true),
        keepalive: Some(
            fred::socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(5))
                .with_interval(Duration::from_secs(2)),
        ),
        ..Default::default()
    }
}

/// A connection with a write unanswered for three call timeouts (at least three seconds) is
/// closed and made again.
fn unresponsive(timeout: Duration) -> UnresponsiveConfig {
    UnresponsiveConfig {
        max_timeout: Some(timeout.max(Duration::from_secs(1)) * 3),
        interval: Duration::from_millis(500),
    }
}

/// Errors whose call provably did not run: the server refused it (a demoted primary, a server
/// still loading its data, a cluster in the middle of a change) or the client never sent it.
/// Such a call can be sent again without applying anything twice.
fn did_not_run(e: &fred::error::Error) -> bool {
    const REFUSALS: [&str; 5] = [
        "READONLY",
        "LOADING",
        "MASTERDOWN",
        "CLUSTERDOWN",
        "TRYAGAIN",
    ];
    const UNSENT: [&str; 3] = [
        "Failed to route command.",
        "Too many failed write attempts.",
        "Max attempts reached.",
    ];
    let details = e.details();
    REFUSALS.iter().any(|p| details.starts_with(p)) || UNSENT.contains(&details)
}

/// Errors that mean the node answering is no longer the primary.
fn topology_changed(e: &fred::error::Error) -> bool {
    ["READONLY", "MASTERDOWN"]
        .iter()
        .any(|p| e.details().starts_with(p))
}

/// What `INFO replication` says of the node answering.
struct ReplicationState {
    /// `master` or `slave`.
    role: String,
    /// The replication id: it changes when a replica is promoted.
    replid: String,
    /// Replicas connected to it.
    replicas: u64,
}

/// Reads `INFO replication` (allowed on ElastiCache, unlike `CONFIG`).
async fn replication_state<C: ServerInterface + Sync>(
    client: &C,
) -> Result<Option<ReplicationState>, fred::error::Error> {
    let info: String = client
        .info(Some(fred::types::InfoKind::Replication))
        .await?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
            .map(str::to_owned)
    };
    Ok(Some(ReplicationState {
        role: field("role").unwrap_or_default(),
        replid: field("master_replid").unwrap_or_default(),
        replicas: field("connected_slaves")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    }))
}

/// Twice a second, for as long as the store lives, asks the node the data client is on for its
/// role. A primary's count of replicas goes to `replicas` (an unknown count, no answer, is left as
/// it was). A node that says it is a replica was demoted by a failover and still answers the
/// loads, which write nothing and so are never refused with `READONLY`: the client is made to
/// reconnect, which finds the new primary. Not run on a cluster, where a demoted node answers a
/// read with `MOVED` to the new owner of the slot.
async fn watch_primary(
    client: Client,
    replicas: std::sync::Weak<std::sync::atomic::AtomicU64>,
    timeout: Duration,
    events: Arc<Events>,
) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(replicas) = replicas.upgrade() else {
            return;
        };
        if let Ok(Ok(Some(state))) = tokio::time::timeout(timeout, replication_state(&client)).await
        {
            if state.role == "master" {
                replicas.store(state.replicas, Ordering::Relaxed);
            } else {
                events.record(Metrics::store_topology_error);
                tracing::warn!(
                    "the redis node session loads go to is no longer the primary; reconnecting"
                );
                let _ = tokio::time::timeout(timeout, client.force_reconnection()).await;
            }
        }
    }
}

/// After a reconnection: the replication id of the primary now answering. A new one means a
/// failover happened (counted in `stickless_store_failovers_total`).
async fn notice_failover(
    client: &Client,
    timeout: Duration,
    seen: &std::sync::Mutex<Option<String>>,
    events: &Events,
) {
    let Ok(Ok(Some(state))) = tokio::time::timeout(timeout, replication_state(client)).await else {
        return;
    };
    if state.role != "master" {
        // A demoted node still answering on an old connection: the next reconnection finds
        // the primary.
        return;
    }
    let Ok(mut seen) = seen.lock() else {
        return;
    };
    if seen.as_ref().is_some_and(|old| *old != state.replid) {
        events.record(Metrics::store_failover);
        tracing::warn!("the redis primary changed (failover)");
    }
    *seen = Some(state.replid);
}

/// Keeps `cache` consistent with Redis: a connection of its own, in RESP3, with
/// `CLIENT TRACKING ON BCAST PREFIX <key-prefix>`, so that Redis sends it the name of every
/// session key that changes, expires or is deleted, whoever changed it. The cache answers only
/// while that channel is known to be up, and is emptied whenever it may have missed a message.
///
/// Why broadcast mode and a connection of its own rather than default tracking on the reading
/// connection: default mode tracks the keys each connection read (Redis 7 does track keys read
/// inside a script, checked with redis-server 7.0), but it would make the data connection RESP3
/// and would need tracking enabled again on every new data connection before its first read,
/// with invalidations arriving among the replies of requests. Broadcast mode does not depend on
/// which connection read what. Its cost: every instance receives the name of every changed
/// session, read by it or not (one short message per write per instance).
fn follow_invalidations(
    mut config: Config,
    settings: &RedisSettings,
    cache: &Arc<LocalCache>,
) -> Result<(), RedisSetupError> {
    config.version = fred::types::RespVersion::RESP3;
    let timeout = settings.timeout;
    let client = Builder::from_config(config)
        .with_performance_config(|p| p.default_command_timeout = timeout)
        .with_connection_config(|c| {
            c.connection_timeout = timeout.max(Duration::from_secs(2));
            c.internal_command_timeout = timeout.max(Duration::from_secs(2));
            c.reconnect_on_auth_error = true;
            c.tcp = tcp_config();
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
        .build()
        .map_err(RedisSetupError::Client)?;
    // A new connection has no tracking yet, and the old one may have lost messages.
    let on_reconnect = Arc::downgrade(cache);
    client.on_reconnect(move |_| {
        if let Some(cache) = on_reconnect.upgrade() {
            cache.set_down();
        }
        async { Ok(()) }
    });
    let on_error = Arc::downgrade(cache);
    client.on_error(move |_| {
        if let Some(cache) = on_error.upgrade() {
            cache.set_down();
        }
        async { Ok(()) }
    });
    let mut invalidations = client.invalidation_rx();
    let receiver = Arc::downgrade(cache);
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let received = invalidations.recv().await;
            let Some(cache) = receiver.upgrade() else {
                return;
            };
            match received {
                // No key: everything (FLUSHALL, FLUSHDB).
                Ok(message) if message.keys.is_empty() => cache.flush(),
                Ok(message) => {
                    for key in message.keys.iter().filter_map(|k| k.as_str()) {
                        cache.invalidate(key);
                    }
                }
                // Messages were dropped: any entry may be stale.
                Err(RecvError::Lagged(_)) => cache.flush(),
                Err(RecvError::Closed) => {
                    cache.set_down();
                    return;
                }
            }
        }
    });
    client.connect();
    tokio::spawn(keep_tracking(
        client,
        Arc::downgrade(cache),
        settings.key_prefix.clone(),
        timeout,
    ));
    Ok(())
}

/// How often the invalidation channel is checked while the cache is live, and how often
/// tracking is tried again while it is not.
const TRACKING_CHECK: Duration = Duration::from_millis(500);
const TRACKING_RETRY: Duration = Duration::from_millis(100);
/// The longest pause between attempts while Redis refuses to turn tracking on (a server older
/// than 6, an ACL without `CLIENT`): the cache stays off, and the attempts cost next to nothing.
const TRACKING_RETRY_MAX: Duration = Duration::from_secs(30);

/// Turns tracking on whenever the cache is not live (at start, after a reconnection or a failed
/// check), and checks the channel while it is: a connection that stopped answering may have
/// stopped delivering invalidations too.
async fn keep_tracking(
    client: Client,
    cache: std::sync::Weak<LocalCache>,
    prefix: String,
    timeout: Duration,
) {
    let mut failing = false;
    // Doubles with every refusal in a row, up to TRACKING_RETRY_MAX.
    let mut retry = TRACKING_RETRY;
    // The cluster primaries tracking was turned on on (empty for one server).
    let mut tracked = Vec::new();
    loop {
        let Some(cache) = cache.upgrade() else {
            return;
        };
        let pause = if cache.is_live() {
            // Also a role check: a primary demoted by a failover keeps answering, and its
            // invalidations stop covering the writes that now go to the new primary.
            match tokio::time::timeout(timeout, still_tracking(&client, &tracked)).await {
                Ok(Ok(false)) => {
                    tracing::warn!(
                        "the redis invalidation channel is on a demoted node, or the cluster's primaries changed; local cache dropped"
                    );
                    cache.set_down();
                    let _ = client.force_reconnection().await;
                }
                Ok(Ok(true)) => {}
                _ => {
                    tracing::warn!(
                        "the redis invalidation channel did not answer; local cache dropped"
                    );
                    cache.set_down();
                }
            }
            TRACKING_CHECK
        } else {
            let since = cache.epoch();
            match tokio::time::timeout(timeout, enable_tracking(&client, &prefix)).await {
                // Went down again meanwhile (a reconnection): the next turn tries again.
                Ok(Ok(_)) if !cache.go_live(since) => TRACKING_RETRY,
                Ok(Ok(nodes)) => {
                    tracked = nodes;
                    if failing {
                        tracing::info!("redis invalidations followed again; local cache on");
                    }
                    failing = false;
                    retry = TRACKING_RETRY;
                    TRACKING_CHECK
                }
                result => {
                    if !failing {
                        match result {
                            Ok(Err(e)) => tracing::warn!(error = %e, "could not turn on redis client tracking; local cache off until it can"),
                            _ => tracing::warn!("redis did not answer CLIENT TRACKING in time; local cache off until it does"),
                        }
                    }
                    failing = true;
                    let pause = retry;
                    retry = (retry * 2).min(TRACKING_RETRY_MAX);
                    pause
                }
            }
        };
        drop(cache);
        tokio::time::sleep(pause).await;
    }
}

/// A cluster's primaries as the client last read the slot map, in order; empty for one server.
fn cluster_primaries(client: &Client) -> Vec<fred::types::config::Server> {
    let mut primaries = if client.is_clustered() {
        client
            .cached_cluster_state()
            .map(|state| state.unique_primary_nodes())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    primaries.sort_by_key(|s| s.to_string());
    primaries
}

/// The nodes the invalidation client follows, each as a client bound to it: every primary of a
/// cluster (each node broadcasts the invalidations of its own slots only), or the one server.
fn tracked_nodes(client: &Client) -> Vec<fred::clients::WithOptions<Client>> {
    if client.is_clustered() {
        cluster_primaries(client)
            .into_iter()
            .map(|server| client.with_cluster_node(server))
            .collect()
    } else {
        vec![client.with_options(&Default::default())]
    }
}

/// Whether tracking is still on every primary: a cluster's slot map (read again) still names
/// the primaries it was turned on on, and every followed node still says it is a primary.
async fn still_tracking(
    client: &Client,
    tracked: &[fred::types::config::Server],
) -> Result<bool, fred::error::Error> {
    if client.is_clustered() {
        client.sync_cluster().await?;
        if cluster_primaries(client) != tracked {
            return Ok(false);
        }
    }
    all_primaries(client).await
}

/// Whether every node the invalidation client follows is still a primary (and answers).
async fn all_primaries(client: &Client) -> Result<bool, fred::error::Error> {
    let nodes = tracked_nodes(client);
    if nodes.is_empty() {
        return Ok(false);
    }
    for node in &nodes {
        if replication_state(node)
            .await?
            .is_some_and(|state| state.role != "master")
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Broadcast tracking of the session keys on the invalidation connection(s), which must be on
/// the primary (on every primary of a cluster): a demoted node is made to reconnect (and so to
/// find the new primary) first. Returns the cluster primaries followed (none for one server).
async fn enable_tracking(
    client: &Client,
    prefix: &str,
) -> Result<Vec<fred::types::config::Server>, fred::error::Error> {
    if client.is_clustered() {
        return enable_cluster_tracking(client, prefix).await;
    }
    if let Some(state) = replication_state(client).await? {
        if state.role != "master" {
            let _ = client.force_reconnection().await;
            return Err(fred::error::Error::new(
                fred::error::ErrorKind::IO,
                "the invalidation connection is not on the primary",
            ));
        }
    }
    // Off first: Redis refuses a prefix that overlaps one the connection already tracks.
    let _: Value = client
        .client_tracking(
            "off",
            None,
            Vec::<String>::new(),
            false,
            false,
            false,
            false,
        )
        .await?;
    client
        .start_tracking(prefix.to_owned(), true, false, false, false)
        .await?;
    Ok(Vec::new())
}

/// [`enable_tracking`] on a cluster: the slot map is read again, then every primary gets
/// `CLIENT TRACKING ON BCAST PREFIX` on this client's connection to it. (fred's own
/// `start_tracking` sends broadcast mode to one node only.)
async fn enable_cluster_tracking(
    client: &Client,
    prefix: &str,
) -> Result<Vec<fred::types::config::Server>, fred::error::Error> {
    client.sync_cluster().await?;
    if !all_primaries(client).await? {
        let _ = client.force_reconnection().await;
        return Err(fred::error::Error::new(
            fred::error::ErrorKind::IO,
            "the invalidation connections are not all on primaries",
        ));
    }
    let tracking = || CustomCommand::new_static("CLIENT", ClusterHash::Random, false);
    for node in tracked_nodes(client) {
        // Off first: Redis refuses a prefix that overlaps one the connection already tracks.
        let _: Value = node.custom(tracking(), vec!["TRACKING", "OFF"]).await?;
        let _: Value = node
            .custom(
                tracking(),
                vec!["TRACKING", "ON", "BCAST", "PREFIX", prefix],
            )
            .await?;
    }
    Ok(cluster_primaries(client))
}

/// A client of one replica, for session loads: the primary's connection settings, and its own
/// reconnection loop, so that a replica that fails never holds up a call to the primary.
fn replica_client(config: Config, timeout: Duration) -> Result<Client, fred::error::Error> {
    let client = Builder::from_config(config)
        .with_performance_config(|p| p.default_command_timeout = timeout)
        .with_connection_config(|c| {
            c.connection_timeout = timeout.max(Duration::from_secs(2));
            c.internal_command_timeout = timeout.max(Duration::from_secs(2));
            c.max_command_attempts = 1;
            c.reconnect_on_auth_error = true;
            c.tcp = tcp_config();
            c.unresponsive = unresponsive(timeout);
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
        .build()?;
    client.connect();
    Ok(client)
}

/// Where the client's connection events go: the metrics, once the server hands them over.
#[derive(Default)]
struct Events {
    metrics: std::sync::OnceLock<Metrics>,
    connected_before: AtomicBool,
}

impl Events {
    fn record(&self, count: fn(&Metrics)) {
        if let Some(m) = self.metrics.get() {
            count(m);
        }
    }
}

/// Sessions in Redis.
pub struct RedisStore {
    client: Client,
    settings: RedisSettings,
    clock: Arc<RedisClock>,
    events: Arc<Events>,
    /// On one primary (not a cluster): the replicas it had at the last look, refreshed twice a
    /// second, for `--durability replicated`. With none, a change is refused before it is sent: its
    /// `WAIT` could only time out, holding up every other call on the connection meanwhile.
    replicas: Arc<std::sync::atomic::AtomicU64>,
    /// The replication id of the primary last seen; a new one after a reconnection is a failover.
    replication_id: Arc<std::sync::Mutex<Option<String>>>,
    take: Script,
    restore: Script,
    destroy: Script,
    apply: Script,
    /// The local cache (`--local-cache`), kept consistent by [`follow_invalidations`].
    cache: Option<Arc<LocalCache>>,
    /// Loads from a replica (`--read-from replica`).
    replica: Option<Arc<ReplicaReader>>,
    renew: Script,
    /// Renewals of the idle TTL in flight ([`MAX_RENEWALS`]).
    renewals: Arc<Semaphore>,
}

/// What is known of Redis's clock: its offset from this machine's wall clock.
struct RedisClock {
    /// Redis's `TIME` minus the local wall clock, in milliseconds; [`RedisClock::UNKNOWN`] until
    /// first measured.
    offset_ms: AtomicI64,
    /// Set when a connection is (re)made: the server, and so its clock, may have changed. The
    /// next store call then measures again, in the background.
    stale: AtomicBool,
}

impl RedisClock {
    const UNKNOWN: i64 = i64::MIN;

    fn offset(&self) -> Option<i64> {
        Some(self.offset_ms.load(Ordering::Relaxed)).filter(|&o| o != Self::UNKNOWN)
    }

    fn set(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    /// Asks Redis for its `TIME` and records the offset, taking the middle of the round trip as
    /// the moment Redis read its clock (so the error is at most half the round trip).
    async fn measure(&self, client: &Client) -> Result<(), fred::error::Error> {
        let before = now_us();
        let reply: Vec<String> = client
            .custom(
                CustomCommand::new_static("TIME", ClusterHash::Random, false),
                Vec::<Value>::new(),
            )
            .await?;
        let after = now_us();
        let redis_us = match reply.as_slice() {
            [secs, micros] => secs
                .parse::<i64>()
                .ok()
                .zip(micros.parse::<i64>().ok())
                .map(|(s, us)| s * 1_000_000 + us),
            _ => None,
        };
        let Some(redis_us) = redis_us else {
            return Err(fred::error::Error::new(
                fred::error::ErrorKind::Protocol,
                "unexpected TIME reply",
            ));
        };
        let offset_ms = (redis_us - (before + after) / 2).div_euclid(1000);
        if let Some(old) = self.offset() {
            if (old - offset_ms).abs() > 100 {
                tracing::info!(
                    old_ms = old,
                    new_ms = offset_ms,
                    "redis clock offset changed"
                );
            }
        }
        self.set(offset_ms);
        Ok(())
    }
}

/// Microseconds since the Unix epoch on the local wall clock.
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// How long before the caller gives up a script must have started, for its reply to have time to
/// come back: the reply's network delay plus the error of the clock offset (half a round trip),
/// with room to spare on a healthy network, and never more than a quarter of the timeout.
fn deadline_margin(timeout: Duration) -> Duration {
    (timeout / 4).min(Duration::from_millis(50))
}

/// Why the Redis store could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// The URL is not one fred accepts.
    #[error("invalid Redis URL (expected redis://HOST[:PORT][/DB], redis-cluster://HOST[:PORT][?node=HOST:PORT...] or redis-sentinel://HOST[:PORT]?sentinelServiceName=NAME[&node=HOST:PORT...], each with optional USER:PASSWORD@, rediss for TLS)")]
    Url(#[source] fred::error::Error),
    /// The client could not be built.
    #[error("could not create the Redis client")]
    Client(#[source] fred::error::Error),
    /// `--durability replicated` on a primary with no replica: no write could ever be stored.
    #[error("replicated needs a replica, and the Redis primary has none connected; use acknowledged, or add a replica")]
    NoReplica,
    /// ElastiCache IAM authentication could not be set up.
    #[error(transparent)]
    Iam(#[from] IamSetupError),
    /// `--redis-iam` with a URL that names no user.
    #[error(
        "the ElastiCache user id goes in --redis-url as its username: rediss://USER-ID@HOST:PORT"
    )]
    IamNeedsUser,
}

impl RedisSetupError {
    /// The setting to change, spelled as its flag without the leading dashes.
    pub fn setting(&self) -> &'static str {
        match self {
            RedisSetupError::Url(_) | RedisSetupError::Client(_) => "redis-url",
            RedisSetupError::NoReplica => "durability",
            RedisSetupError::Iam(e) => e.setting(),
            RedisSetupError::IamNeedsUser => "redis-iam",
        }
    }
}

impl RedisStore {
    /// Creates the client and starts connecting in the background. A Redis that is down at
    /// start-up is not an error: calls fail with [`StoreError`] (and `/readyz` says not ready)
    /// until a reconnection succeeds.
    ///
    /// # Errors
    /// [`RedisSetupError`] for a URL that cannot be parsed.
    pub async fn connect(settings: RedisSettings) -> Result<Self, RedisSetupError> {
        let mut config = Config::from_url(&settings.url).map_err(RedisSetupError::Url)?;
        // Without this, fred gives up for good when the first connection fails; a sidecar often
        // starts before its store is reachable.
        config.fail_fast = false;
        if let Some(iam) = &settings.iam {
            let user = config
                .username
                .clone()
                .ok_or(RedisSetupError::IamNeedsUser)?;
            let credentials = IamCredentials::from_standard_chain(iam, user).await?;
            let request = credentials.request();
            tracing::info!(
                cache = %request.cache_name,
                user = %request.user_id,
                region = %request.region,
                serverless = request.serverless,
                "redis: ElastiCache IAM authentication"
            );
            // Fetched once now, so that the first connection does not wait for the instance
            // metadata; a failure is not fatal: every connection attempt asks again.
            if let Err(e) = credentials.credentials().await {
                tracing::warn!(error = %super::iam::Causes(&e), "no AWS credentials yet; retrying with every connection attempt");
            }
            config.password = None;
            config.credential_provider = Some(Arc::new(credentials));
        }
        let timeout = settings.timeout;
        let cache = (settings.local_cache > 0).then(|| {
            Arc::new(LocalCache::new(
                settings.local_cache,
                settings.local_cache_bytes,
                settings.ttl,
            ))
        });
        if let Some(cache) = &cache {
            follow_invalidations(config.clone(), &settings, cache)?;
        }
        let replica_config = config.clone();
        // No command timeout of fred's own: every call on this client is bounded by one timer of
        // ours (`bounded_until`, or `tokio::time::timeout` around the background checks), not
        // two. A call given up on is still answered by a script's deadline check in Redis.
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = timeout.max(Duration::from_secs(2));
                c.internal_command_timeout = timeout.max(Duration::from_secs(2));
                // A script whose connection dropped in flight may have run already: sending it
                // again could apply an increment twice. One attempt; the caller answers 503, or
                // sends it again itself when the error proves it did not run (`did_not_run`).
                c.max_command_attempts = 1;
                // A demoted primary keeps its connections and refuses every write: reconnect,
                // which resolves the endpoint's name again and so finds the new primary.
                c.reconnect_errors = vec![
                    ReconnectError::ReadOnly,
                    ReconnectError::Loading,
                    ReconnectError::MasterDown,
                    ReconnectError::ClusterDown,
                ];
                // ElastiCache may refuse credentials around a failover or a password rotation.
                c.reconnect_on_auth_error = true;
                c.tcp = tcp_config();
                c.unresponsive = unresponsive(timeout);
            })
            // Keep trying for ever: a sidecar outlives any failover of its store.
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
            .build()
            .map_err(RedisSetupError::Client)?;
        let events = Arc::new(Events::default());
        let on_error = events.clone();
        client.on_error(move |(error, server)| {
            if topology_changed(&error) {
                on_error.record(Metrics::store_topology_error);
            }
            async move {
                tracing::warn!(server = ?server.map(|s| s.to_string()), error = %error, "redis connection error");
                Ok(())
            }
        });
        let clock = Arc::new(RedisClock {
            offset_ms: AtomicI64::new(RedisClock::UNKNOWN),
            stale: AtomicBool::new(true),
        });
        let on_connect = clock.clone();
        let connections = events.clone();
        let reconnected = cache.clone();
        client.on_reconnect(move |server| {
            // Maybe a new primary, which the invalidation channel may not be connected to yet:
            // the cache is dropped until the channel is checked and tracking enabled again.
            if let Some(cache) = &reconnected {
                cache.set_down();
            }
            // Only a flag: measuring here would need the client inside its own callback.
            on_connect.stale.store(true, Ordering::Relaxed);
            // The first connection is not a reconnection.
            if connections.connected_before.swap(true, Ordering::Relaxed) {
                connections.record(Metrics::store_reconnected);
            }
            async move {
                tracing::info!(server = %server, "redis connected");
                Ok(())
            }
        });
        client.connect();
        match tokio::time::timeout(
            timeout.max(Duration::from_secs(2)),
            client.wait_for_connect(),
        )
        .await
        {
            Ok(Ok(())) => {
                // Measured before the first request, so that it already carries a deadline.
                match tokio::time::timeout(timeout, clock.measure(&client)).await {
                    Ok(Ok(())) => clock.stale.store(false, Ordering::Relaxed),
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not read the redis clock"),
                    Err(_) => tracing::warn!("redis did not answer TIME in time"),
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "redis is not reachable yet; retrying in the background")
            }
            Err(_) => tracing::warn!("redis did not answer in time; retrying in the background"),
        }
        let replication_id = Arc::new(std::sync::Mutex::new(None));
        if client.is_connected() {
            if let Ok(Ok(Some(state))) =
                tokio::time::timeout(timeout, replication_state(&client)).await
            {
                if settings.durability == Durability::Replicated && state.replicas == 0 {
                    return Err(RedisSetupError::NoReplica);
                }
                if let Ok(mut r) = replication_id.lock() {
                    *r = Some(state.replid);
                }
            }
        }
        let replica = (settings.read_from == ReadFrom::Replica).then(|| {
            let reader = Arc::new(ReplicaReader::default());
            tokio::spawn(ReplicaReader::watch(
                Arc::downgrade(&reader),
                client.clone(),
                replica_config,
                timeout,
                move |config| replica_client(config, timeout),
            ));
            reader
        });
        let replicas = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        if !client.is_clustered() {
            tokio::spawn(watch_primary(
                client.clone(),
                Arc::downgrade(&replicas),
                timeout,
                events.clone(),
            ));
        }
        Ok(RedisStore {
            client,
            clock,
            events,
            replicas,
            replication_id,
            take: Script::from_lua(TAKE),
            restore: Script::from_lua(RESTORE),
            destroy: Script::from_lua(DESTROY),
            apply: Script::from_lua(APPLY),
            renew: Script::from_lua(RENEW),
            renewals: Arc::new(Semaphore::new(MAX_RENEWALS)),
            settings,
            cache,
            replica,
        })
    }

    /// Reads a session for a user who has seen `min_version` of it: from the replica when there
    /// is one that has a copy at least that new, from the primary otherwise.
    async fn read(
        &self,
        key: String,
        min_version: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Loaded, StoreError> {
        let Some(replica) = &self.replica else {
            return self.load_from_redis(key, deadline).await;
        };
        let budget = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(self.settings.timeout / 2);
        let copy = match replica.read(&key, budget).await {
            Ok((hash, pttl)) => read::judge(
                hash,
                pttl,
                &self.settings.ttl,
                self.renewal_slack(),
                now_ms(),
            ),
            Err(Unavailable::NoReplica | Unavailable::Failed | Unavailable::Paused) => {
                self.events
                    .record(|m| m.replica_read(ReplicaRead::PrimaryFallback));
                return self.load_from_redis(key, deadline).await;
            }
        };
        // The user's own last change has not reached the replica yet: a new session not
        // replicated at all, or an older copy of it.
        let behind = match &copy.loaded {
            Loaded::Live(session) => session.version < min_version,
            Loaded::Absent => min_version > 0,
            Loaded::Rotated => false,
        };
        if behind {
            self.events.record(|m| m.replica_read(ReplicaRead::Behind));
            return self.load_from_redis(key, deadline).await;
        }
        self.events.record(|m| m.replica_read(ReplicaRead::Replica));
        if let Some(ttl) = copy.renew {
            self.renew_in_background(key, ttl);
        }
        Ok(copy.loaded)
    }

    /// How far below its full value a session's TTL may fall before a read renews it: an eighth
    /// of the idle timeout, the longest the local cache keeps a copy. A renewal is a write, and
    /// every write invalidates the session in every instance's cache.
    fn renewal_slack(&self) -> Duration {
        self.settings.ttl.idle / 8
    }

    /// Renews a session's TTL on the primary, without holding up the read that found it due:
    /// a renewal that fails, or finds too many others in flight, is left to the next read.
    fn renew_in_background(&self, key: String, ttl: Duration) {
        let Ok(permit) = self.renewals.clone().try_acquire_owned() else {
            return;
        };
        let (client, script, timeout) = (
            self.client.clone(),
            self.renew.clone(),
            self.settings.timeout,
        );
        tokio::spawn(async move {
            let args = vec![Value::Integer(0), Value::Integer(ttl.as_millis() as i64)];
            let renewed = tokio::time::timeout(
                timeout,
                script.evalsha_with_reload::<Value, _, _>(&client, key, args),
            )
            .await;
            drop(permit);
            if !matches!(renewed, Ok(Ok(_))) {
                tracing::debug!(
                    "a session TTL renewal on the primary failed; the next read tries again"
                );
            }
        });
    }

    /// Reads a session from the primary: `HGETALL` and `PTTL` in one round trip, by `deadline`
    /// (the store timeout from the start of the load), and a renewal of its TTL in the background
    /// when one is due. A read that the server refused (`LOADING`, a cluster in the middle of a
    /// change) is sent once more on the new connection within the same bound.
    async fn load_from_redis(
        &self,
        key: String,
        deadline: tokio::time::Instant,
    ) -> Result<Loaded, StoreError> {
        self.remeasure_if_reconnected();
        let (hash, pttl) = match self.read_until(&key, deadline).await {
            Ok(reply) => reply,
            Err(Some(e)) if did_not_run(&e) => {
                self.events.record(Metrics::store_retried);
                tracing::debug!(error = %e, "redis refused a session read; sending it once more");
                self.read_until(&key, deadline)
                    .await
                    .map_err(|e| self.error(e))?
            }
            Err(e) => return Err(self.error(e)),
        };
        let judged = read::judge(
            hash,
            pttl,
            &self.settings.ttl,
            self.renewal_slack(),
            now_ms(),
        );
        if let Some(ttl) = judged.renew {
            self.renew_in_background(key, ttl);
        }
        Ok(judged.loaded)
    }

    /// `HGETALL` and `PTTL` of `key` until `deadline`, bounded like [`RedisStore::evalsha_until`]
    /// by fred's own per-command timeout, the one timer on the call. `None` for a timeout.
    async fn read_until(
        &self,
        key: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(Vec<(String, String)>, i64), Option<fred::error::Error>> {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(None);
        }
        let options = fred::types::config::Options {
            timeout: Some(left),
            ..Default::default()
        };
        let pipeline = fred::clients::Pipeline::from(self.client.with_options(&options));
        read::hash_and_pttl(pipeline, key)
            .await
            .map_err(|e| (*e.kind() != fred::error::ErrorKind::Timeout).then_some(e))
    }

    /// Runs a change of the session under `id`, dropping it from the local cache before and
    /// after: this instance's next read sees the change without waiting for the invalidation,
    /// and a read that raced with the change cannot keep the old copy.
    async fn changing<F, T>(&self, id: &SessionId, change: impl FnOnce(String) -> F) -> T
    where
        F: std::future::Future<Output = T>,
    {
        let key = self.key(id);
        let Some(cache) = &self.cache else {
            return change(key).await;
        };
        cache.invalidate(&key);
        let result = change(key.clone()).await;
        cache.invalidate(&key);
        result
    }

    fn key(&self, id: &SessionId) -> String {
        let mut k = String::with_capacity(self.settings.key_prefix.len() + id.as_str().len());
        k.push_str(&self.settings.key_prefix);
        k.push_str(id.as_str());
        k
    }

    /// Bounds a call by the store timeout (the only timer on the call: fred's own command timeout
    /// is off for this client).
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        self.bounded_until(deadline, call)
            .await
            .map_err(|e| self.error(e))
    }

    /// Runs a call until `deadline`; fred's error as it is, or `None` for a timeout.
    async fn bounded_until<T>(
        &self,
        deadline: tokio::time::Instant,
        call: impl std::future::Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, Option<fred::error::Error>> {
        match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if *e.kind() == fred::error::ErrorKind::Timeout => Err(None),
            Ok(Err(e)) => Err(Some(e)),
            Err(_) => Err(None),
        }
    }

    fn error(&self, e: Option<fred::error::Error>) -> StoreError {
        match e {
            None => StoreError::Timeout(self.settings.timeout),
            Some(e) => StoreError::Backend(Box::new(e)),
        }
    }

    /// Runs a script whose `ARGV[1]` is a placeholder for the deadline, which is filled in here,
    /// as late as possible. A script that reports it started after its deadline changed nothing:
    /// that is [`StoreError::Late`]. Every script here writes, so with
    /// [`Durability::Replicated`] it waits for a replica.
    async fn eval(
        &self,
        script: &Script,
        key: String,
        mut args: Vec<Value>,
    ) -> Result<Vec<Value>, StoreError> {
        self.remeasure_if_reconnected();
        let timeout = self.settings.timeout;
        let budget = timeout.saturating_sub(deadline_margin(timeout));
        let started = Instant::now();
        let sent_us = now_us();
        if let Some(first) = args.first_mut() {
            // Without a measured offset there is no deadline (0): the script always acts.
            *first = Value::Integer(self.clock.offset().map_or(0, |offset| {
                sent_us.div_euclid(1000) + offset + budget.as_millis() as i64
            }));
        }
        let deadline = tokio::time::Instant::from_std(started) + timeout;
        let replicated = self.settings.durability == Durability::Replicated;
        if replicated && self.replicas.load(Ordering::Relaxed) == 0 {
            return Err(StoreError::NotReplicated);
        }
        let call = || async {
            if replicated {
                self.bounded_until(
                    deadline,
                    self.script_then_wait(script, &key, &args, deadline),
                )
                .await
                .map(|(reply, acked)| (reply, Some(acked)))
            } else {
                self.evalsha_until(script, &key, &args, deadline)
                    .await
                    .map(|reply| (reply, None))
            }
        };
        let (reply, acked) = match call().await {
            Ok(reply) => reply,
            // Refused (a demoted primary, a loading replica) or never sent: it did not run, and
            // the client is reconnecting. Once more on the new connection, within the deadline.
            Err(Some(e)) if did_not_run(&e) => {
                self.events.record(Metrics::store_retried);
                tracing::debug!(error = %e, "redis refused a script that did not run; sending it once more");
                call().await.map_err(|e| self.error(e))?
            }
            Err(e) => return Err(self.error(e)),
        };

        if reply.first().and_then(text).as_deref() == Some("late") {
            if started.elapsed() < budget {
                // Late by Redis's clock but not by ours: the offset is wrong (a failover to a
                // server with another clock, a clock step). The reply carries Redis's time.
                if let Some(redis_ms) = reply
                    .get(1)
                    .and_then(text)
                    .and_then(|t| t.parse::<i64>().ok())
                {
                    let mid_ms = (sent_us + now_us()).div_euclid(2_000);
                    self.clock.set(redis_ms - mid_ms);
                    in_request(|| {
                        tracing::warn!("a redis script was refused as late by a wrong clock offset; offset measured again")
                    });
                }
            }
            return Err(StoreError::Late(timeout));
        }
        if acked.is_some_and(|n| n < 1) {
            return Err(StoreError::NotReplicated);
        }
        Ok(reply)
    }

    /// `EVALSHA` of `script` until `deadline`, loading the script first when the server does not
    /// know it (a restarted or newly promoted server). The bound is fred's own per-command timeout,
    /// the one timer on the call: a command given up on while it waits for a reconnection is then
    /// dropped by fred instead of being sent later.
    async fn evalsha_until(
        &self,
        script: &Script,
        key: &str,
        args: &[Value],
        deadline: tokio::time::Instant,
    ) -> Result<Vec<Value>, Option<fred::error::Error>> {
        let send = || {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let options = fred::types::config::Options {
                timeout: Some(left),
                ..Default::default()
            };
            // As a custom command: fred's script interface is not one that takes options.
            let mut eval_args = Vec::with_capacity(args.len() + 3);
            eval_args.push(Value::from(script.sha1().clone()));
            eval_args.push(Value::Integer(1));
            eval_args.push(Value::from(key));
            eval_args.extend_from_slice(args);
            let slot = fred::util::redis_keyslot(key.as_bytes());
            Some(async move {
                self.client
                    .with_options(&options)
                    .custom::<Vec<Value>, _>(
                        CustomCommand::new_static("EVALSHA", ClusterHash::Custom(slot), false),
                        eval_args,
                    )
                    .await
            })
        };
        let classify =
            |e: fred::error::Error| (*e.kind() != fred::error::ErrorKind::Timeout).then_some(e);
        match send().ok_or(None)?.await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                self.bounded_until(deadline, script.load(&self.client))
                    .await?;
                send().ok_or(None)?.await.map_err(classify)
            }
            result => result.map_err(classify),
        }
    }

    /// The script and `WAIT 1` in one pipeline, and so on one connection: WAIT counts the
    /// replicas that have this connection's writes, and a WAIT sent on another connection (after
    /// a reconnection between the two) would vouch for nothing. Returns the script's reply and
    /// how many replicas have it. A script unknown to a new server is loaded, and the pair sent
    /// again.
    async fn script_then_wait(
        &self,
        script: &Script,
        key: &str,
        args: &[Value],
        deadline: tokio::time::Instant,
    ) -> Result<(Vec<Value>, i64), fred::error::Error> {
        let left_ms = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .as_millis()
            .max(1) as i64;
        // WAIT has no key: it goes to the node that holds this one.
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let send = || async {
            let pipeline = self.client.pipeline();
            // EVALSHA as a custom command: fred's pipelines have no script interface.
            let mut eval_args = Vec::with_capacity(args.len() + 3);
            eval_args.push(Value::from(script.sha1().clone()));
            eval_args.push(Value::Integer(1));
            eval_args.push(Value::from(key));
            eval_args.extend_from_slice(args);
            let _: () = pipeline
                .custom(
                    CustomCommand::new_static("EVALSHA", ClusterHash::Custom(slot), false),
                    eval_args,
                )
                .await?;
            let _: () = pipeline
                .custom(
                    CustomCommand::new_static("WAIT", ClusterHash::Custom(slot), true),
                    vec![Value::Integer(1), Value::Integer(left_ms)],
                )
                .await?;
            let mut results = pipeline.try_all::<Value>().await.into_iter();
            let reply = results.next().unwrap_or_else(|| {
                Err(fred::error::Error::new(
                    fred::error::ErrorKind::Protocol,
                    "no reply to the script",
                ))
            });
            let acked = results.next().unwrap_or(Ok(Value::Integer(0)))?;
            Ok::<_, fred::error::Error>((reply, acked.convert::<i64>().unwrap_or(0)))
        };
        let (reply, acked) = send().await?;
        let (reply, acked) = match reply {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                script.load(&self.client).await?;
                let (reply, acked) = send().await?;
                (reply?, acked)
            }
            other => (other?, acked),
        };
        Ok((reply.convert()?, acked))
    }

    /// The first call after a (re)connection measures the clock offset again, and notices whether
    /// the primary changed, in the background.
    fn remeasure_if_reconnected(&self) {
        if self.clock.stale.swap(false, Ordering::Relaxed) {
            self.remeasure_in_background();
        }
    }

    /// After a (re)connection: the clock offset again, and whether the primary changed.
    fn remeasure_in_background(&self) {
        let (client, clock, timeout) = (
            self.client.clone(),
            self.clock.clone(),
            self.settings.timeout,
        );
        let (seen, events) = (self.replication_id.clone(), self.events.clone());
        tokio::spawn(async move {
            notice_failover(&client, timeout, &seen, &events).await;
            match tokio::time::timeout(timeout, clock.measure(&client)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    clock.stale.store(true, Ordering::Relaxed);
                    tracing::warn!(error = %e, "could not read the redis clock")
                }
                Err(_) => clock.stale.store(true, Ordering::Relaxed),
            }
        });
    }

    /// The deadline's place in a script's arguments, filled in by [`RedisStore::eval`].
    fn deadline_placeholder() -> Value {
        Value::Integer(0)
    }

    fn ttl_args(&self, now: u64) -> [Value; 3] {
        let abs = self
            .settings
            .ttl
            .absolute
            .map_or(0, |d| d.as_millis() as i64);
        [
            Value::Integer(now as i64),
            Value::Integer(self.settings.ttl.idle.as_millis() as i64),
            Value::Integer(abs),
        ]
    }
}

/// Turns a script's reply, a status word and then a flat HGETALL, into a session: `None` for
/// the word `absent`.
fn session_from_reply(
    mut reply: Vec<Value>,
    found: &'static str,
) -> Result<Option<Session>, StoreError> {
    let status = if reply.is_empty() {
        None
    } else {
        text(&reply.remove(0))
    };
    match status.as_deref() {
        Some("absent") => return Ok(None),
        Some(s) if s == found => {}
        _ => return Err(StoreError::Unexpected("unknown read result")),
    }
    if !reply.len().is_multiple_of(2) {
        return Err(StoreError::Unexpected("odd-length hash reply"));
    }
    let mut fields = Fields::new();
    let mut created_ms = now_ms();
    let mut version = 0;
    let mut it = reply.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let k = text(&k).ok_or(StoreError::Unexpected("non-string hash field"))?;
        let v = text(&v).ok_or(StoreError::Unexpected("non-string hash value"))?;
        if k == CREATED_FIELD {
            created_ms = v.parse().unwrap_or(created_ms);
        } else if k == VERSION_FIELD {
            version = v.parse().unwrap_or(0);
        } else if k != ROTATED_FIELD {
            fields.insert(k, v);
        }
    }
    Ok(Some(Session {
        fields: fields.into(),
        created_ms,
        version,
    }))
}

/// The session an applied change left, from the script's reply when it carries the fields:
/// `{'ok', created_ms, version, name, value, ...}`. `None` for any other reply.
fn written_session(reply: &[Value]) -> Option<Session> {
    let [status, created, version, pairs @ ..] = reply else {
        return None;
    };
    if text(status).as_deref() != Some("ok") || !pairs.len().is_multiple_of(2) {
        return None;
    }
    let mut fields = Fields::new();
    for pair in pairs.chunks_exact(2) {
        fields.insert(text(&pair[0])?, text(&pair[1])?);
    }
    Some(Session {
        fields: fields.into(),
        created_ms: text(created)?.parse().ok()?,
        version: text(version)?.parse().ok()?,
    })
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Integer(i) => Some(i.to_string()),
        // Values are written as UTF-8; anything else was written around stickless.
        v => v
            .as_bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn load(&self, id: &SessionId) -> Result<Loaded, StoreError> {
        self.load_since(id, 0).await
    }

    async fn load_since(&self, id: &SessionId, min_version: u64) -> Result<Loaded, StoreError> {
        let key = self.key(id);
        // One bound for the whole load, a wait for another request's read included; read from
        // the clock only when the load is not served from the cache at once.
        let timeout = self.settings.timeout;
        let by = |deadline: Option<tokio::time::Instant>| {
            deadline.unwrap_or_else(|| tokio::time::Instant::now() + timeout)
        };
        let Some(cache) = &self.cache else {
            return self.read(key, min_version, by(None)).await;
        };
        let (mut joined, mut deadline) = (false, None);
        // Reserved before the read is sent: an invalidation that arrives meanwhile cancels it.
        let fill = loop {
            match cache.lookup(&key, min_version, joined) {
                Lookup::Hit(session) => return Ok(Loaded::Live(session)),
                Lookup::Load(fill) => break fill,
                Lookup::Wait(pending) => {
                    // Woken when that read (or a change made here) ends, kept or not; served
                    // what it found, even if an invalidation has dropped it since; otherwise
                    // (it failed) looked up again, and read here.
                    let until = by(deadline);
                    deadline = Some(until);
                    let Ok(found) = tokio::time::timeout_at(until, pending.ended()).await else {
                        // The whole bound went on waiting: no read of its own now.
                        return Err(StoreError::Timeout(timeout));
                    };
                    if let Some(loaded) = cache.handed_over(found, min_version) {
                        return Ok(loaded);
                    }
                    joined = true;
                }
            }
        };
        let loaded = self.read(key, min_version, by(deadline)).await;
        if let Some(fill) = fill {
            match &loaded {
                Ok(Loaded::Live(session)) => {
                    cache.finish_fill(fill, Some(session.clone()));
                }
                // From the primary, unless a replica answered a user with no version cookie.
                Ok(Loaded::Absent) => {
                    cache.finish_absent(fill, self.replica.is_none() || min_version > 0)
                }
                _ => {
                    cache.finish_fill(fill, None);
                }
            }
        }
        loaded
    }

    async fn apply(
        &self,
        id: &SessionId,
        target: Target<'_>,
        changes: &Changes,
    ) -> Result<Applied, StoreError> {
        let [now, idle, abs] = self.ttl_args(now_ms());
        let existing = matches!(target, Target::Existing);
        let (mode, created, base) = match target {
            Target::Existing => ("existing", String::new(), None),
            Target::New { base } => (
                "new",
                base.map(|b| b.created_ms.to_string()).unwrap_or_default(),
                base,
            ),
        };
        let mut args: Vec<Value> = Vec::with_capacity(
            13 + 2 * (changes.set.len() + changes.incr.len()) + changes.delete.len(),
        );
        args.extend([
            Self::deadline_placeholder(),
            mode.into(),
            now,
            idle,
            abs,
            Value::Integer(self.settings.limits.max_fields as i64),
            Value::Integer(self.settings.limits.max_session_bytes as i64),
            created.into(),
        ]);
        let base_fields = base.map(|b| &*b.fields);
        args.push(Value::Integer(base_fields.map_or(0, |f| f.len()) as i64));
        for (k, v) in base_fields.into_iter().flatten() {
            args.push(k.as_str().into());
            args.push(v.as_str().into());
        }
        args.push(Value::Integer(changes.delete.len() as i64));
        args.extend(changes.delete.iter().map(|k| Value::from(k.as_str())));
        args.push(Value::Integer(changes.set.len() as i64));
        for (k, v) in &changes.set {
            args.push(k.as_str().into());
            args.push(v.as_str().into());
        }
        args.push(Value::Integer(changes.incr.len() as i64));
        for (k, by) in &changes.incr {
            args.push(k.as_str().into());
            args.push(Value::Integer(*by));
        }
        // With the cache live, a change of a session this instance holds (or has room for) takes
        // its slot: the reads of it that arrive while the change is in flight wait for it and
        // are served what it wrote (the script returns the fields), instead of each reading
        // Redis. A new session has no readers yet, and takes no slot.
        let key = self.key(id);
        let fill = match &self.cache {
            Some(cache) if existing => cache.begin_change(&key),
            _ => None,
        };
        args.push(Value::Integer(i64::from(fill.is_some())));
        let reply = match (&self.cache, fill) {
            (Some(cache), Some(fill)) => {
                let reply = self.eval(&self.apply, key, args).await;
                let written = reply.as_ref().ok().and_then(|r| written_session(r));
                // If a load took the slot meanwhile (after an invalidation, this change's own
                // included), it is kept unless it read the session before this change ran: the
                // cache keeps no copy older than the version written here.
                cache.finish_fill(fill, written);
                reply?
            }
            _ => {
                self.changing(id, |key| self.eval(&self.apply, key, args))
                    .await?
            }
        };
        let words: Vec<String> = reply.iter().take(3).filter_map(text).collect();
        let number = |i: usize| words.get(i).and_then(|s| s.parse::<u64>().ok());
        match words.first().map(String::as_str) {
            Some("ok") => Ok(Applied::Stored {
                created_ms: number(1)
                    .ok_or(StoreError::Unexpected("apply without creation time"))?,
                version: number(2).ok_or(StoreError::Unexpected("apply without version"))?,
            }),
            Some("gone") => Ok(Applied::Gone),
            Some("counter") => Ok(Applied::Rejected(Rejection::NotACounter {
                name: words.get(1).cloned().unwrap_or_default(),
            })),
            Some("fields") => Ok(Applied::Rejected(Rejection::TooManyFields {
                count: number(1).unwrap_or_default() as usize,
                max: self.settings.limits.max_fields,
            })),
            Some("size") => Ok(Applied::Rejected(Rejection::TooLarge {
                size: number(1).unwrap_or_default() as usize,
                max: self.settings.limits.max_session_bytes,
            })),
            _ => Err(StoreError::Unexpected("unknown apply result")),
        }
    }

    async fn take(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let args = vec![
            Self::deadline_placeholder(),
            Value::Integer(self.settings.ttl.rotation_grace.as_millis() as i64),
            Value::Integer(now_ms() as i64),
        ];
        let reply = self
            .changing(id, |key| self.eval(&self.take, key, args))
            .await?;
        session_from_reply(reply, "taken")
    }

    async fn restore(&self, id: &SessionId) -> Result<Applied, StoreError> {
        let mut args = vec![Self::deadline_placeholder()];
        args.extend(self.ttl_args(now_ms()));
        let reply = self
            .changing(id, |key| self.eval(&self.restore, key, args))
            .await?;
        let words: Vec<String> = reply.iter().filter_map(text).collect();
        match words.first().map(String::as_str) {
            Some("ok") => Ok(Applied::Stored {
                created_ms: words
                    .get(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or(StoreError::Unexpected("restore without creation time"))?,
                version: words.get(2).and_then(|s| s.parse().ok()).unwrap_or(0),
            }),
            Some("gone") => Ok(Applied::Gone),
            _ => Err(StoreError::Unexpected("unknown restore result")),
        }
    }

    async fn destroy(&self, id: &SessionId) -> Result<(), StoreError> {
        let args = vec![Self::deadline_placeholder()];
        self.changing(id, |key| self.eval(&self.destroy, key, args))
            .await
            .map(|_| ())
    }

    /// Reads Redis's `TIME`: an answer shows that Redis is up, and it refreshes the clock offset
    /// that deadlines are computed with.
    async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(self.clock.measure(&self.client)).await
    }

    fn serves_copies(&self) -> bool {
        self.cache.is_some() || self.replica.is_some()
    }

    fn record_into(&self, metrics: &Metrics) {
        if let Some(cache) = &self.cache {
            cache.record_into(metrics);
        }
        let _ = self.events.metrics.set(metrics.clone());
    }
}
