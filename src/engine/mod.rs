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

// The rooms, each with one job (docs/design.md):
mod bucket; // one bucket in memory: partitions, published views, reads
mod catalog; // bucket directories on disk, loading them, the catalog snapshot
pub mod changes; // applied changes, in log order, for followers; upstream positions
pub mod error;
mod events; // appended batches to subscribers
pub mod integrity; // `mkts tool integrity`: read-only checks of a stopped data directory
pub mod key;
mod local; // same-host reads: a snapshot's files for another process to map
mod normalize; // client batches to validated, sorted rows
pub mod partition; // one year of one bucket: mapped column files, generations, manifest
mod read; // Arrow arrays over partition views
mod records; // log record payload codecs
mod recovery; // start-up replay
mod retention; // how long buckets keep rows
pub mod tier; // sealed years in object storage as Parquet: moving, thawing, reading
pub mod types;
pub mod wal; // the write-ahead log: segments, frames, scan, trim
mod writer; // the single writer thread: prepare, log, apply, checkpoint
pub mod zone; // the zone day-and-longer intervals were placed in, recorded in the root

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub use error::{EngineError, Result};
pub use local::{LocalColumn, LocalFile, LocalPiece, LocalRead};
pub use key::{BucketKey, KeyPattern, KeySelector, TfUnit, Timeframe, DEFAULT_CATEGORIES};
pub use normalize::infer_schema;
pub use partition::PartView;
pub use read::{decode_string16, TimePoint};
pub use normalize::TYPE_METADATA;
pub use types::{epoch_type, BucketSchema, ColumnDef, ColumnType, RecordKind, SchemaChange, TsUnit, EPOCH, NANOSECONDS, STRING16_WIDTH};

pub use integrity::{check_integrity, Finding, IntegrityReport};
pub use changes::{Captured, CapturedBucket, Change, ChangeCursor, ChangeGap, ChangeRecord, Origin};
pub use events::{AppendEvent, Subscription};
pub use retention::RetentionRule;
pub use tier::{ColdStore, ColdYear, TierConfig};
pub use zone::recorded_timezone;

use bucket::{read_bucket, Bucket};
use events::Subscriber;
use partition::Rows;
use wal::WalWriter;
use writer::{Cmd, CmdQueue, Writer};

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
    /// Start even when the log is damaged in the middle: keep every readable record, quarantine the
    /// damaged segments, drop the unreadable bytes (`mkts tool recover-wal`). Off: refuse to start.
    pub recover_wal: bool,
    /// Retention rules, first match wins (none: keep everything).
    pub retention: Vec<RetentionRule>,
    /// Bytes of recent changes kept in memory for followers ([`Engine::changes_after`]); 0 turns the
    /// change feed off (a server nobody replicates from pays nothing for it).
    pub change_window_bytes: usize,
    /// A write to an existing bucket that carries columns the bucket lacks adds them (nullable) first,
    /// instead of being refused (`auto_add_columns` in mkts.yml).
    pub auto_add_columns: bool,
    /// MarketStore's `timezone` (mkts.yml): a fixed bucket of a day or longer (`1D`, `1W`, `1M`, `1Y`)
    /// stores each row at the start of its interval on this zone's calendar (a `1D` row at the zone's
    /// midnight, a UTC epoch like every other). `None`: UTC. Sub-day intervals do not depend on it.
    pub timezone: Option<chrono_tz::Tz>,
    /// Move sealed years to object storage (`tiering:` in mkts.yml, [`tier`]). `None`: every year stays
    /// local (years already moved still need the store to be read).
    pub tiering: Option<TierConfig>,
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
            recover_wal: false,
            retention: Vec::new(),
            change_window_bytes: 0,
            auto_add_columns: false,
            timezone: None,
            tiering: None,
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

/// A write handed to the writer ([`Engine::submit_write`]); [`PendingWrite::durable`] waits for its log
/// fsync and apply.
#[must_use = "a submitted write is acknowledged only once durable() resolves"]
pub struct PendingWrite(oneshot::Receiver<Result<WriteAck>>);

impl PendingWrite {
    /// The write's acknowledgement, once it is in the fsync'd log and applied.
    pub async fn durable(self) -> Result<WriteAck> {
        self.0.await.unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())))
    }
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
    /// Each year with rows: where it is, its rows and bytes.
    pub partitions: Vec<PartitionInfo>,
}

/// One year of a bucket as [`Engine::info`] reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PartitionInfo {
    pub year: i32,
    /// `hot` (local, mapped files) or `cold` (a Parquet object in the tiering store).
    pub tier: &'static str,
    pub rows: usize,
    /// Local: rows x the fixed row width (offsets, not the bytes, of variable-length values); cold: the
    /// object's size.
    pub bytes: u64,
    /// Cold: the object's path under the store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

/// A bucket that cannot be used: its files failed to load, or applying a logged write to it failed.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedBucket {
    pub key: String,
    pub reason: String,
    /// True when found at start-up (its log records are held until it is repaired or destroyed); false
    /// when it failed at run time (the log is kept whole until a restart rebuilds it).
    pub at_load: bool,
}

