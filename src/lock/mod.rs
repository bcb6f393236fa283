//! Distributed locks that cannot delete each other: token-checked, renewed,
//! fenced, over one process, one Redis (or a Cluster), or Redlock over N
//! independent Redis servers (race R06 of `docs/RACES.md`).
//!
//! Seed 001's "cache lock" took `SET lock:chat:<user> 1 NX EX 10`, ran the
//! operation *anyway* when the lock was taken, and ended with an
//! unconditional `DEL`: two requests ran at once, and a slow holder deleted
//! the next holder's lock. Here:
//!
//! - **Acquire** stores a 128-bit random token from the OS CSPRNG (fetched
//!   256 tokens per `getrandom` call into a per-manager buffer, each token
//!   used once and wiped from it) with
//!   `SET NX PX` (or, fenced, one of two acquire scripts: see
//!   [`Fencing`]), retrying with exponential backoff
//!   and full jitter until a deadline; [`LockManager::try_acquire`] makes
//!   one attempt. A busy lock is an error ([`Error::LockBusy`]), never a
//!   "run anyway".
//! - **Release** is compare-and-delete: it never deletes another holder's
//!   lock, and [`LockGuard::release`] says whether the lock was still held.
//!   Dropping a [`LockGuard`] releases too, without blocking.
//! - **Leases** end: [`LockGuard::extend`] is compare-and-extend, an optional
//!   watchdog renews at about a third of the TTL up to a maximum total hold,
//!   and [`LockGuard::lost`] / [`LockGuard::lost_token`] fire when a renewal
//!   finds the lock gone or the local validity (monotonic clock minus a
//!   drift allowance) runs out.
//! - **Fencing tokens** ([`FencingToken`]), strictly increasing per lock and
//!   issued in the same atomic step as the acquire, let a protected resource
//!   ([`FencingGuard`], [`Fenced`]) refuse a write from a holder whose lease
//!   ran out while it was paused. Without fencing, **no lease-based lock is
//!   safe against process pauses**: see `docs/GUARANTEES.md`.
//!
//! ```
//! use std::time::Duration;
//! use raceguard::lock::{Fenced, LockManager, LockName, LockOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), raceguard::Error> {
//! let locks = LockManager::memory();
//! let name = LockName::new("chat:alice")?;
//! let store = Fenced::new(Vec::<&str>::new());
//!
//! let guard = locks.acquire(&name, LockOptions::new(Duration::from_secs(10))).await?;
//! let token = guard.fencing_token().expect("the memory backend always fences");
//! store.write(token, |history| history.push("hello"))?;
//! assert!(guard.release().await?, "still held when released");
//! # Ok(()) }
//! ```
//!
//! # Backends
//!
//! | constructor | where the lock lives | survives |
//! |---|---|---|
//! | [`LockManager::memory`] | this process | nothing beyond the process |
//! | `LockManager::redis` (feature `redis`) | one Redis server or a Redis Cluster | holder crashes (TTL); not a restart without persistence or a failover, see `docs/GUARANTEES.md` |
//! | `LockManager::redlock` (feature `redis`) | N independent Redis servers, quorum N/2+1 | up to N/2 (rounded down) servers down |
//!
//! Each manager is one backend; an application picks one per resource by
//! keeping one manager per kind and choosing by the [`LockName`] (a
//! validated name, encoded into a Redis key component with
//! [`crate::keys`]). All three share [`LockOptions`], [`LockGuard`] and the
//! error types.
//!
//! # Invariants
//!
//! - A token is checked by every operation that modifies a lock after its
//!   acquisition (release, extend, watchdog renewal, cleanup): no operation
//!   of one acquisition ever modifies another's lock.
//! - A lease is `Held` until it ends, and ends once: `Released`, `Expired`
//!   or `NotHeld`; nothing makes an ended lease held again, and the watchdog
//!   never renews a lease whose local validity ran out (it never re-takes an
//!   expired lock).
//! - The watchdog is started before the guard is returned and stopped (and,
//!   on explicit release, joined) before the compare-and-delete is sent: a
//!   renewal never outlives the release (Redisson#7272).
//! - Every key an acquire request may have set is removed by a
//!   compare-and-delete, whether the acquire succeeds, fails or is
//!   cancelled (its future dropped).
//!
//! # Metrics
//!
//! With feature `metrics`, every manager reports through the
//! [`metrics`](https://docs.rs/metrics) facade. As for rate limiters and
//! queues, the handles are registered once, when the manager is built
//! (`LockManager::memory`, `memory_with`, `redis`, `redis_with`, `redlock`,
//! `redlock_with`), with the recorder current at that moment (the global
//! one, or a local one installed with `metrics::with_local_recorder`).
//! Labels are the manager's name ([`LockConfig::name`], `"unnamed"` by
//! default), its backend (`backend="memory"`, `"redis"` for a server or a
//! Cluster, `"redlock"`) and fixed words: never a [`LockName`], which comes
//! from requests and would explode cardinality. An uncontended acquire +
//! release costs two counter increments; without the feature the
//! instrumentation is zero-sized and compiles to nothing.
//!
//! | metric | labels | counts |
//! |---|---|---|
//! | `raceguard_lock_acquired_total` | `manager`, `backend` | acquisitions that returned a guard |
//! | `raceguard_lock_busy_total` | `manager`, `backend`, `reason` | acquisitions refused: `reason="busy"` (a single attempt, [`try_acquire`](LockManager::try_acquire) or a zero wait, found the lock held), `"timeout"` (an [`acquire`](LockManager::acquire) reached its deadline with the lock still held), `"quorum"` (Redlock: [`Error::QuorumNotReached`], either way) |
//! | `raceguard_lock_wait_seconds` (histogram) | `manager`, `backend`, `outcome` | acquisitions that retried at least once: the time from the start of the first attempt to the grant (`outcome="acquired"`) or to giving up at the deadline with any error (`"gave_up"`), on the manager's [clock](LockConfig::clock) |
//! | `raceguard_lock_lost_total` | `manager`, `backend`, `reason` | leases that ended other than by their release, once per lease, when the lease's state ends: `reason="expired"` (its validity ran out, seen by [`LockGuard::is_held`], `remaining`, `extend`, [`lost`](LockGuard::lost) or the watchdog), `"not_held"` (a renewal or [`extend`](LockGuard::extend) found the lock gone or another owner's) |
//! | `raceguard_lock_released_total` | `manager`, `backend`, `held` | guards released ([`release`](LockGuard::release) or drop) whose release was answered: `held="true"` (still this guard's lock, deleted), `"false"` (already gone: expired or taken over; nothing was deleted) |
//!
//! Backend errors count nothing in these counters (an acquire that fails
//! with one is neither acquired nor busy; a failed or unanswered release is
//! not counted). A lease whose validity ran out without anyone looking
//! ends as released, not lost: its release then counts as `held="false"`,
//! so `lost + released{held="false"}` counts every lease whose lock was
//! gone. A dropped guard's Redis release is counted when the background
//! compare-and-delete is answered. An acquire cancelled while waiting (its
//! future dropped) records no wait.
//!
//! ```
//! # #[cfg(feature = "metrics")] {
//! use raceguard::lock::{LockConfig, LockManager};
//! // Handles registered here: install the recorder before.
//! let locks = LockManager::memory_with(LockConfig::default().name("invoices"))?;
//! // acquire: raceguard_lock_acquired_total{manager="invoices",backend="memory"} += 1
//! # let _ = locks; }
//! # Ok::<(), raceguard::Error>(())
//! ```
//!
//! # Prior art: what was taken, what was changed
//!
//! - **redsync / the Redlock description**: quorum N/2+1, validity
//!   `TTL − elapsed − drift` with drift `1% of TTL + 2 ms`, measured from
//!   *before* the requests were sent, release on every node after a failed
//!   attempt. Changed: requests go out in parallel *and* the attempt ends as
//!   soon as the quorum is reached or has become impossible (redsync waits
//!   for every node), each node has its own timeout, and the "no quorum" case
//!   is a typed error ([`Error::QuorumNotReached`]) distinct from "held
//!   elsewhere" ([`Error::LockBusy`]).
//! - **Redisson**: the watchdog renewing at a third of the lease; the fenced
//!   lock's `INCR` of a companion key in the same slot. Changed: the
//!   watchdog is bounded by a maximum total hold, jittered, token-checked
//!   (a renewal can never extend another holder's lock, Redisson renews by
//!   thread id) and started and stopped synchronously with the guard
//!   (Redisson#7272); the fencing counter is moved up to the server clock
//!   (µs) when it trails it, so tokens keep increasing across a restart
//!   without persistence, and [`Fencing::Counter`] offers the fenced
//!   acquire without any script.
//! - **node-redlock**: the abort signal for a lost lease; here a future
//!   ([`LockGuard::lost`]) and a [`CancellationToken`](tokio_util::sync::CancellationToken).
//! - **rslock / redlock-rs**: the Rust API shape. Changed: no panic on small
//!   TTLs (a TTL not longer than the drift allowance is
//!   [`Error::InvalidInput`]), a non-blocking drop release (rslock's drop
//!   either `block_on`s or does nothing), cancel-safe acquire, fencing,
//!   cluster support through the shared [`crate::redis::RedisBackend`].
//! - **Kleppmann's critique** ("How to do distributed locking"): a lease
//!   lock without fencing is not safe against pauses, and Redlock's safety
//!   rests on bounded clock drift. Taken as stated: fencing is on by
//!   default, and the guarantees document says what each backend cannot
//!   promise.

