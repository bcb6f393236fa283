//! The rate-limit layer on Redis (`RedisLimits`) against real servers:
//! exact IETF headers (identical to the in-memory backend's), all-or-nothing
//! per-user + global checks, one quota shared by two processes, isolated
//! users, outages under both `BackendErrorPolicy`s, and Redis Cluster.
//!
//! Every limiter runs in explicit-time mode on a shared `ManualClock`: no
//! decision depends on wall time, and nothing sleeps.
#![cfg(all(feature = "tower", feature = "redis", feature = "test-util"))]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use raceguard::clock::ManualClock;
use raceguard::keys::UserId;
use raceguard::middleware::{
    AuthenticatedUser, BackendErrorPolicy, MemoryLimits, PeerAddr, RateKey, RateLimitLayer,
    RedisLimits, UserOrPeer,
};
use raceguard::rate::{KeyedRateLimiter, Quota, RateLimiter};
use raceguard::redis::{
    FailurePolicy, RedisBackend, RedisConfig, RedisKeyedRateLimiter, RedisRateLimiter,
};
use raceguard::testing::RedisServer;
use tower::{Layer, Service, ServiceExt};

type Req = Request<String>;
type Resp = Response<String>;

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

/// An inner service that counts its calls and answers 200 "ok".
fn counting() -> (
    Arc<AtomicUsize>,
    impl Service<Req, Response = Resp, Error = Infallible, Future: Send> + Clone + Send + 'static,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = tower::service_fn(move |_req: Req| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new("ok".to_owned())) }
    });
    (calls, svc)
}

async fn send<S>(svc: &S, req: Req) -> Resp
where
    S: Service<Req, Response = Resp, Error = Infallible> + Clone,
{
    svc.clone().oneshot(req).await.unwrap()
}

fn user(name: &str) -> UserId {
    UserId::new(name).unwrap()
}

fn authed(name: &str) -> Req {
    let mut r = Request::new(String::new());
    r.extensions_mut().insert(AuthenticatedUser(user(name)));
    r
}

fn header<'a>(resp: &'a Resp, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

/// The headers a test compares: status, `Retry-After`, the IETF pair and
/// the legacy trio.
fn summary(resp: &Resp) -> Vec<Option<String>> {
    let mut out = vec![Some(resp.status().as_str().to_owned())];
    for name in [
        "retry-after",
        "ratelimit-policy",
        "ratelimit",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        out.push(header(resp, name).map(str::to_owned));
    }
    out
}

/// `per_user` per key + `global`, on `redis`, at `clock`'s time.
fn redis_limits(
    redis: &RedisBackend,
    clock: &ManualClock,
    per_user: Quota,
    global: Quota,
) -> Arc<RedisLimits> {
    let keyed = RedisKeyedRateLimiter::new(redis, "mw-user", per_user).unwrap();
    let global = RedisRateLimiter::new(redis, "mw-global", global).unwrap();
    Arc::new(
        RedisLimits::new("user", keyed)
            .unwrap()
            .with_global("global", global)
            .unwrap()
            .with_clock(clock.clone()),
    )
}

fn id_of(name: &str) -> UserId {
    RateKey::User(user(name)).to_user_id().unwrap()
}

/// What `alice` has left, without consuming (cost 0 at the clock's time).
async fn left(limits: &RedisLimits, clock: &ManualClock, name: &str) -> u32 {
    use raceguard::clock::Clock;
    limits
        .per_user()
        .peek_n_at(&id_of(name), 0, clock.now_nanos())
        .await
        .unwrap()
        .remaining()
}

