//! The writer: owns the log, assigns LSNs, prepares, logs and applies every change, runs checkpoints. Its
//! state is behind one lock; the writer thread takes queued commands in groups, and a caller with a small
//! write commits it itself while the writer is idle ([`Writer::commit_inline`]).
//!
//! Every change is split so that whatever can fail for lack of space or bad state fails *before* its log
//! record is written, with nothing stored:
//! 1. prepare: reserve the disk blocks an append needs (`fallocate`), or build and fsync the new generation
//!    a merge or range delete produces, or write a new bucket's `bucket.json`;
//! 2. log: append the group's records and fsync once (a failed append is cut back, see [`WalWriter`]);
//! 3. apply: write into the reserved space or switch to the prepared generation, publish, acknowledge.
//!
//! A failure in step 3 (an I/O error on reserved space) is cancelled in the log with an `Abort` record, so
//! the write its client was told failed never reappears, and the bucket is marked damaged until restart.
//! When even that cannot be logged, or the writer panics, the engine stops writing (`halted`) and says so on
//! every health report; reads go on.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::bucket::{unmap_coldest, Bucket};
use super::catalog::{create_bucket_files, remove_bucket_files, write_snapshot, Stamps};
use super::events::publish_event;
use super::partition::{Ahead, Generation, Rows};
use super::records::{encode_direct, encode_range, encode_write, DIRECT_APPEND_ROWS};
use super::changes::{write_origin, Captured, CapturedBucket, Change, Origin};
use super::wal::{self, Op, WalWriter};
use super::{BucketKey, BucketSchema, EngineConfig, EngineError, Inner, ReadRequest, Result, TimePoint, WriteAck};

/// Commands to the writer.
pub(super) enum Cmd {
    Write {
        key: BucketKey,
        created_lsn: Option<u64>,
        /// The schema `rows` were normalized against (an existing bucket's, when its columns changed since,
        /// the rows are mapped onto the new ones).
        schema: Arc<BucketSchema>,
        create: Option<BucketSchema>,
        rows: Rows,
        /// Holds this write's share of the queue's byte budget until the writer is done with it.
        permit: Option<OwnedSemaphorePermit>,
        from: Applied,
        reply: oneshot::Sender<Result<WriteAck>>,
    },
    Create { key: BucketKey, schema: BucketSchema, from: Applied, reply: oneshot::Sender<Result<()>> },
    Destroy { key: BucketKey, from: Applied, reply: oneshot::Sender<Result<()>> },
    DeleteRange { key: BucketKey, start: TimePoint, end: TimePoint, from: Applied, reply: oneshot::Sender<Result<usize>> },
    /// Change a bucket's columns to `schema` (already checked against the current one).
    Alter { key: BucketKey, schema: BucketSchema, from: Applied, reply: oneshot::Sender<Result<BucketSchema>> },
    /// Set the upstream position without a change (logged as a `Mark` record).
    Mark { origin: Origin, reply: oneshot::Sender<Result<()>> },
    /// Take an image of every bucket between two groups.
    Capture { reply: oneshot::Sender<Result<Captured>> },
    Checkpoint { reply: Option<oneshot::Sender<Result<()>>> },
    /// Write the catalog snapshot now (after a start-up that could not use it whole).
    Snapshot,
    Shutdown { reply: oneshot::Sender<Result<()>> },
}

/// Where a change comes from: a client of this server (the default), or a replica's master.
#[derive(Debug, Clone, Copy)]
pub(super) struct Applied {
    /// The change's position in the upstream log, made durable in the same record.
    pub origin: Option<u64>,
    /// Hand the appended rows to subscribers (triggers, `/ws`, Flight subscriptions).
    pub publish: bool,
}

impl Applied {
    pub const LOCAL: Applied = Applied { origin: None, publish: true };
}

struct PendingWrite {
    lsn: u64,
    from: Applied,
    bucket: Arc<Bucket>,
    rows: Rows,
    /// Per year slice: the merged generation built before logging, when the slice needs one.
    prepared: Vec<Option<Generation>>,
    /// When this write and every earlier one of the group to its bucket are pure appends inside one year:
    /// where they end, so a further append to the bucket can share the group's fsync.
    appends: Option<Ahead>,
    reply: oneshot::Sender<Result<WriteAck>>,
}

/// The writer's command queue: the channel to its thread, and how many commands were sent and not yet
/// processed. A caller commits its own write on its thread only when none are ([`Writer::commit_inline`]),
/// so writes are still applied in the order they were handed over.
#[derive(Clone)]
pub(super) struct CmdQueue {
    tx: mpsc::UnboundedSender<Cmd>,
    unprocessed: Arc<AtomicUsize>,
}

impl CmdQueue {
    pub fn new() -> (CmdQueue, mpsc::UnboundedReceiver<Cmd>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (CmdQueue { tx, unprocessed: Arc::new(AtomicUsize::new(0)) }, rx)
    }

    /// Hand a command to the writer thread; `Err` when it has stopped.
    pub fn send(&self, cmd: Cmd) -> std::result::Result<(), WriterStopped> {
        self.unprocessed.fetch_add(1, Ordering::SeqCst);
        self.tx.send(cmd).map_err(|_| {
            self.unprocessed.fetch_sub(1, Ordering::SeqCst);
            WriterStopped
        })
    }

