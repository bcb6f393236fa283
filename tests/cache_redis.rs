//! The versioned cache on a real `redis-server` (issue 7, Proof 2-4): the
//! linearizability property with concurrent tasks, the seed's invalidation
//! storm, a 1,000-miss stampede, key layout, and a Redis Cluster run.

#![cfg(all(feature = "redis", feature = "test-util"))]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use raceguard::cache::RedisVersionedCache;
use raceguard::keys::{Key, UserId};
use raceguard::redis::{RedisBackend, RedisConfig};
use raceguard::testing::RedisServer;

const TTL: Duration = Duration::from_secs(60);

fn user(i: usize) -> UserId {
    UserId::new(format!("user-{i}")).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn cache<V>(server: &RedisServer) -> RedisVersionedCache<V>
where
    V: Clone + serde::Serialize + serde::de::DeserializeOwned,
{
    let backend = RedisBackend::connect(server.url(), RedisConfig::default())
        .await
        .unwrap();
    RedisVersionedCache::new(backend, "chat").unwrap()
}

async fn yield_until(mut done: impl FnMut() -> bool) {
    let wait = async {
        while !done() {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("condition never became true");
}

#[test]
fn hit_miss_invalidate_isolation_and_layout() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let cache: RedisVersionedCache<Vec<String>> = cache(&server).await;
        let (a, b) = (user(1), user(2));
        let load =
            |s: &'static str| move || async move { Ok::<_, std::io::Error>(vec![s.to_string()]) };
        assert_eq!(
            cache
                .get_or_load(&a, "history:50:0", TTL, load("a1"))
                .await
                .unwrap(),
            ["a1"]
        );
        assert_eq!(
            cache
                .get_or_load(&b, "history:50:0", TTL, load("b1"))
                .await
                .unwrap(),
            ["b1"]
        );
        assert_eq!(
            cache
                .get_or_load(&a, "history:50:0", TTL, load("a2"))
                .await
                .unwrap(),
            ["a1"]
        );
        let v1 = cache.invalidate(&a).await.unwrap();
        assert_eq!(
            cache
                .get_or_load(&a, "history:50:0", TTL, load("a3"))
                .await
                .unwrap(),
            ["a3"]
        );
        assert_eq!(
            cache
                .get_or_load(&b, "history:50:0", TTL, load("b2"))
                .await
                .unwrap(),
            ["b1"]
        );
        let v2 = cache.invalidate(&a).await.unwrap();
        assert_eq!(v2, v1 + 1);
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.loads, s.invalidations), (2, 3, 3, 2));

        // Layout: version and values under the scope's hash tag, JSON values
        // with a TTL.
        let vkey = Key::builder("chat")
            .unwrap()
            .owner(&b)
            .part("version")
            .build()
            .unwrap();
        let bv: u64 = server.query(&["GET", vkey.as_str()]).unwrap();
        let value_key = Key::builder("chat")
            .unwrap()
            .owner(&b)
            .part(format!("v{bv}"))
            .part("history:50:0")
            .build()
            .unwrap()
            .into_string();
        assert_eq!(value_key, format!("chat:{{user-2}}:v{bv}:history%3A50%3A0"));
        let json: String = server.query(&["GET", &value_key]).unwrap();
        assert_eq!(json, r#"["b1"]"#);
        let pttl: i64 = server.query(&["PTTL", &value_key]).unwrap();
        assert!(pttl > 0 && pttl <= 60_000);
        assert_eq!(vkey.slot(), raceguard::keys::slot_of(value_key.as_bytes()));

        // A missing version key (evicted, flushed) restarts from a fresh
        // number, so old values never come back.
        let _: () = server.query(&["DEL", vkey.as_str()]).unwrap();
        assert_eq!(
            cache
                .get_or_load(&b, "history:50:0", TTL, load("b3"))
                .await
                .unwrap(),
            ["b3"]
        );

        // An undecodable entry is a miss, reloaded.
        let av: u64 = server.query(&["GET", "chat:{user-1}:version"]).unwrap();
        let akey = format!("chat:{{user-1}}:v{av}:history%3A50%3A0");
        let _: () = server.query(&["SET", &akey, "not json"]).unwrap();
        assert_eq!(
            cache
                .get_or_load(&a, "history:50:0", TTL, load("a4"))
                .await
                .unwrap(),
            ["a4"]
        );

        let err = cache
            .get_or_load(&a, "x", Duration::ZERO, load("never"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), raceguard::ErrorKind::InvalidInput);
    });
}

