//! Multi-limits: several limits (per user, per route, global ...) checked as
//! one all-or-nothing decision.
//!
//! Invariants:
//!
//! - A multi-limit check **locks every cell it touches before reading any**:
//!   a direct limiter's cell through its lock bit, a keyed limiter's key
//!   through its shard's mutex. Locks are taken in one global order (by
//!   limiter creation id, then shard index) and each lock object once, so two multi-limit checks cannot
//!   deadlock, and single checks (which hold at most one shard lock and never
//!   wait for anything while holding it) cannot deadlock with them.
//! - While the locks are held the check runs [`gcra::check_all`] on the
//!   cells' values: when every limit allows, the new values are written;
//!   when any limit denies, nothing is written. The locks are released only
//!   after that, so no other check ever sees a partial consumption, and a
//!   denied multi-limit check consumes nothing, under any concurrency.
//! - New keys are reserved against their limiter's key cap **before** any
//!   write; if a reservation fails the check writes nothing and returns
//!   [`Error::CapacityExceeded`].
//! - Quota resolvers and clocks (user code) run before any lock is taken.
//!   The only code between lock and unlock is raceguard's arithmetic and
//!   table operations, and a drop guard releases every direct cell with its
//!   original value on unwind.

use std::any::Any;
use std::fmt;
use std::time::Duration;

use super::direct::TatCell;
use super::gcra::{self, CellRequest};
use super::keyed::SWEEP_AT_CAP;
use super::metrics::RateMetrics;
use super::{Decision, KeyedRateLimiter, Quota, RateLimiter, validate_cost_named};
use crate::clock::Clock;
use crate::{Error, Result};

/// A keyed limiter seen without its key type (keys travel as `&dyn Any`,
/// always of the limiter's own key type).
pub(crate) trait ErasedKeyed: Sync {
    fn quota_of(&self, key: &dyn Any) -> Quota;
    fn hash_of(&self, key: &dyn Any) -> u64;
    /// The shard's rank in the lock order: (limiter id, shard index).
    fn shard_rank(&self, hash: u64) -> (u64, usize);
    fn lock_shard(&self, hash: u64) -> Box<dyn LockedShard + '_>;
    fn same_key(&self, a: &dyn Any, b: &dyn Any) -> bool;
    fn now(&self) -> u64;
    fn try_reserve(&self) -> bool;
    fn release(&self, n: usize);
    fn full_error(&self) -> Error;
    fn id(&self) -> u64;
    fn metrics(&self) -> &RateMetrics;
}

/// A locked shard of a keyed limiter.
pub(crate) trait LockedShard {
    /// The shard's time for `now` (never below a time it already used).
    fn observe(&mut self, now: u64) -> u64;
    /// The key's TAT, `None` when absent.
    fn get(&self, hash: u64, key: &dyn Any) -> Option<u64>;
    /// Stores the key's TAT (inserting it; the caller reserved the count).
    /// Returns how many expired entries left the table.
    fn set(&mut self, hash: u64, key: &dyn Any, tat: u64, now: u64) -> usize;
    /// Sweeps for expired entries; returns how many left the table.
    fn sweep(&mut self, now: u64, budget: usize) -> usize;
}

/// A direct limiter seen without its clock type.
trait ErasedDirect: Sync {
    fn cell(&self) -> &TatCell;
    fn id(&self) -> u64;
    fn quota(&self) -> Quota;
    fn now(&self) -> u64;
    fn metrics(&self) -> &RateMetrics;
}

impl<C: Clock> ErasedDirect for RateLimiter<C> {
    fn cell(&self) -> &TatCell {
        RateLimiter::cell(self)
    }
    fn id(&self) -> u64 {
        RateLimiter::id(self)
    }
    fn quota(&self) -> Quota {
        RateLimiter::quota(self)
    }
    fn now(&self) -> u64 {
        self.clock().now_nanos()
    }
    fn metrics(&self) -> &RateMetrics {
        RateLimiter::metrics(self)
    }
}

