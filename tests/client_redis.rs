//! Per-request clients over a real Redis: a `ClientFactory` whose shared
//! transport is one `RedisBackend`. Building a client opens no connection,
//! and concurrent requests each act with their own credentials (race R01
//! against a real server).
#![cfg(all(feature = "redis", feature = "test-util"))]

use std::sync::Arc;

use raceguard::client::{self, BearerToken, ClientFactory};
use raceguard::keys::{Key, UserId};
use raceguard::redis::{RedisBackend, RedisConfig};
use raceguard::testing::RedisServer;
use tokio::sync::Barrier;

/// Client connections the server sees, minus the probe itself.
fn client_count(server: &RedisServer) -> usize {
    let list: String = server.query(&["CLIENT", "LIST"]).unwrap();
    list.lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .count()
}

/// Shared and immutable: the transport and the configuration.
struct Shared {
    redis: RedisBackend,
    namespace: &'static str,
}

/// One request's client: the user and their credentials are its own.
struct UserStore {
    redis: RedisBackend,
    key: Key,
    token: BearerToken,
}

impl UserStore {
    /// Writes the user's profile, stamped with the credentials the client
    /// carries, and reads it back.
    async fn save_and_read(&self) -> String {
        let stamp = self.token.expose();
        let () = self
            .redis
            .query(redis::cmd("SET").arg(self.key.as_str()).arg(stamp))
            .await
            .unwrap();
        tokio::task::yield_now().await;
        self.redis
            .query(redis::cmd("GET").arg(self.key.as_str()))
            .await
            .unwrap()
    }
}

fn factory(
    redis: RedisBackend,
) -> impl ClientFactory<Context = (String, String), Client = UserStore> {
    client::from_fn(
        Shared {
            redis,
            namespace: "profile",
        },
        // The context is untrusted request input: a user id and a token.
        |s: &Shared, (user, token): (String, String)| {
            let user = UserId::new(user)?;
            Ok(UserStore {
                redis: s.redis.clone(),
                key: Key::builder(s.namespace)?.owner(&user).build()?,
                token: BearerToken::new(token)?,
            })
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_clients_share_one_connection_and_keep_their_own_credentials() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let redis = RedisBackend::connect(server.url(), RedisConfig::default())
        .await
        .unwrap();
    let before = client_count(&server);
    let factory = Arc::new(factory(redis));

    // Building 10,000 clients opens nothing.
    let built: Vec<UserStore> = (0..10_000)
        .map(|i| {
            factory
                .build((format!("user-{i}"), format!("token-{i}")))
                .unwrap()
        })
        .collect();
    assert_eq!(client_count(&server), before);
    drop(built);

    // 200 concurrent requests: each writes and reads with its own token.
    const USERS: usize = 200;
    let barrier = Arc::new(Barrier::new(USERS));
    let tasks: Vec<_> = (0..USERS)
        .map(|i| {
            let (factory, barrier) = (factory.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let store = factory
                    .build((format!("user-{i}"), format!("token-{i}")))
                    .unwrap();
                store.save_and_read().await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), format!("token-{i}"));
    }
    assert_eq!(client_count(&server), before);
    let stored: String = server.query(&["GET", "profile:{user-7}"]).unwrap();
    assert_eq!(stored, "token-7");
}

#[tokio::test]
async fn bad_request_input_is_a_typed_error() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let redis = RedisBackend::connect(server.url(), RedisConfig::default())
        .await
        .unwrap();
    let factory = factory(redis);
    for (user, token) in [
        ("", "token"),
        ("alice", ""),
        ("alice", "tok en"),
        ("alice", "tok\r\nen"),
    ] {
        let err = factory
            .build((user.to_string(), token.to_string()))
            .err()
            .expect("rejected");
        assert_eq!(
            err.kind(),
            raceguard::ErrorKind::InvalidInput,
            "{user:?} {token:?}"
        );
    }
}
