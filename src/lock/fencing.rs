//! Fencing tokens and the checks a protected resource runs on them.
//!
//! A lock alone cannot keep a paused holder from writing after its lease
//! ran out (Kleppmann, "How to do distributed locking", 2016): the holder
//! does not know it was paused. The fix is on the resource's side. Every
//! acquisition gets a number larger than every earlier one for the same
//! lock; the holder sends it with each write; the resource remembers the
//! largest number it has seen and refuses anything smaller.
//!
//! Invariants:
//!
//! - [`FencingGuard`]'s highest-seen token only grows (one `fetch_max`).
//! - [`Fenced`] checks the token and applies the write under one mutex, so a
//!   write is never applied after a newer token's write was accepted.

use std::fmt;

use crate::Error;
use crate::sync::Mutex;
use crate::sync::atomic::{AtomicU64, Ordering};

/// A fencing token: strictly increasing per lock, issued in the same atomic
/// step as the acquisition it belongs to.
///
/// On the in-memory backend it comes from the manager's counter; on Redis
/// from the `INCR` of a companion key in the lock's hash slot, in the acquire
/// script or the acquire transaction, moved up to the server clock in µs
/// when it trails it or was lost (see [`Fencing`](super::Fencing) and
/// `docs/GUARANTEES.md`).
///
/// ```
/// use raceguard::lock::FencingToken;
/// let a = FencingToken::new(7);
/// assert!(FencingToken::new(8) > a);
/// assert_eq!(a.get(), 7);
/// assert_eq!(a.to_string(), "7");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// Wraps a raw token (for a resource that stored one and reads it back).
    pub const fn new(raw: u64) -> Self {
        FencingToken(raw)
    }

    /// The raw number, to send along with a write.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<FencingToken> for u64 {
    fn from(t: FencingToken) -> u64 {
        t.0
    }
}

/// The check a protected resource runs on each write: accept a token at
/// least as large as every token seen so far, reject an older one with
/// [`Error::StaleFencingToken`].
///
/// The same holder may write several times with its token (equal tokens
/// pass). Checking is one atomic `fetch_max`, lock-free.
///
/// `check` alone only orders the *checks*. When the write itself is not
/// atomic with the check (two threads: A checks, B checks and writes, A
/// writes), use [`Fenced`], which holds the value and checks and writes
/// under one lock — or make the storage itself compare (a conditional
/// UPDATE `WHERE fence <= $token`).
///
/// ```
/// use raceguard::lock::{FencingGuard, FencingToken};
/// use raceguard::Error;
///
/// let guard = FencingGuard::new();
/// guard.check(FencingToken::new(33))?;
/// guard.check(FencingToken::new(34))?;
/// let err = guard.check(FencingToken::new(33)).unwrap_err();
/// assert!(matches!(err, Error::StaleFencingToken { token: 33, current: 34 }));
/// # Ok::<(), Error>(())
/// ```
#[derive(Debug, Default)]
pub struct FencingGuard {
    highest: AtomicU64,
}

impl FencingGuard {
    /// A guard that has seen no token yet.
    pub fn new() -> Self {
        FencingGuard {
            highest: AtomicU64::new(0),
        }
    }

    /// Accepts `token` if no larger one was seen, and records it.
    ///
    /// # Errors
    ///
    /// [`Error::StaleFencingToken`] when a larger token was already seen:
    /// the caller's lease was lost and a newer holder has written since.
    pub fn check(&self, token: FencingToken) -> Result<(), Error> {
        let before = self.highest.fetch_max(token.0, Ordering::AcqRel);
        if before > token.0 {
            Err(Error::StaleFencingToken {
                token: token.0,
                current: before,
            })
        } else {
            Ok(())
        }
    }

    /// The largest token seen so far (0 before the first).
    ///
    /// ```
    /// let g = raceguard::lock::FencingGuard::new();
    /// assert_eq!(g.highest(), 0);
    /// ```
    pub fn highest(&self) -> u64 {
        self.highest.load(Ordering::Acquire)
    }
}

/// A value that only accepts writes carrying a current fencing token: the
/// check and the write happen under one lock.
///
/// ```
/// use raceguard::lock::{Fenced, FencingToken};
///
/// let balance = Fenced::new(100u64);
/// // The holder with token 5 writes ...
/// balance.write(FencingToken::new(5), |b| *b -= 30)?;
/// // ... a newer holder (token 6) writes ...
/// balance.write(FencingToken::new(6), |b| *b -= 10)?;
/// // ... and the old holder, back from a pause, is refused.
/// assert!(balance.write(FencingToken::new(5), |b| *b -= 30).is_err());
/// assert_eq!(balance.read(|b| *b), 60);
/// # Ok::<(), raceguard::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct Fenced<T> {
    inner: Mutex<(u64, T)>,
}

impl<T> Fenced<T> {
    /// Wraps `value`; no token seen yet.
    pub fn new(value: T) -> Self {
        Fenced {
            inner: Mutex::new((0, value)),
        }
    }

    /// Runs `write` on the value if `token` is at least the largest token
    /// seen, and records `token`.
    ///
    /// `write` runs under the value's lock: keep it short and do not call
    /// back into this `Fenced`.
    ///
    /// # Errors
    ///
    /// [`Error::StaleFencingToken`] when a larger token was seen; the value
    /// is untouched.
    pub fn write<R>(
        &self,
        token: FencingToken,
        write: impl FnOnce(&mut T) -> R,
    ) -> Result<R, Error> {
        let mut g = self.inner.lock();
        if g.0 > token.0 {
            return Err(Error::StaleFencingToken {
                token: token.0,
                current: g.0,
            });
        }
        g.0 = token.0;
        Ok(write(&mut g.1))
    }

    /// Reads the value (no token needed).
    ///
    /// ```
    /// let f = raceguard::lock::Fenced::new(vec![1, 2]);
    /// assert_eq!(f.read(|v| v.len()), 2);
    /// ```
    pub fn read<R>(&self, read: impl FnOnce(&T) -> R) -> R {
        read(&self.inner.lock().1)
    }

    /// The largest token accepted so far (0 before the first).
    ///
    /// ```
    /// let f = raceguard::lock::Fenced::new(());
    /// f.write(raceguard::lock::FencingToken::new(3), |_| ())?;
    /// assert_eq!(f.highest(), 3);
    /// # Ok::<(), raceguard::Error>(())
    /// ```
    pub fn highest(&self) -> u64 {
        self.inner.lock().0
    }

    /// The value, consuming the wrapper.
    ///
    /// ```
    /// let f = raceguard::lock::Fenced::new(5);
    /// assert_eq!(f.into_inner(), 5);
    /// ```
    pub fn into_inner(self) -> T {
        self.inner.into_inner().1
    }
}
