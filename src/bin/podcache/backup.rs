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

/// An import file split into lines: its header (the first non-empty line,
/// when it is one) and its entry lines, blank lines left out.
struct ImportFile<'a> {
    /// The header as an object, so each request can carry its own count.
    header: Option<serde_json::Map<String, Value>>,
    /// Every entry line, without its line end.
    entries: Vec<&'a [u8]>,
}

impl<'a> ImportFile<'a> {
    /// Splits `text`, checking the header's `entries` (when it gives them)
    /// against the lines and each line's JSON syntax, so that nothing is
    /// sent from a file that was cut short or damaged.
    fn parse(text: &'a [u8]) -> Result<Self, String> {
        let mut lines = text
            .split(|b| *b == b'\n')
            .enumerate()
            .map(|(i, line)| (i + 1, line.trim_ascii()))
            .filter(|(_, line)| !line.is_empty())
            .peekable();
        let header: Option<serde_json::Map<String, Value>> = lines
            .next_if(|(_, line)| is_header(line))
            .and_then(|(_, line)| serde_json::from_slice(line).ok());
        let mut entries = Vec::new();
        for (number, line) in lines {
            if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(line) {
                return Err(format!(
                    "line {number} is not a JSON line ({e}); nothing was imported"
                ));
            }
            entries.push(line);
        }
        if let Some(header) = &header
            && let Some(stated) = header.get("entries")
        {
            let Some(stated) = stated.as_u64() else {
                return Err(format!(
                    "the header's entries is {stated}, not a count; nothing was imported"
                ));
            };
            if entries.len() as u64 != stated {
                return Err(format!(
                    "the file holds {} entries but its header says {stated}: it was cut short or \
                     edited; nothing was imported",
                    entries.len()
                ));
            }
        }
        Ok(Self { header, entries })
    }

    /// The header line of a request of `count` entries (none when the file
    /// has no header).
    fn header_line(&self, count: usize) -> Option<Vec<u8>> {
        let mut header = self.header.clone()?;
        header.insert("entries".into(), Value::from(count));
        let mut line = Value::Object(header).to_string().into_bytes();
        line.push(b'\n');
        Some(line)
    }

    /// Request bodies of at most [`REQUEST_BYTES`] (a single longer line
    /// goes alone), each with its own header; with the number of entries of
    /// each.
    fn requests(&self) -> Vec<(Vec<u8>, usize)> {
        // Room for the header, whose count may be longer than the file's.
        let header_bytes = self.header_line(usize::MAX).map_or(0, |h| h.len());
        let budget = REQUEST_BYTES.saturating_sub(header_bytes);
        if self.entries.is_empty() {
            // A header alone still goes, for the node to check its format.
            return self.header_line(0).map(|h| (h, 0)).into_iter().collect();
        }
        let mut requests = Vec::new();
        let mut start = 0;
        while start < self.entries.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < self.entries.len()
                && (end == start || bytes + self.entries[end].len() < budget)
            {
                bytes += self.entries[end].len() + 1;
                end += 1;
            }
            let mut body = self.header_line(end - start).unwrap_or_default();
            body.reserve(bytes);
            for line in &self.entries[start..end] {
                body.extend_from_slice(line);
                body.push(b'\n');
            }
            requests.push((body, end - start));
            start = end;
        }
        requests
    }
}

/// Whether a line is an export's header rather than an entry: a JSON object
/// with a `format` field and neither `type` nor `key` (which every entry
/// has), as the node decides it.
fn is_header(line: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Map<String, Value>>(line).is_ok_and(|object| {
        object.contains_key("format") && !object.contains_key("type") && !object.contains_key("key")
    })
}

