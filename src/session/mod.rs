//! Ownership-checked sessions (races R02 and R04).
//!
//! - [`SessionId`]: 128 bits from the OS CSPRNG, strict base64url parsing.
//! - [`SessionKey`]: a (user, session) pair obtainable only through an
//!   ownership check.
//! - [`SessionRegistry`]: create, verify (unknown / expired / not owned are
//!   distinct errors), touch, rotate, revoke, `revoke_all` in O(1), idle and
//!   absolute timeouts; backends [`MemorySessionRegistry`] and (feature
//!   `redis`) [`RedisSessionRegistry`]. Only SHA-256 digests of ids are stored.
//! - [`TokenSigner`]: stateless HMAC-SHA256 signed tokens with key rotation.
//! - [`SessionOrdering`]: one session's operations in submission order,
//!   different sessions in parallel.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use raceguard::keys::UserId;
//! use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
//! use raceguard::{Error, SessionError};
//!
//! let sessions = MemorySessionRegistry::new(SessionConfig::default());
//! let (alice, bob) = (UserId::new("alice")?, UserId::new("bob")?);
//! let session = sessions.create(&alice).await?;
//!
//! // Bob presents Alice's session id: rejected, and told apart from "unknown".
//! let err = sessions.verify(&bob, session.session_id()).await.unwrap_err();
//! assert!(matches!(err, Error::Session(SessionError::NotOwned)));
//! # Ok::<(), raceguard::Error>(())
//! # }).unwrap();
//! ```

mod id;
mod key;
mod memory;
mod ordering;
#[cfg(feature = "redis")]
mod redis;
mod registry;
mod token;

pub use id::{SESSION_ID_LEN, SessionId};
pub use key::{SESSION_KEY_NAMESPACE, SessionKey};
pub use memory::MemorySessionRegistry;
pub use ordering::{SessionOrdering, Ticket};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::RedisSessionRegistry;
pub use registry::{IdSource, SessionConfig, SessionRegistry};
pub use token::{MIN_SECRET_LEN, SignedSession, TokenKey, TokenSigner};
