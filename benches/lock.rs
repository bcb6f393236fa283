//! Lock throughput and hand-off latency, side by side in one run on the
//! bench's own `redis-server` (started by `raceguard::testing`).
//!
//! `cargo bench --all-features --bench lock`
//!
//! Contenders, each an uncontended acquire + release cycle on a resource of
//! its own (one shared multiplexed connection each):
//!
//! - `raceguard`: `try_acquire` + `release`, fencing off (`SET NX PX`, then
//!   the compare-and-delete script; raceguard runs its scripts as Redis
//!   Functions, `FCALL`);
//! - `raceguard_fenced`: fencing on, the default [`Fencing::ServerClock`]
//!   (the acquire script: `SET NX PX` + `INCR` of the fencing counter +
//!   `TIME`);
//! - `raceguard_counter`: [`Fencing::Counter`] (the acquire script without
//!   the clock read: `SET NX PX` + `INCR`);
//! - `rslock`: rslock 0.10 (`lock` + `unlock`, one node);
//! - `hand_written`: the two commands by hand with the `redis` crate,
//!   `SET NX PX` then an EVALSHA compare-and-delete, on one
//!   `MultiplexedConnection`: the floor.
//!
//! Three measurements:
//!
//! 1. criterion groups `lock_cycle_1_task/*` and `lock_cycle_64_tasks/*`
//!    (time per cycle; 64 tasks on 64 resources);
//! 2. **interleaved rounds**: 7 rounds, each running every contender once
//!    in turn (1 task, then 64 tasks), printing the median cycles/s, the
//!    ratios, and the CPU one cycle costs: this process's (`/proc/self/stat`,
//!    10 ms ticks) plus the server's (`INFO cpu`). Interleaving keeps a
//!    shared machine's load drift from favouring whichever contender ran in
//!    a quiet moment, and CPU per cycle is what throughput on a dedicated,
//!    CPU-bound machine follows: these are the numbers `BENCHMARKS.md`
//!    records;
//! 3. the server's CPU time per command (`INFO commandstats`; a script's
//!    time includes the commands it calls, which are also listed);
//!
//! and the hand-off latency with 8 tasks contending for one resource: the
//! time from a holder starting its release to the next holder's acquire
//! returning (the releaser sits out until someone else got the lock, so
//! every sample is a real hand-off), p50/p99 over 1,000 hand-offs.
//!
//! `RACEGUARD_LOCK_PROFILE=<contender>,<cycles>,<tasks>` runs only that
//! many cycles of one contender and exits (for callgrind instruction counts:
//! two runs with different cycle counts, subtracted; with
//! `RACEGUARD_LOCK_PROFILE_SHUTDOWN` set it then shuts the server down
//! cleanly, for a `redis-server` run under callgrind).
//!
//! `RACEGUARD_LOCK_ALTERNATIVES=1` adds the other fenced-acquire designs
//! measured while choosing (`alt_*`, see `Alternative`), each written
//! plainly with the `redis` crate.
//!
//! [`Fencing::ServerClock`]: raceguard::lock::Fencing::ServerClock
//! [`Fencing::Counter`]: raceguard::lock::Fencing::Counter
//!
//! Without the `redis` and `test-util` features, or without `redis-server`
//! on PATH, the bench prints a notice and does nothing.

#[cfg(all(feature = "redis", feature = "test-util"))]
mod real {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use criterion::{Criterion, Throughput};
    use raceguard::lock::{LockConfig, LockManager, LockName, LockOptions};
    use raceguard::redis::{RedisBackend, RedisConfig};
    use raceguard::testing::RedisServer;

    const TASKS: u64 = 64;
    const TTL: Duration = Duration::from_secs(30);
    const ROUNDS: usize = 7;

