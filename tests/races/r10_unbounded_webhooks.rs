//! R10 (seed 002, seed 001 #8): every webhook is processed inline, as its
//! own concurrent task, with no queue and no backpressure. A burst of
//! webhooks becomes a burst of calls to the rate-limited external API
//! (Audnex, MAM), which answers 429, while the service itself holds one task
//! (and one browser, one connection ...) per webhook.
//!
//! raceguard: a bounded `WorkQueue` whose workers obey one shared
//! `RateLimiter`. The webhook handler only submits: beyond capacity it gets
//! `CapacityExceeded` at once (the 503 path); accepted jobs run at the
//! API's pace and each completes exactly once.
//!
//! Time is Tokio's paused clock, so the burst is simultaneous by
//! construction (every webhook arrives before virtual time moves) and the
//! stub's windows are exact: no sleeps as synchronisation, no wall clock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raceguard::Error;
use raceguard::queue::{Shutdown, WorkQueue};
use raceguard::rate::{Quota, RateLimiter, TokioClock};
use tokio::time::Instant;

/// The external API's documented limit: 10 calls in any 1 s window.
const API_CALLS: usize = 10;
const API_WINDOW: Duration = Duration::from_secs(1);
const BURST: usize = 10_000;
const CAPACITY: usize = 500;
const WORKERS: usize = 4;
/// How long one metadata lookup takes after the API answered.
const WORK: Duration = Duration::from_millis(30);

/// The external API stub: answers 429 when a call would be the
/// `API_CALLS + 1`-th accepted call within the last `API_WINDOW` (a sliding
/// window on Tokio's clock).
#[derive(Debug, Default)]
struct ExternalApi {
    accepted: Mutex<VecDeque<Instant>>,
    ok: AtomicUsize,
    too_many_requests: AtomicUsize,
}

impl ExternalApi {
    fn call(&self) -> u16 {
        let now = Instant::now();
        let mut recent = self.accepted.lock().unwrap();
        while recent.front().is_some_and(|&t| now - t >= API_WINDOW) {
            recent.pop_front();
        }
        if recent.len() >= API_CALLS {
            self.too_many_requests.fetch_add(1, Ordering::SeqCst);
            return 429;
        }
        recent.push_back(now);
        self.ok.fetch_add(1, Ordering::SeqCst);
        200
    }

    fn status(&self) -> (usize, usize) {
        (
            self.ok.load(Ordering::SeqCst),
            self.too_many_requests.load(Ordering::SeqCst),
        )
    }
}

/// Seed 002's handler: process the webhook inline.
async fn process_webhook(api: &ExternalApi) -> u16 {
    let status = api.call();
    tokio::time::sleep(WORK).await;
    status
}

#[tokio::test(start_paused = true)]
async fn naive_version_fails() {
    let api = Arc::new(ExternalApi::default());
    // @app.post("/webhook"): one concurrent task per request, unbounded.
    let tasks: Vec<_> = (0..BURST)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { process_webhook(&api).await })
        })
        .collect();
    let mut statuses = Vec::with_capacity(BURST);
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let (ok, rejected) = api.status();
    // All 10,000 calls hit the API in the same instant: it accepts its 10
    // and answers 429 to everyone else.
    assert_eq!(ok, API_CALLS);
    assert_eq!(rejected, BURST - API_CALLS);
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        BURST - API_CALLS
    );
}

#[tokio::test(start_paused = true)]
async fn raceguard_prevents() {
    let api = Arc::new(ExternalApi::default());
    // One limiter for the API, at exactly its documented rate and no burst
    // beyond one call: calls are spaced by 100 ms, so any 1 s window holds
    // at most 10.
    let limit = RateLimiter::with_clock(
        Quota::with_interval(API_WINDOW / API_CALLS as u32).unwrap(),
        TokioClock::new(),
    );
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..BURST).map(|_| AtomicUsize::new(0)).collect());
    let (a, r) = (api.clone(), runs.clone());
    let queue = Arc::new(
        WorkQueue::builder()
            .capacity(CAPACITY)
            .workers(WORKERS)
            .rate_limit(limit)
            .build(move |webhook: usize| {
                let (api, runs) = (a.clone(), r.clone());
                async move {
                    runs[webhook].fetch_add(1, Ordering::SeqCst);
                    process_webhook(&api).await
                }
            })
            .unwrap(),
    );

    // The same burst: 10,000 webhooks, from 100 concurrent request tasks.
    // The handler only submits; it never waits.
    let start = Instant::now();
    let requests: Vec<_> = (0..100)
        .map(|t| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                let mut shed = 0;
                for i in 0..BURST / 100 {
                    let webhook = t * (BURST / 100) + i;
                    match queue.submit(webhook) {
                        Ok(handle) => accepted.push((webhook, handle)),
                        Err(Error::CapacityExceeded { capacity, .. }) => {
                            assert_eq!(capacity, CAPACITY);
                            // 503 with Retry-After.
                            assert!(queue.retry_after_hint() > Duration::ZERO);
                            shed += 1;
                        }
                        Err(e) => panic!("unexpected {e}"),
                    }
                    if i % 10 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                // Answering took no (virtual) time: the webhook returned at once.
                assert_eq!(Instant::now(), start);
                (accepted, shed)
            })
        })
        .collect();
    let mut accepted = Vec::new();
    let mut shed = 0;
    for r in requests {
        let (a, s) = r.await.unwrap();
        accepted.extend(a);
        shed += s;
    }
    // The burst beyond the queue's capacity was shed, the rest accepted.
    assert_eq!(accepted.len() + shed, BURST);
    assert!(shed > 0);
    assert!(accepted.len() >= CAPACITY);

    // Every accepted job completes, and the API never said 429.
    for (_, handle) in &mut accepted {
        assert_eq!(handle.await.unwrap(), 200);
    }
    let (ok, rejected) = api.status();
    assert_eq!(rejected, 0);
    assert_eq!(ok, accepted.len());

    // Exactly once: accepted webhooks ran once, shed ones never.
    let accepted_ids: std::collections::HashSet<usize> = accepted.iter().map(|(w, _)| *w).collect();
    for (webhook, count) in runs.iter().enumerate() {
        let want = usize::from(accepted_ids.contains(&webhook));
        assert_eq!(count.load(Ordering::SeqCst), want, "webhook {webhook}");
    }
    let report = queue
        .shutdown(Shutdown::Drain(Duration::from_secs(1)))
        .await;
    assert_eq!(report.accepted, accepted.len());
    assert_eq!(report.completed, accepted.len());
    assert!(report.handed_back.is_empty());
}
