//! Backend-independent limiter traits: write request handling once, run it
//! on an in-memory limiter or on Redis by changing the line that builds the
//! limiter.

use std::future::Future;

use super::{Decision, KeyedRateLimiter, Quota, RateLimiter};
use crate::Result;
use crate::clock::Clock;
use crate::keys::UserId;

/// A global limit on any backend (in memory: [`RateLimiter`]; Redis:
/// `raceguard::redis::RedisRateLimiter`).
///
/// ```
/// use raceguard::rate::{Limit, Quota, RateLimiter};
///
/// async fn call_external_api(limit: &impl Limit) -> Result<bool, raceguard::Error> {
///     Ok(limit.check_n(1).await?.allowed())
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let limit = RateLimiter::new(Quota::per_second(5)?); // or RedisRateLimiter::new(&redis, "api", quota)?
/// assert!(call_external_api(&limit).await?);
/// # Ok::<(), raceguard::Error>(()) }).unwrap();
/// # Ok::<(), raceguard::Error>(())
/// ```
pub trait Limit: Send + Sync {
    /// Consumes `n` cells if all are available.
    ///
    /// # Errors
    ///
    /// `InvalidInput` when `n` exceeds the burst; backend failures.
    fn check_n(&self, n: u32) -> impl Future<Output = Result<Decision>> + Send;
}

/// A per-user limit on any backend (in memory: [`KeyedRateLimiter`] keyed
/// by [`UserId`]; Redis: `raceguard::redis::RedisKeyedRateLimiter`).
///
/// ```
/// use raceguard::keys::UserId;
/// use raceguard::rate::{KeyedLimit, KeyedRateLimiter, Quota};
///
/// async fn handle(limit: &impl KeyedLimit, user: &UserId) -> Result<u16, raceguard::Error> {
///     Ok(if limit.check_n(user, 1).await?.allowed() { 200 } else { 429 })
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// // Switching to Redis is this one line:
/// // let limit = RedisKeyedRateLimiter::new(&redis, "chat", Quota::per_minute(30)?)?;
/// let limit = KeyedRateLimiter::<UserId>::new(Quota::per_minute(30)?);
/// let alice = UserId::new("alice")?;
/// assert_eq!(handle(&limit, &alice).await?, 200);
/// # Ok::<(), raceguard::Error>(()) }).unwrap();
/// # Ok::<(), raceguard::Error>(())
/// ```
pub trait KeyedLimit: Send + Sync {
    /// Consumes `n` of `user`'s cells if all are available.
    ///
    /// # Errors
    ///
    /// `InvalidInput` when `n` exceeds the user's burst; `CapacityExceeded`
    /// when an in-memory limiter is at its key cap; backend failures.
    fn check_n(&self, user: &UserId, n: u32) -> impl Future<Output = Result<Decision>> + Send;

    /// The quota `user` is limited by (the limiter's, or its resolver's for
    /// this user): what a `RateLimit-Policy` header reports.
    fn quota_for(&self, user: &UserId) -> Quota;
}

impl<C: Clock> Limit for RateLimiter<C> {
    fn check_n(&self, n: u32) -> impl Future<Output = Result<Decision>> + Send {
        std::future::ready(RateLimiter::check_n(self, n))
    }
}

impl<C, S> KeyedLimit for KeyedRateLimiter<UserId, C, S>
where
    C: Clock,
    S: std::hash::BuildHasher + Send + Sync,
{
    fn check_n(&self, user: &UserId, n: u32) -> impl Future<Output = Result<Decision>> + Send {
        std::future::ready(KeyedRateLimiter::check_n(self, user, n))
    }

    fn quota_for(&self, user: &UserId) -> Quota {
        KeyedRateLimiter::quota_for(self, user)
    }
}

/// The [binding](super::MultiDecision::binding) decision of all the
/// limits, taken all or nothing.
impl<C: Clock> Limit for super::AllOf<C> {
    fn check_n(&self, n: u32) -> impl Future<Output = Result<Decision>> + Send {
        // An `AllOf` is never empty (its constructor takes a limit), so
        // `binding` is always `Some`; no panic path all the same.
        std::future::ready(super::AllOf::check_n(self, n).and_then(|d| {
            d.binding()
                .ok_or_else(|| crate::Error::invalid("rate multi-limit", "it has no limits"))
        }))
    }
}

/// The [binding](super::MultiDecision::binding) decision of all the
/// limits, taken all or nothing in one script (a work queue's workers can
/// obey several global limits shared by every process).
///
/// # Errors
///
/// As [`RedisMultiLimit::check_n`](crate::redis::RedisMultiLimit::check_n);
/// [`Error::InvalidInput`](crate::Error::InvalidInput) for a multi-limit
/// with no limits.
#[cfg(feature = "redis")]
impl Limit for crate::redis::RedisMultiLimit {
    async fn check_n(&self, n: u32) -> Result<Decision> {
        crate::redis::RedisMultiLimit::check_n(self, n)
            .await?
            .binding()
            .ok_or_else(|| crate::Error::invalid("rate multi-limit", "it has no limits"))
    }
}

#[cfg(feature = "redis")]
impl Limit for crate::redis::RedisRateLimiter {
    fn check_n(&self, n: u32) -> impl Future<Output = Result<Decision>> + Send {
        crate::redis::RedisRateLimiter::check_n(self, n)
    }
}

#[cfg(feature = "redis")]
impl KeyedLimit for crate::redis::RedisKeyedRateLimiter {
    fn check_n(&self, user: &UserId, n: u32) -> impl Future<Output = Result<Decision>> + Send {
        crate::redis::RedisKeyedRateLimiter::check_n(self, user, n)
    }

    fn quota_for(&self, user: &UserId) -> Quota {
        crate::redis::RedisKeyedRateLimiter::quota_for(self, user)
    }
}
