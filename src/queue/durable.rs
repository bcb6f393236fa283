//! A durable, bounded work queue on Redis Streams (feature `redis`).
//!
//! [`DurableQueue`] keeps every accepted job in a Redis stream until a worker
//! **completes** it, so a job survives the death of the process that
//! submitted it and of the worker that was running it.
//!
//! - **Bounded.** [`submit`](DurableQueue::submit) never blocks: it returns
//!   at once with [`Submitted`] or with [`Error::CapacityExceeded`]
//!   (`"durable queue"`) when the stream already holds `capacity` jobs that
//!   are not completed. The check and the `XADD` are one Lua script, so the
//!   stream never grows past the capacity, however many processes submit.
//! - **Deduplicated.** Every job carries an *idempotency key*. A second
//!   submit with a known key enqueues nothing and returns
//!   [`Submitted::Duplicate`]; this makes a retried submit (after a timeout,
//!   a lost reply, a client retry of the webhook) safe.
//! - **Consumer group.** Workers are [`Consumer`]s of one consumer group.
//!   [`Consumer::next`] reads a new job (`XREADGROUP`); the job stays in the
//!   group's pending list, owned by that consumer, until
//!   [`Delivery::ack`].
//! - **Reclaim.** A worker that dies mid-job leaves its job pending.
//!   [`Consumer::reclaim`] (`XAUTOCLAIM`) moves jobs that were idle for at
//!   least `min_idle` to the caller, counting delivery attempts; a job
//!   delivered more than [`max_attempts`](DurableQueueConfig::max_attempts)
//!   times goes to a dead-letter stream instead ([`DurableQueue::dead_letters`]).
//! - **Worker loop.** [`Consumer::run`] reclaims, reads, runs a handler on
//!   up to N jobs at once, acknowledges successes, leaves failures pending
//!   for a retry, and stops at a shutdown signal after finishing its batch.
//! - **Metrics** (feature `metrics`): submits by result, acks by outcome,
//!   reclaims and dead letters, counted from replies the queue already reads
//!   (no extra round trip); see the [queue module docs](super#metrics).
//!
//! # Exactly-once completion
//!
//! Redis Streams deliver **at least once**: a job whose worker died is
//! delivered again. raceguard turns this into **exactly-once completion per
//! idempotency key**: [`Delivery::ack`] runs one script that checks that the
//! caller still owns the entry, marks the key completed, `XACK`s and `XDEL`s
//! the entry. Exactly one `ack` per key returns [`AckOutcome::Completed`];
//! every other one returns [`AckOutcome::AlreadyCompleted`] or
//! [`AckOutcome::NotOwned`] and changes nothing, and a reclaimed job whose
//! key is already completed is acknowledged without being delivered.
//!
//! What this does **not** give by itself is exactly-once *side effects*: a
//! handler that dies after its effect and before `ack` runs again on
//! another worker. Make effects idempotent keyed by
//! [`Delivery::idempotency_key`] (an upsert, a unique constraint, a payment
//! provider's idempotency key), or commit them only if `ack` returns
//! `Completed` when they can be undone. Pick `min_idle` for `reclaim` above
//! the longest handler run, or a slow-but-alive worker's job is taken over
//! and runs twice (its late `ack` then returns `NotOwned`).
//!
//! # Keys
//!
//! All keys of a queue share its name as the Redis Cluster hash tag (one
//! slot, so every script works on a cluster), and the name and the
//! idempotency keys are escaped by [`crate::keys::Key`]:
//!
//! ```text
//! rq:{<queue>}:stream          the jobs (fields k = idempotency key, p = payload)
//! rq:{<queue>}:job:<idem key>  the key's state: queued, done, dead-lettered
//! rq:{<queue>}:dead            dead letters (approximately capped)
//! ```
//!
//! A completed or dead-lettered key is remembered for the
//! [`dedupe_ttl`](DurableQueueConfig::dedupe_ttl); a queued key has no
//! expiry.
//!
//! ```no_run
//! # async fn demo(redis: raceguard::redis::RedisBackend) -> raceguard::Result<()> {
//! use std::time::Duration;
//! use raceguard::queue::durable::{AckOutcome, DurableQueue, DurableQueueConfig};
//!
//! let queue = DurableQueue::new(redis, "webhooks", DurableQueueConfig::default())?;
//! match queue.submit("delivery-8f2c", b"{\"event\":\"paid\"}").await {
//!     // Accepted now, or a retry of an accepted job: either way, 202.
//!     Ok(submitted) => println!("job {}", submitted.id()),
//!     Err(e) if e.kind() == raceguard::ErrorKind::Capacity => { /* 503 */ }
//!     Err(e) => return Err(e),
//! }
//!
//! let worker = queue.consumer("worker-1")?;
//! // Take over the jobs of workers that died (idle for more than a minute) ...
//! for job in worker.reclaim(Duration::from_secs(60), 16).await? {
//!     // handle(job.payload()) ...
//!     job.ack().await?;
//! }
//! // ... then read new ones.
//! if let Some(job) = worker.next(Duration::from_secs(1)).await? {
//!     // handle(job.payload()) ...
//!     assert_eq!(job.ack().await?, AckOutcome::Completed);
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::ConnectionLike;
use ::redis::{Cmd, RedisError, Script, Value};

use crate::keys::{Key, MAX_ID_LEN, ScopeId};
use crate::redis::{DedicatedConnection, RedisBackend, map_redis_error};
use crate::{Error, Result};

/// The resource named in [`Error::CapacityExceeded`].
const RESOURCE: &str = "durable queue";

/// The one consumer group of a queue.
const GROUP: &str = "workers";

/// The longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = MAX_ID_LEN;

/// The longest consumer name accepted, in bytes.
pub const MAX_CONSUMER_NAME_LEN: usize = 128;

/// The most entries one read or reclaim returns.
pub const MAX_BATCH: usize = 1024;

/// The longest dedupe window accepted (100 years; Redis rejects expiry
/// times that overflow).
const MAX_DEDUPE_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Settings of a [`DurableQueue`].
///
/// ```
/// use std::time::Duration;
/// use raceguard::queue::durable::DurableQueueConfig;
///
/// let config = DurableQueueConfig::default()
///     .capacity(5_000)
///     .max_attempts(Some(3))
///     .dedupe_ttl(Duration::from_secs(3600));
/// assert_eq!(config.get_capacity(), 5_000);
/// ```
#[derive(Debug, Clone)]
pub struct DurableQueueConfig {
    capacity: usize,
    max_payload: usize,
    max_attempts: Option<u64>,
    dedupe_ttl: Duration,
    dead_letter_capacity: usize,
    namespace: String,
}