/// Proof 4 on Redis: 1,000 concurrent misses of one key, one load.
#[test]
fn stampede_1000_misses_one_load() {
    const N: u64 = 1_000;
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let cache: RedisVersionedCache<u64> = cache(&server).await;
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
                        // Every caller has missed before the load finishes.
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

/// Proof 3 on Redis: 100 users x 10 concurrent messages, one invalidation
/// per message.
#[test]
fn invalidation_storm_100_users_x_10_messages() {
    const USERS: usize = 100;
    const MESSAGES: usize = 10;
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let cache: RedisVersionedCache<u64> = cache(&server).await;
        let started: Arc<Vec<AtomicU64>> =
            Arc::new((0..2 * USERS).map(|_| AtomicU64::new(0)).collect());
        let loads: Arc<Vec<AtomicU64>> =
            Arc::new((0..2 * USERS).map(|_| AtomicU64::new(0)).collect());
        let read = |cache: RedisVersionedCache<u64>,
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
                    let version = cache.invalidate(&user(u)).await.unwrap();
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

/// Proof 2 on Redis: concurrent readers and invalidators over a few scopes
/// and items; no read that starts after an invalidation returned returns a
/// value whose load started before that invalidation did.
#[test]
fn concurrent_reads_never_see_values_loaded_before_an_invalidation() {
    const SCOPES: usize = 3;
    const TASKS: u64 = 16;
    const OPS: u64 = 60;
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let cache: RedisVersionedCache<u64> = cache(&server).await;
        let started: Arc<Vec<AtomicU64>> =
            Arc::new((0..SCOPES).map(|_| AtomicU64::new(0)).collect());
        let done: Arc<Vec<AtomicU64>> = Arc::new((0..SCOPES).map(|_| AtomicU64::new(0)).collect());
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (cache, started, done) = (cache.clone(), started.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut checked = 0u64;
                for _ in 0..OPS {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let s = (rng % SCOPES as u64) as usize;
                    if rng % 5 == 0 {
                        started[s].fetch_add(1, Ordering::SeqCst);
                        cache.invalidate(&user(s)).await.unwrap();
                        done[s].fetch_add(1, Ordering::SeqCst);
                    } else {
                        let item = format!("item-{}", (rng >> 8) % 2);
                        let before = done[s].load(Ordering::SeqCst);
                        let st = started.clone();
                        let tag = cache
                            .get_or_load(&user(s), &item, TTL, || async move {
                                let tag = st[s].load(Ordering::SeqCst);
                                tokio::task::yield_now().await;
                                Ok::<_, std::io::Error>(tag)
                            })
                            .await
                            .unwrap();
                        assert!(tag >= before, "scope {s}: stale read ({tag} < {before})");
                        checked += 1;
                    }
                }
                checked
            }));
        }
        let mut checked = 0;
        for t in tasks {
            checked += t.await.unwrap();
        }
        assert!(checked > 0);
        assert!(cache.stats().invalidations > 0);
    });
}

/// On a Redis Cluster: a scope's version and values share one slot, so the
/// read script runs on one node.
#[cfg(feature = "cluster")]
#[test]
fn works_on_a_cluster() {
    use raceguard::testing::RedisCluster;
    let Some(cluster) = RedisCluster::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let backend = RedisBackend::connect_cluster(&cluster.urls(), RedisConfig::default())
            .await
            .unwrap();
        let cache: RedisVersionedCache<String> = RedisVersionedCache::new(backend, "chat").unwrap();
        for i in 0..20 {
            let u = user(i);
            let load = move || async move { Ok::<_, std::io::Error>(format!("v{i}")) };
            assert_eq!(
                cache.get_or_load(&u, "h", TTL, load).await.unwrap(),
                format!("v{i}")
            );
            assert_eq!(
                cache.get_or_load(&u, "h", TTL, load).await.unwrap(),
                format!("v{i}")
            );
            cache.invalidate(&u).await.unwrap();
            let reload = move || async move { Ok::<_, std::io::Error>(format!("w{i}")) };
            assert_eq!(
                cache.get_or_load(&u, "h", TTL, reload).await.unwrap(),
                format!("w{i}")
            );
        }
        assert_eq!(cache.stats().hits, 20);
    });
}
