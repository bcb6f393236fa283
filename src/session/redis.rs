//! The Redis session registry.

use std::fmt;
use std::sync::Arc;

use ::redis::Script;

use crate::clock::Clock;
use crate::keys::{Key, ScopeId, UserId};
use crate::redis::RedisBackend;
use crate::{Error, Result, SessionError};

use super::id::SessionId;
use super::key::SessionKey;
use super::registry::{
    IdSource, MAX_ID_ATTEMPTS, SessionConfig, SessionRegistry, collision_error, owner_digest,
};

const NAMESPACE: &str = "sess";

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A [`SessionRegistry`] on Redis (single node or Cluster), shared by every
/// process.
///
/// Layout: each session is a hash at `sess:{<sha256 of the id>}` holding
/// the owner's digest, the owner's generation, and the created and
/// last-used times; each user who ever called `revoke_all` has a counter at
/// `sess:{<user>}:gen`. A session is alive only while its generation equals
/// its owner's counter, so `revoke_all` is one `INCR`. Every check and
/// change of a record is one Lua script (`session.lua`): `create` inserts
/// only if the id is absent, a check sees and refreshes a record
/// atomically, and every write sets `PEXPIRE` to the time left, so dead
/// sessions vanish by themselves. Each operation is at most two round
/// trips (read the generation, run the script); no script touches two
/// slots, so it works unchanged on a Cluster.
///
/// Time is the server's `TIME` (in ms) unless a [`Clock`] is given with
/// [`with_clock`](Self::with_clock) (tests drive expiry with a
/// [`ManualClock`](crate::ManualClock)); all processes sharing a store must
/// use the same mode.
///
/// ```no_run
/// # async fn demo(redis: raceguard::redis::RedisBackend) -> raceguard::Result<()> {
/// use raceguard::keys::UserId;
/// use raceguard::session::{RedisSessionRegistry, SessionConfig, SessionRegistry};
///
/// let sessions = RedisSessionRegistry::new(redis, SessionConfig::default());
/// let alice = UserId::new("alice")?;
/// let session = sessions.create(&alice).await?;
/// sessions.verify(&alice, session.session_id()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisSessionRegistry {
    backend: RedisBackend,
    script: Arc<Script>,
    idle_ms: u64,
    absolute_ms: u64,
    clock: Option<Arc<dyn Clock>>,
    ids: IdSource,
}

impl fmt::Debug for RedisSessionRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSessionRegistry")
            .field("idle_ms", &self.idle_ms)
            .field("absolute_ms", &self.absolute_ms)
            .field("server_time", &self.clock.is_none())
            .finish_non_exhaustive()
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

enum Status {
    Alive { created: u64 },
    Dead(SessionError),
}

impl RedisSessionRegistry {
    /// A registry on `backend`, timed by the server's clock.
    ///
    /// ```no_run
    /// # fn demo(redis: raceguard::redis::RedisBackend) {
    /// use raceguard::session::{RedisSessionRegistry, SessionConfig};
    /// let sessions = RedisSessionRegistry::new(redis, SessionConfig::default());
    /// # let _ = sessions; }
    /// ```
    pub fn new(backend: RedisBackend, config: SessionConfig) -> Self {
        RedisSessionRegistry {
            backend,
            script: Arc::new(Script::new(include_str!("session.lua"))),
            idle_ms: millis(config.idle()),
            absolute_ms: millis(config.absolute()),
            clock: None,
            ids: IdSource::default(),
        }
    }

    /// Times sessions by `clock` (milliseconds of it) instead of the
    /// server's `TIME`.
    ///
    /// ```no_run
    /// # fn demo(redis: raceguard::redis::RedisBackend) {
    /// use raceguard::ManualClock;
    /// use raceguard::session::{RedisSessionRegistry, SessionConfig};
    /// let sessions = RedisSessionRegistry::new(redis, SessionConfig::default())
    ///     .with_clock(ManualClock::new());
    /// # let _ = sessions; }
    /// ```
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Replaces the id source (tests inject colliding ids).
    #[doc(hidden)]
    pub fn with_id_source(mut self, ids: IdSource) -> Self {
        self.ids = ids;
        self
    }

