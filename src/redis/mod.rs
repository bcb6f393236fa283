//! Redis connection handling shared by every Redis backend (feature `redis`).
//!
//! One [`RedisBackend`] per process: it owns **one multiplexed connection**
//! (a [`ConnectionManager`] on a single node, which reconnects after a server
//! restart; or a cluster connection with feature `cluster`) that every request
//! clones, so a burst of requests never opens a burst of connections (race
//! R05). Blocking commands, which would stall the multiplexed pipeline, take a
//! **dedicated** connection from a bounded pool with an acquire timeout.
//!
//! Nothing waits forever: connecting has a connect timeout, every call a
//! response timeout, every pool checkout an acquire timeout; each becomes a
//! typed [`Error`].
//!
//! Failures are never silently replayed: raceguard does not retry a call
//! itself, and a call that timed out after it was sent is reported as
//! [`Error::Timeout`] (the command may or may not have run). Callers that
//! run non-idempotent scripts decide what a retry means.
//!
//! ```no_run
//! # async fn demo() -> Result<(), raceguard::Error> {
//! use raceguard::redis::{RedisBackend, RedisConfig};
//!
//! let redis = RedisBackend::connect("redis://127.0.0.1:6379/", RedisConfig::default()).await?;
//! let pong: String = redis.query(&::redis::cmd("PING")).await?;
//! assert_eq!(pong, "PONG");
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::{Cmd, FromRedisValue, RedisError, RedisFuture, Script, Value};

use crate::Error;

mod pool;
mod rate;

pub use pool::DedicatedConnection;
pub use rate::{
    FailurePolicy, KeyLayout, RedisKeyedRateLimiter, RedisMultiLimit, RedisRateLimiter,
};

/// Timeouts and bounds of a [`RedisBackend`].
///
/// ```
/// use std::time::Duration;
/// use raceguard::redis::RedisConfig;
///
/// let config = RedisConfig::default()
///     .response_timeout(Duration::from_millis(250))
///     .dedicated_pool_size(4);
/// assert_eq!(config.get_dedicated_pool_size(), 4);
/// ```
#[derive(Debug, Clone)]
pub struct RedisConfig {
    connect_timeout: Duration,
    response_timeout: Duration,
    dedicated_pool_size: usize,
    acquire_timeout: Duration,
}

impl Default for RedisConfig {
    /// Connect timeout 1 s, response timeout 1 s, 8 dedicated connections,
    /// acquire timeout 1 s.
    fn default() -> Self {
        RedisConfig {
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            dedicated_pool_size: 8,
            acquire_timeout: Duration::from_secs(1),
        }
    }
}

impl RedisConfig {
    /// How long one connection attempt may take.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// How long one call on the shared connection may wait for its reply.
    pub fn response_timeout(mut self, t: Duration) -> Self {
        self.response_timeout = t;
        self
    }

    /// The most dedicated connections (for blocking commands) open at once.
    pub fn dedicated_pool_size(mut self, n: usize) -> Self {
        self.dedicated_pool_size = n;
        self
    }

    /// How long a checkout from the dedicated pool may wait for a free slot.
    pub fn acquire_timeout(mut self, t: Duration) -> Self {
        self.acquire_timeout = t;
        self
    }

    /// The configured connect timeout.
    pub fn get_connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The configured response timeout.
    pub fn get_response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// The configured dedicated pool size.
    pub fn get_dedicated_pool_size(&self) -> usize {
        self.dedicated_pool_size
    }

    /// The configured acquire timeout.
    pub fn get_acquire_timeout(&self) -> Duration {
        self.acquire_timeout
    }

