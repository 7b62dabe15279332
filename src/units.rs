//! Durations as flags take them (`10s`, `250ms`, `24h`, `1h30m`), and as
//! their help prints them.
//!
//! Owns: the text form of durations. Parsing is humantime's; a bare number
//! is refused with a hint, since the `-ms` twins of these flags take bare
//! milliseconds and the two must not be confused.

use std::time::Duration;

/// Parses a duration with a unit.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{text:?} has no unit: write e.g. {text}ms or {text}s (the -ms form of the flag takes bare milliseconds)"
        ));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like 10s, 250ms or 24h: {e}"))
}

/// [`parse_duration`], in whole milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let duration = parse_duration(text)?;
    u64::try_from(duration.as_millis()).map_err(|_| format!("{text:?} is too long"))
}

/// The text form of a duration, as defaults are shown (`10s`, `24h`).
pub fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_print_back_the_same() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        for d in [
            Duration::from_millis(250),
            Duration::from_secs(600),
            Duration::from_secs(86_400),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        let bare = parse_duration("5000").expect_err("no unit");
        assert!(bare.contains("5000ms"), "{bare}");
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }
}