/// `ctl import FILE`: the file merged into the node, in requests of at most
/// [`REQUEST_BYTES`], each cut at a line's end and carrying its own header
/// with its own count, so the node refuses a request that arrives cut. A
/// file whose header's count does not match its lines sends nothing.
pub(crate) async fn import(client: &RestClient, file: &Path) -> Result<(), Failure> {
    let mut text = Vec::new();
    let read = if file == Path::new("-") {
        std::io::stdin().read_to_end(&mut text)
    } else {
        std::fs::File::open(file).and_then(|mut f| f.read_to_end(&mut text))
    };
    read.map_err(|e| Failure::Config(format!("{}: {e}", file.display())))?;
    let parsed = ImportFile::parse(&text)
        .map_err(|why| Failure::Run(anyhow::anyhow!("{}: {why}", file.display())))?;
    let mut progress = Progress::new("importing", Some(parsed.entries.len() as u64));
    let (mut applied, mut stale, mut rejected) = (0u64, 0u64, 0u64);
    for (body, count) in parsed.requests() {
        let answer = client
            .request_with_type(Method::POST, "/v1/import", body, "application/x-ndjson")
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
        progress.add(json["entries"].as_u64().unwrap_or(count as u64));
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

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = r#"{"format":"podcache-export","version":1,"node":"n","entries":3}"#;

    fn line(key: &str) -> String {
        format!(r#"{{"type":1,"key":"{key}","value":"v","hlc":1,"node":"0000000000000001"}}"#)
    }

    #[test]
    fn keys_named_format_are_entries_and_the_count_is_checked_first() {
        let text = format!(
            "{HEADER}\n{}\n{}\n\n{}\n",
            line("format"),
            line("type"),
            line("k")
        );
        let parsed = ImportFile::parse(text.as_bytes()).expect("valid");
        assert_eq!(parsed.entries.len(), 3);
        let requests = parsed.requests();
        assert_eq!(requests.len(), 1);
        let first = requests[0].0.split(|b| *b == b'\n').next().expect("a line");
        let header: Value = serde_json::from_slice(first).expect("header");
        assert_eq!(header["entries"], 3);
        // The last line dropped.
        let cut = format!("{HEADER}\n{}\n{}\n", line("format"), line("type"));
        let err = ImportFile::parse(cut.as_bytes()).err().expect("cut short");
        assert!(
            err.contains("holds 2 entries but its header says 3"),
            "{err}"
        );
        // Cut inside a line.
        let torn = format!("{HEADER}\n{}\n{}\n{{\"type\":1,\"ke", line("a"), line("b"));
        let err = ImportFile::parse(torn.as_bytes()).err().expect("torn");
        assert!(err.contains("line 4 is not a JSON line"), "{err}");
    }

    #[test]
    fn each_request_carries_its_own_header_and_count() {
        let big = "x".repeat(REQUEST_BYTES / 3);
        let lines: Vec<String> = (0..7)
            .map(|i| {
                format!(
                    r#"{{"type":1,"key":"k{i}","value":"{big}","hlc":1,"node":"0000000000000001"}}"#
                )
            })
            .collect();
        let text = format!(
            "{}\n{}\n",
            HEADER.replace("\"entries\":3", "\"entries\":7"),
            lines.join("\n")
        );
        let parsed = ImportFile::parse(text.as_bytes()).expect("valid");
        let requests = parsed.requests();
        assert!(requests.len() >= 3, "{}", requests.len());
        assert_eq!(requests.iter().map(|(_, n)| n).sum::<usize>(), 7);
        for (body, count) in &requests {
            assert!(body.len() <= REQUEST_BYTES, "{}", body.len());
            let mut body_lines = body.split(|b| *b == b'\n').filter(|l| !l.is_empty());
            let header: Value =
                serde_json::from_slice(body_lines.next().expect("header")).expect("json");
            assert_eq!(header["entries"], *count);
            assert_eq!(header["format"], "podcache-export");
            assert_eq!(body_lines.count(), *count);
        }
        // Without a header, none is added.
        let bare = format!("{}\n", lines[0]);
        let parsed = ImportFile::parse(bare.as_bytes()).expect("valid");
        assert_eq!(parsed.requests()[0].0, bare.as_bytes());
    }
}
