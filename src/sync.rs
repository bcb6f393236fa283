//! The only module that names `std::sync` or `loom`.
//!
//! Every concurrent algorithm in raceguard imports its `Arc`, `Mutex` and
//! atomics from here. Built normally they are std's; built with
//! `RUSTFLAGS="--cfg raceguard_loom"` they are loom's, so loom explores every
//! interleaving of raceguard's in-memory primitives, both in raceguard's own
//! models and in a downstream crate's (see `docs/LOOM.md`).
//!
//! The cfg is deliberately not tied to `cfg(test)` and deliberately not named
//! `loom` (a bare `loom` cfg switches tokio and other crates into their own
//! loom modes, which they do not support outside their own test suites).
//!
//! Loom cannot see `tokio::sync`, `dashmap` or `parking_lot`: code whose
//! correctness a loom model must check synchronises through this module only.

#[cfg(raceguard_loom)]
mod imp {
    pub(crate) use loom::hint;
    pub(crate) use loom::sync::atomic;
    pub(crate) use loom::sync::Arc;
    pub(crate) use loom::thread;
    pub(crate) use loom::sync::MutexGuard;
    pub(crate) type RawMutex<T> = loom::sync::Mutex<T>;
}

#[cfg(not(raceguard_loom))]
mod imp {
    pub(crate) use std::hint;
    pub(crate) use std::sync::atomic;
    pub(crate) use std::sync::Arc;
    pub(crate) use std::sync::MutexGuard;
    #[allow(unused_imports)]
    pub(crate) use std::thread;
    pub(crate) type RawMutex<T> = std::sync::Mutex<T>;
}

#[allow(unused_imports)]
pub(crate) use imp::{atomic, hint, thread, Arc, MutexGuard};

/// A mutex whose `lock` never reports poisoning.
///
/// raceguard never leaves shared state half-updated across a panic point
/// (user callbacks run outside every lock), so a poisoned lock carries no
/// broken invariant and is simply taken.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(imp::RawMutex<T>);

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Mutex(imp::RawMutex::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
