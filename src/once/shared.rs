//! Machinery shared by [`OnceInit`](super::OnceInit),
//! [`Refreshable`](super::Refreshable) and [`SingleFlight`](super::SingleFlight):
//! the waiter list, the re-entrancy marks, and the [`Driver`] that runs a
//! caller's work with panics caught.
//!
//! Invariants:
//!
//! - A [`WaitList`] entry exists while its waiter waits for an outcome: it
//!   is added when the waiter joins and removed when the waiter returns or is
//!   dropped, or all at once when an outcome is published (`drain_wakers`).
//!   Waking for an abandoned attempt (`take_wakers`) keeps the entries, so
//!   `len()` still counts those waiters between the wake-up and their next
//!   poll.
//! - While user work (an initializer, a refresher, a flight's work) is being
//!   called or polled, the id of the cell it belongs to is in this thread's
//!   driving set, and only then. A caller that finds its cell's id there is
//!   the work calling back into its own cell: it gets
//!   [`InitError::Reentrant`](super::InitError::Reentrant) instead of
//!   waiting for itself.
//! - A [`Driver`] drops the user future *before* it lets go of its claim
//!   (outcome published, or the claim dropped, which abandons the attempt),
//!   so the next attempt never starts while the previous one's future still
//!   exists.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::sync::StdArc;

/// Callers waiting for a shared attempt, in join order.
#[derive(Debug, Default)]
pub(super) struct WaitList {
    next_id: u64,
    /// Sorted by id (ids only grow), so lookups are binary searches.
    entries: Vec<(u64, Option<Waker>)>,
}

impl WaitList {
    pub(super) const fn new() -> Self {
        WaitList {
            next_id: 0,
            entries: Vec::new(),
        }
    }

    /// Adds a waiter that has no waker yet; returns its id.
    pub(super) fn join(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push((id, None));
        id
    }

    /// Stores `waker` for waiter `*id`, joining first when `*id` is `None`.
    pub(super) fn register(&mut self, id: &mut Option<u64>, waker: &Waker) {
        if let Some(i) = *id
            && let Ok(pos) = self.entries.binary_search_by_key(&i, |e| e.0)
        {
            let slot = &mut self.entries[pos].1;
            if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
                *slot = Some(waker.clone());
            }
            return;
        }
        let i = self.join();
        if let Some(last) = self.entries.last_mut() {
            last.1 = Some(waker.clone());
        }
        *id = Some(i);
    }

    /// Removes waiter `id` (a no-op when it is not there).
    pub(super) fn remove(&mut self, id: u64) {
        if let Ok(pos) = self.entries.binary_search_by_key(&id, |e| e.0) {
            self.entries.remove(pos);
        }
    }

    /// Number of waiting callers.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Takes every stored waker (to wake after unlocking); entries stay,
    /// so the waiters are still counted (an abandoned attempt: they decide
    /// again).
    pub(super) fn take_wakers(&mut self) -> Vec<Waker> {
        self.entries.iter_mut().filter_map(|e| e.1.take()).collect()
    }

    /// Takes every stored waker and forgets every waiter (an outcome was
    /// published: each waiter finds it on its next poll and needs no entry;
    /// later `remove`s are no-ops). Keeps a burst's exits O(1) each.
    pub(super) fn drain_wakers(&mut self) -> Vec<Waker> {
        self.entries.drain(..).filter_map(|e| e.1).collect()
    }
}

/// Wakes `wakers`. Call it after releasing the lock they were taken under.
pub(super) fn wake_all(wakers: Vec<Waker>) {
    for w in wakers {
        w.wake();
    }
}

// Not `const { .. }`: loom's `thread_local!` does not take that form.
#[allow(clippy::missing_const_for_thread_local)]
mod driving {
    crate::sync::thread_local! {
    /// Ids of the cells whose work this thread is calling or polling now.
        pub(super) static DRIVING: std::cell::RefCell<Vec<usize>> = std::cell::RefCell::new(Vec::new());
    }
}
use driving::DRIVING;

/// Whether this thread is inside the work of the cell `id` right now.
pub(super) fn is_driving(id: usize) -> bool {
    DRIVING
        .try_with(|d| d.borrow().contains(&id))
        .unwrap_or(false)
}

/// Puts `id` in this thread's driving set until dropped.
struct DrivingMark(usize);

