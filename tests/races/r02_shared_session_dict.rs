//! R02 (seed 001 #1): a chat route keeps half-finished message pairs in a
//! process-wide dict keyed by the session id the client sent. Two users who
//! send the same id (a client default, a copied link) write into the same
//! entry, and two messages of one session interleave: user A's reply is
//! stored next to user B's message, or next to A's other message.
//! raceguard: state keyed by [`SessionKey`] (only an ownership check makes
//! one, so B cannot present A's id) and processed per session in submission
//! order by [`SessionOrdering`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use raceguard::keys::UserId;
use raceguard::session::{
    MemorySessionRegistry, SessionConfig, SessionKey, SessionOrdering, SessionRegistry,
};
use raceguard::{Error, SessionError};

use crate::support::Sequencer;

/// A half-finished exchange: the user's message, waiting for the AI reply.
#[derive(Debug, Default, Clone)]
struct Pending {
    user_message: String,
}

fn reply_to(message: &str) -> String {
    format!("reply to [{message}]")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn naive_version_fails() {
    // The seed's code: a shared dict keyed by the client's session id.
    let sessions: Arc<Mutex<HashMap<String, Pending>>> = Arc::default();
    let stored: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let seq = Arc::new(Sequencer::new());

    // One request: write the user's message, (await the AI), read it back
    // and store the pair as the user's history.
    let request =
        |who: &'static str, sid: &'static str, msg: &'static str, write: usize, read: usize| {
            let (sessions, stored, seq) = (sessions.clone(), stored.clone(), seq.clone());
            tokio::spawn(async move {
                {
                    let _t = seq.turn(write).await;
                    sessions.lock().unwrap().insert(
                        sid.to_owned(),
                        Pending {
                            user_message: msg.to_owned(),
                        },
                    );
                }
                let _t = seq.turn(read).await;
                let pending = sessions.lock().unwrap()[sid].clone();
                stored
                    .lock()
                    .unwrap()
                    .push((who.to_owned(), pending.user_message, reply_to(msg)));
            })
        };
    // Users A and B both send "session-123"; A's two messages overlap.
    let tasks = vec![
        request("A", "session-123", "A: hello", 0, 2),
        request("B", "session-123", "B: hi", 1, 6),
        request("A", "session-123", "A: first", 3, 5),
        request("A", "session-123", "A: second", 4, 7),
    ];
    for t in tasks {
        t.await.unwrap();
    }
    let stored = stored.lock().unwrap();
    let mixed_users = stored
        .iter()
        .any(|(who, msg, _)| who == "A" && msg.starts_with("B:"));
    assert!(mixed_users, "A's history holds B's message: {stored:?}");
    let mispaired = stored.iter().any(|(_, msg, reply)| reply != &reply_to(msg));
    assert!(
        mispaired,
        "a reply is paired with the wrong message: {stored:?}"
    );
}

type Store = Arc<Mutex<HashMap<SessionKey, Pending>>>;
type History = Arc<Mutex<Vec<(UserId, String, String)>>>;

