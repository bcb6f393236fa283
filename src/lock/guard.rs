//! The held lock: [`LockGuard`], its lease state and the lost-lease signal.
//!
//! Invariants:
//!
//! - `state` starts `HELD` and moves once, by compare-and-swap, to one of
//!   `RELEASED`, `EXPIRED`, `NOT_HELD`; the CAS winner then fires the lost
//!   signal (the cancellation token behind [`LockGuard::lost_token`] and
//!   [`LockGuard::lost`]). Nothing moves it back.
//! - The lost signal is created on first use (most guards never ask for
//!   it), under the `background` mutex, which the CAS winner also takes
//!   after its CAS: either the winner finds the signal and fires it, or the
//!   creator, locking after the winner, sees the ended state and fires it
//!   itself. A signal is never left unfired on an ended lease.
//! - `valid_until` (on the manager's clock) only grows (`fetch_max`), and
//!   only from a renewal or extension that the backend confirmed, measured
//!   from the moment the request was sent.
//! - A lease counts as held only while `state == HELD` **and** the clock is
//!   before `valid_until`; the first observer of a passed `valid_until` ends
//!   the lease as `EXPIRED`.
//! - Metrics (feature `metrics`): the CAS winner counts the end
//!   (`raceguard_lock_lost_total` for `EXPIRED` and `NOT_HELD`), so each
//!   lease is counted once; a guard's release counts its answer.
//! - The background task (watchdog or validity timer) is stored in
//!   `background` before the guard is handed out; release takes it out,
//!   aborts it and (on explicit release) joins it before sending the
//!   compare-and-delete.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::token::Token;
use super::{FencingToken, Inner, LockName, token, watchdog};
use crate::Error;
use crate::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use crate::sync::{Mutex, StdArc};

const HELD: u8 = 0;
const RELEASED: u8 = 1;
const EXPIRED: u8 = 2;
const NOT_HELD: u8 = 3;

/// Why a lease ended.
///
/// ```
/// use raceguard::lock::LostReason;
/// assert_ne!(LostReason::Expired, LostReason::Released);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostReason {
    /// The lease's validity ran out (on the local monotonic clock, minus
    /// the drift allowance) before a renewal extended it. Another owner may
    /// hold the lock now.
    Expired,
    /// A renewal or extension found the lock gone or held by another owner
    /// (it expired on the server, the server restarted without persistence,
    /// a failover lost it).
    NotHeld,
    /// The guard was released or dropped.
    Released,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Expired => "lease expired",
            LostReason::NotHeld => "lock no longer held",
            LostReason::Released => "released",
        })
    }
}

/// The shared state of one acquisition, between the guard and its
/// background task.
pub(crate) struct Lease {
    pub(crate) inner: StdArc<Inner>,
    pub(crate) name: LockName,
    pub(crate) token: Token,
    pub(crate) fence: Option<FencingToken>,
    pub(crate) acquired_at: u64,
    pub(crate) max_hold: Option<u64>,
    ttl: AtomicU64,
    state: AtomicU8,
    valid_until: AtomicU64,
    background: Mutex<Background>,
}

/// What the guard, the lease's task and the lost signal share under one
/// mutex.
#[derive(Default)]
struct Background {
    /// The watchdog or validity timer.
    task: Option<tokio::task::JoinHandle<()>>,
    /// The lost signal, once asked for.
    ended: Option<CancellationToken>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("name", &self.name)
            .field("token", &self.token)
            .field("fence", &self.fence)
            .field("state", &self.reason())
            .finish_non_exhaustive()
    }
}

