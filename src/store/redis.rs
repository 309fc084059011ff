//! The Redis store: Amazon ElastiCache, Redis or Valkey, through fred.
//!
//! A session is one hash under `<key-prefix><id>`; its creation time is the hash field
//! [`CREATED_FIELD`]. Every operation is one Lua script on one key, so it is atomic, costs one
//! round trip, and works unchanged on a cluster (one key, one slot). Scripts go by `EVALSHA` and
//! are loaded again after a `NOSCRIPT` (a restarted or newly promoted server has an empty script
//! cache). Nothing here needs `CONFIG` or any other command that ElastiCache disables.

use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::Value;

use super::{now_ms, Applied, Session, SessionStore, StoreError, Target, CREATED_FIELD};
use crate::config::{ProtocolConfig, TtlPolicy};
use crate::cookie::SessionId;
use crate::protocol::{Changes, Fields, Rejection};

/// Reads a session and renews its TTL, cut short by the absolute timeout.
/// ARGV: now_ms, idle_ms, absolute_ms (0 for none).
const LOAD: &str = r#"
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return h end
local created
for i = 1, #h, 2 do
  if h[i] == '_created' then created = tonumber(h[i + 1]) break end
end
local ttl = tonumber(ARGV[2])
local abs = tonumber(ARGV[3])
if abs > 0 and created then
  local left = created + abs - tonumber(ARGV[1])
  if left <= 0 then
    redis.call('DEL', KEYS[1])
    return {}
  end
  if left < ttl then ttl = left end
end
redis.call('PEXPIRE', KEYS[1], ttl)
return h
"#;

/// Reads and deletes a session (the first half of a rotation).
const TAKE: &str = r#"
local h = redis.call('HGETALL', KEYS[1])
if #h > 0 then redis.call('DEL', KEYS[1]) end
return h
"#;

/// Applies changes all or nothing: first works out the resulting session and checks it, then
/// writes field by field (HDEL, HSET, HINCRBY) and renews the TTL. It mirrors
/// `protocol::apply_to_fields`, which the memory store runs.
/// ARGV: mode ('existing' | 'new'), now_ms, idle_ms, absolute_ms, max_fields, max_bytes,
/// created_ms (new sessions; '' for now), then counted lists: base pairs, deletes, set pairs,
/// incr pairs.
const APPLY: &str = r#"
local key = KEYS[1]
local existing = ARGV[1] == 'existing'
local now = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local abs = tonumber(ARGV[4])
local max_fields = tonumber(ARGV[5])
local max_bytes = tonumber(ARGV[6])
local MAX = 9007199254740991
local cur = {}
local created
if existing then
  local h = redis.call('HGETALL', key)
  if #h == 0 then return {'gone'} end
  for i = 1, #h, 2 do
    if h[i] == '_created' then created = tonumber(h[i + 1]) else cur[h[i]] = h[i + 1] end
  end
  created = created or now
else
  created = tonumber(ARGV[7]) or now
end
if abs > 0 then
  local left = created + abs - now
  if left <= 0 then
    redis.call('DEL', key)
    return {'gone'}
  end
  if left < ttl then ttl = left end
end
local i = 8
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
redis.call('PEXPIRE', key, ttl)
return {'ok', string.format('%d', created)}
"#;

/// Settings of the Redis store.
#[derive(Clone)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL.
    pub url: String,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Bound on every call, including the wait for a reconnection.
    pub timeout: Duration,
    /// Session lifetimes.
    pub ttl: TtlPolicy,
    /// Field and size limits.
    pub limits: ProtocolConfig,
}

/// Sessions in Redis.
pub struct RedisStore {
    client: Client,
    settings: RedisSettings,
    load: Script,
    take: Script,
    apply: Script,
}

