//! [`Decision`]: what a rate limiter said, with everything a caller needs
//! for `RateLimit-*` and `Retry-After` headers.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use crate::{Error, Result};

/// The outcome of one check: allowed or not, and the limiter's state right
/// after it.
///
/// - [`limit`](Decision::limit): the quota's burst.
/// - [`remaining`](Decision::remaining): how many more cost-1 checks would
///   be admitted right now, after this decision (`0..=limit`).
/// - [`retry_after`](Decision::retry_after): zero when allowed; otherwise
///   the time until **this same request** (same cost) would be admitted, if
///   nothing else consumes in between.
/// - [`reset_after`](Decision::reset_after): the time until the limiter is
///   full again (`remaining == limit`) if nothing else consumes.
///
/// The derived values are computed on demand from four integers, so a check
/// that only looks at [`allowed`](Decision::allowed) pays for no division.
///
/// ```
/// use raceguard::clock::ManualClock;
/// use raceguard::rate::{Quota, RateLimiter};
///
/// let limiter = RateLimiter::with_clock(Quota::per_second(2)?, ManualClock::new());
/// let d = limiter.check();
/// assert!(d.allowed());
/// assert_eq!((d.limit(), d.remaining()), (2, 1));
/// assert_eq!(d.reset_after().as_millis(), 500);
///
/// limiter.check();
/// let d = limiter.check();
/// assert!(!d.allowed());
/// assert_eq!(d.remaining(), 0);
/// assert_eq!(d.retry_after().as_millis(), 500);
/// assert_eq!(d.reset_after().as_millis(), 1000);
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decision {
    allowed: bool,
    limit: u32,
    interval: u64,
    /// `TAT - now` after the decision (saturating): the consumed part of the
    /// window.
    backlog: u64,
    retry_after: u64,
}

impl Decision {
    #[inline]
    pub(crate) const fn new(
        allowed: bool,
        limit: u32,
        interval: u64,
        backlog: u64,
        retry_after: u64,
    ) -> Self {
        Decision {
            allowed,
            limit,
            interval,
            backlog,
            retry_after,
        }
    }

    /// Whether the request was admitted (its cells were consumed, unless
    /// this came from a `peek`).
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::new(Quota::per_second(1)?);
    /// assert!(limiter.check().allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub const fn allowed(&self) -> bool {
        self.allowed
    }

    /// `!allowed()`.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # use raceguard::clock::ManualClock;
    /// let limiter = RateLimiter::with_clock(Quota::per_second(1)?, ManualClock::new());
    /// limiter.check();
    /// assert!(limiter.check().denied());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub const fn denied(&self) -> bool {
        !self.allowed
    }

    /// The quota's burst: the most cells ever available at once.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::new(Quota::per_minute(30)?);
    /// assert_eq!(limiter.peek().limit(), 30);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub const fn limit(&self) -> u32 {
        self.limit
    }

    /// How many cost-1 checks would be admitted right now, after this
    /// decision: `floor((window - backlog) / interval)`, between 0 and
    /// [`limit`](Decision::limit).
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # use raceguard::clock::ManualClock;
    /// let limiter = RateLimiter::with_clock(Quota::per_minute(30)?, ManualClock::new());
    /// assert_eq!(limiter.check_n(10)?.remaining(), 20);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub const fn remaining(&self) -> u32 {
        let window = self.interval * self.limit as u64;
        if self.backlog >= window {
            0
        } else {
            // <= window / interval == limit: fits u32.
            ((window - self.backlog) / self.interval) as u32
        }
    }

    /// Zero when allowed; otherwise how long until this same request would
    /// be admitted if nothing else consumes in between.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # use raceguard::clock::ManualClock;
    /// let limiter = RateLimiter::with_clock(Quota::per_second(10)?, ManualClock::new());
    /// limiter.check_n(10)?;
    /// assert_eq!(limiter.check_n(3)?.retry_after().as_millis(), 300);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub const fn retry_after(&self) -> Duration {
        Duration::from_nanos(self.retry_after)
    }

    /// [`retry_after`](Decision::retry_after) in nanoseconds.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let limiter = RateLimiter::new(Quota::per_second(10)?);
    /// assert_eq!(limiter.check().retry_after_nanos(), 0);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub const fn retry_after_nanos(&self) -> u64 {
        self.retry_after
    }

    /// How long until the limiter is full again (`remaining() == limit()`)
    /// if nothing else consumes. At most the quota's window under a
    /// monotonic clock.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # use raceguard::clock::ManualClock;
    /// let limiter = RateLimiter::with_clock(Quota::per_second(10)?, ManualClock::new());
    /// assert_eq!(limiter.check_n(4)?.reset_after().as_millis(), 400);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub const fn reset_after(&self) -> Duration {
        Duration::from_nanos(self.backlog)
    }

    /// [`reset_after`](Decision::reset_after) in nanoseconds.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # use raceguard::clock::ManualClock;
    /// let limiter = RateLimiter::with_clock(Quota::per_second(10)?, ManualClock::new());
    /// assert_eq!(limiter.check().reset_after_nanos(), 100_000_000);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub const fn reset_after_nanos(&self) -> u64 {
        self.backlog
    }

    /// `Ok(self)` when allowed, otherwise [`Error::RateLimited`] naming
    /// `limit` and carrying [`retry_after`](Decision::retry_after), for `?`
    /// in handlers.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # use raceguard::clock::ManualClock;
    /// let limiter = RateLimiter::with_clock(Quota::per_second(1)?, ManualClock::new());
    /// limiter.check().into_result("api")?;
    /// let err = limiter.check().into_result("api").unwrap_err();
    /// assert_eq!(err.retry_after(), Some(std::time::Duration::from_secs(1)));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::RateLimited`] when the decision is a denial.
    pub fn into_result(self, limit: impl Into<Cow<'static, str>>) -> Result<Decision> {
        if self.allowed {
            Ok(self)
        } else {
            Err(Error::RateLimited {
                limit: limit.into(),
                retry_after: self.retry_after(),
            })
        }
    }
}

impl fmt::Debug for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decision")
            .field("allowed", &self.allowed)
            .field("limit", &self.limit)
            .field("remaining", &self.remaining())
            .field("retry_after", &self.retry_after())
            .field("reset_after", &self.reset_after())
            .finish()
    }
}
