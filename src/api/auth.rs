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
//! A line may also limit its token to some types, `types=1,7-9` (a list
//! of int32 types and inclusive ranges): outside them every request with
//! a type is 403 `forbidden_type` (see [`Scope`] and docs/SECURITY.md for
//! the endpoints without one). A token without `types=` covers every type.

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

/// The types a token is limited to (`types=` of its line): sorted,
/// merged, inclusive ranges. A token without `types=` has no `Scope` at
/// all, so the check costs unscoped tokens one branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    ranges: Arc<[(i32, i32)]>,
}

impl Scope {
    /// Most items in one `types=` list: a scope is searched per request.
    pub const MAX_ITEMS: usize = 256;

    /// Parses `1,7-9,-3,-10--5`: comma-separated int32 types and inclusive
    /// ranges `lo-hi` (`lo <= hi`); a `-` right after a digit separates a
    /// range, any other is a sign.
    pub fn parse(list: &str) -> Result<Self, &'static str> {
        if list.is_empty() {
            return Err("types= needs a list of types, e.g. types=1,7-9");
        }
        let mut ranges = Vec::new();
        for item in list.split(',') {
            if ranges.len() >= Self::MAX_ITEMS {
                return Err("types= holds more than 256 items");
            }
            let split = item
                .char_indices()
                .skip(1)
                .find(|&(i, c)| c == '-' && item.as_bytes()[i - 1].is_ascii_digit())
                .map(|(i, _)| i);
            let number = |text: &str| {
                if text.is_empty() || text.starts_with('+') {
                    return Err("types= items are int32 types or ranges lo-hi, e.g. types=1,7-9");
                }
                text.parse::<i32>()
                    .map_err(|_| "types= items are int32 types or ranges lo-hi, e.g. types=1,7-9")
            };
            let (lo, hi) = match split {
                Some(i) => (number(&item[..i])?, number(&item[i + 1..])?),
                None => {
                    let one = number(item)?;
                    (one, one)
                }
            };
            if lo > hi {
                return Err("a types= range must not end below its start");
            }
            ranges.push((lo, hi));
        }
        ranges.sort_unstable();
        let mut merged: Vec<(i32, i32)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if i64::from(lo) <= i64::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Ok(Self {
            ranges: merged.into(),
        })
    }

    /// True when `ty` is one of the scope's types.
    pub fn covers(&self, ty: i32) -> bool {
        let after = self.ranges.partition_point(|&(lo, _)| lo <= ty);
        after > 0 && self.ranges[after - 1].1 >= ty
    }
}

impl std::fmt::Display for Scope {
    /// The canonical list, `1,7-9`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

/// What a valid token grants: its access, the name it writes as, and the
/// types it is limited to (none: every type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Read or write.
    pub access: Access,
    /// Its name (or fingerprint).
    pub name: Arc<str>,
    /// Its `types=`, if any.
    pub scope: Option<Scope>,
}

/// One line of the file.
#[derive(Debug, PartialEq, Eq)]
struct TokenLine {
    token: Vec<u8>,
    name: Arc<str>,
    scope: Option<Scope>,
}

