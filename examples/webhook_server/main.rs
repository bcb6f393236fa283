//! A small but real webhook + chat service on raceguard (issue 8), in the
//! spirit of the seeds:
//!
//! - `POST /webhooks/{source}`: HMAC-SHA256 signed (constant-time check,
//!   401 on mismatch), per-user and global rate limits (429 with
//!   `Retry-After` and the IETF `RateLimit-Policy`/`RateLimit` headers), a
//!   bounded work queue (503 with `Retry-After` when full) whose workers
//!   call a rate-limited "external API" through a per-request client that
//!   carries the user's identity; every accepted webhook is processed
//!   exactly once (redeliveries of a known id are answered without
//!   queueing; duplicate executions are counted).
//! - `POST /chat/sessions`, `POST|GET /chat/{session_id}/messages`: verified
//!   `SessionKey`s (403 when the session is another user's) and a versioned
//!   cache for history (one invalidation per post, no pattern delete).
//! - `GET /stats`, `GET /healthz`.
//!
//! In memory by default; Redis backends with `--redis URL` (feature
//! `redis`), where the webhook queue is durable (a Redis stream, see
//! `durable.rs`; no per-user ordering there). Graceful shutdown on SIGTERM /
//! ctrl-c drains the in-memory queue; the durable one keeps its queued jobs
//! for the next server and only waits for the jobs in flight.
//!
//! ```text
//! cargo run --release --features tower,redis --example webhook_server -- --addr 127.0.0.1:8080
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8080
//! ```

mod app;
mod args;
#[cfg(feature = "redis")]
mod durable;
mod external;
mod layers;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use raceguard::keys::UserId;
use raceguard::queue::{Shutdown, WorkQueue};
use raceguard::rate::Quota;
use tokio_util::sync::CancellationToken;

use crate::app::{App, Jobs, Stats, Worker};
use crate::args::{ArgError, Config, USAGE};
use crate::external::{ExternalApiFactory, StubCounters};
use crate::store::{Backends, Quotas};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long shutdown waits for queued webhooks.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);