impl Default for DurableQueueConfig {
    /// Capacity 10,000 jobs, payloads up to 1 MiB, at most 10 delivery
    /// attempts, completed keys remembered for 24 h, about 10,000 dead
    /// letters kept, namespace `rq`.
    fn default() -> Self {
        DurableQueueConfig {
            capacity: 10_000,
            max_payload: 1 << 20,
            max_attempts: Some(10),
            dedupe_ttl: Duration::from_secs(24 * 3600),
            dead_letter_capacity: 10_000,
            namespace: "rq".to_owned(),
        }
    }
}

impl DurableQueueConfig {
    /// The most jobs accepted and not yet completed (queued or in progress)
    /// at once. At least 1.
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = n;
        self
    }

    /// The largest payload accepted, in bytes. At least 1.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// How many deliveries a job gets before [`Consumer::reclaim`] moves it
    /// to the dead-letter stream instead (`None`: no limit). At least 1.
    pub fn max_attempts(mut self, n: Option<u64>) -> Self {
        self.max_attempts = n;
        self
    }

    /// How long a completed (or dead-lettered) idempotency key is
    /// remembered: a submit with the same key within this window is a
    /// duplicate. At least 1 ms, at most 100 years.
    pub fn dedupe_ttl(mut self, ttl: Duration) -> Self {
        self.dedupe_ttl = ttl;
        self
    }

    /// About how many dead letters are kept (`XADD MAXLEN ~`). At least 1.
    pub fn dead_letter_capacity(mut self, n: usize) -> Self {
        self.dead_letter_capacity = n;
        self
    }

    /// The key namespace (`[A-Za-z0-9_.-]`, default `rq`).
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = ns.into();
        self
    }

    /// The configured capacity.
    pub fn get_capacity(&self) -> usize {
        self.capacity
    }

    /// The configured largest payload.
    pub fn get_max_payload(&self) -> usize {
        self.max_payload
    }

    /// The configured attempt limit.
    pub fn get_max_attempts(&self) -> Option<u64> {
        self.max_attempts
    }

    /// The configured dedupe window.
    pub fn get_dedupe_ttl(&self) -> Duration {
        self.dedupe_ttl
    }

    fn validate(&self) -> Result<()> {
        if self.capacity == 0 {
            return Err(Error::invalid(
                "durable_queue.capacity",
                "must be at least 1",
            ));
        }
        if self.max_payload == 0 {
            return Err(Error::invalid(
                "durable_queue.max_payload",
                "must be at least 1",
            ));
        }
        if self.max_attempts == Some(0) {
            return Err(Error::invalid(
                "durable_queue.max_attempts",
                "must be at least 1 (use None for no limit)",
            ));
        }
        if self.dedupe_ttl.as_millis() == 0 || self.dedupe_ttl > MAX_DEDUPE_TTL {
            return Err(Error::invalid(
                "durable_queue.dedupe_ttl",
                "must be between 1 ms and 100 years",
            ));
        }
        if self.dead_letter_capacity == 0 {
            return Err(Error::invalid(
                "durable_queue.dead_letter_capacity",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A stream entry id (`<ms>-<seq>`), naming one accepted job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    /// The id as Redis wrote it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the queue knows about an idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobStatus {
    /// Accepted and not completed yet (waiting or in progress).
    Queued,
    /// Completed (acknowledged once).
    Completed,
    /// Moved to the dead-letter stream after too many attempts.
    DeadLettered,
}

/// The result of [`DurableQueue::submit`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Submitted {
    /// The job was added to the queue.
    Accepted(JobId),
    /// A job with this idempotency key was accepted before (within the
    /// dedupe window); nothing was added.
    Duplicate {
        /// The earlier job.
        id: JobId,
        /// Its current state.
        status: JobStatus,
    },
}

impl Submitted {
    /// The job's id, new or earlier.
    pub fn id(&self) -> &JobId {
        match self {
            Submitted::Accepted(id) | Submitted::Duplicate { id, .. } => id,
        }
    }

    /// Whether this call added the job.
    pub fn is_accepted(&self) -> bool {
        matches!(self, Submitted::Accepted(_))
    }
}

/// The result of [`Delivery::ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AckOutcome {
    /// This call completed the job: its key is marked completed and the
    /// entry is acknowledged and deleted, in one step.
    Completed,
    /// The job was already completed (by this or another consumer); nothing
    /// changed.
    AlreadyCompleted,
    /// The entry is no longer pending under this consumer: another consumer
    /// reclaimed it (and will complete it), or it was dead-lettered. Nothing
    /// changed.
    NotOwned,
}

/// A job moved to the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The dead-letter stream entry's id.
    pub id: JobId,
    /// The id the job had in the queue.
    pub source_id: JobId,
    /// The job's idempotency key (empty for a malformed entry).
    pub idempotency_key: String,
    /// The job's payload (empty for a malformed entry).
    pub payload: Vec<u8>,
    /// Deliveries counted when it was moved.
    pub attempts: u64,
}

struct Scripts {
    submit: Script,
    ack: Script,
    settle: Script,
    group: Script,
}

struct Inner {
    backend: RedisBackend,
    name: ScopeId,
    namespace: String,
    stream: Key,
    dead: Key,
    config: DurableQueueConfig,
    scripts: Scripts,
    metrics: DurableMetrics,
}

/// A bounded, durable work queue on a Redis stream. Cheap to clone.
///
/// See the [module docs](self) for the guarantees.
///
/// ```no_run
/// # async fn demo(redis: raceguard::redis::RedisBackend) -> raceguard::Result<()> {
/// use raceguard::queue::durable::{DurableQueue, DurableQueueConfig};
///
/// let queue = DurableQueue::new(redis, "emails", DurableQueueConfig::default().capacity(100))?;
/// let first = queue.submit("welcome:alice", b"hi alice").await?;
/// let again = queue.submit("welcome:alice", b"hi alice").await?;
/// assert!(first.is_accepted() && !again.is_accepted());
/// assert_eq!(first.id(), again.id());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DurableQueue {
    inner: Arc<Inner>,
}

