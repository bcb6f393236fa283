//! R07, in one process (seed 001 fix 5): the rate-limit middleware keeps
//! `user_rate_limits = {}`, a dict of timestamp lists, in each worker's
//! memory, with "max 30 requests/minute". With 4 workers behind a load
//! balancer every worker admits 30: a user gets 4x the limit. And the dict
//! only ever prunes timestamps, never users: it grows with every user ever
//! seen.
//!
//! raceguard: one `KeyedRateLimiter` shared by all workers admits the limit
//! once, and tracks at most `max_keys` users, evicting idle ones as it goes.
//! (Across processes the same holds with the Redis keyed limiter:
//! `r07_cross_process`.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use raceguard::clock::{Clock, ManualClock};
use raceguard::rate::{KeyedRateLimiter, Quota};

use crate::support::Sequencer;

const WORKERS: usize = 4;
const LIMIT: usize = 30; // 30 requests per minute per user
const REQUESTS: usize = 200; // alice's requests, spread over the workers
const WINDOW: Duration = Duration::from_secs(60);

/// Seed 001's middleware, line for line: a per-worker dict of timestamps.
#[derive(Debug, Default)]
struct NaiveWorkerLimiter {
    user_rate_limits: HashMap<String, Vec<Duration>>,
}

impl NaiveWorkerLimiter {
    /// `true` = pass the request on, `false` = 429.
    fn check(&mut self, user_id: &str, now: Duration) -> bool {
        // if user_id not in user_rate_limits: user_rate_limits[user_id] = []
        let recent = self
            .user_rate_limits
            .entry(user_id.to_string())
            .or_default();
        // Remove requests older than 60 seconds (the key itself stays).
        recent.retain(|ts| now.saturating_sub(*ts) < WINDOW);
        if recent.len() >= LIMIT {
            return false;
        }
        recent.push(now);
        true
    }
}

/// Request `i` goes to worker `i % 4` (round robin), in order `i`.
fn round_robin<F>(handle: F) -> usize
where
    F: Fn(usize, usize) -> bool + Sync,
{
    let seq = Sequencer::new();
    let admitted = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for worker in 0..WORKERS {
            let (seq, admitted, handle) = (&seq, &admitted, &handle);
            s.spawn(move || {
                for i in (worker..REQUESTS).step_by(WORKERS) {
                    let _turn = seq.turn_blocking(i);
                    if handle(worker, i) {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    admitted.into_inner()
}

#[test]
fn naive_version_fails() {
    // Every request arrives within the same minute (time frozen at 0).
    let workers: Vec<std::sync::Mutex<NaiveWorkerLimiter>> =
        (0..WORKERS).map(|_| Default::default()).collect();
    let admitted = round_robin(|w, _| workers[w].lock().unwrap().check("alice", Duration::ZERO));
    assert_eq!(
        admitted,
        WORKERS * LIMIT,
        "each worker admits the limit: the user gets {WORKERS}x it"
    );

    // Memory: 100,000 users, one request each, 1 ms apart (100 s in all).
    let mut worker = NaiveWorkerLimiter::default();
    for u in 0..100_000u64 {
        worker.check(&format!("user-{u}"), Duration::from_millis(u));
    }
    assert_eq!(
        worker.user_rate_limits.len(),
        100_000,
        "the dict keeps every user ever seen"
    );
}

#[test]
fn raceguard_prevents() {
    let quota = Quota::per_minute(LIMIT as u32).unwrap();
    let clock = ManualClock::new();

    // The same schedule: one limiter shared by the four workers.
    let shared = KeyedRateLimiter::<String, _>::builder(quota)
        .clock(clock.clone())
        .build()
        .unwrap();
    let alice = "alice".to_string();
    let admitted = round_robin(|_, _| shared.check(&alice).unwrap().allowed());
    assert_eq!(admitted, LIMIT, "the limit once, whichever worker serves");

    // Real concurrency: four worker threads, free running.
    let shared = KeyedRateLimiter::<String, _>::builder(quota)
        .clock(clock.clone())
        .build()
        .unwrap();
    let admitted = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| {
                for _ in 0..REQUESTS / WORKERS {
                    if shared.check(&alice).unwrap().allowed() {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.into_inner(), LIMIT);

    // Memory: the same 100,000 users, 1 ms apart, through a limiter capped
    // at 10,000 keys: never above the cap, no user refused (idle users are
    // evicted as new ones arrive), and nothing left once all are idle.
    let clock = ManualClock::new();
    let capped = KeyedRateLimiter::<String, _>::builder(quota)
        .clock(clock.clone())
        .max_keys(10_000)
        .build()
        .unwrap();
    for u in 0..100_000u64 {
        clock.advance(Duration::from_millis(1));
        assert!(capped.check(&format!("user-{u}")).unwrap().allowed());
        assert!(capped.tracked_keys() <= 10_000);
    }
    clock.advance(WINDOW);
    capped.evict_expired();
    assert_eq!(capped.tracked_keys(), 0);
    let _ = clock.now();
}
