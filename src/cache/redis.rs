//! The versioned cache on Redis.
//!
//! Keys, for a cache named `n` and a scope `s`: the version at `n:{s}:version`,
//! values at `n:{s}:v<version>:<item>`. The hash tag is the scope, so a
//! scope's version and values share one Redis Cluster slot.
//!
//! - read (`read.lua`): `GET` the version, `GET` the value under it, one
//!   round trip;
//! - store: `SET value PX ttl` under the version read before loading (a load
//!   that raced an invalidation lands under a dead version, where nobody
//!   reads it, and expires);
//! - invalidate (`invalidate.lua`): `INCR` of the version key. O(1).
//!
//! No `KEYS`, no `SCAN`: old versions' values simply expire.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::time::Duration;

use ::redis::Script;

use super::{CacheStats, Codec, Counters, FlightKey, JsonCodec, LoadFailed, ttl_nanos};
use crate::keys::{Key, Owner};
use crate::once::SingleFlight;
use crate::redis::RedisBackend;
use crate::sync::StdArc;
use crate::{BoxError, Error, Result};

/// A versioned cache on Redis, shared by every process.
///
/// Same semantics as [`VersionedCache`](super::VersionedCache): values are
/// stored under the version of their scope read before loading and read
/// only under the current version; [`invalidate`](Self::invalidate) is one
/// `INCR` and touches no other scope. A hit is one round trip. Concurrent
/// misses of one key coalesce within a process (one load per process and
/// version; processes do not coordinate their loads).
///
/// Values go through a [`Codec`] ([`JsonCodec`] by default); an entry that
/// fails to decode counts as a miss and is reloaded.
///
/// Cloning is cheap and shares the cache (and its counters).
///
/// ```no_run
/// use std::time::Duration;
/// use raceguard::cache::RedisVersionedCache;
/// use raceguard::keys::UserId;
/// use raceguard::redis::{RedisBackend, RedisConfig};
///
/// # async fn demo() -> raceguard::Result<()> {
/// let backend = RedisBackend::connect("redis://127.0.0.1/", RedisConfig::default()).await?;
/// let cache: RedisVersionedCache<Vec<String>> = RedisVersionedCache::new(backend, "chat")?;
/// let alice = UserId::new("alice")?;
/// let ttl = Duration::from_secs(300);
/// let history = cache
///     .get_or_load(&alice, "history:50:0", ttl, || async {
///         Ok::<_, std::io::Error>(vec!["hello".to_string()])
///     })
///     .await?;
/// cache.invalidate(&alice).await?; // alice's next read reloads; bob's entries are untouched
/// # let _ = history;
/// # Ok(()) }
/// ```
pub struct RedisVersionedCache<V, C = JsonCodec> {
    inner: StdArc<Inner<V, C>>,
}

struct Inner<V, C> {
    backend: RedisBackend,
    name: String,
    codec: C,
    read: Script,
    invalidate: Script,
    flights: SingleFlight<FlightKey, V, LoadFailed>,
    counters: Counters,
    _values: PhantomData<fn() -> V>,
}

/// A scope's keys.
struct ScopeKeys {
    version: Key,
    /// The value key up to and including `:v`.
    prefix: String,
    /// The value key after the version.
    suffix: String,
}

impl<V, C> Clone for RedisVersionedCache<V, C> {
    fn clone(&self) -> Self {
        RedisVersionedCache {
            inner: StdArc::clone(&self.inner),
        }
    }
}

