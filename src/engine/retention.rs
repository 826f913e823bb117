//! Retention: how long each bucket keeps its rows (`retention:` in `mkts.yml`).
//!
//! Rules are `(pattern, keep)` pairs in order; a bucket follows the first rule whose pattern matches its key
//! (anchored globs, as for triggers) and no rule keeps everything. The writer applies them at checkpoints
//! (at the first tick after start-up, then at least once a minute, at every forced checkpoint and at
//! shutdown): rows older than `now - keep` are removed by an
//! ordinary logged range delete, so a crash at any point replays or finishes it; year partitions left empty
//! are removed at the checkpoint after.

use std::time::Duration;

use super::{EngineError, KeyPattern, Result};

/// One retention rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionRule {
    /// Keys the rule applies to.
    pub on: KeyPattern,
    /// How far back rows are kept, from now.
    pub keep: Duration,
}

impl RetentionRule {
    /// A rule from `mkts.yml`'s spelling: `on: "*/1Min/*"`, `keep: 2y` (units `s`, `min` or `m`, `h`, `d`, `w`,
    /// `y` = 365 days).
    ///
    /// ```
    /// use mkts::engine::RetentionRule;
    /// let r = RetentionRule::parse("*/1Min/*", "30d").unwrap();
    /// assert_eq!(r.keep.as_secs(), 30 * 86_400);
    /// assert!(RetentionRule::parse("*/1Min/*", "30").is_err());
    /// ```
    pub fn parse(on: &str, keep: &str) -> Result<RetentionRule> {
        Ok(RetentionRule { on: KeyPattern::parse(on)?, keep: parse_keep(keep)? })
    }
}

fn parse_keep(s: &str) -> Result<Duration> {
    let t = s.trim();
    let digits = t.chars().take_while(|c| c.is_ascii_digit()).count();
    let (num, unit) = t.split_at(digits);
    let bad = || EngineError::InvalidInput(format!("retention keep {s:?}: expected a number and a unit (s, min, h, d, w, y), e.g. 30d or 2y"));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let per: u64 = match unit.trim() {
        "s" | "sec" => 1,
        "m" | "min" => 60,
        "h" | "H" => 3_600,
        "d" | "D" => 86_400,
        "w" | "W" => 7 * 86_400,
        "y" | "Y" => 365 * 86_400,
        _ => return Err(bad()),
    };
    let secs = n.checked_mul(per).filter(|s| *s > 0 && *s <= i64::MAX as u64 / 2).ok_or_else(bad)?;
    Ok(Duration::from_secs(secs))
}
