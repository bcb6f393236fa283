//! Loom models of the in-memory versioned cache (issue 7, Proof 2).
//!
//! The models drive the cache's synchronous core (`lookup`, `store`,
//! `invalidate_id`: exactly what `get_or_load` and `invalidate` run around
//! the loader), so loom sees every lock and atomic of the real structure.
//!
//! - a load racing an invalidation: a value whose version was read before
//!   the version bump is never returned after the bump, neither by the
//!   invalidating thread right after it nor by anyone later;
//! - two invalidations racing a load: both take effect (distinct versions)
//!   and the value loaded before them is never returned afterwards.

use crate::ManualClock;
use crate::cache::VersionedCache;
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{Arc, thread};

const TTL: u64 = 1_000_000_000;
const SCOPE: &str = "alice";
const ITEM: &str = "history";

/// A "loader": reads the version, then decides whether it ran before the
/// invalidation (`started` still false after its version read means the
/// bump came after the read), and stores its value under the version read.
/// Value 1 = loaded from before the invalidation; 2 = after.
fn load_and_store(cache: &VersionedCache<u32>, started: &AtomicBool) {
    let look = cache.lookup(SCOPE, ITEM);
    let value = if started.load(Ordering::SeqCst) { 2 } else { 1 };
    cache.store(SCOPE, ITEM, look.version, value, TTL);
}

#[test]
fn loom_cache_load_racing_invalidation() {
    loom::model(|| {
        let cache = Arc::new(VersionedCache::<u32>::with_clock(16, ManualClock::new()));
        let started = Arc::new(AtomicBool::new(false));
        let _ = cache.lookup(SCOPE, ITEM);

        let loader = {
            let (cache, started) = (cache.clone(), started.clone());
            thread::spawn(move || load_and_store(&cache, &started))
        };
        let invalidator = {
            let (cache, started) = (cache.clone(), started.clone());
            thread::spawn(move || {
                started.store(true, Ordering::SeqCst);
                cache.invalidate_id(SCOPE);
                let after = cache.lookup(SCOPE, ITEM);
                assert_ne!(after.value, Some(1), "a pre-invalidation load is visible");
            })
        };
        loader.join().unwrap();
        invalidator.join().unwrap();
        let last = cache.lookup(SCOPE, ITEM);
        assert_ne!(last.value, Some(1), "a pre-invalidation load is visible");
    });
}

#[test]
fn loom_cache_two_invalidations_racing_a_load() {
    loom::model(|| {
        let cache = Arc::new(VersionedCache::<u32>::with_clock(16, ManualClock::new()));
        let started = Arc::new(AtomicBool::new(false));
        let initial = cache.lookup(SCOPE, ITEM).version;

        let loader = {
            let (cache, started) = (cache.clone(), started.clone());
            thread::spawn(move || load_and_store(&cache, &started))
        };
        let invalidators: Vec<_> = (0..2)
            .map(|_| {
                let (cache, started) = (cache.clone(), started.clone());
                thread::spawn(move || {
                    started.store(true, Ordering::SeqCst);
                    cache.invalidate_id(SCOPE)
                })
            })
            .collect();
        let versions: Vec<u64> = invalidators
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        loader.join().unwrap();
        assert_ne!(versions[0], versions[1]);
        assert!(versions.iter().all(|&v| v > initial));
        let last = cache.lookup(SCOPE, ITEM);
        assert_ne!(last.value, Some(1), "a pre-invalidation load is visible");
        assert_eq!(last.version, versions.iter().copied().max().unwrap());
    });
}
