//! `OnceInit`: an async one-shot initializer.
//!
//! The value lives in a write-once cell (`std::sync::OnceLock`), so reading
//! it after initialization is one atomic load. Everything else (is an
//! attempt running, which one, who waits, how the last one failed) lives in
//! `state`, behind the shim's `Mutex`, where loom sees every decision.
//!
//! Invariants:
//!
//! 1. `value` is written at most once, by the driver of the running attempt,
//!    while it holds the `state` lock, and never changes afterwards.
//! 2. At most one attempt runs: `state.running` is `Some(n)` from the moment
//!    a caller claims attempt `n` (under the lock, when `running` was `None`
//!    and `value` empty) until that attempt's claim is released (outcome
//!    published, or the claim dropped = abandoned). A driver releases its
//!    claim only after its initializer's future has been dropped, so no two
//!    initializer futures ever exist at once.
//! 3. Once `value` is set, no attempt is ever claimed again.
//! 4. Releasing a claim wakes every waiter (async and blocking). A waiter
//!    that waited for attempt `n` then returns the value, or the failure of
//!    attempt `n` or a later one (`state.failure` holds the latest failure
//!    and its attempt number), or, if `n` was abandoned, decides again as a
//!    new caller would (claim an attempt, or wait for a newer one).
//! 5. User code (the initializer, the clock) never runs while the lock is
//!    held by the same call, except `Clock::now_nanos`, which must not
//!    touch this cell.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use super::InitError;
use super::shared::{self, Caught, Driver, WaitList};
use crate::clock::Clock;
use crate::sync::{Condvar, Mutex, OnceValue};

const WHAT: &str = "OnceInit";
const WHAT_INIT: &str = "OnceInit initializer";

/// An async one-shot initializer: the value is set exactly once, by an
/// initializer that runs at most once at a time, and read afterwards with one
/// atomic load.
///
/// - Callers that arrive while an attempt runs wait for it and share its
///   outcome, error included ([`InitError::Failed`] holds one `Arc<E>` for
///   all of them): a failing dependency is called once per attempt, not once
///   per waiter. A later call starts a new attempt; with
///   [`with_retry_backoff`](OnceInit::with_retry_backoff), calls inside the
///   cool-down after a failure return that failure at once instead.
/// - A panic in the initializer reaches every waiter as
///   [`InitError::Panicked`]; the cell is not poisoned.
/// - If the caller driving an attempt is cancelled, its initializer's future
///   is dropped, then one of the waiters takes over with its own
///   initializer. Attempts never overlap; waiters never hang.
/// - An initializer that awaits its own cell gets [`InitError::Reentrant`]
///   instead of deadlocking.
///
/// The error type `E` is part of the cell's type because callers share the
/// error of an attempt that another caller's initializer produced.
///
/// ```
/// use raceguard::once::OnceInit;
///
/// struct Client { url: String }
///
/// // The lazy global client of seed 003, without the race: however many
/// // requests arrive at once, one client is created.
/// static CLIENT: OnceInit<Client, std::io::Error> = OnceInit::new();
///
/// async fn client() -> Result<&'static Client, raceguard::Error> {
///     Ok(CLIENT
///         .get_or_try_init(|| async { Ok(Client { url: "db:5432".into() }) })
///         .await?)
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let a = client().await?;
/// let b = client().await?;
/// assert!(std::ptr::eq(a, b));
/// assert_eq!(CLIENT.get().map(|c| c.url.as_str()), Some("db:5432"));
/// # Ok::<(), raceguard::Error>(())
/// # }).unwrap();
/// ```
pub struct OnceInit<T, E> {
    value: OnceValue<T>,
    state: Mutex<State<E>>,
    blocked: Condvar,
    backoff: Option<Backoff>,
}

struct Backoff {
    cool_down_nanos: u64,
    clock: Box<dyn Clock>,
}

struct State<E> {
    /// The attempt being run, if any (invariant 2).
    running: Option<u64>,
    /// Attempts claimed so far; attempt numbers start at 1.
    attempts: u64,
    /// The latest failed attempt (invariant 4).
    failure: Option<Failure<E>>,
    /// Async waiters.
    waiters: WaitList,
    /// Threads blocked in `get_or_try_init_blocking`.
    blocked: usize,
}

struct Failure<E> {
    attempt: u64,
    error: InitError<E>,
    /// Clock time of the failure (only read with a backoff).
    at_nanos: u64,
}

impl<E> State<E> {
    const fn new() -> Self {
        State {
            running: None,
            attempts: 0,
            failure: None,
            waiters: WaitList::new(),
            blocked: 0,
        }
    }
}

