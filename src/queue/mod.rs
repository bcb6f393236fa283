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

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod durable;
mod job;
mod work;

pub use job::JobHandle;
pub use work::{
    DEFAULT_CAPACITY, DEFAULT_RETRY_AFTER, Shutdown, ShutdownReport, WorkQueue, WorkQueueBuilder,
};
