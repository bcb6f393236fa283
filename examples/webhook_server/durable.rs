//! `--redis` mode: the webhook queue is raceguard's durable queue on a Redis
//! stream (`raceguard::queue::durable`), so an accepted webhook survives the
//! death of the server that accepted it or of the worker running it.
//!
//! - The webhook's id is the job's idempotency key: a redelivered webhook
//!   is `Submitted::Duplicate` (answered 200 `duplicate`, nothing queued),
//!   atomically with the capacity check (`CapacityExceeded`: 503 with
//!   `Retry-After`).
//! - `--workers` jobs run at once, spread over a few consumers of the
//!   queue's group (`Consumer::run`); each takes a cell of the same outbound
//!   limiter as the in-memory workers before calling the external API
//!   (waiting its `retry_after`, bounded by the job's deadline).
//! - At start-up one consumer reclaims the jobs that were idle longer than
//!   `--reclaim-idle` (a crashed server's), and every run loop keeps
//!   reclaiming them as they pass that bound.
//! - Graceful shutdown cancels the run loops and waits (bounded) for the
//!   jobs in flight; the queued ones stay in Redis for the next server.
//!
//! **No per-user ordering.** The in-memory queue runs one user's webhooks in
//! submission order; the durable queue does not (any consumer takes any job,
//! and a reclaimed job runs after later ones). Handlers must not depend on
//! the order of one user's webhooks in this mode.
//!
//! # What "processed exactly once" means here
//!
//! The stream delivers at least once: a job whose worker died (or whose
//! server was killed) is delivered again after `--reclaim-idle`. The queue's
//! done-marker (`Delivery::ack` returning `AckOutcome::Completed`) is set
//! exactly once per webhook id, but it is written *after* the handler's
//! effect, so it cannot by itself stop the effect from running twice. The
//! effect here is "the external API was called and the webhook recorded":
//!
//! 1. a job whose webhook id is already recorded as processed (the server
//!    died between the record and the ack) is acknowledged without calling
//!    the API again;
//! 2. otherwise the worker calls the API, then records the id with `SET NX`
//!    in Redis, atomically with the durable `processed` counter; a second
//!    record of the same id counts a `duplicate` (two live workers ran the
//!    same job: `--reclaim-idle` shorter than a job; never expected);
//! 3. then `Consumer::run` acknowledges the job.
//!
//! So `processed` (and the durable counter in `/stats`) counts every
//! accepted webhook exactly once, across crashes and restarts. The call to
//! the external API is at-least-once: a crash between the call and the
//! record repeats it. That is why the call carries the webhook id, which a
//! real API uses as its idempotency key (the demo stub only counts calls).
//! Counting on `AckOutcome::Completed` instead would count once too, but
//! would need the handler to ack itself; the processed-id record also
//! serves step 1.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use raceguard::Error;
use raceguard::client::ClientFactory;
use raceguard::keys::UserId;
use raceguard::queue::durable::{
    AckOutcome, Consumer, Delivery, DurableQueue, DurableQueueConfig, RunOptions, Submitted,
};
use raceguard::redis::RedisBackend;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::{App, Worker, error_response, from_error};
use crate::external::ExternalApiFactory;

/// The queue's name (its Redis keys are `rq:{demo-webhooks}:*`).
const QUEUE_NAME: &str = "demo-webhooks";

/// At most this many consumers (each holds one dedicated Redis connection
/// while it waits for jobs; the backend's pool has 8).
const MAX_CONSUMERS: usize = 4;

/// How many deliveries a webhook gets before it is dead-lettered.
const MAX_ATTEMPTS: u64 = 10;

/// What is stored in the stream for one webhook: the user's id, never its
/// client or token.
#[derive(Debug, Serialize, Deserialize)]
struct DurableJob {
    id: String,
    source: String,
    user: String,
}

/// The durable queue and what the request path needs of it.
#[derive(Debug, Clone)]
pub(crate) struct DurableJobs {
    pub(crate) queue: DurableQueue,
    /// The `Retry-After` of a 503 when the queue is full.
    retry_after: Duration,
}

