//! Session ids: 128 bits from the OS CSPRNG, base64url without padding.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};

use crate::Error;

/// The length of an encoded [`SessionId`]: 22 base64url characters.
///
/// ```
/// let id = raceguard::session::SessionId::generate()?;
/// assert_eq!(id.expose().len(), raceguard::session::SESSION_ID_LEN);
/// # Ok::<(), raceguard::Error>(())
/// ```
pub const SESSION_ID_LEN: usize = 22;

/// A session id: 128 bits from the operating system's CSPRNG.
///
/// Its text form is 22 base64url characters without padding. Parsing is
/// strict: any other length, any character outside the base64url alphabet,
/// or a non-canonical last character is [`Error::InvalidInput`], so one
/// session has exactly one spelling.
///
/// `Debug` shows only the first four characters: an id is a bearer secret
/// and should not end up in logs by accident. [`SessionId::expose`] (and
/// `Display`) give the full text, for the cookie.
///
/// Registries store only the SHA-256 digest of an id, so a leaked store
/// yields no usable ids.
///
/// ```
/// use raceguard::session::SessionId;
///
/// let id = SessionId::generate()?;
/// let text = id.expose().to_string();
/// assert_eq!(text.len(), 22);
/// assert_eq!(SessionId::parse(&text)?, id);
/// assert!(SessionId::parse("not-a-session-id").is_err());
/// assert!(!format!("{id:?}").contains(&text));
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId([u8; 16]);

impl SessionId {
    /// A fresh id from the OS CSPRNG (`getrandom`).
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] (`"os rng"`) if the operating system's random
    /// source fails.
    ///
    /// ```
    /// let a = raceguard::session::SessionId::generate()?;
    /// let b = raceguard::session::SessionId::generate()?;
    /// assert_ne!(a, b);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn generate() -> Result<Self, Error> {
        let mut buf = [0u8; 16];
        getrandom::fill(&mut buf).map_err(|e| Error::backend("os rng", false, e))?;
        Ok(SessionId(buf))
    }

    /// Parses the 22-character text form.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`"session_id"`) for anything but exactly 22
    /// canonical base64url characters.
    ///
    /// ```
    /// use raceguard::session::SessionId;
    /// assert!(SessionId::parse("AAAAAAAAAAAAAAAAAAAAAA").is_ok());
    /// // 'B' as the last character would set bits beyond the 128: not canonical.
    /// assert!(SessionId::parse("AAAAAAAAAAAAAAAAAAAAAB").is_err());
    /// assert!(SessionId::parse("AAAAAAAAAAAAAAAAAAAAA=").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Self, Error> {
        if text.len() != SESSION_ID_LEN {
            return Err(Error::invalid(
                "session_id",
                format!("must be {SESSION_ID_LEN} base64url characters"),
            ));
        }
        let mut out = [0u8; 16];
        match URL_SAFE_NO_PAD.decode_slice(text.as_bytes(), &mut out) {
            Ok(16) => Ok(SessionId(out)),
            _ => Err(Error::invalid(
                "session_id",
                "not canonical base64url (alphabet A-Z a-z 0-9 - _, no padding)",
            )),
        }
    }

    /// The full 22-character text form, for the cookie or header that
    /// carries the id. Named so that exposing a secret is visible in code
    /// review.
    ///
    /// ```
    /// let id = raceguard::session::SessionId::generate()?;
    /// assert_eq!(id.expose().len(), 22);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn expose(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    /// The raw 16 bytes.
    ///
    /// ```
    /// let id = raceguard::session::SessionId::parse("AAAAAAAAAAAAAAAAAAAAAA")?;
    /// assert_eq!(id.as_bytes(), &[0u8; 16]);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The id from raw bytes (e.g. decoded from a signed token).
    ///
    /// ```
    /// let id = raceguard::session::SessionId::from_bytes([7; 16]);
    /// assert_eq!(id.as_bytes(), &[7; 16]);
    /// ```
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        SessionId(bytes)
    }

    /// SHA-256 of the id: the only form a registry stores.
    pub(crate) fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0).into()
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.expose();
        write!(f, "SessionId({}…)", &text[..4])
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expose())
    }
}

impl std::str::FromStr for SessionId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        SessionId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_non_canonical() {
        for _ in 0..100 {
            let id = SessionId::generate().unwrap();
            assert_eq!(SessionId::parse(&id.expose()).unwrap(), id);
        }
        assert!(SessionId::parse("").is_err());
        assert!(SessionId::parse("AAAAAAAAAAAAAAAAAAAAAAA").is_err());
        assert!(SessionId::parse("AAAAAAAAAAAAAAAAAAAA+A").is_err());
        assert!(SessionId::parse("AAAAAAAAAAAAAAAAAAAA/A").is_err());
        assert!(SessionId::parse("AAAAAAAAAAAAAAAAAAAAAR").is_err());
        assert!(SessionId::parse("AAAAAAAAAAAAAAAAAAAAAQ").is_ok());
        assert!(SessionId::parse("AAAAAAAAAAAAAAAAAAAAAw").is_ok());
        assert!(SessionId::parse("AAAAAAAAAAAAAAAAAAAAA\u{e9}").is_err());
    }

    #[test]
    fn debug_redacts() {
        let id = SessionId::generate().unwrap();
        let dbg = format!("{id:?}");
        assert!(!dbg.contains(&id.expose()));
        assert!(dbg.starts_with("SessionId("));
    }
}
