//! Feature `metrics`: what lock managers report through the `metrics`
//! facade, on the memory backend (driven by a `ManualClock`) and, with a
//! Redis server, on Redis and Redlock.
//!
//! Each manager is built inside `metrics::with_local_recorder` (handles are
//! registered at build time), so there is no global state and the tests run
//! in parallel. The recorder is the small one of `tests/metrics_queue.rs`
//! over metrics-util's atomic `Registry`, with histograms kept too, so the
//! exact wait samples can be read.
//!
//! No sleeps as synchronisation and no timing assertions: a waiting acquire
//! is polled once by hand (its first attempt runs and it parks), the lease
//! clock is moved by hand, and a deadline only decides when an acquire
//! gives up on a lock that is held for much longer.

#![cfg(feature = "metrics")]

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use raceguard::lock::{LockConfig, LockManager, LockName, LockOptions, LostReason};
use raceguard::{Error, ManualClock};

const ACQUIRED: &str = "raceguard_lock_acquired_total";
const BUSY: &str = "raceguard_lock_busy_total";
const LOST: &str = "raceguard_lock_lost_total";
const RELEASED: &str = "raceguard_lock_released_total";
const WAIT: &str = "raceguard_lock_wait_seconds";

/// A local recorder whose values can be read any number of times.
struct Recorded {
    registry: Registry<Key, AtomicStorage>,
}

impl Recorder for Recorded {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.registry
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

fn sorted(labels: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut l: Vec<_> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    l
}

fn labels_of(key: &Key) -> Vec<(String, String)> {
    let mut l: Vec<_> = key
        .labels()
        .map(|l| (l.key().to_string(), l.value().to_string()))
        .collect();
    l.sort();
    l
}

/// The labels of one manager's series, plus `extra`.
fn with<'a>(
    manager: &'a str,
    backend: &'a str,
    extra: Option<(&'a str, &'a str)>,
) -> Vec<(&'a str, &'a str)> {
    let mut l = vec![("manager", manager), ("backend", backend)];
    l.extend(extra);
    l
}

impl Recorded {
    fn new() -> Self {
        Recorded {
            registry: Registry::atomic(),
        }
    }

    /// Builds something with this recorder as the current one.
    fn build<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(self, f)
    }

    /// The counter `name` with exactly `labels`; panics if never registered.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let want = sorted(labels);
        self.registry
            .get_counter_handles()
            .into_iter()
            .find(|(k, _)| k.name() == name && labels_of(k) == want)
            .map(|(_, v)| v.load(Ordering::SeqCst))
            .unwrap_or_else(|| panic!("counter {name} {labels:?} not registered"))
    }

    /// The samples of histogram `name` with exactly `labels`; panics if
    /// never registered.
    fn samples(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        let want = sorted(labels);
        self.registry
            .get_histogram_handles()
            .into_iter()
            .find(|(k, _)| k.name() == name && labels_of(k) == want)
            .map(|(_, h)| h.data())
            .unwrap_or_else(|| panic!("histogram {name} {labels:?} not registered"))
    }

    /// Every series' `(name, labels)`.
    fn series(&self) -> Vec<(String, Vec<(String, String)>)> {
        let mut keys: Vec<Key> = self.registry.get_counter_handles().into_keys().collect();
        keys.extend(self.registry.get_histogram_handles().into_keys());
        keys.extend(self.registry.get_gauge_handles().into_keys());
        let mut s: Vec<_> = keys
            .iter()
            .map(|k| (k.name().to_string(), labels_of(k)))
            .collect();
        s.sort();
        s
    }

    /// One manager's counts, in a fixed order: acquired, busy, timeout,
    /// quorum, lost expired, lost not held, released held, released gone.
    fn counts(&self, manager: &str, backend: &str) -> [u64; 8] {
        let c = |name, extra| self.counter(name, &with(manager, backend, extra));
        [
            c(ACQUIRED, None),
            c(BUSY, Some(("reason", "busy"))),
            c(BUSY, Some(("reason", "timeout"))),
            c(BUSY, Some(("reason", "quorum"))),
            c(LOST, Some(("reason", "expired"))),
            c(LOST, Some(("reason", "not_held"))),
            c(RELEASED, Some(("held", "true"))),
            c(RELEASED, Some(("held", "false"))),
        ]
    }

    /// One manager's wait samples: (acquired, gave up).
    fn waits(&self, manager: &str, backend: &str) -> (Vec<f64>, Vec<f64>) {
        (
            self.samples(WAIT, &with(manager, backend, Some(("outcome", "acquired")))),
            self.samples(WAIT, &with(manager, backend, Some(("outcome", "gave_up")))),
        )
    }
}

