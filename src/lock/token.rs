//! The pure core of the locks: owner tokens, lease-validity arithmetic,
//! backoff with full jitter and quorum counting, as plain functions over
//! integers (nanoseconds, milliseconds, counts). No I/O, no atomics, no
//! clock reads: the backends call these with values they measured.
//!
//! Every function here is total: no input (a zero TTL, `u64::MAX`, an
//! attempt number of a million) panics or overflows; results saturate.

use std::fmt;

use crate::Error;

/// The random owner token of one acquisition: 128 bits from the operating
/// system's CSPRNG, compared on release and extension so a holder can only
/// ever touch its own lease.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Token(u128);

impl Token {
    /// A fresh token straight from the OS CSPRNG (`getrandom`, one system
    /// call). The managers take theirs from a [`TokenSource`] instead.
    #[cfg_attr(not(any(test, raceguard_loom)), allow(dead_code))]
    pub(crate) fn random() -> Result<Self, Error> {
        let mut buf = [0u8; 16];
        getrandom::fill(&mut buf).map_err(|e| Error::backend("os rng", false, e))?;
        Ok(Token(u128::from_le_bytes(buf)))
    }

    #[cfg(all(test, not(raceguard_loom)))]
    pub(crate) fn from_u128(v: u128) -> Self {
        Token(v)
    }

    #[cfg(all(test, raceguard_loom))]
    pub(crate) fn value(self) -> u128 {
        self.0
    }

    /// The token as 32 lowercase hex digits: the value stored in Redis.
    #[cfg(test)]
    pub(crate) fn hex(self) -> String {
        std::str::from_utf8(&self.hex_bytes())
            .expect("hex digits are ASCII")
            .to_owned()
    }

    /// The token as 32 lowercase hex digits (ASCII), on the stack: written
    /// straight into a command's buffer, no allocation.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn hex_bytes(self) -> [u8; 32] {
        // One table load per byte: `format!("{:032x}")` costs ~780
        // instructions here, a nibble table ~170, this ~70, on every
        // acquire and release (measured with callgrind).
        static PAIRS: [[u8; 2]; 256] = {
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            let mut t = [[0u8; 2]; 256];
            let mut i = 0;
            while i < 256 {
                t[i] = [DIGITS[i >> 4], DIGITS[i & 0x0f]];
                i += 1;
            }
            t
        };
        let mut out = [0u8; 32];
        for (pair, b) in out.chunks_exact_mut(2).zip(self.0.to_be_bytes()) {
            pair.copy_from_slice(&PAIRS[usize::from(b)]);
        }
        out
    }

    /// 64 bits for seeding the jitter generator. The token is uniformly
    /// random, so so is this.
    pub(crate) fn seed(self) -> u64 {
        (self.0 as u64) ^ ((self.0 >> 64) as u64)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Enough to tell tokens apart in logs; not enough to forge a release.
        write!(f, "Token({:08x}…)", (self.0 >> 96) as u32)
    }
}

/// Where a manager's owner tokens come from: the OS CSPRNG, fetched
/// [`TokenSource::BATCH`] bytes (256 tokens) per `getrandom` call instead of
/// one call per acquisition.
///
/// Invariants:
///
/// - Every token is 16 bytes the OS CSPRNG returned, used once: the bytes
///   are taken from the buffer under its mutex and overwritten with zeros
///   at once, so no two acquisitions of a process share a token (beyond the
///   2^-128 chance of two fresh draws colliding) and the unused bytes are
///   the only ones left in memory.
/// - The buffer belongs to one manager and is never copied. A child forked
///   from a process would inherit a copy, but a Redis manager cannot be used
///   in a forked child (its connection's driver task stays in the parent's
///   runtime), and an in-memory manager's locks are not shared with the
///   child anyway.
/// - In loom builds every token is a fresh `getrandom` call: the buffer's
///   mutex would only add interleavings that say nothing about the locks.
pub(crate) struct TokenSource {
    #[cfg(not(raceguard_loom))]
    pool: crate::sync::Mutex<Pool>,
}

#[cfg(not(raceguard_loom))]
struct Pool {
    buf: Box<[u8]>,
    /// Bytes of `buf` already handed out (and zeroed).
    used: usize,
}

impl TokenSource {
    /// Bytes fetched per `getrandom` call: 256 tokens.
    pub(crate) const BATCH: usize = 4096;

