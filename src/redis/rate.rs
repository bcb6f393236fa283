//! Rate limiting on Redis: the same GCRA, the same [`Quota`] and the same
//! [`Decision`] as the in-memory limiters, shared by every process.
//!
//! One round trip per check: a Lua port of [`crate::rate::gcra`]
//! (`gcra.lua`) runs with the server's `TIME` as the clock, so app servers'
//! clock skew cannot widen a limit, and each key expires when its cell is
//! full again, so idle users cost nothing. An explicit-time mode (`*_at`
//! methods) runs the same script on the caller's clock; the differential
//! test uses it to compare every decision with the in-memory core.
//!
//! Keys: a global limiter named `n` uses `rl:{n}`; a keyed limiter named `n`
//! uses `rl:{<owner>}:n`, so all of one user's limits share a Redis Cluster
//! slot and a [`RedisMultiLimit`] over them runs as one script on a cluster.
//!
//! What happens when Redis is unreachable is the [`FailurePolicy`]'s choice,
//! made explicitly; every fallback emits a `tracing` warning.

use std::fmt;
use std::sync::{Arc, OnceLock};

use ::redis::Script;

use super::RedisBackend;
use crate::keys::{Key, Owner, ScopeId, UserId};
use crate::rate::metrics::{RateMetrics, unmetered};
use crate::rate::{
    Decision, KeyedRateLimiter, MultiDecision, Quota, RateLimiter, validate_cost,
    validate_cost_named,
};
use crate::{Error, Result};

const NAMESPACE: &str = "rl";

/// A per-owner quota resolver.
type Resolver = Arc<dyn Fn(&UserId) -> Quota + Send + Sync>;

/// What a Redis limiter answers when Redis fails (unreachable, timed out,
/// loading ...). The answer always arrives within the backend's deadlines:
/// the response timeout, plus one connect timeout while reconnecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Return the error; the caller decides. The default: no silent guess.
    #[default]
    Error,
    /// Deny (protects the downstream; users see 429s during the outage).
    FailClosed,
    /// Allow (keeps serving; the limit is not enforced during the outage).
    FailOpen,
    /// Decide with an in-memory limiter of the same quota in this process:
    /// the limit holds per process (N processes admit up to N times the
    /// limit) until Redis is back.
    Local,
}

/// The GCRA script and the code that calls it.
#[derive(Clone)]
pub(crate) struct GcraScript {
    script: Arc<Script>,
}

/// One request to the script.
pub(crate) struct ScriptRequest<'a> {
    pub(crate) key: &'a Key,
    pub(crate) quota: Quota,
    pub(crate) cost: u32,
}

impl GcraScript {
    pub(crate) fn new() -> Self {
        GcraScript {
            script: Arc::new(Script::new(include_str!("gcra.lua"))),
        }
    }

