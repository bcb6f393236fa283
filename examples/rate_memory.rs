//! Bytes per tracked key: raceguard's `KeyedRateLimiter` against governor's
//! keyed limiter (its default `DashMap` store), for `u64` keys.
//!
//! ```text
//! cargo run --release --example rate_memory            # 1,000,000 keys
//! cargo run --release --example rate_memory -- 1500000 # another count
//! ```
//!
//! Each measurement runs in a fresh child process (this example re-runs
//! itself), which reads its resident memory (`VmRSS` in `/proc/self/status`)
//! before and after inserting the keys, so neither limiter sees the other's
//! freed memory. raceguard's own accounting (`allocated_bytes`) is printed
//! beside it, and so is what remains after every key has expired and been
//! evicted.

use std::process::Command;
use std::time::Duration;

use raceguard::clock::ManualClock;
use raceguard::rate::{KeyedRateLimiter, Quota};

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kb: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in kB");
    kb * 1024
}

fn quota() -> Quota {
    // One cell per hour: every key stays tracked while we measure.
    Quota::per_hour(1).unwrap()
}

fn measure_raceguard(n: u64) {
    let clock = ManualClock::new();
    let before = rss_bytes();
    let limiter = KeyedRateLimiter::<u64, _>::builder(quota())
        .clock(clock.clone())
        .max_keys(n as usize)
        .build()
        .unwrap();
    for key in 0..n {
        assert!(limiter.check(&key).unwrap().allowed());
    }
    let after = rss_bytes();
    let accounted = limiter.allocated_bytes();
    // Every key expires; eviction returns the tables.
    clock.advance(Duration::from_secs(3_600));
    limiter.evict_expired();
    let evicted = rss_bytes();
    println!(
        "raceguard {n} {} {} {} {}",
        after - before,
        accounted,
        limiter.allocated_bytes(),
        evicted.saturating_sub(before)
    );
}

fn measure_governor(n: u64) {
    let clock = governor::clock::FakeRelativeClock::default();
    let q = quota();
    let gq = governor::Quota::with_period(q.interval())
        .unwrap()
        .allow_burst(std::num::NonZeroU32::new(q.burst()).unwrap());
    let before = rss_bytes();
    let limiter = governor::RateLimiter::dashmap_with_clock(gq, clock.clone());
    for key in 0..n {
        assert!(limiter.check_key(&key).is_ok());
    }
    let after = rss_bytes();
    // governor keeps a key until one interval after it is full again.
    clock.advance(Duration::from_secs(2 * 3_600));
    limiter.retain_recent();
    limiter.shrink_to_fit();
    assert_eq!(limiter.len(), 0);
    let evicted = rss_bytes();
    println!(
        "governor {n} {} 0 0 {}",
        after - before,
        evicted.saturating_sub(before)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--child-raceguard") => return measure_raceguard(args[2].parse().unwrap()),
        Some("--child-governor") => return measure_governor(args[2].parse().unwrap()),
        _ => {}
    }
    let n: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let me = std::env::current_exe().unwrap();
    println!("bytes per tracked u64 key, {n} keys (resident memory of a fresh process)");
    println!(
        "{:<10} {:>14} {:>14} {:>22}",
        "limiter", "rss bytes/key", "accounted/key", "after all expired (rss)"
    );
    let mut per_key = Vec::new();
    for which in ["raceguard", "governor"] {
        let out = Command::new(&me)
            .arg(format!("--child-{which}"))
            .arg(n.to_string())
            .output()
            .expect("run the child");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        let rss: f64 = f[2].parse().unwrap();
        let accounted: f64 = f[3].parse().unwrap();
        let left: f64 = f[5].parse().unwrap();
        let accounted = if accounted > 0.0 {
            format!("{:.1}", accounted / n as f64)
        } else {
            "-".to_string()
        };
        println!(
            "{:<10} {:>14.1} {:>14} {:>19.1} MB",
            which,
            rss / n as f64,
            accounted,
            left / 1e6
        );
        per_key.push(rss / n as f64);
    }
    println!("ratio raceguard/governor: {:.2}", per_key[0] / per_key[1]);
}
