//! Property tests of rate limiting (`raceguard::rate`).
//!
//! 1. **Reference model.** Every decision of the direct, keyed and multi
//!    limiters equals that of an obviously correct token bucket written
//!    below (credit in nanoseconds, refilled by elapsed time, capped at the
//!    window), including `remaining`, `retry_after` and `reset_after`; and in
//!    every window of length `w` the admitted cost is at most
//!    `burst + floor(w / interval)`.
//! 2. **Backwards clocks.** With times that jump back, the admitted cost in
//!    any window of the *latest time seen* still obeys that bound: a clock
//!    going backwards never admits extra cells.
//! 3. **Differential against governor** on the same quota and the same
//!    manual clock: identical allow/deny sequences and identical wait times.
//!    The one convention difference (rounding of `per_second(n)`, and
//!    `InsufficientCapacity` vs `InvalidInput` for a cost above the burst) is
//!    mapped and tested explicitly.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock as _, FakeRelativeClock};
use proptest::prelude::*;
use raceguard::ErrorKind;
use raceguard::clock::ManualClock;
use raceguard::rate::{Decision, KeyedRateLimiter, MultiLimit, Quota, RateLimiter};

const CASES: u32 = 1_024;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- the reference model -------------------------------------------------

/// A token bucket, the textbook way: `credit` nanoseconds of allowance,
/// refilled one for one by elapsed time up to `burst × interval`; a request
/// of `cost` cells needs `cost × interval` of credit.
#[derive(Debug, Clone)]
struct Bucket {
    credit: u64,
    last: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expected {
    allowed: bool,
    remaining: u32,
    retry_after: u64,
    reset_after: u64,
}

impl Bucket {
    fn new() -> Self {
        Bucket {
            credit: 0,
            last: None,
        }
    }

    fn refill(&mut self, now: u64, window: u64) {
        self.credit = match self.last {
            None => window,
            Some(last) => (self.credit + now.saturating_sub(last)).min(window),
        };
        self.last = Some(now.max(self.last.unwrap_or(0)));
    }

    fn check(&mut self, now: u64, q: Quota, cost: u32, consume: bool) -> Expected {
        let (t, window) = (q.interval_nanos(), q.window_nanos());
        self.refill(now, window);
        let need = u64::from(cost) * t;
        let allowed = self.credit >= need;
        let after = if allowed {
            self.credit - need
        } else {
            self.credit
        };
        if allowed && consume {
            self.credit = after;
        }
        Expected {
            allowed,
            remaining: (after / t) as u32,
            retry_after: if allowed { 0 } else { need - self.credit },
            reset_after: window - after,
        }
    }
}

fn observed(d: &Decision) -> Expected {
    Expected {
        allowed: d.allowed(),
        remaining: d.remaining(),
        retry_after: d.retry_after_nanos(),
        reset_after: d.reset_after_nanos(),
    }
}

/// In every window `[a, b]` of admitted events, the admitted cost is at
/// most `burst + floor((b - a) / interval)`.
fn assert_window_bound(admitted: &[(u64, u32)], q: Quota) {
    let mut events = admitted.to_vec();
    events.sort_by_key(|e| e.0);
    for i in 0..events.len() {
        let mut cost = 0u64;
        for j in i..events.len() {
            cost += u64::from(events[j].1);
            let w = events[j].0 - events[i].0;
            let bound = u64::from(q.burst()) + w / q.interval_nanos();
            assert!(
                cost <= bound,
                "admitted {cost} cells in a window of {w} ns; bound {bound} ({q:?})"
            );
        }
    }
}

// ---- strategies ------------------------------------------------------------

fn quota() -> impl Strategy<Value = Quota> {
    prop_oneof![
        (1u64..2_000, 1u32..12).prop_map(|(t, b)| Quota::with_interval(Duration::from_nanos(t))
            .unwrap()
            .with_burst(b)
            .unwrap()),
        (1u32..50, 1u64..10_000).prop_map(|(c, p)| Quota::per(
            c,
            Duration::from_nanos(p.max(u64::from(c)))
        )
        .unwrap()),
    ]
}

/// A time step: often zero (bursts at one instant), often around the
/// interval, sometimes long idle periods.
fn step() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(0u64),
        4 => 0u64..300,
        2 => 0u64..5_000,
        1 => 0u64..200_000,
    ]
}

#[derive(Debug, Clone, Copy)]
struct Op {
    dt: u64,
    key: u8,
    cost: u32,
    peek: bool,
}