impl fmt::Debug for DurableQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableQueue")
            .field("name", &self.inner.name)
            .field("stream", &self.inner.stream)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn protocol(why: impl Into<String>) -> Error {
    Error::backend("redis", false, why.into())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".to_owned()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

/// Items of an array-like reply (RESP2 arrays, RESP3 sets).
fn items(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

/// One stream entry as read from Redis.
struct RawEntry {
    id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RawEntry {
    fn field(&self, name: &[u8]) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Parses `[[id, [field, value, ...]], ...]` (the entries of XRANGE,
/// XAUTOCLAIM, or one stream of XREADGROUP).
fn parse_entries(v: &Value) -> Result<Vec<RawEntry>> {
    let bad = || protocol("unexpected stream entries reply");
    let Some(list) = items(v) else {
        return if matches!(v, Value::Nil) {
            Ok(Vec::new())
        } else {
            Err(bad())
        };
    };
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        let pair = items(e).ok_or_else(bad)?;
        let [id, fields] = pair else {
            return Err(bad());
        };
        let id = text(id).ok_or_else(bad)?;
        let mut kv = Vec::new();
        match fields {
            Value::Nil => {}
            Value::Map(m) => {
                for (k, v) in m {
                    kv.push((bytes(k).ok_or_else(bad)?, bytes(v).ok_or_else(bad)?));
                }
            }
            other => {
                let flat = items(other).ok_or_else(bad)?;
                for chunk in flat.chunks(2) {
                    let [k, v] = chunk else {
                        return Err(bad());
                    };
                    kv.push((bytes(k).ok_or_else(bad)?, bytes(v).ok_or_else(bad)?));
                }
            }
        }
        out.push(RawEntry { id, fields: kv });
    }
    Ok(out)
}

/// Parses an XREADGROUP reply for a single stream: nil, `[[key, entries]]`
/// (RESP2) or `{key: entries}` (RESP3).
fn parse_read(v: &Value) -> Result<Vec<RawEntry>> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Map(m) => match m.first() {
            Some((_, entries)) => parse_entries(entries),
            None => Ok(Vec::new()),
        },
        other => {
            let streams = items(other).ok_or_else(|| protocol("unexpected XREADGROUP reply"))?;
            match streams.first() {
                None => Ok(Vec::new()),
                Some(s) => match items(s) {
                    Some([_, entries]) => parse_entries(entries),
                    _ => Err(protocol("unexpected XREADGROUP reply")),
                },
            }
        }
    }
}

fn is_nogroup(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

fn check_batch(max: usize) -> Result<usize> {
    if max == 0 || max > MAX_BATCH {
        return Err(Error::invalid(
            "durable_queue.batch",
            format!("must be 1..={MAX_BATCH}, got {max}"),
        ));
    }
    Ok(max)
}

impl DurableQueue {
    /// A queue named `name` on `backend`. Validates only; the stream and its
    /// consumer group are created on first use.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`]: `scope_id` for an empty name or one longer
    /// than [`MAX_ID_LEN`] bytes (any other content is escaped),
    /// `durable_queue.*` for a bad configuration, `key.namespace` for a bad
    /// namespace.
    ///
    /// ```no_run
    /// # fn demo(redis: raceguard::redis::RedisBackend) -> raceguard::Result<()> {
    /// use raceguard::queue::durable::{DurableQueue, DurableQueueConfig};
    /// let queue = DurableQueue::new(redis.clone(), "payments", DurableQueueConfig::default())?;
    /// assert!(DurableQueue::new(redis, "", DurableQueueConfig::default()).is_err());
    /// # let _ = queue; Ok(()) }
    /// ```
    pub fn new(backend: RedisBackend, name: &str, config: DurableQueueConfig) -> Result<Self> {
        config.validate()?;
        let name = ScopeId::new(name)?;
        let stream = Key::builder(&config.namespace)?
            .owner(&name)
            .part("stream")
            .build()?;
        let dead = Key::builder(&config.namespace)?
            .owner(&name)
            .part("dead")
            .build()?;
        let metrics = DurableMetrics::new(name.as_str());
        Ok(DurableQueue {
            inner: Arc::new(Inner {
                metrics,
                backend,
                namespace: config.namespace.clone(),
                name,
                stream,
                dead,
                config,
                scripts: Scripts {
                    submit: Script::new(include_str!("durable_submit.lua")),
                    ack: Script::new(include_str!("durable_ack.lua")),
                    settle: Script::new(include_str!("durable_settle.lua")),
                    group: Script::new(include_str!("durable_group.lua")),
                },
            }),
        })
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        self.inner.name.as_str()
    }

    /// The configured capacity.
    pub fn capacity(&self) -> usize {
        self.inner.config.capacity
    }

    /// The stream's key (for monitoring with `XINFO`, `XPENDING`).
    pub fn stream_key(&self) -> &Key {
        &self.inner.stream
    }

    /// The dead-letter stream's key.
    pub fn dead_letter_key(&self) -> &Key {
        &self.inner.dead
    }

    fn validate_idempotency_key(key: &str) -> Result<()> {
        // The same 1..=MAX_ID_LEN rule as user and scope ids.
        crate::keys::ids::validate("idempotency_key", key)
    }

    fn job_key(&self, idempotency_key: &str) -> Result<Key> {
        Key::builder(&self.inner.namespace)?
            .owner(&self.inner.name)
            .part("job")
            .part(idempotency_key)
            .build()
    }

    /// Adds a job unless its idempotency key is already known, in one
    /// atomic step; never waits for room.
    ///
    /// Retrying a submit whose outcome is unknown (a timeout, a dropped
    /// connection) is safe: the retry returns [`Submitted::Duplicate`] if
    /// the first one was accepted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`idempotency_key`: empty or longer than
    /// [`MAX_IDEMPOTENCY_KEY_LEN`] bytes; `durable_queue.payload`: larger
    /// than [`max_payload`](DurableQueueConfig::max_payload));
    /// [`Error::CapacityExceeded`] (`"durable queue"`) when `capacity`
    /// jobs are accepted and not completed (a duplicate is reported as such
    /// even then); [`Error::Timeout`] / [`Error::Backend`] from Redis.
    ///
    /// Cancellation: dropping the future abandons the reply; the job may or
    /// may not have been accepted (submit again with the same key to find
    /// out).
    ///
    /// ```no_run
    /// # async fn demo(queue: raceguard::queue::durable::DurableQueue) -> raceguard::Result<()> {
    /// let submitted = queue.submit("order-17:confirmation", b"payload").await?;
    /// println!("job {}", submitted.id());
    /// # Ok(()) }
    /// ```
    pub async fn submit(&self, idempotency_key: &str, payload: &[u8]) -> Result<Submitted> {
        Self::validate_idempotency_key(idempotency_key)?;
        let max = self.inner.config.max_payload;
        if payload.len() > max {
            return Err(Error::invalid(
                "durable_queue.payload",
                format!("is {} bytes, at most {max} allowed", payload.len()),
            ));
        }
        let mut inv = self.inner.scripts.submit.prepare_invoke();
        inv.key(&self.inner.stream)
            .key(self.job_key(idempotency_key)?)
            .arg(GROUP)
            .arg(self.inner.config.capacity)
            .arg(idempotency_key)
            .arg(payload);
        let reply: Value = self.inner.backend.invoke(&inv).await?;
        let bad = || protocol("unexpected durable submit reply");
        let parts = items(&reply).ok_or_else(bad)?;
        match parts {
            [code, id] if int(code) == Some(1) => {
                let id = JobId(text(id).ok_or_else(bad)?);
                self.inner.metrics.submitted(SubmitResult::Accepted);
                Ok(Submitted::Accepted(id))
            }
            [code, id, state] if int(code) == Some(0) => {
                let status = match text(state).as_deref() {
                    Some("q") => JobStatus::Queued,
                    Some("d") => JobStatus::Completed,
                    Some("x") => JobStatus::DeadLettered,
                    _ => return Err(bad()),
                };
                let id = JobId(text(id).ok_or_else(bad)?);
                self.inner.metrics.submitted(SubmitResult::Duplicate);
                Ok(Submitted::Duplicate { id, status })
            }
            [code] if int(code) == Some(-1) => {
                self.inner.metrics.submitted(SubmitResult::Full);
                Err(Error::CapacityExceeded {
                    resource: RESOURCE,
                    capacity: self.inner.config.capacity,
                })
            }
            _ => Err(bad()),
        }
    }

    /// Serialises `job` as JSON and [`submit`](Self::submit)s it.
    ///
    /// # Errors
    ///
    /// As [`submit`](Self::submit); [`Error::InvalidInput`]
    /// (`durable_queue.payload`) when `job` cannot be serialised.
    ///
    /// Cancellation: as [`submit`](Self::submit).
    ///
    /// ```no_run
    /// # async fn demo(queue: raceguard::queue::durable::DurableQueue) -> raceguard::Result<()> {
    /// #[derive(serde::Serialize)]
    /// struct Email<'a> { to: &'a str }
    /// queue.submit_json("signup:42", &Email { to: "a@example.com" }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn submit_json<T: serde::Serialize + ?Sized>(
        &self,
        idempotency_key: &str,
        job: &T,
    ) -> Result<Submitted> {
        let payload = serde_json::to_vec(job)
            .map_err(|e| Error::invalid("durable_queue.payload", e.to_string()))?;
        self.submit(idempotency_key, &payload).await
    }

    /// What the queue knows about `idempotency_key`: `None` when it was
    /// never accepted or its dedupe window passed.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a bad key; Redis errors.
    ///
    /// Cancellation: dropping the future has no effect (a read).
    ///
    /// ```no_run
    /// # async fn demo(queue: raceguard::queue::durable::DurableQueue) -> raceguard::Result<()> {
    /// use raceguard::queue::durable::JobStatus;
    /// if queue.status("order-17:confirmation").await? == Some(JobStatus::Completed) {
    ///     println!("sent");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn status(&self, idempotency_key: &str) -> Result<Option<JobStatus>> {
        Self::validate_idempotency_key(idempotency_key)?;
        let s: Option<String> = self
            .inner
            .backend
            .query(
                ::redis::cmd("HGET")
                    .arg(self.job_key(idempotency_key)?)
                    .arg("s"),
            )
            .await?;
        Ok(match s.as_deref() {
            None => None,
            Some("q") => Some(JobStatus::Queued),
            Some("d") => Some(JobStatus::Completed),
            Some("x") => Some(JobStatus::DeadLettered),
            Some(other) => return Err(protocol(format!("unknown job state {other:?}"))),
        })
    }

    /// How many jobs are accepted and not completed (waiting or in
    /// progress): the stream's length, the number the capacity bounds.
    ///
    /// # Errors
    ///
    /// Redis errors.
    ///
    /// Cancellation: dropping the future has no effect (a read).
    ///
    /// ```no_run
    /// # async fn demo(queue: raceguard::queue::durable::DurableQueue) -> raceguard::Result<()> {
    /// assert!(queue.len().await? <= queue.capacity());
    /// # Ok(()) }
    /// ```
    pub async fn len(&self) -> Result<usize> {
        self.inner
            .backend
            .query(::redis::cmd("XLEN").arg(&self.inner.stream))
            .await
    }

    /// Whether no job is waiting or in progress.
    ///
    /// # Errors
    ///
    /// Redis errors.
    ///
    /// Cancellation: dropping the future has no effect (a read).
    ///
    /// ```no_run
    /// # async fn demo(queue: raceguard::queue::durable::DurableQueue) -> raceguard::Result<()> {
    /// if queue.is_empty().await? { println!("idle"); }
    /// # Ok(()) }
    /// ```
    pub async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }

    /// Up to `max` dead letters, oldest first.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`durable_queue.batch`) unless
    /// `1 <= max <= MAX_BATCH`; Redis errors.
    ///
    /// Cancellation: dropping the future has no effect (a read).
    ///
    /// ```no_run
    /// # async fn demo(queue: raceguard::queue::durable::DurableQueue) -> raceguard::Result<()> {
    /// for dead in queue.dead_letters(100).await? {
    ///     eprintln!("gave up on {} after {} attempts", dead.idempotency_key, dead.attempts);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>> {
        let max = check_batch(max)?;
        let reply: Value = self
            .inner
            .backend
            .query(
                ::redis::cmd("XRANGE")
                    .arg(&self.inner.dead)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(max),
            )
            .await?;
        parse_entries(&reply)?
            .into_iter()
            .map(|e| {
                let s = |name: &[u8]| {
                    e.field(name)
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default()
                };
                Ok(DeadLetter {
                    source_id: JobId(s(b"src")),
                    idempotency_key: s(b"k"),
                    payload: e.field(b"p").map(<[u8]>::to_vec).unwrap_or_default(),
                    attempts: s(b"attempts").parse().unwrap_or(0),
                    id: JobId(e.id),
                })
            })
            .collect()
    }

    /// A consumer named `name` in the queue's consumer group. Give every
    /// worker (task or process) its own name; a restarted worker may reuse
    /// its old one.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`durable_queue.consumer`) for an empty name,
    /// one longer than [`MAX_CONSUMER_NAME_LEN`] bytes, or one containing
    /// control characters.
    ///
    /// ```no_run
    /// # fn demo(queue: raceguard::queue::durable::DurableQueue) -> raceguard::Result<()> {
    /// let worker = queue.consumer("host-a:worker-3")?;
    /// assert!(queue.consumer("").is_err());
    /// # let _ = worker; Ok(()) }
    /// ```
    pub fn consumer(&self, name: &str) -> Result<Consumer> {
        if name.is_empty() {
            return Err(Error::invalid(
                "durable_queue.consumer",
                "must not be empty",
            ));
        }
        if name.len() > MAX_CONSUMER_NAME_LEN {
            return Err(Error::invalid(
                "durable_queue.consumer",
                format!("must be at most {MAX_CONSUMER_NAME_LEN} bytes"),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(Error::invalid(
                "durable_queue.consumer",
                "must not contain control characters",
            ));
        }
        Ok(Consumer {
            queue: self.clone(),
            name: Arc::from(name),
        })
    }

    async fn ensure_group(&self) -> Result<()> {
        let mut inv = self.inner.scripts.group.prepare_invoke();
        inv.key(&self.inner.stream).arg(GROUP);
        let _: Value = self.inner.backend.invoke(&inv).await?;
        Ok(())
    }

    /// Runs `cmd` on the shared connection, keeping the raw error (to see
    /// NOGROUP) before mapping it.
    async fn raw_query(&self, cmd: &Cmd) -> std::result::Result<Value, RedisError> {
        let mut conn = self.inner.backend.connection();
        conn.req_packed_command(cmd).await?.extract_error()
    }

    fn map(&self, e: RedisError, op: &'static str) -> Error {
        map_redis_error(e, op, self.inner.backend.config().get_response_timeout())
    }
}

/// A worker's handle on a [`DurableQueue`]: one consumer of its group.
/// Cheap to clone (clones are the same consumer).
#[derive(Clone)]
pub struct Consumer {
    queue: DurableQueue,
    name: Arc<str>,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("queue", &self.queue.name())
            .field("name", &&*self.name)
            .finish()
    }
}

