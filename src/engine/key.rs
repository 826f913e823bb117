//! Bucket keys (`SYMBOL/TIMEFRAME/ATTRGROUP`) and timeframes.
//!
//! A key names a directory under the root, so every segment is validated to be one safe path
//! component: keys never escape the root.

use std::fmt;

use super::error::{EngineError, Result};

/// MarketStore's category suffix, accepted (and stripped) on input and added on output where clients expect it.
pub const DEFAULT_CATEGORIES: &str = "Symbol/Timeframe/AttributeGroup";

/// A validated time bucket key, e.g. `AAPL/1Min/OHLCV`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    pub symbol: String,
    pub timeframe: String,
    pub attr_group: String,
}

impl BucketKey {
    /// Parse `SYM/TF/GROUP`, optionally followed by `:Symbol/Timeframe/AttributeGroup`.
    ///
    /// ```
    /// let k = mkts::engine::BucketKey::parse("AAPL/1Min/OHLCV:Symbol/Timeframe/AttributeGroup").unwrap();
    /// assert_eq!(k.to_string(), "AAPL/1Min/OHLCV");
    /// assert!(mkts::engine::BucketKey::parse("../1Min/OHLCV").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Self> {
        let items = strip_categories(s)?;
        let parts: Vec<&str> = items.split('/').collect();
        if parts.len() != 3 {
            return Err(invalid(s, "a key must have exactly three parts SYMBOL/TIMEFRAME/ATTRGROUP"));
        }
        Self::from_parts(parts[0], parts[1], parts[2])
    }

    /// Build a key from its three segments, validating each.
    pub fn from_parts(symbol: &str, timeframe: &str, attr_group: &str) -> Result<Self> {
        let full = format!("{symbol}/{timeframe}/{attr_group}");
        for seg in [symbol, timeframe, attr_group] {
            validate_segment(seg).map_err(|r| invalid(&full, &r))?;
        }
        // A directory name: the timeframe's own spelling, letters and digits only (no quotes or blanks
        // that the timeframe parser would trim).
        if !timeframe.chars().all(|c| c.is_ascii_alphanumeric()) || Timeframe::parse(timeframe).is_err() {
            return Err(invalid(&full, &format!("unknown timeframe {timeframe:?}")));
        }
        Ok(BucketKey { symbol: symbol.into(), timeframe: timeframe.into(), attr_group: attr_group.into() })
    }

    /// The parsed timeframe (always valid for a constructed key).
    pub fn tf(&self) -> Timeframe {
        Timeframe::parse(&self.timeframe).unwrap_or(Timeframe { n: 1, unit: TfUnit::Min })
    }

    /// The key with MarketStore's category suffix, as returned in NumpyMultiDataset maps.
    pub fn with_categories(&self) -> String {
        format!("{self}:{DEFAULT_CATEGORIES}")
    }
}

impl fmt::Display for BucketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.symbol, self.timeframe, self.attr_group)
    }
}

fn invalid(key: &str, reason: &str) -> EngineError {
    EngineError::InvalidKey { key: key.to_string(), reason: reason.to_string() }
}

fn strip_categories(s: &str) -> Result<&str> {
    match s.split_once(':') {
        None => Ok(s),
        Some((items, cats)) => {
            if cats.eq_ignore_ascii_case(DEFAULT_CATEGORIES) {
                Ok(items)
            } else {
                Err(invalid(s, "only the categories Symbol/Timeframe/AttributeGroup are supported"))
            }
        }
    }
}

/// One path segment: non-empty, at most 128 bytes, no separators, NUL, control characters, wildcards or
/// list commas, and not hidden (`.`-prefixed, which also rules out `.` and `..`).
fn validate_segment(seg: &str) -> std::result::Result<(), String> {
    if seg.is_empty() {
        return Err("empty segment".into());
    }
    if seg.len() > 128 {
        return Err("segment longer than 128 bytes".into());
    }
    if seg.starts_with('.') {
        return Err(format!("segment {seg:?} may not start with '.'"));
    }
    if let Some(c) = seg.chars().find(|c| matches!(c, '/' | '\\' | '\0' | ':' | ',' | '*' | '?') || c.is_control()) {
        return Err(format!("segment {seg:?} contains the forbidden character {c:?}"));
    }
    Ok(())
}

/// A key pattern for reads: one symbol, a comma list of symbols, or `*`, over one timeframe and group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySelector {
    /// `None` means every symbol (`*`).
    pub symbols: Option<Vec<String>>,
    pub timeframe: String,
    pub attr_group: String,
}

