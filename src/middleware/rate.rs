//! The rate-limit layer: key extraction, backends, IETF `RateLimit` headers.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, RETRY_AFTER};
use http::{Extensions, HeaderMap, HeaderValue, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use tower::{Layer, Service};

use super::{AuthenticatedUser, PeerAddr, Rejection, ceil_secs, empty, retry_after_value};
use crate::clock::{Clock, SystemClock};
use crate::keys::{MAX_ID_LEN, UserId};
use crate::rate::{Decision, KeyedLimit, KeyedRateLimiter, MultiLimit, Quota, RateLimiter};
use crate::{Error, Result};

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Who a request is charged to.
///
/// The three kinds are **separate key spaces**: an unauthenticated request
/// claiming `alice` in a header spends `Claimed(alice)`, never the quota of
/// the authenticated `User(alice)`, and no user id can collide with a peer
/// address.
///
/// ```
/// use raceguard::keys::UserId;
/// use raceguard::middleware::RateKey;
/// let alice = UserId::new("alice")?;
/// assert_ne!(RateKey::User(alice.clone()), RateKey::Claimed(alice));
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RateKey {
    /// A user an authentication middleware vouched for
    /// ([`AuthenticatedUser`]).
    User(UserId),
    /// A user id taken from a request header: unauthenticated, anyone can
    /// send any value (only trust it behind a gateway that sets it).
    Claimed(UserId),
    /// The peer's IP address (IPv6 masked to a prefix, see
    /// [`UserOrPeer::ipv6_prefix`]); never the port, so opening more
    /// connections does not buy more quota.
    Peer(IpAddr),
}

impl RateKey {
    /// The key as a [`UserId`], for backends keyed by user id
    /// ([`KeyedLimit`], e.g. Redis): `u:<id>`, `c:<id>`, `p:<ip>`, or, when
    /// that would exceed [`MAX_ID_LEN`], `hu:` / `hc:` followed by the
    /// SHA-256 of the id in hex. Distinct keys give distinct ids (up to a
    /// SHA-256 collision).
    ///
    /// ```
    /// use raceguard::keys::UserId;
    /// use raceguard::middleware::RateKey;
    /// let alice = UserId::new("alice")?;
    /// assert_eq!(RateKey::User(alice.clone()).to_user_id()?.as_str(), "u:alice");
    /// assert_eq!(RateKey::Claimed(alice).to_user_id()?.as_str(), "c:alice");
    /// assert_eq!(RateKey::Peer("192.0.2.1".parse().unwrap()).to_user_id()?.as_str(), "p:192.0.2.1");
    /// let long = UserId::new("x".repeat(256))?;
    /// assert_eq!(RateKey::User(long).to_user_id()?.as_str().len(), 3 + 64);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// None in practice (the encoding always fits); the `Result` is
    /// [`UserId::new`]'s.
    pub fn to_user_id(&self) -> Result<UserId> {
        let (tag, id) = match self {
            RateKey::User(u) => ('u', u.as_str()),
            RateKey::Claimed(u) => ('c', u.as_str()),
            RateKey::Peer(ip) => return UserId::new(format!("p:{ip}")),
        };
        if id.len() + 2 <= MAX_ID_LEN {
            return UserId::new(format!("{tag}:{id}"));
        }
        let digest = Sha256::digest(id.as_bytes());
        let mut out = String::with_capacity(3 + 64);
        out.push('h');
        out.push(tag);
        out.push(':');
        for b in digest {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        UserId::new(out)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Decides which key a request is charged to, or rejects it.
///
/// ```
/// use http::{Request, StatusCode};
/// use raceguard::middleware::{KeyExtractor, RateKey, Rejection};
///
/// /// Everyone shares one bucket per route.
/// struct ByPath;
/// impl KeyExtractor for ByPath {
///     fn extract<B>(&self, req: &Request<B>) -> Result<RateKey, Rejection> {
///         let id = raceguard::keys::UserId::new(req.uri().path())
///             .map_err(|_| Rejection::new(StatusCode::BAD_REQUEST, "bad path"))?;
///         Ok(RateKey::Claimed(id))
///     }
/// }
/// let key = ByPath.extract(&Request::get("/chat").body(()).unwrap()).unwrap();
/// assert_eq!(key, RateKey::Claimed(raceguard::keys::UserId::new("/chat").unwrap()));
/// ```
pub trait KeyExtractor: Send + Sync + 'static {
    /// The key for `req`.
    ///
    /// # Errors
    ///
    /// A [`Rejection`] (its status is the response: 400 for malformed
    /// input, 500 for a misconfigured stack).
    fn extract<B>(&self, req: &Request<B>) -> std::result::Result<RateKey, Rejection>;
}

type PeerLookup = Arc<dyn Fn(&Extensions) -> Option<IpAddr> + Send + Sync>;

/// The default [`KeyExtractor`]: the [`AuthenticatedUser`] in the request's
/// extensions; else, if configured, a user id header ([`RateKey::Claimed`],
/// validated with [`UserId::new`]: a malformed value is a **400**, never a
/// silent fallback to the peer); else the peer's IP ([`PeerAddr`] by
/// default, see [`peer_from`](UserOrPeer::peer_from)).
///
/// A request with none of them (no peer address in the extensions) is a
/// stack misconfiguration and gets a 500.
///
/// ```
/// use http::{Request, StatusCode};
/// use raceguard::keys::UserId;
/// use raceguard::middleware::{AuthenticatedUser, KeyExtractor, PeerAddr, RateKey, UserOrPeer};
///
/// let keys = UserOrPeer::new().header(http::HeaderName::from_static("x-user-id"));
/// let peer: std::net::SocketAddr = "203.0.113.9:4000".parse().unwrap();
///
/// let mut req = Request::new(());
/// req.extensions_mut().insert(PeerAddr(peer));
/// assert_eq!(keys.extract(&req), Ok(RateKey::Peer(peer.ip())));
///
/// req.headers_mut().insert("x-user-id", "bob".parse().unwrap());
/// assert_eq!(keys.extract(&req), Ok(RateKey::Claimed(UserId::new("bob")?)));
///
/// req.extensions_mut().insert(AuthenticatedUser(UserId::new("alice")?));
/// assert_eq!(keys.extract(&req), Ok(RateKey::User(UserId::new("alice")?)));
///
/// let mut bad = Request::new(());
/// bad.headers_mut().insert("x-user-id", "".parse().unwrap());
/// assert_eq!(keys.extract(&bad).unwrap_err().status(), StatusCode::BAD_REQUEST);
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone)]
pub struct UserOrPeer {
    header: Option<HeaderName>,
    peer: PeerLookup,
    ipv6_prefix: u8,
}

impl fmt::Debug for UserOrPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserOrPeer")
            .field("header", &self.header)
            .field("ipv6_prefix", &self.ipv6_prefix)
            .finish_non_exhaustive()
    }
}

