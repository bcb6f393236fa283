//! Bounded work queues (race R10).
//!
//! (Being built: issue 8.)

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod durable;
