//! Versioned cache namespaces (race R03) with coalesced cache-aside loads
//! (race R14).
//!
//! A *scope* (a user, a tenant, a chat: anything that implements
//! [`Owner`](crate::keys::Owner), such as [`UserId`](crate::keys::UserId) or
//! [`ScopeId`](crate::keys::ScopeId)) has a version. Every cached value is
//! stored under the version of its scope that was read *before* the value
//! was loaded, and is returned only while that version is current.
//! [`invalidate`](VersionedCache::invalidate) moves the scope to a fresh
//! version: one atomic step, O(1), touching no other scope. There is no
//! pattern delete anywhere (no `KEYS`, no `SCAN` + `DEL`), so one user's
//! invalidation can never delete another user's entries, and an invalidation
//! always takes effect, whatever was cached.
//!
//! - [`VersionedCache`]: in memory, bounded, per-entry TTL.
//! - `RedisVersionedCache` (feature `redis`): versions and values in Redis,
//!   in one Redis Cluster slot per scope; a hit is one round trip.
//!
//! Both coalesce concurrent misses of one `(scope, version, item)` in the
//! process through [`SingleFlight`](crate::once::SingleFlight): 1,000
//! concurrent misses call the loader once.
//!
//! With the feature `metrics`, each cache mirrors its [`CacheStats`] to the
//! [`metrics`](https://docs.rs/metrics) facade as counters labelled
//! `cache=<name>` (`VersionedCache::named`, the Redis cache's name;
//! `"unnamed"` otherwise): `raceguard_cache_hits_total`,
//! `raceguard_cache_misses_total`, `raceguard_cache_loads_total` and
//! `raceguard_cache_invalidations_total`. Scopes and items never become
//! labels. Handles are registered when the cache is built (and named), with
//! the recorder current then.
//!
//! ```
//! use std::time::Duration;
//! use raceguard::cache::VersionedCache;
//! use raceguard::keys::UserId;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let cache: VersionedCache<Vec<String>> = VersionedCache::new(10_000);
//! let (alice, bob) = (UserId::new("alice")?, UserId::new("bob")?);
//! let ttl = Duration::from_secs(60);
//! let load = |who: &'static str| async move { Ok::<_, std::io::Error>(vec![format!("{who}: hi")]) };
//!
//! cache.get_or_load(&alice, "history:50:0", ttl, || load("alice")).await?;
//! cache.get_or_load(&bob, "history:50:0", ttl, || load("bob")).await?;
//!
//! // Alice sends a message: only her entries go stale.
//! cache.invalidate(&alice);
//! let bob_history = cache.get_or_load(&bob, "history:50:0", ttl, || load("bob")).await?;
//! assert_eq!(bob_history, vec!["bob: hi".to_string()]);
//! assert_eq!(cache.stats().hits, 1); // Bob's entry survived
//! # Ok::<(), raceguard::Error>(())
//! # }).unwrap();
//! ```

use std::fmt;

use crate::BoxError;

#[cfg(feature = "redis")]
mod codec;
mod memory;
#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use codec::{Codec, JsonCodec};
pub use memory::VersionedCache;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::RedisVersionedCache;

/// A snapshot of a cache's counters.
///
/// ```
/// use raceguard::cache::VersionedCache;
/// let cache: VersionedCache<u32> = VersionedCache::new(16);
/// let stats = cache.stats();
/// assert_eq!((stats.hits, stats.misses, stats.loads, stats.invalidations), (0, 0, 0, 0));
/// assert_eq!(stats.hit_rate(), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that found no current value (each either ran the loader or
    /// joined a load already in flight).
    pub misses: u64,
    /// Loader executions (at most one per concurrent miss group).
    pub loads: u64,
    /// Invalidations performed (each one took effect).
    pub invalidations: u64,
}

impl CacheStats {
    /// `hits / (hits + misses)`, or `None` before the first lookup.
    ///
    /// ```
    /// use raceguard::cache::CacheStats;
    /// let mut s = CacheStats::default();
    /// s.hits = 3;
    /// s.misses = 1;
    /// assert_eq!(s.hit_rate(), Some(0.75));
    /// ```
    #[allow(clippy::cast_precision_loss)]
    pub fn hit_rate(&self) -> Option<f64> {
        let total = self.hits + self.misses;
        (total > 0).then(|| self.hits as f64 / total as f64)
    }
}

