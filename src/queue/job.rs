//! [`JobHandle`] and the panic-catching wrapper around a job's future.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use crate::{Error, Result};

/// A job's boxed future, as produced by the queue's handler adapter.
pub(super) type BoxJob<R> = Pin<Box<dyn Future<Output = R> + Send + 'static>>;

/// The error a handle reports when its job was handed back or its worker
/// went away before the job finished, and `submit` after shutdown began.
pub(super) fn closed() -> Error {
    Error::Closed { what: "work queue" }
}

/// The result of one submitted job, as a future.
///
/// Resolves to:
///
/// - `Ok(r)`: the handler returned `r`;
/// - [`Error::Panicked`]: the handler panicked (the worker caught it and
///   went on with the next job);
/// - [`Error::Closed`]: the job never ran to completion: it was handed back
///   by [`WorkQueue::shutdown`](super::WorkQueue::shutdown), aborted at a
///   shutdown deadline, or the runtime shut down first;
/// - the rate limiter's error, when the queue's limiter failed (for example
///   a Redis limiter during an outage) before the job could start.
///
/// **Dropping a handle does not cancel the job**: the job still runs, its
/// result is discarded. Awaiting a handle is cancel-safe (dropping the
/// `await` loses only the result).
///
/// ```
/// use raceguard::queue::WorkQueue;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), raceguard::Error> {
/// let queue = WorkQueue::builder().build(|n: u32| async move { n * 2 })?;
/// let handle = queue.submit(21)?;
/// assert_eq!(handle.await?, 42);
/// # Ok(()) }
/// ```
#[must_use = "dropping a JobHandle does not cancel the job, but discards its result"]
pub struct JobHandle<R> {
    rx: oneshot::Receiver<Result<R>>,
}

impl<R> JobHandle<R> {
    pub(super) fn new(rx: oneshot::Receiver<Result<R>>) -> Self {
        JobHandle { rx }
    }
}

impl<R> fmt::Debug for JobHandle<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobHandle").finish_non_exhaustive()
    }
}

impl<R> Future for JobHandle<R> {
    type Output = Result<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<R>> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(closed())))
    }
}

/// Turns a panic payload into [`Error::Panicked`].
pub(super) fn panicked(payload: &(dyn Any + Send)) -> Error {
    let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    };
    Error::Panicked {
        what: "work queue job",
        message,
    }
}

/// Calls `start` and drives its future to completion, turning a panic in
/// either into [`Error::Panicked`].
pub(super) async fn run_caught<R>(start: impl FnOnce() -> BoxJob<R>) -> Result<R> {
    let mut fut = match catch_unwind(AssertUnwindSafe(start)) {
        Ok(fut) => fut,
        Err(p) => return Err(panicked(&*p)),
    };
    std::future::poll_fn(
        |cx| match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(r)) => Poll::Ready(Ok(r)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(p) => Poll::Ready(Err(panicked(&*p))),
        },
    )
    .await
}
