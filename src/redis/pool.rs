//! The bounded pool of dedicated connections.
//!
//! Invariants:
//! - at most `size` dedicated connections are checked out or being opened at
//!   once (a semaphore permit is held for each);
//! - an idle connection is only ever handed to the holder of a permit;
//! - a connection whose state is unknown (the caller gave up mid-command) is
//!   discarded, never returned to the idle list.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::RedisConnection;
use crate::Error;

pub(crate) struct Pool {
    permits: Arc<Semaphore>,
    idle: Arc<std::sync::Mutex<Vec<RedisConnection>>>,
    size: usize,
}

pub(crate) struct PoolHandle {
    idle: Arc<std::sync::Mutex<Vec<RedisConnection>>>,
}

impl Pool {
    pub(crate) fn new(size: usize) -> Self {
        Pool {
            permits: Arc::new(Semaphore::new(size)),
            idle: Arc::new(std::sync::Mutex::new(Vec::with_capacity(size))),
            size,
        }
    }

    pub(crate) async fn acquire(&self, timeout: Duration) -> Result<OwnedSemaphorePermit, Error> {
        match tokio::time::timeout(timeout, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(Error::Closed {
                what: "redis dedicated pool",
            }),
            Err(_) => Err(Error::CapacityExceeded {
                resource: "redis dedicated pool",
                capacity: self.size,
            }),
        }
    }

    pub(crate) fn take_idle(&self) -> Option<RedisConnection> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    pub(crate) fn clone_handle(&self) -> PoolHandle {
        PoolHandle {
            idle: self.idle.clone(),
        }
    }
}

/// A dedicated connection checked out of a [`RedisBackend`]'s pool, for
/// blocking commands. Returned to the pool on drop, unless
/// [`discard`](Self::discard) was called.
///
/// [`RedisBackend`]: super::RedisBackend
///
/// ```no_run
/// # async fn demo(redis: raceguard::redis::RedisBackend) -> Result<(), raceguard::Error> {
/// let mut conn = redis.dedicated().await?;
/// let popped: Option<(String, String)> = ::redis::cmd("BLPOP")
///     .arg("jobs").arg(1)
///     .query_async(conn.connection())
///     .await
///     .map_err(|e| raceguard::Error::backend("redis", true, e))?;
/// # let _ = popped; Ok(()) }
/// ```
pub struct DedicatedConnection {
    conn: Option<RedisConnection>,
    _permit: OwnedSemaphorePermit,
    pool: PoolHandle,
}

impl DedicatedConnection {
    pub(crate) fn new(
        conn: RedisConnection,
        permit: OwnedSemaphorePermit,
        pool: PoolHandle,
    ) -> Self {
        DedicatedConnection {
            conn: Some(conn),
            _permit: permit,
            pool,
        }
    }

    /// The connection, usable with any redis-rs async command.
    pub fn connection(&mut self) -> &mut RedisConnection {
        self.conn.as_mut().expect("present until drop")
    }

    /// Drops the connection instead of returning it to the pool: call this
    /// when a command was abandoned midway and the connection's state is
    /// unknown.
    pub fn discard(mut self) {
        self.conn = None;
    }
}

impl fmt::Debug for DedicatedConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DedicatedConnection")
            .finish_non_exhaustive()
    }
}

impl Drop for DedicatedConnection {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
        }
        // The permit is released after the connection is back in the idle
        // list, so the next permit holder finds it.
    }
}
