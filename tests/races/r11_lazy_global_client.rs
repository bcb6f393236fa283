//! R11 (seed 003): a lazy global client, `if _db_client is None: _db_client
//! = Client()`, run by several request threads. Two threads that both find
//! `None` both create a client: two connection pools, and requests holding
//! different clients. `OnceInit` creates one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use raceguard::once::OnceInit;

use crate::support::Sequencer;

/// A database client; creating one opens a connection pool.
#[derive(Debug)]
struct Client {
    id: usize,
}

impl Client {
    fn connect(created: &AtomicUsize) -> Client {
        Client {
            id: created.fetch_add(1, Ordering::SeqCst),
        }
    }
}

#[test]
fn naive_version_fails() {
    static CREATED: AtomicUsize = AtomicUsize::new(0);
    let db_client: Mutex<Option<Arc<Client>>> = Mutex::new(None);
    let get_db = |seq: &Sequencer, check: usize, create: usize| -> Arc<Client> {
        // if _db_client is None:
        let missing = {
            let _t = seq.turn_blocking(check);
            db_client.lock().unwrap().is_none()
        };
        if missing {
            // _db_client = Client(...)
            let _t = seq.turn_blocking(create);
            let c = Arc::new(Client::connect(&CREATED));
            *db_client.lock().unwrap() = Some(c.clone());
            return c;
        }
        db_client.lock().unwrap().clone().unwrap()
    };
    let seq = Sequencer::new();
    // Thread A checks, thread B checks, A creates, B creates.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| get_db(&seq, 0, 2));
        let b = s.spawn(|| get_db(&seq, 1, 3));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(
        CREATED.load(Ordering::SeqCst),
        2,
        "two clients were created"
    );
    assert_ne!(a.id, b.id, "the two requests use different clients");
}

#[test]
fn raceguard_prevents() {
    static CREATED: AtomicUsize = AtomicUsize::new(0);
    static DB_CLIENT: OnceInit<Client, std::io::Error> = OnceInit::new();
    let seq = Sequencer::new();
    // The same schedule: A finds no client and starts creating it (step 0);
    // B asks while A is still creating (step 1).
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let t = seq.turn_blocking(0);
            DB_CLIENT
                .get_or_try_init_blocking(|| {
                    drop(t); // A is inside the creation: B's step may start.
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while DB_CLIENT.waiters() < 1 {
                        assert!(Instant::now() < deadline, "B never arrived");
                        std::thread::yield_now();
                    }
                    Ok(Client::connect(&CREATED))
                })
                .unwrap()
        });
        let b = s.spawn(|| {
            drop(seq.turn_blocking(1));
            DB_CLIENT
                .get_or_try_init_blocking(|| Ok(Client::connect(&CREATED)))
                .unwrap()
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(CREATED.load(Ordering::SeqCst), 1);
    assert!(std::ptr::eq(a, b));

    // Real concurrency: 64 request threads released at once.
    static CREATED_2: AtomicUsize = AtomicUsize::new(0);
    static DB_CLIENT_2: OnceInit<Client, std::io::Error> = OnceInit::new();
    let barrier = Barrier::new(64);
    let ids: Vec<usize> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    DB_CLIENT_2
                        .get_or_try_init_blocking(|| Ok(Client::connect(&CREATED_2)))
                        .unwrap()
                        .id
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(CREATED_2.load(Ordering::SeqCst), 1);
    assert!(ids.iter().all(|id| *id == ids[0]));
}
