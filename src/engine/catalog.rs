//! The on-disk catalog: one directory per bucket (`<root>/SYMBOL/TIMEFRAME/ATTRGROUP`) holding
//! `bucket.json` and one directory per year partition; creating and removing them; loading them at start-up.
//!
//! A bucket whose `bucket.json`, manifest or column files are missing, unreadable or too short is not
//! dropped with a log line: it is recorded as damaged (reported by [`super::Engine::health`]), refuses reads
//! and writes, and its log records are held (see [`super::recovery`]).
//!
//! **The catalog snapshot** (`<root>/.catalog`) makes a start with many buckets cost one file read instead of
//! a directory walk and two small files per bucket (100,000 buckets: seconds of path lookups). It holds every
//! bucket's key, schema and durable partition manifests, and the modification time of every directory it
//! describes (`SYMBOL`, `SYMBOL/TIMEFRAME`, the bucket directory, each year directory). It is a cache, never
//! the truth: a directory whose modification time differs from the recorded one — anything created, renamed
//! or removed in it since, such as a manifest switched by rename, a new year or a copied-in bucket — is loaded
//! from its files as without a snapshot, and a missing, unreadable or corrupt snapshot means a full walk. The
//! writer records a directory's time only after its last change and then lets the clock pass the recorded
//! times before any later change (`write_snapshot`), so a later change always shows as a different time. What
//! a snapshot cannot see: a file rewritten in place (not by rename) in a directory it trusts, and a directory
//! that held no bucket when it was written (its parent's time changes only when entries come or go); column
//! files are checked when first read in either case.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::bucket::Bucket;
use super::partition::{Manifest, Partition};
use super::{wal, BucketKey, BucketSchema, ColumnType, DamagedBucket, EngineError, Result};

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct BucketFile {
    key: String,
    timeframe: String,
    schema: BucketSchema,
    created_lsn: u64,
    created_at: i64,
}

pub(super) fn bucket_dir(root: &Path, key: &BucketKey) -> PathBuf {
    root.join(&key.symbol).join(&key.timeframe).join(&key.attr_group)
}

pub(super) fn create_bucket_files(root: &Path, key: &BucketKey, schema: &BucketSchema, lsn: u64) -> Result<Bucket> {
    let dir = bucket_dir(root, key);
    fs::create_dir_all(&dir).map_err(|e| EngineError::io(&dir, e))?;
    let meta = BucketFile {
        key: key.to_string(),
        timeframe: key.timeframe.clone(),
        schema: schema.clone(),
        created_lsn: lsn,
        created_at: Utc::now().timestamp(),
    };
    let tmp = dir.join("bucket.json.tmp");
    let text = serde_json::to_vec_pretty(&meta).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
    fs::write(&tmp, text).map_err(|e| EngineError::io(&tmp, e))?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| EngineError::io(&tmp, e))?;
    fs::rename(&tmp, dir.join("bucket.json")).map_err(|e| EngineError::io(&dir, e))?;
    wal::sync_dir(&dir)?;
    Ok(Bucket {
        key: key.clone(),
        schema: schema.clone(),
        created_lsn: lsn,
        dir,
        parts: Mutex::new(BTreeMap::new()),
        view: RwLock::new(Arc::new(Vec::new())),
    })
}

pub(super) fn remove_bucket_files(root: &Path, key: &BucketKey) -> Result<()> {
    let dir = bucket_dir(root, key);
    // Rename first so a crash mid-delete never leaves a half bucket that loads.
    let trash = root.join(format!(".trash-{}-{}", std::process::id(), Utc::now().timestamp_nanos_opt().unwrap_or(0)));
    if dir.exists() {
        fs::rename(&dir, &trash).map_err(|e| EngineError::io(&dir, e))?;
        if let Some(p) = dir.parent() {
            wal::sync_dir(p)?;
        }
        let _ = fs::remove_dir_all(&trash);
    }
    // Remove now-empty Timeframe and Symbol directories, as MarketStore does.
    for p in [root.join(&key.symbol).join(&key.timeframe), root.join(&key.symbol)] {
        let _ = fs::remove_dir(&p);
    }
    Ok(())
}

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
    /// A bucket, with its directory times when it came from the snapshot.
    Bucket(Bucket, Option<BucketStamp>),
    Damaged(DamagedBucket),
    Nothing,
}

/// The catalog as loaded at start-up.
pub(super) struct Loaded {
    pub catalog: BTreeMap<BucketKey, Arc<Bucket>>,
    pub damaged: Vec<DamagedBucket>,
    /// Directory times known to match the buckets loaded from the snapshot.
    pub stamps: Stamps,
    /// Buckets taken from the snapshot / loaded from their files.
    pub from_snapshot: usize,
    pub from_files: usize,
    /// A usable snapshot was found.
    pub snapshot: bool,
}

