//! The in-memory versioned cache (issue 7, Proof 2-4): scope isolation, the
//! seed's invalidation storm, stampedes, and linearizability per scope
//! (proptest over step-driven interleavings, with a naive cache run through
//! the same harness to show the property can fail).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use raceguard::cache::VersionedCache;
use raceguard::keys::UserId;
use raceguard::{ErrorKind, ManualClock};
use tokio::sync::oneshot;

const TTL: Duration = Duration::from_secs(60);

fn user(i: usize) -> UserId {
    UserId::new(format!("user-{i}")).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn yield_until(mut done: impl FnMut() -> bool) {
    for _ in 0..1_000_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition never became true");
}

#[test]
fn hit_miss_invalidate_and_isolation() {
    rt().block_on(async {
        let cache: VersionedCache<String> = VersionedCache::new(1_000);
        let (a, b) = (user(1), user(2));
        let load = |s: &'static str| move || async move { Ok::<_, std::io::Error>(s.to_string()) };
        assert_eq!(
            cache.get_or_load(&a, "h", TTL, load("a1")).await.unwrap(),
            "a1"
        );
        assert_eq!(
            cache.get_or_load(&b, "h", TTL, load("b1")).await.unwrap(),
            "b1"
        );
        assert_eq!(
            cache.get_or_load(&a, "h", TTL, load("a2")).await.unwrap(),
            "a1"
        );
        let v1 = cache.invalidate(&a);
        assert_eq!(
            cache.get_or_load(&a, "h", TTL, load("a3")).await.unwrap(),
            "a3"
        );
        assert_eq!(
            cache.get_or_load(&b, "h", TTL, load("b2")).await.unwrap(),
            "b1"
        );
        let v2 = cache.invalidate(&a);
        assert!(
            v2 > v1,
            "every invalidation takes effect with a new version"
        );
        assert_eq!(
            cache.get_or_load(&a, "h", TTL, load("a4")).await.unwrap(),
            "a4"
        );
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.loads, s.invalidations), (2, 4, 4, 2));
    });
}