mod fencing;
mod guard;
mod memory;
mod metrics;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
mod redlock;
mod token;
mod watchdog;

use std::fmt;
use std::future::{Future, poll_fn};
use std::hash::{Hash, Hasher};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use tokio::sync::Notify;

use crate::Error;
use crate::clock::{Clock, SystemClock};
use crate::keys::{MAX_ID_LEN, Owner};
use crate::sync::StdArc;

pub use fencing::{Fenced, FencingGuard, FencingToken};
pub use guard::{LockGuard, LostLease, LostReason};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redlock::redlock_nodes;

use self::metrics::{LockMetrics, WaitStart};
use guard::Lease;
use memory::{MemAttempt, MemoryLocks};
use token::{SplitMix64, Token, TokenSource};

/// The longest TTL accepted: 365 days.
///
/// ```
/// assert_eq!(raceguard::lock::MAX_TTL.as_secs(), 365 * 24 * 3600);
/// ```
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Local wake-up shards: a release wakes the waiters of its shard in this
/// manager, so in-process hand-off does not wait for a backoff timer.
const WAKE_SHARDS: usize = 64;

/// The name of a lock: 1 to [`MAX_ID_LEN`] bytes of any text.
///
/// On Redis the name becomes the hash tag of the lock's keys (escaped by
/// [`crate::keys`]: it can never form a pattern or reach another key), so
/// the lock key and its fencing counter share one Cluster slot.
///
/// ```
/// use raceguard::lock::LockName;
/// let name = LockName::new("chat:alice")?;
/// assert_eq!(name.as_str(), "chat:alice");
/// assert!(LockName::new("").is_err());
/// assert!(LockName::new("x".repeat(257)).is_err());
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone)]
pub struct LockName(StdArc<NameInner>);

/// A validated name and what every acquisition of it would otherwise
/// recompute: its wake-up shard and (on Redis) its escaped key component.
struct NameInner {
    raw: Box<str>,
    /// `hash(raw) % WAKE_SHARDS`.
    shard: usize,
    /// The name escaped as a key component (`crate::keys`), built on first
    /// use by a Redis manager. A std `OnceLock`, not `crate::sync`'s: a
    /// cache of a deterministic value that no loom model looks at, and loom
    /// types cannot be built outside a model (names are).
    #[cfg(feature = "redis")]
    escaped: std::sync::OnceLock<Box<str>>,
}

