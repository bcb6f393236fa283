//! The in-memory versioned cache.
//!
//! Shards, each a [`Mutex`] over `scope -> ScopeState`; a scope's version
//! and its values live in the same shard, so a lookup takes one lock.
//!
//! Invariants:
//!
//! 1. Versions come from one per-cache counter (`next_version`): a version
//!    number is handed out once, ever. A scope that is created (first use,
//!    or again after its state was evicted) or invalidated gets a number no
//!    value was ever stored under, so an evicted-and-recreated scope can
//!    never revive old values.
//! 2. A value is returned only if it was stored under the scope's current
//!    version (and has not expired).
//! 3. A value is stored only if the version its loader read is still the
//!    scope's current version at the time of the store (checked under the
//!    shard lock). A load that raced an invalidation is dropped: it can never
//!    become visible after the invalidation, and never overwrites a newer
//!    value.
//! 4. User code (loaders, codecs, `V::clone` aside) never runs under a shard
//!    lock.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use super::{CacheStats, Counters, FlightKey, LoadFailed, ttl_nanos};
use crate::clock::{Clock, SystemClock};
use crate::keys::Owner;
use crate::once::SingleFlight;
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::{Mutex, StdArc};
use crate::{BoxError, Error, Result};

const SHARDS: usize = 16;

/// A bounded in-memory cache with versioned scopes and coalesced loads.
///
/// - [`get_or_load`](Self::get_or_load) returns the value cached for
///   `(scope, item)` under the scope's current version, or runs the loader
///   once for all concurrent callers that missed on the same version, and
///   stores the result under the version read *before* loading.
/// - [`invalidate`](Self::invalidate) moves the scope to a fresh version:
///   O(1), no other scope is touched, and no value loaded before the call
///   (or concurrently with it) is returned after it returns.
/// - Bounded: about `capacity` values (and twice as many scopes). When a
///   shard is full, expired and stale (old-version) values go first, then
///   arbitrary ones (this is not an LRU).
/// - Values are cloned out on a hit: wrap large values in an `Arc`.
///
/// Cloning the cache is cheap and shares it.
///
/// ```
/// use std::time::Duration;
/// use raceguard::cache::VersionedCache;
/// use raceguard::keys::ScopeId;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let cache: VersionedCache<u64> = VersionedCache::new(1_000);
/// let chat = ScopeId::new("chat-7")?;
/// let ttl = Duration::from_secs(30);
/// let n = cache.get_or_load(&chat, "count", ttl, || async { Ok::<_, std::io::Error>(1) }).await?;
/// assert_eq!(n, 1);
/// let n = cache.get_or_load(&chat, "count", ttl, || async { Ok::<_, std::io::Error>(2) }).await?;
/// assert_eq!(n, 1); // cached
/// cache.invalidate(&chat);
/// let n = cache.get_or_load(&chat, "count", ttl, || async { Ok::<_, std::io::Error>(3) }).await?;
/// assert_eq!(n, 3); // reloaded
/// # Ok::<(), raceguard::Error>(())
/// # }).unwrap();
/// ```
pub struct VersionedCache<V> {
    inner: StdArc<Inner<V>>,
}

struct Inner<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    shard_capacity: usize,
    next_version: AtomicU64,
    clock: StdArc<dyn Clock>,
    flights: SingleFlight<FlightKey, V, LoadFailed>,
    counters: Counters,
    hasher: foldhash::fast::FixedState,
    name: Option<Box<str>>,
}

struct Shard<V> {
    scopes: HashMap<Box<str>, ScopeState<V>>,
    /// Values stored in this shard (all scopes).
    len: usize,
}

struct ScopeState<V> {
    version: u64,
    values: HashMap<Box<str>, Entry<V>>,
}

struct Entry<V> {
    version: u64,
    expires_at: u64,
    value: V,
}

/// What a lookup found: the scope's current version, and the value if one
/// is current.
pub(crate) struct Lookup<V> {
    pub(crate) version: u64,
    pub(crate) value: Option<V>,
}

impl<V> Clone for VersionedCache<V> {
    fn clone(&self) -> Self {
        VersionedCache {
            inner: StdArc::clone(&self.inner),
        }
    }
}

impl<V> fmt::Debug for VersionedCache<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VersionedCache")
            .field("name", &self.inner.name)
            .field("capacity", &(self.inner.shard_capacity * SHARDS))
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl<V> VersionedCache<V> {
    /// The counters: hits, misses, loads, invalidations.
    ///
    /// ```
    /// use raceguard::cache::VersionedCache;
    /// let cache: VersionedCache<u8> = VersionedCache::new(100);
    /// assert_eq!(cache.stats().misses, 0);
    /// ```
    pub fn stats(&self) -> CacheStats {
        self.inner.counters.snapshot()
    }

    /// The name given with [`named`](Self::named), if any.
    ///
    /// ```
    /// use raceguard::cache::VersionedCache;
    /// let cache: VersionedCache<u8> = VersionedCache::new(100);
    /// assert_eq!(cache.name(), None);
    /// ```
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }
}

