//! Key encoding (in progress).
