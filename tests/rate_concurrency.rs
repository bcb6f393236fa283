//! Rate limiters under real threads and tasks.
//!
//! - Stress: 2 threads × 1,000,000 checks on one limiter with a frozen
//!   manual clock admit exactly the burst (direct, keyed, multi-limit).
//! - Multi-limits racing on overlapping limits: every limiter's consumption
//!   equals the number of admitted multi-limit checks that include it.
//! - The key cap holds under concurrent insertions.
//! - Fair waiting (Tokio paused time, no sleeps as synchronisation): FIFO
//!   order, deadlines, cancellation (consumes nothing, does not block the
//!   queue), the waiter bound, per-key independence.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use raceguard::clock::{Clock, ManualClock};
use raceguard::rate::{KeyedRateLimiter, MultiLimit, Quota, RateLimiter, TokioClock};
use raceguard::{Error, ErrorKind};
use tokio::sync::Mutex as AsyncMutex;

const CHECKS_PER_THREAD: u64 = 1_000_000;

fn frozen() -> ManualClock {
    ManualClock::starting_at(Duration::from_secs(1))
}

#[test]
fn two_threads_a_million_checks_each_admit_exactly_the_burst() {
    let burst = 1_000;
    let limiter = RateLimiter::with_clock(Quota::per_second(burst).unwrap(), frozen());
    let admitted = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let mut mine = 0;
                for _ in 0..CHECKS_PER_THREAD {
                    mine += u64::from(limiter.check().allowed());
                }
                admitted.fetch_add(mine, Ordering::Relaxed);
            });
        }
    });
    assert_eq!(admitted.into_inner(), u64::from(burst));
    assert!(limiter.peek().denied());
}

#[test]
fn two_threads_on_one_key_admit_exactly_the_burst() {
    let burst = 500;
    let limiter = KeyedRateLimiter::<u64, _>::builder(Quota::per_second(burst).unwrap())
        .clock(frozen())
        .build()
        .unwrap();
    let admitted = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (limiter, admitted) = (&limiter, &admitted);
            s.spawn(move || {
                let mut mine = 0;
                for i in 0..CHECKS_PER_THREAD / 4 {
                    // Key 7 is shared; the others are one-offs, so inserts
                    // and sweeps run alongside.
                    let key = if i % 2 == 0 {
                        7
                    } else {
                        1_000 + t * CHECKS_PER_THREAD + i
                    };
                    let d = limiter.check(&key).unwrap();
                    if key == 7 {
                        mine += u64::from(d.allowed());
                    }
                }
                admitted.fetch_add(mine, Ordering::Relaxed);
            });
        }
    });
    assert_eq!(admitted.into_inner(), u64::from(burst));
}

#[test]
fn racing_multi_limits_consume_exactly_what_they_admit() {
    // a and c are generous, b is the bottleneck shared by both kinds of
    // multi-limit check; plus single checks on b.
    let clock = frozen();
    let a = RateLimiter::with_clock(Quota::per_second(100_000).unwrap(), clock.clone());
    let b = RateLimiter::with_clock(Quota::per_second(5_000).unwrap(), clock.clone());
    let users = KeyedRateLimiter::<u64, _>::builder(Quota::per_second(100_000).unwrap())
        .clock(clock.clone())
        .build()
        .unwrap();
    let (ab, bu, single) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..20_000 {
                let d = MultiLimit::new()
                    .direct("a", &a)
                    .direct("b", &b)
                    .check()
                    .unwrap();
                ab.fetch_add(u64::from(d.allowed()), Ordering::Relaxed);
            }
        });
        s.spawn(|| {
            for _ in 0..20_000 {
                let d = MultiLimit::new()
                    .keyed("user", &users, &1)
                    .direct("b", &b)
                    .check()
                    .unwrap();
                bu.fetch_add(u64::from(d.allowed()), Ordering::Relaxed);
            }
        });
        s.spawn(|| {
            for _ in 0..20_000 {
                single.fetch_add(u64::from(b.check().allowed()), Ordering::Relaxed);
            }
        });
    });
    let (ab, bu, single) = (ab.into_inner(), bu.into_inner(), single.into_inner());
    assert_eq!(ab + bu + single, 5_000, "b's whole burst, no more");
    // Nothing leaked from a denied multi-limit check.
    let left = |d: raceguard::rate::Decision| u64::from(d.limit() - d.remaining());
    assert_eq!(left(a.peek_n(0).unwrap()), ab);
    assert_eq!(left(users.peek_n(&1, 0).unwrap()), bu);
    assert_eq!(left(b.peek_n(0).unwrap()), 5_000);
}

