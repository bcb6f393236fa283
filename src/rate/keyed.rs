//! [`KeyedRateLimiter`]: one limit per key (per user, per route, per IP),
//! with bounded memory and no background thread.
//!
//! Invariants:
//!
//! - Keys are spread over shards by hash; each shard is one mutex around an
//!   open-addressing table of `(key, TAT)` (see `table.rs`) and the latest
//!   time the shard has seen. Every read and write of a key's state happens
//!   under its shard's lock, so a check decides on the latest state of its
//!   key and no two checks consume the same cell.
//! - Time per shard never goes backwards: each operation uses
//!   `max(now, latest time seen by the shard)`. A clock that jumps back (or a
//!   stale caller-provided timestamp) therefore behaves like a clock that
//!   stood still: it cannot make an evicted key look younger, nor admit extra
//!   cells.
//! - An entry whose TAT is at or before the shard's time is expired and
//!   decides exactly like an absent key (GCRA's "full" state), so dropping it
//!   changes no decision. Eviction is folded into operations that add a key:
//!   each insertion first sweeps a few slots of its shard, table rebuilds drop
//!   every expired entry, and at the key cap the insertion sweeps more before
//!   giving up. [`KeyedRateLimiter::evict_expired`] sweeps everything on
//!   demand. No background thread is needed.
//! - `tracked` counts reserved entries: an insertion reserves before it
//!   inserts and a removal releases after it removes, so at every instant
//!   `Σ table lengths ≤ tracked ≤ max_keys`. The cap is a hard bound.
//! - User code (the quota resolver, the clock) runs before the shard lock is
//!   taken, never under it.

use std::any::Any;
use std::fmt;
use std::hash::{BuildHasher, Hash};
use std::num::NonZeroU64;
use std::time::Duration;

use super::gcra::{self, MAX_NANOS};
use super::metrics::RateMetrics;
use super::multi::{ErasedKeyed, LockedShard};
use super::table::{Entry, Table};
use super::wait::{self, KeyedQueues, WaitConfig};
use super::{Decision, Quota, validate_cost};
use crate::clock::{Clock, SystemClock};
use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::{Mutex, MutexGuard, next_id};
use crate::{Error, Result};

/// The default hasher of keyed limiters: foldhash's fast hasher, seeded
/// randomly per limiter (keys come from requests; a fixed seed would let a
/// client pick colliding keys).
///
/// ```
/// use std::hash::BuildHasher;
/// let (a, b) = (raceguard::rate::DefaultHasher::default(), raceguard::rate::DefaultHasher::default());
/// assert_ne!(a.hash_one(42u64), b.hash_one(42u64), "a fresh random seed each time");
/// ```
pub type DefaultHasher = foldhash::fast::RandomState;

/// The default cap on tracked keys.
///
/// ```
/// use raceguard::rate::{DEFAULT_MAX_KEYS, KeyedRateLimiter, Quota};
/// let limiter = KeyedRateLimiter::<u64>::new(Quota::per_second(1)?);
/// assert_eq!(limiter.max_keys(), DEFAULT_MAX_KEYS);
/// # Ok::<(), raceguard::Error>(())
/// ```
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// Slots swept before each insertion of a new key.
const SWEEP_PER_INSERT: usize = 8;
/// Further slots swept by an insertion that found the cap reached.
pub(crate) const SWEEP_AT_CAP: usize = 64;

pub(crate) const KEYS_RESOURCE: &str = "keyed rate limiter keys";

type Resolver<K> = Box<dyn Fn(&K) -> Quota + Send + Sync>;

#[derive(Debug)]
struct Shard<K> {
    table: Table<K>,
    max_seen: u64,
}

impl<K> Shard<K> {
    /// The shard's time: never below one it has already used.
    #[inline]
    fn observe(&mut self, now: u64) -> u64 {
        let now = now.min(MAX_NANOS);
        if now > self.max_seen {
            self.max_seen = now;
        }
        self.max_seen
    }
}

/// Keeps each shard's lock on its own cache lines.
#[derive(Debug)]
#[repr(align(128))]
struct Padded<T>(T);

#[inline]
fn nonzero(tat: u64) -> NonZeroU64 {
    NonZeroU64::new(tat).unwrap_or(NonZeroU64::MIN)
}

