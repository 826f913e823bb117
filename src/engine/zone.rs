//! The time zone a data directory's day-and-longer intervals were placed in.
//!
//! Under `timezone:` a fixed `1D`/`1W`/`1M`/`1Y` bucket stores each row at its interval's start on that
//! zone's calendar ([`EngineConfig::timezone`](super::EngineConfig::timezone)). MarketStore records the zone
//! nowhere, so changing `timezone` silently re-reads every stored day (reference §12, "Timezone is baked into
//! slot positions but not stored"). mkts writes the zone to `<root>/.timezone` and refuses to open a root
//! whose fixed day-and-longer buckets hold rows placed in another zone; where no such rows exist the new
//! zone is simply recorded. Tools that open a root without a config (`mkts connect --dir`,
//! `mkts tool integrity`) read it from here.

use std::path::Path;

use super::bucket::Bucket;
use super::error::{EngineError, Result};
use super::types::RecordKind;

/// File in the data directory holding the zone's IANA name (`UTC` when none is set).
pub const ZONE_FILE: &str = ".timezone";

/// The zone recorded in `root`, if any (and if it names a zone this build knows).
pub fn recorded_timezone(root: &Path) -> Option<chrono_tz::Tz> {
    let name = std::fs::read_to_string(root.join(ZONE_FILE)).ok()?;
    name.trim().parse().ok()
}

fn zone_name(tz: Option<chrono_tz::Tz>) -> &'static str {
    tz.map_or("UTC", |z| z.name())
}

/// At start-up: compare the configured zone with the recorded one and record it (durably, best effort on a
/// read-only root). Errs when rows placed in the recorded zone would be read in another.
pub(super) fn check_and_record<'a>(root: &Path, configured: Option<chrono_tz::Tz>, buckets: impl Iterator<Item = &'a Bucket>) -> Result<()> {
    let path = root.join(ZONE_FILE);
    let want = zone_name(configured);
    let stored = match std::fs::read_to_string(&path) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(EngineError::io(&path, e)),
    };
    if stored.as_deref() == Some(want) {
        return Ok(());
    }
    if let Some(stored) = &stored {
        let placed: Vec<String> = buckets
            .filter(|b| b.schema.kind == RecordKind::Fixed && b.key.tf().nominal_seconds() >= 86_400)
            .filter(|b| b.parts.lock().values().any(|p| p.rows > 0))
            .map(|b| b.key.to_string())
            .collect();
        if !placed.is_empty() {
            let shown: Vec<&str> = placed.iter().take(5).map(String::as_str).collect();
            let more = if placed.len() > 5 { format!(" and {} more", placed.len() - 5) } else { String::new() };
            return Err(EngineError::InvalidInput(format!(
                "data directory {} holds day-and-longer bars placed at midnights of {stored} ({}{more}), but timezone is {want}: \
                 reading them in another zone would move every stored day. Set `timezone: {stored}` in mkts.yml \
                 (or destroy and rewrite those buckets under the new zone). Nothing was changed.",
                root.display(),
                shown.join(", "),
            )));
        }
        tracing::info!(from = %stored, to = want, "timezone changed; no day-and-longer bars were stored, so the new zone is recorded");
    }
    if let Err(e) = super::wal::replace_file(root, ZONE_FILE, want.as_bytes()) {
        tracing::warn!("cannot record the timezone in {} ({e}); it is checked again at the next start", path.display());
    }
    Ok(())
}
