//! The registry trait, its configuration and shared helpers.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::keys::UserId;
use crate::{Error, Result};

use super::id::SessionId;
use super::key::SessionKey;

/// How many fresh ids `create` and `rotate` try before giving up. With a
/// working CSPRNG a single collision of 128-bit ids never happens; three in
/// a row mean the id source is broken.
pub(crate) const MAX_ID_ATTEMPTS: usize = 3;

/// Idle and absolute timeouts of a registry's sessions.
///
/// A session dies when it has not been used (verified or touched) for
/// `idle`, or when `absolute` has passed since it was created, whichever
/// comes first. Rotation keeps the absolute deadline of the original
/// session.
///
/// ```
/// use std::time::Duration;
/// use raceguard::session::SessionConfig;
///
/// let config = SessionConfig::new(Duration::from_secs(30 * 60), Duration::from_secs(12 * 3600))?;
/// assert_eq!(config.idle(), Duration::from_secs(1800));
/// assert!(SessionConfig::new(Duration::ZERO, Duration::from_secs(1)).is_err());
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    idle: Duration,
    absolute: Duration,
}

impl Default for SessionConfig {
    /// 30 minutes idle, 24 hours absolute.
    fn default() -> Self {
        SessionConfig {
            idle: Duration::from_secs(30 * 60),
            absolute: Duration::from_secs(24 * 3600),
        }
    }
}

impl SessionConfig {
    /// Timeouts: `idle` since the last use, `absolute` since creation.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if either is shorter than a millisecond (the
    /// Redis backend's resolution) or longer than ten years.
    ///
    /// ```
    /// use std::time::Duration;
    /// let c = raceguard::session::SessionConfig::new(Duration::from_secs(60), Duration::from_secs(3600))?;
    /// assert_eq!(c.absolute(), Duration::from_secs(3600));
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn new(idle: Duration, absolute: Duration) -> Result<Self> {
        const MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
        for (what, d) in [("session.idle", idle), ("session.absolute", absolute)] {
            if d < Duration::from_millis(1) || d > MAX {
                return Err(Error::invalid(what, "must be between 1 ms and 10 years"));
            }
        }
        Ok(SessionConfig { idle, absolute })
    }

    /// The idle timeout.
    ///
    /// ```
    /// let c = raceguard::session::SessionConfig::default();
    /// assert_eq!(c.idle().as_secs(), 1800);
    /// ```
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// The absolute timeout.
    ///
    /// ```
    /// let c = raceguard::session::SessionConfig::default();
    /// assert_eq!(c.absolute().as_secs(), 86_400);
    /// ```
    pub fn absolute(&self) -> Duration {
        self.absolute
    }
}

/// Where a registry gets new session ids. The default is
/// [`SessionId::generate`]; tests inject colliding ids to prove that
/// `create` never hands one id to two users.
///
/// ```
/// use raceguard::session::{IdSource, SessionId};
/// let forced = SessionId::from_bytes([1; 16]);
/// let source = IdSource::new(move || Ok(forced));
/// assert_eq!(source.next()?, forced);
/// # Ok::<(), raceguard::Error>(())
/// ```
#[doc(hidden)]
#[derive(Clone)]
pub struct IdSource(Arc<dyn Fn() -> Result<SessionId> + Send + Sync>);

impl IdSource {
    /// An id source calling `f`.
    pub fn new(f: impl Fn() -> Result<SessionId> + Send + Sync + 'static) -> Self {
        IdSource(Arc::new(f))
    }

    /// The next id.
    ///
    /// # Errors
    ///
    /// Whatever the source returns.
    pub fn next(&self) -> Result<SessionId> {
        (self.0)()
    }
}

impl Default for IdSource {
    fn default() -> Self {
        IdSource::new(SessionId::generate)
    }
}

impl fmt::Debug for IdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdSource")
    }
}

pub(crate) fn collision_error() -> Error {
    Error::backend(
        "session id source",
        false,
        "freshly generated session ids collided with live sessions repeatedly",
    )
}

/// SHA-256 of a user id: the owner as a registry stores and compares it.
pub(crate) fn owner_digest(user: &UserId) -> [u8; 32] {
    Sha256::digest(user.as_str().as_bytes()).into()
}

/// A store of server-side sessions bound to their users.
///
/// Every method checks ownership: a session id presented by any user other
/// than its owner is [`SessionError::NotOwned`](crate::SessionError::NotOwned),
/// distinct from `Unknown` (never existed, revoked, rotated away) and
/// `Expired` (idle or absolute timeout passed). A [`SessionKey`] comes only
/// out of these methods.
///
/// Cancellation: every method is one atomic step on the backend (for Redis,
/// at most one script per step); dropping a future either leaves the store
/// as it was or with the step done, never half-done. A `rotate` dropped
/// after its first step has killed the old id without creating the new one:
/// the user logs in again (fail closed).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use raceguard::keys::UserId;
/// use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
/// use raceguard::{Error, SessionError};
///
/// async fn login<R: SessionRegistry>(sessions: &R, user: &UserId) -> raceguard::Result<String> {
///     Ok(sessions.create(user).await?.session_id().expose())
/// }
///
/// let sessions = MemorySessionRegistry::new(SessionConfig::default());
/// let alice = UserId::new("alice")?;
/// let cookie = login(&sessions, &alice).await?;
/// let id = raceguard::session::SessionId::parse(&cookie)?;
/// let key = sessions.verify(&alice, &id).await?;
/// sessions.revoke(&key).await?;
/// let err = sessions.verify(&alice, &id).await.unwrap_err();
/// assert!(matches!(err, Error::Session(SessionError::Unknown)));
/// # Ok::<(), raceguard::Error>(())
/// # }).unwrap();
/// ```
pub trait SessionRegistry: Send + Sync {
    /// Creates a session for `user` under a fresh id. The id is inserted
    /// only if absent, so a colliding id is never handed to two users.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] if the backend fails or the id source keeps
    /// producing ids that are already taken.
    ///
    /// Cancellation: dropping the future either creates nothing or creates
    /// a session nobody learns the id of (it expires on its idle timeout).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// # use raceguard::keys::UserId;
    /// # use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
    /// # let sessions = MemorySessionRegistry::new(SessionConfig::default());
    /// # let alice = UserId::new("alice")?;
    /// let session = sessions.create(&alice).await?;
    /// assert_eq!(session.user(), &alice);
    /// # Ok::<(), raceguard::Error>(())
    /// # }).unwrap();
    /// ```
    fn create(&self, user: &UserId) -> impl Future<Output = Result<SessionKey>> + Send;

