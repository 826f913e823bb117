//! The storage engine: catalog of time buckets, write-ahead log, partitions, zero-copy reads.
//!
//! All mutations go through one writer thread, which groups whatever is queued into one log append and one
//! `fdatasync` (group commit), then applies the records to the partitions and only then acknowledges them and
//! makes them visible to readers. Reads take an immutable snapshot of a bucket's partition views and hand out
//! Arrow arrays over the mapped column files.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use mkts::engine::{Engine, EngineConfig, BucketKey, ReadRequest, WriteOptions};
//! let engine = Engine::open(EngineConfig::new("./data"))?;
//! # let batch: arrow::array::RecordBatch = unimplemented!();
//! let key = BucketKey::parse("AAPL/1Min/OHLCV")?;
//! engine.write(&key, &batch, WriteOptions::default()).await?;   // durable when this returns
//! let out = engine.read(&ReadRequest::key(&key))?;
//! # Ok(()) }
//! ```

pub mod error;
pub mod key;
mod normalize;
pub mod partition;
mod read;
pub mod types;
pub mod wal;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use chrono::{Datelike, TimeZone, Utc};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub use error::{EngineError, Result};
pub use key::{BucketKey, KeyPattern, KeySelector, TfUnit, Timeframe, DEFAULT_CATEGORIES};
pub use normalize::infer_schema;
pub use partition::PartView;
pub use read::{decode_string16, TimePoint};
pub use types::{epoch_type, BucketSchema, ColumnDef, ColumnType, RecordKind, EPOCH, NANOSECONDS};

use partition::{Partition, Rows};
use wal::{Op, WalWriter};

/// Which operations the server allows (MarketStore's `enable_add`, `enable_remove`, `queryable`).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Creating buckets (explicitly or by a first write).
    pub enable_add: bool,
    /// Destroying buckets and deleting ranges.
    pub enable_remove: bool,
    /// Reads and listings.
    pub queryable: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { enable_add: true, enable_remove: true, queryable: true }
    }
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub root: PathBuf,
    pub policy: Policy,
    /// Checkpoint when the active log segment exceeds this many bytes.
    pub wal_segment_bytes: u64,
    /// Checkpoint at least this often while there are unflushed appends.
    pub checkpoint_interval: Duration,
    /// Column files kept mapped at most (checked at every checkpoint tick): past it, the least recently used
    /// partitions are unmapped. Default: half of `vm.max_map_count`.
    pub max_mapped_files: usize,
}

impl EngineConfig {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        EngineConfig {
            root: root.into(),
            policy: Policy::default(),
            wal_segment_bytes: 256 << 20,
            checkpoint_interval: Duration::from_secs(10),
            max_mapped_files: std::fs::read_to_string("/proc/sys/vm/max_map_count")
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .map(|n| n / 2)
                .unwrap_or(32_768),
        }
    }
}

/// Options of one write.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// When the bucket does not exist: create it as variable-length (`Some(true)`) or fixed. `None` infers
    /// it from the batch (a `Nanoseconds` column makes a tick bucket).
    pub variable: Option<bool>,
}

/// What a durable write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAck {
    /// Rows stored (after fixed-bucket deduplication within the batch).
    pub rows: usize,
    /// Log sequence number of the write.
    pub lsn: u64,
}

/// A read: which buckets, which time range (inclusive), which rows and columns.
#[derive(Debug, Clone)]
pub struct ReadRequest {
    pub selector: KeySelector,
    pub start: Option<TimePoint>,
    pub end: Option<TimePoint>,
    /// At most this many rows per bucket.
    pub limit: Option<usize>,
    /// With a limit: the first rows (true) or the last rows (false, MarketStore's default).
    pub from_start: bool,
    /// Data columns to return (Epoch and, for ticks, Nanoseconds always come along).
    pub columns: Option<Vec<String>>,
}

impl ReadRequest {
    /// Every row of one bucket.
    pub fn key(key: &BucketKey) -> Self {
        ReadRequest {
            selector: KeySelector {
                symbols: Some(vec![key.symbol.clone()]),
                timeframe: key.timeframe.clone(),
                attr_group: key.attr_group.clone(),
            },
            start: None,
            end: None,
            limit: None,
            from_start: false,
            columns: None,
        }
    }
}

/// The result of reading one bucket: zero-copy batches in time order.
#[derive(Debug, Clone)]
pub struct BucketRead {
    pub key: BucketKey,
    pub kind: RecordKind,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub rows: usize,
}

/// Description of a bucket.
#[derive(Debug, Clone, Serialize)]
pub struct BucketInfo {
    pub key: String,
    pub schema: BucketSchema,
    pub rows: usize,
    pub years: Vec<i32>,
    pub first_epoch: Option<i64>,
    pub last_epoch: Option<i64>,
}

/// Rows appended to a bucket by one durable write, published to subscribers (triggers).
#[derive(Debug, Clone)]
pub struct AppendEvent {
    pub key: BucketKey,
    pub lsn: u64,
    /// The rows as stored, in the bucket's read schema.
    pub batch: RecordBatch,
}

/// A subscription to appended batches. Bounded: when the subscriber falls behind, events are dropped and
/// counted instead of slowing writers down.
pub struct Subscription {
    pub rx: mpsc::Receiver<Arc<AppendEvent>>,
    pub dropped: Arc<AtomicU64>,
    probe: mpsc::WeakSender<Arc<AppendEvent>>,
}

impl Subscription {
    /// A function reporting how many events wait in this subscription's queue (for lag metrics); usable
    /// from any thread while the subscription lives, 0 after.
    pub fn depth_probe(&self) -> impl Fn() -> usize + Send + Sync + 'static {
        let probe = self.probe.clone();
        move || probe.upgrade().map(|tx| tx.max_capacity() - tx.capacity()).unwrap_or(0)
    }
}

struct Subscriber {
    tx: mpsc::Sender<Arc<AppendEvent>>,
    dropped: Arc<AtomicU64>,
    /// Only keys matching this pattern are queued (all when `None`), so unrelated writes neither fill the
    /// queue nor count as drops.
    filter: Option<KeyPattern>,
}

