//! The tower layers of `raceguard::middleware`, driven with
//! `tower::ServiceExt::oneshot` and `tower_test::mock`: exact headers under a
//! `ManualClock`, exact status codes, isolated keys.
#![cfg(feature = "tower")]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use raceguard::client::ClientFactory;
use raceguard::clock::ManualClock;
use raceguard::keys::UserId;
use raceguard::middleware::{
    AuthenticatedUser, BackendErrorPolicy, ClientLayer, ConcurrencyCapacity, KeyedBackend,
    LimitOutcome, LoadShedLayer, MemoryLimits, PeerAddr, RateKey, RateLimitBackend, RateLimitLayer,
    SessionLayer, SessionSource, UserOrPeer,
};
use raceguard::rate::{KeyedRateLimiter, Quota, RateLimiter};
use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionId, SessionRegistry};
use raceguard::{Error, SessionKey};
use tower::{Layer, Service, ServiceExt};

type Req = Request<String>;
type Resp = Response<String>;

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

fn from_peer(addr: &str) -> Req {
    let mut r = Request::new(String::new());
    r.extensions_mut()
        .insert(PeerAddr(addr.parse::<SocketAddr>().unwrap()));
    r
}

fn claiming(name: &str) -> Req {
    let mut r = from_peer("192.0.2.10:1000");
    r.headers_mut()
        .insert("x-user-id", HeaderValue::from_str(name).unwrap());
    r
}

fn header<'a>(resp: &'a Resp, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

/// 3 per minute per key (one cell every 20 s) on a manual clock.
fn per_user(clock: &ManualClock, quota: Quota) -> KeyedRateLimiter<RateKey, ManualClock> {
    KeyedRateLimiter::<RateKey, _>::builder(quota)
        .clock(clock.clone())
        .build()
        .unwrap()
}

fn three_per_minute(clock: &ManualClock) -> Arc<MemoryLimits<ManualClock>> {
    Arc::new(MemoryLimits::new("user", per_user(clock, Quota::per_minute(3).unwrap())).unwrap())
}

