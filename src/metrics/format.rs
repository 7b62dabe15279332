//! The two text formats `/metrics` answers in, and the choice between them.
//!
//! Owns: reading a scraper's `Accept` header, and turning the registry's
//! OpenMetrics text into the classic Prometheus text format (0.0.4).
//! Must not touch: the metrics themselves (the parent module's registry).
//!
//! Written by hand because prometheus-client encodes OpenMetrics only (its
//! Prometheus-format encoder is an open proposal, prometheus/client_rust
//! #293), and the two formats differ in a few lines of metadata: a counter's
//! family is named with `_total` in the classic format, `# UNIT` and
//! `# EOF` do not exist there, `_created` samples are not part of it, and
//! `\"` is not an escape in its HELP text.

use std::collections::HashMap;

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The classic Prometheus text format, version 0.0.4: the default.
    Prometheus,
    /// OpenMetrics 1.0.0, for scrapers that ask for it.
    OpenMetrics,
}

impl Format {
    /// The format a scraper's `Accept` header prefers. OpenMetrics only
    /// when it is named with a higher (or equal) quality than the classic
    /// format (`text/plain`, `text/*` or `*/*`); the classic format when the
    /// header is missing, unreadable or names neither.
    pub fn from_accept(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::Prometheus;
        };
        let (mut open, mut classic) = (None::<f32>, None::<f32>);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let quality = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok())
                .filter(|q| (0.0..=1.0).contains(q));
            let Some(quality) = quality else { continue };
            let best = match media.as_str() {
                "application/openmetrics-text" => &mut open,
                "text/plain" | "text/*" | "*/*" => &mut classic,
                _ => continue,
            };
            *best = Some(best.map_or(quality, |b| b.max(quality)));
        }
        match open {
            Some(o) if o > 0.0 && o >= classic.unwrap_or(0.0) => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    /// The answer's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// OpenMetrics text (as prometheus-client writes it) in the classic
/// Prometheus text format.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let types: HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let family_name = |name: &str| -> String {
        match types.get(name).copied() {
            Some("counter") => format!("{name}_total"),
            Some("info") => format!("{name}_info"),
            _ => name.to_owned(),
        }
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!(
                "# HELP {} {}\n",
                family_name(name),
                help.replace("\\\"", "\"")
            ));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let kind = match kind {
                "counter" | "gauge" | "histogram" | "summary" => kind,
                "info" | "stateset" => "gauge",
                _ => "untyped",
            };
            out.push_str(&format!("# TYPE {} {kind}\n", family_name(name)));
        } else if line.starts_with('#') {
            // `# UNIT`, `# EOF`: not part of the classic format.
        } else if !line.is_empty() && !is_created_sample(line, &types) {
            out.push_str(without_exemplar(line));
            out.push('\n');
        }
    }
    out
}

/// A counter's (or histogram's, summary's) `_created` sample.
fn is_created_sample(line: &str, types: &HashMap<&str, &str>) -> bool {
    let name = line.split(['{', ' ']).next().unwrap_or("");
    name.strip_suffix("_created")
        .is_some_and(|family| types.contains_key(family))
}

/// A sample line without an OpenMetrics exemplar (` # {...} value`), which
/// the classic format does not have. Label values may hold ` # `: the
/// label set is skipped with its quoting.
fn without_exemplar(line: &str) -> &str {
    let mut in_labels = false;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if in_quotes {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_quotes = false,
                _ => {}
            }
            continue;
        }
        match c {
            '{' => in_labels = true,
            '}' => in_labels = false,
            '"' if in_labels => in_quotes = true,
            '#' if !in_labels => return line[..i].trim_end(),
            _ => {}
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_format_is_the_default_and_openmetrics_is_asked_for() {
        use Format::*;
        assert_eq!(Format::from_accept(None), Prometheus);
        assert_eq!(Format::from_accept(Some("*/*")), Prometheus);
        assert_eq!(Format::from_accept(Some("text/plain")), Prometheus);
        assert_eq!(Format::from_accept(Some("garbage;;q=x,")), Prometheus);
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text")),
            OpenMetrics
        );
        // What Prometheus 2.x sends by default.
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,\
            application/openmetrics-text;version=0.0.1;q=0.4,\
            text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(Format::from_accept(Some(prometheus)), OpenMetrics);
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;q=0.2, text/plain")),
            Prometheus
        );
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;q=0")),
            Prometheus
        );
    }

    #[test]
    fn counters_are_named_with_total_and_openmetrics_only_lines_go() {
        let open = "\
# HELP podcache_requests Cache \\\"operations\\\" served.
# TYPE podcache_requests counter
podcache_requests_total{op=\"set\"} 1
podcache_requests_created{op=\"set\"} 1700000000.0
# HELP podcache_lag_seconds Lag.
# TYPE podcache_lag_seconds histogram
# UNIT podcache_lag_seconds seconds
podcache_lag_seconds_sum 0.5
podcache_lag_seconds_bucket{le=\"+Inf\"} 1 # {trace_id=\"a\"} 0.5
podcache_lag_seconds_count 1
# HELP podcache_ready Ready.
# TYPE podcache_ready gauge
podcache_ready{note=\"a # b\"} 1
# EOF
";
        assert_eq!(
            to_prometheus_text(open),
            "\
# HELP podcache_requests_total Cache \"operations\" served.
# TYPE podcache_requests_total counter
podcache_requests_total{op=\"set\"} 1
# HELP podcache_lag_seconds Lag.
# TYPE podcache_lag_seconds histogram
podcache_lag_seconds_sum 0.5
podcache_lag_seconds_bucket{le=\"+Inf\"} 1
podcache_lag_seconds_count 1
# HELP podcache_ready Ready.
# TYPE podcache_ready gauge
podcache_ready{note=\"a # b\"} 1
"
        );
    }
}