impl Lease {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        inner: StdArc<Inner>,
        name: LockName,
        token: Token,
        fence: Option<FencingToken>,
        ttl: u64,
        acquired_at: u64,
        valid_until: u64,
        max_hold: Option<u64>,
    ) -> Self {
        Lease {
            inner,
            name,
            token,
            fence,
            acquired_at,
            max_hold,
            ttl: AtomicU64::new(ttl),
            state: AtomicU8::new(HELD),
            valid_until: AtomicU64::new(valid_until),
            background: Mutex::new(Background::default()),
        }
    }

    pub(crate) fn ttl(&self) -> u64 {
        self.ttl.load(Ordering::Acquire)
    }

    pub(crate) fn valid_until(&self) -> u64 {
        self.valid_until.load(Ordering::Acquire)
    }

    /// Ends the lease with `reason` if it is still held; fires the signal.
    /// Returns whether this call ended it.
    pub(crate) fn end(&self, reason: LostReason) -> bool {
        self.end_and_take_task(reason, false).0
    }

    /// [`end`](Self::end), and with `take_task` also takes the background
    /// task out (one lock for both, on the release path).
    fn end_and_take_task(
        &self,
        reason: LostReason,
        take_task: bool,
    ) -> (bool, Option<tokio::task::JoinHandle<()>>) {
        let to = match reason {
            LostReason::Released => RELEASED,
            LostReason::Expired => EXPIRED,
            LostReason::NotHeld => NOT_HELD,
        };
        let won = self
            .state
            .compare_exchange(HELD, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if won {
            // Once per lease: only the CAS winner counts (and not a release).
            self.inner.metrics.ended(reason);
        }
        if !won && !take_task {
            return (false, None);
        }
        let (signal, task) = {
            // Locked after the CAS: a signal created later sees the end.
            let mut bg = self.background.lock();
            let signal = if won { bg.ended.take() } else { None };
            let task = if take_task { bg.task.take() } else { None };
            (signal, task)
        };
        if let Some(signal) = signal {
            signal.cancel();
        }
        (won, task)
    }

    /// The lost signal (created on first use), fired already if the lease
    /// has ended; with `timer`, also starts the validity timer task when
    /// there is no background task yet and the lease is held.
    fn signal(self: &StdArc<Self>, timer: bool) -> CancellationToken {
        let (signal, ended) = {
            let mut bg = self.background.lock();
            let signal = bg.ended.get_or_insert_with(CancellationToken::new).clone();
            // Read under the lock: an end whose CAS came first has locked
            // and unlocked by now, or will find `signal` when it locks.
            let ended = self.reason().is_some();
            if timer
                && !ended
                && bg.task.is_none()
                && let Ok(handle) = tokio::runtime::Handle::try_current()
            {
                bg.task = Some(handle.spawn(watchdog::run(self.clone(), false)));
            }
            (signal, ended)
        };
        if ended {
            signal.cancel();
        }
        signal
    }

    /// Why the lease ended, or `None` while it is held.
    pub(crate) fn reason(&self) -> Option<LostReason> {
        match self.state.load(Ordering::Acquire) {
            HELD => None,
            RELEASED => Some(LostReason::Released),
            EXPIRED => Some(LostReason::Expired),
            _ => Some(LostReason::NotHeld),
        }
    }

    /// Whether the lease is held at `now`; ends it as expired when its
    /// validity has run out.
    pub(crate) fn held_at(&self, now: u64) -> bool {
        if self.state.load(Ordering::Acquire) != HELD {
            return false;
        }
        if now >= self.valid_until() {
            self.end(LostReason::Expired);
            return false;
        }
        true
    }

    /// Records a confirmed renewal (or extension) to `ttl`, sent at `start`.
    pub(crate) fn record_renewal(&self, start: u64, ttl: u64) {
        let until = token::valid_until(start, ttl, self.inner.drift(ttl));
        self.valid_until.fetch_max(until, Ordering::AcqRel);
    }

    fn set_ttl(&self, ttl: u64) {
        self.ttl.store(ttl, Ordering::Release);
    }

    /// Ends the lease as released (if still held) and takes its background
    /// task out, to be stopped before the compare-and-delete.
    pub(crate) fn release_and_take_task(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.end_and_take_task(LostReason::Released, true).1
    }
}