#[derive(Clone, Copy)]
enum Target<'a> {
    Direct(&'a dyn ErasedDirect),
    Keyed(&'a dyn ErasedKeyed, &'a dyn Any),
}

#[derive(Clone, Copy)]
struct Part<'a> {
    name: &'static str,
    target: Target<'a>,
}

/// Several limits checked as one all-or-nothing decision: when any limit
/// denies, **none** is consumed, even while other checks (single or multi)
/// run concurrently on the same limiters. The decision says which limit
/// denied and the longest `retry_after`.
///
/// Build one per request from references to the limiters (cheap: a small
/// vector of references), then `check`.
///
/// ```
/// use raceguard::clock::ManualClock;
/// use raceguard::rate::{KeyedRateLimiter, MultiLimit, Quota, RateLimiter};
///
/// let clock = ManualClock::new();
/// let per_user = KeyedRateLimiter::<String, _>::builder(Quota::per_minute(30)?)
///     .clock(clock.clone())
///     .build()?;
/// let per_route = KeyedRateLimiter::<&str, _>::builder(Quota::per_minute(100)?)
///     .clock(clock.clone())
///     .build()?;
/// let global = RateLimiter::with_clock(Quota::per_minute(2)?, clock.clone());
///
/// let user = "alice".to_string();
/// let check = || {
///     MultiLimit::new()
///         .keyed("user", &per_user, &user)
///         .keyed("route", &per_route, &"/chat")
///         .direct("global", &global)
///         .check()
/// };
/// assert!(check()?.allowed());
/// assert!(check()?.allowed());
/// let d = check()?;
/// assert!(d.denied());
/// assert_eq!(d.denied_by(), Some("global"));
/// assert_eq!(d.retry_after().as_secs(), 30);
/// // The denied check consumed nothing from the user's or the route's limit.
/// assert_eq!(per_user.peek_n(&user, 0)?.remaining(), 28);
/// assert_eq!(per_route.peek_n(&"/chat", 0)?.remaining(), 98);
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct MultiLimit<'a> {
    parts: Vec<Part<'a>>,
}

impl fmt::Debug for MultiLimit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.parts.iter().map(|p| p.name))
            .finish()
    }
}

