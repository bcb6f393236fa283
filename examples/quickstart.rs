//! A short tour of raceguard on in-memory backends.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Each section shows one primitive and the race it removes (see
//! `docs/RACES.md`). Nothing here needs a server.

use std::time::Duration;

use raceguard::clock::{Clock, ManualClock};
use raceguard::keys::{Key, UserId};

fn main() -> Result<(), raceguard::Error> {
    keys()?;
    clocks();
    once_and_single_flight()?;
    rate_limiting()?;
    locks()?;
    sessions()?;
    versioned_cache()?;
    clients_and_queue()?;
    println!("\nquickstart: all sections ran");
    Ok(())
}

/// Keys: user-supplied ids can never form a pattern or reach another user's keys.
fn keys() -> Result<(), raceguard::Error> {
    println!("== keys: ids from requests are escaped, owners pin the cluster slot");
    let alice = UserId::new("alice")?;
    let mallory = UserId::new("*}:{alice")?; // an attempt to forge a pattern and a hash tag

    let a = Key::builder("chat")?
        .owner(&alice)
        .part("history")
        .part(50u32)
        .build()?;
    let m = Key::builder("chat")?
        .owner(&mallory)
        .part("history")
        .part(50u32)
        .build()?;
    println!("  alice   -> {a}  (slot {})", a.slot());
    println!("  mallory -> {m}  (slot {})", m.slot());
    assert_ne!(a, m);

    // Every key decodes back to exactly what built it.
    let decoded = Key::decode(m.as_str())?;
    assert_eq!(decoded.owner.as_deref(), Some("*}:{alice"));
    println!(
        "  decoded mallory's owner back: {:?}",
        decoded.owner.unwrap()
    );

    // Bad input is a typed error, never a panic or a corrupted key.
    match UserId::new("") {
        Err(e) => println!("  rejected an empty user id: {e}"),
        Ok(_) => unreachable!("empty ids are invalid"),
    }
    Ok(())
}

/// Clocks: primitives take a clock, so tests move time by hand instead of sleeping.
fn clocks() {
    println!("== clocks: ManualClock for tests, SystemClock in production");
    let clock = ManualClock::new();
    clock.advance(Duration::from_millis(1500));
    println!("  manual clock after advance(1.5s): {:?}", clock.now());
}

/// One-shot work: a global client created once (R11, R12) and one external
/// login per burst of webhooks (R09), with errors shared instead of stampeded.
fn once_and_single_flight() -> Result<(), raceguard::Error> {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use raceguard::once::{OnceInit, SingleFlight};

    println!("== OnceInit and SingleFlight: shared work runs once for concurrent callers");
    static CLIENT: OnceInit<String, std::io::Error> = OnceInit::new();
    let logins: SingleFlight<&str, String, std::io::Error> = SingleFlight::new();
    let (connects, login_calls) = (AtomicUsize::new(0), AtomicUsize::new(0));

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        // Three requests race for the lazy global client: one connects.
        let connect = || async {
            connects.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok("db-client#1".to_string())
        };
        let (a, b, c) = tokio::join!(
            CLIENT.get_or_try_init(connect),
            CLIENT.get_or_try_init(connect),
            CLIENT.get_or_try_init(connect),
        );
        let (a, b, c) = (a?, b?, c?);
        let n = connects.load(Ordering::SeqCst);
        println!("  3 requests, {n} connect: {a}");
        assert!(std::ptr::eq(a, b) && std::ptr::eq(b, c));

        // Three webhooks need the same external session: one login.
        let login = || async {
            login_calls.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok("session-cookie".to_string())
        };
        let (x, y, z) = tokio::join!(
            logins.run("mam", login),
            logins.run("mam", login),
            logins.run("mam", login),
        );
        let (x, y, z) = (x?, y?, z?);
        let n = login_calls.load(Ordering::SeqCst);
        println!("  3 webhooks, {n} login: {x}");
        assert!(x == y && y == z);

        // A failing initializer: its waiters share one error; the cell stays empty.
        let cell: OnceInit<u32, std::io::Error> = OnceInit::new();
        let err = cell
            .get_or_try_init(|| async { Err(std::io::Error::other("database down")) })
            .await
            .unwrap_err();
        let empty = cell.get().is_none();
        println!("  failed init, cell still empty ({empty}): {err}");
        Ok::<(), raceguard::Error>(())
    })
}

