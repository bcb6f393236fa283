//! R05 (seed 001 #5): a connection per request exhausts the server.
//!
//! The seed's backend opened Redis connections per request with no pooling;
//! under 10 concurrent users the server answered "too many clients". Here a
//! server runs with `maxclients 16` and 64 requests are in flight at once
//! (held at a barrier, so all 64 overlap: forced, not hoped for).

#![cfg(all(feature = "redis", feature = "test-util"))]

use std::sync::Arc;
use std::time::Duration;

use raceguard::redis::{RedisBackend, RedisConfig};
use raceguard::testing::RedisServer;
use tokio::sync::Barrier;

const REQUESTS: usize = 64;

fn server() -> Option<RedisServer> {
    RedisServer::builder()
        .config_line("maxclients 16")
        .start_or_skip()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_version_fails() {
    let Some(server) = server() else { return };
    let client = server.client();
    let barrier = Arc::new(Barrier::new(REQUESTS));
    let mut tasks = Vec::new();
    for _ in 0..REQUESTS {
        let (client, barrier) = (client.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            // The naive request handler: its own connection, held for the
            // whole request.
            let conn = client.get_multiplexed_async_connection().await;
            barrier.wait().await; // every request is in flight at once
            let mut conn = conn?;
            redis::cmd("INCR")
                .arg("hits")
                .query_async::<i64>(&mut conn)
                .await
        }));
    }
    let mut failed = 0;
    for t in tasks {
        if t.await.unwrap().is_err() {
            failed += 1;
        }
    }
    // The server itself counts the connections it turned away for exceeding
    // maxclients ("ERR max number of clients reached", then a closed socket).
    let info: String = server.query(&["INFO", "stats"]).unwrap();
    let rejected: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("rejected_connections:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO stats has rejected_connections");
    assert!(
        rejected >= REQUESTS - 16,
        "expected most connections refused, server rejected {rejected}"
    );
    assert_eq!(
        failed, rejected,
        "every rejected connection failed its request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raceguard_prevents() {
    let Some(server) = server() else { return };
    let redis = RedisBackend::connect(
        server.url(),
        RedisConfig::default().response_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let barrier = Arc::new(Barrier::new(REQUESTS));
    let mut tasks = Vec::new();
    for _ in 0..REQUESTS {
        let (redis, barrier) = (redis.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            redis.query::<i64>(redis::cmd("INCR").arg("hits")).await
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("no request is refused");
    }
    let hits: i64 = server.query(&["GET", "hits"]).unwrap();
    assert_eq!(hits, REQUESTS as i64);
    let clients: String = server.query(&["CLIENT", "LIST"]).unwrap();
    assert_eq!(
        clients
            .lines()
            .filter(|l| !l.contains("cmd=client|list"))
            .count(),
        1,
        "one shared connection served all {REQUESTS} requests"
    );
}
