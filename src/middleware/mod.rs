//! tower middleware (feature `tower`): rate limits with the IETF
//! `RateLimit` headers, load shedding, verified sessions and per-request
//! clients.
//!
//! | layer | what it does | rejects with |
//! |---|---|---|
//! | [`RateLimitLayer`] | keys the request ([`UserOrPeer`]: authenticated user, else a header, else the peer address), checks a [`RateLimitBackend`] (per key, optionally + global, all or nothing), adds `RateLimit-Policy` / `RateLimit` (and optionally `X-RateLimit-*`) headers | 429 + `Retry-After`; 400 for a malformed user header; 503 when the backend fails (or fail open) |
//! | [`LoadShedLayer`] | admits a request only if a [`Capacity`] has room (a semaphore: a concurrency limit that sheds instead of queueing; a work queue's fullness) | 503 + `Retry-After` |
//! | [`SessionLayer`] | turns a claimed session id (header or cookie) plus the [`AuthenticatedUser`] into a verified [`SessionKey`](crate::SessionKey) in the request's extensions | 400 malformed, 401 missing / unknown / expired, 403 not owned |
//! | [`ClientLayer`] | builds a per-request client with a [`ClientFactory`](crate::client::ClientFactory) and puts it in the request's extensions | 400 bad context, 5xx otherwise ([`status_for_error`]) |
//!
//! Generated responses have an empty body (`ResBody::default()`; axum's
//! `Body` implements `Default`) and never come from a panic: every bad input
//! from a request maps to a 4xx, every backend failure to a 503.
//!
//! Two extension types connect the layers to the rest of the stack:
//!
//! - [`AuthenticatedUser`]: inserted by **your** authentication middleware
//!   (after checking a token, a signed session ...). Rate limits key by it
//!   and sessions are verified against it.
//! - [`PeerAddr`]: the connection's remote address, for anonymous traffic.
//!   With axum, either insert it from `ConnectInfo<SocketAddr>` or tell
//!   [`UserOrPeer::peer_from`] to read `ConnectInfo` directly.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use http::{Request, Response, StatusCode};
//! use raceguard::middleware::{
//!     ConcurrencyCapacity, LoadShedLayer, MemoryLimits, PeerAddr, RateKey, RateLimitLayer,
//! };
//! use raceguard::rate::{KeyedRateLimiter, Quota};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! let per_key = KeyedRateLimiter::<RateKey>::new(Quota::per_minute(30)?);
//! let svc = ServiceBuilder::new()
//!     .layer(LoadShedLayer::new(ConcurrencyCapacity::new(512, Duration::from_secs(1))?))
//!     .layer(RateLimitLayer::new(MemoryLimits::new("per-client", per_key)?))
//!     .service_fn(|_req: Request<String>| async {
//!         Ok::<_, Infallible>(Response::new(String::from("hello")))
//!     });
//!
//! let mut req = Request::new(String::new());
//! req.extensions_mut().insert(PeerAddr("192.0.2.7:50123".parse().unwrap()));
//! let resp = svc.oneshot(req).await.unwrap();
//! assert_eq!(resp.status(), StatusCode::OK);
//! assert_eq!(resp.headers()["ratelimit-policy"], r#""per-client";q=30;w=60"#);
//! assert_eq!(resp.headers()["ratelimit"], r#""per-client";r=29;t=2"#);
//! # Ok::<(), raceguard::Error>(())
//! # }).unwrap();
//! ```
//!
//! Each layer's response future is one boxed `async` block: the crate has
//! no pin-projection dependency and forbids `unsafe`, and one small
//! allocation per request per layer is well below the cost of the request
//! itself (the rate-limit layer also allocates one `Vec` of at most a few
//! policy entries for its headers).
//!
//! With feature `redis`, `RedisLimits` does the same per key + global check on Redis.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};

use crate::keys::UserId;
use crate::{Error, ErrorKind, SessionError};

mod client;
mod rate;
#[cfg(feature = "redis")]
mod redis;
mod session;
mod shed;

pub use client::{ClientLayer, ClientService};
pub use rate::{
    BackendErrorPolicy, KeyExtractor, KeyedBackend, LimitOutcome, MemoryLimits, PolicyStatus,
    RateKey, RateLimitBackend, RateLimitLayer, RateLimitService, UserOrPeer,
};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::RedisLimits;
pub use session::{SessionLayer, SessionService, SessionSource};
pub use shed::{Capacity, ConcurrencyCapacity, LoadShedLayer, LoadShedService};

/// The user an authentication middleware vouched for, in a request's
/// extensions.
///
/// Insert it only after checking a credential (a bearer token, a signed
/// session, mTLS ...). [`UserOrPeer`] keys rate limits by it, and
/// [`SessionLayer`] verifies the claimed session against it. A user id that
/// merely appears in a request (a header) is **not** authenticated and is
/// keyed separately ([`RateKey::Claimed`]).
///
/// ```
/// use raceguard::keys::UserId;
/// use raceguard::middleware::AuthenticatedUser;
///
/// let mut req = http::Request::new(());
/// // ... in your auth middleware, after verifying a token:
/// req.extensions_mut().insert(AuthenticatedUser(UserId::new("alice")?));
/// assert_eq!(req.extensions().get::<AuthenticatedUser>().unwrap().0.as_str(), "alice");
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AuthenticatedUser(pub UserId);

