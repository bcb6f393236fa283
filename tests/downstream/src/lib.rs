//! User code built on raceguard, model-checked by loom in `tests/`.

use std::time::Duration;

use raceguard::clock::{Clock, ManualClock};

/// A user's lease that expires on a shared clock: `expired()` must turn true
/// once any thread advanced the clock past the deadline, and never before.
#[derive(Debug, Clone)]
pub struct Lease {
    clock: ManualClock,
    deadline_nanos: u64,
}

impl Lease {
    /// A lease valid for `ttl` from the clock's current time.
    pub fn new(clock: ManualClock, ttl: Duration) -> Self {
        let deadline_nanos = clock.now_nanos() + ttl.as_nanos() as u64;
        Lease {
            clock,
            deadline_nanos,
        }
    }

    /// Whether the lease has run out.
    pub fn expired(&self) -> bool {
        self.clock.now_nanos() >= self.deadline_nanos
    }
}

/// A user's web backend built on raceguard's one-shot primitives: one
/// lazily connected database client for all requests (R11), and logins to an
/// external site deduplicated per account (R09).
#[derive(Debug, Default)]
pub struct Backend {
    client: raceguard::OnceInit<DbClient, std::io::Error>,
    sessions: raceguard::SingleFlight<String, String, std::io::Error>,
}

/// The database client (its id tells clients apart).
#[derive(Debug, PartialEq, Eq)]
pub struct DbClient {
    /// Which connection this is.
    pub id: u64,
}

impl Backend {
    /// A backend with no client yet and no login in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// A request handler: gets the shared client (connecting on first use)
    /// and the account's session (one login per concurrent burst).
    pub async fn handle<C, L, LF>(
        &self,
        account: &str,
        connect: C,
        login: L,
    ) -> Result<(u64, String), raceguard::Error>
    where
        C: FnOnce() -> u64,
        L: FnOnce() -> LF,
        LF: std::future::Future<Output = String>,
    {
        let client = self
            .client
            .get_or_try_init(|| async { Ok(DbClient { id: connect() }) })
            .await?;
        let session = self
            .sessions
            .run(account.to_string(), || async { Ok(login().await) })
            .await?;
        Ok((client.id, session))
    }
}