fn ops(max_keys: u8) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        (
            step(),
            0..max_keys,
            prop_oneof![4 => Just(1u32), 2 => 0u32..14],
            prop::bool::weighted(0.15),
        )
            .prop_map(|(dt, key, cost, peek)| Op {
                dt,
                key,
                cost,
                peek,
            }),
        1..160,
    )
}

// ---- 1. the limiters equal the model -------------------------------------

fn run_direct(q: Quota, ops: &[Op]) {
    let clock = ManualClock::new();
    let limiter = RateLimiter::with_clock(q, clock.clone());
    let mut model = Bucket::new();
    let mut now = 0u64;
    let mut admitted = Vec::new();
    for op in ops {
        now += op.dt;
        clock.advance(Duration::from_nanos(op.dt));
        let res = if op.peek {
            limiter.peek_n(op.cost)
        } else {
            limiter.check_n(op.cost)
        };
        if op.cost > q.burst() {
            assert_eq!(res.unwrap_err().kind(), ErrorKind::InvalidInput);
            continue;
        }
        let d = res.unwrap();
        let want = model.check(now, q, op.cost, !op.peek);
        assert_eq!(observed(&d), want, "at {now} ns, {op:?}, {q:?}");
        if d.allowed() && !op.peek && op.cost > 0 {
            admitted.push((now, op.cost));
        }
    }
    assert_window_bound(&admitted, q);
}

