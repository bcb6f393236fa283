//! Per-request clients over a shared transport (races R01 and R13 of
//! `docs/RACES.md`).
//!
//! Seed 000 shared one Supabase client between concurrent webhook requests.
//! Signing in mutated the client's auth state, so request B ran with request
//! A's credentials and got 403 "User not allowed". Seed 001 kept per-user
//! state in global singletons (`global orchestrator`), one user's data one
//! interleaving away from another's. Both have the same fix: split the client
//! into
//!
//! - **shared, immutable parts** built once at start-up: configuration (URLs,
//!   keys, timeouts) and a thread-safe transport that already multiplexes
//!   (redis-rs's `ConnectionManager` or raceguard's `RedisBackend`, a `reqwest::Client`,
//!   an `Arc` of a connection pool), and
//! - **per-request state** (the user's credentials, the session, scratch
//!   memory) that lives in a value built for one request and dropped with it.
//!
//! A [`ClientFactory`] holds the first and builds the second. Building is
//! synchronous and cheap: it clones handles and moves the request's context
//! in; it never opens a connection (the transport does that, once, for
//! everyone).
//!
//! | type | when |
//! |---|---|
//! | [`ClientFactory`] | the trait: `build(context) -> client`; implement it for your own factory |
//! | [`FnFactory`] / [`from_fn`] | a factory from shared parts and a closure |
//! | [`SharedClient`] | a client that really is stateless and thread-safe (seed 003's Firestore client): every request gets a clone of the same handle |
//! | [`BearerToken`] | a validated, redacted per-request credential to put in a context |
//!
//! ```
//! use std::sync::Arc;
//! use raceguard::client::{self, BearerToken, ClientFactory};
//! use raceguard::keys::UserId;
//!
//! /// Shared and immutable: built once.
//! struct Supabase { url: String, transport: Arc<Transport> }
//! struct Transport; // a connection pool, an HTTP client ...
//!
//! /// Per request: owns the user's credentials.
//! struct UserClient { url: String, transport: Arc<Transport>, user: UserId, token: BearerToken }
//!
//! let factory = client::from_fn(
//!     Supabase { url: "https://db.example".into(), transport: Arc::new(Transport) },
//!     |shared: &Supabase, (user, token): (UserId, BearerToken)| {
//!         Ok(UserClient { url: shared.url.clone(), transport: shared.transport.clone(), user, token })
//!     },
//! );
//!
//! // Two concurrent requests: two clients, each with its own credentials,
//! // one transport between them.
//! let a = factory.build((UserId::new("alice")?, BearerToken::new("token-of-alice")?))?;
//! let b = factory.build((UserId::new("bob")?, BearerToken::new("token-of-bob")?))?;
//! assert_eq!(a.token.expose(), "token-of-alice");
//! assert_eq!(b.user.as_str(), "bob");
//! assert!(Arc::ptr_eq(&a.transport, &b.transport));
//! # let _ = (&a.url, &b.url);
//! # Ok::<(), raceguard::Error>(())
//! ```
//!
//! Invariants:
//!
//! - A factory is `Send + Sync` and is only read by `build`; everything a
//!   request may change is in the value `build` returns, which is owned by
//!   that request (`Send`, not shared).
//! - `build` does no I/O and never waits.
//! - A [`BearerToken`] never appears in `Debug` output.
//!
//! The type system cannot see interior mutability hidden in the shared parts
//! (a `Mutex<Option<Session>>` inside the "config"): keep the shared parts
//! immutable, or the factory only moves the race. The tests in
//! `tests/races/r01_shared_client_auth.rs` and
//! `tests/races/r13_global_user_state.rs` show both versions.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::Result;

mod token;

pub use token::{BearerToken, MAX_BEARER_TOKEN_LEN};

/// Builds a request-scoped client from shared, immutable configuration and a
/// shared transport. Per-request state (a user's credentials, a session)
/// lives in the returned client, never in the factory, so concurrent
/// requests cannot see each other's state. Building a client must not open a
/// connection.
///
/// The trait is object safe, and is implemented for `&F`, `Arc<F>` and
/// `Box<F>` of any factory `F`, so one factory can be shared by every
/// request handler.
///
/// ```
/// use std::sync::Arc;
/// use raceguard::client::ClientFactory;
/// use raceguard::keys::UserId;
/// use raceguard::{Error, Result};
///
/// struct Api { base: String } // shared, immutable
/// struct UserApi { api: Arc<Api>, user: UserId } // one request's
///
/// struct ApiFactory(Arc<Api>);
/// impl ClientFactory for ApiFactory {
///     type Context = String; // an untrusted user id from a request
///     type Client = UserApi;
///     fn build(&self, ctx: String) -> Result<UserApi> {
///         Ok(UserApi { api: self.0.clone(), user: UserId::new(ctx)? })
///     }
/// }
///
/// let f = ApiFactory(Arc::new(Api { base: "https://api.example".into() }));
/// let alice = f.build("alice".into())?;
/// assert_eq!((alice.api.base.as_str(), alice.user.as_str()), ("https://api.example", "alice"));
/// // Bad input from the request is a typed error, not a panic.
/// assert!(matches!(f.build(String::new()), Err(Error::InvalidInput { .. })));
/// # Ok::<(), raceguard::Error>(())
/// ```
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