    pub(crate) fn new() -> Self {
        TokenSource {
            #[cfg(not(raceguard_loom))]
            pool: crate::sync::Mutex::new(Pool {
                // Empty: the first token fills it (memory managers that
                // never lock pay nothing).
                buf: Box::default(),
                used: 0,
            }),
        }
    }

    /// A fresh token.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] (`os rng`) when the OS CSPRNG fails; the next call
    /// tries again.
    pub(crate) fn next(&self) -> Result<Token, Error> {
        #[cfg(raceguard_loom)]
        {
            Token::random()
        }
        #[cfg(not(raceguard_loom))]
        {
            self.next_with(getrandom::fill)
        }
    }

    /// [`next`](Self::next) with the refill function given (tests make it
    /// fail).
    #[cfg(not(raceguard_loom))]
    fn next_with(
        &self,
        fill: impl FnOnce(&mut [u8]) -> Result<(), getrandom::Error>,
    ) -> Result<Token, Error> {
        {
            let mut pool = self.pool.lock();
            if pool.used + 16 > pool.buf.len() {
                if pool.buf.is_empty() {
                    pool.buf = vec![0u8; Self::BATCH].into_boxed_slice();
                }
                // Spent before the fill: a failed fill leaves nothing to
                // hand out (never the zeroed or already-used bytes), and
                // the next call tries again.
                pool.used = pool.buf.len();
                fill(&mut pool.buf).map_err(|e| Error::backend("os rng", false, e))?;
                pool.used = 0;
            }
            let at = pool.used;
            let chunk = &mut pool.buf[at..at + 16];
            let mut bytes = [0u8; 16];
            bytes.copy_from_slice(chunk);
            chunk.fill(0);
            pool.used = at + 16;
            Ok(Token(u128::from_le_bytes(bytes)))
        }
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource").finish_non_exhaustive()
    }
}

/// The clock-drift allowance subtracted from a lease: `ttl * factor + fixed`
/// (Redlock's "1% plus 2 ms"), saturating.
pub(crate) fn drift_nanos(ttl_nanos: u64, factor: f64, fixed_nanos: u64) -> u64 {
    // `as` from f64 saturates (and maps NaN to 0): total by construction.
    let proportional = (ttl_nanos as f64 * factor) as u64;
    proportional.saturating_add(fixed_nanos)
}

/// How long a lease acquired with `ttl` stays valid, measured from the
/// moment *before* the acquire request was sent: `ttl - elapsed - drift`, or
/// `None` when nothing is left. `elapsed` is the time the acquire took.
pub(crate) fn validity_nanos(ttl_nanos: u64, elapsed_nanos: u64, drift_nanos: u64) -> Option<u64> {
    match ttl_nanos
        .checked_sub(elapsed_nanos)
        .and_then(|v| v.checked_sub(drift_nanos))
    {
        Some(0) | None => None,
        Some(v) => Some(v),
    }
}

/// The end of a lease's validity on the local monotonic clock: the acquire
/// started at `start`, and [`validity_nanos`] says how much was left once it
/// finished. Measuring from `start` (not from the reply) is what keeps the
/// local view conservative: the server's TTL started counting later.
pub(crate) fn valid_until(start: u64, ttl_nanos: u64, drift_nanos: u64) -> u64 {
    start
        .saturating_add(ttl_nanos)
        .saturating_sub(drift_nanos)
        .max(start)
}

/// The upper bound of the full-jitter backoff before retry number
/// `attempt` (0-based): `min(cap, base * 2^attempt)`, saturating.
pub(crate) fn backoff_ceiling(attempt: u32, base_nanos: u64, cap_nanos: u64) -> u64 {
    let factor = 1u64.checked_shl(attempt.min(63)).unwrap_or(u64::MAX);
    base_nanos.saturating_mul(factor).min(cap_nanos)
}

/// Full-jitter exponential backoff ("Exponential Backoff And Jitter", AWS
/// architecture blog): a uniformly random delay in
/// `[0, min(cap, base * 2^attempt)]`, drawn from the 64 random bits `r`.
pub(crate) fn full_jitter(attempt: u32, base_nanos: u64, cap_nanos: u64, r: u64) -> u64 {
    let ceiling = backoff_ceiling(attempt, base_nanos, cap_nanos);
    match ceiling.checked_add(1) {
        Some(span) => r % span,
        None => r,
    }
}