#[derive(Debug, Serialize, Deserialize)]
struct BucketFile {
    key: String,
    timeframe: String,
    schema: BucketSchema,
    created_lsn: u64,
    created_at: i64,
}

/// One bucket: writer-side partitions and the reader-visible snapshot.
struct Bucket {
    key: BucketKey,
    schema: BucketSchema,
    created_lsn: u64,
    dir: PathBuf,
    parts: Mutex<BTreeMap<i32, Partition>>,
    view: RwLock<Arc<Vec<PartView>>>,
}

impl Bucket {
    fn data_types(&self) -> Vec<ColumnType> {
        self.schema.columns.iter().map(|c| c.ty).collect()
    }

    fn publish(&self, parts: &BTreeMap<i32, Partition>) {
        let v: Vec<PartView> = parts.values().map(|p| p.view()).collect();
        *self.view.write() = Arc::new(v);
    }

    fn snapshot(&self) -> Arc<Vec<PartView>> {
        self.view.read().clone()
    }

    /// Map the partitions of `years` that are not mapped yet (first read of them) and publish views that
    /// include their buffers.
    fn map_years(&self, years: &[i32]) -> Result<()> {
        let mut parts = self.parts.lock();
        for y in years {
            if let Some(p) = parts.get_mut(y) {
                p.ensure_mapped()?;
            }
        }
        self.publish(&parts);
        Ok(())
    }

    /// Split sorted rows by UTC year (zero-copy slices).
    fn year_slices(&self, rows: &Rows) -> Vec<(i32, Rows)> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < rows.len {
            let year = year_of(rows.epoch(start));
            let next_year_start = year_start(year + 1);
            // Rows are sorted by epoch: binary search the year's end.
            let (mut lo, mut hi) = (start, rows.len);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if rows.epoch(mid) < next_year_start {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            let end = lo.max(start + 1);
            let slice = if start == 0 && end == rows.len { rows.clone() } else { slice_rows(rows, &self.widths(), start, end) };
            out.push((year, slice));
            start = end;
        }
        out
    }

    fn part<'a>(&self, parts: &'a mut BTreeMap<i32, Partition>, year: i32) -> Result<&'a mut Partition> {
        Ok(match parts.entry(year) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(Partition::open(&self.dir.join(year.to_string()), year, self.schema.kind, &self.data_types())?)
            }
        })
    }

    /// Apply sorted rows, splitting them by UTC year.
    fn apply_write(&self, rows: &Rows, lsn: u64, replay: bool) -> Result<()> {
        let mut parts = self.parts.lock();
        for (year, slice) in self.year_slices(rows) {
            let part = self.part(&mut parts, year)?;
            if !(replay && lsn <= part.applied_lsn) {
                part.apply_rows(&slice, lsn)?;
            }
        }
        self.publish(&parts);
        Ok(())
    }

    /// Bulk path: if every year slice is a pure append, write the rows straight into the column files
    /// (fsync'd), and return the commit record entries; `None` when the write must take the log path.
    fn stage_direct(&self, rows: &Rows) -> Result<Option<Vec<DirectEntry>>> {
        let mut parts = self.parts.lock();
        let slices = self.year_slices(rows);
        for (year, slice) in &slices {
            if let Some(p) = parts.get(year) {
                if !p.is_append(slice) {
                    return Ok(None);
                }
            }
        }
        let mut entries = Vec::with_capacity(slices.len());
        for (year, slice) in &slices {
            let part = self.part(&mut parts, *year)?;
            let (generation, start, crc) = part.stage_direct_append(slice)?;
            entries.push(DirectEntry { year: *year, generation, start: start as u64, rows: slice.len as u64, crc });
        }
        Ok(Some(entries))
    }

    /// Make staged (or replayed) bulk appends visible.
    fn commit_direct(&self, entries: &[DirectEntry], lsn: u64, replay: bool) -> Result<()> {
        let mut parts = self.parts.lock();
        for e in entries {
            let part = self.part(&mut parts, e.year)?;
            if replay && lsn <= part.applied_lsn {
                continue;
            }
            part.commit_direct_append(e.generation, e.start as usize, e.rows as usize, e.crc, lsn)?;
        }
        self.publish(&parts);
        Ok(())
    }

    fn widths(&self) -> Vec<usize> {
        partition::physical_types(self.schema.kind, &self.data_types()).iter().map(|t| t.width()).collect()
    }

    fn delete_range(&self, start: TimePoint, end: TimePoint, lsn: u64, replay: bool) -> Result<usize> {
        let mut parts = self.parts.lock();
        let mut removed = 0;
        for p in parts.values_mut() {
            if replay && lsn <= p.applied_lsn {
                continue;
            }
            removed += p.delete_range((start.secs, start.nanos), (end.secs, end.nanos), lsn)?;
        }
        self.publish(&parts);
        Ok(removed)
    }

    fn checkpoint(&self) -> Result<()> {
        let mut parts = self.parts.lock();
        for p in parts.values_mut() {
            p.checkpoint()?;
        }
        Ok(())
    }
}

/// One year partition's part of a bulk append commit record.
#[derive(Debug, Clone, Copy)]
struct DirectEntry {
    year: i32,
    generation: u64,
    start: u64,
    rows: u64,
    crc: u32,
}

/// Writes at least this large skip copying their rows into the log when they are pure appends.
const DIRECT_APPEND_ROWS: usize = 32_768;

fn encode_direct(buf: &mut Vec<u8>, entries: &[DirectEntry]) {
    buf.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for e in entries {
        buf.extend_from_slice(&e.year.to_le_bytes());
        buf.extend_from_slice(&e.generation.to_le_bytes());
        buf.extend_from_slice(&e.start.to_le_bytes());
        buf.extend_from_slice(&e.rows.to_le_bytes());
        buf.extend_from_slice(&e.crc.to_le_bytes());
    }
}