impl Default for UserOrPeer {
    fn default() -> Self {
        Self::new()
    }
}

impl UserOrPeer {
    /// Authenticated user, else [`PeerAddr`]; no header; IPv6 peers keyed
    /// by their /64.
    ///
    /// ```
    /// let keys = raceguard::middleware::UserOrPeer::new();
    /// # let _ = keys;
    /// ```
    pub fn new() -> Self {
        UserOrPeer {
            header: None,
            peer: Arc::new(|ext: &Extensions| ext.get::<PeerAddr>().map(|p| p.0.ip())),
            ipv6_prefix: 64,
        }
    }

    /// Also accept a user id from this header when no user is
    /// authenticated. The value is keyed as [`RateKey::Claimed`]: anyone
    /// can send it, so it gets its own key space and never spends an
    /// authenticated user's quota. A client can mint fresh claimed ids at
    /// will; use a global limit as well, or only enable this behind a
    /// gateway that sets the header.
    ///
    /// ```
    /// let keys = raceguard::middleware::UserOrPeer::new()
    ///     .header(http::HeaderName::from_static("x-user-id"));
    /// # let _ = keys;
    /// ```
    pub fn header(mut self, name: HeaderName) -> Self {
        self.header = Some(name);
        self
    }

    /// Read the peer address from another extension type, e.g. axum's
    /// `ConnectInfo<SocketAddr>` (no axum dependency needed here):
    ///
    /// ```ignore
    /// UserOrPeer::new().peer_from(|c: &axum::extract::ConnectInfo<std::net::SocketAddr>| c.0.ip())
    /// ```
    ///
    /// ```
    /// use raceguard::middleware::{KeyExtractor, RateKey, UserOrPeer};
    /// #[derive(Clone)]
    /// struct RealIp(std::net::IpAddr);
    /// let keys = UserOrPeer::new().peer_from(|r: &RealIp| r.0);
    /// let mut req = http::Request::new(());
    /// req.extensions_mut().insert(RealIp("192.0.2.3".parse().unwrap()));
    /// assert_eq!(keys.extract(&req), Ok(RateKey::Peer("192.0.2.3".parse().unwrap())));
    /// ```
    pub fn peer_from<T: Send + Sync + 'static>(mut self, f: fn(&T) -> IpAddr) -> Self {
        self.peer = Arc::new(move |ext: &Extensions| ext.get::<T>().map(f));
        self
    }

    /// Key IPv6 peers by their first `bits` bits (default 64: one
    /// customer's subnet is one key; 128 keys each address). Values above
    /// 128 are clamped. IPv4-mapped IPv6 addresses are keyed as IPv4.
    ///
    /// ```
    /// use raceguard::middleware::{KeyExtractor, PeerAddr, RateKey, UserOrPeer};
    /// let keys = UserOrPeer::new().ipv6_prefix(48);
    /// let mut req = http::Request::new(());
    /// req.extensions_mut().insert(PeerAddr("[2001:db8:1:2::5]:80".parse().unwrap()));
    /// assert_eq!(keys.extract(&req), Ok(RateKey::Peer("2001:db8:1::".parse().unwrap())));
    /// ```
    pub fn ipv6_prefix(mut self, bits: u8) -> Self {
        self.ipv6_prefix = bits.min(128);
        self
    }

    fn peer_key(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u32::from(self.ipv6_prefix);
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                IpAddr::V6((u128::from(v6) & mask).into())
            }
            v4 => v4,
        }
    }
}

