//! Redis rate limiting against real servers: identical decisions to the
//! in-memory core, distributed accuracy (single node and cluster), outages
//! under each failure policy, bad input.
#![cfg(all(feature = "redis", feature = "test-util"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use raceguard::keys::{ScopeId, UserId};
use raceguard::rate::{KeyedRateLimiter, MultiLimit, Quota};
use raceguard::redis::{
    FailurePolicy, KeyLayout, RedisBackend, RedisConfig, RedisKeyedRateLimiter, RedisMultiLimit,
    RedisRateLimiter,
};
use raceguard::testing::{RedisCluster, RedisServer};
use raceguard::{Error, ErrorKind};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn config() -> RedisConfig {
    RedisConfig::default()
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(500))
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);
fn unique(prefix: &str) -> String {
    format!("{prefix}{}", UNIQUE.fetch_add(1, Ordering::Relaxed))
}

#[derive(Debug, Clone)]
enum Op {
    Check { user: usize, cost: u32 },
    Peek { user: usize, cost: u32 },
    Multi { user: usize, cost: u32 },
}

fn quota_choices() -> Vec<Quota> {
    vec![
        Quota::per_second(5).unwrap(),
        Quota::per_minute(3).unwrap(),
        Quota::per(7, Duration::from_millis(300)).unwrap(),
        Quota::with_interval(Duration::from_nanos(1))
            .unwrap()
            .with_burst(1000)
            .unwrap(),
        Quota::per_second(1_000_000_000).unwrap(),
        Quota::per_day(2).unwrap(),
    ]
}

fn ops() -> impl Strategy<Value = (usize, usize, Vec<(u64, Op)>)> {
    let op = prop_oneof![
        (0..3usize, 0..4u32).prop_map(|(user, cost)| Op::Check { user, cost }),
        (0..3usize, 0..4u32).prop_map(|(user, cost)| Op::Peek { user, cost }),
        (0..3usize, 0..3u32).prop_map(|(user, cost)| Op::Multi { user, cost }),
    ];
    // Time steps from 0 to a few seconds, with many zero and tiny steps.
    let step = prop_oneof![
        3 => Just(0u64),
        3 => 0..1_000u64,
        2 => 0..400_000_000u64,
        1 => 0..5_000_000_000u64,
    ];
    (
        0..6usize,
        0..6usize,
        prop::collection::vec((step, op), 1..40),
    )
}

