//! Loom models of the in-memory lock manager (issue 6, proof 4).
//!
//! - mutual exclusion: three threads, each trying twice, are never inside
//!   the critical section together, and no increment is lost;
//! - a guard dropped (releasing) while another thread takes over the
//!   expired lock, or releases its own newer acquisition, never deletes the
//!   new holder's lock;
//! - a release racing an acquire leaves the lock either with the new
//!   holder or free, never with both or with the released one;
//! - a watchdog renewal racing the release never outlives it
//!   (Redisson#7272): once the release returned, the lock is free and stays
//!   free, whatever the renewal did;
//! - a renewal of an expired lease never re-takes the lock from the next
//!   holder;
//! - `FencingGuard` never accepts an older token after a newer one;
//! - a lost signal created (on first use) while the lease ends always
//!   fires: the lazy signal is never left unfired on an ended lease.
//!
//! The async operations of the memory backend never suspend, so the models
//! drive them with `loom::future::block_on`.

use std::time::Duration;

use loom::future::block_on;

use crate::clock::ManualClock;
use crate::lock::test_support::{
    Renewal, lease_of, memory_holder, memory_len, renew_lease, token_of,
};
use crate::lock::{
    FencingGuard, FencingToken, LockConfig, LockManager, LockName, LockOptions, LostReason,
};
use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::{Arc, thread};

fn manager(clock: &ManualClock) -> LockManager {
    LockManager::memory_with(LockConfig::default().clock(clock.clone())).unwrap()
}

fn opts() -> LockOptions {
    LockOptions::new(Duration::from_nanos(10))
}

#[test]
fn loom_lock_mutual_exclusion() {
    loom::model(|| {
        let clock = ManualClock::new();
        let locks = manager(&clock);
        let name = LockName::new("m").unwrap();
        let inside = Arc::new(AtomicUsize::new(0));
        let counter = Arc::new(AtomicUsize::new(0));
        let entered = Arc::new(AtomicUsize::new(0));
        let worker = {
            let (locks, name, inside, counter, entered) = (
                locks.clone(),
                name.clone(),
                inside.clone(),
                counter.clone(),
                entered.clone(),
            );
            move || {
                // Two bounded attempts each (loom needs bounded loops).
                for _ in 0..2 {
                    let Ok(guard) = block_on(locks.try_acquire(&name, opts())) else {
                        continue;
                    };
                    entered.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                    // A non-atomic read-modify-write, safe only under the lock.
                    let v = counter.load(Ordering::Relaxed);
                    counter.store(v + 1, Ordering::Relaxed);
                    inside.fetch_sub(1, Ordering::SeqCst);
                    assert!(block_on(guard.release()).unwrap(), "released while held");
                }
            }
        };
        let others: Vec<_> = (0..2).map(|_| thread::spawn(worker.clone())).collect();
        worker();
        for o in others {
            o.join().unwrap();
        }
        let entered = entered.load(Ordering::SeqCst);
        assert!(entered >= 1);
        assert_eq!(
            counter.load(Ordering::SeqCst),
            entered,
            "an increment was lost"
        );
        assert_eq!(memory_len(&locks), 0);
    });
}

#[test]
fn loom_lock_guard_drop_never_deletes_the_next_holder() {
    loom::model(|| {
        let clock = ManualClock::new();
        let locks = manager(&clock);
        let name = LockName::new("d").unwrap();
        let first = block_on(locks.try_acquire(&name, opts())).unwrap();
        clock.advance(Duration::from_nanos(10)); // the first lease expired
        let dropper = thread::spawn(move || drop(first));
        let taker = {
            let (locks, name) = (locks.clone(), name.clone());
            thread::spawn(move || block_on(locks.try_acquire(&name, opts())).unwrap())
        };
        dropper.join().unwrap();
        let second = taker.join().unwrap();
        assert_eq!(
            memory_holder(&locks, &name),
            Some(token_of(&second)),
            "the old guard's drop deleted the new holder's lock"
        );
        assert!(block_on(second.release()).unwrap());
    });
}

#[test]
fn loom_lock_guard_drop_racing_the_next_holders_release() {
    loom::model(|| {
        let clock = ManualClock::new();
        let locks = manager(&clock);
        let name = LockName::new("dr").unwrap();
        let first = block_on(locks.try_acquire(&name, opts())).unwrap();
        clock.advance(Duration::from_nanos(10)); // the first lease expired
        let second = block_on(locks.try_acquire(&name, opts())).unwrap();
        let dropper = thread::spawn(move || drop(first));
        let releaser = thread::spawn(move || block_on(second.release()).unwrap());
        dropper.join().unwrap();
        assert!(
            releaser.join().unwrap(),
            "the old guard's drop released the new holder's lock first"
        );
        assert_eq!(memory_len(&locks), 0);
    });
}