/// One request through raceguard: ownership check, then the session's turn.
async fn handle(
    registry: &MemorySessionRegistry,
    store: &Store,
    history: &History,
    ticket: raceguard::session::Ticket,
    key: SessionKey,
    msg: String,
    seq: Option<(&Sequencer, usize, usize)>,
) {
    ticket.ready().await;
    registry.touch(&key).await.unwrap();
    {
        let _t = match seq {
            Some((s, w, _)) => Some(s.turn(w).await),
            None => None,
        };
        store.lock().unwrap().insert(
            key.clone(),
            Pending {
                user_message: msg.clone(),
            },
        );
    }
    tokio::task::yield_now().await; // the AI call
    let _t = match seq {
        Some((s, _, r)) => Some(s.turn(r).await),
        None => None,
    };
    let pending = store.lock().unwrap()[&key].clone();
    history
        .lock()
        .unwrap()
        .push((key.user().clone(), pending.user_message, reply_to(&msg)));
    drop(ticket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raceguard_prevents() {
    let registry = MemorySessionRegistry::new(SessionConfig::default());
    let order = SessionOrdering::new(64);
    let store: Store = Arc::default();
    let history: History = Arc::default();
    let (a, b) = (UserId::new("A").unwrap(), UserId::new("B").unwrap());
    let sa = registry.create(&a).await.unwrap();
    let sb = registry.create(&b).await.unwrap();

    // B sends A's session id: no SessionKey, so no access to A's entry.
    let err = registry.verify(&b, sa.session_id()).await.unwrap_err();
    assert!(matches!(err, Error::Session(SessionError::NotOwned)));

    // The naive schedule: B writes between A's write and A's read (steps
    // 0, 1, 2), and A's second message arrives while the first is in
    // flight. Each request verifies its id and takes its place in its
    // session's line on arrival; B's line is another line, so B's write
    // cannot touch A's entry, and A's second message waits for the first
    // to finish (it has no step: the naive step where it overwrote the
    // first cannot happen).
    let seq = Arc::new(Sequencer::new());
    let ka = registry.verify(&a, sa.session_id()).await.unwrap();
    let kb = registry.verify(&b, sb.session_id()).await.unwrap();
    let t_hello = order.enqueue(ka.clone()).unwrap();
    let t_hi = order.enqueue(kb.clone()).unwrap();
    let t_first = order.enqueue(ka.clone()).unwrap();
    let t_second = order.enqueue(ka.clone()).unwrap();
    let jobs = vec![
        (t_hello, ka.clone(), "A: hello", Some((0, 2))),
        (t_hi, kb.clone(), "B: hi", Some((1, 5))),
        (t_first, ka.clone(), "A: first", Some((3, 4))),
        (t_second, ka.clone(), "A: second", None),
    ];
    let mut tasks = Vec::new();
    for (ticket, key, msg, steps) in jobs {
        let (registry, store, history, seq) = (
            registry.clone(),
            store.clone(),
            history.clone(),
            seq.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let seq = steps.map(|(w, r)| (&*seq, w, r));
            handle(
                &registry,
                &store,
                &history,
                ticket,
                key,
                msg.to_owned(),
                seq,
            )
            .await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(seq.completed(), 6);
    check(&history.lock().unwrap(), &[("A", 3), ("B", 1)]);

    // Real concurrency: 100 users x 10 messages, no schedule.
    let history: History = Arc::default();
    let mut tasks = Vec::new();
    let mut keys = Vec::new();
    for u in 0..100 {
        let user = UserId::new(format!("user-{u}")).unwrap();
        keys.push(registry.create(&user).await.unwrap());
    }
    for key in &keys {
        // Messages are enqueued in the order the connection read them.
        for m in 0..10 {
            let ticket = order.enqueue(key.clone()).unwrap();
            let (registry, store, history, key) = (
                registry.clone(),
                store.clone(),
                history.clone(),
                key.clone(),
            );
            let msg = format!("{}: message {m}", key.user());
            tasks.push(tokio::spawn(async move {
                handle(&registry, &store, &history, ticket, key, msg, None).await;
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let history = history.lock().unwrap();
    assert_eq!(history.len(), 1_000);
    check(&history, &[]);
    for key in &keys {
        let mine: Vec<&String> = history
            .iter()
            .filter(|(u, _, _)| u == key.user())
            .map(|(_, m, _)| m)
            .collect();
        let want: Vec<String> = (0..10)
            .map(|m| format!("{}: message {m}", key.user()))
            .collect();
        assert_eq!(mine, want.iter().collect::<Vec<_>>(), "in submission order");
    }
    assert_eq!(order.active_sessions(), 0);
}

/// Every stored pair is the user's own message with its own reply.
fn check(history: &[(UserId, String, String)], counts: &[(&str, usize)]) {
    for (user, msg, reply) in history {
        assert!(msg.starts_with(&format!("{user}:")), "{user} got {msg}");
        assert_eq!(reply, &reply_to(msg), "mispaired");
    }
    for (user, n) in counts {
        assert_eq!(
            history
                .iter()
                .filter(|(u, _, _)| u.as_str() == *user)
                .count(),
            *n
        );
    }
}