/// Rate limiting: one shared limiter instead of a dict per worker (R07) or a
/// `last_api_call` per coordinator (R08).
fn rate_limiting() -> Result<(), raceguard::Error> {
    use raceguard::rate::{KeyedRateLimiter, MultiLimit, Quota, RateLimiter, TokioClock};

    println!("== rate limiting: one shared limiter, per-user quotas, all-or-nothing multi-limits");
    let clock = ManualClock::new();
    // Per user: 30 per minute (premium: 300), at most 100,000 users tracked.
    let per_user = KeyedRateLimiter::<UserId, _>::builder(Quota::per_minute(30)?)
        .clock(clock.clone())
        .max_keys(100_000)
        .quota_resolver(|user: &UserId| {
            let n = if user.as_str().starts_with("premium-") {
                300
            } else {
                30
            };
            Quota::per_minute(n).expect("a valid quota")
        })
        .build()?;
    let alice = UserId::new("alice")?;
    let admitted = (0..40)
        .filter(|_| matches!(per_user.check(&alice), Ok(d) if d.allowed()))
        .count();
    let d = per_user.check(&alice)?;
    println!(
        "  alice: {admitted} of 40 admitted; next: limit {}, remaining {}, retry after {:?}",
        d.limit(),
        d.remaining(),
        d.retry_after()
    );

    // A request must pass the user's, the route's and the global limit, or
    // consume none of them.
    let per_route = KeyedRateLimiter::<&str, _>::builder(Quota::per_second(100)?)
        .clock(clock.clone())
        .build()?;
    let global = RateLimiter::with_clock(Quota::per_second(2)?, clock.clone());
    let bob = UserId::new("bob")?;
    for i in 1..=3 {
        let d = MultiLimit::new()
            .keyed("user", &per_user, &bob)
            .keyed("route", &per_route, &"/chat")
            .direct("global", &global)
            .check()?;
        match d.denied_by() {
            None => println!("  request {i}: allowed, {} left", d.remaining()),
            Some(limit) => println!(
                "  request {i}: denied by {limit}, retry after {:?}; bob's own limit untouched ({} left)",
                d.retry_after(),
                per_user.peek_n(&bob, 0)?.remaining()
            ),
        }
    }

    // Fair waiting: coordinators share one outbound throttle and queue for
    // it in order (Tokio's paused clock: no real waiting here).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let audnex = std::sync::Arc::new(RateLimiter::with_clock(
            Quota::with_interval(Duration::from_millis(500))?,
            TokioClock::new(),
        ));
        let calls: Vec<_> = (0..3)
            .map(|webhook| {
                let audnex = audnex.clone();
                tokio::spawn(async move {
                    audnex.until_ready().await?;
                    Ok::<_, raceguard::Error>((webhook, audnex.clock().now()))
                })
            })
            .collect();
        for call in calls {
            let (webhook, at) = call.await.expect("task")?;
            println!("  webhook {webhook} called the API at {at:?}");
        }
        Ok(())
    })
}

/// Locks: a holder whose lease ran out cannot delete the next holder's lock,
/// and its late write is refused by the fencing token.
fn locks() -> Result<(), raceguard::Error> {
    use raceguard::lock::{Fenced, LockConfig, LockManager, LockName, LockOptions};

    println!("== locks: token-checked release, leases, fencing tokens");
    let clock = ManualClock::new(); // leases measured on a clock we move by hand
    let locks = LockManager::memory_with(LockConfig::default().clock(clock.clone()))?;
    let name = LockName::new("chat:alice")?;
    let history = Fenced::new(Vec::<&str>::new()); // the protected resource
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let opts = LockOptions::new(Duration::from_secs(10));
        let slow = locks.acquire(&name, opts).await?;
        let slow_token = slow.fencing_token().expect("memory locks always fence");
        println!("  request A holds the lock with fencing token {slow_token}");

        clock.advance(Duration::from_secs(11)); // A stalls past its lease
        println!("  A stalled past its lease; still held: {}", slow.is_held());
        let next = locks.try_acquire(&name, opts).await?;
        let next_token = next.fencing_token().expect("memory locks always fence");
        history.write(next_token, |h| h.push("B's message"))?;
        println!("  request B acquired with token {next_token} and wrote");

        match history.write(slow_token, |h| h.push("A's late message")) {
            Err(e) => println!("  A's late write refused: {e}"),
            Ok(()) => unreachable!("an older token never writes after a newer one"),
        }
        // A's release is compare-and-delete: B's lock survives it.
        println!(
            "  A's release found its lock still held: {}",
            slow.release().await?
        );
        println!("  B still holds the lock: {}", next.is_held());
        assert!(next.release().await?);
        Ok::<(), raceguard::Error>(())
    })
}

