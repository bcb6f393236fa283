//! Bounded work queues (race R10 of `docs/RACES.md`).
//!
//! Seed 002's webhook handler did its work inline: every webhook became a
//! concurrent task calling a rate-limited external API, and a burst of
//! webhooks became a burst of 429s (and of memory, browsers, connections).
//! Seed 001 (#8) asked for the same thing from the other side: queue the
//! requests, shed load when the queue is full.
//!
//! [`WorkQueue`] is that queue: `submit` returns at once (a [`JobHandle`] or
//! [`Error::CapacityExceeded`](crate::Error::CapacityExceeded), the 503
//! path), N workers run the jobs, optionally obeying one shared
//! [`Limit`](crate::rate::Limit) so the external API never sees more than
//! its quota; per-key ordering keeps one user's jobs in order; shutdown
//! drains or hands back every queued job and accounts for each one.
//!
//! ```
//! use std::time::Duration;
//! use raceguard::queue::{Shutdown, WorkQueue};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), raceguard::Error> {
//! let queue = WorkQueue::builder()
//!     .capacity(1_000)
//!     .workers(4)
//!     .build(|webhook: String| async move { webhook.to_uppercase() })?;
//! let handle = queue.submit("ping".to_string())?; // never waits
//! assert_eq!(handle.await?, "PING");
//! let report = queue.shutdown(Shutdown::Drain(Duration::from_secs(10))).await;
//! assert!(report.handed_back.is_empty());
//! # Ok(()) }
//! ```
//!
//! # Metrics
//!
//! With feature `metrics`, queues report through the `metrics` facade. As
//! for rate limiters and caches, the handles are registered once, when the
//! queue is built (`WorkQueueBuilder::build`, `DurableQueue::new`), with the
//! recorder current at that moment (the global one, or a local one installed
//! with `metrics::with_local_recorder`). Labels are the queue's name
//! ([`WorkQueueBuilder::name`], `"unnamed"` by default; a durable queue's
//! name) and fixed words, never job keys or idempotency keys. Without the
//! feature the instrumentation is zero-sized and compiles to nothing.
//!
//! | metric | labels | counts |
//! |---|---|---|
//! | `raceguard_queue_submitted_total` | `queue` | jobs accepted by `submit`/`submit_keyed` |
//! | `raceguard_queue_rejected_total` | `queue`, `reason` | submits refused: `reason="full"` (`CapacityExceeded`), `"closed"` (after shutdown began or the queue was dropped) |
//! | `raceguard_queue_completed_total` | `queue`, `outcome` | accepted jobs that left the queue, each once: `"ok"` (the handler returned), `"panicked"` (caught), `"limiter_error"` (the rate limiter failed; not run), `"aborted"` (the handler's future was dropped mid-run: a shutdown deadline or the runtime shutting down), `"handed_back"` (never started; in a [`ShutdownReport::handed_back`]) |
//! | `raceguard_queue_depth` (gauge) | `queue` | jobs queued and not yet started: set under the queue's lock at every change, so it equals [`WorkQueue::len`] whenever no call is in progress |
//! | `raceguard_durable_queue_submitted_total` | `queue`, `result` | submits Redis answered: `result="accepted"`, `"duplicate"`, `"full"` |
//! | `raceguard_durable_queue_acked_total` | `queue`, `outcome` | `Delivery::ack` replies: `outcome="completed"`, `"already_completed"`, `"not_owned"` |
//! | `raceguard_durable_queue_reclaimed_total` | `queue` | jobs `Consumer::reclaim` took over and delivered again (a job reclaimed twice counts twice) |
//! | `raceguard_durable_queue_dead_lettered_total` | `queue` | entries moved to the dead letters by this process (too many attempts on reclaim, or malformed on read) |
//!
//! Counters are incremented before a job's handle resolves, so a caller that
//! awaited every handle reads final counts. For a work queue, at any moment
//! `submitted == sum(completed) + depth + jobs started or waiting on the
//! rate limiter`. Calls that fail before a reply (invalid input, a Redis
//! error) count nothing; a duplicate submit is not an acceptance; a reclaimed
//! entry whose key was already completed is removed without being counted.
//! The durable counters are per process: the queue's shared state lives in
//! Redis (`DurableQueue::len`).

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod durable;
mod job;
mod work;

pub use job::JobHandle;
pub use work::{
    DEFAULT_CAPACITY, DEFAULT_RETRY_AFTER, Rejected, Shutdown, ShutdownReport, WorkQueue,
    WorkQueueBuilder,
};
