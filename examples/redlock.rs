//! Redlock over independent Redis servers given on the command line.
//!
//! ```text
//! cargo run --example redlock --features redis -- \
//!     redis://127.0.0.1:7001/ redis://127.0.0.1:7002/ redis://127.0.0.1:7003/
//! ```
//!
//! Acquires `example:report` with a watchdog and a fencing token, does some
//! "work" while watching the lost-lease signal, then releases. Stop a minority
//! of the servers and run it again: it still works. Stop a majority: the
//! acquire fails with a quorum error within its deadline, and no lock key is
//! left behind on the servers that answered.
//!
//! Nodes connect lazily, so a server that is down at start does not stop
//! the example.

use std::time::Duration;

use raceguard::lock::{LockConfig, LockManager, LockName, LockOptions, redlock_nodes};
use raceguard::redis::RedisConfig;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let urls: Vec<String> = std::env::args().skip(1).collect();
    if urls.is_empty() {
        eprintln!("usage: redlock <redis-url> [<redis-url> ...]   (an odd number, 3 or 5)");
        std::process::exit(2);
    }
    let redis = RedisConfig::default()
        .connect_timeout(Duration::from_millis(200))
        .response_timeout(Duration::from_millis(200));
    let nodes = redlock_nodes(&urls, redis)?;
    let locks = LockManager::redlock_with(
        nodes,
        LockConfig::default().node_timeout(Duration::from_millis(100)),
    )?;
    println!(
        "redlock over {} nodes (quorum {})",
        urls.len(),
        urls.len() / 2 + 1
    );

    let name = LockName::new("example:report")?;
    let opts = LockOptions::new(Duration::from_secs(3))
        .wait(Duration::from_secs(2))
        .watchdog(Duration::from_secs(30));
    let started = std::time::Instant::now();
    let guard = match locks.acquire(&name, opts).await {
        Ok(g) => g,
        Err(e) => {
            println!(
                "could not acquire after {:?}: {e} (retryable: {})",
                started.elapsed(),
                e.is_retryable()
            );
            return Ok(());
        }
    };
    println!(
        "acquired in {:?}: fencing token {:?}, valid for {:?}",
        started.elapsed(),
        guard.fencing_token().map(|t| t.get()),
        guard.remaining()
    );

    // The work: five steps of 1 s each, longer than the 3 s TTL; the
    // watchdog renews the lease meanwhile. If the lease is lost, stop.
    let lost = guard.lost();
    tokio::pin!(lost);
    for step in 1..=5 {
        tokio::select! {
            why = &mut lost => {
                println!("lease lost ({why}); stopping the work at step {step}");
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                println!("  step {step} done; still held: {}, valid for {:?}", guard.is_held(), guard.remaining());
            }
        }
    }
    let held = guard.release().await?;
    println!("released (still held until then: {held})");
    Ok(())
}
