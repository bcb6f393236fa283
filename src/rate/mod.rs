//! Rate limiting: one GCRA core, global and per-key limiters, all-or-nothing
//! multi-limits and fair waiting (races R07 and R08 of `docs/RACES.md`).
//!
//! Seed 001's middleware kept a per-worker dictionary of timestamps: four
//! workers admitted four times the limit and the dictionary grew with every
//! user ever seen. Seed 002's coordinators each kept their own
//! `last_api_call`, so concurrent webhooks exceeded the external API's rate.
//! The fix for both is **one** limiter shared by every caller:
//!
//! - [`RateLimiter`]: one global limit (an outbound throttle) on one atomic
//!   word; one compare-and-swap per admitted check, none per denial.
//! - [`KeyedRateLimiter`]: one limit per key (per user, per route), with
//!   per-key quotas, lazy eviction of idle keys folded into normal operation
//!   and a hard cap on tracked keys.
//! - [`MultiLimit`]: several limits as one all-or-nothing decision.
//! - `until_ready` / `acquire`: fair (FIFO) async waiting with a deadline,
//!   cancel-safe, with a bounded number of waiters.
//!
//! All of them run the pure GCRA core in [`gcra`] (integer nanoseconds) and
//! return a [`Decision`] with `limit`, `remaining`, `retry_after` and
//! `reset_after`. The Redis backend runs a Lua port of the same core.
//!
//! ```
//! use std::time::Duration;
//! use raceguard::clock::ManualClock;
//! use raceguard::rate::{KeyedRateLimiter, Quota};
//!
//! // Seed 001's limit: 30 requests per minute per user, shared by all workers.
//! let clock = ManualClock::new();
//! let per_user = KeyedRateLimiter::<String, _>::builder(Quota::per_minute(30)?)
//!     .clock(clock.clone())
//!     .max_keys(1_000_000)
//!     .build()?;
//! let user = "alice".to_string();
//! let admitted = (0..100).filter(|_| per_user.check(&user).unwrap().allowed()).count();
//! assert_eq!(admitted, 30);
//!
//! // Headers for the 429 response.
//! let d = per_user.check(&user)?;
//! assert_eq!((d.limit(), d.remaining()), (30, 0));
//! assert_eq!(d.retry_after(), Duration::from_secs(2));
//! assert_eq!(d.reset_after(), Duration::from_secs(60));
//! # Ok::<(), raceguard::Error>(())
//! ```
//!
//! Exact semantics, accuracy, the memory bound and clock behaviour are in
//! `docs/GUARANTEES.md`.
//!
//! ## Metrics
//!
//! With the feature `metrics`, every limiter (memory and Redis) reports
//! through the [`metrics`](https://docs.rs/metrics) facade, labelled with its
//! name (`RateLimiterBuilder::name`, `KeyedRateLimiterBuilder::name`, the
//! Redis limiter's name; `"unnamed"` otherwise). Keys never become labels.
//!
//! | counter | labels | counts |
//! |---|---|---|
//! | `raceguard_rate_admitted_total` | `limiter` | admitted consuming checks; waits (`until_ready`, `acquire`) that returned, once per wait; multi-limit checks that allowed, once per limiter involved |
//! | `raceguard_rate_denied_total` | `limiter`, `reason` | `reason="limit"`: checks denied by the quota (for a multi-limit, each limiter that denied); `"wait_timeout"`, `"queue_full"`: waits refused; `"key_cap"`: a keyed limiter at its key cap |
//!
//! Peeks, impossible costs and backend errors count nothing; a Redis
//! limiter's failure-policy decisions (fail open, fail closed, local
//! fallback) count as admitted or denied like any other. Handles are
//! registered when the limiter is built, with the recorder current then (so
//! install the recorder first); a check then costs one counter increment.
//!
//! ```
//! # #[cfg(feature = "metrics")] {
//! use raceguard::rate::{Quota, RateLimiter};
//! let limiter = RateLimiter::builder(Quota::per_second(100)?).name("external-api").build();
//! limiter.check(); // raceguard_rate_admitted_total{limiter="external-api"} += 1
//! # }
//! # Ok::<(), raceguard::Error>(())
//! ```

mod decision;
mod direct;
pub mod gcra;
mod keyed;
mod limit;
pub(crate) mod metrics;
mod multi;
mod quota;
mod table;
mod wait;

pub use decision::Decision;
pub use direct::{RateLimiter, RateLimiterBuilder};
pub use keyed::{DEFAULT_MAX_KEYS, DefaultHasher, KeyedRateLimiter, KeyedRateLimiterBuilder};
pub use limit::{KeyedLimit, Limit};
pub use multi::{AllOf, MultiDecision, MultiLimit};
pub use quota::{MAX_WINDOW_NANOS, Quota};
pub use wait::TokioClock;

use crate::{Error, Result};

/// Rejects a cost that could never be admitted.
#[inline]
pub(crate) fn validate_cost(cost: u32, quota: Quota) -> Result<()> {
    if cost > quota.burst() {
        Err(cost_error(cost, quota, None))
    } else {
        Ok(())
    }
}

pub(crate) fn validate_cost_named(cost: u32, quota: Quota, limit: &str) -> Result<()> {
    if cost > quota.burst() {
        Err(cost_error(cost, quota, Some(limit)))
    } else {
        Ok(())
    }
}

#[cold]
fn cost_error(cost: u32, quota: Quota, limit: Option<&str>) -> Error {
    let of = limit
        .map(|l| format!(" of limit {l:?}"))
        .unwrap_or_default();
    Error::invalid(
        "rate limit cost",
        format!(
            "{cost} cells exceed the burst {}{of}: such a request can never be admitted",
            quota.burst()
        ),
    )
}
