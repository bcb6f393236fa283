//! A per-request bearer credential: validated once at the edge, never logged.

use std::fmt;
use std::sync::Arc;

use subtle::ConstantTimeEq;

use crate::{Error, Result};

/// The longest accepted [`BearerToken`], in bytes. Longer input from a
/// request is rejected instead of copied.
pub const MAX_BEARER_TOKEN_LEN: usize = 4096;

const WHAT: &str = "bearer token";

/// A bearer credential (an OAuth access token, a JWT, an API key) that one
/// request carries: the per-request auth state that seed 000 kept inside a
/// shared client.
///
/// Validated on construction against RFC 6750's `b64token` syntax (`A-Z`,
/// `a-z`, `0-9`, `-._~+/`, then optional trailing `=`), 1 to
/// [`MAX_BEARER_TOKEN_LEN`] bytes, so a value from a header can be passed on
/// to another service without header injection. `Debug` redacts the value;
/// [`expose`](BearerToken::expose) names the moment it leaves. Equality is
/// constant time in the token's content. Clones share one allocation.
///
/// ```
/// use raceguard::client::BearerToken;
///
/// let t = BearerToken::from_authorization("Bearer eyJhbGciOi.eyJzdWIi.c2ln")?;
/// assert_eq!(t.expose(), "eyJhbGciOi.eyJzdWIi.c2ln");
/// assert_eq!(format!("{t:?}"), "BearerToken(<redacted>)");
/// assert!(BearerToken::new("two words").is_err());
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Clone)]
pub struct BearerToken(Arc<str>);

impl BearerToken {
    /// Validates a token.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`what`: `"bearer token"`) when `raw` is
    /// empty, longer than [`MAX_BEARER_TOKEN_LEN`] bytes, or not a
    /// `b64token` (a character outside the alphabet, or `=` followed by
    /// anything but `=`).
    ///
    /// ```
    /// use raceguard::client::BearerToken;
    /// assert!(BearerToken::new("abc-DEF_123.~+/==").is_ok());
    /// assert!(BearerToken::new("").is_err());
    /// assert!(BearerToken::new("a=b").is_err());
    /// assert!(BearerToken::new("abc\r\nX-Admin: 1").is_err());
    /// ```
    pub fn new(raw: impl AsRef<str>) -> Result<Self> {
        let raw = raw.as_ref();
        validate(raw)?;
        Ok(BearerToken(Arc::from(raw)))
    }

    /// Parses an `Authorization` header value: the scheme `Bearer`
    /// (case-insensitive), one or more spaces, then the token.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`what`: `"authorization"`) when the scheme is
    /// not `Bearer` or the token is missing, and the errors of
    /// [`new`](BearerToken::new) for the token itself.
    ///
    /// ```
    /// use raceguard::client::BearerToken;
    /// assert_eq!(BearerToken::from_authorization("bearer  abc")?.expose(), "abc");
    /// assert!(BearerToken::from_authorization("Basic YWxpY2U6cHc=").is_err());
    /// assert!(BearerToken::from_authorization("Bearer").is_err());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn from_authorization(header: &str) -> Result<Self> {
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Error::invalid("authorization", "scheme is not Bearer"));
        }
        let token = rest.trim_start_matches(' ');
        if token.is_empty() {
            return Err(Error::invalid("authorization", "missing bearer token"));
        }
        Self::new(token)
    }

    /// The token itself, for sending it on. Every call site is a place where
    /// the secret leaves the value.
    ///
    /// ```
    /// let t = raceguard::client::BearerToken::new("s3cr3t")?;
    /// assert_eq!(t.expose(), "s3cr3t");
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn expose(&self) -> &str {
        &self.0
    }
}

fn validate(raw: &str) -> Result<()> {
    if raw.is_empty() {
        return Err(Error::invalid(WHAT, "must not be empty"));
    }
    if raw.len() > MAX_BEARER_TOKEN_LEN {
        return Err(Error::invalid(
            WHAT,
            format!("longer than {MAX_BEARER_TOKEN_LEN} bytes"),
        ));
    }
    let bytes = raw.as_bytes();
    let body = bytes.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    if body == 0 {
        return Err(Error::invalid(WHAT, "must not be only padding"));
    }
    let ok = bytes[..body].iter().all(|&b| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
    });
    if !ok {
        return Err(Error::invalid(
            WHAT,
            "only A-Z a-z 0-9 - . _ ~ + / and trailing = are allowed",
        ));
    }
    Ok(())
}

impl PartialEq for BearerToken {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for BearerToken {}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_b64token_alphabet_and_padding() {
        for ok in [
            "a",
            "A9",
            "-._~+/",
            "abc=",
            "abc==",
            "x".repeat(MAX_BEARER_TOKEN_LEN).as_str(),
        ] {
            assert_eq!(BearerToken::new(ok).unwrap().expose(), ok);
        }
    }

    #[test]
    fn rejects_everything_else_with_a_typed_error() {
        let long = "x".repeat(MAX_BEARER_TOKEN_LEN + 1);
        for bad in [
            "",
            "=",
            "==",
            "a=b",
            "a b",
            "a\r\nb",
            "ä",
            "a,b",
            "a\"",
            long.as_str(),
        ] {
            let err = BearerToken::new(bad).unwrap_err();
            assert!(
                matches!(err, Error::InvalidInput { what: WHAT, .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn authorization_header_parsing() {
        assert_eq!(
            BearerToken::from_authorization("BEARER tok")
                .unwrap()
                .expose(),
            "tok"
        );
        for bad in [
            "",
            "Bearer",
            "Bearer ",
            "Basic tok",
            "Bearertok",
            "Bearer a b",
        ] {
            assert!(BearerToken::from_authorization(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn equality_and_redaction() {
        let a = BearerToken::new("secret-a").unwrap();
        assert_eq!(a, a.clone());
        assert_ne!(a, BearerToken::new("secret-b").unwrap());
        assert_ne!(a, BearerToken::new("secret-a=").unwrap());
        assert!(!format!("{a:?}").contains("secret"));
    }
}
