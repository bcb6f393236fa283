//! R06 (seed 001, fix 4): the "cache lock" that is not a lock.
//!
//! The seed's `with_cache_lock(user_id, operation)`:
//!
//! ```python
//! lock = redis.set(f"lock:chat:{user_id}", "1", nx=True, ex=10)
//! if not lock:
//!     await asyncio.sleep(0.5)      # "wait for lock release"
//!     return await operation()      # ... and run anyway
//! try:
//!     return await operation()
//! finally:
//!     redis.delete(lock_key)        # unconditional DEL
//! ```
//!
//! Two failures, each forced with the [`Sequencer`]:
//!
//! 1. a request that finds the lock taken runs the operation anyway: two
//!    read-modify-writes interleave and one update is lost;
//! 2. a holder slower than the TTL deletes the *next* holder's lock on its
//!    way out, and a third request acquires while the second is still
//!    inside: two holders at once.
//!
//! raceguard's lock never runs anyway (a busy lock is an error or a wait),
//! releases with compare-and-delete, tells the slow holder it lost its lease,
//! and fences its late write off.

#![cfg(all(feature = "redis", feature = "test-util"))]

use std::sync::Arc;
use std::time::Duration;

use raceguard::Error;
use raceguard::keys::Key;
use raceguard::lock::{Fenced, LockConfig, LockManager, LockName, LockOptions, LostReason};
use raceguard::redis::{RedisBackend, RedisConfig};
use raceguard::testing::{RedisServer, wait_until};
use redis::AsyncCommands;

use super::support::Sequencer;

const LOCK: &str = "lock:chat:alice";
const COUNTER: &str = "chat:alice:messages";

async fn get(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    conn.get::<_, Option<u64>>(COUNTER)
        .await
        .unwrap()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_version_fails() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let client = server.client();
    let seq = Arc::new(Sequencer::new());

    // --- 1. "run anyway" loses an update --------------------------------
    let a = {
        let (seq, mut conn) = (
            seq.clone(),
            client.get_multiplexed_async_connection().await.unwrap(),
        );
        tokio::spawn(async move {
            let v = {
                let _t = seq.turn(0).await;
                let locked: bool = redis::cmd("SET")
                    .arg(LOCK)
                    .arg("1")
                    .arg("NX")
                    .arg("EX")
                    .arg(10)
                    .query_async::<Option<String>>(&mut conn)
                    .await
                    .unwrap()
                    .is_some();
                assert!(locked);
                get(&mut conn).await
            };
            let _t = seq.turn(2).await;
            let _: () = conn.set(COUNTER, v + 1).await.unwrap();
            let _: () = conn.del(LOCK).await.unwrap(); // finally: delete
        })
    };
    let b = {
        let (seq, mut conn) = (
            seq.clone(),
            client.get_multiplexed_async_connection().await.unwrap(),
        );
        tokio::spawn(async move {
            let v = {
                let _t = seq.turn(1).await;
                let locked = redis::cmd("SET")
                    .arg(LOCK)
                    .arg("1")
                    .arg("NX")
                    .arg("EX")
                    .arg(10)
                    .query_async::<Option<String>>(&mut conn)
                    .await
                    .unwrap()
                    .is_some();
                assert!(!locked, "A holds it");
                // asyncio.sleep(0.5), then the operation anyway:
                get(&mut conn).await
            };
            let _t = seq.turn(3).await;
            let _: () = conn.set(COUNTER, v + 1).await.unwrap();
        })
    };
    a.await.unwrap();
    b.await.unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    assert_eq!(
        get(&mut conn).await,
        1,
        "two operations ran, one update survived"
    );

    // --- 2. a slow holder deletes the next holder's lock -------------------
    let set_nx = |ttl_ms: u64| {
        let mut c = redis::cmd("SET");
        c.arg(LOCK).arg("1").arg("NX").arg("PX").arg(ttl_ms);
        c
    };
    let mut slow = client.get_multiplexed_async_connection().await.unwrap();
    let mut next = client.get_multiplexed_async_connection().await.unwrap();
    let mut third = client.get_multiplexed_async_connection().await.unwrap();
    // The seed's EX 10 shortened to 200 ms so the test need not wait 10 s.
    assert!(
        set_nx(200)
            .query_async::<Option<String>>(&mut slow)
            .await
            .unwrap()
            .is_some()
    );
    // ... the operation outlives the TTL; the key expires ...
    assert!(tokio::task::block_in_place(|| wait_until(
        Duration::from_secs(10),
        || {
            server
                .query::<Option<String>>(&["GET", LOCK])
                .unwrap()
                .is_none()
        }
    )));
    // The next request acquires and starts its operation.
    assert!(
        set_nx(10_000)
            .query_async::<Option<String>>(&mut next)
            .await
            .unwrap()
            .is_some()
    );
    // The slow one finishes: `finally: redis.delete(lock_key)`.
    let _: () = slow.del(LOCK).await.unwrap();
    // A third request acquires while the second is still inside.
    let third_got_it = set_nx(10_000)
        .query_async::<Option<String>>(&mut third)
        .await
        .unwrap()
        .is_some();
    assert!(
        third_got_it,
        "two holders at once: the slow holder deleted the next holder's lock"
    );
}

