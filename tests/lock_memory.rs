//! The in-memory lock manager: mutual exclusion under load, lease expiry
//! with a stalled holder and fencing, the watchdog, the lost-lease signal,
//! cancellation, and small or odd inputs.
//!
//! Time is driven by hand: a `ManualClock` for lease validity and paused
//! tokio time for waiting, advanced in lockstep. No sleeps, no timing
//! assertions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use raceguard::lock::{
    BackendKind, Fenced, LockConfig, LockManager, LockName, LockOptions, LostReason, MAX_TTL,
};
use raceguard::{Error, ErrorKind, ManualClock};

fn manual() -> (ManualClock, LockManager) {
    let clock = ManualClock::new();
    let locks = LockManager::memory_with(LockConfig::default().clock(clock.clone())).unwrap();
    (clock, locks)
}

fn name(s: &str) -> LockName {
    LockName::new(s).unwrap()
}

/// Moves the lease clock and tokio's paused clock together, letting every
/// task that became ready run.
async fn tick(clock: &ManualClock, by: Duration) {
    clock.advance(by);
    tokio::time::advance(by).await;
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_32_tasks_4_handles_100_sections() {
    let locks = LockManager::memory();
    assert_eq!(locks.backend_kind(), BackendKind::Memory);
    let handles: Vec<LockManager> = (0..4).map(|_| locks.clone()).collect();
    let counter = Arc::new(AtomicU64::new(0));
    let lock = name("counter");
    let mut tasks = Vec::new();
    for t in 0..32 {
        let (locks, counter, lock) = (handles[t % 4].clone(), counter.clone(), lock.clone());
        tasks.push(tokio::spawn(async move {
            let opts = LockOptions::new(Duration::from_secs(60)).wait(Duration::from_secs(60));
            for _ in 0..100 {
                let guard = locks.acquire(&lock, opts).await.unwrap();
                // Non-atomic read, yield, write: only the lock keeps it exact.
                let v = counter.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                counter.store(v + 1, Ordering::SeqCst);
                assert!(guard.release().await.unwrap());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(counter.load(Ordering::SeqCst), 32 * 100);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_holder_loses_its_lease_and_its_late_write_is_fenced_off() {
    let (clock, locks) = manual();
    let lock = name("report");
    let store = Arc::new(Fenced::new(Vec::<&str>::new()));
    let opts = LockOptions::new(Duration::from_millis(100));

    let a = locks.acquire(&lock, opts).await.unwrap();
    let a_token = a.fencing_token().unwrap();
    let a_lost = a.lost();
    let (resume, stalled) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let store = store.clone();
        tokio::spawn(async move {
            stalled.await.unwrap(); // the holder is paused here, past its TTL
            let late = store.write(a_token, |v| v.push("A (late)"));
            let held = a.is_held();
            (late, a.release().await.unwrap(), held)
        })
    };

    tick(&clock, Duration::from_millis(100)).await;
    assert_eq!(a_lost.await, LostReason::Expired);

    let b = locks.try_acquire(&lock, opts).await.unwrap();
    let b_token = b.fencing_token().unwrap();
    assert!(b_token > a_token, "{b_token} must be above {a_token}");
    store.write(b_token, |v| v.push("B")).unwrap();

    resume.send(()).unwrap();
    let (late, a_released, a_held) = holder.await.unwrap();
    match late {
        Err(Error::StaleFencingToken { token, current }) => {
            assert_eq!((token, current), (a_token.get(), b_token.get()));
        }
        other => panic!("the late write was accepted: {other:?}"),
    }
    assert!(!a_released, "A no longer held the lock");
    assert!(!a_held);
    assert!(b.is_held(), "A's release did not touch B's lock");
    assert_eq!(store.read(|v| v.clone()), ["B"]);
    assert!(b.release().await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn the_watchdog_keeps_the_lease_then_stops_at_the_maximum_hold() {
    let (clock, locks) = manual();
    let lock = name("job");
    let opts = LockOptions::new(Duration::from_millis(90)).watchdog(Duration::from_millis(600));
    let a = locks.acquire(&lock, opts).await.unwrap();
    let lost = a.lost_token();

    // Five TTLs later the watchdog has kept it.
    for _ in 0..15 {
        tick(&clock, Duration::from_millis(30)).await;
    }
    assert!(a.is_held());
    assert!(!lost.is_cancelled());
    assert!(matches!(
        locks.try_acquire(&lock, opts).await,
        Err(Error::LockBusy { .. })
    ));

    // Past the maximum hold, renewals stop and the lease runs out.
    for _ in 0..10 {
        tick(&clock, Duration::from_millis(30)).await;
    }
    assert!(!a.is_held());
    lost.cancelled().await;
    assert_eq!(a.lost().await, LostReason::Expired);
    let b = locks.try_acquire(&lock, opts).await.unwrap();
    assert!(!a.release().await.unwrap(), "A's lease had ended");
    assert!(b.is_held());
}

#[tokio::test(start_paused = true)]
async fn the_lost_token_fires_at_expiry_without_a_watchdog() {
    let (clock, locks) = manual();
    let g = locks
        .try_acquire(&name("t"), LockOptions::new(Duration::from_millis(50)))
        .await
        .unwrap();
    let token = g.lost_token();
    tick(&clock, Duration::from_millis(49)).await;
    assert!(!token.is_cancelled());
    tick(&clock, Duration::from_millis(1)).await;
    token.cancelled().await;
    assert_eq!(g.lost().await, LostReason::Expired);
}

#[tokio::test(start_paused = true)]
async fn extend_is_compare_and_extend_and_never_retakes_an_expired_lease() {
    let (clock, locks) = manual();
    let lock = name("x");
    let g = locks
        .try_acquire(&lock, LockOptions::new(Duration::from_millis(100)))
        .await
        .unwrap();
    tick(&clock, Duration::from_millis(90)).await;
    g.extend(Duration::from_millis(100)).await.unwrap();
    tick(&clock, Duration::from_millis(90)).await;
    assert!(g.is_held());
    tick(&clock, Duration::from_millis(10)).await;
    assert!(matches!(
        g.extend(Duration::from_millis(100)).await,
        Err(Error::LockLost { .. })
    ));
    // Nobody else took it, yet the expired lease stays lost.
    assert!(!g.is_held());
    assert!(
        locks
            .try_acquire(&lock, LockOptions::default())
            .await
            .is_ok()
    );
}

#[tokio::test(start_paused = true)]
async fn a_waiter_wakes_when_the_holder_releases() {
    let (_clock, locks) = manual();
    let lock = name("handoff");
    let opts = LockOptions::new(Duration::from_secs(10)).wait(Duration::from_secs(5));
    let a = locks.acquire(&lock, opts).await.unwrap();
    let waiter = {
        let (locks, lock) = (locks.clone(), lock.clone());
        tokio::spawn(async move { locks.acquire(&lock, opts).await.map(|g| g.fencing_token()) })
    };
    tokio::task::yield_now().await;
    let a_fence = a.fencing_token();
    drop(a); // releases synchronously, wakes the waiter
    let b_fence = waiter.await.unwrap().unwrap();
    assert!(b_fence > a_fence);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_acquire_leaves_nothing_behind() {
    let (_clock, locks) = manual();
    let lock = name("cancel");
    let opts = LockOptions::new(Duration::from_secs(10)).wait(Duration::from_secs(5));
    let a = locks.acquire(&lock, opts).await.unwrap();
    {
        let pending = locks.acquire(&lock, opts);
        // Polled until it waits, then dropped.
        assert!(
            tokio::time::timeout(Duration::from_millis(10), pending)
                .await
                .is_err()
        );
    }
    assert!(a.release().await.unwrap());
    let c = locks.try_acquire(&lock, opts).await.unwrap();
    assert!(c.release().await.unwrap());
}

#[test]
fn dropping_a_guard_outside_any_runtime_releases_it() {
    let locks = LockManager::memory();
    let lock = name("outside");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let g = rt
        .block_on(locks.try_acquire(&lock, LockOptions::default()))
        .unwrap();
    drop(rt);
    drop(g); // no runtime here: the memory backend releases synchronously
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    assert!(
        rt.block_on(locks.try_acquire(&lock, LockOptions::default()))
            .is_ok()
    );
}

#[tokio::test(start_paused = true)]
async fn small_and_odd_inputs() {
    let (clock, locks) = manual();
    let lock = name("odd");

    // TTL of 1 ms: a real, short lease.
    let g = locks
        .try_acquire(&lock, LockOptions::new(Duration::from_millis(1)))
        .await
        .unwrap();
    assert!(g.is_held());
    tick(&clock, Duration::from_millis(1)).await;
    assert!(!g.is_held());
    let g2 = locks
        .try_acquire(&lock, LockOptions::new(Duration::from_millis(1)))
        .await
        .unwrap();
    assert!(g2.fencing_token() > g.fencing_token());
    drop((g, g2));

    // Zero TTL, oversized TTL, watchdog shorter than the TTL: typed errors.
    for opts in [
        LockOptions::new(Duration::ZERO),
        LockOptions::new(MAX_TTL + Duration::from_secs(1)),
        LockOptions::new(Duration::from_secs(2)).watchdog(Duration::from_secs(1)),
    ] {
        let err = locks.acquire(&lock, opts).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{opts:?}: {err}");
    }

    // Zero deadline: one attempt, no waiting.
    let held = locks
        .try_acquire(&lock, LockOptions::default())
        .await
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let err = locks
        .acquire(&lock, LockOptions::default().wait(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LockBusy { ref resource } if resource == "odd"));
    assert_eq!(
        tokio::time::Instant::now(),
        t0,
        "a zero deadline never sleeps"
    );
    assert!(err.is_retryable());
    drop(held);

    // Invalid names and configurations.
    assert_eq!(
        LockName::new("").unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        LockName::new("n".repeat(300)).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    for bad in [
        LockConfig::default().namespace("has space"),
        LockConfig::default().retry(Duration::ZERO, Duration::from_secs(1)),
        LockConfig::default().retry(Duration::from_secs(2), Duration::from_secs(1)),
        LockConfig::default().drift(0.9, Duration::ZERO),
        LockConfig::default().drift(f64::NAN, Duration::ZERO),
        LockConfig::default().node_timeout(Duration::ZERO),
    ] {
        assert_eq!(
            LockManager::memory_with(bad).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
    // Names full of metacharacters are just names.
    let weird = name("*}:{x\n\u{0}");
    let g = locks
        .try_acquire(&weird, LockOptions::default())
        .await
        .unwrap();
    assert!(g.release().await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_ttl_shorter_than_the_retry_delay_still_hands_over() {
    let clock = ManualClock::new();
    let locks = LockManager::memory_with(
        LockConfig::default()
            .clock(clock.clone())
            .retry(Duration::from_millis(500), Duration::from_millis(500)),
    )
    .unwrap();
    let lock = name("short");
    let a = locks
        .try_acquire(&lock, LockOptions::new(Duration::from_millis(5)))
        .await
        .unwrap();
    std::mem::forget(a); // never released: only expiry frees it
    let waiter = {
        let (locks, lock) = (locks.clone(), lock.clone());
        tokio::spawn(async move {
            locks
                .acquire(
                    &lock,
                    LockOptions::new(Duration::from_secs(60)).wait(Duration::from_secs(1)),
                )
                .await
        })
    };
    tick(&clock, Duration::from_millis(5)).await;
    for _ in 0..20 {
        tick(&clock, Duration::from_millis(1)).await;
    }
    let b = waiter.await.unwrap().unwrap();
    assert!(b.is_held());
}

#[tokio::test(start_paused = true)]
async fn fencing_tokens_strictly_increase_across_names_and_holders() {
    let (_clock, locks) = manual();
    let mut last = None;
    for i in 0..50 {
        let g = locks
            .try_acquire(&name(&format!("n{}", i % 3)), LockOptions::default())
            .await
            .unwrap();
        assert!(g.fencing_token() > last);
        last = g.fencing_token();
    }
}