impl KeySelector {
    /// Parse `AAPL/1Min/OHLCV`, `AAPL,TSLA/1Min/OHLCV` or `*/1Min/OHLCV` (categories suffix allowed).
    pub fn parse(s: &str) -> Result<Self> {
        let items = strip_categories(s)?;
        let parts: Vec<&str> = items.split('/').collect();
        if parts.len() != 3 {
            return Err(invalid(
                s,
                &format!("destinations must have a Symbol, Timeframe and AttributeGroup, have: {items}"),
            ));
        }
        let symbols = if parts[0] == "*" {
            None
        } else {
            let syms: Vec<String> = parts[0].split(',').map(|x| x.trim().to_string()).collect();
            for sym in &syms {
                BucketKey::from_parts(sym, parts[1], parts[2])?;
            }
            Some(syms)
        };
        if symbols.is_none() {
            BucketKey::from_parts("x", parts[1], parts[2])?;
        }
        Ok(KeySelector { symbols, timeframe: parts[1].into(), attr_group: parts[2].into() })
    }

    /// True when the selector names exactly one bucket.
    pub fn is_single(&self) -> bool {
        matches!(&self.symbols, Some(v) if v.len() == 1)
    }
}

/// An anchored glob over `SYMBOL/TIMEFRAME/ATTRGROUP` with `*` matching one whole segment (or, inside a
/// segment, any run of characters), as used by trigger `on:` patterns and subscriptions.
///
/// ```
/// use mkts::engine::{BucketKey, KeyPattern};
/// let p = KeyPattern::parse("*/1Min/OHLCV").unwrap();
/// assert!(p.matches(&BucketKey::parse("AAPL/1Min/OHLCV").unwrap()));
/// assert!(!p.matches(&BucketKey::parse("AAPL/1Min/OHLCVX").unwrap()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPattern {
    segments: [String; 3],
}

impl KeyPattern {
    /// Parse a three-segment pattern (categories suffix allowed).
    pub fn parse(s: &str) -> Result<Self> {
        let items = strip_categories(s)?;
        let parts: Vec<&str> = items.split('/').collect();
        if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(invalid(s, "a pattern must have exactly three non-empty parts, e.g. */1Min/OHLCV"));
        }
        Ok(KeyPattern { segments: [parts[0].into(), parts[1].into(), parts[2].into()] })
    }

    /// True when every segment matches.
    pub fn matches(&self, key: &BucketKey) -> bool {
        glob(&self.segments[0], &key.symbol) && glob(&self.segments[1], &key.timeframe) && glob(&self.segments[2], &key.attr_group)
    }
}

impl fmt::Display for KeyPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.segments[0], self.segments[1], self.segments[2])
    }
}

/// Anchored glob with `*` as the only wildcard.
fn glob(pat: &str, s: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0usize, 0usize, None::<usize>, 0usize);
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// The one timeframe type, owned by the `mkts-udf` crate (bucket keys, functions and plugins share its
/// parse rule); re-exported here under the engine's names.
pub use mkts_udf::{Timeframe, Unit as TfUnit};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unsafe_keys() {
        for bad in ["../1Min/OHLCV", "A/1Min", "A//OHLCV", "A/1Min/.x", "/etc/1Min/X", "A\0/1Min/X", "A/1Min/B/C", "A/1Foo/X"] {
            assert!(BucketKey::parse(bad).is_err(), "{bad}");
        }
        assert!(BucketKey::parse("BRK.B/1D/OHLCV").is_ok());
        assert!(BucketKey::parse("gdax_BTC-USD/1Min/OHLCV").is_ok());
    }

    #[test]
    fn truncates() {
        let tf = Timeframe::parse("5Min").unwrap();
        assert_eq!(tf.truncate(1_700_000_123), 1_700_000_100);
        let d = Timeframe::parse("1D").unwrap();
        assert_eq!(d.truncate(86400 * 3 + 5), 86400 * 3);
        let m = Timeframe::parse("1M").unwrap();
        assert_eq!(m.truncate(1_700_000_000), 1_698_796_800); // 2023-11-01
        let w = Timeframe::parse("1W").unwrap();
        assert_eq!(w.truncate(1_700_000_000), 1_699_833_600); // Monday 2023-11-13
    }

    #[test]
    fn selectors() {
        let s = KeySelector::parse("A,B/1Min/OHLCV").unwrap();
        assert_eq!(s.symbols, Some(vec!["A".to_string(), "B".to_string()]));
        assert!(KeySelector::parse("*/1Min/OHLCV").unwrap().symbols.is_none());
    }
}
