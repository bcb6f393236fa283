//! The GCRA core: pure integer arithmetic, no I/O, no atomics.
//!
//! The generic cell rate algorithm keeps **one integer per limited thing**:
//! the theoretical arrival time `tat`, in nanoseconds on the limiter's clock.
//! With `T` the quota's interval and `window = burst × T`:
//!
//! ```text
//! backlog = max(tat - now, 0)          // consumed part of the window
//! after   = backlog + cost × T
//! allowed = after <= window
//! if allowed and cost > 0: tat = now + after   // = max(tat, now) + cost × T
//! remaining   = floor((window - backlog') / T) // backlog' = after if allowed, else backlog
//! retry_after = allowed ? 0 : after - window
//! reset_after = backlog'
//! ```
//!
//! A `tat` at or before `now` (including 0, the initial state) means "full":
//! an absent key and an idle key decide identically, which is what lets the
//! keyed limiter drop idle keys and Redis expire them after `reset_after`.
//!
//! The in-memory limiters run [`decide`] inside a CAS loop or a shard lock;
//! the Redis backend runs a Lua port of the same lines. [`check_all`] is the
//! all-or-nothing multi-limit step, shared the same way.
//!
//! # Arithmetic and bounds (for ports)
//!
//! - Stored times are clamped to [`MAX_NANOS`] (`i64::MAX`): they fit a signed
//!   64-bit integer (a Redis integer) and leave a spare bit.
//! - `T ≥ 1`, `window = burst × T ≤ 2^53` (validated by
//!   [`Quota`]). Under a monotonic clock `backlog ≤
//!   window`, so `after`, `retry_after`, `reset_after` and `remaining × T`
//!   are all below `2^54`, exact in a Lua double. Only `now` and `tat`
//!   themselves are large; a port computes `tat - now` exactly first (for
//!   example from the split `TIME` seconds and microseconds) and then works
//!   on small numbers.
//! - Every operation saturates: a clock read that jumps backwards makes
//!   `backlog` larger, so it can only deny more, never admit extra cells.
//!
//! # Convention relative to governor
//!
//! governor stores the same `tat` and admits iff `now >= tat - τ` with
//! `τ = (burst - 1) × T`, i.e. `tat - now + T <= burst × T`, which is
//! `after <= window` for cost 1; for cost `n` it admits iff
//! `now >= tat + (n-1) × T - τ`, again `after <= window`. Decisions are
//! identical for the same `T` and burst. Two conventions differ:
//!
//! - rounding: governor's `Quota::per_second(n)` truncates `10^9 / n`,
//!   raceguard's rounds up (never faster than asked). Map a raceguard quota
//!   to governor with `Quota::with_period(interval).allow_burst(burst)`.
//! - `cost > burst`: governor returns `InsufficientCapacity`; the limiters
//!   here return [`Error::InvalidInput`](crate::Error::InvalidInput) and
//!   [`decide`] itself reports a denial (it never panics).

use super::{Decision, Quota};

/// The largest time the core stores (`i64::MAX` ns, about 292 years); a
/// later clock reading stores this value.
///
/// ```
/// use raceguard::rate::{Quota, gcra::{MAX_NANOS, decide}};
/// let (_, tat) = decide(0, u64::MAX, Quota::per_second(1)?, 1);
/// assert_eq!(tat, Some(MAX_NANOS));
/// # Ok::<(), raceguard::Error>(())
/// ```
pub const MAX_NANOS: u64 = i64::MAX as u64;

/// Decides one request of `cost` cells against the state `tat` at time
/// `now`: returns the decision and, when cells were consumed, the new `tat`
/// to store (`None` means "store nothing").
///
/// Pure and total: any inputs give an answer, without overflow or panic.
///
/// ```
/// use raceguard::rate::Quota;
/// use raceguard::rate::gcra::decide;
///
/// let q = Quota::per_second(2)?; // T = 500 ms, burst 2
/// let ms = 1_000_000;
/// let (d, tat) = decide(0, 1_000 * ms, q, 1);
/// assert!(d.allowed());
/// assert_eq!(tat, Some(1_500 * ms));
/// let (d, tat) = decide(1_500 * ms, 1_000 * ms, q, 2);
/// assert!(!d.allowed());
/// assert_eq!(tat, None);
/// assert_eq!(d.retry_after().as_millis(), 500);
/// # Ok::<(), raceguard::Error>(())
/// ```
#[inline]
pub fn decide(tat: u64, now: u64, quota: Quota, cost: u32) -> (Decision, Option<u64>) {
    let need = quota.interval_nanos().saturating_mul(u64::from(cost));
    if need > quota.window_nanos() {
        // More than the burst: never admitted (the limiters reject it
        // before calling the core; the core stays total).
        return deny(tat, now, quota, need);
    }
    decide_within_burst(tat, now, quota, need, cost)
}

