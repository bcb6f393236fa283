//! The in-memory session registry.

use std::collections::HashMap;
use std::fmt;

use subtle::ConstantTimeEq as _;

use crate::clock::{Clock, SystemClock};
use crate::keys::UserId;
use crate::sync::{Mutex, StdArc as Arc};
use crate::{Result, SessionError};

use super::id::SessionId;
use super::key::SessionKey;
use super::registry::{
    IdSource, MAX_ID_ATTEMPTS, SessionConfig, SessionRegistry, collision_error, owner_digest,
};

/// The first sweep of dead records happens at this many stored records.
const FIRST_SWEEP: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Record {
    owner: [u8; 32],
    generation: u64,
    created: u64,
    last_used: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Keyed by the SHA-256 of the session id.
    records: HashMap<[u8; 32], Record>,
    /// Per-owner generation; absent means 0.
    generations: HashMap<[u8; 32], u64>,
    sweep_at: usize,
}

enum Check {
    Alive,
    Dead(SessionError),
}

impl State {
    fn generation(&self, owner: &[u8; 32]) -> u64 {
        self.generations.get(owner).copied().unwrap_or(0)
    }

    /// Liveness of `rec` at `now`, ignoring who asks.
    fn liveness(&self, rec: &Record, now: u64, idle: u64, absolute: u64) -> Check {
        if rec.generation != self.generation(&rec.owner) {
            Check::Dead(SessionError::Unknown)
        } else if now >= rec.created.saturating_add(absolute)
            || now >= rec.last_used.saturating_add(idle)
        {
            Check::Dead(SessionError::Expired)
        } else {
            Check::Alive
        }
    }

    /// The full check of `digest` presented by `owner`; removes dead records.
    fn check(
        &mut self,
        digest: &[u8; 32],
        owner: &[u8; 32],
        now: u64,
        idle: u64,
        absolute: u64,
    ) -> Result<Record, SessionError> {
        let Some(rec) = self.records.get(digest).copied() else {
            return Err(SessionError::Unknown);
        };
        if let Check::Dead(why) = self.liveness(&rec, now, idle, absolute) {
            self.records.remove(digest);
            return Err(why);
        }
        if !bool::from(rec.owner.ct_eq(owner)) {
            return Err(SessionError::NotOwned);
        }
        Ok(rec)
    }

    /// Removes every dead record and unused generation once the map has
    /// doubled since the last sweep: amortised O(1) per insert.
    fn maybe_sweep(&mut self, now: u64, idle: u64, absolute: u64) {
        if self.records.len() < self.sweep_at.max(FIRST_SWEEP) {
            return;
        }
        let dead: Vec<[u8; 32]> = self
            .records
            .iter()
            .filter(|(_, r)| matches!(self.liveness(r, now, idle, absolute), Check::Dead(_)))
            .map(|(d, _)| *d)
            .collect();
        for d in dead {
            self.records.remove(&d);
        }
        let owners: std::collections::HashSet<[u8; 32]> =
            self.records.values().map(|r| r.owner).collect();
        self.generations.retain(|owner, _| owners.contains(owner));
        self.sweep_at = self.records.len().saturating_mul(2);
    }

    fn insert_fresh(&mut self, ids: &IdSource, rec: Record) -> Result<SessionId> {
        for _ in 0..MAX_ID_ATTEMPTS {
            let id = ids.next()?;
            let digest = id.digest();
            if let std::collections::hash_map::Entry::Vacant(slot) = self.records.entry(digest) {
                slot.insert(rec);
                return Ok(id);
            }
        }
        Err(collision_error())
    }
}

struct Inner<C> {
    state: Mutex<State>,
    clock: C,
    idle: u64,
    absolute: u64,
    ids: IdSource,
}

/// A [`SessionRegistry`] in this process's memory.
///
/// One mutex guards the store; every operation is a few hash-map steps
/// under it (no I/O, no user code), so each is atomic. Dead sessions are
/// removed when they are next presented and by an amortised sweep on
/// `create`, so the store stays proportional to the live sessions.
/// Cloning shares the store.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use raceguard::ManualClock;
/// use raceguard::keys::UserId;
/// use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
/// use raceguard::{Error, SessionError};
///
/// let clock = ManualClock::new();
/// let config = SessionConfig::new(Duration::from_secs(60), Duration::from_secs(3600))?;
/// let sessions = MemorySessionRegistry::with_clock(config, clock.clone());
/// let alice = UserId::new("alice")?;
/// let s = sessions.create(&alice).await?;
/// clock.advance(Duration::from_secs(61));
/// let err = sessions.verify(&alice, s.session_id()).await.unwrap_err();
/// assert!(matches!(err, Error::Session(SessionError::Expired)));
/// # Ok::<(), raceguard::Error>(())
/// # }).unwrap();
/// ```
pub struct MemorySessionRegistry<C = SystemClock> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for MemorySessionRegistry<C> {
    fn clone(&self) -> Self {
        MemorySessionRegistry {
            inner: self.inner.clone(),
        }
    }
}

impl<C> fmt::Debug for MemorySessionRegistry<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySessionRegistry")
            .field("idle_nanos", &self.inner.idle)
            .field("absolute_nanos", &self.inner.absolute)
            .finish_non_exhaustive()
    }
}

