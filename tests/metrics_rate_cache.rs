//! Feature `metrics`: the counters that rate limiters and versioned caches
//! report through the `metrics` facade, read back with metrics-util's
//! `DebuggingRecorder` installed as a *local* recorder (no global state, so
//! tests run in parallel). Handles are registered when a primitive is built,
//! so each primitive is built inside `with_local_recorder`.

#![cfg(feature = "metrics")]

use std::collections::HashMap;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use raceguard::cache::VersionedCache;
use raceguard::clock::ManualClock;
use raceguard::keys::UserId;
use raceguard::rate::{KeyedRateLimiter, MultiLimit, Quota, RateLimiter, TokioClock};
use raceguard::{Error, ErrorKind};

/// Accumulates counters over snapshots (a snapshot resets them).
struct Recorded {
    recorder: DebuggingRecorder,
    snapshotter: Snapshotter,
    totals: HashMap<(String, Vec<(String, String)>), u64>,
}

impl Recorded {
    fn new() -> Self {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        Recorded {
            recorder,
            snapshotter,
            totals: HashMap::new(),
        }
    }

    /// Builds something with this recorder as the current one.
    fn build<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// The total of the counter `name` with exactly `labels`; 0 if it was
    /// never registered.
    fn counter(&mut self, name: &str, labels: &[(&str, &str)]) -> u64 {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let mut l: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            l.sort();
            let DebugValue::Counter(v) = value else {
                panic!("{} is not a counter", key.name());
            };
            *self.totals.entry((key.name().to_string(), l)).or_default() += v;
        }
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        want.sort();
        self.totals
            .get(&(name.to_string(), want))
            .copied()
            .unwrap_or(0)
    }

    fn registered(&mut self, name: &str, label: (&str, &str)) -> bool {
        self.counter("", &[]);
        self.totals
            .keys()
            .any(|(n, l)| n == name && l.iter().any(|(k, v)| (k.as_str(), v.as_str()) == label))
    }

    fn admitted(&mut self, limiter: &str) -> u64 {
        self.counter("raceguard_rate_admitted_total", &[("limiter", limiter)])
    }

    fn denied(&mut self, limiter: &str, reason: &str) -> u64 {
        self.counter(
            "raceguard_rate_denied_total",
            &[("limiter", limiter), ("reason", reason)],
        )
    }
}

