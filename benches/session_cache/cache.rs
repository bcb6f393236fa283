//! Versioned-cache benchmarks (issue 7), run from `benches/session_cache.rs`.
//!
//! - `cache_memory_hit/{raceguard_get_or_load,moka_get}`: a hit through
//!   [`VersionedCache::get_or_load`] against a plain `moka::sync::Cache::get`
//!   of the same value type, in the same run. The hit completes on its first
//!   poll, so both sides run without an executor.
//! - `cache_redis_hit/{raceguard_get_or_load,plain_get}` (features `redis` +
//!   `test-util`, and `redis-server` on PATH): a hit through
//!   `RedisVersionedCache::get_or_load` (one script round trip) against a
//!   plain `GET` on the same shared connection, one call at a time.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use std::hint::black_box;

use criterion::Criterion;
use raceguard::cache::VersionedCache;
use raceguard::keys::UserId;

/// Polls `f` once: a cache hit never waits.
fn ready<F: Future>(f: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(f).poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a cache hit must complete on its first poll"),
    }
}

fn memory_hit(c: &mut Criterion) {
    let value: Arc<String> = Arc::new("x".repeat(64));
    let ttl = Duration::from_secs(3600);
    let users: Vec<UserId> = (0..1_000)
        .map(|i| UserId::new(format!("user-{i}")).unwrap())
        .collect();
    let items: Vec<String> = (0..1_000)
        .map(|i| format!("user-{i}:history:50:0"))
        .collect();

    let cache: VersionedCache<Arc<String>> = VersionedCache::new(10_000);
    let moka: moka::sync::Cache<String, Arc<String>> = moka::sync::Cache::new(10_000);
    for (u, item) in users.iter().zip(&items) {
        let v = value.clone();
        ready(cache.get_or_load(u, "history:50:0", ttl, || async move {
            Ok::<_, std::io::Error>(v)
        }))
        .unwrap();
        moka.insert(item.clone(), value.clone());
    }

    let mut g = c.benchmark_group("cache_memory_hit");
    let mut i = 0usize;
    g.bench_function("raceguard_get_or_load", |b| {
        b.iter(|| {
            i = (i + 1) % users.len();
            let hit = ready(cache.get_or_load(&users[i], "history:50:0", ttl, || async {
                Err::<Arc<String>, _>(std::io::Error::other("miss"))
            }));
            black_box(hit.unwrap())
        });
    });
    let mut i = 0usize;
    g.bench_function("moka_get", |b| {
        b.iter(|| {
            i = (i + 1) % items.len();
            black_box(moka.get(items[i].as_str()).unwrap())
        });
    });
    g.finish();
}

#[cfg(all(feature = "redis", feature = "test-util"))]
fn redis_hit(c: &mut Criterion) {
    use raceguard::cache::RedisVersionedCache;
    use raceguard::redis::{RedisBackend, RedisConfig};
    use raceguard::testing::RedisServer;

    let Some(server) = RedisServer::start_or_skip() else {
        eprintln!("cache_redis_hit: redis-server not found, skipped");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let backend = rt
        .block_on(RedisBackend::connect(server.url(), RedisConfig::default()))
        .unwrap();
    let cache: RedisVersionedCache<String> =
        RedisVersionedCache::new(backend.clone(), "chat").unwrap();
    let alice = UserId::new("alice").unwrap();
    let ttl = Duration::from_secs(3600);
    let value = "x".repeat(64);
    rt.block_on(async {
        let v = value.clone();
        cache
            .get_or_load(&alice, "history:50:0", ttl, || async move {
                Ok::<_, std::io::Error>(v)
            })
            .await
            .unwrap();
        let mut set = redis::cmd("SET");
        set.arg("plain:alice:history:50:0")
            .arg(serde_json_string(&value));
        backend.query::<()>(&set).await.unwrap();
    });

    let mut g = c.benchmark_group("cache_redis_hit");
    g.bench_function("raceguard_get_or_load", |b| {
        b.iter(|| {
            let hit = rt.block_on(cache.get_or_load(&alice, "history:50:0", ttl, || async {
                Err::<String, _>(std::io::Error::other("miss"))
            }));
            black_box(hit.unwrap())
        });
    });
    g.bench_function("plain_get", |b| {
        let mut get = redis::cmd("GET");
        get.arg("plain:alice:history:50:0");
        b.iter(|| {
            let v: Option<Vec<u8>> = rt.block_on(backend.query(&get)).unwrap();
            black_box(v.unwrap())
        });
    });
    g.finish();
    drop(server);
}

#[cfg(all(feature = "redis", feature = "test-util"))]
fn serde_json_string(s: &str) -> String {
    format!("\"{s}\"")
}

/// The versioned-cache groups.
pub(crate) fn benches(c: &mut Criterion) {
    memory_hit(c);
    #[cfg(all(feature = "redis", feature = "test-util"))]
    redis_hit(c);
}