#[test]
fn exact_ietf_headers_identical_to_the_in_memory_backend() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let redis = RedisBackend::connect(server.url(), config()).await.unwrap();
        let (per_user, global) = (
            Quota::per_minute(3).unwrap(),
            Quota::per_minute(60).unwrap(),
        );

        let clock = ManualClock::new();
        let (calls, inner) = counting();
        let on_redis = RateLimitLayer::new(redis_limits(&redis, &clock, per_user, global))
            .legacy_headers(true)
            .layer(inner);

        let mem_clock = ManualClock::new();
        let memory = MemoryLimits::new(
            "user",
            KeyedRateLimiter::<RateKey, _>::builder(per_user)
                .clock(mem_clock.clone())
                .build()
                .unwrap(),
        )
        .unwrap()
        .with_global("global", RateLimiter::with_clock(global, mem_clock.clone()))
        .unwrap();
        let (_, mem_inner) = counting();
        let in_memory = RateLimitLayer::new(memory)
            .legacy_headers(true)
            .layer(mem_inner);

        // 20 s per user cell, 1 s per global cell.
        for (r, t, gr, gt) in [(2, 20, 59, 1), (1, 40, 58, 2), (0, 60, 57, 3)] {
            let resp = send(&on_redis, authed("alice")).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.body(), "ok");
            assert_eq!(
                header(&resp, "ratelimit-policy"),
                Some(r#""user";q=3;w=60, "global";q=60;w=60"#)
            );
            let expected = format!(r#""user";r={r};t={t}, "global";r={gr};t={gt}"#);
            assert_eq!(header(&resp, "ratelimit"), Some(expected.as_str()));
            assert_eq!(header(&resp, "retry-after"), None);
            assert_eq!(
                header(&resp, "x-ratelimit-remaining"),
                Some(&*r.to_string())
            );
            let mem = send(&in_memory, authed("alice")).await;
            assert_eq!(summary(&resp), summary(&mem));
        }

        // The user limit denies; the global cell that allowed is given back
        // in the headers (57 left, 3 s to reset) and in Redis.
        let denied = send(&on_redis, authed("alice")).await;
        assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(denied.body(), "");
        assert_eq!(header(&denied, "retry-after"), Some("20"));
        assert_eq!(
            header(&denied, "ratelimit"),
            Some(r#""user";r=0;t=60, "global";r=57;t=3"#)
        );
        assert_eq!(header(&denied, "x-ratelimit-limit"), Some("3"));
        assert_eq!(header(&denied, "x-ratelimit-remaining"), Some("0"));
        assert_eq!(header(&denied, "x-ratelimit-reset"), Some("60"));
        let mem = send(&in_memory, authed("alice")).await;
        assert_eq!(summary(&denied), summary(&mem));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "denied never reaches the service"
        );

        // The denial consumed no global cell: bob's request is the 4th.
        let bob = send(&on_redis, authed("bob")).await;
        assert_eq!(
            header(&bob, "ratelimit"),
            Some(r#""user";r=2;t=20, "global";r=56;t=4"#)
        );
        assert_eq!(
            summary(&bob),
            summary(&send(&in_memory, authed("bob")).await)
        );

        // 20 s later alice has exactly one cell again, on both backends.
        clock.advance(Duration::from_secs(20));
        mem_clock.advance(Duration::from_secs(20));
        let again = send(&on_redis, authed("alice")).await;
        assert_eq!(again.status(), StatusCode::OK);
        assert_eq!(
            header(&again, "ratelimit"),
            Some(r#""user";r=0;t=60, "global";r=59;t=1"#)
        );
        assert_eq!(
            summary(&again),
            summary(&send(&in_memory, authed("alice")).await)
        );
    });
}

#[test]
fn a_global_denial_consumes_nothing_from_the_user() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let redis = RedisBackend::connect(server.url(), config()).await.unwrap();
        let clock = ManualClock::new();
        // Global: 2 per minute (30 s a cell); per user: 3 per minute.
        let limits = redis_limits(
            &redis,
            &clock,
            Quota::per_minute(3).unwrap(),
            Quota::per_minute(2).unwrap(),
        );
        let (calls, inner) = counting();
        let svc = RateLimitLayer::new(limits.clone()).layer(inner);

        assert_eq!(send(&svc, authed("bob")).await.status(), StatusCode::OK);
        assert_eq!(send(&svc, authed("carol")).await.status(), StatusCode::OK);
        assert_eq!(left(&limits, &clock, "alice").await, 3);

        for _ in 0..5 {
            let denied = send(&svc, authed("alice")).await;
            assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(header(&denied, "retry-after"), Some("30"));
            // Alice's own policy shows her untouched, full quota.
            assert_eq!(
                header(&denied, "ratelimit"),
                Some(r#""user";r=3;t=0, "global";r=0;t=60"#)
            );
        }
        assert_eq!(left(&limits, &clock, "alice").await, 3, "nothing consumed");
        assert_eq!(left(&limits, &clock, "bob").await, 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // Once a global cell is back, alice spends exactly one of her own.
        clock.advance(Duration::from_secs(30));
        let ok = send(&svc, authed("alice")).await;
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            header(&ok, "ratelimit"),
            Some(r#""user";r=2;t=20, "global";r=0;t=60"#)
        );
        assert_eq!(left(&limits, &clock, "alice").await, 2);
    });
}

