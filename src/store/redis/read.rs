//! Session loads without a script, on the primary and on a replica alike: `HGETALL` and `PTTL`
//! in one round trip, judged here ([`judge`]): a tombstone is rotated, a session past its
//! absolute timeout is absent, and the idle TTL is due for renewal only when it fell more than a
//! slack below its full value.
//!
//! A load writes nothing, so it needs no deadline check in Redis and is never refused by a
//! demoted primary; a due renewal is a write of its own, sent afterwards in the background.

use std::time::Duration;

use fred::clients::Pipeline;
use fred::interfaces::{HashesInterface, KeysInterface};
use fred::types::Value;

use super::super::{ttl_now, Loaded, Session, CREATED_FIELD, ROTATED_FIELD, VERSION_FIELD};
use crate::config::TtlPolicy;
use crate::protocol::Fields;

/// Most TTL renewals in flight at once; past it a due renewal is left to a later read.
pub const MAX_RENEWALS: usize = 256;

/// A session as read, judged.
#[derive(Debug, PartialEq, Eq)]
pub struct Judged {
    /// The load's result.
    pub loaded: Loaded,
    /// With a live session: the TTL to set on the primary, if the one read has fallen more than
    /// the slack below it (or the key has none).
    pub renew: Option<Duration>,
}

/// Sends `HGETALL` and `PTTL` of `key` in one pipeline on `pipeline`'s client (whose options,
/// such as a timeout, apply to both). Returns the hash's pairs and the TTL in milliseconds
/// (negative for no TTL or no key).
pub async fn hash_and_pttl<C>(
    pipeline: Pipeline<C>,
    key: &str,
) -> Result<(Vec<(String, String)>, i64), fred::error::Error>
where
    C: HashesInterface + KeysInterface,
{
    let _: () = pipeline.hgetall(key).await?;
    let _: () = pipeline.pttl(key).await?;
    let (hash, pttl): (Value, i64) = pipeline.all().await?;
    Ok((pairs(hash)?, pttl))
}

/// An `HGETALL` reply as pairs: a map in RESP3, a flat array in RESP2. Values are written as
/// UTF-8; anything else was written around stickless and is read lossily.
fn pairs(hash: Value) -> Result<Vec<(String, String)>, fred::error::Error> {
    let string = |v: &Value| match v {
        Value::Integer(i) => Some(i.to_string()),
        v => v
            .as_bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
    };
    let unexpected =
        || fred::error::Error::new(fred::error::ErrorKind::Protocol, "unexpected HGETALL reply");
    match hash {
        Value::Map(map) => map
            .inner()
            .into_iter()
            .map(|(k, v)| {
                Ok((
                    String::from_utf8_lossy(k.as_bytes()).into_owned(),
                    string(&v).ok_or_else(unexpected)?,
                ))
            })
            .collect(),
        Value::Array(flat) if flat.len() % 2 == 0 => flat
            .chunks_exact(2)
            .map(|kv| {
                Ok((
                    string(&kv[0]).ok_or_else(unexpected)?,
                    string(&kv[1]).ok_or_else(unexpected)?,
                ))
            })
            .collect(),
        Value::Null => Ok(Vec::new()),
        _ => Err(unexpected()),
    }
}

/// Decides what a load finds: `hash` is the `HGETALL`, `pttl` the `PTTL` (in
/// milliseconds; negative for no TTL or no key). Renewal is due when the TTL fell more than
/// `slack` below what a renewal would set, or is longer than that (a changed policy), or missing.
/// A session past its absolute timeout is absent; its key is left to its TTL, which every
/// renewal and change cut to that deadline.
pub fn judge(
    hash: Vec<(String, String)>,
    pttl: i64,
    ttl: &TtlPolicy,
    slack: Duration,
    now_ms: u64,
) -> Judged {
    let absent = Judged {
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
            return Judged {
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
    // Like the scripts: a session without a creation time is not cut by the absolute timeout.
    let full = match created_ms {
        Some(created) => match ttl_now(ttl, created, now_ms) {
            Some(full) => full,
            None => return absent,
        },
        None => ttl.idle,
    };
    let full_ms = full.as_millis() as i64;
    let due = pttl < 0 || pttl > full_ms || pttl < full_ms - slack.as_millis() as i64;
    Judged {
        loaded: Loaded::Live(Session {
            fields: fields.into(),
            created_ms: created_ms.unwrap_or(now_ms),
            version,
        }),
        renew: due.then_some(full),
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
    fn a_read_is_judged_like_the_load_script() {
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
            Judged {
                loaded: Loaded::Rotated,
                renew: None
            }
        );
        // Past the absolute timeout.
        let old = hash(&[("_created", "1"), ("a", "1")]);
        assert_eq!(
            judge(old.clone(), 5_000, &p, slack, 10_000_001),
            Judged {
                loaded: Loaded::Absent,
                renew: None
            }
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
        // Longer than a renewal would set (a shorter idle timeout since): renewed down.
        assert_eq!(
            judge(live.clone(), 900_000, &p, slack, now).renew,
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

    #[test]
    fn hgetall_replies_of_both_protocols_are_read() {
        let flat = Value::Array(vec!["a".into(), "1".into(), "_v".into(), Value::Integer(2)]);
        assert_eq!(pairs(flat).unwrap(), hash(&[("a", "1"), ("_v", "2")]));
        assert_eq!(pairs(Value::Null).unwrap(), vec![]);
        assert!(pairs(Value::Array(vec!["a".into()])).is_err());
        assert!(pairs(Value::Integer(1)).is_err());
    }
}
