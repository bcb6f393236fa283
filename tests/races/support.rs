//! Forced interleavings for the race catalogue.
//!
//! A [`Sequencer`] numbers the steps of a schedule. An actor (thread or task)
//! calls `turn(k)` before its step `k`; the call returns only once steps
//! `0..k` are done, and dropping the returned [`Turn`] marks step `k` done. So
//! the losing interleaving of a race is written down, not hoped for:
//!
//! ```text
//! A: turn(0) read flag (false)     B: turn(1) read flag (false)
//! A: turn(2) initialise            B: turn(3) initialise again
//! ```
//!
//! Nothing waits forever: a step that never comes (a deadlock, a schedule
//! that cannot happen) panics after [`STEP_DEADLINE`] with the step it
//! waited for and the step the schedule is stuck at.

#![allow(dead_code)]

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// How long one `turn` waits before declaring the schedule stuck.
pub(crate) const STEP_DEADLINE: Duration = Duration::from_secs(10);

/// A shared step counter that makes actors take turns. Share it by reference
/// (scoped threads) or in an `Arc`.
#[derive(Debug, Default)]
pub(crate) struct Sequencer {
    done: Mutex<usize>,
    cv: Condvar,
    notify: Notify,
}

/// Holding a `Turn` means it is this actor's step; dropping it lets the next
/// step run.
#[derive(Debug)]
#[must_use = "the step ends when the Turn is dropped"]
pub(crate) struct Turn<'a> {
    seq: &'a Sequencer,
    step: usize,
}

impl Sequencer {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The number of steps completed so far.
    pub(crate) fn completed(&self) -> usize {
        *self.done.lock().unwrap()
    }

    /// Waits (async) until steps `0..step` are done.
    pub(crate) async fn turn(&self, step: usize) -> Turn<'_> {
        let wait = async {
            loop {
                let notified = self.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.completed() == step {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(STEP_DEADLINE, wait).await.is_err() {
            panic!(
                "schedule stuck: waited for step {step}, only {} steps done",
                self.completed()
            );
        }
        Turn { seq: self, step }
    }

    /// Waits (blocking the thread) until steps `0..step` are done.
    pub(crate) fn turn_blocking(&self, step: usize) -> Turn<'_> {
        let guard = self.done.lock().unwrap();
        let (guard, timeout) = self
            .cv
            .wait_timeout_while(guard, STEP_DEADLINE, |done| *done != step)
            .unwrap();
        if timeout.timed_out() {
            panic!(
                "schedule stuck: waited for step {step}, only {} steps done",
                *guard
            );
        }
        Turn { seq: self, step }
    }

    fn finish(&self, step: usize) {
        let mut done = self.done.lock().unwrap();
        assert_eq!(*done, step, "step {step} finished out of order");
        *done += 1;
        drop(done);
        self.cv.notify_all();
        self.notify.notify_waiters();
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.seq.finish(self.step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn threads_take_turns_in_schedule_order() {
        let seq = Sequencer::new();
        let log = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            // Spawned in reverse order: only the sequencer can make the log sorted.
            for step in (0..6).rev() {
                let (seq, log) = (&seq, &log);
                s.spawn(move || {
                    let _t = seq.turn_blocking(step);
                    log.lock().unwrap().push(step);
                });
            }
        });
        assert_eq!(*log.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(seq.completed(), 6);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_take_turns_in_schedule_order() {
        let seq = Arc::new(Sequencer::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for step in (0..6).rev() {
            let (seq, log) = (seq.clone(), log.clone());
            handles.push(tokio::spawn(async move {
                let _t = seq.turn(step).await;
                log.lock().unwrap().push(step);
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(*log.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "schedule stuck: waited for step 1")]
    async fn a_step_that_never_comes_fails_instead_of_hanging() {
        let seq = Sequencer::new();
        let _t = seq.turn(1).await; // step 0 never runs
    }
}