/// The exact set of series one manager registers.
fn expected_series(manager: &str, backend: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut s: Vec<_> = [
        (ACQUIRED, None),
        (BUSY, Some(("reason", "busy"))),
        (BUSY, Some(("reason", "timeout"))),
        (BUSY, Some(("reason", "quorum"))),
        (LOST, Some(("reason", "expired"))),
        (LOST, Some(("reason", "not_held"))),
        (RELEASED, Some(("held", "true"))),
        (RELEASED, Some(("held", "false"))),
        (WAIT, Some(("outcome", "acquired"))),
        (WAIT, Some(("outcome", "gave_up"))),
    ]
    .into_iter()
    .map(|(name, extra)| (name.to_string(), sorted(&with(manager, backend, extra))))
    .collect();
    s.sort();
    s
}

fn name(s: &str) -> LockName {
    LockName::new(s).unwrap()
}

/// Polls `fut` once.
async fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    let mut fut = fut;
    std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
}

fn manual(rec: &Recorded, config: LockConfig) -> (ManualClock, LockManager) {
    let clock = ManualClock::new();
    let locks = rec.build(|| LockManager::memory_with(config.clock(clock.clone())).unwrap());
    (clock, locks)
}

// --------------------------------------------------------------------- memory

#[tokio::test(start_paused = true)]
async fn memory_acquired_busy_timeout_and_waits_are_exact() {
    let rec = Recorded::new();
    let (clock, locks) = manual(&rec, LockConfig::default().name("invoices"));
    assert_eq!(locks.config().get_name(), Some("invoices"));
    // Everything registered at build time, at zero; nothing else.
    assert_eq!(rec.series(), expected_series("invoices", "memory"));
    assert_eq!(rec.counts("invoices", "memory"), [0; 8]);

    let lock = name("invoice:7");
    let long = LockOptions::new(Duration::from_secs(60));
    let holder = locks.try_acquire(&lock, long).await.unwrap();
    assert_eq!(rec.counts("invoices", "memory"), [1, 0, 0, 0, 0, 0, 0, 0]);

    // Single attempts on a held lock: try_acquire, and acquire with no wait.
    let err = locks.try_acquire(&lock, long).await.unwrap_err();
    assert!(matches!(err, Error::LockBusy { .. }));
    let err = locks
        .acquire(&lock, long.wait(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LockBusy { .. }));
    assert_eq!(rec.counts("invoices", "memory"), [1, 2, 0, 0, 0, 0, 0, 0]);
    assert_eq!(rec.waits("invoices", "memory"), (vec![], vec![]));

    // A waiting acquire that gives up at its deadline: its first attempt
    // runs, then 100 ms pass on the lease clock while it waits.
    let mut gives_up = pin!(locks.acquire(&lock, long.wait(Duration::from_millis(500))));
    assert!(poll_once(gives_up.as_mut()).await.is_pending());
    clock.advance(Duration::from_millis(100));
    let err = gives_up.await.unwrap_err();
    assert!(matches!(err, Error::LockBusy { .. }), "{err}");
    assert_eq!(rec.counts("invoices", "memory"), [1, 2, 1, 0, 0, 0, 0, 0]);
    assert_eq!(
        rec.waits("invoices", "memory"),
        (vec![], vec![Duration::from_millis(100).as_secs_f64()])
    );

    // A waiting acquire that gets the lock: 250 ms on the lease clock, then
    // the holder releases and wakes it.
    let mut waits = pin!(locks.acquire(&lock, long.wait(Duration::from_secs(10))));
    assert!(poll_once(waits.as_mut()).await.is_pending());
    clock.advance(Duration::from_millis(250));
    assert!(holder.release().await.unwrap());
    let second = waits.await.unwrap();
    assert_eq!(rec.counts("invoices", "memory"), [2, 2, 1, 0, 0, 0, 1, 0]);
    assert_eq!(
        rec.waits("invoices", "memory"),
        (
            vec![Duration::from_millis(250).as_secs_f64()],
            vec![Duration::from_millis(100).as_secs_f64()]
        )
    );

    // A dropped guard's release is counted at once in memory.
    drop(second);
    assert_eq!(rec.counts("invoices", "memory"), [2, 2, 1, 0, 0, 0, 2, 0]);
    // An uncontended acquire records no wait.
    let third = locks.acquire(&lock, long).await.unwrap();
    assert!(third.release().await.unwrap());
    assert_eq!(rec.counts("invoices", "memory"), [3, 2, 1, 0, 0, 0, 3, 0]);
    assert_eq!(rec.waits("invoices", "memory").0.len(), 1);

    // No lock name ever became a label, and no series was added on use.
    assert_eq!(rec.series(), expected_series("invoices", "memory"));
}