#[tokio::test]
async fn allowed_and_denied_responses_carry_exact_ietf_headers() {
    let clock = ManualClock::new();
    let (calls, inner) = counting();
    let svc = RateLimitLayer::new(three_per_minute(&clock)).layer(inner);

    for (r, t) in [(2, 20), (1, 40), (0, 60)] {
        let resp = send(&svc, authed("alice")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.body(), "ok");
        assert_eq!(
            header(&resp, "ratelimit-policy"),
            Some(r#""user";q=3;w=60"#)
        );
        let expected = format!(r#""user";r={r};t={t}"#);
        assert_eq!(header(&resp, "ratelimit"), Some(expected.as_str()));
        assert_eq!(header(&resp, "retry-after"), None);
        assert_eq!(header(&resp, "x-ratelimit-limit"), None, "legacy is opt-in");
    }

    let denied = send(&svc, authed("alice")).await;
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        denied.body(),
        "",
        "generated responses have the default body"
    );
    assert_eq!(header(&denied, "retry-after"), Some("20"));
    assert_eq!(
        header(&denied, "ratelimit-policy"),
        Some(r#""user";q=3;w=60"#)
    );
    assert_eq!(header(&denied, "ratelimit"), Some(r#""user";r=0;t=60"#));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "a denied request never reaches the service"
    );
}

#[tokio::test]
async fn denied_exactly_until_retry_after_has_passed() {
    let clock = ManualClock::new();
    let (calls, inner) = counting();
    let svc = RateLimitLayer::new(three_per_minute(&clock)).layer(inner);
    for _ in 0..3 {
        assert_eq!(send(&svc, authed("alice")).await.status(), StatusCode::OK);
    }
    // 19.5 s later the next cell is 0.5 s away: still denied, and the
    // header rounds up so an obedient client is never early.
    clock.advance(Duration::from_millis(19_500));
    let denied = send(&svc, authed("alice")).await;
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&denied, "retry-after"), Some("1"));
    assert_eq!(header(&denied, "ratelimit"), Some(r#""user";r=0;t=41"#));

    clock.advance(Duration::from_millis(500));
    let ok = send(&svc, authed("alice")).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(header(&ok, "ratelimit"), Some(r#""user";r=0;t=60"#));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn legacy_headers_are_exact_when_enabled() {
    let clock = ManualClock::new();
    let (_, inner) = counting();
    let svc = RateLimitLayer::new(three_per_minute(&clock))
        .legacy_headers(true)
        .layer(inner);
    let ok = send(&svc, authed("alice")).await;
    assert_eq!(header(&ok, "x-ratelimit-limit"), Some("3"));
    assert_eq!(header(&ok, "x-ratelimit-remaining"), Some("2"));
    assert_eq!(header(&ok, "x-ratelimit-reset"), Some("20"));
    send(&svc, authed("alice")).await;
    send(&svc, authed("alice")).await;
    let denied = send(&svc, authed("alice")).await;
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&denied, "x-ratelimit-limit"), Some("3"));
    assert_eq!(header(&denied, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(header(&denied, "x-ratelimit-reset"), Some("60"));
    assert_eq!(header(&denied, "ratelimit"), Some(r#""user";r=0;t=60"#));
}

#[tokio::test]
async fn one_user_exhausting_their_quota_does_not_affect_another() {
    let clock = ManualClock::new();
    let (_, inner) = counting();
    let limits = three_per_minute(&clock);
    let svc = RateLimitLayer::new(limits.clone()).layer(inner);
    for _ in 0..3 {
        send(&svc, authed("alice")).await;
    }
    assert_eq!(
        send(&svc, authed("alice")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let bob = send(&svc, authed("bob")).await;
    assert_eq!(bob.status(), StatusCode::OK);
    assert_eq!(header(&bob, "ratelimit"), Some(r#""user";r=2;t=20"#));
    assert_eq!(limits.per_key().tracked_keys(), 2);
}

#[tokio::test]
async fn a_header_claim_cannot_spend_an_authenticated_users_quota() {
    let clock = ManualClock::new();
    let (_, inner) = counting();
    let limits = three_per_minute(&clock);
    let keys = UserOrPeer::new().header(http::HeaderName::from_static("x-user-id"));
    let svc = RateLimitLayer::new(limits.clone())
        .key_extractor(keys)
        .layer(inner);

    // Anyone can claim "alice" in a header: that spends the claimed key only.
    for _ in 0..3 {
        assert_eq!(send(&svc, claiming("alice")).await.status(), StatusCode::OK);
    }
    assert_eq!(
        send(&svc, claiming("alice")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let real = send(&svc, authed("alice")).await;
    assert_eq!(real.status(), StatusCode::OK);
    assert_eq!(header(&real, "ratelimit"), Some(r#""user";r=2;t=20"#));

    // An authenticated user sending someone else's id in the header is
    // charged to themselves, not to the claimed id.
    let mut mixed = authed("carol");
    mixed
        .headers_mut()
        .insert("x-user-id", HeaderValue::from_static("dave"));
    assert_eq!(send(&svc, mixed).await.status(), StatusCode::OK);
    let dave = RateKey::Claimed(user("dave"));
    let carol = RateKey::User(user("carol"));
    assert_eq!(limits.per_key().peek_n(&dave, 0).unwrap().remaining(), 3);
    assert_eq!(limits.per_key().peek_n(&carol, 0).unwrap().remaining(), 2);
}

#[tokio::test]
async fn peers_are_keyed_by_ip_not_by_connection() {
    let clock = ManualClock::new();
    let (_, inner) = counting();
    let limits = three_per_minute(&clock);
    let svc = RateLimitLayer::new(limits.clone()).layer(inner);
    // Three connections (ports) from one address share one quota.
    for port in [1000, 1001, 1002] {
        let resp = send(&svc, from_peer(&format!("198.51.100.7:{port}"))).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let again = send(&svc, from_peer("198.51.100.7:1003")).await;
    assert_eq!(again.status(), StatusCode::TOO_MANY_REQUESTS);
    let other = send(&svc, from_peer("198.51.100.8:1000")).await;
    assert_eq!(header(&other, "ratelimit"), Some(r#""user";r=2;t=20"#));
    // IPv6: one /64 is one key; another /64 is another.
    send(&svc, from_peer("[2001:db8:0:1::1]:80")).await;
    let same64 = send(&svc, from_peer("[2001:db8:0:1::ffff]:80")).await;
    assert_eq!(header(&same64, "ratelimit"), Some(r#""user";r=1;t=40"#));
    let next64 = send(&svc, from_peer("[2001:db8:0:2::1]:80")).await;
    assert_eq!(header(&next64, "ratelimit"), Some(r#""user";r=2;t=20"#));
    // Authenticated requests from the exhausted address are the user's.
    let mut alice = authed("alice");
    alice
        .extensions_mut()
        .insert(PeerAddr("198.51.100.7:1004".parse().unwrap()));
    assert_eq!(send(&svc, alice).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn malformed_user_header_is_400_and_reaches_neither_limiter_nor_service() {
    let clock = ManualClock::new();
    let (calls, inner) = counting();
    let limits = three_per_minute(&clock);
    let keys = UserOrPeer::new().header(http::HeaderName::from_static("x-user-id"));
    let svc = RateLimitLayer::new(limits.clone())
        .key_extractor(keys)
        .layer(inner);

    let mut cases: Vec<Req> = Vec::new();
    cases.push(claiming(""));
    cases.push(claiming(&"x".repeat(257)));
    let mut not_utf8 = from_peer("192.0.2.1:1");
    not_utf8
        .headers_mut()
        .insert("x-user-id", HeaderValue::from_bytes(b"al\xffice").unwrap());
    cases.push(not_utf8);
    let mut twice = claiming("alice");
    twice
        .headers_mut()
        .append("x-user-id", HeaderValue::from_static("bob"));
    cases.push(twice);
    for req in cases {
        let resp = send(&svc, req).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(header(&resp, "ratelimit"), None);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        limits.per_key().tracked_keys(),
        0,
        "no fallback to the peer"
    );
    // A 256-byte id is valid.
    assert_eq!(
        send(&svc, claiming(&"x".repeat(256))).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_request_without_any_key_is_a_stack_misconfiguration() {
    let clock = ManualClock::new();
    let (calls, inner) = counting();
    let svc = RateLimitLayer::new(three_per_minute(&clock)).layer(inner);
    let resp = send(&svc, Request::new(String::new())).await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_global_denial_consumes_nothing_from_the_users_quota() {
    let clock = ManualClock::new();
    let (calls, inner) = counting();
    let global = RateLimiter::with_clock(Quota::per_minute(2).unwrap(), clock.clone());
    let limits = Arc::new(
        MemoryLimits::new("user", per_user(&clock, Quota::per_minute(3).unwrap()))
            .unwrap()
            .with_global("global", global)
            .unwrap(),
    );
    let svc = RateLimitLayer::new(limits.clone()).layer(inner);

    let first = send(&svc, authed("alice")).await;
    assert_eq!(
        header(&first, "ratelimit-policy"),
        Some(r#""user";q=3;w=60, "global";q=2;w=60"#)
    );
    assert_eq!(
        header(&first, "ratelimit"),
        Some(r#""user";r=2;t=20, "global";r=1;t=30"#)
    );
    send(&svc, authed("alice")).await;

    let bob = send(&svc, authed("bob")).await;
    assert_eq!(bob.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&bob, "retry-after"), Some("30"));
    // Bob's own policy shows his untouched quota, the global one is spent.
    assert_eq!(
        header(&bob, "ratelimit"),
        Some(r#""user";r=3;t=0, "global";r=0;t=60"#)
    );
    let bob_key = RateKey::User(user("bob"));
    assert_eq!(limits.per_key().peek_n(&bob_key, 0).unwrap().remaining(), 3);
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // And a per-user denial consumes nothing from the global limit.
    clock.advance(Duration::from_secs(60));
    for _ in 0..3 {
        limits
            .per_key()
            .check(&RateKey::User(user("alice")))
            .unwrap();
    }
    let alice = send(&svc, authed("alice")).await;
    assert_eq!(alice.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limits.global().unwrap().peek_n(0).unwrap().remaining(), 2);
}

struct Failing;
impl RateLimitBackend for Failing {
    async fn check(&self, _key: &RateKey) -> raceguard::Result<LimitOutcome> {
        Err(Error::backend("test", true, "connection refused"))
    }
}

#[tokio::test]
async fn backend_failures_fail_closed_with_503_or_open_by_policy() {
    let (calls, inner) = counting();
    let closed = RateLimitLayer::new(Failing).layer(inner.clone());
    let resp = send(&closed, authed("alice")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let open = RateLimitLayer::new(Failing)
        .on_backend_error(BackendErrorPolicy::FailOpen)
        .layer(inner);
    let resp = send(&open, authed("alice")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "ratelimit"), None);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_full_key_table_is_503_not_a_panic() {
    let clock = ManualClock::new();
    let (_, inner) = counting();
    let per_key = KeyedRateLimiter::<RateKey, _>::builder(Quota::per_minute(3).unwrap())
        .clock(clock.clone())
        .max_keys(1)
        .build()
        .unwrap();
    let svc = RateLimitLayer::new(MemoryLimits::new("user", per_key).unwrap()).layer(inner);
    assert_eq!(send(&svc, authed("alice")).await.status(), StatusCode::OK);
    assert_eq!(
        send(&svc, authed("bob")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn keyed_backend_runs_any_keyed_limit() {
    let clock = ManualClock::new();
    let quota = Quota::per_minute(2).unwrap();
    let limiter = KeyedRateLimiter::<UserId, _>::builder(quota)
        .clock(clock.clone())
        .build()
        .unwrap();
    let backend = Arc::new(KeyedBackend::new("api", limiter).unwrap());
    let (_, inner) = counting();
    let svc = RateLimitLayer::new(backend.clone()).layer(inner);
    let ok = send(&svc, authed("alice")).await;
    assert_eq!(header(&ok, "ratelimit-policy"), Some(r#""api";q=2;w=60"#));
    assert_eq!(header(&ok, "ratelimit"), Some(r#""api";r=1;t=30"#));
    send(&svc, authed("alice")).await;
    let denied = send(&svc, authed("alice")).await;
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&denied, "retry-after"), Some("30"));
    // Keys are namespaced: the authenticated alice is "u:alice".
    let spent = backend.limiter().peek_n(&user("u:alice"), 0).unwrap();
    assert_eq!(spent.remaining(), 0);
    let untouched = backend.limiter().peek_n(&user("alice"), 0).unwrap();
    assert_eq!(untouched.remaining(), 2);
}

#[tokio::test]
async fn keyed_backend_reports_each_keys_own_quota() {
    // A resolver gives premium users 10 per minute: the policy header must
    // say so, agreeing with `r`, never the default quota.
    let clock = ManualClock::new();
    let limiter = KeyedRateLimiter::<UserId, _>::builder(Quota::per_minute(2).unwrap())
        .clock(clock.clone())
        .quota_resolver(|u: &UserId| {
            if u.as_str() == "u:premium" {
                Quota::per_minute(10).unwrap()
            } else {
                Quota::per_minute(2).unwrap()
            }
        })
        .build()
        .unwrap();
    let svc = RateLimitLayer::new(Arc::new(KeyedBackend::new("api", limiter).unwrap()))
        .layer(counting().1);
    let premium = send(&svc, authed("premium")).await;
    assert_eq!(
        header(&premium, "ratelimit-policy"),
        Some(r#""api";q=10;w=60"#)
    );
    assert_eq!(header(&premium, "ratelimit"), Some(r#""api";r=9;t=6"#));
    let basic = send(&svc, authed("basic")).await;
    assert_eq!(
        header(&basic, "ratelimit-policy"),
        Some(r#""api";q=2;w=60"#)
    );
}

#[tokio::test]
async fn load_shed_answers_503_while_full_and_admits_after_release() {
    let cap = ConcurrencyCapacity::new(1, Duration::from_millis(1500)).unwrap();
    let (mock, mut handle) = tower_test::mock::pair::<Req, Resp>();
    handle.allow(10);
    let mut svc = LoadShedLayer::new(cap.clone()).layer(mock);

    // Request 1 is admitted and held inside the inner service.
    let first = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new("first".to_owned()));
    let first = tokio::spawn(first);
    let (req, pending) = handle.next_request().await.unwrap();
    assert_eq!(req.body(), "first");
    assert_eq!(cap.in_flight(), 1);

    // Request 2 is shed at once and never reaches the inner service.
    let shed = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new("second".to_owned()))
        .await
        .unwrap();
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&shed, "retry-after"), Some("2"));
    assert!(handle.poll_request().is_pending());

    // Request 1 finishes: its permit is released.
    pending.send_response(Response::new("done".to_owned()));
    let resp = first.await.unwrap().unwrap();
    assert_eq!(
        (resp.status(), resp.body().as_str()),
        (StatusCode::OK, "done")
    );
    assert_eq!(cap.in_flight(), 0);

    // Request 3 is admitted again.
    let third = tokio::spawn(
        svc.ready()
            .await
            .unwrap()
            .call(Request::new("third".to_owned())),
    );
    let (req, pending) = handle.next_request().await.unwrap();
    assert_eq!(req.body(), "third");
    pending.send_response(Response::new("done".to_owned()));
    assert_eq!(third.await.unwrap().unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn a_dropped_request_gives_its_permit_back() {
    let cap = ConcurrencyCapacity::new(1, Duration::from_secs(1)).unwrap();
    let (mock, mut handle) = tower_test::mock::pair::<Req, Resp>();
    handle.allow(10);
    let mut svc = LoadShedLayer::new(cap.clone()).layer(mock);
    let fut = svc.ready().await.unwrap().call(Request::new(String::new()));
    assert_eq!(cap.in_flight(), 1);
    drop(fut); // the client went away
    assert_eq!(cap.in_flight(), 0);
}

#[tokio::test]
async fn load_shed_follows_a_queue_like_closure() {
    let full = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = full.clone();
    let capacity = move || f.load(Ordering::SeqCst).then_some(Duration::from_secs(5));
    let (calls, inner) = counting();
    let svc = LoadShedLayer::new(capacity).layer(inner);
    let shed = send(&svc, Request::new(String::new())).await;
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&shed, "retry-after"), Some("5"));
    full.store(false, Ordering::SeqCst);
    assert_eq!(
        send(&svc, Request::new(String::new())).await.status(),
        StatusCode::OK
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A service that echoes the verified session's user and id.
fn session_echo()
-> impl Service<Req, Response = Resp, Error = Infallible, Future: Send> + Clone + Send + 'static {
    tower::service_fn(|req: Req| async move {
        let body = match req.extensions().get::<SessionKey>() {
            Some(key) => format!("{}:{}", key.user(), key.session_id().expose()),
            None => "no session".to_owned(),
        };
        Ok::<_, Infallible>(Response::new(body))
    })
}

fn with_session(user_name: Option<&str>, id: Option<&str>) -> Req {
    let mut r = Request::new(String::new());
    if let Some(u) = user_name {
        r.extensions_mut().insert(AuthenticatedUser(user(u)));
    }
    if let Some(id) = id {
        r.headers_mut()
            .insert("x-session-id", HeaderValue::from_str(id).unwrap());
    }
    r
}

#[tokio::test]
async fn session_layer_status_codes_are_exact() {
    let clock = ManualClock::new();
    let config = SessionConfig::new(Duration::from_secs(60), Duration::from_secs(3600)).unwrap();
    let sessions = MemorySessionRegistry::with_clock(config, clock.clone());
    let alice_session = sessions.create(&user("alice")).await.unwrap();
    let id = alice_session.session_id().expose();
    let source = SessionSource::Header(http::HeaderName::from_static("x-session-id"));
    let svc = SessionLayer::new(sessions.clone(), source).layer(session_echo());

    let ok = send(&svc, with_session(Some("alice"), Some(&id))).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.body(), &format!("alice:{id}"));

    let stolen = send(&svc, with_session(Some("bob"), Some(&id))).await;
    assert_eq!(stolen.status(), StatusCode::FORBIDDEN);

    let unknown = SessionId::generate().unwrap().expose();
    let resp = send(&svc, with_session(Some("alice"), Some(&unknown))).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    for malformed in ["not-a-session-id", "AAAAAAAAAAAAAAAAAAAAAB", ""] {
        let resp = send(&svc, with_session(Some("alice"), Some(malformed))).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{malformed:?}");
    }
    let mut twice = with_session(Some("alice"), Some(&id));
    twice
        .headers_mut()
        .append("x-session-id", HeaderValue::from_str(&id).unwrap());
    assert_eq!(send(&svc, twice).await.status(), StatusCode::BAD_REQUEST);

    let missing = send(&svc, with_session(Some("alice"), None)).await;
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    let anonymous = send(&svc, with_session(None, Some(&id))).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    // Idle timeout: 60 s after the last use the session is expired.
    clock.advance(Duration::from_secs(61));
    let expired = send(&svc, with_session(Some("alice"), Some(&id))).await;
    assert_eq!(expired.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn session_layer_reads_cookies_and_isolates_users() {
    let sessions = MemorySessionRegistry::new(SessionConfig::default());
    let a = sessions.create(&user("alice")).await.unwrap();
    let b = sessions.create(&user("bob")).await.unwrap();
    let svc = SessionLayer::new(sessions, SessionSource::cookie("sid")).layer(session_echo());
    let req = |u: &str, key: &SessionKey| {
        let mut r = Request::builder()
            .header("cookie", "theme=dark")
            .header(
                "cookie",
                format!("lang=en; sid={}", key.session_id().expose()),
            )
            .body(String::new())
            .unwrap();
        r.extensions_mut().insert(AuthenticatedUser(user(u)));
        r
    };
    let resp = send(&svc, req("alice", &a)).await;
    assert_eq!(resp.body(), &format!("alice:{}", a.session_id().expose()));
    let resp = send(&svc, req("bob", &b)).await;
    assert_eq!(resp.body(), &format!("bob:{}", b.session_id().expose()));
    assert_eq!(
        send(&svc, req("bob", &a)).await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(&svc, req("alice", &b)).await.status(),
        StatusCode::FORBIDDEN
    );
}

/// Shared, immutable parts of the test client.
struct Transport;

/// One request's client: the user's credential lives here.
#[derive(Clone)]
struct UserClient {
    transport: Arc<Transport>,
    user: UserId,
    request_no: usize,
}

struct Factory {
    transport: Arc<Transport>,
    built: AtomicUsize,
}

impl ClientFactory for Factory {
    type Context = UserId;
    type Client = UserClient;
    fn build(&self, user: UserId) -> raceguard::Result<UserClient> {
        if user.as_str() == "backend-down" {
            return Err(Error::backend("auth", true, "unreachable"));
        }
        Ok(UserClient {
            transport: self.transport.clone(),
            user,
            request_no: self.built.fetch_add(1, Ordering::SeqCst),
        })
    }
}

#[tokio::test]
async fn client_layer_gives_each_request_its_own_client() {
    let transport = Arc::new(Transport);
    let factory = Factory {
        transport: transport.clone(),
        built: AtomicUsize::new(0),
    };
    let context = |parts: &http::request::Parts| match parts.extensions.get::<AuthenticatedUser>() {
        Some(u) => Ok(u.0.clone()),
        None => Err(Error::invalid("user", "no authenticated user")),
    };
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let t = transport.clone();
    let inner = tower::service_fn(move |req: Req| {
        let client = req.extensions().get::<UserClient>().cloned();
        let s = s.clone();
        let t = t.clone();
        async move {
            let client = client.expect("the layer inserted a client");
            assert!(Arc::ptr_eq(&client.transport, &t), "one shared transport");
            s.lock()
                .unwrap()
                .push((client.user.to_string(), client.request_no));
            Ok::<_, Infallible>(Response::new(client.user.to_string()))
        }
    });
    let svc = ClientLayer::new(factory, context).layer(inner);

    let (a, b) = tokio::join!(send(&svc, authed("alice")), send(&svc, authed("bob")));
    assert_eq!((a.body().as_str(), b.body().as_str()), ("alice", "bob"));
    let mut seen_now = seen.lock().unwrap().clone();
    seen_now.sort();
    assert_eq!(
        seen_now,
        vec![("alice".to_owned(), 0), ("bob".to_owned(), 1)],
        "two requests, two clients, each with its own user"
    );

    let no_user = send(&svc, Request::new(String::new())).await;
    assert_eq!(no_user.status(), StatusCode::BAD_REQUEST);
    let down = send(&svc, authed("backend-down")).await;
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "failed builds never reach the service"
    );
}