/// What a caller does next, decided under the lock.
enum Step<'a, T, E> {
    Done(Result<&'a T, InitError<E>>),
    Wait,
    Claim(u64),
}

impl<T, E> OnceInit<T, E> {
    /// An empty cell. `const`, so it can be a `static`.
    ///
    /// ```
    /// use raceguard::once::OnceInit;
    /// static CONFIG: OnceInit<String, std::io::Error> = OnceInit::new();
    /// assert!(CONFIG.get().is_none());
    /// ```
    #[cfg(not(raceguard_loom))]
    pub const fn new() -> Self {
        OnceInit {
            value: OnceValue::new(),
            state: Mutex::const_new(State::new()),
            blocked: Condvar::const_new(),
            backoff: None,
        }
    }

    /// An empty cell (not `const` in loom builds).
    #[cfg(raceguard_loom)]
    pub fn new() -> Self {
        OnceInit {
            value: OnceValue::new(),
            state: Mutex::new(State::new()),
            blocked: Condvar::new(),
            backoff: None,
        }
    }

    /// An empty cell whose failed attempts start a cool-down: for
    /// `cool_down` after an attempt fails or panics (measured on `clock`),
    /// callers get that attempt's error at once and no new attempt starts.
    /// Callers that were already waiting for the failed attempt get its
    /// error as usual. The first call after the cool-down starts a new
    /// attempt.
    ///
    /// ```
    /// use std::time::Duration;
    /// use raceguard::clock::ManualClock;
    /// use raceguard::once::{InitError, OnceInit};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let clock = ManualClock::new();
    /// let cell: OnceInit<u32, &str> = OnceInit::with_retry_backoff(Duration::from_secs(5), clock.clone());
    /// let first = cell.get_or_try_init(|| async { Err("down") }).await.unwrap_err();
    /// // Inside the cool-down: the same error, and the initializer does not run.
    /// let again = cell.get_or_try_init(|| async { unreachable!() }).await.unwrap_err();
    /// match (first, again) {
    ///     (InitError::Failed(a), InitError::Failed(b)) => assert!(std::sync::Arc::ptr_eq(&a, &b)),
    ///     _ => unreachable!(),
    /// }
    /// clock.advance(Duration::from_secs(5));
    /// assert_eq!(cell.get_or_try_init(|| async { Ok(7) }).await.ok(), Some(&7));
    /// # });
    /// ```
    pub fn with_retry_backoff(cool_down: Duration, clock: impl Clock) -> Self {
        let mut cell = Self::new();
        cell.backoff = Some(Backoff {
            cool_down_nanos: u64::try_from(cool_down.as_nanos()).unwrap_or(u64::MAX),
            clock: Box::new(clock),
        });
        cell
    }

    /// The value, if initialized. One atomic load; never waits.
    ///
    /// ```
    /// use raceguard::once::OnceInit;
    /// let cell: OnceInit<u8, ()> = OnceInit::new();
    /// assert_eq!(cell.get(), None);
    /// ```
    #[inline]
    pub fn get(&self) -> Option<&T> {
        self.value.get()
    }

