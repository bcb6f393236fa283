//! [`RateLimiter`]: one global limit whose whole state is one atomic word.
//!
//! Invariants:
//!
//! - The state is one `AtomicU64`: the theoretical arrival time (bits 0–62,
//!   never above [`MAX_NANOS`]) and a lock bit (bit 63) that only multi-limit
//!   checks set.
//! - A check that consumes does exactly one successful compare-and-swap of
//!   the value it based its decision on; a check that denies, and every
//!   peek, does one load and no write. So each admission is decided on the
//!   latest state, and no two checks consume the same cell.
//! - The TAT never decreases: a consuming CAS writes `max(tat, now) + cost ×
//!   T`, and a multi-limit check that denies writes back the value it locked.
//! - The lock bit is held by one multi-limit check for a bounded computation
//!   with no user code and no `await` in it. A consuming check that meets it
//!   spins (then yields) until it clears. A denying or peeking check does not
//!   wait: the bits below the lock are the state before the multi-limit
//!   check commits, and the denial is linearised before that commit.

use std::time::Duration;

use super::gcra::{self, MAX_NANOS};
use super::metrics::RateMetrics;
use super::wait::{self, DirectQueue, WaitConfig};
use super::{Decision, Quota, validate_cost};
use crate::Result;
use crate::clock::{Clock, SystemClock};
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{hint, next_id, thread};

const LOCKED: u64 = 1 << 63;

/// One GCRA cell on an atomic, lockable by multi-limit checks.
#[derive(Debug)]
pub(crate) struct TatCell(AtomicU64);

impl TatCell {
    pub(crate) fn new() -> Self {
        TatCell(AtomicU64::new(0))
    }

    /// Decides and, when allowed, consumes with one successful CAS.
    /// `cost <= quota.burst()` (validated by the caller).
    #[inline]
    pub(crate) fn check(&self, now: u64, quota: Quota, cost: u32) -> Decision {
        let need = quota.interval_nanos() * u64::from(cost);
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let (d, next) = gcra::decide_within_burst(cur & !LOCKED, now, quota, need, cost);
            let Some(next) = next else {
                return d;
            };
            if cur & LOCKED != 0 {
                cur = self.wait_unlocked();
                continue;
            }
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return d,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Spins (then yields) while a multi-limit check holds the lock bit;
    /// returns the unlocked value. Out of line: the check's loop stays
    /// free of spin state.
    #[cold]
    #[inline(never)]
    fn wait_unlocked(&self) -> u64 {
        let mut spins = 0;
        loop {
            backoff(&mut spins);
            let cur = self.0.load(Ordering::Acquire);
            if cur & LOCKED == 0 {
                return cur;
            }
        }
    }

    /// Decides without consuming. `cost <= quota.burst()`.
    #[inline]
    pub(crate) fn peek(&self, now: u64, quota: Quota, cost: u32) -> Decision {
        let need = quota.interval_nanos() * u64::from(cost);
        let tat = self.0.load(Ordering::Acquire) & !LOCKED;
        gcra::decide_within_burst(tat, now, quota, need, cost).0
    }

    /// Takes the lock bit (spinning while another multi-limit check holds
    /// it) and returns the TAT.
    pub(crate) fn lock(&self) -> u64 {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            if cur & LOCKED != 0 {
                cur = self.wait_unlocked();
                continue;
            }
            match self.0.compare_exchange_weak(
                cur,
                cur | LOCKED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return cur,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Stores `tat` and releases the lock bit.
    pub(crate) fn unlock(&self, tat: u64) {
        debug_assert!(tat <= MAX_NANOS);
        self.0.store(tat & !LOCKED, Ordering::Release);
    }
}

#[inline]
fn backoff(spins: &mut u32) {
    if *spins < 32 {
        hint::spin_loop();
    } else {
        thread::yield_now();
    }
    *spins = spins.saturating_add(1);
}

/// One global rate limit (for example the outbound throttle in front of an
/// external API that all requests share).
///
/// The state is one atomic integer: a `check` costs one clock read, one load
/// and, when it admits, one compare-and-swap; a denial writes nothing. Share
/// it by reference or in an `Arc`.
///
/// ```
/// use std::time::Duration;
/// use raceguard::clock::ManualClock;
/// use raceguard::rate::{Quota, RateLimiter};
///
/// let clock = ManualClock::new();
/// let limiter = RateLimiter::with_clock(Quota::per_second(2)?, clock.clone());
/// assert!(limiter.check().allowed());
/// assert!(limiter.check().allowed());
/// let denied = limiter.check();
/// assert!(denied.denied());
/// assert_eq!(denied.retry_after(), Duration::from_millis(500));
///
/// clock.advance(Duration::from_millis(500));
/// assert!(limiter.check().allowed());
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Debug)]
pub struct RateLimiter<C = SystemClock> {
    cell: TatCell,
    /// Rank in the lock order of multi-limit checks.
    id: u64,
    quota: Quota,
    clock: C,
    waiters: DirectQueue,
    name: Option<Box<str>>,
    metrics: RateMetrics,
}

impl RateLimiter<SystemClock> {
    /// A limiter on a fresh [`SystemClock`], full (the whole burst is
    /// available).
    ///
    /// ```
    /// use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::new(Quota::per_second(100)?);
    /// assert!(limiter.check().allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn new(quota: Quota) -> Self {
        Self::with_clock(quota, SystemClock::new())
    }

