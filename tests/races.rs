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

#[path = "races/r03_pattern_invalidation.rs"]
mod r03_pattern_invalidation;

#[path = "races/r05_connection_exhaustion.rs"]
mod r05_connection_exhaustion;

#[path = "races/r06_cache_lock.rs"]
mod r06_cache_lock;

#[path = "races/r07_cross_process.rs"]
mod r07_cross_process;

#[path = "races/r07_per_worker_limits.rs"]
mod r07_per_worker_limits;

#[path = "races/r08_coordinator_throttle.rs"]
mod r08_coordinator_throttle;

#[path = "races/r09_webhook_logins.rs"]
mod r09_webhook_logins;

#[path = "races/r11_lazy_global_client.rs"]
mod r11_lazy_global_client;

#[path = "races/r12_app_init_twice.rs"]
mod r12_app_init_twice;

#[path = "races/r14_cache_stampede.rs"]
mod r14_cache_stampede;

#[path = "races/r02_shared_session_dict.rs"]
mod r02_shared_session_dict;

#[path = "races/r04_session_hijack.rs"]
mod r04_session_hijack;

#[path = "races/r01_shared_client_auth.rs"]
mod r01_shared_client_auth;

#[path = "races/r10_unbounded_webhooks.rs"]
mod r10_unbounded_webhooks;

#[path = "races/r13_global_user_state.rs"]
mod r13_global_user_state;