impl KeyExtractor for UserOrPeer {
    fn extract<B>(&self, req: &Request<B>) -> std::result::Result<RateKey, Rejection> {
        if let Some(user) = req.extensions().get::<AuthenticatedUser>() {
            return Ok(RateKey::User(user.0.clone()));
        }
        if let Some(name) = &self.header {
            let mut values = req.headers().get_all(name).iter();
            if let Some(value) = values.next() {
                const BAD: Rejection =
                    Rejection::new(StatusCode::BAD_REQUEST, "malformed user id header");
                if values.next().is_some() {
                    return Err(BAD);
                }
                let text = value.to_str().map_err(|_| BAD)?;
                let id = UserId::new(text).map_err(|_| BAD)?;
                return Ok(RateKey::Claimed(id));
            }
        }
        match (self.peer)(req.extensions()) {
            Some(ip) => Ok(RateKey::Peer(self.peer_key(ip))),
            None => {
                tracing::error!(
                    "rate limit: no authenticated user and no peer address in the request \
                     extensions; insert PeerAddr (or configure UserOrPeer::peer_from)"
                );
                Err(Rejection::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "no rate-limit key: peer address missing",
                ))
            }
        }
    }
}

/// One policy's state after a check, for the headers.
///
/// ```
/// use raceguard::clock::ManualClock;
/// use raceguard::middleware::PolicyStatus;
/// use raceguard::rate::{Quota, RateLimiter};
/// let quota = Quota::per_minute(10)?;
/// let limiter = RateLimiter::with_clock(quota, ManualClock::new());
/// let p = PolicyStatus::new("api", quota, limiter.check())?;
/// assert_eq!((p.name(), p.decision().remaining()), ("api", 9));
/// assert!(PolicyStatus::new("bad name", quota, limiter.check()).is_err());
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyStatus {
    name: &'static str,
    quota: Quota,
    decision: Decision,
}

impl PolicyStatus {
    /// A policy's state. The name appears in the headers as a structured
    /// field string, so it is restricted to 1..=64 characters of
    /// `A-Z a-z 0-9 - _ . :`.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// let q = Quota::per_second(1)?;
    /// let p = raceguard::middleware::PolicyStatus::new("per-user", q, RateLimiter::new(q).check())?;
    /// assert_eq!(p.quota(), q);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for another name.
    pub fn new(name: &'static str, quota: Quota, decision: Decision) -> Result<Self> {
        validate_policy_name(name)?;
        Ok(PolicyStatus {
            name,
            quota,
            decision,
        })
    }

    /// The policy's name.
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # let q = Quota::per_second(1)?;
    /// let p = raceguard::middleware::PolicyStatus::new("global", q, RateLimiter::new(q).check())?;
    /// assert_eq!(p.name(), "global");
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The policy's quota (for `q` and `w`).
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # let q = Quota::per_second(1)?;
    /// let p = raceguard::middleware::PolicyStatus::new("global", q, RateLimiter::new(q).check())?;
    /// assert_eq!(p.quota().burst(), 1);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// The decision (for `r`, `t` and `Retry-After`).
    ///
    /// ```
    /// # use raceguard::rate::{Quota, RateLimiter};
    /// # let q = Quota::per_second(1)?;
    /// let p = raceguard::middleware::PolicyStatus::new("global", q, RateLimiter::new(q).check())?;
    /// assert!(p.decision().allowed());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn decision(&self) -> Decision {
        self.decision
    }
}

fn validate_policy_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "rate limit policy name",
            "must be 1..=64 characters of A-Z a-z 0-9 - _ . :",
        ))
    }
}

/// What a [`RateLimitBackend`] decided for one request: allowed only if
/// every policy allowed, and each policy's state for the headers.
///
/// ```
/// use raceguard::clock::ManualClock;
/// use raceguard::middleware::{LimitOutcome, PolicyStatus};
/// use raceguard::rate::{Quota, RateLimiter};
/// let q = Quota::per_minute(1)?;
/// let limiter = RateLimiter::with_clock(q, ManualClock::new());
/// limiter.check();
/// let outcome = LimitOutcome::new(vec![PolicyStatus::new("api", q, limiter.check())?]);
/// assert!(!outcome.allowed());
/// assert_eq!(outcome.retry_after().as_secs(), 60);
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitOutcome {
    allowed: bool,
    retry_after: Duration,
    policies: Vec<PolicyStatus>,
}

impl LimitOutcome {
    /// Allowed when every policy allowed (an empty list allows); the retry
    /// delay is the longest among the denying policies.
    ///
    /// ```
    /// assert!(raceguard::middleware::LimitOutcome::new(Vec::new()).allowed());
    /// ```
    pub fn new(policies: Vec<PolicyStatus>) -> Self {
        let allowed = policies.iter().all(|p| p.decision.allowed());
        let retry_after = policies
            .iter()
            .filter(|p| p.decision.denied())
            .map(|p| p.decision.retry_after())
            .max()
            .unwrap_or(Duration::ZERO);
        LimitOutcome {
            allowed,
            retry_after,
            policies,
        }
    }