/// What the engine can and cannot do right now, for `/heartbeat`, `/metrics` and `get_info`.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// Writes are accepted (not halted, start-up finished).
    pub writable: bool,
    /// Why writes are stopped for every bucket, when they are.
    pub halted: Option<String>,
    /// Buckets that refuse writes (and, when damaged at load, reads).
    pub damaged: Vec<DamagedBucket>,
    /// The last checkpoint's error, until one succeeds (the log then keeps growing).
    pub checkpoint_error: Option<String>,
    /// Bytes of writes queued for the writer right now.
    pub queued_bytes: u64,
}

/// How the last start-up found the catalog (logged, and checked by tests of the catalog snapshot).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StartupReport {
    /// Buckets taken from the catalog snapshot (their directories unchanged since it was written).
    pub from_snapshot: usize,
    /// Buckets loaded from their own files (no snapshot, or changed since).
    pub from_files: usize,
    /// Log records replayed.
    pub replayed: usize,
    /// Time to load the catalog and replay the log, in milliseconds.
    pub millis: u64,
}

/// The halt reason of a start-up that could not finish; cleared by the writer once it can.
const STARTUP_HALT: &str = "start-up could not finish";

struct Inner {
    root: PathBuf,
    policy: Policy,
    auto_add_columns: bool,
    /// [`EngineConfig::timezone`].
    timezone: Option<chrono_tz::Tz>,
    catalog: RwLock<BTreeMap<BucketKey, Arc<Bucket>>>,
    tx: CmdQueue,
    /// The writer's state: the writer thread's, or a caller's committing a small write itself while the
    /// writer is idle ([`Writer::commit_inline`]).
    writer: Mutex<Writer>,
    subscribers: Mutex<Vec<Subscriber>>,
    /// Set when the log can no longer be trusted or the writer panicked: every write is refused.
    halted: RwLock<Option<String>>,
    /// Damaged buckets by key string.
    damaged: RwLock<BTreeMap<String, DamagedBucket>>,
    checkpoint_error: RwLock<Option<String>>,
    /// Byte budget of the writer's queue (in KiB permits): writers wait when it is spent.
    queue: Arc<tokio::sync::Semaphore>,
    stopped: AtomicBool,
    rows_written: AtomicU64,
    /// Log appends made durable (one fdatasync each) and records they carried: group commit shows as
    /// `records_logged > wal_syncs` under concurrent writers.
    wal_syncs: AtomicU64,
    records_logged: AtomicU64,
    /// Writes committed on their caller's thread ([`Engine::write`]), of `records_logged`.
    inline_commits: AtomicU64,
    /// Rows and bytes removed by retention since start.
    retention_rows: AtomicU64,
    retention_bytes: AtomicU64,
    startup: StartupReport,
    /// Recent changes for followers (`change_window_bytes > 0`).
    changes: Option<Arc<changes::ChangeLog>>,
    /// Where this server stands in its upstream's log (a replica's applied position).
    origin: RwLock<Origin>,
    /// The tiering store, when configured.
    cold: Option<Arc<ColdStore>>,
    /// This data directory's identity (see [`changes`]).
    store_id: String,
    _lock: fs::File,
}

impl Inner {
    /// Feed an applied change to followers (built only when the feed is on).
    fn feed(&self, lsn: u64, change: impl FnOnce() -> Change) {
        if let Some(c) = &self.changes {
            c.push(lsn, change());
        }
    }

    /// A replicated change was applied: its upstream position is now this server's.
    fn advance_origin(&self, from: writer::Applied) {
        if let Some(p) = from.origin {
            self.origin.write().position = p;
        }
    }

    fn halt(&self, why: String) {
        tracing::error!("the engine stops writing: {why}");
        let mut h = self.halted.write();
        if h.is_none() {
            *h = Some(why);
        }
    }

    fn clear_halt_if(&self, prefix: &str) {
        let mut h = self.halted.write();
        if h.as_deref().is_some_and(|w| w.starts_with(prefix)) {
            *h = None;
        }
    }

    fn mark_damaged(&self, key: &str, reason: &str, at_load: bool) {
        self.damaged.write().insert(key.to_string(), DamagedBucket { key: key.to_string(), reason: reason.to_string(), at_load });
    }

    fn damage_of(&self, key: &BucketKey) -> Option<EngineError> {
        self.damaged.read().get(&key.to_string()).map(|d| EngineError::Damaged { key: d.key.clone(), reason: d.reason.clone() })
    }
}

/// A write validated on the caller's thread, ready for the writer.
struct PreparedWrite {
    key: BucketKey,
    created_lsn: Option<u64>,
    /// The schema `rows` are in.
    schema: Arc<BucketSchema>,
    create: Option<BucketSchema>,
    rows: Rows,
}

