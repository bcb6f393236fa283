//! Loom models of `SingleFlight` (issue 3, proof 1).
//!
//! - three concurrent callers of one key (all joined before the work can
//!   finish) produce exactly one execution and share its result;
//! - the generation-checked cleanup of a finished flight never removes a
//!   newer flight's entry (after `forget`), so a caller arriving during the
//!   newer flight joins it instead of starting a third execution.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use loom::future::block_on;

use crate::once::SingleFlight;
use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::{Arc, Mutex, thread};

/// An async gate loom can see: `wait` finishes once `open` was called.
#[derive(Default)]
struct Gate {
    state: Mutex<(bool, Vec<Waker>)>,
}

impl Gate {
    fn open(&self) {
        let wakers = {
            let mut st = self.state.lock();
            st.0 = true;
            std::mem::take(&mut st.1)
        };
        for w in wakers {
            w.wake();
        }
    }

    async fn wait(&self) {
        poll_fn(|cx| {
            let mut st = self.state.lock();
            if st.0 {
                Poll::Ready(())
            } else {
                st.1.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

type Group = SingleFlight<&'static str, usize, ()>;

#[test]
fn loom_single_flight_three_callers_one_execution() {
    loom::model(|| {
        let group = Arc::new(Group::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Gate::default());
        let call = |group: Arc<Group>, runs: Arc<AtomicUsize>, gate: Arc<Gate>| async move {
            group
                .run("login", || async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    gate.wait().await;
                    Ok(n)
                })
                .await
        };
        let others: Vec<_> = (0..2)
            .map(|_| {
                let (group, runs, gate) = (group.clone(), runs.clone(), gate.clone());
                thread::spawn(move || block_on(call(group, runs, gate)))
            })
            .collect();
        // The third caller joins (or starts) the flight, then holds the work
        // until the other two wait for it too: all three overlap.
        let mut mine = pin!(call(group.clone(), runs.clone(), gate.clone()));
        let first = mine.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        assert!(
            first.is_pending(),
            "the work cannot finish before the gate opens"
        );
        while group.waiters("login") < 2 {
            thread::yield_now();
        }
        gate.open();
        let mut results = vec![block_on(mine)];
        for h in others {
            results.push(h.join().unwrap());
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "overlapping calls ran the work twice"
        );
        assert!(results.iter().all(|r| *r == Ok(1)), "results: {results:?}");
        assert_eq!(group.waiters("login"), 0);
    });
}

#[test]
fn loom_single_flight_cleanup_never_removes_a_newer_flight() {
    loom::model(|| {
        let group = Arc::new(Group::new());
        let (gate1, gate2) = (Arc::new(Gate::default()), Arc::new(Gate::default()));
        let noop = &mut Context::from_waker(Waker::noop());

        // Flight 1 starts and is detached by `forget`; flight 2 starts.
        let mut first = Box::pin({
            let (group, gate1) = (group.clone(), gate1.clone());
            async move {
                group
                    .run("k", || async move {
                        gate1.wait().await;
                        Ok(1)
                    })
                    .await
            }
        });
        assert!(first.as_mut().poll(noop).is_pending());
        assert!(group.forget("k"));
        let mut second = pin!(group.run("k", || async {
            gate2.wait().await;
            Ok(2)
        }));
        assert!(second.as_mut().poll(noop).is_pending());

        // Flight 1 finishes and cleans up on another thread, racing a third
        // caller that must join flight 2.
        let finisher = thread::spawn(move || {
            gate1.open();
            block_on(first)
        });
        let mut third = pin!(group.run("k", || async {
            panic!("flight 2's entry was removed: a third execution started")
        }));
        assert!(
            third.as_mut().poll(noop).is_pending(),
            "the third caller must wait for flight 2"
        );
        assert_eq!(group.waiters("k"), 1);
        assert_eq!(finisher.join().unwrap(), Ok(1));
        assert_eq!(
            group.waiters("k"),
            1,
            "flight 2's entry must survive flight 1's cleanup"
        );

        gate2.open();
        assert_eq!(block_on(second), Ok(2));
        assert_eq!(block_on(third), Ok(2));
        assert_eq!(group.waiters("k"), 0);
        assert!(!group.forget("k"), "a finished flight leaves the map");
    });
}

/// Counts live work futures; a second one at once fails the model.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn enter(live: &Arc<AtomicUsize>) -> Self {
        assert_eq!(
            live.fetch_add(1, Ordering::SeqCst),
            0,
            "two executions of one key overlap"
        );
        Live(live.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[test]
fn loom_single_flight_cancelled_driver_never_strands_waiters() {
    loom::model(|| {
        let group = Arc::new(Group::new());
        let live = Arc::new(AtomicUsize::new(0));
        // A starts a call whose work never completes, polls it once and
        // drops it: if it was driving, a waiter must take over.
        let cancelled = {
            let (group, live) = (group.clone(), live.clone());
            thread::spawn(move || {
                let fut = group.run("k", || {
                    let guard = Live::enter(&live);
                    async move {
                        let _guard = guard;
                        std::future::pending::<Result<usize, ()>>().await
                    }
                });
                let mut fut = pin!(fut);
                let _ = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            })
        };
        let finish = |group: Arc<Group>, live: Arc<AtomicUsize>| {
            block_on(group.run("k", || {
                let guard = Live::enter(&live);
                async move {
                    let _guard = guard;
                    Ok(7)
                }
            }))
        };
        let other = {
            let (group, live) = (group.clone(), live.clone());
            thread::spawn(move || finish(group, live))
        };
        assert_eq!(finish(group.clone(), live.clone()), Ok(7));
        assert_eq!(other.join().unwrap(), Ok(7));
        cancelled.join().unwrap();
        assert_eq!(live.load(Ordering::SeqCst), 0);
        assert!(
            !group.forget("k"),
            "an abandoned or finished flight stays in the map"
        );
    });
}