    fn validate(&self) -> Result<(), Error> {
        for (what, t) in [
            ("redis.connect_timeout", self.connect_timeout),
            ("redis.response_timeout", self.response_timeout),
            ("redis.acquire_timeout", self.acquire_timeout),
        ] {
            if t.is_zero() {
                return Err(Error::invalid(what, "must be greater than zero"));
            }
        }
        if self.dedicated_pool_size == 0 {
            return Err(Error::invalid(
                "redis.dedicated_pool_size",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// A multiplexed Redis connection (single node or cluster), usable with any
/// redis-rs async command. Cloning is cheap and shares the connection.
///
/// ```no_run
/// # async fn demo(redis: raceguard::redis::RedisBackend) -> redis::RedisResult<()> {
/// let mut conn = redis.connection();
/// let n: i64 = redis::cmd("INCR").arg("visits").query_async(&mut conn).await?;
/// # let _ = n; Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisConnection(Shared);

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnection").finish_non_exhaustive()
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.0.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

#[derive(Clone)]
pub(crate) enum Shared {
    Single(ConnectionManager),
    #[cfg(feature = "cluster")]
    Cluster(::redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Shared {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Shared::Single(c) => c.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Shared::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Shared::Single(c) => c.req_packed_commands(cmd, offset, count),
            #[cfg(feature = "cluster")]
            Shared::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Shared::Single(c) => c.get_db(),
            #[cfg(feature = "cluster")]
            Shared::Cluster(c) => c.get_db(),
        }
    }
}

// A `redis::Client` grows past the lint's threshold when a dev-dependency
// (rslock, in `benches/lock.rs`) turns on redis-rs's TLS features; there is
// one `Source` per backend, so the size does not matter.
#[allow(clippy::large_enum_variant)]
enum Source {
    Single(::redis::Client),
    #[cfg(feature = "cluster")]
    Cluster(Box<::redis::cluster::ClusterClient>),
}

struct Inner {
    shared: Shared,
    source: Source,
    config: RedisConfig,
    pool: pool::Pool,
}

/// A process-wide handle to Redis: one shared multiplexed connection plus a
/// bounded pool of dedicated connections. Cheap to clone; clone it into every
/// request and every raceguard Redis backend.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field(
                "mode",
                &match self.inner.source {
                    Source::Single(_) => "single",
                    #[cfg(feature = "cluster")]
                    Source::Cluster(_) => "cluster",
                },
            )
            .field("config", &self.inner.config)
            .finish()
    }
}

impl RedisBackend {
    /// Whether `other` is a clone of this backend (one shared connection).
    #[cfg_attr(not(feature = "tower"), allow(dead_code))]
    pub(crate) fn same_as(&self, other: &RedisBackend) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Connects to one Redis server.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for a malformed URL or configuration;
    /// [`Error::Timeout`] when the server does not answer within the connect
    /// timeout; [`Error::Backend`] when it refuses (wrong password, not
    /// Redis).
    ///
    /// Cancellation: dropping the future abandons the connection attempt.
    pub async fn connect(url: &str, config: RedisConfig) -> Result<Self, Error> {
        config.validate()?;
        let client =
            ::redis::Client::open(url).map_err(|e| Error::invalid("redis.url", e.to_string()))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            // One attempt per reconnect: a call made while the server is down
            // waits at most one connect timeout for the reconnect, then its
            // reply at most one response timeout. Every call is therefore
            // bounded by the connection's own deadlines, without a second
            // timer per call; the next call triggers the next reconnect.
            .set_number_of_retries(0)
            .set_max_delay(config.connect_timeout);
        // Bound the first connection as a whole too.
        let deadline = config.connect_timeout.saturating_mul(4);
        let manager = tokio::time::timeout(
            deadline,
            ConnectionManager::new_with_config(client.clone(), manager_config),
        )
        .await
        .map_err(|_| Error::Timeout {
            op: "redis connect",
            after: deadline,
        })?
        .map_err(|e| map_redis_error(e, "redis connect", config.connect_timeout))?;
        Ok(Self::assemble(
            Shared::Single(manager),
            Source::Single(client),
            config,
        ))
    }

    /// Wraps an existing [`ConnectionManager`] (for applications that already
    /// have one); `client` opens dedicated connections.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] for an invalid configuration.
    pub fn from_manager(
        manager: ConnectionManager,
        client: ::redis::Client,
        config: RedisConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self::assemble(
            Shared::Single(manager),
            Source::Single(client),
            config,
        ))
    }

    /// Connects to a Redis Cluster through any of its nodes.
    ///
    /// Multi-key operations in raceguard keep their keys in one hash slot
    /// (see [`crate::keys`]), so every raceguard script works on a cluster.
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect).
    #[cfg(feature = "cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cluster")))]
    pub async fn connect_cluster(
        urls: &[impl AsRef<str>],
        config: RedisConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        if urls.is_empty() {
            return Err(Error::invalid("redis.urls", "at least one node is needed"));
        }
        let client =
            ::redis::cluster::ClusterClientBuilder::new(urls.iter().map(|u| u.as_ref().to_owned()))
                .connection_timeout(config.connect_timeout)
                .response_timeout(config.response_timeout)
                .build()
                .map_err(|e| Error::invalid("redis.urls", e.to_string()))?;
        let deadline = config.connect_timeout.saturating_mul(4);
        let conn = tokio::time::timeout(deadline, client.get_async_connection())
            .await
            .map_err(|_| Error::Timeout {
                op: "redis cluster connect",
                after: deadline,
            })?
            .map_err(|e| map_redis_error(e, "redis cluster connect", config.connect_timeout))?;
        Ok(Self::assemble(
            Shared::Cluster(conn),
            Source::Cluster(Box::new(client)),
            config,
        ))
    }