/// The same operations through the in-memory limiters and through Redis in
/// explicit-time mode give identical decisions, every one of them.
#[test]
fn redis_decisions_equal_in_memory_decisions() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let rt = rt();
    let redis = rt
        .block_on(RedisBackend::connect(server.url(), config()))
        .unwrap();
    let users: Vec<UserId> = ["alice", "b*{o}b:", "用户 \n"]
        .iter()
        .map(|u| UserId::new(u).unwrap())
        .collect();
    let quotas = quota_choices();
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&ops(), |(qa, qb, ops)| {
            let (qa, qb) = (quotas[qa], quotas[qb]);
            // Per-key quotas: the second user gets quota b, the others a.
            let premium = users[1].clone();
            let resolve = move |u: &UserId| if *u == premium { qb } else { qa };
            let mem = KeyedRateLimiter::<UserId>::builder(qa)
                .quota_resolver(resolve.clone())
                .build()
                .unwrap();
            let mem_route = KeyedRateLimiter::<UserId>::new(qb);
            let red = RedisKeyedRateLimiter::new(&redis, &unique("diff"), qa)
                .unwrap()
                .with_quota_resolver(resolve);
            let red_route = RedisKeyedRateLimiter::new(&redis, &unique("route"), qb).unwrap();
            // A realistic epoch (~2026 in ns) exercises the script's split
            // arithmetic on times far above 2^53.
            let mut now: u64 = 1_795_000_000_123_456_789;
            for (i, (step, op)) in ops.iter().enumerate() {
                now += step;
                let (m, r) = rt.block_on(async {
                    match op {
                        Op::Check { user, cost } => {
                            let u = &users[*user];
                            (
                                mem.check_n_at(u, *cost, now).map(|d| vec![d]),
                                red.check_n_at(u, *cost, now).await.map(|d| vec![d]),
                            )
                        }
                        Op::Peek { user, cost } => {
                            let u = &users[*user];
                            (
                                mem.peek_n_at(u, *cost, now).map(|d| vec![d]),
                                red.peek_n_at(u, *cost, now).await.map(|d| vec![d]),
                            )
                        }
                        Op::Multi { user, cost } => {
                            let u = &users[*user];
                            let md = MultiLimit::new()
                                .keyed("user", &mem, u)
                                .keyed("route", &mem_route, u)
                                .check_n_at(*cost, now)
                                .map(|d| d.decisions().iter().map(|(_, d)| *d).collect::<Vec<_>>());
                            let rd = match RedisMultiLimit::new(&redis)
                                .keyed("user", &red, u)
                                .and_then(|m| m.keyed("route", &red_route, u))
                            {
                                Ok(m) => m
                                    .check_n_at(*cost, now)
                                    .await
                                    .map(|d| d.decisions().iter().map(|(_, d)| *d).collect()),
                                Err(e) => Err(e),
                            };
                            (md, rd)
                        }
                    }
                });
                match (m, r) {
                    (Ok(m), Ok(r)) => prop_assert_eq!(m, r, "op {} {:?} at {}", i, op, now),
                    (Err(m), Err(r)) => {
                        prop_assert_eq!(m.kind(), ErrorKind::InvalidInput);
                        // The same rejection, word for word, on both backends.
                        prop_assert_eq!(m.to_string(), r.to_string());
                    }
                    (m, r) => {
                        prop_assert!(false, "op {} {:?}: memory {:?} vs redis {:?}", i, op, m, r)
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}

/// 4 backends (standing for 4 app processes) x 16 tasks hammer one user's
/// limit for 3 s of server time: the total admitted stays within
/// `burst + rate x elapsed` and reaches at least 95% of it.
async fn hammer(backends: Vec<RedisBackend>, time_source: RedisBackend) {
    let quota = Quota::per_second(500).unwrap().with_burst(50).unwrap();
    let name = unique("hammer");
    let user = UserId::new("hot-user").unwrap();
    let server_nanos = |b: RedisBackend| async move {
        let (s, us): (u64, u64) = b.query(&redis::cmd("TIME")).await.unwrap();
        s * 1_000_000_000 + us * 1_000
    };
    let start = server_nanos(time_source.clone()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for b in &backends {
        let limiter = RedisKeyedRateLimiter::new(b, &name, quota).unwrap();
        for _ in 0..16 {
            let (limiter, user, admitted) = (limiter.clone(), user.clone(), admitted.clone());
            tasks.push(tokio::spawn(async move {
                while tokio::time::Instant::now() < deadline {
                    if limiter.check(&user).await.unwrap().allowed() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let end = server_nanos(time_source).await;
    let elapsed = end - start;
    let bound = u64::from(quota.burst()) + elapsed / quota.interval_nanos();
    let admitted = admitted.load(Ordering::Relaxed);
    assert!(admitted <= bound, "admitted {admitted} > bound {bound}");
    assert!(
        admitted * 100 >= bound * 95,
        "over-denial: admitted {admitted} < 95% of {bound}"
    );
}

#[test]
fn distributed_accuracy_single_node() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let mut backends = Vec::new();
        for _ in 0..4 {
            backends.push(RedisBackend::connect(server.url(), config()).await.unwrap());
        }
        let t = backends[0].clone();
        hammer(backends, t).await;
    });
}

#[test]
fn distributed_accuracy_cluster() {
    let Some(cluster) = RedisCluster::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let urls = cluster.urls();
        let mut backends = Vec::new();
        for _ in 0..4 {
            backends.push(
                RedisBackend::connect_cluster(&urls, config())
                    .await
                    .unwrap(),
            );
        }
        // The user's key lives on one node: time comes from that node.
        let user_key =
            RedisKeyedRateLimiter::new(&backends[0], "probe", Quota::per_second(1).unwrap())
                .unwrap()
                .key_for(&UserId::new("hot-user").unwrap())
                .unwrap();
        let node = cluster.node_for_key(user_key.as_str()).unwrap();
        let time_source = RedisBackend::connect(node.url(), config()).await.unwrap();
        hammer(backends, time_source).await;
    });
}

#[test]
fn multi_limits_on_a_cluster_need_one_slot_and_say_so() {
    let Some(cluster) = RedisCluster::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let redis = RedisBackend::connect_cluster(&cluster.urls(), config())
            .await
            .unwrap();
        let q = Quota::per_second(2).unwrap();
        let alice = UserId::new("alice").unwrap();
        let user = RedisKeyedRateLimiter::new(&redis, "user", q).unwrap();
        let route = RedisKeyedRateLimiter::new(&redis, "route", q).unwrap();
        // Limits of one owner share a slot: one script, all-or-nothing.
        let m = RedisMultiLimit::new(&redis)
            .keyed("user", &user, &alice)
            .unwrap()
            .keyed("route", &route, &alice)
            .unwrap();
        assert!(m.check().await.unwrap().allowed());
        assert!(m.check().await.unwrap().allowed());
        let d = m.check().await.unwrap();
        assert!(d.denied());

        // A global limit lives in its own slot: mixing fails with a typed
        // error instead of a CROSSSLOT surprise...
        let global = RedisRateLimiter::new(&redis, "global", q).unwrap();
        let err = RedisMultiLimit::new(&redis)
            .keyed("user", &user, &alice)
            .unwrap()
            .global("global", &global)
            .check()
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    what: "rate.keys",
                    ..
                }
            ),
            "{err:?}"
        );

        // ...and the shared-slot layout puts the user keys next to it.
        let shared = RedisKeyedRateLimiter::new(&redis, "user2", Quota::per_second(1).unwrap())
            .unwrap()
            .with_layout(KeyLayout::SharedSlot(ScopeId::new("global").unwrap()));
        assert_eq!(shared.key_for(&alice).unwrap().slot(), global.key().slot());
        let m = RedisMultiLimit::new(&redis)
            .keyed("user", &shared, &alice)
            .unwrap()
            .global("global", &global);
        let first = m.check().await.unwrap();
        assert!(first.allowed());
        // The user limit (1/s) now denies: the global cell is not consumed.
        let before = global.peek().await.unwrap().remaining();
        let second = m.check().await.unwrap();
        assert_eq!(second.denied_by(), Some("user"));
        assert_eq!(global.peek().await.unwrap().remaining(), before);
    });
}

