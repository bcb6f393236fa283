//! The in-memory [`WorkQueue`]: bounded, N workers, optional rate limit,
//! per-key ordering, graceful shutdown.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::marker::PhantomData;
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::job::{BoxJob, JobHandle, closed, run_caught};
use crate::rate::{Decision, Limit};
use crate::sync::{Arc, Mutex, StdArc};
use crate::{Error, Result};

/// Default [`WorkQueueBuilder::capacity`].
pub const DEFAULT_CAPACITY: usize = 1024;

/// The [`WorkQueue::retry_after_hint`] of a full queue that has not yet
/// measured how fast it drains.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Shortest pause of a worker after a denial (guards against a limiter that
/// denies with a zero `retry_after`).
const MIN_LIMIT_PAUSE: Duration = Duration::from_millis(1);

type Handler<J, R> = dyn Fn(J) -> BoxJob<R> + Send + Sync;
type LimitFn = dyn Fn() -> Pin<Box<dyn Future<Output = Result<Decision>> + Send>> + Send + Sync;

/// How [`WorkQueue::shutdown`] treats the jobs that are still queued.
///
/// In both modes the queue stops accepting jobs at once (`submit` returns
/// [`Error::Closed`]) and `shutdown` returns by its deadline: a handler that
/// is still running when the deadline passes is aborted (its future is
/// dropped at its next `.await`; its handle resolves to [`Error::Closed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Shutdown {
    /// Keep running queued jobs for up to this long; then hand back what is
    /// still queued and abort what is still running.
    Drain(Duration),
    /// Hand back every queued job now; give the running ones up to this long
    /// to finish, then abort them.
    HandBack(Duration),
}

/// What [`WorkQueue::shutdown`] did. Every accepted job is counted exactly
/// once: `accepted == completed + handed_back.len() + aborted`.
#[derive(Debug)]
#[non_exhaustive]
pub struct ShutdownReport<J> {
    /// Jobs accepted over the queue's life.
    pub accepted: usize,
    /// Jobs whose handle received an outcome: the handler's value, a caught
    /// panic, or the rate limiter's error.
    pub completed: usize,
    /// Jobs that never started, in submission order. Their handles resolve
    /// to [`Error::Closed`].
    pub handed_back: Vec<J>,
    /// Jobs whose handler was still running at the deadline and was
    /// aborted. Their handles resolve to [`Error::Closed`].
    pub aborted: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    /// Closed to new jobs; workers finish the queue, then exit.
    Draining,
    /// Closed; queued jobs were handed back; workers exit.
    HandingBack,
}

struct Entry<J, R, K> {
    seq: u64,
    job: J,
    tx: oneshot::Sender<Result<R>>,
    key: Option<K>,
}

struct State<J, R, K> {
    mode: Mode,
    /// Jobs a worker may start now, in order.
    ready: VecDeque<Entry<J, R, K>>,
    /// A key is present while one of its jobs is ready, held or running;
    /// the value is the key's jobs waiting behind it, in order.
    keys: HashMap<K, VecDeque<Entry<J, R, K>>>,
    /// `ready` plus every key's waiting jobs.
    queued: usize,
    /// Per worker: the job it took and is waiting on the rate limiter for.
    held: Vec<Option<Entry<J, R, K>>>,
    running: usize,
    accepted: usize,
    completed: usize,
    next_seq: u64,
    handed_back: Vec<(u64, J)>,
    /// Drain-rate estimate for `retry_after_hint`.
    last_take: Option<Instant>,
    backlog_at_last_take: bool,
    take_interval: Option<Duration>,
    limited_until: Option<Instant>,
    /// Worker tasks not yet exited (or aborted).
    live_workers: usize,
}

struct Inner<J, R, K> {
    state: Mutex<State<J, R, K>>,
    capacity: usize,
    workers: usize,
    handler: Box<Handler<J, R>>,
    limiter: Option<Box<LimitFn>>,
    name: Option<String>,
    metrics: QueueMetrics,
    /// Wakes idle workers (one per job; all on close).
    work: Notify,
    /// Wakes workers paused by the limiter when jobs are handed back.
    hand_back: Notify,
    /// Wakes `shutdown` calls when a worker task ends.
    exited: Notify,
}

