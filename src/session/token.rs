//! Stateless signed session tokens: HMAC-SHA256 with key rotation.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::keys::UserId;
use crate::{Error, Result, SessionError};

use super::id::SessionId;

type HmacSha256 = Hmac<Sha256>;

const VERSION: u8 = 1;
const DOMAIN: &[u8] = b"raceguard session token v1\0";
const HEADER: usize = 1 + 1 + 8 + 16 + 2;
const MAC_LEN: usize = 32;
/// No token is longer than this many characters (a 256-byte user id).
const MAX_TOKEN_CHARS: usize = (HEADER + 256 + MAC_LEN).div_ceil(3) * 4;

/// The shortest accepted secret, in bytes.
///
/// ```
/// use raceguard::session::{MIN_SECRET_LEN, TokenKey};
/// assert!(TokenKey::new(1, vec![0u8; MIN_SECRET_LEN - 1]).is_err());
/// ```
pub const MIN_SECRET_LEN: usize = 32;

/// One HMAC key and its id (carried in each token, so a verifier knows
/// which key signed it).
///
/// ```
/// use raceguard::session::TokenKey;
/// let key = TokenKey::new(1, [7u8; 32])?;
/// assert_eq!(key.id(), 1);
/// assert!(TokenKey::new(2, b"short").is_err());
/// assert!(!format!("{key:?}").contains("7, 7"));
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone)]
pub struct TokenKey {
    id: u8,
    mac: HmacSha256,
}

impl TokenKey {
    /// A key from a secret of at least [`MIN_SECRET_LEN`] bytes (draw it
    /// from a CSPRNG and keep it in a secret store).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if the secret is shorter than
    /// [`MIN_SECRET_LEN`] bytes.
    ///
    /// ```
    /// let key = raceguard::session::TokenKey::new(3, vec![1u8; 64])?;
    /// # let _ = key;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn new(id: u8, secret: impl AsRef<[u8]>) -> Result<Self> {
        let secret = secret.as_ref();
        if secret.len() < MIN_SECRET_LEN {
            return Err(Error::invalid(
                "token.secret",
                format!("must be at least {MIN_SECRET_LEN} bytes"),
            ));
        }
        let mac = HmacSha256::new_from_slice(secret)
            .map_err(|_| Error::invalid("token.secret", "rejected by HMAC"))?;
        Ok(TokenKey { id, mac })
    }

    /// The key id.
    ///
    /// ```
    /// assert_eq!(raceguard::session::TokenKey::new(9, [0u8; 32])?.id(), 9);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn id(&self) -> u8 {
        self.id
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// What a valid token says.
///
/// ```
/// use raceguard::keys::UserId;
/// use raceguard::session::{SessionId, TokenKey, TokenSigner};
///
/// let signer = TokenSigner::new(TokenKey::new(1, [7u8; 32])?);
/// let alice = UserId::new("alice")?;
/// let id = SessionId::generate()?;
/// let token = signer.sign(&alice, &id, 2_000)?;
/// let claims = signer.verify(&token, 1_000)?;
/// assert_eq!((claims.user(), claims.session_id(), claims.expires_at()), (&alice, &id, 2_000));
/// assert_eq!(claims.key_id(), 1);
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedSession {
    user: UserId,
    session_id: SessionId,
    expires_at: u64,
    key_id: u8,
}

