//! The first stop of every REST request: the gate (in-flight limit, bearer
//! tokens), then the entry endpoint `/v1/cache/{type}/{key}` dispatched
//! here, and every other path handed to the axum router.
//!
//! Why the entry endpoint is not an axum route: it is the hot one (every
//! single read and write), and callgrind of a node serving GETs counted
//! ~7k of its 18.5k instructions per request in axum's layers around the
//! handler — the router's match and path-parameter vector, the middleware's
//! boxed and cloned services, their futures — against ~3.5k for the gate,
//! the lookup and the answer. The path has one shape, so it is split here
//! by hand; its answers (errors included) are the ones the route gave.
//!
//! Owns: the order of the gate and the dispatch, the parsing of the entry
//! path. Must not touch: the handlers' work (in the parent module) or the
//! gate's rules (in `auth`).

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::{BoxFuture, Either};
use tokio::sync::Semaphore;

use super::Api;
use super::ApiError;

/// The REST service of one node: [`tower::Service`] over every request.
#[derive(Clone)]
pub(crate) struct Front {
    api: Arc<Api>,
    /// Requests in progress (`max_concurrent_requests`).
    permits: Arc<Semaphore>,
    /// Every endpoint but the entry one.
    routes: Router,
}

type Answer = Result<Response, Infallible>;

impl Front {
    pub(crate) fn new(api: Arc<Api>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(api.replica.config.max_concurrent_requests)),
            routes: super::routes(api.clone()),
            api,
        }
    }
}

impl tower::Service<Request> for Front {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Answer>, BoxFuture<'static, Answer>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let permit = match super::auth::admit(&self.api, &self.permits, &mut request) {
            Ok(permit) => permit,
            Err(refusal) => return Either::Left(ready(Ok(*refusal))),
        };
        let Some((ty, key)) = entry_path(request.uri().path()) else {
            let answer = tower::Service::call(&mut self.routes, request);
            return Either::Right(Box::pin(async move {
                let answer = answer.await;
                drop(permit);
                answer
            }));
        };
        // The order of the route this replaces: an empty key, then the
        // method, then the path's encoding and the type.
        if key.is_empty() {
            return Either::Left(ready(Ok(super::empty_key().into_response())));
        }
        let method = request.method().clone();
        // A key's history and rollback: `/history` and `/rollback` after
        // the key as sent (a key that itself ends so is sent with its `/`
        // as `%2F`).
        let is_read = method == Method::GET || method == Method::HEAD;
        let (key, sub) = match (key.strip_suffix("/history"), key.strip_suffix("/rollback")) {
            (Some(key), _) if is_read && !key.is_empty() => (key, Sub::History),
            (_, Some(key)) if method == Method::POST && !key.is_empty() => (key, Sub::Rollback),
            _ => (key, Sub::Entry),
        };
        if sub == Sub::Entry
            && !matches!(
                method,
                Method::GET | Method::HEAD | Method::PUT | Method::DELETE
            )
        {
            let mut answer = super::method_not_allowed().into_response();
            answer.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET,HEAD,PUT,DELETE"),
            );
            return Either::Left(ready(Ok(answer)));
        }
        let target = decode(ty, "type").and_then(|ty| {
            let ty = super::parse_type(&ty)?;
            Ok((ty, decode(key, "key")?.into_owned()))
        });
        let (ty, key) = match target {
            Ok(target) => target,
            Err(error) => return Either::Left(ready(Ok(error.into_response()))),
        };
        if sub == Sub::History {
            let answer = super::get_history(&self.api, ty, &key);
            return Either::Left(ready(Ok(answer.into_response())));
        }
        if is_read && sub == Sub::Entry {
            let answer = super::get_entry(&self.api, ty, &key, request.headers());
            return Either::Left(ready(Ok(answer.into_response())));
        }
        let api = self.api.clone();
        Either::Right(Box::pin(async move {
            let answer = if method == Method::PUT {
                super::put_entry(&api, ty, key, request)
                    .await
                    .into_response()
            } else {
                let (parts, _) = request.into_parts();
                if sub == Sub::Rollback {
                    super::rollback(&api, ty, key, &parts).await.into_response()
                } else {
                    super::delete_entry(&api, ty, key, &parts)
                        .await
                        .into_response()
                }
            };
            drop(permit);
            Ok(answer)
        }))
    }
}

/// Which endpoint under an entry's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    Entry,
    History,
    Rollback,
}

/// What the entry endpoint makes of a request path: the type and the
/// decoded key, or the error it answers. For the fuzz targets.
#[cfg(feature = "fuzzing")]
pub(crate) fn parse_entry_path(path: &str) -> Option<Result<(i32, String), ApiError>> {
    let (ty, key) = entry_path(path)?;
    Some(decode(ty, "type").and_then(|ty| {
        let ty = super::parse_type(&ty)?;
        Ok((ty, decode(key, "key")?.into_owned()))
    }))
}

/// `/v1/cache/{type}/{key}`, still percent-encoded; the key is the rest of
/// the path and may hold `/`. None for any other path.
fn entry_path(path: &str) -> Option<(&str, &str)> {
    path.strip_prefix("/v1/cache/")?.split_once('/')
}

/// Percent-decodes one segment, as axum's path extraction does (a `%` not
/// followed by two hex digits stays as it is).
fn decode<'a>(segment: &'a str, name: &str) -> Result<Cow<'a, str>, ApiError> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| {
            ApiError::bad_request(
                "invalid_path",
                format!("Invalid URL: Invalid UTF-8 in `{name}`"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entry_path_is_split_at_the_first_slash_after_the_type() {
        assert_eq!(entry_path("/v1/cache/1/k"), Some(("1", "k")));
        assert_eq!(entry_path("/v1/cache/1//x/y"), Some(("1", "/x/y")));
        assert_eq!(entry_path("/v1/cache/1/"), Some(("1", "")));
        assert_eq!(entry_path("/v1/cache//k"), Some(("", "k")));
        assert_eq!(entry_path("/v1/cache/1"), None);
        assert_eq!(entry_path("/v1/watch/1/k"), None);
        assert_eq!(entry_path("/v1/cachex/1/k"), None);
    }

    #[test]
    fn segments_decode_like_axum_paths() {
        assert_eq!(decode("a%2Fb%20c", "key").ok().as_deref(), Some("a/b c"));
        assert_eq!(decode("k%zz%", "key").ok().as_deref(), Some("k%zz%"));
        assert_eq!(decode("%C3%BC", "key").ok().as_deref(), Some("ü"));
        assert!(decode("%FF%FE", "key").is_err());
    }
}