    /// Runs the requests all-or-nothing; pushes one decision per request.
    pub(crate) async fn run(
        &self,
        backend: &RedisBackend,
        requests: &[ScriptRequest<'_>],
        now: Option<u64>,
        consume: bool,
        decisions: &mut Vec<Decision>,
    ) -> Result<bool> {
        decisions.clear();
        if requests.is_empty() {
            return Ok(true);
        }
        if backend.is_cluster() {
            let slot = requests[0].key.slot();
            if requests.iter().any(|r| r.key.slot() != slot) {
                return Err(Error::invalid(
                    "rate.keys",
                    "a multi-limit's keys must share one Redis Cluster slot \
                     (use limits of one owner, or KeyLayout::SharedSlot)",
                ));
            }
        }
        let mut inv = self.script.prepare_invoke();
        for r in requests {
            inv.key(r.key);
        }
        let mode = if consume { 'c' } else { 'p' };
        match now {
            Some(now) => inv.arg(format!("{mode}{}", now.min(crate::rate::gcra::MAX_NANOS))),
            None => inv.arg(if consume { "c" } else { "p" }),
        };
        for r in requests {
            inv.arg(r.quota.interval_nanos())
                .arg(r.quota.burst())
                .arg(r.cost);
        }
        if let [r] = requests {
            // One limit: one integer, `after` when allowed, -(retry + 1)
            // when denied; the backlog follows from the quota and cost.
            let v: i64 = backend.invoke(&inv).await?;
            let (interval, window) = (r.quota.interval_nanos(), r.quota.window_nanos());
            let cost = interval.saturating_mul(u64::from(r.cost));
            let d = if v >= 0 {
                Decision::new(true, r.quota.burst(), interval, v.unsigned_abs(), 0)
            } else {
                let retry = (v + 1).unsigned_abs();
                let backlog = (retry + window).saturating_sub(cost);
                Decision::new(false, r.quota.burst(), interval, backlog, retry)
            };
            decisions.push(d);
            return Ok(d.allowed());
        }
        let out: Vec<i64> = backend.invoke(&inv).await?;
        if out.len() != 1 + 3 * requests.len() {
            return Err(Error::backend(
                "redis",
                false,
                format!("gcra script returned {} values", out.len()),
            ));
        }
        for (i, r) in requests.iter().enumerate() {
            let allowed = out[1 + 3 * i] == 1;
            let backlog = u64::try_from(out[2 + 3 * i]).unwrap_or(0);
            let retry = u64::try_from(out[3 + 3 * i]).unwrap_or(0);
            decisions.push(Decision::new(
                allowed,
                r.quota.burst(),
                r.quota.interval_nanos(),
                backlog,
                retry,
            ));
        }
        Ok(out[0] == 1)
    }
}

fn degraded(policy: FailurePolicy, quota: Quota, limit: &str, err: &Error) -> Option<Decision> {
    match policy {
        FailurePolicy::Error => None,
        FailurePolicy::FailClosed => {
            tracing::warn!(limit, error = %err, "redis rate limiter failed; denying (fail closed)");
            Some(Decision::new(
                false,
                quota.burst(),
                quota.interval_nanos(),
                quota.window_nanos(),
                quota.interval_nanos(),
            ))
        }
        FailurePolicy::FailOpen => {
            tracing::warn!(limit, error = %err, "redis rate limiter failed; allowing (fail open)");
            Some(Decision::new(
                true,
                quota.burst(),
                quota.interval_nanos(),
                0,
                0,
            ))
        }
        FailurePolicy::Local => {
            tracing::warn!(limit, error = %err, "redis rate limiter failed; deciding locally");
            None
        }
    }
}

/// One global limit on Redis, shared by every process (an outbound throttle
/// towards an external API, seed 002).
///
/// ```no_run
/// # async fn demo(redis: raceguard::redis::RedisBackend) -> Result<(), raceguard::Error> {
/// use raceguard::rate::Quota;
/// use raceguard::redis::RedisRateLimiter;
///
/// let audnex = RedisRateLimiter::new(&redis, "audnex-api", Quota::per_second(5)?)?;
/// if audnex.check().await?.allowed() {
///     // call the API
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisRateLimiter {
    backend: RedisBackend,
    script: GcraScript,
    key: Key,
    name: Arc<str>,
    quota: Quota,
    policy: FailurePolicy,
    /// Built on the first fallback (`FailurePolicy::Local` only); shared by clones.
    local: Arc<OnceLock<RateLimiter>>,
    metrics: RateMetrics,
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("key", &self.key)
            .field("quota", &self.quota)
            .field("policy", &self.policy)
            .finish()
    }
}

impl RedisRateLimiter {
    /// The backend this limiter runs on.
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    pub(crate) fn backend(&self) -> &RedisBackend {
        &self.backend
    }