/// A bounded queue of jobs run by N worker tasks (race R10 of
/// `docs/RACES.md`).
///
/// A webhook handler calls [`submit`](WorkQueue::submit), which never waits:
/// it returns a [`JobHandle`] or, when `capacity` jobs are already queued,
/// [`Error::CapacityExceeded`] at once (answer 503 with
/// [`retry_after_hint`](WorkQueue::retry_after_hint)). The workers run the
/// handler; with a [rate limit](WorkQueueBuilder::rate_limit) each worker
/// takes one cell before each job, so the external API behind the limiter is
/// never called faster than its quota, however bursty the webhooks are.
///
/// - **Per-key ordering**: jobs submitted with
///   [`submit_keyed`](WorkQueue::submit_keyed) and the same key run one at a
///   time, in submission order; different keys (and unkeyed jobs) run in
///   parallel.
/// - **Capacity** counts queued jobs (waiting to start, keyed or not), so at
///   most `capacity + workers` accepted jobs are unfinished at any time.
/// - **Panics** in the handler are caught: the job's handle resolves to
///   [`Error::Panicked`] and the worker goes on.
/// - **Shutdown**: [`shutdown`](WorkQueue::shutdown) drains or hands back
///   the queued jobs and reports every accepted job exactly once.
/// - **Dropping** the queue without `shutdown` closes it to new jobs; the
///   workers finish every queued job, then exit. Handles still resolve
///   (to [`Error::Closed`] if the runtime shuts down first).
///
/// The queue is `Send + Sync`; share it in an `Arc` (there is no hidden
/// global: each queue owns its workers).
///
/// ```
/// use std::time::Duration;
/// use raceguard::Error;
/// use raceguard::queue::{Shutdown, WorkQueue};
/// use raceguard::rate::{Quota, RateLimiter, TokioClock};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Error> {
/// // The external API allows 2 calls per second.
/// let api_limit = RateLimiter::with_clock(Quota::per_second(2)?, TokioClock::new());
/// let queue = WorkQueue::builder()
///     .capacity(3)
///     .workers(2)
///     .rate_limit(api_limit)
///     .build(|payload: String| async move { payload.len() })?;
///
/// // The webhook returns at once, accepted or not.
/// let accepted: Vec<_> = (0..3).map(|i| queue.submit(format!("event {i}"))).collect::<Result<_, _>>()?;
/// match queue.submit("one too many".into()) {
///     Err(Error::CapacityExceeded { capacity: 3, .. }) => { /* 503, Retry-After */ }
///     other => panic!("{other:?}"),
/// }
/// for handle in accepted {
///     assert_eq!(handle.await?, 7);
/// }
/// let report = queue.shutdown(Shutdown::Drain(Duration::from_secs(5))).await;
/// assert_eq!((report.accepted, report.completed), (3, 3));
/// # Ok(()) }
/// ```
pub struct WorkQueue<J, R, K = String> {
    inner: Arc<Inner<J, R, K>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Builds a [`WorkQueue`]; see [`WorkQueue::builder`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct WorkQueueBuilder<J, R, K = String> {
    capacity: usize,
    workers: usize,
    limiter: Option<Box<LimitFn>>,
    name: Option<String>,
    _types: PhantomData<fn(J, K) -> R>,
}

impl<J, R, K> fmt::Debug for WorkQueueBuilder<J, R, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkQueueBuilder")
            .field("capacity", &self.capacity)
            .field("workers", &self.workers)
            .field("rate_limit", &self.limiter.is_some())
            .field("name", &self.name)
            .finish()
    }
}

impl<J, R> WorkQueue<J, R> {
    /// A builder with [`DEFAULT_CAPACITY`] queued jobs, one worker, no rate
    /// limit and `String` keys for [`submit_keyed`](WorkQueue::submit_keyed).
    ///
    /// ```
    /// use raceguard::queue::WorkQueue;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let queue = WorkQueue::builder()
    ///     .capacity(100)
    ///     .workers(4)
    ///     .build(|n: u64| async move { n + 1 })?;
    /// assert_eq!((queue.capacity(), queue.workers()), (100, 4));
    /// assert_eq!(queue.submit(1)?.await?, 2);
    /// # Ok(()) }
    /// ```
    pub fn builder() -> WorkQueueBuilder<J, R> {
        WorkQueueBuilder {
            capacity: DEFAULT_CAPACITY,
            workers: 1,
            limiter: None,
            name: None,
            _types: PhantomData,
        }
    }
}

