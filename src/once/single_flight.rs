//! `SingleFlight`: concurrent calls with equal keys share one execution.
//!
//! `flights` maps each key with work in flight to its `Flight`, and hands
//! out generation numbers. A `Flight` (shared by its callers through an
//! `Arc`) holds its own state behind its own lock. Lock order: `flights`
//! before a flight's `state`, never the reverse.
//!
//! Invariants:
//!
//! 1. Every flight has a distinct generation. The map entry for a key is
//!    removed only by a caller that checked, under the `flights` lock, that
//!    the entry's generation is its own flight's: a late cleanup (after
//!    `forget`, and a newer flight for the key) never removes a newer
//!    flight's entry.
//! 2. A flight runs at most one execution at a time: `driving` is true from
//!    the moment a caller claims the flight (creates it, or takes over an
//!    abandoned one, under its lock) until the claim is released, and the
//!    work's future is dropped before that.
//! 3. A caller that joins a flight is counted in `waiters` in the same
//!    critical section in which it finds the flight in the map, and stays
//!    counted until it returns, is dropped, or the outcome it waits for is
//!    published (then it needs no entry: it reads the outcome). The driver publishes the
//!    outcome after removing the map entry (no caller can join after that),
//!    so every counted waiter finds the outcome, and a flight nobody waits
//!    for skips storing (cloning) it.
//! 4. Releasing a claim wakes every waiter. Published: each waiter returns
//!    a clone of the outcome. Abandoned (the driver was cancelled): each
//!    waiter decides again, and the first to lock the flight takes it over
//!    and runs its own work; if nobody waits, the entry is removed (by
//!    generation), so an abandoned key does not stay in the map. A waiter
//!    cancelled after an abandonment does the same if it was the last one.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::future::{Future, poll_fn};
use std::hash::Hash;
use std::pin::pin;
use std::task::{Context, Poll};

use super::InitError;
use super::shared::{self, Caught, Driver, WaitList};
use crate::sync::{Arc, Mutex};

const WHAT: &str = "SingleFlight";
const WHAT_WORK: &str = "SingleFlight work";

/// Deduplicates concurrent work by key: calls with equal keys that overlap
/// in time share one execution and its result.
///
/// - Every caller of a flight gets a clone of its outcome: the value (`V:
///   Clone`), the error ([`InitError::Failed`], one `Arc<E>` for all), or
///   the panic ([`InitError::Panicked`], caught).
/// - A waiting caller may be cancelled without affecting the others.
/// - If the caller running the work is cancelled, its work's future is
///   dropped, then one of the waiters runs the work again (its own closure).
///   Two executions of one flight never overlap, and no waiter hangs.
/// - The flight leaves the map when its work finishes, so the next call
///   runs fresh: this deduplicates, it does not cache. Removal is checked by
///   generation, so a late cleanup never removes a newer flight for the key.
/// - [`forget`](SingleFlight::forget) detaches the current flight: the next
///   call runs fresh even while the old flight is still running.
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use raceguard::once::SingleFlight;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let logins: SingleFlight<&str, String, std::io::Error> = SingleFlight::new();
/// let calls = AtomicUsize::new(0);
/// let login = || async {
///     calls.fetch_add(1, Ordering::SeqCst);
///     tokio::task::yield_now().await; // the external site takes its time
///     Ok("session-cookie".to_string())
/// };
/// // Three webhooks need the same external session at once (seed 002).
/// let (a, b, c) = tokio::join!(
///     logins.run("mam", login),
///     logins.run("mam", login),
///     logins.run("mam", login),
/// );
/// assert_eq!((a?, b?, c?), ("session-cookie".into(), "session-cookie".into(), "session-cookie".into()));
/// assert_eq!(calls.load(Ordering::SeqCst), 1);
/// # Ok::<(), raceguard::once::InitError<std::io::Error>>(())
/// # }).unwrap();
/// ```
pub struct SingleFlight<K, V, E> {
    flights: Mutex<Flights<K, V, E>>,
}

struct Flights<K, V, E> {
    next_generation: u64,
    map: HashMap<K, Arc<Flight<V, E>>>,
}

struct Flight<V, E> {
    generation: u64,
    state: Mutex<FlightState<V, E>>,
}

struct FlightState<V, E> {
    /// A caller holds the claim and runs the work (invariant 2).
    driving: bool,
    /// The published outcome, when some waiter is counted (invariant 3).
    outcome: Option<Result<V, InitError<E>>>,
    waiters: WaitList,
}