impl<V: Clone> VersionedCache<V> {
    /// A cache holding about `capacity` values (at least 16), on the system
    /// clock.
    ///
    /// ```
    /// use raceguard::cache::VersionedCache;
    /// let cache: VersionedCache<String> = VersionedCache::new(100_000);
    /// assert_eq!(cache.stats().hits, 0);
    /// ```
    pub fn new(capacity: usize) -> Self {
        Self::with_clock(capacity, SystemClock::new())
    }

    /// A cache on `clock` (TTLs are measured on it), for tests with a
    /// [`ManualClock`](crate::ManualClock).
    ///
    /// ```
    /// use raceguard::{ManualClock, cache::VersionedCache};
    /// let cache: VersionedCache<u8> = VersionedCache::with_clock(64, ManualClock::new());
    /// # let _ = cache;
    /// ```
    pub fn with_clock(capacity: usize, clock: impl Clock) -> Self {
        let shard_capacity = capacity.div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    scopes: HashMap::new(),
                    len: 0,
                })
            })
            .collect();
        VersionedCache {
            inner: StdArc::new(Inner {
                shards,
                shard_capacity,
                next_version: AtomicU64::new(1),
                clock: StdArc::new(clock),
                flights: SingleFlight::new(),
                counters: Counters::new(None),
                hasher: foldhash::fast::FixedState::with_seed(0x5eed_cace),
                name: None,
            }),
        }
    }

    /// Names the cache: the `cache` label of its metrics (feature
    /// `metrics`; `"unnamed"` otherwise) and [`name`](Self::name). Call it
    /// where the cache is built, before cloning it and before the first
    /// lookup: the counters start again from zero, and on a cache already
    /// shared with clones the call changes nothing (and logs a warning).
    ///
    /// ```
    /// use raceguard::cache::VersionedCache;
    /// let cache: VersionedCache<String> = VersionedCache::new(1_000).named("chat-history");
    /// assert_eq!(cache.name(), Some("chat-history"));
    /// ```
    #[must_use]
    pub fn named(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        match StdArc::get_mut(&mut self.inner) {
            Some(inner) => {
                inner.counters = Counters::new(Some(&name));
                inner.name = Some(name.into_boxed_str());
            }
            None => tracing::warn!(
                name = %name,
                "VersionedCache::named on a cache already shared with clones: name not applied"
            ),
        }
        self
    }

    /// Returns the current value of `item` in `scope`, or loads it.
    ///
    /// On a miss, `load` runs once for every concurrent caller that missed
    /// on the same `(scope, version, item)`; they all get its result. The
    /// result is stored with `ttl` under the version read before loading,
    /// and only if that version is still current: a load that raced an
    /// [`invalidate`](Self::invalidate) is returned to its callers (who
    /// started before the invalidation returned) but never cached.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidInput`] if `ttl` is below 1 ms.
    /// - [`Error::InitFailed`]: the loader failed (the error is shared by
    ///   every caller of the load; nothing is cached).
    /// - [`Error::Panicked`]: the loader panicked (caught).
    /// - [`Error::Reentrant`]: the loader awaited a load of its own key.
    ///
    /// # Cancellation
    ///
    /// Dropping a waiting call only removes it from the load. Dropping the
    /// call that runs the loader drops the loader's future; one of the
    /// waiters (if any) runs its own loader instead.
    ///
    /// ```
    /// use std::time::Duration;
    /// use raceguard::{cache::VersionedCache, keys::UserId};
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let cache: VersionedCache<String> = VersionedCache::new(100);
    /// let alice = UserId::new("alice")?;
    /// let name = cache
    ///     .get_or_load(&alice, "profile", Duration::from_secs(60), || async {
    ///         Ok::<_, std::io::Error>("Alice".to_string())
    ///     })
    ///     .await?;
    /// assert_eq!(name, "Alice");
    /// # Ok::<(), raceguard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn get_or_load<O, F, Fut, E>(
        &self,
        scope: &O,
        item: &str,
        ttl: Duration,
        load: F,
    ) -> Result<V>
    where
        O: Owner + ?Sized,
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<V, E>>,
        E: Into<BoxError>,
    {
        let ttl = ttl_nanos(ttl)?;
        let scope = scope.owner_id();
        let found = self.lookup(scope, item);
        if let Some(value) = found.value {
            self.inner.counters.hit();
            return Ok(value);
        }
        self.inner.counters.miss();
        let key = FlightKey {
            scope: scope.into(),
            version: found.version,
            item: item.into(),
        };
        let version = found.version;
        self.inner
            .flights
            .run(key, || async move {
                // A caller that missed just before the previous load of this
                // version stored its value starts a new flight: check again,
                // so each (scope, version, item) is loaded once while cached.
                let again = self.lookup(scope, item);
                if let (true, Some(value)) = (again.version == version, again.value) {
                    return Ok(value);
                }
                self.inner.counters.load();
                let value = load().await.map_err(|e| LoadFailed(e.into()))?;
                self.store(scope, item, version, value.clone(), ttl);
                Ok(value)
            })
            .await
            .map_err(Error::from)
    }

    /// Moves `scope` to a fresh version: every value cached for it before
    /// (or loaded concurrently with) this call is never returned again.
    /// O(1); no other scope is touched. Returns the new version.
    ///
    /// ```
    /// use raceguard::{cache::VersionedCache, keys::UserId};
    /// let cache: VersionedCache<u8> = VersionedCache::new(100);
    /// let alice = UserId::new("alice")?;
    /// let v1 = cache.invalidate(&alice);
    /// let v2 = cache.invalidate(&alice);
    /// assert!(v2 > v1);
    /// assert_eq!(cache.stats().invalidations, 2);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn invalidate<O: Owner + ?Sized>(&self, scope: &O) -> u64 {
        let version = self.invalidate_id(scope.owner_id());
        self.inner.counters.invalidation();
        version
    }

    fn shard(&self, scope: &str) -> &Mutex<Shard<V>> {
        use std::hash::BuildHasher;
        let h = self.inner.hasher.hash_one(scope);
        #[allow(clippy::cast_possible_truncation)]
        &self.inner.shards[(h as usize) % SHARDS]
    }

    fn fresh_version(&self) -> u64 {
        self.inner.next_version.fetch_add(1, Ordering::Relaxed)
    }

    /// The scope's current version (created if new) and the value of `item`
    /// if one is current. Counts nothing.
    pub(crate) fn lookup(&self, scope: &str, item: &str) -> Lookup<V> {
        let now = self.inner.clock.now_nanos();
        let mut shard = self.shard(scope).lock();
        if let Some(state) = shard.scopes.get(scope) {
            let value = state
                .values
                .get(item)
                .filter(|e| e.version == state.version && e.expires_at > now)
                .map(|e| e.value.clone());
            return Lookup {
                version: state.version,
                value,
            };
        }
        let cap = self.inner.shard_capacity;
        if shard.scopes.len() >= 2 * cap {
            // Scopes without values (loads that failed, or never stored)
            // are dropped here, so the scope map stays bounded too.
            shard.make_room(cap, now, scope);
        }
        let version = self.fresh_version();
        shard.scopes.insert(
            scope.into(),
            ScopeState {
                version,
                values: HashMap::new(),
            },
        );
        Lookup {
            version,
            value: None,
        }
    }

    /// Stores `value` if `version` is still the scope's current version.
    /// Returns whether it was stored.
    pub(crate) fn store(&self, scope: &str, item: &str, version: u64, value: V, ttl: u64) -> bool {
        let now = self.inner.clock.now_nanos();
        let expires_at = now.saturating_add(ttl);
        let cap = self.inner.shard_capacity;
        let mut guard = self.shard(scope).lock();
        let shard = &mut *guard;
        if shard.scopes.get(scope).is_none_or(|s| s.version != version) {
            return false;
        }
        let replaces = shard.scopes[scope].values.contains_key(item);
        if !replaces && shard.len >= cap {
            shard.make_room(cap, now, scope);
            // `make_room` never removes this scope's state.
        }
        let Some(state) = shard.scopes.get_mut(scope) else {
            return false;
        };
        let entry = Entry {
            version,
            expires_at,
            value,
        };
        if state.values.insert(item.into(), entry).is_none() {
            shard.len += 1;
        }
        true
    }

    /// Bumps `scope`'s version; a scope with no state has no values, and
    /// gets a fresh version when it is next used.
    pub(crate) fn invalidate_id(&self, scope: &str) -> u64 {
        let mut shard = self.shard(scope).lock();
        let version = self.fresh_version();
        if let Some(state) = shard.scopes.get_mut(scope) {
            state.version = version;
        }
        version
    }
}

impl<V> Shard<V> {
    /// Frees room for one value: drops expired and stale values (and empty
    /// scopes other than `keep`), then arbitrary values down to 3/4 of `cap`.
    fn make_room(&mut self, cap: usize, now: u64, keep: &str) {
        let mut len = 0;
        self.scopes.retain(|scope, state| {
            let current = state.version;
            state
                .values
                .retain(|_, e| e.version == current && e.expires_at > now);
            len += state.values.len();
            !state.values.is_empty() || &**scope == keep
        });
        self.len = len;
        let target = (cap - cap / 4).min(cap.saturating_sub(1));
        if self.len < cap {
            return;
        }
        for state in self.scopes.values_mut() {
            while self.len > target {
                let Some(k) = state.values.keys().next().cloned() else {
                    break;
                };
                state.values.remove(&k);
                self.len -= 1;
            }
        }
    }
}