/// The `cache` label of a cache built without a name.
#[cfg(feature = "metrics")]
const UNNAMED: &str = "unnamed";

/// The counters behind [`CacheStats`], mirrored (feature `metrics`) to the
/// `metrics` facade:
///
/// | metric | labels | counts |
/// |---|---|---|
/// | `raceguard_cache_hits_total` | `cache` | lookups answered from the cache |
/// | `raceguard_cache_misses_total` | `cache` | lookups that found no current value |
/// | `raceguard_cache_loads_total` | `cache` | loader executions |
/// | `raceguard_cache_invalidations_total` | `cache` | invalidations (version bumps) |
///
/// The handles are registered when the cache is built, with the recorder
/// current then; scopes and items never become labels.
#[derive(Debug)]
pub(crate) struct Counters {
    hits: crate::sync::atomic::AtomicU64,
    misses: crate::sync::atomic::AtomicU64,
    loads: crate::sync::atomic::AtomicU64,
    invalidations: crate::sync::atomic::AtomicU64,
    #[cfg(feature = "metrics")]
    metrics: [metrics::Counter; 4],
}

#[cfg(feature = "metrics")]
const HIT: usize = 0;
#[cfg(feature = "metrics")]
const MISS: usize = 1;
#[cfg(feature = "metrics")]
const LOAD: usize = 2;
#[cfg(feature = "metrics")]
const INVALIDATION: usize = 3;

impl Counters {
    /// Counters for the cache named `name`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(name: Option<&str>) -> Self {
        use crate::sync::atomic::AtomicU64;
        Counters {
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metrics: register(name.unwrap_or(UNNAMED)),
        }
    }

    pub(crate) fn hit(&self) {
        self.hits
            .fetch_add(1, crate::sync::atomic::Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics[HIT].increment(1);
    }
    pub(crate) fn miss(&self) {
        self.misses
            .fetch_add(1, crate::sync::atomic::Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics[MISS].increment(1);
    }
    pub(crate) fn load(&self) {
        self.loads
            .fetch_add(1, crate::sync::atomic::Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics[LOAD].increment(1);
    }
    pub(crate) fn invalidation(&self) {
        self.invalidations
            .fetch_add(1, crate::sync::atomic::Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metrics[INVALIDATION].increment(1);
    }
    pub(crate) fn snapshot(&self) -> CacheStats {
        use crate::sync::atomic::Ordering::Relaxed;
        CacheStats {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            loads: self.loads.load(Relaxed),
            invalidations: self.invalidations.load(Relaxed),
        }
    }
}

#[cfg(feature = "metrics")]
fn register(cache: &str) -> [metrics::Counter; 4] {
    const NAMES: [(&str, &str); 4] = [
        (
            "raceguard_cache_hits_total",
            "Cache lookups answered from the cache.",
        ),
        (
            "raceguard_cache_misses_total",
            "Cache lookups that found no current value.",
        ),
        ("raceguard_cache_loads_total", "Cache loader executions."),
        (
            "raceguard_cache_invalidations_total",
            "Cache invalidations (scope version bumps).",
        ),
    ];
    NAMES.map(|(name, help)| {
        metrics::describe_counter!(name, help);
        metrics::counter!(name, "cache" => cache.to_owned())
    })
}

/// The single-flight key of a load: a load is shared only by callers that
/// read the same version, so a load started before an invalidation is never
/// joined by a caller that arrived after it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct FlightKey {
    pub(crate) scope: Box<str>,
    pub(crate) version: u64,
    pub(crate) item: Box<str>,
}

/// A loader's error, shared by every caller of the load.
pub(crate) struct LoadFailed(pub(crate) BoxError);

impl fmt::Debug for LoadFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for LoadFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cache loader failed: {}", self.0)
    }
}

impl std::error::Error for LoadFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Validates a TTL and converts it to nanoseconds (at least 1 ms).
pub(crate) fn ttl_nanos(ttl: std::time::Duration) -> crate::Result<u64> {
    if ttl < std::time::Duration::from_millis(1) {
        return Err(crate::Error::invalid(
            "cache.ttl",
            "a cache TTL must be at least 1 ms",
        ));
    }
    Ok(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX))
}
