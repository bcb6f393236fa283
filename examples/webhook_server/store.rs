//! Storage backends: in memory (default) or Redis (`--redis URL`).
//!
//! Each piece is an enum over the two backends implementing raceguard's
//! backend-independent traits (`SessionRegistry`, `KeyedLimit`, `Limit`), so
//! the request handling is written once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raceguard::cache::VersionedCache;
use raceguard::keys::UserId;
use raceguard::middleware::{LimitOutcome, MemoryLimits, RateKey, RateLimitBackend};
use raceguard::rate::{Decision, KeyedRateLimiter, Limit, Quota, RateLimiter};
use raceguard::session::{
    MemorySessionRegistry, SessionConfig, SessionId, SessionKey, SessionRegistry,
};
use raceguard::{Error, Result};
use serde::{Deserialize, Serialize};

#[cfg(feature = "redis")]
use raceguard::cache::RedisVersionedCache;
#[cfg(feature = "redis")]
use raceguard::middleware::RedisLimits;
#[cfg(feature = "redis")]
use raceguard::redis::{RedisBackend, RedisKeyedRateLimiter, RedisRateLimiter};
#[cfg(feature = "redis")]
use raceguard::session::RedisSessionRegistry;

/// How long a cached history lives (invalidation makes it stale earlier).
const HISTORY_TTL: Duration = Duration::from_secs(60);
/// How long webhook ids are remembered for de-duplication.
#[cfg(feature = "redis")]
const WEBHOOK_ID_TTL_SECS: u64 = 24 * 3600;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Message {
    pub(crate) seq: u64,
    pub(crate) author: String,
    pub(crate) text: String,
}

/// A message as stored in Redis (its sequence number is its position).
#[cfg(feature = "redis")]
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    author: String,
    text: String,
}

/// The request rate limits (per user + global, all or nothing) on either
/// backend, for raceguard's `RateLimitLayer`.
#[derive(Debug)]
pub(crate) enum Limits {
    Memory(MemoryLimits),
    #[cfg(feature = "redis")]
    Redis(RedisLimits),
}

impl RateLimitBackend for Limits {
    async fn check(&self, key: &RateKey) -> Result<LimitOutcome> {
        match self {
            Limits::Memory(m) => m.check(key).await,
            #[cfg(feature = "redis")]
            Limits::Redis(r) => r.check(key).await,
        }
    }
}

/// Policy names in the `RateLimit-Policy` / `RateLimit` headers.
const USER_POLICY: &str = "per-user";
const GLOBAL_POLICY: &str = "global";

/// Global limiter on either backend (the workers' outbound limit).
#[derive(Debug)]
pub(crate) enum GlobalLimiter {
    Memory(RateLimiter),
    #[cfg(feature = "redis")]
    Redis(RedisRateLimiter),
}

impl Limit for GlobalLimiter {
    async fn check_n(&self, n: u32) -> Result<Decision> {
        match self {
            GlobalLimiter::Memory(l) => l.check_n(n),
            #[cfg(feature = "redis")]
            GlobalLimiter::Redis(l) => l.check_n(n).await,
        }
    }
}

/// Session registry on either backend.
#[derive(Debug, Clone)]
pub(crate) enum Sessions {
    Memory(MemorySessionRegistry),
    #[cfg(feature = "redis")]
    Redis(RedisSessionRegistry),
}

macro_rules! delegate {
    ($self:ident, $r:ident => $e:expr) => {
        match $self {
            Sessions::Memory($r) => $e,
            #[cfg(feature = "redis")]
            Sessions::Redis($r) => $e,
        }
    };
}

impl SessionRegistry for Sessions {
    async fn create(&self, user: &UserId) -> Result<SessionKey> {
        delegate!(self, r => r.create(user).await)
    }
    async fn verify(&self, user: &UserId, id: &SessionId) -> Result<SessionKey> {
        delegate!(self, r => r.verify(user, id).await)
    }
    async fn touch(&self, session: &SessionKey) -> Result<()> {
        delegate!(self, r => r.touch(session).await)
    }
    async fn rotate(&self, session: &SessionKey) -> Result<SessionKey> {
        delegate!(self, r => r.rotate(session).await)
    }
    async fn revoke(&self, session: &SessionKey) -> Result<bool> {
        delegate!(self, r => r.revoke(session).await)
    }
    async fn revoke_all(&self, user: &UserId) -> Result<()> {
        delegate!(self, r => r.revoke_all(user).await)
    }
}

/// Chat history, its cache and webhook ids.
#[derive(Debug)]
pub(crate) enum Store {
    Memory(MemoryStore),
    #[cfg(feature = "redis")]
    Redis(RedisStore),
}

#[derive(Debug, Default)]
pub(crate) struct MemoryStore {
    /// The "database": history per verified session key.
    history: Mutex<HashMap<String, Vec<Message>>>,
    cache: Option<VersionedCache<Vec<Message>>>,
    accepted: Mutex<HashSet<String>>,
    processed: Mutex<HashSet<String>>,
}

