//! User code built on raceguard, model-checked by loom in `tests/`.

use std::time::Duration;

use raceguard::clock::{Clock, ManualClock};

/// A user's lease that expires on a shared clock: `expired()` must turn true
/// once any thread advanced the clock past the deadline, and never before.
#[derive(Debug, Clone)]
pub struct Lease {
    clock: ManualClock,
    deadline_nanos: u64,
}

impl Lease {
    /// A lease valid for `ttl` from the clock's current time.
    pub fn new(clock: ManualClock, ttl: Duration) -> Self {
        let deadline_nanos = clock.now_nanos() + ttl.as_nanos() as u64;
        Lease {
            clock,
            deadline_nanos,
        }
    }

    /// Whether the lease has run out.
    pub fn expired(&self) -> bool {
        self.clock.now_nanos() >= self.deadline_nanos
    }
}
