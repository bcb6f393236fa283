//! Rate limiting against governor 0.10, side by side in one run.
//!
//! `cargo bench --bench rate_limit -- --warm-up-time 1 --measurement-time 3`
//!
//! **Clocks.** Reading a clock costs more than the limiter's own arithmetic
//! (`Instant::now()` about 20 ns, quanta about 9 ns, a check 1–3 ns), so
//! every main group gives both crates the **same** clock: [`TickClock`], a
//! thread-local counter the benchmark loop advances. Reading it is one
//! thread-local load, which stands for "a timestamp the caller already
//! holds"; both crates read it exactly once per check. The last group,
//! `direct_check_own_clock`, instead gives each crate a real clock:
//! raceguard's `SystemClock` (`std::time::Instant`) against governor's
//! `MonotonicClock` (also `Instant`) and its default `QuantaClock` (TSC).
//!
//! Groups (`raceguard` vs `governor` in each):
//!
//! - `direct_check`: one thread, one limiter, mostly allowed (the clock
//!   advances by one interval per check).
//! - `direct_check_denied`: one thread, the burst spent and the clock
//!   frozen: every check denied.
//! - `keyed_check`: 100,000 pre-populated `u64` keys, cycled; each crate
//!   with its default hasher (raceguard: foldhash; governor: std SipHash),
//!   plus `governor_foldhash` with raceguard's hasher.
//! - `direct_contended`: two threads on one limiter; time per check, both
//!   threads together (the inverse of throughput).
//! - `direct_check_own_clock`: each crate's clock, see above.

use std::cell::Cell;
use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use raceguard::clock::SystemClock;
use raceguard::rate::{KeyedRateLimiter, Quota, RateLimiter};

thread_local! {
    static TICK: Cell<u64> = const { Cell::new(1) };
}

/// A clock both crates read the same way: one thread-local load.
#[derive(Debug, Clone, Copy, Default)]
struct TickClock;

impl TickClock {
    #[inline]
    fn advance(by: u64) {
        TICK.with(|t| t.set(t.get() + by));
    }
}

impl raceguard::clock::Clock for TickClock {
    #[inline]
    fn now_nanos(&self) -> u64 {
        TICK.with(Cell::get)
    }
}

impl governor::clock::Clock for TickClock {
    type Instant = governor::nanos::Nanos;
    #[inline]
    fn now(&self) -> governor::nanos::Nanos {
        governor::nanos::Nanos::new(TICK.with(Cell::get))
    }
}

/// 10^6 cells per second (one per microsecond), burst 1,000.
fn quota() -> Quota {
    Quota::per_second(1_000_000)
        .unwrap()
        .with_burst(1_000)
        .unwrap()
}

fn gov_quota(q: Quota) -> governor::Quota {
    governor::Quota::with_period(q.interval())
        .unwrap()
        .allow_burst(NonZeroU32::new(q.burst()).unwrap())
}

fn direct(c: &mut Criterion) {
    let q = quota();
    let step = q.interval_nanos();

    let mut g = c.benchmark_group("direct_check");
    let ours = RateLimiter::with_clock(q, TickClock);
    g.bench_function("raceguard", |b| {
        b.iter(|| {
            TickClock::advance(step);
            black_box(ours.check().allowed())
        })
    });
    let theirs = governor::RateLimiter::direct_with_clock(gov_quota(q), TickClock);
    g.bench_function("governor", |b| {
        b.iter(|| {
            TickClock::advance(step);
            black_box(theirs.check().is_ok())
        })
    });
    // The caller already holds a timestamp: no clock read at all.
    let at = RateLimiter::with_clock(q, TickClock);
    let mut now = 1;
    g.bench_function("raceguard_check_at", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                now += step;
                black_box(at.check_at(now).allowed());
            }
            start.elapsed()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("direct_check_denied");
    let ours = RateLimiter::with_clock(q, TickClock);
    let theirs = governor::RateLimiter::direct_with_clock(gov_quota(q), TickClock);
    while ours.check().allowed() {}
    while theirs.check().is_ok() {}
    g.bench_function("raceguard", |b| {
        b.iter(|| black_box(ours.check().allowed()))
    });
    g.bench_function("governor", |b| b.iter(|| black_box(theirs.check().is_ok())));
    g.finish();
}

