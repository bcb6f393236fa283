//! tower middleware (feature `tower`).
//!
//! (Being built: issue 8.)