/// Discards a dedicated connection unless the command on it finished: a
/// connection abandoned mid-`XREADGROUP BLOCK` is in an unknown state.
struct Checkout(Option<DedicatedConnection>);

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.discard();
        }
    }
}

impl Consumer {
    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue.
    pub fn queue(&self) -> &DurableQueue {
        &self.queue
    }

    /// Reads one new job, waiting up to `block` for one (zero: do not
    /// wait). See [`next_batch`](Self::next_batch).
    ///
    /// # Errors
    ///
    /// As [`next_batch`](Self::next_batch).
    ///
    /// Cancellation: as [`next_batch`](Self::next_batch).
    ///
    /// ```no_run
    /// # async fn demo(worker: raceguard::queue::durable::Consumer) -> raceguard::Result<()> {
    /// use std::time::Duration;
    /// while let Some(job) = worker.next(Duration::from_millis(500)).await? {
    ///     // handle(job.payload()) ...
    ///     job.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn next(&self, block: Duration) -> Result<Option<Delivery>> {
        Ok(self.next_batch(1, block).await?.into_iter().next())
    }

    /// Reads up to `max` new jobs (never delivered to any consumer), waiting
    /// up to `block` for the first one. Each is pending under this consumer
    /// until [`Delivery::ack`] or until another consumer
    /// [`reclaim`](Self::reclaim)s it.
    ///
    /// With a non-zero `block` the read (`XREADGROUP BLOCK`) runs on a
    /// dedicated connection from the backend's bounded pool, never on the
    /// shared multiplexed one, and is bounded by `block` plus the response
    /// timeout. On a cluster `block` is capped at half the response timeout
    /// (cluster connections apply it to every command). A malformed entry
    /// (written to the stream by something else) is moved to the
    /// dead-letter stream, not returned.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`durable_queue.batch`) unless
    /// `1 <= max <= MAX_BATCH`; [`Error::CapacityExceeded`] (`redis
    /// dedicated pool`) when no dedicated connection is free within the
    /// acquire timeout; [`Error::Timeout`] / [`Error::Backend`] from Redis.
    ///
    /// Cancellation: dropping the future discards the dedicated connection.
    /// Jobs the server had already handed to this consumer stay pending
    /// under it and are delivered again by [`reclaim`](Self::reclaim): never
    /// lost.
    ///
    /// ```no_run
    /// # async fn demo(worker: raceguard::queue::durable::Consumer) -> raceguard::Result<()> {
    /// use std::time::Duration;
    /// let jobs = worker.next_batch(32, Duration::ZERO).await?;
    /// assert!(jobs.len() <= 32);
    /// # Ok(()) }
    /// ```
    pub async fn next_batch(&self, max: usize, block: Duration) -> Result<Vec<Delivery>> {
        let max = check_batch(max)?;
        let reply = match self.read(max, block).await? {
            Err(e) if is_nogroup(&e) => {
                // The stream or group is gone (first use, or a restart
                // without persistence): create them and read again.
                self.queue.ensure_group().await?;
                self.read(max, block).await?
            }
            other => other,
        }
        .map_err(|e| self.queue.map(e, "durable queue read"))?;
        let entries = parse_read(&reply)?;
        let mut out = Vec::with_capacity(entries.len());
        let mut malformed = Vec::new();
        for e in entries {
            match self.delivery(&e, 1) {
                Some(d) => out.push(d),
                None => malformed.push(e.id),
            }
        }
        if !malformed.is_empty() {
            let ids: Vec<(String, Option<Key>)> =
                malformed.into_iter().map(|id| (id, None)).collect();
            // The good entries are already pending under this consumer:
            // returning an error here would strand them until a reclaim.
            // The malformed ones stay pending; a later reclaim settles them.
            match self.settle(&ids).await {
                Ok(verdicts) => {
                    let dead = verdicts.iter().filter(|(v, _)| *v == 2).count();
                    self.queue.inner.metrics.dead_lettered(dead);
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "durable queue: could not dead-letter malformed entries; a reclaim will retry"
                ),
            }
        }
        Ok(out)
    }

    /// One XREADGROUP. The outer error is raceguard's (no dedicated
    /// connection, deadline passed); the inner one is Redis's, kept raw so
    /// the caller can see NOGROUP.
    async fn read(
        &self,
        max: usize,
        block: Duration,
    ) -> Result<std::result::Result<Value, RedisError>> {
        let mut cmd = ::redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&*self.name)
            .arg("COUNT")
            .arg(max);
        let backend = &self.queue.inner.backend;
        let mut block = block;
        if backend.is_cluster() {
            block = block.min(backend.config().get_response_timeout() / 2);
        }
        let block_ms = millis(block);
        if block_ms == 0 {
            cmd.arg("STREAMS").arg(&self.queue.inner.stream).arg(">");
            return Ok(self.queue.raw_query(&cmd).await);
        }
        cmd.arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.queue.inner.stream)
            .arg(">");
        let mut checkout = Checkout(Some(backend.dedicated().await?));
        let deadline = block + backend.config().get_response_timeout();
        let conn = checkout.0.as_mut().expect("present until drop");
        match tokio::time::timeout(deadline, conn.connection().req_packed_command(&cmd)).await {
            Ok(Ok(v)) => {
                // Finished: the connection goes back to the pool.
                drop(checkout.0.take());
                Ok(v.extract_error())
            }
            // An error leaves the connection's state unknown: the checkout
            // guard discards it.
            Ok(Err(e)) => Ok(Err(e)),
            Err(_) => Err(Error::Timeout {
                op: "durable queue read",
                after: deadline,
            }),
        }
    }

    fn delivery(&self, e: &RawEntry, attempts: u64) -> Option<Delivery> {
        let key = std::str::from_utf8(e.field(b"k")?).ok()?;
        DurableQueue::validate_idempotency_key(key).ok()?;
        let payload = e.field(b"p")?.to_vec();
        Some(Delivery {
            consumer: self.clone(),
            id: JobId(e.id.clone()),
            idempotency_key: key.to_owned(),
            payload,
            attempts,
        })
    }

    /// Runs the settle script on `entries` (id, and the job key for a
    /// well-formed entry; `None` dead-letters the entry). Returns one
    /// `(verdict, attempts)` per entry.
    async fn settle(&self, entries: &[(String, Option<Key>)]) -> Result<Vec<(i64, u64)>> {
        let inner = &self.queue.inner;
        let mut inv = inner.scripts.settle.prepare_invoke();
        inv.key(&inner.stream).key(&inner.dead);
        // A malformed entry has no record; this key is never a record
        // (idempotency keys are never empty) and is never touched.
        let placeholder = self.queue.job_key("")?;
        for (_, key) in entries {
            inv.key(key.as_ref().unwrap_or(&placeholder));
        }
        inv.arg(GROUP)
            .arg(&*self.name)
            .arg(inner.config.max_attempts.unwrap_or(0))
            .arg(millis(inner.config.dedupe_ttl))
            .arg(inner.config.dead_letter_capacity);
        for (id, key) in entries {
            inv.arg(id).arg(if key.is_some() { "c" } else { "b" });
        }
        let reply: Value = inner.backend.invoke(&inv).await?;
        let bad = || protocol("unexpected durable settle reply");
        let list = items(&reply).ok_or_else(bad)?;
        if list.len() != entries.len() {
            return Err(bad());
        }
        list.iter()
            .map(|v| match items(v) {
                Some([verdict, attempts]) => Ok((
                    int(verdict).ok_or_else(bad)?,
                    u64::try_from(int(attempts).ok_or_else(bad)?).map_err(|_| bad())?,
                )),
                _ => Err(bad()),
            })
            .collect()
    }

    /// Takes over up to `max` jobs that have been pending (delivered, not
    /// acknowledged) under any consumer for at least `min_idle`, and
    /// returns those still to be done, with their delivery count in
    /// [`Delivery::attempts`].
    ///
    /// Use it at a worker's start and periodically: it is how the jobs of a
    /// crashed or cancelled worker are finished. A claimed job whose key is
    /// already completed is acknowledged and not returned; one delivered
    /// more than [`max_attempts`](DurableQueueConfig::max_attempts) times is
    /// moved to the dead-letter stream and not returned. Pick `min_idle`
    /// above the longest handler run (a live worker's job taken over runs
    /// twice); tests use zero to reclaim at once.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`durable_queue.batch`) unless
    /// `1 <= max <= MAX_BATCH`; [`Error::Timeout`] / [`Error::Backend`] from
    /// Redis.
    ///
    /// Cancellation: dropping the future may leave claimed jobs pending
    /// under this consumer without returning them; the next `reclaim` (by
    /// any consumer) returns them. Nothing is lost.
    ///
    /// ```no_run
    /// # async fn demo(worker: raceguard::queue::durable::Consumer) -> raceguard::Result<()> {
    /// use std::time::Duration;
    /// for job in worker.reclaim(Duration::from_secs(300), 64).await? {
    ///     println!("retrying {} (attempt {})", job.idempotency_key(), job.attempts());
    ///     job.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn reclaim(&self, min_idle: Duration, max: usize) -> Result<Vec<Delivery>> {
        let max = check_batch(max)?;
        let mut out = Vec::new();
        let mut cursor = "0-0".to_owned();
        loop {
            match self
                .reclaim_page(min_idle, &cursor, max - out.len(), &mut out)
                .await
            {
                Ok(Some(next)) if out.len() < max => cursor = next,
                Ok(_) => return Ok(out),
                Err(e) if out.is_empty() => return Err(e),
                Err(e) => {
                    // Jobs of earlier pages are claimed by this consumer now
                    // (their idle time reset): hand them out rather than
                    // strand them until the next reclaim.
                    tracing::warn!(error = %e, "durable queue: reclaim stopped early");
                    return Ok(out);
                }
            }
        }
    }

    /// One `XAUTOCLAIM` page from `cursor`, settled; its deliveries go to
    /// `out`. Returns the next cursor, or `None` when the scan is done.
    async fn reclaim_page(
        &self,
        min_idle: Duration,
        cursor: &str,
        want: usize,
        out: &mut Vec<Delivery>,
    ) -> Result<Option<String>> {
        let mut cmd = ::redis::cmd("XAUTOCLAIM");
        cmd.arg(&self.queue.inner.stream)
            .arg(GROUP)
            .arg(&*self.name)
            .arg(millis(min_idle))
            .arg(cursor)
            .arg("COUNT")
            .arg(want);
        let reply = match self.queue.raw_query(&cmd).await {
            Err(e) if is_nogroup(&e) => {
                // No group: nothing was ever delivered from this stream.
                self.queue.ensure_group().await?;
                return Ok(None);
            }
            other => other.map_err(|e| self.queue.map(e, "durable queue reclaim"))?,
        };
        let bad = || protocol("unexpected XAUTOCLAIM reply");
        let parts = items(&reply).ok_or_else(bad)?;
        let (next, entries) = match parts {
            [next, entries, ..] => (text(next).ok_or_else(bad)?, parse_entries(entries)?),
            _ => return Err(bad()),
        };
        if !entries.is_empty() {
            let keyed: Vec<(String, Option<Key>)> = entries
                .iter()
                .map(|e| {
                    let key = std::str::from_utf8(e.field(b"k").unwrap_or_default())
                        .ok()
                        .filter(|k| DurableQueue::validate_idempotency_key(k).is_ok())
                        .filter(|_| e.field(b"p").is_some())
                        .map(|k| self.queue.job_key(k))
                        .transpose()?;
                    Ok((e.id.clone(), key))
                })
                .collect::<Result<_>>()?;
            let verdicts = self.settle(&keyed).await?;
            let metrics = &self.queue.inner.metrics;
            for (e, (verdict, attempts)) in entries.iter().zip(verdicts) {
                if verdict == 2 {
                    metrics.dead_lettered(1);
                } else if verdict == 3
                    && let Some(d) = self.delivery(e, attempts)
                {
                    metrics.reclaimed();
                    out.push(d);
                }
            }
        }
        Ok((next != "0-0").then(|| next.to_owned()))
    }
}

