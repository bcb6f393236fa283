//! R09 (seed 002): concurrent webhooks each log in to the same external
//! session. Every webhook's coordinator checks for a session cookie and, if
//! there is none, logs in (launches a browser, posts credentials): a
//! check-then-act across an `await`, so a burst of webhooks logs in once per
//! webhook. `SingleFlight` gives a burst one login, shared by all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raceguard::once::SingleFlight;

use crate::support::Sequencer;

const WEBHOOKS: usize = 100;
const STUCK: Duration = Duration::from_secs(20);

/// The external site: counts logins, hands out numbered cookies.
#[derive(Debug, Default)]
struct ExternalSite {
    logins: AtomicUsize,
}

impl ExternalSite {
    fn login(&self) -> String {
        let n = self.logins.fetch_add(1, Ordering::SeqCst);
        format!("cookie-{n}")
    }
}

/// Yields until `cond` holds; fails the test if it never does.
async fn until(cond: impl Fn() -> bool) {
    let spin = async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(STUCK, spin).await.expect("stuck");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn naive_version_fails() {
    let site = Arc::new(ExternalSite::default());
    let session: Arc<Mutex<Option<String>>> = Arc::default();
    let seq = Arc::new(Sequencer::new());
    // Schedule: all webhooks check the session (steps 0..100), then each
    // that found none logs in (steps 100..200): a burst arriving while the
    // first login is still in progress.
    let tasks: Vec<_> = (0..WEBHOOKS)
        .map(|i| {
            let (site, session, seq) = (site.clone(), session.clone(), seq.clone());
            tokio::spawn(async move {
                let has_session = {
                    let _t = seq.turn(i).await;
                    session.lock().unwrap().is_some()
                };
                if !has_session {
                    let _t = seq.turn(WEBHOOKS + i).await;
                    let cookie = site.login();
                    *session.lock().unwrap() = Some(cookie);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        site.logins.load(Ordering::SeqCst),
        WEBHOOKS,
        "every webhook of the burst logged in on its own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raceguard_prevents() {
    // The same schedule: every webhook arrives (steps 0..100) before the
    // login completes.
    let site = Arc::new(ExternalSite::default());
    let logins = Arc::new(SingleFlight::<&'static str, String, std::io::Error>::new());
    let seq = Arc::new(Sequencer::new());
    let tasks: Vec<_> = (0..WEBHOOKS)
        .map(|i| {
            let (site, logins, seq) = (site.clone(), logins.clone(), seq.clone());
            tokio::spawn(async move {
                drop(seq.turn(i).await);
                let group = logins.clone();
                logins
                    .run("mam", || async move {
                        // The login is slow: it finishes after the whole burst arrived.
                        until(|| group.waiters("mam") == WEBHOOKS - 1).await;
                        Ok(site.login())
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut cookies = Vec::new();
    for t in tasks {
        cookies.push(t.await.unwrap());
    }
    assert_eq!(seq.completed(), WEBHOOKS);
    assert_eq!(
        site.logins.load(Ordering::SeqCst),
        1,
        "one login for the burst"
    );
    assert!(
        cookies.iter().all(|c| c == "cookie-0"),
        "every webhook uses the one session"
    );

    // Real concurrency, no schedule: a burst released at once.
    let site = Arc::new(ExternalSite::default());
    let barrier = Arc::new(tokio::sync::Barrier::new(WEBHOOKS));
    let tasks: Vec<_> = (0..WEBHOOKS)
        .map(|_| {
            let (site, logins, barrier) = (site.clone(), logins.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let group = logins.clone();
                logins
                    .run("mam", || async move {
                        until(|| group.waiters("mam") == WEBHOOKS - 1).await;
                        Ok(site.login())
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "cookie-0");
    }
    assert_eq!(site.logins.load(Ordering::SeqCst), 1);
}