impl<J, R, K> WorkQueueBuilder<J, R, K> {
    /// How many jobs may wait to start (at least 1). Running jobs do not
    /// count.
    ///
    /// ```
    /// # use raceguard::queue::WorkQueue;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let err = WorkQueue::builder().capacity(0).build(|n: u8| async move { n }).unwrap_err();
    /// assert_eq!(err.kind(), raceguard::ErrorKind::InvalidInput);
    /// # }
    /// ```
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// How many worker tasks run jobs concurrently (at least 1).
    ///
    /// ```
    /// # use raceguard::queue::WorkQueue;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let err = WorkQueue::builder().workers(0).build(|n: u8| async move { n }).unwrap_err();
    /// assert_eq!(err.to_string(), "invalid work_queue.workers: must be at least 1");
    /// # }
    /// ```
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// A limit every worker obeys: before starting a job a worker consumes
    /// one cell, and when denied it waits the decision's `retry_after`
    /// (Tokio time) and tries again. The workers together never exceed the
    /// limit. If the limiter fails (a backend error), the job is not run and
    /// its handle resolves to that error.
    ///
    /// The limit may be shared with other callers through
    /// [`shared_rate_limit`](WorkQueueBuilder::shared_rate_limit). Several
    /// limits at once (an API's per-second **and** per-day quota) are an
    /// [`AllOf`](crate::rate::AllOf) in memory or a
    /// [`RedisMultiLimit`](https://docs.rs/raceguard/latest/raceguard/redis/struct.RedisMultiLimit.html)
    /// across processes: both are a [`Limit`] taken all or nothing.
    ///
    /// ```
    /// use raceguard::queue::WorkQueue;
    /// use raceguard::rate::{Quota, RateLimiter, TokioClock};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let queue = WorkQueue::builder()
    ///     .workers(4)
    ///     .rate_limit(RateLimiter::with_clock(Quota::per_second(1)?, TokioClock::new()))
    ///     .build(|_: ()| async { tokio::time::Instant::now() })?;
    /// let (a, b) = (queue.submit(())?, queue.submit(())?);
    /// let (a, b) = (a.await?, b.await?);
    /// assert!(b.duration_since(a) >= std::time::Duration::from_secs(1));
    /// # Ok(()) }
    /// ```
    pub fn rate_limit<L: Limit + 'static>(self, limit: L) -> Self {
        self.shared_rate_limit(StdArc::new(limit))
    }

    /// [`rate_limit`](WorkQueueBuilder::rate_limit) with a limiter shared with
    /// other code (another queue, a direct caller of the same API).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use raceguard::queue::WorkQueue;
    /// use raceguard::clock::ManualClock;
    /// use raceguard::rate::{Quota, RateLimiter};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let api = Arc::new(RateLimiter::with_clock(Quota::per_second(10)?, ManualClock::new()));
    /// let queue = WorkQueue::builder()
    ///     .shared_rate_limit(api.clone())
    ///     .build(|n: u8| async move { n })?;
    /// let before = api.peek().remaining();
    /// assert_eq!(queue.submit(7)?.await?, 7);
    /// // The job took one cell of the shared limiter.
    /// assert_eq!(api.peek().remaining(), before - 1);
    /// # Ok(()) }
    /// ```
    pub fn shared_rate_limit<L: Limit + 'static>(mut self, limit: StdArc<L>) -> Self {
        self.limiter = Some(Box::new(move || {
            let limit = limit.clone();
            Box::pin(async move { limit.check_n(1).await })
        }));
        self
    }

    /// Names the queue: the `queue` label of its metrics (feature
    /// `metrics`; `"unnamed"` otherwise) and [`WorkQueue::name`]. Use a
    /// fixed name per queue, never a user's key; give each live queue its
    /// own name (queues sharing a name add up their counters but overwrite
    /// each other's depth gauge).
    ///
    /// ```
    /// use raceguard::queue::WorkQueue;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let queue = WorkQueue::builder().name("webhooks").build(|n: u8| async move { n })?;
    /// assert_eq!(queue.name(), Some("webhooks"));
    /// # Ok(()) }
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Changes the key type of [`submit_keyed`](WorkQueue::submit_keyed)
    /// (default `String`), e.g. to [`UserId`](crate::keys::UserId).
    ///
    /// ```
    /// use raceguard::keys::UserId;
    /// use raceguard::queue::WorkQueue;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let queue = WorkQueue::builder()
    ///     .keyed::<UserId>()
    ///     .build(|msg: &'static str| async move { msg })?;
    /// let alice = UserId::new("alice")?;
    /// assert_eq!(queue.submit_keyed(alice, "hi")?.await?, "hi");
    /// # Ok(()) }
    /// ```
    pub fn keyed<K2>(self) -> WorkQueueBuilder<J, R, K2> {
        WorkQueueBuilder {
            capacity: self.capacity,
            workers: self.workers,
            limiter: self.limiter,
            name: self.name,
            _types: PhantomData,
        }
    }

    /// Starts the workers on the current Tokio runtime.
    ///
    /// `handler` is called once per job, on a worker task. The runtime needs
    /// its time driver (`enable_time`/`enable_all`, the default of
    /// `#[tokio::main]`) for rate-limit pauses and shutdown deadlines.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when `capacity` or `workers` is 0, or when
    /// called outside a Tokio runtime.
    ///
    /// ```
    /// use raceguard::queue::WorkQueue;
    ///
    /// let err = WorkQueue::builder().build(|n: u8| async move { n }).unwrap_err();
    /// assert_eq!(err.to_string(), "invalid work_queue.runtime: build must be called inside a tokio runtime");
    /// ```
    pub fn build<F, Fut>(self, handler: F) -> Result<WorkQueue<J, R, K>>
    where
        F: Fn(J) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        J: Send + 'static,
        R: Send + 'static,
        K: Hash + Eq + Clone + Send + 'static,
    {
        if self.capacity == 0 {
            return Err(Error::invalid("work_queue.capacity", "must be at least 1"));
        }
        if self.workers == 0 {
            return Err(Error::invalid("work_queue.workers", "must be at least 1"));
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Err(Error::invalid(
                "work_queue.runtime",
                "build must be called inside a tokio runtime",
            ));
        };
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                mode: Mode::Open,
                ready: VecDeque::new(),
                keys: HashMap::new(),
                queued: 0,
                held: (0..self.workers).map(|_| None).collect(),
                running: 0,
                accepted: 0,
                completed: 0,
                next_seq: 0,
                handed_back: Vec::new(),
                last_take: None,
                backlog_at_last_take: false,
                take_interval: None,
                limited_until: None,
                live_workers: self.workers,
            }),
            capacity: self.capacity,
            workers: self.workers,
            handler: Box::new(move |job| Box::pin(handler(job))),
            limiter: self.limiter,
            metrics: QueueMetrics::new(self.name.as_deref()),
            name: self.name,
            work: Notify::new(),
            hand_back: Notify::new(),
            exited: Notify::new(),
        });
        let tasks = (0..self.workers)
            .map(|id| rt.spawn(worker(inner.clone(), id)))
            .collect();
        Ok(WorkQueue {
            inner,
            tasks: Mutex::new(tasks),
        })
    }
}

