//! Redis rate limiting throughput and latency, side by side in one run on
//! the bench's own `redis-server` (started by `raceguard::testing`).
//!
//! `cargo bench --all-features --bench redis`
//!
//! - `redis_check_64_tasks/{raceguard,hand_gcra}`: time per check with 64
//!   tasks over one shared multiplexed connection: raceguard's keyed limiter
//!   against a minimal hand-written GCRA script called with EVALSHA.
//!   `raw_raceguard_script` calls raceguard's Lua script directly (same
//!   arguments, no facade), splitting server-side from client-side cost.
//! - `redis-benchmark -c 64 -P 1 -t set` on the same server, printed.
//! - `redis_latency/{raceguard_check,ping}`: one call at a time; p50 and
//!   p99 over 20,000 sequential calls are printed too.
//!
//! Without the `redis` and `test-util` features, or without `redis-server`
//! on PATH, the bench prints a notice and does nothing.

#[cfg(all(feature = "redis", feature = "test-util"))]
mod real {
    use std::process::Command;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use criterion::Criterion;
    use raceguard::keys::UserId;
    use raceguard::rate::Quota;
    use raceguard::redis::{RedisBackend, RedisConfig, RedisKeyedRateLimiter};
    use raceguard::testing::RedisServer;

    const TASKS: u64 = 64;

    /// The minimal GCRA a developer would write by hand (no multi-limit, no
    /// split arithmetic, millisecond TIME), for comparison.
    const HAND_GCRA: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local interval = tonumber(ARGV[1])
local window = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local after = tat - now + interval
if after > window then return 0 end
redis.call('SET', KEYS[1], now + after, 'PX', math.floor(after / 1000) + 1)
return 1
"#;

    async fn spread<F, Fut>(iters: u64, f: F) -> Duration
    where
        F: Fn(u64) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let f = Arc::new(f);
        let per_task = iters.div_ceil(TASKS);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let f = f.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per_task {
                    f(t * per_task + i).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed()
    }

    fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
        v.sort_unstable();
        (v[v.len() / 2], v[v.len() * 99 / 100])
    }

    pub(crate) fn run(c: &mut Criterion) {
        let Some(server) = RedisServer::start_or_skip() else {
            return;
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let redis = rt
            .block_on(RedisBackend::connect(server.url(), RedisConfig::default()))
            .unwrap();
        // A generous quota: the bench measures the check, not denials.
        let quota = Quota::per_second(1_000_000_000)
            .unwrap()
            .with_burst(1_000_000)
            .unwrap();
        let limiter = Arc::new(RedisKeyedRateLimiter::new(&redis, "bench", quota).unwrap());
        let users: Arc<Vec<UserId>> = Arc::new(
            (0..1024)
                .map(|i| UserId::new(format!("user-{i}")).unwrap())
                .collect(),
        );
        let hand = Arc::new(redis::Script::new(HAND_GCRA));

        let mut g = c.benchmark_group("redis_check_64_tasks");
        g.bench_function("raceguard", |b| {
            b.iter_custom(|iters| {
                let (limiter, users) = (limiter.clone(), users.clone());
                rt.block_on(spread(iters, move |i| {
                    let (limiter, users) = (limiter.clone(), users.clone());
                    async move {
                        let d = limiter.check(&users[(i % 1024) as usize]).await.unwrap();
                        std::hint::black_box(d);
                    }
                }))
            })
        });
        g.bench_function("hand_gcra", |b| {
            b.iter_custom(|iters| {
                let (conn, hand) = (redis.connection(), hand.clone());
                rt.block_on(spread(iters, move |i| {
                    let (mut conn, hand) = (conn.clone(), hand.clone());
                    async move {
                        let r: i64 = hand
                            .key(format!("hand:{{user-{}}}", i % 1024))
                            .arg(1_000u64)
                            .arg(1_000_000u64)
                            .invoke_async(&mut conn)
                            .await
                            .unwrap();
                        std::hint::black_box(r);
                    }
                }))
            })
        });
        let ours = Arc::new(redis::Script::new(include_str!("../src/redis/gcra.lua")));
        g.bench_function("raw_raceguard_script", |b| {
            b.iter_custom(|iters| {
                let (conn, ours) = (redis.connection(), ours.clone());
                rt.block_on(spread(iters, move |i| {
                    let (mut conn, ours) = (conn.clone(), ours.clone());
                    async move {
                        let r: i64 = ours
                            .key(format!("rl:{{user-{}}}:bench", i % 1024))
                            .arg("c")
                            .arg(1u64)
                            .arg(1_000_000_000u64)
                            .arg(1u64)
                            .invoke_async(&mut conn)
                            .await
                            .unwrap();
                        std::hint::black_box(r);
                    }
                }))
            })
        });
        g.finish();

        let mut g = c.benchmark_group("redis_latency");
        let alice = UserId::new("alice").unwrap();
        g.bench_function("raceguard_check", |b| {
            b.iter(|| rt.block_on(limiter.check(&alice)).unwrap())
        });
        g.bench_function("ping", |b| {
            b.iter(|| {
                rt.block_on(redis.query::<String>(&redis::cmd("PING")))
                    .unwrap()
            })
        });
        g.finish();

        let sample = |check: bool| {
            rt.block_on(async {
                let mut v = Vec::with_capacity(20_000);
                for _ in 0..20_000 {
                    let t = Instant::now();
                    if check {
                        limiter.check(&alice).await.unwrap();
                    } else {
                        redis.query::<String>(&redis::cmd("PING")).await.unwrap();
                    }
                    v.push(t.elapsed());
                }
                percentiles(v)
            })
        };
        let (c50, c99) = sample(true);
        let (p50, p99) = sample(false);
        println!(
            "redis_latency percentiles: check p50 {c50:?} p99 {c99:?}; PING p50 {p50:?} p99 {p99:?}"
        );

        match Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &server.port().to_string()])
            .args(["-c", "64", "-P", "1", "-t", "set", "-n", "200000", "-q"])
            .output()
        {
            Ok(out) => {
                // redis-benchmark redraws its progress line with '\r'; the
                // summary is the last segment.
                let text = String::from_utf8_lossy(&out.stdout);
                let summary = text.rsplit('\r').next().unwrap_or("").trim();
                println!("redis-benchmark -c 64 -P 1 -t set: {summary}");
            }
            Err(e) => println!("redis-benchmark not run: {e}"),
        }
    }
}

fn main() {
    #[cfg(all(feature = "redis", feature = "test-util"))]
    {
        let mut c = criterion::Criterion::default().configure_from_args();
        real::run(&mut c);
        c.final_summary();
    }
    #[cfg(not(all(feature = "redis", feature = "test-util")))]
    eprintln!("benches/redis.rs needs --features redis,test-util (or --all-features)");
}
