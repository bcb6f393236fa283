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
//! - Only the scripts (`*.lua` here) and a bare `SET NX PX` ever write a
//!   lock key; release and extension compare the owner token inside the
//!   script.
//! - The fencing counter only ever grows: `INCR`, or a `SET` to the server
//!   clock when that is larger (acquire.lua, acquire_counter.lua); a refused
//!   acquire does not touch it.
//! - The keys are written straight into each command's buffer from the
//!   manager's prefix `<ns>:{` and the name's escaped component (computed
//!   once per [`LockName`]): byte for byte what
//!   `Key::builder(ns).owner(name)` (`.part("fence")`) builds, which a test
//!   checks. Their length is always valid: a namespace is at most 64 bytes
//!   and an escaped name at most 3 × 256.
//! - The scripts run as Redis Functions (`FCALL`, Redis 7.0+: about 10%
//!   less server time per call than `EVALSHA` of the same body), from one
//!   library named after the SHA-1 of their sources. A `Function not found`
//!   reply (the call did not run) loads the library and sends the same
//!   command once more. A server that refuses Functions (an unknown
//!   command: Redis 6; `NOPERM`) switches this manager to `EVALSHA` of the
//!   same sources for good, where a `NOSCRIPT` reply loads the script and
//!   resends once, as redis-rs's `ScriptInvocation` does. Nothing is
//!   replayed after any other failure.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

use ::redis::{
    Cmd, ErrorKind, RedisError, RedisWrite, Script, ServerErrorKind, ToRedisArgs, Value,
};

use super::token::{Token, ceil_millis};
use super::{Attempt, Fencing, LockName};
use crate::Error;
use crate::redis::{RedisBackend, map_redis_error};

/// The lock operations on one Redis deployment (also one Redlock node).
pub(crate) struct RedisLocks {
    redis: RedisBackend,
    /// `<namespace>:{`: every lock key starts with it.
    prefix: Box<str>,
    /// The `FUNCTION LOAD` source of every script below, as one library.
    library: Box<str>,
    /// `false` once the server turned Functions down (Redis before 7.0, a
    /// renamed `FCALL`, an ACL without them): `EVALSHA` from then on.
    functions: AtomicBool,
    /// Boxed: four scripts with their hashes are most of this struct.
    scripts: Box<Scripts>,
}

struct Scripts {
    acquire: LockScript,
    acquire_counter: LockScript,
    release: LockScript,
    extend: LockScript,
}

/// One of the lock's scripts: run as the Redis Function `function`, or as
/// `script` by `EVALSHA` where Functions are not available.
struct LockScript {
    script: Script,
    function: Box<str>,
}

/// The scripts (file, function suffix, flags). Release and extension may
/// run when the server is out of memory, as `DEL` and `PEXPIRE` may (an
/// `EVALSHA` script without flags is checked command by command; a Function
/// without `allow-oom` would be refused whole); the acquires may not, as
/// `SET` may not.
const SCRIPTS: [(&str, &str, &str); 4] = [
    (include_str!("acquire.lua"), "acquire", ""),
    (include_str!("acquire_counter.lua"), "acquire_counter", ""),
    (include_str!("release.lua"), "release", "'allow-oom'"),
    (include_str!("extend.lua"), "extend", "'allow-oom'"),
];

/// The library's name, `raceguard_lock_` and the first 12 hex digits of
/// the SHA-1 of the script sources: processes running different versions
/// of these scripts against one server each load and call their own.
fn library_id() -> String {
    let mut all = String::new();
    for (src, name, flags) in SCRIPTS {
        all.push_str(name);
        all.push_str(flags);
        all.push_str(src);
    }
    let hash = Script::new(&all).get_hash().to_owned();
    format!("raceguard_lock_{}", &hash[..12])
}