    /// Whether the request may proceed.
    ///
    /// ```
    /// assert!(raceguard::middleware::LimitOutcome::new(vec![]).allowed());
    /// ```
    pub fn allowed(&self) -> bool {
        self.allowed
    }

    /// Zero when allowed; otherwise how long until the request could pass.
    ///
    /// ```
    /// let o = raceguard::middleware::LimitOutcome::new(vec![]);
    /// assert_eq!(o.retry_after(), std::time::Duration::ZERO);
    /// ```
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// Every policy's state, in header order.
    ///
    /// ```
    /// assert!(raceguard::middleware::LimitOutcome::new(vec![]).policies().is_empty());
    /// ```
    pub fn policies(&self) -> &[PolicyStatus] {
        &self.policies
    }

    /// `RateLimit-Policy`: `"<name>";q=<burst>;w=<window s>` per policy.
    fn policy_header(&self) -> Option<HeaderValue> {
        join_items(self.policies.iter().map(|p| {
            let w = ceil_secs(p.quota.window()).max(1);
            format!("\"{}\";q={};w={w}", p.name, p.quota.burst())
        }))
    }

    /// `RateLimit`: `"<name>";r=<remaining>;t=<reset s>` per policy.
    fn limit_header(&self) -> Option<HeaderValue> {
        join_items(self.policies.iter().map(|p| {
            let d = p.decision;
            let t = ceil_secs(d.reset_after());
            format!("\"{}\";r={};t={t}", p.name, d.remaining())
        }))
    }

    /// The policy legacy headers describe: the denying one with the longest
    /// wait, else the one with the fewest remaining (first on ties).
    fn binding(&self) -> Option<&PolicyStatus> {
        if self.allowed {
            self.policies.iter().reduce(|best, p| {
                if p.decision.remaining() < best.decision.remaining() {
                    p
                } else {
                    best
                }
            })
        } else {
            self.policies
                .iter()
                .filter(|p| p.decision.denied())
                .reduce(|best, p| {
                    if p.decision.retry_after() > best.decision.retry_after() {
                        p
                    } else {
                        best
                    }
                })
        }
    }
}

fn join_items(items: impl Iterator<Item = String>) -> Option<HeaderValue> {
    let mut out = String::new();
    for item in items {
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(&item);
    }
    if out.is_empty() {
        return None;
    }
    // Names are validated and numbers are digits: always a valid value.
    HeaderValue::try_from(out).ok()
}

/// Where a [`RateLimitLayer`] gets its decisions: one call per request
/// that consumes one cell of every policy or none.
///
/// Provided: [`MemoryLimits`] (in memory, per key + optional global, all
/// or nothing through [`MultiLimit`]) and [`KeyedBackend`] (any
/// [`KeyedLimit`], e.g. Redis, one per-key policy). Implement it yourself
/// to combine other limits (for Redis multi-limits, `RedisMultiLimit`
/// gives the same all-or-nothing check).
///
/// ```
/// use raceguard::middleware::{LimitOutcome, RateKey, RateLimitBackend};
///
/// /// Never limits (e.g. for an internal route).
/// struct Unlimited;
/// impl RateLimitBackend for Unlimited {
///     async fn check(&self, _key: &RateKey) -> raceguard::Result<LimitOutcome> {
///         Ok(LimitOutcome::new(Vec::new()))
///     }
/// }
/// ```
pub trait RateLimitBackend: Send + Sync + 'static {
    /// Checks one request charged to `key`.
    ///
    /// # Errors
    ///
    /// Backend failures; the layer answers 503 or lets the request through,
    /// per its [`BackendErrorPolicy`].
    fn check(&self, key: &RateKey) -> impl Future<Output = Result<LimitOutcome>> + Send;
}

impl<T: RateLimitBackend> RateLimitBackend for Arc<T> {
    fn check(&self, key: &RateKey) -> impl Future<Output = Result<LimitOutcome>> + Send {
        (**self).check(key)
    }
}

