//! The middleware in a real axum server bound to 127.0.0.1, hit over TCP
//! with reqwest: exact status codes and headers, users isolated.
#![cfg(feature = "tower")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use raceguard::SessionKey;
use raceguard::client::ClientFactory;
use raceguard::clock::ManualClock;
use raceguard::keys::UserId;
use raceguard::middleware::{
    AuthenticatedUser, ClientLayer, ConcurrencyCapacity, LoadShedLayer, MemoryLimits, RateKey,
    RateLimitLayer, SessionLayer, SessionSource, UserOrPeer,
};
use raceguard::rate::{KeyedRateLimiter, Quota, RateLimiter};
use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
use reqwest::StatusCode;
use tokio::sync::{Mutex, mpsc, oneshot};

/// Test-only authentication: `Authorization: Bearer <user>` is trusted.
async fn fake_auth(mut req: Request, next: Next) -> Response {
    let user = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|u| UserId::new(u).ok());
    if let Some(user) = user {
        req.extensions_mut().insert(AuthenticatedUser(user));
    }
    next.run(req).await
}

#[derive(Clone)]
struct UserClient {
    user: UserId,
}

struct Factory;
impl ClientFactory for Factory {
    type Context = UserId;
    type Client = UserClient;
    fn build(&self, user: UserId) -> raceguard::Result<UserClient> {
        Ok(UserClient { user })
    }
}

struct Server {
    base: String,
    http: reqwest::Client,
    sessions: MemorySessionRegistry,
    limits: Arc<MemoryLimits<ManualClock>>,
    /// Signals that `/slow` entered its handler; the sender releases it.
    entered: Mutex<mpsc::Receiver<oneshot::Sender<()>>>,
    slow_cap: ConcurrencyCapacity,
}

async fn start() -> Server {
    let clock = ManualClock::new();
    let per_key = KeyedRateLimiter::<RateKey, _>::builder(Quota::per_minute(3).unwrap())
        .clock(clock.clone())
        .build()
        .unwrap();
    let global = RateLimiter::with_clock(Quota::per_minute(1000).unwrap(), clock.clone());
    let limits = Arc::new(
        MemoryLimits::new("user", per_key)
            .unwrap()
            .with_global("global", global)
            .unwrap(),
    );
    let keys = UserOrPeer::new()
        .header(http::HeaderName::from_static("x-user-id"))
        .peer_from(|c: &ConnectInfo<SocketAddr>| c.0.ip());
    let sessions = MemorySessionRegistry::new(SessionConfig::default());
    let slow_cap = ConcurrencyCapacity::new(1, Duration::from_secs(7)).unwrap();
    let (tx, rx) = mpsc::channel::<oneshot::Sender<()>>(4);

    let chat = get(|Extension(key): Extension<SessionKey>| async move {
        format!("history of {}", key.user())
    })
    .layer(SessionLayer::new(
        sessions.clone(),
        SessionSource::Header(http::HeaderName::from_static("x-session-id")),
    ));
    let me = get(|Extension(client): Extension<UserClient>| async move {
        format!("client of {}", client.user)
    })
    .layer(ClientLayer::new(Factory, |parts: &http::request::Parts| {
        parts
            .extensions
            .get::<AuthenticatedUser>()
            .map(|u| u.0.clone())
            .ok_or_else(|| raceguard::Error::invalid("user", "not authenticated"))
    }));
    let slow = get(move || {
        let tx = tx.clone();
        async move {
            let (release, wait) = oneshot::channel();
            tx.send(release).await.unwrap();
            // Bounded: a broken test fails instead of hanging.
            tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .expect("released")
                .unwrap();
            "slow done"
        }
    })
    .layer(LoadShedLayer::new(slow_cap.clone()));

    let app = Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/chat", chat)
        .route("/me", me)
        .route("/slow", slow)
        .layer(RateLimitLayer::new(limits.clone()).key_extractor(keys))
        .layer(middleware::from_fn(fake_auth));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    Server {
        base: format!("http://{addr}"),
        http,
        sessions,
        limits,
        entered: Mutex::new(rx),
        slow_cap,
    }
}

impl Server {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }
}

fn h<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

const POLICY: &str = r#""user";q=3;w=60, "global";q=1000;w=60"#;

