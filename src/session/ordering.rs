//! Per-session ordered execution.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::hash::Hash;

use tokio::sync::Notify;

use crate::sync::{Mutex, StdArc as Arc};
use crate::{Error, Result};

use super::key::SessionKey;

struct Lane {
    /// The number the next ticket gets.
    next: u64,
    /// The ticket whose turn it is.
    serving: u64,
    /// Tickets dropped before their turn.
    skipped: BTreeSet<u64>,
    notify: Arc<Notify>,
}

struct Inner<K> {
    lanes: Mutex<HashMap<K, Lane>>,
    max_queued: usize,
}

/// Runs each session's operations strictly in submission order, while
/// different sessions run in parallel (seed 001 #1: a user's message and
/// the reply to it must pair up, whoever else is chatting).
///
/// [`enqueue`](Self::enqueue) takes a place in the session's line
/// *synchronously*, so the order is the order of the `enqueue` calls (for
/// example, the order in which a connection's messages were read), not the
/// order in which tasks happen to be scheduled. A [`Ticket`] dropped before
/// or during its turn gives the turn to the next one: cancellation never
/// blocks a line. A line exists only while it has tickets, so the map holds
/// only sessions with work in flight; each line holds at most `max_queued`
/// tickets.
///
/// Key it by [`SessionKey`] (the default), which only an ownership check
/// produces, and two users can never share a line or its state.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use raceguard::session::SessionOrdering;
///
/// let order = SessionOrdering::<&'static str>::new(64);
/// let first = order.enqueue("s1")?;
/// let second = order.enqueue("s1")?;
/// let other = order.enqueue("s2")?;
/// other.ready().await; // another session: not held up by s1
/// drop(other);
/// first.ready().await;
/// drop(first);
/// second.ready().await;
/// drop(second);
/// assert_eq!(order.active_sessions(), 0);
/// # Ok::<(), raceguard::Error>(())
/// # }).unwrap();
/// ```
pub struct SessionOrdering<K = SessionKey> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for SessionOrdering<K> {
    fn clone(&self) -> Self {
        SessionOrdering {
            inner: self.inner.clone(),
        }
    }
}

impl<K> fmt::Debug for SessionOrdering<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionOrdering")
            .field("max_queued", &self.inner.max_queued)
            .field("active_sessions", &self.inner.lanes.lock().len())
            .finish()
    }
}

impl<K: Eq + Hash + Clone + Send + 'static> SessionOrdering<K> {
    /// An ordering that queues at most `max_queued` operations per session
    /// (at least 1).
    ///
    /// ```
    /// let order = raceguard::session::SessionOrdering::<u32>::new(16);
    /// assert_eq!(order.active_sessions(), 0);
    /// ```
    pub fn new(max_queued: usize) -> Self {
        SessionOrdering {
            inner: Arc::new(Inner {
                lanes: Mutex::new(HashMap::new()),
                max_queued: max_queued.max(1),
            }),
        }
    }

    /// Takes the next place in `key`'s line. Await [`Ticket::ready`] for
    /// the turn; drop the ticket to end it.
    ///
    /// # Errors
    ///
    /// [`Error::CapacityExceeded`] if `key` already has `max_queued`
    /// tickets.
    ///
    /// ```
    /// let order = raceguard::session::SessionOrdering::<u32>::new(1);
    /// let t = order.enqueue(7)?;
    /// assert!(order.enqueue(7).is_err());
    /// drop(t);
    /// assert!(order.enqueue(7).is_ok());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn enqueue(&self, key: K) -> Result<Ticket<K>> {
        let mut lanes = self.inner.lanes.lock();
        let lane = lanes.entry(key.clone()).or_insert_with(|| Lane {
            next: 0,
            serving: 0,
            skipped: BTreeSet::new(),
            notify: Arc::new(Notify::new()),
        });
        let queued = lane.next - lane.serving - lane.skipped.len() as u64;
        if queued >= self.inner.max_queued as u64 {
            return Err(Error::CapacityExceeded {
                resource: "session ordering queue",
                capacity: self.inner.max_queued,
            });
        }
        let number = lane.next;
        lane.next += 1;
        Ok(Ticket {
            order: self.clone(),
            key,
            number,
            notify: lane.notify.clone(),
        })
    }

    /// Enqueues `op` for `key`, waits for its turn and runs it.
    ///
    /// # Errors
    ///
    /// [`Error::CapacityExceeded`] as [`enqueue`](Self::enqueue).
    ///
    /// Cancellation: dropping the future gives up the place in line (or
    /// ends the turn) and drops `op`; later operations of the session go
    /// on.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let order = raceguard::session::SessionOrdering::<u32>::new(8);
    /// assert_eq!(order.run(1, async { 40 + 2 }).await?, 42);
    /// # Ok::<(), raceguard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn run<F: Future>(&self, key: K, op: F) -> Result<F::Output> {
        let ticket = self.enqueue(key)?;
        ticket.ready().await;
        let out = op.await;
        drop(ticket);
        Ok(out)
    }

    /// How many sessions have tickets outstanding.
    ///
    /// ```
    /// let order = raceguard::session::SessionOrdering::<u32>::new(8);
    /// let t = order.enqueue(1)?;
    /// assert_eq!(order.active_sessions(), 1);
    /// drop(t);
    /// assert_eq!(order.active_sessions(), 0);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn active_sessions(&self) -> usize {
        self.inner.lanes.lock().len()
    }

    fn is_turn(&self, key: &K, number: u64) -> bool {
        self.inner
            .lanes
            .lock()
            .get(key)
            .is_some_and(|lane| lane.serving == number)
    }
}

/// A place in one session's line, from [`SessionOrdering::enqueue`].
/// Dropping it ends its turn, or gives up its place if the turn has not
/// come.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let order = raceguard::session::SessionOrdering::<u8>::new(4);
/// let ticket = order.enqueue(1)?;
/// ticket.ready().await;
/// // ... the session's operation ...
/// drop(ticket); // the next ticket of session 1 may run
/// # Ok::<(), raceguard::Error>(())
/// # }).unwrap();
/// ```
#[must_use = "the place in line is given up when the ticket is dropped"]
pub struct Ticket<K: Eq + Hash = SessionKey> {
    order: SessionOrdering<K>,
    key: K,
    number: u64,
    notify: Arc<Notify>,
}

impl<K: Eq + Hash> fmt::Debug for Ticket<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("number", &self.number)
            .finish_non_exhaustive()
    }
}

impl<K: Eq + Hash + Clone + Send + 'static> Ticket<K> {
    /// Waits until every earlier ticket of the session has been dropped.
    ///
    /// Cancellation: safe; the ticket keeps its place.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let order = raceguard::session::SessionOrdering::<u32>::new(8);
    /// let t = order.enqueue(1)?;
    /// t.ready().await; // first in line: immediately
    /// # Ok::<(), raceguard::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn ready(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.order.is_turn(&self.key, self.number) {
                return;
            }
            notified.await;
        }
    }
}

impl<K: Eq + Hash> Drop for Ticket<K> {
    fn drop(&mut self) {
        let mut lanes = self.order.inner.lanes.lock();
        let Some(lane) = lanes.get_mut(&self.key) else {
            return;
        };
        if lane.serving != self.number {
            lane.skipped.insert(self.number);
            return;
        }
        lane.serving += 1;
        while lane.skipped.remove(&lane.serving) {
            lane.serving += 1;
        }
        let notify = lane.notify.clone();
        if lane.serving == lane.next {
            lanes.remove(&self.key);
        }
        drop(lanes);
        notify.notify_waiters();
    }
}
