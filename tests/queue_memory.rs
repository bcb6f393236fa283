//! `WorkQueue`: capacity, per-key ordering, rate limits, panics, shutdown,
//! bad configuration and loss-freedom under concurrent submission.
//!
//! No sleeps as synchronisation: workers are held with semaphores and
//! report through channels; time-based tests run on Tokio's paused clock.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raceguard::queue::{Shutdown, WorkQueue};
use raceguard::rate::{AllOf, Decision, Limit, Quota, RateLimiter, TokioClock};
use raceguard::{Error, ErrorKind};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

/// A handler that reports each start on `started` and then waits for a
/// permit of `gate` before finishing.
fn gated(
    gate: Arc<Semaphore>,
    started: mpsc::UnboundedSender<u32>,
) -> impl Fn(u32) -> std::pin::Pin<Box<dyn Future<Output = u32> + Send>> + Send + Sync + 'static {
    move |n| {
        let (gate, started) = (gate.clone(), started.clone());
        Box::pin(async move {
            started.send(n).unwrap();
            gate.acquire().await.unwrap().forget();
            n
        })
    }
}

#[tokio::test]
async fn capacity_bound_is_exact_and_rejection_is_immediate() {
    const WORKERS: usize = 2;
    const CAPACITY: usize = 5;
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut started) = mpsc::unbounded_channel();
    let queue = WorkQueue::builder()
        .capacity(CAPACITY)
        .workers(WORKERS)
        .build(gated(gate.clone(), tx))
        .unwrap();

    // Occupy both workers and wait until they have taken their jobs.
    let mut handles = Vec::new();
    for n in 0..WORKERS as u32 {
        handles.push(queue.submit(n).unwrap());
    }
    for _ in 0..WORKERS {
        started.recv().await.unwrap();
    }
    assert_eq!(queue.len(), 0);

    // Now exactly CAPACITY more are accepted; the next one fails at once.
    let mut rejected = 0;
    for n in 0..(CAPACITY + 3) as u32 {
        match queue.submit(100 + n) {
            Ok(h) => handles.push(h),
            Err(Error::CapacityExceeded { resource, capacity }) => {
                assert_eq!((resource, capacity), ("work queue", CAPACITY));
                rejected += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(handles.len(), WORKERS + CAPACITY);
    assert_eq!(rejected, 3);
    assert!(queue.is_full());
    assert_eq!(queue.len(), CAPACITY);
    assert!(queue.retry_after_hint() > Duration::ZERO);

    // Release everything: every accepted job completes with its own value.
    gate.add_permits(WORKERS + CAPACITY);
    let mut got = Vec::new();
    for h in handles {
        got.push(h.await.unwrap());
    }
    got.sort_unstable();
    let mut want: Vec<u32> = (0..WORKERS as u32)
        .chain(100..100 + CAPACITY as u32)
        .collect();
    want.sort_unstable();
    assert_eq!(got, want);
    assert!(!queue.is_full());
    assert_eq!(queue.retry_after_hint(), Duration::ZERO);

    // There is room again.
    gate.add_permits(1);
    assert_eq!(queue.submit(7).unwrap().await.unwrap(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_under_concurrency() {
    const KEYS: usize = 16;
    const JOBS: usize = 60;
    let log: Arc<Mutex<HashMap<usize, Vec<usize>>>> = Arc::default();
    let running: Arc<Vec<AtomicBool>> =
        Arc::new((0..KEYS).map(|_| AtomicBool::new(false)).collect());
    let overlaps = Arc::new(AtomicUsize::new(0));
    let (l, r, o) = (log.clone(), running.clone(), overlaps.clone());
    let queue = Arc::new(
        WorkQueue::builder()
            .capacity(KEYS * JOBS)
            .workers(4)
            .keyed::<usize>()
            .build(move |(key, n): (usize, usize)| {
                let (l, r, o) = (l.clone(), r.clone(), o.clone());
                async move {
                    if r[key].swap(true, Ordering::SeqCst) {
                        o.fetch_add(1, Ordering::SeqCst);
                    }
                    l.lock().unwrap().entry(key).or_default().push(n);
                    // Give other workers a chance to start a job of this key.
                    tokio::task::yield_now().await;
                    r[key].store(false, Ordering::SeqCst);
                }
            })
            .unwrap(),
    );

    // One submitter task per key, all at once: a key's submission order is
    // its task's loop order.
    let mut submitters = Vec::new();
    for key in 0..KEYS {
        let queue = queue.clone();
        submitters.push(tokio::spawn(async move {
            let mut handles = Vec::new();
            for n in 0..JOBS {
                handles.push(queue.submit_keyed(key, (key, n)).unwrap());
                if n % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            for h in handles {
                h.await.unwrap();
            }
        }));
    }
    for s in submitters {
        s.await.unwrap();
    }
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two jobs of one key overlapped"
    );
    let log = log.lock().unwrap();
    assert_eq!(log.len(), KEYS);
    for (key, order) in log.iter() {
        assert_eq!(*order, (0..JOBS).collect::<Vec<_>>(), "key {key}");
    }
}

#[tokio::test(start_paused = true)]
async fn different_keys_run_in_parallel_same_key_does_not() {
    // Each job counts itself in (tracking the peak number of jobs running
    // at once), waits up to 1 s (virtual time) for the peak to reach 2, and
    // reports whether it did.
    let (active, _) = tokio::sync::watch::channel((0usize, 0usize));
    let active = Arc::new(active);
    let a = active.clone();
    let queue = WorkQueue::builder()
        .workers(2)
        .build(move |_: ()| {
            let a = a.clone();
            async move {
                a.send_modify(|(now, peak)| {
                    *now += 1;
                    *peak = (*peak).max(*now);
                });
                let mut rx = a.subscribe();
                let met =
                    tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|(_, p)| *p >= 2))
                        .await
                        .is_ok();
                a.send_modify(|(now, _)| *now -= 1);
                met
            }
        })
        .unwrap();

    let alice = queue.submit_keyed("alice".into(), ()).unwrap();
    let bob = queue.submit_keyed("bob".into(), ()).unwrap();
    assert!(
        alice.await.unwrap(),
        "alice's job never met bob's: not parallel"
    );
    assert!(bob.await.unwrap());

    active.send_modify(|(_, peak)| *peak = 0);
    // Two jobs of one key: the second cannot start before the first ends,
    // so neither meets a partner.
    let first = queue.submit_keyed("carol".into(), ()).unwrap();
    let second = queue.submit_keyed("carol".into(), ()).unwrap();
    assert!(!first.await.unwrap(), "carol's jobs overlapped");
    assert!(!second.await.unwrap(), "carol's jobs overlapped");
}

#[tokio::test(start_paused = true)]
async fn workers_never_exceed_the_rate_limit() {
    // 5 per second, burst 5: GCRA conformance means that in any run of
    // calls i..=j, (j - i + 1) <= burst + (t_j - t_i) / interval.
    let quota = Quota::per_second(5).unwrap();
    let interval = Duration::from_millis(200);
    let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let t = times.clone();
    let queue = WorkQueue::builder()
        .capacity(100)
        .workers(4)
        .rate_limit(RateLimiter::with_clock(quota, TokioClock::new()))
        .build(move |_: u32| {
            let t = t.clone();
            async move {
                t.lock().unwrap().push(Instant::now());
                // Some work, so workers overlap.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .unwrap();
    let start = Instant::now();
    let handles: Vec<_> = (0..60).map(|n| queue.submit(n).unwrap()).collect();
    for h in handles {
        h.await.unwrap();
    }
    let mut times = times.lock().unwrap().clone();
    times.sort_unstable();
    assert_eq!(times.len(), 60);
    for i in 0..times.len() {
        for j in i..times.len() {
            let span = times[j] - times[i];
            let allowed = 5 + (span.as_nanos() / interval.as_nanos()) as usize;
            assert!(j - i < allowed, "calls {i}..={j} within {span:?}");
        }
    }
    // The limiter really throttled: 55 calls beyond the burst need 55
    // intervals (virtual time).
    assert!(*times.last().unwrap() - start >= interval * 55);
}

/// GCRA conformance of sorted call times against one quota.
fn conforms(times: &[Instant], burst: usize, interval: Duration) -> Result<(), String> {
    for i in 0..times.len() {
        for j in i..times.len() {
            let span = times[j] - times[i];
            let allowed = burst + (span.as_nanos() / interval.as_nanos()) as usize;
            if j - i >= allowed {
                return Err(format!("calls {i}..={j} within {span:?}"));
            }
        }
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn workers_obey_every_limit_of_a_multi_limit() {
    // An external API allows 5 calls per second and 12 per minute: the
    // workers must stay within both (`AllOf` checks them all or nothing;
    // that a denial consumes nothing is tested with `MultiLimit`).
    let per_second = Arc::new(RateLimiter::with_clock(
        Quota::per_second(5).unwrap(),
        TokioClock::new(),
    ));
    let per_minute = Arc::new(RateLimiter::with_clock(
        Quota::per_minute(12).unwrap(),
        TokioClock::new(),
    ));
    let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let t = times.clone();
    let queue = WorkQueue::builder()
        .capacity(100)
        .workers(4)
        .rate_limit(
            AllOf::new("per-second", per_second.clone()).and("per-minute", per_minute.clone()),
        )
        .build(move |_: u32| {
            let t = t.clone();
            async move {
                t.lock().unwrap().push(Instant::now());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .unwrap();
    let start = Instant::now();
    let handles: Vec<_> = (0..30).map(|n| queue.submit(n).unwrap()).collect();
    for h in handles {
        h.await.unwrap();
    }
    let mut times = times.lock().unwrap().clone();
    times.sort_unstable();
    assert_eq!(times.len(), 30);
    conforms(&times, 5, Duration::from_millis(200)).unwrap();
    conforms(&times, 12, Duration::from_secs(5)).unwrap();
    // The minute limit bound: 18 calls beyond its burst need 18 × 5 s.
    assert!(*times.last().unwrap() - start >= Duration::from_secs(90));
    drop((per_second, per_minute));
}

#[tokio::test(start_paused = true)]
async fn shared_limiter_counts_other_callers_too() {
    let limiter = Arc::new(RateLimiter::with_clock(
        Quota::with_interval(Duration::from_secs(1)).unwrap(),
        TokioClock::new(),
    ));
    let queue = WorkQueue::builder()
        .workers(2)
        .shared_rate_limit(limiter.clone())
        .build(|_: ()| async { Instant::now() })
        .unwrap();
    // Someone else takes the only cell first.
    let start = Instant::now();
    assert!(limiter.check().allowed());
    let ran_at = queue.submit(()).unwrap().await.unwrap();
    assert!(ran_at - start >= Duration::from_secs(1));
}

/// A limiter whose backend is down.
struct BrokenLimit;

impl Limit for BrokenLimit {
    fn check_n(&self, _n: u32) -> impl Future<Output = raceguard::Result<Decision>> + Send {
        std::future::ready(Err(Error::backend("redis", true, "connection refused")))
    }
}

#[tokio::test]
async fn a_failing_limiter_fails_the_job_not_the_worker() {
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let queue = WorkQueue::builder()
        .rate_limit(BrokenLimit)
        .build(move |_: ()| {
            r.fetch_add(1, Ordering::SeqCst);
            async {}
        })
        .unwrap();
    for _ in 0..3 {
        let err = queue.submit(()).unwrap().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Backend);
    }
    assert_eq!(ran.load(Ordering::SeqCst), 0, "a job ran without a cell");
    let report = queue
        .shutdown(Shutdown::Drain(Duration::from_secs(1)))
        .await;
    assert_eq!(
        (report.accepted, report.completed, report.aborted),
        (3, 3, 0)
    );
}

#[tokio::test]
async fn panicking_handler_gives_panicked_and_the_worker_survives() {
    let queue = WorkQueue::builder()
        .workers(1)
        .build(|n: u32| async move {
            if n.is_multiple_of(2) {
                panic!("job {n} exploded");
            }
            n
        })
        .unwrap();
    let handles: Vec<_> = (0..6).map(|n| queue.submit(n).unwrap()).collect();
    for (n, h) in handles.into_iter().enumerate() {
        match h.await {
            Ok(v) => assert_eq!(v as usize, n),
            Err(Error::Panicked { what, message }) => {
                assert!(n.is_multiple_of(2));
                assert_eq!(what, "work queue job");
                assert_eq!(message, format!("job {n} exploded"));
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    // Also a panic while *creating* the future.
    let queue = WorkQueue::builder()
        .build(|n: u32| {
            assert!(n != 0, "no zeros");
            async move { n }
        })
        .unwrap();
    assert!(matches!(
        queue.submit(0).unwrap().await,
        Err(Error::Panicked { .. })
    ));
    assert_eq!(queue.submit(1).unwrap().await.unwrap(), 1);
    let report = queue
        .shutdown(Shutdown::Drain(Duration::from_secs(1)))
        .await;
    assert_eq!((report.accepted, report.completed), (2, 2));
}

#[tokio::test(start_paused = true)]
async fn shutdown_drain_finishes_every_job() {
    let queue = WorkQueue::builder()
        .capacity(200)
        .workers(3)
        .build(|n: u32| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            n
        })
        .unwrap();
    let handles: Vec<_> = (0..150).map(|n| queue.submit(n).unwrap()).collect();
    let report = queue
        .shutdown(Shutdown::Drain(Duration::from_secs(60)))
        .await;
    assert_eq!(report.accepted, 150);
    assert_eq!(report.completed, 150);
    assert_eq!(report.aborted, 0);
    assert!(report.handed_back.is_empty());
    for (n, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap() as usize, n);
    }
    assert!(matches!(
        queue.submit(1),
        Err(Error::Closed { what: "work queue" })
    ));
}

#[tokio::test(start_paused = true)]
async fn shutdown_drain_deadline_hands_back_the_rest() {
    let queue = WorkQueue::builder()
        .capacity(20)
        .workers(1)
        .build(|n: u32| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            n
        })
        .unwrap();
    let handles: Vec<_> = (0..10).map(|n| queue.submit(n).unwrap()).collect();
    let report = queue
        .shutdown(Shutdown::Drain(Duration::from_millis(3500)))
        .await;
    // Jobs 0..3 finished, job 3 was running at the deadline, 4..10 queued.
    assert_eq!(report.accepted, 10);
    assert_eq!(report.completed, 3);
    assert_eq!(report.aborted, 1);
    assert_eq!(report.handed_back, (4..10).collect::<Vec<_>>());
    assert_eq!(
        report.completed + report.aborted + report.handed_back.len(),
        report.accepted
    );
    for (n, h) in handles.into_iter().enumerate() {
        match h.await {
            Ok(v) => assert!(n < 3 && v as usize == n),
            Err(Error::Closed { .. }) => assert!(n >= 3),
            Err(e) => panic!("unexpected {e}"),
        }
    }
}

#[tokio::test]
async fn shutdown_hand_back_returns_queued_jobs_and_lets_running_ones_finish() {
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut started) = mpsc::unbounded_channel();
    let queue = Arc::new(
        WorkQueue::builder()
            .capacity(10)
            .workers(1)
            .keyed::<u32>()
            .build(gated(gate.clone(), tx))
            .unwrap(),
    );
    let running = queue.submit(0).unwrap();
    assert_eq!(started.recv().await, Some(0));
    // Queued: plain jobs and keyed jobs (one of them waiting behind another).
    let mut queued = vec![queue.submit(1).unwrap(), queue.submit_keyed(9, 2).unwrap()];
    queued.push(queue.submit_keyed(9, 3).unwrap());
    queued.push(queue.submit(4).unwrap());

    let q = queue.clone();
    let shutdown = tokio::spawn(async move {
        q.shutdown(Shutdown::HandBack(Duration::from_secs(60)))
            .await
    });
    // A handed-back job's handle resolves to Closed: the hand-back happened.
    let first = queued.remove(0);
    assert!(matches!(first.await, Err(Error::Closed { .. })));
    assert!(matches!(queue.submit(5), Err(Error::Closed { .. })));
    // The running job is allowed to finish.
    gate.add_permits(1);
    assert_eq!(running.await.unwrap(), 0);
    let report = shutdown.await.unwrap();
    assert_eq!(report.handed_back, vec![1, 2, 3, 4]);
    assert_eq!(
        (report.accepted, report.completed, report.aborted),
        (5, 1, 0)
    );
    for h in queued {
        assert!(matches!(h.await, Err(Error::Closed { .. })));
    }
    // Nothing else ever started.
    assert!(started.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn shutdown_hand_back_aborts_a_hung_job_at_the_deadline() {
    let queue = WorkQueue::builder()
        .workers(1)
        .build(|_: ()| std::future::pending::<()>())
        .unwrap();
    let hung = queue.submit(()).unwrap();
    let waiting = queue.submit(()).unwrap();
    tokio::task::yield_now().await; // let the worker take the first job
    let report = queue
        .shutdown(Shutdown::HandBack(Duration::from_secs(5)))
        .await;
    assert_eq!(
        (report.accepted, report.completed, report.aborted),
        (2, 0, 1)
    );
    assert_eq!(report.handed_back.len(), 1);
    assert!(matches!(hung.await, Err(Error::Closed { .. })));
    assert!(matches!(waiting.await, Err(Error::Closed { .. })));
}

#[tokio::test(start_paused = true)]
async fn hand_back_includes_a_job_waiting_for_the_limiter() {
    let quota = Quota::with_interval(Duration::from_secs(3600)).unwrap();
    let queue = WorkQueue::builder()
        .workers(1)
        .rate_limit(RateLimiter::with_clock(quota, TokioClock::new()))
        .build(|n: u32| async move { n })
        .unwrap();
    assert_eq!(queue.submit(0).unwrap().await.unwrap(), 0);
    // The next job waits an hour for a cell; jobs behind it wait in the queue.
    let handles: Vec<_> = (1..4).map(|n| queue.submit(n).unwrap()).collect();
    tokio::task::yield_now().await;
    assert_eq!(queue.len(), 2, "the worker holds job 1 while it waits");
    let report = queue
        .shutdown(Shutdown::HandBack(Duration::from_secs(1)))
        .await;
    assert_eq!(report.handed_back, vec![1, 2, 3]);
    assert_eq!(
        (report.accepted, report.completed, report.aborted),
        (4, 1, 0)
    );
    for h in handles {
        assert!(matches!(h.await, Err(Error::Closed { .. })));
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_hint_follows_the_limiter() {
    let quota = Quota::with_interval(Duration::from_secs(10)).unwrap();
    let queue = WorkQueue::builder()
        .capacity(2)
        .workers(1)
        .rate_limit(RateLimiter::with_clock(quota, TokioClock::new()))
        .build(|n: u32| async move { n })
        .unwrap();
    assert_eq!(queue.retry_after_hint(), Duration::ZERO);
    // Job 0 takes the only cell; job 1 is then held ~10 s for the next.
    assert_eq!(queue.submit(0).unwrap().await.unwrap(), 0);
    let _one = queue.submit(1).unwrap();
    tokio::task::yield_now().await;
    assert_eq!(queue.len(), 0);
    let _two = queue.submit(2).unwrap();
    assert_eq!(queue.retry_after_hint(), Duration::ZERO, "not full yet");
    let _three = queue.submit(3).unwrap();
    assert!(queue.is_full());
    let hint = queue.retry_after_hint();
    assert!(
        hint > Duration::from_secs(5) && hint <= Duration::from_secs(10),
        "{hint:?}"
    );
}

#[test]
fn bad_configuration_is_a_typed_error() {
    // Outside a runtime.
    let err = WorkQueue::builder()
        .build(|n: u8| async move { n })
        .unwrap_err();
    assert!(matches!(
        err,
        Error::InvalidInput {
            what: "work_queue.runtime",
            ..
        }
    ));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let err = WorkQueue::builder()
            .capacity(0)
            .build(|n: u8| async move { n })
            .unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidInput {
                what: "work_queue.capacity",
                ..
            }
        ));
        let err = WorkQueue::builder()
            .workers(0)
            .build(|n: u8| async move { n })
            .unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidInput {
                what: "work_queue.workers",
                ..
            }
        ));
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_job_lost_under_10k_concurrent_submissions() {
    const TASKS: usize = 16;
    const PER_TASK: usize = 625;
    let seen: Arc<Vec<AtomicUsize>> =
        Arc::new((0..TASKS * PER_TASK).map(|_| AtomicUsize::new(0)).collect());
    let s = seen.clone();
    let queue = Arc::new(
        WorkQueue::builder()
            .capacity(64)
            .workers(4)
            .build(move |id: usize| {
                let s = s.clone();
                async move {
                    s[id].fetch_add(1, Ordering::SeqCst);
                    id * 2
                }
            })
            .unwrap(),
    );
    let rejections = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (queue, rejections) = (queue.clone(), rejections.clone());
        tasks.push(tokio::spawn(async move {
            let mut handles = Vec::new();
            for i in 0..PER_TASK {
                let id = t * PER_TASK + i;
                loop {
                    match queue.submit(id) {
                        Ok(h) => break handles.push((id, h)),
                        Err(Error::CapacityExceeded { .. }) => {
                            rejections.fetch_add(1, Ordering::Relaxed);
                            tokio::task::yield_now().await;
                        }
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
            }
            for (id, h) in handles {
                assert_eq!(h.await.unwrap(), id * 2);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let counts: HashSet<usize> = seen.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert_eq!(counts, HashSet::from([1]), "every job ran exactly once");
    let report = queue
        .shutdown(Shutdown::Drain(Duration::from_secs(10)))
        .await;
    assert_eq!(
        (report.accepted, report.completed),
        (TASKS * PER_TASK, TASKS * PER_TASK)
    );
}

#[tokio::test]
async fn dropping_a_handle_does_not_cancel_the_job() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let queue = WorkQueue::builder()
        .build(move |n: u32| {
            let tx = tx.clone();
            async move { tx.send(n).unwrap() }
        })
        .unwrap();
    drop(queue.submit(42).unwrap());
    assert_eq!(rx.recv().await, Some(42));
}

#[tokio::test]
async fn dropping_the_queue_drains_it() {
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut started) = mpsc::unbounded_channel();
    let queue = WorkQueue::builder()
        .capacity(10)
        .workers(1)
        .build(gated(gate.clone(), tx))
        .unwrap();
    let handles: Vec<_> = (0..5).map(|n| queue.submit(n).unwrap()).collect();
    assert_eq!(started.recv().await, Some(0));
    drop(queue);
    gate.add_permits(5);
    for (n, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap() as usize, n);
    }
    // The worker exited once the queue was empty: its sender is gone.
    let mut rest = Vec::new();
    while let Some(n) = started.recv().await {
        rest.push(n);
    }
    assert_eq!(rest, vec![1, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn a_refused_job_is_handed_back_not_lost() {
    let queue = WorkQueue::builder()
        .capacity(1)
        .workers(1)
        .build(|s: String| async move { s })
        .unwrap();
    let first = queue.try_submit("a".to_string()).unwrap();
    // The worker has not run yet (nothing awaited): the queue is full.
    let refused = queue
        .try_submit_keyed("k".into(), "b".to_string())
        .unwrap_err();
    assert_eq!(refused.error().kind(), ErrorKind::Capacity);
    assert_eq!(refused.into_job(), "b");
    assert_eq!(first.await.unwrap(), "a");
    let report = queue
        .shutdown(Shutdown::Drain(Duration::from_secs(1)))
        .await;
    assert_eq!(report.accepted, 1);
    let (job, err) = queue.try_submit("c".to_string()).unwrap_err().into_parts();
    assert_eq!((job.as_str(), err.kind()), ("c", ErrorKind::Closed));
    // `?` turns a refusal into the crate's error.
    fn submit(q: &WorkQueue<String, String>) -> Result<(), Error> {
        let _handle = q.try_submit("d".to_string())?;
        Ok(())
    }
    assert_eq!(submit(&queue).unwrap_err().kind(), ErrorKind::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_shutdown_leaves_every_worker_to_the_next_call() {
    // One job hangs forever; one more waits behind it.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let started_tx = Arc::new(Mutex::new(Some(started_tx)));
    let queue = WorkQueue::builder()
        .capacity(4)
        .workers(1)
        .build(move |n: u32| {
            let started_tx = started_tx.clone();
            async move {
                if let Some(tx) = started_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
                std::future::pending::<()>().await;
                n
            }
        })
        .unwrap();
    let _running = queue.submit(1).unwrap();
    let _queued = queue.submit(2).unwrap();
    started_rx.await.unwrap();
    // A Drain shutdown whose caller gives up (drops it) while it waits.
    let gave_up = tokio::time::timeout(
        Duration::from_secs(1),
        queue.shutdown(Shutdown::Drain(Duration::from_secs(3600))),
    )
    .await;
    assert!(gave_up.is_err(), "the hung job cannot drain");
    // The next call must still be able to stop the worker and account for
    // every job: 1 aborted (the hung one), 1 handed back, 0 completed.
    let report = queue
        .shutdown(Shutdown::HandBack(Duration::from_millis(1)))
        .await;
    assert_eq!(report.accepted, 2);
    assert_eq!(report.completed, 0);
    assert_eq!(report.handed_back, vec![2]);
    assert_eq!(report.aborted, 1);
}
