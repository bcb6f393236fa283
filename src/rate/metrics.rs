//! Rate-limit counters through the `metrics` facade (feature `metrics`).
//!
//! Handles are registered once, when a limiter is built, with the recorder
//! current at that moment (the global one, or a local one installed with
//! `metrics::with_local_recorder`); a check then costs one counter increment
//! (a no-op when no recorder was installed). Without the feature this is a
//! zero-sized type and every call compiles to nothing.
//!
//! | metric | labels | counts |
//! |---|---|---|
//! | `raceguard_rate_admitted_total` | `limiter` | admitted checks and waits (`check`, `check_n`, `until_ready`/`acquire` that returned, multi-limit checks that allowed, once per limiter involved) |
//! | `raceguard_rate_denied_total` | `limiter`, `reason` | refusals: `reason="limit"` (a check denied by the quota; for a multi-limit, by each limiter that denied), `"wait_timeout"`, `"queue_full"` (a wait rejected), `"key_cap"` (a keyed limiter at its key cap) |
//!
//! Peeks count nothing; an impossible cost (`InvalidInput`) counts nothing.

#[cfg(feature = "metrics")]
use crate::{Error, Result};

use super::Decision;

/// Builds something (an internal fallback limiter) whose metrics must not
/// be reported: its checks are already counted by its owner. Only the
/// Redis limiters have such a fallback.
#[cfg(all(feature = "metrics", feature = "redis"))]
pub(crate) fn unmetered<T>(build: impl FnOnce() -> T) -> T {
    metrics::with_local_recorder(&metrics::NoopRecorder, build)
}

/// Without the feature there is nothing to suppress.
#[cfg(all(not(feature = "metrics"), feature = "redis"))]
pub(crate) fn unmetered<T>(build: impl FnOnce() -> T) -> T {
    build()
}

/// The `limiter` label of a limiter built without a name.
#[cfg(feature = "metrics")]
const UNNAMED: &str = "unnamed";

#[cfg(feature = "metrics")]
#[derive(Clone)]
pub(crate) struct RateMetrics {
    admitted: metrics::Counter,
    denied_limit: metrics::Counter,
    denied_timeout: metrics::Counter,
    denied_queue_full: metrics::Counter,
    denied_key_cap: metrics::Counter,
}

#[cfg(not(feature = "metrics"))]
#[derive(Clone)]
pub(crate) struct RateMetrics;

impl std::fmt::Debug for RateMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RateMetrics")
    }
}

#[cfg(feature = "metrics")]
impl RateMetrics {
    /// Registers the counters of the limiter named `name`.
    pub(crate) fn new(name: Option<&str>) -> Self {
        const ADMITTED: &str = "raceguard_rate_admitted_total";
        const DENIED: &str = "raceguard_rate_denied_total";
        metrics::describe_counter!(ADMITTED, "Rate-limit checks and waits that were admitted.");
        metrics::describe_counter!(
            DENIED,
            "Rate-limit checks and waits that were refused, by reason."
        );
        let limiter = name.unwrap_or(UNNAMED).to_owned();
        let denied = |reason: &'static str| metrics::counter!(DENIED, "limiter" => limiter.clone(), "reason" => reason);
        RateMetrics {
            admitted: metrics::counter!(ADMITTED, "limiter" => limiter.clone()),
            denied_limit: denied("limit"),
            denied_timeout: denied("wait_timeout"),
            denied_queue_full: denied("queue_full"),
            denied_key_cap: denied("key_cap"),
        }
    }

    /// Records a consuming check's decision.
    #[inline]
    pub(crate) fn decision(&self, d: &Decision) {
        if d.allowed() {
            self.admitted.increment(1);
        } else {
            self.denied_limit.increment(1);
        }
    }

    /// Records an admission (a multi-limit check that allowed).
    #[inline]
    pub(crate) fn admitted(&self) {
        self.admitted.increment(1);
    }

    /// Records a denial by the quota (a multi-limit part that denied).
    #[inline]
    pub(crate) fn denied(&self) {
        self.denied_limit.increment(1);
    }

    /// Records a check refused because a keyed limiter is at its key cap.
    #[inline]
    pub(crate) fn key_cap(&self) {
        self.denied_key_cap.increment(1);
    }

    /// Records the outcome of a consuming check or a wait.
    #[inline]
    pub(crate) fn outcome(&self, out: &Result<Decision>) {
        match out {
            Ok(d) => self.decision(d),
            Err(Error::Timeout { .. }) => self.denied_timeout.increment(1),
            Err(Error::CapacityExceeded { resource, .. }) => {
                if *resource == super::keyed::KEYS_RESOURCE {
                    self.key_cap();
                } else {
                    self.denied_queue_full.increment(1);
                }
            }
            Err(_) => {}
        }
    }
}

#[cfg(not(feature = "metrics"))]
impl RateMetrics {
    #[inline(always)]
    pub(crate) fn new(_name: Option<&str>) -> Self {
        RateMetrics
    }

    #[inline(always)]
    pub(crate) fn decision(&self, _d: &Decision) {}

    #[inline(always)]
    pub(crate) fn admitted(&self) {}

    #[inline(always)]
    pub(crate) fn denied(&self) {}

    #[inline(always)]
    pub(crate) fn key_cap(&self) {}

    #[inline(always)]
    pub(crate) fn outcome(&self, _out: &crate::Result<Decision>) {}
}
