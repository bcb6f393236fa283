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
    pub(crate) use loom::sync::Arc;
    pub(crate) use loom::sync::MutexGuard;
    pub(crate) use loom::sync::atomic;
    pub(crate) use loom::thread;
    pub(crate) use loom::thread_local;
    pub(crate) type RawMutex<T> = loom::sync::Mutex<T>;
    pub(crate) type RawCondvar = loom::sync::Condvar;
}

#[cfg(not(raceguard_loom))]
mod imp {
    pub(crate) use std::hint;
    pub(crate) use std::sync::Arc;
    pub(crate) use std::sync::MutexGuard;
    pub(crate) use std::sync::atomic;
    #[allow(unused_imports)]
    pub(crate) use std::thread;
    #[allow(unused_imports)]
    pub(crate) use std::thread_local;
    pub(crate) type RawMutex<T> = std::sync::Mutex<T>;
    pub(crate) type RawCondvar = std::sync::Condvar;
    pub(crate) type OnceValue<T> = std::sync::OnceLock<T>;
}

#[cfg(not(raceguard_loom))]
#[allow(unused_imports)]
pub(crate) use imp::OnceValue;
#[allow(unused_imports)]
pub(crate) use imp::thread_local;
#[allow(unused_imports)]
pub(crate) use imp::{Arc, MutexGuard, atomic, hint, thread};

/// `std`'s `Arc`, in loom builds too: for values handed to users (shared
/// errors, snapshots of a value) whose reference counts take no part in any
/// algorithm loom checks, so public signatures are the same in both builds.
#[allow(unused_imports)]
pub(crate) use std::sync::Arc as StdArc;

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
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The value, consuming the mutex (never reports poisoning).
    #[allow(dead_code)]
    pub(crate) fn into_inner(self) -> T {
        self.0
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// [`Mutex::new`] in `const` contexts (statics). Only in std builds:
    /// loom's types cannot be built in a `const` context.
    #[cfg(not(raceguard_loom))]
    #[allow(dead_code)]
    pub(crate) const fn const_new(value: T) -> Self {
        Mutex(imp::RawMutex::new(value))
    }
}

/// A condition variable paired with [`Mutex`]; like it, never reports
/// poisoning.
#[derive(Debug, Default)]
#[allow(dead_code)]
pub(crate) struct Condvar(imp::RawCondvar);

#[allow(dead_code)]
impl Condvar {
    pub(crate) fn new() -> Self {
        Condvar(imp::RawCondvar::new())
    }

    /// [`Condvar::new`] in `const` contexts; only in std builds.
    #[cfg(not(raceguard_loom))]
    pub(crate) const fn const_new() -> Self {
        Condvar(imp::RawCondvar::new())
    }

    /// Atomically releases `guard`'s lock and waits for a notification;
    /// re-locks before returning. Spurious wake-ups happen: re-check.
    pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.0
            .wait(guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn notify_all(&self) {
        self.0.notify_all();
    }
}

/// A write-once cell, read with one atomic load: `std::sync::OnceLock` in
/// std builds. In loom builds the value sits in a `OnceLock` too, but its
/// publication goes through a loom atomic, so loom sees (and explores)
/// every read racing the write.
#[cfg(raceguard_loom)]
#[derive(Debug)]
pub(crate) struct OnceValue<T> {
    published: atomic::AtomicBool,
    cell: std::sync::OnceLock<T>,
}

#[cfg(raceguard_loom)]
impl<T> OnceValue<T> {
    pub(crate) fn new() -> Self {
        OnceValue {
            published: atomic::AtomicBool::new(false),
            cell: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn get(&self) -> Option<&T> {
        if self.published.load(atomic::Ordering::Acquire) {
            self.cell.get()
        } else {
            None
        }
    }

    pub(crate) fn get_or_init(&self, init: impl FnOnce() -> T) -> &T {
        let value = self.cell.get_or_init(init);
        self.published.store(true, atomic::Ordering::Release);
        value
    }
}

/// A process-unique id, increasing in creation order (under loom: per
/// execution, so models stay deterministic). Used only to rank locks that are
/// taken together (multi-limit checks lock in id order, where addresses would
/// vary between loom executions); never part of a decision.
#[cfg(not(raceguard_loom))]
pub(crate) fn next_id() -> u64 {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// See the std version.
#[cfg(raceguard_loom)]
pub(crate) fn next_id() -> u64 {
    loom::lazy_static! {
        // Reset by loom for every execution.
        static ref NEXT_ID: loom::sync::atomic::AtomicU64 = loom::sync::atomic::AtomicU64::new(0);
    }
    NEXT_ID.fetch_add(1, loom::sync::atomic::Ordering::Relaxed)
}
