//! Redis keys that user input cannot bend.
//!
//! A key is a namespace, an optional **owner** (a user, a tenant, a scope)
//! and a list of parts:
//!
//! ```text
//! <namespace>:{<owner>}:<part>:<part>...
//! ```
//!
//! - Every owner and part is **escaped** (percent-encoding of `%`, `:`, the
//!   glob metacharacters `* ? [ ] \`, the hash-tag braces `{ }`, whitespace
//!   and control characters), so no id can form a pattern, end its component
//!   early to reach into another user's keys, or pick a hash tag.
//! - The encoding is **injective** and [`Key::decode`] inverts it exactly.
//! - The owner sits in the key's only **hash tag**, so all of one owner's keys
//!   share one Redis Cluster slot ([`Key::slot`]) and multi-key scripts over
//!   them work on a cluster.
//!
//! ```
//! use raceguard::keys::{Key, UserId};
//!
//! let user = UserId::new("bob:*")?;
//! let key = Key::builder("rate")?.owner(&user).part("route").part(42u64).build()?;
//! assert_eq!(key.as_str(), "rate:{bob%3A%2A}:route:42");
//!
//! let decoded = Key::decode(key.as_str())?;
//! assert_eq!(decoded.namespace, "rate");
//! assert_eq!(decoded.owner.as_deref(), Some("bob:*"));
//! assert_eq!(decoded.parts, ["route", "42"]);
//! # Ok::<(), raceguard::Error>(())
//! ```
//!
//! Namespaces are chosen by the developer, not by requests: they are
//! restricted to `[A-Za-z0-9_.-]`, 1–64 bytes. Whole keys are at most
//! [`MAX_KEY_LEN`] bytes.

use std::borrow::Cow;
use std::fmt;

use crate::Error;

pub(crate) mod escape;
pub(crate) mod ids;
mod slot;

pub use ids::{MAX_ID_LEN, ScopeId, UserId};
pub use slot::{SLOT_COUNT, hash_tag, slot_of};

/// The longest encoded key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 4096;

/// The longest namespace accepted, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 64;

/// The component separator.
pub const SEPARATOR: char = ':';

/// Something that can own keys: placed in the key's hash tag.
///
/// Implemented by the validated ids ([`UserId`], [`ScopeId`]), which are
/// never empty, so the hash tag is never empty (an empty `{}` would make
/// Redis hash the whole key and scatter an owner's keys over the cluster).
pub trait Owner {
    /// The owner's raw (unescaped) id; never empty.
    fn owner_id(&self) -> &str;
}

impl<T: Owner + ?Sized> Owner for &T {
    fn owner_id(&self) -> &str {
        (**self).owner_id()
    }
}

/// A value usable as a key part. Its text is escaped when the key is built.
///
/// Implemented for strings, integers, `bool`, `char` and the validated ids.
/// Different values with the same text (`42u64` and `"42"`) give the same
/// part: injectivity is over the parts' text.
///
/// ```
/// use std::borrow::Cow;
/// use raceguard::keys::{Key, KeyPart};
///
/// struct Route { method: &'static str, path: &'static str }
/// impl KeyPart for Route {
///     fn key_text(&self) -> Cow<'_, str> {
///         Cow::Owned(format!("{} {}", self.method, self.path))
///     }
/// }
/// let key = Key::builder("rl")?.part(Route { method: "GET", path: "/chat" }).build()?;
/// assert_eq!(key.as_str(), "rl:GET%20/chat");
/// # Ok::<(), raceguard::Error>(())
/// ```
pub trait KeyPart {
    /// The part's raw (unescaped) text.
    fn key_text(&self) -> Cow<'_, str>;
}