/// One rate limit per key, for example per user (seed 001's middleware) or
/// per route, with a hard cap on how many keys it tracks.
///
/// - Each key gets the limiter's [`Quota`], or the one a resolver picks for
///   it (premium users, per-route limits).
/// - Idle keys cost nothing for long: once a key's state is older than its
///   reset time it is indistinguishable from an absent key and is dropped by
///   later operations (no background thread).
/// - At most `max_keys` keys are tracked. **Overflow policy:** when a check
///   needs to start tracking a new key and the cap is reached even after
///   sweeping for expired keys, the check is refused with
///   [`Error::CapacityExceeded`] and consumes nothing; keys already tracked
///   are unaffected. It never admits a key without tracking it.
///
/// ```
/// use std::time::Duration;
/// use raceguard::clock::ManualClock;
/// use raceguard::rate::{KeyedRateLimiter, Quota};
///
/// let clock = ManualClock::new();
/// let per_user = KeyedRateLimiter::<String, _>::builder(Quota::per_minute(30)?)
///     .clock(clock.clone())
///     .max_keys(100_000)
///     .build()?;
/// let alice = "alice".to_string();
/// for _ in 0..30 {
///     assert!(per_user.check(&alice)?.allowed());
/// }
/// let d = per_user.check(&alice)?;
/// assert!(d.denied());
/// assert_eq!(d.retry_after(), Duration::from_secs(2));
/// assert!(per_user.check(&"bob".to_string())?.allowed(), "bob has his own limit");
/// # Ok::<(), raceguard::Error>(())
/// ```
pub struct KeyedRateLimiter<K, C = SystemClock, S = DefaultHasher> {
    shards: Box<[Padded<Mutex<Shard<K>>>]>,
    /// Rank in the lock order of multi-limit checks.
    id: u64,
    mask: usize,
    hasher: S,
    tracked: AtomicUsize,
    max_keys: usize,
    quota: Quota,
    resolver: Option<Resolver<K>>,
    clock: C,
    waiters: KeyedQueues<K>,
    name: Option<Box<str>>,
    metrics: RateMetrics,
}

impl<K: Hash + Eq + Clone> KeyedRateLimiter<K, SystemClock, DefaultHasher> {
    /// A limiter giving every key `quota`, on a fresh [`SystemClock`],
    /// tracking at most [`DEFAULT_MAX_KEYS`] keys.
    ///
    /// ```
    /// use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::new(Quota::per_second(10)?);
    /// assert!(limiter.check(&42u64)?.allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn new(quota: Quota) -> Self {
        Self::builder(quota)
            .build()
            .expect("the default configuration is valid")
    }

    /// A builder for the clock, the key cap, per-key quotas, the hasher and
    /// the waiting bounds.
    ///
    /// ```
    /// use raceguard::clock::ManualClock;
    /// use raceguard::rate::{KeyedRateLimiter, Quota};
    ///
    /// let limiter = KeyedRateLimiter::<u64, _>::builder(Quota::per_second(10)?)
    ///     .clock(ManualClock::new())
    ///     .max_keys(1_000)
    ///     .build()?;
    /// assert_eq!(limiter.max_keys(), 1_000);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn builder(quota: Quota) -> KeyedRateLimiterBuilder<K, SystemClock, DefaultHasher> {
        KeyedRateLimiterBuilder {
            quota,
            clock: SystemClock::new(),
            hasher: DefaultHasher::default(),
            max_keys: DEFAULT_MAX_KEYS,
            shards: None,
            resolver: None,
            wait: WaitConfig::default(),
            name: None,
        }
    }
}

