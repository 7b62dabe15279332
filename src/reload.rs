//! Noticing that secret files changed (cert-manager rotating a
//! certificate, an operator replacing the token file in a Secret).
//!
//! Owns only the comparison of file stamps; what a change means is up to
//! the caller ([`crate::tls`], [`crate::api::auth`]). Polling, not inotify:
//! Kubernetes updates a mounted Secret by swapping a symlink, which a poll of
//! the resolved file sees the same way everywhere.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::{Metrics, reload_label};

/// The modification time and length of a set of files, as last seen.
#[derive(Debug)]
pub struct FileStamps {
    paths: Vec<PathBuf>,
    seen: std::sync::Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl FileStamps {
    /// The files' stamps as they are now.
    pub fn of(paths: Vec<PathBuf>) -> Self {
        let seen = paths.iter().map(|p| stamp(p)).collect();
        Self {
            paths,
            seen: std::sync::Mutex::new(seen),
        }
    }

    /// True (and remembers the new stamps) when any file changed since the
    /// last call; a file that cannot be read counts as a change only once it
    /// is readable again, so a half-written rotation is not picked up.
    pub fn changed(&self) -> bool {
        let now: Vec<_> = self.paths.iter().map(|p| stamp(p)).collect();
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.iter().any(Option::is_none) || now == *seen {
            return false;
        }
        *seen = now;
        true
    }
}

fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Calls `reload` every `interval` until `cancel` fires, logging and
/// counting what it did (`podcache_secret_reloads_total{file, result}`):
/// `None` when nothing changed, `Some(Err)` when the changed files were
/// refused and the material in use stays.
pub(crate) async fn reload_loop<E: std::fmt::Display>(
    file: &'static str,
    interval: Duration,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    reload: impl Fn() -> Option<Result<(), E>>,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let result = match reload() {
            None => continue,
            Some(Ok(())) => {
                info!(file, "reloaded after the files changed");
                "ok"
            }
            Some(Err(err)) => {
                warn!(file, %err, "the files changed but do not load; keeping what is in use");
                "error"
            }
        };
        metrics
            .secret_reloads
            .get_or_create(&reload_label(file, result))
            .inc();
    }
}
