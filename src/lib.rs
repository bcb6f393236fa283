//! # raceguard
//!
//! Primitives that remove the classic races of multi-user web backends, and
//! the tests that prove it: loom models, property tests, and tests against
//! real `redis-server` processes.
//!
//! Each primitive answers a race from a real post-mortem (the catalogue is in
//! `docs/RACES.md`): users reading each other's data through shared state,
//! pattern invalidations wiping other users' caches, session ids anyone can
//! reuse, Redis locks deleting each other, per-worker rate limiters admitting
//! N times the limit, applications initialised twice.
//!
//! Everything runs in one process on in-memory backends by default; the
//! `redis` and `cluster` features put the same API on Redis.
//!
//! ```
//! use raceguard::keys::{Key, UserId};
//!
//! // A user id comes from a request: validate it once, at the edge.
//! let alice = UserId::new("alice")?;
//! // Whatever the id contains, it can never form a glob pattern, reach into
//! // another user's keys, or move the key to another Redis Cluster slot.
//! let mallory = UserId::new("*}:{alice")?;
//!
//! let a = Key::builder("chat")?.owner(&alice).part("history").build()?;
//! let m = Key::builder("chat")?.owner(&mallory).part("history").build()?;
//! assert_eq!(a.as_str(), "chat:{alice}:history");
//! assert_eq!(m.as_str(), "chat:{%2A%7D%3A%7Balice}:history");
//! assert_ne!(a.slot(), m.slot());
//! # Ok::<(), raceguard::Error>(())
//! ```
//!
//! ## Features
//!
//! | feature | what it adds |
//! |---|---|
//! | *(none)* | in-memory primitives, key encoding, clocks |
//! | `redis` | Redis backends (single node, independent nodes) |
//! | `cluster` | Redis Cluster (implies `redis`) |
//! | `tower` | [`middleware`]: tower layers (rate limits with IETF `RateLimit` headers, load shedding, verified sessions, per-request clients) |
//! | `metrics` | counters and gauges through the `metrics` facade |
//! | `test-util` | [`testing`]: a real `redis-server` harness and a forced-interleaving helper |
//!
//! ## Loom
//!
//! Built with `RUSTFLAGS="--cfg raceguard_loom"`, raceguard's in-memory
//! primitives synchronise through loom's types, so a downstream crate can
//! model-check its own code together with raceguard. See `docs/LOOM.md`.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]

pub mod cache;
pub mod client;
pub mod clock;
mod error;
pub mod keys;
pub mod lock;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod middleware;
pub mod once;
pub mod queue;
pub mod rate;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
pub mod session;
pub(crate) mod sync;

#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;

#[cfg(test)]
mod tests;

pub use cache::{CacheStats, VersionedCache};
pub use client::{BearerToken, ClientFactory, SharedClient};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{BoxError, Error, ErrorKind, Result, SessionError};
pub use lock::{FencingToken, LockGuard, LockManager, LockName, LockOptions};
pub use once::{InitError, OnceInit, Refreshable, SingleFlight};
pub use queue::WorkQueue;
pub use rate::{Decision, KeyedRateLimiter, MultiLimit, Quota, RateLimiter};
pub use session::{SessionId, SessionKey, SessionRegistry};