impl<V, E> Flight<V, E> {
    fn mark(&self) -> usize {
        std::ptr::from_ref(&self.state).addr()
    }
}

impl<K, V, E> Flights<K, V, E>
where
    K: Hash + Eq,
{
    /// Removes `key`'s entry if it is still flight `generation`'s.
    fn remove_if_current(&mut self, key: &K, generation: u64) {
        if self
            .map
            .get(key)
            .is_some_and(|f| f.generation == generation)
        {
            self.map.remove(key);
        }
    }
}

impl<K, V, E> SingleFlight<K, V, E> {
    /// An empty group: no flights.
    ///
    /// ```
    /// use raceguard::once::SingleFlight;
    /// let group: SingleFlight<String, u32, ()> = SingleFlight::new();
    /// assert_eq!(group.waiters("k"), 0);
    /// ```
    pub fn new() -> Self {
        SingleFlight {
            flights: Mutex::new(Flights {
                next_generation: 0,
                map: HashMap::new(),
            }),
        }
    }
}

impl<K, V, E> SingleFlight<K, V, E>
where
    K: Hash + Eq + Clone,
    V: Clone,
{
    /// Runs `work` for `key`, or joins the execution already in flight for
    /// an equal key and returns its result.
    ///
    /// # Errors
    ///
    /// - [`InitError::Failed`]: the work of this flight failed; every
    ///   caller of the flight shares the `Arc`.
    /// - [`InitError::Panicked`]: the work panicked.
    /// - [`InitError::Reentrant`]: called from the work of the same flight
    ///   (same key, same execution).
    ///
    /// # Cancellation
    ///
    /// Dropping a waiting call only removes it from the flight. Dropping the
    /// call that runs the work drops the work's future, then wakes the
    /// waiters, one of which runs its own `work`; if nobody waits, the
    /// flight is removed and the next call starts a new one.
    ///
    /// ```
    /// use raceguard::once::{InitError, SingleFlight};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let group: SingleFlight<u32, String, String> = SingleFlight::new();
    /// let ok = group.run(1, || async { Ok("one".to_string()) }).await;
    /// assert_eq!(ok.unwrap(), "one");
    /// let err = group.run(2, || async { Err("no such user".to_string()) }).await;
    /// assert!(matches!(err, Err(InitError::Failed(e)) if *e == "no such user"));
    /// # });
    /// ```
    pub async fn run<F, Fut>(&self, key: K, work: F) -> Result<V, InitError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let (flight, joined) = {
            let mut fl = self.flights.lock();
            match fl.map.get(&key) {
                Some(f) => {
                    if shared::is_driving(f.mark()) {
                        return Err(InitError::Reentrant { what: WHAT });
                    }
                    let f = f.clone();
                    let id = f.state.lock().waiters.join();
                    (f, Some(id))
                }
                None => {
                    let generation = fl.next_generation;
                    fl.next_generation += 1;
                    let f = Arc::new(Flight {
                        generation,
                        state: Mutex::new(FlightState {
                            driving: true,
                            outcome: None,
                            waiters: WaitList::new(),
                        }),
                    });
                    fl.map.insert(key.clone(), f.clone());
                    (f, None)
                }
            }
        };
        if let Some(id) = joined {
            let mut member = Member {
                group: self,
                key: &key,
                flight: &flight,
                id: Some(id),
            };
            if let Some(done) = poll_fn(|cx| member.poll_join(cx)).await {
                return done;
            }
            // Took over an abandoned flight: drive it.
        }
        let slot = pin!(Option::<Fut>::None);
        let mark = flight.mark();
        let claim = Claim {
            group: self,
            key,
            flight,
            armed: true,
        };
        let mut driver = Driver::new(mark, work, slot, claim);
        let (outcome, claim) = poll_fn(|cx| driver.poll_work(cx)).await;
        claim.publish(outcome)
    }

    /// Detaches the flight in progress for `key`, if any: the next call for
    /// `key` runs fresh, even while the detached flight still runs (so its
    /// execution and the new one may overlap; that is the point). The
    /// detached flight's callers still get its result. Returns whether a
    /// flight was detached.
    ///
    /// For callers that know the running execution will return stale data
    /// (it started before a write they just made).
    ///
    /// ```
    /// use raceguard::once::SingleFlight;
    /// let group: SingleFlight<&str, u32, ()> = SingleFlight::new();
    /// assert!(!group.forget("user:42"));
    /// ```
    pub fn forget<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.flights.lock().map.remove(key).is_some()
    }
}

