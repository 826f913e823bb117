//! `mkts import-marketstore`: move a MarketStore data directory (`mktsdb`) into mkts in one command.
//!
//! The importer reads MarketStore's files as MarketStore's own reader does (reference §1.1–1.7) and writes
//! the rows through the operations layer (an in-process [`crate::service::Service`] over a data directory,
//! or a server over Flight), never by touching mkts engine files. One job per file:
//!
//! | file | job |
//! |---|---|
//! | [`catalog`] | walk the `SYMBOL/TIMEFRAME/ATTRGROUP/<year>.bin` tree |
//! | [`header`] | the 37,024-byte data file header: columns, types, record type |
//! | [`timeindex`] | interval index → epoch and 32-bit IntervalTicks → (seconds, nanoseconds), as MarketStore reads them |
//! | [`fixed`] | FIXED records at their interval slots |
//! | [`variable`] | VARIABLE slots, Snappy/raw blobs, tick records |
//! | [`wal`] | MarketStore WAL files: transaction groups not yet in the `.bin` files |
//! | [`image`] | one data file in memory with the WAL replayed onto it, decoded to Arrow |
//! | [`importer`] | the command: read, write, resume, progress, summary |
//! | [`verify`] | `--verify`: row counts and per-column checksums, source against imported |
//!
//! Nothing in the crate depends on this module except the binary (`src/main.rs`).

pub mod catalog;
pub mod fixed;
pub mod header;
pub mod image;
pub mod importer;
pub mod timeindex;
pub mod variable;
pub mod verify;
pub mod wal;

use std::fmt;
use std::path::PathBuf;

pub use importer::{run, ImportMarketstoreArgs};

/// Why a MarketStore file (or part of one) could not be read. Carried with its path and byte offset so
/// the user can find the damage; the rest of the import goes on.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} at byte {offset}: {reason}")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("{0}")]
    Config(String),
    /// The destination (the operations layer or a server) refused or failed.
    #[error("{0}")]
    Destination(String),
    /// The import finished but skipped this many things (each reported with its path and offset).
    #[error("{0} problem(s) skipped (listed above); everything else was imported")]
    Incomplete(usize),
    /// `--verify` found buckets whose rows differ from the MarketStore files.
    #[error("verify failed: {0} bucket(s) differ from the MarketStore files")]
    Mismatch(usize),
}

/// One thing the import skipped: a damaged file region, a torn WAL tail, a bucket it cannot represent.
/// Every problem makes the exit status non-zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    /// Byte offset in `path` where the damage starts, when known.
    pub offset: Option<u64>,
    pub reason: String,
}

impl Problem {
    pub fn at(path: impl Into<PathBuf>, offset: u64, reason: impl Into<String>) -> Problem {
        Problem { path: path.into(), offset: Some(offset), reason: reason.into() }
    }

    pub fn whole(path: impl Into<PathBuf>, reason: impl Into<String>) -> Problem {
        Problem { path: path.into(), offset: None, reason: reason.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(o) => write!(f, "{} at byte {o}: {}", self.path.display(), self.reason),
            None => write!(f, "{}: {}", self.path.display(), self.reason),
        }
    }
}

/// Little-endian reads with bounds checks: every length and offset here comes from a file.
pub(crate) fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    let end = at.checked_add(8)?;
    Some(u64::from_le_bytes(b.get(at..end)?.try_into().ok()?))
}

pub(crate) fn le_i64(b: &[u8], at: usize) -> Option<i64> {
    le_u64(b, at).map(|v| v as i64)
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    Some(u32::from_le_bytes(b.get(at..end)?.try_into().ok()?))
}

pub(crate) fn le_i32(b: &[u8], at: usize) -> Option<i32> {
    le_u32(b, at).map(|v| v as i32)
}

pub(crate) fn le_i16(b: &[u8], at: usize) -> Option<i16> {
    let end = at.checked_add(2)?;
    Some(i16::from_le_bytes(b.get(at..end)?.try_into().ok()?))
}
