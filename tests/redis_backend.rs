//! The shared Redis connection layer against real servers: connection
//! bounds, pool exhaustion, outage and recovery, bad input.
#![cfg(all(feature = "redis", feature = "test-util"))]

use std::time::Duration;

use raceguard::redis::{RedisBackend, RedisConfig};
use raceguard::testing::{RedisServer, wait_until};
use raceguard::{Error, ErrorKind};

fn fast() -> RedisConfig {
    RedisConfig::default()
        .connect_timeout(Duration::from_millis(300))
        .response_timeout(Duration::from_millis(300))
        .acquire_timeout(Duration::from_millis(100))
        .dedicated_pool_size(3)
}

/// Client connections the server sees, minus the harness's own probe.
fn client_count(server: &RedisServer) -> usize {
    let list: String = server.query(&["CLIENT", "LIST"]).unwrap();
    list.lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_share_one_connection() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let redis = RedisBackend::connect(server.url(), fast()).await.unwrap();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let (redis, barrier) = (redis.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let n: i64 = redis
                .query(redis::cmd("INCR").arg("hits"))
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            n
        }));
    }
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=1000).collect::<Vec<i64>>(),
        "every INCR ran exactly once"
    );
    assert_eq!(
        client_count(&server),
        1,
        "one shared connection, whatever the load"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dedicated_pool_is_bounded_and_says_so() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let redis = RedisBackend::connect(server.url(), fast()).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(redis.dedicated().await.unwrap());
    }
    assert_eq!(client_count(&server), 4, "shared + 3 dedicated");
    match redis.dedicated().await {
        Err(Error::CapacityExceeded { resource, capacity }) => {
            assert_eq!(resource, "redis dedicated pool");
            assert_eq!(capacity, 3);
        }
        other => panic!("expected pool exhaustion, got {other:?}"),
    }
    // Returning one makes it reusable without opening another connection.
    held.pop();
    let mut again = redis.dedicated().await.unwrap();
    let pong: String = redis::cmd("PING")
        .query_async(again.connection())
        .await
        .unwrap();
    assert_eq!(pong, "PONG");
    assert_eq!(
        client_count(&server),
        4,
        "the returned connection was reused"
    );
    // A discarded connection frees its slot and is not reused.
    again.discard();
    let _fresh = redis.dedicated().await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || client_count(&server) <= 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_fast_and_recovery_needs_no_rebuild() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let redis = RedisBackend::connect(server.url(), fast()).await.unwrap();
    let _: () = redis
        .query(redis::cmd("SET").arg("k").arg("v"))
        .await
        .unwrap();

    server.stop().unwrap();
    for _ in 0..5 {
        let err = redis
            .query::<String>(&redis::cmd("PING"))
            .await
            .unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::Backend | ErrorKind::Timeout),
            "{err}"
        );
        assert!(err.is_retryable(), "an outage is transient: {err}");
    }

    server.restart().unwrap();
    // The same backend reconnects by itself (no rebuild); the first calls
    // after the restart may still see the old connection fail.
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(pong) = redis.query::<String>(&redis::cmd("PING")).await {
            assert_eq!(pong, "PONG");
            ok = true;
            break;
        }
        // The server is already up (restart waits for PING); a failed call
        // only means the old connection was still being replaced.
        tokio::task::yield_now().await;
    }
    assert!(ok, "the backend never recovered after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_times_out_instead_of_hanging() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let redis = RedisBackend::connect(server.url(), fast()).await.unwrap();
    server.pause().unwrap();
    let err = redis
        .query::<String>(&redis::cmd("PING"))
        .await
        .unwrap_err();
    server.resume().unwrap();
    assert!(
        matches!(
            err,
            Error::Timeout {
                op: "redis call",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn bad_input_gives_typed_errors() {
    // Malformed URL.
    let err = RedisBackend::connect("not a url", fast())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidInput {
                what: "redis.url",
                ..
            }
        ),
        "{err:?}"
    );
    // Invalid configuration.
    let err = RedisBackend::connect("redis://127.0.0.1:1/", fast().dedicated_pool_size(0))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidInput {
                what: "redis.dedicated_pool_size",
                ..
            }
        ),
        "{err:?}"
    );
    let err = RedisBackend::connect(
        "redis://127.0.0.1:1/",
        fast().response_timeout(Duration::ZERO),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_non_redis_ports_fail_cleanly() {
    let Some(server) = RedisServer::builder().password("s3cret").start_or_skip() else {
        return;
    };
    let wrong = format!("redis://:nope@127.0.0.1:{}/", server.port());
    let err = RedisBackend::connect(&wrong, fast()).await.unwrap_err();
    assert!(
        !err.is_retryable(),
        "a wrong password does not fix itself: {err}"
    );
    assert_eq!(err.kind(), ErrorKind::Backend, "{err}");

    // A port where something accepts and never answers: a timeout, not a hang.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://127.0.0.1:{}/", silent.local_addr().unwrap().port());
    let err = RedisBackend::connect(&url, fast()).await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Timeout | ErrorKind::Backend),
        "{err}"
    );

    // A port where nothing listens.
    drop(silent);
    let err = RedisBackend::connect(&url, fast()).await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Backend | ErrorKind::Timeout),
        "{err}"
    );
}
