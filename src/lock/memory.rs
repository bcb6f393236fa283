//! The in-memory lock table: one process, no I/O.
//!
//! Invariants (each operation runs entirely under the table's one mutex,
//! from the crate's loom shim, so loom explores every interleaving):
//!
//! - A name has at most one holder; a holder whose `expires_at` has passed
//!   (on the manager's clock) counts as absent, and is replaced or removed
//!   by the next operation that looks at it.
//! - Release and extension compare the caller's token first: an operation
//!   with a stale token never removes or extends another acquisition's
//!   entry, and extension never revives an expired one.
//! - Fencing tokens come from one counter under the same mutex as the
//!   acquisition they belong to: strictly increasing, never reused.
//! - Memory stays proportional to the names currently held: released
//!   entries are removed at once, expired ones by an amortised sweep.

use std::collections::HashMap;

use super::token::Token;
use crate::sync::Mutex;

/// The outcome of one acquisition attempt on the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MemAttempt {
    /// Acquired; the fencing token of this acquisition.
    Acquired { fence: u64 },
    /// Held by someone else for `remaining` more nanoseconds.
    Busy { remaining: u64 },
}

#[derive(Debug)]
struct Holder {
    token: Token,
    expires_at: u64,
}

#[derive(Debug)]
struct Table {
    held: HashMap<Box<str>, Holder>,
    next_fence: u64,
    /// Sweep expired entries once the table reaches this size.
    sweep_at: usize,
}

const MIN_SWEEP: usize = 1024;

/// The in-memory lock table.
#[derive(Debug)]
pub(crate) struct MemoryLocks {
    table: Mutex<Table>,
}

impl MemoryLocks {
    pub(crate) fn new() -> Self {
        MemoryLocks {
            table: Mutex::new(Table {
                held: HashMap::new(),
                next_fence: 0,
                sweep_at: MIN_SWEEP,
            }),
        }
    }

    /// Takes `name` for `token` until `now + ttl` unless a live holder has it.
    pub(crate) fn try_acquire(&self, name: &str, token: Token, ttl: u64, now: u64) -> MemAttempt {
        let mut t = self.table.lock();
        let expires_at = now.saturating_add(ttl);
        if let Some(h) = t.held.get_mut(name) {
            if h.expires_at > now {
                return MemAttempt::Busy {
                    remaining: h.expires_at - now,
                };
            }
            // Expired: the previous holder lost it; take it over in place.
            *h = Holder { token, expires_at };
        } else {
            if t.held.len() >= t.sweep_at {
                t.held.retain(|_, h| h.expires_at > now);
                t.sweep_at = (t.held.len() * 2).max(MIN_SWEEP);
            }
            t.held.insert(name.into(), Holder { token, expires_at });
        }
        t.next_fence += 1;
        MemAttempt::Acquired {
            fence: t.next_fence,
        }
    }

    /// Removes `name` if `token` holds it. Returns whether it was still held
    /// (the token matched and the lease had not expired).
    pub(crate) fn release(&self, name: &str, token: Token, now: u64) -> bool {
        let mut t = self.table.lock();
        match t.held.get(name) {
            Some(h) if h.token == token => {
                let live = h.expires_at > now;
                t.held.remove(name);
                live
            }
            _ => false,
        }
    }

    /// Extends `name` to `now + ttl` if `token` holds it and the lease is
    /// still live. Never revives an expired lease.
    pub(crate) fn extend(&self, name: &str, token: Token, ttl: u64, now: u64) -> bool {
        let mut t = self.table.lock();
        match t.held.get_mut(name) {
            Some(h) if h.token == token && h.expires_at > now => {
                h.expires_at = now.saturating_add(ttl);
                true
            }
            Some(h) if h.token == token => {
                // Ours but expired: it is gone, whatever the caller thinks.
                t.held.remove(name);
                false
            }
            _ => false,
        }
    }

    /// The live holder's token, for tests and models.
    #[allow(dead_code)]
    pub(crate) fn holder(&self, name: &str, now: u64) -> Option<Token> {
        let t = self.table.lock();
        t.held
            .get(name)
            .filter(|h| h.expires_at > now)
            .map(|h| h.token)
    }

    /// Entries in the table (live or not yet swept), for tests.
    #[allow(dead_code)]
    pub(crate) fn len(&self) -> usize {
        self.table.lock().held.len()
    }
}

#[cfg(all(test, not(raceguard_loom)))]
mod tests {
    use super::*;

    fn t(v: u128) -> Token {
        Token::from_u128(v)
    }

    #[test]
    fn acquire_release_extend() {
        let m = MemoryLocks::new();
        assert_eq!(
            m.try_acquire("a", t(1), 100, 0),
            MemAttempt::Acquired { fence: 1 }
        );
        assert_eq!(
            m.try_acquire("a", t(2), 100, 10),
            MemAttempt::Busy { remaining: 90 }
        );
        assert!(!m.extend("a", t(2), 100, 20), "a stranger cannot extend");
        assert!(m.extend("a", t(1), 100, 20));
        assert!(!m.release("a", t(2), 30), "a stranger cannot release");
        assert_eq!(m.holder("a", 30), Some(t(1)));
        assert!(m.release("a", t(1), 30));
        assert_eq!(m.len(), 0);
        assert!(!m.release("a", t(1), 30), "released twice");
    }

    #[test]
    fn expiry_hands_over_and_the_old_holder_cannot_touch_the_new_one() {
        let m = MemoryLocks::new();
        m.try_acquire("a", t(1), 100, 0);
        assert_eq!(
            m.try_acquire("a", t(2), 100, 100),
            MemAttempt::Acquired { fence: 2 }
        );
        assert!(!m.extend("a", t(1), 100, 101));
        assert!(!m.release("a", t(1), 101));
        assert_eq!(m.holder("a", 101), Some(t(2)));
    }

    #[test]
    fn an_expired_lease_is_never_revived() {
        let m = MemoryLocks::new();
        m.try_acquire("a", t(1), 100, 0);
        assert!(!m.extend("a", t(1), 100, 100));
        assert!(!m.release("a", t(1), 100), "expired: not held any more");
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn expired_entries_are_swept() {
        let m = MemoryLocks::new();
        for i in 0..(MIN_SWEEP as u128 * 3) {
            m.try_acquire(&i.to_string(), t(i), 10, i as u64 * 100);
        }
        assert!(m.len() <= MIN_SWEEP + 1, "table grew to {}", m.len());
    }
}