/// In-memory limits: a per-key [`KeyedRateLimiter`] and optionally a global
/// [`RateLimiter`], checked together through [`MultiLimit`]: when the
/// global limit denies, the key's cell is **not** consumed (and the other
/// way round).
///
/// Share it with the layer through an `Arc` to inspect the limiters.
///
/// ```
/// use raceguard::clock::ManualClock;
/// use raceguard::middleware::{MemoryLimits, RateKey, RateLimitBackend};
/// use raceguard::rate::{KeyedRateLimiter, Quota, RateLimiter};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let clock = ManualClock::new();
/// let per_key = KeyedRateLimiter::<RateKey, _>::builder(Quota::per_minute(10)?)
///     .clock(clock.clone())
///     .build()?;
/// let global = RateLimiter::with_clock(Quota::per_minute(1)?, clock.clone());
/// let limits = MemoryLimits::new("user", per_key)?.with_global("global", global)?;
///
/// let (a, b) = (RateKey::Peer("192.0.2.1".parse().unwrap()), RateKey::Peer("192.0.2.2".parse().unwrap()));
/// assert!(limits.check(&a).await?.allowed());
/// let denied = limits.check(&b).await?;
/// assert!(!denied.allowed(), "the global limit is spent");
/// // b's own quota was not touched by the denied request.
/// assert_eq!(limits.per_key().peek_n(&b, 0)?.remaining(), 10);
/// # Ok::<(), raceguard::Error>(()) }).unwrap();
/// # Ok::<(), raceguard::Error>(())
/// ```
pub struct MemoryLimits<C = SystemClock> {
    name: &'static str,
    per_key: KeyedRateLimiter<RateKey, C>,
    global: Option<(&'static str, RateLimiter<C>)>,
}

impl<C: fmt::Debug> fmt::Debug for MemoryLimits<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLimits")
            .field("name", &self.name)
            .field("per_key", &self.per_key)
            .field("global", &self.global.as_ref().map(|g| g.0))
            .finish()
    }
}

impl<C: Clock> MemoryLimits<C> {
    /// Per-key limits under the policy name `name` (see
    /// [`PolicyStatus::new`] for allowed names).
    ///
    /// ```
    /// use raceguard::middleware::{MemoryLimits, RateKey};
    /// use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limits = MemoryLimits::new("user", KeyedRateLimiter::<RateKey>::new(Quota::per_minute(30)?))?;
    /// # let _ = limits;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a bad name.
    pub fn new(name: &'static str, per_key: KeyedRateLimiter<RateKey, C>) -> Result<Self> {
        validate_policy_name(name)?;
        Ok(MemoryLimits {
            name,
            per_key,
            global: None,
        })
    }

    /// Adds a global limit, checked all-or-nothing with the per-key one.
    ///
    /// ```
    /// use raceguard::middleware::{MemoryLimits, RateKey};
    /// use raceguard::rate::{KeyedRateLimiter, Quota, RateLimiter};
    /// let limits = MemoryLimits::new("user", KeyedRateLimiter::<RateKey>::new(Quota::per_minute(30)?))?
    ///     .with_global("global", RateLimiter::new(Quota::per_second(1000)?))?;
    /// assert!(limits.global().is_some());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a bad name or the per-key policy's name.
    pub fn with_global(mut self, name: &'static str, global: RateLimiter<C>) -> Result<Self> {
        validate_policy_name(name)?;
        if name == self.name {
            return Err(Error::invalid(
                "rate limit policy name",
                "the global and per-key policies need different names",
            ));
        }
        self.global = Some((name, global));
        Ok(self)
    }

    /// The per-key limiter.
    ///
    /// ```
    /// use raceguard::middleware::{MemoryLimits, RateKey};
    /// use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limits = MemoryLimits::new("user", KeyedRateLimiter::<RateKey>::new(Quota::per_minute(30)?))?;
    /// assert_eq!(limits.per_key().quota().burst(), 30);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn per_key(&self) -> &KeyedRateLimiter<RateKey, C> {
        &self.per_key
    }

    /// The global limiter, if any.
    ///
    /// ```
    /// use raceguard::middleware::{MemoryLimits, RateKey};
    /// use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let limits = MemoryLimits::new("user", KeyedRateLimiter::<RateKey>::new(Quota::per_minute(30)?))?;
    /// assert!(limits.global().is_none());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn global(&self) -> Option<&RateLimiter<C>> {
        self.global.as_ref().map(|g| &g.1)
    }

    fn check_now(&self, key: &RateKey) -> Result<LimitOutcome> {
        let key_quota = self.per_key.quota_for(key);
        let Some((gname, global)) = &self.global else {
            let d = self.per_key.check(key)?;
            return Ok(LimitOutcome::new(vec![PolicyStatus {
                name: self.name,
                quota: key_quota,
                decision: d,
            }]));
        };
        let multi = MultiLimit::new()
            .keyed(self.name, &self.per_key, key)
            .direct(gname, global)
            .check()?;
        let (mut kd, mut gd) = match multi.decisions() {
            [(_, k), (_, g)] => (*k, *g),
            _ => return Err(Error::invalid("multi-limit", "expected two decisions")),
        };
        if multi.denied() {
            // A limit that allowed inside a denied check reports the state
            // as if it had been consumed; nothing was, so show the real one.
            if kd.allowed() {
                kd = self.per_key.peek_n(key, 0)?;
            }
            if gd.allowed() {
                gd = global.peek_n(0)?;
            }
        }
        Ok(LimitOutcome::new(vec![
            PolicyStatus {
                name: self.name,
                quota: key_quota,
                decision: kd,
            },
            PolicyStatus {
                name: gname,
                quota: global.quota(),
                decision: gd,
            },
        ]))
    }
}

impl<C: Clock> RateLimitBackend for MemoryLimits<C> {
    fn check(&self, key: &RateKey) -> impl Future<Output = Result<LimitOutcome>> + Send {
        std::future::ready(self.check_now(key))
    }
}

