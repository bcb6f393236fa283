//! R14 (seed 001, the invalidation storm): cache-miss stampede. Naive
//! cache-aside (`if get(k) is None: v = db(); set(k, v)`) lets every request
//! that misses while the value is being computed recompute it: N concurrent
//! misses, N database queries. raceguard's `get_or_load` coalesces the
//! misses of one `(scope, version, item)`: one load, shared.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raceguard::cache::VersionedCache;
use raceguard::keys::UserId;

use crate::support::Sequencer;

const REQUESTS: usize = 50;
const TTL: Duration = Duration::from_secs(60);
const STUCK: Duration = Duration::from_secs(20);

async fn until(cond: impl Fn() -> bool) {
    let spin = async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(STUCK, spin).await.expect("stuck");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn naive_version_fails() {
    let cache: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let db_queries = Arc::new(AtomicUsize::new(0));
    let seq = Arc::new(Sequencer::new());
    // Schedule: every request checks the cache (steps 0..N) before any
    // recomputed value is stored (steps N..2N).
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let (cache, db, seq) = (cache.clone(), db_queries.clone(), seq.clone());
            tokio::spawn(async move {
                let hit = {
                    let _t = seq.turn(i).await;
                    cache.lock().unwrap().get("chat:history:alice").cloned()
                };
                match hit {
                    Some(v) => v,
                    None => {
                        let _t = seq.turn(REQUESTS + i).await;
                        db.fetch_add(1, Ordering::SeqCst);
                        let v = "alice's history".to_string();
                        cache
                            .lock()
                            .unwrap()
                            .insert("chat:history:alice".into(), v.clone());
                        v
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        db_queries.load(Ordering::SeqCst),
        REQUESTS,
        "every request of the burst queried the database"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raceguard_prevents() {
    let alice = UserId::new("alice").unwrap();
    // The same schedule: every request misses (steps 0..N) before the load
    // completes.
    let cache: VersionedCache<String> = VersionedCache::new(100);
    let db_queries = Arc::new(AtomicUsize::new(0));
    let seq = Arc::new(Sequencer::new());
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let (cache, db, seq, alice) = (
                cache.clone(),
                db_queries.clone(),
                seq.clone(),
                alice.clone(),
            );
            tokio::spawn(async move {
                drop(seq.turn(i).await);
                let watch = cache.clone();
                cache
                    .get_or_load(&alice, "history:50:0", TTL, || async move {
                        until(|| watch.stats().misses == REQUESTS as u64).await;
                        db.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, std::io::Error>("alice's history".to_string())
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "alice's history");
    }
    assert_eq!(seq.completed(), REQUESTS);
    assert_eq!(
        db_queries.load(Ordering::SeqCst),
        1,
        "one load for the burst"
    );

    // Real concurrency, no schedule: after an invalidation, a burst released
    // at once; at most one load per version.
    cache.invalidate(&alice);
    let barrier = Arc::new(tokio::sync::Barrier::new(REQUESTS));
    let db_queries = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (cache, db, barrier, alice) = (
                cache.clone(),
                db_queries.clone(),
                barrier.clone(),
                alice.clone(),
            );
            tokio::spawn(async move {
                barrier.wait().await;
                cache
                    .get_or_load(&alice, "history:50:0", TTL, || async move {
                        db.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        Ok::<_, std::io::Error>("fresh".to_string())
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "fresh");
    }
    assert_eq!(
        db_queries.load(Ordering::SeqCst),
        1,
        "one load for the burst"
    );
}