impl SignedSession {
    /// The user the token was issued to.
    ///
    /// ```
    /// # use raceguard::{keys::UserId, session::*};
    /// # let s = TokenSigner::new(TokenKey::new(1, [7u8; 32])?);
    /// # let t = s.sign(&UserId::new("a")?, &SessionId::generate()?, 10)?;
    /// assert_eq!(s.verify(&t, 0)?.user().as_str(), "a");
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// The session id bound into the token.
    ///
    /// ```
    /// # use raceguard::{keys::UserId, session::*};
    /// # let s = TokenSigner::new(TokenKey::new(1, [7u8; 32])?);
    /// let id = SessionId::generate()?;
    /// let t = s.sign(&UserId::new("a")?, &id, 10)?;
    /// assert_eq!(s.verify(&t, 0)?.session_id(), &id);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn session_id(&self) -> &SessionId {
        &self.session_id
    }

    /// The expiry, in seconds since the Unix epoch.
    ///
    /// ```
    /// # use raceguard::{keys::UserId, session::*};
    /// # let s = TokenSigner::new(TokenKey::new(1, [7u8; 32])?);
    /// let t = s.sign(&UserId::new("a")?, &SessionId::generate()?, 10)?;
    /// assert_eq!(s.verify(&t, 0)?.expires_at(), 10);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// The id of the key that signed the token.
    ///
    /// ```
    /// # use raceguard::{keys::UserId, session::*};
    /// # let s = TokenSigner::new(TokenKey::new(4, [7u8; 32])?);
    /// let t = s.sign(&UserId::new("a")?, &SessionId::generate()?, 10)?;
    /// assert_eq!(s.verify(&t, 0)?.key_id(), 4);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn key_id(&self) -> u8 {
        self.key_id
    }
}

/// Signs and verifies stateless session tokens: HMAC-SHA256 over (version,
/// key id, expiry, session id, user), base64url without padding.
///
/// One signing key, any number of verification keys (the signing key is
/// always one of them): to rotate, add the new key for verification
/// everywhere, then sign with it, then drop the old key once the last
/// token it signed has expired. The MAC is checked in constant time before
/// anything else in the token is trusted. Tampered, truncated, re-encoded
/// or foreign tokens, and tokens signed by an unknown key, are
/// [`SessionError::BadToken`]; valid tokens past their expiry are
/// [`SessionError::Expired`].
///
/// A token cannot be revoked before its expiry: keep expiries short, or
/// check the session id it carries against a [`SessionRegistry`](super::SessionRegistry).
///
/// ```
/// use raceguard::keys::UserId;
/// use raceguard::session::{SessionId, TokenKey, TokenSigner};
/// use raceguard::{Error, SessionError};
///
/// let old = TokenSigner::new(TokenKey::new(1, [1u8; 32])?);
/// let token = old.sign(&UserId::new("alice")?, &SessionId::generate()?, 100)?;
///
/// // Rotation: sign with key 2, still accept key 1.
/// let new = TokenSigner::new(TokenKey::new(2, [2u8; 32])?)
///     .with_verification_key(TokenKey::new(1, [1u8; 32])?)?;
/// assert_eq!(new.verify(&token, 50)?.user().as_str(), "alice");
/// assert!(matches!(new.verify(&token, 100), Err(Error::Session(SessionError::Expired))));
///
/// let mut forged = token.clone();
/// forged.pop();
/// assert!(matches!(new.verify(&forged, 50), Err(Error::Session(SessionError::BadToken))));
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct TokenSigner {
    signing: TokenKey,
    verifying: Vec<TokenKey>,
}

impl TokenSigner {
    /// A signer that signs (and verifies) with `signing`.
    ///
    /// ```
    /// let s = raceguard::session::TokenSigner::new(raceguard::session::TokenKey::new(1, [0u8; 32])?);
    /// # let _ = s;
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn new(signing: TokenKey) -> Self {
        TokenSigner {
            verifying: vec![signing.clone()],
            signing,
        }
    }

