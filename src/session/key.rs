//! The ownership-checked session key.

use std::fmt;

use crate::Error;
use crate::keys::{Key, UserId};

use super::id::SessionId;

/// The namespace of [`SessionKey::key`].
///
/// ```
/// assert_eq!(raceguard::session::SESSION_KEY_NAMESPACE, "session");
/// ```
pub const SESSION_KEY_NAMESPACE: &str = "session";

/// A session that was checked to belong to its user: the pair
/// `<user_id>:<session_id>`.
///
/// There is no public constructor: a `SessionKey` comes only from a
/// registry's `create`, `verify`, `touch` or `rotate`, so holding one is
/// proof that the ownership check ran. Key per-session state by it (not by a
/// client-supplied id) and one user's id can never reach another user's
/// state.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use raceguard::keys::UserId;
/// use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
///
/// let sessions = MemorySessionRegistry::new(SessionConfig::default());
/// let alice = UserId::new("alice")?;
/// let created = sessions.create(&alice).await?;
/// let checked = sessions.verify(&alice, created.session_id()).await?;
/// assert_eq!(checked, created);
/// assert_eq!(checked.user(), &alice);
/// assert!(checked.key()?.as_str().starts_with("session:{alice}:"));
/// # Ok::<(), raceguard::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    user: UserId,
    id: SessionId,
}

impl SessionKey {
    pub(crate) fn new(user: UserId, id: SessionId) -> Self {
        SessionKey { user, id }
    }

    /// The user the session belongs to.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// # use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
    /// # let sessions = MemorySessionRegistry::new(SessionConfig::default());
    /// let bob = raceguard::keys::UserId::new("bob")?;
    /// assert_eq!(sessions.create(&bob).await?.user(), &bob);
    /// # Ok::<(), raceguard::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// The session id (for the cookie: [`SessionId::expose`]).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// # use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
    /// # let sessions = MemorySessionRegistry::new(SessionConfig::default());
    /// # let bob = raceguard::keys::UserId::new("bob")?;
    /// let session = sessions.create(&bob).await?;
    /// let cookie = session.session_id().expose();
    /// assert_eq!(cookie.len(), 22);
    /// # Ok::<(), raceguard::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn session_id(&self) -> &SessionId {
        &self.id
    }

    /// The session as a storage [`Key`]:
    /// `session:{<user>}:<digest>`, where the hash tag is the user (all of a
    /// user's sessions share a Redis Cluster slot) and `<digest>` is 32 hex
    /// digits of the SHA-256 of the id (the id itself, a bearer secret,
    /// never appears in a key name).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] only if the encoded key would exceed
    /// [`crate::keys::MAX_KEY_LEN`] (it cannot for valid user ids).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// # use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
    /// # let sessions = MemorySessionRegistry::new(SessionConfig::default());
    /// # let bob = raceguard::keys::UserId::new("bob")?;
    /// let key = sessions.create(&bob).await?.key()?;
    /// assert_eq!(key.as_str().len(), "session:{bob}:".len() + 32);
    /// # Ok::<(), raceguard::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn key(&self) -> Result<Key, Error> {
        let digest = self.id.digest();
        let mut hex = String::with_capacity(32);
        for b in &digest[..16] {
            hex.push_str(&format!("{b:02x}"));
        }
        Key::builder(SESSION_KEY_NAMESPACE)?
            .owner(&self.user)
            .part(hex)
            .build()
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKey")
            .field("user", &self.user)
            .field("id", &self.id)
            .finish()
    }
}
