//! Loom model of `Refreshable` (issue 3, proof 1): concurrent refreshes of
//! one generation run the refresher once, and every caller gets the new
//! generation.

use loom::future::block_on;

use crate::once::{Generation, Refreshable};
use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::{Arc, thread};

#[test]
fn loom_refresh_of_one_generation_runs_once() {
    loom::model(|| {
        let token = Arc::new(Refreshable::<u32, ()>::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        let seen = token.get().generation();
        let refresh =
            |token: Arc<Refreshable<u32, ()>>, runs: Arc<AtomicUsize>, seen: Generation| {
                let snap = block_on(token.refresh(seen, |old| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok(*old + 10)
                }))
                .expect("refresh succeeds");
                (*snap, snap.generation().get())
            };
        let others: Vec<_> = (0..2)
            .map(|_| {
                let (token, runs) = (token.clone(), runs.clone());
                thread::spawn(move || refresh(token, runs, seen))
            })
            .collect();
        let mut got = vec![refresh(token.clone(), runs.clone(), seen)];
        for h in others {
            got.push(h.join().unwrap());
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "one generation was refreshed twice"
        );
        assert!(got.iter().all(|g| *g == (10, 1)), "callers saw {got:?}");
        let now = token.get();
        assert_eq!((*now, now.generation().get()), (10, 1));
    });
}