/// [`decide`] for `need = cost × interval <= window` (callers validated
/// `cost <= burst`): admission is one addition and one comparison.
#[inline(always)]
pub(crate) fn decide_within_burst(
    tat: u64,
    now: u64,
    quota: Quota,
    need: u64,
    cost: u32,
) -> (Decision, Option<u64>) {
    debug_assert!(need <= quota.window_nanos());
    // backlog + need <= window  <=>  tat - (window - need) <= now (the
    // subtraction saturating at 0): one subtraction and one comparison, the
    // same work as governor's `t0 >= tat - τ`.
    if tat.saturating_sub(quota.window_nanos() - need) <= now {
        let after = tat.saturating_sub(now) + need;
        // max(tat, now) + need, stored times clamped to MAX_NANOS without
        // overflow: min(x, MAX - need) + need == min(x + need, MAX).
        let next = if cost == 0 {
            None
        } else {
            Some(tat.max(now).min(MAX_NANOS - need) + need)
        };
        (
            Decision::new(true, quota.burst(), quota.interval_nanos(), after, 0),
            next,
        )
    } else {
        deny(tat, now, quota, need)
    }
}

#[inline(always)]
fn deny(tat: u64, now: u64, quota: Quota, need: u64) -> (Decision, Option<u64>) {
    let backlog = tat.saturating_sub(now);
    let retry = backlog.saturating_add(need) - quota.window_nanos();
    (
        Decision::new(false, quota.burst(), quota.interval_nanos(), backlog, retry),
        None,
    )
}

/// One limit of a multi-limit request, for [`check_all`]: which cell (an
/// index into the caller's deduplicated cell array), the time on that
/// limit's clock, its quota and the cost.
///
/// ```
/// use raceguard::rate::{Quota, gcra::CellRequest};
/// let r = CellRequest { cell: 0, now: 0, quota: Quota::per_second(1)?, cost: 1 };
/// assert_eq!(r.cell, 0);
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellRequest {
    /// Index of the cell in the `cells` slice. Two requests on the same
    /// limited thing must use the same index.
    pub cell: usize,
    /// The time, on this limit's clock.
    pub now: u64,
    /// This limit's quota.
    pub quota: Quota,
    /// Cells to consume.
    pub cost: u32,
}

/// All-or-nothing: decides every request in order against `cells` (each
/// request sees the consumption of the earlier allowed ones on the same
/// cell), pushes one decision per request into `decisions`, and returns
/// whether all were allowed.
///
/// When all are allowed, `cells` holds the new states. When any is denied,
/// `cells` is left exactly as it was given: **nothing is consumed**.
///
/// ```
/// use raceguard::rate::Quota;
/// use raceguard::rate::gcra::{CellRequest, check_all};
///
/// let per_user = Quota::per_second(10)?;
/// let global = Quota::per_second(1)?;
/// let mut cells = [0u64, 0u64]; // [user, global]
/// let reqs = [
///     CellRequest { cell: 0, now: 0, quota: per_user, cost: 1 },
///     CellRequest { cell: 1, now: 0, quota: global, cost: 1 },
/// ];
/// let mut out = Vec::new();
/// assert!(check_all(&mut cells, &reqs, &mut out));
/// let after_first = cells;
/// assert!(!check_all(&mut cells, &reqs, &mut out)); // global is spent
/// assert_eq!(cells, after_first, "the user's cell was not consumed");
/// assert!(out[0].allowed() && out[1].denied());
/// # Ok::<(), raceguard::Error>(())
/// ```
///
/// # Panics
///
/// When a request's `cell` is out of bounds of `cells`.
pub fn check_all(
    cells: &mut [u64],
    requests: &[CellRequest],
    decisions: &mut Vec<Decision>,
) -> bool {
    decisions.clear();
    let mut undo: Vec<(usize, u64)> = Vec::new();
    let mut all = true;
    for r in requests {
        let (d, next) = decide(cells[r.cell], r.now, r.quota, r.cost);
        if let Some(tat) = next {
            undo.push((r.cell, cells[r.cell]));
            cells[r.cell] = tat;
        }
        all &= d.allowed();
        decisions.push(d);
    }
    if !all {
        for (cell, old) in undo.into_iter().rev() {
            cells[cell] = old;
        }
    }
    all
}

#[cfg(all(test, not(raceguard_loom)))]
mod tests {
    use super::*;
    use std::time::Duration;