/// The queue permits (KiB, at least 1, at most the whole budget) a write holds while queued.
fn queue_permits(rows: &Rows) -> u32 {
    let kib = rows.byte_len() >> 10;
    kib.clamp(1, QUEUE_KIB) as u32
}

/// Total byte budget of writes waiting for the writer (backpressure beyond it).
const QUEUE_KIB: usize = 256 << 10;
/// Largest single write (its log record's length is 32-bit).
pub const MAX_WRITE_BYTES: usize = 1 << 30;

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
        let t0 = Instant::now();
        let cold = match &cfg.tiering {
            Some(t) => Some(Arc::new(ColdStore::open(t, cfg.timezone)?)),
            None => None,
        };
        let loaded = catalog::load_catalog(&root, cold.as_ref())?;
        tracing::info!(
            from_snapshot = loaded.from_snapshot,
            from_files = loaded.from_files,
            damaged = loaded.damaged.len(),
            ms = t0.elapsed().as_millis() as u64,
            "loaded the catalog"
        );
        let snapshot_due = !loaded.snapshot || loaded.from_files > 0 || !loaded.damaged.is_empty();
        let mut catalog = loaded.catalog;
        zone::check_and_record(&root, cfg.timezone, catalog.values().map(|b| b.as_ref()))?;
        let mut damaged: BTreeMap<String, DamagedBucket> = loaded.damaged.into_iter().map(|d| (d.key.clone(), d)).collect();
        let mut max_lsn = 0u64;
        for b in catalog.values() {
            max_lsn = max_lsn.max(b.created_lsn);
            for p in b.parts.lock().values() {
                max_lsn = max_lsn.max(p.applied_lsn);
            }
        }
        // The log: a torn tail is cut; damage in the middle stops start-up unless recovery was asked for.
        let mut scan = wal::LogScan::read(&wal_dir)?;
        let damage = scan.damage();
        if !damage.is_empty() {
            if !cfg.recover_wal {
                let spans: Vec<String> = damage.iter().map(|d| d.to_string()).collect();
                return Err(EngineError::LogDamaged(format!(
                    "the write-ahead log is damaged in the middle, so starting would drop acknowledged writes: {}. \
                     Nothing was changed. `mkts tool recover-wal --root {}` keeps every readable record, copies the \
                     damaged segment to .wal/{}/ and starts without the unreadable bytes.",
                    spans.join("; "),
                    root.display(),
                    wal::QUARANTINE_DIR
                )));
            }
            let rec = scan.recover()?;
            tracing::warn!(spans = rec.dropped.len(), "write-ahead log recovered: unreadable bytes dropped, damaged segments quarantined");
        }
        scan.cut_torn_tail()?;
        let store_id = changes::store_id(&root)?;
        let saved_origin = changes::read_origin(&root)?.unwrap_or_default();
        let replay = recovery::replay(&root, &mut catalog, &mut damaged, &scan, saved_origin.clone(), cold.as_ref());
        // Objects an interrupted move, thaw or removal left behind.
        for b in catalog.values() {
            b.clear_pending();
        }
        max_lsn = max_lsn.max(scan.max_lsn());
        // A segment is named by the first LSN it was opened for: everything below it was handed out before,
        // even when no record of it survives (a destroy, then a clean stop that trimmed the log). LSNs are
        // never reused, so subscribers can resume by them.
        for (first, _) in wal::list_segments(&wal_dir)? {
            max_lsn = max_lsn.max(first.saturating_sub(1));
        }
        if replay.records > 0 {
            tracing::info!(records = replay.records, last_lsn = scan.max_lsn(), "replayed the write-ahead log");
        }
        for d in damaged.values() {
            tracing::error!(key = %d.key, "bucket is damaged and offline (its log records are kept): {}", d.reason);
        }
        // Finish: make the replayed state durable, keep damaged buckets' records, start a fresh segment.
        let mut halted = replay.halted.clone();
        let walw = if halted.is_some() {
            None
        } else {
            let held: Vec<Vec<u8>> =
                scan.records_raw().filter(|(r, _)| damaged.contains_key(r.key)).map(|(_, raw)| raw.to_vec()).collect();
            let finish = (|| -> Result<WalWriter> {
                for b in catalog.values() {
                    b.checkpoint()?;
                }
                wal::write_held(&wal_dir, &held)?;
                if replay.origin != saved_origin {
                    changes::write_origin(&root, &replay.origin)?;
                }
                let mut w = WalWriter::create(&wal_dir, max_lsn + 1)?;
                w.rotate_and_trim(max_lsn + 1)?;
                Ok(w)
            })();
            match finish {
                Ok(w) => Some(w),
                Err(e) => {
                    let why = format!("{STARTUP_HALT} ({e}): reads work, writes are refused until it can (retried every checkpoint tick)");
                    tracing::error!("{why}");
                    halted = Some(why);
                    None
                }
            }
        };
        drop(scan);

        // When start-up could not finish, the log still holds the positions the file lacks.
        let origin_saved = if walw.is_some() { replay.origin.clone() } else { saved_origin };
        let snapshot = writer::SnapshotState {
            stamps: loaded.stamps,
            due: snapshot_due || !replay.touched.is_empty(),
            changed: replay.touched,
            written: Instant::now(),
        };
        let snapshot_now = snapshot.due;
        let writer = Writer {
            wal: walw,
            next_lsn: max_lsn + 1,
            dirty: HashSet::new(),
            cfg: cfg.clone(),
            last_checkpoint: Instant::now(),
            snapshot,
            // The first checkpoint tick applies retention.
            last_retention: Instant::now().checked_sub(Duration::from_secs(3600)).unwrap_or_else(Instant::now),
            origin_saved,
            closed: false,
        };
        let (tx, rx) = CmdQueue::new();
        let inner = Arc::new(Inner {
            changes: (cfg.change_window_bytes > 0).then(|| Arc::new(changes::ChangeLog::new(max_lsn, cfg.change_window_bytes))),
            origin: RwLock::new(replay.origin.clone()),
            cold,
            store_id,
            root: root.clone(),
            policy: cfg.policy,
            auto_add_columns: cfg.auto_add_columns,
            timezone: cfg.timezone,
            catalog: RwLock::new(catalog),
            tx,
            writer: Mutex::new(writer),
            subscribers: Mutex::new(Vec::new()),
            halted: RwLock::new(halted),
            damaged: RwLock::new(damaged),
            checkpoint_error: RwLock::new(None),
            queue: Arc::new(tokio::sync::Semaphore::new(QUEUE_KIB)),
            stopped: AtomicBool::new(false),
            rows_written: AtomicU64::new(0),
            wal_syncs: AtomicU64::new(0),
            records_logged: AtomicU64::new(0),
            inline_commits: AtomicU64::new(0),
            retention_rows: AtomicU64::new(0),
            retention_bytes: AtomicU64::new(0),
            startup: StartupReport {
                from_snapshot: loaded.from_snapshot,
                from_files: loaded.from_files,
                replayed: replay.records,
                millis: t0.elapsed().as_millis() as u64,
            },
            _lock: lock,
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("mkts-writer".into())
            .spawn(move || writer::run(weak, rx))
            .map_err(|e| EngineError::io(&root, e))?;
        // Record what this start had to read from files, so the next start need not (off the start path:
        // the writer does it before the first write it takes).
        if snapshot_now {
            let _ = inner.tx.send(Cmd::Snapshot);
        }
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

    /// What the engine can do right now: halted or not, damaged buckets, checkpoint trouble.
    pub fn health(&self) -> Health {
        let halted = self.inner.halted.read().clone();
        Health {
            writable: halted.is_none() && !self.inner.stopped.load(Ordering::Acquire),
            halted,
            damaged: self.inner.damaged.read().values().cloned().collect(),
            checkpoint_error: self.inner.checkpoint_error.read().clone(),
            queued_bytes: ((QUEUE_KIB - self.inner.queue.available_permits().min(QUEUE_KIB)) as u64) << 10,
        }
    }

    /// Rows and bytes retention removed since start (for `/metrics`).
    pub fn retention_stats(&self) -> (u64, u64) {
        (self.inner.retention_rows.load(Ordering::Relaxed), self.inner.retention_bytes.load(Ordering::Relaxed))
    }

    /// How this start-up loaded the catalog.
    pub fn startup_report(&self) -> StartupReport {
        self.inner.startup
    }

    /// Damaged buckets (see [`Engine::health`]).
    pub fn damaged(&self) -> Vec<DamagedBucket> {
        self.inner.damaged.read().values().cloned().collect()
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The zone of day-and-longer fixed intervals ([`EngineConfig::timezone`]; `None`: UTC): a fixed
    /// bucket of timeframe `tf` stores a row written at `t` at `tf.truncate_in(t, engine.timezone())`.
    pub fn timezone(&self) -> Option<chrono_tz::Tz> {
        self.inner.timezone
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

    /// Writes committed on their caller's thread because the writer was idle ([`Engine::write`]).
    pub fn inline_commits(&self) -> u64 {
        self.inner.inline_commits.load(Ordering::Relaxed)
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.stopped.load(Ordering::Acquire) {
            return send_err(EngineError::Unavailable("the engine is shut down".into()));
        }
        if let Some(why) = self.inner.halted.read().clone() {
            return send_err(EngineError::Unavailable(why));
        }
        Ok(())
    }

    fn bucket(&self, key: &BucketKey) -> Option<Arc<Bucket>> {
        self.inner.catalog.read().get(key).cloned()
    }

    /// Write a batch to a bucket, creating it when absent (if `enable_add`). Returns once the rows are
    /// durable in the log and visible to readers. Waits while the writer's queue holds more than its byte
    /// budget (backpressure instead of unbounded memory).
    ///
    /// A small write to an existing bucket that finds the writer idle is committed on the calling thread
    /// (one log append and fsync, as the writer thread would; at most one caller at a time), which saves
    /// the two thread hand-offs of a queued write; otherwise it is queued ([`Engine::submit_write`]).
    pub async fn write(&self, key: &BucketKey, batch: &RecordBatch, opts: WriteOptions) -> Result<WriteAck> {
        if batch.num_rows() < records::DIRECT_APPEND_ROWS && self.columns_to_add(key, batch)?.is_none() {
            let prepared = self.prepare_write(key, batch, opts)?;
            return match self.write_inline(prepared) {
                Ok(ack) => ack,
                Err(prepared) => self.queue_write(prepared, writer::Applied::LOCAL).await,
            };
        }
        self.submit_write(key, batch, opts).await?.durable().await
    }

    /// Commit `prepared` on this thread when it qualifies ([`Engine::write`]) and the writer is idle;
    /// the write back otherwise.
    // The write comes back (to be queued) by value: boxing it would allocate on the path this saves time on.
    #[allow(clippy::result_large_err)]
    fn write_inline(&self, prepared: PreparedWrite) -> std::result::Result<Result<WriteAck>, PreparedWrite> {
        if prepared.created_lsn.is_none() || prepared.rows.byte_len() > writer::INLINE_WRITE_BYTES {
            return Err(prepared);
        }
        let Some(mut writer) = Writer::lock_if_idle(&self.inner) else { return Err(prepared) };
        let (reply, mut rx) = oneshot::channel();
        let PreparedWrite { key, created_lsn, schema, create, rows } = prepared;
        writer.commit_inline(&self.inner, Cmd::Write { key, created_lsn, schema, create, rows, permit: None, from: writer::Applied::LOCAL, reply });
        drop(writer);
        let ack = rx.try_recv().unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())));
        if ack.is_ok() {
            self.inner.inline_commits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(ack)
    }

    /// [`Engine::write`] in two steps, for callers that pipeline writes: this validates the batch and hands
    /// it to the writer (in call order: writes submitted one after another are logged and applied in that
    /// order), and the returned [`PendingWrite`] resolves once it is durable. Writes submitted while
    /// earlier ones wait for their fsync share the next one (group commit), so a stream of batches is
    /// acknowledged at the log's rate, not one fsync per batch.
    pub async fn submit_write(&self, key: &BucketKey, batch: &RecordBatch, opts: WriteOptions) -> Result<PendingWrite> {
        if let Some(change) = self.columns_to_add(key, batch)? {
            self.alter_or_raced(key, change).await?;
        }
        // Large batches are validated and sorted off the async workers.
        let prepared = if batch.num_rows() > 50_000 {
            let (me, key, batch) = (self.clone(), key.clone(), batch.clone());
            tokio::task::spawn_blocking(move || me.prepare_write(&key, &batch, opts))
                .await
                .map_err(|e| EngineError::Unavailable(format!("write task failed: {e}")))??
        } else {
            self.prepare_write(key, batch, opts)?
        };
        self.enqueue_write(prepared, writer::Applied::LOCAL).await
    }

    /// Wait for the write's share of the queue's byte budget, hand it to the writer, wait for the ack.
    async fn queue_write(&self, prepared: PreparedWrite, from: writer::Applied) -> Result<WriteAck> {
        self.enqueue_write(prepared, from).await?.durable().await
    }

    /// Wait for the write's share of the queue's byte budget and hand it to the writer.
    async fn enqueue_write(&self, prepared: PreparedWrite, from: writer::Applied) -> Result<PendingWrite> {
        let permit = self
            .inner
            .queue
            .clone()
            .acquire_many_owned(queue_permits(&prepared.rows))
            .await
            .map_err(|_| EngineError::Unavailable("writer stopped".into()))?;
        Ok(PendingWrite(self.send_write(prepared, permit, from)?))
    }

    /// Blocking form of [`Engine::write`] for non-async callers (CLI, plugins' threads).
    pub fn write_blocking(&self, key: &BucketKey, batch: &RecordBatch, opts: WriteOptions) -> Result<WriteAck> {
        if let Some(change) = self.columns_to_add(key, batch)? {
            futures::executor::block_on(self.alter_or_raced(key, change))?;
        }
        let prepared = match self.write_inline(self.prepare_write(key, batch, opts)?) {
            Ok(ack) => return ack,
            Err(prepared) => prepared,
        };
        let permit = futures::executor::block_on(self.inner.queue.clone().acquire_many_owned(queue_permits(&prepared.rows)))
            .map_err(|_| EngineError::Unavailable("writer stopped".into()))?;
        let rx = self.send_write(prepared, permit, writer::Applied::LOCAL)?;
        rx.blocking_recv().unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())))
    }

    /// Validate and normalise a write on the caller's thread. Every limit is checked here, before anything
    /// can reach the log.
    fn prepare_write(&self, key: &BucketKey, batch: &RecordBatch, opts: WriteOptions) -> Result<PreparedWrite> {
        self.check_open()?;
        if let Some(d) = self.inner.damage_of(key) {
            return Err(d);
        }
        if batch.num_columns() > types::MAX_COLUMNS + 2 {
            return Err(EngineError::InvalidInput(format!(
                "a write carries at most {} columns, this one has {}",
                types::MAX_COLUMNS + 2,
                batch.num_columns()
            )));
        }
        let (created_lsn, create, schema) = match self.bucket(key) {
            Some(b) => (Some(b.created_lsn), None, b.schema.clone()),
            None => {
                if !self.inner.policy.enable_add {
                    return Err(EngineError::NotAllowed(format!(
                        "bucket {key} does not exist and creating buckets is disabled (enable_add: false)"
                    )));
                }
                let s = infer_schema(batch, opts.variable)?;
                (None, Some(s.clone()), Arc::new(s))
            }
        };
        let rows = normalize::normalize(batch, &schema, key.tf(), self.inner.timezone)?;
        let bytes: usize = rows.byte_len();
        if bytes > MAX_WRITE_BYTES {
            return Err(EngineError::InvalidInput(format!(
                "one write may carry at most {} MiB of column data, this one has {} MiB; split it",
                MAX_WRITE_BYTES >> 20,
                bytes >> 20
            )));
        }
        Ok(PreparedWrite { key: key.clone(), created_lsn, schema, create, rows })
    }

    fn send_write(
        &self,
        w: PreparedWrite,
        permit: tokio::sync::OwnedSemaphorePermit,
        from: writer::Applied,
    ) -> Result<oneshot::Receiver<Result<WriteAck>>> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Write { key: w.key, created_lsn: w.created_lsn, schema: w.schema, create: w.create, rows: w.rows, permit: Some(permit), from, reply })
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
        self.inner.tx.send(Cmd::Create { key: key.clone(), schema, from: writer::Applied::LOCAL, reply }).map_err(|_| EngineError::Unavailable("writer stopped".into()))?;
        rx.await.unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())))
    }

    /// Remove a bucket and all its data.
    pub async fn destroy(&self, key: &BucketKey) -> Result<()> {
        self.check_open()?;
        if !self.inner.policy.enable_remove {
            return Err(EngineError::NotAllowed("removing data is disabled (enable_remove: false)".into()));
        }
        if self.bucket(key).is_none() && self.inner.damage_of(key).is_none() {
            return Err(EngineError::NotFound(key.to_string()));
        }
        let (reply, rx) = oneshot::channel();
        self.inner.tx.send(Cmd::Destroy { key: key.clone(), from: writer::Applied::LOCAL, reply }).map_err(|_| EngineError::Unavailable("writer stopped".into()))?;
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
            .send(Cmd::DeleteRange { key: key.clone(), start, end, from: writer::Applied::LOCAL, reply })
            .map_err(|_| EngineError::Unavailable("writer stopped".into()))?;
        rx.await.unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())))
    }

    /// Add or drop columns of a bucket; returns the new schema. Added columns are nullable and read as
    /// null in the rows stored before; dropping removes a column's data (needs `enable_remove`), adding
    /// needs `enable_add`. The change is logged and replicated like a write.
    ///
    /// ```no_run
    /// # async fn f(engine: mkts::engine::Engine, key: mkts::engine::BucketKey) -> mkts::engine::Result<()> {
    /// use mkts::engine::{ColumnDef, ColumnType, SchemaChange};
    /// engine.alter(&key, SchemaChange::AddColumns(vec![ColumnDef::new("Vwap", ColumnType::F64)])).await?;
    /// # Ok(()) }
    /// ```
    pub async fn alter(&self, key: &BucketKey, change: SchemaChange) -> Result<BucketSchema> {
        self.check_open()?;
        match &change {
            SchemaChange::AddColumns(_) if !self.inner.policy.enable_add => {
                return Err(EngineError::NotAllowed("adding columns is disabled (enable_add: false)".into()));
            }
            SchemaChange::DropColumns(_) if !self.inner.policy.enable_remove => {
                return Err(EngineError::NotAllowed("dropping columns is disabled (enable_remove: false)".into()));
            }
            _ => {}
        }
        let Some(b) = self.bucket(key) else {
            return Err(self.inner.damage_of(key).unwrap_or_else(|| EngineError::NotFound(key.to_string())));
        };
        let schema = b.schema.altered(&change)?;
        self.send_alter(key, schema, writer::Applied::LOCAL).await
    }

    async fn send_alter(&self, key: &BucketKey, schema: BucketSchema, from: writer::Applied) -> Result<BucketSchema> {
        let (reply, rx) = oneshot::channel();
        self.inner.tx.send(Cmd::Alter { key: key.clone(), schema, from, reply }).map_err(|_| EngineError::Unavailable("writer stopped".into()))?;
        rx.await.unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())))
    }

    /// With `auto_add_columns`: the columns of `batch` an existing bucket lacks, as a change adding them.
    fn columns_to_add(&self, key: &BucketKey, batch: &RecordBatch) -> Result<Option<SchemaChange>> {
        if !self.inner.auto_add_columns {
            return Ok(None);
        }
        let Some(b) = self.bucket(key) else { return Ok(None) };
        let mut add = Vec::new();
        for f in batch.schema().fields() {
            let n = f.name();
            if n == EPOCH || n == NANOSECONDS || b.schema.column(n).is_some() {
                continue;
            }
            add.push(normalize::column_of_field(f)?);
        }
        Ok((!add.is_empty()).then_some(SchemaChange::AddColumns(add)))
    }

    /// Add columns for a write; another write adding the same columns first is not an error.
    async fn alter_or_raced(&self, key: &BucketKey, change: SchemaChange) -> Result<()> {
        match self.alter(key, change).await {
            Ok(_) | Err(EngineError::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
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
            return Err(EngineError::Unavailable("the writer had stopped: no final checkpoint".into()));
        }
        rx.await.unwrap_or_else(|_| Err(EngineError::Unavailable("the writer stopped before the final checkpoint".into())))
    }

    /// Every bucket key, sorted.
    pub fn keys(&self) -> Vec<BucketKey> {
        self.inner.catalog.read().keys().cloned().collect()
    }

    /// The directory holding a bucket's files (`root/SYM/TF/GROUP`; it may not exist).
    pub fn bucket_dir(&self, key: &BucketKey) -> PathBuf {
        catalog::bucket_dir(self.root(), key)
    }

    /// Schema of a bucket.
    pub fn schema(&self, key: &BucketKey) -> Option<BucketSchema> {
        self.bucket(key).map(|b| (*b.schema).clone())
    }

    /// Schema, row count and time span of a bucket.
    pub fn info(&self, key: &BucketKey) -> Result<BucketInfo> {
        let Some(b) = self.bucket(key) else {
            return Err(self.inner.damage_of(key).unwrap_or_else(|| EngineError::NotFound(key.to_string())));
        };
        let published = b.published();
        let width = b.row_width();
        let mut partitions: Vec<(PartitionInfo, i64, i64)> = published
            .parts
            .iter()
            .filter(|p| p.rows > 0)
            .map(|p| {
                // Rows x fixed row width: the same on a master and its replicas, whatever their files'
                // preallocated capacity or mapping state.
                let bytes = p.rows as u64 * width;
                (PartitionInfo { year: p.year, tier: "hot", rows: p.rows, bytes, object: None }, p.first.unwrap_or(i64::MAX), p.last.unwrap_or(i64::MIN))
            })
            .collect();
        for c in published.cold.iter().filter(|c| c.rows > 0) {
            let rows = usize::try_from(c.rows).unwrap_or(usize::MAX);
            partitions.push((PartitionInfo { year: c.year, tier: "cold", rows, bytes: c.bytes, object: Some(c.object.clone()) }, c.first.0, c.last.0));
        }
        partitions.sort_by_key(|p| p.0.year);
        Ok(BucketInfo {
            key: key.to_string(),
            schema: (*b.schema).clone(),
            rows: partitions.iter().map(|p| p.0.rows).sum(),
            years: partitions.iter().map(|p| p.0.year).collect(),
            first_epoch: partitions.first().map(|p| p.1),
            last_epoch: partitions.last().map(|p| p.2),
            partitions: partitions.into_iter().map(|p| p.0).collect(),
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
        self.selected(req)?.iter().map(|b| read_bucket(b, req, self.inner.timezone)).collect()
    }

    /// Like [`Engine::read`], but the rows come as the open files of the snapshot for a process on this host
    /// to map ([`local`]); hot tails and columns not stored in Arrow's layout come as batches.
    pub fn local_read(&self, req: &ReadRequest) -> Result<Vec<LocalRead>> {
        self.selected(req)?.iter().map(|b| local::local_bucket(b, req, self.inner.timezone)).collect()
    }

    /// The buckets a read selects; `NotFound` when none exists.
    fn selected(&self, req: &ReadRequest) -> Result<Vec<Arc<Bucket>>> {
        if !self.inner.policy.queryable {
            return Err(EngineError::NotAllowed("server is not queryable".into()));
        }
        let keys = self.resolve(&req.selector);
        if keys.is_empty() {
            // A single bucket that failed to load says so instead of "does not exist".
            if let Some(syms) = &req.selector.symbols {
                for sym in syms {
                    if let Ok(k) = BucketKey::from_parts(sym, &req.selector.timeframe, &req.selector.attr_group) {
                        if let Some(d) = self.inner.damage_of(&k) {
                            return Err(d);
                        }
                    }
                }
            }
            let sym = req.selector.symbols.as_ref().map(|s| s.join(",")).unwrap_or_else(|| "*".into());
            return Err(EngineError::NotFound(format!("{sym}/{}/{}", req.selector.timeframe, req.selector.attr_group)));
        }
        Ok(keys.iter().filter_map(|k| self.bucket(k)).collect())
    }

    /// Follow the changes applied after log position `after` (see [`changes`]): the feed must be on
    /// (`change_window_bytes`), and still hold that position.
    pub fn changes_after(&self, after: u64) -> std::result::Result<ChangeCursor, ChangeGap> {
        match &self.inner.changes {
            Some(c) => c.cursor(after),
            None => Err(ChangeGap { asked: after, floor: u64::MAX }),
        }
    }

    /// The LSN of the last change fed to followers (0 when the feed is off and nothing was written).
    pub fn last_change_lsn(&self) -> u64 {
        self.inner.changes.as_ref().map(|c| c.last()).unwrap_or(0)
    }

    /// An image of every bucket as of one log position, taken by the writer between two groups, so it
    /// holds every change up to [`Captured::lsn`] and none after. Zero-copy: the batches are views of
    /// the mapped files. Damaged buckets are left out.
    pub async fn capture(&self) -> Result<Captured> {
        self.check_open()?;
        let (reply, rx) = oneshot::channel();
        self.inner.tx.send(Cmd::Capture { reply }).map_err(|_| EngineError::Unavailable("writer stopped".into()))?;
        rx.await.unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())))
    }

    /// This data directory's store id: random, fixed at its first open. LSNs are positions within it.
    pub fn store_id(&self) -> &str {
        &self.inner.store_id
    }

    /// Where this server stands in its upstream's log (a replica's last applied master position).
    pub fn origin(&self) -> Origin {
        self.inner.origin.read().clone()
    }

    /// Set the upstream source and position without applying a change, durably (a replica starting over
    /// from a master's image marks position 0 first, and the image's position when it is complete).
    pub async fn mark_origin(&self, origin: Origin) -> Result<()> {
        self.check_open()?;
        let (reply, rx) = oneshot::channel();
        self.inner.tx.send(Cmd::Mark { origin, reply }).map_err(|_| EngineError::Unavailable("writer stopped".into()))?;
        rx.await.unwrap_or_else(|_| Err(EngineError::Unavailable("writer stopped".into())))
    }

    /// Apply a change that happened at `position` in the upstream's log (a replica applying its master's
    /// changes). The position is made durable in the same log record as the change, so [`Engine::origin`]
    /// after any crash names exactly the last change held. `publish`: hand written rows to this server's
    /// subscribers and triggers. Server policy switches do not apply: the master already allowed it.
    pub async fn apply(&self, change: &Change, position: u64, publish: bool) -> Result<()> {
        self.check_open()?;
        let from = writer::Applied { origin: Some(position), publish };
        let (tx, key) = (&self.inner.tx, change.key().clone());
        let stopped = || EngineError::Unavailable("writer stopped".into());
        match change {
            Change::Create { schema, .. } => {
                schema.validate()?;
                let (reply, rx) = oneshot::channel();
                tx.send(Cmd::Create { key, schema: schema.clone(), from, reply }).map_err(|_| stopped())?;
                rx.await.unwrap_or_else(|_| Err(stopped()))
            }
            Change::Destroy { .. } => {
                let (reply, rx) = oneshot::channel();
                tx.send(Cmd::Destroy { key, from, reply }).map_err(|_| stopped())?;
                rx.await.unwrap_or_else(|_| Err(stopped()))
            }
            Change::DeleteRange { start, end, .. } => {
                let (reply, rx) = oneshot::channel();
                tx.send(Cmd::DeleteRange { key, start: *start, end: *end, from, reply }).map_err(|_| stopped())?;
                rx.await.map(|r| r.map(|_| ())).unwrap_or_else(|_| Err(stopped()))
            }
            Change::Alter { schema, .. } => self.send_alter(&key, schema.clone(), from).await.map(|_| ()),
            Change::Write { batch, .. } => {
                let Some(b) = self.bucket(&key) else {
                    return Err(EngineError::NotFound(format!("{key} (a replicated write before its create)")));
                };
                let rows = normalize::normalize(batch, &b.schema, key.tf(), self.inner.timezone)?;
                let prepared = PreparedWrite { key, created_lsn: Some(b.created_lsn), schema: b.schema.clone(), create: None, rows };
                self.queue_write(prepared, from).await.map(|_| ())
            }
        }
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

/// `mkts tool recover-wal`: make a data directory whose log is damaged in the middle start again. Every
/// readable record is kept, each damaged segment is copied to `.wal/quarantine/` and rewritten without its
/// unreadable bytes; the writes that were in those bytes are lost, and the returned spans say between
/// which log positions they sat. Takes the directory's lock, so it refuses to run beside a server.
pub fn recover_wal(root: &Path) -> Result<wal::Recovery> {
    let lock_path = root.join(".lock");
    let lock = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| EngineError::io(&lock_path, e))?;
    lock.try_lock().map_err(|_| EngineError::Unavailable(format!("data directory {} is in use by another mkts process", root.display())))?;
    let mut scan = wal::LogScan::read(&root.join(".wal"))?;
    let torn = scan.torn_tail();
    let mut rec = scan.recover()?;
    if let Some(t) = torn {
        rec.dropped.push(t);
    }
    Ok(rec)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_arrow;
#[cfg(test)]
mod tests_tier;
