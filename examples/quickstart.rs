//! A short tour of raceguard on in-memory backends: `cargo run --example quickstart`.
fn main() {}