impl<'a> MultiLimit<'a> {
    /// An empty set of limits (which allows everything).
    ///
    /// ```
    /// let d = raceguard::rate::MultiLimit::new().check()?;
    /// assert!(d.allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn new() -> Self {
        MultiLimit { parts: Vec::new() }
    }

    /// Adds a global limit.
    ///
    /// ```
    /// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
    /// let global = RateLimiter::new(Quota::per_second(100)?);
    /// assert!(MultiLimit::new().direct("global", &global).check()?.allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn direct<C: Clock>(mut self, name: &'static str, limiter: &'a RateLimiter<C>) -> Self {
        self.parts.push(Part {
            name,
            target: Target::Direct(limiter),
        });
        self
    }

    /// Adds `key`'s limit in a keyed limiter (with the quota its resolver
    /// gives the key).
    ///
    /// ```
    /// use raceguard::rate::{KeyedRateLimiter, MultiLimit, Quota};
    /// let per_user = KeyedRateLimiter::<u64>::new(Quota::per_second(1)?);
    /// assert!(MultiLimit::new().keyed("user", &per_user, &7).check()?.allowed());
    /// assert!(MultiLimit::new().keyed("user", &per_user, &7).check()?.denied());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn keyed<K, C, S>(
        mut self,
        name: &'static str,
        limiter: &'a KeyedRateLimiter<K, C, S>,
        key: &'a K,
    ) -> Self
    where
        K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
        C: Clock,
        S: std::hash::BuildHasher + Send + Sync,
    {
        self.parts.push(Part {
            name,
            target: Target::Keyed(limiter, key),
        });
        self
    }

    /// Checks one cell against every limit, all or nothing.
    ///
    /// ```
    /// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
    /// let a = RateLimiter::new(Quota::per_minute(1)?);
    /// let b = RateLimiter::new(Quota::per_minute(5)?);
    /// assert!(MultiLimit::new().direct("a", &a).direct("b", &b).check()?.allowed());
    /// let d = MultiLimit::new().direct("a", &a).direct("b", &b).check()?;
    /// assert_eq!(d.denied_by(), Some("a"));
    /// assert_eq!(b.peek_n(0)?.remaining(), 4, "b was not consumed by the denied check");
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::CapacityExceeded`] when a keyed limit would have to track a
    /// new key beyond its cap (nothing is consumed then).
    pub fn check(&self) -> Result<MultiDecision> {
        self.run(1, None, true)
    }

    /// Checks `n` cells against every limit, all or nothing.
    ///
    /// ```
    /// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
    /// let a = RateLimiter::new(Quota::per_minute(10)?);
    /// assert_eq!(MultiLimit::new().direct("a", &a).check_n(4)?.remaining(), 6);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `n` exceeds a limit's burst;
    /// [`Error::CapacityExceeded`] as for [`check`](MultiLimit::check).
    pub fn check_n(&self, n: u32) -> Result<MultiDecision> {
        self.run(n, None, true)
    }

    /// [`check_n`](MultiLimit::check_n) at one caller-provided timestamp for
    /// every limit (all limiters must then share one clock).
    ///
    /// ```
    /// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
    /// let a = RateLimiter::new(Quota::per_second(1)?);
    /// assert!(MultiLimit::new().direct("a", &a).check_n_at(1, 0)?.allowed());
    /// assert!(MultiLimit::new().direct("a", &a).check_n_at(1, 0)?.denied());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`check_n`](MultiLimit::check_n).
    pub fn check_n_at(&self, n: u32, now_nanos: u64) -> Result<MultiDecision> {
        self.run(n, Some(now_nanos), true)
    }

    /// The decision [`check_n`](MultiLimit::check_n) would return now,
    /// consuming nothing.
    ///
    /// ```
    /// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
    /// let a = RateLimiter::new(Quota::per_second(1)?);
    /// assert!(MultiLimit::new().direct("a", &a).peek_n(1)?.allowed());
    /// assert!(a.check().allowed(), "the peek consumed nothing");
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `n` exceeds a limit's burst.
    pub fn peek_n(&self, n: u32) -> Result<MultiDecision> {
        self.run(n, None, false)
    }

    /// [`peek_n`](MultiLimit::peek_n) at a caller-provided timestamp.
    ///
    /// ```
    /// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
    /// let a = RateLimiter::new(Quota::per_second(1)?);
    /// assert!(MultiLimit::new().direct("a", &a).peek_n_at(1, 0)?.allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`peek_n`](MultiLimit::peek_n).
    pub fn peek_n_at(&self, n: u32, now_nanos: u64) -> Result<MultiDecision> {
        self.run(n, Some(now_nanos), false)
    }

    fn run(&self, cost: u32, at: Option<u64>, consume: bool) -> Result<MultiDecision> {
        let parts = &self.parts;
        // 1. Outside every lock: quotas (resolvers), hashes, clocks.
        let mut plans = Vec::with_capacity(parts.len());
        for part in parts {
            let (quota, hash, now) = match part.target {
                Target::Direct(l) => (l.quota(), 0, at.unwrap_or_else(|| l.now())),
                Target::Keyed(l, key) => (
                    l.quota_of(key),
                    l.hash_of(key),
                    at.unwrap_or_else(|| l.now()),
                ),
            };
            validate_cost_named(cost, quota, part.name)?;
            plans.push(Plan {
                quota,
                hash,
                now,
                lock: 0,
                cell: 0,
            });
        }

        // 2. Distinct lock objects, in rank order; distinct cells.
        let mut locks: Vec<((u64, usize), LockObj<'_>)> = Vec::new();
        let mut cells: Vec<usize> = Vec::new(); // cell -> first part
        for (i, part) in parts.iter().enumerate() {
            let (rank, obj) = match part.target {
                Target::Direct(l) => ((l.id(), 0), LockObj::Cell(l.cell())),
                Target::Keyed(l, _) => (
                    l.shard_rank(plans[i].hash),
                    LockObj::Shard(l, plans[i].hash),
                ),
            };
            if !locks.iter().any(|(r, _)| *r == rank) {
                locks.push((rank, obj));
            }
            let cell = cells
                .iter()
                .position(|&j| same_cell(&parts[j], &part.target, plans[j].hash, plans[i].hash))
                .unwrap_or_else(|| {
                    cells.push(i);
                    cells.len() - 1
                });
            plans[i].cell = cell;
        }
        locks.sort_unstable_by_key(|(rank, _)| *rank);
        for (i, part) in parts.iter().enumerate() {
            let rank = match part.target {
                Target::Direct(l) => (l.id(), 0),
                Target::Keyed(l, _) => l.shard_rank(plans[i].hash),
            };
            plans[i].lock = locks.iter().position(|(r, _)| *r == rank).unwrap_or(0);
        }

        // 3. Lock in order. Dropping `held` unlocks everything (direct cells
        //    with their original values unless committed).
        let mut held: Vec<Held<'_>> = Vec::with_capacity(locks.len());
        for (_, obj) in &locks {
            held.push(match *obj {
                LockObj::Cell(cell) => Held::Cell(HeldCell {
                    value: cell.lock(),
                    cell,
                }),
                LockObj::Shard(l, hash) => Held::Shard(l.lock_shard(hash)),
            });
        }

        // 4. Shard times, then load every cell.
        for (i, part) in parts.iter().enumerate() {
            if let Target::Keyed(..) = part.target
                && let Held::Shard(shard) = &mut held[plans[i].lock]
            {
                plans[i].now = shard.observe(plans[i].now);
            }
        }
        let mut present = vec![true; cells.len()];
        let mut values: Vec<u64> = Vec::with_capacity(cells.len());
        for (c, &first) in cells.iter().enumerate() {
            let v = match (&parts[first].target, &held[plans[first].lock]) {
                (Target::Direct(_), Held::Cell(h)) => h.value,
                (Target::Keyed(_, key), Held::Shard(shard)) => {
                    let v = shard.get(plans[first].hash, *key);
                    present[c] = v.is_some();
                    v.unwrap_or(0)
                }
                _ => unreachable!("a part's lock matches its kind"),
            };
            values.push(v);
        }
        let original = values.clone();

        // 5. The pure all-or-nothing step.
        let requests: Vec<CellRequest> = plans
            .iter()
            .map(|p| CellRequest {
                cell: p.cell,
                now: p.now,
                quota: p.quota,
                cost,
            })
            .collect();
        let mut decisions = Vec::with_capacity(parts.len());
        let allowed = gcra::check_all(&mut values, &requests, &mut decisions);

        // 6. Commit: reserve new keys first, then write.
        if allowed && consume {
            let mut reserved: Vec<&dyn ErasedKeyed> = Vec::new();
            for (c, &first) in cells.iter().enumerate() {
                if present[c] || values[c] == original[c] {
                    continue;
                }
                let Target::Keyed(l, _) = parts[first].target else {
                    continue;
                };
                let mut ok = l.try_reserve();
                if !ok && let Held::Shard(shard) = &mut held[plans[first].lock] {
                    l.release(shard.sweep(plans[first].now, SWEEP_AT_CAP));
                    ok = l.try_reserve();
                }
                if !ok {
                    for r in reserved {
                        r.release(1);
                    }
                    l.metrics().key_cap();
                    return Err(l.full_error());
                }
                reserved.push(l);
            }
            for (c, &first) in cells.iter().enumerate() {
                if values[c] == original[c] {
                    continue;
                }
                match (&parts[first].target, &mut held[plans[first].lock]) {
                    (Target::Direct(_), Held::Cell(h)) => h.value = values[c],
                    (Target::Keyed(l, key), Held::Shard(shard)) => {
                        let dropped =
                            shard.set(plans[first].hash, *key, values[c], plans[first].now);
                        l.release(dropped);
                    }
                    _ => unreachable!("a part's lock matches its kind"),
                }
            }
        }
        drop(held);
        if consume {
            record(parts, allowed, &decisions);
        }

        let named: Vec<(&'static str, Decision)> = parts
            .iter()
            .zip(decisions)
            .map(|(p, d)| (p.name, d))
            .collect();
        debug_assert_eq!(allowed, named.iter().all(|(_, d)| d.allowed()));
        Ok(MultiDecision::from_parts(named))
    }
}

/// Records a consuming check once per distinct limiter: admitted when the
/// check allowed, denied for each limiter with a part that denied.
fn record(parts: &[Part<'_>], allowed: bool, decisions: &[Decision]) {
    let id = |p: &Part<'_>| match p.target {
        Target::Direct(l) => l.id(),
        Target::Keyed(l, _) => l.id(),
    };
    for (i, part) in parts.iter().enumerate() {
        if parts[..i].iter().any(|q| id(q) == id(part)) {
            continue;
        }
        let metrics = match part.target {
            Target::Direct(l) => l.metrics(),
            Target::Keyed(l, _) => l.metrics(),
        };
        if allowed {
            metrics.admitted();
        } else if parts
            .iter()
            .zip(decisions)
            .any(|(q, d)| id(q) == id(part) && d.denied())
        {
            metrics.denied();
        }
    }
}

struct Plan {
    quota: Quota,
    hash: u64,
    now: u64,
    lock: usize,
    cell: usize,
}

#[derive(Clone, Copy)]
enum LockObj<'a> {
    Cell(&'a TatCell),
    Shard(&'a dyn ErasedKeyed, u64),
}

enum Held<'a> {
    Cell(HeldCell<'a>),
    Shard(Box<dyn LockedShard + 'a>),
}

/// A direct cell whose lock bit we hold; unlocks with `value` on drop.
struct HeldCell<'a> {
    cell: &'a TatCell,
    value: u64,
}

impl Drop for HeldCell<'_> {
    fn drop(&mut self) {
        self.cell.unlock(self.value);
    }
}

fn same_cell(a: &Part<'_>, b: &Target<'_>, hash_a: u64, hash_b: u64) -> bool {
    match (a.target, *b) {
        (Target::Direct(x), Target::Direct(y)) => x.id() == y.id(),
        (Target::Keyed(x, ka), Target::Keyed(y, kb)) => {
            x.id() == y.id() && hash_a == hash_b && x.same_key(ka, kb)
        }
        _ => false,
    }
}

/// The outcome of a [`MultiLimit`] check.
///
/// ```
/// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
/// let a = RateLimiter::new(Quota::per_minute(10)?);
/// let b = RateLimiter::new(Quota::per_minute(3)?);
/// let d = MultiLimit::new().direct("a", &a).direct("b", &b).check()?;
/// assert!(d.allowed());
/// assert_eq!(d.remaining(), 2, "the tightest limit");
/// assert_eq!(d.get("a").map(|x| x.remaining()), Some(9));
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct MultiDecision {
    allowed: bool,
    parts: Vec<(&'static str, Decision)>,
    denied_by: Option<usize>,
}

impl MultiDecision {
    /// Assembles a decision from per-limit decisions (all allowed, or the
    /// denying limit with the longest `retry_after`; the first on ties).
    /// Shared by the in-memory and Redis multi-limits.
    pub(crate) fn from_parts(parts: Vec<(&'static str, Decision)>) -> Self {
        let allowed = parts.iter().all(|(_, d)| d.allowed());
        let denied_by = if allowed {
            None
        } else {
            parts
                .iter()
                .enumerate()
                .filter(|(_, (_, d))| d.denied())
                .max_by(|(ia, (_, a)), (ib, (_, b))| {
                    a.retry_after_nanos()
                        .cmp(&b.retry_after_nanos())
                        .then(ib.cmp(ia))
                })
                .map(|(i, _)| i)
        };
        MultiDecision {
            allowed,
            parts,
            denied_by,
        }
    }

    /// Whether every limit allowed (and all were consumed).
    ///
    /// ```
    /// assert!(raceguard::rate::MultiLimit::new().check()?.allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn allowed(&self) -> bool {
        self.allowed
    }

    /// `!allowed()`: some limit denied and **nothing** was consumed.
    ///
    /// ```
    /// assert!(!raceguard::rate::MultiLimit::new().check()?.denied());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn denied(&self) -> bool {
        !self.allowed
    }

    /// The name of the denying limit with the longest `retry_after` (the
    /// first such limit on ties); `None` when allowed.
    ///
    /// ```
    /// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
    /// let a = RateLimiter::new(Quota::per_minute(1)?);
    /// a.check();
    /// assert_eq!(MultiLimit::new().direct("a", &a).check()?.denied_by(), Some("a"));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn denied_by(&self) -> Option<&'static str> {
        self.denied_by.map(|i| self.parts[i].0)
    }

    /// Zero when allowed; otherwise the longest `retry_after` among the
    /// denying limits: the request cannot pass before then.
    ///
    /// ```
    /// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
    /// let a = RateLimiter::new(Quota::per_minute(1)?);
    /// a.check();
    /// let d = MultiLimit::new().direct("a", &a).check()?;
    /// assert!(d.retry_after().as_secs() > 50);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn retry_after(&self) -> Duration {
        self.denied_by
            .map_or(Duration::ZERO, |i| self.parts[i].1.retry_after())
    }

    /// The smallest `remaining` over all limits (what a `RateLimit-Remaining`
    /// header should show); `u32::MAX` for an empty set.
    ///
    /// ```
    /// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
    /// let a = RateLimiter::new(Quota::per_minute(5)?);
    /// assert_eq!(MultiLimit::new().direct("a", &a).check()?.remaining(), 4);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn remaining(&self) -> u32 {
        self.parts
            .iter()
            .map(|(_, d)| d.remaining())
            .min()
            .unwrap_or(u32::MAX)
    }

    /// The decision that governs: when denied, the denying limit's (the one
    /// with the longest `retry_after`); when allowed, the limit with the
    /// fewest cells left (the first on ties). `None` for an empty set. This
    /// is what a caller that wants one [`Decision`] (the [`Limit`] trait, a
    /// work queue's workers) sees.
    ///
    /// [`Limit`]: super::Limit
    ///
    /// ```
    /// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
    /// let per_second = RateLimiter::new(Quota::per_second(10)?);
    /// let per_minute = RateLimiter::new(Quota::per_minute(3)?);
    /// let check = || MultiLimit::new().direct("s", &per_second).direct("m", &per_minute).check();
    /// assert_eq!(check()?.binding().map(|d| d.remaining()), Some(2)); // the minute limit binds
    /// check()?;
    /// check()?;
    /// let denied = check()?.binding().unwrap();
    /// assert!(denied.denied() && denied.retry_after().as_secs() >= 19);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn binding(&self) -> Option<Decision> {
        match self.denied_by {
            Some(i) => Some(self.parts[i].1),
            None => self
                .parts
                .iter()
                .enumerate()
                .min_by_key(|(i, (_, d))| (d.remaining(), *i))
                .map(|(_, (_, d))| *d),
        }
    }

    /// Each limit's own decision, in the order the limits were added. When
    /// the multi-limit check was denied, an `allowed` entry means that limit
    /// alone would have admitted the request; nothing was consumed.
    ///
    /// ```
    /// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
    /// let a = RateLimiter::new(Quota::per_minute(5)?);
    /// let d = MultiLimit::new().direct("a", &a).check()?;
    /// let (name, first) = d.decisions()[0];
    /// assert_eq!((name, first.remaining()), ("a", 4));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn decisions(&self) -> &[(&'static str, Decision)] {
        &self.parts
    }

    /// The decision of the first limit named `name`.
    ///
    /// ```
    /// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
    /// let a = RateLimiter::new(Quota::per_minute(5)?);
    /// let d = MultiLimit::new().direct("a", &a).check()?;
    /// assert!(d.get("a").is_some() && d.get("b").is_none());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn get(&self, name: &str) -> Option<Decision> {
        self.parts.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)
    }

    /// `Ok(self)` when allowed, otherwise [`Error::RateLimited`] naming the
    /// denying limit with the longest `retry_after`.
    ///
    /// ```
    /// use raceguard::rate::{MultiLimit, Quota, RateLimiter};
    /// let a = RateLimiter::new(Quota::per_minute(1)?);
    /// MultiLimit::new().direct("global", &a).check()?.into_result()?;
    /// let err = MultiLimit::new().direct("global", &a).check()?.into_result().unwrap_err();
    /// assert!(err.to_string().starts_with("rate limited by global"));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::RateLimited`] when the decision is a denial.
    pub fn into_result(self) -> Result<MultiDecision> {
        match self.denied_by {
            None => Ok(self),
            Some(i) => Err(Error::RateLimited {
                limit: self.parts[i].0.into(),
                retry_after: self.parts[i].1.retry_after(),
            }),
        }
    }
}

