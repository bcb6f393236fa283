//! `Refreshable`: a value that expires (an auth token, a client) and is
//! replaced by one refresh per generation, however many callers find it
//! stale at once.
//!
//! Invariants (all state behind one shim `Mutex`):
//!
//! 1. `generation` counts successful refreshes; `current` is the value of
//!    that generation. Both change together, under the lock, only when a
//!    refresh succeeds.
//! 2. At most one refresh runs: `running` is `Some(n)` from the moment a
//!    caller claims attempt `n` (under the lock, for the current
//!    generation, when `running` was `None`) until that attempt's claim is
//!    released. The refresher's future is dropped before its claim is
//!    released, so refreshes never overlap.
//! 3. A refresh request names the generation its caller saw. A request for
//!    a generation that is no longer current returns the current value and
//!    runs nothing; so one generation is refreshed by exactly one successful
//!    run.
//! 4. Releasing a claim wakes every waiter. A waiter for attempt `n` then
//!    returns the new generation, or the failure of attempt `n` or a later
//!    one (`failure` is the latest), or, if `n` was abandoned, decides again
//!    as a new caller would.

use std::fmt;
use std::future::{Future, poll_fn};
use std::ops::Deref;
use std::pin::pin;
use std::task::{Context, Poll};

use super::InitError;
use super::shared::{self, Caught, Driver, WaitList};
use crate::sync::{Mutex, StdArc};

const WHAT: &str = "Refreshable";
const WHAT_REFRESH: &str = "Refreshable refresher";

/// Which version of a [`Refreshable`]'s value a [`Snapshot`] holds. The
/// first value is generation 0; each successful refresh adds one.
///
/// ```
/// use raceguard::once::Refreshable;
/// let token: Refreshable<String, ()> = Refreshable::new("t0".into());
/// assert_eq!(token.get().generation().get(), 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(u64);

impl Generation {
    /// The generation number.
    ///
    /// ```
    /// use raceguard::once::Refreshable;
    /// let r: Refreshable<u8, ()> = Refreshable::new(0);
    /// assert_eq!(r.get().generation().get(), 0);
    /// ```
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "generation {}", self.0)
    }
}

/// One generation of a [`Refreshable`]'s value: the value (dereference it)
/// and its [`Generation`], which a caller that finds the value stale passes
/// to [`Refreshable::refresh`].
///
/// ```
/// use raceguard::once::Refreshable;
/// let token: Refreshable<String, ()> = Refreshable::new("t0".into());
/// let snap = token.get();
/// assert_eq!(snap.as_str(), "t0");
/// ```
#[derive(Debug)]
pub struct Snapshot<T> {
    value: StdArc<T>,
    generation: Generation,
}

impl<T> Snapshot<T> {
    /// The generation this value belongs to: pass it to
    /// [`Refreshable::refresh`] when the value turns out stale.
    ///
    /// ```
    /// use raceguard::once::Refreshable;
    /// let r: Refreshable<u8, ()> = Refreshable::new(0);
    /// let (a, b) = (r.get(), r.get());
    /// assert_eq!(a.generation(), b.generation());
    /// ```
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The shared value.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use raceguard::once::Refreshable;
    /// let r: Refreshable<String, ()> = Refreshable::new("t0".into());
    /// assert!(Arc::ptr_eq(r.get().value(), r.get().value()));
    /// ```
    pub fn value(&self) -> &StdArc<T> {
        &self.value
    }

    /// The shared value, without the generation.
    ///
    /// ```
    /// use raceguard::once::Refreshable;
    /// let r: Refreshable<String, ()> = Refreshable::new("t0".into());
    /// let token: std::sync::Arc<String> = r.get().into_arc();
    /// assert_eq!(*token, "t0");
    /// ```
    pub fn into_arc(self) -> StdArc<T> {
        self.value
    }
}

impl<T> Clone for Snapshot<T> {
    fn clone(&self) -> Self {
        Snapshot {
            value: self.value.clone(),
            generation: self.generation,
        }
    }
}