    /// A global limiter named `name` (validated like a [`ScopeId`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for an invalid name.
    pub fn new(backend: &RedisBackend, name: &str, quota: Quota) -> Result<Self> {
        let scope = ScopeId::new(name)?;
        let key = Key::builder(NAMESPACE)?.owner(&scope).build()?;
        Ok(RedisRateLimiter {
            backend: backend.clone(),
            script: GcraScript::new(),
            key,
            name: Arc::from(name),
            quota,
            policy: FailurePolicy::default(),
            local: Arc::default(),
            metrics: RateMetrics::new(Some(name)),
        })
    }

    /// Sets what to answer when Redis fails.
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The Redis key this limiter uses.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The quota.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Consumes one cell if available (server time).
    ///
    /// # Errors
    ///
    /// Redis failures, as the [`FailurePolicy`] says.
    ///
    /// Cancellation: dropping the future may or may not leave the cell
    /// consumed (the script may already be running); it never consumes twice.
    pub async fn check(&self) -> Result<Decision> {
        self.run(1, None, true).await
    }

    /// Consumes `n` cells if all are available.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `n` exceeds the burst; Redis failures as
    /// the [`FailurePolicy`] says.
    pub async fn check_n(&self, n: u32) -> Result<Decision> {
        self.run(n, None, true).await
    }

    /// The decision `check` would return, without consuming.
    ///
    /// # Errors
    ///
    /// As [`check`](Self::check).
    pub async fn peek(&self) -> Result<Decision> {
        self.run(1, None, false).await
    }

    /// `check_n` at an explicit time (nanoseconds on the caller's clock)
    /// instead of the server's; keys written this way do not expire.
    ///
    /// # Errors
    ///
    /// As [`check_n`](Self::check_n).
    pub async fn check_n_at(&self, n: u32, now_nanos: u64) -> Result<Decision> {
        self.run(n, Some(now_nanos), true).await
    }

    async fn run(&self, n: u32, now: Option<u64>, consume: bool) -> Result<Decision> {
        let out = self.decide(n, now, consume).await;
        if consume {
            self.metrics.outcome(&out);
        }
        out
    }

    async fn decide(&self, n: u32, now: Option<u64>, consume: bool) -> Result<Decision> {
        validate_cost(n, self.quota)?;
        let mut out = Vec::with_capacity(1);
        let req = [ScriptRequest {
            key: &self.key,
            quota: self.quota,
            cost: n,
        }];
        match self
            .script
            .run(&self.backend, &req, now, consume, &mut out)
            .await
        {
            Ok(_) => Ok(out[0]),
            Err(e) if e.kind() == crate::ErrorKind::InvalidInput => Err(e),
            Err(e) => match degraded(self.policy, self.quota, &self.name, &e) {
                Some(d) => Ok(d),
                None if self.policy == FailurePolicy::Local => {
                    let local = self
                        .local
                        .get_or_init(|| unmetered(|| RateLimiter::new(self.quota)));
                    if consume {
                        local.check_n(n)
                    } else {
                        local.peek_n(n)
                    }
                }
                None => Err(e),
            },
        }
    }
}

/// Where a keyed limiter's keys live on a Redis Cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyLayout {
    /// `rl:{<owner>}:<name>`: each owner's keys in the owner's slot; load
    /// spreads over the cluster. The default.
    #[default]
    PerOwner,
    /// `rl:{<scope>}:<name>:<owner>`: every key in one slot, so a multi-limit
    /// can combine these keys with a global limit named `<scope>` in one
    /// script. All of this limiter's traffic then hits one node: fine up to
    /// what one Redis core does (about 100k checks/s), a hot slot beyond.
    SharedSlot(ScopeId),
}

