//! The session layer: a claimed session id becomes a verified `SessionKey`.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{COOKIE, HeaderName};
use http::{HeaderMap, Request, Response, StatusCode};
use tower::{Layer, Service};

use super::{AuthenticatedUser, Rejection, status_for_error};
use crate::session::{SessionId, SessionRegistry};

/// Where the claimed session id is read from.
///
/// ```
/// use raceguard::middleware::SessionSource;
/// let from_header = SessionSource::Header(http::HeaderName::from_static("x-session-id"));
/// let from_cookie = SessionSource::cookie("sid");
/// // `/chat/{session_id}/messages`: segment 1 of the path.
/// let from_path = SessionSource::PathSegment(1);
/// # let _ = (from_header, from_cookie, from_path);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionSource {
    /// A header whose whole value is the id.
    Header(HeaderName),
    /// A cookie of this name in the `Cookie` header(s).
    Cookie(Cow<'static, str>),
    /// The `n`-th segment (from 0) of the request's URI path: `1` reads
    /// `abc` from `/chat/abc/messages`. The segment is taken as it is on
    /// the wire: a percent-encoded id is not canonical and answers 400, so
    /// one id has exactly one spelling.
    PathSegment(usize),
}

impl SessionSource {
    /// [`SessionSource::Cookie`].
    ///
    /// ```
    /// let s = raceguard::middleware::SessionSource::cookie("sid");
    /// assert_eq!(s, raceguard::middleware::SessionSource::Cookie("sid".into()));
    /// ```
    pub fn cookie(name: impl Into<Cow<'static, str>>) -> Self {
        SessionSource::Cookie(name.into())
    }

    /// The claimed id's text: `Ok(None)` when absent, `Err` when ambiguous
    /// (sent twice) or not text.
    fn claimed<'a>(
        &self,
        path: &'a str,
        headers: &'a HeaderMap,
    ) -> Result<Option<&'a str>, Rejection> {
        const BAD: Rejection = Rejection::new(StatusCode::BAD_REQUEST, "malformed session id");
        match self {
            SessionSource::PathSegment(n) => Ok(path
                .strip_prefix('/')
                .unwrap_or(path)
                .split('/')
                .nth(*n)
                .filter(|segment| !segment.is_empty())),
            SessionSource::Header(name) => {
                let mut values = headers.get_all(name).iter();
                let Some(value) = values.next() else {
                    return Ok(None);
                };
                if values.next().is_some() {
                    return Err(BAD);
                }
                value.to_str().map(Some).map_err(|_| BAD)
            }
            SessionSource::Cookie(name) => {
                let mut found = None;
                for header in headers.get_all(COOKIE) {
                    // Split the raw bytes: another cookie with a non-ASCII
                    // value must not make our cookie unreadable.
                    for pair in header.as_bytes().split(|b| *b == b';') {
                        let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                            continue;
                        };
                        let (k, v) = (pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii());
                        if k == name.as_bytes() {
                            if found.is_some() {
                                // Two cookies of one name: which one would a
                                // proxy or the browser have meant?
                                return Err(BAD);
                            }
                            // Our own cookie's value must be text.
                            found = Some(std::str::from_utf8(v).map_err(|_| BAD)?);
                        }
                    }
                }
                Ok(found)
            }
        }
    }
}

/// A tower layer that turns a claimed session id into a verified
/// [`SessionKey`](crate::SessionKey) in the request's extensions, checked
/// against the [`AuthenticatedUser`] by a [`SessionRegistry`] (memory or
/// Redis, or your own).
///
/// | request | response |
/// |---|---|
/// | no [`AuthenticatedUser`] in the extensions | 401 |
/// | no session id | 401 |
/// | id sent twice, not text, not a canonical session id | 400 |
/// | unknown, expired (or revoked / rotated away) | 401 |
/// | a live session of **another** user | 403 |
/// | registry failure | 503 |
/// | a live session of this user | the inner service, with the `SessionKey` in the extensions |
///
/// Handlers key per-session state by the `SessionKey` (axum:
/// `Extension<SessionKey>`), never by the client-supplied id.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use std::convert::Infallible;
/// use http::{Request, Response, StatusCode};
/// use raceguard::SessionKey;
/// use raceguard::keys::UserId;
/// use raceguard::middleware::{AuthenticatedUser, SessionLayer, SessionSource};
/// use raceguard::session::{MemorySessionRegistry, SessionConfig, SessionRegistry};
/// use tower::{Layer, ServiceExt};
///
/// let sessions = MemorySessionRegistry::new(SessionConfig::default());
/// let (alice, bob) = (UserId::new("alice")?, UserId::new("bob")?);
/// let session = sessions.create(&alice).await?;
///
/// let layer = SessionLayer::new(sessions.clone(), SessionSource::cookie("sid"));
/// let svc = layer.layer(tower::service_fn(|req: Request<()>| async move {
///     let key = req.extensions().get::<SessionKey>().expect("verified").clone();
///     Ok::<_, Infallible>(Response::new(key.user().to_string()))
/// }));
/// let request = |user: &UserId| {
///     let mut r = Request::builder()
///         .header("cookie", format!("theme=dark; sid={}", session.session_id().expose()))
///         .body(())
///         .unwrap();
///     r.extensions_mut().insert(AuthenticatedUser(user.clone()));
///     r
/// };
/// let ok = svc.clone().oneshot(request(&alice)).await.unwrap();
/// assert_eq!((ok.status(), ok.body().as_str()), (StatusCode::OK, "alice"));
/// let stolen = svc.clone().oneshot(request(&bob)).await.unwrap();
/// assert_eq!(stolen.status(), StatusCode::FORBIDDEN);
/// # Ok::<(), raceguard::Error>(())
/// # }).unwrap();
/// ```
pub struct SessionLayer<R> {
    registry: Arc<R>,
    source: Arc<SessionSource>,
}