/// One per-key policy on any [`KeyedLimit`] (keyed by
/// [`RateKey::to_user_id`]), e.g. `RedisKeyedRateLimiter`.
///
/// The trait does not expose the quota, so it is given here for the
/// `RateLimit-Policy` header; give the limiter's own quota.
///
/// ```
/// use raceguard::keys::UserId;
/// use raceguard::middleware::{KeyedBackend, RateKey, RateLimitBackend};
/// use raceguard::rate::{KeyedRateLimiter, Quota};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let quota = Quota::per_minute(30)?;
/// // Or RedisKeyedRateLimiter::new(&redis, "api", quota)?
/// let backend = KeyedBackend::new("user", KeyedRateLimiter::<UserId>::new(quota))?;
/// let outcome = backend.check(&RateKey::User(UserId::new("alice")?)).await?;
/// assert_eq!(outcome.policies()[0].decision().remaining(), 29);
/// # Ok::<(), raceguard::Error>(()) }).unwrap();
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Debug)]
pub struct KeyedBackend<L> {
    name: &'static str,
    limiter: L,
}

impl<L: KeyedLimit + 'static> KeyedBackend<L> {
    /// A backend reporting `limiter`'s decisions under `name`, with the
    /// quota the limiter applies to each key (its resolver's, if any).
    ///
    /// ```
    /// # use raceguard::keys::UserId;
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let q = Quota::per_second(5)?;
    /// let b = raceguard::middleware::KeyedBackend::new("api", KeyedRateLimiter::<UserId>::new(q))?;
    /// assert_eq!(b.limiter().quota(), q);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a bad name.
    pub fn new(name: &'static str, limiter: L) -> Result<Self> {
        validate_policy_name(name)?;
        Ok(KeyedBackend { name, limiter })
    }

    /// The limiter.
    ///
    /// ```
    /// # use raceguard::keys::UserId;
    /// # use raceguard::rate::{KeyedRateLimiter, Quota};
    /// # let q = Quota::per_second(5)?;
    /// let b = raceguard::middleware::KeyedBackend::new("api", KeyedRateLimiter::<UserId>::new(q))?;
    /// assert_eq!(b.limiter().tracked_keys(), 0);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn limiter(&self) -> &L {
        &self.limiter
    }
}

impl<L: KeyedLimit + 'static> RateLimitBackend for KeyedBackend<L> {
    async fn check(&self, key: &RateKey) -> Result<LimitOutcome> {
        let id = key.to_user_id()?;
        let decision = self.limiter.check_n(&id, 1).await?;
        Ok(LimitOutcome::new(vec![PolicyStatus {
            name: self.name,
            quota: self.limiter.quota_for(&id),
            decision,
        }]))
    }
}

/// What the rate-limit layer does when its backend fails.
///
/// ```
/// use raceguard::middleware::BackendErrorPolicy;
/// assert_eq!(BackendErrorPolicy::default(), BackendErrorPolicy::FailClosed);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendErrorPolicy {
    /// Answer 503 Service Unavailable (the default: a limit that protects
    /// a downstream must hold during an outage).
    #[default]
    FailClosed,
    /// Let the request through without rate-limit headers (a limit that
    /// only shapes traffic should not take the service down with it). A
    /// `tracing` warning is logged either way.
    FailOpen,
}

/// A tower layer that rate-limits requests per key (and optionally
/// globally) and reports the limits in the IETF `RateLimit` headers.
///
/// Headers follow draft-ietf-httpapi-ratelimit-headers-11 (structured
/// fields), on allowed **and** denied responses, one list item per policy:
///
/// - `RateLimit-Policy: "<name>";q=<burst>;w=<window>`: the quota and its
///   window in whole seconds (rounded up, at least 1);
/// - `RateLimit: "<name>";r=<remaining>;t=<reset>`: cells left and the
///   seconds (rounded up) until the policy is full again;
/// - denied: status 429 and `Retry-After: <seconds>` (rounded up, at least
///   1): the earliest time the same request can pass;
/// - with [`legacy_headers`](RateLimitLayer::legacy_headers):
///   `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`
///   (seconds) of the binding policy (the denying one, else the one with
///   the fewest remaining).
///
/// The list fields are appended, so stacked rate-limit layers add their
/// policies to the same fields.
///
/// A key the extractor rejects gets the rejection's status (400 for a
/// malformed user header) and the backend is not consulted. A backend
/// failure gets 503, or passes with
/// [`BackendErrorPolicy::FailOpen`].
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use std::convert::Infallible;
/// use http::{Request, Response, StatusCode};
/// use raceguard::clock::ManualClock;
/// use raceguard::keys::UserId;
/// use raceguard::middleware::{AuthenticatedUser, MemoryLimits, RateKey, RateLimitLayer};
/// use raceguard::rate::{KeyedRateLimiter, Quota};
/// use tower::{Layer, ServiceExt};
///
/// let per_key = KeyedRateLimiter::<RateKey, _>::builder(Quota::per_minute(2)?)
///     .clock(ManualClock::new())
///     .build()?;
/// let layer = RateLimitLayer::new(MemoryLimits::new("user", per_key)?).legacy_headers(true);
/// let svc = layer.layer(tower::service_fn(|_req: Request<String>| async {
///     Ok::<_, Infallible>(Response::new(String::new()))
/// }));
/// let req = || {
///     let mut r = Request::new(String::new());
///     r.extensions_mut().insert(AuthenticatedUser(UserId::new("alice").unwrap()));
///     r
/// };
/// let ok = svc.clone().oneshot(req()).await.unwrap();
/// assert_eq!(ok.headers()["ratelimit"], r#""user";r=1;t=30"#);
/// assert_eq!(ok.headers()["x-ratelimit-remaining"], "1");
/// svc.clone().oneshot(req()).await.unwrap();
/// let denied = svc.clone().oneshot(req()).await.unwrap();
/// assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
/// assert_eq!(denied.headers()["retry-after"], "30");
/// assert_eq!(denied.headers()["ratelimit"], r#""user";r=0;t=60"#);
/// # Ok::<(), raceguard::Error>(())
/// # }).unwrap();
/// ```
pub struct RateLimitLayer<L, K = UserOrPeer> {
    backend: Arc<L>,
    keys: Arc<K>,
    legacy: bool,
    on_error: BackendErrorPolicy,
}