impl<K, V, E> SingleFlight<K, V, E>
where
    K: Hash + Eq,
{
    /// How many callers are waiting for the flight of `key` (not counting
    /// the one running the work): a snapshot, for metrics and tests.
    ///
    /// ```
    /// use raceguard::once::SingleFlight;
    /// let group: SingleFlight<String, u32, ()> = SingleFlight::new();
    /// assert_eq!(group.waiters("nobody"), 0);
    /// ```
    pub fn waiters<Q>(&self, key: &Q) -> usize
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let fl = self.flights.lock();
        fl.map.get(key).map_or(0, |f| f.state.lock().waiters.len())
    }
}

impl<K, V, E> Default for SingleFlight<K, V, E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V, E> fmt::Debug for SingleFlight<K, V, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fl = self.flights.lock();
        f.debug_struct("SingleFlight")
            .field("in_flight", &fl.map.len())
            .finish_non_exhaustive()
    }
}

/// A caller waiting on a flight; leaves it when dropped.
struct Member<'a, K, V, E>
where
    K: Hash + Eq,
{
    group: &'a SingleFlight<K, V, E>,
    key: &'a K,
    flight: &'a Arc<Flight<V, E>>,
    id: Option<u64>,
}

impl<K, V, E> Member<'_, K, V, E>
where
    K: Hash + Eq,
    V: Clone,
{
    /// `Ready(Some(outcome))` when the flight published, `Ready(None)` when
    /// this caller took over the abandoned flight and must drive it.
    fn poll_join(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<V, InitError<E>>>> {
        let mut st = self.flight.state.lock();
        let next = if let Some(outcome) = &st.outcome {
            Some(outcome.clone())
        } else if st.driving {
            st.waiters.register(&mut self.id, cx.waker());
            return Poll::Pending;
        } else {
            st.driving = true;
            None
        };
        if let Some(id) = self.id.take() {
            st.waiters.remove(id);
        }
        Poll::Ready(next)
    }
}

impl<K, V, E> Drop for Member<'_, K, V, E>
where
    K: Hash + Eq,
{
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        // Cancelled while waiting. Lock order: flights, then the flight.
        let mut fl = self.group.flights.lock();
        let mut st = self.flight.state.lock();
        st.waiters.remove(id);
        if !st.driving && st.outcome.is_none() && st.waiters.len() == 0 {
            // The last waiter of an abandoned flight: nobody will run it.
            drop(st);
            fl.remove_if_current(self.key, self.flight.generation);
        }
    }
}

/// The right to run a flight's work. Dropped without `publish`, it abandons
/// the execution (invariant 4).
struct Claim<'a, K, V, E>
where
    K: Hash + Eq,
{
    group: &'a SingleFlight<K, V, E>,
    key: K,
    flight: Arc<Flight<V, E>>,
    armed: bool,
}

impl<K, V, E> Claim<'_, K, V, E>
where
    K: Hash + Eq,
    V: Clone,
{
    fn publish(mut self, outcome: Caught<Result<V, E>>) -> Result<V, InitError<E>> {
        self.armed = false;
        let result = InitError::from_outcome(WHAT_WORK, outcome);
        // First the map entry (no caller joins after this) ...
        self.group
            .flights
            .lock()
            .remove_if_current(&self.key, self.flight.generation);
        // ... then the outcome, for the waiters counted until now.
        let mut st = self.flight.state.lock();
        st.driving = false;
        if st.waiters.len() > 0 {
            st.outcome = Some(result.clone());
        }
        let wakers = st.waiters.drain_wakers();
        drop(st);
        shared::wake_all(wakers);
        result
    }
}

impl<K, V, E> Drop for Claim<'_, K, V, E>
where
    K: Hash + Eq,
{
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Abandoned: the work's future is already gone (the Driver dropped
        // it first). Lock order: flights, then the flight.
        let mut fl = self.group.flights.lock();
        let mut st = self.flight.state.lock();
        st.driving = false;
        if st.waiters.len() == 0 {
            drop(st);
            fl.remove_if_current(&self.key, self.flight.generation);
        } else {
            let wakers = st.waiters.take_wakers();
            drop(st);
            drop(fl);
            shared::wake_all(wakers);
        }
    }
}
