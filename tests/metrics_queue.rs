//! Feature `metrics`: what work queues (and, with a Redis server, durable
//! queues) report through the `metrics` facade.
//!
//! Each queue is built inside `metrics::with_local_recorder` (handles are
//! registered at build time), so there is no global state and the tests run
//! in parallel. The recorder is a small one over metrics-util's atomic
//! `Registry` rather than the `DebuggingRecorder` of
//! `tests/metrics_rate_cache.rs`: the latter's snapshot swaps every gauge to
//! zero, which would make a second read of `raceguard_queue_depth`
//! meaningless. Reads here never reset anything.
//!
//! No sleeps as synchronisation: a handler announces on a channel that it
//! started and then waits on a semaphore the test controls, so the test
//! reads the depth gauge only at quiescent points (every worker parked in a
//! handler or idle). The one deadline (an aborted job) is not a timing
//! assertion: that job never finishes, however long the deadline.

#![cfg(feature = "metrics")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use raceguard::clock::ManualClock;
use raceguard::queue::{Shutdown, WorkQueue};
use raceguard::rate::{Decision, Limit, Quota, RateLimiter};
use raceguard::{Error, ErrorKind};
use tokio::sync::{Semaphore, mpsc};

const SUBMITTED: &str = "raceguard_queue_submitted_total";
const REJECTED: &str = "raceguard_queue_rejected_total";
const COMPLETED: &str = "raceguard_queue_completed_total";
const DEPTH: &str = "raceguard_queue_depth";
const OUTCOMES: [&str; 5] = ["ok", "panicked", "limiter_error", "aborted", "handed_back"];

/// A local recorder whose values can be read any number of times.
struct Recorded {
    registry: Registry<Key, AtomicStorage>,
}

impl Recorder for Recorded {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn sorted(labels: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut l: Vec<_> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    l
}

fn labels_of(key: &Key) -> Vec<(String, String)> {
    let mut l: Vec<_> = key
        .labels()
        .map(|l| (l.key().to_string(), l.value().to_string()))
        .collect();
    l.sort();
    l
}

impl Recorded {
    fn new() -> Self {
        Recorded {
            registry: Registry::atomic(),
        }
    }

    /// Builds something with this recorder as the current one.
    fn build<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(self, f)
    }

    /// The counter `name` with exactly `labels`; `None` if never registered.
    fn try_counter(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        let want = sorted(labels);
        self.registry
            .get_counter_handles()
            .into_iter()
            .find(|(k, _)| k.name() == name && labels_of(k) == want)
            .map(|(_, v)| v.load(Ordering::SeqCst))
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.try_counter(name, labels).unwrap_or(0)
    }

    /// The gauge `name` with exactly `labels`; panics if never registered.
    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want = sorted(labels);
        self.registry
            .get_gauge_handles()
            .into_iter()
            .find(|(k, _)| k.name() == name && labels_of(k) == want)
            .map(|(_, v)| f64::from_bits(v.load(Ordering::SeqCst)))
            .unwrap_or_else(|| panic!("gauge {name} {labels:?} not registered"))
    }

    /// Every label value of every registered metric.
    fn label_values(&self) -> Vec<String> {
        let mut keys: Vec<Key> = self.registry.get_counter_handles().into_keys().collect();
        keys.extend(self.registry.get_gauge_handles().into_keys());
        keys.iter()
            .flat_map(|k| labels_of(k).into_iter().map(|(_, v)| v))
            .collect()
    }

    fn submitted(&self, queue: &str) -> u64 {
        self.counter(SUBMITTED, &[("queue", queue)])
    }

    fn rejected(&self, queue: &str, reason: &str) -> u64 {
        self.counter(REJECTED, &[("queue", queue), ("reason", reason)])
    }

    fn completed(&self, queue: &str, outcome: &str) -> u64 {
        self.counter(COMPLETED, &[("queue", queue), ("outcome", outcome)])
    }

    fn depth(&self, queue: &str) -> f64 {
        self.gauge(DEPTH, &[("queue", queue)])
    }

    /// All completion outcomes, in `OUTCOMES` order.
    fn outcomes(&self, queue: &str) -> [u64; 5] {
        OUTCOMES.map(|o| self.completed(queue, o))
    }
}