impl<L, K> Clone for RateLimitLayer<L, K> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            backend: self.backend.clone(),
            keys: self.keys.clone(),
            legacy: self.legacy,
            on_error: self.on_error,
        }
    }
}

impl<L, K: fmt::Debug> fmt::Debug for RateLimitLayer<L, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("keys", &self.keys)
            .field("legacy_headers", &self.legacy)
            .field("on_error", &self.on_error)
            .finish_non_exhaustive()
    }
}

impl<L: RateLimitBackend> RateLimitLayer<L, UserOrPeer> {
    /// A layer over `backend` keyed by [`UserOrPeer::new`] (authenticated
    /// user, else [`PeerAddr`]); IETF headers only; fail closed.
    ///
    /// ```
    /// use raceguard::middleware::{MemoryLimits, RateKey, RateLimitLayer};
    /// use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let layer = RateLimitLayer::new(MemoryLimits::new(
    ///     "user",
    ///     KeyedRateLimiter::<RateKey>::new(Quota::per_minute(30)?),
    /// )?);
    /// # let _ = layer;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn new(backend: L) -> Self {
        RateLimitLayer {
            backend: Arc::new(backend),
            keys: Arc::new(UserOrPeer::new()),
            legacy: false,
            on_error: BackendErrorPolicy::FailClosed,
        }
    }
}

impl<L: RateLimitBackend, K: KeyExtractor> RateLimitLayer<L, K> {
    /// Uses another key extractor.
    ///
    /// ```
    /// use raceguard::middleware::{MemoryLimits, RateKey, RateLimitLayer, UserOrPeer};
    /// use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let layer = RateLimitLayer::new(MemoryLimits::new(
    ///     "user",
    ///     KeyedRateLimiter::<RateKey>::new(Quota::per_minute(30)?),
    /// )?)
    /// .key_extractor(UserOrPeer::new().header(http::HeaderName::from_static("x-user-id")));
    /// # let _ = layer;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn key_extractor<K2: KeyExtractor>(self, keys: K2) -> RateLimitLayer<L, K2> {
        RateLimitLayer {
            backend: self.backend,
            keys: Arc::new(keys),
            legacy: self.legacy,
            on_error: self.on_error,
        }
    }

    /// Also emit `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
    /// `X-RateLimit-Reset` (default off).
    ///
    /// ```
    /// use raceguard::middleware::{MemoryLimits, RateKey, RateLimitLayer};
    /// use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let layer = RateLimitLayer::new(MemoryLimits::new(
    ///     "user",
    ///     KeyedRateLimiter::<RateKey>::new(Quota::per_minute(30)?),
    /// )?)
    /// .legacy_headers(true);
    /// # let _ = layer;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn legacy_headers(mut self, on: bool) -> Self {
        self.legacy = on;
        self
    }

    /// What to do when the backend fails (default
    /// [`BackendErrorPolicy::FailClosed`]).
    ///
    /// ```
    /// use raceguard::middleware::{BackendErrorPolicy, MemoryLimits, RateKey, RateLimitLayer};
    /// use raceguard::rate::{KeyedRateLimiter, Quota};
    /// let layer = RateLimitLayer::new(MemoryLimits::new(
    ///     "user",
    ///     KeyedRateLimiter::<RateKey>::new(Quota::per_minute(30)?),
    /// )?)
    /// .on_backend_error(BackendErrorPolicy::FailOpen);
    /// # let _ = layer;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn on_backend_error(mut self, policy: BackendErrorPolicy) -> Self {
        self.on_error = policy;
        self
    }
}