#[cfg(feature = "redis")]
#[derive(Debug)]
pub(crate) struct RedisStore {
    backend: RedisBackend,
    cache: RedisVersionedCache<Vec<Message>>,
}

/// Everything built for one backend.
#[derive(Debug)]
pub(crate) struct Backends {
    pub(crate) store: Store,
    pub(crate) sessions: Sessions,
    pub(crate) limits: Arc<Limits>,
    pub(crate) worker_limit: Arc<GlobalLimiter>,
    pub(crate) name: &'static str,
    /// The Redis connection (`--redis`), for the durable webhook queue.
    #[cfg(feature = "redis")]
    pub(crate) redis: Option<RedisBackend>,
}

/// Limits of the backends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Quotas {
    pub(crate) user: Quota,
    pub(crate) global: Quota,
    pub(crate) worker: Quota,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Backends {
    pub(crate) fn memory(q: Quotas) -> Result<Backends> {
        Ok(Backends {
            store: Store::Memory(MemoryStore {
                cache: Some(VersionedCache::new(100_000)),
                ..MemoryStore::default()
            }),
            sessions: Sessions::Memory(MemorySessionRegistry::new(SessionConfig::default())),
            limits: Arc::new(Limits::Memory(
                MemoryLimits::new(
                    USER_POLICY,
                    KeyedRateLimiter::builder(q.user)
                        .max_keys(1_000_000)
                        .build()?,
                )?
                .with_global(GLOBAL_POLICY, RateLimiter::new(q.global))?,
            )),
            worker_limit: Arc::new(GlobalLimiter::Memory(RateLimiter::new(q.worker))),
            name: "memory",
            #[cfg(feature = "redis")]
            redis: None,
        })
    }

    #[cfg(feature = "redis")]
    pub(crate) async fn redis(url: &str, q: Quotas) -> Result<Backends> {
        use raceguard::redis::RedisConfig;
        let backend = RedisBackend::connect(url, RedisConfig::default()).await?;
        Ok(Backends {
            store: Store::Redis(RedisStore {
                cache: RedisVersionedCache::new(backend.clone(), "demo-chat-history")?,
                backend: backend.clone(),
            }),
            sessions: Sessions::Redis(RedisSessionRegistry::new(
                backend.clone(),
                SessionConfig::default(),
            )),
            limits: Arc::new(Limits::Redis(
                RedisLimits::new(
                    USER_POLICY,
                    RedisKeyedRateLimiter::new(&backend, "demo-user", q.user)?,
                )?
                .with_global(
                    GLOBAL_POLICY,
                    RedisRateLimiter::new(&backend, "demo-global", q.global)?,
                )?,
            )),
            worker_limit: Arc::new(GlobalLimiter::Redis(RedisRateLimiter::new(
                &backend,
                "demo-external-api",
                q.worker,
            )?)),
            name: "redis",
            redis: Some(backend),
        })
    }
}

fn history_item(key: &SessionKey) -> String {
    format!("history:{}", key.session_id().expose())
}

impl Store {
    /// Appends a message to the verified session and invalidates the
    /// user's cached histories (one version bump, no pattern delete).
    pub(crate) async fn append(&self, key: &SessionKey, text: String) -> Result<u64> {
        let db_key = key.key()?.into_string();
        let author = key.user().as_str().to_string();
        match self {
            Store::Memory(m) => {
                let seq = {
                    let mut h = lock(&m.history);
                    let list = h.entry(db_key).or_default();
                    let seq = list.len() as u64 + 1;
                    list.push(Message { seq, author, text });
                    seq
                };
                if let Some(cache) = &m.cache {
                    cache.invalidate(key.user());
                }
                Ok(seq)
            }
            #[cfg(feature = "redis")]
            Store::Redis(r) => {
                // The sequence number is the list length RPUSH returns,
                // atomically with the push.
                let stored = serde_json::to_string(&Stored { author, text })
                    .map_err(|e| Error::invalid("message", e.to_string()))?;
                let seq: u64 = r
                    .backend
                    .query(
                        ::redis::cmd("RPUSH")
                            .arg(format!("demo:history:{db_key}"))
                            .arg(stored),
                    )
                    .await?;
                r.cache.invalidate(key.user()).await?;
                Ok(seq)
            }
        }
    }