fn decode_direct(p: &[u8]) -> Option<Vec<DirectEntry>> {
    let n = u16::from_le_bytes(p.get(0..2)?.try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(n);
    let mut pos = 2;
    for _ in 0..n {
        let b = p.get(pos..pos + 32)?;
        out.push(DirectEntry {
            year: i32::from_le_bytes(b[0..4].try_into().ok()?),
            generation: u64::from_le_bytes(b[4..12].try_into().ok()?),
            start: u64::from_le_bytes(b[12..20].try_into().ok()?),
            rows: u64::from_le_bytes(b[20..28].try_into().ok()?),
            crc: u32::from_le_bytes(b[28..32].try_into().ok()?),
        });
        pos += 32;
    }
    Some(out)
}

fn slice_rows(rows: &Rows, widths: &[usize], lo: usize, hi: usize) -> Rows {
    rows.slice(widths, lo, hi)
}

fn year_of(t: i64) -> i32 {
    Utc.timestamp_opt(t, 0).single().map(|d| d.year()).unwrap_or(if t < 0 { -262143 } else { 262142 })
}

fn year_start(y: i32) -> i64 {
    Utc.with_ymd_and_hms(y, 1, 1, 0, 0, 0).single().map(|d| d.timestamp()).unwrap_or(i64::MAX)
}

enum Cmd {
    Write { key: BucketKey, created_lsn: Option<u64>, create: Option<BucketSchema>, rows: Rows, reply: oneshot::Sender<Result<WriteAck>> },
    Create { key: BucketKey, schema: BucketSchema, reply: oneshot::Sender<Result<()>> },
    Destroy { key: BucketKey, reply: oneshot::Sender<Result<()>> },
    DeleteRange { key: BucketKey, start: TimePoint, end: TimePoint, reply: oneshot::Sender<Result<usize>> },
    Checkpoint { reply: Option<oneshot::Sender<Result<()>>> },
    Shutdown { reply: oneshot::Sender<Result<()>> },
}

struct Inner {
    root: PathBuf,
    policy: Policy,
    catalog: RwLock<BTreeMap<BucketKey, Arc<Bucket>>>,
    tx: mpsc::UnboundedSender<Cmd>,
    subscribers: Mutex<Vec<Subscriber>>,
    failed: AtomicBool,
    stopped: AtomicBool,
    rows_written: AtomicU64,
    /// Log appends made durable (one fdatasync each) and records they carried: group commit shows as
    /// `records_logged > wal_syncs` under concurrent writers.
    wal_syncs: AtomicU64,
    records_logged: AtomicU64,
    _lock: fs::File,
}

/// Handle to the storage engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("root", &self.inner.root).finish()
    }
}

fn send_err<T>(e: EngineError) -> Result<T> {
    Err(e)
}

impl Engine {
    /// Open (or create) the data directory, replay the write-ahead log and start the writer thread.
    ///
    /// Fails with one clear error when the root cannot be created or is locked by another process.
    pub fn open(cfg: EngineConfig) -> Result<Engine> {
        let root = cfg.root.clone();
        fs::create_dir_all(&root).map_err(|e| EngineError::io(&root, e))?;
        let lock_path = root.join(".lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| EngineError::io(&lock_path, e))?;
        lock.try_lock().map_err(|_| {
            EngineError::Unavailable(format!(
                "data directory {} is in use by another mkts process (lock file {})",
                root.display(),
                lock_path.display()
            ))
        })?;
        let wal_dir = root.join(".wal");
        let mut catalog = load_catalog(&root)?;
        let mut max_lsn = 0u64;
        for b in catalog.values() {
            max_lsn = max_lsn.max(b.created_lsn);
            for p in b.parts.lock().values() {
                max_lsn = max_lsn.max(p.applied_lsn);
            }
        }
        // Replay.
        let mut replayed = 0usize;
        let wal_max = wal::replay(&wal_dir, |rec| {
            replayed += 1;
            replay_record(&root, &mut catalog, rec)
        })?;
        max_lsn = max_lsn.max(wal_max);
        for b in catalog.values() {
            b.checkpoint()?;
        }
        if replayed > 0 {
            tracing::info!(records = replayed, last_lsn = wal_max, "replayed the write-ahead log");
        }
        let mut walw = WalWriter::create(&wal_dir, max_lsn + 1)?;
        walw.rotate_and_trim(max_lsn + 1)?;

        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            root: root.clone(),
            policy: cfg.policy,
            catalog: RwLock::new(catalog),
            tx,
            subscribers: Mutex::new(Vec::new()),
            failed: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            rows_written: AtomicU64::new(0),
            wal_syncs: AtomicU64::new(0),
            records_logged: AtomicU64::new(0),
            _lock: lock,
        });
        let weak = Arc::downgrade(&inner);
        let mut writer = Writer { inner: weak, wal: walw, next_lsn: max_lsn + 1, dirty: HashSet::new(), cfg: cfg.clone(), last_checkpoint: Instant::now() };
        std::thread::Builder::new()
            .name("mkts-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| EngineError::io(&root, e))?;
        // Periodic checkpoints.
        let tick_tx = inner.tx.clone();
        let every = cfg.checkpoint_interval;
        std::thread::Builder::new()
            .name("mkts-checkpoint".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                if tick_tx.send(Cmd::Checkpoint { reply: None }).is_err() {
                    break;
                }
            })
            .map_err(|e| EngineError::io(&root, e))?;
        Ok(Engine { inner })
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The active policy.
    pub fn policy(&self) -> Policy {
        self.inner.policy
    }

    /// Total rows acknowledged since start (for metrics).
    pub fn rows_written(&self) -> u64 {
        self.inner.rows_written.load(Ordering::Relaxed)
    }

    /// Durable log appends (fdatasync calls) and the records they carried since start.
    pub fn wal_stats(&self) -> (u64, u64) {
        (self.inner.wal_syncs.load(Ordering::Relaxed), self.inner.records_logged.load(Ordering::Relaxed))
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.stopped.load(Ordering::Acquire) {
            return send_err(EngineError::Unavailable("the engine is shut down".into()));
        }
        if self.inner.failed.load(Ordering::Acquire) {
            return send_err(EngineError::Unavailable("a disk write failed; the engine is read-only".into()));
        }
        Ok(())
    }

    fn bucket(&self, key: &BucketKey) -> Option<Arc<Bucket>> {
        self.inner.catalog.read().get(key).cloned()
    }