    /// A builder, to set the clock and the waiting bounds.
    ///
    /// ```
    /// use std::time::Duration;
    /// use raceguard::clock::ManualClock;
    /// use raceguard::rate::{Quota, RateLimiter};
    ///
    /// let limiter = RateLimiter::builder(Quota::per_second(5)?)
    ///     .clock(ManualClock::new())
    ///     .max_waiters(64)
    ///     .wait_timeout(Duration::from_secs(2))
    ///     .build();
    /// assert_eq!(limiter.quota().burst(), 5);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn builder(quota: Quota) -> RateLimiterBuilder<SystemClock> {
        RateLimiterBuilder {
            quota,
            clock: SystemClock::new(),
            wait: WaitConfig::default(),
            name: None,
        }
    }
}

impl<C: Clock> RateLimiter<C> {
    /// A full limiter on `clock`.
    ///
    /// ```
    /// use raceguard::clock::ManualClock;
    /// use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::with_clock(Quota::per_minute(1)?, ManualClock::new());
    /// assert!(limiter.check().allowed());
    /// assert!(limiter.check().denied());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn with_clock(quota: Quota, clock: C) -> Self {
        RateLimiter {
            cell: TatCell::new(),
            id: next_id(),
            quota,
            clock,
            waiters: DirectQueue::new(WaitConfig::default()),
            name: None,
            metrics: RateMetrics::new(None),
        }
    }

    /// Checks one cell at the clock's current time, consuming it when
    /// allowed.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::new(Quota::per_second(1)?);
    /// assert!(limiter.check().allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub fn check(&self) -> Decision {
        let d = self.cell.check(self.clock.now_nanos(), self.quota, 1);
        self.metrics.decision(&d);
        d
    }

    /// Checks `n` cells at once (all or none).
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # use raceguard::clock::ManualClock;
    /// let limiter = RateLimiter::with_clock(Quota::per_second(10)?, ManualClock::new());
    /// assert!(limiter.check_n(7)?.allowed());
    /// assert!(limiter.check_n(4)?.denied()); // only 3 left: nothing consumed
    /// assert!(limiter.check_n(3)?.allowed());
    /// assert!(limiter.check_n(11).is_err()); // can never fit
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) when `n` exceeds
    /// the burst: such a request could never be admitted.
    #[inline]
    pub fn check_n(&self, n: u32) -> Result<Decision> {
        self.check_n_at(n, self.clock.now_nanos())
    }

    /// The decision [`check`](RateLimiter::check) would return now, without
    /// consuming anything.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::new(Quota::per_second(1)?);
    /// assert!(limiter.peek().allowed());
    /// assert!(limiter.peek().allowed(), "peeking consumed nothing");
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub fn peek(&self) -> Decision {
        self.cell.peek(self.clock.now_nanos(), self.quota, 1)
    }

    /// The decision [`check_n`](RateLimiter::check_n) would return now,
    /// without consuming. `peek_n(0)` reports the current `remaining`.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # use raceguard::clock::ManualClock;
    /// let limiter = RateLimiter::with_clock(Quota::per_second(10)?, ManualClock::new());
    /// limiter.check_n(4)?;
    /// assert_eq!(limiter.peek_n(0)?.remaining(), 6);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) when `n` exceeds
    /// the burst.
    pub fn peek_n(&self, n: u32) -> Result<Decision> {
        self.peek_n_at(n, self.clock.now_nanos())
    }

    /// [`check`](RateLimiter::check) at a timestamp the caller already holds
    /// (nanoseconds on this limiter's clock, e.g. one `limiter.clock()`
    /// read shared by several checks), saving the clock read.
    ///
    /// A timestamp older than one already used is safe: it can only make the
    /// decision stricter.
    ///
    /// ```
    /// use raceguard::clock::Clock;
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::new(Quota::per_second(10)?);
    /// let now = limiter.clock().now_nanos();
    /// assert!(limiter.check_at(now).allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub fn check_at(&self, now_nanos: u64) -> Decision {
        let d = self.cell.check(now_nanos, self.quota, 1);
        self.metrics.decision(&d);
        d
    }

    /// [`check_n`](RateLimiter::check_n) at a caller-provided timestamp.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # use raceguard::clock::ManualClock;
    /// let limiter = RateLimiter::with_clock(Quota::per_second(2)?, ManualClock::new());
    /// assert!(limiter.check_n_at(2, 0)?.allowed());
    /// assert!(limiter.check_n_at(1, 0)?.denied());
    /// assert!(limiter.check_n_at(1, 500_000_000)?.allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) when `n` exceeds
    /// the burst.
    #[inline]
    pub fn check_n_at(&self, n: u32, now_nanos: u64) -> Result<Decision> {
        validate_cost(n, self.quota)?;
        let d = self.cell.check(now_nanos, self.quota, n);
        self.metrics.decision(&d);
        Ok(d)
    }

    /// [`peek`](RateLimiter::peek) at a caller-provided timestamp.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # use raceguard::clock::ManualClock;
    /// let limiter = RateLimiter::with_clock(Quota::per_second(1)?, ManualClock::new());
    /// limiter.check();
    /// assert!(limiter.peek_at(0).denied());
    /// assert!(limiter.peek_at(1_000_000_000).allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub fn peek_at(&self, now_nanos: u64) -> Decision {
        self.cell.peek(now_nanos, self.quota, 1)
    }

    /// [`peek_n`](RateLimiter::peek_n) at a caller-provided timestamp.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # use raceguard::clock::ManualClock;
    /// let limiter = RateLimiter::with_clock(Quota::per_second(4)?, ManualClock::new());
    /// assert!(limiter.peek_n_at(4, 0)?.allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) when `n` exceeds
    /// the burst.
    pub fn peek_n_at(&self, n: u32, now_nanos: u64) -> Result<Decision> {
        validate_cost(n, self.quota)?;
        Ok(self.cell.peek(now_nanos, self.quota, n))
    }

    /// The quota.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let q = Quota::per_second(3)?;
    /// assert_eq!(RateLimiter::new(q).quota(), q);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// The clock, e.g. to read one timestamp for several `*_at` calls.
    ///
    /// ```
    /// use raceguard::clock::{Clock, ManualClock};
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::with_clock(Quota::per_second(3)?, ManualClock::new());
    /// assert_eq!(limiter.clock().now_nanos(), 0);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// How many callers are queued in [`acquire`](RateLimiter::acquire) /
    /// [`until_ready`](RateLimiter::until_ready) right now.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// assert_eq!(RateLimiter::new(Quota::per_second(3)?).waiters(), 0);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn waiters(&self) -> usize {
        self.waiters.len()
    }

    /// Waits, in FIFO order with the other waiters, until one cell is
    /// admitted, for at most the limiter's wait timeout (30 s unless set in
    /// the builder).
    ///
    /// Dropping the future (cancellation, a `select!` that lost, a handler
    /// that timed out) consumes nothing and removes the caller from the
    /// queue at once, waking the next waiter if it was first.
    ///
    /// ```
    /// use raceguard::rate::{Quota, RateLimiter, TokioClock};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let limiter = RateLimiter::with_clock(Quota::per_second(1)?, TokioClock::new());
    /// let start = tokio::time::Instant::now();
    /// limiter.until_ready().await?; // at once
    /// limiter.until_ready().await?; // one (paused, auto-advanced) second later
    /// assert!(start.elapsed() >= std::time::Duration::from_secs(1));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// - [`Error::CapacityExceeded`](crate::Error::CapacityExceeded) at once
    ///   when the queue already holds `max_waiters` callers;
    /// - [`Error::Timeout`](crate::Error::Timeout) when no cell is admitted
    ///   by the deadline (returned early as soon as the wait is known to
    ///   reach past it).
    ///
    /// # Panics
    ///
    /// When it has to sleep outside a Tokio runtime with the time driver
    /// enabled.
    pub async fn until_ready(&self) -> Result<Decision> {
        self.acquire_timeout(1, self.waiters.config.timeout).await
    }

    /// Like [`until_ready`](RateLimiter::until_ready) for `n` cells at once.
    ///
    /// Cancellation consumes nothing and frees the caller's place in the
    /// queue.
    ///
    /// ```
    /// use raceguard::rate::{Quota, RateLimiter, TokioClock};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let limiter = RateLimiter::with_clock(Quota::per_second(10)?, TokioClock::new());
    /// let d = limiter.acquire(10).await?;
    /// assert_eq!(d.remaining(), 0);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`until_ready`](RateLimiter::until_ready), plus
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) at once when `n`
    /// exceeds the burst.
    ///
    /// # Panics
    ///
    /// When it has to sleep outside a Tokio runtime with the time driver
    /// enabled.
    pub async fn acquire(&self, n: u32) -> Result<Decision> {
        self.acquire_timeout(n, self.waiters.config.timeout).await
    }

    /// Like [`acquire`](RateLimiter::acquire) with an explicit deadline.
    ///
    /// Cancellation consumes nothing and frees the caller's place in the
    /// queue.
    ///
    /// ```
    /// use std::time::Duration;
    /// use raceguard::ErrorKind;
    /// use raceguard::rate::{Quota, RateLimiter, TokioClock};
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let limiter = RateLimiter::with_clock(Quota::per_minute(1)?, TokioClock::new());
    /// limiter.acquire_timeout(1, Duration::from_secs(1)).await?;
    /// let err = limiter.acquire_timeout(1, Duration::from_secs(1)).await.unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Timeout);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`acquire`](RateLimiter::acquire).
    ///
    /// # Panics
    ///
    /// When it has to sleep outside a Tokio runtime with the time driver
    /// enabled.
    pub async fn acquire_timeout(&self, n: u32, timeout: Duration) -> Result<Decision> {
        validate_cost(n, self.quota)?;
        // Attempts inside the wait are not recorded; its outcome is, once.
        let out = wait::acquire(&self.waiters, timeout, || {
            Ok(self.cell.check(self.clock.now_nanos(), self.quota, n))
        })
        .await;
        self.metrics.outcome(&out);
        out
    }

    /// The name given in [`RateLimiterBuilder::name`], if any.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::builder(Quota::per_second(5)?).name("external-api").build();
    /// assert_eq!(limiter.name(), Some("external-api"));
    /// assert_eq!(RateLimiter::new(Quota::per_second(5)?).name(), None);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub(crate) fn cell(&self) -> &TatCell {
        &self.cell
    }

    pub(crate) fn metrics(&self) -> &RateMetrics {
        &self.metrics
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

/// Builds a [`RateLimiter`] with a chosen clock and waiting bounds.
///
/// ```
/// use raceguard::rate::{Quota, RateLimiter, TokioClock};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), raceguard::Error> {
/// let limiter = RateLimiter::builder(Quota::per_second(20)?)
///     .clock(TokioClock::new())
///     .max_waiters(100)
///     .build();
/// limiter.until_ready().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RateLimiterBuilder<C> {
    quota: Quota,
    clock: C,
    wait: WaitConfig,
    name: Option<String>,
}

