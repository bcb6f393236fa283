//! The rate-limit layer's Redis backend (features `tower` + `redis`):
//! per-user + global limits checked all-or-nothing in one Lua script, so
//! the layer's guarantee holds across every process sharing the Redis.

use std::fmt;
use std::sync::Arc;

use super::{LimitOutcome, PolicyStatus, RateKey, RateLimitBackend};
use crate::clock::Clock;
use crate::keys::UserId;
use crate::rate::{Decision, Quota};
use crate::redis::{RedisBackend, RedisKeyedRateLimiter, RedisMultiLimit, RedisRateLimiter};
use crate::{Error, Result};

/// Owners whose per-owner keys land in different cluster slots: a keyed
/// limiter whose key for each of them is in the global limiter's slot keeps
/// every owner's key there (its layout does not depend on the owner's slot).
const SLOT_PROBES: [&str; 3] = ["u:a", "u:b", "p:192.0.2.1"];

/// Rate limits on Redis for [`RateLimitLayer`](super::RateLimitLayer): a
/// per-key [`RedisKeyedRateLimiter`] (keyed by [`RateKey::to_user_id`]) and
/// optionally a global [`RedisRateLimiter`], checked together through
/// [`RedisMultiLimit`] in one atomic script: when the global limit denies,
/// the key's cell is **not** consumed (and the other way round), in every
/// process that shares the Redis.
///
/// **Redis Cluster.** One script runs on one slot, so the per-key cells
/// must live in the global limiter's slot: build the keyed limiter with
/// [`KeyLayout::SharedSlot`](crate::redis::KeyLayout::SharedSlot) naming
/// the global limiter. [`with_global`](RedisLimits::with_global) rejects
/// any other combination on a cluster backend up front (a typed
/// [`Error::InvalidInput`]). All of the limit's traffic then goes to one
/// node (see `KeyLayout`). Without a global limit any layout works.
///
/// **Failures.** Without a global limit the check is the keyed limiter's
/// own `check`, so its [`FailurePolicy`](crate::redis::FailurePolicy)
/// applies (the default, `Error`, hands the error to the layer). With a
/// global limit the combined script has **no** failure policy (the
/// limiters' policies are not consulted): a Redis error goes to the
/// layer's [`BackendErrorPolicy`](super::BackendErrorPolicy): 503 when
/// failing closed (the default), the request passes without headers when
/// failing open.
///
/// **Time.** The server's clock by default (keys expire when full again);
/// [`with_clock`](RedisLimits::with_clock) switches to the limiters'
/// explicit-time mode.
///
/// Build both limiters on one [`RedisBackend`] (or its clones): the
/// combined check runs on the per-key limiter's backend, and
/// [`with_global`](RedisLimits::with_global) refuses a global limiter on
/// another one. Share `RedisLimits` with the layer through an `Arc` to
/// inspect the limiters.
///
/// ```no_run
/// # async fn demo(redis: raceguard::redis::RedisBackend) -> Result<(), raceguard::Error> {
/// use raceguard::keys::ScopeId;
/// use raceguard::middleware::{RateLimitLayer, RedisLimits};
/// use raceguard::rate::Quota;
/// use raceguard::redis::{KeyLayout, RedisKeyedRateLimiter, RedisRateLimiter};
///
/// let global = RedisRateLimiter::new(&redis, "api", Quota::per_second(500)?)?;
/// // Per-user cells next to the global one: works on a cluster too.
/// let per_user = RedisKeyedRateLimiter::new(&redis, "api-user", Quota::per_minute(60)?)?
///     .with_layout(KeyLayout::SharedSlot(ScopeId::new("api")?));
/// let limits = RedisLimits::new("user", per_user)?.with_global("global", global)?;
/// let layer = RateLimitLayer::new(limits);
/// # let _ = layer;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisLimits {
    backend: RedisBackend,
    name: &'static str,
    per_user: RedisKeyedRateLimiter,
    global: Option<(&'static str, RedisRateLimiter)>,
    clock: Option<Arc<dyn Clock>>,
}

impl fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimits")
            .field("name", &self.name)
            .field("per_user", &self.per_user)
            .field("global", &self.global)
            .field("explicit_time", &self.clock.is_some())
            .finish_non_exhaustive()
    }
}

/// A decision to validate policy names with ([`PolicyStatus::new`]).
fn probe_decision() -> Decision {
    Decision::new(true, 1, 1, 0, 0)
}

