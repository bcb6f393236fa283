//! `OnceInit` under real concurrency (tokio multi-thread runtime, OS threads)
//! and a property test against a sequential reference model.
//!
//! No sleeps: attempts are held open until the expected number of callers
//! wait for them (`OnceInit::waiters`), and time is a `ManualClock`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use raceguard::clock::ManualClock;
use raceguard::once::{InitError, OnceInit};
use tokio::sync::oneshot;

const TASKS: usize = 256;

/// Yields until `cond` holds (a spin on the runtime, never a sleep). A
/// condition that never comes fails the test instead of hanging it.
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

/// Watchdog for the spins above: far beyond any correct run.
const STUCK: Duration = Duration::from_secs(20);

/// Counts live initializer futures; two at once fail the test.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn enter(live: &Arc<AtomicUsize>) -> Self {
        assert_eq!(
            live.fetch_add(1, Ordering::SeqCst),
            0,
            "two attempts overlap"
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
async fn tasks_256_run_the_initializer_once_and_share_the_value() {
    let cell = Arc::new(OnceInit::<String, std::io::Error>::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for i in 0..TASKS {
        let (cell, calls) = (cell.clone(), calls.clone());
        handles.push(tokio::spawn(async move {
            let v = cell
                .get_or_try_init(|| async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    // Hold the attempt until every other task waits for it.
                    until(|| cell.waiters() == TASKS - 1).await;
                    Ok(format!("client #{i}"))
                })
                .await
                .expect("init succeeds");
            std::ptr::from_ref(v).addr()
        }));
    }
    let mut addrs = Vec::new();
    for h in handles {
        addrs.push(h.await.unwrap());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        addrs.iter().all(|a| *a == addrs[0]),
        "callers saw different values"
    );
    assert_eq!(cell.waiters(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_dependency_256_waiters_cause_one_call() {
    let cell = Arc::new(OnceInit::<u32, std::io::Error>::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let (cell, calls) = (cell.clone(), calls.clone());
        handles.push(tokio::spawn(async move {
            cell.get_or_try_init(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                until(|| cell.waiters() == TASKS - 1).await;
                Err(std::io::Error::other("database is down"))
            })
            .await
            .copied()
        }));
    }
    let mut errors = Vec::new();
    for h in handles {
        match h.await.unwrap() {
            Err(InitError::Failed(e)) => errors.push(e),
            other => panic!("expected the shared failure, got {other:?}"),
        }
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the dead dependency was stampeded"
    );
    assert!(
        errors.iter().all(|e| Arc::ptr_eq(e, &errors[0])),
        "one error, shared"
    );
    assert!(cell.get().is_none());

    // Not poisoned: a later caller retries, and succeeds.
    let v = cell.get_or_try_init(|| async { Ok(5) }).await.unwrap();
    assert_eq!(*v, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panic_reaches_every_waiter_and_does_not_poison() {
    let cell = Arc::new(OnceInit::<u32, std::io::Error>::new());
    let mut handles = Vec::new();
    for _ in 0..8 {
        let cell = cell.clone();
        handles.push(tokio::spawn(async move {
            cell.get_or_try_init(|| async {
                until(|| cell.waiters() == 7).await;
                panic!("initializer exploded");
            })
            .await
            .copied()
        }));
    }
    for h in handles {
        match h.await.expect("the panic is caught, not propagated") {
            Err(InitError::Panicked { what, message }) => {
                assert_eq!(what, "OnceInit initializer");
                assert_eq!(&*message, "initializer exploded");
            }
            other => panic!("expected Panicked, got {other:?}"),
        }
    }
    assert_eq!(*cell.get_or_try_init(|| async { Ok(1) }).await.unwrap(), 1);
}

#[tokio::test]
async fn a_panic_while_creating_the_future_is_caught_too() {
    let cell = OnceInit::<u32, ()>::new();
    let err = cell
        .get_or_try_init(|| -> std::future::Ready<Result<u32, ()>> { panic!("before any await") })
        .await
        .unwrap_err();
    assert!(matches!(err, InitError::Panicked { .. }), "{err:?}");
    assert_eq!(*cell.get_or_try_init(|| async { Ok(2) }).await.unwrap(), 2);
}

#[tokio::test]
async fn reentrant_initialization_is_an_error_not_a_deadlock() {
    let cell = OnceInit::<u32, String>::new();
    let v = cell
        .get_or_try_init(|| async {
            let inner = cell.get_or_try_init(|| async { Ok(1) }).await.copied();
            assert_eq!(inner, Err(InitError::Reentrant { what: "OnceInit" }));
            let inner = cell.get_or_try_init_blocking(|| Ok(1)).copied();
            assert_eq!(inner, Err(InitError::Reentrant { what: "OnceInit" }));
            Ok(2)
        })
        .await
        .unwrap();
    assert_eq!(*v, 2);
    let err: raceguard::Error = InitError::<std::io::Error>::Reentrant { what: "OnceInit" }.into();
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn waiting_on_the_own_cell_inside_the_initializer_fails_the_attempt() {
    let cell = OnceInit::<u32, String>::new();
    let err = cell
        .get_or_try_init(|| async {
            let v = cell.wait().await;
            Ok(*v)
        })
        .await
        .unwrap_err();
    match err {
        InitError::Panicked { message, .. } => {
            assert!(message.contains("would deadlock"), "{message}")
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
}

#[tokio::test]
async fn blocking_reentry_is_detected() {
    let cell = OnceInit::<u32, String>::new();
    let v = cell
        .get_or_try_init_blocking(|| {
            let inner = cell.get_or_try_init_blocking(|| Ok(1)).copied();
            assert_eq!(inner, Err(InitError::Reentrant { what: "OnceInit" }));
            Ok(3)
        })
        .unwrap();
    assert_eq!(*v, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_driver_hands_the_attempt_to_a_waiter() {
    let cell = Arc::new(OnceInit::<u32, std::io::Error>::new());
    let live = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));

    let (started_tx, started_rx) = oneshot::channel();
    let driver = tokio::spawn({
        let (cell, live, calls) = (cell.clone(), live.clone(), calls.clone());
        async move {
            cell.get_or_try_init(|| {
                calls.fetch_add(1, Ordering::SeqCst);
                let guard = Live::enter(&live);
                async move {
                    let _guard = guard;
                    let _ = started_tx.send(());
                    std::future::pending::<Result<u32, std::io::Error>>().await
                }
            })
            .await
            .copied()
        }
    });
    started_rx.await.unwrap();
    let mut waiters = Vec::new();
    for i in 0..3 {
        let (cell, live, calls) = (cell.clone(), live.clone(), calls.clone());
        waiters.push(tokio::spawn(async move {
            cell.get_or_try_init(|| {
                calls.fetch_add(1, Ordering::SeqCst);
                let guard = Live::enter(&live);
                async move {
                    let _guard = guard;
                    Ok(10 + i)
                }
            })
            .await
            .copied()
        }));
    }
    until(|| cell.waiters() == 3).await;
    driver.abort();
    assert!(driver.await.unwrap_err().is_cancelled());

    let mut values = Vec::new();
    for w in waiters {
        values.push(w.await.unwrap().expect("a waiter took over"));
    }
    assert!(values.iter().all(|v| *v == values[0]));
    assert_eq!(cell.get(), Some(&values[0]));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the driver's attempt, then exactly one takeover"
    );
    assert_eq!(live.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_cancelled_driver_with_no_waiters_lets_the_next_call_start() {
    let cell = OnceInit::<u32, ()>::new();
    {
        let fut = cell.get_or_try_init(std::future::pending);
        tokio::pin!(fut);
        assert!(futures_poll_once(fut.as_mut()).is_pending());
    }
    assert_eq!(*cell.get_or_try_init(|| async { Ok(4) }).await.unwrap(), 4);
}

fn futures_poll_once<F: std::future::Future>(
    f: std::pin::Pin<&mut F>,
) -> std::task::Poll<F::Output> {
    f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
}

#[tokio::test]
async fn retry_backoff_answers_with_the_last_error_inside_the_cool_down() {
    let clock = ManualClock::new();
    let cell = OnceInit::<u32, String>::with_retry_backoff(Duration::from_secs(10), clock.clone());
    let calls = AtomicUsize::new(0);
    let fail = || async {
        calls.fetch_add(1, Ordering::SeqCst);
        Err::<u32, _>("down".to_string())
    };
    let Err(InitError::Failed(first)) = cell.get_or_try_init(fail).await else {
        panic!()
    };
    clock.advance(Duration::from_secs(9));
    for _ in 0..5 {
        let Err(InitError::Failed(again)) = cell.get_or_try_init(fail).await else {
            panic!()
        };
        assert!(
            Arc::ptr_eq(&first, &again),
            "the last error, not a new attempt"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    clock.advance(Duration::from_secs(1));
    let Err(InitError::Failed(second)) = cell.get_or_try_init(fail).await else {
        panic!()
    };
    assert!(
        !Arc::ptr_eq(&first, &second),
        "after the cool-down a new attempt ran"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    clock.advance(Duration::from_secs(10));
    assert_eq!(*cell.get_or_try_init(|| async { Ok(9) }).await.unwrap(), 9);
    // Set: the cool-down no longer matters.
    assert_eq!(*cell.get_or_try_init(fail).await.unwrap(), 9);
}

#[test]
fn threads_blocking_on_one_attempt_initialize_once() {
    const THREADS: usize = 16;
    let cell = OnceInit::<usize, String>::new();
    let calls = AtomicUsize::new(0);
    let barrier = std::sync::Barrier::new(THREADS);
    let values: Vec<usize> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (cell, calls, barrier) = (&cell, &calls, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    *cell
                        .get_or_try_init_blocking(|| {
                            calls.fetch_add(1, Ordering::SeqCst);
                            let deadline = std::time::Instant::now() + STUCK;
                            while cell.waiters() < THREADS - 1 {
                                assert!(std::time::Instant::now() < deadline, "stuck");
                                std::thread::yield_now();
                            }
                            Ok(i)
                        })
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(values.iter().all(|v| *v == values[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_and_blocking_callers_share_one_attempt() {
    let cell = Arc::new(OnceInit::<u32, String>::new());
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let (started_tx, started_rx) = oneshot::channel();
    let driver = tokio::spawn({
        let cell = cell.clone();
        async move {
            *cell
                .get_or_try_init(|| async {
                    let _ = started_tx.send(());
                    release_rx.await.unwrap();
                    Ok(8)
                })
                .await
                .unwrap()
        }
    });
    started_rx.await.unwrap();
    let blocking = std::thread::spawn({
        let cell = cell.clone();
        move || {
            *cell
                .get_or_try_init_blocking(|| Err("must not run".to_string()))
                .unwrap()
        }
    });
    until(|| cell.waiters() == 1).await;
    release_tx.send(()).unwrap();
    assert_eq!(driver.await.unwrap(), 8);
    assert_eq!(blocking.join().unwrap(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_wait_through_failed_attempts_until_a_value_is_set() {
    let cell = Arc::new(OnceInit::<u32, String>::new());
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let cell = cell.clone();
            tokio::spawn(async move { *cell.wait().await })
        })
        .collect();
    until(|| cell.waiters() == 4).await;
    assert!(
        cell.get_or_try_init(|| async { Err("down".to_string()) })
            .await
            .is_err()
    );
    // The failure woke the readers; they wait again (a reader never gets an error).
    until(|| cell.waiters() == 4).await;
    assert!(readers.iter().all(|r| !r.is_finished()));
    cell.get_or_try_init(|| async { Ok(12) }).await.unwrap();
    for r in readers {
        assert_eq!(r.await.unwrap(), 12);
    }
}

#[test]
fn futures_are_send_and_the_cell_is_sync() {
    fn assert_send<T: Send>(_: &T) {}
    fn assert_sync<T: Sync + Send>() {}
    assert_sync::<OnceInit<String, std::io::Error>>();
    let cell = OnceInit::<String, std::io::Error>::new();
    assert_send(&cell.get_or_try_init(|| async { Ok(String::new()) }));
    assert_send(&cell.wait());
}

/// One step of the sequential reference model.
#[derive(Debug, Clone)]
enum Op {
    Call(Outcome),
    Advance(u64),
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Ok(u8),
    Err,
    Panic,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => prop_oneof![
            any::<u8>().prop_map(Outcome::Ok),
            Just(Outcome::Err),
            Just(Outcome::Panic),
        ]
        .prop_map(Op::Call),
        1 => (0u64..20).prop_map(Op::Advance),
    ]
}

proptest! {
    /// Sequential calls behave like the reference model: the value is the
    /// first success and never changes; the initializer runs only when the
    /// cell is empty and outside the cool-down; inside it, calls get the last
    /// failure without running.
    #[test]
    fn sequential_calls_match_the_reference_model(
        cool_down in 0u64..10,
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let clock = ManualClock::new();
        let cell = OnceInit::<u8, &'static str>::with_retry_backoff(Duration::from_secs(cool_down), clock.clone());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (mut value, mut failed_at, mut now, mut runs) = (None::<u8>, None::<u64>, 0u64, 0usize);
        let ran = AtomicUsize::new(0);
        for op in ops {
            match op {
                Op::Advance(s) => {
                    clock.advance(Duration::from_secs(s));
                    now += s;
                }
                Op::Call(outcome) => {
                    let got = rt.block_on(cell.get_or_try_init(|| async {
                        ran.fetch_add(1, Ordering::SeqCst);
                        match outcome {
                            Outcome::Ok(v) => Ok(v),
                            Outcome::Err => Err("failed"),
                            Outcome::Panic => panic!("panicked"),
                        }
                    })).copied();
                    // The model.
                    let cooling = failed_at.is_some_and(|t| now < t + cool_down);
                    let expected_run = value.is_none() && !cooling;
                    if expected_run {
                        runs += 1;
                        match outcome {
                            Outcome::Ok(v) => value = Some(v),
                            _ => failed_at = Some(now),
                        }
                    }
                    match value {
                        Some(v) => prop_assert_eq!(got.clone(), Ok(v)),
                        None => prop_assert!(got.is_err()),
                    }
                    prop_assert_eq!(ran.load(Ordering::SeqCst), runs);
                    prop_assert_eq!(cell.get().copied(), value);
                }
            }
        }
    }
}
