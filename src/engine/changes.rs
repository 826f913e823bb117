//! The change feed: every change the writer applied, in log order, kept in a bounded in-memory window so a
//! follower (a replica, through [`crate::replication`]) can read on from any position the window still
//! covers. Below the window a follower needs a [`Captured`] image of every bucket instead.
//!
//! The writer thread pushes each change right after applying it (so the feed's order is the log's order);
//! a push never waits: when the window is over its byte budget the oldest changes are dropped, and
//! followers that still needed them get [`ChangeGap`] and fall back to an image. A slow follower therefore
//! never slows the writer.
//!
//! Upstream positions ([`Origin`]) are the other direction: a replica applies each change with the
//! position it had in its master's log, and the engine makes that position durable in the same log record
//! as the change, so after a crash the replica knows exactly which changes it holds.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use arrow::array::RecordBatch;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::error::{EngineError, Result};
use super::{BucketKey, BucketSchema, TimePoint};

/// One applied change.
#[derive(Debug, Clone)]
pub enum Change {
    /// A bucket was created (explicitly or by its first write, which follows as a [`Change::Write`]).
    Create { key: BucketKey, schema: BucketSchema },
    /// Rows were stored; `batch` holds them as stored (the bucket's read schema, sorted, deduplicated).
    Write { key: BucketKey, batch: RecordBatch },
    /// A bucket and all its data were removed.
    Destroy { key: BucketKey },
    /// The rows with `start <= time <= end` were removed (range deletes, SQL `DELETE`, retention).
    DeleteRange { key: BucketKey, start: TimePoint, end: TimePoint },
    /// The bucket's columns changed to `schema` (columns added or dropped).
    Alter { key: BucketKey, schema: BucketSchema },
}

impl Change {
    /// The bucket the change is about.
    pub fn key(&self) -> &BucketKey {
        match self {
            Change::Create { key, .. }
            | Change::Write { key, .. }
            | Change::Destroy { key }
            | Change::DeleteRange { key, .. }
            | Change::Alter { key, .. } => key,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Change::Write { batch, .. } => batch.get_array_memory_size() + 64,
            _ => 128,
        }
    }
}

/// A change and its position in this server's log.
#[derive(Debug)]
pub struct ChangeRecord {
    /// The log sequence number of the change (increasing, not necessarily contiguous).
    pub lsn: u64,
    /// When the change was applied (for lag figures).
    pub applied_at: SystemTime,
    pub change: Change,
}

/// The feed no longer holds the changes right after the asked position (or never held them: they were
/// applied before this start). The follower needs a [`Captured`] image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the change feed starts after position {asked} (it holds the changes after {floor})")]
pub struct ChangeGap {
    pub asked: u64,
    pub floor: u64,
}

struct Window {
    /// Every change with an LSN above `floor` is in `records`.
    floor: u64,
    records: VecDeque<Arc<ChangeRecord>>,
    bytes: usize,
}

/// The bounded window of recent changes (owned by the engine, filled by the writer thread).
pub(super) struct ChangeLog {
    window: Mutex<Window>,
    budget: usize,
    /// The last LSN pushed; followers wait on it.
    last: watch::Sender<u64>,
}

impl ChangeLog {
    /// A window that starts after `floor` (the last LSN handed out before this start).
    pub(super) fn new(floor: u64, budget: usize) -> ChangeLog {
        ChangeLog {
            window: Mutex::new(Window { floor, records: VecDeque::new(), bytes: 0 }),
            budget,
            last: watch::Sender::new(floor),
        }
    }

    pub(super) fn push(&self, lsn: u64, change: Change) {
        let rec = Arc::new(ChangeRecord { lsn, applied_at: SystemTime::now(), change });
        {
            let mut w = self.window.lock();
            w.bytes += rec.change.bytes();
            w.records.push_back(rec);
            // Keep at least the newest change, however large, so a follower that is current can read it.
            while w.bytes > self.budget && w.records.len() > 1 {
                if let Some(old) = w.records.pop_front() {
                    w.bytes -= old.change.bytes();
                    w.floor = old.lsn;
                }
            }
        }
        self.last.send_replace(lsn);
    }

    /// Oldest position a follower may resume from.
    pub(super) fn floor(&self) -> u64 {
        self.window.lock().floor
    }

