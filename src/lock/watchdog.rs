//! The lease watchdog: renews a held lease at about a third of its TTL
//! (jittered), up to a maximum total hold, and fires the lost-lease signal
//! when a renewal finds the lock gone or the validity runs out. The same
//! task, with renewal off, is the validity timer behind
//! [`LockGuard::lost_token`](super::LockGuard::lost_token).
//!
//! Invariants:
//!
//! - A renewal is sent only while the lease is `HELD` and its local
//!   validity has not run out: an expired lease is never re-taken.
//! - A renewal is a compare-and-extend with this acquisition's token: it
//!   can neither extend another holder's lock nor recreate a deleted one.
//! - The task never outlives the release: the guard ends the lease, then
//!   aborts the task (and joins it on explicit release) before the
//!   compare-and-delete; the task also exits by itself on its next wake-up
//!   once the lease is no longer `HELD`.
//! - Renewals stop once `max_hold` (from the acquisition) is reached; the
//!   last renewal is shortened so the total hold never exceeds it.

use std::time::Duration;

use super::guard::{Lease, LostReason};
use super::token::{self, SplitMix64};
use crate::sync::StdArc;

/// What one renewal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// Extended; the renewal was sent at this clock time.
    Renewed(u64),
    /// The lock was gone or another owner's: the lease ended as `NotHeld`.
    NotHeld,
    /// The lease had already ended (released, expired): nothing was sent.
    Ended,
    /// The maximum total hold is reached: no more renewals.
    MaxHold,
    /// The backend failed; retry while the validity lasts.
    Failed,
}

/// One renewal of `lease`, as the watchdog runs it.
pub(crate) async fn renew_once(lease: &Lease) -> Renewal {
    let inner = &lease.inner;
    let now = inner.now();
    if !lease.held_at(now) {
        return Renewal::Ended;
    }
    let mut ttl = lease.ttl();
    if let Some(max) = lease.max_hold {
        let end = lease.acquired_at.saturating_add(max);
        if now >= end {
            return Renewal::MaxHold;
        }
        ttl = ttl.min(end - now);
    }
    if ttl < inner.min_renew_ttl() {
        return Renewal::MaxHold;
    }
    match inner.extend(&lease.name, lease.token, ttl).await {
        Ok(true) => {
            lease.record_renewal(now, ttl);
            Renewal::Renewed(now)
        }
        Ok(false) => {
            lease.end(LostReason::NotHeld);
            Renewal::NotHeld
        }
        Err(e) => {
            tracing::debug!(lock = %lease.name, error = %e, "lease renewal failed; retrying while the lease is valid");
            Renewal::Failed
        }
    }
}

/// The watchdog (`renew = true`) or validity timer (`renew = false`) of
/// `lease`. Exits when the lease ends.
pub(crate) async fn run(lease: StdArc<Lease>, mut renew: bool) {
    let inner = lease.inner.clone();
    let mut rng = SplitMix64::new(lease.token.seed().rotate_left(29) ^ 0x6a09_e667_f3bc_c909);
    let mut next_renewal = lease
        .acquired_at
        .saturating_add(token::renew_interval(lease.ttl(), rng.next_u64()));
    loop {
        let now = inner.now();
        if !lease.held_at(now) {
            return;
        }
        let until = lease.valid_until();
        let target = if renew {
            next_renewal.min(until)
        } else {
            until
        };
        if now < target {
            tokio::time::sleep(Duration::from_nanos(target - now)).await;
            continue;
        }
        if !renew {
            continue;
        }
        match renew_once(&lease).await {
            Renewal::Renewed(at) => {
                next_renewal =
                    at.saturating_add(token::renew_interval(lease.ttl(), rng.next_u64()));
            }
            Renewal::NotHeld | Renewal::Ended => return,
            Renewal::MaxHold => renew = false,
            Renewal::Failed => {
                // Retry soon (a tenth of the TTL, jittered, at least 1 ms),
                // while the validity lasts.
                let step = (lease.ttl() / 10).max(1_000_000);
                next_renewal = now.saturating_add(step / 2 + rng.next_u64() % (step / 2 + 1));
            }
        }
    }
}