impl fmt::Debug for MultiDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiDecision")
            .field("allowed", &self.allowed)
            .field("denied_by", &self.denied_by())
            .field("retry_after", &self.retry_after())
            .field("parts", &self.parts)
            .finish()
    }
}

/// An owned, shareable set of global limits checked all or nothing: the
/// [`MultiLimit`] for places that must own their limits, such as a
/// [`WorkQueue`](crate::queue::WorkQueue) whose workers obey an external
/// API's per-second **and** per-day quota. It holds the limiters in `Arc`s
/// (so the same limiters can also be checked elsewhere) and implements
/// [`Limit`](super::Limit) with the [binding](MultiDecision::binding)
/// decision.
///
/// ```
/// use std::sync::Arc;
/// use raceguard::rate::{AllOf, Quota, RateLimiter};
///
/// let per_second = Arc::new(RateLimiter::new(Quota::per_second(10)?));
/// let per_day = Arc::new(RateLimiter::new(Quota::per_day(2)?));
/// let api = AllOf::new("per-second", per_second.clone()).and("per-day", per_day);
/// assert!(api.check()?.allowed());
/// assert!(api.check()?.allowed());
/// let d = api.check()?;
/// assert_eq!(d.denied_by(), Some("per-day"));
/// // The denied check took nothing from the per-second limit.
/// assert_eq!(per_second.peek_n(0)?.remaining(), 8);
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone)]
pub struct AllOf<C: Clock = crate::clock::SystemClock> {
    parts: Vec<(&'static str, std::sync::Arc<RateLimiter<C>>)>,
}

impl<C: Clock> fmt::Debug for AllOf<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.parts.iter().map(|(name, _)| name))
            .finish()
    }
}