/// `#!lua name=<id>` and one `register_function` per script, its body
/// wrapped as `function(KEYS, ARGV) ... end` (the same source runs under
/// `EVALSHA`, where `KEYS` and `ARGV` are globals).
fn library_source(id: &str) -> String {
    let mut lib = format!("#!lua name={id}\n");
    for (src, name, flags) in SCRIPTS {
        lib.push_str(&format!(
            "redis.register_function{{function_name='{id}_{name}', flags={{{flags}}}, \
             callback=function(KEYS, ARGV)\n{src}\nend}}\n"
        ));
    }
    lib
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

/// The reply said the Function is not loaded (never loaded, or lost in a
/// restart without persistence, a `FUNCTION FLUSH`, a failover to a node
/// that never had it): the call did not run.
fn function_missing(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
        && e.detail()
            .is_some_and(|d| d.starts_with("Function not found"))
}

/// The server cannot run Functions for us: `FCALL` or `FUNCTION` is an
/// unknown command (Redis before 7.0, a `rename-command`) or not permitted
/// to this user. The command did not run.
fn functions_unavailable(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::NoPerm) => true,
        ErrorKind::Server(ServerErrorKind::ResponseError) => {
            e.detail().is_some_and(|d| d.starts_with("unknown command"))
        }
        _ => false,
    }
}

