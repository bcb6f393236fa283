//! Redlock: one lock over N independent Redis servers, held when a strict
//! majority (N/2+1) granted it within its validity.
//!
//! Invariants:
//!
//! - Every request of one operation goes to every node at once, each bounded
//!   by the per-node timeout; an acquire attempt stops waiting as soon as the
//!   quorum is reached or can no longer be reached.
//! - A failed acquire attempt sends a compare-and-delete to **every** node
//!   (not only those that answered yes: a late "yes" may still be in
//!   flight), after dropping the attempt's unanswered requests, so on each
//!   node's ordered connection the delete comes after the set.
//! - The lease's validity is measured by the caller from before the
//!   requests were sent, minus the drift allowance (see `token.rs`).
//! - Fencing: each node's acquire script returns that node's counter
//!   (`INCR`, kept within ~65 ms of the node's clock in µs); the lease's
//!   token is the largest among the granting nodes. See `docs/GUARANTEES.md` for what that does and does
//!   not promise.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::redis::RedisLocks;
use super::token::{Token, quorum, quorum_possible};
use super::{Attempt, LockName};
use crate::Error;
use crate::redis::{RedisBackend, RedisConfig};

pub(crate) struct RedlockLocks {
    nodes: Vec<RedisLocks>,
    quorum: usize,
    node_timeout: Duration,
}

type NodeFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;
type NodeSlot<'a, T> = Option<Pin<Box<tokio::time::Timeout<NodeFuture<'a, T>>>>>;

