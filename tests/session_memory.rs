//! The session registry contract on the memory backend, plus its sweep.

#[path = "session_contract/mod.rs"]
mod contract;

use std::sync::Arc;
use std::time::Duration;

use contract::*;
use raceguard::ManualClock;
use raceguard::session::{MemorySessionRegistry, SessionId, SessionRegistry};

fn registry() -> (MemorySessionRegistry<ManualClock>, ManualClock) {
    let clock = ManualClock::new();
    (
        MemorySessionRegistry::with_clock(config(), clock.clone()),
        clock,
    )
}

#[tokio::test]
async fn another_users_id_is_not_owned() {
    not_owned(&registry().0).await;
}

#[tokio::test]
async fn rotated_ids_are_dead() {
    rotate_kills_old_id(&registry().0).await;
}

#[tokio::test]
async fn revoked_ids_are_dead() {
    revoke_kills_id(&registry().0).await;
}

#[tokio::test]
async fn revoke_all_kills_one_users_sessions_only() {
    revoke_all_is_per_user(&registry().0).await;
}

#[tokio::test]
async fn idle_and_absolute_timeouts() {
    let (r, clock) = registry();
    idle_and_absolute_expiry(&r, &clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_colliding_creates_hand_the_id_to_one_user() {
    for _ in 0..20 {
        let id = SessionId::generate().unwrap();
        let r = MemorySessionRegistry::with_clock(config(), ManualClock::new())
            .with_id_source(forced(id));
        colliding_creates(Arc::new(r), id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_get_distinct_ids() {
    concurrent_creates_are_distinct(Arc::new(registry().0)).await;
}

#[tokio::test]
async fn dead_sessions_are_swept() {
    let (r, clock) = registry();
    let a = user("alice");
    for _ in 0..1_500 {
        r.create(&a).await.unwrap();
    }
    r.revoke_all(&a).await.unwrap();
    clock.advance(Duration::from_secs(1));
    for i in 0..1_000 {
        r.create(&user(&format!("u{i}"))).await.unwrap();
    }
    assert!(
        r.stored_sessions() < 2_000,
        "revoked sessions were swept: {} stored",
        r.stored_sessions()
    );
}