/// The state of a limit that allowed inside a denied all-or-nothing check:
/// the script reports it as if one cell had been consumed; nothing was, so
/// give back that cell (what a `peek` of cost 0 would say, without a
/// second round trip).
fn unconsumed(d: Decision, quota: Quota) -> Decision {
    let interval = quota.interval_nanos();
    Decision::new(
        true,
        d.limit(),
        interval,
        d.reset_after_nanos().saturating_sub(interval),
        0,
    )
}

impl RedisLimits {
    /// Per-key limits (on the limiter's own backend) under the policy name `name` (see
    /// [`PolicyStatus::new`] for allowed names). The `RateLimit-Policy`
    /// quota is the limiter's quota for the key (its resolver's, if any).
    ///
    /// ```no_run
    /// # async fn demo(redis: raceguard::redis::RedisBackend) -> Result<(), raceguard::Error> {
    /// use raceguard::middleware::RedisLimits;
    /// use raceguard::rate::Quota;
    /// use raceguard::redis::RedisKeyedRateLimiter;
    ///
    /// let per_user = RedisKeyedRateLimiter::new(&redis, "chat", Quota::per_minute(30)?)?;
    /// let limits = RedisLimits::new("user", per_user)?;
    /// assert!(limits.global().is_none());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a bad name.
    pub fn new(name: &'static str, per_user: RedisKeyedRateLimiter) -> Result<Self> {
        PolicyStatus::new(name, Quota::per_second(1)?, probe_decision())?;
        Ok(RedisLimits {
            backend: per_user.backend().clone(),
            name,
            per_user,
            global: None,
            clock: None,
        })
    }

    /// Adds a global limit, checked all-or-nothing with the per-key one in
    /// one script.
    ///
    /// ```no_run
    /// # async fn demo(redis: raceguard::redis::RedisBackend) -> Result<(), raceguard::Error> {
    /// use raceguard::middleware::RedisLimits;
    /// use raceguard::rate::Quota;
    /// use raceguard::redis::{RedisKeyedRateLimiter, RedisRateLimiter};
    ///
    /// let per_user = RedisKeyedRateLimiter::new(&redis, "chat", Quota::per_minute(30)?)?;
    /// let global = RedisRateLimiter::new(&redis, "chat-all", Quota::per_second(100)?)?;
    /// // On a single node any key layout works; on a
    /// // cluster this needs `KeyLayout::SharedSlot` naming "chat-all".
    /// let limits = RedisLimits::new("user", per_user)?.with_global("global", global)?;
    /// assert!(limits.global().is_some());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a bad name or the per-key policy's name,
    /// for a global limiter built on another [`RedisBackend`], and, on a cluster backend, when the per-key cells are not in the
    /// global limiter's slot (the keyed limiter is not built with
    /// [`KeyLayout::SharedSlot`](crate::redis::KeyLayout::SharedSlot)
    /// naming the global limiter): every check would fail.
    pub fn with_global(mut self, name: &'static str, global: RedisRateLimiter) -> Result<Self> {
        PolicyStatus::new(name, global.quota(), probe_decision())?;
        if name == self.name {
            return Err(Error::invalid(
                "rate limit policy name",
                "the global and per-key policies need different names",
            ));
        }
        if !self.backend.same_as(global.backend()) {
            return Err(Error::invalid(
                "rate limit backend",
                "the global and per-key limiters must be built on one RedisBackend (or its clones): \
                 their combined check runs as one script on one connection",
            ));
        }
        if self.backend.is_cluster() {
            let slot = global.key().slot();
            for probe in SLOT_PROBES {
                if self.per_user.key_for(&UserId::new(probe)?)?.slot() != slot {
                    return Err(Error::invalid(
                        "rate.keys",
                        "on a Redis Cluster the per-key limiter's cells must share the \
                         global limiter's slot: build it with KeyLayout::SharedSlot naming \
                         the global limiter",
                    ));
                }
            }
        }
        self.global = Some((name, global));
        Ok(self)
    }