    /// Write a batch to a bucket, creating it when absent (if `enable_add`). Returns once the rows are
    /// durable in the log and visible to readers.
    pub async fn write(&self, key: &BucketKey, batch: &RecordBatch, opts: WriteOptions) -> Result<WriteAck> {
        // Large batches are validated and sorted off the async workers.
        let rx = if batch.num_rows() > 50_000 {
            let (me, key, batch) = (self.clone(), key.clone(), batch.clone());
            tokio::task::spawn_blocking(move || me.submit_write(&key, &batch, opts))
                .await
                .map_err(|e| EngineError::Unavailable(format!("write task failed: {e}")))??
        } else {
            self.submit_write(key, batch, opts)?
        };
        rx.await.unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())))
    }

    /// Blocking form of [`Engine::write`] for non-async callers (CLI, plugins' threads).
    pub fn write_blocking(&self, key: &BucketKey, batch: &RecordBatch, opts: WriteOptions) -> Result<WriteAck> {
        let rx = self.submit_write(key, batch, opts)?;
        rx.blocking_recv().unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())))
    }

    fn submit_write(&self, key: &BucketKey, batch: &RecordBatch, opts: WriteOptions) -> Result<oneshot::Receiver<Result<WriteAck>>> {
        self.check_open()?;
        let (created_lsn, create, schema) = match self.bucket(key) {
            Some(b) => (Some(b.created_lsn), None, b.schema.clone()),
            None => {
                if !self.inner.policy.enable_add {
                    return Err(EngineError::NotAllowed(format!(
                        "bucket {key} does not exist and creating buckets is disabled (enable_add: false)"
                    )));
                }
                let s = infer_schema(batch, opts.variable)?;
                (None, Some(s.clone()), s)
            }
        };
        let rows = normalize::normalize(batch, &schema, key.tf())?;
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Write { key: key.clone(), created_lsn, create, rows, reply })
            .map_err(|_| EngineError::Unavailable("writer stopped".into()))?;
        Ok(rx)
    }

    /// Create an empty bucket.
    pub async fn create(&self, key: &BucketKey, schema: BucketSchema) -> Result<()> {
        self.check_open()?;
        if !self.inner.policy.enable_add {
            return Err(EngineError::NotAllowed("creating buckets is disabled (enable_add: false)".into()));
        }
        schema.validate()?;
        if self.bucket(key).is_some() {
            return Err(EngineError::AlreadyExists(key.to_string()));
        }
        let (reply, rx) = oneshot::channel();
        self.inner.tx.send(Cmd::Create { key: key.clone(), schema, reply }).map_err(|_| EngineError::Unavailable("writer stopped".into()))?;
        rx.await.unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())))
    }

    /// Remove a bucket and all its data.
    pub async fn destroy(&self, key: &BucketKey) -> Result<()> {
        self.check_open()?;
        if !self.inner.policy.enable_remove {
            return Err(EngineError::NotAllowed("removing data is disabled (enable_remove: false)".into()));
        }
        if self.bucket(key).is_none() {
            return Err(EngineError::NotFound(key.to_string()));
        }
        let (reply, rx) = oneshot::channel();
        self.inner.tx.send(Cmd::Destroy { key: key.clone(), reply }).map_err(|_| EngineError::Unavailable("writer stopped".into()))?;
        rx.await.unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())))
    }

    /// Delete the rows of a bucket with `start <= time <= end`. Returns the number of rows removed.
    pub async fn delete_range(&self, key: &BucketKey, start: TimePoint, end: TimePoint) -> Result<usize> {
        self.check_open()?;
        if !self.inner.policy.enable_remove {
            return Err(EngineError::NotAllowed("removing data is disabled (enable_remove: false)".into()));
        }
        if self.bucket(key).is_none() {
            return Err(EngineError::NotFound(key.to_string()));
        }
        if start > end {
            return Err(EngineError::InvalidInput("delete_range: start is after end".into()));
        }
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::DeleteRange { key: key.clone(), start, end, reply })
            .map_err(|_| EngineError::Unavailable("writer stopped".into()))?;
        rx.await.unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())))
    }

    /// Force a checkpoint (flush partitions, trim the log).
    pub async fn checkpoint(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.inner.tx.send(Cmd::Checkpoint { reply: Some(reply) }).map_err(|_| EngineError::Unavailable("writer stopped".into()))?;
        rx.await.unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())))
    }

    /// Stop accepting writes, checkpoint, and stop the writer thread.
    pub async fn shutdown(&self) -> Result<()> {
        if self.inner.stopped.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        if self.inner.tx.send(Cmd::Shutdown { reply }).is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }

    /// Every bucket key, sorted.
    pub fn keys(&self) -> Vec<BucketKey> {
        self.inner.catalog.read().keys().cloned().collect()
    }

    /// Schema of a bucket.
    pub fn schema(&self, key: &BucketKey) -> Option<BucketSchema> {
        self.bucket(key).map(|b| b.schema.clone())
    }

    /// Schema, row count and time span of a bucket.
    pub fn info(&self, key: &BucketKey) -> Result<BucketInfo> {
        let b = self.bucket(key).ok_or_else(|| EngineError::NotFound(key.to_string()))?;
        let snap = b.snapshot();
        let rows = snap.iter().map(|p| p.rows).sum();
        let first = snap.iter().find(|p| p.rows > 0).and_then(|p| p.first);
        let last = snap.iter().rev().find(|p| p.rows > 0).and_then(|p| p.last);
        Ok(BucketInfo {
            key: key.to_string(),
            schema: b.schema.clone(),
            rows,
            years: snap.iter().filter(|p| p.rows > 0).map(|p| p.year).collect(),
            first_epoch: first,
            last_epoch: last,
        })
    }

    /// Buckets matching a selector, sorted by key. Missing symbols of a list are skipped.
    pub fn resolve(&self, sel: &KeySelector) -> Vec<BucketKey> {
        let cat = self.inner.catalog.read();
        match &sel.symbols {
            None => cat
                .keys()
                .filter(|k| k.timeframe == sel.timeframe && k.attr_group == sel.attr_group)
                .cloned()
                .collect(),
            Some(list) => list
                .iter()
                .filter_map(|s| {
                    let k = BucketKey { symbol: s.clone(), timeframe: sel.timeframe.clone(), attr_group: sel.attr_group.clone() };
                    cat.contains_key(&k).then_some(k)
                })
                .collect(),
        }
    }

    /// Read a consistent snapshot of every selected bucket. Numeric columns point into the mapped files.
    ///
    /// Errors with [`EngineError::NotFound`] when no selected bucket exists; a bucket with no rows in range
    /// yields an empty result for that bucket.
    pub fn read(&self, req: &ReadRequest) -> Result<Vec<BucketRead>> {
        if !self.inner.policy.queryable {
            return Err(EngineError::NotAllowed("server is not queryable".into()));
        }
        let keys = self.resolve(&req.selector);
        if keys.is_empty() {
            let sym = req.selector.symbols.as_ref().map(|s| s.join(",")).unwrap_or_else(|| "*".into());
            return Err(EngineError::NotFound(format!("{sym}/{}/{}", req.selector.timeframe, req.selector.attr_group)));
        }
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(b) = self.bucket(&key) else { continue };
            out.push(read_bucket(&b, req)?);
        }
        Ok(out)
    }

    /// Subscribe to appended batches. `capacity` bounds the queue; overflow drops events (counted).
    pub fn subscribe(&self, capacity: usize) -> Subscription {
        self.subscribe_matching(None, capacity)
    }

    /// Subscribe to appended batches of the keys matching `filter` (every key when `None`). Triggers use
    /// one such subscription each: a bounded queue of their own, so a slow one never delays writers or
    /// other subscribers; what overflows is dropped and counted in `dropped`.
    pub fn subscribe_matching(&self, filter: Option<KeyPattern>, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let probe = tx.downgrade();
        self.inner.subscribers.lock().push(Subscriber { tx, dropped: dropped.clone(), filter });
        Subscription { rx, dropped, probe }
    }
}