/// A handler that queues for one permit of `gate`, announces the job on
/// `started` (so jobs get permits in the order they announced), waits for
/// the permit, then returns the job (panicking on `u32::MAX`).
fn gated(
    gate: Arc<Semaphore>,
    started: mpsc::UnboundedSender<u32>,
) -> impl Fn(u32) -> std::pin::Pin<Box<dyn Future<Output = u32> + Send>> + Send + Sync + 'static {
    move |n| {
        let gate = gate.clone();
        let started = started.clone();
        Box::pin(async move {
            let mut permit = Box::pin(gate.acquire_owned());
            // One poll queues this job as a waiter (FIFO) before it announces.
            let first = std::future::poll_fn(|cx| Poll::Ready(permit.as_mut().poll(cx))).await;
            started.send(n).unwrap();
            match first {
                Poll::Ready(p) => p.unwrap().forget(),
                Poll::Pending => permit.await.unwrap().forget(),
            }
            assert_ne!(n, u32::MAX, "job asked to panic");
            n
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_rejections_completions_and_depth_are_exact() {
    let rec = Recorded::new();
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut started) = mpsc::unbounded_channel();
    let queue = rec.build(|| {
        WorkQueue::builder()
            .name("webhooks")
            .capacity(2)
            .workers(1)
            .build(gated(gate.clone(), tx))
            .unwrap()
    });
    assert_eq!(queue.name(), Some("webhooks"));
    // Registered at build time, at zero.
    assert_eq!(rec.depth("webhooks"), 0.0);
    assert_eq!(
        rec.try_counter(SUBMITTED, &[("queue", "webhooks")]),
        Some(0)
    );
    assert_eq!(rec.outcomes("webhooks"), [0; 5]);

    let h0 = queue.submit(0).unwrap();
    assert_eq!(started.recv().await, Some(0));
    // The worker runs job 0: nothing queued.
    assert_eq!((queue.len(), rec.depth("webhooks")), (0, 0.0));

    let h1 = queue.submit(1).unwrap();
    assert_eq!((queue.len(), rec.depth("webhooks")), (1, 1.0));
    let h2 = queue.submit(2).unwrap();
    assert_eq!((queue.len(), rec.depth("webhooks")), (2, 2.0));
    for _ in 0..3 {
        let err = queue.submit(99).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Capacity);
    }
    assert_eq!(rec.submitted("webhooks"), 3);
    assert_eq!(rec.rejected("webhooks", "full"), 3);
    assert_eq!(rec.rejected("webhooks", "closed"), 0);
    assert_eq!(rec.depth("webhooks"), 2.0, "a rejection changes no depth");

    // Job 0 finishes; the worker takes job 1.
    gate.add_permits(1);
    assert_eq!(started.recv().await, Some(1));
    assert_eq!(h0.await.unwrap(), 0);
    assert_eq!((queue.len(), rec.depth("webhooks")), (1, 1.0));
    assert_eq!(rec.outcomes("webhooks"), [1, 0, 0, 0, 0]);

    // Room again: one more is accepted.
    let h3 = queue.submit(3).unwrap();
    assert_eq!((queue.len(), rec.depth("webhooks")), (2, 2.0));

    gate.add_permits(1);
    assert_eq!(started.recv().await, Some(2));
    assert_eq!(h1.await.unwrap(), 1);
    assert_eq!((queue.len(), rec.depth("webhooks")), (1, 1.0));
    gate.add_permits(1);
    assert_eq!(started.recv().await, Some(3));
    assert_eq!(h2.await.unwrap(), 2);
    assert_eq!((queue.len(), rec.depth("webhooks")), (0, 0.0));
    gate.add_permits(1);
    assert_eq!(h3.await.unwrap(), 3);
    // Counted before the handle resolved.
    assert_eq!(rec.outcomes("webhooks"), [4, 0, 0, 0, 0]);

    let report = queue
        .shutdown(Shutdown::Drain(Duration::from_secs(30)))
        .await;
    assert_eq!((report.accepted, report.completed), (4, 4));
    assert_eq!(queue.submit(5).unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(queue.submit(6).unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(rec.submitted("webhooks"), 4);
    assert_eq!(rec.rejected("webhooks", "closed"), 2);
    assert_eq!(rec.rejected("webhooks", "full"), 3);
    assert_eq!(rec.outcomes("webhooks"), [4, 0, 0, 0, 0]);
    assert_eq!(rec.depth("webhooks"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_follows_len_under_several_workers() {
    const WORKERS: usize = 3;
    const JOBS: u32 = 30;
    let rec = Recorded::new();
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut started) = mpsc::unbounded_channel();
    let queue = rec.build(|| {
        WorkQueue::builder()
            .name("pool")
            .capacity(JOBS as usize)
            .workers(WORKERS)
            .build(gated(gate.clone(), tx))
            .unwrap()
    });
    let handles: Vec<_> = (0..JOBS).map(|n| queue.submit(n).unwrap()).collect();
    // Every worker parks in a job: quiescent.
    let mut running = 0;
    while running < WORKERS {
        started.recv().await.unwrap();
        running += 1;
    }
    let mut queued = JOBS as usize - WORKERS;
    assert_eq!((queue.len(), rec.depth("pool")), (queued, queued as f64));
    // Release one or two jobs at a time; wait until every freed worker
    // took its next job (when there is one), then compare.
    let mut step = 0;
    while queued > 0 {
        let release = 1 + step % 2;
        step += 1;
        gate.add_permits(release);
        let takes = release.min(queued);
        for _ in 0..takes {
            started.recv().await.unwrap();
        }
        queued -= takes;
        assert_eq!(queue.len(), queued);
        assert_eq!(rec.depth("pool"), queued as f64, "after step {step}");
    }
    gate.add_permits(WORKERS);
    for (n, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap(), n as u32);
    }
    assert_eq!(rec.submitted("pool"), u64::from(JOBS));
    assert_eq!(rec.outcomes("pool"), [u64::from(JOBS), 0, 0, 0, 0]);
    assert_eq!(rec.depth("pool"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_waiting_jobs_count_in_depth_and_keys_never_become_labels() {
    let rec = Recorded::new();
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut started) = mpsc::unbounded_channel();
    let queue = rec.build(|| {
        WorkQueue::builder()
            .name("per-user")
            .workers(2)
            .build(gated(gate.clone(), tx))
            .unwrap()
    });
    // alice's first job runs; her next two wait behind it (keyed, not ready)
    // while the second worker is idle.
    let handles: Vec<_> = (0..3)
        .map(|n| queue.submit_keyed("alice".to_string(), n).unwrap())
        .collect();
    assert_eq!(started.recv().await, Some(0));
    assert_eq!((queue.len(), rec.depth("per-user")), (2, 2.0));
    let bob = queue.submit_keyed("bob".to_string(), 10).unwrap();
    assert_eq!(started.recv().await, Some(10));
    assert_eq!((queue.len(), rec.depth("per-user")), (2, 2.0));
    gate.add_permits(1);
    let next = started.recv().await.unwrap();
    assert_eq!(next, 1, "alice's next job, in order");
    assert_eq!((queue.len(), rec.depth("per-user")), (1, 1.0));
    gate.add_permits(3);
    for h in handles {
        h.await.unwrap();
    }
    bob.await.unwrap();
    assert_eq!(rec.depth("per-user"), 0.0);
    assert_eq!(rec.outcomes("per-user"), [4, 0, 0, 0, 0]);
    for v in rec.label_values() {
        assert!(
            ["per-user", "full", "closed"].contains(&v.as_str()) || OUTCOMES.contains(&v.as_str()),
            "unexpected label value {v:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_are_counted_apart_from_successes() {
    let rec = Recorded::new();
    let gate = Arc::new(Semaphore::new(100));
    let (tx, _started) = mpsc::unbounded_channel();
    let queue = rec.build(|| WorkQueue::builder().build(gated(gate.clone(), tx)).unwrap());
    assert_eq!(queue.name(), None);
    let results = [1, u32::MAX, 2, u32::MAX, u32::MAX].map(|n| queue.submit(n).unwrap());
    let mut panicked = 0;
    for h in results {
        if let Err(Error::Panicked { .. }) = h.await {
            panicked += 1;
        }
    }
    assert_eq!(panicked, 3);
    assert_eq!(rec.submitted("unnamed"), 5);
    assert_eq!(rec.outcomes("unnamed"), [2, 3, 0, 0, 0]);
    assert_eq!(rec.depth("unnamed"), 0.0);
}

/// A limit that reports each call on a channel and fails while `fail` is
/// set; otherwise a one-cell-per-second limiter on a clock that never moves
/// (the second admitted call and every later one is denied).
struct Scripted {
    limiter: RateLimiter<ManualClock>,
    fail: AtomicBool,
    calls: mpsc::UnboundedSender<bool>,
    denied: AtomicU64,
}

impl Limit for Scripted {
    fn check_n(&self, n: u32) -> impl Future<Output = raceguard::Result<Decision>> + Send {
        let out = if self.fail.load(Ordering::SeqCst) {
            Err(Error::backend("scripted", true, "limiter down"))
        } else {
            self.limiter.check_n(n)
        };
        let allowed = matches!(&out, Ok(d) if d.allowed());
        if matches!(&out, Ok(d) if d.denied()) {
            self.denied.fetch_add(1, Ordering::SeqCst);
        }
        let _ = self.calls.send(allowed);
        async move { out }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_errors_and_held_jobs_are_counted_on_hand_back() {
    let rec = Recorded::new();
    let (calls_tx, mut calls) = mpsc::unbounded_channel();
    let limit = Arc::new(Scripted {
        limiter: RateLimiter::with_clock(Quota::per_second(1).unwrap(), ManualClock::new()),
        fail: AtomicBool::new(true),
        calls: calls_tx,
        denied: AtomicU64::new(0),
    });
    let queue = rec.build(|| {
        WorkQueue::builder()
            .name("api")
            .workers(1)
            .shared_rate_limit(limit.clone())
            .build(|n: u32| async move { n })
            .unwrap()
    });
    // The limiter fails: the job is not run.
    let err = queue.submit(1).unwrap().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend);
    assert_eq!(rec.outcomes("api"), [0, 0, 1, 0, 0]);
    assert_eq!(calls.recv().await, Some(false));

    limit.fail.store(false, Ordering::SeqCst);
    assert_eq!(queue.submit(2).unwrap().await.unwrap(), 2);
    assert_eq!(calls.recv().await, Some(true));
    assert_eq!(rec.outcomes("api"), [1, 0, 1, 0, 0]);

    // The limiter denies from now on: the worker holds job 3 (taken, not
    // queued), job 4 waits in the queue.
    let h3 = queue.submit(3).unwrap();
    assert_eq!(calls.recv().await, Some(false));
    assert_eq!(limit.denied.load(Ordering::SeqCst), 1);
    let h4 = queue.submit(4).unwrap();
    assert_eq!((queue.len(), rec.depth("api")), (1, 1.0));

    let report = queue
        .shutdown(Shutdown::HandBack(Duration::from_secs(30)))
        .await;
    assert_eq!(report.handed_back, vec![3, 4]);
    assert_eq!(
        (report.accepted, report.completed, report.aborted),
        (4, 2, 0)
    );
    assert_eq!(h3.await.unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(h4.await.unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(rec.outcomes("api"), [1, 0, 1, 0, 2]);
    assert_eq!(rec.submitted("api"), 4);
    assert_eq!(rec.depth("api"), 0.0);
    // A second shutdown reports (and counts) nothing new.
    let again = queue
        .shutdown(Shutdown::HandBack(Duration::from_secs(30)))
        .await;
    assert!(again.handed_back.is_empty());
    assert_eq!(rec.outcomes("api"), [1, 0, 1, 0, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_past_the_deadline_counts_as_aborted() {
    let rec = Recorded::new();
    // Never opened: job 0 never finishes.
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut started) = mpsc::unbounded_channel();
    let queue = rec.build(|| {
        WorkQueue::builder()
            .name("stuck")
            .workers(1)
            .build(gated(gate.clone(), tx))
            .unwrap()
    });
    let handles: Vec<_> = (0..3).map(|n| queue.submit(n).unwrap()).collect();
    assert_eq!(started.recv().await, Some(0));
    assert_eq!((queue.len(), rec.depth("stuck")), (2, 2.0));
    let report = queue
        .shutdown(Shutdown::Drain(Duration::from_millis(50)))
        .await;
    assert_eq!(report.handed_back, vec![1, 2]);
    assert_eq!((report.completed, report.aborted), (0, 1));
    for h in handles {
        assert_eq!(h.await.unwrap_err().kind(), ErrorKind::Closed);
    }
    assert_eq!(rec.outcomes("stuck"), [0, 0, 0, 1, 2]);
    assert_eq!(rec.depth("stuck"), 0.0);
    assert_eq!(queue.submit(7).unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(rec.rejected("stuck", "closed"), 1);
    // Every accepted job is counted once.
    assert_eq!(
        rec.submitted("stuck"),
        rec.outcomes("stuck").iter().sum::<u64>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_built_without_a_recorder_reports_nothing_and_works() {
    let rec = Recorded::new();
    let queue = WorkQueue::builder()
        .name("quiet")
        .build(|n: u8| async move { n })
        .unwrap();
    assert_eq!(queue.submit(1).unwrap().await.unwrap(), 1);
    assert_eq!(rec.try_counter(SUBMITTED, &[("queue", "quiet")]), None);
    assert!(rec.label_values().is_empty());
}

/// The durable queue against a real Redis server.
#[cfg(all(feature = "redis", feature = "test-util"))]
mod durable {
    use std::time::Duration;

    use raceguard::queue::durable::{AckOutcome, DurableQueue, DurableQueueConfig, Submitted};
    use raceguard::redis::{RedisBackend, RedisConfig};
    use raceguard::testing::RedisServer;

    use super::Recorded;

    const NONE: Duration = Duration::ZERO;
    const Q: &str = "metered";

    fn submitted(rec: &Recorded, result: &str) -> u64 {
        rec.counter(
            "raceguard_durable_queue_submitted_total",
            &[("queue", Q), ("result", result)],
        )
    }

    fn acked(rec: &Recorded, outcome: &str) -> u64 {
        rec.counter(
            "raceguard_durable_queue_acked_total",
            &[("queue", Q), ("outcome", outcome)],
        )
    }

    fn reclaimed(rec: &Recorded) -> u64 {
        rec.counter("raceguard_durable_queue_reclaimed_total", &[("queue", Q)])
    }

    fn dead(rec: &Recorded) -> u64 {
        rec.counter(
            "raceguard_durable_queue_dead_lettered_total",
            &[("queue", Q)],
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durable_counters_follow_the_scripts_replies() {
        let Some(server) = RedisServer::start_or_skip() else {
            return;
        };
        let backend = RedisBackend::connect(
            server.url(),
            RedisConfig::default()
                .connect_timeout(Duration::from_secs(2))
                .response_timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap();
        let rec = Recorded::new();
        let queue = rec.build(|| {
            DurableQueue::new(
                backend,
                Q,
                DurableQueueConfig::default()
                    .capacity(3)
                    .max_attempts(Some(2)),
            )
            .unwrap()
        });
        for result in ["accepted", "duplicate", "full"] {
            assert_eq!(
                rec.try_counter(
                    "raceguard_durable_queue_submitted_total",
                    &[("queue", Q), ("result", result)]
                ),
                Some(0),
                "{result} registered at build time"
            );
        }

        // Submits: three accepted, one duplicate, one refused; invalid
        // input counts nothing.
        assert!(queue.submit("a", b"1").await.unwrap().is_accepted());
        assert!(queue.submit("b", b"2").await.unwrap().is_accepted());
        assert!(matches!(
            queue.submit("a", b"1").await.unwrap(),
            Submitted::Duplicate { .. }
        ));
        assert!(queue.submit("c", b"3").await.unwrap().is_accepted());
        assert_eq!(
            queue.submit("d", b"4").await.unwrap_err().kind(),
            raceguard::ErrorKind::Capacity
        );
        assert!(queue.submit("", b"x").await.is_err());
        assert_eq!(
            [
                submitted(&rec, "accepted"),
                submitted(&rec, "duplicate"),
                submitted(&rec, "full")
            ],
            [3, 1, 1]
        );

        // Job a: delivered to w1, taken over by w2; w1's late ack is not
        // its own, w2 completes it, a retry finds it completed.
        let (w1, w2) = (queue.consumer("w1").unwrap(), queue.consumer("w2").unwrap());
        let a1 = w1.next(NONE).await.unwrap().unwrap();
        assert_eq!(a1.idempotency_key(), "a");
        let a2 = w2.reclaim(NONE, 10).await.unwrap().pop().unwrap();
        assert_eq!((a2.idempotency_key(), a2.attempts()), ("a", 2));
        assert_eq!(reclaimed(&rec), 1);
        assert_eq!(a1.ack().await.unwrap(), AckOutcome::NotOwned);
        assert_eq!(a2.ack().await.unwrap(), AckOutcome::Completed);
        assert_eq!(a2.ack().await.unwrap(), AckOutcome::AlreadyCompleted);
        assert_eq!(a1.ack().await.unwrap(), AckOutcome::AlreadyCompleted);
        assert_eq!(
            [
                acked(&rec, "completed"),
                acked(&rec, "already_completed"),
                acked(&rec, "not_owned")
            ],
            [1, 2, 1]
        );

        // Job b: attempt 2 is reclaimed, attempt 3 is dead-lettered.
        let b1 = w1.next(NONE).await.unwrap().unwrap();
        assert_eq!(b1.idempotency_key(), "b");
        let b2 = w1.reclaim(NONE, 10).await.unwrap();
        assert_eq!(b2.len(), 1);
        assert_eq!(reclaimed(&rec), 2);
        assert!(w1.reclaim(NONE, 10).await.unwrap().is_empty());
        assert_eq!((reclaimed(&rec), dead(&rec)), (2, 1));

        // A foreign entry is dead-lettered by a read, job c delivered.
        let stream = queue.stream_key().as_str().to_owned();
        server
            .cmd(&["XADD", &stream, "*", "foreign", "entry"])
            .unwrap();
        let jobs = w2.next_batch(10, NONE).await.unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(dead(&rec), 2);
        assert_eq!(jobs[0].ack().await.unwrap(), AckOutcome::Completed);
        assert_eq!(acked(&rec, "completed"), 2);
        assert_eq!(queue.dead_letters(10).await.unwrap().len(), 2);
        assert_eq!(queue.len().await.unwrap(), 0);

        // Only the queue's name and fixed words are labels: never an
        // idempotency key or a consumer name.
        for v in rec.label_values() {
            assert!(
                [
                    Q,
                    "accepted",
                    "duplicate",
                    "full",
                    "completed",
                    "already_completed",
                    "not_owned"
                ]
                .contains(&v.as_str()),
                "unexpected label value {v:?}"
            );
        }
    }
}
