//! The race catalogue (placeholder).