/// How long shutdown waits for the durable queue's jobs in flight.
#[cfg(feature = "redis")]
const IN_FLIGHT_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cfg = match Config::parse(std::env::args().skip(1)) {
        Ok(cfg) => cfg,
        Err(ArgError::Help) => {
            print!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("webhook_server: {e}\n\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(cfg).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("webhook_server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> Result<(), BoxError> {
    let quotas = Quotas {
        user: Quota::per_minute(cfg.user_limit)?,
        global: Quota::per_second(cfg.global_limit)?,
        worker: Quota::per_second(cfg.worker_limit)?.with_burst(cfg.worker_burst)?,
    };
    let backends = Arc::new(match &cfg.redis {
        None => Backends::memory(quotas)?,
        #[cfg(feature = "redis")]
        Some(url) => Backends::redis(url, quotas).await?,
        #[cfg(not(feature = "redis"))]
        Some(_) => return Err("built without feature `redis`".into()),
    });

    // The external API stub, and the shared half of its client (OnceInit).
    let stop_stub = CancellationToken::new();
    let mut token_key = [0u8; 32];
    getrandom::fill(&mut token_key).map_err(|e| format!("OS random source: {e}"))?;
    let token_key: Arc<[u8]> = Arc::new(token_key);
    let stub = Arc::new(StubCounters::default());
    let stub_url = external::start_stub(
        cfg.external_limit,
        cfg.external_burst,
        token_key.clone(),
        stub.clone(),
        stop_stub.clone(),
    )
    .await?;
    let shared = external::init_shared(stub_url.clone(), token_key).await?;
    let factory = ExternalApiFactory::new(shared);

    let stats = Arc::new(Stats::default());
    let worker = Worker {
        backends: backends.clone(),
        stats: stats.clone(),
    };
    // With --redis: durable on Redis Streams; submit never waits either;
    // workers obey the same outbound limiter; no per-user order.
    #[cfg(feature = "redis")]
    let (durable_queue, runner) = match &backends.redis {
        Some(redis) => {
            let jobs =
                durable::DurableJobs::new(redis.clone(), cfg.queue_capacity, cfg.worker_limit)?;
            let runner = durable::start(
                &jobs,
                worker.clone(),
                factory,
                cfg.workers,
                Duration::from_secs(cfg.reclaim_idle_secs),
            )?;
            (Some(Jobs::Durable(jobs)), Some(runner))
        }
        None => (None, None),
    };
    #[cfg(not(feature = "redis"))]
    let durable_queue: Option<Jobs> = None;
    let queue = match durable_queue {
        Some(queue) => queue,
        // The bounded queue: submit never waits (CapacityExceeded at once when
        // full); workers obey the outbound limiter; one user's jobs in order.
        None => Jobs::Memory(Arc::new(
            WorkQueue::builder()
                .capacity(cfg.queue_capacity)
                .workers(cfg.workers)
                .shared_rate_limit(backends.worker_limit.clone())
                .keyed::<UserId>()
                .build(move |job| {
                    let worker = worker.clone();
                    async move { worker.process(job).await }
                })?,
        )),
    };

    let app = Arc::new(App {
        cfg: cfg.clone(),
        quotas,
        backends,
        queue,
        factory,
        stats,
        stub,
    });
    let router = app::router(app.clone());

    let listener = tokio::net::TcpListener::bind(cfg.addr).await?;
    let addr = listener.local_addr()?;
    if let Some(path) = &cfg.addr_file {
        // Write then rename: a reader never sees a half-written file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())?;
        std::fs::rename(&tmp, path)?;
    }
    eprintln!(
        "webhook_server: listening on http://{addr} (backend {}, layers {}, external API stub {stub_url})",
        app.backends.name,
        if cfg.layers { "on" } else { "off" },
    );
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await?;

    #[cfg(feature = "redis")]
    if let (Some(runner), Jobs::Durable(jobs)) = (runner, &app.queue) {
        // The queued jobs stay in Redis; only the running ones are waited for.
        let aborted = runner.shutdown(IN_FLIGHT_DEADLINE).await;
        if aborted > 0 {
            eprintln!(
                "webhook_server: {aborted} consumers still busy after {IN_FLIGHT_DEADLINE:?}: aborted; their jobs stay pending for the next server"
            );
        }
        match jobs.queue.len().await {
            Ok(n) => eprintln!("webhook_server: {n} webhooks left queued in Redis"),
            Err(e) => eprintln!("webhook_server: queue depth unknown: {e}"),
        }
    }
    if let Some(queue) = app.queue.memory() {
        shutdown_memory_queue(queue).await;
    }
    stop_stub.cancel();
    let s = &app.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "webhook_server: stopped; accepted {} processed {} duplicates {} failed {} external calls {} external 429s {}",
        get(&s.accepted),
        get(&s.processed),
        get(&s.duplicates),
        get(&s.failed),
        get(&app.stub.calls),
        get(&app.stub.rejected_429),
    );
    Ok(())
}

/// Drains the in-memory queue (bounded) and reports what it handed back.
async fn shutdown_memory_queue(queue: &WorkQueue<app::Job, (), UserId>) {
    eprintln!(
        "webhook_server: shutting down, draining {} queued webhooks",
        queue.len()
    );
    let report = queue.shutdown(Shutdown::Drain(DRAIN_DEADLINE)).await;
    if !report.handed_back.is_empty() || report.aborted > 0 {
        // In memory these are lost with the process: a durable queue would
        // keep them (see the report).
        eprintln!(
            "webhook_server: drain deadline passed: {} queued webhooks handed back ({}), {} aborted",
            report.handed_back.len(),
            report
                .handed_back
                .iter()
                .map(|j| j.id())
                .collect::<Vec<_>>()
                .join(", "),
            report.aborted
        );
    }
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