fn read_bucket(b: &Bucket, req: &ReadRequest) -> Result<BucketRead> {
    let mut snap = b.snapshot();
    let (schema, cols) = read::projection(&b.schema, req.columns.as_deref());
    let mut start = req.start.unwrap_or(TimePoint::MIN);
    let end = req.end.unwrap_or(TimePoint::MAX);
    if b.schema.kind == RecordKind::Fixed && start.secs != i64::MIN {
        // Fixed buckets filter at interval granularity: a start inside an interval includes its bar.
        start = TimePoint::secs(b.key.tf().truncate(start.secs));
    }
    // Partitions that can hold rows of the range (by their first/last Epoch) must be mapped to be read.
    let overlaps = |p: &PartView| p.rows > 0 && p.first.is_none_or(|f| f <= end.secs) && p.last.is_none_or(|l| l >= start.secs);
    let unmapped: Vec<i32> = snap.iter().filter(|p| overlaps(p) && !p.mapped).map(|p| p.year).collect();
    if !unmapped.is_empty() {
        b.map_years(&unmapped)?;
        snap = b.snapshot();
    }
    let mut ranges: Vec<(usize, usize, usize)> = Vec::new();
    for (i, p) in snap.iter().enumerate() {
        if !overlaps(p) || !p.mapped {
            continue;
        }
        p.touch();
        let (lo, hi) = read::row_range(p, b.schema.kind, start, end);
        if hi > lo {
            ranges.push((i, lo, hi));
        }
    }
    if let Some(limit) = req.limit {
        let mut left = limit;
        if req.from_start {
            let mut kept = Vec::new();
            for (i, lo, hi) in ranges {
                if left == 0 {
                    break;
                }
                let n = (hi - lo).min(left);
                kept.push((i, lo, lo + n));
                left -= n;
            }
            ranges = kept;
        } else {
            let mut kept = Vec::new();
            for (i, lo, hi) in ranges.into_iter().rev() {
                if left == 0 {
                    break;
                }
                let n = (hi - lo).min(left);
                kept.push((i, hi - n, hi));
                left -= n;
            }
            kept.reverse();
            ranges = kept;
        }
    }
    let mut batches = Vec::with_capacity(ranges.len());
    let mut rows = 0;
    for (i, lo, hi) in ranges {
        read::batches_of(&schema, &cols, &snap[i], lo, hi, &mut batches)?;
        rows += hi - lo;
    }
    Ok(BucketRead { key: b.key.clone(), kind: b.schema.kind, schema, batches, rows })
}

fn bucket_dir(root: &Path, key: &BucketKey) -> PathBuf {
    root.join(&key.symbol).join(&key.timeframe).join(&key.attr_group)
}

