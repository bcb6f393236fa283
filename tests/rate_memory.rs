//! Bounded memory of the keyed limiter: 10,000,000 distinct keys through a
//! limiter capped at 50,000 keys.
//!
//! - Tracked keys never exceed the cap, whatever arrives.
//! - With time advancing, idle keys are evicted by normal operation (no
//!   background thread) and no key is refused while the live set fits.
//! - Once every key has expired, tracked keys and table memory return to
//!   the empty limiter's baseline.
//!
//! `examples/rate_memory.rs` prints the bytes per key against governor.

use std::time::Duration;

use raceguard::Error;
use raceguard::clock::ManualClock;
use raceguard::rate::{KeyedRateLimiter, Quota};

const CAP: usize = 50_000;
const KEYS: u64 = 10_000_000;

#[test]
fn ten_million_distinct_keys_stay_under_the_cap_and_memory_returns_to_baseline() {
    let clock = ManualClock::new();
    // One cell per 100 µs: a key seen once is full (expired) again 100 µs
    // later.
    let limiter = KeyedRateLimiter::<u64, _>::builder(
        Quota::with_interval(Duration::from_micros(100)).unwrap(),
    )
    .clock(clock.clone())
    .max_keys(CAP)
    .build()
    .unwrap();
    let baseline = limiter.allocated_bytes();
    assert_eq!(limiter.tracked_keys(), 0);

    // 1. A flood of new keys at one instant: the cap holds, the overflow is
    //    refused with a typed error, and nothing already tracked is lost.
    let mut refused = 0u64;
    for key in 0..4 * CAP as u64 {
        match limiter.check(&key) {
            Ok(d) => assert!(d.allowed()),
            Err(Error::CapacityExceeded { capacity, .. }) => {
                assert_eq!(capacity, CAP);
                refused += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(limiter.tracked_keys() <= CAP);
    }
    assert_eq!(limiter.tracked_keys(), CAP);
    assert_eq!(refused, 3 * CAP as u64);
    assert!(
        limiter.check(&0).unwrap().denied(),
        "key 0 is still tracked and spent"
    );

    // While the flood's keys are live, a new key is still refused...
    assert!(limiter.check(&u64::MAX).is_err());
    // ...and once they have expired, new keys take their place.
    clock.advance(Duration::from_micros(100));

    // 2. Ten million distinct keys, 10 ns apart: at any time about 10,000
    //    keys are live; everything older is evicted on the way.
    let at_cap_bytes = limiter.allocated_bytes();
    let mut steady_max = 0;
    for key in 0..KEYS {
        clock.advance(Duration::from_nanos(10));
        let d = limiter
            .check(&(u64::MAX - key))
            .unwrap_or_else(|e| panic!("key {key} refused: {e}"));
        assert!(d.allowed());
        if key % 1_024 == 0 {
            let tracked = limiter.tracked_keys();
            assert!(tracked <= CAP);
            assert!(limiter.allocated_bytes() <= at_cap_bytes);
            // After the flood's keys have drained (each insertion sweeps a
            // few slots), the table stays near the live set.
            if key >= 100_000 {
                steady_max = steady_max.max(tracked);
            }
        }
    }
    // About 10,000 keys are live at any instant; lazy eviction keeps the
    // tracked count within 2x of that (measured: about 1.46x), far from the
    // cap and from the 10,000,000 keys seen.
    assert!(steady_max < 20_000, "tracked up to {steady_max}");

    // 3. Time moves on: every key is idle. Normal operation (new users
    //    arriving one by one) drains the tables as it goes...
    clock.advance(Duration::from_secs(1));
    let before = limiter.tracked_keys();
    for key in 0..20_000u64 {
        clock.advance(Duration::from_millis(1));
        limiter.check(&(1_000_000_000 + key)).unwrap();
    }
    let after_lazy = limiter.tracked_keys();
    assert!(
        after_lazy < before / 2,
        "lazy eviction: {before} -> {after_lazy}"
    );
    // ...and once everything has expired, memory is back to the baseline.
    clock.advance(Duration::from_secs(1));
    limiter.evict_expired();
    assert_eq!(limiter.tracked_keys(), 0);
    assert_eq!(limiter.allocated_bytes(), baseline);
}