impl PartialEq for LockName {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for LockName {}

impl Hash for LockName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for LockName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for LockName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl LockName {
    /// Validates `raw`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`lock.name`) when `raw` is empty or longer
    /// than [`MAX_ID_LEN`] bytes.
    pub fn new(raw: impl AsRef<str>) -> Result<Self, Error> {
        let raw = raw.as_ref();
        if raw.is_empty() {
            return Err(Error::invalid("lock.name", "must not be empty"));
        }
        if raw.len() > MAX_ID_LEN {
            return Err(Error::invalid(
                "lock.name",
                format!("must be at most {MAX_ID_LEN} bytes, got {}", raw.len()),
            ));
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        raw.hash(&mut h);
        Ok(LockName(StdArc::new(NameInner {
            raw: Box::from(raw),
            shard: (h.finish() % WAKE_SHARDS as u64) as usize,
            #[cfg(feature = "redis")]
            escaped: std::sync::OnceLock::new(),
        })))
    }

    /// The name escaped as a Redis key component, exactly as
    /// [`KeyBuilder::owner`](crate::keys::KeyBuilder::owner) writes it
    /// between the braces; computed once per name.
    #[cfg(feature = "redis")]
    pub(crate) fn escaped(&self) -> &str {
        self.0.escaped.get_or_init(|| {
            // The escaper `KeyBuilder::owner` itself calls: one definition
            // of the encoding (tests compare whole keys with the builder's).
            let mut s = String::with_capacity(self.as_str().len());
            crate::keys::escape::escape_into(&mut s, self.as_str());
            s.into_boxed_str()
        })
    }

    fn shard(&self) -> usize {
        self.0.shard
    }

    /// The name as given.
    ///
    /// ```
    /// assert_eq!(raceguard::lock::LockName::new("a")?.as_str(), "a");
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0.raw
    }
}

impl Owner for LockName {
    fn owner_id(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LockName").field(&self.as_str()).finish()
    }
}

impl fmt::Display for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AsRef<str> for LockName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::str::FromStr for LockName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl TryFrom<&str> for LockName {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

/// Options of one acquisition.
///
/// ```
/// use std::time::Duration;
/// use raceguard::lock::LockOptions;
///
/// let opts = LockOptions::new(Duration::from_secs(10))
///     .wait(Duration::from_secs(2))
///     .watchdog(Duration::from_secs(60))
///     .fencing(true);
/// assert_eq!(opts.ttl(), Duration::from_secs(10));
/// assert_eq!(opts.max_wait(), Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockOptions {
    ttl: Duration,
    wait: Duration,
    fencing: Option<Fencing>,
    watchdog: Option<Duration>,
}

impl LockOptions {
    /// A lease of `ttl`; [`acquire`](LockManager::acquire) waits up to 5 s;
    /// fencing as the manager's [`LockConfig::fencing`] says; no watchdog.
    pub fn new(ttl: Duration) -> Self {
        LockOptions {
            ttl,
            wait: Duration::from_secs(5),
            fencing: None,
            watchdog: None,
        }
    }

    /// How long [`acquire`](LockManager::acquire) keeps retrying a busy
    /// lock. Zero makes it a single attempt, like
    /// [`try_acquire`](LockManager::try_acquire).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Whether and how to issue a fencing token (overrides
    /// [`LockConfig::fencing`]): a [`Fencing`] mode, or `true`
    /// ([`Fencing::ServerClock`]) / `false` ([`Fencing::Off`]). The
    /// in-memory backend always issues one (it costs nothing there).
    pub fn fencing(mut self, mode: impl Into<Fencing>) -> Self {
        self.fencing = Some(mode.into());
        self
    }

    /// Renews the lease in the background (at about a third of the TTL,
    /// jittered) until the guard is released, a renewal finds the lock gone,
    /// or the lock has been held for `max_hold` in total. Needs a tokio
    /// runtime.
    pub fn watchdog(mut self, max_hold: Duration) -> Self {
        self.watchdog = Some(max_hold);
        self
    }

    /// The lease duration.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The longest [`acquire`](LockManager::acquire) waits.
    pub fn max_wait(&self) -> Duration {
        self.wait
    }
}

impl Default for LockOptions {
    /// A 30 s lease, 5 s wait.
    fn default() -> Self {
        Self::new(Duration::from_secs(30))
    }
}

/// Configuration of a [`LockManager`].
///
/// ```
/// use std::time::Duration;
/// use raceguard::lock::{LockConfig, LockManager};
/// use raceguard::ManualClock;
///
/// let config = LockConfig::default()
///     .namespace("app-locks")
///     .retry(Duration::from_millis(1), Duration::from_millis(20))
///     .clock(ManualClock::new());
/// let locks = LockManager::memory_with(config)?;
/// # let _ = locks;
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone)]
pub struct LockConfig {
    clock: StdArc<dyn Clock>,
    namespace: String,
    retry_base: Duration,
    retry_cap: Duration,
    drift_factor: f64,
    drift_fixed: Duration,
    node_timeout: Duration,
    fencing: Fencing,
    name: Option<String>,
}

impl fmt::Debug for LockConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockConfig")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("retry_base", &self.retry_base)
            .field("retry_cap", &self.retry_cap)
            .field("drift_factor", &self.drift_factor)
            .field("drift_fixed", &self.drift_fixed)
            .field("node_timeout", &self.node_timeout)
            .field("fencing", &self.fencing)
            .finish_non_exhaustive()
    }
}

impl Default for LockConfig {
    /// The monotonic [`SystemClock`], namespace `lock`, retries from 2 ms
    /// doubling up to 50 ms (full jitter), drift `1% + 2 ms`, Redlock node
    /// timeout 50 ms, fencing on ([`Fencing::ServerClock`]), no name.
    fn default() -> Self {
        LockConfig {
            clock: StdArc::new(SystemClock::new()),
            namespace: "lock".to_owned(),
            retry_base: Duration::from_millis(2),
            retry_cap: Duration::from_millis(50),
            drift_factor: 0.01,
            drift_fixed: Duration::from_millis(2),
            node_timeout: Duration::from_millis(50),
            fencing: Fencing::ServerClock,
            name: None,
        }
    }
}