impl<T> Deref for Snapshot<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// A value that expires and is refreshed once per generation.
///
/// [`get`](Refreshable::get) returns the current value as a [`Snapshot`]
/// (an `Arc<T>` and its [`Generation`]). A caller that finds it stale (the
/// API answered 401, the token expired) calls
/// [`refresh`](Refreshable::refresh) with the generation it saw. Concurrent
/// refreshes of one generation run the refresher once and all get the new
/// value; a refresh of a generation that was already replaced returns the
/// current value without running anything. This is what seed 000's shared
/// auth state needed: concurrent requests never log in twice, and never
/// overwrite each other's fresh token with an older one.
///
/// Errors are shared like [`OnceInit`](super::OnceInit)'s: the callers that
/// waited for a failed refresh all get its [`InitError`]; the generation
/// stays, and a later refresh of it runs again. A panic in the refresher is
/// caught and becomes [`InitError::Panicked`]. There is no cool-down: pace
/// retries with a rate limiter.
///
/// ```
/// use raceguard::once::Refreshable;
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let token: Refreshable<String, std::io::Error> = Refreshable::new("expired".into());
/// let seen = token.get();
/// // Two requests find the token stale at once; one login runs.
/// let (a, b) = tokio::join!(
///     token.refresh(seen.generation(), |_old| async { Ok("fresh".to_string()) }),
///     token.refresh(seen.generation(), |_old| async { Ok("second login".to_string()) }),
/// );
/// assert_eq!(a?.as_str(), "fresh");
/// assert_eq!(b?.as_str(), "fresh");
/// assert_eq!(token.get().generation().get(), 1);
/// # Ok::<(), raceguard::once::InitError<std::io::Error>>(())
/// # }).unwrap();
/// ```
pub struct Refreshable<T, E> {
    state: Mutex<State<T, E>>,
}

struct State<T, E> {
    current: StdArc<T>,
    generation: u64,
    running: Option<u64>,
    attempts: u64,
    /// The latest failed attempt and its error.
    failure: Option<(u64, InitError<E>)>,
    waiters: WaitList,
}

impl<T, E> State<T, E> {
    fn snapshot(&self) -> Snapshot<T> {
        Snapshot {
            value: self.current.clone(),
            generation: Generation(self.generation),
        }
    }
}

enum Step<T, E> {
    Done(Result<Snapshot<T>, InitError<E>>),
    Wait,
    Claim(u64, StdArc<T>),
}

impl<T, E> Refreshable<T, E> {
    /// A refreshable value starting at generation 0 with `initial`.
    ///
    /// ```
    /// use raceguard::once::Refreshable;
    /// let r: Refreshable<u32, ()> = Refreshable::new(1);
    /// assert_eq!(*r.get(), 1);
    /// ```
    pub fn new(initial: T) -> Self {
        Refreshable {
            state: Mutex::new(State {
                current: StdArc::new(initial),
                generation: 0,
                running: None,
                attempts: 0,
                failure: None,
                waiters: WaitList::new(),
            }),
        }
    }

    /// The current value and its generation. Takes a short lock (no
    /// waiting on a running refresh: that one returns the old value).
    ///
    /// ```
    /// use raceguard::once::Refreshable;
    /// let r: Refreshable<&str, ()> = Refreshable::new("v0");
    /// let snap = r.get();
    /// assert_eq!((*snap, snap.generation().get()), ("v0", 0));
    /// ```
    pub fn get(&self) -> Snapshot<T> {
        self.state.lock().snapshot()
    }

    /// Replaces generation `seen` by running `refresh` on its value, once
    /// however many callers ask; returns the new value.
    ///
    /// - If `seen` is not the current generation (another caller already
    ///   refreshed it), returns the current value at once; `refresh` does
    ///   not run.
    /// - If a refresh of `seen` is running, waits for it and shares its
    ///   outcome.
    /// - Otherwise runs `refresh(old_value)`; on success the result becomes
    ///   generation `seen + 1`.
    ///
    /// # Errors
    ///
    /// [`InitError::Failed`] (shared by every waiter of the failed attempt),
    /// [`InitError::Panicked`], or [`InitError::Reentrant`] when called from
    /// this value's own refresher. After an error the generation is
    /// unchanged and a later call may retry.
    ///
    /// # Cancellation
    ///
    /// Dropping a waiting call only removes it from the waiters. Dropping
    /// the call that runs the refresher drops the refresher's future, then
    /// wakes the waiters, one of which runs its own refresher.
    ///
    /// ```
    /// use raceguard::once::Refreshable;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let r: Refreshable<u32, ()> = Refreshable::new(1);
    /// let old = r.get().generation();
    /// let new = r.refresh(old, |v| async move { Ok(*v + 1) }).await.unwrap();
    /// assert_eq!(*new, 2);
    /// // A late refresh of the old generation runs nothing.
    /// let late = r.refresh(old, |_| async { Ok(99) }).await.unwrap();
    /// assert_eq!(*late, 2);
    /// # });
    /// ```
    pub async fn refresh<F, Fut>(
        &self,
        seen: Generation,
        refresh: F,
    ) -> Result<Snapshot<T>, InitError<E>>
    where
        F: FnOnce(StdArc<T>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if shared::is_driving(self.mark()) {
            return Err(InitError::Reentrant { what: WHAT });
        }
        let (attempt, old) = {
            let mut waiting = Waiting {
                cell: self,
                seen: seen.0,
                id: None,
                awaited: None,
            };
            match poll_fn(|cx| waiting.poll_step(cx)).await {
                Ok(done) => return done,
                Err(claim) => claim,
            }
        };
        let slot = pin!(Option::<Fut>::None);
        let claim = Claim {
            cell: self,
            attempt: Some(attempt),
        };
        let mut driver = Driver::new(self.mark(), move || refresh(old), slot, claim);
        let (outcome, claim) = poll_fn(|cx| driver.poll_work(cx)).await;
        claim.publish(outcome)
    }