impl<J, R, K> WorkQueue<J, R, K>
where
    J: Send + 'static,
    R: Send + 'static,
    K: Hash + Eq + Clone + Send + 'static,
{
    /// Queues `job` and returns its handle, without waiting.
    ///
    /// # Errors
    ///
    /// [`Error::CapacityExceeded`] (resource `"work queue"`) when `capacity`
    /// jobs are already queued; [`Error::Closed`] once shutdown began. In
    /// both cases `job` is dropped, not run; use
    /// [`try_submit`](WorkQueue::try_submit) to get it back.
    ///
    /// ```
    /// use raceguard::{Error, ErrorKind};
    /// use raceguard::queue::WorkQueue;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// let queue = WorkQueue::builder().capacity(1).build(|n: u8| async move { n })?;
    /// let first = queue.submit(1)?;
    /// // The worker has not taken the first job yet: the queue is full.
    /// let err = queue.submit(2).unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Capacity);
    /// assert_eq!(first.await?, 1);
    /// # Ok(()) }
    /// ```
    pub fn submit(&self, job: J) -> Result<JobHandle<R>> {
        self.push(None, job).map_err(Rejected::into_error)
    }

    /// [`submit`](WorkQueue::submit) that hands a refused job back: the
    /// caller can answer 503 and keep the job (write it to a dead-letter
    /// store, retry it later) instead of losing it.
    ///
    /// # Errors
    ///
    /// [`Rejected`] with the job and the reason (`CapacityExceeded` or
    /// `Closed`, as for `submit`).
    ///
    /// ```
    /// use raceguard::{Error, ErrorKind};
    /// use raceguard::queue::WorkQueue;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Error> {
    /// let queue = WorkQueue::builder().capacity(1).build(|s: String| async move { s.len() })?;
    /// let first = queue.try_submit("first".to_string())?;
    /// let refused = queue.try_submit("second".to_string()).unwrap_err();
    /// assert_eq!(refused.error().kind(), ErrorKind::Capacity);
    /// assert_eq!(refused.into_job(), "second"); // nothing lost
    /// assert_eq!(first.await?, 5);
    /// # Ok(()) }
    /// ```
    pub fn try_submit(&self, job: J) -> std::result::Result<JobHandle<R>, Rejected<J>> {
        self.push(None, job)
    }

    /// [`submit_keyed`](WorkQueue::submit_keyed) that hands a refused job
    /// back (see [`try_submit`](WorkQueue::try_submit)).
    ///
    /// # Errors
    ///
    /// [`Rejected`] with the job and the reason.
    pub fn try_submit_keyed(
        &self,
        key: K,
        job: J,
    ) -> std::result::Result<JobHandle<R>, Rejected<J>> {
        self.push(Some(key), job)
    }

    /// Queues `job` behind every earlier job with the same `key`: jobs of
    /// one key run one at a time, in submission order; jobs of different
    /// keys run in parallel. Never waits.
    ///
    /// # Errors
    ///
    /// As [`submit`](WorkQueue::submit); a key's waiting jobs count towards
    /// the capacity.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use raceguard::queue::WorkQueue;
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let log = Arc::new(Mutex::new(Vec::new()));
    /// let seen = log.clone();
    /// let queue = WorkQueue::builder().workers(4).build(move |(user, n): (&'static str, u32)| {
    ///     let seen = seen.clone();
    ///     async move { seen.lock().unwrap().push((user, n)) }
    /// })?;
    /// let mut handles = Vec::new();
    /// for n in 0..10 {
    ///     for user in ["alice", "bob"] {
    ///         handles.push(queue.submit_keyed(user.to_string(), (user, n))?);
    ///     }
    /// }
    /// for h in handles {
    ///     h.await?;
    /// }
    /// let log = log.lock().unwrap();
    /// for user in ["alice", "bob"] {
    ///     let order: Vec<u32> = log.iter().filter(|(u, _)| *u == user).map(|(_, n)| *n).collect();
    ///     assert_eq!(order, (0..10).collect::<Vec<_>>());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn submit_keyed(&self, key: K, job: J) -> Result<JobHandle<R>> {
        self.push(Some(key), job).map_err(Rejected::into_error)
    }

    fn push(&self, key: Option<K>, job: J) -> std::result::Result<JobHandle<R>, Rejected<J>> {
        let inner = &*self.inner;
        let mut st = inner.state.lock();
        if st.mode != Mode::Open {
            inner.metrics.rejected_closed();
            return Err(Rejected {
                job,
                error: closed(),
            });
        }
        if st.queued >= inner.capacity {
            inner.metrics.rejected_full();
            return Err(Rejected {
                job,
                error: Error::CapacityExceeded {
                    resource: "work queue",
                    capacity: inner.capacity,
                },
            });
        }
        // Only accepted jobs get a result channel: shedding stays allocation-free.
        let (tx, rx) = oneshot::channel();
        let seq = st.next_seq;
        st.next_seq += 1;
        st.accepted += 1;
        st.queued += 1;
        inner.metrics.submitted();
        inner.metrics.depth(st.queued);
        let wake = match key {
            None => {
                st.ready.push_back(Entry {
                    seq,
                    job,
                    tx,
                    key: None,
                });
                true
            }
            Some(key) => {
                let own = key.clone();
                let entry = Entry {
                    seq,
                    job,
                    tx,
                    key: Some(own),
                };
                match st.keys.entry(key) {
                    MapEntry::Occupied(mut waiting) => {
                        waiting.get_mut().push_back(entry);
                        false
                    }
                    MapEntry::Vacant(slot) => {
                        slot.insert(VecDeque::new());
                        st.ready.push_back(entry);
                        true
                    }
                }
            }
        };
        drop(st);
        if wake {
            inner.work.notify_one();
        }
        Ok(JobHandle::new(rx))
    }

    /// Jobs waiting to start (keyed or not). Running jobs are not counted.
    ///
    /// ```
    /// # use raceguard::queue::WorkQueue;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let queue = WorkQueue::builder().build(|n: u8| async move { n })?;
    /// let h = queue.submit(1)?;
    /// assert_eq!(queue.len(), 1);
    /// h.await?;
    /// assert_eq!(queue.len(), 0);
    /// # Ok(()) }
    /// ```
    pub fn len(&self) -> usize {
        self.inner.state.lock().queued
    }

    /// `len() == 0`.
    ///
    /// ```
    /// # use raceguard::queue::WorkQueue;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let queue = WorkQueue::builder().build(|n: u8| async move { n })?;
    /// assert!(queue.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured capacity (queued jobs).
    ///
    /// ```
    /// # use raceguard::queue::WorkQueue;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let queue = WorkQueue::builder().capacity(8).build(|n: u8| async move { n })?;
    /// assert_eq!(queue.capacity(), 8);
    /// # Ok(()) }
    /// ```
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Whether a `submit` now would fail with
    /// [`Error::CapacityExceeded`]: the check a load-shedding layer makes
    /// before accepting a request.
    ///
    /// ```
    /// # use raceguard::queue::WorkQueue;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let queue = WorkQueue::builder().capacity(1).build(|n: u8| async move { n })?;
    /// assert!(!queue.is_full());
    /// let h = queue.submit(1)?;
    /// assert!(queue.is_full());
    /// h.await?;
    /// assert!(!queue.is_full());
    /// # Ok(()) }
    /// ```
    pub fn is_full(&self) -> bool {
        self.inner.state.lock().queued >= self.inner.capacity
    }

    /// The name given in [`WorkQueueBuilder::name`], if any.
    ///
    /// ```
    /// # use raceguard::queue::WorkQueue;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let queue = WorkQueue::builder().build(|n: u8| async move { n })?;
    /// assert_eq!(queue.name(), None);
    /// # Ok(()) }
    /// ```
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }

    /// The number of worker tasks.
    ///
    /// ```
    /// # use raceguard::queue::WorkQueue;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let queue = WorkQueue::builder().workers(3).build(|n: u8| async move { n })?;
    /// assert_eq!(queue.workers(), 3);
    /// # Ok(()) }
    /// ```
    pub fn workers(&self) -> usize {
        self.inner.workers
    }

    /// Whether shutdown began (or the queue was dropped): `submit` returns
    /// [`Error::Closed`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use raceguard::queue::{Shutdown, WorkQueue};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let queue = WorkQueue::builder().build(|n: u8| async move { n })?;
    /// assert!(!queue.is_closed());
    /// queue.shutdown(Shutdown::HandBack(Duration::from_secs(1))).await;
    /// assert!(queue.is_closed());
    /// # Ok(()) }
    /// ```
    pub fn is_closed(&self) -> bool {
        self.inner.state.lock().mode != Mode::Open
    }

    /// How long a rejected caller should wait before trying again: zero
    /// while the queue has room; when full, the expected time until a worker
    /// takes the next job, i.e. the longer of the measured interval between
    /// takes under backlog (a moving average) and the rate limiter's pending
    /// `retry_after`; [`DEFAULT_RETRY_AFTER`] before anything was measured.
    /// An estimate for a `Retry-After` header, not a promise.
    ///
    /// ```
    /// use std::time::Duration;
    /// use raceguard::queue::WorkQueue;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let queue = WorkQueue::builder().capacity(1).build(|n: u8| async move { n })?;
    /// assert_eq!(queue.retry_after_hint(), Duration::ZERO);
    /// let h = queue.submit(1)?;
    /// assert!(queue.is_full());
    /// assert_eq!(queue.retry_after_hint(), raceguard::queue::DEFAULT_RETRY_AFTER);
    /// h.await?;
    /// # Ok(()) }
    /// ```
    pub fn retry_after_hint(&self) -> Duration {
        let st = self.inner.state.lock();
        if st.queued < self.inner.capacity {
            return Duration::ZERO;
        }
        let limited = st
            .limited_until
            .map(|until| until.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        match st.take_interval {
            Some(interval) => interval.max(limited),
            None if limited > Duration::ZERO => limited,
            None => DEFAULT_RETRY_AFTER,
        }
    }

    /// Closes the queue and finishes or hands back its jobs, returning by
    /// `mode`'s deadline (see [`Shutdown`]).
    ///
    /// Every accepted job is accounted for exactly once in the
    /// [`ShutdownReport`]. Calling `shutdown` again returns a report with
    /// the current counters (and any jobs handed back since); a later
    /// `HandBack` turns a running `Drain` into a hand-back, never the
    /// reverse.
    ///
    /// **Cancellation**: dropping the future leaves the queue closed and the
    /// workers running: in `Drain` they finish the queue; jobs already
    /// handed back stay in the queue for the next `shutdown` call (dropped
    /// with the queue otherwise; their handles resolve to
    /// [`Error::Closed`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use raceguard::queue::{Shutdown, WorkQueue};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), raceguard::Error> {
    /// let queue = WorkQueue::builder().build(|n: u64| async move {
    ///     tokio::time::sleep(Duration::from_secs(1)).await;
    ///     n
    /// })?;
    /// let handles: Vec<_> = (0..5).map(|n| queue.submit(n)).collect::<Result<_, _>>()?;
    /// // Two and a half seconds for five one-second jobs.
    /// let report = queue.shutdown(Shutdown::Drain(Duration::from_millis(2500))).await;
    /// assert_eq!(report.completed, 2);
    /// assert_eq!(report.aborted, 1);
    /// assert_eq!(report.handed_back, vec![3, 4]);
    /// assert!(queue.submit(5).is_err());
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self, mode: Shutdown) -> ShutdownReport<J> {
        let (timeout, hand_back_now) = match mode {
            Shutdown::Drain(t) => (t, false),
            Shutdown::HandBack(t) => (t, true),
        };
        let deadline = Instant::now() + timeout;
        if hand_back_now {
            self.inner.hand_back();
        } else {
            self.inner.close(Mode::Draining);
        }
        // Wait for the workers to exit without taking their handles out of
        // `tasks`: a dropped (or concurrent) `shutdown` future then leaves
        // every handle where the next call can abort it.
        if !self.inner.workers_exited(Some(deadline)).await {
            self.inner.hand_back();
            for task in self.tasks.lock().iter() {
                task.abort();
            }
            // Cancelled (or finished) at their next poll: bounded.
            self.inner.workers_exited(None).await;
        }
        let mut st = self.inner.state.lock();
        // A worker aborted while paused by the limiter left its job held.
        let held: Vec<_> = st.held.iter_mut().filter_map(Option::take).collect();
        self.inner.metrics.handed_back(held.len());
        for e in held {
            st.handed_back.push((e.seq, e.job));
        }
        let mut handed_back = std::mem::take(&mut st.handed_back);
        handed_back.sort_unstable_by_key(|(seq, _)| *seq);
        ShutdownReport {
            accepted: st.accepted,
            completed: st.completed,
            handed_back: handed_back.into_iter().map(|(_, j)| j).collect(),
            // Only once every worker is gone is a still-running job lost.
            aborted: if st.live_workers == 0 { st.running } else { 0 },
        }
    }
}