impl<C: Clock> RateLimiterBuilder<C> {
    /// Uses `clock` instead of a fresh [`SystemClock`].
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// use raceguard::clock::ManualClock;
    /// let limiter = RateLimiter::builder(Quota::per_second(1)?).clock(ManualClock::new()).build();
    /// # let _ = limiter;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn clock<C2: Clock>(self, clock: C2) -> RateLimiterBuilder<C2> {
        RateLimiterBuilder {
            quota: self.quota,
            clock,
            wait: self.wait,
            name: self.name,
        }
    }

    /// Names the limiter: the `limiter` label of its metrics (feature
    /// `metrics`; `"unnamed"` otherwise) and [`RateLimiter::name`].
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::builder(Quota::per_second(1)?).name("outbound").build();
    /// assert_eq!(limiter.name(), Some("outbound"));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The most callers queued in `until_ready`/`acquire` at once (default
    /// 1,024). Beyond it a caller gets
    /// [`Error::CapacityExceeded`](crate::Error::CapacityExceeded) at once;
    /// 0 means "never queue".
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::builder(Quota::per_second(1)?).max_waiters(0).build();
    /// # let _ = limiter;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn max_waiters(mut self, max_waiters: usize) -> Self {
        self.wait.max_waiters = max_waiters;
        self
    }

    /// The deadline of [`until_ready`](RateLimiter::until_ready) and
    /// [`acquire`](RateLimiter::acquire) (default 30 s).
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::builder(Quota::per_second(1)?)
    ///     .wait_timeout(std::time::Duration::from_millis(200))
    ///     .build();
    /// # let _ = limiter;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait.timeout = timeout;
        self
    }

    /// The limiter, full.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::builder(Quota::per_second(1)?).build();
    /// assert!(limiter.check().allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn build(self) -> RateLimiter<C> {
        RateLimiter {
            cell: TatCell::new(),
            id: next_id(),
            quota: self.quota,
            clock: self.clock,
            waiters: DirectQueue::new(self.wait),
            metrics: RateMetrics::new(self.name.as_deref()),
            name: self.name.map(String::into_boxed_str),
        }
    }
}
