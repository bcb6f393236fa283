//! Lock counters and the wait histogram through the `metrics` facade
//! (feature `metrics`); the table is in the [module docs](super#metrics).
//!
//! Handles are registered once, when a manager is built, with the recorder
//! current at that moment (the global one, or a local one installed with
//! `metrics::with_local_recorder`). The uncontended acquire + release costs
//! two counter increments (no clock read, no allocation, no lock of ours).
//! Without the feature every type here is zero-sized and every call
//! compiles to nothing.
//!
//! Labels are the manager's name and backend and fixed words: never a lock
//! name, which comes from requests and would explode cardinality.

use super::guard::LostReason;
use crate::Error;

/// The `manager` label of a manager built without a name.
#[cfg(feature = "metrics")]
const UNNAMED: &str = "unnamed";

/// When an acquire's first attempt started, on the manager's clock (kept
/// only with the feature), to measure how long it waited.
#[cfg(feature = "metrics")]
#[derive(Clone, Copy)]
pub(crate) struct WaitStart(u64);

#[cfg(not(feature = "metrics"))]
#[derive(Clone, Copy)]
pub(crate) struct WaitStart;

impl WaitStart {
    /// Not started yet.
    #[inline(always)]
    pub(crate) fn new() -> Self {
        #[cfg(feature = "metrics")]
        return WaitStart(0);
        #[cfg(not(feature = "metrics"))]
        return WaitStart;
    }

    /// Records `start` when it is the start of the first attempt.
    #[inline(always)]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn attempt(&mut self, attempt: u32, start: u64) {
        #[cfg(feature = "metrics")]
        if attempt == 0 {
            self.0 = start;
        }
    }
}

/// A manager's handles in the `metrics` facade.
#[cfg(feature = "metrics")]
pub(crate) struct LockMetrics {
    acquired: metrics::Counter,
    busy: metrics::Counter,
    timeout: metrics::Counter,
    quorum: metrics::Counter,
    lost_expired: metrics::Counter,
    lost_not_held: metrics::Counter,
    released_held: metrics::Counter,
    released_gone: metrics::Counter,
    waited_acquired: metrics::Histogram,
    waited_gave_up: metrics::Histogram,
}

#[cfg(not(feature = "metrics"))]
pub(crate) struct LockMetrics;

impl std::fmt::Debug for LockMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockMetrics")
    }
}

#[cfg(feature = "metrics")]
impl LockMetrics {
    /// Registers the handles of the manager named `name` on `backend`.
    pub(crate) fn new(name: Option<&str>, backend: &'static str) -> Self {
        const ACQUIRED: &str = "raceguard_lock_acquired_total";
        const BUSY: &str = "raceguard_lock_busy_total";
        const LOST: &str = "raceguard_lock_lost_total";
        const RELEASED: &str = "raceguard_lock_released_total";
        const WAIT: &str = "raceguard_lock_wait_seconds";
        metrics::describe_counter!(ACQUIRED, "Locks acquired.");
        metrics::describe_counter!(
            BUSY,
            "Lock acquisitions refused because the lock was held (or no quorum), by reason."
        );
        metrics::describe_counter!(
            LOST,
            "Lock leases that ended other than by their release, by reason."
        );
        metrics::describe_counter!(
            RELEASED,
            "Lock guards released, by whether the lock was still held."
        );
        metrics::describe_histogram!(
            WAIT,
            metrics::Unit::Seconds,
            "How long lock acquisitions that had to retry waited, by outcome."
        );
        let manager = name.unwrap_or(UNNAMED).to_owned();
        let counter = |metric: &'static str, key: &'static str, value: &'static str| metrics::counter!(metric, "manager" => manager.clone(), "backend" => backend, key => value);
        let wait = |outcome: &'static str| metrics::histogram!(WAIT, "manager" => manager.clone(), "backend" => backend, "outcome" => outcome);
        LockMetrics {
            acquired: metrics::counter!(ACQUIRED, "manager" => manager.clone(), "backend" => backend),
            busy: counter(BUSY, "reason", "busy"),
            timeout: counter(BUSY, "reason", "timeout"),
            quorum: counter(BUSY, "reason", "quorum"),
            lost_expired: counter(LOST, "reason", "expired"),
            lost_not_held: counter(LOST, "reason", "not_held"),
            released_held: counter(RELEASED, "held", "true"),
            released_gone: counter(RELEASED, "held", "false"),
            waited_acquired: wait("acquired"),
            waited_gave_up: wait("gave_up"),
        }
    }

    /// A lock was acquired (a guard is about to be handed out).
    #[inline]
    pub(crate) fn acquired(&self) {
        self.acquired.increment(1);
    }

    /// An acquire returns `err`; `deadline`: it was a waiting acquire that
    /// reached its deadline (otherwise a single attempt).
    #[inline]
    pub(crate) fn refused(&self, err: &Error, deadline: bool) {
        match err {
            Error::LockBusy { .. } if deadline => self.timeout.increment(1),
            Error::LockBusy { .. } => self.busy.increment(1),
            Error::QuorumNotReached { .. } => self.quorum.increment(1),
            _ => {}
        }
    }

    /// An acquire returns (`acquired` or gave up at its deadline) after
    /// `attempt` retries; when it retried, records the time since `from`
    /// (`now` read only then).
    #[inline]
    pub(crate) fn waited(
        &self,
        attempt: u32,
        from: WaitStart,
        acquired: bool,
        now: impl FnOnce() -> u64,
    ) {
        if attempt == 0 {
            return;
        }
        let secs = std::time::Duration::from_nanos(now().saturating_sub(from.0)).as_secs_f64();
        if acquired {
            self.waited_acquired.record(secs);
        } else {
            self.waited_gave_up.record(secs);
        }
    }

    /// A lease ended with `reason` (called once per lease, by the winner of
    /// the compare-and-swap that ended it).
    #[inline]
    pub(crate) fn ended(&self, reason: LostReason) {
        match reason {
            LostReason::Expired => self.lost_expired.increment(1),
            LostReason::NotHeld => self.lost_not_held.increment(1),
            LostReason::Released => {}
        }
    }

    /// A guard's release was answered: `held`, whether the lock was still
    /// this guard's.
    #[inline]
    pub(crate) fn released(&self, held: bool) {
        if held {
            self.released_held.increment(1);
        } else {
            self.released_gone.increment(1);
        }
    }
}

#[cfg(not(feature = "metrics"))]
impl LockMetrics {
    #[inline(always)]
    pub(crate) fn new(_name: Option<&str>, _backend: &'static str) -> Self {
        LockMetrics
    }

    #[inline(always)]
    pub(crate) fn acquired(&self) {}

    #[inline(always)]
    pub(crate) fn refused(&self, _err: &Error, _deadline: bool) {}

    #[inline(always)]
    pub(crate) fn waited(
        &self,
        _attempt: u32,
        _from: WaitStart,
        _acquired: bool,
        _now: impl FnOnce() -> u64,
    ) {
    }

    #[inline(always)]
    pub(crate) fn ended(&self, _reason: LostReason) {}

    #[inline(always)]
    pub(crate) fn released(&self, _held: bool) {}
}