    fn q(interval: u64, burst: u32) -> Quota {
        Quota::with_interval(Duration::from_nanos(interval))
            .unwrap()
            .with_burst(burst)
            .unwrap()
    }

    #[test]
    fn fresh_state_admits_the_burst_then_one_per_interval() {
        let quota = q(10, 3);
        let mut tat = 0;
        let mut admitted = Vec::new();
        for now in 0..=40u64 {
            let (d, next) = decide(tat, now, quota, 1);
            if let Some(t) = next {
                tat = t;
            }
            if d.allowed() {
                admitted.push(now);
            }
        }
        // One check per nanosecond: the burst goes at t = 0, 1, 2, then one
        // cell per interval.
        assert_eq!(admitted, vec![0, 1, 2, 10, 20, 30, 40]);
    }

    #[test]
    fn decision_fields() {
        let quota = q(100, 4);
        let (d, next) = decide(0, 1_000, quota, 1);
        assert!(d.allowed());
        assert_eq!(next, Some(1_100));
        assert_eq!((d.limit(), d.remaining()), (4, 3));
        assert_eq!(d.retry_after_nanos(), 0);
        assert_eq!(d.reset_after_nanos(), 100);

        // backlog 350 -> 2 cells would need 550 > 400.
        let (d, next) = decide(1_350, 1_000, quota, 2);
        assert!(!d.allowed());
        assert_eq!(next, None);
        assert_eq!(d.remaining(), 0);
        assert_eq!(d.retry_after_nanos(), 150);
        assert_eq!(d.reset_after_nanos(), 350);

        // cost 0 is always allowed under a sane clock and stores nothing.
        let (d, next) = decide(1_350, 1_000, quota, 0);
        assert!(d.allowed());
        assert_eq!(next, None);
        assert_eq!(d.remaining(), 0);
    }

    #[test]
    fn cost_above_burst_is_denied_not_panicking() {
        let quota = q(1, 2);
        let (d, next) = decide(0, 0, quota, u32::MAX);
        assert!(!d.allowed());
        assert_eq!(next, None);
        let quota = q(crate::rate::quota::MAX_WINDOW_NANOS, 1);
        let (d, _) = decide(u64::MAX, 0, quota, u32::MAX);
        assert!(!d.allowed());
    }

    #[test]
    fn extreme_times_saturate() {
        let quota = q(10, 1);
        let (d, next) = decide(0, u64::MAX, quota, 1);
        assert!(d.allowed());
        assert_eq!(next, Some(MAX_NANOS));
        let (d, _) = decide(MAX_NANOS, MAX_NANOS, quota, 1);
        assert!(d.allowed(), "tat == now is full");
        let (d, _) = decide(u64::MAX, 0, quota, 1);
        assert!(!d.allowed());
        assert_eq!(d.remaining(), 0);
    }

    #[test]
    fn backwards_clock_only_denies_more() {
        let quota = q(10, 2);
        let (_, t1) = decide(0, 1_000, quota, 1);
        let tat = t1.unwrap();
        // Forward: one more fits. Backwards by 50: backlog 60 + 10 > 20.
        assert!(decide(tat, 1_000, quota, 1).0.allowed());
        assert!(!decide(tat, 950, quota, 1).0.allowed());
    }

    #[test]
    fn check_all_restores_on_denial() {
        let a = q(10, 1);
        let mut cells = [0, 25];
        let reqs = [
            CellRequest {
                cell: 0,
                now: 20,
                quota: a,
                cost: 1,
            },
            CellRequest {
                cell: 1,
                now: 20,
                quota: a,
                cost: 1,
            },
        ];
        let mut out = Vec::new();
        assert!(!check_all(&mut cells, &reqs, &mut out));
        assert_eq!(cells, [0, 25]);
        assert!(out[0].allowed());
        assert_eq!(out[1].retry_after_nanos(), 5);
    }

    #[test]
    fn check_all_same_cell_twice_sees_its_own_consumption() {
        let a = q(10, 2);
        let mut cells = [0];
        let reqs = [
            CellRequest {
                cell: 0,
                now: 0,
                quota: a,
                cost: 1,
            },
            CellRequest {
                cell: 0,
                now: 0,
                quota: a,
                cost: 2,
            },
        ];
        let mut out = Vec::new();
        assert!(!check_all(&mut cells, &reqs, &mut out));
        assert_eq!(cells, [0]);
        let reqs = [
            CellRequest {
                cell: 0,
                now: 0,
                quota: a,
                cost: 1,
            },
            CellRequest {
                cell: 0,
                now: 0,
                quota: a,
                cost: 1,
            },
        ];
        assert!(check_all(&mut cells, &reqs, &mut out));
        assert_eq!(cells, [20]);
    }
}
