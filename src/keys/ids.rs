//! Validated ids that come from requests.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use crate::Error;

/// The longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;

pub(crate) fn validate(what: &'static str, raw: &str) -> Result<(), Error> {
    if raw.is_empty() {
        return Err(Error::invalid(what, "must not be empty"));
    }
    if raw.len() > MAX_ID_LEN {
        return Err(Error::invalid(
            what,
            format!("must be at most {MAX_ID_LEN} bytes, got {}", raw.len()),
        ));
    }
    Ok(())
}

macro_rules! validated_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `raw`: non-empty and at most
            #[doc = concat!("[`MAX_ID_LEN`] bytes. Any other content is accepted: key")]
            /// encoding escapes it.
            ///
            /// # Errors
            ///
            #[doc = concat!("[`Error::InvalidInput`] naming `", $what, "` when `raw` is empty or too long.")]
            pub fn new(raw: impl AsRef<str>) -> Result<Self, Error> {
                let raw = raw.as_ref();
                validate($what, raw)?;
                Ok($name(Arc::from(raw)))
            }

            /// The id as given.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_tuple(stringify!($name)).field(&&*self.0).finish()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                Self::new(s)
            }
        }

        impl super::Owner for $name {
            fn owner_id(&self) -> &str {
                &self.0
            }
        }

        impl super::KeyPart for $name {
            fn key_text(&self) -> Cow<'_, str> {
                Cow::Borrowed(&self.0)
            }
        }

        impl super::KeyPart for &$name {
            fn key_text(&self) -> Cow<'_, str> {
                Cow::Borrowed(&self.0)
            }
        }
    };
}

validated_id!(
    /// A user id from a request (a header, a token claim, a path segment),
    /// validated once at the edge.
    ///
    /// Cheap to clone (`Arc<str>`). Any non-empty string of at most
    /// [`MAX_ID_LEN`] bytes is a valid id; the key encoding makes any content
    /// safe.
    ///
    /// ```
    /// use raceguard::keys::UserId;
    /// let id = UserId::new("alice@example.com")?;
    /// assert_eq!(id.as_str(), "alice@example.com");
    /// assert!(UserId::new("").is_err());
    /// assert!(UserId::new("x".repeat(257)).is_err());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    UserId,
    "user_id"
);

validated_id!(
    /// Any other owner of keys: a tenant, a chat, a route, a resource.
    ///
    /// Like [`UserId`], validated and cheap to clone; use it as a key's
    /// owner to keep all of a scope's keys in one Redis Cluster slot.
    ///
    /// ```
    /// use raceguard::keys::{Key, ScopeId};
    /// let tenant = ScopeId::new("acme")?;
    /// let key = Key::builder("billing")?.owner(&tenant).part("invoices").build()?;
    /// assert_eq!(key.as_str(), "billing:{acme}:invoices");
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    ScopeId,
    "scope_id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_and_overlong_ids_with_typed_errors() {
        let e = UserId::new("").unwrap_err();
        assert_eq!(e.to_string(), "invalid user_id: must not be empty");
        let e = ScopeId::new("é".repeat(129)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid scope_id: must be at most 256 bytes, got 258"
        );
        assert!(UserId::new("x".repeat(256)).is_ok());
        assert!(matches!(
            "".parse::<UserId>(),
            Err(Error::InvalidInput {
                what: "user_id",
                ..
            })
        ));
    }

    #[test]
    fn accepts_hostile_content_as_opaque_text() {
        for raw in ["*", "}:{", "a\nb", "\\", " ", "用户"] {
            assert_eq!(UserId::new(raw).unwrap().as_str(), raw);
        }
    }
}
