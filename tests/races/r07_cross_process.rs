//! R07, across processes (seed 001 fix 5 with 4 workers): each worker
//! process with its own in-memory limiter admits the limit *per process*;
//! one Redis keyed limiter shared by the processes admits the limit once.
//!
//! The four "processes" are four independent `RedisBackend`s (four
//! connections, as four worker processes would have) and, for the naive
//! version, four separate in-memory limiters. The clock is frozen for the
//! in-memory limiters (`ManualClock`); the Redis script decides at an
//! explicit frozen time too, so no cell is replenished during the test.

#![cfg(all(feature = "redis", feature = "test-util"))]

use raceguard::clock::ManualClock;
use raceguard::keys::UserId;
use raceguard::rate::{KeyedRateLimiter, Quota};
use raceguard::redis::{RedisBackend, RedisConfig, RedisKeyedRateLimiter};
use raceguard::testing::RedisServer;

const WORKERS: usize = 4;
const LIMIT: u32 = 30; // seed 001: 30 requests per minute per user
const REQUESTS_PER_WORKER: usize = 60;

#[test]
fn naive_version_fails() {
    let quota = Quota::per_minute(LIMIT).unwrap();
    let clock = ManualClock::new();
    let user = UserId::new("alice").unwrap();
    // Every worker process builds its own limiter at start-up.
    let workers: Vec<KeyedRateLimiter<UserId, ManualClock>> = (0..WORKERS)
        .map(|_| {
            KeyedRateLimiter::builder(quota)
                .clock(clock.clone())
                .build()
                .unwrap()
        })
        .collect();
    let admitted: usize = workers
        .iter()
        .map(|w| {
            (0..REQUESTS_PER_WORKER)
                .filter(|_| w.check(&user).unwrap().allowed())
                .count()
        })
        .sum();
    assert_eq!(
        admitted,
        WORKERS * LIMIT as usize,
        "each process enforces the limit alone: {WORKERS}x the limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raceguard_prevents() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let quota = Quota::per_minute(LIMIT).unwrap();
    let user = UserId::new("alice").unwrap();
    let frozen_now = 1_795_000_000_000_000_000u64;
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let backend = RedisBackend::connect(server.url(), RedisConfig::default())
            .await
            .unwrap();
        let limiter = RedisKeyedRateLimiter::new(&backend, "chat", quota).unwrap();
        let user = user.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            for _ in 0..REQUESTS_PER_WORKER {
                if limiter
                    .check_n_at(&user, 1, frozen_now)
                    .await
                    .unwrap()
                    .allowed()
                {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    assert_eq!(admitted, LIMIT as usize, "one limit across all processes");
}