fn keyed(c: &mut Criterion) {
    const KEYS: u64 = 100_000;
    // One cell per millisecond per key; the clock advances 10 ns per check,
    // so each key comes back after 1 ms: mostly allowed.
    let q = Quota::per_second(1_000).unwrap().with_burst(10).unwrap();
    let step = 10;

    let mut g = c.benchmark_group("keyed_check");
    let ours = KeyedRateLimiter::<u64, _>::builder(q)
        .clock(TickClock)
        .build()
        .unwrap();
    for k in 0..KEYS {
        ours.check(&k).unwrap();
    }
    let mut i = 0u64;
    g.bench_function("raceguard", |b| {
        b.iter(|| {
            TickClock::advance(step);
            i = if i + 1 == KEYS { 0 } else { i + 1 };
            black_box(ours.check(&i).unwrap().allowed())
        })
    });

    let theirs = governor::RateLimiter::dashmap_with_clock(gov_quota(q), TickClock);
    for k in 0..KEYS {
        let _ = theirs.check_key(&k);
    }
    g.bench_function("governor", |b| {
        b.iter(|| {
            TickClock::advance(step);
            i = if i + 1 == KEYS { 0 } else { i + 1 };
            black_box(theirs.check_key(&i).is_ok())
        })
    });

    let theirs = governor::RateLimiter::dashmap_with_clock_and_hasher(
        gov_quota(q),
        TickClock,
        raceguard::rate::DefaultHasher::default(),
    );
    for k in 0..KEYS {
        let _ = theirs.check_key(&k);
    }
    g.bench_function("governor_foldhash", |b| {
        b.iter(|| {
            TickClock::advance(step);
            i = if i + 1 == KEYS { 0 } else { i + 1 };
            black_box(theirs.check_key(&i).is_ok())
        })
    });
    g.finish();
}

/// Runs `iters` checks split over two threads; returns the wall time.
fn two_threads(iters: u64, check: &(dyn Fn() -> bool + Sync), step: u64) -> Duration {
    let barrier = std::sync::Barrier::new(2);
    let start = std::thread::scope(|s| {
        let run = || {
            barrier.wait();
            let t = Instant::now();
            for _ in 0..iters / 2 {
                TickClock::advance(step);
                black_box(check());
            }
            t
        };
        let a = s.spawn(run);
        let b = s.spawn(run);
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        a.min(b)
    });
    start.elapsed()
}

fn contended(c: &mut Criterion) {
    let q = quota();
    let step = q.interval_nanos();
    let mut g = c.benchmark_group("direct_contended");
    let ours = RateLimiter::with_clock(q, TickClock);
    g.bench_function("raceguard", |b| {
        b.iter_custom(|iters| two_threads(iters, &|| ours.check().allowed(), step))
    });
    let theirs = governor::RateLimiter::direct_with_clock(gov_quota(q), TickClock);
    g.bench_function("governor", |b| {
        b.iter_custom(|iters| two_threads(iters, &|| theirs.check().is_ok(), step))
    });
    g.finish();
}

fn own_clocks(c: &mut Criterion) {
    // A quota fast enough that real time keeps most checks allowed.
    let q = Quota::per_second(1_000_000_000)
        .unwrap()
        .with_burst(1_000_000)
        .unwrap();
    let mut g = c.benchmark_group("direct_check_own_clock");
    let ours = RateLimiter::with_clock(q, SystemClock::new());
    g.bench_function("raceguard_system_instant", |b| {
        b.iter(|| black_box(ours.check().allowed()))
    });
    let mono =
        governor::RateLimiter::direct_with_clock(gov_quota(q), governor::clock::MonotonicClock);
    g.bench_function("governor_monotonic_instant", |b| {
        b.iter(|| black_box(mono.check().is_ok()))
    });
    let quanta = governor::RateLimiter::direct(gov_quota(q));
    g.bench_function("governor_default_quanta", |b| {
        b.iter(|| black_box(quanta.check().is_ok()))
    });
    g.finish();
}

criterion_group!(benches, direct, keyed, contended, own_clocks);
criterion_main!(benches);
