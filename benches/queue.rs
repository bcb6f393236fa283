//! `WorkQueue` against a plain `tokio::sync::mpsc` worker pool, side by side
//! in one run.
//!
//! `cargo bench --bench queue -- --warm-up-time 1 --measurement-time 3`
//!
//! - `queue/submit_complete/{raceguard,mpsc_pool}/{1,4}`: submit `JOBS`
//!   trivial jobs without waiting (`WorkQueue::submit` / `Sender::try_send`),
//!   then await every job's result (a `JobHandle` / a oneshot reply), with
//!   1 and 4 workers on a 2-thread Tokio runtime. The pool is the usual
//!   hand-rolled one: N tasks sharing the receiver behind a
//!   `tokio::sync::Mutex`, each job carrying a oneshot for its result. Both
//!   are bounded with the same capacity, so neither ever rejects here.
//!   Throughput is reported in jobs per second.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use raceguard::queue::WorkQueue;
use tokio::runtime::Runtime;
use tokio::sync::{Mutex, mpsc, oneshot};

const JOBS: usize = 1_000;

async fn job(x: u64) -> u64 {
    x.wrapping_mul(31)
}

type Pool = mpsc::Sender<(u64, oneshot::Sender<u64>)>;

fn mpsc_pool(rt: &Runtime, workers: usize) -> Pool {
    let (tx, rx) = mpsc::channel::<(u64, oneshot::Sender<u64>)>(JOBS);
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..workers {
        let rx = rx.clone();
        rt.spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some((x, reply)) = next else { break };
                let _ = reply.send(job(x).await);
            }
        });
    }
    tx
}

fn bench_submit_complete(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("queue/submit_complete");
    g.throughput(Throughput::Elements(JOBS as u64));
    for workers in [1usize, 4] {
        let queue = rt.block_on(async {
            WorkQueue::builder()
                .capacity(JOBS)
                .workers(workers)
                .build(job)
                .unwrap()
        });
        g.bench_with_input(BenchmarkId::new("raceguard", workers), &queue, |b, q| {
            b.iter(|| {
                rt.block_on(async {
                    let handles: Vec<_> = (0..JOBS as u64).map(|x| q.submit(x).unwrap()).collect();
                    let mut sum = 0u64;
                    for h in handles {
                        sum = sum.wrapping_add(h.await.unwrap());
                    }
                    black_box(sum)
                })
            })
        });

        let pool = mpsc_pool(&rt, workers);
        g.bench_with_input(BenchmarkId::new("mpsc_pool", workers), &pool, |b, tx| {
            b.iter(|| {
                rt.block_on(async {
                    let replies: Vec<_> = (0..JOBS as u64)
                        .map(|x| {
                            let (reply, rx) = oneshot::channel();
                            tx.try_send((x, reply)).unwrap();
                            rx
                        })
                        .collect();
                    let mut sum = 0u64;
                    for r in replies {
                        sum = sum.wrapping_add(r.await.unwrap());
                    }
                    black_box(sum)
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_submit_complete);
criterion_main!(benches);
