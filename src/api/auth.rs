//! Bearer-token authentication of the REST API, and the limits on how much
//! work the REST port takes at once.
//!
//! Owns: the token file (format, validation, reloading), the constant-time
//! comparison, the rule of which access each request needs, and the
//! concurrency gate. Must not touch the store: a refused request is turned
//! away before any handler runs.
//!
//! Token file: one token per line, `read:<token>` (may read) or
//! `write:<token>` (may read and write); a bare `<token>` is a write token.
//! After the token a line may name it, `name=<name>`: the author of what
//! it writes. A token without a name writes as `token:<8 hex digits of
//! its SHA-256>`, never the token itself. Blank lines and `#` comments are
//! ignored. A token is at least 16 characters with no white space.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Api;
use super::error::ApiError;
use crate::metrics::label;
use crate::reload::FileStamps;

/// Shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Nothing: health, readiness, the dashboard's page itself.
    Open,
    /// A read or write token.
    Read,
    /// A write token.
    Write,
}

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file cannot be read.
    #[error("cannot read the token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line is not a valid token.
    #[error("token file line {line}: {reason}")]
    Line {
        /// 1-based line number (the token itself is never shown).
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No token at all: every request would be refused.
    #[error("the token file holds no token")]
    Empty,
}

/// The accepted tokens, each with the name it writes as.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    read: Vec<(Vec<u8>, Arc<str>)>,
    write: Vec<(Vec<u8>, Arc<str>)>,
}

/// The name a token without `name=` writes as: a short fingerprint.
fn fingerprint(token: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token);
    let hex: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("token:{hex}")
}

impl Tokens {
    /// Parses the token file format (see the module comment).
    pub fn parse(text: &str) -> Result<Self, TokenFileError> {
        let mut tokens = Tokens::default();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let error = |reason| TokenFileError::Line {
                line: index + 1,
                reason,
            };
            let mut words = line.split_whitespace();
            let spec = words.next().unwrap_or_default();
            let mut name = None;
            for word in words {
                match word.strip_prefix("name=") {
                    Some(given) if !given.is_empty() && given.len() <= 128 => name = Some(given),
                    Some(_) => return Err(error("a token's name= must be 1 to 128 characters")),
                    None if word.contains('=') => {
                        return Err(error("unknown attribute after the token (known: name=)"));
                    }
                    None => return Err(error("a token must not contain white space")),
                }
            }
            let (list, token) = if let Some(token) = spec.strip_prefix("read:") {
                (&mut tokens.read, token)
            } else if let Some(token) = spec.strip_prefix("write:") {
                (&mut tokens.write, token)
            } else {
                (&mut tokens.write, spec)
            };
            if token.len() < MIN_TOKEN_LEN {
                return Err(error("a token must be at least 16 characters"));
            }
            if token.chars().any(|c| c.is_control()) {
                return Err(error("a token must not contain white space"));
            }
            let name: Arc<str> = match name {
                Some(name) => name.into(),
                None => fingerprint(token.as_bytes()).into(),
            };
            list.push((token.as_bytes().to_vec(), name));
        }
        if tokens.read.is_empty() && tokens.write.is_empty() {
            return Err(TokenFileError::Empty);
        }
        Ok(tokens)
    }

    /// Reads and parses a token file.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// The access `presented` grants: Write, Read, or None. Every token is
    /// compared in full, in constant time for a given length, so timing
    /// tells nothing about how much of a token was right.
    pub fn grant(&self, presented: &[u8]) -> Option<Access> {
        self.grant_named(presented).map(|(access, _)| access)
    }

    /// [`Tokens::grant`] with the name the token writes as.
    pub fn grant_named(&self, presented: &[u8]) -> Option<(Access, Arc<str>)> {
        let mut write = None;
        for (token, name) in &self.write {
            if constant_time_eq(token, presented) {
                write = Some(name);
            }
        }
        let mut read = None;
        for (token, name) in &self.read {
            if constant_time_eq(token, presented) {
                read = Some(name);
            }
        }
        match (write, read) {
            (Some(name), _) => Some((Access::Write, name.clone())),
            (None, Some(name)) => Some((Access::Read, name.clone())),
            (None, None) => None,
        }
    }
}

