//! R03 (seed 001, issue #2): pattern-based cache invalidation. The backend
//! caches each user's history at `chat:history:<user>:50:0` and, when a
//! user sends a message, deletes `chat:*:50:0` (SCAN MATCH + DEL): the
//! pattern matches every user's entry, so user A's message wipes user B's
//! cache, and the next invalidations find nothing ("Invalidated 0 cache
//! keys"): an invalidation storm with every request hitting the database.
//!
//! raceguard's versioned namespaces invalidate with one version bump per
//! scope: another user's entries are never touched, and every invalidation
//! takes effect. (The naive `SCAN` + `DEL` exists only in this test; the
//! crate contains none.)

#![cfg(all(feature = "redis", feature = "test-util"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use raceguard::cache::{RedisVersionedCache, VersionedCache};
use raceguard::keys::UserId;
use raceguard::redis::{RedisBackend, RedisConfig};
use raceguard::testing::RedisServer;

use crate::support::Sequencer;

const TTL: Duration = Duration::from_secs(300);

/// The seed's invalidation: SCAN MATCH pattern, DEL what matched; returns
/// how many keys it deleted.
async fn naive_invalidate(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> usize {
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(100)
            .query_async(conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let n: usize = redis::cmd("DEL")
                .arg(&keys)
                .query_async(conn)
                .await
                .unwrap();
            deleted += n;
        }
        if next == 0 {
            return deleted;
        }
        cursor = next;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_version_fails() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let mut conn = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let seq = Arc::new(Sequencer::new());
    // Step 0: both users' histories are cached.
    {
        let _t = seq.turn(0).await;
        for user in ["USER_A", "USER_B"] {
            let _: () = redis::cmd("SET")
                .arg(format!("chat:history:{user}:50:0"))
                .arg(format!("{user}'s history"))
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    // Steps 1..4: user A sends three messages; each invalidates "its" cache
    // with the seed's pattern.
    let mut counts = Vec::new();
    for step in 1..4 {
        let _t = seq.turn(step).await;
        counts.push(naive_invalidate(&mut conn, "chat:*:50:0").await);
    }
    // Step 4: user B reads its history.
    let _t = seq.turn(4).await;
    let b: Option<String> = redis::cmd("GET")
        .arg("chat:history:USER_B:50:0")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        b, None,
        "user A's invalidation deleted user B's cache entry"
    );
    assert_eq!(
        counts,
        [2, 0, 0],
        "Invalidated 2, then 0, then 0 cache keys"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raceguard_prevents() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let backend = RedisBackend::connect(server.url(), RedisConfig::default())
        .await
        .unwrap();
    let cache: RedisVersionedCache<String> = RedisVersionedCache::new(backend, "chat").unwrap();
    let (a, b) = (
        UserId::new("USER_A").unwrap(),
        UserId::new("USER_B").unwrap(),
    );
    let db_reads = Arc::new(AtomicUsize::new(0));
    let read = {
        let (cache, db) = (cache.clone(), db_reads.clone());
        move |u: UserId| {
            let (cache, db) = (cache.clone(), db.clone());
            async move {
                let name = u.to_string();
                cache
                    .get_or_load(&u, "history:50:0", TTL, || async move {
                        let n = db.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, std::io::Error>(format!("{name} history #{n}"))
                    })
                    .await
                    .unwrap()
            }
        }
    };

    // The same schedule: both cached, A invalidates three times, B reads.
    let seq = Sequencer::new();
    let b_before = {
        let _t = seq.turn(0).await;
        read(a.clone()).await;
        read(b.clone()).await
    };
    let mut versions = Vec::new();
    for step in 1..4 {
        let _t = seq.turn(step).await;
        versions.push(cache.invalidate(&a).await.unwrap());
        // Each invalidation took effect: A's next read reloads.
        let hist = read(a.clone()).await;
        assert!(hist.starts_with("USER_A"));
    }
    let _t = seq.turn(4).await;
    assert_eq!(
        read(b.clone()).await,
        b_before,
        "B's entry survived A's invalidations"
    );
    assert!(
        versions.windows(2).all(|w| w[1] > w[0]),
        "every invalidation took effect: {versions:?}"
    );
    assert_eq!(
        db_reads.load(Ordering::SeqCst),
        2 + 3,
        "only A reloaded, once per invalidation"
    );

    // Real concurrency: 20 users, each invalidating 10 times while reading
    // another user's entry; nobody's reads of other users ever miss.
    let users: Vec<UserId> = (0..20)
        .map(|i| UserId::new(format!("u{i}")).unwrap())
        .collect();
    for u in &users {
        read(u.clone()).await;
    }
    let loads_before = db_reads.load(Ordering::SeqCst);
    let tasks: Vec<_> = (0..users.len())
        .map(|i| {
            let (cache, me, other) = (
                cache.clone(),
                users[i].clone(),
                users[(i + 1) % users.len()].clone(),
            );
            let read = read.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    cache.invalidate(&me).await.unwrap();
                    read(other.clone()).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Each read of `other` either hit, or reloaded because `other` itself
    // invalidated: at most one load per invalidation of that user.
    let loads = db_reads.load(Ordering::SeqCst) - loads_before;
    assert!(
        loads <= 20 * 10,
        "{loads} loads for 200 own-scope invalidations"
    );

    // The memory backend, same schedule.
    let mem: VersionedCache<String> = VersionedCache::new(100);
    let load = |s: &'static str| move || async move { Ok::<_, std::io::Error>(s.to_string()) };
    mem.get_or_load(&a, "history:50:0", TTL, load("a"))
        .await
        .unwrap();
    mem.get_or_load(&b, "history:50:0", TTL, load("b"))
        .await
        .unwrap();
    for _ in 0..3 {
        mem.invalidate(&a);
    }
    assert_eq!(
        mem.get_or_load(&b, "history:50:0", TTL, load("b2"))
            .await
            .unwrap(),
        "b"
    );
    assert_eq!(
        mem.get_or_load(&a, "history:50:0", TTL, load("a2"))
            .await
            .unwrap(),
        "a2"
    );
}