fn redis_config() -> RedisConfig {
    RedisConfig::default().response_timeout(Duration::from_secs(5))
}

fn lock_config() -> LockConfig {
    LockConfig::default().retry(Duration::from_millis(1), Duration::from_millis(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raceguard_prevents() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let mut managers = Vec::new();
    for _ in 0..3 {
        let redis = RedisBackend::connect(server.url(), redis_config())
            .await
            .unwrap();
        managers.push(LockManager::redis_with(redis, lock_config()).unwrap());
    }
    let lock = LockName::new("chat:alice").unwrap();
    let lock_key = Key::builder("lock")
        .unwrap()
        .owner(&lock)
        .build()
        .unwrap()
        .into_string();
    let client = server.client();
    let seq = Arc::new(Sequencer::new());
    let long = LockOptions::new(Duration::from_secs(10)).wait(Duration::from_secs(20));

    // --- 1. same schedule: B never runs anyway, it waits ------------------
    let a = {
        let (seq, locks, lock) = (seq.clone(), managers[0].clone(), lock.clone());
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        tokio::spawn(async move {
            let (g, v) = {
                let _t = seq.turn(0).await;
                let g = locks.acquire(&lock, long).await.unwrap();
                (g, get(&mut conn).await)
            };
            let _t = seq.turn(2).await;
            let _: () = conn.set(COUNTER, v + 1).await.unwrap();
            assert!(g.release().await.unwrap());
        })
    };
    let b = {
        let (seq, locks, lock) = (seq.clone(), managers[1].clone(), lock.clone());
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        tokio::spawn(async move {
            {
                let _t = seq.turn(1).await;
                let busy = locks.try_acquire(&lock, long).await.unwrap_err();
                assert!(matches!(busy, Error::LockBusy { .. }), "no 'run anyway'");
            }
            let g = locks.acquire(&lock, long).await.unwrap(); // waits for A
            let v = get(&mut conn).await;
            let _: () = conn.set(COUNTER, v + 1).await.unwrap();
            assert!(g.release().await.unwrap());
        })
    };
    a.await.unwrap();
    b.await.unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    assert_eq!(get(&mut conn).await, 2, "no update lost");

    // --- 2. the slow holder cannot delete the next holder's lock ----------
    let store = Fenced::new(Vec::<&str>::new());
    let slow = managers[0]
        .acquire(&lock, LockOptions::new(Duration::from_millis(200)))
        .await
        .unwrap();
    let slow_token = slow.fencing_token().unwrap();
    // It learns that it lost the lease instead of finding out too late.
    assert_eq!(slow.lost().await, LostReason::Expired);
    let next = managers[1].acquire(&lock, long).await.unwrap();
    store
        .write(next.fencing_token().unwrap(), |v| v.push("next"))
        .unwrap();
    // The slow holder's late write and late release change nothing.
    assert!(matches!(
        store.write(slow_token, |v| v.push("slow")),
        Err(Error::StaleFencingToken { .. })
    ));
    assert!(
        !slow.release().await.unwrap(),
        "compare-and-delete left the next holder's lock"
    );
    assert!(
        server
            .query::<Option<String>>(&["GET", &lock_key])
            .unwrap()
            .is_some()
    );
    // So a third request cannot get in while the second is inside.
    assert!(matches!(
        managers[2].try_acquire(&lock, long).await,
        Err(Error::LockBusy { .. })
    ));
    assert!(next.release().await.unwrap());
    assert_eq!(store.read(|v| v.clone()), ["next"]);

    // --- 3. real concurrency: 16 requests x 25 operations, none lost ------
    let _: () = conn.set(COUNTER, 0).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (locks, lock) = (managers[t % 3].clone(), lock.clone());
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                let g = locks.acquire(&lock, long).await.unwrap();
                let v = get(&mut conn).await;
                tokio::task::yield_now().await;
                let _: () = conn.set(COUNTER, v + 1).await.unwrap();
                assert!(g.release().await.unwrap());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(get(&mut conn).await, 16 * 25);
}