fn load_bucket(dir: &Path) -> Result<Bucket> {
    let bf = dir.join("bucket.json");
    let text = fs::read_to_string(&bf).map_err(|e| EngineError::io(&bf, e))?;
    let meta: BucketFile =
        serde_json::from_str(&text).map_err(|e| EngineError::Corrupt { path: bf.display().to_string(), reason: e.to_string() })?;
    let key = BucketKey::parse(&meta.key)?;
    let types: Vec<ColumnType> = meta.schema.columns.iter().map(|c| c.ty).collect();
    let mut parts = BTreeMap::new();
    for ent in fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))?.flatten() {
        let name = ent.file_name().to_string_lossy().to_string();
        if let Ok(year) = name.parse::<i32>() {
            if ent.path().join("manifest.json").exists() {
                parts.insert(year, Partition::open(&ent.path(), year, meta.schema.kind, &types)?);
            }
        }
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

fn load_catalog(root: &Path) -> Result<BTreeMap<BucketKey, Arc<Bucket>>> {
    let mut cat = BTreeMap::new();
    let subdirs = |p: &Path| -> Vec<PathBuf> {
        fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    for s in subdirs(root) {
        for t in subdirs(&s) {
            for g in subdirs(&t) {
                if g.join("bucket.json").exists() {
                    match load_bucket(&g) {
                        Ok(b) => {
                            cat.insert(b.key.clone(), Arc::new(b));
                        }
                        Err(e) => tracing::error!(dir = %g.display(), "skipping unreadable bucket: {e}"),
                    }
                }
            }
        }
    }
    Ok(cat)
}

fn create_bucket_files(root: &Path, key: &BucketKey, schema: &BucketSchema, lsn: u64) -> Result<Bucket> {
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

fn remove_bucket_files(root: &Path, key: &BucketKey) -> Result<()> {
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

fn decode_write_payload(payload: &[u8], widths: &[usize]) -> Option<Rows> {
    let len = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?) as usize;
    let ncols = u16::from_le_bytes(payload.get(4..6)?.try_into().ok()?) as usize;
    if ncols != widths.len() {
        return None;
    }
    let mut pos = 6;
    let mut cols = Vec::with_capacity(ncols);
    for w in widths {
        let n = len * w;
        cols.push(arrow::buffer::Buffer::from(payload.get(pos..pos + n)?));
        pos += n;
    }
    Some(Rows { len, cols })
}

fn encode_write(group: &mut wal::Group, lsn: u64, key: &str, rows: &Rows) {
    wal::encode_record_with(
        group,
        lsn,
        Op::Write,
        key,
        |b| {
            b.extend_from_slice(&(rows.len as u32).to_le_bytes());
            b.extend_from_slice(&(rows.cols.len() as u16).to_le_bytes());
        },
        &rows.cols,
    );
}

fn encode_range(buf: &mut Vec<u8>, start: TimePoint, end: TimePoint) {
    buf.extend_from_slice(&start.secs.to_le_bytes());
    buf.extend_from_slice(&start.nanos.to_le_bytes());
    buf.extend_from_slice(&end.secs.to_le_bytes());
    buf.extend_from_slice(&end.nanos.to_le_bytes());
}

fn decode_range(p: &[u8]) -> Option<(TimePoint, TimePoint)> {
    Some((
        TimePoint { secs: i64::from_le_bytes(p.get(0..8)?.try_into().ok()?), nanos: i32::from_le_bytes(p.get(8..12)?.try_into().ok()?) },
        TimePoint { secs: i64::from_le_bytes(p.get(12..20)?.try_into().ok()?), nanos: i32::from_le_bytes(p.get(20..24)?.try_into().ok()?) },
    ))
}

/// Re-apply one logged record on start-up, skipping whatever the durable state already contains.
fn replay_record(root: &Path, cat: &mut BTreeMap<BucketKey, Arc<Bucket>>, rec: wal::Record<'_>) -> Result<()> {
    let key = match BucketKey::parse(rec.key) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(lsn = rec.lsn, "skipping log record with a bad key: {e}");
            return Ok(());
        }
    };
    let current = cat.get(&key).filter(|b| b.created_lsn <= rec.lsn).cloned();
    match rec.op {
        Op::Create => {
            if cat.get(&key).is_none() {
                let schema: BucketSchema = serde_json::from_slice(rec.payload).map_err(|e| EngineError::Corrupt {
                    path: format!("log record {}", rec.lsn),
                    reason: e.to_string(),
                })?;
                let b = create_bucket_files(root, &key, &schema, rec.lsn)?;
                cat.insert(key, Arc::new(b));
            }
        }
        Op::Destroy => {
            if current.is_some() {
                remove_bucket_files(root, &key)?;
                cat.remove(&key);
            }
        }
        Op::Write => {
            if let Some(b) = current {
                let rows = decode_write_payload(rec.payload, &b.widths()).ok_or_else(|| EngineError::Corrupt {
                    path: format!("log record {}", rec.lsn),
                    reason: "write payload does not match the bucket schema".into(),
                })?;
                b.apply_write(&rows, rec.lsn, true)?;
            }
        }
        Op::DeleteRange => {
            if let (Some(b), Some((s, e))) = (current, decode_range(rec.payload)) {
                b.delete_range(s, e, rec.lsn, true)?;
            }
        }
        Op::AppendDirect => {
            if let Some(b) = current {
                let entries = decode_direct(rec.payload).ok_or_else(|| EngineError::Corrupt {
                    path: format!("log record {}", rec.lsn),
                    reason: "bad bulk append record".into(),
                })?;
                b.commit_direct(&entries, rec.lsn, true)?;
            }
        }
    }
    Ok(())
}

struct PendingWrite {
    lsn: u64,
    bucket: Arc<Bucket>,
    rows: Rows,
    reply: oneshot::Sender<Result<WriteAck>>,
}

/// The single writer: owns the log, assigns LSNs, applies records, runs checkpoints.
struct Writer {
    inner: std::sync::Weak<Inner>,
    wal: WalWriter,
    next_lsn: u64,
    dirty: HashSet<BucketKey>,
    cfg: EngineConfig,
    last_checkpoint: Instant,
}

const GROUP_BYTES: usize = 64 << 20;

impl Writer {
    fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        while let Some(first) = rx.blocking_recv() {
            let Some(inner) = self.inner.upgrade() else { break };
            let mut group = vec![first];
            let mut bytes = 0usize;
            while bytes < GROUP_BYTES {
                match rx.try_recv() {
                    Ok(c) => {
                        if let Cmd::Write { rows, .. } = &c {
                            bytes += rows.cols.iter().map(|c| c.len()).sum::<usize>();
                        }
                        group.push(c)
                    }
                    Err(_) => break,
                }
            }
            let stop = self.process(&inner, group);
            if stop {
                break;
            }
            if self.wal.size() > self.cfg.wal_segment_bytes {
                if let Err(e) = self.checkpoint(&inner) {
                    self.fail(&inner, &e);
                }
            }
        }
    }

    fn fail(&self, inner: &Inner, e: &EngineError) {
        tracing::error!("storage failure, the engine is now read-only: {e}");
        inner.failed.store(true, Ordering::Release);
    }

    fn take_lsn(&mut self) -> u64 {
        let l = self.next_lsn;
        self.next_lsn += 1;
        l
    }

    /// Returns true on shutdown.
    fn process(&mut self, inner: &Arc<Inner>, group: Vec<Cmd>) -> bool {
        let mut buf = wal::Group::default();
        let mut pending: Vec<PendingWrite> = Vec::new();
        for cmd in group {
            if inner.failed.load(Ordering::Acquire) {
                reply_failed(cmd);
                continue;
            }
            match cmd {
                Cmd::Write { key, created_lsn, create, rows, reply } => {
                    let existing = inner.catalog.read().get(&key).cloned();
                    match (existing, created_lsn, create) {
                        (Some(b), Some(c), _) if b.created_lsn == c && rows.len >= DIRECT_APPEND_ROWS => {
                            self.flush(inner, &mut buf, &mut pending);
                            self.direct_write(inner, b, rows, reply);
                        }
                        (Some(b), Some(c), _) if b.created_lsn == c => {
                            let lsn = self.take_lsn();
                            encode_write(&mut buf, lsn, &key.to_string(), &rows);
                            pending.push(PendingWrite { lsn, bucket: b, rows, reply });
                        }
                        (Some(b), None, Some(schema)) if b.schema == schema => {
                            let lsn = self.take_lsn();
                            encode_write(&mut buf, lsn, &key.to_string(), &rows);
                            pending.push(PendingWrite { lsn, bucket: b, rows, reply });
                        }
                        (None, None, Some(schema)) => {
                            // Auto-create: log create + write together, then make the bucket.
                            self.flush(inner, &mut buf, &mut pending);
                            let clsn = self.take_lsn();
                            let wlsn = self.take_lsn();
                            let key_s = key.to_string();
                            wal::encode_record(&mut buf, clsn, Op::Create, &key_s, |p| {
                                p.extend_from_slice(&serde_json::to_vec(&schema).unwrap_or_default())
                            });
                            let direct = rows.len >= DIRECT_APPEND_ROWS;
                            if !direct {
                                encode_write(&mut buf, wlsn, &key_s, &rows);
                            }
                            if let Err(e) = self.wal.append_durable(&buf) {
                                self.fail(inner, &e);
                                let _ = reply.send(Err(e));
                                buf.clear();
                                continue;
                            }
                            buf.clear();
                            match create_bucket_files(&inner.root, &key, &schema, clsn) {
                                Ok(b) => {
                                    let b = Arc::new(b);
                                    inner.catalog.write().insert(key.clone(), b.clone());
                                    if direct {
                                        self.direct_write_at(inner, b, rows, reply, wlsn);
                                    } else {
                                        self.apply_one(inner, PendingWrite { lsn: wlsn, bucket: b, rows, reply });
                                    }
                                }
                                Err(e) => {
                                    self.fail(inner, &e);
                                    let _ = reply.send(Err(e));
                                }
                            }
                        }
                        _ => {
                            let _ = reply.send(Err(EngineError::InvalidInput(format!(
                                "bucket {key} was created, destroyed or recreated concurrently with this write; retry"
                            ))));
                        }
                    }
                }
                Cmd::Create { key, schema, reply } => {
                    self.flush(inner, &mut buf, &mut pending);
                    if inner.catalog.read().contains_key(&key) {
                        let _ = reply.send(Err(EngineError::AlreadyExists(key.to_string())));
                        continue;
                    }
                    let lsn = self.take_lsn();
                    wal::encode_record(&mut buf, lsn, Op::Create, &key.to_string(), |p| {
                        p.extend_from_slice(&serde_json::to_vec(&schema).unwrap_or_default())
                    });
                    let r = self.wal.append_durable(&buf).and_then(|_| create_bucket_files(&inner.root, &key, &schema, lsn));
                    buf.clear();
                    match r {
                        Ok(b) => {
                            inner.catalog.write().insert(key, Arc::new(b));
                            let _ = reply.send(Ok(()));
                        }
                        Err(e) => {
                            self.fail(inner, &e);
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Cmd::Destroy { key, reply } => {
                    self.flush(inner, &mut buf, &mut pending);
                    if !inner.catalog.read().contains_key(&key) {
                        let _ = reply.send(Err(EngineError::NotFound(key.to_string())));
                        continue;
                    }
                    let lsn = self.take_lsn();
                    wal::encode_record(&mut buf, lsn, Op::Destroy, &key.to_string(), |_| {});
                    let r = self.wal.append_durable(&buf);
                    buf.clear();
                    let r = r.and_then(|_| {
                        inner.catalog.write().remove(&key);
                        self.dirty.remove(&key);
                        remove_bucket_files(&inner.root, &key)
                    });
                    if let Err(e) = &r {
                        self.fail(inner, e);
                    }
                    let _ = reply.send(r);
                }
                Cmd::DeleteRange { key, start, end, reply } => {
                    self.flush(inner, &mut buf, &mut pending);
                    let Some(b) = inner.catalog.read().get(&key).cloned() else {
                        let _ = reply.send(Err(EngineError::NotFound(key.to_string())));
                        continue;
                    };
                    let lsn = self.take_lsn();
                    wal::encode_record(&mut buf, lsn, Op::DeleteRange, &key.to_string(), |p| encode_range(p, start, end));
                    let r = self.wal.append_durable(&buf);
                    buf.clear();
                    let r = r.and_then(|_| b.delete_range(start, end, lsn, false));
                    if let Err(e) = &r {
                        self.fail(inner, e);
                    } else {
                        self.dirty.insert(key);
                    }
                    let _ = reply.send(r);
                }
                Cmd::Checkpoint { reply } => {
                    self.flush(inner, &mut buf, &mut pending);
                    let due = reply.is_some()
                        || (!self.dirty.is_empty() && self.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval);
                    let r = if due { self.checkpoint(inner) } else { Ok(()) };
                    if let Err(e) = &r {
                        self.fail(inner, e);
                    }
                    unmap_coldest(inner, self.cfg.max_mapped_files);
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
                Cmd::Shutdown { reply } => {
                    self.flush(inner, &mut buf, &mut pending);
                    let r = self.checkpoint(inner);
                    let _ = reply.send(r);
                    return true;
                }
            }
        }
        self.flush(inner, &mut buf, &mut pending);
        false
    }

    /// Make the buffered records durable (one fdatasync), then apply and acknowledge them.
    fn flush(&mut self, inner: &Arc<Inner>, buf: &mut wal::Group, pending: &mut Vec<PendingWrite>) {
        if pending.is_empty() {
            buf.clear();
            return;
        }
        inner.wal_syncs.fetch_add(1, Ordering::Relaxed);
        inner.records_logged.fetch_add(pending.len() as u64, Ordering::Relaxed);
        if let Err(e) = self.wal.append_durable(buf) {
            self.fail(inner, &e);
            for p in pending.drain(..) {
                let _ = p.reply.send(Err(EngineError::Unavailable(format!("write-ahead log failed: {e}"))));
            }
            buf.clear();
            return;
        }
        buf.clear();
        for p in pending.drain(..) {
            self.apply_one(inner, p);
        }
    }

    /// Bulk append without copying the rows into the log (falls back to the log path when not an append).
    fn direct_write(&mut self, inner: &Arc<Inner>, bucket: Arc<Bucket>, rows: Rows, reply: oneshot::Sender<Result<WriteAck>>) {
        let lsn = self.take_lsn();
        self.direct_write_at(inner, bucket, rows, reply, lsn);
    }

    fn direct_write_at(&mut self, inner: &Arc<Inner>, bucket: Arc<Bucket>, rows: Rows, reply: oneshot::Sender<Result<WriteAck>>, lsn: u64) {
        let key_s = bucket.key.to_string();
        let staged = match bucket.stage_direct(&rows) {
            Ok(s) => s,
            Err(e) => {
                self.fail(inner, &e);
                let _ = reply.send(Err(e));
                return;
            }
        };
        let mut group = wal::Group::default();
        let Some(entries) = staged else {
            // Not a pure append: the ordinary log path.
            encode_write(&mut group, lsn, &key_s, &rows);
            let mut pending = vec![PendingWrite { lsn, bucket, rows, reply }];
            self.flush(inner, &mut group, &mut pending);
            return;
        };
        wal::encode_record(&mut group, lsn, Op::AppendDirect, &key_s, |p| encode_direct(p, &entries));
        inner.wal_syncs.fetch_add(1, Ordering::Relaxed);
        inner.records_logged.fetch_add(1, Ordering::Relaxed);
        let r = self.wal.append_durable(&group).and_then(|_| bucket.commit_direct(&entries, lsn, false));
        match r {
            Ok(()) => {
                self.dirty.insert(bucket.key.clone());
                inner.rows_written.fetch_add(rows.len as u64, Ordering::Relaxed);
                publish_event(inner, &bucket, &rows, lsn);
                let _ = reply.send(Ok(WriteAck { rows: rows.len, lsn }));
            }
            Err(e) => {
                self.fail(inner, &e);
                let _ = reply.send(Err(e));
            }
        }
    }

    fn apply_one(&mut self, inner: &Arc<Inner>, p: PendingWrite) {
        match p.bucket.apply_write(&p.rows, p.lsn, false) {
            Ok(()) => {
                self.dirty.insert(p.bucket.key.clone());
                inner.rows_written.fetch_add(p.rows.len as u64, Ordering::Relaxed);
                let n = p.rows.len;
                publish_event(inner, &p.bucket, &p.rows, p.lsn);
                let _ = p.reply.send(Ok(WriteAck { rows: n, lsn: p.lsn }));
            }
            Err(e) => {
                self.fail(inner, &e);
                let _ = p.reply.send(Err(e));
            }
        }
    }

    fn checkpoint(&mut self, inner: &Arc<Inner>) -> Result<()> {
        let keys: Vec<BucketKey> = self.dirty.drain().collect();
        for k in keys {
            if let Some(b) = inner.catalog.read().get(&k).cloned() {
                b.checkpoint()?;
            }
        }
        self.wal.rotate_and_trim(self.next_lsn)?;
        self.last_checkpoint = Instant::now();
        Ok(())
    }
}

/// Keep at most `budget` column files mapped: unmap the least recently used partitions (down to 80% of the
/// budget, so this does not run at every tick). Readers holding batches keep their own mappings alive.
fn unmap_coldest(inner: &Inner, budget: usize) {
    let buckets: Vec<Arc<Bucket>> = inner.catalog.read().values().cloned().collect();
    let mut mapped: Vec<(u64, usize, usize, i32)> = Vec::new(); // (last used, files, bucket index, year)
    for (bi, b) in buckets.iter().enumerate() {
        for (year, p) in b.parts.lock().iter() {
            let (files, used) = p.mapping_state();
            if files > 0 {
                mapped.push((used, files, bi, *year));
            }
        }
    }
    let mut total: usize = mapped.iter().map(|m| m.1).sum();
    if total <= budget {
        return;
    }
    mapped.sort_unstable();
    let target = budget - budget / 5;
    let mut touched: BTreeMap<usize, Vec<i32>> = BTreeMap::new();
    for (_, files, bi, year) in mapped {
        if total <= target {
            break;
        }
        touched.entry(bi).or_default().push(year);
        total -= files;
    }
    let mut unmapped = 0;
    for (bi, years) in touched {
        let b = &buckets[bi];
        let mut parts = b.parts.lock();
        for y in years {
            if let Some(p) = parts.get_mut(&y) {
                unmapped += p.unmap();
            }
        }
        b.publish(&parts);
    }
    tracing::debug!(unmapped, budget, "unmapped the least recently used partitions");
}

fn publish_event(inner: &Inner, bucket: &Bucket, rows: &Rows, lsn: u64) {
    let mut subs = inner.subscribers.lock();
    subs.retain(|s| !s.tx.is_closed());
    if !subs.iter().any(|s| s.filter.as_ref().is_none_or(|f| f.matches(&bucket.key))) {
        return;
    }
    let batch = match read::rows_batch(&bucket.schema, rows) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("cannot build the appended batch for triggers: {e}");
            return;
        }
    };
    let ev = Arc::new(AppendEvent { key: bucket.key.clone(), lsn, batch });
    for s in subs.iter().filter(|s| s.filter.as_ref().is_none_or(|f| f.matches(&bucket.key))) {
        if s.tx.try_send(ev.clone()).is_err() {
            s.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn reply_failed(cmd: Cmd) {
    let e = || EngineError::Unavailable("a disk write failed; the engine is read-only".into());
    match cmd {
        Cmd::Write { reply, .. } => drop(reply.send(Err(e()))),
        Cmd::Create { reply, .. } => drop(reply.send(Err(e()))),
        Cmd::Destroy { reply, .. } => drop(reply.send(Err(e()))),
        Cmd::DeleteRange { reply, .. } => drop(reply.send(Err(e()))),
        Cmd::Checkpoint { reply } => {
            if let Some(r) = reply {
                let _ = r.send(Err(e()));
            }
        }
        Cmd::Shutdown { reply } => drop(reply.send(Ok(()))),
    }
}

#[cfg(test)]
mod tests;