/// The delay before the next attempt: the jittered backoff, but never past
/// the acquire deadline and, when the holder's remaining lease is known,
/// never (much) past the moment it expires — a TTL shorter than the retry
/// delay does not make a waiter oversleep the free lock.
pub(crate) fn next_delay(
    jitter_nanos: u64,
    holder_remaining_nanos: Option<u64>,
    until_deadline_nanos: u64,
) -> u64 {
    let mut d = jitter_nanos;
    if let Some(rem) = holder_remaining_nanos {
        // Wake just after the holder's expiry (plus 1 ms for the server's
        // own expiry to happen).
        d = d.min(rem.saturating_add(1_000_000));
    }
    d.min(until_deadline_nanos)
}

/// The watchdog's renewal interval for a lease of `ttl`: uniformly random in
/// `[ttl/4, ttl/3]`, so many holders renewing the same TTL spread out.
pub(crate) fn renew_interval(ttl_nanos: u64, r: u64) -> u64 {
    let hi = ttl_nanos / 3;
    let lo = ttl_nanos / 4;
    let span = hi - lo;
    lo + match span.checked_add(1) {
        Some(s) => r % s,
        None => r,
    }
}

/// Redlock's quorum for `n` nodes: a strict majority, `n/2 + 1`.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn quorum(n: usize) -> usize {
    n / 2 + 1
}

/// Whether a Redlock attempt can still reach `needed` grants with
/// `pending` nodes yet to answer.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn quorum_possible(granted: usize, pending: usize, needed: usize) -> bool {
    granted.saturating_add(pending) >= needed
}

/// SplitMix64: a tiny, fast, statistically good generator for jitter
/// (never for tokens).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A duration in whole milliseconds, rounded **up** (a TTL of 1.5 ms is 2 ms
/// on the server, never 1), saturating.
pub(crate) fn ceil_millis(nanos: u64) -> u64 {
    nanos.div_ceil(1_000_000)
}