/// Sessions: a session id is usable only by the user it belongs to.
fn sessions() -> Result<(), raceguard::Error> {
    use raceguard::SessionError;
    use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};

    println!("== sessions: ids bound to their user, CSPRNG ids, only digests stored");
    let sessions = MemorySessionRegistry::new(SessionConfig::default());
    let (alice, bob) = (UserId::new("alice")?, UserId::new("bob")?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let session = sessions.create(&alice).await?;
        println!("  alice logged in: {:?}", session.session_id());

        // Bob got hold of Alice's session id (a shared link, a log line).
        match sessions.verify(&bob, session.session_id()).await {
            Err(raceguard::Error::Session(SessionError::NotOwned)) => {
                println!("  bob presenting alice's id: rejected (not owned)")
            }
            other => panic!("bob must not get alice's session: {other:?}"),
        }
        let key = sessions.verify(&alice, session.session_id()).await?;
        println!("  alice's own check passes: state key {}", key.key()?);
        Ok(())
    })
}

/// Versioned cache namespaces (R03, R14): a user's message invalidates that
/// user's cached history in one O(1) version bump; another user's entries
/// stay cached, and a burst of misses loads once.
fn versioned_cache() -> Result<(), raceguard::Error> {
    use raceguard::cache::VersionedCache;

    println!("== VersionedCache: per-user invalidation leaves other users' entries alone");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let cache: VersionedCache<Vec<String>> = VersionedCache::new(10_000);
        let (alice, bob) = (UserId::new("alice")?, UserId::new("bob")?);
        let ttl = Duration::from_secs(300);
        let history = |who: &'static str, n: usize| async move {
            Ok::<_, std::io::Error>(vec![format!("{who}: message {n}")])
        };
        cache
            .get_or_load(&alice, "history:50:0", ttl, || history("alice", 1))
            .await?;
        cache
            .get_or_load(&bob, "history:50:0", ttl, || history("bob", 1))
            .await?;

        // Alice sends a message: one version bump for her scope only.
        let version = cache.invalidate(&alice);
        let a = cache
            .get_or_load(&alice, "history:50:0", ttl, || history("alice", 2))
            .await?;
        let b = cache
            .get_or_load(&bob, "history:50:0", ttl, || history("bob", 2))
            .await?;
        assert_eq!(a, ["alice: message 2"]); // reloaded under the new version
        assert_eq!(b, ["bob: message 1"]); // still cached
        let stats = cache.stats();
        println!(
            "alice invalidated (version {version}); bob's entry survived: {} hits, {} loads",
            stats.hits, stats.loads
        );
        Ok(())
    })
}

/// Per-request clients (R01, R13) and a bounded work queue (R10): each
/// request's client owns its user's credentials over one shared transport;
/// webhooks go into a bounded queue that answers "full" at once, whose
/// workers obey the external API's rate limit.
fn clients_and_queue() -> Result<(), raceguard::Error> {
    use std::sync::Arc;

    use raceguard::client::{self, BearerToken, ClientFactory};
    use raceguard::queue::{Shutdown, WorkQueue};
    use raceguard::rate::{Quota, RateLimiter, TokioClock};

    println!(
        "== ClientFactory + WorkQueue: per-request credentials, bounded queue, limited workers"
    );
    struct Transport; // one connection pool for everyone
    struct UserClient {
        user: UserId,
        token: BearerToken,
        _transport: Arc<Transport>,
    }
    let factory = client::from_fn(
        Arc::new(Transport),
        |transport: &Arc<Transport>, (user, token): (UserId, BearerToken)| {
            Ok(UserClient {
                user,
                token,
                _transport: transport.clone(),
            })
        },
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true) // virtual time: the tour does not wait for real seconds
        .build()
        .expect("a runtime");
    rt.block_on(async {
        // The external API allows 5 calls per second; the workers share one limiter.
        let queue = WorkQueue::builder()
            .capacity(8)
            .workers(2)
            .rate_limit(RateLimiter::with_clock(
                Quota::per_second(5)?,
                TokioClock::new(),
            ))
            .build(|c: UserClient| async move {
                format!(
                    "called the API as {} ({} byte token)",
                    c.user,
                    c.token.expose().len()
                )
            })?;

        let mut handles = Vec::new();
        let mut shed = 0;
        for n in 0..12 {
            let user = UserId::new(format!("user{n}"))?;
            let token = BearerToken::new(format!("token-{n}"))?;
            match queue.submit(factory.build((user, token))?) {
                Ok(handle) => handles.push(handle),
                // In a handler: 503 with Retry-After (middleware::LoadShedLayer).
                Err(raceguard::Error::CapacityExceeded { .. }) => shed += 1,
                Err(e) => return Err(e),
            }
        }
        println!(
            "  12 webhooks: {} queued, {shed} shed at once (queue full)",
            handles.len()
        );
        let first = handles.remove(0).await?;
        println!("  first job: {first}");
        for h in handles {
            h.await?;
        }
        let report = queue
            .shutdown(Shutdown::Drain(Duration::from_secs(5)))
            .await;
        println!(
            "  shutdown: {} accepted, {} completed, {} handed back",
            report.accepted,
            report.completed,
            report.handed_back.len()
        );
        Ok(())
    })
}