impl KeyPart for str {
    fn key_text(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl KeyPart for &str {
    fn key_text(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl KeyPart for String {
    fn key_text(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl KeyPart for &String {
    fn key_text(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl KeyPart for Cow<'_, str> {
    fn key_text(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

macro_rules! display_part {
    ($($t:ty),*) => {$(
        impl KeyPart for $t {
            fn key_text(&self) -> Cow<'_, str> {
                Cow::Owned(self.to_string())
            }
        }
    )*};
}
display_part!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, bool, char
);

/// An encoded, validated Redis key.
///
/// Built with [`Key::builder`], or parsed (and validated) with
/// [`Key::decode`]. Compares, hashes and displays as its encoded text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    /// Starts a key in `namespace`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`key.namespace`) when the namespace is empty,
    /// longer than [`MAX_NAMESPACE_LEN`] or contains a character outside
    /// `[A-Za-z0-9_.-]`.
    ///
    /// ```
    /// use raceguard::keys::Key;
    /// assert!(Key::builder("sessions").is_ok());
    /// assert!(Key::builder("bad ns").is_err());
    /// ```
    pub fn builder(namespace: &str) -> Result<KeyBuilder, Error> {
        validate_namespace(namespace)?;
        let mut buf = String::with_capacity(64);
        buf.push_str(namespace);
        Ok(KeyBuilder {
            buf,
            parts: 0,
            owner_set: false,
            misuse: None,
        })
    }

    /// Parses and validates an encoded key, returning its components.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`key`) when `encoded` is not exactly what
    /// [`KeyBuilder::build`] produces for some components: a bad namespace, a
    /// raw metacharacter, a malformed or non-canonical escape, a misplaced
    /// brace, or too long.
    ///
    /// ```
    /// use raceguard::keys::Key;
    /// let d = Key::decode("chat:{u%3A1}:history:50")?;
    /// assert_eq!(d.owner.as_deref(), Some("u:1"));
    /// assert_eq!(d.parts, ["history", "50"]);
    /// assert!(Key::decode("chat:*:50").is_err(), "a raw glob is never a valid key");
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn decode(encoded: &str) -> Result<DecodedKey, Error> {
        let bad = |why: String| Error::invalid("key", why);
        if encoded.len() > MAX_KEY_LEN {
            return Err(bad(format!("longer than {MAX_KEY_LEN} bytes")));
        }
        let mut comps = encoded.split(SEPARATOR);
        let namespace = comps.next().unwrap_or_default();
        validate_namespace(namespace)?;
        let mut owner = None;
        let mut parts = Vec::new();
        for (i, comp) in comps.enumerate() {
            let body = if i == 0 && comp.starts_with('{') {
                let Some(inner) = comp.strip_prefix('{').and_then(|c| c.strip_suffix('}')) else {
                    return Err(bad("unterminated owner hash tag".into()));
                };
                if inner.is_empty() {
                    return Err(bad("empty owner hash tag".into()));
                }
                let raw = escape::unescape(inner).map_err(|e| bad(format!("owner: {e}")))?;
                if raw.len() > MAX_ID_LEN {
                    return Err(bad(format!("owner longer than {MAX_ID_LEN} bytes")));
                }
                owner = Some(raw);
                continue;
            } else {
                comp
            };
            let raw =
                escape::unescape(body).map_err(|e| bad(format!("part {}: {e}", parts.len())))?;
            parts.push(raw);
        }
        Ok(DecodedKey {
            namespace: namespace.to_owned(),
            owner,
            parts,
        })
    }

    /// The encoded key.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The encoded key, consuming `self`.
    pub fn into_string(self) -> String {
        self.0
    }

    /// The key's Redis Cluster slot (equal for all keys of one owner).
    ///
    /// ```
    /// use raceguard::keys::{Key, UserId};
    /// let u = UserId::new("alice")?;
    /// let a = Key::builder("chat")?.owner(&u).part("history").build()?;
    /// let b = Key::builder("rate")?.owner(&u).part(1u8).build()?;
    /// assert_eq!(a.slot(), b.slot());
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn slot(&self) -> u16 {
        slot_of(self.0.as_bytes())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Key").field(&self.0).finish()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

#[cfg(feature = "redis")]
impl redis::ToRedisArgs for Key {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        out.write_arg(self.0.as_bytes());
    }
}

#[cfg(feature = "redis")]
impl redis::ToSingleRedisArg for Key {}

/// The components of a decoded [`Key`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DecodedKey {
    /// The namespace.
    pub namespace: String,
    /// The owner's raw id, when the key has one.
    pub owner: Option<String>,
    /// The raw parts, in order.
    pub parts: Vec<String>,
}

/// Builds a [`Key`]: namespace, then at most one owner, then parts.
///
/// ```
/// use raceguard::keys::{Key, UserId};
/// let u = UserId::new("7")?;
/// let key = Key::builder("cache")?.owner(&u).part("v3").part("feed").build()?;
/// assert_eq!(key.to_string(), "cache:{7}:v3:feed");
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Debug, Clone)]
#[must_use = "a KeyBuilder does nothing until built"]
pub struct KeyBuilder {
    buf: String,
    parts: usize,
    owner_set: bool,
    misuse: Option<&'static str>,
}

impl KeyBuilder {
    /// Sets the key's owner, placed in the hash tag. Must come before any
    /// part, at most once ([`build`](Self::build) reports misuse).
    pub fn owner(mut self, owner: &impl Owner) -> Self {
        if self.owner_set {
            self.misuse.get_or_insert("owner set twice");
        } else if self.parts > 0 {
            self.misuse
                .get_or_insert("owner must come before the parts");
        } else {
            self.owner_set = true;
            self.buf.push(SEPARATOR);
            self.buf.push('{');
            escape::escape_into(&mut self.buf, owner.owner_id());
            self.buf.push('}');
        }
        self
    }

    /// Appends a part.
    pub fn part(mut self, part: impl KeyPart) -> Self {
        self.buf.push(SEPARATOR);
        escape::escape_into(&mut self.buf, &part.key_text());
        self.parts += 1;
        self
    }

    /// Appends several parts.
    pub fn parts<I>(mut self, parts: I) -> Self
    where
        I: IntoIterator,
        I::Item: KeyPart,
    {
        for p in parts {
            self = self.part(p);
        }
        self
    }

    /// Finishes the key.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] (`key`) when the encoded key is longer than
    /// [`MAX_KEY_LEN`] or the builder was misused (owner after parts, owner
    /// twice).
    pub fn build(self) -> Result<Key, Error> {
        if let Some(why) = self.misuse {
            return Err(Error::invalid("key", why));
        }
        if self.buf.len() > MAX_KEY_LEN {
            return Err(Error::invalid(
                "key",
                format!(
                    "encoded key is {} bytes, at most {MAX_KEY_LEN} allowed",
                    self.buf.len()
                ),
            ));
        }
        Ok(Key(self.buf))
    }
}

fn validate_namespace(ns: &str) -> Result<(), Error> {
    if ns.is_empty() {
        return Err(Error::invalid("key.namespace", "must not be empty"));
    }
    if ns.len() > MAX_NAMESPACE_LEN {
        return Err(Error::invalid(
            "key.namespace",
            format!("must be at most {MAX_NAMESPACE_LEN} bytes"),
        ));
    }
    if let Some(c) = ns
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(Error::invalid(
            "key.namespace",
            format!("character {c:?} not allowed (use [A-Za-z0-9_.-])"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::new(s).unwrap()
    }

    #[test]
    fn layout_is_namespace_owner_parts() {
        let k = Key::builder("chat")
            .unwrap()
            .owner(&user("a"))
            .part("h")
            .part(5u8)
            .build()
            .unwrap();
        assert_eq!(k.as_str(), "chat:{a}:h:5");
        let k = Key::builder("global").unwrap().part("x").build().unwrap();
        assert_eq!(k.as_str(), "global:x");
        assert_eq!(Key::builder("n").unwrap().build().unwrap().as_str(), "n");
    }

    #[test]
    fn hostile_ids_cannot_forge_another_users_key() {
        // The seed-001 shape: chat:history:<user>:50:0. A user id of
        // "B:50:0" must not produce user B's key.
        let forged = Key::builder("chat")
            .unwrap()
            .part("history")
            .part("B:50:0")
            .build()
            .unwrap();
        let real = Key::builder("chat")
            .unwrap()
            .part("history")
            .part("B")
            .part(50u8)
            .part(0u8)
            .build()
            .unwrap();
        assert_ne!(forged, real);
        // An owner that tries to close the tag and open another.
        let evil = Key::builder("c")
            .unwrap()
            .owner(&user("x}:{victim"))
            .build()
            .unwrap();
        assert_eq!(hash_tag(evil.as_str().as_bytes()), b"x%7D%3A%7Bvictim");
        let victim = Key::builder("c")
            .unwrap()
            .owner(&user("victim"))
            .build()
            .unwrap();
        assert_ne!(evil.slot(), victim.slot());
    }

    #[test]
    fn builder_misuse_and_limits_are_typed_errors() {
        let e = Key::builder("n")
            .unwrap()
            .part("p")
            .owner(&user("u"))
            .build()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid key: owner must come before the parts"
        );
        let e = Key::builder("n")
            .unwrap()
            .owner(&user("u"))
            .owner(&user("v"))
            .build()
            .unwrap_err();
        assert_eq!(e.to_string(), "invalid key: owner set twice");
        let e = Key::builder("n")
            .unwrap()
            .part("*".repeat(2000))
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("at most 4096"), "{e}");
        for ns in ["", "a:b", "a{b", "a*", "ü", &"n".repeat(65)] {
            let e = Key::builder(ns).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::InvalidInput {
                        what: "key.namespace",
                        ..
                    }
                ),
                "{ns:?}: {e}"
            );
        }
    }

    #[test]
    fn decode_rejects_what_build_never_produces() {
        for bad in [
            "",
            "ns:{}",
            "ns:{unterminated",
            "ns:{a}b",
            "ns:a*",
            "ns:a{b}",
            "ns:x:{a}",
            "ns:%41",
            "ns:%4",
            "bad ns:x",
        ] {
            assert!(Key::decode(bad).is_err(), "{bad:?} decoded");
        }
        assert_eq!(
            Key::decode("ns:").unwrap().parts,
            vec![String::new()],
            "an empty part is a part"
        );
        assert!(Key::decode("ns").unwrap().parts.is_empty());
    }
}
