//! One-shot initialization, refreshable values and single-flight calls:
//! shared work that runs once for many concurrent callers (races R09, R11,
//! R12 of `docs/RACES.md`).
//!
//! | type | runs the work | callers that arrive meanwhile |
//! |---|---|---|
//! | [`OnceInit`] | until it succeeds once; then never again | wait and share the attempt's outcome |
//! | [`Refreshable`] | once per generation of the value | wait and share the new generation |
//! | [`SingleFlight`] | once per key at a time | wait and share the result |
//!
//! All three share one contract, where their peers each fall short somewhere:
//!
//! - **Errors are shared, not re-run.** Callers that waited for an attempt
//!   get its error (one [`Arc<E>`](std::sync::Arc) for all of them, inside
//!   [`InitError::Failed`]) instead of each running the work again: a dead
//!   dependency sees one call per attempt, not one per waiter.
//! - **Panics become errors.** A panic in the work is caught and every
//!   waiter gets [`InitError::Panicked`]; nothing is poisoned, and a later
//!   call may try again.
//! - **Cancellation never strands anyone.** The caller that drives an
//!   attempt may be cancelled (its future dropped). Its work's future is
//!   dropped first, then the waiters are woken and one of them takes over,
//!   running *its own* work: two attempts never overlap, no waiter hangs.
//!   The attempt is not detached (spawned) instead, because that would need
//!   a runtime and `'static` work, and would keep running work nobody waits
//!   for.
//! - **Re-entry is an error, not a deadlock.** Work that calls back into its
//!   own cell on the same task (an initializer awaiting its own
//!   [`OnceInit`]) gets [`InitError::Reentrant`]. Detection is per thread
//!   while the work is polled: re-entry through another task (the work
//!   spawns a task that awaits the cell, and awaits that task) cannot be seen
//!   and deadlocks, as it would with any lock.
//!
//! Every decision goes through the crate's loom shim, so loom models (the
//! crate's own and a downstream crate's, see `docs/LOOM.md`) explore every
//! interleaving of them.

mod once_init;
mod refreshable;
mod shared;
mod single_flight;

use std::fmt;

use crate::sync::StdArc;

pub use once_init::OnceInit;
pub use refreshable::{Generation, Refreshable, Snapshot};
pub use single_flight::SingleFlight;

/// Why a shared attempt (an initializer, a refresher, a single-flight call)
/// produced no value.
///
/// Every caller that waited for the same attempt gets a clone of the same
/// error: [`InitError::Failed`] holds one `Arc<E>` for all of them, so
/// `Arc::ptr_eq` tells callers apart from callers of another attempt. The
/// name follows [`ErrorKind::Init`](crate::ErrorKind::Init), which covers
/// single-flight calls too; it converts into [`crate::Error`] when `E` is an
/// error type.
///
/// ```
/// use std::sync::Arc;
/// use raceguard::once::{InitError, OnceInit};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let cell: OnceInit<u32, std::io::Error> = OnceInit::new();
/// let err = cell
///     .get_or_try_init(|| async { Err(std::io::Error::other("database down")) })
///     .await
///     .unwrap_err();
/// match &err {
///     InitError::Failed(e) => assert_eq!(e.to_string(), "database down"),
///     other => panic!("unexpected {other}"),
/// }
/// // Into the crate's error, keeping the cause.
/// let err: raceguard::Error = err.into();
/// assert_eq!(err.kind(), raceguard::ErrorKind::Init);
/// assert!(err.is_retryable());
/// # });
/// ```
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InitError<E> {
    /// The work returned an error. Callers that waited for the same attempt
    /// share this `Arc`; inside a [`OnceInit`] retry cool-down, callers get
    /// the last attempt's error without a new attempt.
    Failed(StdArc<E>),
    /// The work panicked. The panic was caught; the cell is not poisoned.
    Panicked {
        /// What panicked, e.g. `"OnceInit initializer"`.
        what: &'static str,
        /// The panic message, when the payload was a string.
        message: StdArc<str>,
    },
    /// The work called back into its own cell (it would have waited for
    /// itself forever).
    Reentrant {
        /// What was re-entered, e.g. `"OnceInit"`.
        what: &'static str,
    },
}

impl<E> InitError<E> {
    fn failed(error: E) -> Self {
        InitError::Failed(StdArc::new(error))
    }

    fn from_outcome<T>(what: &'static str, out: shared::Caught<Result<T, E>>) -> Result<T, Self> {
        match out {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(InitError::failed(e)),
            Err(message) => Err(InitError::Panicked { what, message }),
        }
    }
}

impl<E> Clone for InitError<E> {
    fn clone(&self) -> Self {
        match self {
            InitError::Failed(e) => InitError::Failed(e.clone()),
            InitError::Panicked { what, message } => InitError::Panicked {
                what,
                message: message.clone(),
            },
            InitError::Reentrant { what } => InitError::Reentrant { what },
        }
    }
}

impl<E: fmt::Display> fmt::Display for InitError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::Failed(e) => write!(f, "initialization failed: {e}"),
            InitError::Panicked { what, message } => write!(f, "{what} panicked: {message}"),
            InitError::Reentrant { what } => {
                write!(f, "re-entrant {what} detected; it would deadlock")
            }
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for InitError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            InitError::Failed(e) => Some(&**e),
            _ => None,
        }
    }
}

impl<E> From<InitError<E>> for crate::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(e: InitError<E>) -> Self {
        match e {
            InitError::Failed(e) => crate::Error::InitFailed(e),
            InitError::Panicked { what, message } => crate::Error::Panicked {
                what,
                message: message.to_string(),
            },
            InitError::Reentrant { what } => crate::Error::Reentrant { what },
        }
    }
}