    /// The session's history, through the versioned cache.
    pub(crate) async fn history(&self, key: &SessionKey) -> Result<Vec<Message>> {
        let db_key = key.key()?.into_string();
        let item = history_item(key);
        match self {
            Store::Memory(m) => {
                let load = || async {
                    Ok::<_, Error>(lock(&m.history).get(&db_key).cloned().unwrap_or_default())
                };
                match &m.cache {
                    Some(cache) => {
                        cache
                            .get_or_load(key.user(), &item, HISTORY_TTL, load)
                            .await
                    }
                    None => load().await,
                }
            }
            #[cfg(feature = "redis")]
            Store::Redis(r) => {
                let list = format!("demo:history:{db_key}");
                r.cache
                    .get_or_load(key.user(), &item, HISTORY_TTL, || async {
                        let raw: Vec<String> = r
                            .backend
                            .query(::redis::cmd("LRANGE").arg(&list).arg(0).arg(-1))
                            .await?;
                        raw.iter()
                            .zip(1..)
                            .map(|(s, seq)| {
                                let m: Stored = serde_json::from_str(s)
                                    .map_err(|e| Error::invalid("stored message", e.to_string()))?;
                                Ok(Message {
                                    seq,
                                    author: m.author,
                                    text: m.text,
                                })
                            })
                            .collect::<Result<Vec<_>>>()
                    })
                    .await
            }
        }
    }

    /// Records an incoming webhook id; `false` if it was already accepted
    /// (a redelivery).
    pub(crate) async fn mark_accepted(&self, id: &str) -> Result<bool> {
        match self {
            Store::Memory(m) => Ok(lock(&m.accepted).insert(id.to_string())),
            #[cfg(feature = "redis")]
            Store::Redis(r) => set_nx(&r.backend, &format!("demo:wh:accepted:{id}")).await,
        }
    }

    /// Forgets an id whose job could not be queued, so the sender's retry
    /// is accepted.
    pub(crate) async fn unmark_accepted(&self, id: &str) -> Result<()> {
        match self {
            Store::Memory(m) => {
                lock(&m.accepted).remove(id);
                Ok(())
            }
            #[cfg(feature = "redis")]
            Store::Redis(r) => {
                let _: i64 = r
                    .backend
                    .query(::redis::cmd("DEL").arg(format!("demo:wh:accepted:{id}")))
                    .await?;
                Ok(())
            }
        }
    }

    /// Records that a webhook was processed; `false` if it already was (a
    /// duplicate execution, which must never happen).
    ///
    /// On Redis the marker and the durable `processed` / `duplicates`
    /// counters ([`Store::durable_counts`]) change in one script, so the
    /// counts survive a crash or restart of the server and agree with the
    /// markers.
    pub(crate) async fn mark_processed(&self, id: &str) -> Result<bool> {
        match self {
            Store::Memory(m) => Ok(lock(&m.processed).insert(id.to_string())),
            #[cfg(feature = "redis")]
            Store::Redis(r) => {
                let script = ::redis::Script::new(MARK_PROCESSED);
                let mut inv = script.prepare_invoke();
                inv.key(format!("demo:wh:processed:{id}"))
                    .key(COUNTERS_KEY)
                    .arg(WEBHOOK_ID_TTL_SECS);
                let fresh: i64 = r.backend.invoke(&inv).await?;
                Ok(fresh == 1)
            }
        }
    }

    /// Whether a webhook's processing was already recorded (a job redelivered
    /// after a crash between the record and the queue's acknowledgement).
    #[cfg(feature = "redis")]
    pub(crate) async fn is_processed(&self, id: &str) -> Result<bool> {
        match self {
            Store::Memory(m) => Ok(lock(&m.processed).contains(id)),
            Store::Redis(r) => {
                let n: i64 = r
                    .backend
                    .query(::redis::cmd("EXISTS").arg(format!("demo:wh:processed:{id}")))
                    .await?;
                Ok(n == 1)
            }
        }
    }

    /// The durable `(processed, duplicates)` counters on Redis: shared by
    /// every server on that Redis and kept across restarts (`None` in
    /// memory).
    #[cfg(feature = "redis")]
    pub(crate) async fn durable_counts(&self) -> Result<Option<(u64, u64)>> {
        match self {
            Store::Memory(_) => Ok(None),
            Store::Redis(r) => {
                let (p, d): (Option<u64>, Option<u64>) = r
                    .backend
                    .query(
                        ::redis::cmd("HMGET")
                            .arg(COUNTERS_KEY)
                            .arg("processed")
                            .arg("duplicates"),
                    )
                    .await?;
                Ok(Some((p.unwrap_or(0), d.unwrap_or(0))))
            }
        }
    }
}

/// The durable webhook counters (a hash: `processed`, `duplicates`).
#[cfg(feature = "redis")]
const COUNTERS_KEY: &str = "demo:wh:counters";

/// Marks a webhook processed (SET NX with the id TTL) and counts the
/// outcome, atomically.
#[cfg(feature = "redis")]
const MARK_PROCESSED: &str = r"
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  redis.call('HINCRBY', KEYS[2], 'processed', 1)
  return 1
end
redis.call('HINCRBY', KEYS[2], 'duplicates', 1)
return 0
";

#[cfg(feature = "redis")]
async fn set_nx(backend: &RedisBackend, key: &str) -> Result<bool> {
    let set: Option<String> = backend
        .query(
            ::redis::cmd("SET")
                .arg(key)
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(WEBHOOK_ID_TTL_SECS),
        )
        .await?;
    Ok(set.is_some())
}