/// A held lock. Release it with [`release`](Self::release) to learn
/// whether it was still held; dropping it releases too, without blocking.
///
/// ```
/// use std::time::Duration;
/// use raceguard::lock::{LockManager, LockName, LockOptions, LostReason};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), raceguard::Error> {
/// let locks = LockManager::memory();
/// let guard = locks.acquire(&LockName::new("report")?, LockOptions::new(Duration::from_secs(30))).await?;
/// let lost = guard.lost();
/// assert!(guard.is_held());
/// assert!(guard.release().await?);
/// assert_eq!(lost.await, LostReason::Released);
/// # Ok(()) }
/// ```
#[must_use = "dropping the guard releases the lock at once"]
pub struct LockGuard {
    lease: StdArc<Lease>,
    done: bool,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("name", &self.lease.name)
            .field("fencing_token", &self.lease.fence)
            .field("held", &self.is_held())
            .finish()
    }
}

impl LockGuard {
    /// Wraps a fresh lease and starts its watchdog (before the guard exists
    /// for anyone to release).
    pub(crate) fn start(lease: Lease) -> Self {
        let lease = StdArc::new(lease);
        if lease.max_hold.is_some() {
            let handle = tokio::spawn(watchdog::run(lease.clone(), true));
            lease.background.lock().task = Some(handle);
        }
        LockGuard { lease, done: false }
    }

    #[cfg(all(test, raceguard_loom))]
    pub(crate) fn lease(&self) -> &Lease {
        &self.lease
    }

    #[cfg(all(test, raceguard_loom))]
    pub(crate) fn lease_arc(&self) -> StdArc<Lease> {
        self.lease.clone()
    }

    /// The lock's name.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use raceguard::lock::{LockManager, LockName, LockOptions};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let g = LockManager::memory().try_acquire(&LockName::new("n")?, LockOptions::default()).await?;
    /// assert_eq!(g.name().as_str(), "n");
    /// # Ok(()) }
    /// ```
    pub fn name(&self) -> &LockName {
        &self.lease.name
    }

    /// This acquisition's fencing token, when one was issued: larger than
    /// every token issued for this lock before. Send it with each write to
    /// the protected resource ([`FencingGuard`](super::FencingGuard),
    /// [`Fenced`](super::Fenced)).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use raceguard::lock::{LockManager, LockName, LockOptions};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let locks = LockManager::memory();
    /// let name = LockName::new("n")?;
    /// let a = locks.try_acquire(&name, LockOptions::default()).await?.fencing_token();
    /// let b = locks.try_acquire(&name, LockOptions::default()).await?.fencing_token();
    /// assert!(b > a);
    /// # Ok(()) }
    /// ```
    pub fn fencing_token(&self) -> Option<FencingToken> {
        self.lease.fence
    }

    /// Whether the lease is still held, as far as this process knows: not
    /// released, no renewal found it gone, and its validity (local
    /// monotonic clock, minus drift) has not run out. Asks no server.
    ///
    /// A `true` is only as good as the time it takes to act on it: a
    /// process pause right after can outlast the lease. Protect writes with
    /// the [fencing token](Self::fencing_token).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use raceguard::lock::{LockConfig, LockManager, LockName, LockOptions};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let clock = raceguard::ManualClock::new();
    /// let locks = LockManager::memory_with(LockConfig::default().clock(clock.clone()))?;
    /// let g = locks.try_acquire(&LockName::new("n")?, LockOptions::new(Duration::from_secs(1))).await?;
    /// assert!(g.is_held());
    /// clock.advance(Duration::from_secs(1));
    /// assert!(!g.is_held());
    /// # Ok(()) }
    /// ```
    pub fn is_held(&self) -> bool {
        self.lease.held_at(self.lease.inner.now())
    }

