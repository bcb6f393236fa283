//! A user's loom model of its own request handler built on `OnceInit` and
//! `SingleFlight`. Run with `RUSTFLAGS="--cfg raceguard_loom" cargo test
//! --release` (scripts/loom.sh does).
#![cfg(raceguard_loom)]

use loom::future::block_on;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use raceguard_downstream_loom::Backend;

/// Two concurrent requests for one account: the client is connected once,
/// both requests use it, and two logins for the account never overlap.
#[test]
fn loom_backend_connects_once_and_never_overlaps_logins() {
    loom::model(|| {
        let backend = Arc::new(Backend::new());
        let connects = Arc::new(AtomicUsize::new(0));
        let logins_live = Arc::new(AtomicUsize::new(0));
        let request =
            |backend: Arc<Backend>, connects: Arc<AtomicUsize>, live: Arc<AtomicUsize>| {
                block_on(backend.handle(
                    "alice",
                    || connects.fetch_add(1, Ordering::SeqCst) as u64,
                    || async move {
                        assert_eq!(live.fetch_add(1, Ordering::SeqCst), 0, "overlapping logins");
                        loom::thread::yield_now();
                        live.fetch_sub(1, Ordering::SeqCst);
                        "cookie".to_string()
                    },
                ))
                .expect("the request succeeds")
            };
        let other = {
            let (b, c, l) = (backend.clone(), connects.clone(), logins_live.clone());
            loom::thread::spawn(move || request(b, c, l))
        };
        let mine = request(backend.clone(), connects.clone(), logins_live.clone());
        let theirs = other.join().unwrap();
        assert_eq!(
            connects.load(Ordering::SeqCst),
            1,
            "the client was connected twice"
        );
        assert_eq!(mine.0, theirs.0, "the requests used different clients");
        assert_eq!((mine.1.as_str(), theirs.1.as_str()), ("cookie", "cookie"));
    });
}