/// Options of [`Consumer::run`].
///
/// ```
/// use std::time::Duration;
/// use raceguard::queue::durable::RunOptions;
///
/// let options = RunOptions::default()
///     .concurrency(8)
///     .reclaim_idle(Duration::from_secs(120));
/// assert_eq!(options.get_concurrency(), 8);
/// ```
#[derive(Debug, Clone)]
pub struct RunOptions {
    concurrency: usize,
    block: Duration,
    reclaim_idle: Duration,
}

impl Default for RunOptions {
    /// 4 jobs at once, reads block up to 1 s, jobs idle for 5 minutes are
    /// reclaimed.
    fn default() -> Self {
        RunOptions {
            concurrency: 4,
            block: Duration::from_secs(1),
            reclaim_idle: Duration::from_secs(300),
        }
    }
}

impl RunOptions {
    /// How many jobs run at once (1..=[`MAX_BATCH`]).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// How long one read waits for new jobs; also how long a shutdown may
    /// wait for an idle loop to notice it.
    pub fn block(mut self, d: Duration) -> Self {
        self.block = d;
        self
    }

    /// The `min_idle` of the loop's [`Consumer::reclaim`] calls: longer than
    /// the longest handler run of any worker of the queue.
    pub fn reclaim_idle(mut self, d: Duration) -> Self {
        self.reclaim_idle = d;
        self
    }