#[tokio::test]
async fn users_are_limited_separately_with_exact_headers() {
    let s = start().await;
    for (r, t, g) in [(2, 20, 999), (1, 40, 998), (0, 60, 997)] {
        let resp = s.get("/", &[("authorization", "Bearer alice")]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(h(&resp, "ratelimit-policy"), Some(POLICY));
        let expected = format!(r#""user";r={r};t={t}, "global";r={g};t=1"#);
        assert_eq!(h(&resp, "ratelimit"), Some(expected.as_str()));
        assert_eq!(resp.text().await.unwrap(), "hello");
    }
    let denied = s.get("/", &[("authorization", "Bearer alice")]).await;
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(h(&denied, "retry-after"), Some("20"));
    assert_eq!(
        h(&denied, "ratelimit"),
        Some(r#""user";r=0;t=60, "global";r=997;t=1"#)
    );
    assert_eq!(denied.text().await.unwrap(), "");

    // Bob is untouched by Alice's exhaustion.
    let bob = s.get("/", &[("authorization", "Bearer bob")]).await;
    assert_eq!(bob.status(), StatusCode::OK);
    assert_eq!(
        h(&bob, "ratelimit"),
        Some(r#""user";r=2;t=20, "global";r=996;t=1"#)
    );

    // A header claiming to be alice spends its own key, not Alice's.
    let claimed = s.get("/", &[("x-user-id", "alice")]).await;
    assert_eq!(claimed.status(), StatusCode::OK);
    assert_eq!(
        h(&claimed, "ratelimit"),
        Some(r#""user";r=2;t=20, "global";r=995;t=1"#)
    );

    // Anonymous requests are keyed by the peer address (127.0.0.1).
    let anon = s.get("/", &[]).await;
    assert_eq!(anon.status(), StatusCode::OK);
    let peer = RateKey::Peer("127.0.0.1".parse().unwrap());
    assert_eq!(s.limits.per_key().peek_n(&peer, 0).unwrap().remaining(), 2);
    assert_eq!(s.limits.per_key().tracked_keys(), 4);
}

#[tokio::test]
async fn malformed_user_header_is_400() {
    let s = start().await;
    let resp = s.get("/", &[("x-user-id", "")]).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let long = "x".repeat(300);
    let resp = s.get("/", &[("x-user-id", long.as_str())]).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(s.limits.per_key().tracked_keys(), 0);
}

#[tokio::test]
async fn sessions_are_verified_against_the_authenticated_user() {
    let s = start().await;
    let alice = UserId::new("alice").unwrap();
    let id = s
        .sessions
        .create(&alice)
        .await
        .unwrap()
        .session_id()
        .expose();

    let ok = s
        .get(
            "/chat",
            &[("authorization", "Bearer alice"), ("x-session-id", &id)],
        )
        .await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.text().await.unwrap(), "history of alice");

    let stolen = s
        .get(
            "/chat",
            &[("authorization", "Bearer bob"), ("x-session-id", &id)],
        )
        .await;
    assert_eq!(stolen.status(), StatusCode::FORBIDDEN);
    // Rate-limit headers are on rejected responses too (the session check
    // is behind the rate limit).
    assert_eq!(h(&stolen, "ratelimit-policy"), Some(POLICY));

    let malformed = s
        .get(
            "/chat",
            &[("authorization", "Bearer alice"), ("x-session-id", "x")],
        )
        .await;
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let missing = s.get("/chat", &[("authorization", "Bearer alice")]).await;
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn each_request_gets_its_own_client() {
    let s = start().await;
    let (a, b) = tokio::join!(
        s.get("/me", &[("authorization", "Bearer alice")]),
        s.get("/me", &[("authorization", "Bearer bob")]),
    );
    assert_eq!(a.text().await.unwrap(), "client of alice");
    assert_eq!(b.text().await.unwrap(), "client of bob");
    let anon = s.get("/me", &[]).await;
    assert_eq!(anon.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn load_is_shed_with_503_while_the_slot_is_taken() {
    let s = start().await;
    let s = Arc::new(s);
    let s1 = s.clone();
    let first =
        tokio::spawn(async move { s1.get("/slow", &[("authorization", "Bearer carol")]).await });
    // Wait until the first request is inside the handler.
    let release = s.entered.lock().await.recv().await.unwrap();
    assert_eq!(s.slow_cap.in_flight(), 1);

    let shed = s.get("/slow", &[("authorization", "Bearer dave")]).await;
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h(&shed, "retry-after"), Some("7"));

    release.send(()).unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.text().await.unwrap(), "slow done");
    assert_eq!(s.slow_cap.in_flight(), 0);

    let s2 = s.clone();
    let again =
        tokio::spawn(async move { s2.get("/slow", &[("authorization", "Bearer dave")]).await });
    let release = s.entered.lock().await.recv().await.unwrap();
    release.send(()).unwrap();
    assert_eq!(again.await.unwrap().status(), StatusCode::OK);
}
