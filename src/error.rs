//! The crate's one error type.
//!
//! Every fallible raceguard operation returns [`Error`]. Variants fall into
//! three groups, told apart by [`Error::kind`]:
//!
//! - **input** ([`ErrorKind::InvalidInput`]): something that came from a request
//!   or from configuration was rejected. Retrying the same call cannot help.
//! - **infrastructure** ([`ErrorKind::Backend`], [`ErrorKind::Timeout`],
//!   [`ErrorKind::Capacity`]): a backend failed, a deadline passed, or a bounded
//!   resource was full. [`Error::is_retryable`] says whether trying again later
//!   can succeed, and [`Error::retry_after`] gives a hint when one is known.
//! - **domain outcomes** ([`ErrorKind::Denied`], [`ErrorKind::Lock`],
//!   [`ErrorKind::Session`], [`ErrorKind::Init`]): the primitive did its job and
//!   the answer is "no" (a lock is held elsewhere, a session belongs to another
//!   user, an initializer failed ...).
//!
//! ```
//! use raceguard::{Error, ErrorKind};
//! use raceguard::keys::UserId;
//!
//! let err = UserId::new("").unwrap_err();
//! assert_eq!(err.kind(), ErrorKind::InvalidInput);
//! assert!(!err.is_retryable());
//! assert_eq!(err.to_string(), "invalid user_id: must not be empty");
//! ```

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// A boxed error from a backend or a user callback.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of raceguard operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in raceguard.
///
/// The enum is `#[non_exhaustive]`: match on [`Error::kind`] for broad
/// handling and on variants only for the cases you care about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Input from a request or from configuration was rejected.
    #[error("invalid {what}: {why}")]
    InvalidInput {
        /// Which part was invalid, e.g. `"user_id"`, `"quota.burst"`.
        what: &'static str,
        /// Why it was rejected.
        why: Cow<'static, str>,
    },

    /// A backend (Redis, a user-supplied transport) failed.
    #[error("{backend} backend failed: {source}")]
    Backend {
        /// Which backend, e.g. `"redis"`.
        backend: &'static str,
        /// Whether the same call may succeed if retried (connection reset,
        /// server loading ...). `false` for errors such as a wrong password or
        /// a script error, and for indeterminate failures of non-idempotent
        /// operations (the command may have run).
        retryable: bool,
        /// The underlying error.
        #[source]
        source: BoxError,
    },

    /// An operation did not finish before its deadline.
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// The operation that timed out, e.g. `"redis call"`, `"lock acquire"`.
        op: &'static str,
        /// The deadline that passed.
        after: Duration,
    },

    /// A bounded resource (a queue, a waiter list, a pool) is full.
    #[error("{resource} is full (capacity {capacity})")]
    CapacityExceeded {
        /// The resource, e.g. `"work queue"`, `"rate limiter wait queue"`.
        resource: &'static str,
        /// Its configured capacity.
        capacity: usize,
    },

    /// A rate limit denied the request.
    #[error("rate limited by {limit}; retry after {retry_after:?}")]
    RateLimited {
        /// Which limit denied (its name or index).
        limit: Cow<'static, str>,
        /// How long until the request could be admitted.
        retry_after: Duration,
    },

    /// A lock is held by someone else and could not be acquired in time.
    #[error("lock {resource:?} is held by another owner")]
    LockBusy {
        /// The resource name.
        resource: String,
    },

    /// A lock's lease was lost (expired, or taken over after expiry) while
    /// the caller believed it held it.
    #[error("lease on lock {resource:?} was lost")]
    LockLost {
        /// The resource name.
        resource: String,
    },

    /// Redlock: too few nodes granted the lock.
    #[error("lock quorum not reached: {granted} of {needed} needed nodes granted it")]
    QuorumNotReached {
        /// Nodes that granted it.
        granted: usize,
        /// Nodes needed (N/2 + 1).
        needed: usize,
    },

    /// A write carried a fencing token older than one already seen.
    #[error("stale fencing token {token} (current {current})")]
    StaleFencingToken {
        /// The rejected token.
        token: u64,
        /// The highest token seen so far.
        current: u64,
    },

    /// A session problem: unknown, expired, or owned by another user.
    #[error("session rejected: {0}")]
    Session(SessionError),

    /// An initializer or a single-flight call failed; the error is shared by
    /// every caller that waited for the same attempt.
    #[error("initialization failed: {0}")]
    InitFailed(#[source] std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>),

    /// A user callback panicked; the panic was caught and turned into this
    /// error for every waiter.
    #[error("{what} panicked: {message}")]
    Panicked {
        /// What panicked, e.g. `"initializer"`.
        what: &'static str,
        /// The panic message, when it was a string.
        message: String,
    },

    /// A re-entrant call was detected (for example an initializer awaiting its
    /// own cell); it would have deadlocked.
    #[error("re-entrant {what} detected; it would deadlock")]
    Reentrant {
        /// What was re-entered.
        what: &'static str,
    },

    /// The primitive was shut down or its owner dropped.
    #[error("{what} is closed")]
    Closed {
        /// What is closed, e.g. `"work queue"`.
        what: &'static str,
    },
}

