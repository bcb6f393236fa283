//! Fair waiting for rate-limit capacity: a FIFO of waiters per limited thing
//! (one for a [`RateLimiter`](super::RateLimiter), one per key for a
//! [`KeyedRateLimiter`](super::KeyedRateLimiter)).
//!
//! Invariants:
//!
//! - Only the **head** of a queue tries to consume; the others wait for their
//!   turn. A new caller tries at once only when the queue is empty, and that
//!   test and its attempt happen under the queue's lock, so nobody overtakes a
//!   waiter that is already queued. (Plain `check` calls do not queue: they
//!   can take capacity ahead of the waiters, see `docs/GUARANTEES.md`.)
//! - Consuming is one synchronous call followed by `return` with no `await`
//!   in between, so a waiter that is dropped (cancelled) at any await point
//!   has consumed nothing.
//! - A waiter's ticket is removed from its queue exactly once: by itself on
//!   success, timeout or error, or by its drop guard when it is cancelled.
//!   Whoever removes the head wakes the new head, so a cancelled waiter never
//!   blocks the queue. Wake-ups are permits (`Notify::notify_one`), never lost.
//! - The number of queued waiters never exceeds the configured bound; beyond
//!   it the caller gets [`Error::CapacityExceeded`] at once.
//! - Every wait ends by its deadline: the head sleeps only until the earlier
//!   of its `retry_after` and the deadline, and gives up at once when
//!   `retry_after` already reaches past the deadline.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::Decision;
use crate::clock::Clock;
use crate::sync::{Arc, Mutex};
use crate::{Error, Result};

/// Default bound on queued waiters per limiter.
pub(crate) const DEFAULT_MAX_WAITERS: usize = 1024;
/// Default deadline of `until_ready` / `acquire`.
pub(crate) const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

const QUEUE_RESOURCE: &str = "rate limiter wait queue";
const WAIT_OP: &str = "rate limiter wait";

/// Bound and deadline for waiting.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WaitConfig {
    pub(crate) max_waiters: usize,
    pub(crate) timeout: Duration,
}

impl Default for WaitConfig {
    fn default() -> Self {
        WaitConfig {
            max_waiters: DEFAULT_MAX_WAITERS,
            timeout: DEFAULT_WAIT_TIMEOUT,
        }
    }
}

#[derive(Debug, Default)]
struct Fifo {
    queue: VecDeque<(u64, Arc<Notify>)>,
}

impl Fifo {
    fn is_head(&self, ticket: u64) -> bool {
        self.queue.front().is_some_and(|(t, _)| *t == ticket)
    }

    /// Removes `ticket`; wakes the new head when the head left.
    fn remove(&mut self, ticket: u64) -> bool {
        let Some(pos) = self.queue.iter().position(|(t, _)| *t == ticket) else {
            return false;
        };
        self.queue.remove(pos);
        if pos == 0
            && let Some((_, next)) = self.queue.front()
        {
            next.notify_one();
        }
        true
    }

    fn push(&mut self, ticket: u64) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        self.queue.push_back((ticket, notify.clone()));
        notify
    }
}

pub(crate) enum Entered {
    Ready(Decision),
    Queued { ticket: u64, notify: Arc<Notify> },
}

/// One FIFO as seen by a waiter.
pub(crate) trait Queue: Sync {
    /// Under the queue lock: when nobody waits, runs `attempt` and returns
    /// `Ready` if it admitted; otherwise enqueues (or fails when full).
    fn enter(&self, attempt: &mut dyn FnMut() -> Result<Decision>) -> Result<Entered>;
    fn is_head(&self, ticket: u64) -> bool;
    fn leave(&self, ticket: u64);
}

/// The queue of a direct limiter.
#[derive(Debug)]
pub(crate) struct DirectQueue {
    state: Mutex<DirectState>,
    pub(crate) config: WaitConfig,
}

#[derive(Debug, Default)]
struct DirectState {
    next_ticket: u64,
    fifo: Fifo,
}

impl DirectQueue {
    pub(crate) fn new(config: WaitConfig) -> Self {
        DirectQueue {
            state: Mutex::new(DirectState::default()),
            config,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.state.lock().fifo.queue.len()
    }
}

impl Queue for DirectQueue {
    fn enter(&self, attempt: &mut dyn FnMut() -> Result<Decision>) -> Result<Entered> {
        let mut s = self.state.lock();
        if s.fifo.queue.is_empty() {
            let d = attempt()?;
            if d.allowed() {
                return Ok(Entered::Ready(d));
            }
        }
        if s.fifo.queue.len() >= self.config.max_waiters {
            return Err(Error::CapacityExceeded {
                resource: QUEUE_RESOURCE,
                capacity: self.config.max_waiters,
            });
        }
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        let notify = s.fifo.push(ticket);
        Ok(Entered::Queued { ticket, notify })
    }

    fn is_head(&self, ticket: u64) -> bool {
        self.state.lock().fifo.is_head(ticket)
    }