/// Byte-wise equality whose time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(std::hint::black_box(x ^ y));
    }
    std::hint::black_box(diff) == 0
}

/// The REST API's credentials, reloaded when the file changes.
#[derive(Debug)]
pub struct Auth {
    path: PathBuf,
    tokens: RwLock<Arc<Tokens>>,
    stamps: FileStamps,
    public_metrics: bool,
    public_dashboard: bool,
}

impl Auth {
    /// Loads the token file; fails when it is missing or invalid.
    pub fn load(
        path: &Path,
        public_metrics: bool,
        public_dashboard: bool,
    ) -> Result<Self, TokenFileError> {
        let stamps = FileStamps::of(vec![path.to_owned()]);
        let tokens = Tokens::load(path)?;
        Ok(Self {
            path: path.to_owned(),
            tokens: RwLock::new(Arc::new(tokens)),
            stamps,
            public_metrics,
            public_dashboard,
        })
    }

    /// Reloads the file if it changed. A file that no longer parses is
    /// refused and the tokens in use stay; the result says which happened.
    pub fn reload_if_changed(&self) -> Option<Result<(), TokenFileError>> {
        if !self.stamps.changed() {
            return None;
        }
        Some(Tokens::load(&self.path).map(|tokens| {
            *self.tokens.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(tokens);
        }))
    }

    /// What a request for `path` with `method` needs.
    pub fn required(&self, method: &Method, path: &str) -> Access {
        match path {
            "/healthz" | "/readyz" => Access::Open,
            // The page holds no data; it asks for a token when its data
            // requests are refused.
            "/" | "/openapi.json" => Access::Open,
            "/metrics" if self.public_metrics || self.public_dashboard => Access::Open,
            "/v1/cluster" if self.public_dashboard => Access::Open,
            // OFREP evaluations are reads (of `--ofrep-type`), sent as POST.
            _ if path.starts_with("/ofrep/") => Access::Read,
            _ if method == Method::GET || method == Method::HEAD => Access::Read,
            _ => Access::Write,
        }
    }

    /// True when `headers` carry a token that may read (data that an open
    /// page must not show without one).
    pub(crate) fn may_read(&self, headers: &axum::http::HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .and_then(|token| self.grant(token))
            .is_some()
    }

    fn grant(&self, presented: &[u8]) -> Option<(Access, Arc<str>)> {
        self.tokens
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .grant_named(presented)
    }
}

/// Who a request writes as: its token's name, else its client
/// certificate's subject, else `anonymous`.
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub(crate) Arc<str>);

/// The subject of the client certificate a TLS connection presented.
#[derive(Debug, Clone)]
pub(crate) struct PeerSubject(pub(crate) Arc<str>);

/// The gate every REST request passes: concurrency first (so a flood of
/// bad credentials cannot tie up the node either), then credentials. An
/// admitted request gets the permit it holds until its answer is ready
/// (none for probes) and its [`Caller`]; a refused one gets its answer.
pub(crate) fn admit(
    api: &Api,
    permits: &Arc<Semaphore>,
    request: &mut Request,
) -> Result<Option<OwnedSemaphorePermit>, Box<Response>> {
    let permit = admit_inner(api, permits, request)?;
    if request.extensions().get::<Caller>().is_none() {
        let caller = match request.extensions().get::<PeerSubject>() {
            Some(subject) => subject.0.clone(),
            None => Arc::from("anonymous"),
        };
        request.extensions_mut().insert(Caller(caller));
    }
    Ok(permit)
}