impl DurableJobs {
    /// The queue `demo-webhooks` on `backend`, bounded by `capacity`.
    pub(crate) fn new(
        backend: RedisBackend,
        capacity: usize,
        worker_limit: u32,
    ) -> raceguard::Result<Self> {
        let config = DurableQueueConfig::default()
            .capacity(capacity)
            .max_payload(4096)
            .max_attempts(Some(MAX_ATTEMPTS));
        // A full queue frees a tenth of its room in about this long at the
        // workers' rate; at least a second.
        let secs = (capacity as u64 / 10).div_ceil(u64::from(worker_limit.max(1)));
        Ok(DurableJobs {
            queue: DurableQueue::new(backend, QUEUE_NAME, config)?,
            retry_after: Duration::from_secs(secs.clamp(1, 60)),
        })
    }
}

/// `POST /webhooks/{source}` after the checks: queues the webhook durably,
/// keyed by its id.
pub(crate) async fn submit(
    app: &App,
    jobs: &DurableJobs,
    id: &str,
    source: String,
    user: &UserId,
) -> Response {
    let job = DurableJob {
        id: id.to_owned(),
        source,
        user: user.as_str().to_owned(),
    };
    match jobs.queue.submit_json(id, &job).await {
        Ok(Submitted::Accepted(_)) => {
            app.stats.accepted.fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::ACCEPTED,
                Json(json!({ "id": id, "accepted": true })),
            )
                .into_response()
        }
        // Queued, in progress or completed within the dedupe window: a
        // redelivery, answered as the in-memory mode does.
        Ok(_duplicate) => {
            app.stats.redeliveries.fetch_add(1, Ordering::Relaxed);
            (StatusCode::OK, Json(json!({ "id": id, "duplicate": true }))).into_response()
        }
        Err(e @ Error::CapacityExceeded { .. }) => {
            app.stats.shed.fetch_add(1, Ordering::Relaxed);
            let mut resp = error_response(StatusCode::SERVICE_UNAVAILABLE, &e);
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(jobs.retry_after.as_secs().max(1)),
            );
            resp
        }
        Err(e) => from_error(&e),
    }
}

/// Runs one delivered webhook (see the module docs for the steps).
#[derive(Debug, Clone)]
struct Handler {
    worker: Worker,
    factory: ExternalApiFactory,
    /// A job's longest run: well below the reclaim bound, so a live
    /// worker's job is never taken over.
    deadline: Duration,
}