impl<K, C, S> KeyedRateLimiter<K, C, S>
where
    K: Hash + Eq + Clone,
    C: Clock,
    S: BuildHasher,
{
    /// Checks one cell for `key` at the clock's current time, consuming it
    /// when allowed.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::new(Quota::per_second(1)?);
    /// assert!(limiter.check(&"alice")?.allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::CapacityExceeded`] when `key` is not tracked, the check would
    /// consume, and the key cap is reached even after sweeping for expired
    /// keys. Nothing is consumed then.
    #[inline]
    pub fn check(&self, key: &K) -> Result<Decision> {
        let quota = self.quota_for(key);
        let out = self.run(key, 1, self.clock.now_nanos(), true, quota);
        self.metrics.outcome(&out);
        out
    }

    /// Checks `n` cells for `key` at once (all or none).
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// # use raceguard::clock::ManualClock;
    /// let limiter = KeyedRateLimiter::<u64, _>::builder(Quota::per_second(5)?)
    ///     .clock(ManualClock::new())
    ///     .build()?;
    /// assert!(limiter.check_n(&7, 5)?.allowed());
    /// assert!(limiter.check_n(&7, 1)?.denied());
    /// assert!(limiter.check_n(&7, 6).is_err());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `n` exceeds the key's burst;
    /// [`Error::CapacityExceeded`] as for [`check`](KeyedRateLimiter::check).
    pub fn check_n(&self, key: &K, n: u32) -> Result<Decision> {
        self.check_n_at(key, n, self.clock.now_nanos())
    }

    /// The decision [`check`](KeyedRateLimiter::check) would return now,
    /// without consuming (and without starting to track the key).
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::new(Quota::per_second(1)?);
    /// assert!(limiter.peek(&"alice").allowed());
    /// assert_eq!(limiter.tracked_keys(), 0);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn peek(&self, key: &K) -> Decision {
        self.peek_at(key, self.clock.now_nanos())
    }

    /// The decision [`check_n`](KeyedRateLimiter::check_n) would return now,
    /// without consuming. `peek_n(key, 0)` reports the key's current
    /// `remaining`.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::new(Quota::per_second(3)?);
    /// assert_eq!(limiter.peek_n(&1u64, 0)?.remaining(), 3);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `n` exceeds the key's burst.
    pub fn peek_n(&self, key: &K, n: u32) -> Result<Decision> {
        self.peek_n_at(key, n, self.clock.now_nanos())
    }

    /// [`check`](KeyedRateLimiter::check) at a caller-provided timestamp
    /// (nanoseconds on this limiter's clock). A timestamp older than one the
    /// key's shard already used counts as that later time.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// # use raceguard::clock::ManualClock;
    /// let limiter = KeyedRateLimiter::<u64, _>::builder(Quota::per_second(1)?)
    ///     .clock(ManualClock::new())
    ///     .build()?;
    /// assert!(limiter.check_at(&1, 0)?.allowed());
    /// assert!(limiter.check_at(&1, 999_999_999)?.denied());
    /// assert!(limiter.check_at(&1, 1_000_000_000)?.allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`check`](KeyedRateLimiter::check).
    #[inline]
    pub fn check_at(&self, key: &K, now_nanos: u64) -> Result<Decision> {
        let quota = self.quota_for(key);
        let out = self.run(key, 1, now_nanos, true, quota);
        self.metrics.outcome(&out);
        out
    }

    /// [`check_n`](KeyedRateLimiter::check_n) at a caller-provided
    /// timestamp.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::new(Quota::per_second(4)?);
    /// assert_eq!(limiter.check_n_at(&1u64, 3, 0)?.remaining(), 1);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`check_n`](KeyedRateLimiter::check_n).
    pub fn check_n_at(&self, key: &K, n: u32, now_nanos: u64) -> Result<Decision> {
        let quota = self.quota_for(key);
        validate_cost(n, quota)?;
        let out = self.run(key, n, now_nanos, true, quota);
        self.metrics.outcome(&out);
        out
    }

    /// [`peek`](KeyedRateLimiter::peek) at a caller-provided timestamp.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::new(Quota::per_second(4)?);
    /// assert!(limiter.peek_at(&1u64, 0).allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn peek_at(&self, key: &K, now_nanos: u64) -> Decision {
        let quota = self.quota_for(key);
        match self.run(key, 1, now_nanos, false, quota) {
            Ok(d) => d,
            // A peek neither inserts nor validates cost 1 against a burst >= 1.
            Err(_) => unreachable!("peek cannot fail"),
        }
    }

    /// [`peek_n`](KeyedRateLimiter::peek_n) at a caller-provided timestamp.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::new(Quota::per_second(4)?);
    /// assert!(limiter.peek_n_at(&1u64, 4, 0)?.allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `n` exceeds the key's burst.
    pub fn peek_n_at(&self, key: &K, n: u32, now_nanos: u64) -> Result<Decision> {
        let quota = self.quota_for(key);
        validate_cost(n, quota)?;
        self.run(key, n, now_nanos, false, quota)
    }

    /// The quota `key` gets: the resolver's answer, or the limiter's quota.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::<&str, _>::builder(Quota::per_minute(10)?)
    ///     .quota_resolver(|user: &&str| {
    ///         let q = if user.starts_with("premium:") { 100 } else { 10 };
    ///         Quota::per_minute(q).expect("valid")
    ///     })
    ///     .build()?;
    /// assert_eq!(limiter.quota_for(&"premium:ann").burst(), 100);
    /// assert_eq!(limiter.quota_for(&"bob").burst(), 10);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub fn quota_for(&self, key: &K) -> Quota {
        match &self.resolver {
            Some(resolve) => resolve(key),
            None => self.quota,
        }
    }

    /// The default quota (what keys get without a resolver).
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let q = Quota::per_second(2)?;
    /// assert_eq!(KeyedRateLimiter::<u64>::new(q).quota(), q);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// How many keys are tracked right now (an upper bound while other
    /// threads are inserting). Never above [`max_keys`](Self::max_keys).
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::new(Quota::per_second(2)?);
    /// limiter.check(&1u64)?;
    /// limiter.check(&2u64)?;
    /// assert_eq!(limiter.tracked_keys(), 2);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn tracked_keys(&self) -> usize {
        self.tracked.load(Ordering::Acquire)
    }

    /// The cap on tracked keys.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// assert_eq!(KeyedRateLimiter::<u64>::new(Quota::per_second(2)?).max_keys(), 1_000_000);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// The number of shards.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::<u64>::builder(Quota::per_second(2)?).shards(4).build()?;
    /// assert_eq!(limiter.shards(), 4);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Bytes held by the limiter's key tables and shard headers (not
    /// counting heap memory the keys themselves own, such as a `String`'s
    /// buffer). Back to its empty-limiter value once every key has expired
    /// and been swept.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::<u64>::new(Quota::per_second(2)?);
    /// let empty = limiter.allocated_bytes();
    /// limiter.check(&1)?;
    /// assert!(limiter.allocated_bytes() > empty);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn allocated_bytes(&self) -> usize {
        let slot = std::mem::size_of::<Option<Entry<K>>>();
        let slots: usize = self
            .shards
            .iter()
            .map(|s| s.0.lock().table.capacity())
            .sum();
        std::mem::size_of_val::<[Padded<Mutex<Shard<K>>>]>(&self.shards) + slots * slot
    }

    /// Drops every expired key now (keys whose state decides like an absent
    /// key), shrinking the tables; returns how many were dropped. Optional:
    /// normal operation evicts lazily; call this to return memory at once
    /// after a burst of distinct keys.
    ///
    /// ```
    /// use std::time::Duration;
    /// use raceguard::clock::ManualClock;
    /// use raceguard::rate::{KeyedRateLimiter, Quota};
    ///
    /// let clock = ManualClock::new();
    /// let limiter = KeyedRateLimiter::<u64, _>::builder(Quota::per_second(10)?)
    ///     .clock(clock.clone())
    ///     .build()?;
    /// for user in 0..100 {
    ///     limiter.check(&user)?;
    /// }
    /// clock.advance(Duration::from_millis(100)); // one interval: all refilled
    /// assert_eq!(limiter.evict_expired(), 100);
    /// assert_eq!(limiter.tracked_keys(), 0);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn evict_expired(&self) -> usize {
        let now = self.clock.now_nanos();
        let mut total = 0;
        for shard in self.shards.iter() {
            let mut g = shard.0.lock();
            let now = g.observe(now);
            let n = g.table.evict_expired(now, &self.hasher);
            drop(g);
            self.release(n);
            total += n;
        }
        total
    }

    /// The clock.
    ///
    /// ```
    /// use raceguard::clock::{Clock, ManualClock};
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::<u64, _>::builder(Quota::per_second(2)?)
    ///     .clock(ManualClock::new())
    ///     .build()?;
    /// assert_eq!(limiter.clock().now_nanos(), 0);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// How many callers are queued in
    /// [`acquire`](KeyedRateLimiter::acquire) over all keys.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// assert_eq!(KeyedRateLimiter::<u64>::new(Quota::per_second(2)?).waiters(), 0);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn waiters(&self) -> usize {
        self.waiters.len()
    }

    /// The name given in [`KeyedRateLimiterBuilder::name`], if any.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::<u64>::builder(Quota::per_second(2)?).name("per-user").build()?;
    /// assert_eq!(limiter.name(), Some("per-user"));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Entries actually in the tables (tests: `≤ tracked_keys()`).
    #[cfg(test)]
    pub(crate) fn table_entries(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().table.len()).sum()
    }

    /// The shared step of every check and peek.
    #[inline]
    fn run(&self, key: &K, cost: u32, now: u64, consume: bool, quota: Quota) -> Result<Decision> {
        let hash = self.hasher.hash_one(key);
        let mut shard = self.shards[hash as usize & self.mask].0.lock();
        let now = shard.observe(now);
        match shard.table.find(hash, key) {
            Some(slot) => {
                let (d, next) = gcra::decide(shard.table.tat(slot), now, quota, cost);
                if consume && let Some(tat) = next {
                    shard.table.set_tat(slot, nonzero(tat));
                }
                Ok(d)
            }
            None => {
                let (d, next) = gcra::decide(0, now, quota, cost);
                if consume && let Some(tat) = next {
                    self.insert(&mut shard, hash, key.clone(), tat, now)?;
                }
                Ok(d)
            }
        }
    }

    /// Inserts a new key under its shard's lock, sweeping first and
    /// respecting the cap.
    fn insert(&self, shard: &mut Shard<K>, hash: u64, key: K, tat: u64, now: u64) -> Result<()> {
        let freed = shard.table.sweep(now, SWEEP_PER_INSERT, &self.hasher);
        self.release(freed);
        if !self.try_reserve() {
            let freed = shard.table.sweep(now, SWEEP_AT_CAP, &self.hasher);
            self.release(freed);
            if !self.try_reserve() {
                return Err(self.full_error());
            }
        }
        let dropped = shard
            .table
            .insert(hash, key, nonzero(tat), now, &self.hasher);
        self.release(dropped);
        Ok(())
    }

    fn try_reserve(&self) -> bool {
        let mut cur = self.tracked.load(Ordering::Acquire);
        loop {
            if cur >= self.max_keys {
                return false;
            }
            match self.tracked.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    fn release(&self, n: usize) {
        if n > 0 {
            self.tracked.fetch_sub(n, Ordering::AcqRel);
        }
    }

    fn full_error(&self) -> Error {
        Error::CapacityExceeded {
            resource: KEYS_RESOURCE,
            capacity: self.max_keys,
        }
    }
}

impl<K, C, S> KeyedRateLimiter<K, C, S>
where
    K: Hash + Eq + Clone + Send + Sync,
    C: Clock,
    S: BuildHasher + Sync,
{
    /// Waits, in FIFO order with the other waiters **for the same key**,
    /// until one cell is admitted for `key`, for at most the limiter's wait
    /// timeout (30 s unless set in the builder). Waiters on different keys
    /// never wait for each other.
    ///
    /// Dropping the future consumes nothing and removes the caller from its
    /// key's queue at once, waking the next waiter if it was first.
    ///
    /// ```
    /// use raceguard::rate::{KeyedRateLimiter, Quota, TokioClock};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let limiter = KeyedRateLimiter::<&str, _>::builder(Quota::per_second(1)?)
    ///     .clock(TokioClock::new())
    ///     .build()?;
    /// limiter.until_ready(&"audnex").await?;
    /// limiter.until_ready(&"audnex").await?; // a (paused) second later
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::CapacityExceeded`] at once when `max_waiters` callers are
    /// already queued (over all keys) or the key cap is full;
    /// [`Error::Timeout`] when no cell is admitted by the deadline.
    ///
    /// # Panics
    ///
    /// When it has to sleep outside a Tokio runtime with the time driver
    /// enabled.
    pub async fn until_ready(&self, key: &K) -> Result<Decision> {
        self.acquire_timeout(key, 1, self.waiters.config.timeout)
            .await
    }

    /// Like [`until_ready`](KeyedRateLimiter::until_ready) for `n` cells.
    ///
    /// Cancellation consumes nothing and frees the caller's place in the
    /// queue.
    ///
    /// ```
    /// use raceguard::rate::{KeyedRateLimiter, Quota, TokioClock};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let limiter = KeyedRateLimiter::<u64, _>::builder(Quota::per_second(4)?)
    ///     .clock(TokioClock::new())
    ///     .build()?;
    /// assert_eq!(limiter.acquire(&9, 4).await?.remaining(), 0);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`until_ready`](KeyedRateLimiter::until_ready), plus
    /// [`Error::InvalidInput`] at once when `n` exceeds the key's burst.
    ///
    /// # Panics
    ///
    /// When it has to sleep outside a Tokio runtime with the time driver
    /// enabled.
    pub async fn acquire(&self, key: &K, n: u32) -> Result<Decision> {
        self.acquire_timeout(key, n, self.waiters.config.timeout)
            .await
    }

    /// Like [`acquire`](KeyedRateLimiter::acquire) with an explicit
    /// deadline.
    ///
    /// Cancellation consumes nothing and frees the caller's place in the
    /// queue.
    ///
    /// ```
    /// use std::time::Duration;
    /// use raceguard::rate::{KeyedRateLimiter, Quota, TokioClock};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let limiter = KeyedRateLimiter::<u64, _>::builder(Quota::per_minute(1)?)
    ///     .clock(TokioClock::new())
    ///     .build()?;
    /// limiter.acquire_timeout(&1, 1, Duration::from_secs(1)).await?;
    /// assert!(limiter.acquire_timeout(&1, 1, Duration::from_secs(1)).await.is_err());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`acquire`](KeyedRateLimiter::acquire).
    ///
    /// # Panics
    ///
    /// When it has to sleep outside a Tokio runtime with the time driver
    /// enabled.
    pub async fn acquire_timeout(&self, key: &K, n: u32, timeout: Duration) -> Result<Decision> {
        validate_cost(n, self.quota_for(key))?;
        let queue = self.waiters.for_key(key);
        // Attempts inside the wait are not recorded; its outcome is, once.
        let out = wait::acquire(&queue, timeout, || {
            let quota = self.quota_for(key);
            self.run(key, n, self.clock.now_nanos(), true, quota)
        })
        .await;
        self.metrics.outcome(&out);
        out
    }
}

impl<K, C: fmt::Debug, S> fmt::Debug for KeyedRateLimiter<K, C, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimiter")
            .field("name", &self.name)
            .field("quota", &self.quota)
            .field("per_key_quotas", &self.resolver.is_some())
            .field("tracked_keys", &self.tracked.load(Ordering::Relaxed))
            .field("max_keys", &self.max_keys)
            .field("shards", &self.shards.len())
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

/// Builds a [`KeyedRateLimiter`].
///
/// ```
/// use raceguard::clock::ManualClock;
/// use raceguard::rate::{KeyedRateLimiter, Quota};
///
/// let limiter = KeyedRateLimiter::<u64, _>::builder(Quota::per_minute(30)?)
///     .clock(ManualClock::new())
///     .max_keys(10_000)
///     .quota_resolver(|user: &u64| {
///         if *user < 100 { Quota::per_minute(300).expect("valid") } else { Quota::per_minute(30).expect("valid") }
///     })
///     .build()?;
/// assert_eq!(limiter.check(&7)?.limit(), 300);
/// assert_eq!(limiter.check(&700)?.limit(), 30);
/// # Ok::<(), raceguard::Error>(())
/// ```
pub struct KeyedRateLimiterBuilder<K, C, S> {
    quota: Quota,
    clock: C,
    hasher: S,
    max_keys: usize,
    shards: Option<usize>,
    resolver: Option<Resolver<K>>,
    wait: WaitConfig,
    name: Option<String>,
}

impl<K, C: fmt::Debug, S> fmt::Debug for KeyedRateLimiterBuilder<K, C, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimiterBuilder")
            .field("quota", &self.quota)
            .field("clock", &self.clock)
            .field("max_keys", &self.max_keys)
            .field("shards", &self.shards)
            .field("per_key_quotas", &self.resolver.is_some())
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn default_shards() -> usize {
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
    (cores * 4).next_power_of_two().clamp(64, 1024)
}

impl<K, C, S> KeyedRateLimiterBuilder<K, C, S>
where
    K: Hash + Eq + Clone,
    C: Clock,
    S: BuildHasher,
{
    /// Uses `clock` instead of a fresh [`SystemClock`].
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// use raceguard::clock::ManualClock;
    /// let b = KeyedRateLimiter::<u64>::builder(Quota::per_second(1)?).clock(ManualClock::new());
    /// # let _ = b;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn clock<C2: Clock>(self, clock: C2) -> KeyedRateLimiterBuilder<K, C2, S> {
        KeyedRateLimiterBuilder {
            quota: self.quota,
            clock,
            hasher: self.hasher,
            max_keys: self.max_keys,
            shards: self.shards,
            resolver: self.resolver,
            wait: self.wait,
            name: self.name,
        }
    }

    /// Uses another hasher. Keys come from requests: keep it seeded
    /// randomly, or a client can choose colliding keys.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::<u64>::builder(Quota::per_second(1)?)
    ///     .hasher(std::hash::RandomState::new())
    ///     .build()?;
    /// # let _ = limiter;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn hasher<S2: BuildHasher>(self, hasher: S2) -> KeyedRateLimiterBuilder<K, C, S2> {
        KeyedRateLimiterBuilder {
            quota: self.quota,
            clock: self.clock,
            hasher,
            max_keys: self.max_keys,
            shards: self.shards,
            resolver: self.resolver,
            wait: self.wait,
            name: self.name,
        }
    }

    /// The cap on tracked keys (default [`DEFAULT_MAX_KEYS`]). Memory is
    /// about 20–30 bytes per tracked `u64` key plus what the keys own.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::<u64>::builder(Quota::per_second(1)?).max_keys(1).build()?;
    /// limiter.check(&1)?;
    /// assert!(limiter.check(&2).is_err(), "the cap is reached and key 1 is not expired");
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// The number of shards, a power of two (default: 4 per core, between 64
    /// and 1,024).
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// assert!(KeyedRateLimiter::<u64>::builder(Quota::per_second(1)?).shards(3).build().is_err());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// Picks each key's quota (premium users, per-route limits). Called on
    /// every check, outside every lock; keep it cheap. A key whose quota
    /// changes keeps its state: the new quota applies from the next check.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::<(u8, u64)>::builder(Quota::per_second(1)?)
    ///     .quota_resolver(|(route, _user): &(u8, u64)| match route {
    ///         0 => Quota::per_second(100).expect("valid"),
    ///         _ => Quota::per_second(1).expect("valid"),
    ///     })
    ///     .build()?;
    /// assert_eq!(limiter.check(&(0, 1))?.limit(), 100);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn quota_resolver(mut self, resolve: impl Fn(&K) -> Quota + Send + Sync + 'static) -> Self {
        self.resolver = Some(Box::new(resolve));
        self
    }

    /// Names the limiter: the `limiter` label of its metrics (feature
    /// `metrics`; `"unnamed"` otherwise) and [`KeyedRateLimiter::name`].
    /// Keys never become labels (a label per user would be unbounded).
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::<u64>::builder(Quota::per_second(1)?).name("per-user").build()?;
    /// assert_eq!(limiter.name(), Some("per-user"));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The most callers queued in `acquire`/`until_ready` over all keys
    /// (default 1,024); beyond it [`Error::CapacityExceeded`] at once.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::<u64>::builder(Quota::per_second(1)?).max_waiters(10).build()?;
    /// # let _ = limiter;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn max_waiters(mut self, max_waiters: usize) -> Self {
        self.wait.max_waiters = max_waiters;
        self
    }

    /// The deadline of `until_ready`/`acquire` (default 30 s).
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::<u64>::builder(Quota::per_second(1)?)
    ///     .wait_timeout(std::time::Duration::from_secs(1))
    ///     .build()?;
    /// # let _ = limiter;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait.timeout = timeout;
        self
    }

    /// The limiter, tracking no key.
    ///
    /// ```
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limiter = KeyedRateLimiter::<u64>::builder(Quota::per_second(1)?).build()?;
    /// assert_eq!(limiter.tracked_keys(), 0);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `max_keys` is 0 or `shards` is not a
    /// power of two.
    pub fn build(self) -> Result<KeyedRateLimiter<K, C, S>> {
        if self.max_keys == 0 {
            return Err(Error::invalid(
                "keyed rate limiter max_keys",
                "must be at least 1",
            ));
        }
        let shards = match self.shards {
            Some(n) if !n.is_power_of_two() => {
                return Err(Error::invalid(
                    "keyed rate limiter shards",
                    format!("must be a power of two, got {n}"),
                ));
            }
            Some(n) => n,
            None => default_shards(),
        };
        let shards: Box<[_]> = (0..shards)
            .map(|_| {
                Padded(Mutex::new(Shard {
                    table: Table::new(),
                    max_seen: 0,
                }))
            })
            .collect();
        Ok(KeyedRateLimiter {
            id: next_id(),
            mask: shards.len() - 1,
            shards,
            hasher: self.hasher,
            tracked: AtomicUsize::new(0),
            max_keys: self.max_keys,
            quota: self.quota,
            resolver: self.resolver,
            clock: self.clock,
            waiters: KeyedQueues::new(self.wait),
            metrics: RateMetrics::new(self.name.as_deref()),
            name: self.name.map(String::into_boxed_str),
        })
    }
}