/// The accepted tokens, each with the name it writes as.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    read: Vec<TokenLine>,
    write: Vec<TokenLine>,
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
            let mut scope = None;
            for word in words {
                if let Some(list) = word.strip_prefix("types=") {
                    if scope.is_some() {
                        return Err(error("types= is given twice"));
                    }
                    scope = Some(Scope::parse(list).map_err(error)?);
                    continue;
                }
                match word.strip_prefix("name=") {
                    Some(given) if !given.is_empty() && given.len() <= 128 => name = Some(given),
                    Some(_) => return Err(error("a token's name= must be 1 to 128 characters")),
                    None if word.contains('=') => {
                        return Err(error(
                            "unknown attribute after the token (known: name=, types=)",
                        ));
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
            list.push(TokenLine {
                token: token.as_bytes().to_vec(),
                name,
                scope,
            });
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
        self.grant_full(presented).map(|g| (g.access, g.name))
    }

    /// Everything `presented` grants: access, name and scope.
    pub fn grant_full(&self, presented: &[u8]) -> Option<Grant> {
        let mut write = None;
        for line in &self.write {
            if constant_time_eq(&line.token, presented) {
                write = Some(line);
            }
        }
        let mut read = None;
        for line in &self.read {
            if constant_time_eq(&line.token, presented) {
                read = Some(line);
            }
        }
        let (access, line) = match (write, read) {
            (Some(line), _) => (Access::Write, line),
            (None, Some(line)) => (Access::Read, line),
            (None, None) => return None,
        };
        Some(Grant {
            access,
            name: line.name.clone(),
            scope: line.scope.clone(),
        })
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

    /// What the token of `headers` grants, if it is valid (for data that
    /// an open page must not show without one).
    pub(crate) fn granted(&self, headers: &axum::http::HeaderMap) -> Option<Grant> {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .and_then(|token| self.grant(token))
    }

    fn grant(&self, presented: &[u8]) -> Option<Grant> {
        self.tokens
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .grant_full(presented)
    }
}

/// The limit of a token with `types=`, for the handlers that filter
/// rather than refuse (`/v1/export`, `/v1/cluster`): set by the gate only
/// for such tokens, so its absence means every type.
#[derive(Debug, Clone)]
pub(crate) struct Scoped {
    /// The token's name (never the token).
    pub(crate) name: Arc<str>,
    /// Its types.
    pub(crate) scope: Scope,
}

impl Scoped {
    /// 403 `forbidden_type` for `ty`, naming the type and the token.
    pub(crate) fn refuse(&self, ty: i32) -> ApiError {
        forbidden_type(
            &self.name,
            &self.scope,
            Some(ty),
            format!(
                "token {} may not use type {ty}: it covers types {} only",
                self.name, self.scope
            ),
        )
    }

    /// 403 `forbidden_type` for what only a token without `types=` may do.
    pub(crate) fn refuse_whole(&self, what: &str) -> ApiError {
        forbidden_type(
            &self.name,
            &self.scope,
            None,
            format!(
                "{what} needs a token without types=; token {} covers types {} only",
                self.name, self.scope
            ),
        )
    }
}

fn forbidden_type(name: &str, scope: &Scope, ty: Option<i32>, message: String) -> ApiError {
    let mut error = ApiError::new(StatusCode::FORBIDDEN, "forbidden_type", message)
        .with("token", name.into())
        .with("types", scope.to_string().into());
    if let Some(ty) = ty {
        error = error.with("type", ty.into());
    }
    error
}

/// The type a request's path names, read as its handler reads it (the
/// first segment after `/v1/cache/`, `/v1/watch/` or `/v1/schema/`,
/// percent-decoded; `--ofrep-type` for OFREP). None when the path names
/// none, or one that does not parse (the handler answers 400 for it).
pub(crate) fn path_type(path: &str, ofrep_type: Option<i32>) -> Option<i32> {
    if path.starts_with("/ofrep/") {
        return ofrep_type;
    }
    let rest = ["/v1/cache/", "/v1/watch/", "/v1/schema/"]
        .iter()
        .find_map(|prefix| path.strip_prefix(prefix))?;
    let segment = rest.split('/').next().unwrap_or_default();
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()?
        .parse()
        .ok()
}

/// Why a token limited to some types may not make this request, if so.
/// Requests with a type outside them; schema changes and imports (they
/// lift or bypass the checks on a type's writers); exports and the
/// cluster view filter in their handlers instead.
pub(crate) fn scope_refusal(
    scoped: &Scoped,
    method: &Method,
    path: &str,
    ofrep_type: Option<i32>,
) -> Option<ApiError> {
    if let Some(ty) = path_type(path, ofrep_type)
        && !scoped.scope.covers(ty)
    {
        return Some(scoped.refuse(ty));
    }
    let reads = method == Method::GET || method == Method::HEAD;
    if path.starts_with("/v1/schema/") && !reads {
        return Some(scoped.refuse_whole("changing a schema"));
    }
    if path == "/v1/import" {
        return Some(scoped.refuse_whole("an import"));
    }
    None
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
                Some(Some(grant)) if grant.access < needed => Some((
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
            if let Some(Some(grant)) = granted {
                if let Some(scope) = grant.scope {
                    let scoped = Scoped {
                        name: grant.name.clone(),
                        scope,
                    };
                    let ofrep_type = api.replica.config.ofrep_type;
                    if let Some(refusal) =
                        scope_refusal(&scoped, request.method(), path, ofrep_type)
                    {
                        api.replica
                            .metrics
                            .auth_failures
                            .get_or_create(&label("reason", "forbidden_type"))
                            .inc();
                        return Err(Box::new(refusal.into_response()));
                    }
                    request.extensions_mut().insert(scoped);
                }
                request.extensions_mut().insert(Caller(grant.name));
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
        for bad in [format!("write:{W} name=\n"), format!("write:{W} color=1\n")] {
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
    fn types_lists_parse_to_merged_ranges_and_refuse_nonsense() {
        let scope = Scope::parse("9,1,7-8,-3,-10--5,-4").expect("valid");
        assert_eq!(scope.to_string(), "-10--3,1,7-9");
        for ty in [-10, -7, -3, 1, 7, 8, 9] {
            assert!(scope.covers(ty), "{ty}");
        }
        for ty in [i32::MIN, -11, -2, 0, 2, 6, 10, i32::MAX] {
            assert!(!scope.covers(ty), "{ty}");
        }
        let all = Scope::parse("-2147483648-2147483647").expect("everything");
        assert!(all.covers(i32::MIN) && all.covers(0) && all.covers(i32::MAX));
        assert_eq!(Scope::parse("5").expect("one").to_string(), "5");
        let too_many = (0..=Scope::MAX_ITEMS)
            .map(|i| i.to_string())
            .collect::<Vec<_>>();
        for bad in [
            "",
            ",",
            "1,",
            "a",
            "1-",
            "-",
            "--5",
            "9-7",
            "1--5",
            "+1",
            "2147483648",
            "1-2-3",
            "1.5",
            &too_many.join(","),
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_token_line_may_limit_its_types_and_bad_lists_never_show_the_token() {
        let tokens = Tokens::parse(&format!(
            "write:{W} name=flags-team types=1,7-9\nread:{R} types=-3\nbare-token-0123456789\n"
        ))
        .expect("valid");
        let grant = tokens.grant_full(W.as_bytes()).expect("granted");
        assert_eq!((grant.access, &*grant.name), (Access::Write, "flags-team"));
        let scope = grant.scope.expect("scoped");
        assert!(scope.covers(8) && !scope.covers(2));
        let read = tokens.grant_full(R.as_bytes()).expect("granted");
        assert_eq!(read.scope.map(|s| s.to_string()).as_deref(), Some("-3"));
        let bare = tokens
            .grant_full(b"bare-token-0123456789")
            .expect("granted");
        assert_eq!(bare.scope, None, "no types=: every type");
        for (line, expect) in [
            (format!("write:{W} types=\n"), "line 1: types= needs a list"),
            (format!("write:{W} types=9-7\n"), "must not end below"),
            (format!("write:{W} types=x\n"), "int32 types or ranges"),
            (format!("write:{W} types=1 types=2\n"), "given twice"),
        ] {
            let err = Tokens::parse(&line).expect_err(&line).to_string();
            assert!(err.contains(expect), "{line}: {err}");
            assert!(!err.contains(W), "{err}");
        }
    }

    fn scoped(list: &str) -> Scoped {
        Scoped {
            name: "flags-team".into(),
            scope: Scope::parse(list).expect("valid"),
        }
    }

    #[test]
    fn a_scoped_token_is_refused_every_path_of_another_type() {
        let flags = scoped("1,7-9");
        let refused = |method: Method, path: &str| {
            scope_refusal(&flags, &method, path, Some(3)).map(|e| (e.status, e.code, e.message))
        };
        for (method, path) in [
            (Method::GET, "/v1/cache/8/k"),
            (Method::PUT, "/v1/cache/7/k/x"),
            (Method::GET, "/v1/cache/%39/k/history"),
            (Method::POST, "/v1/cache/1/k/rollback"),
            (Method::GET, "/v1/cache/1"),
            (Method::POST, "/v1/cache/9"),
            (Method::GET, "/v1/watch/7"),
            (Method::GET, "/v1/schema/7"),
            (Method::GET, "/v1/export"),
            (Method::GET, "/v1/cluster"),
            (Method::GET, "/v1/cache/x/k"),
        ] {
            assert_eq!(refused(method.clone(), path), None, "{method} {path}");
        }
        for (method, path, ty) in [
            (Method::GET, "/v1/cache/2/k", Some(2)),
            (Method::PUT, "/v1/cache/10/k", Some(10)),
            (Method::GET, "/v1/cache/-1/k/history", Some(-1)),
            (Method::POST, "/v1/cache/2/k/rollback", Some(2)),
            (Method::GET, "/v1/cache/2", Some(2)),
            (Method::POST, "/v1/cache/%32", Some(2)),
            (Method::GET, "/v1/watch/2", Some(2)),
            (Method::GET, "/v1/schema/2", Some(2)),
            (Method::POST, "/ofrep/v1/evaluate/flags/k", Some(3)),
            (Method::POST, "/ofrep/v1/evaluate/flags", Some(3)),
            (Method::PUT, "/v1/schema/7", None),
            (Method::DELETE, "/v1/schema/7", None),
            (Method::POST, "/v1/import", None),
        ] {
            let (status, code, message) = refused(method.clone(), path).expect(path);
            assert_eq!((status, code), (StatusCode::FORBIDDEN, "forbidden_type"));
            assert!(message.contains("flags-team"), "{message}");
            if let Some(ty) = ty {
                assert!(message.contains(&format!("type {ty}")), "{message}");
            }
        }
        // Without --ofrep-type OFREP has no type (and no route).
        assert!(scope_refusal(&flags, &Method::POST, "/ofrep/v1/evaluate/flags", None).is_none());
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
