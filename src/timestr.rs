//! The one parser of time strings typed by people: plugin configuration (`query_start`), the CLI's
//! `\show` range, `mkts import`'s automatic time column. All of them accept the same spellings, as UTC:
//!
//! - Unix seconds, optionally with up to 9 fractional digits: `1704164645`, `1704164645.25`
//! - RFC 3339: `2024-01-02T03:04:05Z`, `2024-01-02T03:04:05.5+01:00`
//! - `2024-01-02 03:04:05[.fff]`, `2024-01-02T03:04:05[.fff]`, `2024-01-02 03:04`, `2024-01-02T03:04`
//! - `20240102 030405`
//! - `2024-01-02` (midnight)

use chrono::{NaiveDate, NaiveDateTime};

/// A time string none of the spellings match, or a time outside the nanosecond range (years 1677–2262).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeParseError {
    #[error("cannot parse time {0:?} (use 2024-01-02, 2024-01-02T15:04[:05], 2024-01-02 15:04:05, RFC 3339 or Unix seconds)")]
    Unrecognised(String),
    #[error("time {0:?} is out of range")]
    OutOfRange(String),
}

const LAYOUTS: [&str; 6] = ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%Y%m%d %H%M%S", "%Y-%m-%dT%H:%M:%SZ"];

/// Nanoseconds since the Unix epoch (UTC) of a time string.
///
/// ```
/// use mkts::timestr::parse_time_nanos;
/// assert_eq!(parse_time_nanos("2024-01-02 03:04:05").unwrap(), 1_704_164_645_000_000_000);
/// assert_eq!(parse_time_nanos("1704164645.5").unwrap(), 1_704_164_645_500_000_000);
/// assert!(parse_time_nanos("yesterday").is_err());
/// ```
pub fn parse_time_nanos(s: &str) -> Result<i64, TimeParseError> {
    let s = s.trim();
    let range = || TimeParseError::OutOfRange(s.to_string());
    if let Some(n) = parse_unix_nanos(s) {
        return n;
    }
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(s) {
        return d.timestamp_nanos_opt().ok_or_else(range);
    }
    for f in LAYOUTS {
        if let Ok(d) = NaiveDateTime::parse_from_str(s, f) {
            return d.and_utc().timestamp_nanos_opt().ok_or_else(range);
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).and_then(|t| t.and_utc().timestamp_nanos_opt()).ok_or_else(range);
    }
    Err(TimeParseError::Unrecognised(s.to_string()))
}

/// Unix seconds (UTC, rounded down) of a time string; see [`parse_time_nanos`].
pub fn parse_time_secs(s: &str) -> Result<i64, TimeParseError> {
    parse_time_nanos(s).map(|n| n.div_euclid(1_000_000_000))
}

/// `Some` when `s` is a Unix time in seconds (`-12`, `1704164645`, `1704164645.000000001`): its
/// nanoseconds, or the out-of-range error. `None` when it is not a number at all.
pub fn parse_unix_nanos(s: &str) -> Option<Result<i64, TimeParseError>> {
    let s = s.trim();
    let range = || TimeParseError::OutOfRange(s.to_string());
    if let Ok(n) = s.parse::<i64>() {
        return Some(n.checked_mul(1_000_000_000).ok_or_else(range));
    }
    let (int, frac) = s.split_once('.')?;
    let secs: i64 = int.parse().ok()?;
    if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: i64 = format!("{frac:0<9}").parse().ok()?;
    let sign = if int.starts_with('-') { -1 } else { 1 };
    Some(secs.checked_mul(1_000_000_000).and_then(|v| v.checked_add(sign * nanos)).ok_or_else(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling() {
        let t = 1_704_164_645;
        for s in ["2024-01-02 03:04:05", "2024-01-02T03:04:05", "2024-01-02T03:04:05Z", "2024-01-02T04:04:05+01:00", "20240102 030405", " 1704164645 "] {
            assert_eq!(parse_time_secs(s), Ok(t), "{s}");
        }
        assert_eq!(parse_time_secs("2024-01-02 03:04"), Ok(t - 5));
        assert_eq!(parse_time_secs("2024-01-02T03:04"), Ok(t - 5));
        assert_eq!(parse_time_secs("2024-01-02"), Ok(1_704_153_600));
        assert_eq!(parse_time_nanos("2024-01-02 03:04:05.25"), Ok(t * 1_000_000_000 + 250_000_000));
        assert_eq!(parse_time_nanos("-1.5"), Ok(-1_500_000_000));
        assert_eq!(parse_time_secs("-1.5"), Ok(-2));
        assert!(matches!(parse_time_nanos("99999999999"), Err(TimeParseError::OutOfRange(_))));
        assert!(matches!(parse_time_nanos("2024-13-01"), Err(TimeParseError::Unrecognised(_))));
        assert_eq!(parse_unix_nanos("2024-01-02"), None);
    }
}