#[test]
fn loom_lock_release_races_acquire() {
    loom::model(|| {
        let clock = ManualClock::new();
        let locks = manager(&clock);
        let name = LockName::new("r").unwrap();
        let first = block_on(locks.try_acquire(&name, opts())).unwrap();
        let releaser = thread::spawn(move || block_on(first.release()).unwrap());
        let taker = {
            let (locks, name) = (locks.clone(), name.clone());
            thread::spawn(move || block_on(locks.try_acquire(&name, opts())).ok())
        };
        assert!(
            releaser.join().unwrap(),
            "the first holder held it until release"
        );
        match taker.join().unwrap() {
            Some(second) => {
                assert_eq!(memory_holder(&locks, &name), Some(token_of(&second)));
                assert!(block_on(second.release()).unwrap());
            }
            None => assert_eq!(
                memory_holder(&locks, &name),
                None,
                "released lock still held"
            ),
        }
        assert_eq!(memory_len(&locks), 0);
    });
}

#[test]
fn loom_lock_watchdog_renewal_never_outlives_release() {
    loom::model(|| {
        let clock = ManualClock::new();
        let locks = manager(&clock);
        let name = LockName::new("w").unwrap();
        let guard = block_on(locks.try_acquire(&name, opts())).unwrap();
        let lease = lease_of(&guard);
        let watchdog = thread::spawn(move || {
            // Two renewals, as the watchdog task would send them.
            let a = block_on(renew_lease(&lease));
            let b = block_on(renew_lease(&lease));
            (a, b, lease)
        });
        assert!(block_on(guard.release()).unwrap());
        // The release has returned: from here on the lock must be free.
        let (_, _, lease) = watchdog.join().unwrap();
        assert_eq!(
            memory_holder(&locks, &name),
            None,
            "a renewal revived the lock"
        );
        assert_eq!(memory_len(&locks), 0);
        assert_eq!(lease.reason(), Some(LostReason::Released));
        let late = block_on(renew_lease(&lease));
        assert_eq!(late, Renewal::Ended);
        // And anyone may take it.
        let next = block_on(locks.try_acquire(&name, opts())).unwrap();
        assert!(block_on(next.release()).unwrap());
    });
}

#[test]
fn loom_lock_renewal_never_retakes_an_expired_lease() {
    loom::model(|| {
        let clock = ManualClock::new();
        let locks = manager(&clock);
        let name = LockName::new("e").unwrap();
        let guard = block_on(locks.try_acquire(&name, opts())).unwrap();
        let lease = lease_of(&guard);
        clock.advance(Duration::from_nanos(10));
        let watchdog = thread::spawn(move || block_on(renew_lease(&lease)));
        let taker = {
            let (locks, name) = (locks.clone(), name.clone());
            thread::spawn(move || block_on(locks.try_acquire(&name, opts())).unwrap())
        };
        watchdog.join().unwrap();
        let second = taker.join().unwrap();
        assert_eq!(memory_holder(&locks, &name), Some(token_of(&second)));
        assert!(!guard.is_held());
        drop(guard);
        assert_eq!(
            memory_holder(&locks, &name),
            Some(token_of(&second)),
            "the expired guard's drop deleted the new lock"
        );
    });
}

#[test]
fn loom_fencing_guard_never_accepts_an_older_token_after_a_newer_one() {
    loom::model(|| {
        let guard = Arc::new(FencingGuard::new());
        let writes = Arc::new(crate::sync::Mutex::new(Vec::new()));
        let handles: Vec<_> = [1u64, 2]
            .into_iter()
            .map(|t| {
                let (guard, writes) = (guard.clone(), writes.clone());
                thread::spawn(move || {
                    if guard.check(FencingToken::new(t)).is_ok() {
                        writes.lock().push(t);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(guard.highest(), 2);
        let w = writes.lock().clone();
        // Token 2 is always accepted; token 1 only if checked before it.
        assert!(w.contains(&2));
        assert!(w == vec![2] || w.len() == 2);
    });
}

#[test]
fn loom_lock_lost_signal_created_while_the_lease_ends_always_fires() {
    loom::model(|| {
        let clock = ManualClock::new();
        let locks = manager(&clock);
        let name = LockName::new("s").unwrap();
        let guard = block_on(locks.try_acquire(&name, opts())).unwrap();
        let lease = lease_of(&guard);
        // The server reports the lock gone while the holder asks for its
        // lost signal for the first time.
        let ender = thread::spawn(move || {
            lease.end(LostReason::NotHeld);
        });
        let token = guard.lost_token();
        ender.join().unwrap();
        assert!(
            token.is_cancelled(),
            "the lease ended but its lost signal never fired"
        );
        assert!(!guard.is_held());
    });
}
