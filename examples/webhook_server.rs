//! (Being built: issue 8.)
fn main() {}
