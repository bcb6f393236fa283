//! A durable work queue on Redis Streams.
//!
//! (Being built: issue 8.)