fn run_keyed(q: Quota, ops: &[Op], shards: usize, at: bool) {
    let clock = ManualClock::new();
    let limiter = KeyedRateLimiter::<u8, _>::builder(q)
        .clock(clock.clone())
        .shards(shards)
        .build()
        .unwrap();
    let mut models: HashMap<u8, Bucket> = HashMap::new();
    let mut admitted: HashMap<u8, Vec<(u64, u32)>> = HashMap::new();
    let mut now = 0u64;
    for op in ops {
        now += op.dt;
        clock.advance(Duration::from_nanos(op.dt));
        let res = match (op.peek, at) {
            (true, false) => limiter.peek_n(&op.key, op.cost),
            (true, true) => limiter.peek_n_at(&op.key, op.cost, now),
            (false, false) => limiter.check_n(&op.key, op.cost),
            (false, true) => limiter.check_n_at(&op.key, op.cost, now),
        };
        if op.cost > q.burst() {
            assert_eq!(res.unwrap_err().kind(), ErrorKind::InvalidInput);
            continue;
        }
        let d = res.unwrap();
        let want = models
            .entry(op.key)
            .or_insert_with(Bucket::new)
            .check(now, q, op.cost, !op.peek);
        assert_eq!(
            observed(&d),
            want,
            "key {} at {now} ns, {op:?}, {q:?}",
            op.key
        );
        if d.allowed() && !op.peek && op.cost > 0 {
            admitted.entry(op.key).or_default().push((now, op.cost));
        }
        assert!(limiter.tracked_keys() <= models.len());
    }
    for events in admitted.values() {
        assert_window_bound(events, q);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn direct_limiter_equals_the_reference_model(q in quota(), ops in ops(1)) {
        run_direct(q, &ops);
    }

    #[test]
    fn keyed_limiter_equals_the_reference_model(q in quota(), ops in ops(5), shards in prop::sample::select(vec![1usize, 2, 64]), at in any::<bool>()) {
        run_keyed(q, &ops, shards, at);
    }

    /// Per-key quotas through a resolver: each key follows its own model.
    #[test]
    fn per_key_quotas_follow_their_own_models(qa in quota(), qb in quota(), ops in ops(4)) {
        let clock = ManualClock::new();
        let limiter = KeyedRateLimiter::<u8, _>::builder(qa)
            .clock(clock.clone())
            .quota_resolver(move |k: &u8| if k.is_multiple_of(2) { qa } else { qb })
            .build()
            .unwrap();
        let mut models: HashMap<u8, Bucket> = HashMap::new();
        let mut now = 0;
        for op in &ops {
            now += op.dt;
            clock.advance(Duration::from_nanos(op.dt));
            let q = if op.key.is_multiple_of(2) { qa } else { qb };
            match limiter.check_n(&op.key, op.cost) {
                Err(e) => {
                    prop_assert!(op.cost > q.burst());
                    prop_assert_eq!(e.kind(), ErrorKind::InvalidInput);
                }
                Ok(d) => {
                    let want = models.entry(op.key).or_insert_with(Bucket::new).check(now, q, op.cost, true);
                    prop_assert_eq!(observed(&d), want);
                    prop_assert_eq!(d.limit(), q.burst());
                }
            }
        }
    }

    /// Multi-limits: all-or-nothing over the per-limit models. Limit 0 is a
    /// keyed per-user limit, limit 1 a global one; the same user may appear
    /// twice in one request (two limits on the same cell).
    #[test]
    fn multi_limit_equals_all_or_nothing_over_the_models(
        qu in quota(), qg in quota(), ops in ops(3), twice in prop::bool::weighted(0.2),
    ) {
        let clock = ManualClock::new();
        let users = KeyedRateLimiter::<u8, _>::builder(qu).clock(clock.clone()).build().unwrap();
        let global = RateLimiter::with_clock(qg, clock.clone());
        let mut models: HashMap<u8, Bucket> = HashMap::new();
        let mut gmodel = Bucket::new();
        let mut now = 0;
        for op in &ops {
            now += op.dt;
            clock.advance(Duration::from_nanos(op.dt));
            let mut multi = MultiLimit::new().keyed("user", &users, &op.key).direct("global", &global);
            if twice {
                multi = multi.keyed("user-again", &users, &op.key);
            }
            let res = if op.peek { multi.peek_n(op.cost) } else { multi.check_n(op.cost) };
            if op.cost > qu.burst() || op.cost > qg.burst() {
                prop_assert_eq!(res.unwrap_err().kind(), ErrorKind::InvalidInput);
                continue;
            }
            let d = res.unwrap();
            // The model: try every limit on copies, commit only if all allow.
            let mut user = models.get(&op.key).cloned().unwrap_or_else(Bucket::new);
            let mut g = gmodel.clone();
            let mut want = vec![user.check(now, qu, op.cost, true), g.check(now, qg, op.cost, true)];
            if twice {
                want.push(user.check(now, qu, op.cost, true));
            }
            let all = want.iter().all(|e| e.allowed);
            prop_assert_eq!(d.allowed(), all);
            if all && !op.peek {
                models.insert(op.key, user);
                gmodel = g;
            } else {
                // Time still passed for the models (refill is idempotent).
                models.entry(op.key).or_insert_with(Bucket::new).refill(now, qu.window_nanos());
                gmodel.refill(now, qg.window_nanos());
            }
            // Denied limits' retry_after is exact; `denied_by` has the longest.
            for ((_, got), want) in d.decisions().iter().zip(&want) {
                prop_assert_eq!(got.allowed(), want.allowed);
                if !want.allowed {
                    prop_assert_eq!(got.retry_after_nanos(), want.retry_after);
                }
            }
            let longest = want.iter().filter(|e| !e.allowed).map(|e| e.retry_after).max().unwrap_or(0);
            prop_assert_eq!(d.retry_after().as_nanos() as u64, longest);
            prop_assert_eq!(d.denied_by().is_some(), !all);
        }
    }
}

// ---- 2. backwards clocks ----------------------------------------------------

fn wobbly_times() -> impl Strategy<Value = Vec<(i64, u32)>> {
    prop::collection::vec(
        (
            prop_oneof![3 => 0i64..400, 1 => -2_000i64..0, 1 => -20i64..20],
            0u32..4,
        ),
        1..200,
    )
}

proptest! {
    #![proptest_config(config())]

    /// Direct limiter, clock jumping back and forth: in every window of the
    /// latest time the limiter has been checked at, the admitted cost obeys
    /// the GCRA bound. (A check of cost 0 is a peek: it records nothing, so
    /// its time does not count as seen.)
    #[test]
    fn backwards_clock_never_admits_extra_cells(q in quota(), steps in wobbly_times()) {
        let limiter = RateLimiter::with_clock(q, ManualClock::starting_at(Duration::from_secs(1)));
        let mut now: i64 = 1_000_000_000;
        let mut latest = 0u64;
        let mut admitted = Vec::new();
        for (dt, cost) in steps {
            now = (now + dt).max(0);
            if cost > q.burst() {
                continue;
            }
            if cost > 0 {
                latest = latest.max(now as u64);
            }
            if limiter.check_n_at(cost, now as u64).unwrap().allowed() && cost > 0 {
                admitted.push((latest, cost));
            }
        }
        assert_window_bound(&admitted, q);
    }

    /// Keyed limiter, same clock: each shard's time never goes back, so its
    /// decisions equal the reference model fed the latest time seen.
    #[test]
    fn keyed_backwards_clock_behaves_like_a_stopped_clock(q in quota(), steps in wobbly_times()) {
        let clock = ManualClock::starting_at(Duration::from_secs(1));
        let limiter = KeyedRateLimiter::<u8, _>::builder(q).clock(clock.clone()).shards(1).build().unwrap();
        let mut model = Bucket::new();
        let mut now: i64 = 1_000_000_000;
        let mut latest = 0u64;
        for (i, (dt, cost)) in steps.into_iter().enumerate() {
            now = (now + dt).max(0);
            clock.set(Duration::from_nanos(now as u64));
            if cost > q.burst() {
                continue;
            }
            latest = latest.max(now as u64);
            let d = limiter.check_n(&1, cost).unwrap();
            prop_assert_eq!(observed(&d), model.check(latest, q, cost, true), "step {}", i);
            if i % 7 == 0 {
                limiter.evict_expired();
            }
        }
    }
}

// ---- 3. differential against governor -------------------------------------

/// raceguard's quota as a governor quota: same interval, same burst.
fn to_governor(q: Quota) -> governor::Quota {
    governor::Quota::with_period(q.interval())
        .expect("interval >= 1 ns")
        .allow_burst(NonZeroU32::new(q.burst()).expect("burst >= 1"))
}

#[test]
fn quota_mapping_and_the_rounding_convention() {
    // When the period divides evenly, the constructors agree.
    for n in [1u32, 2, 4, 5, 8, 10, 100, 1_000, 1_000_000, 1_000_000_000] {
        let ours = Quota::per_second(n).unwrap();
        let theirs = governor::Quota::per_second(NonZeroU32::new(n).unwrap());
        assert_eq!(to_governor(ours), theirs, "{n}/s");
        let ours = Quota::per_minute(n).unwrap();
        assert_eq!(
            to_governor(ours),
            governor::Quota::per_minute(NonZeroU32::new(n).unwrap())
        );
    }
    // Otherwise governor truncates (slightly faster than asked) and raceguard
    // rounds up (slightly slower); map through the interval, as above.
    for n in [3u32, 7, 300_000_000] {
        let ours = Quota::per_second(n).unwrap();
        let theirs = governor::Quota::per_second(NonZeroU32::new(n).unwrap());
        assert_eq!(
            ours.interval_nanos(),
            theirs.replenish_interval().as_nanos() as u64 + 1
        );
        assert_eq!(ours.burst(), theirs.burst_size().get());
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn direct_decisions_equal_governors(q in quota(), ops in ops(1)) {
        let ours_clock = ManualClock::new();
        let gov_clock = FakeRelativeClock::default();
        let ours = RateLimiter::with_clock(q, ours_clock.clone());
        let gov = governor::RateLimiter::direct_with_clock(to_governor(q), gov_clock.clone());
        for op in &ops {
            ours_clock.advance(Duration::from_nanos(op.dt));
            gov_clock.advance(Duration::from_nanos(op.dt));
            let Some(n) = NonZeroU32::new(op.cost) else { continue };
            match (ours.check_n(op.cost), gov.check_n(n)) {
                (Err(e), Err(governor::InsufficientCapacity(cap))) => {
                    prop_assert_eq!(e.kind(), ErrorKind::InvalidInput);
                    prop_assert_eq!(cap, q.burst());
                }
                (Ok(d), Ok(Ok(()))) => prop_assert!(d.allowed()),
                (Ok(d), Ok(Err(not_until))) => {
                    prop_assert!(d.denied());
                    let wait = not_until.wait_time_from(gov_clock.now());
                    prop_assert_eq!(d.retry_after(), wait);
                }
                (ours, theirs) => prop_assert!(false, "diverged: {:?} vs {:?}", ours, theirs),
            }
        }
    }

    #[test]
    fn keyed_decisions_equal_governors(q in quota(), ops in ops(6)) {
        let ours_clock = ManualClock::new();
        let gov_clock = FakeRelativeClock::default();
        let ours = KeyedRateLimiter::<u8, _>::builder(q).clock(ours_clock.clone()).build().unwrap();
        let gov = governor::RateLimiter::dashmap_with_clock(to_governor(q), gov_clock.clone());
        for op in &ops {
            ours_clock.advance(Duration::from_nanos(op.dt));
            gov_clock.advance(Duration::from_nanos(op.dt));
            if op.cost == 1 {
                let (d, theirs) = (ours.check(&op.key).unwrap(), gov.check_key(&op.key));
                prop_assert_eq!(d.allowed(), theirs.is_ok());
                if let Err(nu) = theirs {
                    prop_assert_eq!(d.retry_after(), nu.wait_time_from(gov_clock.now()));
                }
                continue;
            }
            let Some(n) = NonZeroU32::new(op.cost) else { continue };
            match (ours.check_n(&op.key, op.cost), gov.check_key_n(&op.key, n)) {
                (Err(_), Err(_)) => {}
                (Ok(d), Ok(theirs)) => prop_assert_eq!(d.allowed(), theirs.is_ok()),
                (ours, theirs) => prop_assert!(false, "diverged: {:?} vs {:?}", ours, theirs),
            }
        }
    }
}