    /// How much validity is left (zero once the lease ended).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use raceguard::lock::{LockConfig, LockManager, LockName, LockOptions};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let clock = raceguard::ManualClock::new();
    /// let locks = LockManager::memory_with(LockConfig::default().clock(clock.clone()))?;
    /// let g = locks.try_acquire(&LockName::new("n")?, LockOptions::new(Duration::from_secs(1))).await?;
    /// clock.advance(Duration::from_millis(400));
    /// assert_eq!(g.remaining(), Duration::from_millis(600));
    /// # Ok(()) }
    /// ```
    pub fn remaining(&self) -> Duration {
        let now = self.lease.inner.now();
        if !self.lease.held_at(now) {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.lease.valid_until().saturating_sub(now))
    }

    /// A future that resolves when the lease ends, with the reason: a
    /// renewal found the lock gone ([`LostReason::NotHeld`]), its validity
    /// ran out ([`LostReason::Expired`]), or the guard was released
    /// ([`LostReason::Released`]). Select on it next to the protected work
    /// and stop the work when it fires.
    ///
    /// Waiting for expiry needs a tokio runtime (timer); without one the
    /// future still resolves on renewal failure and release.
    ///
    /// Cancellation: dropping the future has no effect on the lease.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use raceguard::lock::{LockManager, LockName, LockOptions, LostReason};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let locks = LockManager::memory();
    /// let g = locks.try_acquire(&LockName::new("n")?, LockOptions::new(Duration::from_secs(30))).await?;
    /// let lost = g.lost();
    /// let worker = tokio::spawn(async move {
    ///     tokio::select! {
    ///         _ = std::future::pending::<()>() => unreachable!("work that never ends"),
    ///         why = lost => why, // stop working: the lock is gone
    ///     }
    /// });
    /// drop(g);
    /// assert_eq!(worker.await.unwrap(), LostReason::Released);
    /// # Ok(()) }
    /// ```
    pub fn lost(&self) -> LostLease {
        LostLease {
            lease: self.lease.clone(),
            cancelled: Box::pin(self.lease.signal(false).cancelled_owned()),
            sleep: None,
        }
    }

    /// A cancellation token that is cancelled when the lease ends (for any
    /// reason of [`LostReason`]): hand it to spawned work. It is a child
    /// token: cancelling it does not affect the lease.
    ///
    /// Firing at expiry needs a timer: the watchdog when there is one,
    /// otherwise a small task spawned on the current tokio runtime by the
    /// first call (without a runtime, the token fires on renewal failure
    /// and release only).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use raceguard::lock::{LockManager, LockName, LockOptions};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let g = LockManager::memory().try_acquire(&LockName::new("n")?, LockOptions::default()).await?;
    /// let stop = g.lost_token();
    /// assert!(!stop.is_cancelled());
    /// drop(g);
    /// assert!(stop.is_cancelled());
    /// # Ok(()) }
    /// ```
    pub fn lost_token(&self) -> CancellationToken {
        self.lease.signal(true).child_token()
    }

    /// Extends the lease to `ttl` from now (compare-and-extend: only if this
    /// acquisition still holds the lock). Never re-takes a lock whose
    /// validity already ran out.
    ///
    /// # Errors
    ///
    /// [`Error::LockLost`] when the lease has ended or the server no longer
    /// has this acquisition's lock (the lease then ends as
    /// [`LostReason::NotHeld`]); [`Error::InvalidInput`] for a bad TTL;
    /// backend errors as [`LockManager::acquire`](super::LockManager::acquire)
    /// (the lease is unchanged; its validity keeps running).
    ///
    /// Cancellation: dropping the future leaves the lease as it was or
    /// extended; the local validity is only advanced once the server
    /// confirmed.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use raceguard::lock::{LockConfig, LockManager, LockName, LockOptions};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let clock = raceguard::ManualClock::new();
    /// let locks = LockManager::memory_with(LockConfig::default().clock(clock.clone()))?;
    /// let g = locks.try_acquire(&LockName::new("n")?, LockOptions::new(Duration::from_secs(1))).await?;
    /// clock.advance(Duration::from_millis(900));
    /// g.extend(Duration::from_secs(1)).await?;
    /// clock.advance(Duration::from_millis(900));
    /// assert!(g.is_held());
    /// # Ok(()) }
    /// ```
    pub async fn extend(&self, ttl: Duration) -> Result<(), Error> {
        let lease = &self.lease;
        let ttl = lease.inner.check_ttl(ttl)?;
        let start = lease.inner.now();
        if !lease.held_at(start) {
            return Err(self.lost_error());
        }
        match lease.inner.extend(&lease.name, lease.token, ttl).await? {
            true => {
                lease.set_ttl(ttl);
                lease.record_renewal(start, ttl);
                Ok(())
            }
            false => {
                lease.end(LostReason::NotHeld);
                Err(self.lost_error())
            }
        }
    }