    /// Checks that `id` is a live session of `user` and records the use
    /// (restarts the idle timeout).
    ///
    /// # Errors
    ///
    /// [`Error::Session`] with `Unknown`, `Expired` or `NotOwned`;
    /// [`Error::Backend`] if the backend fails.
    ///
    /// Cancellation: safe; at worst the idle timeout was restarted.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// # use raceguard::keys::UserId;
    /// # use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
    /// # let sessions = MemorySessionRegistry::new(SessionConfig::default());
    /// # let alice = UserId::new("alice")?;
    /// let session = sessions.create(&alice).await?;
    /// let bob = UserId::new("bob")?;
    /// assert!(sessions.verify(&bob, session.session_id()).await.is_err());
    /// assert_eq!(sessions.verify(&alice, session.session_id()).await?, session);
    /// # Ok::<(), raceguard::Error>(())
    /// # }).unwrap();
    /// ```
    fn verify(
        &self,
        user: &UserId,
        id: &SessionId,
    ) -> impl Future<Output = Result<SessionKey>> + Send;

    /// Records a use of a verified session (restarts its idle timeout),
    /// checking again that it is alive.
    ///
    /// # Errors
    ///
    /// As [`verify`](Self::verify).
    ///
    /// Cancellation: safe; at worst the idle timeout was restarted.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// # use raceguard::keys::UserId;
    /// # use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
    /// # let sessions = MemorySessionRegistry::new(SessionConfig::default());
    /// # let alice = UserId::new("alice")?;
    /// let session = sessions.create(&alice).await?;
    /// sessions.touch(&session).await?;
    /// # Ok::<(), raceguard::Error>(())
    /// # }).unwrap();
    /// ```
    fn touch(&self, session: &SessionKey) -> impl Future<Output = Result<()>> + Send;

    /// Replaces the session's id with a fresh one (after a login or a
    /// privilege change); the old id is dead when this returns, and of
    /// concurrent rotations of one id at most one succeeds. The new session
    /// keeps the old one's absolute deadline.
    ///
    /// # Errors
    ///
    /// As [`verify`](Self::verify) for the old session.
    ///
    /// Cancellation: see the trait documentation (fails closed).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// # use raceguard::keys::UserId;
    /// # use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
    /// # let sessions = MemorySessionRegistry::new(SessionConfig::default());
    /// # let alice = UserId::new("alice")?;
    /// let old = sessions.create(&alice).await?;
    /// let new = sessions.rotate(&old).await?;
    /// assert!(sessions.verify(&alice, old.session_id()).await.is_err());
    /// sessions.verify(&alice, new.session_id()).await?;
    /// # Ok::<(), raceguard::Error>(())
    /// # }).unwrap();
    /// ```
    fn rotate(&self, session: &SessionKey) -> impl Future<Output = Result<SessionKey>> + Send;

    /// Ends the session. Returns whether it was alive.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] if the backend fails.
    ///
    /// Cancellation: safe; the session is either revoked or not.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// # use raceguard::keys::UserId;
    /// # use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
    /// # let sessions = MemorySessionRegistry::new(SessionConfig::default());
    /// # let alice = UserId::new("alice")?;
    /// let session = sessions.create(&alice).await?;
    /// assert!(sessions.revoke(&session).await?);
    /// assert!(!sessions.revoke(&session).await?);
    /// # Ok::<(), raceguard::Error>(())
    /// # }).unwrap();
    /// ```
    fn revoke(&self, session: &SessionKey) -> impl Future<Output = Result<bool>> + Send;

    /// Ends every session of `user` in O(1) (one counter increment),
    /// touching no other user's sessions.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] if the backend fails.
    ///
    /// Cancellation: safe; the increment either happened or not.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// # use raceguard::keys::UserId;
    /// # use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
    /// # let sessions = MemorySessionRegistry::new(SessionConfig::default());
    /// # let alice = UserId::new("alice")?;
    /// let (a, b) = (sessions.create(&alice).await?, sessions.create(&alice).await?);
    /// sessions.revoke_all(&alice).await?;
    /// assert!(sessions.verify(&alice, a.session_id()).await.is_err());
    /// assert!(sessions.verify(&alice, b.session_id()).await.is_err());
    /// # Ok::<(), raceguard::Error>(())
    /// # }).unwrap();
    /// ```
    fn revoke_all(&self, user: &UserId) -> impl Future<Output = Result<()>> + Send;
}