    fn rounds() -> usize {
        std::env::var("RACEGUARD_LOCK_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(ROUNDS)
    }

    const UNLOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

    /// The alternative `set_incr_script`: the fenced acquire as a script
    /// without the clock floor.
    const SET_INCR: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return -1
"#;

    /// The fenced-acquire designs measured against the shipped ones (with
    /// `RACEGUARD_LOCK_ALTERNATIVES=1`), each written plainly with the
    /// `redis` crate and followed by the same compare-and-delete script.
    #[derive(Clone, Copy)]
    enum Alternative {
        /// `MULTI`, `SET NX PX`, `INCR`, `EXEC` (what `Fencing::Counter`
        /// sent before it became a Function).
        MultiIncr,
        /// `EVALSHA` of `SET NX PX` + `INCR` (no clock floor).
        SetIncrScript,
        /// `MULTI`, `SET NX PX`, `INCR`, `TIME`, `EXEC` (the clock read
        /// without a script; a trailing counter would need a second trip).
        MultiIncrTime,
        /// `MULTI`, `SET NX PX`, `XADD <fence> MAXLEN ~ 1 * f 1`, `EXEC`:
        /// stream ids are `max(last + 1, now)` natively (but ~4.7 KB per
        /// stream key).
        MultiXadd,
        /// `MULTI`, `SET NX PX`, `SET <epoch> 0 NX PX 1`, `INCR <epoch>`,
        /// `PEXPIRETIME <epoch>`, `EXEC`: a 1 ms epoch key whose expiry
        /// time is a server-clock floor.
        MultiEpoch,
        /// `SET NX PX`, then the compare-and-delete as a Redis Function
        /// (`FCALL`) instead of `EVALSHA`.
        FcallPair,
        /// `MultiIncr`, with the `FCALL` release.
        FcallMultiIncr,
        /// `SET NX PX` + `INCR` as a Function, with the `FCALL` release.
        FcallSetIncr,
    }

    /// The Functions library of the `Fcall*` alternatives.
    const FUNCTIONS: &str = r#"#!lua name=rgbench
redis.register_function('rgb_unlock', function(keys, args)
  if redis.call('GET', keys[1]) == args[1] then
    return redis.call('DEL', keys[1])
  end
  return 0
end)
redis.register_function('rgb_set_incr', function(keys, args)
  if redis.call('SET', keys[1], args[1], 'NX', 'PX', args[2]) then
    return redis.call('INCR', keys[2])
  end
  return -1
end)
"#;
    type BoxFut = Pin<Box<dyn Future<Output = ()> + Send>>;
    type Cycle = Arc<dyn Fn(usize) -> BoxFut + Send + Sync>;

    /// Runs `iters` cycles, spread over `tasks` tasks; returns the time.
    async fn run(iters: u64, tasks: u64, f: Cycle) -> Duration {
        let per_task = iters.div_ceil(tasks);
        let start = Instant::now();
        let mut handles = Vec::new();
        for t in 0..tasks {
            let f = f.clone();
            handles.push(tokio::spawn(async move {
                for _ in 0..per_task {
                    f(t as usize).await;
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        start.elapsed()
    }

    fn contenders(
        rt: &tokio::runtime::Runtime,
        server: &RedisServer,
    ) -> Vec<(&'static str, Cycle)> {
        rt.block_on(async {
            let redis = RedisBackend::connect(server.url(), RedisConfig::default())
                .await
                .unwrap();
            let plain =
                LockManager::redis_with(redis.clone(), LockConfig::default().fencing(false))
                    .unwrap();
            let fenced = LockManager::redis_with(redis.clone(), LockConfig::default()).unwrap();
            let counter = LockManager::redis_with(
                redis,
                LockConfig::default().fencing(raceguard::lock::Fencing::Counter),
            )
            .unwrap();
            let rslock = rslock::LockManager::new(vec![server.url().to_owned()]);
            let conn = server
                .client()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let names: Arc<Vec<LockName>> = Arc::new(
                (0..TASKS)
                    .map(|i| LockName::new(format!("bench:{i}")).unwrap())
                    .collect(),
            );
            let raw = |prefix: &str| -> Arc<Vec<String>> {
                Arc::new(
                    (0..TASKS)
                        .map(|i| format!("{prefix}:{{bench:{i}}}"))
                        .collect(),
                )
            };
            let (rs_names, hand_names) = (raw("rslock"), raw("hand"));
            let unlock = Arc::new(redis::Script::new(UNLOCK));
            let serial = Arc::new(AtomicU64::new(0));

            let lock_cycle = |locks: LockManager, names: Arc<Vec<LockName>>| -> Cycle {
                Arc::new(move |t| {
                    let (locks, names) = (locks.clone(), names.clone());
                    Box::pin(async move {
                        let g = locks
                            .try_acquire(&names[t], LockOptions::new(TTL))
                            .await
                            .unwrap();
                        assert!(g.release().await.unwrap());
                    })
                })
            };
            let rslock_cycle: Cycle = Arc::new(move |t| {
                let (rs, names) = (rslock.clone(), rs_names.clone());
                Box::pin(async move {
                    let l = rs.lock(names[t].as_bytes(), TTL).await.unwrap();
                    rs.unlock(&l).await;
                })
            });
            let set_incr = Arc::new(redis::Script::new(SET_INCR));
            let alternative = |alt: Alternative, prefix: &str| -> Cycle {
                let (conn, names, unlock, serial, set_incr) = (
                    conn.clone(),
                    raw(prefix),
                    unlock.clone(),
                    serial.clone(),
                    set_incr.clone(),
                );
                Arc::new(move |t| {
                    let (mut conn, names, unlock, serial, set_incr) = (
                        conn.clone(),
                        names.clone(),
                        unlock.clone(),
                        serial.clone(),
                        set_incr.clone(),
                    );
                    Box::pin(async move {
                        let key = &names[t];
                        let fence = format!("{key}:fence");
                        let token = serial.fetch_add(1, Ordering::Relaxed);
                        let ttl = TTL.as_millis() as u64;
                        if let Alternative::FcallSetIncr = alt {
                            let n: i64 = redis::cmd("FCALL")
                                .arg("rgb_set_incr")
                                .arg(2)
                                .arg(key)
                                .arg(&fence)
                                .arg(token)
                                .arg(ttl)
                                .query_async(&mut conn)
                                .await
                                .unwrap();
                            assert!(n > 0);
                        } else if let Alternative::FcallPair = alt {
                            let ok: Option<String> = redis::cmd("SET")
                                .arg(key)
                                .arg(token)
                                .arg("NX")
                                .arg("PX")
                                .arg(ttl)
                                .query_async(&mut conn)
                                .await
                                .unwrap();
                            assert!(ok.is_some());
                        } else if let Alternative::SetIncrScript = alt {
                            let n: i64 = set_incr
                                .key(key)
                                .key(&fence)
                                .arg(token)
                                .arg(ttl)
                                .invoke_async(&mut conn)
                                .await
                                .unwrap();
                            assert!(n > 0);
                        } else {
                            let mut p = redis::pipe();
                            p.atomic();
                            p.cmd("SET")
                                .arg(key)
                                .arg(token)
                                .arg("NX")
                                .arg("PX")
                                .arg(ttl);
                            match alt {
                                Alternative::MultiIncr | Alternative::FcallMultiIncr => {
                                    p.cmd("INCR").arg(&fence);
                                }
                                Alternative::MultiIncrTime => {
                                    p.cmd("INCR").arg(&fence);
                                    p.cmd("TIME");
                                }
                                Alternative::MultiXadd => {
                                    p.cmd("XADD").arg(&fence).arg("MAXLEN").arg("~").arg(1);
                                    p.arg("*").arg("f").arg(1);
                                }
                                Alternative::MultiEpoch => {
                                    p.cmd("SET").arg(&fence).arg(0).arg("NX").arg("PX").arg(1);
                                    p.cmd("INCR").arg(&fence);
                                    p.cmd("PEXPIRETIME").arg(&fence);
                                }
                                _ => unreachable!(),
                            }
                            let v: Vec<redis::Value> = p.query_async(&mut conn).await.unwrap();
                            assert!(matches!(v[0], redis::Value::Okay), "{v:?}");
                        }
                        let n: i64 = if matches!(
                            alt,
                            Alternative::FcallPair
                                | Alternative::FcallMultiIncr
                                | Alternative::FcallSetIncr
                        ) {
                            redis::cmd("FCALL")
                                .arg("rgb_unlock")
                                .arg(1)
                                .arg(key)
                                .arg(token)
                                .query_async(&mut conn)
                                .await
                                .unwrap()
                        } else {
                            unlock
                                .key(key)
                                .arg(token)
                                .invoke_async(&mut conn)
                                .await
                                .unwrap()
                        };
                        assert_eq!(n, 1);
                    })
                })
            };
            let alternatives: Vec<(&'static str, Cycle)> =
                if std::env::var_os("RACEGUARD_LOCK_ALTERNATIVES").is_some() {
                    let mut c = conn.clone();
                    let _: String = redis::cmd("FUNCTION")
                        .arg("LOAD")
                        .arg("REPLACE")
                        .arg(FUNCTIONS)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    vec![
                        ("alt_multi_incr", alternative(Alternative::MultiIncr, "a0")),
                        ("alt_fcall_pair", alternative(Alternative::FcallPair, "a5")),
                        (
                            "alt_fcall_multi_incr",
                            alternative(Alternative::FcallMultiIncr, "a6"),
                        ),
                        (
                            "alt_fcall_set_incr",
                            alternative(Alternative::FcallSetIncr, "a7"),
                        ),
                        (
                            "alt_set_incr_script",
                            alternative(Alternative::SetIncrScript, "a1"),
                        ),
                        (
                            "alt_multi_incr_time",
                            alternative(Alternative::MultiIncrTime, "a2"),
                        ),
                        ("alt_multi_xadd", alternative(Alternative::MultiXadd, "a3")),
                        (
                            "alt_multi_epoch",
                            alternative(Alternative::MultiEpoch, "a4"),
                        ),
                    ]
                } else {
                    Vec::new()
                };
            let counter_names = names.clone();
            let hand_cycle: Cycle = Arc::new(move |t| {
                let (mut conn, names, unlock, serial) = (
                    conn.clone(),
                    hand_names.clone(),
                    unlock.clone(),
                    serial.clone(),
                );
                Box::pin(async move {
                    let key = &names[t];
                    let token = serial.fetch_add(1, Ordering::Relaxed);
                    let ok: Option<String> = redis::cmd("SET")
                        .arg(key)
                        .arg(token)
                        .arg("NX")
                        .arg("PX")
                        .arg(TTL.as_millis() as u64)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    assert!(ok.is_some());
                    let n: i64 = unlock
                        .key(key)
                        .arg(token)
                        .invoke_async(&mut conn)
                        .await
                        .unwrap();
                    assert_eq!(n, 1);
                })
            });
            let mut all = vec![
                ("raceguard", lock_cycle(plain, names.clone())),
                ("raceguard_fenced", lock_cycle(fenced, names.clone())),
                ("rslock", rslock_cycle),
                ("hand_written", hand_cycle),
                ("raceguard_counter", lock_cycle(counter, counter_names)),
            ];
            all.extend(alternatives);
            // `RACEGUARD_LOCK_ONLY=a,b`: only these contenders (hand_written
            // and rslock always run: the ratios are against them).
            if let Ok(only) = std::env::var("RACEGUARD_LOCK_ONLY") {
                let keep: Vec<&str> = only.split(',').collect();
                all.retain(|(n, _)| *n == "hand_written" || *n == "rslock" || keep.contains(n));
            }
            all
        })
    }

    pub(crate) fn main() {
        let Some(server) = RedisServer::start_or_skip() else {
            eprintln!("lock bench: redis-server not installed, nothing to measure");
            return;
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let all = contenders(&rt, &server);

        // Profiling mode (for `valgrind --tool=callgrind`): only `cycles`
        // cycles of one contender over `tasks` tasks, nothing else. Two runs
        // with different `cycles` give the instructions per cycle by
        // difference, without the setup.
        if let Ok(spec) = std::env::var("RACEGUARD_LOCK_PROFILE") {
            let mut it = spec.split(',');
            let name = it.next().unwrap_or("raceguard");
            let cycles: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(10_000);
            let tasks: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(TASKS);
            let (_, cycle) = all
                .iter()
                .find(|(n, _)| *n == name)
                .expect("RACEGUARD_LOCK_PROFILE=<contender>,<cycles>,<tasks>");
            let _: () = server.query(&["CONFIG", "RESETSTAT"]).unwrap();
            let took = rt.block_on(run(cycles, tasks, cycle.clone()));
            println!("profile {name}: {cycles} cycles over {tasks} tasks in {took:?}");
            let stats: String = server.query(&["INFO", "commandstats"]).unwrap();
            for line in stats.lines().filter(|l| l.starts_with("cmdstat_")) {
                println!("  {line}");
            }
            if std::env::var_os("RACEGUARD_LOCK_PROFILE_SHUTDOWN").is_some() {
                // Lets a `redis-server` run under callgrind exit normally
                // and write its profile (the harness would SIGKILL it).
                let _ = server.query::<()>(&["SHUTDOWN", "NOSAVE"]);
            }
            return;
        }

        // 1. criterion.
        let mut crit = Criterion::default()
            .configure_from_args()
            .sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        for (group, tasks) in [("lock_cycle_1_task", 1u64), ("lock_cycle_64_tasks", TASKS)] {
            let mut g = crit.benchmark_group(group);
            g.throughput(Throughput::Elements(1));
            for (name, cycle) in &all {
                g.bench_function(*name, |b| {
                    b.iter_custom(|iters| rt.block_on(run(iters, tasks, cycle.clone())))
                });
            }
            g.finish();
        }

        // 2. interleaved rounds, with the CPU each cycle costs.
        println!("\ninterleaved rounds ({} rounds; medians):", rounds());
        for (label, tasks, cycles) in [("1 task", 1u64, 3_000u64), ("64 tasks", TASKS, 40_000)] {
            let mut rates: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
            let mut client_cpu: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
            let mut server_cpu: Vec<Vec<f64>> = vec![Vec::new(); all.len()];
            for _ in 0..rounds() {
                for (i, (_, cycle)) in all.iter().enumerate() {
                    let (c0, s0) = (own_cpu(), server_cpu_secs(&server));
                    let took = rt.block_on(run(cycles, tasks, cycle.clone()));
                    let (c1, s1) = (own_cpu(), server_cpu_secs(&server));
                    rates[i].push(cycles as f64 / took.as_secs_f64());
                    client_cpu[i].push((c1 - c0) * 1e6 / cycles as f64);
                    server_cpu[i].push((s1 - s0) * 1e6 / cycles as f64);
                }
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            };
            let rate: Vec<f64> = rates.iter_mut().map(median).collect();
            let ccpu: Vec<f64> = client_cpu.iter_mut().map(median).collect();
            let scpu: Vec<f64> = server_cpu.iter_mut().map(median).collect();
            let at = |name: &str| all.iter().position(|(n, _)| *n == name).unwrap();
            let (hand, rs) = (rate[at("hand_written")], rate[at("rslock")]);
            let hand_cpu = ccpu[at("hand_written")] + scpu[at("hand_written")];
            println!("  {label}:");
            for (i, (name, _)) in all.iter().enumerate() {
                let cpu = ccpu[i] + scpu[i];
                println!(
                    "    {name:<18} {:>8.0}/s  x{:.2} hand-written  x{:.2} rslock   CPU/cycle {:>5.1} µs client + {:>4.1} µs server = {:>5.1} µs (hand-written/this x{:.2})",
                    rate[i],
                    rate[i] / hand,
                    rate[i] / rs,
                    ccpu[i],
                    scpu[i],
                    cpu,
                    hand_cpu / cpu,
                );
            }
        }

        // 3. server CPU per command.
        server_cost(&rt, &server, &all);

        handoff(&rt, &server);
        crit.final_summary();
    }

    /// This process's CPU time (user + system), in seconds.
    fn own_cpu() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name (which may contain spaces).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
        (ticks(11) + ticks(12)) / 100.0
    }

    /// The server process's CPU time (user + system), in seconds.
    fn server_cpu_secs(server: &RedisServer) -> f64 {
        let info: String = server.query(&["INFO", "cpu"]).unwrap();
        info.lines()
            .filter_map(|l| {
                l.strip_prefix("used_cpu_sys:")
                    .or_else(|| l.strip_prefix("used_cpu_user:"))
            })
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum()
    }

    /// The server's CPU time per call of each command one cycle sends.
    fn server_cost(rt: &tokio::runtime::Runtime, server: &RedisServer, all: &[(&str, Cycle)]) {
        println!("\nserver CPU per command (INFO commandstats, 20,000 cycles, 64 tasks):");
        for (name, cycle) in all {
            let _: () = server.query(&["CONFIG", "RESETSTAT"]).unwrap();
            rt.block_on(run(20_000, TASKS, cycle.clone()));
            let stats: String = server.query(&["INFO", "commandstats"]).unwrap();
            let mut parts = Vec::new();
            for line in stats.lines().filter(|l| l.starts_with("cmdstat_")) {
                let cmd = line
                    .trim_start_matches("cmdstat_")
                    .split(':')
                    .next()
                    .unwrap();
                let field = |k: &str| -> f64 {
                    line.split([':', ','])
                        .find_map(|kv| kv.strip_prefix(k))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0.0)
                };
                let (calls, usec) = (field("calls="), field("usec="));
                if cmd == "config" || cmd == "info" || calls < 1000.0 {
                    continue;
                }
                parts.push(format!("{cmd} {:.2} µs/call", usec / calls));
            }
            println!("  {name:<18} {}", parts.join(", "));
        }
    }

    type Release = Box<dyn FnOnce() -> BoxFut + Send>;
    type Acquire =
        Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = Release> + Send>> + Send + Sync>;

    /// p50/p99 of the time from a holder starting its release to the next
    /// holder's acquire returning, 8 tasks on one resource.
    fn handoff(rt: &tokio::runtime::Runtime, server: &RedisServer) {
        const CONTENDERS: usize = 8;
        const HANDOFFS: usize = 1_000;
        println!("\nhand-off latency, {CONTENDERS} tasks on one resource, {HANDOFFS} hand-offs:");
        let raceguard = |managers: Vec<LockManager>| -> Acquire {
            Arc::new(move |i| {
                let locks = managers[i % managers.len()].clone();
                Box::pin(async move {
                    let name = LockName::new("handoff").unwrap();
                    let opts = LockOptions::new(TTL).wait(Duration::from_secs(60));
                    let g = locks.acquire(&name, opts).await.unwrap();
                    Box::new(move || -> BoxFut {
                        Box::pin(async move {
                            assert!(g.release().await.unwrap());
                        })
                    }) as Release
                })
            })
        };
        let cases: Vec<(&str, Acquire)> = rt.block_on(async {
            let url = server.url();
            let connect = || async {
                LockManager::redis(
                    RedisBackend::connect(url, RedisConfig::default())
                        .await
                        .unwrap(),
                )
            };
            let one = connect().await;
            let mut many = Vec::new();
            for _ in 0..CONTENDERS {
                many.push(connect().await);
            }
            let rs = rslock::LockManager::new(vec![url.to_owned()]);
            let rslock: Acquire = Arc::new(move |_| {
                let rs = rs.clone();
                Box::pin(async move {
                    let l = rs.acquire_no_guard(b"handoff-rslock", TTL).await.unwrap();
                    Box::new(move || -> BoxFut { Box::pin(async move { rs.unlock(&l).await }) })
                        as Release
                })
            });
            vec![
                ("raceguard memory", raceguard(vec![LockManager::memory()])),
                (
                    "raceguard redis, 1 manager (local wake-up)",
                    raceguard(vec![one]),
                ),
                (
                    "raceguard redis, 8 managers (8 connections)",
                    raceguard(many),
                ),
                ("rslock (defaults: 3 tries, 0-200 ms apart)", rslock),
            ]
        });
        for (label, acquire) in cases {
            let samples = rt.block_on(handoff_samples(CONTENDERS, HANDOFFS, acquire));
            report(label, samples);
        }
    }

    async fn handoff_samples(
        contenders: usize,
        handoffs: usize,
        acquire: Acquire,
    ) -> Vec<Duration> {
        let released_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let samples = Arc::new(Mutex::new(Vec::with_capacity(handoffs)));
        let remaining = Arc::new(AtomicU64::new(handoffs as u64 + 1));
        let (holder_tx, holder_rx) = tokio::sync::watch::channel(usize::MAX);
        let holder_tx = Arc::new(holder_tx);
        let mut tasks = Vec::new();
        for i in 0..contenders {
            let (acquire, released_at, samples, remaining, holder_tx, mut holder_rx) = (
                acquire.clone(),
                released_at.clone(),
                samples.clone(),
                remaining.clone(),
                holder_tx.clone(),
                holder_rx.clone(),
            );
            tasks.push(tokio::spawn(async move {
                loop {
                    let release = acquire(i).await;
                    let now = Instant::now();
                    // Only the holder touches `remaining`: no race on it.
                    if remaining.load(Ordering::SeqCst) == 0 {
                        holder_tx.send_replace(i);
                        release().await;
                        break;
                    }
                    if let Some(at) = released_at.lock().unwrap().take() {
                        samples.lock().unwrap().push(now - at);
                    }
                    holder_tx.send_replace(i);
                    let left = remaining.fetch_sub(1, Ordering::SeqCst) - 1;
                    *released_at.lock().unwrap() = Some(Instant::now());
                    release().await;
                    if left == 0 {
                        break;
                    }
                    // Sit out until another task got the lock: every sample
                    // is a hand-off to a waiter, not a re-acquire.
                    let _ = holder_rx.wait_for(|h| *h != i).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(samples).unwrap().into_inner().unwrap()
    }

    fn report(label: &str, mut samples: Vec<Duration>) {
        samples.sort_unstable();
        let pick = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
        println!(
            "  {label:<48} p50 {:>10.1?}  p99 {:>10.1?}  ({} samples)",
            pick(0.50),
            pick(0.99),
            samples.len()
        );
    }
}

fn main() {
    #[cfg(all(feature = "redis", feature = "test-util"))]
    real::main();
    #[cfg(not(all(feature = "redis", feature = "test-util")))]
    eprintln!("lock bench: needs --features redis,test-util (or --all-features)");
}