    fn lost_error(&self) -> Error {
        Error::LockLost {
            resource: self.lease.name.as_str().to_owned(),
        }
    }

    /// Releases the lock: stops the watchdog (waiting for a renewal in
    /// flight), then deletes the lock **only if this acquisition still
    /// holds it**. Returns whether it did (`false`: the lease had expired
    /// or was taken over; nothing of the new holder's was touched).
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] / [`Error::Timeout`] when the server could not be
    /// asked; the lock then expires with its TTL. Redlock:
    /// [`Error::QuorumNotReached`] when too few nodes answered to tell.
    ///
    /// Cancellation: dropping the future midway releases in the background
    /// as dropping the guard does.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use raceguard::lock::{LockManager, LockName, LockOptions};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let g = LockManager::memory().try_acquire(&LockName::new("n")?, LockOptions::default()).await?;
    /// assert!(g.release().await?);
    /// # Ok(()) }
    /// ```
    pub async fn release(mut self) -> Result<bool, Error> {
        if let Some(bg) = self.lease.release_and_take_task() {
            bg.abort();
            // Joined: a renewal in flight completes (or is dropped) before
            // the delete is sent, so no renewal can land after it.
            let _ = bg.await;
        }
        let lease = &self.lease;
        let held = lease.inner.release(&lease.name, lease.token).await;
        if let Ok(h) = held {
            lease.inner.metrics.released(h);
        }
        self.done = true;
        lease.inner.wake(&lease.name);
        held
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let lease = &self.lease;
        let bg = lease.release_and_take_task();
        lease
            .inner
            .release_detached(lease.name.clone(), lease.token, bg, true);
    }
}

/// The future of [`LockGuard::lost`]: resolves with the reason the lease
/// ended.
///
/// ```
/// # use std::time::Duration;
/// # use raceguard::lock::{LockManager, LockName, LockOptions, LostLease, LostReason};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), raceguard::Error> {
/// let g = LockManager::memory().try_acquire(&LockName::new("n")?, LockOptions::default()).await?;
/// let lost: LostLease = g.lost();
/// g.release().await?;
/// assert_eq!(lost.await, LostReason::Released);
/// # Ok(()) }
/// ```
#[must_use = "futures do nothing unless polled"]
pub struct LostLease {
    lease: StdArc<Lease>,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl fmt::Debug for LostLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LostLease")
            .field("lock", &self.lease.name)
            .finish_non_exhaustive()
    }
}

impl Future for LostLease {
    type Output = LostReason;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<LostReason> {
        let this = &mut *self;
        loop {
            if let Some(reason) = this.lease.reason() {
                return Poll::Ready(reason);
            }
            if this.cancelled.as_mut().poll(cx).is_ready() {
                continue;
            }
            let now = this.lease.inner.now();
            if !this.lease.held_at(now) {
                continue;
            }
            if tokio::runtime::Handle::try_current().is_err() {
                return Poll::Pending;
            }
            let left = Duration::from_nanos(this.lease.valid_until().saturating_sub(now));
            let at = tokio::time::Instant::now() + left;
            match &mut this.sleep {
                Some(s) if s.deadline() == at => {}
                Some(s) => s.as_mut().reset(at),
                None => this.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            let sleep = this.sleep.as_mut().expect("set above");
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The timer fired: re-check the clock (it may differ from
            // tokio's, e.g. a manual clock in tests).
        }
    }
}