#[test]
fn two_processes_share_one_users_quota_exactly() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        // Two "processes": separate connections, limiters and layers; only
        // the Redis server (and the clock's time) is shared.
        let clock = ManualClock::new();
        let (per_user, global) = (
            Quota::per_minute(5).unwrap(),
            Quota::per_minute(1000).unwrap(),
        );
        let a = RedisBackend::connect(server.url(), config()).await.unwrap();
        let b = RedisBackend::connect(server.url(), config()).await.unwrap();
        let (calls_a, inner_a) = counting();
        let (calls_b, inner_b) = counting();
        let svc_a = RateLimitLayer::new(redis_limits(&a, &clock, per_user, global)).layer(inner_a);
        let svc_b = RateLimitLayer::new(redis_limits(&b, &clock, per_user, global)).layer(inner_b);

        // Alternating: the remaining count runs down across both.
        for (i, r) in [4, 3, 2, 1, 0].into_iter().enumerate() {
            let svc = if i % 2 == 0 { &svc_a } else { &svc_b };
            let resp = send(svc, authed("alice")).await;
            assert_eq!(resp.status(), StatusCode::OK);
            let expected = format!(r#""user";r={r};t={}"#, 12 * (5 - r));
            assert!(
                header(&resp, "ratelimit").unwrap().starts_with(&expected),
                "{:?}",
                header(&resp, "ratelimit")
            );
        }
        for svc in [&svc_a, &svc_b] {
            let resp = send(svc, authed("alice")).await;
            assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        }
        assert_eq!(calls_a.load(Ordering::SeqCst), 3);
        assert_eq!(calls_b.load(Ordering::SeqCst), 2);

        // Concurrently: 40 requests for carol, 20 per process, at one
        // instant: exactly her burst passes, whoever gets there first.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..40 {
            let svc = if i % 2 == 0 {
                svc_a.clone()
            } else {
                svc_b.clone()
            };
            tasks.spawn(async move { svc.oneshot(authed("carol")).await.unwrap().status() });
        }
        let mut ok = 0;
        while let Some(status) = tasks.join_next().await {
            match status.unwrap() {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => {}
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(ok, 5);
        assert_eq!(
            calls_a.load(Ordering::SeqCst) + calls_b.load(Ordering::SeqCst),
            10
        );
    });
}