    /// The configured concurrency.
    pub fn get_concurrency(&self) -> usize {
        self.concurrency
    }
}

/// What [`Consumer::run`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunReport {
    /// Jobs this loop completed ([`AckOutcome::Completed`]).
    pub completed: u64,
    /// Jobs whose handler succeeded but whose ack was refused
    /// ([`AckOutcome::AlreadyCompleted`] or [`AckOutcome::NotOwned`]).
    pub superseded: u64,
    /// Handler runs that failed or panicked; their jobs stay pending and
    /// are retried through reclaim.
    pub failed: u64,
}

impl Consumer {
    /// A worker loop: until `shutdown` is cancelled, reclaims jobs idle for
    /// [`reclaim_idle`](RunOptions::reclaim_idle) (crashed workers' jobs,
    /// failed attempts) or else reads new ones, runs `handler` on up to
    /// [`concurrency`](RunOptions::concurrency) of them at once (each in
    /// its own task), and acknowledges each job whose handler returned
    /// `Ok`. A handler that fails or panics leaves its job pending: it is
    /// retried after `reclaim_idle`, until
    /// [`max_attempts`](DurableQueueConfig::max_attempts) moves it to the
    /// dead letters. The reclaim scan runs when the loop starts, then at
    /// most every `reclaim_idle / 2` while it finds nothing (a job cannot
    /// become reclaimable faster), so a busy queue pays one read per batch,
    /// not a scan and a read.
    ///
    /// Shutdown is checked between batches: the loop stops reading, lets
    /// the running handlers finish, acknowledges them, and returns.
    ///
    /// # Errors
    ///
    /// The first Redis error of a read, reclaim or ack (after the running
    /// handlers of the batch finished and their acks were tried). Calling
    /// `run` again resumes; nothing is lost.
    ///
    /// Cancellation: dropping the future aborts the running handlers; their
    /// jobs stay pending and are reclaimed later.
    ///
    /// ```no_run
    /// # async fn demo(worker: raceguard::queue::durable::Consumer) -> raceguard::Result<()> {
    /// use raceguard::queue::durable::RunOptions;
    /// use tokio_util::sync::CancellationToken;
    ///
    /// let shutdown = CancellationToken::new();
    /// let report = worker
    ///     .run(RunOptions::default(), shutdown.clone(), |job| async move {
    ///         // call the rate-limited API with job.payload(), keyed by job.idempotency_key()
    ///         Ok::<(), std::io::Error>(())
    ///     })
    ///     .await?;
    /// println!("completed {}", report.completed);
    /// # Ok(()) }
    /// ```
    pub async fn run<H, Fut, E>(
        &self,
        options: RunOptions,
        shutdown: tokio_util::sync::CancellationToken,
        handler: H,
    ) -> Result<RunReport>
    where
        H: Fn(Delivery) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        let n = check_batch(options.concurrency)?;
        let mut report = RunReport::default();
        let scan_every = options.reclaim_idle / 2;
        let mut next_scan = std::time::Instant::now();
        while !shutdown.is_cancelled() {
            let now = std::time::Instant::now();
            let mut jobs = Vec::new();
            if now >= next_scan {
                jobs = self.reclaim(options.reclaim_idle, n).await?;
                if jobs.is_empty() {
                    next_scan = now + scan_every;
                }
            }
            if jobs.is_empty() {
                jobs = self.next_batch(n, options.block).await?;
            }
            // Dropping the set (a cancelled `run`) aborts the handlers.
            let mut batch = tokio::task::JoinSet::new();
            for job in jobs {
                let handler = handler.clone();
                batch.spawn(async move {
                    let result = handler(job.clone()).await.map_err(|e| e.to_string());
                    (job, result)
                });
            }
            let mut first_error = None;
            while let Some(joined) = batch.join_next().await {
                match joined {
                    Ok((job, Ok(()))) => match job.ack().await {
                        Ok(AckOutcome::Completed) => report.completed += 1,
                        Ok(_) => report.superseded += 1,
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    },
                    Ok((job, Err(e))) => {
                        tracing::warn!(
                            queue = self.queue.name(),
                            job = job.id().as_str(),
                            attempts = job.attempts(),
                            error = %e,
                            "durable queue handler failed; the job will be retried"
                        );
                        report.failed += 1;
                    }
                    Err(e) => {
                        tracing::warn!(
                            queue = self.queue.name(),
                            error = %e,
                            "durable queue handler panicked; the job will be retried"
                        );
                        report.failed += 1;
                    }
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        Ok(report)
    }
}

/// A job delivered to a [`Consumer`]: pending under it until
/// [`ack`](Self::ack).
///
/// Dropping a `Delivery` without acknowledging it leaves the job pending;
/// [`Consumer::reclaim`] delivers it again (to any consumer) once it has
/// been idle long enough.
#[derive(Clone)]
pub struct Delivery {
    consumer: Consumer,
    id: JobId,
    idempotency_key: String,
    payload: Vec<u8>,
    attempts: u64,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("consumer", &&*self.consumer.name)
            .field("id", &self.id)
            .field("idempotency_key", &self.idempotency_key)
            .field("payload_len", &self.payload.len())
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl Delivery {
    /// The job's stream entry id.
    pub fn id(&self) -> &JobId {
        &self.id
    }

    /// The idempotency key it was submitted with: the key to make the
    /// handler's effects idempotent by.
    pub fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload, consuming the delivery.
    pub fn into_payload(self) -> Vec<u8> {
        self.payload
    }

    /// Deserialises the payload as JSON.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`durable_queue.payload`) when it is not
    /// valid JSON for `T`.
    ///
    /// ```no_run
    /// # async fn demo(job: raceguard::queue::durable::Delivery) -> raceguard::Result<()> {
    /// let event: serde_json::Value = job.json()?;
    /// # let _ = event; Ok(()) }
    /// ```
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| Error::invalid("durable_queue.payload", e.to_string()))
    }

    /// How many times the job has been delivered, this time included (1 on
    /// first delivery).
    pub fn attempts(&self) -> u64 {
        self.attempts
    }

    /// The consumer it was delivered to.
    pub fn consumer(&self) -> &Consumer {
        &self.consumer
    }

    /// Completes the job, in one atomic step: if the entry is still pending
    /// under this consumer and its key not completed, marks the key
    /// completed (remembered for the dedupe window), `XACK`s and `XDEL`s the
    /// entry, freeing its place in the capacity.
    ///
    /// Exactly one `ack` per idempotency key returns
    /// [`AckOutcome::Completed`]; others return
    /// [`AckOutcome::AlreadyCompleted`] or [`AckOutcome::NotOwned`] and
    /// change nothing. Retrying an `ack` whose outcome is unknown is safe
    /// (it then reports `AlreadyCompleted`).
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] / [`Error::Backend`] from Redis.
    ///
    /// Cancellation: dropping the future abandons the reply; the job may or
    /// may not be completed (ack again to find out).
    ///
    /// ```no_run
    /// # async fn demo(job: raceguard::queue::durable::Delivery) -> raceguard::Result<()> {
    /// use raceguard::queue::durable::AckOutcome;
    /// match job.ack().await? {
    ///     AckOutcome::Completed => {}
    ///     AckOutcome::AlreadyCompleted | AckOutcome::NotOwned => {
    ///         // another worker finished or took over this job
    ///     }
    ///     _ => {}
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn ack(&self) -> Result<AckOutcome> {
        let queue = &self.consumer.queue;
        let mut inv = queue.inner.scripts.ack.prepare_invoke();
        inv.key(&queue.inner.stream)
            .key(queue.job_key(&self.idempotency_key)?)
            .arg(GROUP)
            .arg(self.id.as_str())
            .arg(&*self.consumer.name)
            .arg(millis(queue.inner.config.dedupe_ttl));
        let code: i64 = queue.inner.backend.invoke(&inv).await?;
        let outcome = match code {
            1 => AckOutcome::Completed,
            2 => AckOutcome::AlreadyCompleted,
            3 => AckOutcome::NotOwned,
            other => return Err(protocol(format!("durable ack script returned {other}"))),
        };
        queue.inner.metrics.acked(outcome);
        Ok(outcome)
    }
}

