//! The "external API" the workers call, and the per-request client that
//! carries one user's identity to it (race R01/R13: no per-user state in a
//! shared client).
//!
//! The stub runs on its own loopback port. It enforces ITS OWN rate limit
//! (GCRA, `--external-limit`/`--external-burst`) and answers 429 to any call
//! above it, like the Audnex API of seed 002. It also checks that every call
//! carries the token of the user it is made for, and counts mismatches: a
//! shared client with mutable auth state (seed 000) would show up there.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Json, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use raceguard::client::{BearerToken, ClientFactory};
use raceguard::keys::UserId;
use raceguard::once::OnceInit;
use raceguard::rate::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

type HmacSha256 = Hmac<Sha256>;

/// What the stub counted.
#[derive(Debug, Default)]
pub(crate) struct StubCounters {
    pub(crate) calls: AtomicU64,
    pub(crate) rejected_429: AtomicU64,
    pub(crate) identity_mismatches: AtomicU64,
}

struct Stub {
    limiter: RateLimiter,
    token_key: Arc<[u8]>,
    counters: Arc<StubCounters>,
}

/// The body of one call.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Notify {
    pub(crate) user: String,
    pub(crate) webhook_id: String,
    pub(crate) source: String,
}

/// The per-user token the shared configuration mints (a service-role key
/// signing per-user tokens, as Supabase does).
fn mint(key: &[u8], user: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(user.as_bytes());
    hex(&mac.finalize().into_bytes())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

async fn stub_notify(
    State(stub): State<Arc<Stub>>,
    headers: HeaderMap,
    Json(body): Json<Notify>,
) -> Response {
    stub.counters.calls.fetch_add(1, Ordering::Relaxed);
    let decision = stub.limiter.check();
    if !decision.allowed() {
        stub.counters.rejected_429.fetch_add(1, Ordering::Relaxed);
        let secs = decision.retry_after().as_secs_f64().ceil().max(1.0);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, format!("{secs}"))],
        )
            .into_response();
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| BearerToken::from_authorization(v).ok());
    let expected = mint(&stub.token_key, &body.user);
    let ok = presented
        .as_ref()
        .is_some_and(|t| bool::from(t.expose().as_bytes().ct_eq(expected.as_bytes())));
    if !ok {
        stub.counters
            .identity_mismatches
            .fetch_add(1, Ordering::Relaxed);
        return StatusCode::FORBIDDEN.into_response();
    }
    StatusCode::OK.into_response()
}

/// Starts the stub on a free loopback port; returns its base URL.
pub(crate) async fn start_stub(
    limit: u32,
    burst: u32,
    token_key: Arc<[u8]>,
    counters: Arc<StubCounters>,
    shutdown: CancellationToken,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let quota = Quota::per_second(limit)?.with_burst(burst)?;
    let stub = Arc::new(Stub {
        limiter: RateLimiter::new(quota),
        token_key,
        counters,
    });
    let app = Router::new()
        .route("/v1/notify", post(stub_notify))
        .route("/health", get(|| async { "ok" }))
        .with_state(stub);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!("external API stub stopped: {e}");
        }
    });
    Ok(format!("http://{addr}"))
}

/// The shared, immutable half of the external API client: built once at
/// start-up through [`OnceInit`] (seeds 003/004: no check-then-set global).
#[derive(Debug)]
pub(crate) struct ExternalShared {
    http: reqwest::Client,
    base_url: String,
    token_key: Arc<[u8]>,
}

/// The process-wide shared client parts.
pub(crate) static EXTERNAL: OnceInit<ExternalShared, reqwest::Error> = OnceInit::new();

/// Builds the shared parts exactly once, checking the API is reachable.
pub(crate) async fn init_shared(
    base_url: String,
    token_key: Arc<[u8]>,
) -> Result<&'static ExternalShared, Box<dyn std::error::Error + Send + Sync>> {
    let shared = EXTERNAL
        .get_or_try_init(|| async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .pool_max_idle_per_host(64)
                .build()?;
            http.get(format!("{base_url}/health"))
                .send()
                .await?
                .error_for_status()?;
            Ok(ExternalShared {
                http,
                base_url,
                token_key,
            })
        })
        .await
        .map_err(|e| format!("external API client start-up failed: {e}"))?;
    Ok(shared)
}

/// Builds one request's [`UserApiClient`] from the shared parts: clones the
/// transport handle, mints the user's token; opens no connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExternalApiFactory {
    shared: &'static ExternalShared,
}

impl ExternalApiFactory {
    pub(crate) fn new(shared: &'static ExternalShared) -> Self {
        ExternalApiFactory { shared }
    }
}

impl ClientFactory for ExternalApiFactory {
    type Context = UserId;
    type Client = UserApiClient;

    fn build(&self, user: UserId) -> raceguard::Result<UserApiClient> {
        let token = BearerToken::new(mint(&self.shared.token_key, user.as_str()))?;
        Ok(UserApiClient {
            http: self.shared.http.clone(),
            base_url: self.shared.base_url.clone(),
            user,
            token,
        })
    }
}

/// One user's client: owns the user's identity and token.
#[derive(Debug, Clone)]
pub(crate) struct UserApiClient {
    http: reqwest::Client,
    base_url: String,
    user: UserId,
    token: BearerToken,
}

/// What one call returned.
#[derive(Debug)]
pub(crate) enum CallOutcome {
    Done,
    RateLimited(Duration),
    Failed(String),
}

impl UserApiClient {
    /// The user this client acts for.
    pub(crate) fn user(&self) -> &UserId {
        &self.user
    }

    /// Tells the external API about one webhook, on behalf of this user.
    pub(crate) async fn notify(&self, webhook_id: &str, source: &str) -> CallOutcome {
        let body = Notify {
            user: self.user.as_str().to_string(),
            webhook_id: webhook_id.to_string(),
            source: source.to_string(),
        };
        let sent = self
            .http
            .post(format!("{}/v1/notify", self.base_url))
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.token.expose()),
            )
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => CallOutcome::Done,
            Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => {
                let secs = r
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(1.0);
                CallOutcome::RateLimited(Duration::from_secs_f64(secs.clamp(0.001, 60.0)))
            }
            Ok(r) => CallOutcome::Failed(format!("status {}", r.status())),
            Err(e) => CallOutcome::Failed(e.to_string()),
        }
    }
}