#[test]
fn ttl_expiry_and_errors() {
    rt().block_on(async {
        let clock = Arc::new(ManualClock::new());
        let cache: VersionedCache<u32> = VersionedCache::with_clock(100, clock.clone());
        let a = user(1);
        let ok = |n: u32| move || async move { Ok::<_, std::io::Error>(n) };
        assert_eq!(cache.get_or_load(&a, "x", TTL, ok(1)).await.unwrap(), 1);
        clock.advance(TTL - Duration::from_millis(1));
        assert_eq!(cache.get_or_load(&a, "x", TTL, ok(2)).await.unwrap(), 1);
        clock.advance(Duration::from_millis(1));
        assert_eq!(cache.get_or_load(&a, "x", TTL, ok(3)).await.unwrap(), 3);

        let err = cache
            .get_or_load(&a, "y", TTL, || async {
                Err::<u32, _>(std::io::Error::other("db down"))
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Init);
        // Nothing was cached: the next call loads.
        assert_eq!(cache.get_or_load(&a, "y", TTL, ok(4)).await.unwrap(), 4);

        let err = cache
            .get_or_load(&a, "z", Duration::ZERO, ok(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    });
}

#[test]
fn bounded() {
    rt().block_on(async {
        let cache: VersionedCache<usize> = VersionedCache::new(64);
        for i in 0..10_000 {
            let u = user(i % 500);
            let item = format!("item-{i}");
            cache
                .get_or_load(&u, &item, TTL, || async move { Ok::<_, std::io::Error>(i) })
                .await
                .unwrap();
        }
        // Every value is still correct where present: a fresh item reloads.
        let u = user(0);
        let v = cache
            .get_or_load(&u, "fresh", TTL, || async { Ok::<_, std::io::Error>(7) })
            .await
            .unwrap();
        assert_eq!(v, 7);
        let dbg = format!("{cache:?}");
        assert!(dbg.contains("VersionedCache"));
    });
}

/// Proof 4: 1,000 concurrent misses of one key call the loader once. The
/// loader finishes only after all 1,000 callers have missed, so every one of
/// them is concurrent with the load.
#[test]
fn stampede_1000_misses_one_load() {
    const N: u64 = 1_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let cache: VersionedCache<u64> = VersionedCache::new(1_000);
        let calls = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..N {
            let cache = cache.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                let waiting = cache.clone();
                cache
                    .get_or_load(&user(0), "history:50:0", TTL, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        yield_until(|| waiting.stats().misses >= N).await;
                        Ok::<_, std::io::Error>(42)
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 42);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let s = cache.stats();
        assert_eq!((s.misses, s.loads), (N, 1));
    });
}

/// Proof 3, the seed's workload: 100 users x 10 concurrent messages, each
/// message invalidating its user's cache and reading it back. Every
/// invalidation takes effect (a new version, and the read after it returns
/// a value loaded after it); a user's loads come only from its own
/// invalidations; 100 quiet users keep a 100% hit rate throughout.
#[test]
fn invalidation_storm_100_users_x_10_messages() {
    const USERS: usize = 100;
    const MESSAGES: usize = 10;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let cache: VersionedCache<u64> = VersionedCache::new(10_000);
        // Per user: invalidations started, loads.
        let started: Arc<Vec<AtomicU64>> =
            Arc::new((0..2 * USERS).map(|_| AtomicU64::new(0)).collect());
        let loads: Arc<Vec<AtomicU64>> =
            Arc::new((0..2 * USERS).map(|_| AtomicU64::new(0)).collect());
        let read = |cache: VersionedCache<u64>,
                    started: Arc<Vec<AtomicU64>>,
                    loads: Arc<Vec<AtomicU64>>,
                    u: usize| async move {
            cache
                .get_or_load(&user(u), "history:50:0", TTL, || async move {
                    loads[u].fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(started[u].load(Ordering::SeqCst))
                })
                .await
                .unwrap()
        };
        for u in 0..2 * USERS {
            read(cache.clone(), started.clone(), loads.clone(), u).await;
        }
        let mut tasks = Vec::new();
        for u in 0..USERS {
            for _ in 0..MESSAGES {
                let (cache, started, loads) = (cache.clone(), started.clone(), loads.clone());
                tasks.push(tokio::spawn(async move {
                    let mine = started[u].fetch_add(1, Ordering::SeqCst) + 1;
                    let version = cache.invalidate(&user(u));
                    // This message's invalidation is done: the read must
                    // return a value whose load started after it.
                    let tag = read(cache.clone(), started.clone(), loads.clone(), u).await;
                    (u, version, tag, mine)
                }));
            }
        }
        let mut versions: HashMap<usize, Vec<u64>> = HashMap::new();
        for t in tasks {
            let (u, version, tag, mine) = t.await.unwrap();
            assert!(
                tag >= mine,
                "user {u} read a value loaded before its invalidation"
            );
            versions.entry(u).or_default().push(version);
        }
        for (u, mut vs) in versions {
            vs.sort_unstable();
            vs.dedup();
            assert_eq!(
                vs.len(),
                MESSAGES,
                "user {u}: an invalidation did not take effect"
            );
        }
        for u in 0..USERS {
            let l = loads[u].load(Ordering::SeqCst);
            assert!(
                (2..=1 + MESSAGES as u64).contains(&l),
                "user {u}: {l} loads for {MESSAGES} own invalidations"
            );
        }
        // Quiet users: unaffected by 1,000 invalidations of others.
        let hits_before = cache.stats().hits;
        for u in USERS..2 * USERS {
            read(cache.clone(), started.clone(), loads.clone(), u).await;
            assert_eq!(
                loads[u].load(Ordering::SeqCst),
                1,
                "quiet user {u} lost its entry"
            );
        }
        assert_eq!(cache.stats().hits - hits_before, USERS as u64);
        assert_eq!(cache.stats().invalidations, (USERS * MESSAGES) as u64);
    });
}

// ---------------------------------------------------------------------------
// Linearizability per scope: a step-driven harness.

/// A value carries the number of invalidations issued before its loader
/// started.
type Tagged = u64;

/// The naive cache of seed 001: a map, invalidation = delete.
#[derive(Default)]
struct NaiveCache {
    map: RefCell<HashMap<String, Tagged>>,
}

enum UnderTest {
    Versioned(VersionedCache<Tagged>),
    Naive(Rc<NaiveCache>),
}

