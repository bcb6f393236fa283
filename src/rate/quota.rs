//! [`Quota`]: how many cells per period, and how many at once.

use std::fmt;
use std::time::Duration;

use crate::{Error, Result};

/// The longest window a quota may have (`burst × interval`), in nanoseconds:
/// 2^53 ns, about 104 days.
///
/// Every duration the GCRA core computes from a quota (the window, a
/// backlog after an admission, a `retry_after` under a monotonic clock) is
/// then at most 2^53: it fits an `i64` with a wide margin, and a Lua number
/// (an IEEE double) represents it exactly, which keeps the Redis port of the
/// core exact.
///
/// ```
/// use std::time::Duration;
/// use raceguard::rate::{MAX_WINDOW_NANOS, Quota};
/// let q = Quota::with_interval(Duration::from_nanos(MAX_WINDOW_NANOS))?;
/// assert!(q.with_burst(2).is_err(), "a longer window is rejected");
/// # Ok::<(), raceguard::Error>(())
/// ```
pub const MAX_WINDOW_NANOS: u64 = 1 << 53;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A rate limit: cells are admitted at one per [`interval`](Quota::interval)
/// on average, and up to [`burst`](Quota::burst) cells at once after a quiet
/// period.
///
/// A quota is always valid: the constructors reject zero, rates above one
/// cell per nanosecond (10^9 per second) and windows above
/// [`MAX_WINDOW_NANOS`] with [`Error::InvalidInput`].
///
/// # Rounding
///
/// `Quota::per(cells, period)` sets the interval to `period / cells`
/// **rounded up** to a whole nanosecond, so the effective rate is never above
/// the one asked for. It is below it by less than one nanosecond per cell,
/// a relative error under `1 / interval_nanos`: exact when `cells` divides
/// the period, under 10^-6 for rates up to 1,000 per second, under 0.1% up
/// to 10^6 per second. The burst defaults to `cells`.
///
/// ```
/// use std::time::Duration;
/// use raceguard::rate::Quota;
///
/// let q = Quota::per_minute(30)?;
/// assert_eq!(q.burst(), 30);
/// assert_eq!(q.interval(), Duration::from_secs(2));
/// assert_eq!(q.window(), Duration::from_secs(60));
///
/// // 3 per second: 333,333,334 ns per cell, never faster than asked.
/// let q = Quota::per_second(3)?.with_burst(1)?;
/// assert_eq!(q.interval_nanos(), 333_333_334);
///
/// // Bad configuration is a typed error, never a panic.
/// assert!(Quota::per_second(0).is_err());
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    interval: u64,
    /// `interval × burst`, kept so a check does not multiply.
    window: u64,
    burst: u32,
}

impl Quota {
    /// `cells` per second, burst `cells`.
    ///
    /// ```
    /// let q = raceguard::rate::Quota::per_second(10)?;
    /// assert_eq!(q.interval_nanos(), 100_000_000);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `cells` is 0 or above 10^9.
    pub fn per_second(cells: u32) -> Result<Quota> {
        Self::per(cells, Duration::from_secs(1))
    }

    /// `cells` per minute, burst `cells`.
    ///
    /// ```
    /// let q = raceguard::rate::Quota::per_minute(60)?;
    /// assert_eq!(q.interval(), std::time::Duration::from_secs(1));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `cells` is 0.
    pub fn per_minute(cells: u32) -> Result<Quota> {
        Self::per(cells, Duration::from_secs(60))
    }

    /// `cells` per hour, burst `cells`.
    ///
    /// ```
    /// let q = raceguard::rate::Quota::per_hour(3600)?;
    /// assert_eq!(q.interval(), std::time::Duration::from_secs(1));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `cells` is 0.
    pub fn per_hour(cells: u32) -> Result<Quota> {
        Self::per(cells, Duration::from_secs(3600))
    }

    /// `cells` per day, burst `cells`.
    ///
    /// ```
    /// let q = raceguard::rate::Quota::per_day(1)?;
    /// assert_eq!(q.interval(), std::time::Duration::from_secs(86_400));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `cells` is 0.
    pub fn per_day(cells: u32) -> Result<Quota> {
        Self::per(cells, Duration::from_secs(86_400))
    }

