//! Loom models of raceguard's in-memory primitives.
//!
//! Compiled only with `--cfg raceguard_loom`; run them with `scripts/loom.sh`.
//! Every model's test name starts with `loom_` so the script's filter selects
//! exactly the models.

#[cfg(raceguard_loom)]
mod loom_cache;
#[cfg(raceguard_loom)]
mod loom_clock;
#[cfg(raceguard_loom)]
mod loom_lock;
#[cfg(raceguard_loom)]
mod loom_once;
#[cfg(raceguard_loom)]
mod loom_rate;
#[cfg(raceguard_loom)]
mod loom_refresh;
#[cfg(raceguard_loom)]
mod loom_single_flight;