/// The remote address of the connection a request came on, in a request's
/// extensions; [`UserOrPeer`] falls back to it for anonymous requests.
///
/// With axum, serve with `into_make_service_with_connect_info::<SocketAddr>()`
/// and either copy `ConnectInfo<SocketAddr>` into a `PeerAddr` in a small
/// middleware, or use [`UserOrPeer::peer_from`] to read `ConnectInfo`
/// directly. Behind a reverse proxy the connection's address is the proxy's:
/// parse the forwarded address you trust and insert that instead.
///
/// ```
/// use raceguard::middleware::PeerAddr;
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(PeerAddr("198.51.100.4:443".parse().unwrap()));
/// assert_eq!(req.extensions().get::<PeerAddr>().unwrap().0.port(), 443);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// A request a layer refused before it reached the inner service: a status
/// and a short static reason (logged at `debug`, not sent).
///
/// ```
/// use http::StatusCode;
/// use raceguard::middleware::Rejection;
/// let r = Rejection::new(StatusCode::BAD_REQUEST, "malformed user id header");
/// assert_eq!(r.status(), StatusCode::BAD_REQUEST);
/// assert_eq!(r.reason(), "malformed user id header");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    status: StatusCode,
    reason: &'static str,
}

impl Rejection {
    /// A rejection with `status`.
    ///
    /// ```
    /// let r = raceguard::middleware::Rejection::new(http::StatusCode::FORBIDDEN, "no");
    /// assert_eq!(r.status().as_u16(), 403);
    /// ```
    pub const fn new(status: StatusCode, reason: &'static str) -> Self {
        Rejection { status, reason }
    }

    /// The response status.
    ///
    /// ```
    /// let r = raceguard::middleware::Rejection::new(http::StatusCode::UNAUTHORIZED, "no session");
    /// assert_eq!(r.status(), http::StatusCode::UNAUTHORIZED);
    /// ```
    pub const fn status(&self) -> StatusCode {
        self.status
    }

    /// Why (for logs).
    ///
    /// ```
    /// let r = raceguard::middleware::Rejection::new(http::StatusCode::BAD_REQUEST, "bad id");
    /// assert_eq!(r.reason(), "bad id");
    /// ```
    pub const fn reason(&self) -> &'static str {
        self.reason
    }

    pub(crate) fn into_response<B: Default>(self) -> Response<B> {
        tracing::debug!(status = %self.status, reason = self.reason, "request rejected");
        empty(self.status)
    }
}

/// The HTTP status a layer answers with for a raceguard [`Error`], by kind:
///
/// | error | status |
/// |---|---|
/// | `InvalidInput` | 400 Bad Request |
/// | `Session(NotOwned)` | 403 Forbidden |
/// | other `Session` (unknown, expired, bad token) | 401 Unauthorized |
/// | `RateLimited` | 429 Too Many Requests |
/// | `Backend`, `Timeout`, `CapacityExceeded`, `Closed` | 503 Service Unavailable |
/// | anything else (init failures, lock outcomes ...) | 500 Internal Server Error |
///
/// ```
/// use http::StatusCode;
/// use raceguard::middleware::status_for_error;
/// use raceguard::{Error, SessionError};
///
/// assert_eq!(status_for_error(&Error::invalid("user_id", "empty")), StatusCode::BAD_REQUEST);
/// assert_eq!(status_for_error(&Error::Session(SessionError::NotOwned)), StatusCode::FORBIDDEN);
/// assert_eq!(status_for_error(&Error::Session(SessionError::Expired)), StatusCode::UNAUTHORIZED);
/// assert_eq!(status_for_error(&Error::backend("redis", true, "reset")), StatusCode::SERVICE_UNAVAILABLE);
/// ```
pub fn status_for_error(err: &Error) -> StatusCode {
    match err {
        Error::Session(SessionError::NotOwned) => StatusCode::FORBIDDEN,
        Error::Session(_) => StatusCode::UNAUTHORIZED,
        _ => match err.kind() {
            ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
            ErrorKind::Denied => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Backend | ErrorKind::Timeout | ErrorKind::Capacity | ErrorKind::Closed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        },
    }
}

/// An empty response with `status`.
pub(crate) fn empty<B: Default>(status: StatusCode) -> Response<B> {
    let mut resp = Response::new(B::default());
    *resp.status_mut() = status;
    resp
}

/// Whole seconds, rounded up (a client waiting this long is never early).
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A `Retry-After` value: whole seconds rounded up, at least 1 (a 0 would
/// invite an immediate retry storm).
pub(crate) fn retry_after_value(d: Duration) -> HeaderValue {
    HeaderValue::from(ceil_secs(d).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_round_up() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_value(Duration::ZERO), "1");
        assert_eq!(retry_after_value(Duration::from_millis(1500)), "2");
    }
}