#[test]
fn outage_answers_by_policy_and_recovers_without_rebuild() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let redis = RedisBackend::connect(server.url(), config()).await.unwrap();
        let q = Quota::per_minute(3).unwrap();
        let alice = UserId::new("alice").unwrap();
        let mk = |p| {
            RedisKeyedRateLimiter::new(&redis, "outage", q)
                .unwrap()
                .with_failure_policy(p)
        };
        let (err, closed, open, local) = (
            mk(FailurePolicy::Error),
            mk(FailurePolicy::FailClosed),
            mk(FailurePolicy::FailOpen),
            mk(FailurePolicy::Local),
        );
        assert!(err.check(&alice).await.unwrap().allowed());

        server.stop().unwrap();
        // Each call comes back (a hang would trip this guard) with the
        // policy's answer.
        let guard = Duration::from_secs(10);
        let e = tokio::time::timeout(guard, err.check(&alice))
            .await
            .unwrap()
            .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        for _ in 0..5 {
            let d = tokio::time::timeout(guard, closed.check(&alice))
                .await
                .unwrap()
                .unwrap();
            assert!(d.denied());
            let d = tokio::time::timeout(guard, open.check(&alice))
                .await
                .unwrap()
                .unwrap();
            assert!(d.allowed());
        }
        // The local fallback enforces the same quota in this process.
        let mut admitted = 0;
        for _ in 0..10 {
            let d = tokio::time::timeout(guard, local.check(&alice))
                .await
                .unwrap()
                .unwrap();
            admitted += usize::from(d.allowed());
        }
        assert_eq!(admitted, 3);
        // ... including per-owner quotas from the resolver.
        let vip = UserId::new("vip").unwrap();
        let premium = mk(FailurePolicy::Local).with_quota_resolver(|u: &UserId| {
            if u.as_str() == "vip" {
                Quota::per_minute(5).unwrap()
            } else {
                Quota::per_minute(3).unwrap()
            }
        });
        let mut admitted = 0;
        for _ in 0..10 {
            let d = tokio::time::timeout(guard, premium.check(&vip))
                .await
                .unwrap()
                .unwrap();
            admitted += usize::from(d.allowed());
        }
        assert_eq!(admitted, 5);

        server.restart().unwrap();
        // The same limiter works again; its state restarted empty (no
        // persistence), so the user has a full burst.
        let mut recovered = None;
        for _ in 0..100 {
            match err.check(&alice).await {
                Ok(d) => {
                    recovered = Some(d);
                    break;
                }
                Err(e) => assert!(e.is_retryable(), "{e}"),
            }
            // The server is already up (restart waits for PING); a failed
            // call only means the old connection was still being replaced.
            tokio::task::yield_now().await;
        }
        let d = recovered.expect("the limiter recovered after the restart");
        assert!(d.allowed());
        assert_eq!(d.remaining(), 2);
    });
}