/// Load every bucket under `root`, from the catalog snapshot where its directory times still match, from
/// the files elsewhere; buckets that fail to load are returned as damaged, with the reason. Symbols are
/// loaded on several threads.
pub(super) fn load_catalog(root: &Path) -> Result<Loaded> {
    let snap = read_snapshot(root);
    let index = snap.as_ref().map(SnapIndex::new);
    let symbols = subdirs(root);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8);
    let chunk = symbols.len().div_ceil(threads).max(1);
    let parts: Vec<(Vec<Found>, Vec<(String, i64)>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = symbols
            .chunks(chunk)
            .map(|part| {
                let index = index.as_ref();
                sc.spawn(move || {
                    let mut out = Vec::new();
                    let mut dirs = Vec::new();
                    for s in part {
                        load_symbol(root, s, index, &mut out, &mut dirs);
                    }
                    (out, dirs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    let mut loaded = Loaded {
        catalog: BTreeMap::new(),
        damaged: Vec::new(),
        stamps: Stamps::default(),
        from_snapshot: 0,
        from_files: 0,
        snapshot: snap.is_some(),
    };
    for (found, dirs) in parts {
        loaded.stamps.dirs.extend(dirs);
        for f in found {
            match f {
                Found::Bucket(b, stamp) => {
                    match stamp {
                        Some(st) => {
                            loaded.from_snapshot += 1;
                            loaded.stamps.buckets.insert(b.key.clone(), st);
                        }
                        None => loaded.from_files += 1,
                    }
                    loaded.catalog.insert(b.key.clone(), Arc::new(b));
                }
                Found::Damaged(d) => loaded.damaged.push(d),
                Found::Nothing => {}
            }
        }
    }
    Ok(loaded)
}

/// One symbol directory: trusted parts from the snapshot, the rest from the files.
fn load_symbol(root: &Path, sym_dir: &Path, index: Option<&SnapIndex<'_>>, out: &mut Vec<Found>, dirs: &mut Vec<(String, i64)>) {
    let name = sym_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let known = index.and_then(|ix| Some((ix, ix.tree.get(name.as_str())?, *ix.file.dirs.get(&name)?)));
    let Some((ix, tfs, stamp)) = known.filter(|(_, _, m)| mtime_ns(sym_dir) == Some(*m)) else {
        for t in subdirs(sym_dir) {
            for g in subdirs(&t) {
                out.push(load_dir(root, &g));
            }
        }
        return;
    };
    dirs.push((name.clone(), stamp));
    for (tf, entries) in tfs {
        let rel = format!("{name}/{tf}");
        let tf_dir = sym_dir.join(tf);
        match ix.file.dirs.get(&rel) {
            Some(m) if mtime_ns(&tf_dir) == Some(*m) => {
                dirs.push((rel, *m));
                for e in entries {
                    match e {
                        Entry::Bucket(sb) => match from_snapshot(root, sb, &ix.file.schemas) {
                            Some((b, st)) => out.push(Found::Bucket(b, Some(st))),
                            None => out.push(load_dir(root, &tf_dir.join(sb.group()))),
                        },
                        Entry::Reload(group) => out.push(load_dir(root, &tf_dir.join(group))),
                    }
                }
            }
            _ => {
                for g in subdirs(&tf_dir) {
                    out.push(load_dir(root, &g));
                }
            }
        }
    }
}

/// A bucket from its snapshot entry, when its directory and every year directory still carry the
/// recorded times.
fn from_snapshot(root: &Path, sb: &SnapBucket, schemas: &[BucketSchema]) -> Option<(Bucket, BucketStamp)> {
    let key = BucketKey::parse(&sb.key).ok()?;
    let dir = bucket_dir(root, &key);
    if mtime_ns(&dir) != Some(sb.mtime) {
        return None;
    }
    let schema = schemas.get(sb.schema as usize)?.clone();
    let types: Vec<ColumnType> = schema.columns.iter().map(|c| c.ty).collect();
    let mut parts = BTreeMap::new();
    let mut years = Vec::with_capacity(sb.parts.len());
    for p in &sb.parts {
        let ydir = dir.join(p.year.to_string());
        if mtime_ns(&ydir) != Some(p.mtime) {
            return None;
        }
        parts.insert(p.year, Partition::from_manifest(&ydir, p.year, schema.kind, &types, p.manifest.clone()).ok()?);
        years.push((p.year, p.mtime));
    }
    let b = Bucket {
        key,
        schema,
        created_lsn: sb.created_lsn,
        dir,
        parts: Mutex::new(BTreeMap::new()),
        view: RwLock::new(Arc::new(Vec::new())),
    };
    b.publish(&parts);
    *b.parts.lock() = parts;
    Some((b, BucketStamp { group: sb.mtime, years }))
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
        Ok(b) => Found::Bucket(b, None),
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


// ---- The catalog snapshot ----

/// The snapshot's file name in the root (dot-prefixed: never taken for a symbol).
pub(super) const SNAPSHOT_FILE: &str = ".catalog";
const SNAPSHOT_MAGIC: &[u8; 8] = b"MKTSCAT1";
/// How far the clock must be past every recorded directory time before the writer changes anything again,
/// so that the change gets a later time. File systems stamp times from a coarse clock (a few ms).
const STAMP_SETTLE_NS: i64 = 20_000_000;

/// Modification time of a path in nanoseconds since the Unix epoch.
fn mtime_ns(p: &Path) -> Option<i64> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(p).ok()?;
    m.mtime().checked_mul(1_000_000_000)?.checked_add(m.mtime_nsec())
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SnapshotFile {
    /// Distinct schemas (most buckets share a few); entries refer to them by index.
    schemas: Vec<BucketSchema>,
    /// Times of the `SYMBOL` and `SYMBOL/TIMEFRAME` directories.
    dirs: BTreeMap<String, i64>,
    buckets: Vec<SnapBucket>,
    /// Keys always loaded from their files (damaged buckets, unfinished destroys): listed so that the
    /// directories above them are still walked.
    reload: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapBucket {
    key: String,
    schema: u32,
    created_lsn: u64,
    /// Time of the bucket directory.
    mtime: i64,
    parts: Vec<SnapPart>,
}

impl SnapBucket {
    fn group(&self) -> &str {
        self.key.rsplit('/').next().unwrap_or("")
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapPart {
    year: i32,
    /// Time of the year directory.
    mtime: i64,
    manifest: Manifest,
}

/// Directory times of one bucket as recorded for the snapshot.
#[derive(Debug, Clone)]
pub(super) struct BucketStamp {
    group: i64,
    years: Vec<(i32, i64)>,
}

/// Directory times the writer keeps between snapshots, so writing one re-reads only what changed.
#[derive(Debug, Default)]
pub(super) struct Stamps {
    dirs: HashMap<String, i64>,
    buckets: HashMap<BucketKey, BucketStamp>,
}

impl Stamps {
    /// Forget what a change to `key` may have made stale (its directory and the two above it).
    pub(super) fn invalidate(&mut self, key: &BucketKey) {
        self.buckets.remove(key);
        self.dirs.remove(&key.symbol);
        self.dirs.remove(&format!("{}/{}", key.symbol, key.timeframe));
    }
}

enum Entry<'a> {
    Bucket(&'a SnapBucket),
    Reload(&'a str),
}

/// The snapshot arranged as its directory tree: symbol → timeframe → groups.
struct SnapIndex<'a> {
    file: &'a SnapshotFile,
    tree: HashMap<&'a str, BTreeMap<&'a str, Vec<Entry<'a>>>>,
}

impl<'a> SnapIndex<'a> {
    fn new(file: &'a SnapshotFile) -> Self {
        let mut tree: HashMap<&str, BTreeMap<&str, Vec<Entry<'_>>>> = HashMap::new();
        let mut add = |key: &'a str, e: Entry<'a>| {
            let mut it = key.splitn(3, '/');
            if let (Some(s), Some(t), Some(_)) = (it.next(), it.next(), it.next()) {
                tree.entry(s).or_default().entry(t).or_default().push(e);
            }
        };
        for b in &file.buckets {
            add(&b.key, Entry::Bucket(b));
        }
        for k in &file.reload {
            add(k, Entry::Reload(k.rsplit('/').next().unwrap_or("")));
        }
        SnapIndex { file, tree }
    }
}

/// The snapshot, when there is a readable one. A damaged one is reported and ignored (a full walk).
fn read_snapshot(root: &Path) -> Option<SnapshotFile> {
    let path = root.join(SNAPSHOT_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!("cannot read the catalog snapshot {} ({e}); loading every bucket from its files", path.display());
            return None;
        }
    };
    let parsed = (|| {
        let magic = bytes.get(0..8)?;
        let crc = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?);
        let body = bytes.get(12..)?;
        (magic == SNAPSHOT_MAGIC && crc32c::crc32c(body) == crc).then_some(())?;
        serde_json::from_slice::<SnapshotFile>(body).ok()
    })();
    if parsed.is_none() {
        tracing::warn!("the catalog snapshot {} is damaged; loading every bucket from its files", path.display());
    }
    parsed
}

/// Write the snapshot of `catalog` (plus `reload` keys), re-reading the directory times of buckets in
/// `changed` and of any not recorded yet. Called on the writer thread, after the manifests it describes
/// are durable; returns once the clock has passed every recorded time (see [`STAMP_SETTLE_NS`]).
pub(super) fn write_snapshot(
    root: &Path,
    catalog: &BTreeMap<BucketKey, Arc<Bucket>>,
    damaged: &[String],
    stamps: &mut Stamps,
    changed: &HashSet<BucketKey>,
) -> Result<()> {
    for k in changed {
        stamps.invalidate(k);
    }
    let mut file = SnapshotFile::default();
    let mut schema_ix: HashMap<String, u32> = HashMap::new();
    let mut newest = i64::MIN;
    let mut reload: Vec<String> = damaged.to_vec();
    // Destroyed buckets whose directory is still there: replay finishes the destroy, so load them.
    for k in changed {
        if !catalog.contains_key(k) && bucket_dir(root, k).exists() {
            reload.push(k.to_string());
        }
    }
    for (key, b) in catalog {
        let parts = b.parts.lock();
        let stamp = match stamps.buckets.get(key) {
            Some(st) if st.years.len() == parts.len() && st.years.iter().zip(parts.keys()).all(|(a, y)| a.0 == *y) => st.clone(),
            _ => {
                let dir = bucket_dir(root, key);
                let fresh = (|| {
                    let group = mtime_ns(&dir)?;
                    let years = parts.keys().map(|y| Some((*y, mtime_ns(&dir.join(y.to_string()))?))).collect::<Option<Vec<_>>>()?;
                    Some(BucketStamp { group, years })
                })();
                let Some(st) = fresh else {
                    reload.push(key.to_string());
                    continue;
                };
                newest = newest.max(st.group).max(st.years.iter().map(|y| y.1).max().unwrap_or(i64::MIN));
                stamps.buckets.insert(key.clone(), st.clone());
                st
            }
        };
        let sjson = serde_json::to_string(&b.schema).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
        let next = file.schemas.len() as u32;
        let six = *schema_ix.entry(sjson).or_insert_with(|| {
            file.schemas.push(b.schema.clone());
            next
        });
        file.buckets.push(SnapBucket {
            key: key.to_string(),
            schema: six,
            created_lsn: b.created_lsn,
            mtime: stamp.group,
            parts: parts
                .values()
                .zip(stamp.years.iter())
                .map(|(p, (year, m))| SnapPart { year: *year, mtime: *m, manifest: p.manifest().clone() })
                .collect(),
        });
    }
    // The directories above every bucket and reload entry.
    let mut above: Vec<String> = Vec::new();
    for k in file.buckets.iter().map(|b| b.key.as_str()).chain(reload.iter().map(|s| s.as_str())) {
        let mut it = k.splitn(3, '/');
        if let (Some(s), Some(t)) = (it.next(), it.next()) {
            above.push(s.to_string());
            above.push(format!("{s}/{t}"));
        }
    }
    above.sort();
    above.dedup();
    for rel in above {
        let m = match stamps.dirs.get(&rel) {
            Some(m) => *m,
            None => match mtime_ns(&root.join(&rel)) {
                Some(m) => {
                    newest = newest.max(m);
                    stamps.dirs.insert(rel.clone(), m);
                    m
                }
                None => continue,
            },
        };
        file.dirs.insert(rel, m);
    }
    file.reload = reload;
    let body = serde_json::to_vec(&file).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
    let mut bytes = Vec::with_capacity(body.len() + 12);
    bytes.extend_from_slice(SNAPSHOT_MAGIC);
    bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    let tmp = root.join(format!("{SNAPSHOT_FILE}.tmp"));
    let r = (|| {
        use std::io::Write;
        let mut f = fs::File::create(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| EngineError::io(&tmp, e))?;
        f.sync_all().map_err(|e| EngineError::io(&tmp, e))?;
        fs::rename(&tmp, root.join(SNAPSHOT_FILE)).map_err(|e| EngineError::io(root, e))?;
        wal::sync_dir(root)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    // Let the clock pass the newest recorded time: a change after this returns gets a later time.
    if newest > i64::MIN {
        let now = Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        let wait = newest.saturating_add(STAMP_SETTLE_NS).saturating_sub(now);
        if wait > 0 {
            std::thread::sleep(std::time::Duration::from_nanos(wait as u64));
        }
    }
    r
}