/// A per-user (per-owner) limit on Redis, shared by every process: seed 001's
/// "4 workers admit 4x the limit" fixed across machines.
///
/// ```no_run
/// # async fn demo(redis: raceguard::redis::RedisBackend) -> Result<(), raceguard::Error> {
/// use raceguard::keys::UserId;
/// use raceguard::rate::Quota;
/// use raceguard::redis::RedisKeyedRateLimiter;
///
/// let per_user = RedisKeyedRateLimiter::new(&redis, "chat", Quota::per_minute(30)?)?;
/// let alice = UserId::new("alice")?;
/// let d = per_user.check(&alice).await?;
/// println!("allowed={} remaining={}", d.allowed(), d.remaining());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisKeyedRateLimiter {
    backend: RedisBackend,
    script: GcraScript,
    name: Arc<str>,
    quota: Quota,
    resolver: Option<Resolver>,
    layout: KeyLayout,
    policy: FailurePolicy,
    /// Built on the first fallback (`FailurePolicy::Local` only) from the
    /// quota and resolver; shared by clones.
    local: Arc<OnceLock<KeyedRateLimiter<UserId>>>,
    metrics: RateMetrics,
}

impl fmt::Debug for RedisKeyedRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisKeyedRateLimiter")
            .field("name", &self.name)
            .field("quota", &self.quota)
            .field("layout", &self.layout)
            .field("policy", &self.policy)
            .finish()
    }
}

impl RedisKeyedRateLimiter {
    /// The backend this limiter runs on (for layers that combine it with
    /// other limits in one script).
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    pub(crate) fn backend(&self) -> &RedisBackend {
        &self.backend
    }

    /// A keyed limiter named `name` (validated as a key part).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for an invalid name.
    pub fn new(backend: &RedisBackend, name: &str, quota: Quota) -> Result<Self> {
        // Validate the name once, as a key component.
        ScopeId::new(name)?;
        Ok(RedisKeyedRateLimiter {
            backend: backend.clone(),
            script: GcraScript::new(),
            name: Arc::from(name),
            quota,
            resolver: None,
            layout: KeyLayout::default(),
            policy: FailurePolicy::default(),
            local: Arc::default(),
            metrics: RateMetrics::new(Some(name)),
        })
    }

    /// Gives each owner its own quota (premium users ...). The resolver
    /// runs on every check; the quota is passed to the script as arguments.
    pub fn with_quota_resolver(
        mut self,
        resolve: impl Fn(&UserId) -> Quota + Send + Sync + 'static,
    ) -> Self {
        self.resolver = Some(Arc::new(resolve));
        self
    }

