//! `SingleFlight` under real concurrency (tokio multi-thread runtime).
//!
//! No sleeps: work is held open with oneshot channels, or until the expected
//! number of callers wait (`SingleFlight::waiters`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use raceguard::once::{InitError, SingleFlight};
use tokio::sync::oneshot;

const TASKS: usize = 256;
const STUCK: Duration = Duration::from_secs(20);

type Group = SingleFlight<String, String, std::io::Error>;

/// Yields until `cond` holds; fails the test if it never does.
async fn until(cond: impl Fn() -> bool) {
    let spin = async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(STUCK, spin)
        .await
        .expect("stuck: the expected callers never arrived");
}

/// Counts live executions of one key; two at once fail the test.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn enter(live: &Arc<AtomicUsize>) -> Self {
        assert_eq!(
            live.fetch_add(1, Ordering::SeqCst),
            0,
            "two executions overlap"
        );
        Live(live.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_256_with_one_key_share_one_execution() {
    let group = Arc::new(Group::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let (group, runs) = (group.clone(), runs.clone());
        handles.push(tokio::spawn(async move {
            let g = group.clone();
            group
                .run("session".to_string(), || async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    until(|| g.waiters("session") == TASKS - 1).await;
                    Ok(format!("cookie-{n}"))
                })
                .await
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap().unwrap(), "cookie-0");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(!group.forget("session"), "the finished flight left the map");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_work_256_waiters_one_call_one_shared_error() {
    let group = Arc::new(Group::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let (group, runs) = (group.clone(), runs.clone());
        handles.push(tokio::spawn(async move {
            let g = group.clone();
            group
                .run("login".to_string(), || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    until(|| g.waiters("login") == TASKS - 1).await;
                    Err(std::io::Error::other("403 from the external site"))
                })
                .await
        }));
    }
    let mut errors = Vec::new();
    for h in handles {
        match h.await.unwrap() {
            Err(InitError::Failed(e)) => errors.push(e),
            other => panic!("expected the shared failure, got {other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(errors.iter().all(|e| Arc::ptr_eq(e, &errors[0])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panic_reaches_every_caller_of_the_flight() {
    let group = Arc::new(Group::new());
    let mut handles = Vec::new();
    for _ in 0..8 {
        let group = group.clone();
        handles.push(tokio::spawn(async move {
            let g = group.clone();
            group
                .run("k".to_string(), || async move {
                    until(|| g.waiters("k") == 7).await;
                    panic!("browser crashed");
                })
                .await
        }));
    }
    for h in handles {
        match h.await.expect("caught, not propagated") {
            Err(InitError::Panicked { what, message }) => {
                assert_eq!(what, "SingleFlight work");
                assert_eq!(&*message, "browser crashed");
            }
            other => panic!("expected Panicked, got {other:?}"),
        }
    }
    // The next call runs fresh.
    let ok = group
        .run("k".to_string(), || async { Ok("fine".to_string()) })
        .await;
    assert_eq!(ok.unwrap(), "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_leaving_does_not_affect_the_others() {
    let group = Arc::new(Group::new());
    let runs = Arc::new(AtomicUsize::new(0));
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let (started_tx, started_rx) = oneshot::channel();
    let driver = tokio::spawn({
        let (group, runs) = (group.clone(), runs.clone());
        async move {
            group
                .run("k".to_string(), || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = started_tx.send(());
                    release_rx.await.unwrap();
                    Ok("v".to_string())
                })
                .await
        }
    });
    started_rx.await.unwrap();
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let (group, runs) = (group.clone(), runs.clone());
            tokio::spawn(async move {
                group
                    .run("k".to_string(), || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok("other".to_string())
                    })
                    .await
            })
        })
        .collect();
    until(|| group.waiters("k") == 3).await;
    let mut waiters = waiters.into_iter();
    let leaving = waiters.next().unwrap();
    leaving.abort();
    assert!(leaving.await.unwrap_err().is_cancelled());
    assert_eq!(group.waiters("k"), 2);

    release_tx.send(()).unwrap();
    assert_eq!(driver.await.unwrap().unwrap(), "v");
    for w in waiters {
        assert_eq!(w.await.unwrap().unwrap(), "v");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_driver_is_replaced_by_a_waiter_without_overlap() {
    let group = Arc::new(Group::new());
    let live = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let (started_tx, started_rx) = oneshot::channel();
    let driver = tokio::spawn({
        let (group, live, runs) = (group.clone(), live.clone(), runs.clone());
        async move {
            group
                .run("k".to_string(), || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let guard = Live::enter(&live);
                    async move {
                        let _guard = guard;
                        let _ = started_tx.send(());
                        std::future::pending().await
                    }
                })
                .await
        }
    });
    started_rx.await.unwrap();
    let waiters: Vec<_> = (0..4)
        .map(|i| {
            let (group, live, runs) = (group.clone(), live.clone(), runs.clone());
            tokio::spawn(async move {
                group
                    .run("k".to_string(), || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let guard = Live::enter(&live);
                        async move {
                            let _guard = guard;
                            Ok(format!("rerun by {i}"))
                        }
                    })
                    .await
            })
        })
        .collect();
    until(|| group.waiters("k") == 4).await;
    driver.abort();
    assert!(driver.await.unwrap_err().is_cancelled());
    let mut results = Vec::new();
    for w in waiters {
        results.push(w.await.unwrap().expect("a waiter re-ran the work"));
    }
    assert!(results.iter().all(|r| *r == results[0]), "{results:?}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the cancelled run, then exactly one re-run"
    );
    assert_eq!(live.load(Ordering::SeqCst), 0);
    assert!(!group.forget("k"));
}

#[tokio::test]
async fn an_abandoned_flight_nobody_waits_for_leaves_the_map() {
    let group = Group::new();
    {
        let fut = group.run("k".to_string(), std::future::pending);
        tokio::pin!(fut);
        let poll = fut
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        assert!(poll.is_pending());
        assert_eq!(format!("{group:?}"), "SingleFlight { in_flight: 1, .. }");
    }
    assert_eq!(format!("{group:?}"), "SingleFlight { in_flight: 0, .. }");
    let ok = group
        .run("k".to_string(), || async { Ok("fresh".to_string()) })
        .await;
    assert_eq!(ok.unwrap(), "fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_keys_run_independently() {
    let group = Arc::new(Group::new());
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let (started_tx, started_rx) = oneshot::channel();
    let slow = tokio::spawn({
        let group = group.clone();
        async move {
            group
                .run("a".to_string(), || async move {
                    let _ = started_tx.send(());
                    release_rx.await.unwrap();
                    Ok("a".to_string())
                })
                .await
        }
    });
    started_rx.await.unwrap();
    // "b" completes while "a" is still in flight.
    let b = group
        .run("b".to_string(), || async { Ok("b".to_string()) })
        .await;
    assert_eq!(b.unwrap(), "b");
    release_tx.send(()).unwrap();
    assert_eq!(slow.await.unwrap().unwrap(), "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_starts_fresh_and_the_old_cleanup_keeps_the_new_flight() {
    let group = Arc::new(Group::new());
    let (release_old, old_rx) = oneshot::channel::<()>();
    let (old_started_tx, old_started) = oneshot::channel();
    let old = tokio::spawn({
        let group = group.clone();
        async move {
            group
                .run("k".to_string(), || async move {
                    let _ = old_started_tx.send(());
                    old_rx.await.unwrap();
                    Ok("stale".to_string())
                })
                .await
        }
    });
    old_started.await.unwrap();
    assert!(group.forget("k"));

    let (release_new, new_rx) = oneshot::channel::<()>();
    let (new_started_tx, new_started) = oneshot::channel();
    let new = tokio::spawn({
        let group = group.clone();
        async move {
            group
                .run("k".to_string(), || async move {
                    let _ = new_started_tx.send(());
                    new_rx.await.unwrap();
                    Ok("fresh".to_string())
                })
                .await
        }
    });
    new_started.await.unwrap();

    // The detached flight finishes; its cleanup must not remove the new one.
    release_old.send(()).unwrap();
    assert_eq!(old.await.unwrap().unwrap(), "stale");
    let joiner = tokio::spawn({
        let group = group.clone();
        async move {
            group
                .run("k".to_string(), || async {
                    Ok("third execution".to_string())
                })
                .await
        }
    });
    until(|| group.waiters("k") == 1).await;
    release_new.send(()).unwrap();
    assert_eq!(new.await.unwrap().unwrap(), "fresh");
    assert_eq!(joiner.await.unwrap().unwrap(), "fresh");
}

#[tokio::test]
async fn a_finished_flight_is_not_a_cache() {
    let group = Group::new();
    let runs = AtomicUsize::new(0);
    for _ in 0..3 {
        group
            .run("k".to_string(), || async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(String::new())
            })
            .await
            .unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn reentering_the_same_flight_is_an_error() {
    let group = Group::new();
    let out = group
        .run("k".to_string(), || async {
            let inner = group
                .run("k".to_string(), || async { Ok("inner".to_string()) })
                .await;
            assert!(matches!(
                inner,
                Err(InitError::Reentrant {
                    what: "SingleFlight"
                })
            ));
            // Another key is fine.
            let other = group
                .run("j".to_string(), || async { Ok("j".to_string()) })
                .await;
            assert_eq!(other.unwrap(), "j");
            Ok("outer".to_string())
        })
        .await;
    assert_eq!(out.unwrap(), "outer");
}

#[test]
fn futures_are_send_and_the_group_is_sync() {
    fn assert_send<T: Send>(_: &T) {}
    fn assert_sync<T: Sync + Send>() {}
    assert_sync::<Group>();
    let group = Group::new();
    assert_send(&group.run("k".to_string(), || async { Ok(String::new()) }));
}
