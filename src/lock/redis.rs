//! The lock on one Redis server or a Redis Cluster.
//!
//! Invariants:
//!
//! - The lock key `<ns>:{<name>}` and its fencing counter
//!   `<ns>:{<name>}:fence` share their only hash tag, so the fenced acquire
//!   script touches one Cluster slot.
//! - Every request goes over the backend's one shared multiplexed
//!   connection (per node on a cluster), in order: a cleanup
//!   compare-and-delete sent after an acquire request is executed after it.
//! - Only the three scripts below and `SET NX PX` ever write a lock key;
//!   release and extension compare the owner token inside the script.

use ::redis::{Script, Value};

use super::token::{Token, ceil_millis};
use super::{Attempt, LockName};
use crate::Error;
use crate::keys::Key;
use crate::redis::RedisBackend;

/// The lock operations on one Redis deployment (also one Redlock node).
pub(crate) struct RedisLocks {
    redis: RedisBackend,
    namespace: String,
    acquire: Script,
    release: Script,
    extend: Script,
}

impl RedisLocks {
    pub(crate) fn new(redis: RedisBackend, namespace: &str) -> Self {
        RedisLocks {
            redis,
            namespace: namespace.to_owned(),
            acquire: Script::new(include_str!("acquire.lua")),
            release: Script::new(include_str!("release.lua")),
            extend: Script::new(include_str!("extend.lua")),
        }
    }

    pub(crate) fn backend(&self) -> &RedisBackend {
        &self.redis
    }

    fn lock_key(&self, name: &LockName) -> Result<Key, Error> {
        Key::builder(&self.namespace)?.owner(name).build()
    }

    fn fence_key(&self, name: &LockName) -> Result<Key, Error> {
        Key::builder(&self.namespace)?
            .owner(name)
            .part("fence")
            .build()
    }

    /// One acquisition attempt: the fencing script, or a bare `SET NX PX`.
    pub(crate) async fn try_once(
        &self,
        name: &LockName,
        token: Token,
        ttl: u64,
        fenced: bool,
    ) -> Result<Attempt, Error> {
        let key = self.lock_key(name)?;
        let ttl_ms = ceil_millis(ttl);
        if fenced {
            let fence_key = self.fence_key(name)?;
            let mut inv = self.acquire.key(&key);
            inv.key(&fence_key).arg(token.hex()).arg(ttl_ms);
            let r: i64 = self.redis.invoke(&inv).await?;
            Ok(if r > 0 {
                Attempt::Acquired {
                    fence: Some(r as u64),
                }
            } else {
                let pttl_ms = (-1i64).saturating_sub(r).max(0) as u64;
                Attempt::Busy {
                    remaining: Some(pttl_ms.saturating_mul(1_000_000)),
                    clean: true,
                }
            })
        } else {
            let mut cmd = ::redis::cmd("SET");
            cmd.arg(&key)
                .arg(token.hex())
                .arg("NX")
                .arg("PX")
                .arg(ttl_ms);
            match self.redis.query::<Value>(&cmd).await? {
                Value::Okay => Ok(Attempt::Acquired { fence: None }),
                Value::Nil => Ok(Attempt::Busy {
                    remaining: None,
                    clean: true,
                }),
                other => Err(Error::backend(
                    "redis",
                    false,
                    format!("unexpected reply to SET NX PX: {other:?}"),
                )),
            }
        }
    }

    /// Compare-and-delete; `true` when this token's lock was deleted.
    pub(crate) async fn release(&self, name: &LockName, token: Token) -> Result<bool, Error> {
        let key = self.lock_key(name)?;
        let mut inv = self.release.key(&key);
        inv.arg(token.hex());
        let r: i64 = self.redis.invoke(&inv).await?;
        Ok(r == 1)
    }

    /// Compare-and-extend to `ttl`; `true` when this token's lock was
    /// extended.
    pub(crate) async fn extend(
        &self,
        name: &LockName,
        token: Token,
        ttl: u64,
    ) -> Result<bool, Error> {
        let key = self.lock_key(name)?;
        let mut inv = self.extend.key(&key);
        inv.arg(token.hex()).arg(ceil_millis(ttl));
        let r: i64 = self.redis.invoke(&inv).await?;
        Ok(r == 1)
    }
}
