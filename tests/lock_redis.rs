//! The Redis lock backends against real servers: one server, a 3-master
//! Cluster, and Redlock over 5 independent servers. Mutual exclusion under
//! load, lease expiry with a stalled holder and fencing, restarts, stopped
//! nodes, cancelled acquires, and odd inputs.
//!
//! No sleeps as synchronisation: tests wait on the lost-lease signal, on
//! acquire deadlines, or on a condition (`wait_until`); the only bounds on
//! durations are generous "did not hang" limits.
#![cfg(all(feature = "redis", feature = "test-util"))]

use std::sync::Arc;
use std::time::{Duration, Instant};

use raceguard::keys::Key;
use raceguard::lock::{
    BackendKind, Fenced, Fencing, LockConfig, LockManager, LockName, LockOptions, LostReason,
};
use raceguard::redis::{RedisBackend, RedisConfig};
use raceguard::testing::{RedisCluster, RedisServer, RedisServers, wait_until};
use raceguard::{Error, ErrorKind};

const TASKS: usize = 32;
const CONNECTIONS: usize = 4;
const SECTIONS: usize = 100;

fn name(s: &str) -> LockName {
    LockName::new(s).unwrap()
}

fn lock_key(n: &LockName) -> String {
    Key::builder("lock")
        .unwrap()
        .owner(n)
        .build()
        .unwrap()
        .into_string()
}

fn fence_key(n: &LockName) -> String {
    Key::builder("lock")
        .unwrap()
        .owner(n)
        .part("fence")
        .build()
        .unwrap()
        .into_string()
}

fn redis_config() -> RedisConfig {
    RedisConfig::default()
        .connect_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(5))
}

fn lock_config() -> LockConfig {
    LockConfig::default()
        .retry(Duration::from_millis(1), Duration::from_millis(20))
        .node_timeout(Duration::from_secs(2))
}

async fn connect(url: &str) -> RedisBackend {
    RedisBackend::connect(url, redis_config()).await.unwrap()
}

