//! raceguard's tower layers around the API routes (`--no-layers` serves the
//! same handlers without them; the handlers then verify sessions and build
//! clients themselves).
//!
//! Outermost first:
//!
//! 1. `authenticate` (this file): the `x-user-id` header becomes an
//!    `AuthenticatedUser` (in a real deployment: after checking a token).
//! 2. `RateLimitLayer`: per-user + global limits, all or nothing; 429 with
//!    `Retry-After`, `RateLimit-Policy`, `RateLimit`.
//! 3. per route group:
//!    - webhooks: `LoadShedLayer` tied to the work queue's fullness (503 +
//!      `Retry-After`; in memory only, see `apply`), then `ClientLayer` (the user's external-API client
//!      in the request's extensions);
//!    - chat messages: the `{session_id}` path segment is the claimed id
//!      (`SessionSource::PathSegment`), `SessionLayer` turns it into a verified
//!      `SessionKey` (403 when it is another user's).

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{Next, from_fn};
use axum::response::{IntoResponse, Response};
use raceguard::Error;
use raceguard::keys::UserId;
use raceguard::middleware::{
    AuthenticatedUser, ClientLayer, LoadShedLayer, RateLimitLayer, SessionLayer, SessionSource,
};

use crate::app::{App, USER_HEADER};

pub(crate) fn apply(
    app: &Arc<App>,
    webhooks: Router<Arc<App>>,
    sessions: Router<Arc<App>>,
    messages: Router<Arc<App>>,
) -> Router<Arc<App>> {
    // In memory the layer sheds once the queue is full, before the body is
    // read. The durable queue's depth is in Redis (an async read per request
    // would double the webhook's round trips): there the capacity is
    // enforced atomically by `submit`, and the handler answers 503.
    let queue = app.queue.memory().cloned();
    let webhooks = webhooks
        .layer(ClientLayer::new(
            app.factory,
            |parts: &http::request::Parts| {
                parts
                    .extensions
                    .get::<AuthenticatedUser>()
                    .map(|u| u.0.clone())
                    .ok_or_else(|| Error::invalid("user", "not authenticated"))
            },
        ))
        .layer(LoadShedLayer::new(move || {
            queue
                .as_ref()
                .and_then(|queue| queue.is_full().then(|| queue.retry_after_hint()))
        }));
    let messages = messages
        // `/chat/{session_id}/messages`: segment 1 is the claimed id.
        .layer(SessionLayer::new(
            app.backends.sessions.clone(),
            SessionSource::PathSegment(1),
        ));
    webhooks
        .merge(sessions)
        .merge(messages)
        .layer(RateLimitLayer::new(app.backends.limits.clone()))
        .layer(from_fn(authenticate))
}

/// Demo authentication: the user id header, validated as a `UserId`.
async fn authenticate(mut req: Request, next: Next) -> Response {
    let user = match req.headers().get(USER_HEADER).map(HeaderValue::to_str) {
        None => return (StatusCode::UNAUTHORIZED, "missing x-user-id").into_response(),
        Some(Err(_)) => return (StatusCode::BAD_REQUEST, "x-user-id is not text").into_response(),
        Some(Ok(raw)) => match UserId::new(raw) {
            Ok(u) => u,
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        },
    };
    req.extensions_mut().insert(AuthenticatedUser(user));
    next.run(req).await
}
