//! R08 (seed 002): every webhook builds a new `MetadataCoordinator`, and
//! each coordinator keeps its own `last_api_call` to space out its calls to
//! the external metadata API (Audnex: one call per 500 ms). Concurrent
//! webhooks each start from `last_api_call = 0`, so they call the API
//! together and get 429s.
//!
//! raceguard: one `RateLimiter` shared by every coordinator, with fair
//! (FIFO) waiting. Time is Tokio's paused clock: virtual, exact, no sleeps
//! as synchronisation and no wall-clock assertions.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use raceguard::rate::{Quota, RateLimiter, TokioClock};
use tokio::time::Instant;

use crate::support::Sequencer;

const MIN_INTERVAL: Duration = Duration::from_millis(500);
const WEBHOOKS: usize = 3;
const CALLS_PER_WEBHOOK: usize = 2; // search, then details

/// The external API: accepts a call only if the previous accepted call was
/// at least `MIN_INTERVAL` earlier; otherwise answers 429.
#[derive(Debug)]
struct ExternalApi {
    start: Instant,
    calls: Mutex<Vec<(Duration, usize)>>,
    last_accepted: Mutex<Option<Duration>>,
    too_many_requests: Mutex<usize>,
}

impl ExternalApi {
    fn new() -> Arc<Self> {
        Arc::new(ExternalApi {
            start: Instant::now(),
            calls: Mutex::new(Vec::new()),
            last_accepted: Mutex::new(None),
            too_many_requests: Mutex::new(0),
        })
    }

    fn call(&self, webhook: usize) -> u16 {
        let at = self.start.elapsed();
        self.calls.lock().unwrap().push((at, webhook));
        let mut last = self.last_accepted.lock().unwrap();
        match *last {
            Some(prev) if at - prev < MIN_INTERVAL => {
                *self.too_many_requests.lock().unwrap() += 1;
                429
            }
            _ => {
                *last = Some(at);
                200
            }
        }
    }

    fn status(&self) -> (usize, usize) {
        (
            self.calls.lock().unwrap().len(),
            *self.too_many_requests.lock().unwrap(),
        )
    }
}

/// Seed 002's coordinator: its own `last_api_call`, per instance.
struct MetadataCoordinator {
    last_api_call: Option<Instant>,
}

impl MetadataCoordinator {
    fn new() -> Self {
        MetadataCoordinator {
            last_api_call: None,
        }
    }

    async fn call_api(&mut self, api: &ExternalApi, webhook: usize) -> u16 {
        if let Some(last) = self.last_api_call {
            let elapsed = last.elapsed();
            if elapsed < MIN_INTERVAL {
                tokio::time::sleep(MIN_INTERVAL - elapsed).await;
            }
        }
        self.last_api_call = Some(Instant::now());
        api.call(webhook)
    }
}

#[tokio::test(start_paused = true)]
async fn naive_version_fails() {
    let api = ExternalApi::new();
    let seq = Arc::new(Sequencer::new());
    let mut webhooks = Vec::new();
    for w in 0..WEBHOOKS {
        let (api, seq) = (api.clone(), seq.clone());
        webhooks.push(tokio::spawn(async move {
            // coordinator = MetadataCoordinator()  # new per request
            let mut coordinator = MetadataCoordinator::new();
            {
                // The webhooks arrive together: A, B, C make their first call.
                let _turn = seq.turn(w).await;
                coordinator.call_api(&api, w).await;
            }
            for _ in 1..CALLS_PER_WEBHOOK {
                coordinator.call_api(&api, w).await;
            }
        }));
    }
    for w in webhooks {
        w.await.unwrap();
    }
    let (calls, rejected) = api.status();
    assert_eq!(calls, WEBHOOKS * CALLS_PER_WEBHOOK);
    // At 0 ms and again at 500 ms, three coordinators call at once: two of
    // each three get 429.
    assert_eq!(rejected, 4, "{:?}", api.calls.lock().unwrap());
}

/// Polls `fut` once (so a waiter takes its place in the queue), then
/// returns it to be awaited.
async fn enqueue<F: Future>(mut fut: Pin<Box<F>>) -> Result<F::Output, Pin<Box<F>>> {
    match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(out) => Ok(out),
        Poll::Pending => Err(fut),
    }
}

#[tokio::test(start_paused = true)]
async fn raceguard_prevents() {
    // The same schedule, every coordinator waiting on one shared limiter.
    let api = ExternalApi::new();
    let throttle = Arc::new(RateLimiter::with_clock(
        Quota::with_interval(MIN_INTERVAL).unwrap(),
        TokioClock::new(),
    ));
    let seq = Arc::new(Sequencer::new());
    let mut webhooks = Vec::new();
    for w in 0..WEBHOOKS {
        let (api, seq, throttle) = (api.clone(), seq.clone(), throttle.clone());
        webhooks.push(tokio::spawn(async move {
            for call in 0..CALLS_PER_WEBHOOK {
                // Arrivals in schedule order: A, B, C, then A, B, C again.
                let waiting = {
                    let _turn = seq.turn(call * WEBHOOKS + w).await;
                    // Takes its place in the FIFO within its turn.
                    enqueue(Box::pin(throttle.until_ready())).await
                };
                match waiting {
                    Ok(d) => d.unwrap(),
                    Err(fut) => fut.await.unwrap(),
                };
                api.call(w);
            }
        }));
    }
    for w in webhooks {
        w.await.unwrap();
    }
    let calls = api.calls.lock().unwrap().clone();
    let (n, rejected) = api.status();
    assert_eq!(n, WEBHOOKS * CALLS_PER_WEBHOOK);
    assert_eq!(rejected, 0, "{calls:?}");
    // Served in arrival order (FIFO), spaced by the interval.
    let order: Vec<usize> = calls.iter().map(|(_, w)| *w).collect();
    assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
    for pair in calls.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= MIN_INTERVAL, "{calls:?}");
    }

    // Real concurrency on the runtime: 10 webhooks at once, unscheduled.
    let api = ExternalApi::new();
    let mut webhooks = Vec::new();
    for w in 0..10 {
        let (api, throttle) = (api.clone(), throttle.clone());
        webhooks.push(tokio::spawn(async move {
            for _ in 0..CALLS_PER_WEBHOOK {
                throttle.until_ready().await.unwrap();
                api.call(w);
            }
        }));
    }
    for w in webhooks {
        w.await.unwrap();
    }
    assert_eq!(api.status(), (10 * CALLS_PER_WEBHOOK, 0));
}