/// Why the Redis store could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// The URL is not one fred accepts.
    #[error(
        "invalid Redis URL (expected redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] or rediss://...)"
    )]
    Url(#[source] fred::error::Error),
    /// The client could not be built.
    #[error("could not create the Redis client")]
    Client(#[source] fred::error::Error),
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
        let timeout = settings.timeout;
        let client = Builder::from_config(config)
            .with_performance_config(|p| p.default_command_timeout = timeout)
            .with_connection_config(|c| {
                c.connection_timeout = timeout.max(Duration::from_secs(2));
                c.internal_command_timeout = timeout.max(Duration::from_secs(2));
                // A script whose connection dropped in flight may have run already: sending it
                // again could apply an increment twice. One attempt; the caller answers 503.
                c.max_command_attempts = 1;
                c.tcp = TcpConfig {
                    nodelay: Some(true),
                    ..Default::default()
                };
            })
            // Keep trying for ever: a sidecar outlives any failover of its store.
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
            .build()
            .map_err(RedisSetupError::Client)?;
        client.on_error(|(error, server)| async move {
            tracing::warn!(server = ?server.map(|s| s.to_string()), error = %error, "redis connection error");
            Ok(())
        });
        client.on_reconnect(|server| async move {
            tracing::info!(server = %server, "redis connected");
            Ok(())
        });
        client.connect();
        match tokio::time::timeout(
            timeout.max(Duration::from_secs(2)),
            client.wait_for_connect(),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "redis is not reachable yet; retrying in the background")
            }
            Err(_) => tracing::warn!("redis did not answer in time; retrying in the background"),
        }
        Ok(RedisStore {
            client,
            load: Script::from_lua(LOAD),
            take: Script::from_lua(TAKE),
            apply: Script::from_lua(APPLY),
            settings,
        })
    }

    fn key(&self, id: &SessionId) -> String {
        let mut k = String::with_capacity(self.settings.key_prefix.len() + id.as_str().len());
        k.push_str(&self.settings.key_prefix);
        k.push_str(id.as_str());
        k
    }

    /// Bounds a call by the store timeout. fred's own command timeout is the same bound, so a
    /// timeout from either side is reported the same way.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, StoreError> {
        let timeout = self.settings.timeout;
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if *e.kind() == fred::error::ErrorKind::Timeout => {
                Err(StoreError::Timeout(timeout))
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }

    async fn run(
        &self,
        script: &Script,
        key: String,
        args: Vec<Value>,
    ) -> Result<Vec<Value>, StoreError> {
        self.bounded(script.evalsha_with_reload::<Vec<Value>, _, _>(&self.client, key, args))
            .await
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

/// Turns a flat HGETALL reply into a session.
fn session_from_reply(reply: Vec<Value>) -> Result<Option<Session>, StoreError> {
    if reply.is_empty() {
        return Ok(None);
    }
    if !reply.len().is_multiple_of(2) {
        return Err(StoreError::Unexpected("odd-length hash reply"));
    }
    let mut fields = Fields::new();
    let mut created_ms = now_ms();
    let mut it = reply.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let k = text(&k).ok_or(StoreError::Unexpected("non-string hash field"))?;
        let v = text(&v).ok_or(StoreError::Unexpected("non-string hash value"))?;
        if k == CREATED_FIELD {
            created_ms = v.parse().unwrap_or(created_ms);
        } else {
            fields.insert(k, v);
        }
    }
    Ok(Some(Session { fields, created_ms }))
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
    async fn load(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let reply = self
            .run(&self.load, self.key(id), self.ttl_args(now_ms()).to_vec())
            .await?;
        session_from_reply(reply)
    }

    async fn apply(
        &self,
        id: &SessionId,
        target: Target<'_>,
        changes: &Changes,
    ) -> Result<Applied, StoreError> {
        let [now, idle, abs] = self.ttl_args(now_ms());
        let (mode, created, base) = match target {
            Target::Existing => ("existing", String::new(), None),
            Target::New { base } => (
                "new",
                base.map(|b| b.created_ms.to_string()).unwrap_or_default(),
                base,
            ),
        };
        let mut args: Vec<Value> = Vec::with_capacity(
            12 + 2 * (changes.set.len() + changes.incr.len()) + changes.delete.len(),
        );
        args.extend([
            mode.into(),
            now,
            idle,
            abs,
            Value::Integer(self.settings.limits.max_fields as i64),
            Value::Integer(self.settings.limits.max_session_bytes as i64),
            created.into(),
        ]);
        let base_fields = base.map(|b| &b.fields);
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
        let reply = self.run(&self.apply, self.key(id), args).await?;
        let words: Vec<String> = reply.iter().filter_map(text).collect();
        let number = |i: usize| words.get(i).and_then(|s| s.parse::<u64>().ok());
        match words.first().map(String::as_str) {
            Some("ok") => Ok(Applied::Stored {
                created_ms: number(1)
                    .ok_or(StoreError::Unexpected("apply without creation time"))?,
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
        let reply = self.run(&self.take, self.key(id), Vec::new()).await?;
        session_from_reply(reply)
    }

    async fn destroy(&self, id: &SessionId) -> Result<(), StoreError> {
        self.bounded(self.client.del::<i64, _>(self.key(id)))
            .await
            .map(|_| ())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(self.client.ping::<Value>(None))
            .await
            .map(|_| ())
    }
}
