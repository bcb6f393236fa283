//! Run with `RUSTFLAGS="--cfg raceguard_loom" cargo test --release`.
#![cfg(raceguard_loom)]

use std::time::Duration;

use raceguard::clock::ManualClock;
use raceguard_downstream_loom::Lease;

#[test]
fn loom_lease_expiry_is_seen_after_concurrent_advances() {
    loom::model(|| {
        let clock = ManualClock::new();
        let lease = Lease::new(clock.clone(), Duration::from_nanos(2));
        let advancers: Vec<_> = (0..2)
            .map(|_| {
                let clock = clock.clone();
                loom::thread::spawn(move || {
                    clock.advance(Duration::from_nanos(1));
                })
            })
            .collect();
        let observer = {
            let lease = lease.clone();
            loom::thread::spawn(move || {
                // Once expired, always expired (the clock is monotonic).
                if lease.expired() {
                    assert!(lease.expired());
                }
            })
        };
        for a in advancers {
            a.join().unwrap();
        }
        observer.join().unwrap();
        assert!(lease.expired(), "both advances happened-before this check");
    });
}