impl LockConfig {
    /// The clock that measures lease validity (tests use a
    /// [`ManualClock`](crate::ManualClock)). Waiting (retry delays,
    /// deadlines, watchdog timers) uses tokio's timer, so
    /// `tokio::time::pause` drives it.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = StdArc::new(clock);
        self
    }

    /// The Redis key namespace (`[A-Za-z0-9_.-]`, checked when the manager
    /// is built). Lock keys are `<namespace>:{<name>}`, fencing counters
    /// `<namespace>:{<name>}:fence`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The retry delays: before retry `k` a random delay in
    /// `[0, min(cap, base * 2^k)]` (full jitter).
    pub fn retry(mut self, base: Duration, cap: Duration) -> Self {
        self.retry_base = base;
        self.retry_cap = cap;
        self
    }

    /// The clock-drift allowance subtracted from every Redis lease:
    /// `ttl * factor + fixed` (default 1% + 2 ms). Not applied in memory,
    /// where one clock measures everything.
    pub fn drift(mut self, factor: f64, fixed: Duration) -> Self {
        self.drift_factor = factor;
        self.drift_fixed = fixed;
        self
    }

    /// Redlock: how long one node may take to answer one request.
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = timeout;
        self
    }

    /// Whether and how acquisitions issue fencing tokens unless
    /// [`LockOptions::fencing`] says otherwise: a [`Fencing`] mode, or
    /// `true` ([`Fencing::ServerClock`], the default) / `false`
    /// ([`Fencing::Off`]). On Redis the modes differ in what they cost and
    /// in which failures the tokens survive; see [`Fencing`] and
    /// `BENCHMARKS.md`.
    pub fn fencing(mut self, mode: impl Into<Fencing>) -> Self {
        self.fencing = mode.into();
        self
    }

    /// Names the manager: the `manager` label of its metrics (feature
    /// `metrics`, see [Metrics](self#metrics); `"unnamed"` otherwise). A
    /// name for the application's own dashboards, e.g. one per kind of
    /// lock; managers sharing a name add up their counts. Not part of any
    /// key.
    ///
    /// ```
    /// use raceguard::lock::{LockConfig, LockManager};
    /// let locks = LockManager::memory_with(LockConfig::default().name("invoices"))?;
    /// assert_eq!(locks.config().get_name(), Some("invoices"));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The name given in [`LockConfig::name`], if any.
    ///
    /// ```
    /// assert_eq!(raceguard::lock::LockConfig::default().get_name(), None);
    /// ```
    pub fn get_name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn validate(&self) -> Result<(), Error> {
        crate::keys::Key::builder(&self.namespace)
            .map(drop)
            .map_err(|_| Error::invalid("lock.namespace", "use 1-64 of [A-Za-z0-9_.-]"))?;
        if self.retry_base.is_zero() {
            return Err(Error::invalid(
                "lock.retry_base",
                "must be greater than zero",
            ));
        }
        if self.retry_cap < self.retry_base {
            return Err(Error::invalid(
                "lock.retry_cap",
                "must be at least the retry base",
            ));
        }
        if !(0.0..0.5).contains(&self.drift_factor) {
            return Err(Error::invalid("lock.drift_factor", "must be in [0, 0.5)"));
        }
        if self.node_timeout.is_zero() {
            return Err(Error::invalid(
                "lock.node_timeout",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// How a Redis or Redlock acquisition issues its [`FencingToken`].
///
/// Every mode but [`Off`](Fencing::Off) issues the token in the same atomic
/// step as the acquisition, from a counter key `<ns>:{<name>}:fence` in the
/// lock key's hash slot that never expires and is never deleted by a
/// release. The modes differ in what the server runs per acquire and in
/// which failures the tokens keep increasing through (`docs/GUARANTEES.md`
/// has the whole failure model; `BENCHMARKS.md` the cost):
///
/// | mode | per acquire | a lost counter (restart without persistence, eviction, `FLUSHALL`) | a counter rolled back (restart from an older RDB/AOF, failover to a lagging replica) |
/// |---|---|---|---|
/// | [`ServerClock`](Fencing::ServerClock) (default) | one script: `SET NX PX`, `INCR`, `TIME` | restarts above the server clock in µs | moved up to the server clock in µs by the next acquire, when it trails it by more than ~65 ms |
/// | [`Counter`](Fencing::Counter) | one script: `SET NX PX`, `INCR` (`TIME` only when the counter is missing) | restarts above the server clock in µs | **not detected**: tokens can repeat |
/// | [`Off`](Fencing::Off) | `SET NX PX` | — | — |
///
/// `true` converts to `ServerClock`, `false` to `Off`. The in-memory
/// backend always issues exact tokens, whatever the mode. Redlock refuses
/// `Counter` with [`Error::InvalidInput`]: the largest of several
/// independent counters only orders tokens when the counters follow one
/// clock.
///
/// ```
/// use raceguard::lock::{Fencing, LockConfig, LockOptions};
/// use std::time::Duration;
///
/// assert_eq!(Fencing::default(), Fencing::ServerClock);
/// assert_eq!(Fencing::from(false), Fencing::Off);
/// // A persistent (`appendfsync always`), never-failed-over Redis: the
/// // cheaper counter is enough.
/// let config = LockConfig::default().fencing(Fencing::Counter);
/// let opts = LockOptions::new(Duration::from_secs(5)).fencing(true);
/// # let _ = (config, opts);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Fencing {
    /// No fencing token: a bare `SET NX PX`. The lock is then an
    /// efficiency lock only (it avoids duplicate work), not safe against a
    /// holder that pauses past its lease.
    Off,
    /// The acquire script without the clock read: `SET NX PX`, then the
    /// counter's `INCR`. Tokens strictly increase while the counter
    /// survives. A counter found missing (`INCR` answers 1: a restart
    /// without persistence, an eviction, a flush) is moved up to the server
    /// clock in µs in the same script before the token is handed out, so
    /// those losses are covered too. A counter *rolled back* but present (a
    /// restart from an older snapshot, AOF `everysec` losing its last
    /// second, a failover to a replica that lagged) is not: tokens issued
    /// before can be issued again. Choose it for a Redis with `appendfsync
    /// always` and no failover, where it is the cheapest correct fencing
    /// (about 0.9x the throughput of an unfenced lock, against about 0.7x
    /// for `ServerClock`: `BENCHMARKS.md`).
    Counter,
    /// The acquire script: `SET NX PX`, then `INCR` of the counter, moved up
    /// to the server clock in µs whenever it trails it by more than 65,536
    /// µs. Tokens keep increasing across counter loss *and* rollback, as
    /// long as the outage outlasted ~65 ms and the servers' clocks agree to
    /// within that. The default.
    #[default]
    ServerClock,
}

impl Fencing {
    /// Whether this mode issues a token.
    pub const fn is_on(self) -> bool {
        !matches!(self, Fencing::Off)
    }
}

impl From<bool> for Fencing {
    fn from(on: bool) -> Self {
        if on {
            Fencing::ServerClock
        } else {
            Fencing::Off
        }
    }
}

/// Which backend a [`LockManager`] uses.
///
/// ```
/// use raceguard::lock::{BackendKind, LockManager};
/// assert_eq!(LockManager::memory().backend_kind(), BackendKind::Memory);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// In this process.
    Memory,
    /// One Redis server.
    Redis,
    /// A Redis Cluster.
    RedisCluster,
    /// Redlock over `nodes` independent servers.
    Redlock {
        /// How many nodes.
        nodes: usize,
    },
}

/// One attempt's outcome on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// Acquired (with a fencing token when one was asked for).
    Acquired { fence: Option<u64> },
    /// Held elsewhere. `remaining`: the holder's lease, when known.
    /// `clean`: nothing of this attempt is left on any server.
    Busy { remaining: Option<u64>, clean: bool },
}

pub(crate) enum Backend {
    Memory(MemoryLocks),
    #[cfg(feature = "redis")]
    Redis(redis::RedisLocks),
    #[cfg(feature = "redis")]
    Redlock(redlock::RedlockLocks),
}

pub(crate) struct Inner {
    backend: Backend,
    config: LockConfig,
    wake: Box<[Notify]>,
    tokens: TokenSource,
    pub(crate) metrics: LockMetrics,
}

impl Inner {
    fn new(backend: Backend, config: LockConfig) -> Self {
        let label = match &backend {
            Backend::Memory(_) => "memory",
            #[cfg(feature = "redis")]
            Backend::Redis(_) => "redis",
            #[cfg(feature = "redis")]
            Backend::Redlock(_) => "redlock",
        };
        Inner {
            metrics: LockMetrics::new(config.name.as_deref(), label),
            backend,
            config,
            wake: (0..WAKE_SHARDS).map(|_| Notify::new()).collect(),
            tokens: TokenSource::new(),
        }
    }

    pub(crate) fn now(&self) -> u64 {
        self.config.clock.now_nanos()
    }

    fn is_memory(&self) -> bool {
        matches!(self.backend, Backend::Memory(_))
    }

    /// The drift allowance for a lease of `ttl` on this backend.
    pub(crate) fn drift(&self, ttl: u64) -> u64 {
        if self.is_memory() {
            0
        } else {
            token::drift_nanos(
                ttl,
                self.config.drift_factor,
                nanos(self.config.drift_fixed),
            )
        }
    }

    /// Validates a TTL for this backend and returns it in nanoseconds (as
    /// the server will count it: whole milliseconds on Redis).
    pub(crate) fn check_ttl(&self, ttl: Duration) -> Result<u64, Error> {
        if ttl.is_zero() {
            return Err(Error::invalid("lock.ttl", "must be greater than zero"));
        }
        if ttl > MAX_TTL {
            return Err(Error::invalid("lock.ttl", "must be at most 365 days"));
        }
        let ttl = nanos(ttl);
        if self.is_memory() {
            return Ok(ttl);
        }
        let ttl = token::ceil_millis(ttl) * 1_000_000;
        let drift = self.drift(ttl);
        if drift >= ttl {
            return Err(Error::invalid(
                "lock.ttl",
                format!(
                    "{:?} is not longer than the clock-drift allowance {:?}; a Redis lease \
                     that short would never be valid",
                    Duration::from_nanos(ttl),
                    Duration::from_nanos(drift),
                ),
            ));
        }
        Ok(ttl)
    }

    /// The smallest TTL a renewal may ask for (below it, stop renewing).
    pub(crate) fn min_renew_ttl(&self) -> u64 {
        if self.is_memory() {
            1
        } else {
            self.drift(0).saturating_add(1_000_000)
        }
    }

    fn notify(&self, name: &LockName) -> &Notify {
        &self.wake[name.shard()]
    }

    /// Wakes one of this manager's local waiters for `name`'s shard. One,
    /// not all: a herd of waiters retrying at once only collides (on
    /// Redlock it splits the votes). A woken waiter that acquires, or is
    /// dropped, passes an unused wake-up on (tokio's `Notify` forwards it);
    /// a waiter of another name in the same shard retries once and goes
    /// back to its backoff.
    pub(crate) fn wake(&self, name: &LockName) {
        self.notify(name).notify_one();
    }

    pub(crate) async fn try_once(
        &self,
        name: &LockName,
        token: Token,
        ttl: u64,
        fenced: Fencing,
    ) -> Result<Attempt, Error> {
        match &self.backend {
            Backend::Memory(m) => {
                // Memory always fences: the counter is free there.
                let _ = fenced;
                Ok(match m.try_acquire(name.as_str(), token, ttl, self.now()) {
                    MemAttempt::Acquired { fence } => Attempt::Acquired { fence: Some(fence) },
                    MemAttempt::Busy { remaining } => Attempt::Busy {
                        remaining: Some(remaining),
                        clean: true,
                    },
                })
            }
            #[cfg(feature = "redis")]
            Backend::Redis(r) => r.try_once(name, token, ttl, fenced).await,
            #[cfg(feature = "redis")]
            Backend::Redlock(r) => r.try_once(name, token, ttl, fenced).await,
        }
    }

    pub(crate) async fn release(&self, name: &LockName, token: Token) -> Result<bool, Error> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.release(name.as_str(), token, self.now())),
            #[cfg(feature = "redis")]
            Backend::Redis(r) => r.release(name, token).await,
            #[cfg(feature = "redis")]
            Backend::Redlock(r) => r.release(name, token).await,
        }
    }

    pub(crate) async fn extend(
        &self,
        name: &LockName,
        token: Token,
        ttl: u64,
    ) -> Result<bool, Error> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.extend(name.as_str(), token, ttl, self.now())),
            #[cfg(feature = "redis")]
            Backend::Redis(r) => r.extend(name, token, ttl).await,
            #[cfg(feature = "redis")]
            Backend::Redlock(r) => r.extend(name, token, ttl).await,
        }
    }

    /// Releases `token`'s lock without waiting: synchronously in memory,
    /// spawned on the current tokio runtime for Redis (never `block_on`).
    /// Without a runtime the Redis key is left to expire with its TTL.
    /// `background` (the watchdog) is stopped first. `guard`: a guard's
    /// release (counted in the metrics), not an acquire's cleanup.
    pub(crate) fn release_detached(
        self: &StdArc<Self>,
        name: LockName,
        token: Token,
        background: Option<tokio::task::JoinHandle<()>>,
        guard: bool,
    ) {
        if let Some(bg) = &background {
            bg.abort();
        }
        match &self.backend {
            Backend::Memory(m) => {
                let held = m.release(name.as_str(), token, self.now());
                if guard {
                    self.metrics.released(held);
                }
                self.wake(&name);
            }
            #[cfg(feature = "redis")]
            _ => match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    let inner = self.clone();
                    handle.spawn(async move {
                        if let Some(bg) = background {
                            // Joined before the delete: no renewal lands after it.
                            let _ = bg.await;
                        }
                        match inner.release(&name, token).await {
                            Ok(held) if guard => inner.metrics.released(held),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::debug!(lock = %name, error = %e, "background lock release failed; the lease expires with its TTL");
                            }
                        }
                        inner.wake(&name);
                    });
                }
                Err(_) => {
                    tracing::debug!(lock = %name, "no tokio runtime to release the lock on; it expires with its TTL");
                }
            },
        }
    }
}