impl<V, C> fmt::Debug for RedisVersionedCache<V, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisVersionedCache")
            .field("name", &self.inner.name)
            .field("stats", &self.inner.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl<V> RedisVersionedCache<V, JsonCodec>
where
    V: Clone + serde::Serialize + serde::de::DeserializeOwned,
{
    /// A cache named `name` (the key prefix) on `backend`, with JSON values.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if `name` is not a valid key namespace.
    ///
    /// ```no_run
    /// # async fn demo(backend: raceguard::redis::RedisBackend) -> raceguard::Result<()> {
    /// let cache: raceguard::cache::RedisVersionedCache<u64> =
    ///     raceguard::cache::RedisVersionedCache::new(backend, "counts")?;
    /// # let _ = cache; Ok(()) }
    /// ```
    pub fn new(backend: RedisBackend, name: &str) -> Result<Self> {
        Self::with_codec(backend, name, JsonCodec)
    }
}

impl<V, C> RedisVersionedCache<V, C>
where
    V: Clone,
    C: Codec<V>,
{
    /// A cache named `name` on `backend`, with values through `codec`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if `name` is not a valid key namespace.
    ///
    /// ```no_run
    /// # async fn demo(backend: raceguard::redis::RedisBackend) -> raceguard::Result<()> {
    /// use raceguard::cache::{JsonCodec, RedisVersionedCache};
    /// let cache: RedisVersionedCache<String> = RedisVersionedCache::with_codec(backend, "names", JsonCodec)?;
    /// # let _ = cache; Ok(()) }
    /// ```
    pub fn with_codec(backend: RedisBackend, name: &str, codec: C) -> Result<Self> {
        drop(Key::builder(name)?);
        Ok(RedisVersionedCache {
            inner: StdArc::new(Inner {
                backend,
                name: name.to_owned(),
                codec,
                read: Script::new(include_str!("read.lua")),
                invalidate: Script::new(include_str!("invalidate.lua")),
                flights: SingleFlight::new(),
                counters: Counters::new(Some(name)),
                _values: PhantomData,
            }),
        })
    }

    /// The scope's version key; with `item`, also the value key's prefix
    /// (`n:{s}:v`) and suffix (`:<escaped item>`), between which the
    /// version goes.
    fn scope_keys(&self, scope: &(impl Owner + ?Sized), item: Option<&str>) -> Result<ScopeKeys> {
        let version = Key::builder(&self.inner.name)?
            .owner(&scope)
            .part("version")
            .build()?;
        let (prefix, suffix) = match item {
            None => (String::new(), String::new()),
            Some(item) => {
                let prefix = Key::builder(&self.inner.name)?
                    .owner(&scope)
                    .part("v")
                    .build()?
                    .into_string();
                let full = Key::builder(&self.inner.name)?
                    .owner(&scope)
                    .part("v")
                    .part(item)
                    .build()?
                    .into_string();
                let suffix = full[prefix.len()..].to_owned();
                (prefix, suffix)
            }
        };
        Ok(ScopeKeys {
            version,
            prefix,
            suffix,
        })
    }

    /// Returns the current value of `item` in `scope`, or loads it: the
    /// same contract as
    /// [`VersionedCache::get_or_load`](super::VersionedCache::get_or_load).
    /// A hit is one round trip; a miss adds one `SET` after the load.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidInput`] if `ttl` is below 1 ms.
    /// - [`Error::Backend`] / [`Error::Timeout`]: the read failed. (A
    ///   loaded value that cannot be encoded or stored is returned anyway,
    ///   uncached, with a `tracing` warning.)
    /// - [`Error::InitFailed`], [`Error::Panicked`], [`Error::Reentrant`]:
    ///   the loader failed, panicked, or awaited its own key.
    ///
    /// # Cancellation
    ///
    /// Dropping a waiting call only removes it from the load. Dropping the
    /// call that runs the loader drops the loader (and possibly an
    /// unanswered `SET`, which may still run); a waiter takes over.
    ///
    /// ```no_run
    /// # async fn demo(cache: raceguard::cache::RedisVersionedCache<String>) -> raceguard::Result<()> {
    /// let alice = raceguard::keys::UserId::new("alice")?;
    /// let name = cache
    ///     .get_or_load(&alice, "profile", std::time::Duration::from_secs(60), || async {
    ///         Ok::<_, std::io::Error>("Alice".to_string())
    ///     })
    ///     .await?;
    /// # let _ = name; Ok(()) }
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
        let ttl_ms = ttl_nanos(ttl)?.div_ceil(1_000_000);
        let keys = self.scope_keys(scope, Some(item))?;
        let (version, value) = self.read(&keys).await?;
        if let Some(value) = value {
            self.inner.counters.hit();
            return Ok(value);
        }
        self.inner.counters.miss();
        let value_key = format!("{}{version}{}", keys.prefix, keys.suffix);
        let flight = FlightKey {
            scope: scope.owner_id().into(),
            version,
            item: item.into(),
        };
        let stored = self
            .inner
            .flights
            .run(flight, || async move {
                // A caller that missed just before the previous load of this
                // version stored its value starts a new flight: read again,
                // so each (scope, version, item) is loaded once per process
                // while cached.
                // (A failed re-read just loads.)
                if let Ok((v, Some(value))) = self.read(&keys).await
                    && v == version
                {
                    return Ok(value);
                }
                self.inner.counters.load();
                let value = load().await.map_err(|e| LoadFailed(e.into()))?;
                // A value that cannot be encoded or stored is still
                // returned: only caching it failed.
                match self.inner.codec.encode(&value) {
                    Ok(bytes) => {
                        let mut set = ::redis::cmd("SET");
                        set.arg(&value_key).arg(bytes).arg("PX").arg(ttl_ms);
                        if let Err(e) = self.inner.backend.query::<()>(&set).await {
                            tracing::warn!(error = %e, "raceguard cache: could not store a loaded value");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "raceguard cache: could not encode a loaded value");
                    }
                }
                Ok(value)
            })
            .await;
        stored.map_err(Error::from)
    }

    /// One read round trip: the current version and the value under it.
    async fn read(&self, keys: &ScopeKeys) -> Result<(u64, Option<V>)> {
        let mut inv = self.inner.read.key(&keys.version);
        inv.arg(&keys.prefix).arg(&keys.suffix);
        let (version, bytes): (u64, Option<Vec<u8>>) = self.inner.backend.invoke(&inv).await?;
        let value = bytes.and_then(|bytes| match self.inner.codec.decode(&bytes) {
            Ok(value) => Some(value),
            Err(e) => {
                tracing::warn!(error = %e, "raceguard cache: undecodable entry, reloading");
                None
            }
        });
        Ok((version, value))
    }

    /// Moves `scope` to a fresh version (one `INCR`): every value cached for
    /// it before (or loaded concurrently with) this call is never returned
    /// again. Touches no other scope. Returns the new version.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] / [`Error::Timeout`]: Redis failed (after a
    /// timeout the increment may or may not have happened).
    ///
    /// # Cancellation
    ///
    /// Dropping the future abandons the reply; the increment may still run.
    ///
    /// ```no_run
    /// # async fn demo(cache: raceguard::cache::RedisVersionedCache<String>) -> raceguard::Result<()> {
    /// let alice = raceguard::keys::UserId::new("alice")?;
    /// let version = cache.invalidate(&alice).await?;
    /// # let _ = version; Ok(()) }
    /// ```
    pub async fn invalidate<O: Owner + ?Sized>(&self, scope: &O) -> Result<u64> {
        let keys = self.scope_keys(scope, None)?;
        let inv = self.inner.invalidate.key(&keys.version);
        let version: u64 = self.inner.backend.invoke(&inv).await?;
        self.inner.counters.invalidation();
        Ok(version)
    }

    /// The counters of this process's handle (shared by its clones): hits,
    /// misses, loads, invalidations.
    ///
    /// ```no_run
    /// # fn demo(cache: raceguard::cache::RedisVersionedCache<String>) {
    /// let hit_rate = cache.stats().hit_rate();
    /// # let _ = hit_rate; }
    /// ```
    pub fn stats(&self) -> CacheStats {
        self.inner.counters.snapshot()
    }
}