    fn assemble(shared: Shared, source: Source, config: RedisConfig) -> Self {
        let pool = pool::Pool::new(config.dedicated_pool_size);
        RedisBackend {
            inner: Arc::new(Inner {
                shared,
                source,
                config,
                pool,
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// Whether this backend talks to a cluster.
    pub fn is_cluster(&self) -> bool {
        !matches!(self.inner.source, Source::Single(_))
    }

    /// A handle to the shared multiplexed connection (a cheap clone, not a
    /// new connection), for commands raceguard does not wrap. Calls through
    /// it are not bounded by raceguard's response timeout unless the
    /// connection's own (set from the same config) applies.
    pub fn connection(&self) -> RedisConnection {
        RedisConnection(self.inner.shared.clone())
    }

    fn shared(&self) -> RedisConnection {
        self.connection()
    }

    /// Runs one command on the shared connection within the response
    /// timeout.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when no reply came in time (the command may have
    /// run); [`Error::Backend`] for connection and server errors, with
    /// `retryable` set when a retry can help.
    ///
    /// Cancellation: dropping the future abandons the reply; the command may
    /// still run on the server.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, Error> {
        let mut conn = self.shared();
        let timeout = self.inner.config.response_timeout;
        // Bounded by the connection's own deadlines (see `connect`): no
        // second timer per call on the hot path.
        cmd.query_async::<T>(&mut conn)
            .await
            .map_err(|e| map_redis_error(e, "redis call", timeout))
    }

    /// Runs a Lua script (EVALSHA, falling back to EVAL on NOSCRIPT) on the
    /// shared connection within the response timeout. Never replays it after
    /// an indeterminate failure.
    ///
    /// # Errors
    ///
    /// As [`query`](Self::query).
    pub async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &::redis::ScriptInvocation<'_>,
    ) -> Result<T, Error> {
        let mut conn = self.shared();
        let timeout = self.inner.config.response_timeout;
        invocation
            .invoke_async::<T>(&mut conn)
            .await
            .map_err(|e| map_redis_error(e, "redis script", timeout))
    }

    /// Loads `script` on the server ahead of use (optional: [`invoke`]
    /// falls back to EVAL on NOSCRIPT by itself).
    ///
    /// [`invoke`]: Self::invoke
    ///
    /// # Errors
    ///
    /// As [`query`](Self::query).
    pub async fn load_script(&self, script: &Script) -> Result<(), Error> {
        let mut conn = self.shared();
        let timeout = self.inner.config.response_timeout;
        script
            .load_async(&mut conn)
            .await
            .map(drop)
            .map_err(|e| map_redis_error(e, "redis script load", timeout))
    }

    /// Checks out a dedicated connection for blocking commands (`BLPOP`,
    /// `XREADGROUP BLOCK` ...). At most `dedicated_pool_size` exist at once.
    ///
    /// # Errors
    ///
    /// [`Error::CapacityExceeded`] (`redis dedicated pool`) when every
    /// dedicated connection stays checked out for the whole acquire timeout;
    /// connection errors as in [`connect`](Self::connect).
    ///
    /// Cancellation: dropping the future gives up the waiting place; nothing
    /// is leaked.
    pub async fn dedicated(&self) -> Result<DedicatedConnection, Error> {
        let permit = self
            .inner
            .pool
            .acquire(self.inner.config.acquire_timeout)
            .await?;
        if let Some(conn) = self.inner.pool.take_idle() {
            return Ok(DedicatedConnection::new(
                conn,
                permit,
                self.inner.pool.clone_handle(),
            ));
        }
        let conn = self.open_dedicated().await?;
        Ok(DedicatedConnection::new(
            conn,
            permit,
            self.inner.pool.clone_handle(),
        ))
    }

    async fn open_dedicated(&self) -> Result<RedisConnection, Error> {
        let timeout = self.inner.config.connect_timeout;
        match &self.inner.source {
            Source::Single(client) => {
                // No response timeout: blocking commands wait as long as the
                // caller's own deadline says.
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(None)
                    .set_number_of_retries(1);
                tokio::time::timeout(
                    timeout.saturating_mul(2),
                    ConnectionManager::new_with_config(client.clone(), cfg),
                )
                .await
                .map_err(|_| Error::Timeout {
                    op: "redis connect",
                    after: timeout,
                })?
                .map(|c| RedisConnection(Shared::Single(c)))
                .map_err(|e| map_redis_error(e, "redis connect", timeout))
            }
            #[cfg(feature = "cluster")]
            Source::Cluster(client) => {
                tokio::time::timeout(timeout.saturating_mul(2), client.get_async_connection())
                    .await
                    .map_err(|_| Error::Timeout {
                        op: "redis cluster connect",
                        after: timeout,
                    })?
                    .map(|c| RedisConnection(Shared::Cluster(c)))
                    .map_err(|e| map_redis_error(e, "redis cluster connect", timeout))
            }
        }
    }
}

/// Maps a redis-rs error to raceguard's error, deciding retryability.
pub(crate) fn map_redis_error(e: RedisError, op: &'static str, timeout: Duration) -> Error {
    use ::redis::RetryMethod;
    if e.is_timeout() {
        return Error::Timeout { op, after: timeout };
    }
    // Configuration and protocol mistakes do not fix themselves, whatever
    // redis-rs's reconnect heuristics say.
    let permanent = matches!(
        e.kind(),
        ::redis::ErrorKind::AuthenticationFailed
            | ::redis::ErrorKind::InvalidClientConfig
            | ::redis::ErrorKind::Client
            | ::redis::ErrorKind::Parse
            | ::redis::ErrorKind::UnexpectedReturnType
    ) || matches!(
        e.kind(),
        ::redis::ErrorKind::Server(
            ::redis::ServerErrorKind::NoPerm | ::redis::ServerErrorKind::ResponseError
        )
    ) || e
        .code()
        .is_some_and(|c| matches!(c, "NOAUTH" | "WRONGPASS" | "NOPERM" | "WRONGTYPE"));
    if permanent {
        return Error::backend("redis", false, e);
    }
    let retryable = e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_io_error()
        || matches!(
            e.retry_method(),
            RetryMethod::Reconnect
                | RetryMethod::RetryImmediately
                | RetryMethod::WaitAndRetry
                | RetryMethod::MovedRedirect
                | RetryMethod::AskRedirect
                | RetryMethod::ReconnectFromInitialConnections
                | RetryMethod::RefreshSlotsAndRetry
        );
    Error::backend("redis", retryable, e)
}