#[test]
fn direct_limiter_counts_admitted_and_denied_checks_only() {
    let mut rec = Recorded::new();
    let clock = ManualClock::new();
    let limiter = rec.build(|| {
        RateLimiter::builder(Quota::per_second(2).unwrap())
            .clock(clock.clone())
            .name("external-api")
            .build()
    });
    assert!(limiter.check().allowed());
    assert!(limiter.check_n(1).unwrap().allowed());
    assert!(limiter.check_at(0).denied());
    // Peeks and impossible costs count nothing.
    assert!(limiter.peek().denied());
    assert!(limiter.peek_n(1).unwrap().denied());
    assert_eq!(
        limiter.check_n(3).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(rec.admitted("external-api"), 2);
    assert_eq!(rec.denied("external-api", "limit"), 1);
    for reason in ["wait_timeout", "queue_full", "key_cap"] {
        assert_eq!(rec.denied("external-api", reason), 0, "{reason}");
    }

    clock.advance(Duration::from_millis(500));
    assert!(limiter.check().allowed());
    assert_eq!(rec.admitted("external-api"), 3);
}

#[test]
fn an_unnamed_limiter_reports_under_unnamed() {
    let mut rec = Recorded::new();
    let limiter =
        rec.build(|| RateLimiter::with_clock(Quota::per_minute(1).unwrap(), ManualClock::new()));
    assert_eq!(limiter.name(), None);
    limiter.check();
    limiter.check();
    assert_eq!(rec.admitted("unnamed"), 1);
    assert_eq!(rec.denied("unnamed", "limit"), 1);
}

#[test]
fn a_limiter_built_without_a_recorder_reports_nothing_and_works() {
    let mut rec = Recorded::new();
    let limiter = RateLimiter::builder(Quota::per_second(1).unwrap())
        .name("outside")
        .build();
    assert!(limiter.check().allowed());
    assert!(!rec.registered("raceguard_rate_admitted_total", ("limiter", "outside")));
}

#[test]
fn keyed_limiter_counts_per_limiter_never_per_key_and_reports_the_key_cap() {
    let mut rec = Recorded::new();
    let limiter = rec.build(|| {
        KeyedRateLimiter::<UserId, _>::builder(Quota::per_minute(1).unwrap())
            .clock(ManualClock::new())
            .max_keys(1)
            .name("per-user")
            .build()
            .unwrap()
    });
    let (alice, bob) = (UserId::new("alice").unwrap(), UserId::new("bob").unwrap());
    assert!(limiter.check(&alice).unwrap().allowed());
    assert!(limiter.check(&alice).unwrap().denied());
    let err = limiter.check(&bob).unwrap_err();
    assert!(matches!(err, Error::CapacityExceeded { .. }), "{err}");
    assert!(limiter.peek(&alice).denied());
    assert_eq!(rec.admitted("per-user"), 1);
    assert_eq!(rec.denied("per-user", "limit"), 1);
    assert_eq!(rec.denied("per-user", "key_cap"), 1);
    // No label carries a key.
    for (_, labels) in rec.totals.keys() {
        assert!(labels.iter().all(|(_, v)| v != "alice" && v != "bob"));
    }
}

#[tokio::test(start_paused = true)]
async fn a_wait_counts_once_however_many_attempts_it_took() {
    let mut rec = Recorded::new();
    let limiter = rec.build(|| {
        RateLimiter::builder(Quota::per_second(1).unwrap())
            .clock(TokioClock::new())
            .name("throttle")
            .build()
    });
    limiter.until_ready().await.unwrap();
    // Waits a (paused) second, re-checking on the way: one admission.
    limiter.until_ready().await.unwrap();
    assert_eq!(rec.admitted("throttle"), 2);
    assert_eq!(rec.denied("throttle", "limit"), 0);

    let err = limiter
        .acquire_timeout(1, Duration::from_millis(10))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(rec.denied("throttle", "wait_timeout"), 1);

    let no_queue = rec.build(|| {
        RateLimiter::builder(Quota::per_minute(1).unwrap())
            .clock(TokioClock::new())
            .max_waiters(0)
            .name("no-queue")
            .build()
    });
    no_queue.until_ready().await.unwrap();
    let err = no_queue.until_ready().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Capacity);
    assert_eq!(rec.denied("no-queue", "queue_full"), 1);
    assert_eq!(rec.admitted("no-queue"), 1);
}

#[tokio::test(start_paused = true)]
async fn keyed_waits_count_once_too() {
    let mut rec = Recorded::new();
    let limiter = rec.build(|| {
        KeyedRateLimiter::<u64, _>::builder(Quota::per_second(1).unwrap())
            .clock(TokioClock::new())
            .name("keyed-throttle")
            .build()
            .unwrap()
    });
    limiter.until_ready(&7).await.unwrap();
    limiter.until_ready(&7).await.unwrap();
    let err = limiter
        .acquire_timeout(&7, 1, Duration::from_millis(10))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(rec.admitted("keyed-throttle"), 2);
    assert_eq!(rec.denied("keyed-throttle", "limit"), 0);
    assert_eq!(rec.denied("keyed-throttle", "wait_timeout"), 1);
}

