//! One-shot primitives against their peers, side by side in one run.
//!
//! `cargo bench --bench once -- --warm-up-time 1 --measurement-time 3`
//!
//! - `once_get/{raceguard,tokio,std}`: reading an initialized cell:
//!   `OnceInit::get` against `tokio::sync::OnceCell::get` and
//!   `std::sync::OnceLock::get`. Goal: within 1.1x of `OnceLock`.
//! - `singleflight_uncontended/{raceguard,direct}`: one `SingleFlight::run`
//!   with nobody else in flight, against calling the work directly. Both
//!   poll a ready future once with a no-op waker, so the difference is
//!   SingleFlight's bookkeeping (map insert and removal, the flight's
//!   allocation, two short locks).

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use raceguard::once::{OnceInit, SingleFlight};

/// Polls a future that is ready at once (no runtime in the measurement).
fn now<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("the benched futures never wait"),
    }
}

fn bench_once_get(c: &mut Criterion) {
    let ours: OnceInit<u64, ()> = OnceInit::new();
    now(ours.get_or_try_init(|| async { Ok(42) })).unwrap();
    let tokio_cell = tokio::sync::OnceCell::<u64>::new_with(Some(42));
    let std_cell = OnceLock::new();
    std_cell.set(42u64).unwrap();

    let mut g = c.benchmark_group("once_get");
    g.bench_function("raceguard", |b| b.iter(|| *black_box(&ours).get().unwrap()));
    g.bench_function("tokio", |b| {
        b.iter(|| *black_box(&tokio_cell).get().unwrap())
    });
    g.bench_function("std", |b| b.iter(|| *black_box(&std_cell).get().unwrap()));
    g.finish();
}

async fn work(x: u64) -> Result<u64, ()> {
    Ok(x.wrapping_mul(31))
}

fn bench_singleflight(c: &mut Criterion) {
    let group: SingleFlight<u64, u64, ()> = SingleFlight::new();
    let mut g = c.benchmark_group("singleflight_uncontended");
    g.bench_function("raceguard", |b| {
        b.iter(|| now(group.run(black_box(7), || work(black_box(3)))).unwrap())
    });
    g.bench_function("direct", |b| b.iter(|| now(work(black_box(3))).unwrap()));
    g.finish();
}

criterion_group!(benches, bench_once_get, bench_singleflight);
criterion_main!(benches);