    pub(super) fn cursor(self: &Arc<Self>, after: u64) -> std::result::Result<ChangeCursor, ChangeGap> {
        let floor = self.floor();
        if after < floor {
            return Err(ChangeGap { asked: after, floor });
        }
        Ok(ChangeCursor { log: self.clone(), pos: after, rx: self.last.subscribe() })
    }

    /// The last LSN fed.
    pub(super) fn last(&self) -> u64 {
        *self.last.borrow()
    }
}

/// A follower's read position in the change feed ([`super::Engine::changes_after`]).
pub struct ChangeCursor {
    log: Arc<ChangeLog>,
    pos: u64,
    rx: watch::Receiver<u64>,
}

impl ChangeCursor {
    /// The next change after the cursor's position, waiting for one. [`ChangeGap`] when the window moved
    /// past the position (the follower fell too far behind).
    pub async fn next(&mut self) -> std::result::Result<Arc<ChangeRecord>, ChangeGap> {
        loop {
            // Mark the current value seen before looking, so a push after the look wakes `changed()`.
            self.rx.borrow_and_update();
            {
                let w = self.log.window.lock();
                if self.pos < w.floor {
                    return Err(ChangeGap { asked: self.pos, floor: w.floor });
                }
                let i = w.records.partition_point(|r| r.lsn <= self.pos);
                if let Some(r) = w.records.get(i) {
                    self.pos = r.lsn;
                    return Ok(r.clone());
                }
            }
            if self.rx.changed().await.is_err() {
                // The engine is gone: nothing more will come.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The LSN of the last change returned (or the starting position).
    pub fn position(&self) -> u64 {
        self.pos
    }
}

/// Every bucket as of one log position, taken between two writer groups ([`super::Engine::capture`]).
/// The batches point into the mapped files (immutable views), so taking it copies nothing.
pub struct Captured {
    /// Every change up to this LSN is in the image, none after it.
    pub lsn: u64,
    pub buckets: Vec<CapturedBucket>,
}

/// One bucket of a [`Captured`] image.
pub struct CapturedBucket {
    pub key: BucketKey,
    pub schema: BucketSchema,
    /// The rows, in time order, in the bucket's read schema.
    pub batches: Vec<RecordBatch>,
}

/// Where this server stands in an upstream server's log (a replica's applied position).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Origin {
    /// Which upstream the position belongs to (its store id); empty when none.
    pub source: String,
    /// The upstream LSN of the last change applied here; 0 when nothing is.
    pub position: u64,
}

/// The file holding the origin as of the last checkpoint (the log holds newer positions).
pub(super) const ORIGIN_FILE: &str = ".origin.json";

pub(super) fn read_origin(root: &Path) -> Result<Option<Origin>> {
    let path = root.join(ORIGIN_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| EngineError::Corrupt { path: path.display().to_string(), reason: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::io(&path, e)),
    }
}

/// Replace the origin file durably (temp file, fsync, rename, fsync the directory).
pub(super) fn write_origin(root: &Path, origin: &Origin) -> Result<()> {
    let bytes = serde_json::to_vec(origin).map_err(|e| EngineError::Unavailable(e.to_string()))?;
    super::wal::replace_file(root, ORIGIN_FILE, &bytes).map_err(|e| EngineError::io(root.join(ORIGIN_FILE), e))
}

/// The file naming this data directory's store id.
const STORE_ID_FILE: &str = ".store_id";

/// This data directory's store id: random, made at its first open, kept for its life. Log positions are
/// only comparable within one store, so a replica keeps the id of the master its position belongs to.
pub(super) fn store_id(root: &Path) -> Result<String> {
    let path = root.join(STORE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() == 32 && s.trim().bytes().all(|b| b.is_ascii_hexdigit()) => return Ok(s.trim().to_string()),
        Ok(_) => return Err(EngineError::Corrupt { path: path.display().to_string(), reason: "not a store id (32 hex digits)".into() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(EngineError::io(&path, e)),
    }
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|e| EngineError::Unavailable(format!("no randomness for a store id: {e}")))?;
    let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let written = super::wal::replace_file(root, STORE_ID_FILE, id.as_bytes());
    // A read-only or full root still starts (read-only): the id then lasts for this run only, so a
    // replica of it takes an image again after the next start.
    if let Err(e) = written {
        tracing::warn!("cannot record the store id in {} ({e}); using one for this run only", path.display());
    }
    Ok(id)
}