/// Removes whatever an acquire request may have left on the servers when
/// the acquire does not hand it to a guard: after a failed or indeterminate
/// attempt, and when the acquiring future is dropped midway.
struct Cleanup<'a> {
    inner: &'a StdArc<Inner>,
    name: &'a LockName,
    token: Token,
    /// A request is in flight or may have left a key.
    dirty: bool,
}

impl Cleanup<'_> {
    /// Compare-and-delete now; stays dirty if that fails too.
    async fn release_now(&mut self) {
        if self.dirty && self.inner.release(self.name, self.token).await.is_ok() {
            self.dirty = false;
        }
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if self.dirty {
            self.inner
                .release_detached(self.name.clone(), self.token, None, false);
        }
    }
}

/// Acquires locks on one backend. Cheap to clone; clones share the backend.
///
/// ```
/// use std::time::Duration;
/// use raceguard::lock::{LockManager, LockName, LockOptions};
/// use raceguard::Error;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let locks = LockManager::memory();
/// let name = LockName::new("orders:42")?;
/// let opts = LockOptions::new(Duration::from_secs(5));
///
/// let held = locks.try_acquire(&name, opts).await?;
/// // A second attempt does not wait and does not "run anyway".
/// assert!(matches!(locks.try_acquire(&name, opts).await, Err(Error::LockBusy { .. })));
/// drop(held); // released at once, without blocking
/// assert!(locks.try_acquire(&name, opts).await.is_ok());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LockManager {
    inner: StdArc<Inner>,
}

