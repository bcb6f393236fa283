//! The session registry contract on real Redis servers: a single node and a
//! 3-master Cluster.
#![cfg(all(feature = "redis", feature = "test-util"))]

#[path = "session_contract/mod.rs"]
mod contract;

use std::sync::Arc;
use std::time::Duration;

use contract::*;
use raceguard::ManualClock;
use raceguard::redis::{RedisBackend, RedisConfig};
use raceguard::session::{RedisSessionRegistry, SessionId, SessionRegistry};
use raceguard::testing::{RedisCluster, RedisServer};

fn redis_config() -> RedisConfig {
    RedisConfig::default()
        .connect_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(2))
}

async fn registry(server: &RedisServer) -> (RedisSessionRegistry, ManualClock) {
    let backend = RedisBackend::connect(server.url(), redis_config())
        .await
        .unwrap();
    let clock = ManualClock::new();
    (
        RedisSessionRegistry::new(backend, config()).with_clock(clock.clone()),
        clock,
    )
}

macro_rules! on_redis {
    ($name:ident, $body:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(server) = RedisServer::start_or_skip() else {
                return;
            };
            let (r, clock) = registry(&server).await;
            #[allow(clippy::redundant_closure_call)]
            ($body)(r, clock).await;
            drop(server);
        }
    };
}

on_redis!(
    another_users_id_is_not_owned,
    |r: RedisSessionRegistry, _c| async move { not_owned(&r).await }
);
on_redis!(
    rotated_ids_are_dead,
    |r: RedisSessionRegistry, _c| async move { rotate_kills_old_id(&r).await }
);
on_redis!(
    revoked_ids_are_dead,
    |r: RedisSessionRegistry, _c| async move { revoke_kills_id(&r).await }
);
on_redis!(
    revoke_all_kills_one_users_sessions_only,
    |r: RedisSessionRegistry, _c| async move { revoke_all_is_per_user(&r).await }
);
on_redis!(
    idle_and_absolute_timeouts,
    |r: RedisSessionRegistry, c: ManualClock| async move { idle_and_absolute_expiry(&r, &c).await }
);
on_redis!(
    concurrent_creates_get_distinct_ids,
    |r: RedisSessionRegistry, _c| async move { concurrent_creates_are_distinct(Arc::new(r)).await }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_colliding_creates_hand_the_id_to_one_user() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    for _ in 0..5 {
        let id = SessionId::generate().unwrap();
        let (r, _clock) = registry(&server).await;
        colliding_creates(Arc::new(r.with_id_source(forced(id))), id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_holds_no_session_ids_and_sessions_expire_by_themselves() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let backend = RedisBackend::connect(server.url(), redis_config())
        .await
        .unwrap();
    // Server time: the record's TTL is the idle timeout.
    let r = RedisSessionRegistry::new(backend, config());
    let a = user("alice");
    let s = r.create(&a).await.unwrap();
    r.verify(&a, s.session_id()).await.unwrap();
    let keys: Vec<String> = server.query(&["KEYS", "*"]).unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let id_text = s.session_id().expose();
    assert!(!keys[0].contains(&id_text));
    let dump: Vec<String> = server.query(&["HGETALL", &keys[0]]).unwrap();
    assert!(
        dump.iter()
            .all(|v| !v.contains(&id_text) && !v.contains("alice"))
    );
    let ttl: i64 = server.query(&["PTTL", &keys[0]]).unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "record expires on its own: {ttl}");
    // B presenting A's id on server time, too.
    assert_session_err(
        r.verify(&user("bob"), s.session_id()).await,
        raceguard::SessionError::NotOwned,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_contract() {
    let Some(cluster) = RedisCluster::start_or_skip() else {
        return;
    };
    let backend = RedisBackend::connect_cluster(&cluster.urls(), redis_config())
        .await
        .unwrap();
    let clock = ManualClock::new();
    let r = RedisSessionRegistry::new(backend.clone(), config()).with_clock(clock.clone());
    not_owned(&r).await;
    rotate_kills_old_id(&r).await;
    revoke_kills_id(&r).await;
    revoke_all_is_per_user(&r).await;
    idle_and_absolute_expiry(&r, &clock).await;
    concurrent_creates_are_distinct(Arc::new(r.clone())).await;
    let id = SessionId::generate().unwrap();
    colliding_creates(
        Arc::new(RedisSessionRegistry::new(backend, config()).with_id_source(forced(id))),
        id,
    )
    .await;
}