impl<S, L, K> Layer<S> for RateLimitLayer<L, K> {
    type Service = RateLimitService<S, L, K>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RateLimitLayer`] produces.
///
/// ```
/// # use raceguard::middleware::{MemoryLimits, RateKey, RateLimitLayer, RateLimitService};
/// # use raceguard::rate::{KeyedRateLimiter, Quota};
/// use tower::Layer;
/// let layer = RateLimitLayer::new(MemoryLimits::new("user", KeyedRateLimiter::<RateKey>::new(Quota::per_minute(30)?))?);
/// let svc: RateLimitService<_, _, _> = layer.layer(tower::service_fn(|r: http::Request<()>| async move {
///     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// }));
/// # let _ = svc;
/// # Ok::<(), raceguard::Error>(())
/// ```
pub struct RateLimitService<S, L, K = UserOrPeer> {
    inner: S,
    layer: RateLimitLayer<L, K>,
}

impl<S: Clone, L, K> Clone for RateLimitService<S, L, K> {
    fn clone(&self) -> Self {
        RateLimitService {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S: fmt::Debug, L, K> fmt::Debug for RateLimitService<S, L, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, L, K, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimitService<S, L, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    L: RateLimitBackend,
    K: KeyExtractor,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let key = self.layer.keys.extract(&req);
        let (backend, legacy, on_error) = (
            self.layer.backend.clone(),
            self.layer.legacy,
            self.layer.on_error,
        );
        // Take the service that was polled ready; leave a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let key = match key {
                Ok(key) => key,
                Err(rejection) => return Ok(rejection.into_response()),
            };
            let outcome = match backend.check(&key).await {
                Ok(outcome) => outcome,
                Err(err) => {
                    tracing::warn!(error = %err, policy = ?on_error, "rate limit backend failed");
                    return match on_error {
                        BackendErrorPolicy::FailOpen => inner.call(req).await,
                        BackendErrorPolicy::FailClosed => {
                            Ok(empty(StatusCode::SERVICE_UNAVAILABLE))
                        }
                    };
                }
            };
            if outcome.allowed() {
                let mut resp = inner.call(req).await?;
                write_headers(&outcome, legacy, resp.headers_mut());
                Ok(resp)
            } else {
                let mut resp = empty(StatusCode::TOO_MANY_REQUESTS);
                let headers = resp.headers_mut();
                headers.insert(RETRY_AFTER, retry_after_value(outcome.retry_after()));
                write_headers(&outcome, legacy, headers);
                Ok(resp)
            }
        })
    }
}

fn write_headers(outcome: &LimitOutcome, legacy: bool, headers: &mut HeaderMap) {
    if let Some(v) = outcome.policy_header() {
        headers.append(RATELIMIT_POLICY, v);
    }
    if let Some(v) = outcome.limit_header() {
        headers.append(RATELIMIT, v);
    }
    if legacy && let Some(p) = outcome.binding() {
        let d = p.decision;
        headers.insert(X_LIMIT, HeaderValue::from(d.limit()));
        headers.insert(X_REMAINING, HeaderValue::from(d.remaining()));
        headers.insert(X_RESET, HeaderValue::from(ceil_secs(d.reset_after())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_keys_map_to_distinct_user_ids() {
        let a = UserId::new("a").unwrap();
        let long = UserId::new("y".repeat(MAX_ID_LEN)).unwrap();
        let ids: Vec<String> = [
            RateKey::User(a.clone()),
            RateKey::Claimed(a),
            RateKey::Peer("::1".parse().unwrap()),
            RateKey::User(long.clone()),
            RateKey::Claimed(long),
        ]
        .iter()
        .map(|k| k.to_user_id().unwrap().as_str().to_owned())
        .collect();
        assert_eq!(&ids[..3], ["u:a", "c:a", "p:::1"]);
        assert!(ids[3].starts_with("hu:") && ids[4].starts_with("hc:"));
        assert_eq!(ids[3][3..], ids[4][3..], "same digest, different tag");
        let exactly = UserId::new("z".repeat(MAX_ID_LEN - 2)).unwrap();
        assert_eq!(
            RateKey::User(exactly).to_user_id().unwrap().as_str().len(),
            MAX_ID_LEN
        );
    }

    #[test]
    fn policy_names_are_restricted() {
        for good in ["a", "per-user", "global.v2", "x:y_z"] {
            assert!(validate_policy_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(65);
        for bad in ["", "a b", "a\"b", "a\\b", "é", "a,b", "a;b", long.as_str()] {
            assert!(validate_policy_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv4_mapped_and_prefixes() {
        let keys = UserOrPeer::new();
        assert_eq!(
            keys.peer_key("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            keys.peer_key("2001:db8::1:2:3:4".parse().unwrap()),
            "2001:db8::".parse::<IpAddr>().unwrap()
        );
        let all = UserOrPeer::new().ipv6_prefix(200);
        assert_eq!(
            all.peer_key("2001:db8::1".parse().unwrap()),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        let none = UserOrPeer::new().ipv6_prefix(0);
        assert_eq!(
            none.peer_key("2001:db8::1".parse().unwrap()),
            "::".parse::<IpAddr>().unwrap()
        );
    }
}
