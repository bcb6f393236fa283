//! Sessions and versioned caches.
//!
//! `cargo bench --bench session_cache`
//!
//! Sessions (`verify_*`):
//!
//! - `verify/memory_registry`: [`MemorySessionRegistry::verify`] of a live
//!   session among 10,000 (SHA-256 of the id and of the user, one map
//!   lookup, a constant-time owner compare, the idle-timer update).
//! - `verify/naive_hashmap`: the seed's naive check, a `HashMap<String,
//!   String>` from client session id to user, for scale.
//! - `verify/signed_token`: [`TokenSigner::verify`] of a stateless token
//!   (base64 decode, HMAC-SHA256, parse).
//!
//! The cache groups live in `session_cache/cache.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use raceguard::keys::UserId;
use raceguard::session::{
    MemorySessionRegistry, SessionConfig, SessionId, SessionRegistry, TokenKey, TokenSigner,
};

#[path = "session_cache/cache.rs"]
mod cache;

/// Polls a future that never waits (the memory backend's) to completion.
fn now<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory backend never waits"),
    }
}

fn bench_verify(c: &mut Criterion) {
    let sessions = MemorySessionRegistry::new(SessionConfig::default());
    let users: Vec<UserId> = (0..10_000)
        .map(|i| UserId::new(format!("user-{i}")).unwrap())
        .collect();
    let keys: Vec<_> = users
        .iter()
        .map(|u| now(sessions.create(u)).unwrap())
        .collect();
    let naive: HashMap<String, String> = keys
        .iter()
        .map(|k| (k.session_id().expose(), k.user().as_str().to_owned()))
        .collect();
    let (user, id) = (users[4_321].clone(), *keys[4_321].session_id());
    let cookie = id.expose();

    let signer = TokenSigner::new(TokenKey::new(1, [7u8; 32]).unwrap());
    let token = signer.sign(&user, &id, u64::MAX).unwrap();

    let mut g = c.benchmark_group("verify");
    g.bench_function("memory_registry", |b| {
        b.iter(|| {
            let id = SessionId::parse(black_box(&cookie)).unwrap();
            now(sessions.verify(black_box(&user), &id)).unwrap()
        })
    });
    g.bench_function("naive_hashmap", |b| {
        b.iter(|| naive.get(black_box(&cookie)).map(|u| u == user.as_str()))
    });
    g.bench_function("signed_token", |b| {
        b.iter(|| signer.verify(black_box(&token), 0).unwrap())
    });
    g.finish();
}

fn bench_cache(c: &mut Criterion) {
    cache::benches(c);
}

criterion_group!(benches, bench_verify, bench_cache);
criterion_main!(benches);
