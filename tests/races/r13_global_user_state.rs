//! R13 (seed 001, issue #3): `global orchestrator`, created once at start-up
//! and shared by every request, "mostly stateless". Once it holds per-user
//! state (the current user's memories, loaded before answering), request A
//! loads Alice's memories, request B loads Bob's into the same singleton, and
//! A's answer is built from Bob's memories: a cross-user leak. With
//! raceguard the global holds only immutable parts (created once through
//! `OnceInit`); a `ClientFactory` builds a request-scoped orchestrator that
//! owns the user's state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use raceguard::client::{self, ClientFactory, FnFactory};
use raceguard::keys::UserId;
use raceguard::once::OnceInit;
use tokio::sync::Barrier;

use crate::support::Sequencer;

/// The memory store (immutable here; thread-safe in any case).
#[derive(Debug)]
struct MemoryStore {
    memories: HashMap<String, Vec<String>>,
}

impl MemoryStore {
    fn new(users: usize) -> Arc<MemoryStore> {
        let memories = (0..users)
            .map(|u| (name(u), vec![format!("secret of {}", name(u))]))
            .collect();
        Arc::new(MemoryStore { memories })
    }

    fn load(&self, user: &str) -> Vec<String> {
        self.memories[user].clone()
    }
}

fn name(u: usize) -> String {
    format!("user-{u}")
}

/// The seed's singleton: shared parts plus per-user state.
#[derive(Debug)]
struct GlobalOrchestrator {
    store: Arc<MemoryStore>,
    current_user: Mutex<Option<String>>,
    memories: Mutex<Vec<String>>,
}

impl GlobalOrchestrator {
    fn load_context(&self, user: &str) {
        *self.current_user.lock().unwrap() = Some(user.to_string());
        *self.memories.lock().unwrap() = self.store.load(user);
    }

    fn answer(&self, message: &str) -> String {
        let memories = self.memories.lock().unwrap();
        format!("{message} / remembering {memories:?}")
    }
}

/// The request-scoped orchestrator: the user's state is its own.
#[derive(Debug)]
struct UserOrchestrator {
    store: Arc<MemoryStore>,
    user: UserId,
    memories: Vec<String>,
}

impl UserOrchestrator {
    fn load_context(&mut self) {
        self.memories = self.store.load(self.user.as_str());
    }

    fn answer(&self, message: &str) -> String {
        format!("{message} / remembering {:?}", self.memories)
    }
}

type Factory = FnFactory<
    Arc<MemoryStore>,
    fn(&Arc<MemoryStore>, UserId) -> raceguard::Result<UserOrchestrator>,
    UserId,
    UserOrchestrator,
>;

fn build_orchestrator(
    store: &Arc<MemoryStore>,
    user: UserId,
) -> raceguard::Result<UserOrchestrator> {
    Ok(UserOrchestrator {
        store: store.clone(),
        user,
        memories: Vec::new(),
    })
}

/// Every answer must mention its own user's secret and no one else's.
fn leaks(user: usize, answer: &str, users: usize) -> bool {
    (0..users)
        .any(|other| other != user && answer.contains(&format!("secret of {}\"", name(other))))
        || !answer.contains(&format!("secret of {}\"", name(user)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_version_fails() {
    const USERS: usize = 100;
    let orchestrator = Arc::new(GlobalOrchestrator {
        store: MemoryStore::new(USERS),
        current_user: Mutex::new(None),
        memories: Mutex::new(Vec::new()),
    });
    // Every request loads its context (steps 0..USERS), then every request
    // answers (steps USERS..2*USERS), as when loading awaits the database.
    let seq = Arc::new(Sequencer::new());
    let tasks: Vec<_> = (0..USERS)
        .rev()
        .map(|u| {
            let (orchestrator, seq) = (orchestrator.clone(), seq.clone());
            tokio::spawn(async move {
                {
                    let _t = seq.turn(u).await;
                    orchestrator.load_context(&name(u));
                }
                let _t = seq.turn(USERS + u).await;
                orchestrator.answer("hello")
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers.reverse(); // spawned in reverse order
    let leaked: Vec<usize> = (0..USERS)
        .filter(|&u| leaks(u, &answers[u], USERS))
        .collect();
    assert_eq!(leaked.len(), USERS - 1, "all but the last user leak");
    // The leak is concrete: user 0 was answered with user 99's secret.
    assert!(answers[0].contains("secret of user-99\""));
    assert_eq!(
        orchestrator.current_user.lock().unwrap().as_deref(),
        Some("user-99")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raceguard_prevents() {
    const USERS: usize = 100;
    // The global: created once, immutable, shared.
    static ORCHESTRATOR: OnceInit<Factory, std::convert::Infallible> = OnceInit::new();
    let factory: &'static Factory = ORCHESTRATOR
        .get_or_try_init(|| async {
            Ok(client::from_fn(
                MemoryStore::new(USERS),
                build_orchestrator as _,
            ))
        })
        .await
        .unwrap();

    // The same schedule: all loads, then all answers.
    let seq = Arc::new(Sequencer::new());
    let tasks: Vec<_> = (0..USERS)
        .rev()
        .map(|u| {
            let seq = seq.clone();
            tokio::spawn(async move {
                let mut orchestrator = factory.build(UserId::new(name(u)).unwrap()).unwrap();
                {
                    let _t = seq.turn(u).await;
                    orchestrator.load_context();
                }
                let _t = seq.turn(USERS + u).await;
                orchestrator.answer("hello")
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers.reverse();
    for (u, answer) in answers.iter().enumerate() {
        assert!(!leaks(u, answer, USERS), "user {u} got {answer}");
    }

    // Real concurrency: 100 users x 10 messages released together.
    let barrier = Arc::new(Barrier::new(USERS));
    let tasks: Vec<_> = (0..USERS)
        .map(|u| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let mut leaked = 0;
                for m in 0..10 {
                    let mut orchestrator = ORCHESTRATOR
                        .get()
                        .unwrap()
                        .build(UserId::new(name(u)).unwrap())
                        .unwrap();
                    orchestrator.load_context();
                    tokio::task::yield_now().await;
                    let answer = orchestrator.answer(&format!("message {m}"));
                    leaked += usize::from(leaks(u, &answer, USERS));
                }
                leaked
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 0);
    }
}
