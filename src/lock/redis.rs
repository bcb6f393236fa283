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
//! - The keys are written straight into each command's buffer from the
//!   manager's prefix `<ns>:{` and the name's escaped component (computed
//!   once per [`LockName`]): byte for byte what
//!   `Key::builder(ns).owner(name)` (`.part("fence")`) builds, which a test
//!   checks. Their length is always valid: a namespace is at most 64 bytes
//!   and an escaped name at most 3 × 256.
//! - Scripts are sent as `EVALSHA` commands built here in one allocation;
//!   a `NOSCRIPT` reply (the script did not run) loads the script and sends
//!   the same command once more, as redis-rs's `ScriptInvocation` does.
//!   Nothing is replayed after any other failure.

use std::io::Write as _;

use ::redis::{Cmd, ErrorKind, RedisWrite, Script, ServerErrorKind, ToRedisArgs, Value};

use super::token::{Token, ceil_millis};
use super::{Attempt, LockName};
use crate::Error;
use crate::redis::{RedisBackend, map_redis_error};

/// The lock operations on one Redis deployment (also one Redlock node).
pub(crate) struct RedisLocks {
    redis: RedisBackend,
    /// `<namespace>:{`: every lock key starts with it.
    prefix: Box<str>,
    acquire: Script,
    release: Script,
    extend: Script,
}

/// A lock key (`suffix` empty) or its fencing counter (`suffix` `:fence`),
/// written as one argument without building a `String` first.
struct KeyArg<'a> {
    prefix: &'a str,
    escaped: &'a str,
    suffix: &'a str,
}

impl KeyArg<'_> {
    fn len(&self) -> usize {
        self.prefix.len() + self.escaped.len() + 1 + self.suffix.len()
    }
}

impl ToRedisArgs for KeyArg<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        let mut w = out.writer_for_next_arg();
        // Writes into a `Vec`: they cannot fail.
        let _ = w.write_all(self.prefix.as_bytes());
        let _ = w.write_all(self.escaped.as_bytes());
        let _ = w.write_all(b"}");
        let _ = w.write_all(self.suffix.as_bytes());
    }
}

const FENCE_SUFFIX: &str = ":fence";

impl RedisLocks {
    pub(crate) fn new(redis: RedisBackend, namespace: &str) -> Self {
        RedisLocks {
            redis,
            prefix: format!("{namespace}:{{").into_boxed_str(),
            acquire: Script::new(include_str!("acquire.lua")),
            release: Script::new(include_str!("release.lua")),
            extend: Script::new(include_str!("extend.lua")),
        }
    }

    pub(crate) fn backend(&self) -> &RedisBackend {
        &self.redis
    }

    fn key<'a>(&'a self, name: &'a LockName, suffix: &'a str) -> KeyArg<'a> {
        KeyArg {
            prefix: &self.prefix,
            escaped: name.escaped(),
            suffix,
        }
    }

    /// `EVALSHA <sha> <keys.len()> <keys> <token> [<millis>]`, sized up
    /// front (one allocation for the arguments, one for their offsets).
    fn evalsha(script: &Script, keys: &[KeyArg<'_>], token: Token, millis: Option<u64>) -> Cmd {
        let hash = script.get_hash();
        let data = "EVALSHA".len()
            + hash.len()
            + 1
            + keys.iter().map(KeyArg::len).sum::<usize>()
            + 32
            + millis.map_or(0, |_| 20);
        let mut cmd = Cmd::with_capacity(4 + keys.len() + usize::from(millis.is_some()), data);
        cmd.arg("EVALSHA").arg(hash.as_bytes()).arg(keys.len());
        for k in keys {
            cmd.arg(k);
        }
        cmd.arg(&token.hex_bytes()[..]);
        if let Some(ms) = millis {
            cmd.arg(ms);
        }
        cmd
    }

    /// Sends a script command built by [`evalsha`](Self::evalsha); on
    /// `NOSCRIPT` loads `script` and sends it once more.
    async fn eval(&self, script: &Script, cmd: &Cmd) -> Result<i64, Error> {
        let mut conn = self.redis.connection();
        let mapped = |e| {
            map_redis_error(
                e,
                "redis script",
                self.redis.config().get_response_timeout(),
            )
        };
        match cmd.query_async::<i64>(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                // The script did not run: loading it and sending the same
                // command again is not a replay.
                self.redis.load_script(script).await?;
                cmd.query_async::<i64>(&mut conn).await.map_err(mapped)
            }
            Err(e) => Err(mapped(e)),
        }
    }

    /// One acquisition attempt: the fencing script, or a bare `SET NX PX`.
    pub(crate) async fn try_once(
        &self,
        name: &LockName,
        token: Token,
        ttl: u64,
        fenced: bool,
    ) -> Result<Attempt, Error> {
        let key = self.key(name, "");
        let ttl_ms = ceil_millis(ttl);
        if fenced {
            let keys = [key, self.key(name, FENCE_SUFFIX)];
            let cmd = Self::evalsha(&self.acquire, &keys, token, Some(ttl_ms));
            let r = self.eval(&self.acquire, &cmd).await?;
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
            let mut cmd = Cmd::with_capacity(6, 3 + key.len() + 32 + 2 + 2 + 20);
            cmd.arg("SET")
                .arg(&key)
                .arg(&token.hex_bytes()[..])
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
        let cmd = Self::evalsha(&self.release, &[self.key(name, "")], token, None);
        Ok(self.eval(&self.release, &cmd).await? == 1)
    }

    /// Compare-and-extend to `ttl`; `true` when this token's lock was
    /// extended.
    pub(crate) async fn extend(
        &self,
        name: &LockName,
        token: Token,
        ttl: u64,
    ) -> Result<bool, Error> {
        let cmd = Self::evalsha(
            &self.extend,
            &[self.key(name, "")],
            token,
            Some(ceil_millis(ttl)),
        );
        Ok(self.eval(&self.extend, &cmd).await? == 1)
    }
}