impl Handler {
    async fn handle(&self, delivery: Delivery) -> Result<(), String> {
        let result = self.run(&delivery).await;
        if let Err(why) = &result {
            let last = delivery.attempts() >= MAX_ATTEMPTS;
            tracing::error!(
                "webhook {} attempt {} failed{}: {why}",
                delivery.idempotency_key(),
                delivery.attempts(),
                if last { " (giving up)" } else { "" }
            );
            if last {
                self.worker.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    async fn run(&self, delivery: &Delivery) -> Result<(), String> {
        let job: DurableJob = delivery.json().map_err(|e| e.to_string())?;
        let store = &self.worker.backends.store;
        if store
            .is_processed(&job.id)
            .await
            .map_err(|e| e.to_string())?
        {
            // Step 1: recorded by a server that died before the ack.
            return Ok(());
        }
        let user = UserId::new(&job.user).map_err(|e| e.to_string())?;
        let client = self.factory.build(user).map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + self.deadline;
        tokio::time::timeout_at(
            deadline,
            self.worker
                .call(&client, &job.id, &job.source, Some(deadline)),
        )
        .await
        .map_err(|_| format!("no answer within {:?}", self.deadline))??;
        self.worker.record_processed(&job.id).await;
        Ok(())
    }
}

/// The running consumers.
#[derive(Debug)]
pub(crate) struct Runner {
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

/// Starts the consumers: `workers` jobs at once in all, jobs idle longer
/// than `reclaim_idle` are reclaimed (first by a start-up pass).
pub(crate) fn start(
    jobs: &DurableJobs,
    worker: Worker,
    factory: ExternalApiFactory,
    workers: usize,
    reclaim_idle: Duration,
) -> raceguard::Result<Runner> {
    let consumers = workers.clamp(1, MAX_CONSUMERS);
    let handler = Handler {
        worker,
        factory,
        deadline: reclaim_idle / 2,
    };
    let options = RunOptions::default()
        .concurrency(workers.div_ceil(consumers))
        .block(Duration::from_millis(500))
        .reclaim_idle(reclaim_idle);
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    // Names unique per process: a restarted server never reads as its dead
    // predecessor (whose jobs it reclaims instead).
    let pid = std::process::id();
    for i in 0..consumers {
        let consumer = jobs.queue.consumer(&format!("webhook-server-{pid}-{i}"))?;
        let handler = handler.clone();
        let options = options.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            if i == 0 {
                startup_reclaim(&consumer, &handler, reclaim_idle, &options, &cancel).await;
            }
            consume(consumer, handler, options, cancel).await;
        });
    }
    Ok(Runner { cancel, tasks })
}

/// Finishes the jobs a crashed server left pending (idle for at least
/// `reclaim_idle`), before reading new ones.
async fn startup_reclaim(
    consumer: &Consumer,
    handler: &Handler,
    reclaim_idle: Duration,
    options: &RunOptions,
    cancel: &CancellationToken,
) {
    let (mut completed, mut other) = (0u64, 0u64);
    while !cancel.is_cancelled() {
        let batch = match consumer
            .reclaim(reclaim_idle, options.get_concurrency())
            .await
        {
            Ok(b) if b.is_empty() => break,
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("start-up reclaim: {e}");
                break;
            }
        };
        let mut running = JoinSet::new();
        for delivery in batch {
            let handler = handler.clone();
            running.spawn(async move {
                let result = handler.handle(delivery.clone()).await;
                (delivery, result)
            });
        }
        while let Some(joined) = running.join_next().await {
            match joined {
                Ok((delivery, Ok(()))) => match delivery.ack().await {
                    Ok(AckOutcome::Completed) => completed += 1,
                    Ok(_) => other += 1,
                    Err(e) => tracing::warn!("start-up reclaim: ack: {e}"),
                },
                // Failed: pending again, retried by the run loops' reclaim.
                Ok((_, Err(_))) | Err(_) => other += 1,
            }
        }
    }
    eprintln!(
        "webhook_server: start-up reclaim: {completed} jobs of a stopped server completed, {other} not"
    );
}

/// One consumer's `Consumer::run`, resumed after a Redis error until
/// shutdown.
async fn consume(
    consumer: Consumer,
    handler: Handler,
    options: RunOptions,
    cancel: CancellationToken,
) {
    loop {
        let handler = handler.clone();
        let run = consumer.run(options.clone(), cancel.clone(), move |delivery| {
            let handler = handler.clone();
            async move { handler.handle(delivery).await }
        });
        match run.await {
            Ok(report) => {
                tracing::info!(
                    "consumer {} stopped: completed {}, superseded {}, failed {}",
                    consumer.name(),
                    report.completed,
                    report.superseded,
                    report.failed
                );
                return;
            }
            Err(e) => {
                // Nothing is lost: unacknowledged jobs stay pending.
                tracing::warn!("consumer {}: {e}; resuming", consumer.name());
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
}

impl Runner {
    /// Stops reading and waits up to `deadline` for the jobs in flight;
    /// returns how many consumers had to be aborted (their jobs stay
    /// pending and are reclaimed by the next server).
    pub(crate) async fn shutdown(mut self, deadline: Duration) -> usize {
        self.cancel.cancel();
        let tasks = &mut self.tasks;
        let finished = tokio::time::timeout(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if finished.is_ok() {
            return 0;
        }
        let left = self.tasks.len();
        self.tasks.abort_all();
        left
    }
}
