//! A small client of the REST API, used by `podcache ctl`, the demo and the
//! tests. One pooled HTTP/1.1 connection set per client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Why a REST call failed before an answer could be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not `http://host:port` (or `https://`).
    #[error("invalid node address {0:?}: expected http://host:port or https://host:port")]
    BadAddress(String),
    /// `https://` without a CA to check the node's certificate with.
    #[error("{0} is https: give the CA that signed its certificate (--cacert)")]
    NoCa(String),
    /// The request could not be built.
    #[error("invalid request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The node could not be reached or the connection broke.
    #[error("cannot reach {addr}: {source}")]
    Connect {
        /// The node's address.
        addr: String,
        /// What failed.
        source: hyper_util::client::legacy::Error,
    },
    /// The answer's body could not be read.
    #[error("reading the answer: {0}")]
    Body(#[from] hyper::Error),
    /// The node did not answer in time.
    #[error("{0} did not answer within the timeout")]
    Timeout(String),
    /// The token cannot be sent in a header (control characters).
    #[error("the token holds characters that cannot go into an HTTP header")]
    BadToken,
    /// The reason cannot be sent in a header (control characters).
    #[error("the reason holds characters that cannot go into an HTTP header")]
    BadReason,
}

fn client_with(config: rustls::ClientConfig) -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(3)));
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// An answer: status, content type and body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: StatusCode,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// `ETag`, when the answer has one (an entry's version, quoted).
    pub etag: Option<String>,
    /// The raw body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client of one node's REST API.
#[derive(Debug, Clone)]
pub struct RestClient {
    base: String,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    /// `Authorization` header value, for nodes with `--auth-token-file`.
    bearer: Option<hyper::header::HeaderValue>,
    /// `X-Podcache-Reason` sent with every request (writes keep it).
    reason: Option<hyper::header::HeaderValue>,
}