#[derive(Clone, Debug)]
enum Op {
    /// Start a read of item `n % 2`.
    Get(u8),
    Invalidate,
    /// Let the `n`th (mod pending) unfinished loader finish.
    Release(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<u8>().prop_map(Op::Get),
        2 => Just(Op::Invalidate),
        3 => any::<u8>().prop_map(Op::Release),
    ]
}

#[derive(Default)]
struct World {
    invalidations: Cell<u64>,
    gates: RefCell<Vec<Option<oneshot::Sender<()>>>>,
}

impl World {
    async fn loader(self: Rc<Self>) -> Result<Tagged, std::io::Error> {
        let tag = self.invalidations.get();
        let (tx, rx) = oneshot::channel();
        self.gates.borrow_mut().push(Some(tx));
        rx.await.map_err(std::io::Error::other)?;
        Ok(tag)
    }

    fn release(&self, n: usize) {
        let mut gates = self.gates.borrow_mut();
        let open: Vec<usize> = (0..gates.len()).filter(|&i| gates[i].is_some()).collect();
        if !open.is_empty() {
            let _ = gates[open[n % open.len()]].take().unwrap().send(());
        }
    }

    fn release_all(&self) {
        for g in self.gates.borrow_mut().iter_mut() {
            if let Some(g) = g.take() {
                let _ = g.send(());
            }
        }
    }
}

async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

/// Runs `ops`; returns `(invalidations before the read started, tag read)`
/// for every read.
fn run(cache: UnderTest, ops: &[Op]) -> Vec<(u64, Tagged)> {
    let local = tokio::task::LocalSet::new();
    let rt = rt();
    let cache = Rc::new(cache);
    local.block_on(&rt, async move {
        let world = Rc::new(World::default());
        let scope = user(0);
        let mut reads = Vec::new();
        for op in ops {
            match op {
                Op::Get(n) => {
                    let item = format!("item-{}", n % 2);
                    let (cache, world, scope) = (cache.clone(), world.clone(), scope.clone());
                    let before = world.invalidations.get();
                    reads.push(tokio::task::spawn_local(async move {
                        let tag = match &*cache {
                            UnderTest::Versioned(c) => c
                                .get_or_load(&scope, &item, TTL, || world.clone().loader())
                                .await
                                .unwrap(),
                            UnderTest::Naive(c) => {
                                let hit = c.map.borrow().get(&item).copied();
                                match hit {
                                    Some(v) => v,
                                    None => {
                                        let v = world.clone().loader().await.unwrap();
                                        c.map.borrow_mut().insert(item, v);
                                        v
                                    }
                                }
                            }
                        };
                        (before, tag)
                    }));
                }
                Op::Invalidate => {
                    match &*cache {
                        UnderTest::Versioned(c) => {
                            c.invalidate(&scope);
                        }
                        UnderTest::Naive(c) => c.map.borrow_mut().clear(),
                    }
                    world.invalidations.set(world.invalidations.get() + 1);
                }
                Op::Release(n) => world.release(usize::from(*n)),
            }
            settle().await;
        }
        let mut out = Vec::new();
        for r in reads {
            loop {
                world.release_all();
                settle().await;
                if r.is_finished() {
                    break;
                }
            }
            out.push(r.await.unwrap());
        }
        out
    })
}

fn violations(reads: &[(u64, Tagged)]) -> usize {
    reads.iter().filter(|(before, tag)| tag < before).count()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// No read that starts after an invalidation returns a value whose load
    /// started before it.
    #[test]
    fn versioned_reads_never_see_values_loaded_before_an_invalidation(ops in proptest::collection::vec(op(), 1..40)) {
        let reads = run(UnderTest::Versioned(VersionedCache::new(100)), &ops);
        prop_assert_eq!(violations(&reads), 0, "{:?}", reads);
    }
}

/// The same harness catches the naive cache: a load started before an
/// invalidation stores its value after it, and a later read returns it.
#[test]
fn naive_cache_fails_the_same_property() {
    let ops = [Op::Get(0), Op::Invalidate, Op::Release(0), Op::Get(0)];
    let reads = run(UnderTest::Naive(Rc::default()), &ops);
    assert_eq!(violations(&reads), 1, "{reads:?}");
    let reads = run(UnderTest::Versioned(VersionedCache::new(100)), &ops);
    assert_eq!(violations(&reads), 0, "{reads:?}");
}
