//! `Refreshable` under real concurrency (tokio multi-thread runtime).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use raceguard::once::{InitError, Refreshable};
use tokio::sync::{Barrier, oneshot};

const TASKS: usize = 256;

type Token = Refreshable<String, std::io::Error>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_256_refreshing_one_generation_run_the_refresher_once() {
    let token = Arc::new(Token::new("expired".into()));
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(TASKS));
    let mut handles = Vec::new();
    for i in 0..TASKS {
        let (token, runs, barrier) = (token.clone(), runs.clone(), barrier.clone());
        handles.push(tokio::spawn(async move {
            // Every task read the stale token before any refresh started.
            let seen = token.get();
            barrier.wait().await;
            let fresh = token
                .refresh(seen.generation(), |old| async move {
                    assert_eq!(*old, "expired");
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    Ok(format!("token from task {i}"))
                })
                .await
                .expect("refresh succeeds");
            (fresh.generation().get(), fresh.into_arc())
        }));
    }
    let mut tokens = Vec::new();
    for h in handles {
        let (generation, t) = h.await.unwrap();
        assert_eq!(generation, 1);
        tokens.push(t);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        tokens.iter().all(|t| Arc::ptr_eq(t, &tokens[0])),
        "everyone got the same token"
    );
}

#[tokio::test]
async fn a_stale_generation_returns_the_current_value_without_running() {
    let token = Token::new("t0".into());
    let g0 = token.get().generation();
    token
        .refresh(g0, |_| async { Ok("t1".into()) })
        .await
        .unwrap();
    let late = token
        .refresh(g0, |_| async {
            panic!("must not run for an old generation")
        })
        .await
        .unwrap();
    assert_eq!((late.as_str(), late.generation().get()), ("t1", 1));
    let g1 = late.generation();
    let next = token
        .refresh(g1, |old| async move { Ok(format!("{old}+")) })
        .await
        .unwrap();
    assert_eq!((next.as_str(), next.generation().get()), ("t1+", 2));
    assert!(g1 > g0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_refresh_is_shared_and_retried_later() {
    let token = Arc::new(Token::new("t0".into()));
    let runs = Arc::new(AtomicUsize::new(0));
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let (started_tx, started_rx) = oneshot::channel();
    let g0 = token.get().generation();
    let driver = tokio::spawn({
        let (token, runs) = (token.clone(), runs.clone());
        async move {
            token
                .refresh(g0, |_| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = started_tx.send(());
                    release_rx.await.unwrap();
                    Err(std::io::Error::other("login server down"))
                })
                .await
        }
    });
    started_rx.await.unwrap();
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let (token, runs) = (token.clone(), runs.clone());
            tokio::spawn(async move {
                token
                    .refresh(g0, |_| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok("should not run".into())
                    })
                    .await
            })
        })
        .collect();
    // All eight wait behind the running refresh before it fails (a caller
    // arriving after the failure would legitimately retry).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while token.waiters() < 8 {
        assert!(tokio::time::Instant::now() < deadline, "stuck");
        tokio::task::yield_now().await;
    }
    release_tx.send(()).unwrap();
    let Err(InitError::Failed(first)) = driver.await.unwrap() else {
        panic!("expected failure")
    };
    for w in waiters {
        let Err(InitError::Failed(e)) = w.await.unwrap() else {
            panic!("expected failure")
        };
        assert!(Arc::ptr_eq(&e, &first));
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        token.get().generation(),
        g0,
        "a failure keeps the generation"
    );

    let ok = token
        .refresh(g0, |_| async { Ok("t1".into()) })
        .await
        .unwrap();
    assert_eq!(ok.generation().get(), 1);
}

#[tokio::test]
async fn a_panicking_refresher_becomes_an_error() {
    let token = Token::new("t0".into());
    let g0 = token.get().generation();
    let err = token
        .refresh(g0, |_| async { panic!("oops") })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            InitError::Panicked {
                what: "Refreshable refresher",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(*token.get(), "t0");
    assert_eq!(
        token
            .refresh(g0, |_| async { Ok("t1".into()) })
            .await
            .unwrap()
            .as_str(),
        "t1"
    );
}

#[tokio::test]
async fn reentrant_refresh_is_an_error() {
    let token = Token::new("t0".into());
    let g0 = token.get().generation();
    let out = token
        .refresh(g0, |_| async {
            let inner = token.refresh(g0, |_| async { Ok("inner".into()) }).await;
            assert!(matches!(
                inner,
                Err(InitError::Reentrant {
                    what: "Refreshable"
                })
            ));
            Ok("outer".into())
        })
        .await;
    assert_eq!(out.unwrap().as_str(), "outer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_refresher_is_taken_over_by_a_waiter() {
    let token = Arc::new(Token::new("t0".into()));
    let g0 = token.get().generation();
    let (started_tx, started_rx) = oneshot::channel();
    let driver = tokio::spawn({
        let token = token.clone();
        async move {
            token
                .refresh(g0, |_| async move {
                    let _ = started_tx.send(());
                    std::future::pending().await
                })
                .await
        }
    });
    started_rx.await.unwrap();
    let waiter = tokio::spawn({
        let token = token.clone();
        async move { token.refresh(g0, |_| async { Ok("t1".into()) }).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while token.waiters() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "stuck");
        tokio::task::yield_now().await;
    }
    driver.abort();
    assert!(driver.await.unwrap_err().is_cancelled());
    let fresh = waiter.await.unwrap().unwrap();
    assert_eq!((fresh.as_str(), fresh.generation().get()), ("t1", 1));
}
