//! Routes and handlers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use raceguard::client::ClientFactory;
use raceguard::keys::UserId;
use raceguard::session::{SessionId, SessionKey, SessionRegistry};
use raceguard::{Error, SessionError};
use serde::Deserialize;
use serde_json::json;
use sha2::Sha256;

use crate::args::Config;
use crate::external::{CallOutcome, ExternalApiFactory, StubCounters, UserApiClient};
use crate::store::{Backends, Quotas};
use raceguard::queue::WorkQueue;

/// The header carrying the authenticated user (in a real deployment an auth
/// layer sets it after checking a token).
pub(crate) const USER_HEADER: &str = "x-user-id";
/// `sha256=<hex HMAC-SHA256 of the raw body>` under the shared secret.
pub(crate) const SIGNATURE_HEADER: &str = "x-signature";
const MAX_BODY: usize = 64 * 1024;
const MAX_TEXT: usize = 4096;

/// Counters served by `/stats`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) accepted: AtomicU64,
    pub(crate) redeliveries: AtomicU64,
    pub(crate) processed: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) bad_signatures: AtomicU64,
    pub(crate) shed: AtomicU64,
    pub(crate) worker_retries: AtomicU64,
}

/// One queued webhook: its id and the per-request client that carries the
/// user's identity to the external API.
#[derive(Debug)]
pub(crate) struct Job {
    id: String,
    source: String,
    client: UserApiClient,
}

impl Job {
    /// The webhook id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }
}

/// The webhook queue: in memory (bounded `WorkQueue`, per-user order), or
/// durable on Redis Streams with `--redis` (see `durable.rs`).
#[derive(Debug)]
pub(crate) enum Jobs {
    Memory(Arc<WorkQueue<Job, (), UserId>>),
    #[cfg(feature = "redis")]
    Durable(crate::durable::DurableJobs),
}

impl Jobs {
    /// The in-memory queue, if that is the mode.
    pub(crate) fn memory(&self) -> Option<&Arc<WorkQueue<Job, (), UserId>>> {
        match self {
            Jobs::Memory(q) => Some(q),
            #[cfg(feature = "redis")]
            Jobs::Durable(_) => None,
        }
    }
}

/// Shared state of the request handlers.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) cfg: Config,
    pub(crate) quotas: Quotas,
    pub(crate) backends: Arc<Backends>,
    pub(crate) queue: Jobs,
    pub(crate) factory: ExternalApiFactory,
    pub(crate) stats: Arc<Stats>,
    pub(crate) stub: Arc<StubCounters>,
}

/// The worker: waits for the outbound limiter, calls the external API with
/// the job's own client, records the id as processed exactly once.
#[derive(Debug, Clone)]
pub(crate) struct Worker {
    pub(crate) backends: Arc<Backends>,
    pub(crate) stats: Arc<Stats>,
}