#[test]
fn bad_input_is_typed() {
    assert!(matches!(
        Quota::per_second(0),
        Err(Error::InvalidInput { .. })
    ));
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let redis = RedisBackend::connect(server.url(), config()).await.unwrap();
        let q = Quota::per_second(5).unwrap();
        let err = RedisKeyedRateLimiter::new(&redis, "", q).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        let lim = RedisKeyedRateLimiter::new(&redis, "bad", q).unwrap();
        let evil = UserId::new("*").unwrap();
        let err = lim.check_n(&evil, u32::MAX).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    what: "rate limit cost",
                    ..
                }
            ),
            "{err:?}"
        );
        // Exactly what the in-memory limiter says for the same request.
        let mem = KeyedRateLimiter::<UserId>::new(q)
            .check_n(&evil, u32::MAX)
            .unwrap_err();
        assert_eq!(err.to_string(), mem.to_string());
        // A hostile id is a key like any other, escaped, touching no one else.
        let victim = UserId::new("victim").unwrap();
        for _ in 0..5 {
            assert!(lim.check(&evil).await.unwrap().allowed());
        }
        assert!(lim.check(&evil).await.unwrap().denied());
        // The victim's cell is untouched: a peek sees a full burst (the
        // one-cell check it describes would leave 4).
        let peek = lim.peek(&victim).await.unwrap();
        assert!(peek.allowed());
        assert_eq!(peek.remaining(), 4);
        let key = lim.key_for(&evil).unwrap();
        assert_eq!(key.as_str(), "rl:{%2A}:bad");
        let exists: i64 = server.query(&["EXISTS", key.as_str()]).unwrap();
        assert_eq!(exists, 1);
        // Idle keys expire on their own once full again.
        let ttl: i64 = server.query(&["PTTL", key.as_str()]).unwrap();
        assert!(ttl > 0 && ttl <= 1_001, "ttl {ttl}");
    });
}

#[test]
fn a_flushed_script_cache_is_reloaded_transparently() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let redis = RedisBackend::connect(server.url(), config()).await.unwrap();
        let lim = RedisRateLimiter::new(&redis, "flush", Quota::per_minute(3).unwrap()).unwrap();
        assert!(lim.check().await.unwrap().allowed());
        // What a failover to a fresh replica or a new cluster node looks
        // like: the server no longer knows the script (NOSCRIPT).
        let _: String = server.query(&["SCRIPT", "FLUSH"]).unwrap();
        let d = lim.check().await.unwrap();
        assert!(d.allowed());
        assert_eq!(d.remaining(), 1, "state survived; the script was reloaded");
    });
}

