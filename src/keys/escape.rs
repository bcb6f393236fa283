//! Component escaping: the pure core of key encoding.
//!
//! A component is escaped by percent-encoding (`%XX`, uppercase hex, per
//! UTF-8 byte) every character that could change the meaning of a key:
//!
//! - `%` itself (the escape character);
//! - `:` (the component separator);
//! - `* ? [ ] \` (Redis glob metacharacters, as in `KEYS`/`SCAN MATCH`/`PSUBSCRIBE`);
//! - `{ }` (Redis Cluster hash-tag braces);
//! - whitespace and control characters (ASCII and Unicode), which break logs,
//!   `redis-cli` and inline commands.
//!
//! Everything else (other printable ASCII, printable non-ASCII) stays
//! readable. The encoding is deterministic and [`unescape`] inverts it
//! exactly; `unescape` also rejects every non-canonical spelling (lowercase
//! hex, an escaped character that need not be), so each component has exactly
//! one encoded form and the encoding is injective.

/// Whether `c` must be percent-encoded inside a key component.
#[inline]
pub(crate) fn needs_escape(c: char) -> bool {
    match c {
        '%' | ':' | '*' | '?' | '[' | ']' | '\\' | '{' | '}' => true,
        c if c.is_ascii() => !c.is_ascii_graphic(),
        c => c.is_control() || c.is_whitespace(),
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Appends the escaped form of `raw` to `out`.
pub(crate) fn escape_into(out: &mut String, raw: &str) {
    // Fast path: most ids need no escaping at all.
    if !raw.chars().any(needs_escape) {
        out.push_str(raw);
        return;
    }
    let mut utf8 = [0u8; 4];
    for c in raw.chars() {
        if needs_escape(c) {
            for &b in c.encode_utf8(&mut utf8).as_bytes() {
                out.push('%');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 0x0f)] as char);
            }
        } else {
            out.push(c);
        }
    }
}

/// The escaped form of `raw`.
#[cfg(test)]
pub(crate) fn escape(raw: &str) -> String {
    let mut s = String::with_capacity(raw.len());
    escape_into(&mut s, raw);
    s
}

/// Why an encoded component could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UnescapeError {
    /// A character that must be escaped appears raw.
    RawMetacharacter(char),
    /// `%` not followed by two uppercase hex digits.
    BadEscape,
    /// The escapes decode to bytes that are not UTF-8.
    NotUtf8,
    /// An escape spells a character that is never escaped.
    NonCanonical,
}

impl std::fmt::Display for UnescapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnescapeError::RawMetacharacter(c) => {
                write!(f, "character {c:?} must be escaped")
            }
            UnescapeError::BadEscape => {
                f.write_str("'%' must be followed by two uppercase hex digits")
            }
            UnescapeError::NotUtf8 => f.write_str("escapes do not decode to UTF-8"),
            UnescapeError::NonCanonical => {
                f.write_str("escape of a character that is never escaped")
            }
        }
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes one escaped component, accepting only the canonical encoding.
pub(crate) fn unescape(enc: &str) -> Result<String, UnescapeError> {
    if !enc.contains('%') {
        if let Some(c) = enc.chars().find(|&c| needs_escape(c)) {
            return Err(UnescapeError::RawMetacharacter(c));
        }
        return Ok(enc.to_owned());
    }
    let bytes = enc.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                return Err(UnescapeError::BadEscape);
            };
            let (Some(h), Some(l)) = (hex_val(h), hex_val(l)) else {
                return Err(UnescapeError::BadEscape);
            };
            out.push(h << 4 | l);
            i += 3;
        } else {
            // A raw character: copy its whole UTF-8 sequence (the input is a
            // &str, so `i` is at a char boundary here).
            let c = enc[i..].chars().next().expect("char boundary");
            if needs_escape(c) {
                return Err(UnescapeError::RawMetacharacter(c));
            }
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            i += c.len_utf8();
        }
    }
    let decoded = String::from_utf8(out).map_err(|_| UnescapeError::NotUtf8)?;
    // Canonical form only: re-encoding must give back the input exactly.
    let mut again = String::with_capacity(enc.len());
    escape_into(&mut again, &decoded);
    if again != enc {
        return Err(UnescapeError::NonCanonical);
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_metacharacter() {
        assert_eq!(escape("a:b"), "a%3Ab");
        assert_eq!(escape("*?[]\\"), "%2A%3F%5B%5D%5C");
        assert_eq!(escape("{x}"), "%7Bx%7D");
        assert_eq!(escape("100%"), "100%25");
        assert_eq!(escape("a b\n\t\u{7f}"), "a%20b%0A%09%7F");
        assert_eq!(escape("müller"), "müller");
        assert_eq!(escape("\u{2028}\u{a0}\u{85}"), "%E2%80%A8%C2%A0%C2%85");
        assert_eq!(escape("plain-id_1.2@x"), "plain-id_1.2@x");
    }

    #[test]
    fn unescape_inverts_escape() {
        for raw in ["", "a:b", "*", "%%", "{}", "x\ny", "é:ü", "%3A", "\0"] {
            assert_eq!(unescape(&escape(raw)).as_deref(), Ok(raw));
        }
    }

    #[test]
    fn unescape_rejects_non_canonical_and_broken_input() {
        assert_eq!(unescape("a*"), Err(UnescapeError::RawMetacharacter('*')));
        assert_eq!(unescape("a b"), Err(UnescapeError::RawMetacharacter(' ')));
        assert_eq!(unescape("%4"), Err(UnescapeError::BadEscape));
        assert_eq!(unescape("%3a"), Err(UnescapeError::BadEscape));
        assert_eq!(unescape("%zz"), Err(UnescapeError::BadEscape));
        assert_eq!(
            unescape("%41"),
            Err(UnescapeError::NonCanonical),
            "'A' is never escaped"
        );
        assert_eq!(unescape("%FF"), Err(UnescapeError::NotUtf8));
        assert_eq!(
            unescape("%C3%A9"),
            Err(UnescapeError::NonCanonical),
            "é stays raw"
        );
    }
}
