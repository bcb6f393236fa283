//! The load-shedding layer: 503 at once when a capacity has no room.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::RETRY_AFTER;
use http::{Request, Response, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use super::{empty, retry_after_value};
use crate::{Error, Result};

/// Whether a request may start now.
///
/// `try_admit` decides and reserves in one step (no check-then-act race):
/// it returns a permit that the layer holds until the inner service's
/// response future finishes (or is dropped), or how long the client should
/// wait before retrying.
///
/// Implemented by [`ConcurrencyCapacity`] (a semaphore), by a
/// [`WorkQueue`](crate::queue::WorkQueue) (shed while it is full, with its
/// [`retry_after_hint`](crate::queue::WorkQueue::retry_after_hint); pass
/// it with [`LoadShedLayer::shared`] to keep submitting to it from the
/// handlers), and by any closure `Fn() -> Option<Duration>` that returns
/// `Some(retry_after)` when full.
///
/// A queue or a closure only *observes* fullness; the work the request
/// submits can still find the queue full a moment later, which the queue
/// reports as its own typed error (answer it with 503 too).
///
/// ```
/// use std::time::Duration;
/// use raceguard::middleware::Capacity;
/// let full = || Some(Duration::from_secs(3));
/// assert_eq!(full.try_admit().unwrap_err(), Duration::from_secs(3));
/// let room = || None;
/// assert!(room.try_admit().is_ok());
/// ```
pub trait Capacity: Send + Sync + 'static {
    /// Held for the request's duration; dropping it gives the room back.
    type Permit: Send + 'static;

    /// Reserves room for one request, or says how long to wait.
    ///
    /// # Errors
    ///
    /// The `Retry-After` delay when there is no room.
    fn try_admit(&self) -> std::result::Result<Self::Permit, Duration>;
}

impl<F> Capacity for F
where
    F: Fn() -> Option<Duration> + Send + Sync + 'static,
{
    type Permit = ();

    fn try_admit(&self) -> std::result::Result<(), Duration> {
        match self() {
            None => Ok(()),
            Some(retry_after) => Err(retry_after),
        }
    }
}

/// Sheds while the queue is full (no reservation: the request's own
/// `submit` is what takes the room).
impl<J, R, K> Capacity for crate::queue::WorkQueue<J, R, K>
where
    J: Send + 'static,
    R: Send + 'static,
    K: std::hash::Hash + Eq + Clone + Send + 'static,
{
    type Permit = ();

    fn try_admit(&self) -> std::result::Result<(), Duration> {
        if self.is_full() {
            Err(self.retry_after_hint())
        } else {
            Ok(())
        }
    }
}

/// At most `max` requests in flight; the next one is shed (503) instead of
/// queued. Cloning shares the same semaphore.
///
/// ```
/// use std::time::Duration;
/// use raceguard::middleware::{Capacity, ConcurrencyCapacity};
/// let cap = ConcurrencyCapacity::new(1, Duration::from_secs(2))?;
/// let permit = cap.try_admit().unwrap();
/// assert_eq!(cap.try_admit().unwrap_err(), Duration::from_secs(2));
/// assert_eq!(cap.in_flight(), 1);
/// drop(permit);
/// assert!(cap.try_admit().is_ok());
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone)]
pub struct ConcurrencyCapacity {
    semaphore: Arc<Semaphore>,
    max: usize,
    retry_after: Duration,
}

impl fmt::Debug for ConcurrencyCapacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyCapacity")
            .field("max", &self.max)
            .field("in_flight", &self.in_flight())
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

impl ConcurrencyCapacity {
    /// Room for `max` concurrent requests; shed requests are told to retry
    /// after `retry_after` (sent rounded up to whole seconds, at least 1).
    ///
    /// ```
    /// let cap = raceguard::middleware::ConcurrencyCapacity::new(64, std::time::Duration::from_secs(1))?;
    /// assert_eq!(cap.max(), 64);
    /// assert!(raceguard::middleware::ConcurrencyCapacity::new(0, std::time::Duration::ZERO).is_err());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `max` is 0 or above tokio's semaphore
    /// limit.
    pub fn new(max: usize, retry_after: Duration) -> Result<Self> {
        if max == 0 || max > Semaphore::MAX_PERMITS {
            return Err(Error::invalid(
                "load shed capacity",
                format!("must be between 1 and {}", Semaphore::MAX_PERMITS),
            ));
        }
        Ok(ConcurrencyCapacity {
            semaphore: Arc::new(Semaphore::new(max)),
            max,
            retry_after,
        })
    }

    /// The configured maximum.
    ///
    /// ```
    /// let cap = raceguard::middleware::ConcurrencyCapacity::new(8, std::time::Duration::from_secs(1))?;
    /// assert_eq!(cap.max(), 8);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn max(&self) -> usize {
        self.max
    }

    /// Requests holding a permit right now.
    ///
    /// ```
    /// let cap = raceguard::middleware::ConcurrencyCapacity::new(8, std::time::Duration::from_secs(1))?;
    /// assert_eq!(cap.in_flight(), 0);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn in_flight(&self) -> usize {
        self.max - self.semaphore.available_permits()
    }
}

