//! (Being built: issue 8.)