#[tokio::test(start_paused = true)]
async fn memory_expiry_is_counted_once_per_lease() {
    let rec = Recorded::new();
    let (clock, locks) = manual(&rec, LockConfig::default());
    let c = || rec.counts("unnamed", "memory");
    let lock = name("report");
    let opts = LockOptions::new(Duration::from_secs(1));

    let a = locks.acquire(&lock, opts).await.unwrap();
    let lost = a.lost();
    clock.advance(Duration::from_secs(1));
    assert_eq!(c()[4], 0, "nobody looked yet");
    // Every observer sees it; only the first ends the lease and counts it.
    assert!(!a.is_held());
    assert!(!a.is_held());
    assert_eq!(a.remaining(), Duration::ZERO);
    assert!(matches!(
        a.extend(Duration::from_secs(1)).await,
        Err(Error::LockLost { .. })
    ));
    assert_eq!(lost.await, LostReason::Expired);
    assert_eq!(c(), [1, 0, 0, 0, 1, 0, 0, 0]);
    // Its release finds the lock gone: not held, and not lost twice.
    assert!(!a.release().await.unwrap());
    assert_eq!(c(), [1, 0, 0, 0, 1, 0, 0, 1]);

    // An expired lease that nobody observed ends as released (held=false).
    let b = locks.acquire(&lock, opts).await.unwrap();
    clock.advance(Duration::from_secs(1));
    assert!(!b.release().await.unwrap());
    assert_eq!(c(), [2, 0, 0, 0, 1, 0, 0, 2]);

    // A lease handed over after expiry: the next holder acquires, the old
    // one sees its lease expired (counted once) and releases nothing.
    let old = locks.acquire(&lock, opts).await.unwrap();
    clock.advance(Duration::from_secs(2));
    let new = locks.try_acquire(&lock, opts).await.unwrap();
    assert!(!old.is_held());
    drop(old);
    assert_eq!(c(), [4, 0, 0, 0, 2, 0, 0, 3]);
    assert!(new.release().await.unwrap());
    assert_eq!(c(), [4, 0, 0, 0, 2, 0, 1, 3]);
}

