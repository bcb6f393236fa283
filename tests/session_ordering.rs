//! Per-session ordering: submission order within a session, parallelism
//! across sessions, cancellation, bounds and cleanup.

use std::sync::{Arc, Mutex};

use raceguard::ErrorKind;
use raceguard::session::SessionOrdering;
use tokio::sync::oneshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_sessions_operations_run_in_submission_order() {
    let order = SessionOrdering::<u32>::new(1_000);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    // Enqueued in order 0..200, spawned in reverse so the scheduler would
    // pick the wrong order if the tickets did not force it.
    let tickets: Vec<_> = (0..200).map(|i| (i, order.enqueue(7).unwrap())).collect();
    for (i, ticket) in tickets.into_iter().rev() {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            ticket.ready().await;
            log.lock().unwrap().push(i);
            tokio::task::yield_now().await;
            drop(ticket);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*log.lock().unwrap(), (0..200).collect::<Vec<_>>());
    assert_eq!(order.active_sessions(), 0, "no lanes left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_sessions_are_not_held_up() {
    let order = SessionOrdering::<u32>::new(8);
    let (release, released) = oneshot::channel::<()>();
    let first = order.enqueue(1).unwrap();
    let blocked = order.enqueue(1).unwrap();
    let holder = tokio::spawn(async move {
        first.ready().await;
        released.await.unwrap();
        drop(first);
    });
    // Session 2 runs to completion while session 1's first op holds its turn.
    let ran = order.run(2, async { "done" }).await.unwrap();
    assert_eq!(ran, "done");
    let probe = order.run(3, async { 3 }).await.unwrap();
    assert_eq!(probe, 3);
    release.send(()).unwrap();
    holder.await.unwrap();
    blocked.ready().await;
    drop(blocked);
    assert_eq!(order.active_sessions(), 0);
}

#[tokio::test]
async fn a_cancelled_ticket_does_not_block_the_line() {
    let order = SessionOrdering::<&str>::new(8);
    let a = order.enqueue("s").unwrap();
    let b = order.enqueue("s").unwrap();
    let c = order.enqueue("s").unwrap();
    // b gives up before its turn (a dropped future, a closed connection).
    drop(b);
    drop(a);
    c.ready().await;
    drop(c);
    assert_eq!(order.active_sessions(), 0);

    // A `run` future dropped while waiting gives up its place too.
    let first = order.enqueue("s").unwrap();
    let waiting = order.run("s", async { unreachable!("cancelled before its turn") });
    let mut waiting = Box::pin(waiting);
    assert!(futures_poll_once(waiting.as_mut()).is_none());
    drop(waiting);
    drop(first);
    assert_eq!(order.run("s", async { 1 }).await.unwrap(), 1);
    assert_eq!(order.active_sessions(), 0);
}

#[tokio::test]
async fn lines_are_bounded() {
    let order = SessionOrdering::<u8>::new(2);
    let a = order.enqueue(1).unwrap();
    let _b = order.enqueue(1).unwrap();
    let err = order.enqueue(1).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Capacity);
    // Other sessions have their own bound.
    let _c = order.enqueue(2).unwrap();
    drop(a);
    let _d = order.enqueue(1).unwrap();
}

fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}
