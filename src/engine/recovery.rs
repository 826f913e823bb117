//! Start-up replay: apply the log after what the partitions hold, isolating damage to the buckets it touches.
//!
//! Every log record of a damaged bucket is carried into the held file so that trimming the log never
//! loses them; restoring its files (or destroying it) and restarting brings it back. A record that cannot be
//! applied during replay damages only its bucket. A full disk during replay stops the replay and starts the
//! engine read-only (nothing is trimmed), since skipping records would lose them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::bucket::Bucket;
use super::changes::Origin;
use super::catalog::{create_bucket_files, remove_bucket_files};
use super::tier::ColdStore;
use super::records::{decode_direct, decode_range, decode_write_payload};
use super::wal::{self, Op};
use super::{BucketKey, BucketSchema, DamagedBucket, EngineError, Result};

/// What replay did.
pub(super) struct Replayed {
    pub records: usize,
    /// Keys of the buckets records were applied to (their directories changed).
    pub touched: std::collections::HashSet<BucketKey>,
    /// Set when replay had to stop (a full disk): the engine starts read-only and trims nothing.
    pub halted: Option<String>,
    /// The upstream position after the last record that carries one (a replica's).
    pub origin: Origin,
}

/// Apply every record of `scan` after what the partitions already hold. Records of damaged buckets are
/// skipped (the caller holds them); a record that fails damages its bucket only.
pub(super) fn replay(
    root: &Path,
    cat: &mut BTreeMap<BucketKey, Arc<Bucket>>,
    damaged: &mut BTreeMap<String, DamagedBucket>,
    scan: &wal::LogScan,
    origin: Origin,
    store: Option<&Arc<ColdStore>>,
) -> Replayed {
    let aborted = scan.aborted();
    let mut out = Replayed { records: 0, touched: Default::default(), halted: None, origin };
    for rec in scan.records() {
        if rec.op == Op::Abort || aborted.contains(&rec.lsn) {
            continue;
        }
        // Records are in log order, so the last position seen is the newest (a Mark may move it back:
        // a replica that started over from another master).
        if let Some(p) = rec.origin {
            if rec.op == Op::Mark {
                out.origin = Origin { source: String::from_utf8_lossy(rec.payload).into_owned(), position: p };
                continue;
            }
            out.origin.position = p;
        }
        if rec.op == Op::Mark {
            continue;
        }
        out.records += 1;
        let key = match BucketKey::parse(rec.key) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(lsn = rec.lsn, "skipping log record with a bad key: {e}");
                continue;
            }
        };
        if damaged.contains_key(rec.key) {
            if rec.op == Op::Destroy {
                // Destroying a damaged bucket is how it is given up: finish it.
                if let Err(e) = remove_bucket_files(root, &key, store) {
                    tracing::warn!(key = %key, "cannot remove a destroyed bucket's files: {e}");
                } else {
                    damaged.remove(rec.key);
                }
            }
            continue;
        }
        out.touched.insert(key.clone());
        if let Err(e) = replay_record(root, cat, &key, &rec, store) {
            if e.is_disk_full() {
                out.halted = Some(format!(
                    "the disk is full: replay stopped at log record {} ({e}); reads show the data before it, writes are refused; free space and restart",
                    rec.lsn
                ));
                return out;
            }
            tracing::error!(key = %key, lsn = rec.lsn, "replaying a log record failed; the bucket is offline: {e}");
            cat.remove(&key);
            damaged.insert(
                rec.key.to_string(),
                DamagedBucket { key: rec.key.to_string(), reason: format!("replaying log record {} failed: {e}", rec.lsn), at_load: true },
            );
        }
    }
    out
}

fn corrupt(lsn: u64, reason: &str) -> EngineError {
    EngineError::Corrupt { path: format!("log record {lsn}"), reason: reason.into() }
}

/// Re-apply one logged record, skipping whatever the durable state already contains.
fn replay_record(root: &Path, cat: &mut BTreeMap<BucketKey, Arc<Bucket>>, key: &BucketKey, rec: &wal::Record<'_>, store: Option<&Arc<ColdStore>>) -> Result<()> {
    // Records of a bucket before its last schema change were checkpointed before it: nothing to replay,
    // and their payloads are in the old columns.
    let current = cat.get(key).filter(|b| b.created_lsn <= rec.lsn && b.schema_lsn < rec.lsn).cloned();
    match rec.op {
        Op::Create => {
            if !cat.contains_key(key) {
                let schema: BucketSchema = serde_json::from_slice(rec.payload).map_err(|e| corrupt(rec.lsn, &e.to_string()))?;
                let b = create_bucket_files(root, key, &schema, rec.lsn, store)?;
                cat.insert(key.clone(), Arc::new(b));
            }
        }
        Op::Destroy => {
            if current.is_some() {
                remove_bucket_files(root, key, store)?;
                cat.remove(key);
            }
        }
        Op::Write => {
            if let Some(b) = current {
                let rows = decode_write_payload(rec.payload, &b.layouts)
                    .ok_or_else(|| corrupt(rec.lsn, "write payload does not match the bucket schema"))?;
                b.apply_write(&rows, rec.lsn, true, Vec::new())?;
            }
        }
        Op::DeleteRange => {
            if let (Some(b), Some((s, e))) = (current, decode_range(rec.payload)) {
                b.delete_range(s, e, rec.lsn, true)?;
            }
        }
        Op::AppendDirect => {
            if let Some(b) = current {
                let entries = decode_direct(rec.payload).ok_or_else(|| corrupt(rec.lsn, "bad bulk append record"))?;
                b.commit_direct(&entries, rec.lsn, true)?;
            }
        }
        Op::Alter => {
            if let Some(b) = current {
                // Logged, not committed: the added files may be missing or partly written; make them again.
                let schema: BucketSchema = serde_json::from_slice(rec.payload).map_err(|e| corrupt(rec.lsn, &e.to_string()))?;
                schema.validate()?;
                let layouts = super::partition::physical_layouts(schema.kind, &schema.columns);
                b.prepare_schema(&layouts)?;
                let nb = super::catalog::commit_schema(&b.dir, &schema, rec.lsn, store)?;
                b.remove_dropped_files(&layouts);
                cat.insert(key.clone(), Arc::new(nb));
            }
        }
        Op::Abort | Op::Mark => {}
    }
    Ok(())
}

