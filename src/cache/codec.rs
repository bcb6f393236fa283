//! Value codecs for caches that store bytes (Redis).

use crate::BoxError;

/// Turns values into bytes and back, for caches that store bytes.
///
/// [`JsonCodec`] (serde JSON) is the default; implement this trait for
/// another format.
///
/// ```
/// use raceguard::cache::Codec;
///
/// /// Stores strings as raw UTF-8.
/// struct Utf8;
/// impl Codec<String> for Utf8 {
///     fn encode(&self, value: &String) -> Result<Vec<u8>, raceguard::BoxError> {
///         Ok(value.as_bytes().to_vec())
///     }
///     fn decode(&self, bytes: &[u8]) -> Result<String, raceguard::BoxError> {
///         Ok(String::from_utf8(bytes.to_vec())?)
///     }
/// }
/// assert_eq!(Utf8.decode(&Utf8.encode(&"hi".to_string())?)?, "hi");
/// # Ok::<(), raceguard::BoxError>(())
/// ```
pub trait Codec<V>: Send + Sync + 'static {
    /// Encodes `value`.
    ///
    /// # Errors
    ///
    /// Whatever the format reports for a value it cannot encode.
    fn encode(&self, value: &V) -> Result<Vec<u8>, BoxError>;

    /// Decodes bytes produced by [`encode`](Self::encode).
    ///
    /// # Errors
    ///
    /// Whatever the format reports for bytes it cannot decode (a cache
    /// treats an undecodable entry as a miss).
    fn decode(&self, bytes: &[u8]) -> Result<V, BoxError>;
}

/// The default codec: serde JSON.
///
/// ```
/// use raceguard::cache::{Codec, JsonCodec};
/// let bytes = Codec::<Vec<u32>>::encode(&JsonCodec, &vec![1, 2])?;
/// assert_eq!(bytes, b"[1,2]");
/// let back: Vec<u32> = JsonCodec.decode(&bytes)?;
/// assert_eq!(back, vec![1, 2]);
/// # Ok::<(), raceguard::BoxError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JsonCodec;

impl<V> Codec<V> for JsonCodec
where
    V: serde::Serialize + serde::de::DeserializeOwned,
{
    fn encode(&self, value: &V) -> Result<Vec<u8>, BoxError> {
        Ok(serde_json::to_vec(value)?)
    }

    fn decode(&self, bytes: &[u8]) -> Result<V, BoxError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}