fn admit_inner(
    api: &Api,
    permits: &Arc<Semaphore>,
    request: &mut Request,
) -> Result<Option<OwnedSemaphorePermit>, Box<Response>> {
    let path = request.uri().path();
    let probe = path == "/healthz" || path == "/readyz";
    // Probes are never turned away: an overloaded node must not be killed
    // by its liveness probe for it.
    let permit = if probe {
        None
    } else {
        match permits.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                api.replica
                    .metrics
                    .overloaded
                    .get_or_create(&label("what", "requests"))
                    .inc();
                let mut response = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "too many requests in progress; retry shortly",
                )
                .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return Err(Box::new(response));
            }
        }
    };
    if let Some(auth) = &api.auth {
        let needed = auth.required(request.method(), path);
        if needed != Access::Open {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
            let granted = presented.map(|token| auth.grant(token));
            let refusal = match &granted {
                None => Some((
                    "missing",
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this endpoint needs a bearer token (Authorization: Bearer <token>)",
                )),
                Some(None) => Some((
                    "invalid",
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the bearer token is not valid",
                )),
                Some(Some((granted, _))) if *granted < needed => Some((
                    "forbidden",
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "this token may read but not write",
                )),
                Some(Some(_)) => None,
            };
            if let Some((reason, status, code, message)) = refusal {
                api.replica
                    .metrics
                    .auth_failures
                    .get_or_create(&label("reason", reason))
                    .inc();
                let mut response = ApiError::new(status, code, message).into_response();
                if status == StatusCode::UNAUTHORIZED {
                    response.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"podcache\""),
                    );
                }
                return Err(Box::new(response));
            }
            if let Some(Some((_, name))) = granted {
                request.extensions_mut().insert(Caller(name));
            }
        }
    }
    Ok(permit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: &str = "write-token-0123456789";
    const R: &str = "read-token-0123456789";

    #[test]
    fn the_token_file_grants_read_and_write() {
        let tokens = Tokens::parse(&format!(
            "# tokens\n\nwrite:{W}\nread:{R}\n  bare-token-0123456789  \n"
        ))
        .expect("valid");
        assert_eq!(tokens.grant(W.as_bytes()), Some(Access::Write));
        assert_eq!(tokens.grant(b"bare-token-0123456789"), Some(Access::Write));
        assert_eq!(tokens.grant(R.as_bytes()), Some(Access::Read));
        assert_eq!(tokens.grant(b"read-token-012345678"), None, "a prefix");
        assert_eq!(tokens.grant(b"read-token-01234567890"), None, "longer");
        assert_eq!(tokens.grant(b""), None);
    }

    #[test]
    fn a_token_writes_as_its_name_or_a_fingerprint_never_itself() {
        let tokens =
            Tokens::parse(&format!("write:{W} name=flags-team\nread:{R}\n")).expect("valid");
        let (access, name) = tokens.grant_named(W.as_bytes()).expect("granted");
        assert_eq!((access, &*name), (Access::Write, "flags-team"));
        let (_, name) = tokens.grant_named(R.as_bytes()).expect("granted");
        assert!(name.starts_with("token:") && name.len() == 14, "{name}");
        assert!(!name.contains(R) && !R.contains(&name[6..]), "{name}");
        assert_eq!(name, fingerprint(R.as_bytes()).into(), "stable");
        for bad in [format!("write:{W} name=\n"), format!("write:{W} types=1\n")] {
            assert!(Tokens::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_token_files_are_refused_without_showing_the_token() {
        for (text, expect) in [
            ("", "holds no token"),
            ("# only a comment\n", "holds no token"),
            ("read:short\n", "line 1: a token must be at least 16"),
            (
                "\nwrite:has a space in it ok\n",
                "line 2: a token must not contain white space",
            ),
        ] {
            let err = Tokens::parse(text).expect_err(text).to_string();
            assert!(err.contains(expect), "{text:?}: {err}");
            assert!(!err.contains("short") && !err.contains("space in"), "{err}");
        }
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