    fn now_arg(&self) -> String {
        match &self.clock {
            Some(c) => (c.now_nanos() / 1_000_000).to_string(),
            None => String::new(),
        }
    }

    fn record_key(id: &SessionId) -> Result<Key> {
        let scope = ScopeId::new(hex(&id.digest()))?;
        Key::builder(NAMESPACE)?.owner(&scope).build()
    }

    fn generation_key(user: &UserId) -> Result<Key> {
        Key::builder(NAMESPACE)?.owner(user).part("gen").build()
    }

    async fn generation(&self, user: &UserId) -> Result<String> {
        let g: Option<u64> = self
            .backend
            .query(::redis::cmd("GET").arg(Self::generation_key(user)?))
            .await?;
        Ok(g.unwrap_or(0).to_string())
    }

    async fn run_check(
        &self,
        op: &str,
        user: &UserId,
        id: &SessionId,
        generation: &str,
    ) -> Result<Status> {
        let mut inv = self.script.prepare_invoke();
        inv.key(Self::record_key(id)?)
            .arg(op)
            .arg(self.now_arg())
            .arg(hex(&owner_digest(user)))
            .arg(generation)
            .arg(self.idle_ms)
            .arg(self.absolute_ms)
            .arg("");
        let (status, created): (i64, u64) = self.backend.invoke(&inv).await?;
        Ok(match status {
            3 => Status::Alive { created },
            2 => Status::Dead(SessionError::NotOwned),
            1 => Status::Dead(SessionError::Expired),
            0 => Status::Dead(SessionError::Unknown),
            other => {
                return Err(Error::backend(
                    "redis",
                    false,
                    format!("session script returned status {other}"),
                ));
            }
        })
    }

    async fn insert(
        &self,
        user: &UserId,
        generation: &str,
        created: Option<u64>,
    ) -> Result<SessionKey> {
        let owner = hex(&owner_digest(user));
        let created = created.map(|c| c.to_string()).unwrap_or_default();
        for _ in 0..MAX_ID_ATTEMPTS {
            let id = self.ids.next()?;
            let mut inv = self.script.prepare_invoke();
            inv.key(Self::record_key(&id)?)
                .arg("create")
                .arg(self.now_arg())
                .arg(&owner)
                .arg(generation)
                .arg(self.idle_ms)
                .arg(self.absolute_ms)
                .arg(&created);
            let inserted: i64 = self.backend.invoke(&inv).await?;
            if inserted == 1 {
                return Ok(SessionKey::new(user.clone(), id));
            }
        }
        Err(collision_error())
    }
}

impl SessionRegistry for RedisSessionRegistry {
    async fn create(&self, user: &UserId) -> Result<SessionKey> {
        let generation = self.generation(user).await?;
        self.insert(user, &generation, None).await
    }

    async fn verify(&self, user: &UserId, id: &SessionId) -> Result<SessionKey> {
        let generation = self.generation(user).await?;
        match self.run_check("check", user, id, &generation).await? {
            Status::Alive { .. } => Ok(SessionKey::new(user.clone(), *id)),
            Status::Dead(why) => Err(why.into()),
        }
    }

    async fn touch(&self, session: &SessionKey) -> Result<()> {
        self.verify(session.user(), session.session_id())
            .await
            .map(|_| ())
    }

    async fn rotate(&self, session: &SessionKey) -> Result<SessionKey> {
        let user = session.user();
        let generation = self.generation(user).await?;
        match self
            .run_check("take", user, session.session_id(), &generation)
            .await?
        {
            Status::Alive { created } => self.insert(user, &generation, Some(created)).await,
            Status::Dead(why) => Err(why.into()),
        }
    }

    async fn revoke(&self, session: &SessionKey) -> Result<bool> {
        let user = session.user();
        let generation = self.generation(user).await?;
        let status = self
            .run_check("revoke", user, session.session_id(), &generation)
            .await?;
        Ok(matches!(status, Status::Alive { .. }))
    }

    async fn revoke_all(&self, user: &UserId) -> Result<()> {
        let _: u64 = self
            .backend
            .query(::redis::cmd("INCR").arg(Self::generation_key(user)?))
            .await?;
        Ok(())
    }
}
