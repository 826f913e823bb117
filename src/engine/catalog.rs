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
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::bucket::Bucket;
use super::partition::{physical_layouts, Manifest, Partition};
use super::tier::{ColdManifest, ColdStore};
use super::{wal, BucketKey, BucketSchema, DamagedBucket, EngineError, Result};

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct BucketFile {
    key: String,
    timeframe: String,
    schema: BucketSchema,
    created_lsn: u64,
    created_at: i64,
    /// LSN of the schema change that made `schema` (0: the schema it was created with). Log records of the
    /// bucket before it were checkpointed and are skipped at replay.
    #[serde(default, skip_serializing_if = "is_zero")]
    schema_lsn: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

pub(super) fn bucket_dir(root: &Path, key: &BucketKey) -> PathBuf {
    root.join(&key.symbol).join(&key.timeframe).join(&key.attr_group)
}

pub(super) fn create_bucket_files(root: &Path, key: &BucketKey, schema: &BucketSchema, lsn: u64, store: Option<&Arc<ColdStore>>) -> Result<Bucket> {
    let dir = bucket_dir(root, key);
    fs::create_dir_all(&dir).map_err(|e| EngineError::io(&dir, e))?;
    let meta = BucketFile {
        key: key.to_string(),
        timeframe: key.timeframe.clone(),
        schema: schema.clone(),
        created_lsn: lsn,
        created_at: Utc::now().timestamp(),
        schema_lsn: 0,
    };
    write_bucket_file(&dir, &meta)?;
    Ok(Bucket::new(key.clone(), Arc::new(schema.clone()), lsn, dir, store))
}

/// Atomically replace `bucket.json` (write temp, fsync, rename, fsync directory).
fn write_bucket_file(dir: &Path, meta: &BucketFile) -> Result<()> {
    let tmp = dir.join("bucket.json.tmp");
    let text = serde_json::to_vec_pretty(meta).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
    fs::write(&tmp, text).map_err(|e| EngineError::io(&tmp, e))?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| EngineError::io(&tmp, e))?;
    fs::rename(&tmp, dir.join("bucket.json")).map_err(|e| EngineError::io(dir, e))?;
    wal::sync_dir(dir)
}

/// Commit a schema change: `bucket.json` gets the new schema and the change's LSN (the commit point; the
/// new columns' files already exist in every partition), then the bucket is loaded again from its files.
pub(super) fn commit_schema(dir: &Path, schema: &BucketSchema, lsn: u64, store: Option<&Arc<ColdStore>>) -> Result<Bucket> {
    let bf = dir.join("bucket.json");
    let text = fs::read_to_string(&bf).map_err(|e| EngineError::io(&bf, e))?;
    let mut meta: BucketFile =
        serde_json::from_str(&text).map_err(|e| EngineError::Corrupt { path: bf.display().to_string(), reason: e.to_string() })?;
    meta.schema = schema.clone();
    meta.schema_lsn = lsn;
    write_bucket_file(dir, &meta)?;
    load_bucket(dir, year_dirs(dir), store)
}

/// The year partition directories of a bucket directory.
fn year_dirs(dir: &Path) -> Vec<(i32, PathBuf)> {
    fs::read_dir(dir)
        .map(|rd| rd.flatten().filter_map(|e| Some((e.file_name().to_string_lossy().parse::<i32>().ok()?, e.path()))).collect())
        .unwrap_or_default()
}