#[cfg(all(test, not(raceguard_loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn tokens_are_distinct_and_hex_is_32_digits() {
        let a = Token::random().unwrap();
        let b = Token::random().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.hex().len(), 32);
        assert!(a.hex().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(Token::from_u128(0xab).hex(), format!("{:032x}", 0xab));
        assert!(format!("{a:?}").starts_with("Token("));
    }

    #[test]
    fn token_source_hands_out_distinct_tokens_across_refills() {
        let source = TokenSource::new();
        let n = 3 * TokenSource::BATCH / 16 + 5;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..n {
            let t = source.next().unwrap();
            assert_ne!(t.0, 0, "a zeroed (already used) slot was handed out");
            assert!(seen.insert(t.0), "token handed out twice");
        }
        let pool = source.pool.lock();
        assert_eq!(pool.buf.len(), TokenSource::BATCH);
        assert!(
            pool.buf[..pool.used].iter().all(|&b| b == 0),
            "used bytes are wiped"
        );
        // Two sources never share bytes.
        let other = TokenSource::new();
        assert!((0..256).all(|_| !seen.contains(&other.next().unwrap().0)));
    }

    #[test]
    fn a_failed_refill_never_hands_out_stale_bytes() {
        let source = TokenSource::new();
        let fail = |_: &mut [u8]| Err(getrandom::Error::UNSUPPORTED);
        // The first fill fails: an error, and nothing usable left behind.
        assert!(source.next_with(fail).is_err());
        // The next call must refill (here with a known pattern), not hand
        // out the zeroed buffer.
        let pattern = |b: &mut [u8]| {
            b.fill(0xab);
            Ok(())
        };
        assert_eq!(
            source.next_with(pattern).unwrap().0,
            u128::from_le_bytes([0xab; 16])
        );
        // A failed refill after the buffer ran out: the same.
        let slots = TokenSource::BATCH / 16;
        for _ in 1..slots {
            source.next_with(fail).unwrap(); // from the buffer, no refill
        }
        assert!(source.next_with(fail).is_err());
        assert!(
            source.next_with(fail).is_err(),
            "no stale slot after a failure"
        );
        assert_eq!(
            source.next_with(pattern).unwrap().0,
            u128::from_le_bytes([0xab; 16])
        );
    }

    #[test]
    fn hex_bytes_match_format() {
        let mut g = SplitMix64::new(7);
        let random = (0..64).map(|_| (u128::from(g.next_u64()) << 64) | u128::from(g.next_u64()));
        for v in [0u128, 1, 0xab, u128::MAX, 0x0123_4567_89ab_cdef << 40]
            .into_iter()
            .chain(random)
        {
            let t = Token::from_u128(v);
            assert_eq!(t.hex_bytes().as_slice(), format!("{v:032x}").as_bytes());
        }
    }

    #[test]
    fn redlock_drift_is_one_percent_plus_two_ms() {
        assert_eq!(drift_nanos(10_000 * MS, 0.01, 2 * MS), 102 * MS);
        assert_eq!(drift_nanos(u64::MAX, 0.01, u64::MAX), u64::MAX);
        assert_eq!(drift_nanos(MS, f64::NAN, 0), 0);
    }

    #[test]
    fn validity_examples() {
        // TTL 10 s, took 5 ms, drift 102 ms.
        assert_eq!(
            validity_nanos(10_000 * MS, 5 * MS, 102 * MS),
            Some(9_893 * MS)
        );
        // TTL 1 ms: the drift alone eats it.
        assert_eq!(validity_nanos(MS, 0, 2 * MS), None);
        assert_eq!(validity_nanos(5 * MS, 5 * MS, 0), None);
    }

    #[test]
    fn quorum_is_a_strict_majority() {
        assert_eq!(quorum(1), 1);
        assert_eq!(quorum(3), 2);
        assert_eq!(quorum(4), 3);
        assert_eq!(quorum(5), 3);
        assert!(quorum_possible(1, 2, 3));
        assert!(!quorum_possible(0, 2, 3));
    }

    #[test]
    fn ceil_millis_rounds_up() {
        assert_eq!(ceil_millis(0), 0);
        assert_eq!(ceil_millis(1), 1);
        assert_eq!(ceil_millis(MS), 1);
        assert_eq!(ceil_millis(MS + 1), 2);
        assert_eq!(ceil_millis(u64::MAX), u64::MAX / MS + 1);
    }

    #[test]
    fn splitmix_is_not_constant() {
        let mut g = SplitMix64::new(0);
        let a = g.next_u64();
        let b = g.next_u64();
        assert_ne!(a, b);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn jitter_stays_under_its_ceiling(attempt in 0u32..200, base in 0u64..u64::MAX, cap in 0u64..u64::MAX, r in any::<u64>()) {
            let ceiling = backoff_ceiling(attempt, base, cap);
            prop_assert!(ceiling <= cap);
            prop_assert!(full_jitter(attempt, base, cap, r) <= ceiling);
        }

        #[test]
        fn ceiling_grows_until_the_cap(attempt in 0u32..62, base in 1u64..1_000_000_000, cap in 1u64..u64::MAX) {
            let a = backoff_ceiling(attempt, base, cap);
            let b = backoff_ceiling(attempt + 1, base, cap);
            prop_assert!(b >= a);
            prop_assert!(b == cap || b == a * 2);
        }

        #[test]
        fn validity_never_exceeds_ttl_minus_drift(ttl in any::<u64>(), elapsed in any::<u64>(), drift in any::<u64>()) {
            match validity_nanos(ttl, elapsed, drift) {
                Some(v) => {
                    prop_assert!(v > 0);
                    prop_assert_eq!(v as u128 + elapsed as u128 + drift as u128, ttl as u128);
                }
                None => prop_assert!(elapsed as u128 + drift as u128 >= ttl as u128),
            }
        }

        #[test]
        fn valid_until_is_within_the_lease(start in any::<u64>(), ttl in any::<u64>(), drift in any::<u64>()) {
            let end = valid_until(start, ttl, drift);
            prop_assert!(end >= start);
            prop_assert!(end as u128 <= start as u128 + ttl as u128);
        }

        #[test]
        fn delay_respects_deadline_and_holder(j in any::<u64>(), rem in proptest::option::of(any::<u64>()), dl in any::<u64>()) {
            let d = next_delay(j, rem, dl);
            prop_assert!(d <= dl);
            prop_assert!(d <= j);
            if let Some(rem) = rem {
                prop_assert!(d <= rem.saturating_add(1_000_000));
            }
        }

        #[test]
        fn renew_interval_is_between_a_quarter_and_a_third(ttl in any::<u64>(), r in any::<u64>()) {
            let i = renew_interval(ttl, r);
            prop_assert!(i >= ttl / 4 && i <= ttl / 3);
        }
    }
}