    /// `cells` per `period`, burst `cells`; the interval is `period / cells`
    /// rounded up to a whole nanosecond.
    ///
    /// ```
    /// use std::time::Duration;
    /// let q = raceguard::rate::Quota::per(5, Duration::from_millis(10))?;
    /// assert_eq!(q.interval(), Duration::from_millis(2));
    /// assert_eq!(q.burst(), 5);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `cells` is 0, `period` is zero, the rate
    /// is above one cell per nanosecond, or the window exceeds
    /// [`MAX_WINDOW_NANOS`].
    pub fn per(cells: u32, period: Duration) -> Result<Quota> {
        if cells == 0 {
            return Err(Error::invalid("quota.cells", "must be at least 1"));
        }
        let period_ns = period.as_nanos();
        if period_ns == 0 {
            return Err(Error::invalid("quota.period", "must be positive"));
        }
        if period_ns < u128::from(cells) {
            return Err(Error::invalid(
                "quota",
                format!(
                    "{cells} per {period:?} is faster than one cell per nanosecond \
                     (at most 10^9 per second)"
                ),
            ));
        }
        Self::from_parts(period_ns.div_ceil(u128::from(cells)), cells)
    }

    /// One cell per `interval`, burst 1.
    ///
    /// ```
    /// use std::time::Duration;
    /// let q = raceguard::rate::Quota::with_interval(Duration::from_millis(250))?;
    /// assert_eq!((q.burst(), q.interval()), (1, Duration::from_millis(250)));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `interval` is below 1 ns or above
    /// [`MAX_WINDOW_NANOS`].
    pub fn with_interval(interval: Duration) -> Result<Quota> {
        Self::from_parts(interval.as_nanos(), 1)
    }

    /// The same rate with another burst.
    ///
    /// ```
    /// let q = raceguard::rate::Quota::per_second(100)?.with_burst(10)?;
    /// assert_eq!(q.burst(), 10);
    /// assert_eq!(q.interval_nanos(), 10_000_000);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `burst` is 0 or the window
    /// (`burst × interval`) exceeds [`MAX_WINDOW_NANOS`].
    pub fn with_burst(self, burst: u32) -> Result<Quota> {
        Self::from_parts(u128::from(self.interval), burst)
    }

    fn from_parts(interval: u128, burst: u32) -> Result<Quota> {
        if burst == 0 {
            return Err(Error::invalid("quota.burst", "must be at least 1"));
        }
        if interval == 0 {
            return Err(Error::invalid(
                "quota.interval",
                "must be at least 1 ns (at most 10^9 cells per second)",
            ));
        }
        let window = interval.saturating_mul(u128::from(burst));
        if window > u128::from(MAX_WINDOW_NANOS) {
            return Err(Error::invalid(
                "quota",
                format!(
                    "the window (burst {burst} x interval {interval} ns) exceeds 2^53 ns \
                     (about 104 days)"
                ),
            ));
        }
        Ok(Quota {
            // window <= 2^53 and burst >= 1, so both fit a u64.
            interval: interval as u64,
            window: window as u64,
            burst,
        })
    }

    /// The most cells admitted at once, after a quiet period; also the
    /// `limit` reported by every [`Decision`](crate::rate::Decision).
    ///
    /// ```
    /// assert_eq!(raceguard::rate::Quota::per_hour(7)?.burst(), 7);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub const fn burst(&self) -> u32 {
        self.burst
    }

    /// The time it takes to earn one cell back (the emission interval `T`).
    ///
    /// ```
    /// let q = raceguard::rate::Quota::per_second(4)?;
    /// assert_eq!(q.interval(), std::time::Duration::from_millis(250));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub const fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval)
    }

    /// [`interval`](Quota::interval) in nanoseconds (at least 1).
    ///
    /// ```
    /// assert_eq!(raceguard::rate::Quota::per_second(1_000_000_000)?.interval_nanos(), 1);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub const fn interval_nanos(&self) -> u64 {
        self.interval
    }

    /// `burst × interval`: the time an exhausted limiter takes to refill
    /// completely, and the longest `reset_after` a decision can report under
    /// a monotonic clock.
    ///
    /// ```
    /// let q = raceguard::rate::Quota::per_second(10)?.with_burst(5)?;
    /// assert_eq!(q.window(), std::time::Duration::from_millis(500));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub const fn window(&self) -> Duration {
        Duration::from_nanos(self.window_nanos())
    }

    /// [`window`](Quota::window) in nanoseconds (at most
    /// [`MAX_WINDOW_NANOS`]).
    ///
    /// ```
    /// assert_eq!(raceguard::rate::Quota::per_second(2)?.window_nanos(), 1_000_000_000);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    #[inline]
    pub const fn window_nanos(&self) -> u64 {
        self.window
    }

    /// The long-run rate in cells per second this quota admits
    /// (`10^9 / interval_nanos`), for display.
    ///
    /// ```
    /// let q = raceguard::rate::Quota::per_minute(120)?;
    /// assert_eq!(q.cells_per_second(), 2.0);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn cells_per_second(&self) -> f64 {
        NANOS_PER_SEC as f64 / self.interval as f64
    }
}

