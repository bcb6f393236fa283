//! Redis Cluster hash slots.

use crc::{CRC_16_XMODEM, Crc};

/// The number of hash slots in a Redis Cluster.
pub const SLOT_COUNT: u16 = 16384;

const CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_XMODEM);

/// The part of `key` that Redis hashes: the content of the first `{...}` when
/// it is non-empty, the whole key otherwise (the Redis Cluster specification's
/// hash-tag rule).
///
/// ```
/// use raceguard::keys::hash_tag;
/// assert_eq!(hash_tag(b"chat:{alice}:history"), b"alice");
/// assert_eq!(hash_tag(b"plain"), b"plain");
/// assert_eq!(hash_tag(b"a{}b{c}"), b"a{}b{c}", "an empty first tag means no tag");
/// ```
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag, modulo
/// 16384, exactly as `CLUSTER KEYSLOT` computes it.
///
/// ```
/// use raceguard::keys::slot_of;
/// assert_eq!(slot_of(b"foo"), 12182);
/// assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"{user1000}.followers"));
/// ```
pub fn slot_of(key: &[u8]) -> u16 {
    CRC16.checksum(hash_tag(key)) % SLOT_COUNT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_redis_reference() {
        // The check value from the Redis Cluster specification.
        assert_eq!(CRC16.checksum(b"123456789"), 0x31C3);
        // Values printed by `redis-cli CLUSTER KEYSLOT`.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"somekey"), 11058);
        assert_eq!(slot_of(b"{foo}bar"), slot_of(b"foo"));
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        assert_eq!(hash_tag(b"{"), b"{");
    }
}