#[test]
fn users_and_key_spaces_are_isolated() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let redis = RedisBackend::connect(server.url(), config()).await.unwrap();
        let clock = ManualClock::new();
        let limits = redis_limits(
            &redis,
            &clock,
            Quota::per_minute(2).unwrap(),
            Quota::per_minute(1000).unwrap(),
        );
        let (_, inner) = counting();
        let svc = RateLimitLayer::new(limits.clone())
            .key_extractor(UserOrPeer::new().header(http::HeaderName::from_static("x-user-id")))
            .layer(inner);

        for _ in 0..2 {
            assert_eq!(send(&svc, authed("alice")).await.status(), StatusCode::OK);
        }
        assert_eq!(
            send(&svc, authed("alice")).await.status(),
            StatusCode::TOO_MANY_REQUESTS
        );

        // Another user, the same id merely claimed in a header, and a peer
        // address each have their own full quota.
        let bob = send(&svc, authed("bob")).await;
        assert_eq!(bob.status(), StatusCode::OK);
        assert!(
            header(&bob, "ratelimit")
                .unwrap()
                .starts_with(r#""user";r=1;"#)
        );

        let mut claimed = Request::new(String::new());
        claimed
            .extensions_mut()
            .insert(PeerAddr("192.0.2.10:1000".parse().unwrap()));
        claimed
            .headers_mut()
            .insert("x-user-id", HeaderValue::from_static("alice"));
        let claimed = send(&svc, claimed).await;
        assert_eq!(claimed.status(), StatusCode::OK);
        assert!(
            header(&claimed, "ratelimit")
                .unwrap()
                .starts_with(r#""user";r=1;"#)
        );

        let mut peer = Request::new(String::new());
        peer.extensions_mut()
            .insert(PeerAddr("192.0.2.10:1000".parse().unwrap()));
        let peer = send(&svc, peer).await;
        assert_eq!(peer.status(), StatusCode::OK);
        assert!(
            header(&peer, "ratelimit")
                .unwrap()
                .starts_with(r#""user";r=1;"#)
        );

        assert_eq!(left(&limits, &clock, "alice").await, 0);
        assert_eq!(left(&limits, &clock, "bob").await, 1);
        assert_eq!(left(&limits, &clock, "dave").await, 2);
    });
}

#[test]
fn an_outage_is_503_failing_closed_and_passes_failing_open() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let redis = RedisBackend::connect(server.url(), config()).await.unwrap();
        let clock = ManualClock::new();
        let limits = redis_limits(
            &redis,
            &clock,
            Quota::per_minute(3).unwrap(),
            Quota::per_minute(1000).unwrap(),
        );
        let (closed_calls, inner) = counting();
        let closed = RateLimitLayer::new(limits.clone()).layer(inner);
        let (open_calls, inner) = counting();
        let open = RateLimitLayer::new(limits.clone())
            .on_backend_error(BackendErrorPolicy::FailOpen)
            .layer(inner);
        // Without a global limit the keyed limiter's own FailurePolicy
        // decides first (here: deny), whatever the layer's policy.
        let keyed_only = RedisLimits::new(
            "user",
            RedisKeyedRateLimiter::new(&redis, "mw-keyed", Quota::per_minute(3).unwrap())
                .unwrap()
                .with_failure_policy(FailurePolicy::FailClosed),
        )
        .unwrap()
        .with_clock(clock.clone());
        let (keyed_calls, inner) = counting();
        let keyed = RateLimitLayer::new(keyed_only)
            .on_backend_error(BackendErrorPolicy::FailOpen)
            .layer(inner);

        assert_eq!(
            send(&closed, authed("alice")).await.status(),
            StatusCode::OK
        );
        assert_eq!(send(&open, authed("alice")).await.status(), StatusCode::OK);
        assert_eq!(send(&keyed, authed("alice")).await.status(), StatusCode::OK);

        server.stop().unwrap();
        // A hang guard, not a timing assertion: every call must come back.
        let guard = Duration::from_secs(10);
        for _ in 0..3 {
            let resp = tokio::time::timeout(guard, send(&closed, authed("alice")))
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(resp.body(), "");
            assert_eq!(header(&resp, "ratelimit"), None);

            let resp = tokio::time::timeout(guard, send(&open, authed("alice")))
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.body(), "ok");
            assert_eq!(
                header(&resp, "ratelimit"),
                None,
                "no headers when failing open"
            );

            let resp = tokio::time::timeout(guard, send(&keyed, authed("alice")))
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(header(&resp, "retry-after"), Some("20"));
        }
        assert_eq!(closed_calls.load(Ordering::SeqCst), 1);
        assert_eq!(open_calls.load(Ordering::SeqCst), 4);
        assert_eq!(keyed_calls.load(Ordering::SeqCst), 1);
    });
}

