//! Time sources.
//!
//! Every time-dependent primitive in raceguard takes a [`Clock`] instead of
//! reading the system time itself, so tests drive time by hand with a
//! [`ManualClock`] (no `sleep` in tests) and production code uses the
//! monotonic [`SystemClock`].
//!
//! Time is a `u64` count of nanoseconds from a clock-specific origin: enough
//! for 584 years, cheap to compare and to store in one atomic, and the unit
//! the pure algorithm cores (GCRA, lock validity) compute in.
//!
//! ```
//! use std::time::Duration;
//! use raceguard::clock::{Clock, ManualClock};
//!
//! let clock = ManualClock::new();
//! let t0 = clock.now_nanos();
//! clock.advance(Duration::from_millis(250));
//! assert_eq!(clock.now_nanos() - t0, 250_000_000);
//! ```

use std::fmt;
use std::time::{Duration, Instant};

use crate::sync::Arc;
use crate::sync::atomic::{AtomicU64, Ordering};

/// A monotonic source of nanoseconds.
///
/// Implementations must be cheap (a check in a rate limiter reads the clock
/// once) and must be monotonic: a value never decreases between two calls
/// observed in order. [`ManualClock::set`] can break that on purpose, to test
/// that primitives stay safe when a clock misbehaves.
pub trait Clock: Send + Sync + 'static {
    /// Nanoseconds since this clock's origin.
    fn now_nanos(&self) -> u64;

    /// The current time as a [`Duration`] since this clock's origin.
    ///
    /// ```
    /// use raceguard::clock::{Clock, ManualClock};
    /// let clock = ManualClock::starting_at(std::time::Duration::from_secs(3));
    /// assert_eq!(clock.now().as_secs(), 3);
    /// ```
    fn now(&self) -> Duration {
        Duration::from_nanos(self.now_nanos())
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now_nanos(&self) -> u64 {
        (**self).now_nanos()
    }
}

impl<C: Clock + ?Sized> Clock for Box<C> {
    fn now_nanos(&self) -> u64 {
        (**self).now_nanos()
    }
}

/// The system's monotonic clock ([`std::time::Instant`]), counted from the
/// moment the `SystemClock` was created.
///
/// Cloning keeps the origin, so clones agree with each other. Two clocks
/// created separately have different origins: give every primitive that
/// compares times the same clock (or clones of it).
///
/// ```
/// use raceguard::clock::{Clock, SystemClock};
/// let clock = SystemClock::new();
/// let a = clock.now_nanos();
/// let b = clock.clone().now_nanos();
/// assert!(b >= a);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }

    /// A clock whose origin is `origin`.
    ///
    /// ```
    /// use raceguard::clock::{Clock, SystemClock};
    /// let start = std::time::Instant::now();
    /// let clock = SystemClock::with_origin(start);
    /// assert!(clock.now() <= start.elapsed());
    /// ```
    pub fn with_origin(origin: Instant) -> Self {
        SystemClock { origin }
    }

    /// The instant this clock counts from.
    pub fn origin(&self) -> Instant {
        self.origin
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        // u64 nanoseconds overflow after 584 years of uptime; saturate rather
        // than wrap so time can never appear to go backwards.
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that only moves when told to. Clones share the same time.
///
/// For tests: advance it between steps instead of sleeping, so that
/// time-dependent behaviour is exact and repeatable.
///
/// ```
/// use std::time::Duration;
/// use raceguard::clock::{Clock, ManualClock};
///
/// let clock = ManualClock::new();
/// let seen_by_limiter = clock.clone();
/// clock.advance(Duration::from_secs(1));
/// assert_eq!(seen_by_limiter.now(), Duration::from_secs(1));
/// ```
#[derive(Clone)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> Self {
        Self::starting_at(Duration::ZERO)
    }

    /// A clock at `start`.
    pub fn starting_at(start: Duration) -> Self {
        ManualClock {
            nanos: Arc::new(AtomicU64::new(saturating_nanos(start))),
        }
    }

    /// Moves the clock forward by `by` (saturating at `u64::MAX` ns) and
    /// returns the new time in nanoseconds.
    ///
    /// Concurrent advances add up: two threads advancing by 1 s each move
    /// the clock by exactly 2 s.
    pub fn advance(&self, by: Duration) -> u64 {
        let by = saturating_nanos(by);
        let mut cur = self.nanos.load(Ordering::Acquire);
        loop {
            let next = cur.saturating_add(by);
            match self
                .nanos
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return next,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Sets the clock to `at` nanoseconds, **even backwards**.
    ///
    /// A real monotonic clock never goes backwards, but wall clocks, other
    /// machines' clocks and buggy time sources do; tests use this to check
    /// that a primitive stays safe (for example that a rate limiter admits no
    /// extra cells) when time jumps back.
    pub fn set(&self, at: Duration) {
        self.nanos.store(saturating_nanos(at), Ordering::Release);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock")
            .field("nanos", &self.nanos.load(Ordering::Acquire))
            .finish()
    }
}

impl Clock for ManualClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        self.nanos.load(Ordering::Acquire)
    }
}

fn saturating_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(all(test, not(raceguard_loom)))]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_advances_and_saturates() {
        let c = ManualClock::new();
        assert_eq!(c.now_nanos(), 0);
        assert_eq!(c.advance(Duration::from_nanos(5)), 5);
        c.advance(Duration::MAX);
        assert_eq!(c.now_nanos(), u64::MAX);
        c.set(Duration::from_nanos(7));
        assert_eq!(c.now_nanos(), 7, "set may move backwards on purpose");
    }

    #[test]
    fn concurrent_advances_add_up() {
        let c = ManualClock::new();
        std::thread::scope(|s| {
            for _ in 0..4 {
                let c = c.clone();
                s.spawn(move || {
                    for _ in 0..10_000 {
                        c.advance(Duration::from_nanos(1));
                    }
                });
            }
        });
        assert_eq!(c.now_nanos(), 40_000);
    }

    #[test]
    fn system_clock_is_monotonic() {
        let c = SystemClock::new();
        let mut last = c.now_nanos();
        for _ in 0..10_000 {
            let now = c.now_nanos();
            assert!(now >= last);
            last = now;
        }
    }

    #[test]
    fn clock_through_arc_and_box() {
        let c = ManualClock::starting_at(Duration::from_secs(2));
        let a: std::sync::Arc<dyn Clock> = std::sync::Arc::new(c.clone());
        let b: Box<dyn Clock> = Box::new(c.clone());
        assert_eq!(a.now(), Duration::from_secs(2));
        assert_eq!(b.now(), Duration::from_secs(2));
    }
}