#[cfg(all(test, not(raceguard_loom)))]
mod tests {
    use super::*;
    use crate::keys::Key;

    /// The keys written into commands are exactly the documented layout,
    /// `Key::builder(ns).owner(name)` and `.part("fence")`, escapes and all.
    #[test]
    fn keys_match_the_key_builder() {
        let names = [
            "a",
            "chat:alice",
            "bench:7",
            "with space",
            "{tag}",
            "pat*[?]\\",
            "100%",
            "émoji 🔒",
            "tab\there",
            &"x".repeat(256),
            &":".repeat(256),
        ];
        for ns in ["lock", "app-locks.v2_x"] {
            let prefix = format!("{ns}:{{");
            for raw in names {
                let name = LockName::new(raw).unwrap();
                for (suffix, parts) in [("", &[][..]), (FENCE_SUFFIX, &["fence"][..])] {
                    let arg = KeyArg {
                        prefix: &prefix,
                        escaped: name.escaped(),
                        suffix,
                    };
                    let mut cmd = Cmd::new();
                    cmd.arg(&arg);
                    let written = match cmd.args_iter().next() {
                        Some(::redis::Arg::Simple(b)) => b.to_vec(),
                        _ => panic!("one plain argument expected"),
                    };
                    let expected = Key::builder(ns)
                        .unwrap()
                        .owner(&name)
                        .parts(parts.iter().copied())
                        .build()
                        .unwrap();
                    assert_eq!(written, expected.as_str().as_bytes());
                    assert_eq!(arg.len(), expected.as_str().len());
                }
            }
        }
    }

    /// A flushed script cache (a restart, `SCRIPT FLUSH`, a failover to a
    /// replica that never saw the script) is a `NOSCRIPT` reply: loaded and
    /// sent once more, for each of the three scripts.
    #[cfg(feature = "test-util")]
    #[tokio::test]
    async fn noscript_loads_and_resends_once() {
        use crate::testing::RedisServer;
        let Some(server) = RedisServer::start_or_skip() else {
            return;
        };
        let redis = RedisBackend::connect(server.url(), crate::redis::RedisConfig::default())
            .await
            .unwrap();
        let locks = RedisLocks::new(redis, "lock");
        let name = LockName::new("noscript:a").unwrap();
        let (token, ttl) = (Token::from_u128(42), 10_000_000_000);
        let flush = || {
            let _: () = server.query(&["SCRIPT", "FLUSH"]).unwrap();
        };
        flush();
        let first = locks.try_once(&name, token, ttl, true).await.unwrap();
        let Attempt::Acquired { fence: Some(f1) } = first else {
            panic!("{first:?}")
        };
        flush();
        assert!(locks.extend(&name, token, ttl).await.unwrap());
        flush();
        assert!(locks.release(&name, token).await.unwrap());
        flush();
        let again = locks.try_once(&name, token, ttl, true).await.unwrap();
        assert!(matches!(again, Attempt::Acquired { fence: Some(f2) } if f2 > f1));
        let stats: String = server.query(&["INFO", "commandstats"]).unwrap();
        assert!(stats.contains("cmdstat_script|load"), "{stats}");
    }

    #[test]
    fn evalsha_commands_are_what_redis_rs_would_send() {
        let name = LockName::new("a:b").unwrap();
        let script = Script::new("return 1");
        let locks_prefix = "lock:{";
        let key = KeyArg {
            prefix: locks_prefix,
            escaped: name.escaped(),
            suffix: "",
        };
        let token = Token::from_u128(0xab);
        let ours = RedisLocks::evalsha(&script, &[key], token, Some(7));
        // What `ScriptInvocation::eval_cmd` builds for the same call.
        let mut theirs = ::redis::cmd("EVALSHA");
        theirs
            .arg(script.get_hash())
            .arg(1)
            .arg("lock:{a%3Ab}")
            .arg(token.hex())
            .arg(7u64);
        assert_eq!(ours.get_packed_command(), theirs.get_packed_command());
    }
}
