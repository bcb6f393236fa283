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
//! - Only the scripts below and `SET NX PX` (alone, or in the
//!   `MULTI`/`EXEC` of [`Fencing::Counter`]) ever write a lock key; release
//!   and extension compare the owner token inside the script.
//! - The fencing counter only ever grows: `INCR`, or a `SET` to the server
//!   clock when that is larger (acquire.lua, refloor.lua).
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

use ::redis::{Cmd, ErrorKind, Pipeline, RedisWrite, Script, ServerErrorKind, ToRedisArgs, Value};

use super::token::{Token, ceil_millis};
use super::{Attempt, Fencing, LockName};
use crate::Error;
use crate::redis::{RedisBackend, map_redis_error};

/// The lock operations on one Redis deployment (also one Redlock node).
pub(crate) struct RedisLocks {
    redis: RedisBackend,
    /// `<namespace>:{`: every lock key starts with it.
    prefix: Box<str>,
    acquire: Script,
    refloor: Script,
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
            refloor: Script::new(include_str!("refloor.lua")),
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

    /// `SET <key> <token> NX PX <ttl_ms>`, sized up front.
    fn set_nx(key: &KeyArg<'_>, token: Token, ttl_ms: u64) -> Cmd {
        let mut cmd = Cmd::with_capacity(6, 3 + key.len() + 32 + 2 + 2 + 20);
        cmd.arg("SET")
            .arg(key)
            .arg(&token.hex_bytes()[..])
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms);
        cmd
    }

    /// One acquisition attempt, as `fencing` says: a bare `SET NX PX`, the
    /// counter in a `MULTI`/`EXEC`, or the fencing script.
    pub(crate) async fn try_once(
        &self,
        name: &LockName,
        token: Token,
        ttl: u64,
        fencing: Fencing,
    ) -> Result<Attempt, Error> {
        let key = self.key(name, "");
        let ttl_ms = ceil_millis(ttl);
        match fencing {
            Fencing::ServerClock => {
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
            }
            Fencing::Counter => self.try_counter(name, token, ttl_ms).await,
            Fencing::Off => match self
                .redis
                .query::<Value>(&Self::set_nx(&key, token, ttl_ms))
                .await?
            {
                Value::Okay => Ok(Attempt::Acquired { fence: None }),
                Value::Nil => Ok(Attempt::Busy {
                    remaining: None,
                    clean: true,
                }),
                other => Err(unexpected("SET NX PX", &other)),
            },
        }
    }

    /// [`Fencing::Counter`]: `MULTI`, `SET NX PX`, `INCR` of the counter,
    /// `EXEC`, written in one go (one round trip, no script). Both commands
    /// run in one atomic step; a refused `SET` still increments the
    /// counter, which only leaves a gap between tokens. An `INCR` answering
    /// 1 found the counter missing: [`refloor`](Self::refloor) moves it
    /// above the server clock before a token is handed out.
    async fn try_counter(
        &self,
        name: &LockName,
        token: Token,
        ttl_ms: u64,
    ) -> Result<Attempt, Error> {
        let key = self.key(name, "");
        let fence = self.key(name, FENCE_SUFFIX);
        let mut incr = Cmd::with_capacity(2, 4 + fence.len());
        incr.arg("INCR").arg(&fence);
        let mut pipe = Pipeline::with_capacity(2);
        pipe.atomic()
            .add_command(Self::set_nx(&key, token, ttl_ms))
            .add_command(incr);
        let mut conn = self.redis.connection();
        let (set, counter): (Value, i64) = pipe.query_async(&mut conn).await.map_err(|e| {
            map_redis_error(
                e,
                "redis lock acquire",
                self.redis.config().get_response_timeout(),
            )
        })?;
        match set {
            Value::Okay if counter > 1 => Ok(Attempt::Acquired {
                fence: Some(counter as u64),
            }),
            Value::Okay => self.refloor(name, token).await,
            Value::Nil => Ok(Attempt::Busy {
                remaining: None,
                clean: true,
            }),
            other => Err(unexpected("SET NX PX in MULTI", &other)),
        }
    }

    /// The second step of a counter-fenced acquire that found its counter
    /// missing (refloor.lua): only while this owner still holds the lock.
    async fn refloor(&self, name: &LockName, token: Token) -> Result<Attempt, Error> {
        let keys = [self.key(name, ""), self.key(name, FENCE_SUFFIX)];
        let cmd = Self::evalsha(&self.refloor, &keys, token, None);
        let r = self.eval(&self.refloor, &cmd).await?;
        Ok(if r > 1 {
            Attempt::Acquired {
                fence: Some(r as u64),
            }
        } else {
            // The lease ended before the token could be issued: nothing of
            // ours is left (the key expired or belongs to someone else).
            Attempt::Busy {
                remaining: None,
                clean: true,
            }
        })
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

fn unexpected(what: &str, reply: &Value) -> Error {
    Error::backend(
        "redis",
        false,
        format!("unexpected reply to {what}: {reply:?}"),
    )
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
        let first = locks
            .try_once(&name, token, ttl, Fencing::ServerClock)
            .await
            .unwrap();
        let Attempt::Acquired { fence: Some(f1) } = first else {
            panic!("{first:?}")
        };
        flush();
        assert!(locks.extend(&name, token, ttl).await.unwrap());
        flush();
        assert!(locks.release(&name, token).await.unwrap());
        flush();
        let again = locks
            .try_once(&name, token, ttl, Fencing::ServerClock)
            .await
            .unwrap();
        assert!(matches!(again, Attempt::Acquired { fence: Some(f2) } if f2 > f1));
        let stats: String = server.query(&["INFO", "commandstats"]).unwrap();
        assert!(stats.contains("cmdstat_script|load"), "{stats}");
    }

    /// The counter mode's second step writes and issues a token only while
    /// the caller still holds the lock (its lease may have ended between the
    /// two round trips); then the token is above the server clock.
    #[cfg(feature = "test-util")]
    #[tokio::test]
    async fn refloor_issues_a_token_only_while_the_lock_is_ours() {
        use crate::testing::RedisServer;
        let Some(server) = RedisServer::start_or_skip() else {
            return;
        };
        let redis = RedisBackend::connect(server.url(), crate::redis::RedisConfig::default())
            .await
            .unwrap();
        let locks = RedisLocks::new(redis, "lock");
        let name = LockName::new("refloor").unwrap();
        let (ours, theirs) = (Token::from_u128(1), Token::from_u128(2));
        let _: () = server
            .query(&["SET", "lock:{refloor}", &theirs.hex()])
            .unwrap();
        let lost = locks.refloor(&name, ours).await.unwrap();
        assert_eq!(
            lost,
            Attempt::Busy {
                remaining: None,
                clean: true
            }
        );
        let counter: Option<String> = server.query(&["GET", "lock:{refloor}:fence"]).unwrap();
        assert_eq!(counter, None, "nothing written for a lock not ours");
        let owner: String = server.query(&["GET", "lock:{refloor}"]).unwrap();
        assert_eq!(owner, theirs.hex(), "the other owner's key is untouched");

        let _: () = server
            .query(&["SET", "lock:{refloor}", &ours.hex()])
            .unwrap();
        let t: Vec<u64> = server.query(&["TIME"]).unwrap();
        let before = t[0] * 1_000_000 + t[1];
        let Attempt::Acquired { fence: Some(f) } = locks.refloor(&name, ours).await.unwrap() else {
            panic!("refloor of our own lock must issue a token")
        };
        assert!(f >= before, "{f} < {before}");
        let stored: u64 = server.query(&["GET", "lock:{refloor}:fence"]).unwrap();
        assert_eq!(stored, f);
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
