//! R01 (seed 000): one Supabase client shared by every webhook request.
//! Signing in stores the session inside the client, so when request A signs
//! in, then request B signs in, A's next call runs with B's credentials and
//! the server answers 403 "User not allowed". A `ClientFactory` builds one
//! client per request over the shared transport: each request's session
//! lives in its own value.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use raceguard::client::{self, BearerToken, ClientFactory};
use raceguard::keys::UserId;
use tokio::sync::Barrier;

use crate::support::Sequencer;

const USERS: usize = 50;

/// The auth server and database behind the client (Supabase in the seed).
#[derive(Debug, Default)]
struct Server {
    /// Issued tokens and the user each belongs to.
    tokens: Mutex<HashMap<String, UserId>>,
    issued: AtomicUsize,
    /// Connections opened to the server (a pool would open them once).
    connections: AtomicUsize,
    /// Profiles created, by user.
    profiles: Mutex<Vec<UserId>>,
}

/// What the server answers a request made with someone else's token.
#[derive(Debug, PartialEq)]
struct Forbidden {
    /// The user the request was for.
    user: UserId,
    /// The user whose credentials the request carried.
    credentials_of: UserId,
}

/// The shared, thread-safe transport: one connection (pool) for everyone.
#[derive(Debug)]
struct Transport {
    server: Arc<Server>,
}

impl Transport {
    fn connect(server: &Arc<Server>) -> Arc<Transport> {
        server.connections.fetch_add(1, Ordering::SeqCst);
        Arc::new(Transport {
            server: server.clone(),
        })
    }

    fn sign_in(&self, user: &UserId) -> BearerToken {
        let n = self.server.issued.fetch_add(1, Ordering::SeqCst);
        let token = BearerToken::new(format!("token-{n}")).unwrap();
        self.server
            .tokens
            .lock()
            .unwrap()
            .insert(token.expose().to_string(), user.clone());
        token
    }

    /// `auth.admin.create_user` + profile insert: allowed only with the
    /// user's own token.
    fn create_profile(&self, token: &BearerToken, user: &UserId) -> Result<(), Forbidden> {
        let owner = self.server.tokens.lock().unwrap()[token.expose()].clone();
        if owner != *user {
            return Err(Forbidden {
                user: user.clone(),
                credentials_of: owner,
            });
        }
        self.server.profiles.lock().unwrap().push(user.clone());
        Ok(())
    }
}

/// The seed's client: the transport plus mutable auth state, shared.
#[derive(Debug)]
struct SharedSupabase {
    transport: Arc<Transport>,
    session: Mutex<Option<BearerToken>>,
}

impl SharedSupabase {
    fn sign_in(&self, user: &UserId) {
        let token = self.transport.sign_in(user);
        *self.session.lock().unwrap() = Some(token);
    }

    fn create_profile(&self, user: &UserId) -> Result<(), Forbidden> {
        let token = self.session.lock().unwrap().clone().unwrap();
        self.transport.create_profile(&token, user)
    }
}

/// One request's client: its session is its own (`&mut self`, not shared).
#[derive(Debug)]
struct UserClient {
    transport: Arc<Transport>,
    user: UserId,
    session: Option<BearerToken>,
}

impl UserClient {
    fn sign_in(&mut self) {
        self.session = Some(self.transport.sign_in(&self.user));
    }

    fn create_profile(&self) -> Result<(), Forbidden> {
        self.transport
            .create_profile(self.session.as_ref().unwrap(), &self.user)
    }
}

fn user(i: usize) -> UserId {
    UserId::new(format!("user-{i}")).unwrap()
}

/// The factory: shared immutable parts (the transport), per-request state in
/// the client it builds.
fn factory(transport: Arc<Transport>) -> impl ClientFactory<Context = UserId, Client = UserClient> {
    client::from_fn(transport, |t: &Arc<Transport>, user: UserId| {
        Ok(UserClient {
            transport: t.clone(),
            user,
            session: None,
        })
    })
}

/// The schedule: every registration signs in (steps `0..USERS`), then every
/// registration creates its profile (steps `USERS..2*USERS`), the way 50
/// concurrent webhooks interleave when signing in awaits the network.
fn sign_in_step(i: usize) -> usize {
    i
}

fn create_step(i: usize) -> usize {
    USERS + i
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_version_fails() {
    let server = Arc::new(Server::default());
    let shared = Arc::new(SharedSupabase {
        transport: Transport::connect(&server),
        session: Mutex::new(None),
    });
    let seq = Arc::new(Sequencer::new());
    let tasks: Vec<_> = (0..USERS)
        .rev()
        .map(|i| {
            let (shared, seq) = (shared.clone(), seq.clone());
            tokio::spawn(async move {
                let me = user(i);
                {
                    let _t = seq.turn(sign_in_step(i)).await;
                    shared.sign_in(&me);
                }
                let _t = seq.turn(create_step(i)).await;
                shared.create_profile(&me)
            })
        })
        .collect();
    let mut forbidden = Vec::new();
    for t in tasks {
        if let Err(f) = t.await.unwrap() {
            forbidden.push(f);
        }
    }
    // Every registration but the last to sign in ran with the last one's
    // credentials: 403 "User not allowed".
    assert_eq!(forbidden.len(), USERS - 1);
    let last = user(USERS - 1);
    assert!(
        forbidden
            .iter()
            .all(|f| f.credentials_of == last && f.user != last)
    );
    assert_eq!(*server.profiles.lock().unwrap(), vec![last]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raceguard_prevents() {
    let server = Arc::new(Server::default());
    let factory = Arc::new(factory(Transport::connect(&server)));

    // The same schedule: all sign-ins, then all profile creations.
    let seq = Arc::new(Sequencer::new());
    let tasks: Vec<_> = (0..USERS)
        .rev()
        .map(|i| {
            let (factory, seq) = (factory.clone(), seq.clone());
            tokio::spawn(async move {
                let mut client = factory.build(user(i)).unwrap();
                {
                    let _t = seq.turn(sign_in_step(i)).await;
                    client.sign_in();
                }
                let _t = seq.turn(create_step(i)).await;
                client.create_profile()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), Ok(()));
    }
    let mut created = server.profiles.lock().unwrap().clone();
    created.sort_by_key(|u| u.as_str().to_string());
    let mut expected: Vec<_> = (0..USERS).map(user).collect();
    expected.sort_by_key(|u| u.as_str().to_string());
    assert_eq!(created, expected);

    // Real concurrency: 50 registrations released together, each building
    // its client at the start of its request.
    server.profiles.lock().unwrap().clear();
    let barrier = Arc::new(Barrier::new(USERS));
    let tasks: Vec<_> = (0..USERS)
        .map(|i| {
            let (factory, barrier) = (factory.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let mut client = factory.build(user(i)).unwrap();
                client.sign_in();
                tokio::task::yield_now().await;
                client.create_profile()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), Ok(()));
    }
    assert_eq!(server.profiles.lock().unwrap().len(), USERS);

    // 100 clients built, one connection: building a client opens none.
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}