    /// The value, initializing it with `init` if needed.
    ///
    /// If the cell is empty and no attempt is running, this call runs
    /// `init` (it *drives* the attempt). If an attempt is running, this call
    /// waits for it and returns its outcome; `init` is not called unless the
    /// driver is cancelled and this caller takes over.
    ///
    /// # Errors
    ///
    /// - [`InitError::Failed`]: the attempt this call ran or waited for
    ///   failed (all its waiters share the `Arc`), or the cell is inside its
    ///   retry cool-down after such a failure.
    /// - [`InitError::Panicked`]: the attempt's initializer panicked.
    /// - [`InitError::Reentrant`]: called from this cell's own initializer.
    ///
    /// The cell stays empty after an error; a later call may retry.
    ///
    /// # Cancellation
    ///
    /// Dropping a waiting call only removes it from the waiters. Dropping
    /// the call that drives the attempt drops `init`'s future, then wakes
    /// the waiters, one of which runs its own initializer; if nobody waits,
    /// the next call starts a new attempt.
    ///
    /// ```
    /// use raceguard::once::OnceInit;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let cell: OnceInit<String, std::io::Error> = OnceInit::new();
    /// let v = cell.get_or_try_init(|| async { Ok("ready".to_string()) }).await?;
    /// assert_eq!(v, "ready");
    /// # Ok::<(), raceguard::once::InitError<std::io::Error>>(())
    /// # }).unwrap();
    /// ```
    pub async fn get_or_try_init<F, Fut>(&self, init: F) -> Result<&T, InitError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if let Some(v) = self.value.get() {
            return Ok(v);
        }
        if shared::is_driving(self.mark()) {
            return Err(InitError::Reentrant { what: WHAT });
        }
        let attempt = {
            let mut waiting = Waiting::new(self);
            match poll_fn(|cx| waiting.poll_step(cx, true)).await {
                Ok(done) => return done,
                Err(attempt) => attempt,
            }
        };
        let slot = pin!(Option::<Fut>::None);
        let mut driver = Driver::new(self.mark(), init, slot, Claim::new(self, attempt));
        let (outcome, claim) = poll_fn(|cx| driver.poll_work(cx)).await;
        claim.publish(outcome)
    }

    /// Like [`get_or_try_init`](OnceInit::get_or_try_init), for synchronous
    /// code: waits by blocking the thread, and `init` is a plain closure.
    ///
    /// For threads outside an async runtime (seed 004 initialized from a
    /// synchronous request handler). Do not call it on an async runtime's
    /// worker thread: it blocks that thread while another caller's attempt
    /// runs. Blocking and async callers share attempts with each other.
    ///
    /// # Errors
    ///
    /// As [`get_or_try_init`](OnceInit::get_or_try_init).
    ///
    /// ```
    /// use raceguard::once::OnceInit;
    ///
    /// static APP: OnceInit<&str, std::io::Error> = OnceInit::new();
    /// let handlers: Vec<_> = (0..4)
    ///     .map(|_| std::thread::spawn(|| *APP.get_or_try_init_blocking(|| Ok("initialized")).unwrap()))
    ///     .collect();
    /// for h in handlers {
    ///     assert_eq!(h.join().unwrap(), "initialized");
    /// }
    /// ```
    pub fn get_or_try_init_blocking<F>(&self, init: F) -> Result<&T, InitError<E>>
    where
        F: FnOnce() -> Result<T, E>,
    {
        if let Some(v) = self.value.get() {
            return Ok(v);
        }
        if shared::is_driving(self.mark()) {
            return Err(InitError::Reentrant { what: WHAT });
        }
        let attempt = {
            let mut st = self.state.lock();
            let mut awaited = None;
            loop {
                match self.step(&mut st, &mut awaited, true) {
                    Step::Done(done) => return done,
                    Step::Claim(attempt) => break attempt,
                    Step::Wait => {
                        st.blocked += 1;
                        st = self.blocked.wait(st);
                        st.blocked -= 1;
                    }
                }
            }
        };
        let claim = Claim::new(self, attempt);
        let outcome = shared::call_caught(self.mark(), init);
        claim.publish(outcome)
    }

    /// Waits until the cell holds a value, without ever running an
    /// initializer: for code that only reads. Failed attempts do not end the
    /// wait; bound it with a timeout (`tokio::time::timeout`) where needed.
    ///
    /// # Panics
    ///
    /// If called from this cell's own initializer (it would wait for itself
    /// forever). The initializer catches the panic like any other and its
    /// attempt fails with [`InitError::Panicked`].
    ///
    /// # Cancellation
    ///
    /// Dropping the future only removes this reader from the waiters.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use raceguard::once::OnceInit;
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let cell = Arc::new(OnceInit::<u32, std::io::Error>::new());
    /// let reader = tokio::spawn({
    ///     let cell = cell.clone();
    ///     async move { *cell.wait().await }
    /// });
    /// cell.get_or_try_init(|| async { Ok(5) }).await.unwrap();
    /// assert_eq!(reader.await.unwrap(), 5);
    /// # });
    /// ```
    pub async fn wait(&self) -> &T {
        if let Some(v) = self.value.get() {
            return v;
        }
        assert!(
            !shared::is_driving(self.mark()),
            "OnceInit::wait called from the cell's own initializer: it would deadlock"
        );
        let mut waiting = Waiting::new(self);
        match poll_fn(|cx| waiting.poll_step(cx, false)).await {
            Ok(Ok(v)) => v,
            // A reader never claims an attempt and is never handed an error.
            _ => unreachable!("a reader only finishes with the value"),
        }
    }

    /// How many callers are waiting for the running attempt right now (a
    /// snapshot, for metrics and tests).
    ///
    /// ```
    /// use raceguard::once::OnceInit;
    /// let cell: OnceInit<u8, ()> = OnceInit::new();
    /// assert_eq!(cell.waiters(), 0);
    /// ```
    pub fn waiters(&self) -> usize {
        let st = self.state.lock();
        st.waiters.len() + st.blocked
    }

    /// The id used for re-entrancy marks: the state's address, stable while
    /// `&self` is borrowed.
    fn mark(&self) -> usize {
        std::ptr::from_ref(&self.state).addr()
    }

    fn now_nanos(&self) -> u64 {
        self.backoff.as_ref().map_or(0, |b| b.clock.now_nanos())
    }

    /// The decision of one caller, under the lock. `awaited` is the attempt
    /// this caller waits for; `drive` is false for readers (`wait`).
    fn step<'a>(
        &'a self,
        st: &mut State<E>,
        awaited: &mut Option<u64>,
        drive: bool,
    ) -> Step<'a, T, E> {
        if let Some(v) = self.value.get() {
            return Step::Done(Ok(v));
        }
        if !drive {
            return Step::Wait;
        }
        if let (Some(n), Some(f)) = (*awaited, &st.failure)
            && f.attempt >= n
        {
            return Step::Done(Err(f.error.clone()));
        }
        if let Some(n) = st.running {
            *awaited = Some(n);
            return Step::Wait;
        }
        if let (Some(b), Some(f)) = (&self.backoff, &st.failure)
            && b.clock.now_nanos() < f.at_nanos.saturating_add(b.cool_down_nanos)
        {
            return Step::Done(Err(f.error.clone()));
        }
        st.attempts += 1;
        st.running = Some(st.attempts);
        Step::Claim(st.attempts)
    }

    /// Releases attempt `attempt`: with a value, a failure, or neither
    /// (abandoned). Wakes every waiter.
    fn release(
        &self,
        attempt: u64,
        outcome: Option<Result<T, InitError<E>>>,
    ) -> Option<Result<&T, InitError<E>>> {
        let at_nanos = match &outcome {
            Some(Err(_)) => self.now_nanos(),
            _ => 0,
        };
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
                let mut v = Some(v);
                let stored = self.value.get_or_init(|| v.take().expect("taken once"));
                debug_assert!(v.is_none(), "the value was set twice");
                st.failure = None;
                Ok(stored)
            }
            Err(error) => {
                st.failure = Some(Failure {
                    attempt,
                    error: error.clone(),
                    at_nanos,
                });
                Err(error)
            }
        });
        let blocked = st.blocked > 0;
        drop(st);
        shared::wake_all(wakers);
        if blocked {
            self.blocked.notify_all();
        }
        result
    }
}