/// Why a session was rejected. Each case is distinct so a handler can answer
/// 401 (unknown, expired) or 403 (not owned) precisely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SessionError {
    /// No such session (never created, revoked, or rotated away).
    Unknown,
    /// The session existed but its idle or absolute timeout passed.
    Expired,
    /// The session exists but belongs to another user.
    NotOwned,
    /// A signed session token failed verification (tampered, truncated,
    /// signed with an unknown key).
    BadToken,
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SessionError::Unknown => "unknown session",
            SessionError::Expired => "session expired",
            SessionError::NotOwned => "session belongs to another user",
            SessionError::BadToken => "session token failed verification",
        })
    }
}

/// The broad class of an [`Error`], for handling without matching every
/// variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Rejected input or configuration. Never retryable.
    InvalidInput,
    /// A backend failed.
    Backend,
    /// A deadline passed.
    Timeout,
    /// A bounded resource was full.
    Capacity,
    /// A rate limit denied the request.
    Denied,
    /// A lock outcome: busy, lost, quorum not reached, stale fencing token.
    Lock,
    /// A session outcome.
    Session,
    /// An initializer failed, panicked or was re-entered.
    Init,
    /// The primitive is closed.
    Closed,
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    ///
    /// ```
    /// let err = raceguard::Error::invalid("quota.burst", "must be at least 1");
    /// assert_eq!(err.to_string(), "invalid quota.burst: must be at least 1");
    /// ```
    pub fn invalid(what: &'static str, why: impl Into<Cow<'static, str>>) -> Self {
        Error::InvalidInput {
            what,
            why: why.into(),
        }
    }

    /// Shorthand for [`Error::Backend`].
    ///
    /// ```
    /// let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
    /// let err = raceguard::Error::backend("redis", true, io);
    /// assert!(err.is_retryable());
    /// ```
    pub fn backend(backend: &'static str, retryable: bool, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            backend,
            retryable,
            source: source.into(),
        }
    }

    /// The broad class of this error.
    ///
    /// ```
    /// use raceguard::{Error, ErrorKind};
    /// let err = Error::Timeout { op: "lock acquire", after: std::time::Duration::from_millis(5) };
    /// assert_eq!(err.kind(), ErrorKind::Timeout);
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidInput { .. } => ErrorKind::InvalidInput,
            Error::Backend { .. } => ErrorKind::Backend,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::CapacityExceeded { .. } => ErrorKind::Capacity,
            Error::RateLimited { .. } => ErrorKind::Denied,
            Error::LockBusy { .. }
            | Error::LockLost { .. }
            | Error::QuorumNotReached { .. }
            | Error::StaleFencingToken { .. } => ErrorKind::Lock,
            Error::Session(_) => ErrorKind::Session,
            Error::InitFailed(_) | Error::Panicked { .. } | Error::Reentrant { .. } => {
                ErrorKind::Init
            }
            Error::Closed { .. } => ErrorKind::Closed,
        }
    }

    /// Whether retrying the same call later can succeed.
    ///
    /// `true` for transient conditions: retryable backend failures, timeouts,
    /// full queues, rate limits, busy locks, quorum misses and failed or
    /// panicked initializers (a later call runs a new attempt). `false` for
    /// invalid input, session rejections, lost leases (the work must be
    /// redone under a new lock, not retried), stale fencing tokens,
    /// re-entrancy and closed primitives.
    ///
    /// ```
    /// use raceguard::{Error, SessionError};
    /// assert!(!Error::Session(SessionError::NotOwned).is_retryable());
    /// assert!(Error::LockBusy { resource: "orders".into() }.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Backend { retryable, .. } => *retryable,
            Error::Timeout { .. }
            | Error::CapacityExceeded { .. }
            | Error::RateLimited { .. }
            | Error::LockBusy { .. }
            | Error::QuorumNotReached { .. }
            | Error::InitFailed(_)
            | Error::Panicked { .. } => true,
            Error::InvalidInput { .. }
            | Error::LockLost { .. }
            | Error::StaleFencingToken { .. }
            | Error::Session(_)
            | Error::Reentrant { .. }
            | Error::Closed { .. } => false,
        }
    }

    /// How long to wait before retrying, when the error knows it (rate
    /// limits).
    ///
    /// ```
    /// use std::time::Duration;
    /// let err = raceguard::Error::RateLimited { limit: "per-user".into(), retry_after: Duration::from_secs(2) };
    /// assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl From<SessionError> for Error {
    fn from(e: SessionError) -> Self {
        Error::Session(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_send_sync_static() {
        fn assert_bounds<T: Send + Sync + 'static + std::error::Error>() {}
        assert_bounds::<Error>();
    }

    #[test]
    fn backend_error_keeps_its_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::backend("redis", true, io);
        let src = std::error::Error::source(&err).expect("source kept");
        assert_eq!(src.to_string(), "refused");
        assert_eq!(err.to_string(), "redis backend failed: refused");
    }

    #[test]
    fn kinds_and_retryability() {
        let cases: Vec<(Error, ErrorKind, bool)> = vec![
            (
                Error::invalid("user_id", "empty"),
                ErrorKind::InvalidInput,
                false,
            ),
            (
                Error::backend("redis", false, "WRONGPASS"),
                ErrorKind::Backend,
                false,
            ),
            (
                Error::Timeout {
                    op: "x",
                    after: Duration::ZERO,
                },
                ErrorKind::Timeout,
                true,
            ),
            (
                Error::CapacityExceeded {
                    resource: "q",
                    capacity: 1,
                },
                ErrorKind::Capacity,
                true,
            ),
            (
                Error::LockLost {
                    resource: "r".into(),
                },
                ErrorKind::Lock,
                false,
            ),
            (
                Error::QuorumNotReached {
                    granted: 2,
                    needed: 3,
                },
                ErrorKind::Lock,
                true,
            ),
            (
                Error::StaleFencingToken {
                    token: 1,
                    current: 2,
                },
                ErrorKind::Lock,
                false,
            ),
            (
                Error::Session(SessionError::Expired),
                ErrorKind::Session,
                false,
            ),
            (
                Error::Reentrant { what: "OnceInit" },
                ErrorKind::Init,
                false,
            ),
            (Error::Closed { what: "queue" }, ErrorKind::Closed, false),
        ];
        for (err, kind, retry) in cases {
            assert_eq!(err.kind(), kind, "{err}");
            assert_eq!(err.is_retryable(), retry, "{err}");
        }
    }
}