    /// Also accepts tokens signed by `key`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] if a key with the same id is already
    /// accepted.
    ///
    /// ```
    /// use raceguard::session::{TokenKey, TokenSigner};
    /// let s = TokenSigner::new(TokenKey::new(1, [0u8; 32])?);
    /// assert!(s.clone().with_verification_key(TokenKey::new(1, [9u8; 32])?).is_err());
    /// assert!(s.with_verification_key(TokenKey::new(2, [9u8; 32])?).is_ok());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn with_verification_key(mut self, key: TokenKey) -> Result<Self> {
        if self.verifying.iter().any(|k| k.id == key.id) {
            return Err(Error::invalid(
                "token.key_id",
                format!("key id {} is already in use", key.id),
            ));
        }
        self.verifying.push(key);
        Ok(self)
    }

    /// A token for `user`'s session `id`, valid until `expires_at` (seconds
    /// since the Unix epoch).
    ///
    /// # Errors
    ///
    /// None for valid inputs today; the `Result` leaves room for signing
    /// backends that can fail.
    ///
    /// ```
    /// # use raceguard::{keys::UserId, session::*};
    /// let s = TokenSigner::new(TokenKey::new(1, [7u8; 32])?);
    /// let t = s.sign(&UserId::new("a")?, &SessionId::generate()?, 10)?;
    /// assert!(t.len() > 60);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn sign(&self, user: &UserId, id: &SessionId, expires_at: u64) -> Result<String> {
        let user = user.as_str().as_bytes();
        let user_len = u16::try_from(user.len())
            .map_err(|_| Error::invalid("user_id", "too long for a token"))?;
        let mut buf = Vec::with_capacity(HEADER + user.len() + MAC_LEN);
        buf.push(VERSION);
        buf.push(self.signing.id);
        buf.extend_from_slice(&expires_at.to_be_bytes());
        buf.extend_from_slice(id.as_bytes());
        buf.extend_from_slice(&user_len.to_be_bytes());
        buf.extend_from_slice(user);
        let mut mac = self.signing.mac.clone();
        mac.update(DOMAIN);
        mac.update(&buf);
        buf.extend_from_slice(&mac.finalize().into_bytes());
        Ok(URL_SAFE_NO_PAD.encode(buf))
    }

    /// Verifies `token` at time `now` (seconds since the Unix epoch).
    ///
    /// # Errors
    ///
    /// [`SessionError::BadToken`] if the token is malformed, was signed by
    /// an unknown key or fails the MAC; [`SessionError::Expired`] if it is
    /// valid but `now >= expires_at`.
    ///
    /// ```
    /// # use raceguard::{keys::UserId, session::*};
    /// let s = TokenSigner::new(TokenKey::new(1, [7u8; 32])?);
    /// assert!(s.verify("garbage", 0).is_err());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn verify(&self, token: &str, now: u64) -> Result<SignedSession> {
        let bad = || Error::Session(SessionError::BadToken);
        if token.len() > MAX_TOKEN_CHARS {
            return Err(bad());
        }
        let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
        if raw.len() < HEADER + MAC_LEN || raw[0] != VERSION {
            return Err(bad());
        }
        let user_len = usize::from(u16::from_be_bytes([raw[HEADER - 2], raw[HEADER - 1]]));
        if raw.len() != HEADER + user_len + MAC_LEN {
            return Err(bad());
        }
        let (body, tag) = raw.split_at(HEADER + user_len);
        let key = self
            .verifying
            .iter()
            .find(|k| k.id == body[1])
            .ok_or_else(bad)?;
        let mut mac = key.mac.clone();
        mac.update(DOMAIN);
        mac.update(body);
        mac.verify_slice(tag).map_err(|_| bad())?;
        // Authentic from here on.
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&body[2..10]);
        let expires_at = u64::from_be_bytes(expiry);
        let mut id = [0u8; 16];
        id.copy_from_slice(&body[10..26]);
        let user = std::str::from_utf8(&body[HEADER..])
            .ok()
            .and_then(|u| UserId::new(u).ok())
            .ok_or_else(bad)?;
        if now >= expires_at {
            return Err(Error::Session(SessionError::Expired));
        }
        Ok(SignedSession {
            user,
            session_id: SessionId::from_bytes(id),
            expires_at,
            key_id: key.id,
        })
    }

    /// [`verify`](Self::verify) at the current system time.
    ///
    /// # Errors
    ///
    /// As [`verify`](Self::verify).
    ///
    /// ```
    /// # use raceguard::{keys::UserId, session::*};
    /// let s = TokenSigner::new(TokenKey::new(1, [7u8; 32])?);
    /// let t = s.sign(&UserId::new("a")?, &SessionId::generate()?, u64::MAX)?;
    /// assert!(s.verify_now(&t).is_ok());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn verify_now(&self, token: &str) -> Result<SignedSession> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.verify(token, now)
    }
}
