//! Start-up: load the on-disk catalog and replay the log, isolating damage to the buckets it touches.
//!
//! A bucket whose `bucket.json`, manifest or column files are missing, unreadable or too short is not
//! dropped with a log line: it is recorded as damaged (reported by [`super::Engine::health`]), refuses reads
//! and writes, and every log record for it is carried into the held file so that trimming the log never
//! loses them; restoring its files (or destroying it) and restarting brings it back. A record that cannot be
//! applied during replay damages only its bucket. A full disk during replay stops the replay and starts the
//! engine read-only (nothing is trimmed), since skipping records would lose them.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::partition::{Partition, Rows};
use super::wal::{self, Op};
use super::{
    create_bucket_files, decode_direct, decode_range, remove_bucket_files, Bucket, BucketFile, BucketKey, BucketSchema,
    ColumnType, DamagedBucket, EngineError, Result,
};

fn subdirs(p: &Path) -> Vec<PathBuf> {
    fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// The key a bucket directory stands for, from its path (`<root>/SYM/TF/GROUP`).
fn key_of_dir(root: &Path, dir: &Path) -> String {
    dir.strip_prefix(root).map(|p| p.to_string_lossy().to_string()).unwrap_or_else(|_| dir.display().to_string())
}

/// What loading one bucket directory found.
enum Found {
    Bucket(Bucket),
    Damaged(DamagedBucket),
    Nothing,
}

/// Load every bucket under `root`; buckets that fail to load are returned as damaged, with the reason.
/// Symbols are loaded on several threads: a root with 100,000 buckets is mostly directory reads and one
/// small file per partition, and those overlap well.
pub(super) fn load_catalog(root: &Path) -> Result<(BTreeMap<BucketKey, Arc<Bucket>>, Vec<DamagedBucket>)> {
    let symbols = subdirs(root);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8);
    let chunk = symbols.len().div_ceil(threads).max(1);
    let found: Vec<Found> = std::thread::scope(|sc| {
        let handles: Vec<_> = symbols
            .chunks(chunk)
            .map(|part| {
                sc.spawn(move || {
                    let mut out = Vec::new();
                    for s in part {
                        for t in subdirs(s) {
                            for g in subdirs(&t) {
                                out.push(load_dir(root, &g));
                            }
                        }
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    let mut cat = BTreeMap::new();
    let mut damaged = Vec::new();
    for f in found {
        match f {
            Found::Bucket(b) => {
                cat.insert(b.key.clone(), Arc::new(b));
            }
            Found::Damaged(d) => damaged.push(d),
            Found::Nothing => {}
        }
    }
    Ok((cat, damaged))
}

/// One directory listing decides: a bucket (bucket.json), a damaged one (years without bucket.json, or a
/// load error), or not a bucket at all.
fn load_dir(root: &Path, dir: &Path) -> Found {
    let Ok(rd) = fs::read_dir(dir) else { return Found::Nothing };
    let mut has_meta = false;
    let mut years = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == "bucket.json" {
            has_meta = true;
        } else if let Ok(y) = name.parse::<i32>() {
            years.push((y, e.path()));
        }
    }
    if !has_meta && years.is_empty() {
        return Found::Nothing;
    }
    let key = key_of_dir(root, dir);
    if !has_meta {
        return Found::Damaged(DamagedBucket { key, reason: "bucket.json is missing".into(), at_load: true });
    }
    match load_bucket(dir, years) {
        Ok(b) => Found::Bucket(b),
        Err(e) => Found::Damaged(DamagedBucket { key, reason: e.to_string(), at_load: true }),
    }
}

fn load_bucket(dir: &Path, years: Vec<(i32, PathBuf)>) -> Result<Bucket> {
    let bf = dir.join("bucket.json");
    let text = fs::read_to_string(&bf).map_err(|e| EngineError::io(&bf, e))?;
    let meta: BucketFile =
        serde_json::from_str(&text).map_err(|e| EngineError::Corrupt { path: bf.display().to_string(), reason: e.to_string() })?;
    let key = BucketKey::parse(&meta.key)?;
    if meta.created_lsn > wal::MAX_LSN {
        return Err(EngineError::Corrupt { path: bf.display().to_string(), reason: format!("implausible created_lsn {}", meta.created_lsn) });
    }
    meta.schema.validate()?;
    let types: Vec<ColumnType> = meta.schema.columns.iter().map(|c| c.ty).collect();
    let mut parts = BTreeMap::new();
    for (year, path) in years {
        parts.insert(year, Partition::load(&path, year, meta.schema.kind, &types)?);
    }
    let b = Bucket {
        key,
        schema: meta.schema,
        created_lsn: meta.created_lsn,
        dir: dir.to_path_buf(),
        parts: Mutex::new(BTreeMap::new()),
        view: RwLock::new(Arc::new(Vec::new())),
    };
    b.publish(&parts);
    *b.parts.lock() = parts;
    Ok(b)
}

/// What replay did.
pub(super) struct Replayed {
    pub records: usize,
    /// Set when replay had to stop (a full disk): the engine starts read-only and trims nothing.
    pub halted: Option<String>,
}

/// Apply every record of `scan` after what the partitions already hold. Records of damaged buckets are
/// skipped (the caller holds them); a record that fails damages its bucket only.
pub(super) fn replay(
    root: &Path,
    cat: &mut BTreeMap<BucketKey, Arc<Bucket>>,
    damaged: &mut BTreeMap<String, DamagedBucket>,
    scan: &wal::LogScan,
) -> Replayed {
    let aborted = scan.aborted();
    let mut out = Replayed { records: 0, halted: None };
    for rec in scan.records() {
        if rec.op == Op::Abort || aborted.contains(&rec.lsn) {
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
                if let Err(e) = remove_bucket_files(root, &key) {
                    tracing::warn!(key = %key, "cannot remove a destroyed bucket's files: {e}");
                } else {
                    damaged.remove(rec.key);
                }
            }
            continue;
        }
        if let Err(e) = replay_record(root, cat, &key, &rec) {
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
fn replay_record(root: &Path, cat: &mut BTreeMap<BucketKey, Arc<Bucket>>, key: &BucketKey, rec: &wal::Record<'_>) -> Result<()> {
    let current = cat.get(key).filter(|b| b.created_lsn <= rec.lsn).cloned();
    match rec.op {
        Op::Create => {
            if !cat.contains_key(key) {
                let schema: BucketSchema = serde_json::from_slice(rec.payload).map_err(|e| corrupt(rec.lsn, &e.to_string()))?;
                let b = create_bucket_files(root, key, &schema, rec.lsn)?;
                cat.insert(key.clone(), Arc::new(b));
            }
        }
        Op::Destroy => {
            if current.is_some() {
                remove_bucket_files(root, key)?;
                cat.remove(key);
            }
        }
        Op::Write => {
            if let Some(b) = current {
                let rows = decode_write_payload(rec.payload, &b.widths())
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
        Op::Abort => {}
    }
    Ok(())
}

/// The rows of a write record (checked against the bucket's column widths, every length bounded).
pub(crate) fn decode_write_payload(payload: &[u8], widths: &[usize]) -> Option<Rows> {
    let len = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?) as usize;
    let ncols = u16::from_le_bytes(payload.get(4..6)?.try_into().ok()?) as usize;
    if ncols != widths.len() {
        return None;
    }
    let mut pos = 6usize;
    let mut cols = Vec::with_capacity(ncols);
    for w in widths {
        let n = len.checked_mul(*w)?;
        let end = pos.checked_add(n)?;
        cols.push(arrow::buffer::Buffer::from(payload.get(pos..end)?));
        pos = end;
    }
    Some(Rows { len, cols })
}
