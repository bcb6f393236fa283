//! The client layer: a per-request client in the request's extensions.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::request::Parts;
use http::{Request, Response};
use tower::{Layer, Service};

use super::{Rejection, status_for_error};
use crate::Result;
use crate::client::ClientFactory;

/// A tower layer that builds one client per request with a
/// [`ClientFactory`] and inserts it into the request's extensions, so a
/// handler gets a client whose state (credentials, session) is its own
/// request's and no one else's.
///
/// The context comes from a closure over the request's head
/// (`Fn(&http::request::Parts) -> Result<F::Context>`): typically the
/// [`AuthenticatedUser`](super::AuthenticatedUser) and a token from the
/// extensions or headers.
///
/// `http::Extensions` only stores `Clone + Send + Sync + 'static` values,
/// so the client type must be one (clones stay within the request; wrap
/// a non-`Clone` client in an `Arc` in your factory). With axum, take it
/// with `Extension<YourClient>`.
///
/// Errors from the closure or the factory answer at once, without reaching
/// the inner service, with [`status_for_error`]: `InvalidInput` (a bad or
/// missing credential in the request) is **400**, a session rejection
/// 401/403, a backend failure 503, anything else 500.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use std::convert::Infallible;
/// use http::{Request, Response, StatusCode};
/// use raceguard::client::ClientFactory;
/// use raceguard::keys::UserId;
/// use raceguard::middleware::ClientLayer;
/// use tower::{Layer, ServiceExt};
///
/// #[derive(Clone)]
/// struct UserClient { user: UserId }
/// struct Factory;
/// impl ClientFactory for Factory {
///     type Context = UserId;
///     type Client = UserClient;
///     fn build(&self, user: UserId) -> raceguard::Result<UserClient> {
///         Ok(UserClient { user })
///     }
/// }
///
/// let layer = ClientLayer::new(Factory, |parts: &http::request::Parts| {
///     let raw = parts.headers.get("x-user").and_then(|v| v.to_str().ok()).unwrap_or("");
///     UserId::new(raw)
/// });
/// let svc = layer.layer(tower::service_fn(|req: Request<()>| async move {
///     let client = req.extensions().get::<UserClient>().expect("inserted").clone();
///     Ok::<_, Infallible>(Response::new(client.user.to_string()))
/// }));
/// let req = Request::builder().header("x-user", "alice").body(()).unwrap();
/// assert_eq!(svc.clone().oneshot(req).await.unwrap().body(), "alice");
/// let bad = Request::new(()); // no user: InvalidInput -> 400
/// assert_eq!(svc.oneshot(bad).await.unwrap().status(), StatusCode::BAD_REQUEST);
/// # });
/// ```
pub struct ClientLayer<F, X> {
    factory: Arc<F>,
    context: Arc<X>,
}

impl<F, X> Clone for ClientLayer<F, X> {
    fn clone(&self) -> Self {
        ClientLayer {
            factory: self.factory.clone(),
            context: self.context.clone(),
        }
    }
}

impl<F, X> fmt::Debug for ClientLayer<F, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientLayer").finish_non_exhaustive()
    }
}

impl<F, X> ClientLayer<F, X>
where
    F: ClientFactory + 'static,
    F::Client: Clone + Send + Sync + 'static,
    X: Fn(&Parts) -> Result<F::Context> + Send + Sync + 'static,
{
    /// Builds clients with `factory` from the context `context` extracts.
    ///
    /// ```
    /// # use raceguard::client::ClientFactory;
    /// # #[derive(Clone)] struct C;
    /// # struct F;
    /// # impl ClientFactory for F { type Context = (); type Client = C;
    /// #     fn build(&self, _: ()) -> raceguard::Result<C> { Ok(C) } }
    /// let layer = raceguard::middleware::ClientLayer::new(F, |_: &http::request::Parts| Ok(()));
    /// # let _ = layer;
    /// ```
    pub fn new(factory: F, context: X) -> Self {
        ClientLayer {
            factory: Arc::new(factory),
            context: Arc::new(context),
        }
    }
}

impl<S, F, X> Layer<S> for ClientLayer<F, X> {
    type Service = ClientService<S, F, X>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`ClientLayer`] produces.
///
/// ```
/// # use raceguard::client::ClientFactory;
/// # #[derive(Clone)] struct C;
/// # struct F;
/// # impl ClientFactory for F { type Context = (); type Client = C;
/// #     fn build(&self, _: ()) -> raceguard::Result<C> { Ok(C) } }
/// use tower::Layer;
/// let layer = raceguard::middleware::ClientLayer::new(F, |_: &http::request::Parts| Ok(()));
/// let svc: raceguard::middleware::ClientService<_, _, _> = layer.layer(tower::service_fn(|_: http::Request<()>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// }));
/// # let _ = svc;
/// ```
pub struct ClientService<S, F, X> {
    inner: S,
    layer: ClientLayer<F, X>,
}

impl<S: Clone, F, X> Clone for ClientService<S, F, X> {
    fn clone(&self) -> Self {
        ClientService {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S: fmt::Debug, F, X> fmt::Debug for ClientService<S, F, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, F, X, ReqBody, ResBody> Service<Request<ReqBody>> for ClientService<S, F, X>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    F: ClientFactory + 'static,
    F::Client: Clone + Send + Sync + 'static,
    X: Fn(&Parts) -> Result<F::Context> + Send + Sync + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let built = (self.layer.context)(&parts).and_then(|ctx| self.layer.factory.build(ctx));
        match built {
            Ok(client) => {
                parts.extensions.insert(client);
                Box::pin(self.inner.call(Request::from_parts(parts, body)))
            }
            Err(err) => {
                tracing::debug!(error = %err, "per-request client not built");
                let status = status_for_error(&err);
                let resp = Rejection::new(status, "per-request client not built").into_response();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}
