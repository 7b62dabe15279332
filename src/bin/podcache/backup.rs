//! `podcache ctl export` and `ctl import`: a node's whole state as JSON
//! lines on stdout, and such a file merged back (see the format in the
//! library's `api::backup`). Progress goes to stderr: a bar when stderr is
//! a terminal, a plain line every few seconds otherwise.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::Path;
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::Method;
use podcache::client::RestClient;
use serde_json::Value;
use tokio::time::Instant;

use crate::Failure;

/// The most bytes of lines one import request carries (under the node's
/// default body limit of 8 MiB).
const REQUEST_BYTES: usize = 4 << 20;

/// Progress on stderr.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines {
        what: &'static str,
        done: u64,
        total: Option<u64>,
        last: Instant,
    },
}

impl Progress {
    fn new(what: &'static str, total: Option<u64>) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = match total {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::new_spinner(),
            };
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} entries ({per_sec}, {eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style.progress_chars("=> "));
            bar.set_message(what);
            Progress::Bar(bar)
        } else {
            Progress::Lines {
                what,
                done: 0,
                total,
                last: Instant::now(),
            }
        }
    }

    fn set_total(&mut self, n: u64) {
        match self {
            Progress::Bar(bar) => bar.set_length(n),
            Progress::Lines { total, .. } => *total = Some(n),
        }
    }

    fn add(&mut self, n: u64) {
        match self {
            Progress::Bar(bar) => bar.inc(n),
            Progress::Lines {
                what,
                done,
                total,
                last,
            } => {
                *done += n;
                if last.elapsed() >= Duration::from_secs(2) {
                    *last = Instant::now();
                    match total {
                        Some(t) => eprintln!("{what}: {done} of {t} entries"),
                        None => eprintln!("{what}: {done} entries"),
                    }
                }
            }
        }
    }

    fn finish(self, summary: &str) {
        match self {
            Progress::Bar(bar) => bar.finish_and_clear(),
            Progress::Lines { .. } => {}
        }
        eprintln!("{summary}");
    }
}

/// `ctl export`: the node's entries to stdout.
pub(crate) async fn export(client: &RestClient, ty: Option<i32>) -> Result<(), Failure> {
    let path = match ty {
        Some(ty) => format!("/v1/export?type={ty}"),
        None => "/v1/export".to_owned(),
    };
    let (status, mut body) = client
        .stream(&path)
        .await
        .map_err(|e| Failure::Run(e.into()))?;
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "export refused".into());
        return Err(Failure::Run(anyhow::anyhow!("{message} ({status})")));
    }
    let mut progress = Progress::new("exporting", None);
    let mut stdout = std::io::stdout().lock();
    let mut header_seen = false;
    let mut entries = 0u64;
    let mut partial = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Failure::Run(e.into()))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        stdout
            .write_all(data)
            .map_err(|e| Failure::Run(anyhow::anyhow!("cannot write to stdout: {e}")))?;
        partial.extend_from_slice(data);
        let Some(end) = partial.iter().rposition(|b| *b == b'\n') else {
            continue;
        };
        let mut lines = partial[..end].split(|b| *b == b'\n').count() as u64;
        if !header_seen {
            header_seen = true;
            lines -= 1;
            let first = partial.split(|b| *b == b'\n').next().unwrap_or_default();
            if let Some(total) = serde_json::from_slice::<Value>(first)
                .ok()
                .and_then(|h| h["entries"].as_u64())
            {
                progress.set_total(total);
            }
        }
        entries += lines;
        progress.add(lines);
        partial.drain(..=end);
    }
    stdout
        .flush()
        .map_err(|e| Failure::Run(anyhow::anyhow!("cannot write to stdout: {e}")))?;
    progress.finish(&format!("exported {entries} entries"));
    Ok(())
}

/// `ctl import FILE`: the file merged into the node, in requests of at most
/// [`REQUEST_BYTES`], each cut at a line's end.
pub(crate) async fn import(client: &RestClient, file: &Path) -> Result<(), Failure> {
    let mut text = Vec::new();
    let read = if file == Path::new("-") {
        std::io::stdin().read_to_end(&mut text)
    } else {
        std::fs::File::open(file).and_then(|mut f| f.read_to_end(&mut text))
    };
    read.map_err(|e| Failure::Config(format!("{}: {e}", file.display())))?;
    let total = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty() && !l.windows(8).any(|w| w == b"\"format\""))
        .count() as u64;
    let mut progress = Progress::new("importing", Some(total));
    let (mut applied, mut stale, mut rejected) = (0u64, 0u64, 0u64);
    let mut rest = &text[..];
    while !rest.is_empty() {
        let mut cut = rest.len().min(REQUEST_BYTES);
        if cut < rest.len() {
            cut = rest[..cut]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(rest.len(), |i| i + 1);
        }
        let (chunk, after) = rest.split_at(cut);
        rest = after;
        let answer = client
            .request_with_type(
                Method::POST,
                "/v1/import",
                chunk.to_vec(),
                "application/x-ndjson",
            )
            .await
            .map_err(|e| Failure::Run(e.into()))?;
        let json = answer.json();
        if !answer.status.is_success() {
            let message = json["message"].as_str().unwrap_or("import refused");
            return Err(Failure::Run(anyhow::anyhow!(
                "{message} ({}); {applied} entries were merged before it",
                answer.status
            )));
        }
        applied += json["applied"].as_u64().unwrap_or(0);
        stale += json["stale"].as_u64().unwrap_or(0);
        rejected += json["rejected"].as_u64().unwrap_or(0);
        progress.add(json["entries"].as_u64().unwrap_or(0));
    }
    progress.finish(&format!(
        "imported: {applied} applied, {stale} already held (as new or newer), {rejected} refused by a limit"
    ));
    if rejected > 0 {
        return Err(Failure::Run(anyhow::anyhow!(
            "{rejected} entries were refused by the node's limits"
        )));
    }
    Ok(())
}