impl Capacity for ConcurrencyCapacity {
    type Permit = OwnedSemaphorePermit;

    fn try_admit(&self) -> std::result::Result<OwnedSemaphorePermit, Duration> {
        self.semaphore
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.retry_after)
    }
}

/// A tower layer that sheds load: when its [`Capacity`] has no room the
/// request is answered at once with 503 Service Unavailable and
/// `Retry-After` (whole seconds, rounded up, at least 1), without reaching
/// the inner service; it never waits.
///
/// The permit is held until the inner service's response future completes
/// (for a streamed body, not until the body ends).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use http::{Request, Response, StatusCode};
/// use raceguard::middleware::LoadShedLayer;
/// use tower::{Layer, ServiceExt};
///
/// let overloaded = || Some(Duration::from_millis(1500));
/// let svc = LoadShedLayer::new(overloaded).layer(tower::service_fn(|_: Request<()>| async {
///     Ok::<_, Infallible>(Response::new(String::new()))
/// }));
/// let resp = svc.oneshot(Request::new(())).await.unwrap();
/// assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
/// assert_eq!(resp.headers()["retry-after"], "2");
/// # });
/// ```
pub struct LoadShedLayer<C> {
    capacity: Arc<C>,
}

impl<C> Clone for LoadShedLayer<C> {
    fn clone(&self) -> Self {
        LoadShedLayer {
            capacity: self.capacity.clone(),
        }
    }
}

impl<C> fmt::Debug for LoadShedLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadShedLayer").finish_non_exhaustive()
    }
}

impl<C: Capacity> LoadShedLayer<C> {
    /// A layer admitting requests while `capacity` has room.
    ///
    /// ```
    /// use raceguard::middleware::{ConcurrencyCapacity, LoadShedLayer};
    /// let layer = LoadShedLayer::new(ConcurrencyCapacity::new(100, std::time::Duration::from_secs(1))?);
    /// # let _ = layer;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn new(capacity: C) -> Self {
        LoadShedLayer {
            capacity: Arc::new(capacity),
        }
    }

    /// A layer over a capacity the application also uses, such as the
    /// [`WorkQueue`](crate::queue::WorkQueue) its handlers submit to.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::sync::Arc;
    /// use raceguard::middleware::LoadShedLayer;
    /// use raceguard::queue::WorkQueue;
    /// use tower::{Layer, ServiceExt};
    ///
    /// let queue = Arc::new(WorkQueue::builder().capacity(1).workers(1).build(|_: ()| async {})?);
    /// let app = tower::service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    /// });
    /// let svc = LoadShedLayer::shared(queue.clone()).layer(app);
    /// let _held = queue.submit(())?; // fills the queue (the worker has not run yet)
    /// let resp = svc.oneshot(http::Request::new(())).await.unwrap();
    /// assert_eq!(resp.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    /// assert!(resp.headers().contains_key("retry-after"));
    /// # Ok::<(), raceguard::Error>(()) }).unwrap();
    /// ```
    pub fn shared(capacity: Arc<C>) -> Self {
        LoadShedLayer { capacity }
    }
}

impl<S, C> Layer<S> for LoadShedLayer<C> {
    type Service = LoadShedService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShedService {
            inner,
            capacity: self.capacity.clone(),
        }
    }
}

/// The service [`LoadShedLayer`] produces.
///
/// ```
/// use tower::Layer;
/// let svc: raceguard::middleware::LoadShedService<_, _> =
///     raceguard::middleware::LoadShedLayer::new(|| None).layer(tower::service_fn(|_: http::Request<()>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
///     }));
/// # let _ = svc;
/// ```
pub struct LoadShedService<S, C> {
    inner: S,
    capacity: Arc<C>,
}

impl<S: Clone, C> Clone for LoadShedService<S, C> {
    fn clone(&self) -> Self {
        LoadShedService {
            inner: self.inner.clone(),
            capacity: self.capacity.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for LoadShedService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadShedService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, C, ReqBody, ResBody> Service<Request<ReqBody>> for LoadShedService<S, C>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    C: Capacity,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match self.capacity.try_admit() {
            Ok(permit) => {
                // `call` on the service that was polled ready; the permit
                // lives as long as the response future.
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let resp = fut.await;
                    drop(permit);
                    resp
                })
            }
            Err(retry_after) => {
                tracing::debug!(?retry_after, "load shed: no capacity");
                let mut resp = empty(StatusCode::SERVICE_UNAVAILABLE);
                resp.headers_mut()
                    .insert(RETRY_AFTER, retry_after_value(retry_after));
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}