#[test]
fn an_indeterminate_check_is_never_replayed() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let cfg = config().response_timeout(Duration::from_millis(200));
        let redis = RedisBackend::connect(server.url(), cfg).await.unwrap();
        let lim = RedisRateLimiter::new(&redis, "once", Quota::per_minute(10).unwrap()).unwrap();
        lim.peek().await.unwrap(); // script loaded
        server.pause().unwrap();
        // The check is sent, then times out: it may run later, or never.
        let err = lim.check().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        server.resume().unwrap();
        let mut after = None;
        for _ in 0..100 {
            if let Ok(d) = lim.peek().await {
                after = Some(d);
                break;
            }
            // The server is already up (restart waits for PING); a failed
            // call only means the old connection was still being replaced.
            tokio::task::yield_now().await;
        }
        // A peek reports the remaining after one more cell: 9 if the timed
        // out check never ran, 8 if it ran once; 7 would mean a replay.
        let remaining = after.expect("server answers again").remaining();
        assert!(
            remaining == 9 || remaining == 8,
            "remaining {remaining}: the timed-out check ran more than once"
        );
    });
}

/// The same handler code, generic over `KeyedLimit`, on both backends: the
/// switch is the line that builds the limiter.
#[test]
fn one_handler_runs_on_memory_and_on_redis() {
    use raceguard::rate::KeyedLimit;

    async fn handle(limit: &impl KeyedLimit, user: &UserId) -> u16 {
        match limit.check_n(user, 1).await {
            Ok(d) if d.allowed() => 200,
            Ok(_) => 429,
            Err(_) => 503,
        }
    }
    async fn burst(limit: &impl KeyedLimit) -> Vec<u16> {
        let alice = UserId::new("alice").unwrap();
        let mut codes = Vec::new();
        for _ in 0..5 {
            codes.push(handle(limit, &alice).await);
        }
        codes
    }

    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let redis = RedisBackend::connect(server.url(), config()).await.unwrap();
        let quota = Quota::per_minute(3).unwrap();
        let memory = KeyedRateLimiter::<UserId>::new(quota);
        let on_redis = RedisKeyedRateLimiter::new(&redis, "switch", quota).unwrap();
        assert_eq!(burst(&memory).await, [200, 200, 200, 429, 429]);
        assert_eq!(burst(&on_redis).await, [200, 200, 200, 429, 429]);
    });
}

#[test]
fn a_multi_limit_is_a_limit_with_its_binding_decision_on_memory_and_on_redis() {
    use raceguard::rate::{AllOf, Limit, RateLimiter};
    use raceguard::redis::RedisRateLimiter;

    /// What a work queue's worker sees: one decision per call.
    async fn calls(limit: &impl Limit) -> Vec<(bool, u32)> {
        let mut out = Vec::new();
        for _ in 0..5 {
            let d = limit.check_n(1).await.unwrap();
            out.push((d.allowed(), d.remaining()));
        }
        out
    }
    // 3 per minute binds before 10 per minute; a denial takes nothing.
    let expected = [(true, 2), (true, 1), (true, 0), (false, 0), (false, 0)];

    let wide = Arc::new(RateLimiter::new(Quota::per_minute(10).unwrap()));
    let narrow = Arc::new(RateLimiter::new(Quota::per_minute(3).unwrap()));
    let memory = AllOf::new("wide", wide.clone()).and("narrow", narrow);
    rt().block_on(async {
        assert_eq!(calls(&memory).await, expected);
    });
    assert_eq!(
        wide.peek_n(0).unwrap().remaining(),
        7,
        "denials took nothing"
    );

    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let redis = RedisBackend::connect(server.url(), config()).await.unwrap();
        let wide =
            RedisRateLimiter::new(&redis, &unique("wide"), Quota::per_minute(10).unwrap()).unwrap();
        let narrow =
            RedisRateLimiter::new(&redis, &unique("narrow"), Quota::per_minute(3).unwrap())
                .unwrap();
        let on_redis = RedisMultiLimit::new(&redis)
            .global("wide", &wide)
            .global("narrow", &narrow);
        assert_eq!(calls(&on_redis).await, expected);
        let left = RedisMultiLimit::new(&redis).global("wide", &wide);
        assert_eq!(
            left.check_n(1).await.unwrap().remaining(),
            6,
            "denials took nothing from the wide limit (7 left, this check takes one)"
        );
        let empty = RedisMultiLimit::new(&redis);
        let err = Limit::check_n(&empty, 1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    });
}