impl RedisLocks {
    pub(crate) fn new(redis: RedisBackend, namespace: &str) -> Self {
        let id = library_id();
        let [acquire, acquire_counter, release, extend] =
            SCRIPTS.map(|(src, name, _)| LockScript {
                script: Script::new(src),
                function: format!("{id}_{name}").into_boxed_str(),
            });
        RedisLocks {
            redis,
            prefix: format!("{namespace}:{{").into_boxed_str(),
            library: library_source(&id).into_boxed_str(),
            functions: AtomicBool::new(true),
            scripts: Box::new(Scripts {
                acquire,
                acquire_counter,
                release,
                extend,
            }),
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

    /// `<verb> <what> <keys.len()> <keys> <token> [<millis>]` (`FCALL
    /// <function>` or `EVALSHA <sha>`), sized up front (one allocation for
    /// the arguments, one for their offsets).
    fn script_cmd(
        verb: &str,
        what: &str,
        keys: &[KeyArg<'_>],
        token: Token,
        millis: Option<u64>,
    ) -> Cmd {
        let data = verb.len()
            + what.len()
            + 1
            + keys.iter().map(KeyArg::len).sum::<usize>()
            + 32
            + millis.map_or(0, |_| 20);
        let mut cmd = Cmd::with_capacity(4 + keys.len() + usize::from(millis.is_some()), data);
        cmd.arg(verb).arg(what.as_bytes()).arg(keys.len());
        for k in keys {
            cmd.arg(k);
        }
        cmd.arg(&token.hex_bytes()[..]);
        if let Some(ms) = millis {
            cmd.arg(ms);
        }
        cmd
    }

    /// Runs one of the scripts: `FCALL` of its Function (loading the
    /// library once when the server answers that it is missing), or, on a
    /// server without Functions, `EVALSHA` (loading the script once on
    /// `NOSCRIPT`). Every resend follows a reply that says the first
    /// command did not run; nothing is replayed after any other failure.
    async fn call(
        &self,
        s: &LockScript,
        keys: &[KeyArg<'_>],
        token: Token,
        millis: Option<u64>,
    ) -> Result<i64, Error> {
        let mut conn = self.redis.connection();
        let mapped = |e| {
            map_redis_error(
                e,
                "redis script",
                self.redis.config().get_response_timeout(),
            )
        };
        if self.functions.load(Ordering::Relaxed) {
            let cmd = Self::script_cmd("FCALL", &s.function, keys, token, millis);
            match cmd.query_async::<i64>(&mut conn).await {
                Ok(v) => return Ok(v),
                Err(e) if function_missing(&e) => match self.load_library().await {
                    Ok(()) => return cmd.query_async::<i64>(&mut conn).await.map_err(mapped),
                    Err(e) if functions_unavailable(&e) => {
                        self.functions.store(false, Ordering::Relaxed)
                    }
                    Err(e) => return Err(mapped(e)),
                },
                Err(e) if functions_unavailable(&e) => {
                    self.functions.store(false, Ordering::Relaxed)
                }
                Err(e) => return Err(mapped(e)),
            }
            tracing::info!(
                "redis lock: the server does not run Functions (FCALL / FUNCTION LOAD refused); using EVALSHA scripts"
            );
        }
        let cmd = Self::script_cmd("EVALSHA", s.script.get_hash(), keys, token, millis);
        match cmd.query_async::<i64>(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                // The script did not run: loading it and sending the same
                // command again is not a replay.
                self.redis.load_script(&s.script).await?;
                cmd.query_async::<i64>(&mut conn).await.map_err(mapped)
            }
            Err(e) => Err(mapped(e)),
        }
    }

    /// `FUNCTION LOAD REPLACE <library>` (on a Cluster, on every primary).
    /// `REPLACE` makes concurrent loads of the same library by several
    /// tasks or processes harmless.
    async fn load_library(&self) -> Result<(), RedisError> {
        let mut conn = self.redis.connection();
        ::redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&*self.library)
            .query_async::<Value>(&mut conn)
            .await
            .map(drop)
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

    /// One acquisition attempt, as `fencing` says: a bare `SET NX PX`, or
    /// one of the two fenced-acquire scripts.
    pub(crate) async fn try_once(
        &self,
        name: &LockName,
        token: Token,
        ttl: u64,
        fencing: Fencing,
    ) -> Result<Attempt, Error> {
        let key = self.key(name, "");
        let ttl_ms = ceil_millis(ttl);
        let script = match fencing {
            Fencing::ServerClock => &self.scripts.acquire,
            Fencing::Counter => &self.scripts.acquire_counter,
            Fencing::Off => {
                return match self
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
                };
            }
        };
        let keys = [key, self.key(name, FENCE_SUFFIX)];
        let r = self.call(script, &keys, token, Some(ttl_ms)).await?;
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

    /// Compare-and-delete; `true` when this token's lock was deleted.
    pub(crate) async fn release(&self, name: &LockName, token: Token) -> Result<bool, Error> {
        Ok(self
            .call(&self.scripts.release, &[self.key(name, "")], token, None)
            .await?
            == 1)
    }

    /// Compare-and-extend to `ttl`; `true` when this token's lock was
    /// extended.
    pub(crate) async fn extend(
        &self,
        name: &LockName,
        token: Token,
        ttl: u64,
    ) -> Result<bool, Error> {
        let keys = [self.key(name, "")];
        Ok(self
            .call(&self.scripts.extend, &keys, token, Some(ceil_millis(ttl)))
            .await?
            == 1)
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

    async fn locks_on(server: &crate::testing::RedisServer) -> RedisLocks {
        let redis = RedisBackend::connect(server.url(), crate::redis::RedisConfig::default())
            .await
            .unwrap();
        RedisLocks::new(redis, "lock")
    }

    fn calls(server: &crate::testing::RedisServer, stat: &str) -> u64 {
        let stats: String = server.query(&["INFO", "commandstats"]).unwrap();
        let prefix = format!("cmdstat_{stat}:calls=");
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
    }

    /// Every operation, for both fenced modes, after `lose` threw the
    /// server's copy away each time: each still works and issues a larger
    /// token than the last.
    async fn every_operation_survives(locks: &RedisLocks, lose: impl Fn()) {
        let name = LockName::new("reload:a").unwrap();
        let (token, ttl) = (Token::from_u128(42), 10_000_000_000);
        let mut last = 0;
        for fencing in [Fencing::ServerClock, Fencing::Counter] {
            lose();
            let first = locks.try_once(&name, token, ttl, fencing).await.unwrap();
            let Attempt::Acquired { fence: Some(f) } = first else {
                panic!("{fencing:?}: {first:?}")
            };
            assert!(f > last, "{fencing:?}: {f} <= {last}");
            last = f;
            lose();
            assert!(locks.extend(&name, token, ttl).await.unwrap());
            lose();
            assert!(locks.release(&name, token).await.unwrap());
        }
    }

    /// Functions lost on the server (a restart without persistence,
    /// `FUNCTION FLUSH`, a failover to a node that never had them): the
    /// `Function not found` reply loads the library and sends the call once
    /// more, for each of the four scripts; `EVALSHA` is never used.
    #[cfg(feature = "test-util")]
    #[tokio::test]
    async fn lost_functions_are_loaded_and_the_call_resent_once() {
        use crate::testing::RedisServer;
        let Some(server) = RedisServer::start_or_skip() else {
            return;
        };
        let locks = locks_on(&server).await;
        every_operation_survives(&locks, || {
            let _: () = server.query(&["FUNCTION", "FLUSH"]).unwrap();
        })
        .await;
        // 6 flushes, 6 calls that found nothing, 6 loads, 6 resends.
        assert_eq!(calls(&server, "function|load"), 6);
        assert_eq!(calls(&server, "fcall"), 12);
        assert_eq!(calls(&server, "evalsha"), 0);
        assert!(locks.functions.load(Ordering::Relaxed));
    }

    /// A server without `FCALL` (Redis before 7.0; here a `rename-command`)
    /// gets the same scripts by `EVALSHA`, with the `NOSCRIPT` reload, after
    /// one refused `FCALL`.
    #[cfg(feature = "test-util")]
    #[tokio::test]
    async fn without_functions_the_scripts_run_by_evalsha() {
        use crate::testing::RedisServer;
        let Some(server) = RedisServer::builder()
            .config_line("rename-command FCALL \"\"")
            .start_or_skip()
        else {
            return;
        };
        let locks = locks_on(&server).await;
        every_operation_survives(&locks, || {
            let _: () = server.query(&["SCRIPT", "FLUSH"]).unwrap();
        })
        .await;
        assert!(!locks.functions.load(Ordering::Relaxed));
        assert_eq!(calls(&server, "script|load"), 6);
        assert_eq!(calls(&server, "evalsha"), 12);
    }

    /// A user whose ACL forbids `FCALL` (`NOPERM`): the same fallback.
    #[cfg(feature = "test-util")]
    #[tokio::test]
    async fn an_acl_without_functions_falls_back_to_evalsha() {
        use crate::testing::RedisServer;
        let Some(server) = RedisServer::start_or_skip() else {
            return;
        };
        let _: () = server
            .query(&[
                "ACL",
                "SETUSER",
                "legacy",
                "on",
                ">pw",
                "~*",
                "&*",
                "+@all",
                "-fcall",
                "-function",
            ])
            .unwrap();
        let url = format!("redis://legacy:pw@{}/", server.addr());
        let redis = RedisBackend::connect(&url, crate::redis::RedisConfig::default())
            .await
            .unwrap();
        let locks = RedisLocks::new(redis, "lock");
        every_operation_survives(&locks, || {}).await;
        assert!(!locks.functions.load(Ordering::Relaxed));
        assert_eq!(calls(&server, "fcall"), 0, "FCALL was refused, never run");
        assert!(calls(&server, "evalsha") >= 6);
    }

    /// The library loads as written, and two libraries of different script
    /// versions would not collide: the id follows the sources.
    #[test]
    fn the_library_names_every_function_after_its_sources() {
        let id = library_id();
        assert!(
            id.starts_with("raceguard_lock_") && id.len() == 15 + 12,
            "{id}"
        );
        let lib = library_source(&id);
        assert!(lib.starts_with(&format!("#!lua name={id}\n")));
        for (_, name, _) in SCRIPTS {
            assert!(
                lib.contains(&format!("function_name='{id}_{name}'")),
                "{name}"
            );
        }
        assert_eq!(library_id(), id, "deterministic");
    }

    /// A counter found missing (`INCR` = 1) is moved above the server
    /// clock inside the acquire; an existing counter just counts.
    #[cfg(feature = "test-util")]
    #[tokio::test]
    async fn counter_acquire_floors_a_missing_counter_to_the_clock() {
        use crate::testing::RedisServer;
        let Some(server) = RedisServer::start_or_skip() else {
            return;
        };
        let locks = locks_on(&server).await;
        let name = LockName::new("floor").unwrap();
        let (token, ttl) = (Token::from_u128(7), 10_000_000_000);
        let t: Vec<u64> = server.query(&["TIME"]).unwrap();
        let before = t[0] * 1_000_000 + t[1];
        let a = locks
            .try_once(&name, token, ttl, Fencing::Counter)
            .await
            .unwrap();
        let Attempt::Acquired { fence: Some(f) } = a else {
            panic!("{a:?}")
        };
        assert!(f >= before, "{f} < {before}");
        let stored: u64 = server.query(&["GET", "lock:{floor}:fence"]).unwrap();
        assert_eq!(stored, f);
        let busy = locks
            .try_once(&name, Token::from_u128(8), ttl, Fencing::Counter)
            .await
            .unwrap();
        assert!(
            matches!(busy, Attempt::Busy { remaining: Some(r), clean: true } if r > 0),
            "{busy:?}"
        );
        let stored: u64 = server.query(&["GET", "lock:{floor}:fence"]).unwrap();
        assert_eq!(stored, f, "a refused acquire does not count");
        assert!(locks.release(&name, token).await.unwrap());
        let again = locks
            .try_once(&name, token, ttl, Fencing::Counter)
            .await
            .unwrap();
        assert_eq!(again, Attempt::Acquired { fence: Some(f + 1) });
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
        let ours = RedisLocks::script_cmd("EVALSHA", script.get_hash(), &[key], token, Some(7));
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