#[test]
fn the_key_cap_holds_under_concurrent_insertions() {
    let cap = 10_000;
    let limiter = KeyedRateLimiter::<u64, _>::builder(Quota::per_minute(1).unwrap())
        .clock(frozen())
        .max_keys(cap)
        .build()
        .unwrap();
    let refused = AtomicUsize::new(0);
    let max_seen = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (limiter, refused, max_seen) = (&limiter, &refused, &max_seen);
            s.spawn(move || {
                for i in 0..5_000u64 {
                    match limiter.check(&(t * 1_000_000 + i)) {
                        Ok(d) => assert!(d.allowed()),
                        Err(Error::CapacityExceeded { capacity, .. }) => {
                            assert_eq!(capacity, cap);
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("unexpected {e}"),
                    }
                    max_seen.fetch_max(limiter.tracked_keys(), Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(limiter.tracked_keys(), cap);
    assert!(max_seen.into_inner() <= cap);
    assert_eq!(refused.into_inner(), 20_000 - cap);
}

// ---- fair waiting ----------------------------------------------------------

/// One cell per second, burst 1, on Tokio's (paused) clock.
fn throttle() -> Arc<RateLimiter<TokioClock>> {
    Arc::new(
        RateLimiter::builder(Quota::per_second(1).unwrap())
            .clock(TokioClock::new())
            .max_waiters(8)
            .wait_timeout(Duration::from_secs(60))
            .build(),
    )
}

/// Yields until `cond` holds (tasks make progress on the paused runtime).
async fn until(mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition never became true");
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_arrival_order_one_interval_apart() {
    let limiter = throttle();
    assert!(limiter.check().allowed()); // the burst is spent: everyone waits
    let served = Arc::new(AsyncMutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let (l, served) = (limiter.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            l.until_ready().await.unwrap();
            served.lock().await.push((i, l.clock().now()));
        }));
        // Arrival order is enqueue order.
        until(|| limiter.waiters() == i as usize + 1).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let served = served.lock().await.clone();
    let order: Vec<u64> = served.iter().map(|(i, _)| *i).collect();
    assert_eq!(order, vec![0, 1, 2, 3, 4, 5], "FIFO");
    for (k, (_, at)) in served.iter().enumerate() {
        // Served exactly at 1 s, 2 s, ... on the paused clock: never early.
        assert!(*at >= Duration::from_secs(k as u64 + 1), "{served:?}");
    }
    assert_eq!(limiter.waiters(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_consumes_nothing_and_does_not_block_the_queue() {
    let limiter = throttle();
    assert!(limiter.check().allowed());
    // The head of the queue is cancelled while it sleeps for capacity.
    let head = {
        let limiter = limiter.clone();
        tokio::spawn(async move { limiter.until_ready().await })
    };
    until(|| limiter.waiters() == 1).await;
    let second = {
        let limiter = limiter.clone();
        tokio::spawn(async move { limiter.until_ready().await })
    };
    until(|| limiter.waiters() == 2).await;
    head.abort();
    assert!(head.await.unwrap_err().is_cancelled());
    assert_eq!(limiter.waiters(), 1, "the cancelled waiter left the queue");
    // The second is served at the first opportunity, 1 s after the start.
    let d = second.await.unwrap().unwrap();
    assert!(d.allowed());
    assert_eq!(limiter.clock().now(), Duration::from_secs(1));
    // Exactly one cell was consumed after the first: the cancelled waiter
    // took none.
    assert_eq!(limiter.peek().retry_after(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn cancelling_at_every_await_point_never_consumes() {
    // Poll `until_ready` a bounded number of times, then drop it: whatever
    // step it was at, no cell is consumed.
    for polls in 0..6 {
        let limiter = throttle();
        assert!(limiter.check().allowed());
        let mut fut = Box::pin(limiter.until_ready());
        for _ in 0..polls {
            tokio::select! {
                biased;
                _ = &mut fut => panic!("cannot be ready before 1 s"),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        drop(fut);
        assert_eq!(limiter.waiters(), 0);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            limiter.check().allowed(),
            "after {polls} polls the cell is still there"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_is_a_typed_error_at_once() {
    let limiter = Arc::new(
        RateLimiter::builder(Quota::per_minute(1).unwrap())
            .clock(TokioClock::new())
            .max_waiters(2)
            .wait_timeout(Duration::from_secs(120))
            .build(),
    );
    assert!(limiter.check().allowed());
    let mut waiting = Vec::new();
    for n in 1..=2 {
        let l = limiter.clone();
        waiting.push(tokio::spawn(async move { l.until_ready().await }));
        until(|| limiter.waiters() == n).await;
    }
    let started = tokio::time::Instant::now();
    let err = limiter.until_ready().await.unwrap_err();
    assert!(
        matches!(err, Error::CapacityExceeded { capacity: 2, .. }),
        "{err}"
    );
    assert_eq!(started.elapsed(), Duration::ZERO, "no waiting");
    for w in waiting {
        w.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn deadlines_end_every_wait() {
    let limiter = throttle();
    assert!(limiter.check().allowed());
    // The head knows at once that 1 s of waiting does not fit in 500 ms.
    let started = tokio::time::Instant::now();
    let err = limiter
        .acquire_timeout(1, Duration::from_millis(500))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(started.elapsed(), Duration::ZERO);
    // A waiter behind a long queue gives up at its deadline.
    let mut queue = Vec::new();
    for n in 1..=3 {
        let l = limiter.clone();
        queue.push(tokio::spawn(async move { l.until_ready().await }));
        until(|| limiter.waiters() == n).await;
    }
    let err = limiter
        .acquire_timeout(1, Duration::from_millis(1_500))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(started.elapsed(), Duration::from_millis(1_500));
    for (i, w) in queue.into_iter().enumerate() {
        assert!(w.await.unwrap().is_ok(), "waiter {i} was served");
    }
    // Cost above the burst: a typed error, no waiting.
    assert_eq!(
        limiter.acquire(2).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[tokio::test(start_paused = true)]
async fn keyed_waiters_on_different_keys_do_not_wait_for_each_other() {
    let limiter = Arc::new(
        KeyedRateLimiter::<&'static str, _>::builder(Quota::per_minute(1).unwrap())
            .clock(TokioClock::new())
            .wait_timeout(Duration::from_secs(120))
            .build()
            .unwrap(),
    );
    assert!(limiter.check(&"slow").unwrap().allowed());
    let slow = {
        let l = limiter.clone();
        tokio::spawn(async move { l.until_ready(&"slow").await })
    };
    until(|| limiter.waiters() == 1).await;
    let started = tokio::time::Instant::now();
    limiter.until_ready(&"fast").await.unwrap();
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "not behind the other key"
    );
    let d = slow.await.unwrap().unwrap();
    assert!(d.allowed());
    assert_eq!(limiter.clock().now(), Duration::from_secs(60));
    assert_eq!(limiter.waiters(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_threads_waiting_stay_within_the_rate() {
    // Real time, real threads: 12 waiters through 100 cells/s with burst 1.
    // Every admission happens between the two clock readings, so at most
    // burst + elapsed/interval of them can have been admitted.
    let limiter = Arc::new(
        RateLimiter::builder(Quota::per_second(100).unwrap().with_burst(1).unwrap())
            .wait_timeout(Duration::from_secs(30))
            .build(),
    );
    let start = limiter.clock().now_nanos();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let l = limiter.clone();
        tasks.push(tokio::spawn(async move {
            l.until_ready().await.map(|d| d.allowed())
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += u64::from(t.await.unwrap().unwrap());
    }
    let elapsed = limiter.clock().now_nanos() - start;
    assert_eq!(admitted, 12);
    let bound = 1 + elapsed / limiter.quota().interval_nanos();
    assert!(admitted <= bound, "{admitted} admitted in {elapsed} ns");
}