impl<C: Clock> AllOf<C> {
    /// A set with one limit (a set is never empty).
    pub fn new(name: &'static str, limiter: std::sync::Arc<RateLimiter<C>>) -> Self {
        AllOf {
            parts: vec![(name, limiter)],
        }
    }

    /// Adds a limit.
    #[must_use]
    pub fn and(mut self, name: &'static str, limiter: std::sync::Arc<RateLimiter<C>>) -> Self {
        self.parts.push((name, limiter));
        self
    }

    fn multi(&self) -> MultiLimit<'_> {
        self.parts
            .iter()
            .fold(MultiLimit::new(), |m, (name, l)| m.direct(name, l))
    }

    /// Takes one cell of every limit, or none.
    ///
    /// # Errors
    ///
    /// As [`MultiLimit::check`].
    pub fn check(&self) -> Result<MultiDecision> {
        self.multi().check()
    }

    /// Takes `n` cells of every limit, or none.
    ///
    /// # Errors
    ///
    /// As [`MultiLimit::check_n`].
    pub fn check_n(&self, n: u32) -> Result<MultiDecision> {
        self.multi().check_n(n)
    }

    /// What `check_n(n)` would decide now, consuming nothing.
    ///
    /// # Errors
    ///
    /// As [`MultiLimit::peek_n`].
    pub fn peek_n(&self, n: u32) -> Result<MultiDecision> {
        self.multi().peek_n(n)
    }
}