impl<T, E> Default for OnceInit<T, E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: fmt::Debug, E> fmt::Debug for OnceInit<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("OnceInit");
        match self.get() {
            Some(v) => d.field("value", v),
            None => {
                let st = self.state.lock();
                d.field("value", &format_args!("<empty>"))
                    .field("running", &st.running.is_some())
                    .field("attempts", &st.attempts)
                    .field("waiters", &(st.waiters.len() + st.blocked))
            }
        };
        d.finish_non_exhaustive()
    }
}

/// An async caller waiting on the cell; deregisters when dropped.
struct Waiting<'a, T, E> {
    cell: &'a OnceInit<T, E>,
    id: Option<u64>,
    awaited: Option<u64>,
}

impl<'a, T, E> Waiting<'a, T, E> {
    fn new(cell: &'a OnceInit<T, E>) -> Self {
        Waiting {
            cell,
            id: None,
            awaited: None,
        }
    }

    /// `Ready(Ok(outcome))` when done, `Ready(Err(attempt))` when this
    /// caller claimed `attempt` and must drive it.
    fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        drive: bool,
    ) -> Poll<Result<Result<&'a T, InitError<E>>, u64>> {
        let mut st = self.cell.state.lock();
        let next = match self.cell.step(&mut st, &mut self.awaited, drive) {
            Step::Wait => {
                st.waiters.register(&mut self.id, cx.waker());
                return Poll::Pending;
            }
            Step::Done(done) => Ok(done),
            Step::Claim(attempt) => Err(attempt),
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

/// The right to run attempt `attempt`. Dropped without `publish`, it
/// abandons the attempt (invariant 2).
struct Claim<'a, T, E> {
    cell: &'a OnceInit<T, E>,
    attempt: Option<u64>,
}

impl<'a, T, E> Claim<'a, T, E> {
    fn new(cell: &'a OnceInit<T, E>, attempt: u64) -> Self {
        Claim {
            cell,
            attempt: Some(attempt),
        }
    }

    fn publish(mut self, outcome: Caught<Result<T, E>>) -> Result<&'a T, InitError<E>> {
        let attempt = self.attempt.take().expect("a claim is published once");
        let outcome = InitError::from_outcome(WHAT_INIT, outcome);
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