impl<J, R, K> Inner<J, R, K>
where
    K: Hash + Eq,
{
    /// Waits until every worker task has ended, or until `deadline`;
    /// `true` when they all ended.
    async fn workers_exited(&self, deadline: Option<Instant>) -> bool {
        loop {
            let mut exited = pin!(self.exited.notified());
            exited.as_mut().enable();
            if self.state.lock().live_workers == 0 {
                return true;
            }
            match deadline {
                None => exited.await,
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, exited).await.is_err() {
                        return false;
                    }
                }
            }
        }
    }

    fn close(&self, to: Mode) {
        let mut st = self.state.lock();
        if st.mode == Mode::Open {
            st.mode = to;
        }
        drop(st);
        self.work.notify_waiters();
    }

    /// Closes the queue and moves every queued or held job to `handed_back`
    /// (dropping its result sender: its handle resolves to `Closed`).
    fn hand_back(&self) {
        let mut st = self.state.lock();
        st.mode = Mode::HandingBack;
        let mut entries: Vec<Entry<J, R, K>> = st.ready.drain(..).collect();
        for (_, waiting) in st.keys.drain() {
            entries.extend(waiting);
        }
        entries.extend(st.held.iter_mut().filter_map(Option::take));
        st.queued = 0;
        self.metrics.depth(0);
        self.metrics.handed_back(entries.len());
        for e in entries {
            st.handed_back.push((e.seq, e.job));
        }
        drop(st);
        self.work.notify_waiters();
        self.hand_back.notify_waiters();
    }

    /// Waits for a job; `None` when the worker should exit. With `start`,
    /// the job counts as running from the moment it is taken.
    async fn take(&self, start: bool) -> Option<Entry<J, R, K>> {
        // Fast path: a job is ready (no waiter registration).
        if let Some(next) = self.try_take(start) {
            return next;
        }
        loop {
            let mut notified = pin!(self.work.notified());
            notified.as_mut().enable();
            if let Some(next) = self.try_take(start) {
                return next;
            }
            notified.await;
        }
    }

    /// `Some(Some(job))`: took a job; `Some(None)`: exit; `None`: wait.
    fn try_take(&self, start: bool) -> Option<Option<Entry<J, R, K>>> {
        let mut st = self.state.lock();
        if st.mode == Mode::HandingBack {
            return Some(None);
        }
        let Some(e) = st.ready.pop_front() else {
            return (st.mode == Mode::Draining && st.queued == 0).then_some(None);
        };
        st.queued -= 1;
        self.metrics.depth(st.queued);
        if start {
            st.running += 1;
        }
        // Drain-rate estimate: intervals between takes while there is a
        // backlog (idle gaps say nothing about how fast the queue drains).
        let backlog = st.queued > 0;
        if backlog || st.backlog_at_last_take {
            let now = Instant::now();
            if st.backlog_at_last_take
                && let Some(last) = st.last_take
            {
                let gap = now.saturating_duration_since(last);
                st.take_interval = Some(match st.take_interval {
                    Some(avg) => (avg * 7 + gap) / 8,
                    None => gap,
                });
            }
            st.last_take = Some(now);
        }
        st.backlog_at_last_take = backlog;
        let last_job = !backlog && st.mode == Mode::Draining;
        drop(st);
        if last_job {
            // Idle workers may exit now.
            self.work.notify_waiters();
        }
        Some(Some(e))
    }
}