// ---- multi-limit access -------------------------------------------------

struct LockedShardImpl<'a, K, S> {
    guard: MutexGuard<'a, Shard<K>>,
    hasher: &'a S,
}

fn typed<K: 'static>(key: &dyn Any) -> &K {
    key.downcast_ref::<K>()
        .expect("a multi-limit key always has its limiter's key type")
}

impl<K, S> LockedShard for LockedShardImpl<'_, K, S>
where
    K: Hash + Eq + Clone + 'static,
    S: BuildHasher,
{
    fn observe(&mut self, now: u64) -> u64 {
        self.guard.observe(now)
    }

    fn get(&self, hash: u64, key: &dyn Any) -> Option<u64> {
        let t = &self.guard.table;
        t.find(hash, typed::<K>(key)).map(|slot| t.tat(slot))
    }

    fn set(&mut self, hash: u64, key: &dyn Any, tat: u64, now: u64) -> usize {
        let key = typed::<K>(key);
        let table = &mut self.guard.table;
        match table.find(hash, key) {
            Some(slot) => {
                table.set_tat(slot, nonzero(tat));
                0
            }
            None => table.insert(hash, key.clone(), nonzero(tat), now, self.hasher),
        }
    }

    fn sweep(&mut self, now: u64, budget: usize) -> usize {
        self.guard.table.sweep(now, budget, self.hasher)
    }
}