/// What a submit did, for `raceguard_durable_queue_submitted_total`.
#[derive(Debug, Clone, Copy)]
enum SubmitResult {
    Accepted,
    Duplicate,
    Full,
}

/// The queue's handles in the `metrics` facade (see the [queue module
/// docs](super#metrics)), registered once by [`DurableQueue::new`] with the
/// recorder current then, labelled with the queue's name only. Counted from
/// the replies the queue already reads: no extra round trip. Without the
/// feature: zero-sized, every call a no-op.
#[cfg(feature = "metrics")]
struct DurableMetrics {
    accepted: metrics::Counter,
    duplicate: metrics::Counter,
    full: metrics::Counter,
    completed: metrics::Counter,
    already_completed: metrics::Counter,
    not_owned: metrics::Counter,
    reclaimed: metrics::Counter,
    dead_lettered: metrics::Counter,
}

#[cfg(not(feature = "metrics"))]
struct DurableMetrics;

#[cfg(feature = "metrics")]
impl DurableMetrics {
    fn new(queue: &str) -> Self {
        const SUBMITTED: &str = "raceguard_durable_queue_submitted_total";
        const ACKED: &str = "raceguard_durable_queue_acked_total";
        const RECLAIMED: &str = "raceguard_durable_queue_reclaimed_total";
        const DEAD: &str = "raceguard_durable_queue_dead_lettered_total";
        metrics::describe_counter!(SUBMITTED, "Durable queue submits answered, by result.");
        metrics::describe_counter!(ACKED, "Durable queue acknowledgements, by outcome.");
        metrics::describe_counter!(
            RECLAIMED,
            "Durable queue jobs taken over from a consumer and delivered again."
        );
        metrics::describe_counter!(DEAD, "Durable queue entries moved to the dead letters.");
        let queue = queue.to_owned();
        let submitted = |result: &'static str| metrics::counter!(SUBMITTED, "queue" => queue.clone(), "result" => result);
        let acked = |outcome: &'static str| metrics::counter!(ACKED, "queue" => queue.clone(), "outcome" => outcome);
        DurableMetrics {
            accepted: submitted("accepted"),
            duplicate: submitted("duplicate"),
            full: submitted("full"),
            completed: acked("completed"),
            already_completed: acked("already_completed"),
            not_owned: acked("not_owned"),
            reclaimed: metrics::counter!(RECLAIMED, "queue" => queue.clone()),
            dead_lettered: metrics::counter!(DEAD, "queue" => queue.clone()),
        }
    }

