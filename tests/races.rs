//! The race catalogue, executed.
//!
//! One module per race of `docs/RACES.md` (`tests/races/rNN_<name>.rs`).
//! Each has two tests:
//!
//! - `naive_version_fails`: the naive code from the post-mortem, written in
//!   the test, under a schedule forced by [`support::Sequencer`] (never luck),
//!   asserting that the damage happens;
//! - `raceguard_prevents`: the same workload through raceguard, under the
//!   same schedule and under real concurrency, asserting that it never does.
//!
//! Races whose primitive has not landed yet have no module; `docs/RACES.md`
//! says which.

#[path = "races/support.rs"]
mod support;

#[path = "races/r05_connection_exhaustion.rs"]
mod r05_connection_exhaustion;