#[test]
fn multi_limit_counts_each_limiter_once_and_blames_only_the_one_that_denied() {
    let mut rec = Recorded::new();
    let clock = ManualClock::new();
    let (global, per_user) = rec.build(|| {
        let global = RateLimiter::builder(Quota::per_minute(10).unwrap())
            .clock(clock.clone())
            .name("global")
            .build();
        let per_user = KeyedRateLimiter::<u64, _>::builder(Quota::per_minute(1).unwrap())
            .clock(clock.clone())
            .name("per-user")
            .build()
            .unwrap();
        (global, per_user)
    });
    fn multi<'a>(
        global: &'a RateLimiter<ManualClock>,
        per_user: &'a KeyedRateLimiter<u64, ManualClock>,
        user: &'a u64,
    ) -> MultiLimit<'a> {
        MultiLimit::new()
            .direct("global", global)
            .keyed("per-user", per_user, user)
            // The same limiter twice counts once.
            .direct("global-again", global)
    }
    let multi = |user: &'static u64| multi(&global, &per_user, user);
    assert!(multi(&1).check().unwrap().allowed());
    let d = multi(&1).check().unwrap();
    assert_eq!(d.denied_by(), Some("per-user"));
    assert!(multi(&2).peek_n(1).unwrap().allowed());
    assert_eq!(rec.admitted("global"), 1);
    assert_eq!(rec.admitted("per-user"), 1);
    assert_eq!(rec.denied("per-user", "limit"), 1);
    assert_eq!(rec.denied("global", "limit"), 0);
}

fn cache_counter(rec: &mut Recorded, what: &str, cache: &str) -> u64 {
    rec.counter(
        &format!("raceguard_cache_{what}_total"),
        &[("cache", cache)],
    )
}

#[tokio::test]
async fn memory_cache_reports_hits_misses_loads_and_invalidations_per_cache() {
    let mut rec = Recorded::new();
    let (history, profiles) = rec.build(|| {
        (
            VersionedCache::<String>::new(1_000).named("history"),
            VersionedCache::<String>::new(1_000),
        )
    });
    assert_eq!(history.name(), Some("history"));
    let alice = UserId::new("alice").unwrap();
    let ttl = Duration::from_secs(60);
    let load = || async { Ok::<_, std::io::Error>("hi".to_string()) };
    for _ in 0..3 {
        history
            .get_or_load(&alice, "50:0", ttl, load)
            .await
            .unwrap();
    }
    history.invalidate(&alice);
    history
        .get_or_load(&alice, "50:0", ttl, load)
        .await
        .unwrap();
    profiles.get_or_load(&alice, "me", ttl, load).await.unwrap();

    let s = history.stats();
    assert_eq!((s.hits, s.misses, s.loads, s.invalidations), (2, 2, 2, 1));
    // The facade sees exactly what `stats()` sees.
    assert_eq!(cache_counter(&mut rec, "hits", "history"), s.hits);
    assert_eq!(cache_counter(&mut rec, "misses", "history"), s.misses);
    assert_eq!(cache_counter(&mut rec, "loads", "history"), s.loads);
    assert_eq!(
        cache_counter(&mut rec, "invalidations", "history"),
        s.invalidations
    );
    assert_eq!(cache_counter(&mut rec, "misses", "unnamed"), 1);
    assert_eq!(cache_counter(&mut rec, "hits", "unnamed"), 0);
}