#[tokio::test(start_paused = true)]
async fn managers_are_counted_apart_by_name() {
    let rec = Recorded::new();
    let (_, a) = manual(&rec, LockConfig::default().name("a"));
    let (_, b) = manual(&rec, LockConfig::default().name("b"));
    let default = rec.build(LockManager::memory);
    let lock = name("same-name");
    let opts = LockOptions::new(Duration::from_secs(5));
    let ga = a.try_acquire(&lock, opts).await.unwrap();
    let gb = b.try_acquire(&lock, opts).await.unwrap();
    assert!(b.try_acquire(&lock, opts).await.is_err());
    let gd = default.try_acquire(&lock, opts).await.unwrap();
    drop((ga, gb, gd));
    assert_eq!(rec.counts("a", "memory"), [1, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(rec.counts("b", "memory"), [1, 1, 0, 0, 0, 0, 1, 0]);
    assert_eq!(rec.counts("unnamed", "memory"), [1, 0, 0, 0, 0, 0, 1, 0]);
    let mut all = expected_series("a", "memory");
    all.extend(expected_series("b", "memory"));
    all.extend(expected_series("unnamed", "memory"));
    all.sort();
    assert_eq!(rec.series(), all);
}

#[tokio::test(start_paused = true)]
async fn a_manager_built_without_the_recorder_reports_nothing_to_it() {
    let rec = Recorded::new();
    let locks = LockManager::memory();
    let g = locks
        .try_acquire(&name("x"), LockOptions::default())
        .await
        .unwrap();
    assert!(g.release().await.unwrap());
    assert!(rec.series().is_empty());
}

// ---------------------------------------------------------------------- redis

#[cfg(all(feature = "redis", feature = "test-util"))]
mod redis {
    use super::*;
    use raceguard::keys::Key;
    use raceguard::redis::{RedisBackend, RedisConfig};
    use raceguard::testing::{RedisServer, RedisServers};

    fn lock_key(n: &LockName) -> String {
        Key::builder("lock")
            .unwrap()
            .owner(n)
            .build()
            .unwrap()
            .into_string()
    }

    fn redis_config() -> RedisConfig {
        RedisConfig::default()
            .connect_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(5))
    }

    fn lock_config(name: &str) -> LockConfig {
        LockConfig::default()
            .name(name)
            .retry(Duration::from_millis(1), Duration::from_millis(20))
            .node_timeout(Duration::from_secs(2))
    }

    async fn connect(url: &str) -> RedisBackend {
        RedisBackend::connect(url, redis_config()).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_acquired_busy_timeout_and_lost_not_held() {
        let Some(server) = RedisServer::start_or_skip() else {
            return;
        };
        let redis = connect(server.url()).await;
        let rec = Recorded::new();
        let locks = rec.build(|| LockManager::redis_with(redis, lock_config("orders")).unwrap());
        assert_eq!(rec.series(), expected_series("orders", "redis"));
        let c = || rec.counts("orders", "redis");
        let lock = name("order:42");
        let long = LockOptions::new(Duration::from_secs(60));

        let g = locks.acquire(&lock, long).await.unwrap();
        assert_eq!(c(), [1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            locks.try_acquire(&lock, long).await,
            Err(Error::LockBusy { .. })
        ));
        assert_eq!(c(), [1, 1, 0, 0, 0, 0, 0, 0]);
        // Gives up at a deadline far shorter than the holder's lease.
        let err = locks
            .acquire(&lock, long.wait(Duration::from_millis(30)))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LockBusy { .. }), "{err}");
        assert_eq!(c(), [1, 1, 1, 0, 0, 0, 0, 0]);
        // Its wait is recorded only if it retried (almost surely, but a first
        // round trip slower than the deadline would not): at most one.
        let (acquired, gave_up) = rec.waits("orders", "redis");
        assert!(acquired.is_empty() && gave_up.len() <= 1, "{gave_up:?}");

        // The key is deleted behind the holder's back: its extension finds
        // the lock gone (lost, not held), once.
        let deleted: u64 = server.query(&["DEL", &lock_key(&lock)]).unwrap();
        assert_eq!(deleted, 1);
        let lost = g.lost();
        assert!(g.is_held(), "locally still valid");
        assert!(matches!(
            g.extend(Duration::from_secs(60)).await,
            Err(Error::LockLost { .. })
        ));
        assert_eq!(lost.await, LostReason::NotHeld);
        assert!(matches!(
            g.extend(Duration::from_secs(60)).await,
            Err(Error::LockLost { .. })
        ));
        assert_eq!(c(), [1, 1, 1, 0, 0, 1, 0, 0]);
        // Its release deletes nothing and says so.
        assert!(!g.release().await.unwrap());
        assert_eq!(c(), [1, 1, 1, 0, 0, 1, 0, 1]);

        // Released while held.
        let g = locks.try_acquire(&lock, long).await.unwrap();
        assert!(g.release().await.unwrap());
        assert_eq!(c(), [2, 1, 1, 0, 0, 1, 1, 1]);

        // A guard whose key vanished, released without extending first: not
        // lost (nobody found out before the release), released held=false.
        let g = locks.try_acquire(&lock, long).await.unwrap();
        let _: u64 = server.query(&["DEL", &lock_key(&lock)]).unwrap();
        assert!(!g.release().await.unwrap());
        assert_eq!(c(), [3, 1, 1, 0, 0, 1, 1, 2]);

        assert_eq!(rec.series(), expected_series("orders", "redis"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redlock_counts_a_quorum_failure_apart_from_busy() {
        let Some(servers) = RedisServers::start_or_skip(3) else {
            return;
        };
        let mut nodes = Vec::new();
        for s in servers.iter() {
            nodes.push(connect(s.url()).await);
        }
        let rec = Recorded::new();
        let locks = rec.build(|| LockManager::redlock_with(nodes, lock_config("jobs")).unwrap());
        assert_eq!(rec.series(), expected_series("jobs", "redlock"));
        let c = || rec.counts("jobs", "redlock");
        let lock = name("job:1");
        let long = LockOptions::new(Duration::from_secs(60));

        let g = locks.try_acquire(&lock, long).await.unwrap();
        assert!(matches!(
            locks.try_acquire(&lock, long).await,
            Err(Error::LockBusy { .. })
        ));
        assert_eq!(c(), [1, 1, 0, 0, 0, 0, 0, 0]);
        tokio::task::block_in_place(|| {
            for i in [0, 1] {
                servers[i].stop().unwrap();
            }
        });
        let err = locks.try_acquire(&lock, long).await.unwrap_err();
        assert!(matches!(err, Error::QuorumNotReached { .. }), "{err}");
        assert_eq!(c(), [1, 1, 0, 1, 0, 0, 0, 0]);
        drop(g);
    }
}