#[cfg(feature = "cluster")]
#[test]
fn on_a_cluster_the_shared_slot_layout_works_and_per_owner_is_refused() {
    use raceguard::ErrorKind;
    use raceguard::keys::ScopeId;
    use raceguard::redis::KeyLayout;
    use raceguard::testing::RedisCluster;

    let Some(cluster) = RedisCluster::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let redis = RedisBackend::connect_cluster(&cluster.urls(), config())
            .await
            .unwrap();
        let clock = ManualClock::new();
        let q = Quota::per_minute(2).unwrap();
        let global =
            RedisRateLimiter::new(&redis, "cl-global", Quota::per_minute(3).unwrap()).unwrap();

        // Per-owner keys live in each owner's slot, the global key in its
        // own: refused up front with a typed error, never a wrong answer.
        let per_owner = RedisKeyedRateLimiter::new(&redis, "cl-user", q).unwrap();
        let err = RedisLimits::new("user", per_owner.clone())
            .unwrap()
            .with_global("global", global.clone())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err:?}");
        assert!(matches!(
            err,
            raceguard::Error::InvalidInput {
                what: "rate.keys",
                ..
            }
        ));
        // A shared slot named after another scope is refused as well.
        let elsewhere = per_owner.clone().with_layout(KeyLayout::SharedSlot(
            ScopeId::new("not-the-global").unwrap(),
        ));
        let err = RedisLimits::new("user", elsewhere)
            .unwrap()
            .with_global("global", global.clone())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err:?}");
        // Without a global limit the per-owner layout is fine on a cluster.
        let alone = RedisLimits::new("user", per_owner)
            .unwrap()
            .with_clock(clock.clone());
        let (_, inner) = counting();
        let alone = RateLimitLayer::new(alone).layer(inner);
        let resp = send(&alone, authed("zoe")).await;
        assert_eq!(header(&resp, "ratelimit"), Some(r#""user";r=1;t=30"#));

        // The shared-slot layout: one script per check, all or nothing.
        let shared = RedisKeyedRateLimiter::new(&redis, "cl-user", q)
            .unwrap()
            .with_layout(KeyLayout::SharedSlot(ScopeId::new("cl-global").unwrap()));
        let limits = Arc::new(
            RedisLimits::new("user", shared)
                .unwrap()
                .with_global("global", global)
                .unwrap()
                .with_clock(clock.clone()),
        );
        let (calls, inner) = counting();
        let svc = RateLimitLayer::new(limits.clone()).layer(inner);
        for (r, t, gr, gt) in [(1, 30, 2, 20), (0, 60, 1, 40)] {
            let resp = send(&svc, authed("alice")).await;
            assert_eq!(resp.status(), StatusCode::OK);
            let expected = format!(r#""user";r={r};t={t}, "global";r={gr};t={gt}"#);
            assert_eq!(header(&resp, "ratelimit"), Some(expected.as_str()));
        }
        let denied = send(&svc, authed("alice")).await;
        assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            header(&denied, "ratelimit"),
            Some(r#""user";r=0;t=60, "global";r=1;t=40"#)
        );
        // The last global cell goes to bob; then carol is denied globally
        // and keeps her own quota.
        assert_eq!(send(&svc, authed("bob")).await.status(), StatusCode::OK);
        let denied = send(&svc, authed("carol")).await;
        assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&denied, "retry-after"), Some("20"));
        assert_eq!(left(&limits, &clock, "carol").await, 2);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    });
}

#[test]
fn a_global_limiter_on_another_backend_is_refused() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let a = RedisBackend::connect(server.url(), config()).await.unwrap();
        let b = RedisBackend::connect(server.url(), config()).await.unwrap();
        let quota = Quota::per_minute(5).unwrap();
        let keyed = RedisKeyedRateLimiter::new(&a, "mw-user-x", quota).unwrap();
        let elsewhere = RedisRateLimiter::new(&b, "mw-global-x", quota).unwrap();
        let err = RedisLimits::new("user", keyed.clone())
            .unwrap()
            .with_global("global", elsewhere)
            .unwrap_err();
        assert_eq!(err.kind(), raceguard::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("one RedisBackend"), "{err}");
        // A clone of the same backend is the same backend.
        let here = RedisRateLimiter::new(&a.clone(), "mw-global-x", quota).unwrap();
        RedisLimits::new("user", keyed)
            .unwrap()
            .with_global("global", here)
            .unwrap();
    });
}