impl<R> Clone for SessionLayer<R> {
    fn clone(&self) -> Self {
        SessionLayer {
            registry: self.registry.clone(),
            source: self.source.clone(),
        }
    }
}

impl<R> fmt::Debug for SessionLayer<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLayer")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl<R: SessionRegistry + 'static> SessionLayer<R> {
    /// Verifies ids read from `source` with `registry`.
    ///
    /// ```
    /// use raceguard::middleware::{SessionLayer, SessionSource};
    /// use raceguard::session::{MemorySessionRegistry, SessionConfig};
    /// let layer = SessionLayer::new(
    ///     MemorySessionRegistry::new(SessionConfig::default()),
    ///     SessionSource::Header(http::HeaderName::from_static("x-session-id")),
    /// );
    /// # let _ = layer;
    /// ```
    pub fn new(registry: R, source: SessionSource) -> Self {
        SessionLayer {
            registry: Arc::new(registry),
            source: Arc::new(source),
        }
    }
}

impl<S, R> Layer<S> for SessionLayer<R> {
    type Service = SessionService<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`SessionLayer`] produces.
///
/// ```
/// use tower::Layer;
/// use raceguard::middleware::{SessionLayer, SessionService, SessionSource};
/// use raceguard::session::{MemorySessionRegistry, SessionConfig};
/// let layer = SessionLayer::new(MemorySessionRegistry::new(SessionConfig::default()), SessionSource::cookie("sid"));
/// let svc: SessionService<_, _> = layer.layer(tower::service_fn(|_: http::Request<()>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// }));
/// # let _ = svc;
/// ```
pub struct SessionService<S, R> {
    inner: S,
    layer: SessionLayer<R>,
}

impl<S: Clone, R> Clone for SessionService<S, R> {
    fn clone(&self) -> Self {
        SessionService {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S: fmt::Debug, R> fmt::Debug for SessionService<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, R, ReqBody, ResBody> Service<Request<ReqBody>> for SessionService<S, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    R: SessionRegistry + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let claim = claim(&self.layer.source, &req);
        let registry = self.layer.registry.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (user, id) = match claim {
                Ok(claim) => claim,
                Err(rejection) => return Ok(rejection.into_response()),
            };
            match registry.verify(&user, &id).await {
                Ok(key) => {
                    req.extensions_mut().insert(key);
                    inner.call(req).await
                }
                Err(err) => {
                    let status = status_for_error(&err);
                    Ok(Rejection::new(status, "session rejected").into_response())
                }
            }
        })
    }
}

fn claim<B>(
    source: &SessionSource,
    req: &Request<B>,
) -> Result<(crate::keys::UserId, SessionId), Rejection> {
    let Some(user) = req.extensions().get::<AuthenticatedUser>() else {
        return Err(Rejection::new(
            StatusCode::UNAUTHORIZED,
            "no authenticated user",
        ));
    };
    let Some(text) = source.claimed(req.uri().path(), req.headers())? else {
        return Err(Rejection::new(StatusCode::UNAUTHORIZED, "no session id"));
    };
    let id = SessionId::parse(text)
        .map_err(|_| Rejection::new(StatusCode::BAD_REQUEST, "malformed session id"))?;
    Ok((user.0.clone(), id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn cookies(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(COOKIE, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn cookie_parsing() {
        let src = SessionSource::cookie("sid");
        assert_eq!(src.claimed("/", &cookies(&[])), Ok(None));
        assert_eq!(
            src.claimed("/", &cookies(&["a=1; sid=xyz"])),
            Ok(Some("xyz"))
        );
        assert_eq!(
            src.claimed("/", &cookies(&["a=1", " sid = xyz "])),
            Ok(Some("xyz"))
        );
        assert_eq!(src.claimed("/", &cookies(&["sidx=1; xsid=2"])), Ok(None));
        assert_eq!(src.claimed("/", &cookies(&["flag; sid=v"])), Ok(Some("v")));
        let dup = src.claimed("/", &cookies(&["sid=a", "sid=b"])).unwrap_err();
        assert_eq!(dup.status(), StatusCode::BAD_REQUEST);
        // Another cookie's non-ASCII value does not hide ours.
        let mut other = HeaderMap::new();
        other.append(
            COOKIE,
            HeaderValue::from_bytes(b"name=Jos\xc3\xa9; sid=abc").unwrap(),
        );
        assert_eq!(src.claimed("/", &other), Ok(Some("abc")));
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_bytes(b"sid=\xff").unwrap());
        assert_eq!(
            src.claimed("/", &h).unwrap_err().status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn path_segments() {
        let src = SessionSource::PathSegment(1);
        let h = HeaderMap::new();
        assert_eq!(src.claimed("/chat/abc/messages", &h), Ok(Some("abc")));
        assert_eq!(src.claimed("/chat/abc", &h), Ok(Some("abc")));
        assert_eq!(src.claimed("/chat/", &h), Ok(None));
        assert_eq!(src.claimed("/chat", &h), Ok(None));
        assert_eq!(src.claimed("/chat//messages", &h), Ok(None));
        // A header claiming another id is ignored: the path is the source.
        let mut other = HeaderMap::new();
        other.insert("x-session-id", HeaderValue::from_static("zzz"));
        assert_eq!(src.claimed("/chat/abc", &other), Ok(Some("abc")));
        assert_eq!(
            SessionSource::PathSegment(0).claimed("/x/y", &h),
            Ok(Some("x"))
        );
    }
}