    /// How many callers are waiting for the running refresh right now (a
    /// snapshot, for metrics and tests).
    ///
    /// ```
    /// use raceguard::once::Refreshable;
    /// let r: Refreshable<u32, ()> = Refreshable::new(1);
    /// assert_eq!(r.waiters(), 0);
    /// ```
    pub fn waiters(&self) -> usize {
        self.state.lock().waiters.len()
    }

    fn mark(&self) -> usize {
        std::ptr::from_ref(&self.state).addr()
    }

    fn step(&self, st: &mut State<T, E>, seen: u64, awaited: &mut Option<u64>) -> Step<T, E> {
        if st.generation != seen {
            return Step::Done(Ok(st.snapshot()));
        }
        if let (Some(n), Some((failed, error))) = (*awaited, &st.failure)
            && *failed >= n
        {
            return Step::Done(Err(error.clone()));
        }
        if let Some(n) = st.running {
            *awaited = Some(n);
            return Step::Wait;
        }
        st.attempts += 1;
        st.running = Some(st.attempts);
        Step::Claim(st.attempts, st.current.clone())
    }

    fn release(
        &self,
        attempt: u64,
        outcome: Option<Result<T, InitError<E>>>,
    ) -> Option<Result<Snapshot<T>, InitError<E>>> {
        let mut st = self.state.lock();
        debug_assert_eq!(
            st.running,
            Some(attempt),
            "released an attempt it did not run"
        );
        st.running = None;
        let wakers = if outcome.is_some() {
            st.waiters.drain_wakers()
        } else {
            st.waiters.take_wakers()
        };
        let result = outcome.map(|out| match out {
            Ok(v) => {
                st.current = StdArc::new(v);
                st.generation += 1;
                st.failure = None;
                Ok(st.snapshot())
            }
            Err(error) => {
                st.failure = Some((attempt, error.clone()));
                Err(error)
            }
        });
        drop(st);
        shared::wake_all(wakers);
        result
    }
}

impl<T: fmt::Debug, E> fmt::Debug for Refreshable<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state.lock();
        f.debug_struct("Refreshable")
            .field("current", &st.current)
            .field("generation", &st.generation)
            .field("refreshing", &st.running.is_some())
            .field("waiters", &st.waiters.len())
            .finish_non_exhaustive()
    }
}

struct Waiting<'a, T, E> {
    cell: &'a Refreshable<T, E>,
    seen: u64,
    id: Option<u64>,
    awaited: Option<u64>,
}

impl<T, E> Waiting<'_, T, E> {
    #[allow(clippy::type_complexity)]
    fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Result<Snapshot<T>, InitError<E>>, (u64, StdArc<T>)>> {
        let mut st = self.cell.state.lock();
        let next = match self.cell.step(&mut st, self.seen, &mut self.awaited) {
            Step::Wait => {
                st.waiters.register(&mut self.id, cx.waker());
                return Poll::Pending;
            }
            Step::Done(done) => Ok(done),
            Step::Claim(attempt, old) => Err((attempt, old)),
        };
        if let Some(id) = self.id.take() {
            st.waiters.remove(id);
        }
        Poll::Ready(next)
    }
}

impl<T, E> Drop for Waiting<'_, T, E> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.cell.state.lock().waiters.remove(id);
        }
    }
}

struct Claim<'a, T, E> {
    cell: &'a Refreshable<T, E>,
    attempt: Option<u64>,
}

impl<T, E> Claim<'_, T, E> {
    fn publish(mut self, outcome: Caught<Result<T, E>>) -> Result<Snapshot<T>, InitError<E>> {
        let attempt = self.attempt.take().expect("a claim is published once");
        let outcome = InitError::from_outcome(WHAT_REFRESH, outcome);
        match self.cell.release(attempt, Some(outcome)) {
            Some(result) => result,
            None => unreachable!("release with an outcome returns it"),
        }
    }
}

impl<T, E> Drop for Claim<'_, T, E> {
    fn drop(&mut self) {
        if let Some(attempt) = self.attempt.take() {
            self.cell.release(attempt, None);
        }
    }
}