    #[inline]
    fn submitted(&self, result: SubmitResult) {
        match result {
            SubmitResult::Accepted => &self.accepted,
            SubmitResult::Duplicate => &self.duplicate,
            SubmitResult::Full => &self.full,
        }
        .increment(1);
    }

    #[inline]
    fn acked(&self, outcome: AckOutcome) {
        match outcome {
            AckOutcome::Completed => &self.completed,
            AckOutcome::AlreadyCompleted => &self.already_completed,
            AckOutcome::NotOwned => &self.not_owned,
        }
        .increment(1);
    }

    #[inline]
    fn reclaimed(&self) {
        self.reclaimed.increment(1);
    }

    #[inline]
    fn dead_lettered(&self, n: usize) {
        if n > 0 {
            self.dead_lettered.increment(n as u64);
        }
    }
}

#[cfg(not(feature = "metrics"))]
impl DurableMetrics {
    #[inline(always)]
    fn new(_queue: &str) -> Self {
        DurableMetrics
    }

    #[inline(always)]
    fn submitted(&self, _result: SubmitResult) {}

    #[inline(always)]
    fn acked(&self, _outcome: AckOutcome) {}

    #[inline(always)]
    fn reclaimed(&self) {}

    #[inline(always)]
    fn dead_lettered(&self, _n: usize) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_resp2_and_resp3_reads() {
        let entry = Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![bulk("k"), bulk("a"), bulk("p"), bulk("x")]),
        ]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("rq:{q}:stream"),
            Value::Array(vec![entry.clone()]),
        ])]);
        let resp3 = Value::Map(vec![(bulk("rq:{q}:stream"), Value::Array(vec![entry]))]);
        for v in [resp2, resp3] {
            let e = parse_read(&v).unwrap();
            assert_eq!(e.len(), 1);
            assert_eq!(e[0].id, "1-0");
            assert_eq!(e[0].field(b"k"), Some(&b"a"[..]));
            assert_eq!(e[0].field(b"p"), Some(&b"x"[..]));
        }
        assert!(parse_read(&Value::Nil).unwrap().is_empty());
        assert!(parse_read(&Value::Int(3)).is_err());
        let odd = Value::Array(vec![Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![bulk("k")]),
        ])]);
        assert!(parse_entries(&odd).is_err(), "odd field list");
    }

    #[test]
    fn config_validation_is_typed() {
        let bad = [
            DurableQueueConfig::default().capacity(0),
            DurableQueueConfig::default().max_payload(0),
            DurableQueueConfig::default().max_attempts(Some(0)),
            DurableQueueConfig::default().dedupe_ttl(Duration::from_micros(10)),
            DurableQueueConfig::default().dead_letter_capacity(0),
            DurableQueueConfig::default().dedupe_ttl(Duration::MAX),
        ];
        for c in bad {
            let e = c.validate().unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidInput, "{e}");
        }
        assert!(DurableQueueConfig::default().validate().is_ok());
        assert!(check_batch(0).is_err() && check_batch(MAX_BATCH + 1).is_err());
        assert_eq!(check_batch(MAX_BATCH).unwrap(), MAX_BATCH);
    }
}