impl DrivingMark {
    fn enter(id: usize) -> Self {
        let _ = DRIVING.try_with(|d| d.borrow_mut().push(id));
        DrivingMark(id)
    }
}

impl Drop for DrivingMark {
    fn drop(&mut self) {
        let _ = DRIVING.try_with(|d| {
            let mut d = d.borrow_mut();
            if let Some(pos) = d.iter().rposition(|&x| x == self.0) {
                d.remove(pos);
            }
        });
    }
}

/// The message of a caught panic.
pub(super) fn panic_message(payload: &(dyn Any + Send)) -> StdArc<str> {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        StdArc::from(*s)
    } else if let Some(s) = payload.downcast_ref::<String>() {
        StdArc::from(s.as_str())
    } else {
        StdArc::from("<non-string panic payload>")
    }
}

/// The outcome of user work run with panics caught: `Err` holds the panic
/// message.
pub(super) type Caught<R> = Result<R, StdArc<str>>;

/// Calls synchronous user work under the driving mark `id`, catching a panic.
pub(super) fn call_caught<R>(id: usize, work: impl FnOnce() -> R) -> Caught<R> {
    let _mark = DrivingMark::enter(id);
    catch_unwind(AssertUnwindSafe(work)).map_err(|p| panic_message(&*p))
}

/// Runs one attempt of asynchronous user work for the holder of `claim`.
///
/// `poll_work` calls the closure, then polls its future, each under the
/// driving mark and with panics caught; when the work is done it drops the
/// future and hands the claim back with the outcome, for the caller to
/// publish. Dropped before that (the caller was cancelled), it drops the
/// future first and the claim second: the claim's own `Drop` abandons the
/// attempt, and by then the work no longer exists.
pub(super) struct Driver<'p, F, Fut, C> {
    mark: usize,
    work: Option<F>,
    fut: Pin<&'p mut Option<Fut>>,
    claim: Option<C>,
}

impl<'p, F, Fut, C> Driver<'p, F, Fut, C>
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    /// `slot` is where the work's future lives (pinned by the caller, `None`).
    pub(super) fn new(mark: usize, work: F, slot: Pin<&'p mut Option<Fut>>, claim: C) -> Self {
        Driver {
            mark,
            work: Some(work),
            fut: slot,
            claim: Some(claim),
        }
    }

    /// Drives the work. `Ready` carries its outcome (`Err` = the panic
    /// message) and the claim; the future has been dropped by then. Must not
    /// be called again after `Ready`.
    pub(super) fn poll_work(&mut self, cx: &mut Context<'_>) -> Poll<(Caught<Fut::Output>, C)> {
        let mark = DrivingMark::enter(self.mark);
        if let Some(work) = self.work.take() {
            match catch_unwind(AssertUnwindSafe(work)) {
                Ok(fut) => self.fut.set(Some(fut)),
                Err(p) => return Poll::Ready((Err(panic_message(&*p)), self.take_claim())),
            }
        }
        let outcome = match self.fut.as_mut().as_pin_mut() {
            Some(fut) => match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(out)) => Ok(out),
                Err(p) => Err(panic_message(&*p)),
            },
            None => unreachable!("Driver polled after completion"),
        };
        // The work ends here: drop its future before anyone can start the
        // next attempt. (If that drop panics, the unwinding drops `self`
        // with the claim still in it, which abandons the attempt.)
        self.fut.set(None);
        drop(mark);
        Poll::Ready((outcome, self.take_claim()))
    }

    fn take_claim(&mut self) -> C {
        self.claim.take().expect("Driver polled after completion")
    }
}

impl<F, Fut, C> Drop for Driver<'_, F, Fut, C> {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            // Cancelled mid-attempt: the work's future goes first, then the
            // claim (whose Drop abandons the attempt and wakes the waiters).
            let dropped = {
                let fut = self.fut.as_mut();
                catch_unwind(AssertUnwindSafe(move || {
                    let mut fut = fut;
                    fut.set(None);
                }))
            };
            drop(claim);
            if let Err(p) = dropped {
                resume_unwind(p);
            }
        }
    }
}

impl<F, Fut, C> std::fmt::Debug for Driver<'_, F, Fut, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("started", &self.work.is_none())
            .field("finished", &self.claim.is_none())
            .finish()
    }
}