impl fmt::Debug for LockManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockManager")
            .field("backend", &self.backend_kind())
            .field("config", &self.inner.config)
            .finish()
    }
}

impl LockManager {
    /// An in-memory lock manager with the default [`LockConfig`]: locks
    /// shared by the clones of this manager, in this process.
    ///
    /// ```
    /// let locks = raceguard::lock::LockManager::memory();
    /// # let _ = locks;
    /// ```
    pub fn memory() -> Self {
        Self::build(Backend::Memory(MemoryLocks::new()), LockConfig::default())
    }

    /// An in-memory lock manager with `config`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for an invalid configuration (zero retry
    /// base, cap below base, drift factor outside `[0, 0.5)`, bad namespace).
    ///
    /// ```
    /// use raceguard::lock::{LockConfig, LockManager};
    /// let locks = LockManager::memory_with(LockConfig::default().fencing(true))?;
    /// # let _ = locks;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn memory_with(config: LockConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self::build(Backend::Memory(MemoryLocks::new()), config))
    }

    /// A lock manager on one Redis server or a Redis Cluster (whichever
    /// `redis` is connected to), with the default [`LockConfig`].
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), raceguard::Error> {
    /// use raceguard::lock::LockManager;
    /// use raceguard::redis::{RedisBackend, RedisConfig};
    ///
    /// let redis = RedisBackend::connect("redis://127.0.0.1:6379/", RedisConfig::default()).await?;
    /// let locks = LockManager::redis(redis);
    /// # let _ = locks; Ok(()) }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis(redis: crate::redis::RedisBackend) -> Self {
        let config = LockConfig::default();
        let backend = Backend::Redis(redis::RedisLocks::new(redis, &config.namespace));
        Self::build(backend, config)
    }

    /// [`LockManager::redis`] with `config`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for an invalid configuration.
    ///
    /// ```no_run
    /// # async fn demo(redis: raceguard::redis::RedisBackend) -> Result<(), raceguard::Error> {
    /// use raceguard::lock::{LockConfig, LockManager};
    /// let locks = LockManager::redis_with(redis, LockConfig::default().namespace("jobs"))?;
    /// # let _ = locks; Ok(()) }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis_with(
        redis: crate::redis::RedisBackend,
        config: LockConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        let backend = Backend::Redis(redis::RedisLocks::new(redis, &config.namespace));
        Ok(Self::build(backend, config))
    }

    /// A Redlock manager over independent Redis servers (one
    /// [`RedisBackend`](crate::redis::RedisBackend) each, e.g. from
    /// [`redlock_nodes`]), quorum N/2+1, with the default [`LockConfig`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`lock.nodes`) when `nodes` is empty.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), raceguard::Error> {
    /// use raceguard::lock::{redlock_nodes, LockManager};
    /// use raceguard::redis::RedisConfig;
    ///
    /// let nodes = redlock_nodes(
    ///     &["redis://10.0.0.1/", "redis://10.0.0.2/", "redis://10.0.0.3/"],
    ///     RedisConfig::default(),
    /// )?;
    /// let locks = LockManager::redlock(nodes)?;
    /// # let _ = locks; Ok(()) }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redlock(nodes: Vec<crate::redis::RedisBackend>) -> Result<Self, Error> {
        Self::redlock_with(nodes, LockConfig::default())
    }

    /// [`LockManager::redlock`] with `config`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `nodes` is empty or the configuration is
    /// invalid.
    ///
    /// ```no_run
    /// # async fn demo(nodes: Vec<raceguard::redis::RedisBackend>) -> Result<(), raceguard::Error> {
    /// use std::time::Duration;
    /// use raceguard::lock::{LockConfig, LockManager};
    /// let locks = LockManager::redlock_with(nodes, LockConfig::default().node_timeout(Duration::from_millis(20)))?;
    /// # let _ = locks; Ok(()) }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redlock_with(
        nodes: Vec<crate::redis::RedisBackend>,
        config: LockConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        check_redlock_fencing(config.fencing)?;
        if nodes.is_empty() {
            return Err(Error::invalid(
                "lock.nodes",
                "Redlock needs at least one node",
            ));
        }
        let backend = Backend::Redlock(redlock::RedlockLocks::new(
            nodes,
            &config.namespace,
            config.node_timeout,
        ));
        Ok(Self::build(backend, config))
    }

    fn build(backend: Backend, config: LockConfig) -> Self {
        LockManager {
            inner: StdArc::new(Inner::new(backend, config)),
        }
    }

    /// Which backend this manager uses.
    pub fn backend_kind(&self) -> BackendKind {
        match &self.inner.backend {
            Backend::Memory(_) => BackendKind::Memory,
            #[cfg(feature = "redis")]
            Backend::Redis(r) if r.backend().is_cluster() => BackendKind::RedisCluster,
            #[cfg(feature = "redis")]
            Backend::Redis(_) => BackendKind::Redis,
            #[cfg(feature = "redis")]
            Backend::Redlock(r) => BackendKind::Redlock {
                nodes: r.node_count(),
            },
        }
    }

    /// The configuration.
    ///
    /// ```
    /// let locks = raceguard::lock::LockManager::memory();
    /// let _ = locks.config();
    /// ```
    pub fn config(&self) -> &LockConfig {
        &self.inner.config
    }

    /// Acquires `name` for `opts.ttl()`, retrying a busy lock with
    /// exponential backoff and full jitter (and waking at once when a guard
    /// of this manager releases it) for up to `opts.max_wait()`.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidInput`]: a zero TTL, a TTL over [`MAX_TTL`], on
    ///   Redis a TTL not longer than the drift allowance (1% + 2 ms), a
    ///   watchdog `max_hold` below the TTL, or a watchdog or a wait without
    ///   a tokio runtime.
    /// - [`Error::LockBusy`]: still held by another owner at the deadline.
    /// - [`Error::QuorumNotReached`] (Redlock): too many nodes failed for a
    ///   quorum, up to the deadline.
    /// - [`Error::Backend`] / [`Error::Timeout`]: the last attempt's failure
    ///   when Redis kept failing up to the deadline, or at once for a
    ///   failure a retry cannot fix.
    ///
    /// Cancellation: dropping the future is safe at any point. A key that
    /// an in-flight request may have set is removed by a compare-and-delete
    /// spawned on the runtime; nothing is left held.
    ///
    /// ```
    /// use std::time::Duration;
    /// use raceguard::lock::{LockManager, LockName, LockOptions};
    /// use raceguard::Error;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// tokio::time::pause(); // waiting below takes no real time
    /// let locks = LockManager::memory();
    /// let name = LockName::new("invoice:7")?;
    /// let opts = LockOptions::new(Duration::from_secs(10)).wait(Duration::from_millis(200));
    /// let first = locks.acquire(&name, opts).await?;
    /// // The second caller waits up to 200 ms, then gets a typed error.
    /// let err = locks.acquire(&name, opts).await.unwrap_err();
    /// assert!(matches!(err, Error::LockBusy { .. }));
    /// drop(first);
    /// assert!(locks.acquire(&name, opts).await.is_ok());
    /// # Ok(()) }
    /// ```
    pub async fn acquire(&self, name: &LockName, opts: LockOptions) -> Result<LockGuard, Error> {
        self.acquire_inner(name, opts, true).await
    }

    /// One attempt at `name`: never waits for a busy lock (on Redis it
    /// still takes one round trip; on Redlock one round to every node).
    ///
    /// # Errors
    ///
    /// [`Error::LockBusy`] when another owner holds it; otherwise as
    /// [`acquire`](Self::acquire).
    ///
    /// Cancellation: as [`acquire`](Self::acquire).
    ///
    /// ```
    /// use std::time::Duration;
    /// use raceguard::lock::{LockManager, LockName, LockOptions};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let locks = LockManager::memory();
    /// let g = locks.try_acquire(&LockName::new("a")?, LockOptions::new(Duration::from_secs(1))).await?;
    /// assert!(g.is_held());
    /// # Ok(()) }
    /// ```
    pub async fn try_acquire(
        &self,
        name: &LockName,
        opts: LockOptions,
    ) -> Result<LockGuard, Error> {
        self.acquire_inner(name, opts, false).await
    }

    async fn acquire_inner(
        &self,
        name: &LockName,
        opts: LockOptions,
        waiting: bool,
    ) -> Result<LockGuard, Error> {
        let inner = &self.inner;
        let ttl = inner.check_ttl(opts.ttl)?;
        let max_hold = match opts.watchdog {
            None => None,
            Some(max) if max < opts.ttl => {
                return Err(Error::invalid(
                    "lock.watchdog",
                    "the maximum hold must be at least the TTL",
                ));
            }
            Some(max) => {
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(Error::invalid(
                        "lock.watchdog",
                        "the watchdog needs a tokio runtime",
                    ));
                }
                Some(nanos(max))
            }
        };
        let fenced = opts.fencing.unwrap_or(inner.config.fencing);
        #[cfg(feature = "redis")]
        if let Backend::Redlock(_) = inner.backend {
            check_redlock_fencing(fenced)?;
        }
        let token = inner.tokens.next()?;
        let mut rng = SplitMix64::new(token.seed());
        let deadline = if waiting && !opts.wait.is_zero() {
            let now = tokio::time::Instant::now();
            Some(now.checked_add(opts.wait).unwrap_or_else(|| now + MAX_TTL))
        } else {
            None
        };
        let mut cleanup = Cleanup {
            inner,
            name,
            token,
            dirty: false,
        };
        let needs_cleanup = !inner.is_memory();
        let notify = inner.notify(name);
        let mut attempt: u32 = 0;
        let mut waited = WaitStart::new();
        loop {
            // Registered before the attempt: a release that happens while
            // the attempt is in flight still wakes us.
            let mut notified = pin!(notify.notified());
            if deadline.is_some() {
                notified.as_mut().enable();
            }
            let start = inner.now();
            waited.attempt(attempt, start);
            cleanup.dirty = needs_cleanup;
            let outcome = inner.try_once(name, token, ttl, fenced).await;
            let (err, hint) = match outcome {
                Ok(Attempt::Acquired { fence }) => {
                    let end = inner.now();
                    let elapsed = end.saturating_sub(start);
                    let drift = inner.drift(ttl);
                    if token::validity_nanos(ttl, elapsed, drift).is_some() {
                        cleanup.dirty = false;
                        let until = token::valid_until(start, ttl, drift);
                        let lease = Lease::new(
                            inner.clone(),
                            name.clone(),
                            token,
                            fence.map(FencingToken::new),
                            ttl,
                            start,
                            until,
                            max_hold,
                        );
                        inner.metrics.acquired();
                        inner.metrics.waited(attempt, waited, true, || end);
                        return Ok(LockGuard::start(lease));
                    }
                    // Granted too late to be of use: give it back.
                    cleanup.release_now().await;
                    (
                        Error::Timeout {
                            op: "lock acquire",
                            after: Duration::from_nanos(elapsed),
                        },
                        None,
                    )
                }
                Ok(Attempt::Busy { remaining, clean }) => {
                    cleanup.dirty = needs_cleanup && !clean;
                    (
                        Error::LockBusy {
                            resource: name.as_str().to_owned(),
                        },
                        remaining,
                    )
                }
                Err(e) => {
                    // The request may have run: take back what it set.
                    cleanup.release_now().await;
                    if !e.is_retryable() {
                        return Err(e);
                    }
                    (e, None)
                }
            };
            let Some(deadline) = deadline else {
                inner.metrics.refused(&err, false);
                return Err(err);
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                inner.metrics.refused(&err, true);
                inner.metrics.waited(attempt, waited, false, || inner.now());
                return Err(err);
            }
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(Error::invalid(
                    "lock.wait",
                    "waiting for a busy lock needs a tokio runtime; use try_acquire",
                ));
            }
            let jitter = token::full_jitter(
                attempt,
                nanos(inner.config.retry_base),
                nanos(inner.config.retry_cap),
                rng.next_u64(),
            );
            let delay = token::next_delay(jitter, hint, nanos(deadline - now));
            wait_for(Duration::from_nanos(delay), notified).await;
            attempt = attempt.saturating_add(1);
        }
    }
}