impl fmt::Debug for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quota")
            .field("burst", &self.burst)
            .field("interval", &self.interval())
            .finish()
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cells at once, one more every {:?}",
            self.burst,
            self.interval()
        )
    }
}

#[cfg(all(test, not(raceguard_loom)))]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn rounding_is_up_and_tight() {
        for cells in [1u32, 3, 7, 1000, 999_999_937, 1_000_000_000] {
            let q = Quota::per_second(cells).unwrap();
            let t = u128::from(q.interval_nanos());
            let c = u128::from(cells);
            assert!(t * c >= NANOS_PER_SEC, "never faster than asked ({cells})");
            assert!((t - 1) * c < NANOS_PER_SEC, "rounded up by less than 1 ns");
            assert_eq!(q.burst(), cells);
        }
    }

    #[test]
    fn range_from_one_per_day_to_a_billion_per_second() {
        let slow = Quota::per_day(1).unwrap();
        assert_eq!(slow.interval(), Duration::from_secs(86_400));
        assert_eq!(slow.window(), Duration::from_secs(86_400));
        let fast = Quota::per_second(1_000_000_000).unwrap();
        assert_eq!(fast.interval_nanos(), 1);
        assert_eq!(fast.window_nanos(), 1_000_000_000);
        assert_eq!(
            Quota::per_day(1).unwrap().with_burst(104).unwrap().burst(),
            104
        );
        assert_eq!(
            Quota::per_day(1_000).unwrap().window(),
            Duration::from_secs(86_400)
        );
    }

    #[test]
    fn bad_configuration_is_typed() {
        let cases = [
            (Quota::per_second(0), "quota.cells"),
            (Quota::per_second(1_000_000_001), "quota"),
            (Quota::per(1, Duration::ZERO), "quota.period"),
            (Quota::with_interval(Duration::ZERO), "quota.interval"),
            (
                Quota::with_interval(Duration::from_nanos(1))
                    .unwrap()
                    .with_burst(0),
                "quota.burst",
            ),
            (Quota::per_day(1).unwrap().with_burst(105), "quota"),
            (Quota::with_interval(Duration::MAX), "quota"),
            (Quota::per_day(1).unwrap().with_burst(u32::MAX), "quota"),
        ];
        for (res, what) in cases {
            let err = res.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
            match err {
                Error::InvalidInput { what: w, .. } => assert_eq!(w, what),
                other => panic!("unexpected {other}"),
            }
        }
    }

    #[test]
    fn largest_window_is_accepted() {
        let q = Quota::with_interval(Duration::from_nanos(MAX_WINDOW_NANOS)).unwrap();
        assert_eq!(q.window_nanos(), MAX_WINDOW_NANOS);
        assert!(q.with_burst(2).is_err());
        let q = Quota::with_interval(Duration::from_nanos(1))
            .unwrap()
            .with_burst(u32::MAX)
            .unwrap();
        assert_eq!(q.window_nanos(), u64::from(u32::MAX));
    }

    #[test]
    fn display_and_debug() {
        let q = Quota::per_second(2).unwrap();
        assert_eq!(q.to_string(), "2 cells at once, one more every 500ms");
        assert_eq!(format!("{q:?}"), "Quota { burst: 2, interval: 500ms }");
    }
}