    /// Checks at `clock`'s time instead of the Redis server's: the
    /// limiters' explicit-time mode (`check_n_at`), for tests and for
    /// callers whose processes share a clock (give every process the same
    /// origin, e.g. Unix time). Keys written this way do not expire.
    ///
    /// ```no_run
    /// # async fn demo(redis: raceguard::redis::RedisBackend) -> Result<(), raceguard::Error> {
    /// use raceguard::clock::ManualClock;
    /// use raceguard::middleware::RedisLimits;
    /// use raceguard::rate::Quota;
    /// use raceguard::redis::RedisKeyedRateLimiter;
    ///
    /// let clock = ManualClock::new();
    /// let per_user = RedisKeyedRateLimiter::new(&redis, "chat", Quota::per_minute(30)?)?;
    /// let limits = RedisLimits::new("user", per_user)?.with_clock(clock.clone());
    /// clock.advance(std::time::Duration::from_secs(2));
    /// # let _ = limits;
    /// # Ok(()) }
    /// ```
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// The per-key limiter (keys are [`RateKey::to_user_id`]).
    ///
    /// ```no_run
    /// # async fn demo(limits: raceguard::middleware::RedisLimits) -> Result<(), raceguard::Error> {
    /// use raceguard::keys::UserId;
    /// use raceguard::middleware::RateKey;
    ///
    /// let alice = RateKey::User(UserId::new("alice")?).to_user_id()?;
    /// println!("{} left", limits.per_user().peek(&alice).await?.remaining());
    /// # Ok(()) }
    /// ```
    pub fn per_user(&self) -> &RedisKeyedRateLimiter {
        &self.per_user
    }

    /// The global limiter, if any.
    ///
    /// ```no_run
    /// # async fn demo(limits: raceguard::middleware::RedisLimits) -> Result<(), raceguard::Error> {
    /// if let Some(global) = limits.global() {
    ///     println!("{} left globally", global.peek().await?.remaining());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn global(&self) -> Option<&RedisRateLimiter> {
        self.global.as_ref().map(|g| &g.1)
    }

    async fn check_key(&self, key: &RateKey) -> Result<LimitOutcome> {
        let id = key.to_user_id()?;
        let quota = self.per_user.quota_for(&id);
        let now = self.clock.as_ref().map(|c| c.now_nanos());
        let Some((gname, global)) = &self.global else {
            let d = match now {
                Some(now) => self.per_user.check_n_at(&id, 1, now).await?,
                None => self.per_user.check(&id).await?,
            };
            return Ok(LimitOutcome::new(vec![PolicyStatus::new(
                self.name, quota, d,
            )?]));
        };
        let multi = RedisMultiLimit::new(&self.backend)
            .keyed(self.name, &self.per_user, &id)?
            .global(gname, global);
        let decision = match now {
            Some(now) => multi.check_n_at(1, now).await?,
            None => multi.check().await?,
        };
        let (mut kd, mut gd) = match decision.decisions() {
            [(_, k), (_, g)] => (*k, *g),
            _ => {
                return Err(Error::backend(
                    "redis",
                    false,
                    "multi-limit: expected two decisions",
                ));
            }
        };
        if decision.denied() {
            if kd.allowed() {
                kd = unconsumed(kd, quota);
            }
            if gd.allowed() {
                gd = unconsumed(gd, global.quota());
            }
        }
        Ok(LimitOutcome::new(vec![
            PolicyStatus::new(self.name, quota, kd)?,
            PolicyStatus::new(gname, global.quota(), gd)?,
        ]))
    }
}

impl RateLimitBackend for RedisLimits {
    async fn check(&self, key: &RateKey) -> Result<LimitOutcome> {
        self.check_key(key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Key;

    #[test]
    fn slot_probes_spread_over_slots_under_the_per_owner_layout() {
        // The per-owner layout puts `rl:{<owner>}:<name>`: the probes must
        // land in at least two slots, so no single global slot matches all.
        let slots: Vec<u16> = SLOT_PROBES
            .iter()
            .map(|p| {
                let owner = UserId::new(*p).unwrap();
                Key::builder("rl")
                    .unwrap()
                    .owner(&owner)
                    .part("x")
                    .build()
                    .unwrap()
                    .slot()
            })
            .collect();
        assert!(slots.iter().any(|s| *s != slots[0]), "{slots:?}");
    }

    #[test]
    fn a_limit_allowed_inside_a_denied_check_gets_its_cell_back() {
        let q = Quota::per_minute(3).unwrap();
        let i = q.interval_nanos();
        // As if consumed: one cell used before, plus this one.
        let reported = Decision::new(true, 3, i, 2 * i, 0);
        let real = unconsumed(reported, q);
        assert_eq!((real.remaining(), real.reset_after_nanos()), (2, i));
        assert!(real.allowed());
    }
}