/// Refuses [`Fencing::Counter`] on Redlock: independent nodes' counters
/// drift apart (a node that was down missed increments), so the largest
/// of one quorum's counters can exceed the next quorum's. Only counters
/// kept near one clock ([`Fencing::ServerClock`]) make the maximum
/// meaningful across nodes.
#[cfg(feature = "redis")]
fn check_redlock_fencing(fencing: Fencing) -> Result<(), Error> {
    if fencing == Fencing::Counter {
        return Err(Error::invalid(
            "lock.fencing",
            "Fencing::Counter cannot order tokens across independent Redlock nodes; \
             use Fencing::ServerClock (the default) or Fencing::Off",
        ));
    }
    Ok(())
}

/// Sleeps for `delay` or until `notified` fires, whichever is first.
async fn wait_for<F: Future<Output = ()>>(delay: Duration, notified: std::pin::Pin<&mut F>) {
    let mut notified = notified;
    let mut sleep = pin!(tokio::time::sleep(delay));
    poll_fn(|cx| {
        if notified.as_mut().poll(cx).is_ready() || sleep.as_mut().poll(cx).is_ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(all(test, raceguard_loom))]
pub(crate) mod test_support {
    //! Hooks for the crate's own tests and loom models.
    use super::*;

    pub(crate) use super::watchdog::Renewal;

    /// The token of the live holder of `name` on an in-memory manager.
    pub(crate) fn memory_holder(locks: &LockManager, name: &LockName) -> Option<u128> {
        match &locks.inner.backend {
            Backend::Memory(m) => m
                .holder(name.as_str(), locks.inner.now())
                .map(|t| t.value()),
            #[cfg(feature = "redis")]
            _ => None,
        }
    }

    /// Entries in an in-memory manager's table.
    pub(crate) fn memory_len(locks: &LockManager) -> usize {
        match &locks.inner.backend {
            Backend::Memory(m) => m.len(),
            #[cfg(feature = "redis")]
            _ => 0,
        }
    }

    /// A handle on `guard`'s lease that outlives the guard.
    pub(crate) fn lease_of(guard: &LockGuard) -> StdArc<Lease> {
        guard.lease_arc()
    }

    /// One renewal through a bare lease handle.
    pub(crate) async fn renew_lease(lease: &Lease) -> watchdog::Renewal {
        watchdog::renew_once(lease).await
    }

    pub(crate) fn token_of(guard: &LockGuard) -> u128 {
        guard.lease().token.value()
    }
}