impl<F: ClientFactory + ?Sized> ClientFactory for &F {
    type Context = F::Context;
    type Client = F::Client;

    #[inline]
    fn build(&self, ctx: Self::Context) -> Result<Self::Client> {
        (**self).build(ctx)
    }
}

impl<F: ClientFactory + ?Sized> ClientFactory for Arc<F> {
    type Context = F::Context;
    type Client = F::Client;

    #[inline]
    fn build(&self, ctx: Self::Context) -> Result<Self::Client> {
        (**self).build(ctx)
    }
}

impl<F: ClientFactory + ?Sized> ClientFactory for Box<F> {
    type Context = F::Context;
    type Client = F::Client;

    #[inline]
    fn build(&self, ctx: Self::Context) -> Result<Self::Client> {
        (**self).build(ctx)
    }
}

/// A [`ClientFactory`] made of shared parts `S` and a closure that builds one
/// request's client from them and the request's context. Made by
/// [`from_fn`].
///
/// The closure receives `&S` only: it can clone handles out of the shared
/// parts but cannot change them, so nothing one request does reaches the
/// next (as long as `S` has no interior mutability).
pub struct FnFactory<S, F, X, C> {
    shared: S,
    build: F,
    _types: PhantomData<fn(X) -> C>,
}

/// A factory from shared parts and a build closure.
///
/// `shared` is built once (typically at start-up, or in a
/// [`OnceInit`](crate::OnceInit)) and holds configuration and a thread-safe
/// transport; `build(&shared, ctx)` makes one request's client. The closure
/// should only clone handles and move `ctx` in; it must not open
/// connections.
///
/// ```
/// use raceguard::client::{self, ClientFactory};
/// use raceguard::Error;
///
/// struct Scoped { region: &'static str, user: String }
///
/// let factory = client::from_fn("eu-west-1", |region: &&'static str, user: String| {
///     if user.is_empty() {
///         return Err(Error::invalid("user", "must not be empty"));
///     }
///     Ok(Scoped { region: *region, user })
/// });
/// let c = factory.build("alice".to_string())?;
/// assert_eq!((c.region, c.user.as_str()), ("eu-west-1", "alice"));
/// assert!(factory.build(String::new()).is_err());
/// # Ok::<(), raceguard::Error>(())
/// ```
pub fn from_fn<S, X, C, F>(shared: S, build: F) -> FnFactory<S, F, X, C>
where
    F: Fn(&S, X) -> Result<C>,
{
    FnFactory {
        shared,
        build,
        _types: PhantomData,
    }
}

impl<S, F, X, C> FnFactory<S, F, X, C> {
    /// The shared parts.
    ///
    /// ```
    /// let f = raceguard::client::from_fn(42u32, |n: &u32, (): ()| Ok(*n));
    /// assert_eq!(*f.shared(), 42);
    /// ```
    pub fn shared(&self) -> &S {
        &self.shared
    }
}

impl<S, F, X, C> ClientFactory for FnFactory<S, F, X, C>
where
    S: Send + Sync,
    F: Fn(&S, X) -> Result<C> + Send + Sync,
    C: Send,
{
    type Context = X;
    type Client = C;

    #[inline]
    fn build(&self, ctx: X) -> Result<C> {
        (self.build)(&self.shared, ctx)
    }
}

impl<S: fmt::Debug, F, X, C> fmt::Debug for FnFactory<S, F, X, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnFactory")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl<S: Clone, F: Clone, X, C> Clone for FnFactory<S, F, X, C> {
    fn clone(&self) -> Self {
        FnFactory {
            shared: self.shared.clone(),
            build: self.build.clone(),
            _types: PhantomData,
        }
    }
}

