//! Per-request clients over a shared transport (race R01, R13).
//!
//! (Being built: issue 8.)

use crate::Result;

/// Builds a request-scoped client from shared, immutable configuration and a
/// shared transport. Per-request state (a user's credentials, a session)
/// lives in the returned client, never in the factory, so concurrent
/// requests cannot see each other's state. Building a client must not open a
/// connection.
pub trait ClientFactory: Send + Sync {
    /// What one request contributes: the authenticated user, a token.
    type Context;
    /// The client one request uses; it owns its per-request state.
    type Client: Send;

    /// Builds the client for one request.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) when the context is not usable.
    fn build(&self, ctx: Self::Context) -> Result<Self::Client>;
}