impl<J, R, K> Inner<J, R, K>
where
    K: Hash + Eq,
{
    /// Takes one limiter cell for the job held by worker `id`. `Ok(true)`:
    /// admitted; `Ok(false)`: the job was handed back meanwhile.
    async fn admit(&self, limiter: &LimitFn, id: usize) -> Result<bool> {
        loop {
            if self.state.lock().held[id].is_none() {
                // Handed back: do not spend a cell on it.
                return Ok(false);
            }
            let decision = limiter().await?;
            if decision.allowed() {
                return Ok(true);
            }
            let pause = decision.retry_after().max(MIN_LIMIT_PAUSE);
            let mut woken = pin!(self.hand_back.notified());
            woken.as_mut().enable();
            {
                let mut st = self.state.lock();
                if st.held[id].is_none() {
                    return Ok(false);
                }
                let until = Instant::now() + pause;
                st.limited_until = Some(st.limited_until.map_or(until, |u| u.max(until)));
            }
            let mut sleep = pin!(tokio::time::sleep(pause));
            std::future::poll_fn(|cx| {
                if sleep.as_mut().poll(cx).is_ready() || woken.as_mut().poll(cx).is_ready() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
        }
    }
}

async fn worker<J, R, K>(inner: Arc<Inner<J, R, K>>, id: usize)
where
    K: Hash + Eq,
{
    let _live = LiveWorker(&inner);
    while let Some(entry) = inner.take(inner.limiter.is_none()).await {
        let Entry { job, tx, key, .. } = match &inner.limiter {
            None => entry,
            Some(limiter) => {
                {
                    let mut st = inner.state.lock();
                    if st.mode == Mode::HandingBack {
                        inner.metrics.handed_back(1);
                        st.handed_back.push((entry.seq, entry.job));
                        return;
                    }
                    st.held[id] = Some(entry);
                }
                let admitted = inner.admit(limiter, id).await;
                let mut st = inner.state.lock();
                let Some(entry) = st.held[id].take() else {
                    // Handed back while we waited.
                    continue;
                };
                match admitted {
                    Ok(_) => {
                        st.running += 1;
                        drop(st);
                        entry
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "work queue: rate limiter failed; job not run");
                        st.completed += 1;
                        inner.metrics.completed(Outcome::LimiterError);
                        let wake = release(&mut st, entry.key.as_ref());
                        drop(st);
                        if wake {
                            inner.work.notify_one();
                        }
                        let _ = entry.tx.send(Err(e));
                        continue;
                    }
                }
            }
        };
        // Counts the job as aborted if this future is dropped (a shutdown
        // deadline, the runtime going away) before the handler finished.
        let run = inner.metrics.running();
        let out = run_caught(|| (inner.handler)(job)).await;
        run.finish(if out.is_ok() {
            Outcome::Ok
        } else {
            Outcome::Panicked
        });
        let mut st = inner.state.lock();
        st.running -= 1;
        st.completed += 1;
        let wake = release(&mut st, key.as_ref());
        drop(st);
        if wake {
            inner.work.notify_one();
        }
        let _ = tx.send(out);
    }
}

/// Counts a worker out when its task ends, aborted or not.
struct LiveWorker<'a, J, R, K>(&'a Inner<J, R, K>);