    fn processed(&self, n: usize) {
        self.unprocessed.fetch_sub(n, Ordering::SeqCst);
    }

    fn idle(&self) -> bool {
        self.unprocessed.load(Ordering::SeqCst) == 0
    }
}

/// The writer thread has stopped (shutdown, or the engine is gone): the command was dropped.
#[derive(Debug, Clone, Copy)]
pub(super) struct WriterStopped;

/// Largest write a caller commits on its own thread (bytes of column data); larger ones go to the writer
/// thread, so that a caller on an async worker blocks it for one small log append at most.
pub(super) const INLINE_WRITE_BYTES: usize = 1 << 20;

/// The writer's state. The writer thread takes commands from [`CmdQueue`]; a caller with a small write
/// may commit it itself while the writer is idle ([`Writer::commit_inline`]). Either holds the state's
/// lock (in [`Inner`]) for the whole group.
pub(super) struct Writer {
    /// `None` while start-up could not finish (e.g. a full disk): writes are refused until a checkpoint
    /// tick manages to finish it.
    pub wal: Option<WalWriter>,
    pub next_lsn: u64,
    pub dirty: HashSet<BucketKey>,
    pub cfg: EngineConfig,
    pub last_checkpoint: Instant,
    pub snapshot: SnapshotState,
    pub last_retention: Instant,
    /// The upstream position as of the origin file (written at checkpoints when it moved).
    pub origin_saved: Origin,
    /// Shut down: nothing more is committed inline.
    pub closed: bool,
}

/// Longest a checkpoint tick spends moving years to object storage.
const TIER_BUDGET: Duration = Duration::from_secs(2);

/// Retention runs at checkpoint ticks at most this often (the first tick after start-up included), at every
/// forced checkpoint and at shutdown.
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// When and what to write into the catalog snapshot ([`super::catalog`]).
pub(super) struct SnapshotState {
    pub stamps: Stamps,
    /// Buckets created, destroyed or checkpointed since the last snapshot.
    pub changed: HashSet<BucketKey>,
    /// The snapshot on disk is missing or describes less than the catalog (written at the next chance).
    pub due: bool,
    pub written: Instant,
}

/// Write the snapshot at a checkpoint when this many buckets changed (and a minute passed), or when any
/// changed and five minutes passed; always at shutdown. A crash costs a start-up reading the changed
/// buckets' files, nothing else.
const SNAPSHOT_CHANGED: usize = 1024;
const SNAPSHOT_MIN_EVERY: Duration = Duration::from_secs(60);
const SNAPSHOT_MAX_EVERY: Duration = Duration::from_secs(300);

const GROUP_BYTES: usize = 64 << 20;

type ShutdownReply = (oneshot::Sender<Result<()>>, Result<()>);

/// The writer thread: takes the queued commands in groups (one log append and fsync per group of writes).
pub(super) fn run(weak: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    while let Some(first) = rx.blocking_recv() {
        let Some(inner) = weak.upgrade() else { break };
        let mut writer = inner.writer.lock();
        let mut group = vec![first];
        let mut bytes = 0usize;
        while bytes < GROUP_BYTES {
            match rx.try_recv() {
                Ok(c) => {
                    if let Cmd::Write { rows, .. } = &c {
                        bytes += rows.byte_len();
                    }
                    group.push(c)
                }
                Err(_) => break,
            }
        }
        let taken = group.len();
        let outcome = writer.process_guarded(&inner, group);
        inner.tx.processed(taken);
        if let Some((reply, r)) = outcome {
            // Let go of the engine before answering: whoever waits for the shutdown may reopen the
            // directory at once, and the directory lock lives as long as the engine.
            drop(writer);
            drop(inner);
            let _ = reply.send(r);
            break;
        }
        if writer.checkpoint_due() {
            let _ = writer.checkpoint(&inner);
        }
    }
}