/// A factory for clients that really are stateless and thread-safe: every
/// request gets a clone of the same handle (seed 003's Firestore client, a
/// `reqwest::Client`, a `RedisBackend`).
///
/// Use it only when the client keeps no per-user state at all; a client
/// with any per-request state (credentials, a current user, a session) needs
/// a factory that builds a new value per request, such as [`from_fn`].
/// `X` is the context type the factory accepts (and ignores), so a
/// `SharedClient` can stand where a per-request factory is expected.
///
/// Create it once, for example in a [`OnceInit`](crate::OnceInit) (seed
/// 003's lazy global client, without its double creation, race R11):
///
/// ```
/// use std::sync::Arc;
/// use raceguard::client::{ClientFactory, SharedClient};
/// use raceguard::once::OnceInit;
///
/// #[derive(Debug)]
/// struct Firestore { database: String } // thread-safe, no per-user state
///
/// static DB: OnceInit<SharedClient<Arc<Firestore>>, std::io::Error> = OnceInit::new();
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let factory = DB
///     .get_or_try_init(|| async {
///         Ok(SharedClient::new(Arc::new(Firestore { database: "(default)".into() })))
///     })
///     .await
///     .unwrap();
/// let a = factory.build(())?;
/// let b = DB.get().unwrap().build(())?;
/// assert!(Arc::ptr_eq(&a, &b));
/// assert_eq!(a.database, "(default)");
/// # Ok::<(), raceguard::Error>(())
/// # }).unwrap();
/// ```
pub struct SharedClient<C, X = ()> {
    client: C,
    _context: PhantomData<fn(X)>,
}

impl<C, X> SharedClient<C, X> {
    /// Wraps a client that is shared by every request.
    ///
    /// ```
    /// let f: raceguard::client::SharedClient<&str> = raceguard::client::SharedClient::new("handle");
    /// assert_eq!(*f.client(), "handle");
    /// ```
    pub fn new(client: C) -> Self {
        SharedClient {
            client,
            _context: PhantomData,
        }
    }

    /// The shared client.
    ///
    /// ```
    /// let f: raceguard::client::SharedClient<u8> = raceguard::client::SharedClient::new(3);
    /// assert_eq!(*f.client(), 3);
    /// ```
    pub fn client(&self) -> &C {
        &self.client
    }

    /// The shared client, unwrapped.
    ///
    /// ```
    /// let f: raceguard::client::SharedClient<u8> = raceguard::client::SharedClient::new(3);
    /// assert_eq!(f.into_inner(), 3);
    /// ```
    pub fn into_inner(self) -> C {
        self.client
    }
}

impl<C, X> ClientFactory for SharedClient<C, X>
where
    C: Clone + Send + Sync,
{
    type Context = X;
    type Client = C;

    #[inline]
    fn build(&self, _ctx: X) -> Result<C> {
        Ok(self.client.clone())
    }
}

impl<C: Clone, X> Clone for SharedClient<C, X> {
    fn clone(&self) -> Self {
        SharedClient::new(self.client.clone())
    }
}

impl<C: fmt::Debug, X> fmt::Debug for SharedClient<C, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedClient")
            .field("client", &self.client)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    fn assert_factory<F: ClientFactory>(_: &F) {}

    #[test]
    fn factories_are_object_safe_and_shareable() {
        let f = from_fn((), |_: &(), n: u32| Ok(n + 1));
        let dynamic: Box<dyn ClientFactory<Context = u32, Client = u32>> = Box::new(f);
        assert_eq!(dynamic.build(1).unwrap(), 2);
        let shared = Arc::new(dynamic);
        assert_factory(&shared);
        assert_eq!(shared.build(2).unwrap(), 3);
        // Through the `&F` impl.
        fn build_via<F: ClientFactory<Context = u32, Client = u32>>(f: F, n: u32) -> u32 {
            f.build(n).unwrap()
        }
        assert_eq!(build_via(&shared, 3), 4);
    }

    #[test]
    fn fn_factory_passes_the_build_error_through() {
        let f = from_fn((), |_: &(), n: u32| {
            if n == 0 {
                Err(Error::invalid("n", "must not be 0"))
            } else {
                Ok(n)
            }
        });
        let err = f.build(0).unwrap_err();
        assert_eq!(err.to_string(), "invalid n: must not be 0");
        assert_eq!(f.build(5).unwrap(), 5);
    }

    #[test]
    fn shared_client_hands_out_the_same_handle_for_any_context() {
        let f: SharedClient<Arc<String>, (u8, String)> = SharedClient::new(Arc::new("x".into()));
        let a = f.build((1, "alice".into())).unwrap();
        let b = f.clone().build((2, "bob".into())).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(format!("{f:?}"), "SharedClient { client: \"x\" }");
    }

    #[test]
    fn fn_factory_debug_shows_only_the_shared_parts() {
        let f = from_fn("cfg", |_: &&str, (): ()| Ok(()));
        assert_eq!(format!("{f:?}"), "FnFactory { shared: \"cfg\", .. }");
        assert_eq!(*f.clone().shared(), "cfg");
    }
}
