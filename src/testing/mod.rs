//! Test utilities (in progress).