/// 32 tasks over `managers` (one per connection), 100 critical sections
/// each: GET the counter, yield, SET it plus one, through `counters`.
async fn hammer(managers: Vec<LockManager>, counters: Vec<RedisBackend>, counter_key: &str) {
    let lock = name("counter");
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let locks = managers[t % managers.len()].clone();
        let redis = counters[t % counters.len()].clone();
        let (lock, key) = (lock.clone(), counter_key.to_owned());
        tasks.push(tokio::spawn(async move {
            let opts = LockOptions::new(Duration::from_secs(30)).wait(Duration::from_secs(120));
            for _ in 0..SECTIONS {
                let guard = locks.acquire(&lock, opts).await.unwrap();
                let v: Option<u64> = redis.query(redis::cmd("GET").arg(&key)).await.unwrap();
                tokio::task::yield_now().await;
                let _: () = redis
                    .query(redis::cmd("SET").arg(&key).arg(v.unwrap_or(0) + 1))
                    .await
                    .unwrap();
                assert!(guard.release().await.unwrap(), "released while held");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total: u64 = counters[0]
        .query(redis::cmd("GET").arg(counter_key))
        .await
        .unwrap();
    assert_eq!(total, (TASKS * SECTIONS) as u64, "an update was lost");
}

// ---------------------------------------------------------------- single node

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_mutual_exclusion_under_load() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let mut managers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        let redis = connect(server.url()).await;
        managers.push(LockManager::redis_with(redis.clone(), lock_config()).unwrap());
        conns.push(redis);
    }
    assert_eq!(managers[0].backend_kind(), BackendKind::Redis);
    hammer(managers, conns, "counter").await;
    assert_eq!(
        server
            .query::<Option<String>>(&["GET", &lock_key(&name("counter"))])
            .unwrap(),
        None,
        "the last release left no lock key"
    );
}

/// The same load with [`Fencing::Counter`]: the counter acquire excludes
/// as the clock-floored one does, counts once per granted acquire, and
/// reads the server clock only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_mutual_exclusion_under_load_with_counter_fencing() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let mut managers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        let redis = connect(server.url()).await;
        let config = lock_config().fencing(Fencing::Counter);
        managers.push(LockManager::redis_with(redis.clone(), config).unwrap());
        conns.push(redis);
    }
    let _: () = server.query(&["CONFIG", "RESETSTAT"]).unwrap();
    hammer(managers, conns, "counter").await;
    let lock = name("counter");
    assert_eq!(
        server
            .query::<Option<String>>(&["GET", &lock_key(&lock)])
            .unwrap(),
        None
    );
    let stats: String = server.query(&["INFO", "commandstats"]).unwrap();
    let calls = |cmd: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    // One Function call per attempt and per release: at least two per
    // critical section, none by EVALSHA ...
    let sections = (TASKS * SECTIONS) as u64;
    assert!(calls("fcall") >= 2 * sections, "{stats}");
    assert_eq!(calls("evalsha"), 0, "{stats}");
    // ... one INCR per granted acquire (a refused one does not count) ...
    assert_eq!(calls("incr"), sections, "{stats}");
    // ... and the server clock read once: by the first acquire, which found
    // no counter. Every other token was a plain INCR.
    assert_eq!(calls("time"), 1, "{stats}");
    // The first acquire found no counter and moved it up to the server
    // clock: it is µs-scale, not a small count.
    let counter: u64 = server.query(&["GET", &fence_key(&lock)]).unwrap();
    assert!(counter > 1_000_000_000_000_000, "{counter}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_stalled_holder_is_fenced_off_after_expiry() {
    stalled_holder_is_fenced_off(Fencing::ServerClock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_stalled_holder_is_fenced_off_after_expiry_with_counter_fencing() {
    stalled_holder_is_fenced_off(Fencing::Counter).await;
}

async fn stalled_holder_is_fenced_off(fencing: Fencing) {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let config = || lock_config().fencing(fencing);
    let locks = LockManager::redis_with(connect(server.url()).await, config()).unwrap();
    let other = LockManager::redis_with(connect(server.url()).await, config()).unwrap();
    let lock = name("report");
    let store = Arc::new(Fenced::new(Vec::<&str>::new()));

    let a = locks
        .acquire(&lock, LockOptions::new(Duration::from_millis(300)))
        .await
        .unwrap();
    let a_token = a.fencing_token().expect("fencing is on");
    let a_lost = a.lost();
    let (resume, stalled) = tokio::sync::oneshot::channel::<()>();
    let holder = {
        let store = store.clone();
        tokio::spawn(async move {
            stalled.await.unwrap(); // paused past the lease
            let late = store.write(a_token, |v| v.push("A (late)"));
            (late, a.release().await.unwrap())
        })
    };

    // The holder learns it lost the lease (validity ran out) ...
    assert_eq!(a_lost.await, LostReason::Expired);
    // ... a second client acquires once the key expired on the server ...
    let b = other
        .acquire(
            &lock,
            LockOptions::new(Duration::from_secs(30)).wait(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let b_token = b.fencing_token().unwrap();
    assert!(b_token > a_token);
    store.write(b_token, |v| v.push("B")).unwrap();

    // ... and the first holder's late write is refused.
    resume.send(()).unwrap();
    let (late, a_released) = holder.await.unwrap();
    assert!(
        matches!(late, Err(Error::StaleFencingToken { .. })),
        "{late:?}"
    );
    assert!(!a_released, "A's release must report the lock as lost");
    assert_eq!(store.read(|v| v.clone()), ["B"]);
    assert!(
        b.release().await.unwrap(),
        "A's release did not delete B's lock"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_restart_while_held_fires_the_signal() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let locks = LockManager::redis_with(connect(server.url()).await, lock_config()).unwrap();
    let g = locks
        .acquire(
            &name("restart"),
            LockOptions::new(Duration::from_millis(600)).watchdog(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    let token = g.lost_token();
    tokio::task::block_in_place(|| server.restart()).unwrap(); // no persistence: the key is gone
    let why = tokio::time::timeout(Duration::from_secs(30), g.lost())
        .await
        .expect("the lost-lease signal fired");
    assert!(
        matches!(why, LostReason::NotHeld | LostReason::Expired),
        "{why:?}"
    );
    assert!(token.is_cancelled());
    assert!(!g.is_held());
    assert!(!g.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_fencing_tokens_keep_increasing_across_a_restart_without_persistence() {
    tokens_keep_increasing_across_a_restart(Fencing::ServerClock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_counter_fencing_tokens_keep_increasing_across_a_restart_without_persistence() {
    tokens_keep_increasing_across_a_restart(Fencing::Counter).await;
}

/// The server clock in µs (`TIME`).
fn server_micros(server: &RedisServer) -> u64 {
    let t: Vec<u64> = server.query(&["TIME"]).unwrap();
    t[0] * 1_000_000 + t[1]
}

async fn tokens_keep_increasing_across_a_restart(fencing: Fencing) {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let config = lock_config().fencing(fencing);
    let locks = LockManager::redis_with(connect(server.url()).await, config).unwrap();
    let lock = name("fence");
    let mut last = None;
    for _ in 0..3 {
        let g = locks
            .try_acquire(&lock, LockOptions::default())
            .await
            .unwrap();
        assert!(g.fencing_token() > last);
        last = g.fencing_token();
        g.release().await.unwrap();
    }
    tokio::task::block_in_place(|| server.restart()).unwrap();
    assert_eq!(
        server
            .query::<Option<String>>(&["GET", &fence_key(&lock)])
            .unwrap(),
        None,
        "the counter is gone with the data"
    );
    let before = server_micros(&server);
    let g = locks
        .acquire(&lock, LockOptions::default().wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(
        g.fencing_token() > last,
        "{:?} after restart must exceed {last:?}",
        g.fencing_token()
    );
    // Not merely larger: restarted from the server clock.
    assert!(g.fencing_token().unwrap().get() >= before);
}

/// A counter lost while the server stays up (an eviction, a `DEL`, a
/// `FLUSHDB`): the counter mode's `INCR` answers 1, and the token handed out
/// comes from the compare-checked second step, above the server clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_counter_fencing_recovers_a_lost_counter_above_the_server_clock() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let config = lock_config().fencing(Fencing::Counter);
    let locks = LockManager::redis_with(connect(server.url()).await, config).unwrap();
    let lock = name("evicted");
    let first = locks
        .try_acquire(&lock, LockOptions::default())
        .await
        .unwrap();
    let t1 = first.fencing_token().unwrap();
    first.release().await.unwrap();
    let second = locks
        .try_acquire(&lock, LockOptions::default())
        .await
        .unwrap();
    let t2 = second.fencing_token().unwrap();
    assert_eq!(t2.get(), t1.get() + 1, "a live counter is a plain INCR");
    second.release().await.unwrap();

    let _: i64 = server.query(&["DEL", &fence_key(&lock)]).unwrap();
    let before = server_micros(&server);
    let third = locks
        .try_acquire(&lock, LockOptions::default())
        .await
        .unwrap();
    let t3 = third.fencing_token().unwrap();
    assert!(t3 > t2, "{t3} after the loss must exceed {t2}");
    assert!(
        t3.get() >= before,
        "{t3} is floored to the clock ({before})"
    );
    let stored: u64 = server.query(&["GET", &fence_key(&lock)]).unwrap();
    assert_eq!(stored, t3.get(), "the counter continues from the token");
    assert!(third.release().await.unwrap());
}

/// What separates the two fencing modes (`docs/GUARANTEES.md`): a counter
/// *rolled back* but present (a restart from an older snapshot, a failover
/// to a lagging replica). After an outage longer than the 65 ms margin the
/// server-clock mode issues a token above every earlier one; the counter
/// mode continues from the stale value and re-issues old tokens, as
/// documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_counter_is_caught_by_server_clock_fencing_only() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let redis = connect(server.url()).await;
    for (fencing, survives) in [(Fencing::ServerClock, true), (Fencing::Counter, false)] {
        let config = lock_config().fencing(fencing);
        let locks = LockManager::redis_with(redis.clone(), config).unwrap();
        let lock = name(&format!("rollback-{fencing:?}"));
        let mut tokens = Vec::new();
        for _ in 0..5 {
            let g = locks
                .try_acquire(&lock, LockOptions::default())
                .await
                .unwrap();
            tokens.push(g.fencing_token().unwrap().get());
            g.release().await.unwrap();
        }
        let last = *tokens.last().unwrap();
        // The counter as a snapshot taken two acquisitions ago left it.
        let stale = tokens[2].to_string();
        let _: () = server.query(&["SET", &fence_key(&lock), &stale]).unwrap();
        // An outage longer than the margin, on the server's own clock.
        assert!(wait_until(Duration::from_secs(10), || {
            server_micros(&server) > last + 70_000
        }));
        let g = locks
            .try_acquire(&lock, LockOptions::default())
            .await
            .unwrap();
        let next = g.fencing_token().unwrap().get();
        assert_eq!(
            next > last,
            survives,
            "{fencing:?}: {next} after {tokens:?}"
        );
        g.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_cancelled_acquire_leaves_no_key() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let locks = LockManager::redis_with(connect(server.url()).await, lock_config()).unwrap();
    // Load the scripts first, so the acquire below is one EVALSHA.
    locks
        .try_acquire(&name("warm-up"), LockOptions::default())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let lock = name("cancelled");
    tokio::task::block_in_place(|| server.pause()).unwrap();
    {
        let acquire = locks.acquire(&lock, LockOptions::new(Duration::from_secs(600)));
        // Sent, no reply (the server is stopped): the future is dropped.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), acquire)
                .await
                .is_err()
        );
    }
    tokio::task::block_in_place(|| server.resume()).unwrap();
    let (lk, fk) = (lock_key(&lock), fence_key(&lock));
    assert!(
        tokio::task::block_in_place(|| wait_until(Duration::from_secs(20), || {
            server
                .query::<Option<String>>(&["GET", &fk])
                .unwrap()
                .is_some()
                && server
                    .query::<Option<String>>(&["GET", &lk])
                    .unwrap()
                    .is_none()
        })),
        "the acquire script ran (its fencing counter exists) and its key was removed long before its 600 s TTL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_dropped_guard_releases_in_the_background() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let a = LockManager::redis_with(connect(server.url()).await, lock_config()).unwrap();
    let b = LockManager::redis_with(connect(server.url()).await, lock_config()).unwrap();
    let lock = name("dropped");
    let long = LockOptions::new(Duration::from_secs(600)).wait(Duration::from_secs(20));
    let g = a.acquire(&lock, long).await.unwrap();
    drop(g); // no await: the release is spawned
    // Acquired long before the 600 s TTL: the drop released it.
    let g = b.acquire(&lock, long).await.unwrap();
    assert!(g.release().await.unwrap());
}

#[test]
fn single_guard_dropped_outside_a_runtime_does_not_panic() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let lock = name("no-runtime");
    let g = rt.block_on(async {
        let locks = LockManager::redis_with(connect(server.url()).await, lock_config()).unwrap();
        locks
            .try_acquire(&lock, LockOptions::new(Duration::from_secs(600)))
            .await
            .unwrap()
    });
    drop(g); // no runtime: nothing to spawn on; the key expires with its TTL
    drop(rt);
    assert!(
        server
            .query::<Option<String>>(&["GET", &lock_key(&lock)])
            .unwrap()
            .is_some(),
        "documented: without a runtime the key is left to its TTL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_watchdog_keeps_the_lock_past_its_ttl_until_released() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let a = LockManager::redis_with(connect(server.url()).await, lock_config()).unwrap();
    let b = LockManager::redis_with(connect(server.url()).await, lock_config()).unwrap();
    let lock = name("watched");
    let g = a
        .acquire(
            &lock,
            LockOptions::new(Duration::from_millis(1500)).watchdog(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    // B keeps trying for two TTLs and never gets it.
    let err = b
        .acquire(
            &lock,
            LockOptions::new(Duration::from_secs(1)).wait(Duration::from_millis(3000)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LockBusy { .. }), "{err}");
    assert!(g.is_held());
    assert!(
        g.release().await.unwrap(),
        "still held thanks to the renewals"
    );
    // The released lock is not renewed any more: B gets it at once.
    let gb = b.try_acquire(&lock, LockOptions::default()).await.unwrap();
    assert!(gb.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_watchdog_stops_at_the_maximum_hold() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let a = LockManager::redis_with(connect(server.url()).await, lock_config()).unwrap();
    let b = LockManager::redis_with(connect(server.url()).await, lock_config()).unwrap();
    let lock = name("bounded");
    let g = a
        .acquire(
            &lock,
            LockOptions::new(Duration::from_millis(200)).watchdog(Duration::from_millis(500)),
        )
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(30), g.lost())
            .await
            .unwrap(),
        LostReason::Expired
    );
    let gb = b
        .acquire(&lock, LockOptions::default().wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(gb.fencing_token() > g.fencing_token());
    assert!(!g.release().await.unwrap());
    assert!(gb.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_small_and_odd_inputs() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let locks = LockManager::redis_with(connect(server.url()).await, lock_config()).unwrap();
    let lock = name("odd");

    // TTL 1 ms is inside the drift allowance: a typed error, never a panic.
    let err = locks
        .acquire(&lock, LockOptions::new(Duration::from_millis(1)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    // Sub-millisecond TTLs too.
    let err = locks
        .try_acquire(&lock, LockOptions::new(Duration::from_micros(10)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    // 3 ms leaves under a millisecond of validity: acquired, or given back
    // as a timeout when the round trip ate it. Never a panic.
    match locks
        .try_acquire(&lock, LockOptions::new(Duration::from_millis(3)))
        .await
    {
        Ok(g) => {
            // Released, or already expired: either way the key is gone.
            let _ = g.release().await.unwrap();
        }
        Err(Error::Timeout { op, .. }) => assert_eq!(op, "lock acquire"),
        Err(e) => panic!("unexpected {e}"),
    }

    // Zero deadline: one attempt.
    let held = locks
        .try_acquire(&lock, LockOptions::new(Duration::from_secs(60)))
        .await
        .unwrap();
    let err = locks
        .acquire(&lock, LockOptions::default().wait(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LockBusy { .. }));
    assert!(held.release().await.unwrap());

    // Without fencing: a bare SET NX PX, no token, no counter.
    let plain = name("plain");
    let g = locks
        .try_acquire(&plain, LockOptions::default().fencing(false))
        .await
        .unwrap();
    assert_eq!(g.fencing_token(), None);
    assert_eq!(
        server
            .query::<Option<String>>(&["GET", &fence_key(&plain)])
            .unwrap(),
        None
    );
    assert!(g.release().await.unwrap());

    // A name full of metacharacters stays one escaped key.
    let weird = name("*}:{lock:other");
    let g = locks
        .try_acquire(&weird, LockOptions::default())
        .await
        .unwrap();
    let keys: Vec<String> = server.query(&["KEYS", "*"]).unwrap();
    assert!(keys.contains(&lock_key(&weird)), "{keys:?}");
    assert!(g.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_ttl_shorter_than_the_retry_delay_hands_over() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let a = LockManager::redis_with(connect(server.url()).await, lock_config()).unwrap();
    let b = LockManager::redis_with(
        connect(server.url()).await,
        lock_config().retry(Duration::from_secs(2), Duration::from_secs(2)),
    )
    .unwrap();
    let lock = name("short");
    let g = a
        .try_acquire(&lock, LockOptions::new(Duration::from_millis(50)))
        .await
        .unwrap();
    std::mem::forget(g); // never released: only the TTL frees it
    let gb = b
        .acquire(&lock, LockOptions::default().wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(gb.release().await.unwrap());
}

// -------------------------------------------------------------------- cluster

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mutual_exclusion_under_load() {
    let Some(cluster) = RedisCluster::start_or_skip() else {
        return;
    };
    let urls = cluster.urls();
    let mut managers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        let redis = RedisBackend::connect_cluster(&urls, redis_config())
            .await
            .unwrap();
        managers.push(LockManager::redis_with(redis.clone(), lock_config()).unwrap());
        conns.push(redis);
    }
    assert_eq!(managers[0].backend_kind(), BackendKind::RedisCluster);

    // The lock key and its fencing counter share one slot.
    let lock = name("counter");
    assert_eq!(
        cluster.key_slot(&lock_key(&lock)).unwrap(),
        cluster.key_slot(&fence_key(&lock)).unwrap()
    );
    hammer(managers, conns, "counter").await;
    let owner = cluster.node_for_key(&fence_key(&lock)).unwrap();
    assert!(
        owner
            .query::<Option<u64>>(&["GET", &fence_key(&lock)])
            .unwrap()
            .is_some()
    );
}

/// The counter mode's `MULTI`/`EXEC` on a Cluster: both keys in one slot,
/// so the transaction goes to one node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mutual_exclusion_under_load_with_counter_fencing() {
    let Some(cluster) = RedisCluster::start_or_skip() else {
        return;
    };
    let urls = cluster.urls();
    let mut managers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        let redis = RedisBackend::connect_cluster(&urls, redis_config())
            .await
            .unwrap();
        let config = lock_config().fencing(Fencing::Counter);
        managers.push(LockManager::redis_with(redis.clone(), config).unwrap());
        conns.push(redis);
    }
    hammer(managers, conns, "counter").await;
    let lock = name("counter");
    let owner = cluster.node_for_key(&fence_key(&lock)).unwrap();
    let counter: u64 = owner.query(&["GET", &fence_key(&lock)]).unwrap();
    assert!(counter > 1_000_000_000_000_000, "{counter}");
}

// -------------------------------------------------------------------- redlock

async fn redlock_over(servers: &RedisServers) -> (LockManager, Vec<RedisBackend>) {
    let mut nodes = Vec::new();
    for s in servers.iter() {
        nodes.push(connect(s.url()).await);
    }
    (
        LockManager::redlock_with(nodes.clone(), lock_config()).unwrap(),
        nodes,
    )
}

fn keys_on(servers: &RedisServers, key: &str) -> Vec<Option<String>> {
    servers
        .iter()
        .map(|s| s.query::<Option<String>>(&["GET", key]).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_mutual_exclusion_under_load() {
    let Some(servers) = RedisServers::start_or_skip(5) else {
        return;
    };
    let mut managers = Vec::new();
    let mut counters = Vec::new();
    for _ in 0..CONNECTIONS {
        let (m, nodes) = redlock_over(&servers).await;
        managers.push(m);
        counters.push(nodes[0].clone()); // the counter lives on node 0
    }
    assert_eq!(
        managers[0].backend_kind(),
        BackendKind::Redlock { nodes: 5 }
    );
    hammer(managers, counters, "counter").await;
    assert!(
        keys_on(&servers, &lock_key(&name("counter")))
            .iter()
            .all(Option::is_none)
    );
}

/// Small and odd inputs on Redlock: no nodes, a TTL inside the drift
/// allowance, a zero deadline, a name full of metacharacters. Typed errors or
/// correct behaviour, and no key left on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_small_and_odd_inputs() {
    let Some(servers) = RedisServers::start_or_skip(3) else {
        return;
    };
    let none = LockManager::redlock_with(Vec::new(), lock_config());
    assert!(
        matches!(&none, Err(Error::InvalidInput { what, .. }) if *what == "lock.nodes"),
        "{:?}",
        none.map(|_| ())
    );
    let (locks, _nodes) = redlock_over(&servers).await;
    let lock = name("odd");

    // 1 ms is all drift (1% + 2 ms): refused before anything is sent.
    let err = locks
        .acquire(&lock, LockOptions::new(Duration::from_millis(1)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let err = locks
        .try_acquire(&lock, LockOptions::new(Duration::from_micros(10)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(
        keys_on(&servers, &lock_key(&lock))
            .iter()
            .all(Option::is_none)
    );

    // 3 ms leaves under a millisecond after drift: acquired, or a typed
    // failure when three round trips ate it. Never a panic, never a key left
    // behind once released.
    match locks
        .try_acquire(&lock, LockOptions::new(Duration::from_millis(3)))
        .await
    {
        Ok(g) => {
            let _ = g.release().await.unwrap();
        }
        Err(e) => assert!(
            matches!(
                e,
                Error::Timeout { .. } | Error::LockBusy { .. } | Error::QuorumNotReached { .. }
            ),
            "unexpected {e}"
        ),
    }

    // Zero deadline: one attempt, a typed busy error while another holds it.
    let held = locks
        .try_acquire(&lock, LockOptions::new(Duration::from_secs(60)))
        .await
        .unwrap();
    let err = locks
        .acquire(&lock, LockOptions::default().wait(Duration::ZERO))
        .await
        .unwrap_err();
    // Every node answered "held": busy, not a quorum failure.
    assert!(matches!(err, Error::LockBusy { .. }), "{err}");
    assert!(held.release().await.unwrap());
    assert!(
        keys_on(&servers, &lock_key(&lock))
            .iter()
            .all(Option::is_none)
    );

    // A name full of metacharacters stays one escaped key on each node.
    let weird = name("*}:{lock:other");
    let g = locks
        .try_acquire(&weird, LockOptions::default())
        .await
        .unwrap();
    // Acquire returns at quorum (2 of 3): the third SET may still be in
    // flight, or dropped unsent.
    let holding = keys_on(&servers, &lock_key(&weird))
        .iter()
        .filter(|k| k.is_some())
        .count();
    assert!(holding >= 2, "{holding} of 3 nodes hold the escaped key");
    assert!(g.release().await.unwrap());
    assert!(
        keys_on(&servers, &lock_key(&weird))
            .iter()
            .all(Option::is_none)
    );
}

/// Redlock refuses [`Fencing::Counter`], in the config and per
/// acquisition, with a typed error: independent nodes' counters drift apart
/// (a node that was down misses increments), so the largest counter of one
/// quorum can exceed the next quorum's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_refuses_counter_fencing() {
    let Some(servers) = RedisServers::start_or_skip(3) else {
        return;
    };
    let mut nodes = Vec::new();
    for s in servers.iter() {
        nodes.push(connect(s.url()).await);
    }
    let refused = LockManager::redlock_with(nodes.clone(), lock_config().fencing(Fencing::Counter));
    assert!(
        matches!(&refused, Err(Error::InvalidInput { what, .. }) if *what == "lock.fencing"),
        "{:?}",
        refused.map(|_| ())
    );
    let locks = LockManager::redlock_with(nodes, lock_config()).unwrap();
    let lock = name("redlock-counter");
    let per_call = locks
        .try_acquire(&lock, LockOptions::default().fencing(Fencing::Counter))
        .await;
    assert!(
        matches!(&per_call, Err(Error::InvalidInput { what, .. }) if *what == "lock.fencing"),
        "{:?}",
        per_call.map(|_| ())
    );
    assert!(
        keys_on(&servers, &lock_key(&lock))
            .iter()
            .all(Option::is_none),
        "a refused acquisition sent nothing"
    );
    // The default mode works on the same nodes.
    let g = locks
        .try_acquire(&lock, LockOptions::default())
        .await
        .unwrap();
    assert!(g.fencing_token().is_some());
    assert!(g.release().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_works_with_two_of_five_nodes_stopped() {
    let Some(servers) = RedisServers::start_or_skip(5) else {
        return;
    };
    let (locks, _nodes) = redlock_over(&servers).await;
    tokio::task::block_in_place(|| {
        servers[0].stop().unwrap();
        servers[3].stop().unwrap();
    });
    let lock = name("two-down");
    let g = locks
        .acquire(
            &lock,
            LockOptions::new(Duration::from_secs(30)).wait(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    assert!(g.fencing_token().is_some());
    assert!(g.is_held());
    g.extend(Duration::from_secs(30)).await.unwrap();
    assert!(g.release().await.unwrap());
    for i in [1, 2, 4] {
        assert_eq!(
            servers[i]
                .query::<Option<String>>(&["GET", &lock_key(&lock)])
                .unwrap(),
            None
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_with_three_of_five_stopped_fails_with_a_quorum_error_and_leaves_no_key() {
    let Some(servers) = RedisServers::start_or_skip(5) else {
        return;
    };
    let (locks, _nodes) = redlock_over(&servers).await;
    tokio::task::block_in_place(|| {
        for i in [0, 2, 4] {
            servers[i].stop().unwrap();
        }
    });
    let lock = name("three-down");
    let wait = Duration::from_secs(1);
    let started = Instant::now();
    let err = locks
        .acquire(&lock, LockOptions::new(Duration::from_secs(30)).wait(wait))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < wait + Duration::from_secs(10),
        "returned near its deadline"
    );
    assert!(err.is_retryable());
    assert_eq!(err.kind(), ErrorKind::Lock);
    match err {
        Error::QuorumNotReached { granted, needed } => {
            assert_eq!(needed, 3);
            assert!(granted <= 2);
        }
        other => panic!("expected a quorum error, got {other}"),
    }
    tokio::task::block_in_place(|| {
        for i in [0, 2, 4] {
            servers[i].restart().unwrap();
        }
    });
    assert_eq!(
        keys_on(&servers, &lock_key(&lock)),
        vec![None; 5],
        "no lock key anywhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_partial_acquire_leaves_no_key() {
    let Some(servers) = RedisServers::start_or_skip(5) else {
        return;
    };
    let (locks, _nodes) = redlock_over(&servers).await;
    let lock = name("partial");
    let key = lock_key(&lock);
    // Another owner holds it on three nodes: we can get at most two.
    for i in 0..3 {
        servers[i]
            .cmd(&["SET", &key, "someone-else", "PX", "600000"])
            .unwrap();
    }
    let err = locks
        .try_acquire(&lock, LockOptions::new(Duration::from_secs(30)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LockBusy { .. }), "{err}");
    let seen = keys_on(&servers, &key);
    assert_eq!(
        seen,
        vec![
            Some("someone-else".into()),
            Some("someone-else".into()),
            Some("someone-else".into()),
            None,
            None
        ],
        "our two grants were given back; the other owner's keys are untouched"
    );
}
