//! Loom models of `OnceInit` (issue 3, proof 1).
//!
//! - three concurrent callers with a succeeding initializer run it exactly
//!   once and all observe the same value;
//! - with a failing initializer no caller observes a value, none deadlocks
//!   (loom fails a model in which every thread is blocked), and callers that
//!   shared an attempt share its error;
//! - a driver cancelled mid-attempt (its future dropped) still lets the
//!   others finish, and two initializer futures never exist at once.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Waker};

use loom::future::block_on;

use crate::once::{InitError, OnceInit};
use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::{Arc, thread};

/// Counts live initializer futures; entering a second one at once fails the
/// model.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn enter(live: &Arc<AtomicUsize>) -> Self {
        let before = live.fetch_add(1, Ordering::SeqCst);
        assert_eq!(before, 0, "two initializer futures exist at once");
        Live(live.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[test]
fn loom_once_three_callers_run_init_once() {
    loom::model(|| {
        let cell = Arc::new(OnceInit::<usize, ()>::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let call = |cell: Arc<OnceInit<usize, ()>>, calls: Arc<AtomicUsize>, me: usize| {
            block_on(cell.get_or_try_init(|| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(me)
            }))
            .copied()
        };
        let others: Vec<_> = (1..3)
            .map(|me| {
                let (cell, calls) = (cell.clone(), calls.clone());
                thread::spawn(move || call(cell, calls, me))
            })
            .collect();
        let mut seen = vec![call(cell.clone(), calls.clone(), 0).expect("init succeeds")];
        for h in others {
            seen.push(h.join().unwrap().expect("init succeeds"));
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the initializer ran more than once"
        );
        assert!(
            seen.iter().all(|v| *v == seen[0]),
            "callers saw different values: {seen:?}"
        );
        assert_eq!(cell.get(), Some(&seen[0]));
    });
}

#[test]
fn loom_once_failing_init_sets_no_value_and_never_deadlocks() {
    loom::model(|| {
        let cell = Arc::new(OnceInit::<u32, &'static str>::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let call = |cell: Arc<OnceInit<u32, &'static str>>, calls: Arc<AtomicUsize>| match block_on(
            cell.get_or_try_init(|| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("dependency down")
            }),
        ) {
            Err(InitError::Failed(e)) => e,
            other => panic!("expected the shared failure, got {other:?}"),
        };
        let others: Vec<_> = (0..2)
            .map(|_| {
                let (cell, calls) = (cell.clone(), calls.clone());
                thread::spawn(move || call(cell, calls))
            })
            .collect();
        let mut errors = vec![call(cell.clone(), calls.clone())];
        for h in others {
            errors.push(h.join().unwrap());
        }
        assert!(cell.get().is_none(), "a failed initializer left a value");
        // Each attempt made one error and every caller got one of them:
        // callers that waited share their attempt's Arc.
        let mut distinct: Vec<_> = Vec::new();
        for e in &errors {
            if !distinct.iter().any(|d| std::sync::Arc::ptr_eq(d, e)) {
                distinct.push(e.clone());
            }
        }
        assert_eq!(distinct.len(), calls.load(Ordering::SeqCst));
    });
}

#[test]
fn loom_once_cancelled_driver_lets_the_others_finish() {
    loom::model(|| {
        let cell = Arc::new(OnceInit::<u32, ()>::new());
        let live = Arc::new(AtomicUsize::new(0));

        // A starts a call whose initializer never completes, polls it once
        // and drops it: if it was driving, its attempt is abandoned.
        let cancelled = {
            let (cell, live) = (cell.clone(), live.clone());
            thread::spawn(move || {
                let fut = cell.get_or_try_init(|| {
                    let guard = Live::enter(&live);
                    async move {
                        let _guard = guard;
                        std::future::pending::<Result<u32, ()>>().await
                    }
                });
                let mut fut = pin!(fut);
                let _ = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            })
        };
        let finish = |cell: Arc<OnceInit<u32, ()>>, live: Arc<AtomicUsize>| {
            block_on(cell.get_or_try_init(|| {
                let guard = Live::enter(&live);
                async move {
                    let _guard = guard;
                    Ok(7)
                }
            }))
            .copied()
        };
        let other = {
            let (cell, live) = (cell.clone(), live.clone());
            thread::spawn(move || finish(cell, live))
        };
        assert_eq!(finish(cell.clone(), live.clone()), Ok(7));
        assert_eq!(other.join().unwrap(), Ok(7));
        cancelled.join().unwrap();
        assert_eq!(cell.get(), Some(&7));
        assert_eq!(live.load(Ordering::SeqCst), 0);
        assert_eq!(cell.waiters(), 0);
    });
}