impl RestClient {
    /// A client of the node at `base` (`http://host:port`, or `host:port`).
    /// For `https://`, use [`RestClient::with_tls`].
    pub fn new(base: &str) -> Result<Self, ClientError> {
        let has_scheme = base.contains("://");
        let base = base.trim_end_matches('/');
        let base = if has_scheme {
            base.to_owned()
        } else {
            format!("http://{base}")
        };
        let plain = base.starts_with("http://") && base.len() > "http://".len();
        let tls = base.starts_with("https://") && base.len() > "https://".len();
        if !plain && !tls {
            return Err(ClientError::BadAddress(base));
        }
        // Plain HTTP only until a CA is given: no system roots to trust.
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        });
        let Ok(config) = config else {
            return Err(ClientError::BadAddress(base));
        };
        Ok(Self {
            client: client_with(config),
            base,
            timeout: Duration::from_secs(30),
            bearer: None,
            reason: None,
        })
    }

    /// The same client speaking HTTPS with `config` (see
    /// [`crate::http_tls::client_config`]).
    pub fn with_tls(mut self, mut config: rustls::ClientConfig) -> Self {
        // The connector names the protocol itself (and refuses a config
        // that already does).
        config.alpn_protocols.clear();
        self.client = client_with(config);
        self
    }

    /// Fails for an `https://` base when no TLS configuration was given.
    pub fn require_tls_for_https(&self, has_tls: bool) -> Result<(), ClientError> {
        if self.base.starts_with("https://") && !has_tls {
            return Err(ClientError::NoCa(self.base.clone()));
        }
        Ok(())
    }

    /// The same client sending `token` as a bearer token with every request.
    pub fn with_token(mut self, token: &str) -> Result<Self, ClientError> {
        let mut value = hyper::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .map_err(|_| ClientError::BadToken)?;
        value.set_sensitive(true);
        self.bearer = Some(value);
        Ok(self)
    }

    /// The same client saying why it writes (`X-Podcache-Reason`, kept
    /// with every entry it writes).
    pub fn with_reason(mut self, reason: &str) -> Result<Self, ClientError> {
        let value =
            hyper::header::HeaderValue::from_str(reason).map_err(|_| ClientError::BadReason)?;
        self.reason = Some(value);
        Ok(self)
    }

    /// The same client with another deadline for each request (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Any request; `path` starts with `/` and is sent as given.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<Answer, ClientError> {
        self.send(method, path, body.into(), None).await
    }

    /// Any request with extra headers (`Accept`, `If-None-Match`, ...),
    /// sent after the client's own.
    pub async fn request_with_headers(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, ClientError> {
        self.send_with(method, path, body.into(), None, headers)
            .await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        content_type: Option<&str>,
    ) -> Result<Answer, ClientError> {
        self.send_with(method, path, body, content_type, &[]).await
    }

    async fn send_with(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        content_type: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, ClientError> {
        let response = self.start(method, path, body, content_type, headers);
        let call = async {
            let response = response.await?;
            let status = response.status();
            let content_type = response
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let etag = response
                .headers()
                .get(hyper::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = response.into_body().collect().await?.to_bytes();
            Ok(Answer {
                status,
                content_type,
                etag,
                body,
            })
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| ClientError::Timeout(self.base.clone()))?
    }

    /// Any request with a `Content-Type`.
    pub async fn request_with_type(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
        content_type: &str,
    ) -> Result<Answer, ClientError> {
        self.send(method, path, body.into(), Some(content_type))
            .await
    }

    /// `GET path` whose body is read as it arrives (a watch stream): the
    /// status and the body, with no overall deadline.
    pub async fn stream(
        &self,
        path: &str,
    ) -> Result<(StatusCode, hyper::body::Incoming), ClientError> {
        let response = self
            .start(Method::GET, path, Bytes::new(), None, &[])
            .await?;
        Ok((response.status(), response.into_body()))
    }

    /// Sends a request and waits for the answer's head.
    async fn start(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        content_type: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        if let Some(content_type) = content_type {
            request = request.header(hyper::header::CONTENT_TYPE, content_type);
        }
        if let Some(bearer) = &self.bearer {
            request = request.header(hyper::header::AUTHORIZATION, bearer.clone());
        }
        if let Some(reason) = &self.reason {
            request = request.header("x-podcache-reason", reason.clone());
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body))?;
        self.client
            .request(request)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.base.clone(),
                source,
            })
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.request(Method::GET, path, Bytes::new()).await
    }

    /// `GET /v1/cache/{ty}/{key}`: the value, or `None` on 404.
    pub async fn get_value(&self, ty: i32, key: &str) -> Result<Option<String>, ClientError> {
        let answer = self.get(&entry_path(ty, key)).await?;
        if answer.status != StatusCode::OK {
            return Ok(None);
        }
        Ok(answer.json()["value"].as_str().map(str::to_owned))
    }

    /// `PUT /v1/cache/{ty}/{key}` with `query` (e.g. `wait=all`, or empty).
    pub async fn put(
        &self,
        ty: i32,
        key: &str,
        value: &str,
        query: &str,
    ) -> Result<Answer, ClientError> {
        let mut path = entry_path(ty, key);
        if !query.is_empty() {
            path.push('?');
            path.push_str(query);
        }
        self.request(Method::PUT, &path, value.to_owned()).await
    }

    /// `DELETE /v1/cache/{ty}/{key}`.
    pub async fn delete(&self, ty: i32, key: &str, query: &str) -> Result<Answer, ClientError> {
        let mut path = entry_path(ty, key);
        if !query.is_empty() {
            path.push('?');
            path.push_str(query);
        }
        self.request(Method::DELETE, &path, Bytes::new()).await
    }
}

/// `/v1/cache/{ty}/{key}` with the key percent-encoded.
pub fn entry_path(ty: i32, key: &str) -> String {
    format!("/v1/cache/{ty}/{}", percent_encode(key))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_percent_encoded() {
        assert_eq!(entry_path(3, "a/b c%ü"), "/v1/cache/3/a%2Fb%20c%25%C3%BC");
    }

    #[test]
    fn addresses_without_scheme_get_http() {
        assert_eq!(
            RestClient::new("127.0.0.1:8087")
                .map(|c| c.base)
                .ok()
                .as_deref(),
            Some("http://127.0.0.1:8087")
        );
        // https is taken (the CA comes with `with_tls`); anything else is not.
        assert_eq!(
            RestClient::new("https://x/")
                .map(|c| c.base)
                .ok()
                .as_deref(),
            Some("https://x")
        );
        for bad in ["ftp://x", "http://", "https://"] {
            assert!(RestClient::new(bad).is_err(), "{bad} was taken");
        }
    }
}
