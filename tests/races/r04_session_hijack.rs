//! R04 (seed 001 #4): a route trusts whatever session id the client sends.
//! Session ids are guessable or leak (logs, shared links, a client
//! default), so user B sends user A's id and is served A's data. raceguard:
//! ids are 128 CSPRNG bits, and a session is only usable through
//! `verify(user, id)`, which answers `NotOwned` when the authenticated user
//! is not the session's owner.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use raceguard::keys::UserId;
use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionId, SessionRegistry};
use raceguard::{Error, SessionError};

use crate::support::Sequencer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_version_fails() {
    // Session id -> user, with sequential ids; data looked up by id only.
    let sessions: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let data: HashMap<&str, &str> = [("A", "A's chat history"), ("B", "B's chat history")].into();
    let next = Arc::new(Mutex::new(0u64));
    let seq = Arc::new(Sequencer::new());

    let login = |user: &'static str, step: usize| {
        let (sessions, next, seq) = (sessions.clone(), next.clone(), seq.clone());
        tokio::spawn(async move {
            let _t = seq.turn(step).await;
            let mut n = next.lock().unwrap();
            *n += 1;
            let id = format!("session-{n}");
            sessions.lock().unwrap().insert(id.clone(), user.to_owned());
            id
        })
    };
    let a_id = login("A", 0).await.unwrap();
    let b_id = login("B", 1).await.unwrap();
    assert_eq!(b_id, "session-2");

    // Step 2: B (authenticated as B) presents A's id, guessed from its own.
    let _t = seq.turn(2).await;
    let guessed = "session-1".to_owned();
    assert_eq!(guessed, a_id);
    let owner = sessions.lock().unwrap().get(&guessed).cloned().unwrap();
    let served = data[owner.as_str()];
    assert_eq!(served, "A's chat history", "B was served A's data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raceguard_prevents() {
    let registry = MemorySessionRegistry::new(SessionConfig::default());
    let (a, b) = (UserId::new("A").unwrap(), UserId::new("B").unwrap());
    let seq = Arc::new(Sequencer::new());

    let login = |user: UserId, step: usize| {
        let (registry, seq) = (registry.clone(), seq.clone());
        tokio::spawn(async move {
            let _t = seq.turn(step).await;
            registry.create(&user).await.unwrap()
        })
    };
    let sa = login(a.clone(), 0).await.unwrap();
    let sb = login(b.clone(), 1).await.unwrap();

    let _t = seq.turn(2).await;
    // B holds A's id (leaked, not guessed: 128 random bits cannot be).
    let err = registry.verify(&b, sa.session_id()).await.unwrap_err();
    assert!(matches!(err, Error::Session(SessionError::NotOwned)));
    // Neighbouring ids say nothing about each other.
    assert_ne!(
        sa.session_id().as_bytes()[..8],
        sb.session_id().as_bytes()[..8]
    );
    // A and B still reach their own sessions.
    registry.verify(&a, sa.session_id()).await.unwrap();
    registry.verify(&b, sb.session_id()).await.unwrap();
    drop(_t);

    // Real concurrency: 50 users, each also trying every other user's id.
    let mut keys = Vec::new();
    for i in 0..50 {
        let u = UserId::new(format!("user-{i}")).unwrap();
        keys.push(registry.create(&u).await.unwrap());
    }
    let keys = Arc::new(keys);
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let (registry, keys) = (registry.clone(), keys.clone());
            tokio::spawn(async move {
                let me = keys[i].user().clone();
                let mut hijacks = 0;
                for (j, other) in keys.iter().enumerate() {
                    match registry.verify(&me, other.session_id()).await {
                        Ok(_) => assert_eq!(i, j),
                        Err(Error::Session(SessionError::NotOwned)) => hijacks += 1,
                        Err(e) => panic!("{e}"),
                    }
                }
                // A made-up id is unknown, not someone's.
                let guess = SessionId::generate().unwrap();
                assert!(matches!(
                    registry.verify(&me, &guess).await,
                    Err(Error::Session(SessionError::Unknown))
                ));
                hijacks
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 49, "every hijack attempt rejected");
    }
}

#[cfg(all(feature = "redis", feature = "test-util"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raceguard_prevents_on_redis() {
    use raceguard::redis::{RedisBackend, RedisConfig};
    use raceguard::session::RedisSessionRegistry;
    use raceguard::testing::RedisServer;

    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let backend = RedisBackend::connect(server.url(), RedisConfig::default())
        .await
        .unwrap();
    let registry = RedisSessionRegistry::new(backend, SessionConfig::default());
    let (a, b) = (UserId::new("A").unwrap(), UserId::new("B").unwrap());
    let sa = registry.create(&a).await.unwrap();
    let err = registry.verify(&b, sa.session_id()).await.unwrap_err();
    assert!(matches!(err, Error::Session(SessionError::NotOwned)));
    registry.verify(&a, sa.session_id()).await.unwrap();
}