impl<J, R, K> Drop for LiveWorker<'_, J, R, K> {
    fn drop(&mut self) {
        self.0.state.lock().live_workers -= 1;
        self.0.exited.notify_waiters();
    }
}

/// Lets the next job of `key` start; `true` if one became ready.
fn release<J, R, K: Hash + Eq>(st: &mut State<J, R, K>, key: Option<&K>) -> bool {
    let Some(key) = key else { return false };
    let Some(waiting) = st.keys.get_mut(key) else {
        return false;
    };
    match waiting.pop_front() {
        Some(next) => {
            st.ready.push_back(next);
            true
        }
        None => {
            st.keys.remove(key);
            false
        }
    }
}

impl<J, R, K> Drop for WorkQueue<J, R, K> {
    fn drop(&mut self) {
        let mut st = self.inner.state.lock();
        if st.mode == Mode::Open {
            st.mode = Mode::Draining;
        }
        drop(st);
        self.inner.work.notify_waiters();
    }
}

impl<J, R, K> fmt::Debug for WorkQueue<J, R, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.state.lock();
        f.debug_struct("WorkQueue")
            .field("capacity", &self.inner.capacity)
            .field("workers", &self.inner.workers)
            .field("queued", &st.queued)
            .field("running", &st.running)
            .field("mode", &st.mode)
            .finish_non_exhaustive()
    }
}

/// How a job that left the queue ended, for `raceguard_queue_completed_total`.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// The handler returned.
    Ok,
    /// The handler panicked (caught).
    Panicked,
    /// The rate limiter failed; the handler was not run.
    LimiterError,
}

/// The `queue` label of a queue built without a name.
#[cfg(feature = "metrics")]
const UNNAMED: &str = "unnamed";

/// The queue's handles in the `metrics` facade (see the [module
/// docs](super#metrics)), registered once when the queue is built, with the
/// recorder current then. Without the feature: zero-sized, every call a
/// no-op.
#[cfg(feature = "metrics")]
struct QueueMetrics {
    submitted: metrics::Counter,
    rejected_full: metrics::Counter,
    rejected_closed: metrics::Counter,
    ok: metrics::Counter,
    panicked: metrics::Counter,
    limiter_error: metrics::Counter,
    aborted: metrics::Counter,
    handed_back: metrics::Counter,
    depth: metrics::Gauge,
}