/// Runs `op` on every node at once, each within `timeout`, feeding results
/// to `settle(result, still_pending)` as they arrive; stops early when
/// `settle` returns `true`. Unfinished requests are dropped on return.
async fn fan_out<'a, T>(
    nodes: &'a [RedisLocks],
    timeout: Duration,
    op: impl Fn(&'a RedisLocks) -> NodeFuture<'a, T>,
    mut settle: impl FnMut(Result<T, Error>, usize) -> bool,
) {
    let mut futs: Vec<NodeSlot<'a, T>> = nodes
        .iter()
        .map(|n| Some(Box::pin(tokio::time::timeout(timeout, op(n)))))
        .collect();
    let mut pending = futs.len();
    poll_fn(|cx| {
        for slot in futs.iter_mut() {
            let Some(f) = slot else { continue };
            if let Poll::Ready(r) = f.as_mut().poll(cx) {
                *slot = None;
                pending -= 1;
                let r = r.unwrap_or(Err(Error::Timeout {
                    op: "redlock node",
                    after: timeout,
                }));
                if settle(r, pending) {
                    return Poll::Ready(());
                }
            }
        }
        if pending == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

impl RedlockLocks {
    pub(crate) fn new(nodes: Vec<RedisBackend>, namespace: &str, node_timeout: Duration) -> Self {
        let quorum = quorum(nodes.len());
        RedlockLocks {
            nodes: nodes
                .into_iter()
                .map(|n| RedisLocks::new(n, namespace))
                .collect(),
            quorum,
            node_timeout,
        }
    }

    pub(crate) fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) async fn try_once(
        &self,
        name: &LockName,
        token: Token,
        ttl: u64,
        fenced: super::Fencing,
    ) -> Result<Attempt, Error> {
        let needed = self.quorum;
        let (mut granted, mut failed) = (0usize, 0usize);
        let mut fence: Option<u64> = None;
        let mut remaining: Option<u64> = None;
        let mut last_err = None;
        fan_out(
            &self.nodes,
            self.node_timeout,
            |n| Box::pin(n.try_once(name, token, ttl, fenced)),
            |r, pending| {
                match r {
                    Ok(Attempt::Acquired { fence: f }) => {
                        granted += 1;
                        fence = fence.max(f);
                    }
                    Ok(Attempt::Busy { remaining: rem, .. }) => {
                        remaining = match (remaining, rem) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                    Err(e) => {
                        failed += 1;
                        last_err = Some(e);
                    }
                }
                granted >= needed || !quorum_possible(granted, pending, needed)
            },
        )
        .await;
        if granted >= needed {
            return Ok(Attempt::Acquired { fence });
        }
        // No quorum: give back every node's share, including requests that
        // were still in flight (dropped above, so the deletes come after them).
        let clean = self.release_all(name, token).await.1 == 0;
        if failed > self.nodes.len() - needed {
            if let Some(e) = &last_err {
                tracing::debug!(lock = %name, error = %e, failed, "redlock: too many nodes failed");
            }
            Err(Error::QuorumNotReached { granted, needed })
        } else {
            Ok(Attempt::Busy { remaining, clean })
        }
    }

    /// Compare-and-delete on every node: (deleted, failed).
    async fn release_all(&self, name: &LockName, token: Token) -> (usize, usize, Option<Error>) {
        let (mut deleted, mut failed, mut last) = (0, 0, None);
        fan_out(
            &self.nodes,
            self.node_timeout,
            |n| Box::pin(n.release(name, token)),
            |r, _| {
                match r {
                    Ok(true) => deleted += 1,
                    Ok(false) => {}
                    Err(e) => {
                        failed += 1;
                        last = Some(e);
                    }
                }
                false
            },
        )
        .await;
        (deleted, failed, last)
    }

    /// Releases everywhere: `true` when a quorum of nodes still had this
    /// token's lock, `false` when that is certain not to be the case.
    pub(crate) async fn release(&self, name: &LockName, token: Token) -> Result<bool, Error> {
        let (deleted, failed, last) = self.release_all(name, token).await;
        self.verdict(deleted, failed, last)
    }

    /// Extends everywhere: `true` when a quorum of nodes extended.
    pub(crate) async fn extend(
        &self,
        name: &LockName,
        token: Token,
        ttl: u64,
    ) -> Result<bool, Error> {
        let (mut extended, mut failed, mut last) = (0, 0, None);
        fan_out(
            &self.nodes,
            self.node_timeout,
            |n| Box::pin(n.extend(name, token, ttl)),
            |r, _| {
                match r {
                    Ok(true) => extended += 1,
                    Ok(false) => {}
                    Err(e) => {
                        failed += 1;
                        last = Some(e);
                    }
                }
                false
            },
        )
        .await;
        self.verdict(extended, failed, last)
    }

    fn verdict(&self, yes: usize, failed: usize, last: Option<Error>) -> Result<bool, Error> {
        if yes >= self.quorum {
            Ok(true)
        } else if yes + failed < self.quorum {
            Ok(false)
        } else {
            if let Some(e) = last {
                tracing::debug!(error = %e, "redlock: too many nodes failed to tell");
            }
            Err(Error::QuorumNotReached {
                granted: yes,
                needed: self.quorum,
            })
        }
    }
}

/// One [`RedisBackend`] per Redlock node, connecting **lazily**: a node
/// that is down when this is called does not stop the others from serving
/// (the lock needs only a quorum), and is connected on first use after it
/// comes up. Each node gets its own multiplexed connection.
///
/// Call it inside a tokio runtime.
///
/// # Errors
///
/// [`Error::InvalidInput`] for a malformed URL, an invalid configuration,
/// no URL, or no tokio runtime.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), raceguard::Error> {
/// use raceguard::lock::{redlock_nodes, LockManager};
/// use raceguard::redis::RedisConfig;
///
/// let nodes = redlock_nodes(
///     &["redis://10.0.0.1:6379/", "redis://10.0.0.2:6379/", "redis://10.0.0.3:6379/"],
///     RedisConfig::default(),
/// )?;
/// let locks = LockManager::redlock(nodes)?;
/// # let _ = locks; Ok(()) }
/// ```
pub fn redlock_nodes(
    urls: &[impl AsRef<str>],
    config: RedisConfig,
) -> Result<Vec<RedisBackend>, Error> {
    if urls.is_empty() {
        return Err(Error::invalid("redis.urls", "at least one node is needed"));
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::invalid(
            "redis.urls",
            "redlock_nodes must be called inside a tokio runtime",
        ));
    }
    urls.iter()
        .map(|url| {
            let client = ::redis::Client::open(url.as_ref())
                .map_err(|e| Error::invalid("redis.url", e.to_string()))?;
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.get_connect_timeout()))
                .set_response_timeout(Some(config.get_response_timeout()))
                .set_number_of_retries(1)
                .set_max_delay(config.get_connect_timeout());
            let manager = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
                .map_err(|e| Error::invalid("redis.url", e.to_string()))?;
            RedisBackend::from_manager(manager, client, config.clone())
        })
        .collect()
}