    /// Sets where keys live on a cluster (see [`KeyLayout`]).
    pub fn with_layout(mut self, layout: KeyLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Sets what to answer when Redis fails.
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The quota for `owner`.
    pub fn quota_for(&self, owner: &UserId) -> Quota {
        match &self.resolver {
            Some(r) => r(owner),
            None => self.quota,
        }
    }

    /// The in-memory limiter `FailurePolicy::Local` falls back to: same
    /// quota, same resolver.
    fn local_limiter(&self) -> KeyedRateLimiter<UserId> {
        let mut b = KeyedRateLimiter::builder(self.quota);
        if let Some(resolve) = self.resolver.clone() {
            b = b.quota_resolver(move |k: &UserId| resolve(k));
        }
        unmetered(|| b.build()).expect("default keyed limiter settings are valid")
    }

    /// The Redis key of `owner`'s cell.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when the key would be too long.
    pub fn key_for(&self, owner: &UserId) -> Result<Key> {
        match &self.layout {
            KeyLayout::PerOwner => Key::builder(NAMESPACE)?
                .owner(owner)
                .part(&*self.name)
                .build(),
            KeyLayout::SharedSlot(scope) => Key::builder(NAMESPACE)?
                .owner(scope)
                .part(&*self.name)
                .part(owner.owner_id())
                .build(),
        }
    }

    /// Consumes one of `owner`'s cells if available (server time).
    ///
    /// # Errors
    ///
    /// Redis failures, as the [`FailurePolicy`] says.
    ///
    /// Cancellation: dropping the future may or may not leave the cell
    /// consumed; it never consumes twice.
    pub async fn check(&self, owner: &UserId) -> Result<Decision> {
        self.run(owner, 1, None, true).await
    }

    /// Consumes `n` of `owner`'s cells if all are available.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `n` exceeds the owner's burst; Redis
    /// failures as the [`FailurePolicy`] says.
    pub async fn check_n(&self, owner: &UserId, n: u32) -> Result<Decision> {
        self.run(owner, n, None, true).await
    }

    /// The decision `check` would return, without consuming.
    ///
    /// # Errors
    ///
    /// As [`check`](Self::check).
    pub async fn peek(&self, owner: &UserId) -> Result<Decision> {
        self.run(owner, 1, None, false).await
    }

    /// `check_n` at an explicit time (nanoseconds on the caller's clock);
    /// keys written this way do not expire.
    ///
    /// # Errors
    ///
    /// As [`check_n`](Self::check_n).
    pub async fn check_n_at(&self, owner: &UserId, n: u32, now_nanos: u64) -> Result<Decision> {
        self.run(owner, n, Some(now_nanos), true).await
    }

    /// `peek` for `n` cells at an explicit time.
    ///
    /// # Errors
    ///
    /// As [`check_n`](Self::check_n).
    pub async fn peek_n_at(&self, owner: &UserId, n: u32, now_nanos: u64) -> Result<Decision> {
        self.run(owner, n, Some(now_nanos), false).await
    }

    async fn run(
        &self,
        owner: &UserId,
        n: u32,
        now: Option<u64>,
        consume: bool,
    ) -> Result<Decision> {
        let out = self.decide(owner, n, now, consume).await;
        if consume {
            self.metrics.outcome(&out);
        }
        out
    }

    async fn decide(
        &self,
        owner: &UserId,
        n: u32,
        now: Option<u64>,
        consume: bool,
    ) -> Result<Decision> {
        let quota = self.quota_for(owner);
        validate_cost(n, quota)?;
        let key = self.key_for(owner)?;
        let req = [ScriptRequest {
            key: &key,
            quota,
            cost: n,
        }];
        let mut out = Vec::with_capacity(1);
        match self
            .script
            .run(&self.backend, &req, now, consume, &mut out)
            .await
        {
            Ok(_) => Ok(out[0]),
            Err(e) if e.kind() == crate::ErrorKind::InvalidInput => Err(e),
            Err(e) => match degraded(self.policy, quota, &self.name, &e) {
                Some(d) => Ok(d),
                None if self.policy == FailurePolicy::Local => {
                    let local = self.local.get_or_init(|| self.local_limiter());
                    if consume {
                        local.check_n(owner, n)
                    } else {
                        local.peek_n(owner, n)
                    }
                }
                None => Err(e),
            },
        }
    }
}

/// Several Redis limits checked as one all-or-nothing decision in one
/// script: when any denies, none is consumed.
///
/// On a cluster the keys must share a slot: the limits of one owner always
/// do (per-user and per-route limits of a user); to combine them with a
/// global limit, build the keyed limiters with
/// [`KeyLayout::SharedSlot`] naming the global limiter.
///
/// ```no_run
/// # async fn demo(redis: raceguard::redis::RedisBackend) -> Result<(), raceguard::Error> {
/// use raceguard::keys::UserId;
/// use raceguard::rate::Quota;
/// use raceguard::redis::{RedisKeyedRateLimiter, RedisMultiLimit};
///
/// let per_user = RedisKeyedRateLimiter::new(&redis, "chat", Quota::per_minute(30)?)?;
/// let per_route = RedisKeyedRateLimiter::new(&redis, "chat-send", Quota::per_second(2)?)?;
/// let alice = UserId::new("alice")?;
/// let d = RedisMultiLimit::new(&redis)
///     .keyed("per-user", &per_user, &alice)?
///     .keyed("per-route", &per_route, &alice)?
///     .check()
///     .await?;
/// if d.denied() {
///     println!("denied by {:?}, retry after {:?}", d.denied_by(), d.retry_after());
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RedisMultiLimit {
    backend: RedisBackend,
    script: GcraScript,
    limits: Vec<(&'static str, Key, Quota)>,
    /// Per limit: the limiter's identity (its shared name) and counters.
    metrics: Vec<(Arc<str>, RateMetrics)>,
}

impl fmt::Debug for GcraScript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcraScript")
            .field("sha", &self.script.get_hash())
            .finish()
    }
}