impl Worker {
    /// Runs one job. The queue has already waited for the outbound limiter
    /// (shared by every worker, race R08), so a 429 from the API should
    /// never happen; if it does, it is counted by the stub and retried.
    pub(crate) async fn process(&self, job: Job) {
        if let Err(why) = self.call(&job.client, &job.id, &job.source, None).await {
            tracing::error!("webhook {} for {} failed: {why}", job.id, job.client.user());
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.record_processed(&job.id).await;
    }

    /// Calls the external API for one webhook: retries a 429 after its
    /// `Retry-After` and up to 5 failures with backoff. With `limiter`,
    /// first takes a cell of the outbound limiter before every attempt,
    /// waiting its `retry_after` but never past `limiter`'s deadline (the
    /// durable queue's workers; the in-memory queue's workers have already
    /// waited for it).
    pub(crate) async fn call(
        &self,
        client: &UserApiClient,
        id: &str,
        source: &str,
        limiter: Option<tokio::time::Instant>,
    ) -> Result<(), String> {
        let mut failures = 0u32;
        loop {
            if let Some(deadline) = limiter {
                self.wait_for_cell(deadline).await?;
            }
            match client.notify(id, source).await {
                CallOutcome::Done => return Ok(()),
                CallOutcome::RateLimited(wait) => {
                    self.stats.worker_retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(wait).await;
                }
                CallOutcome::Failed(why) => {
                    failures += 1;
                    self.stats.worker_retries.fetch_add(1, Ordering::Relaxed);
                    if failures >= 5 {
                        return Err(why);
                    }
                    tokio::time::sleep(Duration::from_millis(20 << failures)).await;
                }
            }
        }
    }

    /// Takes one cell of the shared outbound limiter, sleeping its
    /// `retry_after` between denials; gives up at `deadline`.
    async fn wait_for_cell(&self, deadline: tokio::time::Instant) -> Result<(), String> {
        use raceguard::rate::Limit;
        loop {
            let decision = self
                .backends
                .worker_limit
                .check_n(1)
                .await
                .map_err(|e| format!("outbound limiter: {e}"))?;
            if decision.allowed() {
                return Ok(());
            }
            let pause = decision.retry_after().max(Duration::from_millis(1));
            if tokio::time::Instant::now() + pause > deadline {
                return Err("outbound limiter: no cell before the job's deadline".into());
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Records the webhook as processed: `processed` the first time,
    /// `duplicates` (a second execution: must never happen) after.
    pub(crate) async fn record_processed(&self, id: &str) {
        match self.backends.store.mark_processed(id).await {
            Ok(true) => self.stats.processed.fetch_add(1, Ordering::Relaxed),
            Ok(false) => self.stats.duplicates.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::error!("recording webhook {id} failed: {e}");
                self.stats.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

pub(crate) fn error_response(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

/// Maps raceguard errors to responses.
pub(crate) fn from_error(e: &Error) -> Response {
    let status = match e {
        Error::Session(SessionError::NotOwned) => StatusCode::FORBIDDEN,
        Error::Session(SessionError::Unknown | SessionError::Expired) => StatusCode::NOT_FOUND,
        Error::Session(_) | Error::InvalidInput { .. } => StatusCode::BAD_REQUEST,
        Error::CapacityExceeded { .. } | Error::Timeout { .. } | Error::Backend { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_response(status, e)
}

/// The user of a request: the authentication middleware's extension if it
/// ran, else the header itself.
#[allow(clippy::result_large_err)]
fn user_of(headers: &HeaderMap) -> Result<UserId, Response> {
    let raw = headers
        .get(USER_HEADER)
        .ok_or_else(|| error_response(StatusCode::UNAUTHORIZED, "missing x-user-id"))?;
    let raw = raw
        .to_str()
        .map_err(|_| error_response(StatusCode::BAD_REQUEST, "x-user-id is not text"))?;
    UserId::new(raw).map_err(|e| from_error(&e))
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Checks `sha256=<hex>` against the body, in constant time.
fn signature_ok(secret: &[u8], body: &[u8], header: Option<&HeaderValue>) -> bool {
    let Some(sig) = header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .and_then(decode_hex)
    else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

#[derive(Debug, Deserialize)]
struct WebhookEvent {
    id: String,
    #[allow(dead_code)]
    event: String,
}

async fn webhook(
    State(app): State<Arc<App>>,
    Path(source): Path<String>,
    req: Request,
) -> Response {
    if !valid_name(&source, 64) {
        return error_response(StatusCode::NOT_FOUND, "unknown webhook source");
    }
    let user = match user_of(req.headers()) {
        Ok(u) => u,
        Err(r) => return r,
    };
    // The per-request client: from the client layer, else built here.
    let client = match req.extensions().get::<UserApiClient>() {
        Some(c) => c.clone(),
        None => match app.factory.build(user.clone()) {
            Ok(c) => c,
            Err(e) => return from_error(&e),
        },
    };
    let signature = req.headers().get(SIGNATURE_HEADER).cloned();
    let body: Bytes = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return error_response(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    if !signature_ok(app.cfg.secret.as_bytes(), &body, signature.as_ref()) {
        app.stats.bad_signatures.fetch_add(1, Ordering::Relaxed);
        return error_response(StatusCode::UNAUTHORIZED, "bad signature");
    }
    let event: WebhookEvent = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, e),
    };
    if !valid_name(&event.id, 128) {
        return error_response(StatusCode::BAD_REQUEST, "invalid webhook id");
    }
    let queue = match &app.queue {
        Jobs::Memory(q) => q,
        #[cfg(feature = "redis")]
        Jobs::Durable(d) => {
            // The job carries the user's id, not the client: the worker
            // builds the user's client from the shared configuration (the
            // token is never written to Redis).
            drop(client);
            return crate::durable::submit(&app, d, &event.id, source, &user).await;
        }
    };
    match app.backends.store.mark_accepted(&event.id).await {
        Ok(true) => {}
        Ok(false) => {
            app.stats.redeliveries.fetch_add(1, Ordering::Relaxed);
            return (
                StatusCode::OK,
                Json(json!({ "id": event.id, "duplicate": true })),
            )
                .into_response();
        }
        Err(e) => return from_error(&e),
    }
    let job = Job {
        id: event.id.clone(),
        source,
        client,
    };
    match queue.submit_keyed(user, job) {
        Ok(_handle) => {
            // The handle is not awaited: the webhook answers at once; the
            // worker records the outcome in the stats.
            app.stats.accepted.fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::ACCEPTED,
                Json(json!({ "id": event.id, "accepted": true })),
            )
                .into_response()
        }
        Err(e) => {
            if let Err(e2) = app.backends.store.unmark_accepted(&event.id).await {
                tracing::error!("could not forget webhook id {}: {e2}", event.id);
            }
            if matches!(e, Error::CapacityExceeded { .. }) {
                app.stats.shed.fetch_add(1, Ordering::Relaxed);
                let wait = queue.retry_after_hint();
                let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
                let mut resp = error_response(StatusCode::SERVICE_UNAVAILABLE, &e);
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                return resp;
            }
            from_error(&e)
        }
    }
}

async fn create_session(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let user = match user_of(&headers) {
        Ok(u) => u,
        Err(r) => return r,
    };
    match app.backends.sessions.create(&user).await {
        Ok(key) => (
            StatusCode::CREATED,
            Json(json!({ "session_id": key.session_id().expose() })),
        )
            .into_response(),
        Err(e) => from_error(&e),
    }
}

/// The verified session of a request: from the session layer, else
/// verified here. Never a key built from the claimed id alone.
async fn session_of(
    app: &App,
    sid: &str,
    verified: Option<SessionKey>,
    headers: &HeaderMap,
) -> Result<SessionKey, Response> {
    if let Some(key) = verified {
        return Ok(key);
    }
    let user = user_of(headers)?;
    let id = SessionId::parse(sid)
        .map_err(|_| error_response(StatusCode::NOT_FOUND, "unknown session"))?;
    app.backends
        .sessions
        .verify(&user, &id)
        .await
        .map_err(|e| from_error(&e))
}

#[derive(Debug, Deserialize)]
struct PostMessage {
    text: String,
}

async fn post_message(
    State(app): State<Arc<App>>,
    Path(sid): Path<String>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let verified = parts.extensions.get::<SessionKey>().cloned();
    let key = match session_of(&app, &sid, verified, &parts.headers).await {
        Ok(k) => k,
        Err(r) => return r,
    };
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return error_response(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    let msg: PostMessage = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, e),
    };
    if msg.text.is_empty() || msg.text.len() > MAX_TEXT {
        return error_response(StatusCode::BAD_REQUEST, "text must be 1..=4096 bytes");
    }
    match app.backends.store.append(&key, msg.text).await {
        Ok(seq) => (StatusCode::CREATED, Json(json!({ "seq": seq }))).into_response(),
        Err(e) => from_error(&e),
    }
}

async fn get_messages(
    State(app): State<Arc<App>>,
    Path(sid): Path<String>,
    req: Request,
) -> Response {
    let (parts, _body) = req.into_parts();
    let verified = parts.extensions.get::<SessionKey>().cloned();
    let key = match session_of(&app, &sid, verified, &parts.headers).await {
        Ok(k) => k,
        Err(r) => return r,
    };
    match app.backends.store.history(&key).await {
        Ok(messages) => Json(json!({ "session_id": sid, "messages": messages })).into_response(),
        Err(e) => from_error(&e),
    }
}

async fn stats(State(app): State<Arc<App>>) -> Response {
    let s = &app.stats;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (queue_depth, queue_kind) = match &app.queue {
        Jobs::Memory(q) => (q.len(), "memory"),
        #[cfg(feature = "redis")]
        Jobs::Durable(d) => match d.queue.len().await {
            Ok(n) => (n, "durable"),
            // No depth is no answer: a 0 would read as "drained".
            Err(e) => return from_error(&e),
        },
    };
    #[cfg(feature = "redis")]
    let durable = match app.backends.store.durable_counts().await {
        Ok(Some((processed, duplicates))) => {
            json!({ "processed": processed, "duplicates": duplicates })
        }
        Ok(None) => serde_json::Value::Null,
        Err(e) => return from_error(&e),
    };
    #[cfg(not(feature = "redis"))]
    let durable = serde_json::Value::Null;
    Json(json!({
        "backend": app.backends.name,
        "layers": app.cfg.layers,
        "accepted": load(&s.accepted),
        "redeliveries": load(&s.redeliveries),
        "processed": load(&s.processed),
        "duplicates": load(&s.duplicates),
        "failed": load(&s.failed),
        "bad_signatures": load(&s.bad_signatures),
        "shed": load(&s.shed),
        "worker_retries": load(&s.worker_retries),
        "external_calls": load(&app.stub.calls),
        "external_429s": load(&app.stub.rejected_429),
        "external_identity_mismatches": load(&app.stub.identity_mismatches),
        "queue": queue_kind,
        "queue_depth": queue_depth,
        // Redis only: processed/duplicates of every server on this Redis,
        // across restarts (the counters above are this process's).
        "durable": durable,
        "queue_capacity": app.cfg.queue_capacity,
        "limits": {
            "user_burst": app.quotas.user.burst(),
            "user_period_secs": 60,
            "global_burst": app.quotas.global.burst(),
            "global_period_secs": 1,
            "external_per_sec": app.cfg.external_limit,
            "external_burst": app.cfg.external_burst,
            "worker_per_sec": app.cfg.worker_limit,
            "worker_burst": app.cfg.worker_burst,
        },
    }))
    .into_response()
}

/// The application's router.
pub(crate) fn router(app: Arc<App>) -> Router {
    let webhooks = Router::new().route("/webhooks/{source}", post(webhook));
    let sessions = Router::new().route("/chat/sessions", post(create_session));
    let messages = Router::new().route(
        "/chat/{session_id}/messages",
        post(post_message).get(get_messages),
    );
    let api = if app.cfg.layers {
        crate::layers::apply(&app, webhooks, sessions, messages)
    } else {
        webhooks.merge(sessions).merge(messages)
    };
    api.route("/stats", get(stats))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(app)
}