    fn leave(&self, ticket: u64) {
        self.state.lock().fifo.remove(ticket);
    }
}

/// The per-key queues of a keyed limiter: a map holding only keys that have
/// waiters, with one bound on the total.
#[derive(Debug)]
pub(crate) struct KeyedQueues<K> {
    state: Mutex<KeyedState<K>>,
    pub(crate) config: WaitConfig,
}

#[derive(Debug)]
struct KeyedState<K> {
    next_ticket: u64,
    total: usize,
    map: HashMap<K, Fifo>,
}

impl<K: Hash + Eq + Clone> KeyedQueues<K> {
    pub(crate) fn new(config: WaitConfig) -> Self {
        KeyedQueues {
            state: Mutex::new(KeyedState {
                next_ticket: 0,
                total: 0,
                map: HashMap::new(),
            }),
            config,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.state.lock().total
    }

    pub(crate) fn for_key<'a>(&'a self, key: &'a K) -> KeyQueue<'a, K> {
        KeyQueue { queues: self, key }
    }
}

/// One key's FIFO.
pub(crate) struct KeyQueue<'a, K> {
    queues: &'a KeyedQueues<K>,
    key: &'a K,
}

impl<K: Hash + Eq + Clone + Sync + Send> Queue for KeyQueue<'_, K> {
    fn enter(&self, attempt: &mut dyn FnMut() -> Result<Decision>) -> Result<Entered> {
        let mut s = self.queues.state.lock();
        let empty = s.map.get(self.key).is_none_or(|f| f.queue.is_empty());
        if empty {
            let d = attempt()?;
            if d.allowed() {
                return Ok(Entered::Ready(d));
            }
        }
        if s.total >= self.queues.config.max_waiters {
            return Err(Error::CapacityExceeded {
                resource: QUEUE_RESOURCE,
                capacity: self.queues.config.max_waiters,
            });
        }
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        s.total += 1;
        let notify = s.map.entry(self.key.clone()).or_default().push(ticket);
        Ok(Entered::Queued { ticket, notify })
    }

    fn is_head(&self, ticket: u64) -> bool {
        let s = self.queues.state.lock();
        s.map.get(self.key).is_some_and(|f| f.is_head(ticket))
    }

    fn leave(&self, ticket: u64) {
        let mut s = self.queues.state.lock();
        let Some(fifo) = s.map.get_mut(self.key) else {
            return;
        };
        let removed = fifo.remove(ticket);
        let now_empty = fifo.queue.is_empty();
        if now_empty {
            s.map.remove(self.key);
        }
        if removed {
            s.total -= 1;
        }
    }
}

/// Removes the ticket when the waiter finishes or is dropped.
struct Leave<'q, Q: Queue> {
    queue: &'q Q,
    ticket: u64,
}

impl<Q: Queue> Drop for Leave<'_, Q> {
    fn drop(&mut self) {
        self.queue.leave(self.ticket);
    }
}

fn timeout_error(after: Duration) -> Error {
    Error::Timeout { op: WAIT_OP, after }
}

/// Waits for a turn in `queue`, then for capacity, by `timeout`.
pub(crate) async fn acquire<Q, F>(queue: &Q, timeout: Duration, mut attempt: F) -> Result<Decision>
where
    Q: Queue,
    F: FnMut() -> Result<Decision>,
{
    let start = Instant::now();
    // A timeout too large for the timer's range waits "forever" in practice
    // (decades), which still bounds every wait.
    let deadline = start
        .checked_add(timeout)
        .unwrap_or_else(|| start + Duration::from_secs(30 * 365 * 86_400));
    let (ticket, notify) = match queue.enter(&mut attempt)? {
        Entered::Ready(d) => return Ok(d),
        Entered::Queued { ticket, notify } => (ticket, notify),
    };
    let _leave = Leave { queue, ticket };

    while !queue.is_head(ticket) {
        if tokio::time::timeout_at(deadline, notify.notified())
            .await
            .is_err()
        {
            return Err(timeout_error(timeout));
        }
    }
    loop {
        // The only consuming step: synchronous, and followed by `return`.
        let d = attempt()?;
        if d.allowed() {
            return Ok(d);
        }
        let wake = Instant::now() + d.retry_after();
        if wake > deadline {
            return Err(timeout_error(timeout));
        }
        tokio::time::sleep_until(wake).await;
    }
}

/// A [`Clock`] that reads Tokio's clock (`tokio::time::Instant`), counted
/// from its creation.
///
/// It follows Tokio's paused and auto-advancing test time
/// (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`), so
/// waiting limiters can be tested without real sleeps; outside paused time it
/// is the monotonic system clock. Clones share the origin.
///
/// ```
/// use std::time::Duration;
/// use raceguard::clock::Clock;
/// use raceguard::rate::TokioClock;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let clock = TokioClock::new();
/// tokio::time::sleep(Duration::from_secs(5)).await; // instant: time is paused
/// assert_eq!(clock.now(), Duration::from_secs(5));
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: Instant,
}

impl TokioClock {
    /// A clock whose origin is Tokio's "now".
    ///
    /// ```
    /// use raceguard::clock::Clock;
    /// let clock = raceguard::rate::TokioClock::new();
    /// assert!(clock.now_nanos() < 1_000_000_000);
    /// ```
    pub fn new() -> Self {
        TokioClock {
            origin: Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_nanos(&self) -> u64 {
        u64::try_from(
            Instant::now()
                .saturating_duration_since(self.origin)
                .as_nanos(),
        )
        .unwrap_or(u64::MAX)
    }
}