pub(super) fn remove_bucket_files(root: &Path, key: &BucketKey, store: Option<&Arc<ColdStore>>) -> Result<()> {
    let dir = bucket_dir(root, key);
    // Cold objects first: while cold.json is there, a crash before the files are gone leaves the
    // destroy to replay, which deletes whatever objects are left.
    let cold = ColdManifest::load(&dir).unwrap_or_default();
    if !cold.years.is_empty() || !cold.pending.is_empty() {
        let store = store.ok_or_else(|| EngineError::Unavailable(format!("{key}: its cold years are in object storage, but tiering is not configured")))?;
        for o in cold.years.iter().map(|c| &c.object).chain(cold.pending.iter()) {
            store.delete(o)?;
        }
    }
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

/// What one loading thread found: buckets (with their directory times when taken from the snapshot) and
/// the directory times it confirmed.
#[derive(Default)]
struct Part {
    found: Vec<Found>,
    dirs: Vec<(String, i64)>,
}

/// Load every bucket under `root`, from the catalog snapshot where its directory times still match, from
/// the files elsewhere; buckets that fail to load are returned as damaged, with the reason. Symbols are
/// loaded on several threads.
pub(super) fn load_catalog(root: &Path, store: Option<&Arc<ColdStore>>) -> Result<Loaded> {
    let root_fd = open_dir(root);
    let snap = root_fd.as_ref().and_then(|_| read_snapshot(root));
    let mut symbols: Vec<String> = subdirs(root).iter().filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
    symbols.sort_unstable();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8);
    let chunk = symbols.len().div_ceil(threads).max(1);
    let parts: Vec<Part> = std::thread::scope(|sc| {
        let handles: Vec<_> = symbols
            .chunks(chunk)
            .map(|names| {
                let (snap, root_fd) = (snap.as_ref(), root_fd.as_ref());
                sc.spawn(move || {
                    let mut part = Part::default();
                    for name in names {
                        let known = snap.zip(root_fd).and_then(|(sn, fd)| Some((sn, fd, sn.symbol(name)?)));
                        match known {
                            Some((sn, fd, sym)) => load_symbol_from_snapshot(root, fd.as_fd(), sym, sn, &mut part, store),
                            None => walk_symbol(root, &root.join(name), &mut part.found, store),
                        }
                    }
                    part
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
    let mut buckets = Vec::new();
    for part in parts {
        loaded.stamps.dirs.extend(part.dirs);
        for f in part.found {
            match f {
                Found::Bucket(b, stamp) => {
                    match stamp {
                        Some(st) => {
                            loaded.from_snapshot += 1;
                            *b.stamp.lock() = Some(st);
                        }
                        None => loaded.from_files += 1,
                    }
                    buckets.push((b.key.clone(), Arc::new(b)));
                }
                Found::Damaged(d) => loaded.damaged.push(d),
                Found::Nothing => {}
            }
        }
    }
    // Built from a sorted run (symbols were walked in order): no per-insert search.
    buckets.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    loaded.catalog = buckets.into_iter().collect();
    Ok(loaded)
}

/// A symbol directory without a usable snapshot entry: every bucket from its files.
fn walk_symbol(root: &Path, sym_dir: &Path, out: &mut Vec<Found>, store: Option<&Arc<ColdStore>>) {
    for t in subdirs(sym_dir) {
        for g in subdirs(&t) {
            out.push(load_dir(root, &g, store));
        }
    }
}

/// One symbol directory with a snapshot entry: each level whose directory time matches is taken from the
/// snapshot, anything else from the files. Times are read relative to the root's descriptor (short path
/// lookups, no per-directory path allocation).
fn load_symbol_from_snapshot(root: &Path, root_fd: BorrowedFd<'_>, sym: &SnapSymbol, snap: &Snapshot, part: &mut Part, store: Option<&Arc<ColdStore>>) {
    let sym_dir = root.join(&sym.name);
    if mtime_at(root_fd, &sym.name) != Some(sym.mtime) {
        walk_symbol(root, &sym_dir, &mut part.found, store);
        return;
    }
    part.dirs.push((sym.name.clone(), sym.mtime));
    let mut rel = String::with_capacity(96);
    for tf in &sym.timeframes {
        rel.clear();
        rel.push_str(&sym.name);
        rel.push('/');
        rel.push_str(&tf.name);
        let tf_dir = sym_dir.join(&tf.name);
        if mtime_at(root_fd, &rel) != Some(tf.mtime) {
            for g in subdirs(&tf_dir) {
                part.found.push(load_dir(root, &g, store));
            }
            continue;
        }
        part.dirs.push((rel.clone(), tf.mtime));
        let tf_len = rel.len();
        for g in &tf.groups {
            rel.truncate(tf_len);
            rel.push('/');
            rel.push_str(&g.name);
            let found = if g.reload { None } else { from_snapshot(root_fd, &mut rel, &sym.name, &tf.name, g, &tf_dir, snap, store) };
            part.found.push(match found {
                Some((b, st)) => Found::Bucket(b, Some(st)),
                None => load_dir(root, &tf_dir.join(&g.name), store),
            });
        }
    }
}

/// A bucket from its snapshot entry, when its directory and every year directory still carry the
/// recorded times. `rel` is the bucket directory relative to the root (used as a scratch buffer).
fn from_snapshot(
    root_fd: BorrowedFd<'_>,
    rel: &mut String,
    symbol: &str,
    timeframe: &str,
    g: &SnapGroup,
    tf_dir: &Path,
    snap: &Snapshot,
    store: Option<&Arc<ColdStore>>,
) -> Option<(Bucket, BucketStamp)> {
    if mtime_at(root_fd, rel) != Some(g.mtime) {
        return None;
    }
    let schema = snap.schemas.get(g.schema as usize)?.clone();
    let key = BucketKey::from_parts(symbol, timeframe, &g.name).ok()?;
    let dir = tf_dir.join(&g.name);
    let layouts = Arc::new(physical_layouts(schema.kind, &schema.columns));
    let mut parts = BTreeMap::new();
    let mut years = Vec::with_capacity(g.parts.len());
    let group_len = rel.len();
    for p in &g.parts {
        rel.truncate(group_len);
        rel.push('/');
        rel.push_str(&p.year.to_string());
        if mtime_at(root_fd, rel) != Some(p.mtime) {
            return None;
        }
        let ydir = dir.join(p.year.to_string());
        parts.insert(p.year, Partition::from_manifest(&ydir, p.year, schema.kind, layouts.clone(), p.manifest()).ok()?);
        years.push((p.year, p.mtime));
    }
    let cold: ColdManifest = if g.cold.is_empty() { ColdManifest::default() } else { serde_json::from_str(&g.cold).ok()? };
    let mut b = Bucket::with_layouts(key, schema, layouts, g.created_lsn, dir, store);
    b.schema_lsn = g.schema_lsn;
    *b.cold.get_mut() = cold;
    b.publish(&mut parts);
    *b.parts.lock() = parts;
    Some((b, BucketStamp { group: g.mtime, years }))
}

/// One directory listing decides: a bucket (bucket.json), a damaged one (years without bucket.json, or a
/// load error), or not a bucket at all.
fn load_dir(root: &Path, dir: &Path, store: Option<&Arc<ColdStore>>) -> Found {
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
    match load_bucket(dir, years, store) {
        Ok(b) => Found::Bucket(b, None),
        Err(e) => Found::Damaged(DamagedBucket { key, reason: e.to_string(), at_load: true }),
    }
}

fn load_bucket(dir: &Path, years: Vec<(i32, PathBuf)>, store: Option<&Arc<ColdStore>>) -> Result<Bucket> {
    let (key, meta) = checked_bucket_file(dir)?;
    let layouts = Arc::new(physical_layouts(meta.schema.kind, &meta.schema.columns));
    let cold = ColdManifest::load(dir)?;
    let mut parts = BTreeMap::new();
    for (year, path) in years {
        if cold.get(year).is_some() {
            // The year is in object storage: these files are what an interrupted move had not removed
            // yet, or an interrupted thaw had not committed (module docs of `tier`). Finish/undo it.
            fs::remove_dir_all(&path).map_err(|e| EngineError::io(&path, e))?;
            wal::sync_dir(dir)?;
            tracing::info!(key = %key, year, "removed the local files of a year that is in object storage");
            continue;
        }
        parts.insert(year, Partition::load(&path, year, meta.schema.kind, layouts.clone())?);
    }
    let mut b = Bucket::with_layouts(key, Arc::new(meta.schema), layouts, meta.created_lsn, dir.to_path_buf(), store);
    b.schema_lsn = meta.schema_lsn;
    *b.cold.get_mut() = cold;
    b.publish(&mut parts);
    *b.parts.lock() = parts;
    Ok(b)
}

/// A bucket directory's `bucket.json`: its key and schema, checked as [`load_bucket`] checks them (for
/// `mkts tool integrity`, which reads without loading).
pub(super) fn read_bucket_file(dir: &Path) -> Result<(BucketKey, BucketSchema)> {
    checked_bucket_file(dir).map(|(key, meta)| (key, meta.schema))
}

/// `bucket.json` parsed, its key, log position and schema checked.
fn checked_bucket_file(dir: &Path) -> Result<(BucketKey, BucketFile)> {
    let bf = dir.join("bucket.json");
    let text = fs::read_to_string(&bf).map_err(|e| EngineError::io(&bf, e))?;
    let meta: BucketFile =
        serde_json::from_str(&text).map_err(|e| EngineError::Corrupt { path: bf.display().to_string(), reason: e.to_string() })?;
    let key = BucketKey::parse(&meta.key)?;
    if meta.created_lsn > wal::MAX_LSN {
        return Err(EngineError::Corrupt { path: bf.display().to_string(), reason: format!("implausible created_lsn {}", meta.created_lsn) });
    }
    meta.schema.validate()?;
    Ok((key, meta))
}

/// Whether the catalog snapshot passes its checksum and decodes; `None` when there is none.
pub(super) fn snapshot_intact(root: &Path) -> Option<bool> {
    root.join(SNAPSHOT_FILE).exists().then(|| read_snapshot(root).is_some())
}

// ---- The catalog snapshot ----

/// The snapshot's file name in the root (dot-prefixed: never taken for a symbol).
pub(super) const SNAPSHOT_FILE: &str = ".catalog";
/// Format 2: protobuf (prost), the directory tree as nested lists. Format 1 (JSON) is not read: a start
/// that finds one walks the files and writes format 2.
const SNAPSHOT_MAGIC: &[u8; 8] = b"MKTSCAT2";
/// How far the clock must be past every recorded directory time before the writer changes anything again,
/// so that the change gets a later time. File systems stamp times from a coarse clock (a few ms).
const STAMP_SETTLE_NS: i64 = 20_000_000;

/// A directory opened for use as the base of relative lookups (`O_PATH`: no read permission needed).
fn open_dir(p: &Path) -> Option<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open(p, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).ok()
}

/// Modification time, in nanoseconds since the Unix epoch, of `rel` below the directory `base`.
fn mtime_at(base: BorrowedFd<'_>, rel: &str) -> Option<i64> {
    let st = rustix::fs::statat(base, rel, rustix::fs::AtFlags::empty()).ok()?;
    (st.st_mtime as i64).checked_mul(1_000_000_000)?.checked_add(st.st_mtime_nsec as i64)
}

/// The snapshot as stored: the catalog's directory tree, each level with its directory's time.
#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotFile {
    /// Distinct schemas, as JSON (most buckets share a few); groups refer to them by index.
    #[prost(string, repeated, tag = "1")]
    schemas: Vec<String>,
    /// Sorted by name.
    #[prost(message, repeated, tag = "2")]
    symbols: Vec<SnapSymbol>,
}

/// A `SYMBOL` directory.
#[derive(Clone, PartialEq, prost::Message)]
struct SnapSymbol {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(sint64, tag = "2")]
    mtime: i64,
    #[prost(message, repeated, tag = "3")]
    timeframes: Vec<SnapTimeframe>,
}

/// A `SYMBOL/TIMEFRAME` directory.
#[derive(Clone, PartialEq, prost::Message)]
struct SnapTimeframe {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(sint64, tag = "2")]
    mtime: i64,
    #[prost(message, repeated, tag = "3")]
    groups: Vec<SnapGroup>,
}

/// A bucket directory (`ATTRGROUP`).
#[derive(Clone, PartialEq, prost::Message)]
struct SnapGroup {
    #[prost(string, tag = "1")]
    name: String,
    /// Always loaded from its files (a damaged bucket, an unfinished destroy): listed so that the
    /// directories above it are still walked.
    #[prost(bool, tag = "2")]
    reload: bool,
    #[prost(uint32, tag = "3")]
    schema: u32,
    #[prost(uint64, tag = "4")]
    created_lsn: u64,
    /// Time of the bucket directory.
    #[prost(sint64, tag = "5")]
    mtime: i64,
    /// [`BucketFile`]'s `schema_lsn`.
    #[prost(uint64, tag = "7")]
    schema_lsn: u64,
    #[prost(message, repeated, tag = "6")]
    parts: Vec<SnapPart>,
    /// `cold.json` as JSON (empty: no cold years).
    #[prost(string, tag = "8")]
    cold: String,
}

/// A year partition: its directory's time and its durable manifest.
#[derive(Clone, PartialEq, prost::Message)]
struct SnapPart {
    #[prost(int32, tag = "1")]
    year: i32,
    #[prost(sint64, tag = "2")]
    mtime: i64,
    #[prost(uint64, tag = "3")]
    generation: u64,
    #[prost(uint64, tag = "4")]
    rows: u64,
    #[prost(uint64, tag = "5")]
    applied_lsn: u64,
    #[prost(sint64, optional, tag = "6")]
    first_epoch: Option<i64>,
    #[prost(int32, tag = "7")]
    first_nanos: i32,
    #[prost(sint64, optional, tag = "8")]
    last_epoch: Option<i64>,
    #[prost(int32, tag = "9")]
    last_nanos: i32,
    #[prost(uint32, tag = "10")]
    format: u32,
    #[prost(uint32, repeated, tag = "11")]
    validity: Vec<u32>,
}

impl SnapPart {
    fn new(year: i32, mtime: i64, m: &Manifest) -> SnapPart {
        SnapPart {
            year,
            mtime,
            generation: m.generation,
            rows: m.rows as u64,
            applied_lsn: m.applied_lsn,
            first_epoch: m.first.map(|k| k.0),
            first_nanos: m.first.map_or(0, |k| k.1),
            last_epoch: m.last.map(|k| k.0),
            last_nanos: m.last.map_or(0, |k| k.1),
            format: m.format,
            validity: m.validity.clone(),
        }
    }

    /// The manifest it records (checked again by [`Partition::from_manifest`]).
    fn manifest(&self) -> Manifest {
        Manifest {
            generation: self.generation,
            rows: usize::try_from(self.rows).unwrap_or(usize::MAX),
            applied_lsn: self.applied_lsn,
            first: self.first_epoch.map(|e| (e, self.first_nanos)),
            last: self.last_epoch.map(|e| (e, self.last_nanos)),
            format: self.format,
            validity: self.validity.clone(),
        }
    }
}

/// A decoded snapshot with its schemas parsed once.
struct Snapshot {
    schemas: Vec<Arc<BucketSchema>>,
    symbols: Vec<SnapSymbol>,
}

impl Snapshot {
    fn symbol(&self, name: &str) -> Option<&SnapSymbol> {
        self.symbols.binary_search_by(|s| s.name.as_str().cmp(name)).ok().map(|i| &self.symbols[i])
    }
}

/// Directory times of one bucket as recorded for the snapshot.
#[derive(Debug, Clone)]
pub(super) struct BucketStamp {
    group: i64,
    years: Vec<(i32, i64)>,
}

/// Directory times of `SYMBOL` and `SYMBOL/TIMEFRAME` directories the writer keeps between snapshots, so
/// writing one re-reads only what changed (a bucket's own times live in [`Bucket::stamp`]).
#[derive(Debug, Default)]
pub(super) struct Stamps {
    dirs: HashMap<String, i64>,
}

impl Stamps {
    /// Forget what a change to `key` may have made stale (the two directories above it; the bucket's own
    /// times are cleared by the caller).
    fn invalidate(&mut self, key: &BucketKey) {
        self.dirs.remove(&key.symbol);
        self.dirs.remove(&format!("{}/{}", key.symbol, key.timeframe));
    }
}

/// The snapshot, when there is a readable one. A damaged one is reported and ignored (a full walk).
fn read_snapshot(root: &Path) -> Option<Snapshot> {
    use prost::Message;
    let path = root.join(SNAPSHOT_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!("cannot read the catalog snapshot {} ({e}); loading every bucket from its files", path.display());
            return None;
        }
    };
    if bytes.get(0..7) == Some(&SNAPSHOT_MAGIC[..7]) && bytes.get(0..8) != Some(&SNAPSHOT_MAGIC[..]) {
        tracing::info!("the catalog snapshot {} has an older format; loading every bucket from its files", path.display());
        return None;
    }
    let parsed = (|| {
        let magic = bytes.get(0..8)?;
        let crc = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?);
        let body = bytes.get(12..)?;
        (magic == SNAPSHOT_MAGIC && crc32c::crc32c(body) == crc).then_some(())?;
        let file = SnapshotFile::decode(body).ok()?;
        let schemas = file
            .schemas
            .iter()
            .map(|j| serde_json::from_str::<BucketSchema>(j).ok().filter(|s| s.validate().is_ok()).map(Arc::new))
            .collect::<Option<Vec<_>>>()?;
        file.symbols.windows(2).all(|w| w[0].name < w[1].name).then_some(())?;
        Some(Snapshot { schemas, symbols: file.symbols })
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
    use prost::Message;
    let root_fd = open_dir(root).ok_or_else(|| EngineError::io(root, std::io::Error::other("cannot open the root directory")))?;
    let root_fd = root_fd.as_fd();
    for k in changed {
        stamps.invalidate(k);
        if let Some(b) = catalog.get(k) {
            *b.stamp.lock() = None;
        }
    }
    let mut schemas: Vec<String> = Vec::new();
    let mut schema_ix: HashMap<String, u32> = HashMap::new();
    let mut newest = i64::MIN;
    let mut reload: Vec<BucketKey> = damaged.iter().filter_map(|k| BucketKey::parse(k).ok()).collect();
    // Destroyed buckets whose directory is still there: replay finishes the destroy, so load them.
    for k in changed {
        if !catalog.contains_key(k) && bucket_dir(root, k).exists() {
            reload.push(k.clone());
        }
    }
    // symbol -> timeframe -> groups, in name order.
    let mut tree: BTreeMap<&str, BTreeMap<&str, Vec<SnapGroup>>> = BTreeMap::new();
    for (key, b) in catalog {
        let parts = b.parts.lock();
        let mut stamp = b.stamp.lock();
        let current = matches!(&*stamp, Some(st) if st.years.len() == parts.len() && st.years.iter().zip(parts.keys()).all(|(a, y)| a.0 == *y));
        if !current {
            let rel = format!("{}/{}/{}", key.symbol, key.timeframe, key.attr_group);
            let fresh = (|| {
                let group = mtime_at(root_fd, &rel)?;
                let years = parts.keys().map(|y| Some((*y, mtime_at(root_fd, &format!("{rel}/{y}"))?))).collect::<Option<Vec<_>>>()?;
                Some(BucketStamp { group, years })
            })();
            match fresh {
                Some(st) => {
                    newest = newest.max(st.group).max(st.years.iter().map(|y| y.1).max().unwrap_or(i64::MIN));
                    *stamp = Some(st);
                }
                None => {
                    *stamp = None;
                    reload.push(key.clone());
                    continue;
                }
            }
        }
        let Some(st) = stamp.as_ref() else { continue };
        let sjson = serde_json::to_string(&*b.schema).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
        let next = schemas.len() as u32;
        let six = *schema_ix.entry(sjson.clone()).or_insert_with(|| {
            schemas.push(sjson);
            next
        });
        let group = SnapGroup {
            name: key.attr_group.clone(),
            reload: false,
            schema: six,
            created_lsn: b.created_lsn,
            mtime: st.group,
            schema_lsn: b.schema_lsn,
            parts: parts.values().zip(st.years.iter()).map(|(p, (year, m))| SnapPart::new(*year, *m, p.manifest())).collect(),
            cold: {
                let c = b.cold.lock();
                if c.years.is_empty() && c.pending.is_empty() { String::new() } else { serde_json::to_string(&*c).unwrap_or_default() }
            },
        };
        tree.entry(key.symbol.as_str()).or_default().entry(key.timeframe.as_str()).or_default().push(group);
    }
    for k in &reload {
        let group = SnapGroup { name: k.attr_group.clone(), reload: true, schema: 0, created_lsn: 0, mtime: 0, schema_lsn: 0, parts: Vec::new(), cold: String::new() };
        tree.entry(k.symbol.as_str()).or_default().entry(k.timeframe.as_str()).or_default().push(group);
    }
    // The directories above every bucket and reload entry.
    let mut dir_time = |rel: String| -> Option<i64> {
        if let Some(m) = stamps.dirs.get(&rel) {
            return Some(*m);
        }
        let m = mtime_at(root_fd, &rel)?;
        newest = newest.max(m);
        stamps.dirs.insert(rel, m);
        Some(m)
    };
    let mut file = SnapshotFile { schemas, symbols: Vec::with_capacity(tree.len()) };
    for (sym, tfs) in tree {
        let Some(mtime) = dir_time(sym.to_string()) else { continue };
        let mut s = SnapSymbol { name: sym.to_string(), mtime, timeframes: Vec::with_capacity(tfs.len()) };
        for (tf, groups) in tfs {
            let Some(mtime) = dir_time(format!("{sym}/{tf}")) else { continue };
            s.timeframes.push(SnapTimeframe { name: tf.to_string(), mtime, groups });
        }
        file.symbols.push(s);
    }
    let body = file.encode_to_vec();
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