impl Writer {
    /// [`Writer::process`], turning a panic into a halt: a panic must not end the writer silently (every
    /// later write would hang or vanish). Writes stop, every health report says why, and commands are
    /// answered (with errors) until shutdown.
    fn process_guarded(&mut self, inner: &Arc<Inner>, group: Vec<Cmd>) -> Option<ShutdownReply> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.process(inner, group))) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                inner.halt(format!("the writer panicked ({msg}); writes are stopped until restart"));
                None
            }
        }
    }

    /// The log outgrew its segment size and the last checkpoint is a second old.
    fn checkpoint_due(&self) -> bool {
        let oversized = self.wal.as_ref().is_some_and(|w| w.size() > self.cfg.wal_segment_bytes);
        oversized && self.last_checkpoint.elapsed() >= Duration::from_secs(1)
    }

    /// The writer's state, when it is idle: nothing queued, nobody holding it. Under its lock every
    /// command sent before has been processed, so a write committed with [`Writer::commit_inline`] is
    /// applied after them, as when queued.
    pub(super) fn lock_if_idle(inner: &Inner) -> Option<parking_lot::MutexGuard<'_, Writer>> {
        let writer = inner.writer.try_lock()?;
        (inner.tx.idle() && !writer.closed).then_some(writer)
    }

    /// Commit one small write on the caller's thread: log, fsync, apply and publish exactly as the writer
    /// thread would, without the two thread hand-offs of a queued write (a per-call durable append is
    /// mostly those and the fsync).
    pub(super) fn commit_inline(&mut self, inner: &Arc<Inner>, cmd: Cmd) {
        let _ = self.process_guarded(inner, vec![cmd]);
        // A checkpoint is long: the thread does it.
        if self.checkpoint_due() {
            let _ = inner.tx.send(Cmd::Checkpoint { reply: None });
        }
    }

    fn take_lsn(&mut self) -> u64 {
        let l = self.next_lsn;
        self.next_lsn += 1;
        l
    }

    /// Why writes are refused right now, if they are.
    fn refusal(&self, inner: &Inner) -> Option<EngineError> {
        if let Some(why) = inner.halted.read().clone() {
            return Some(EngineError::Unavailable(why));
        }
        if self.wal.is_none() {
            return Some(EngineError::Unavailable("start-up could not finish; the engine is read-only".into()));
        }
        None
    }

    /// Returns the shutdown's reply and result on shutdown (sent once the writer let go of the engine).
    fn process(&mut self, inner: &Arc<Inner>, group: Vec<Cmd>) -> Option<ShutdownReply> {
        let mut buf = wal::Group::default();
        let mut pending: Vec<PendingWrite> = Vec::new();
        for cmd in group {
            match cmd {
                Cmd::Checkpoint { reply } => {
                    self.flush(inner, &mut buf, &mut pending);
                    self.checkpoint_cmd(inner, reply);
                    continue;
                }
                Cmd::Snapshot => {
                    self.flush(inner, &mut buf, &mut pending);
                    self.snapshot_now(inner);
                    continue;
                }
                Cmd::Capture { reply } => {
                    self.flush(inner, &mut buf, &mut pending);
                    let _ = reply.send(self.capture(inner));
                    continue;
                }
                Cmd::Shutdown { reply } => {
                    self.flush(inner, &mut buf, &mut pending);
                    self.closed = true;
                    let r = match self.refusal(inner) {
                        Some(e) => Err(EngineError::Unavailable(format!("no final checkpoint: {e}"))),
                        None => {
                            self.retention(inner);
                            self.checkpoint(inner)
                        }
                    };
                    if r.is_ok() && self.wal.is_some() {
                        // Sealed years due to move go now too (within the tick budget).
                        self.tier(inner, false);
                    }
                    if r.is_ok() && (self.snapshot.due || !self.snapshot.changed.is_empty()) {
                        self.snapshot_now(inner);
                    }
                    return Some((reply, r));
                }
                _ => {}
            }
            if let Some(e) = self.refusal(inner) {
                reply_err(cmd, e);
                continue;
            }
            match cmd {
                Cmd::Write { key, created_lsn, schema, create, rows, permit, from, reply } => {
                    self.write_cmd(inner, &mut buf, &mut pending, key, created_lsn, schema, create, rows, from, reply);
                    drop(permit);
                }
                Cmd::Create { key, schema, from, reply } => {
                    self.flush(inner, &mut buf, &mut pending);
                    let _ = reply.send(self.create_cmd(inner, &key, &schema, from));
                }
                Cmd::Destroy { key, from, reply } => {
                    self.flush(inner, &mut buf, &mut pending);
                    let _ = reply.send(self.destroy_cmd(inner, &key, from));
                }
                Cmd::DeleteRange { key, start, end, from, reply } => {
                    self.flush(inner, &mut buf, &mut pending);
                    let _ = reply.send(self.delete_range_cmd(inner, &key, start, end, from));
                }
                Cmd::Mark { origin, reply } => {
                    self.flush(inner, &mut buf, &mut pending);
                    let _ = reply.send(self.mark_cmd(inner, origin));
                }
                Cmd::Alter { key, schema, from, reply } => {
                    self.flush(inner, &mut buf, &mut pending);
                    let _ = reply.send(self.alter_cmd(inner, &key, schema, from));
                }
                Cmd::Checkpoint { .. } | Cmd::Snapshot | Cmd::Shutdown { .. } | Cmd::Capture { .. } => {}
            }
        }
        self.flush(inner, &mut buf, &mut pending);
        None
    }

    #[allow(clippy::too_many_arguments)]
    fn write_cmd(
        &mut self,
        inner: &Arc<Inner>,
        buf: &mut wal::Group,
        pending: &mut Vec<PendingWrite>,
        key: BucketKey,
        created_lsn: Option<u64>,
        schema_used: Arc<BucketSchema>,
        create: Option<BucketSchema>,
        mut rows: Rows,
        from: Applied,
        reply: oneshot::Sender<Result<WriteAck>>,
    ) {
        if let Some(d) = inner.damage_of(&key) {
            let _ = reply.send(Err(d));
            return;
        }
        let existing = inner.catalog.read().get(&key).cloned();
        let bucket = match (existing, created_lsn, create) {
            (Some(b), Some(c), _) if b.created_lsn == c => b,
            (Some(b), None, Some(schema)) if *b.schema == schema => b,
            (None, None, Some(schema)) => {
                // Auto-create: the bucket's files are written before anything is logged (a crash in
                // between leaves an empty bucket nobody was told about), then create + write share a group.
                self.flush(inner, buf, pending);
                let clsn = self.take_lsn();
                let b = match create_bucket_files(&inner.root, &key, &schema, clsn, inner.cold.as_ref()) {
                    Ok(b) => Arc::new(b),
                    Err(e) => {
                        let _ = remove_bucket_files(&inner.root, &key, inner.cold.as_ref());
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                wal::encode_record(buf, clsn, Op::Create, &key.to_string(), |p| {
                    p.extend_from_slice(&serde_json::to_vec(&schema).unwrap_or_default())
                });
                if let Err(e) = self.log(inner, buf) {
                    let _ = remove_bucket_files(&inner.root, &key, inner.cold.as_ref());
                    let _ = reply.send(Err(e));
                    return;
                }
                inner.catalog.write().insert(key.clone(), b.clone());
                self.snapshot.changed.insert(key.clone());
                inner.feed(clsn, || Change::Create { key: key.clone(), schema: schema.clone() });
                b
            }
            _ => {
                let _ = reply.send(Err(EngineError::Aborted(format!(
                    "bucket {key} was created, destroyed or recreated concurrently with this write; retry"
                ))));
                return;
            }
        };
        if created_lsn.is_some() && !Arc::ptr_eq(&schema_used, &bucket.schema) && *schema_used != *bucket.schema {
            // The bucket's columns changed while this write was queued.
            match super::normalize::adapt_rows(rows, &schema_used, &bucket.schema) {
                Ok(r) => rows = r,
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
        }
        if rows.len >= DIRECT_APPEND_ROWS {
            self.flush(inner, buf, pending);
            if let Some(r) = self.direct_write(inner, &bucket, &rows, from) {
                let _ = reply.send(r);
                return;
            }
        }
        // A write is prepared against the state the group's earlier writes to its bucket leave. Appends
        // after appends inside one year only need their space reserved past those, so they join the
        // group (a stream of appends to one bucket shares fsyncs); anything else waits for the group to be
        // logged and applied.
        let mut joined = None;
        if let Some(prev) = pending.iter().rev().find(|p| Arc::ptr_eq(&p.bucket, &bucket)) {
            let ahead = prev.appends.clone();
            match ahead.map(|a| bucket.prepare_append_after(&rows, &a)).transpose() {
                Ok(Some(Some(after))) => joined = Some(after),
                Ok(_) => self.flush(inner, buf, pending),
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
        }
        let (prepared, appends) = match joined {
            Some(after) => (vec![None], Some(after)),
            None => match bucket.prepare_write(&rows) {
                Ok(p) => {
                    let appends = if p.iter().all(Option::is_none) { bucket.appended(&rows) } else { None };
                    (p, appends)
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            },
        };
        let lsn = self.take_lsn();
        encode_write(buf, lsn, &key.to_string(), from.origin, &rows, &bucket.layouts);
        pending.push(PendingWrite { lsn, from, bucket, rows, prepared, appends, reply });
    }

    fn create_cmd(&mut self, inner: &Arc<Inner>, key: &BucketKey, schema: &BucketSchema, from: Applied) -> Result<()> {
        if inner.catalog.read().contains_key(key) {
            return Err(EngineError::AlreadyExists(key.to_string()));
        }
        if let Some(d) = inner.damage_of(key) {
            return Err(d);
        }
        let lsn = self.take_lsn();
        let b = match create_bucket_files(&inner.root, key, schema, lsn, inner.cold.as_ref()) {
            Ok(b) => b,
            Err(e) => {
                let _ = remove_bucket_files(&inner.root, key, inner.cold.as_ref());
                return Err(e);
            }
        };
        let mut g = wal::Group::default();
        wal::encode_record_from(&mut g, lsn, Op::Create, &key.to_string(), from.origin, |p| {
            p.extend_from_slice(&serde_json::to_vec(schema).unwrap_or_default())
        });
        if let Err(e) = self.log(inner, &mut g) {
            let _ = remove_bucket_files(&inner.root, key, inner.cold.as_ref());
            return Err(e);
        }
        inner.catalog.write().insert(key.clone(), Arc::new(b));
        self.snapshot.changed.insert(key.clone());
        inner.advance_origin(from);
        inner.feed(lsn, || Change::Create { key: key.clone(), schema: schema.clone() });
        Ok(())
    }

    fn destroy_cmd(&mut self, inner: &Arc<Inner>, key: &BucketKey, from: Applied) -> Result<()> {
        let damaged = inner.damaged.read().contains_key(&key.to_string());
        if !inner.catalog.read().contains_key(key) && !damaged {
            return Err(EngineError::NotFound(key.to_string()));
        }
        let lsn = self.take_lsn();
        let mut g = wal::Group::default();
        wal::encode_record_from(&mut g, lsn, Op::Destroy, &key.to_string(), from.origin, |_| {});
        self.log(inner, &mut g)?;
        inner.catalog.write().remove(key);
        inner.damaged.write().remove(&key.to_string());
        self.dirty.remove(key);
        self.snapshot.changed.insert(key.clone());
        inner.advance_origin(from);
        inner.feed(lsn, || Change::Destroy { key: key.clone() });
        // Logged: a failure to remove the files now is finished by replay at the next start.
        if let Err(e) = remove_bucket_files(&inner.root, key, inner.cold.as_ref()) {
            tracing::warn!(key = %key, "destroy is logged but removing the files failed (replay finishes it): {e}");
        }
        Ok(())
    }

    fn delete_range_cmd(&mut self, inner: &Arc<Inner>, key: &BucketKey, start: TimePoint, end: TimePoint, from: Applied) -> Result<usize> {
        if let Some(d) = inner.damage_of(key) {
            return Err(d);
        }
        let Some(b) = inner.catalog.read().get(key).cloned() else {
            return Err(EngineError::NotFound(key.to_string()));
        };
        let prepared = b.prepare_delete(start, end)?;
        let lsn = self.take_lsn();
        let mut g = wal::Group::default();
        wal::encode_record_from(&mut g, lsn, Op::DeleteRange, &key.to_string(), from.origin, |p| encode_range(p, start, end));
        self.log(inner, &mut g)?;
        let removed = b.commit_delete(prepared, lsn);
        self.dirty.insert(key.clone());
        inner.advance_origin(from);
        inner.feed(lsn, || Change::DeleteRange { key: key.clone(), start, end });
        Ok(removed)
    }

    /// Change a bucket's columns: checkpoint it and create the added columns' files (nothing logged yet, so
    /// a failure changes nothing), log the change, commit it in `bucket.json`, load the bucket again with
    /// the new columns, and remove the dropped columns' files.
    fn alter_cmd(&mut self, inner: &Arc<Inner>, key: &BucketKey, schema: BucketSchema, from: Applied) -> Result<BucketSchema> {
        if let Some(d) = inner.damage_of(key) {
            return Err(d);
        }
        let Some(b) = inner.catalog.read().get(key).cloned() else {
            return Err(EngineError::NotFound(key.to_string()));
        };
        if *b.schema == schema {
            inner.advance_origin(from);
            return Ok(schema);
        }
        let layouts = super::partition::physical_layouts(schema.kind, &schema.columns);
        b.prepare_schema(&layouts)?;
        let lsn = self.take_lsn();
        let mut g = wal::Group::default();
        let json = serde_json::to_vec(&schema).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
        wal::encode_record_from(&mut g, lsn, Op::Alter, &key.to_string(), from.origin, |p| p.extend_from_slice(&json));
        self.log(inner, &mut g)?;
        let nb = match super::catalog::commit_schema(&b.dir, &schema, lsn, inner.cold.as_ref()) {
            Ok(nb) => Arc::new(nb),
            // Logged but not committed: cancel the record (the added files stay unnamed) and keep the bucket
            // offline until a restart loads whatever bucket.json says.
            Err(e) => return Err(self.cancel(inner, &b, lsn, e)),
        };
        inner.catalog.write().insert(key.clone(), nb);
        b.remove_dropped_files(&layouts);
        self.dirty.remove(key);
        self.snapshot.changed.insert(key.clone());
        inner.advance_origin(from);
        inner.feed(lsn, || Change::Alter { key: key.clone(), schema: schema.clone() });
        Ok(schema)
    }

    /// Log a new upstream position (and source) without a change.
    fn mark_cmd(&mut self, inner: &Arc<Inner>, origin: Origin) -> Result<()> {
        let lsn = self.take_lsn();
        let mut g = wal::Group::default();
        wal::encode_record_from(&mut g, lsn, Op::Mark, "", Some(origin.position), |p| p.extend_from_slice(origin.source.as_bytes()));
        self.log(inner, &mut g)?;
        *inner.origin.write() = origin;
        Ok(())
    }

    /// Every readable bucket as of now (nothing is pending: the caller flushed).
    fn capture(&mut self, inner: &Arc<Inner>) -> Result<Captured> {
        let lsn = self.next_lsn - 1;
        let catalog = inner.catalog.read().clone();
        let mut buckets = Vec::with_capacity(catalog.len());
        for (key, b) in catalog {
            if inner.damaged.read().contains_key(&key.to_string()) {
                continue;
            }
            let read = super::bucket::read_bucket(&b, &ReadRequest::key(&key), inner.timezone)?;
            buckets.push(CapturedBucket { key, schema: (*b.schema).clone(), batches: read.batches });
        }
        Ok(Captured { lsn, buckets })
    }

    fn checkpoint_cmd(&mut self, inner: &Arc<Inner>, reply: Option<oneshot::Sender<Result<()>>>) {
        if self.wal.is_none() {
            self.finish_startup(inner);
        }
        if self.wal.is_some() && (reply.is_some() || self.last_retention.elapsed() >= RETENTION_EVERY) {
            self.retention(inner);
        }
        let due = reply.is_some() || (!self.dirty.is_empty() && self.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval);
        let r = if self.wal.is_none() {
            Err(EngineError::Unavailable("start-up could not finish; the engine is read-only".into()))
        } else if due {
            self.checkpoint(inner)
        } else {
            Ok(())
        };
        if r.is_ok() && self.wal.is_some() {
            let n = self.snapshot.changed.len();
            let since = self.snapshot.written.elapsed();
            if ((self.snapshot.due || n >= SNAPSHOT_CHANGED) && since >= SNAPSHOT_MIN_EVERY) || (n > 0 && since >= SNAPSHOT_MAX_EVERY) {
                self.snapshot_now(inner);
            }
        }
        if r.is_ok() && self.wal.is_some() {
            self.tier(inner, reply.is_some());
        }
        unmap_coldest(inner, self.cfg.max_mapped_files);
        if let Some(reply) = reply {
            let _ = reply.send(r);
        }
    }

    /// Append `group` to the log, durably. A failure leaves nothing of it in the log (the engine halts
    /// only when that cannot be guaranteed).
    fn log(&mut self, inner: &Inner, group: &mut wal::Group) -> Result<()> {
        let Some(w) = self.wal.as_mut() else {
            group.clear();
            return Err(EngineError::Unavailable("start-up could not finish; the engine is read-only".into()));
        };
        let r = w.append_durable(group);
        group.clear();
        match r {
            Ok(()) => Ok(()),
            Err(e @ EngineError::Unavailable(_)) => {
                inner.halt(e.to_string());
                Err(e)
            }
            Err(e) => {
                tracing::warn!("write-ahead log append failed, nothing was logged: {e}");
                Err(e)
            }
        }
    }

    /// Make the buffered records durable (one fdatasync), then apply and acknowledge them.
    fn flush(&mut self, inner: &Arc<Inner>, buf: &mut wal::Group, pending: &mut Vec<PendingWrite>) {
        if pending.is_empty() {
            buf.clear();
            return;
        }
        inner.wal_syncs.fetch_add(1, Ordering::Relaxed);
        inner.records_logged.fetch_add(pending.len() as u64, Ordering::Relaxed);
        if let Err(e) = self.log(inner, buf) {
            for p in pending.drain(..) {
                let _ = p.reply.send(Err(copy_err(&e)));
            }
            return;
        }
        // Buckets an apply failure took offline in this group: later writes to them were prepared after
        // the failed one, so they are cancelled too (replay then skips them all).
        let mut failed: Vec<Arc<Bucket>> = Vec::new();
        for p in pending.drain(..) {
            if failed.iter().any(|b| Arc::ptr_eq(b, &p.bucket)) {
                let e = self.cancel(inner, &p.bucket, p.lsn, EngineError::Aborted("an earlier write to the bucket in the same log group failed".into()));
                let _ = p.reply.send(Err(e));
                continue;
            }
            let bucket = p.bucket.clone();
            if !self.apply_one(inner, p) {
                failed.push(bucket);
            }
        }
    }

    /// Bulk append without copying the rows into the log: stage the rows in the column files (fsync'd),
    /// log a commit record, make them visible. `None` (nothing done) when the rows are not a pure append,
    /// so the caller takes the log path.
    fn direct_write(&mut self, inner: &Arc<Inner>, bucket: &Arc<Bucket>, rows: &Rows, from: Applied) -> Option<Result<WriteAck>> {
        // A staging failure leaves nothing visible or logged: staged bytes sit past the visible rows.
        let staged = match bucket.stage_direct(rows) {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(e) => return Some(Err(e)),
        };
        let lsn = self.take_lsn();
        let mut group = wal::Group::default();
        wal::encode_record_from(&mut group, lsn, Op::AppendDirect, &bucket.key.to_string(), from.origin, |p| encode_direct(p, &staged));
        inner.wal_syncs.fetch_add(1, Ordering::Relaxed);
        inner.records_logged.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.log(inner, &mut group) {
            return Some(Err(e));
        }
        Some(match bucket.commit_direct(&staged, lsn, false) {
            Ok(()) => {
                self.dirty.insert(bucket.key.clone());
                inner.rows_written.fetch_add(rows.len as u64, Ordering::Relaxed);
                inner.advance_origin(from);
                announce(inner, bucket, rows, lsn, from.publish);
                Ok(WriteAck { rows: rows.len, lsn })
            }
            Err(e) => Err(self.cancel(inner, bucket, lsn, e)),
        })
    }

    /// Apply a logged write and answer it; false when it failed (and was cancelled).
    fn apply_one(&mut self, inner: &Arc<Inner>, p: PendingWrite) -> bool {
        match p.bucket.apply_write(&p.rows, p.lsn, false, p.prepared) {
            Ok(()) => {
                self.dirty.insert(p.bucket.key.clone());
                inner.rows_written.fetch_add(p.rows.len as u64, Ordering::Relaxed);
                inner.advance_origin(p.from);
                announce(inner, &p.bucket, &p.rows, p.lsn, p.from.publish);
                let _ = p.reply.send(Ok(WriteAck { rows: p.rows.len, lsn: p.lsn }));
                true
            }
            Err(e) => {
                let e = self.cancel(inner, &p.bucket, p.lsn, e);
                let _ = p.reply.send(Err(e));
                false
            }
        }
    }

    /// A logged change could not be applied: cancel it in the log (so it never reappears) and take the
    /// bucket offline for writes until restart (its files may be half-changed; restart rebuilds it from
    /// the last checkpoint and the log). Returns the error for the client.
    fn cancel(&mut self, inner: &Arc<Inner>, bucket: &Bucket, lsn: u64, e: EngineError) -> EngineError {
        let mut g = wal::Group::default();
        wal::encode_record(&mut g, lsn, Op::Abort, &bucket.key.to_string(), |p| p.extend_from_slice(&lsn.to_le_bytes()));
        let reason = format!("applying a write failed: {e}");
        tracing::error!(key = %bucket.key, lsn, "{reason}; the write is cancelled and the bucket refuses writes until restart");
        inner.mark_damaged(&bucket.key.to_string(), &reason, false);
        if let Err(a) = self.log(inner, &mut g) {
            inner.halt(format!("a logged write (lsn {lsn}) failed ({e}) and could not be cancelled ({a}); writes are stopped"));
        }
        EngineError::Unavailable(format!("write to {} failed, nothing was stored: {e}", bucket.key))
    }

    /// Flush dirty partitions, record their applied LSNs and trim the log. A failure (a full disk) is
    /// reported and retried at the next tick; it never stops the engine.
    pub fn checkpoint(&mut self, inner: &Arc<Inner>) -> Result<()> {
        let r = self.checkpoint_inner(inner);
        self.last_checkpoint = Instant::now();
        match &r {
            Ok(()) => *inner.checkpoint_error.write() = None,
            Err(e) => {
                tracing::warn!("checkpoint failed, retrying at the next tick (the log keeps everything): {e}");
                *inner.checkpoint_error.write() = Some(e.to_string());
            }
        }
        r
    }

    fn checkpoint_inner(&mut self, inner: &Arc<Inner>) -> Result<()> {
        let keys: Vec<BucketKey> = self.dirty.iter().cloned().collect();
        for k in keys {
            if let Some(b) = inner.catalog.read().get(&k).cloned() {
                if inner.damaged.read().contains_key(&k.to_string()) {
                    continue;
                }
                b.checkpoint()?;
                b.drop_empty_years();
            }
            self.dirty.remove(&k);
            self.snapshot.changed.insert(k);
        }
        // A bucket damaged at run time still needs its records: keep the log until restart rebuilds it.
        if inner.damaged.read().values().any(|d| !d.at_load) {
            return Ok(());
        }
        // The log is about to lose the records that carry the upstream position: keep it in the file.
        let origin = inner.origin.read().clone();
        if origin != self.origin_saved {
            write_origin(&inner.root, &origin)?;
            self.origin_saved = origin;
        }
        if let Some(w) = self.wal.as_mut() {
            w.rotate_and_trim(self.next_lsn)?;
        }
        Ok(())
    }

    /// Start-up could not checkpoint the replayed state or open a log segment (e.g. the disk was full):
    /// try again, and accept writes once it works.
    fn finish_startup(&mut self, inner: &Arc<Inner>) {
        // Only a start-up that replayed everything may finish here: when replay itself stopped (a full disk),
        // trimming the log would drop the records it did not apply. That case waits for a restart.
        if !inner.halted.read().as_deref().is_some_and(|w| w.starts_with(super::STARTUP_HALT)) {
            return;
        }
        let buckets: Vec<Arc<Bucket>> = inner.catalog.read().values().cloned().collect();
        let r = (|| -> Result<()> {
            for b in &buckets {
                b.checkpoint()?;
                self.snapshot.changed.insert(b.key.clone());
            }
            let mut w = WalWriter::create(&inner.root.join(".wal"), self.next_lsn)?;
            w.rotate_and_trim(self.next_lsn)?;
            self.wal = Some(w);
            Ok(())
        })();
        match r {
            Ok(()) => {
                tracing::info!("start-up finished: writes are accepted again");
                inner.clear_halt_if(super::STARTUP_HALT);
            }
            Err(e) => tracing::debug!("start-up still cannot finish: {e}"),
        }
    }
}

impl Writer {
    /// Apply the retention rules: a logged range delete of the rows older than each matching bucket keeps.
    fn retention(&mut self, inner: &Arc<Inner>) {
        self.last_retention = Instant::now();
        // Checkpoint ticks reach here whatever the state: a halted engine logs nothing more.
        if self.cfg.retention.is_empty() || self.refusal(inner).is_some() {
            return;
        }
        let now = chrono::Utc::now().timestamp();
        let buckets: Vec<Arc<Bucket>> = inner.catalog.read().values().cloned().collect();
        for b in buckets {
            let Some(keep) = self.cfg.retention.iter().find(|r| r.on.matches(&b.key)).map(|r| r.keep.as_secs()) else { continue };
            let cutoff = now.saturating_sub(keep as i64);
            let first = b.first_epoch();
            if first.is_none_or(|f| f >= cutoff) || inner.damaged.read().contains_key(&b.key.to_string()) {
                continue;
            }
            let width: u64 = b.row_width();
            match self.delete_range_cmd(inner, &b.key, TimePoint::MIN, TimePoint { secs: cutoff - 1, nanos: 999_999_999 }, Applied::LOCAL) {
                Ok(n) => {
                    inner.retention_rows.fetch_add(n as u64, Ordering::Relaxed);
                    inner.retention_bytes.fetch_add(n as u64 * width, Ordering::Relaxed);
                    tracing::info!(key = %b.key, rows = n, keep_secs = keep, "retention removed expired rows");
                }
                Err(e) => tracing::warn!(key = %b.key, "retention could not remove expired rows (retried at the next run): {e}"),
            }
        }
    }

    /// Move sealed years to object storage (`tiering`, [`super::tier`]): every checkpointed local year
    /// that ended more than `after` ago. A tick moves for at most [`TIER_BUDGET`] (the writer takes no
    /// writes meanwhile); a forced checkpoint (`all`) moves everything due. A failure (the store is
    /// down) is logged and retried at the next tick: the year stays local and readable.
    fn tier(&mut self, inner: &Arc<Inner>, all: bool) {
        let Some(store) = inner.cold.clone() else { return };
        if inner.halted.read().is_some() {
            return;
        }
        let t0 = Instant::now();
        let now = chrono::Utc::now().timestamp();
        let after = i64::try_from(store.after.as_secs()).unwrap_or(i64::MAX);
        let buckets: Vec<Arc<Bucket>> = inner.catalog.read().values().cloned().collect();
        for b in buckets {
            if inner.damaged.read().contains_key(&b.key.to_string()) || self.dirty.contains(&b.key) {
                continue;
            }
            let due: Vec<i32> = b.parts.lock().iter().filter(|(y, p)| p.rows > 0 && super::bucket::year_start(**y + 1).saturating_add(after) <= now).map(|(y, _)| *y).collect();
            for year in due {
                if !all && t0.elapsed() >= TIER_BUDGET {
                    return;
                }
                let t = Instant::now();
                match b.tier_year(year) {
                    Ok(Some(bytes)) => {
                        self.snapshot.changed.insert(b.key.clone());
                        tracing::info!(key = %b.key, year, bytes, ms = t.elapsed().as_millis() as u64, store = store.url(), "moved a sealed year to object storage");
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(key = %b.key, year, "cannot move a sealed year to object storage (retried at the next checkpoint): {e}");
                        return;
                    }
                }
            }
        }
    }

    /// Write the catalog snapshot of the current catalog. A failure is logged and retried later; the
    /// snapshot only speeds up start-up, so nothing else depends on it.
    fn snapshot_now(&mut self, inner: &Arc<Inner>) {
        if self.wal.is_none() || inner.halted.read().is_some() {
            return;
        }
        let catalog = inner.catalog.read().clone();
        let damaged: Vec<String> = inner.damaged.read().keys().cloned().collect();
        let t0 = Instant::now();
        match write_snapshot(&inner.root, &catalog, &damaged, &mut self.snapshot.stamps, &self.snapshot.changed) {
            Ok(()) => {
                tracing::debug!(buckets = catalog.len(), ms = t0.elapsed().as_millis() as u64, "wrote the catalog snapshot");
                self.snapshot.changed.clear();
                self.snapshot.due = false;
            }
            Err(e) => tracing::warn!("cannot write the catalog snapshot (start-up will read bucket files instead): {e}"),
        }
        self.snapshot.written = Instant::now();
    }
}

/// A copy of an error for each of several clients (errors are not `Clone`: sources are io errors).
fn copy_err(e: &EngineError) -> EngineError {
    match e {
        EngineError::Io { path, source } => EngineError::Io { path: path.clone(), source: std::io::Error::new(source.kind(), source.to_string()) },
        EngineError::Unavailable(m) => EngineError::Unavailable(m.clone()),
        other => EngineError::Unavailable(other.to_string()),
    }
}

fn reply_err(cmd: Cmd, e: EngineError) {
    match cmd {
        Cmd::Write { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Create { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Destroy { reply, .. } => drop(reply.send(Err(e))),
        Cmd::DeleteRange { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Alter { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Checkpoint { reply } => {
            if let Some(r) = reply {
                let _ = r.send(Err(e));
            }
        }
        Cmd::Mark { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Capture { reply } => drop(reply.send(Err(e))),
        Cmd::Snapshot => {}
        Cmd::Shutdown { reply } => drop(reply.send(Err(e))),
    }
}

/// Hand a durable write's rows to subscribers (when `publish`) and to the change feed, building the
/// Arrow batch once for both.
fn announce(inner: &Inner, bucket: &Bucket, rows: &Rows, lsn: u64, publish: bool) {
    if inner.changes.is_none() {
        if publish {
            publish_event(inner, bucket, rows, lsn, None);
        }
        return;
    }
    let batch = match super::read::rows_batch(&bucket.schema, rows) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(key = %bucket.key, lsn, "cannot build the written batch for the change feed: {e}");
            return;
        }
    };
    if publish {
        publish_event(inner, bucket, rows, lsn, Some(&batch));
    }
    inner.feed(lsn, || Change::Write { key: bucket.key.clone(), batch });
}