impl<K, C, S> ErasedKeyed for KeyedRateLimiter<K, C, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    C: Clock,
    S: BuildHasher + Send + Sync,
{
    fn quota_of(&self, key: &dyn Any) -> Quota {
        self.quota_for(typed::<K>(key))
    }

    fn hash_of(&self, key: &dyn Any) -> u64 {
        self.hasher.hash_one(typed::<K>(key))
    }

    fn shard_rank(&self, hash: u64) -> (u64, usize) {
        (self.id, hash as usize & self.mask)
    }

    fn lock_shard(&self, hash: u64) -> Box<dyn LockedShard + '_> {
        Box::new(LockedShardImpl {
            guard: self.shards[hash as usize & self.mask].0.lock(),
            hasher: &self.hasher,
        })
    }

    fn same_key(&self, a: &dyn Any, b: &dyn Any) -> bool {
        typed::<K>(a) == typed::<K>(b)
    }

    fn now(&self) -> u64 {
        self.clock.now_nanos()
    }

    fn try_reserve(&self) -> bool {
        KeyedRateLimiter::try_reserve(self)
    }

    fn release(&self, n: usize) {
        KeyedRateLimiter::release(self, n);
    }

    fn full_error(&self) -> Error {
        KeyedRateLimiter::full_error(self)
    }

    fn id(&self) -> u64 {
        self.id
    }

    fn metrics(&self) -> &RateMetrics {
        &self.metrics
    }
}

#[cfg(all(test, not(raceguard_loom)))]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn tracked_count_matches_the_tables_through_sweeps_rebuilds_and_evictions() {
        let clock = ManualClock::new();
        let limiter = KeyedRateLimiter::<u64, _>::builder(Quota::per_second(1).unwrap())
            .clock(clock.clone())
            .shards(4)
            .max_keys(5_000)
            .build()
            .unwrap();
        for round in 0..20u64 {
            for k in 0..1_000 {
                let _ = limiter.check(&(round * 700 + k));
            }
            assert_eq!(limiter.tracked_keys(), limiter.table_entries());
            assert!(limiter.tracked_keys() <= 5_000);
            clock.advance(Duration::from_millis(300));
        }
        clock.advance(Duration::from_secs(2));
        limiter.evict_expired();
        assert_eq!((limiter.tracked_keys(), limiter.table_entries()), (0, 0));
    }
}
