//! R12 (seed 004): `ensure_application_initialized` checks a global
//! `_application_initialized` flag, awaits `application.initialize()`, then
//! sets the flag: two webhooks that both see `False` initialize the
//! application twice. `OnceInit` initializes once, and after a failed first
//! attempt a later caller retries (the seed's fix instead left the
//! application uninitialized until restart, or re-ran it per request).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use raceguard::once::{InitError, OnceInit};

use crate::support::Sequencer;

/// The bot application: counts `initialize()` calls; can be told to fail.
#[derive(Debug, Default)]
struct Application {
    initialize_calls: AtomicUsize,
    fail_next: AtomicBool,
}

/// What `initialize()` produced: a ready application handle.
#[derive(Debug)]
struct Ready {
    attempt: usize,
}

impl Application {
    async fn initialize(&self) -> Result<Ready, std::io::Error> {
        let attempt = self.initialize_calls.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await;
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(std::io::Error::other("telegram API unreachable"));
        }
        Ok(Ready { attempt })
    }
}

async fn until(cond: impl Fn() -> bool) {
    let spin = async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), spin)
        .await
        .expect("stuck");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_version_fails() {
    let app = Arc::new(Application::default());
    let initialized = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(Sequencer::new());
    // Webhook A checks (0), webhook B checks (1), A initializes (2), B
    // initializes (3): the execution flow the seed's post-mortem drew.
    let webhook = |check: usize, init: usize| {
        let (app, initialized, seq) = (app.clone(), initialized.clone(), seq.clone());
        tokio::spawn(async move {
            let seen = {
                let _t = seq.turn(check).await;
                initialized.load(Ordering::SeqCst)
            };
            if !seen {
                let _t = seq.turn(init).await;
                app.initialize().await.unwrap();
                initialized.store(true, Ordering::SeqCst);
            }
        })
    };
    let (a, b) = (webhook(0, 2), webhook(1, 3));
    a.await.unwrap();
    b.await.unwrap();
    assert_eq!(
        app.initialize_calls.load(Ordering::SeqCst),
        2,
        "application.initialize() ran twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raceguard_prevents() {
    // The same schedule: A is inside initialize() when B asks.
    let app = Arc::new(Application::default());
    let ready = Arc::new(OnceInit::<Ready, std::io::Error>::new());
    let seq = Arc::new(Sequencer::new());
    let a = tokio::spawn({
        let (app, ready, seq) = (app.clone(), ready.clone(), seq.clone());
        async move {
            let t = seq.turn(0).await;
            let cell = ready.clone();
            ready
                .get_or_try_init(|| async move {
                    drop(t);
                    until(|| cell.waiters() == 1).await; // B arrived meanwhile
                    app.initialize().await
                })
                .await
                .map(|r| r.attempt)
        }
    });
    let b = tokio::spawn({
        let (app, ready, seq) = (app.clone(), ready.clone(), seq.clone());
        async move {
            drop(seq.turn(1).await);
            ready
                .get_or_try_init(|| app.initialize())
                .await
                .map(|r| r.attempt)
        }
    });
    assert_eq!(a.await.unwrap().unwrap(), 0);
    assert_eq!(b.await.unwrap().unwrap(), 0);
    assert_eq!(app.initialize_calls.load(Ordering::SeqCst), 1);

    // A failing first attempt: A's initialize() fails while B waits for it;
    // both get that one error; a later webhook C retries and succeeds; D
    // finds the application ready.
    let app = Arc::new(Application::default());
    app.fail_next.store(true, Ordering::SeqCst);
    let ready = Arc::new(OnceInit::<Ready, std::io::Error>::new());
    let seq = Arc::new(Sequencer::new());
    let a = tokio::spawn({
        let (app, ready, seq) = (app.clone(), ready.clone(), seq.clone());
        async move {
            let t = seq.turn(0).await;
            let cell = ready.clone();
            ready
                .get_or_try_init(|| async move {
                    drop(t);
                    until(|| cell.waiters() == 1).await;
                    app.initialize().await
                })
                .await
                .map(|r| r.attempt)
        }
    });
    let b = tokio::spawn({
        let (app, ready, seq) = (app.clone(), ready.clone(), seq.clone());
        async move {
            drop(seq.turn(1).await);
            ready
                .get_or_try_init(|| app.initialize())
                .await
                .map(|r| r.attempt)
        }
    });
    let (ea, eb) = (a.await.unwrap().unwrap_err(), b.await.unwrap().unwrap_err());
    match (&ea, &eb) {
        (InitError::Failed(x), InitError::Failed(y)) => {
            assert!(Arc::ptr_eq(x, y), "one shared error")
        }
        other => panic!("expected the shared failure, got {other:?}"),
    }
    assert_eq!(
        app.initialize_calls.load(Ordering::SeqCst),
        1,
        "B did not re-run the failing attempt"
    );
    let c = ready.get_or_try_init(|| app.initialize()).await.unwrap();
    assert_eq!(c.attempt, 1, "the later caller retried");
    let d = ready.get_or_try_init(|| app.initialize()).await.unwrap();
    assert!(std::ptr::eq(c, d));
    assert_eq!(app.initialize_calls.load(Ordering::SeqCst), 2);

    // Real concurrency: async webhooks and synchronous handlers (the seed's
    // Flask threads, through the blocking accessor) all at once.
    let app = Arc::new(Application::default());
    let ready = Arc::new(OnceInit::<Ready, std::io::Error>::new());
    let barrier = Arc::new(std::sync::Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (app, ready, barrier) = (app.clone(), ready.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                ready
                    .get_or_try_init_blocking(|| {
                        tokio::runtime::Builder::new_current_thread()
                            .build()
                            .unwrap()
                            .block_on(app.initialize())
                    })
                    .unwrap()
                    .attempt
            })
        })
        .collect();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (app, ready) = (app.clone(), ready.clone());
            tokio::spawn(async move {
                ready
                    .get_or_try_init(|| app.initialize())
                    .await
                    .unwrap()
                    .attempt
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 0);
    }
    for t in threads {
        assert_eq!(t.join().unwrap(), 0);
    }
    assert_eq!(app.initialize_calls.load(Ordering::SeqCst), 1);
}