#[cfg(not(feature = "metrics"))]
struct QueueMetrics;

#[cfg(feature = "metrics")]
impl QueueMetrics {
    fn new(name: Option<&str>) -> Self {
        const SUBMITTED: &str = "raceguard_queue_submitted_total";
        const REJECTED: &str = "raceguard_queue_rejected_total";
        const COMPLETED: &str = "raceguard_queue_completed_total";
        const DEPTH: &str = "raceguard_queue_depth";
        metrics::describe_counter!(SUBMITTED, "Jobs accepted by a work queue.");
        metrics::describe_counter!(REJECTED, "Jobs a work queue refused at submit, by reason.");
        metrics::describe_counter!(
            COMPLETED,
            "Accepted jobs that left a work queue, by outcome."
        );
        metrics::describe_gauge!(DEPTH, "Jobs queued in a work queue, not yet started.");
        let queue = name.unwrap_or(UNNAMED).to_owned();
        let rejected = |reason: &'static str| metrics::counter!(REJECTED, "queue" => queue.clone(), "reason" => reason);
        let completed = |outcome: &'static str| metrics::counter!(COMPLETED, "queue" => queue.clone(), "outcome" => outcome);
        let depth = metrics::gauge!(DEPTH, "queue" => queue.clone());
        depth.set(0.0);
        QueueMetrics {
            submitted: metrics::counter!(SUBMITTED, "queue" => queue.clone()),
            rejected_full: rejected("full"),
            rejected_closed: rejected("closed"),
            ok: completed("ok"),
            panicked: completed("panicked"),
            limiter_error: completed("limiter_error"),
            aborted: completed("aborted"),
            handed_back: completed("handed_back"),
            depth,
        }
    }

    #[inline]
    fn submitted(&self) {
        self.submitted.increment(1);
    }

    #[inline]
    fn rejected_full(&self) {
        self.rejected_full.increment(1);
    }

    #[inline]
    fn rejected_closed(&self) {
        self.rejected_closed.increment(1);
    }

    #[inline]
    fn completed(&self, outcome: Outcome) {
        match outcome {
            Outcome::Ok => &self.ok,
            Outcome::Panicked => &self.panicked,
            Outcome::LimiterError => &self.limiter_error,
        }
        .increment(1);
    }

    #[inline]
    fn handed_back(&self, n: usize) {
        if n > 0 {
            self.handed_back.increment(n as u64);
        }
    }

    /// Sets the depth gauge; called under the state mutex with the new
    /// `queued`, so the gauge equals `len()` whenever the mutex is free.
    #[inline]
    fn depth(&self, queued: usize) {
        self.depth.set(queued as f64);
    }

    /// A job's handler starts: counted as aborted unless
    /// [`Running::finish`] is called.
    #[inline]
    fn running(&self) -> Running<'_> {
        Running(Some(self))
    }
}

#[cfg(not(feature = "metrics"))]
impl QueueMetrics {
    #[inline(always)]
    fn new(_name: Option<&str>) -> Self {
        QueueMetrics
    }

    #[inline(always)]
    fn submitted(&self) {}

    #[inline(always)]
    fn rejected_full(&self) {}

    #[inline(always)]
    fn rejected_closed(&self) {}

    #[inline(always)]
    fn completed(&self, _outcome: Outcome) {}

    #[inline(always)]
    fn handed_back(&self, _n: usize) {}

    #[inline(always)]
    fn depth(&self, _queued: usize) {}

    #[inline(always)]
    fn running(&self) -> Running<'_> {
        Running(PhantomData)
    }
}

/// A running job's outcome-to-be: dropped without [`finish`](Self::finish),
/// the job counts as `aborted`.
#[cfg(feature = "metrics")]
struct Running<'a>(Option<&'a QueueMetrics>);

#[cfg(not(feature = "metrics"))]
struct Running<'a>(PhantomData<&'a ()>);

impl Running<'_> {
    #[inline]
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables, unused_mut))]
    fn finish(mut self, outcome: Outcome) {
        #[cfg(feature = "metrics")]
        if let Some(m) = self.0.take() {
            m.completed(outcome);
        }
    }
}

#[cfg(feature = "metrics")]
impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            m.aborted.increment(1);
        }
    }
}

/// A job the queue refused, handed back with the reason
/// ([`WorkQueue::try_submit`]). Converts into the reason with `?` in
/// functions returning [`crate::Error`].
pub struct Rejected<J> {
    job: J,
    error: Error,
}

impl<J> Rejected<J> {
    /// Why the job was refused: `CapacityExceeded` or `Closed`.
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// The refused job.
    pub fn into_job(self) -> J {
        self.job
    }

    /// The reason, dropping the job.
    pub fn into_error(self) -> Error {
        self.error
    }

    /// The job and the reason.
    pub fn into_parts(self) -> (J, Error) {
        (self.job, self.error)
    }
}

impl<J> fmt::Debug for Rejected<J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejected")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<J> fmt::Display for Rejected<J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job refused: {}", self.error)
    }
}

impl<J> std::error::Error for Rejected<J> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<J> From<Rejected<J>> for Error {
    fn from(r: Rejected<J>) -> Error {
        r.error
    }
}