impl RedisMultiLimit {
    /// Records a consuming check once per distinct limiter (clones of a
    /// limiter share its name's allocation): admitted when every limit
    /// allowed, denied for each limiter with a limit that denied.
    fn record(&self, decisions: &[Decision]) {
        let allowed = decisions.iter().all(Decision::allowed);
        for (i, (name, metrics)) in self.metrics.iter().enumerate() {
            let same = |(other, _): &(Arc<str>, RateMetrics)| Arc::ptr_eq(other, name);
            if self.metrics[..i].iter().any(same) {
                continue;
            }
            if allowed {
                metrics.admitted();
            } else if self
                .metrics
                .iter()
                .zip(decisions)
                .any(|(m, d)| same(m) && d.denied())
            {
                metrics.denied();
            }
        }
    }

    /// An empty multi-limit on `backend`.
    pub fn new(backend: &RedisBackend) -> Self {
        RedisMultiLimit {
            backend: backend.clone(),
            script: GcraScript::new(),
            limits: Vec::new(),
            metrics: Vec::new(),
        }
    }

    /// Adds a global limiter.
    pub fn global(mut self, name: &'static str, limiter: &RedisRateLimiter) -> Self {
        self.limits.push((name, limiter.key.clone(), limiter.quota));
        self.metrics
            .push((limiter.name.clone(), limiter.metrics.clone()));
        self
    }

    /// Adds `owner`'s cell of a keyed limiter.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when the key would be too long.
    pub fn keyed(
        mut self,
        name: &'static str,
        limiter: &RedisKeyedRateLimiter,
        owner: &UserId,
    ) -> Result<Self> {
        self.limits
            .push((name, limiter.key_for(owner)?, limiter.quota_for(owner)));
        self.metrics
            .push((limiter.name.clone(), limiter.metrics.clone()));
        Ok(self)
    }

    /// Consumes one cell of every limit, or none.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for keys in different cluster slots; Redis
    /// failures (a multi-limit has no failure policy of its own: handle the
    /// error).
    pub async fn check(&self) -> Result<MultiDecision> {
        self.check_n(1).await
    }

    /// Consumes `n` cells of every limit, or none.
    ///
    /// # Errors
    ///
    /// As [`check`](Self::check); [`Error::InvalidInput`] when `n` exceeds a
    /// limit's burst.
    pub async fn check_n(&self, n: u32) -> Result<MultiDecision> {
        self.run(n, None, true).await
    }

    /// `check_n` at an explicit time.
    ///
    /// # Errors
    ///
    /// As [`check_n`](Self::check_n).
    pub async fn check_n_at(&self, n: u32, now_nanos: u64) -> Result<MultiDecision> {
        self.run(n, Some(now_nanos), true).await
    }

    async fn run(&self, n: u32, now: Option<u64>, consume: bool) -> Result<MultiDecision> {
        for (name, _, quota) in &self.limits {
            validate_cost_named(n, *quota, name)?;
        }
        let reqs: Vec<ScriptRequest<'_>> = self
            .limits
            .iter()
            .map(|(_, key, quota)| ScriptRequest {
                key,
                quota: *quota,
                cost: n,
            })
            .collect();
        let mut out = Vec::with_capacity(reqs.len());
        self.script
            .run(&self.backend, &reqs, now, consume, &mut out)
            .await?;
        if consume {
            self.record(&out);
        }
        Ok(MultiDecision::from_parts(
            self.limits
                .iter()
                .map(|(name, _, _)| *name)
                .zip(out)
                .collect(),
        ))
    }
}