impl MemorySessionRegistry<SystemClock> {
    /// A registry on the system's monotonic clock.
    ///
    /// ```
    /// use raceguard::session::{MemorySessionRegistry, SessionConfig};
    /// let sessions = MemorySessionRegistry::new(SessionConfig::default());
    /// assert_eq!(sessions.stored_sessions(), 0);
    /// ```
    pub fn new(config: SessionConfig) -> Self {
        Self::with_clock(config, SystemClock::new())
    }
}

impl<C: Clock> MemorySessionRegistry<C> {
    /// A registry on `clock` (a [`ManualClock`](crate::ManualClock) in
    /// tests).
    ///
    /// ```
    /// use raceguard::ManualClock;
    /// use raceguard::session::{MemorySessionRegistry, SessionConfig};
    /// let sessions = MemorySessionRegistry::with_clock(SessionConfig::default(), ManualClock::new());
    /// # let _ = sessions;
    /// ```
    pub fn with_clock(config: SessionConfig, clock: C) -> Self {
        MemorySessionRegistry {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                clock,
                idle: saturating_nanos(config.idle()),
                absolute: saturating_nanos(config.absolute()),
                ids: IdSource::default(),
            }),
        }
    }

    /// Replaces the id source (tests inject colliding ids). Only before the
    /// registry is cloned or used.
    ///
    /// # Panics
    ///
    /// If the registry has already been cloned.
    #[doc(hidden)]
    pub fn with_id_source(self, ids: IdSource) -> Self {
        let Ok(mut inner) = Arc::try_unwrap(self.inner) else {
            panic!("with_id_source on a registry that is already shared");
        };
        inner.ids = ids;
        MemorySessionRegistry {
            inner: Arc::new(inner),
        }
    }

    /// How many session records are stored, live or not yet swept.
    ///
    /// ```
    /// use raceguard::session::{MemorySessionRegistry, SessionConfig};
    /// assert_eq!(MemorySessionRegistry::new(SessionConfig::default()).stored_sessions(), 0);
    /// ```
    pub fn stored_sessions(&self) -> usize {
        self.inner.state.lock().records.len()
    }

    fn create_now(&self, user: &UserId) -> Result<SessionKey> {
        let inner = &*self.inner;
        let owner = owner_digest(user);
        let now = inner.clock.now_nanos();
        let mut state = inner.state.lock();
        state.maybe_sweep(now, inner.idle, inner.absolute);
        let rec = Record {
            owner,
            generation: state.generation(&owner),
            created: now,
            last_used: now,
        };
        let id = state.insert_fresh(&inner.ids, rec)?;
        Ok(SessionKey::new(user.clone(), id))
    }

    fn verify_now(&self, user: &UserId, id: &SessionId) -> Result<SessionKey> {
        let inner = &*self.inner;
        let owner = owner_digest(user);
        let digest = id.digest();
        let now = inner.clock.now_nanos();
        let mut state = inner.state.lock();
        state.check(&digest, &owner, now, inner.idle, inner.absolute)?;
        if let Some(rec) = state.records.get_mut(&digest) {
            rec.last_used = rec.last_used.max(now);
        }
        Ok(SessionKey::new(user.clone(), *id))
    }

    fn rotate_now(&self, session: &SessionKey) -> Result<SessionKey> {
        let inner = &*self.inner;
        let owner = owner_digest(session.user());
        let digest = session.session_id().digest();
        let now = inner.clock.now_nanos();
        let mut state = inner.state.lock();
        let old = state.check(&digest, &owner, now, inner.idle, inner.absolute)?;
        state.records.remove(&digest);
        let rec = Record {
            last_used: now,
            ..old
        };
        let id = state.insert_fresh(&inner.ids, rec)?;
        Ok(SessionKey::new(session.user().clone(), id))
    }

    fn revoke_now(&self, session: &SessionKey) -> bool {
        let inner = &*self.inner;
        let owner = owner_digest(session.user());
        let digest = session.session_id().digest();
        let now = inner.clock.now_nanos();
        let mut state = inner.state.lock();
        match state.check(&digest, &owner, now, inner.idle, inner.absolute) {
            Ok(_) => {
                state.records.remove(&digest);
                true
            }
            Err(_) => false,
        }
    }

    fn revoke_all_now(&self, user: &UserId) {
        let owner = owner_digest(user);
        let mut state = self.inner.state.lock();
        let g = state.generations.entry(owner).or_insert(0);
        *g = g.wrapping_add(1);
    }
}

fn saturating_nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl<C: Clock> SessionRegistry for MemorySessionRegistry<C> {
    async fn create(&self, user: &UserId) -> Result<SessionKey> {
        self.create_now(user)
    }

    async fn verify(&self, user: &UserId, id: &SessionId) -> Result<SessionKey> {
        self.verify_now(user, id)
    }

    async fn touch(&self, session: &SessionKey) -> Result<()> {
        self.verify_now(session.user(), session.session_id())
            .map(|_| ())
    }

    async fn rotate(&self, session: &SessionKey) -> Result<SessionKey> {
        self.rotate_now(session)
    }

    async fn revoke(&self, session: &SessionKey) -> Result<bool> {
        Ok(self.revoke_now(session))
    }

    async fn revoke_all(&self, user: &UserId) -> Result<()> {
        self.revoke_all_now(user);
        Ok(())
    }
}