#[tokio::test]
async fn naming_a_shared_cache_changes_nothing() {
    let mut rec = Recorded::new();
    let cache = rec.build(|| VersionedCache::<u8>::new(100));
    let clone = cache.clone();
    let renamed = rec.build(|| cache.named("late"));
    assert_eq!(renamed.name(), None);
    let scope = UserId::new("u").unwrap();
    clone
        .get_or_load(&scope, "x", Duration::from_secs(1), || async {
            Ok::<_, std::io::Error>(1)
        })
        .await
        .unwrap();
    assert_eq!(cache_counter(&mut rec, "misses", "unnamed"), 1);
    assert!(!rec.registered("raceguard_cache_misses_total", ("cache", "late")));
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[test]
fn redis_cache_reports_under_its_name() {
    use raceguard::cache::RedisVersionedCache;
    use raceguard::redis::{RedisBackend, RedisConfig};
    use raceguard::testing::RedisServer;

    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rec = Recorded::new();
    rt.block_on(async {
        let backend = RedisBackend::connect(server.url(), RedisConfig::default())
            .await
            .unwrap();
        let cache: RedisVersionedCache<String> =
            rec.build(|| RedisVersionedCache::new(backend, "chat").unwrap());
        let alice = UserId::new("alice").unwrap();
        let ttl = Duration::from_secs(60);
        let load = || async { Ok::<_, std::io::Error>("hi".to_string()) };
        cache.get_or_load(&alice, "h", ttl, load).await.unwrap();
        cache.get_or_load(&alice, "h", ttl, load).await.unwrap();
        cache.invalidate(&alice).await.unwrap();
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.loads, s.invalidations), (1, 1, 1, 1));
        for what in ["hits", "misses", "loads", "invalidations"] {
            assert_eq!(cache_counter(&mut rec, what, "chat"), 1, "{what}");
        }
    });
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[test]
fn redis_limiters_report_under_their_names_and_the_local_fallback_counts_once() {
    use raceguard::redis::{
        FailurePolicy, RedisBackend, RedisConfig, RedisKeyedRateLimiter, RedisMultiLimit,
        RedisRateLimiter,
    };
    use raceguard::testing::RedisServer;

    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rec = Recorded::new();
    let global = rt.block_on(async {
        let backend = RedisBackend::connect(server.url(), RedisConfig::default())
            .await
            .unwrap();
        let (global, per_user) = rec.build(|| {
            let global =
                RedisRateLimiter::new(&backend, "redis-global", Quota::per_minute(10).unwrap())
                    .unwrap()
                    .with_failure_policy(FailurePolicy::Local);
            let per_user =
                RedisKeyedRateLimiter::new(&backend, "redis-user", Quota::per_minute(1).unwrap())
                    .unwrap();
            (global, per_user)
        });
        let alice = UserId::new("alice").unwrap();

        assert!(global.check().await.unwrap().allowed());
        assert!(global.peek().await.unwrap().allowed());
        assert!(per_user.check(&alice).await.unwrap().allowed());
        assert!(per_user.check(&alice).await.unwrap().denied());
        assert_eq!(rec.admitted("redis-global"), 1);
        assert_eq!(rec.admitted("redis-user"), 1);
        assert_eq!(rec.denied("redis-user", "limit"), 1);

        // A multi-limit: the per-user limit denies; only it is blamed, and
        // the global limiter (listed twice, through a clone) counts once.
        let multi = RedisMultiLimit::new(&backend)
            .global("global", &global)
            .keyed("user", &per_user, &alice)
            .unwrap()
            .global("global-again", &global.clone());
        assert_eq!(multi.check().await.unwrap().denied_by(), Some("user"));
        let bob = UserId::new("bob").unwrap();
        let multi = RedisMultiLimit::new(&backend)
            .global("global", &global)
            .keyed("user", &per_user, &bob)
            .unwrap()
            .global("global-again", &global.clone());
        assert!(multi.check().await.unwrap().allowed());
        assert_eq!(rec.denied("redis-user", "limit"), 2);
        assert_eq!(rec.denied("redis-global", "limit"), 0);
        assert_eq!(rec.admitted("redis-global"), 2);
        assert_eq!(rec.admitted("redis-user"), 2);

        global
    });

    // Redis down: the local fallback decides. It is built on first use, here
    // with the test's recorder current on this thread, and still counts
    // once, under the Redis limiter's name and never under "unnamed".
    server.stop().unwrap();
    let d = rec.build(|| rt.block_on(global.check())).unwrap();
    assert!(d.allowed());
    assert_eq!(rec.admitted("redis-global"), 3);
    assert!(!rec.registered("raceguard_rate_admitted_total", ("limiter", "unnamed")));
}
