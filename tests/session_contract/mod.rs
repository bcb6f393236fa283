//! The registry contract, run against every backend (memory, Redis, Redis
//! Cluster) by `session_memory.rs` and `session_redis.rs`.

#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use raceguard::ManualClock;
use raceguard::keys::UserId;
use raceguard::session::{IdSource, SessionConfig, SessionId, SessionKey, SessionRegistry};
use raceguard::{Error, SessionError};

pub(crate) fn user(name: &str) -> UserId {
    UserId::new(name).unwrap()
}

pub(crate) fn config() -> SessionConfig {
    SessionConfig::new(Duration::from_secs(60), Duration::from_secs(300)).unwrap()
}

#[track_caller]
pub(crate) fn assert_session_err<T: std::fmt::Debug>(r: Result<T, Error>, want: SessionError) {
    match r {
        Err(Error::Session(got)) => assert_eq!(got, want),
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

/// An id source that always returns `id`.
pub(crate) fn forced(id: SessionId) -> IdSource {
    IdSource::new(move || Ok(id))
}

/// User B presenting user A's id is `NotOwned`; an id nobody created is
/// `Unknown`; A's own check passes; B's attempt does not disturb A.
pub(crate) async fn not_owned<R: SessionRegistry>(r: &R) {
    let (a, b) = (user("alice"), user("bob"));
    let sa = r.create(&a).await.unwrap();
    assert_eq!(sa.user(), &a);
    assert_session_err(r.verify(&b, sa.session_id()).await, SessionError::NotOwned);
    // A user id that escapes to look like A's is still another user.
    assert_session_err(
        r.verify(&user("alice "), sa.session_id()).await,
        SessionError::NotOwned,
    );
    let checked = r.verify(&a, sa.session_id()).await.unwrap();
    assert_eq!(checked, sa);
    let nobody = SessionId::generate().unwrap();
    assert_session_err(r.verify(&a, &nobody).await, SessionError::Unknown);
    assert_session_err(r.verify(&b, &nobody).await, SessionError::Unknown);
}

/// Rotated ids are dead, the new id is alive; of two rotations of one id
/// only one succeeds.
pub(crate) async fn rotate_kills_old_id<R: SessionRegistry>(r: &R) {
    let a = user("alice");
    let s0 = r.create(&a).await.unwrap();
    let s1 = r.rotate(&s0).await.unwrap();
    assert_ne!(s0.session_id(), s1.session_id());
    assert_session_err(r.verify(&a, s0.session_id()).await, SessionError::Unknown);
    r.verify(&a, s1.session_id()).await.unwrap();
    // Rotating the dead id again fails; the live one is untouched.
    assert_session_err(r.rotate(&s0).await, SessionError::Unknown);
    r.verify(&a, s1.session_id()).await.unwrap();

    let (x, y) = tokio::join!(r.rotate(&s1), r.rotate(&s1));
    let winners: Vec<SessionKey> = [x, y].into_iter().filter_map(Result::ok).collect();
    assert_eq!(winners.len(), 1, "one rotation of an id wins");
    r.verify(&a, winners[0].session_id()).await.unwrap();
    assert_session_err(r.verify(&a, s1.session_id()).await, SessionError::Unknown);
}

/// Revoked ids are dead; revoke reports whether the session was alive.
pub(crate) async fn revoke_kills_id<R: SessionRegistry>(r: &R) {
    let (a, b) = (user("alice"), user("bob"));
    let s = r.create(&a).await.unwrap();
    let other = r.create(&a).await.unwrap();
    let bs = r.create(&b).await.unwrap();
    assert!(r.revoke(&s).await.unwrap());
    assert!(!r.revoke(&s).await.unwrap());
    assert_session_err(r.verify(&a, s.session_id()).await, SessionError::Unknown);
    assert_session_err(r.touch(&s).await, SessionError::Unknown);
    r.verify(&a, other.session_id()).await.unwrap();
    r.verify(&b, bs.session_id()).await.unwrap();
}

/// `revoke_all(a)` kills every session of `a` and none of `b`'s; `a` can log
/// in again afterwards.
pub(crate) async fn revoke_all_is_per_user<R: SessionRegistry>(r: &R) {
    let (a, b) = (user("alice"), user("bob"));
    let mut a_sessions = Vec::new();
    let mut b_sessions = Vec::new();
    for _ in 0..5 {
        a_sessions.push(r.create(&a).await.unwrap());
        b_sessions.push(r.create(&b).await.unwrap());
    }
    r.revoke_all(&a).await.unwrap();
    for s in &a_sessions {
        assert_session_err(r.verify(&a, s.session_id()).await, SessionError::Unknown);
        assert_session_err(r.rotate(s).await, SessionError::Unknown);
    }
    for s in &b_sessions {
        r.verify(&b, s.session_id()).await.unwrap();
    }
    let fresh = r.create(&a).await.unwrap();
    r.verify(&a, fresh.session_id()).await.unwrap();
    r.revoke_all(&a).await.unwrap();
    assert_session_err(
        r.verify(&a, fresh.session_id()).await,
        SessionError::Unknown,
    );
    for s in &b_sessions {
        r.verify(&b, s.session_id()).await.unwrap();
    }
}

/// Idle timeout (60 s) and absolute timeout (300 s) on a manual clock.
pub(crate) async fn idle_and_absolute_expiry<R: SessionRegistry>(r: &R, clock: &ManualClock) {
    let a = user("alice");
    // Idle: used at 59 s is fine (and restarts the timer), silent for 60 s is not.
    let s = r.create(&a).await.unwrap();
    clock.advance(Duration::from_secs(59));
    r.verify(&a, s.session_id()).await.unwrap();
    clock.advance(Duration::from_secs(59));
    r.touch(&s).await.unwrap();
    clock.advance(Duration::from_secs(60));
    assert_session_err(r.verify(&a, s.session_id()).await, SessionError::Expired);
    // Gone after reporting expiry.
    assert_session_err(r.verify(&a, s.session_id()).await, SessionError::Unknown);
    // Revoking an expired session reports it was not alive.
    let s2 = r.create(&a).await.unwrap();
    clock.advance(Duration::from_secs(60));
    assert!(!r.revoke(&s2).await.unwrap());

    // Absolute: kept busy, it still dies 300 s after creation, rotation
    // included.
    let mut s = r.create(&a).await.unwrap();
    for _ in 0..5 {
        clock.advance(Duration::from_secs(50));
        r.verify(&a, s.session_id()).await.unwrap();
        s = r.rotate(&s).await.unwrap();
    }
    clock.advance(Duration::from_secs(49));
    r.verify(&a, s.session_id()).await.unwrap();
    clock.advance(Duration::from_secs(1));
    assert_session_err(r.verify(&a, s.session_id()).await, SessionError::Expired);
}

/// 64 concurrent creates, all handed the same forced id: exactly one user
/// gets it; every other create fails and nobody else can use the id.
pub(crate) async fn colliding_creates<R: SessionRegistry + 'static>(r: Arc<R>, id: SessionId) {
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let (r, barrier) = (r.clone(), barrier.clone());
            tokio::spawn(async move {
                let u = user(&format!("user-{i}"));
                barrier.wait().await;
                r.create(&u).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(key) => winners.push(key),
            Err(e) => assert_eq!(e.kind(), raceguard::ErrorKind::Backend, "{e}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "the colliding id went to exactly one user"
    );
    let owner = winners[0].user().clone();
    assert_eq!(winners[0].session_id(), &id);
    r.verify(&owner, &id).await.unwrap();
    for i in 0..64 {
        let u = user(&format!("user-{i}"));
        if u != owner {
            assert_session_err(r.verify(&u, &id).await, SessionError::NotOwned);
        }
    }
}

/// Many concurrent creates with real ids: all distinct, all verify.
pub(crate) async fn concurrent_creates_are_distinct<R: SessionRegistry + 'static>(r: Arc<R>) {
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let r = r.clone();
            tokio::spawn(async move {
                let u = user(&format!("u{}", i % 10));
                let s = r.create(&u).await.unwrap();
                r.verify(&u, s.session_id()).await.unwrap();
                *s.session_id()
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for t in tasks {
        assert!(seen.insert(t.await.unwrap()));
    }
}
