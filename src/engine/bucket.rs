//! One bucket in memory: its year partitions (writer side, behind a lock) and the published views readers
//! take without blocking the writer; reading a bucket's rows; keeping the number of mapped files bounded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{Datelike, TimeZone, Utc};
use parking_lot::{Mutex, RwLock};

use arrow::array::RecordBatch;

use super::catalog::BucketStamp;
use super::partition::{self, Ahead, Generation, PartView, Partition, Rows};
use super::records::DirectEntry;
use super::tier::{self, ColdManifest, ColdStore, ColdYear};
use super::{read, wal, BucketKey, BucketRead, BucketSchema, EngineError, Inner, ReadRequest, RecordKind, Result, TimePoint};

/// What readers snapshot: the local partitions' views and the cold years, published together so that a
/// year moving to object storage is never seen in both or in neither.
#[derive(Clone, Default)]
pub(super) struct Published {
    pub parts: Arc<Vec<PartView>>,
    pub cold: Arc<Vec<ColdYear>>,
}

/// One bucket: writer-side partitions and the reader-visible snapshot.
pub(super) struct Bucket {
    pub(super) key: BucketKey,
    /// Shared by every bucket of the same schema loaded from the catalog snapshot.
    pub(super) schema: Arc<BucketSchema>,
    /// Physical column layouts of the schema (Epoch, [Nanoseconds], data columns), shared with the views.
    pub(super) layouts: Arc<Vec<partition::Layout>>,
    pub(super) created_lsn: u64,
    /// LSN of the schema change that made `schema` (0: as created); earlier records are not replayed.
    pub(super) schema_lsn: u64,
    pub(super) dir: PathBuf,
    pub(super) parts: Mutex<BTreeMap<i32, Partition>>,
    pub(super) view: RwLock<Published>,
    /// Years in object storage (writer side; lock after `parts`), see [`super::tier`].
    pub(super) cold: Mutex<ColdManifest>,
    /// Where cold years are read from and moved to (`None`: tiering is not configured).
    pub(super) store: Option<Arc<ColdStore>>,
    /// Directory times as last recorded for the catalog snapshot (writer side; `None` once the bucket
    /// changed, so the next snapshot reads them again).
    pub(super) stamp: Mutex<Option<BucketStamp>>,
}

impl Bucket {
    /// A bucket with no partitions loaded yet.
    pub(super) fn new(key: BucketKey, schema: Arc<BucketSchema>, created_lsn: u64, dir: PathBuf, store: Option<&Arc<ColdStore>>) -> Bucket {
        let layouts = Arc::new(partition::physical_layouts(schema.kind, &schema.columns));
        Bucket::with_layouts(key, schema, layouts, created_lsn, dir, store)
    }

    /// A bucket whose partitions were loaded with `layouts` (shared with them).
    pub(super) fn with_layouts(
        key: BucketKey,
        schema: Arc<BucketSchema>,
        layouts: Arc<Vec<partition::Layout>>,
        created_lsn: u64,
        dir: PathBuf,
        store: Option<&Arc<ColdStore>>,
    ) -> Bucket {
        Bucket {
            key,
            schema,
            layouts,
            created_lsn,
            schema_lsn: 0,
            dir,
            parts: Mutex::new(BTreeMap::new()),
            view: RwLock::new(Published::default()),
            cold: Mutex::new(ColdManifest::default()),
            store: store.cloned(),
            stamp: Mutex::new(None),
        }
    }

    /// Make the partitions' current state the view readers snapshot, then remove the generations it
    /// replaced (after, not before: a reader of the published view finds every file it names).
    pub(super) fn publish(&self, parts: &mut BTreeMap<i32, Partition>) {
        let v: Vec<PartView> = parts.values().map(|p| p.view()).collect();
        let cold = Arc::new(self.cold.lock().years.clone());
        *self.view.write() = Published { parts: Arc::new(v), cold };
        for p in parts.values_mut() {
            p.remove_retired();
        }
    }

    pub(super) fn snapshot(&self) -> Arc<Vec<PartView>> {
        self.view.read().parts.clone()
    }

    /// The local views and the cold years, as one consistent snapshot.
    pub(super) fn published(&self) -> Published {
        self.view.read().clone()
    }

    /// Time of the first row, local or cold.
    pub(super) fn first_epoch(&self) -> Option<i64> {
        let p = self.published();
        let hot = p.parts.iter().find(|p| p.rows > 0).and_then(|p| p.first);
        let cold = p.cold.first().map(|c| c.first.0);
        match (hot, cold) {
            (Some(h), Some(c)) => Some(h.min(c)),
            (h, c) => h.or(c),
        }
    }

    fn store(&self) -> Result<&Arc<ColdStore>> {
        self.store.as_ref().ok_or_else(|| {
            EngineError::Unavailable(format!("{}: some years are in object storage (cold.json), but tiering is not configured", self.key))
        })
    }

    /// The log position a cold year holds everything up to (replay skips records at or below it).
    fn cold_lsn(&self, year: i32) -> Option<u64> {
        self.cold.lock().get(year).map(|c| c.lsn)
    }

    /// Delete the objects `cold.json` lists as pending (after a move, thaw or removal committed, or left
    /// by a crash), then forget them. Best effort: what fails stays listed and is retried next time.
    pub(super) fn clear_pending(&self) {
        let pending = self.cold.lock().pending.clone();
        if pending.is_empty() {
            return;
        }
        let Ok(store) = self.store() else { return };
        let mut done = Vec::new();
        for o in &pending {
            match store.delete(o) {
                Ok(()) => done.push(o.clone()),
                Err(e) => tracing::warn!(key = %self.key, object = %o, "cannot delete an object no longer used (retried later): {e}"),
            }
        }
        let mut cold = self.cold.lock();
        let mut next = cold.clone();
        next.pending.retain(|o| !done.contains(o));
        if next != *cold {
            match next.store(&self.dir) {
                Ok(()) => *cold = next,
                Err(e) => tracing::warn!(key = %self.key, "cannot update cold.json: {e}"),
            }
        }
    }

    /// Move `year` to object storage (see [`super::tier`] for the steps and why each is crash-safe).
    /// Only a checkpointed, non-empty partition moves. Returns the bytes written.
    pub(super) fn tier_year(&self, year: i32) -> Result<Option<u64>> {
        let store = self.store()?.clone();
        let mut parts = self.parts.lock();
        let Some(p) = parts.get_mut(&year) else { return Ok(None) };
        if p.rows == 0 || p.dirty || p.manifest().applied_lsn != p.applied_lsn {
            return Ok(None);
        }
        p.ensure_mapped()?;
        let view = p.view();
        let lsn = p.applied_lsn;
        let (schema, cols) = read::projection(&self.schema, None);
        let mut batches = Vec::new();
        read::batches_of(&schema, &cols, &view, 0, view.rows, &mut batches)?;
        let body = super::tier::encode(&self.key, self.schema.kind, lsn, &batches)?;
        let bytes = body.len() as u64;
        let object = ColdStore::object_name(&self.key, year, lsn);
        let entry = ColdYear {
            year,
            object: object.clone(),
            lsn,
            rows: view.rows as u64,
            bytes,
            first: (view.epoch(0), view.nanos_at(0)),
            last: (view.epoch(view.rows - 1), view.nanos_at(view.rows - 1)),
        };
        {
            // 1. pending (an interrupted move is undone at the next start), 2. put, 3. commit.
            let mut cold = self.cold.lock();
            let mut next = cold.clone();
            next.pending.push(object.clone());
            next.store(&self.dir)?;
            *cold = next.clone();
            drop(cold);
            tier::crash_point("tier:pending");
            store.put(&object, body)?;
            tier::crash_point("tier:put");
            next.pending.retain(|o| o != &object);
            next.years.retain(|c| c.year != year);
            next.years.push(entry);
            next.years.sort_by_key(|c| c.year);
            next.store(&self.dir)?;
            *self.cold.lock() = next;
            tier::crash_point("tier:commit");
        }
        // 4. Committed: the local files go (readers holding mappings keep them).
        parts.remove(&year);
        self.publish(&mut parts);
        let dir = self.dir.join(year.to_string());
        if let Err(e) = std::fs::remove_dir_all(&dir).map_err(|e| EngineError::io(&dir, e)).and_then(|_| wal::sync_dir(&self.dir)) {
            tracing::warn!(key = %self.key, year, "the year is in object storage but its local files could not be removed (the next start does): {e}");
        }
        Ok(Some(bytes))
    }

    /// Bring cold year `y` back as a local partition (before a write or a partial delete changes it):
    /// local partition durable, then `cold.json` without it (commit), then the object is deleted.
    fn thaw(&self, parts: &mut BTreeMap<i32, Partition>, y: &ColdYear) -> Result<()> {
        let store = self.store()?.clone();
        let (schema, _) = read::projection(&self.schema, None);
        let batches = store.read_all(y, &schema, self.schema.kind)?;
        let dir = self.dir.join(y.year.to_string());
        if dir.exists() {
            // Left by an interrupted thaw: the object is the truth.
            std::fs::remove_dir_all(&dir).map_err(|e| EngineError::io(&dir, e))?;
        }
        let mut p = Partition::open(&dir, y.year, self.schema.kind, self.layouts.clone())?;
        for b in &batches {
            let rows = super::normalize::normalize(b, &self.schema, self.key.tf(), store.tz)?;
            p.reserve(&rows)?;
            p.apply_rows(&rows, y.lsn, None)?;
        }
        p.applied_lsn = y.lsn;
        p.dirty = true;
        p.checkpoint()?;
        wal::sync_dir(&self.dir)?;
        tier::crash_point("thaw:local");
        {
            let mut cold = self.cold.lock();
            let mut next = cold.clone();
            next.years.retain(|c| c.year != y.year);
            next.pending.push(y.object.clone());
            next.store(&self.dir)?;
            *cold = next;
        }
        tier::crash_point("thaw:commit");
        parts.insert(y.year, p);
        // Readers see the local year before the object goes.
        self.publish(parts);
        self.clear_pending();
        tracing::info!(key = %self.key, year = y.year, rows = y.rows, "thawed a cold year for a write");
        Ok(())
    }

    /// Drop whole cold years (a range delete covers them): entries out (commit), then the objects.
    fn remove_cold(&self, parts: &mut BTreeMap<i32, Partition>, years: &[i32]) -> Result<usize> {
        if years.is_empty() {
            return Ok(0);
        }
        let mut removed = 0;
        {
            let mut cold = self.cold.lock();
            let mut next = cold.clone();
            for c in cold.years.iter().filter(|c| years.contains(&c.year)) {
                removed += c.rows as usize;
                next.pending.push(c.object.clone());
            }
            next.years.retain(|c| !years.contains(&c.year));
            next.store(&self.dir)?;
            *cold = next;
        }
        self.publish(parts);
        self.clear_pending();
        Ok(removed)
    }

    /// Cold years a range touches: (wholly inside it, partly inside it).
    fn cold_in_range(&self, start: TimePoint, end: TimePoint) -> (Vec<i32>, Vec<ColdYear>) {
        let cold = self.cold.lock();
        let (mut whole, mut part) = (Vec::new(), Vec::new());
        for c in &cold.years {
            let (s, e) = ((start.secs, start.nanos), (end.secs, end.nanos));
            if c.last < s || c.first > e {
                continue;
            }
            if c.first >= s && c.last <= e {
                whole.push(c.year);
            } else {
                part.push(c.clone());
            }
        }
        (whole, part)
    }

    /// Map the partitions of `years` that are not mapped yet (first read of them) and publish views that
    /// include their buffers.
    pub(super) fn map_years(&self, years: &[i32]) -> Result<()> {
        let mut parts = self.parts.lock();
        for y in years {
            if let Some(p) = parts.get_mut(y) {
                p.ensure_mapped()?;
            }
        }
        self.publish(&mut parts);
        Ok(())
    }

    /// Split sorted rows by UTC year (zero-copy slices).
    pub(super) fn year_slices(&self, rows: &Rows) -> Vec<(i32, Rows)> {
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
            let slice = if start == 0 && end == rows.len { rows.clone() } else { rows.slice(start, end) };
            out.push((year, slice));
            start = end;
        }
        out
    }

    pub(super) fn part<'a>(&self, parts: &'a mut BTreeMap<i32, Partition>, year: i32) -> Result<&'a mut Partition> {
        if !parts.contains_key(&year) {
            let cold = self.cold.lock().get(year).cloned();
            if let Some(y) = cold {
                self.thaw(parts, &y)?;
            }
        }
        Ok(match parts.entry(year) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(Partition::open(&self.dir.join(year.to_string()), year, self.schema.kind, self.layouts.clone())?)
            }
        })
    }

    /// Before logging a write: per year slice, reserve the disk space an append needs, or build the new
    /// generation a merge needs. A failure here (a full disk) fails the write with nothing logged.
    pub(super) fn prepare_write(&self, rows: &Rows) -> Result<Vec<Option<Generation>>> {
        let mut parts = self.parts.lock();
        let mut out = Vec::new();
        for (year, slice) in self.year_slices(rows) {
            let part = self.part(&mut parts, year)?;
            if !part.is_append(&slice) {
                part.ensure_mapped()?;
            }
            if part.needs_merge(&slice) {
                out.push(Some(part.prepare_merge(&slice)?));
            } else {
                part.reserve(&slice)?;
                out.push(None);
            }
        }
        Ok(out)
    }

    /// When `rows` are a pure append inside one year of the stored rows: that year's [`Ahead`] after them
    /// (so that a following append can be logged in the same group, see [`Bucket::prepare_append_after`]).
    pub(super) fn appended(&self, rows: &Rows) -> Option<Ahead> {
        let slices = self.year_slices(rows);
        let [(year, slice)] = slices.as_slice() else { return None };
        let parts = self.parts.lock();
        let stored_after = parts.get(year).is_none_or(|p| p.is_append(slice));
        stored_after.then(|| Ahead { year: *year, ..Ahead::default() }.then(self.schema.kind, &self.layouts, slice))
    }

    /// [`Bucket::prepare_write`] for rows that go after the appends `ahead` of the same group, inside its
    /// year: reserve their space past those appends. `None` when they do not follow `ahead` that way
    /// (the caller logs the group first and prepares them against the applied state).
    pub(super) fn prepare_append_after(&self, rows: &Rows, ahead: &Ahead) -> Result<Option<Ahead>> {
        let slices = self.year_slices(rows);
        let [(year, slice)] = slices.as_slice() else { return Ok(None) };
        if *year != ahead.year || !ahead.followed_by(self.schema.kind, slice) {
            return Ok(None);
        }
        let mut parts = self.parts.lock();
        self.part(&mut parts, *year)?.reserve_after(slice, ahead)?;
        Ok(Some(ahead.then(self.schema.kind, &self.layouts, slice)))
    }

    /// Apply sorted rows, splitting them by UTC year; `prepared` comes from [`Bucket::prepare_write`]
    /// (empty at replay, where merges are built as they come).
    pub(super) fn apply_write(&self, rows: &Rows, lsn: u64, replay: bool, prepared: Vec<Option<Generation>>) -> Result<()> {
        let mut parts = self.parts.lock();
        let mut prepared = prepared.into_iter();
        let mut result = Ok(());
        for (year, slice) in self.year_slices(rows) {
            let next_gen = prepared.next().flatten();
            if replay && self.cold_lsn(year).is_some_and(|c| lsn <= c) {
                continue;
            }
            let part = match self.part(&mut parts, year) {
                Ok(p) => p,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if !(replay && lsn <= part.applied_lsn) {
                if let Err(e) = part.apply_rows(&slice, lsn, next_gen) {
                    result = Err(e);
                    break;
                }
            }
        }
        self.publish(&mut parts);
        result
    }

    /// Bulk path: if every year slice is a pure append, write the rows straight into the column files
    /// (fsync'd), and return the commit record entries; `None` when the write must take the log path.
    pub(super) fn stage_direct(&self, rows: &Rows) -> Result<Option<Vec<DirectEntry>>> {
        let mut parts = self.parts.lock();
        let slices = self.year_slices(rows);
        for (year, slice) in &slices {
            if self.cold_lsn(*year).is_some() {
                return Ok(None);
            }
            if let Some(p) = parts.get_mut(year) {
                if !p.is_append(slice) || !p.direct_ok(slice)? {
                    return Ok(None);
                }
            } else if slice.has_nulls() || self.layouts.iter().any(|l| l.ty.is_var()) {
                return Ok(None);
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
    pub(super) fn commit_direct(&self, entries: &[DirectEntry], lsn: u64, replay: bool) -> Result<()> {
        let mut parts = self.parts.lock();
        let mut result = Ok(());
        for e in entries {
            if replay && self.cold_lsn(e.year).is_some_and(|c| lsn <= c) {
                continue;
            }
            let part = match self.part(&mut parts, e.year) {
                Ok(p) => p,
                Err(err) => {
                    result = Err(err);
                    break;
                }
            };
            if replay && lsn <= part.applied_lsn {
                continue;
            }
            if let Err(err) = part.commit_direct_append(e.generation, e.start as usize, e.rows as usize, e.crc, lsn, replay) {
                result = Err(err);
                break;
            }
        }
        self.publish(&mut parts);
        result
    }

    /// Bytes per row of the fixed-width files (for retention's byte count).
    pub(super) fn row_width(&self) -> u64 {
        self.layouts.iter().map(|l| l.ty.width() as u64).sum()
    }

    /// Before logging a range delete: the new generation of every partition that loses rows.
    pub(super) fn prepare_delete(&self, start: TimePoint, end: TimePoint) -> Result<PreparedDelete> {
        let mut parts = self.parts.lock();
        let (whole, partly) = self.cold_in_range(start, end);
        for y in &partly {
            self.thaw(&mut parts, y)?;
        }
        let mut out = Vec::new();
        for (year, p) in parts.iter_mut() {
            if let Some(g) = p.prepare_delete((start.secs, start.nanos), (end.secs, end.nanos))? {
                out.push((*year, g));
            }
        }
        Ok(PreparedDelete { generations: out, cold: whole })
    }

    /// Switch to the generations [`Bucket::prepare_delete`] built (the record is durable). Returns rows removed.
    pub(super) fn commit_delete(&self, prepared: PreparedDelete, lsn: u64) -> usize {
        let mut parts = self.parts.lock();
        let mut removed = match self.remove_cold(&mut parts, &prepared.cold) {
            Ok(n) => n,
            Err(e) => {
                // Logged: the next start replays the delete and removes them.
                tracing::warn!(key = %self.key, "a logged delete could not drop its cold years yet (replay does): {e}");
                0
            }
        };
        for (year, g) in prepared.generations {
            if let Some(p) = parts.get_mut(&year) {
                let before = p.rows;
                p.commit_generation(g);
                removed += before - p.rows;
            }
        }
        for p in parts.values_mut() {
            p.applied_lsn = p.applied_lsn.max(lsn);
        }
        self.publish(&mut parts);
        removed
    }

    /// Replay of a range delete.
    pub(super) fn delete_range(&self, start: TimePoint, end: TimePoint, lsn: u64, replay: bool) -> Result<usize> {
        let mut parts = self.parts.lock();
        let (whole, partly) = self.cold_in_range(start, end);
        let newer = |y: i32| !replay || self.cold_lsn(y).is_none_or(|c| lsn > c);
        for y in partly.iter().filter(|y| newer(y.year)) {
            self.thaw(&mut parts, y)?;
        }
        let whole: Vec<i32> = whole.into_iter().filter(|y| newer(*y)).collect();
        let mut removed = self.remove_cold(&mut parts, &whole)?;
        for p in parts.values_mut() {
            if replay && lsn <= p.applied_lsn {
                continue;
            }
            removed += p.delete_range((start.secs, start.nanos), (end.secs, end.nanos), lsn)?;
        }
        self.publish(&mut parts);
        Ok(removed)
    }

    /// Remove year partitions that hold no rows, durably (after a checkpoint recorded that): what range
    /// deletes and retention leave behind. A crash before the directory is gone replays to the same state.
    pub(super) fn drop_empty_years(&self) {
        let mut parts = self.parts.lock();
        let empty: Vec<i32> = parts.iter().filter(|(_, p)| p.rows == 0 && p.manifest().rows == 0).map(|(y, _)| *y).collect();
        if empty.is_empty() {
            return;
        }
        for y in empty {
            parts.remove(&y);
            let dir = self.dir.join(y.to_string());
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(key = %self.key, year = y, "cannot remove an empty year partition: {e}");
            }
        }
        self.publish(&mut parts);
    }

    pub(super) fn checkpoint(&self) -> Result<()> {
        let mut parts = self.parts.lock();
        for p in parts.values_mut() {
            p.checkpoint()?;
        }
        Ok(())
    }

    /// Before a schema change is logged: checkpoint every partition (so no log record of the old columns
    /// is ever replayed against the new ones) and create the files of the columns `layouts` adds.
    pub(super) fn prepare_schema(&self, layouts: &[partition::Layout]) -> Result<()> {
        let added: Vec<partition::Layout> = layouts.iter().filter(|l| !self.layouts.iter().any(|o| o.file == l.file)).copied().collect();
        let mut parts = self.parts.lock();
        for p in parts.values_mut() {
            p.checkpoint()?;
            p.add_columns(&added)?;
        }
        Ok(())
    }

    /// After a schema change committed: remove the files of the columns it dropped (best effort: files no
    /// layout names are never read).
    pub(super) fn remove_dropped_files(&self, layouts: &[partition::Layout]) {
        let dropped: Vec<partition::Layout> = self.layouts.iter().filter(|o| !layouts.iter().any(|l| l.file == o.file)).copied().collect();
        if dropped.is_empty() {
            return;
        }
        for p in self.parts.lock().values() {
            p.remove_columns(&dropped);
        }
    }
}

/// What a range delete removes, built before it is logged: new generations of local years, and the cold
/// years it covers whole.
pub(super) struct PreparedDelete {
    pub generations: Vec<(i32, Generation)>,
    pub cold: Vec<i32>,
}

fn year_of(t: i64) -> i32 {
    Utc.timestamp_opt(t, 0).single().map(|d| d.year()).unwrap_or(if t < 0 { -262143 } else { 262142 })
}

pub(super) fn year_start(y: i32) -> i64 {
    Utc.with_ymd_and_hms(y, 1, 1, 0, 0, 0).single().map(|d| d.timestamp()).unwrap_or(i64::MAX)
}

/// What a read of one bucket covers: the snapshot, the output columns, and the spans of rows in order.
/// Shared by [`read_bucket`] and same-host reads ([`super::local`]).
pub(super) struct Selection {
    pub snap: Arc<Vec<PartView>>,
    pub schema: arrow::datatypes::SchemaRef,
    pub cols: Vec<read::OutCol>,
    pub ranges: Vec<Span>,
}

/// Rows of one year in a read: `(view index, lo, hi)` of a local partition, or the batches read from a
/// cold year's object.
pub(super) enum Span {
    Hot(usize, usize, usize),
    Cold(Vec<RecordBatch>),
}

impl Span {
    fn rows(&self) -> usize {
        match self {
            Span::Hot(_, lo, hi) => hi - lo,
            Span::Cold(b) => b.iter().map(|b| b.num_rows()).sum(),
        }
    }

    /// The first (`from_start`) or last `n` rows.
    fn keep(self, n: usize, from_start: bool) -> Span {
        match self {
            Span::Hot(i, lo, hi) if from_start => Span::Hot(i, lo, lo + n.min(hi - lo)),
            Span::Hot(i, lo, hi) => Span::Hot(i, hi - n.min(hi - lo), hi),
            Span::Cold(batches) => {
                let mut left = n;
                let mut out = Vec::new();
                let it: Box<dyn Iterator<Item = RecordBatch>> = if from_start { Box::new(batches.into_iter()) } else { Box::new(batches.into_iter().rev()) };
                for b in it {
                    if left == 0 {
                        break;
                    }
                    let k = b.num_rows().min(left);
                    out.push(if from_start { b.slice(0, k) } else { b.slice(b.num_rows() - k, k) });
                    left -= k;
                }
                if !from_start {
                    out.reverse();
                }
                Span::Cold(out)
            }
        }
    }
}

/// `tz`: [`super::EngineConfig::timezone`], where day-and-longer intervals start.
pub(super) fn read_bucket(b: &Bucket, req: &ReadRequest, tz: Option<chrono_tz::Tz>) -> Result<BucketRead> {
    let Selection { snap, schema, cols, ranges } = select(b, req, tz)?;
    let mut batches = Vec::with_capacity(ranges.len());
    let mut rows = 0;
    for span in ranges {
        rows += span.rows();
        match span {
            Span::Hot(i, lo, hi) => read::batches_of(&schema, &cols, &snap[i], lo, hi, &mut batches)?,
            Span::Cold(cold) => batches.extend(cold),
        }
    }
    Ok(BucketRead { key: b.key.clone(), kind: b.schema.kind, schema, batches, rows })
}

/// The partitions and row ranges `req` reads from `b` (mapping the partitions it needs; reading the cold
/// years it needs — only those a limit reaches).
pub(super) fn select(b: &Bucket, req: &ReadRequest, tz: Option<chrono_tz::Tz>) -> Result<Selection> {
    let Published { parts: mut snap, cold } = b.published();
    let (schema, cols) = read::projection(&b.schema, req.columns.as_deref());
    let mut start = req.start.unwrap_or(TimePoint::MIN);
    let end = req.end.unwrap_or(TimePoint::MAX);
    if b.schema.kind == RecordKind::Fixed && start.secs != i64::MIN {
        // Fixed buckets filter at interval granularity: a start inside an interval includes its bar.
        start = TimePoint::secs(b.key.tf().truncate_in(start.secs, tz));
    }
    // Partitions that can hold rows of the range (by their first/last Epoch) must be mapped to be read.
    let overlaps = |p: &PartView| p.rows > 0 && p.first.is_none_or(|f| f <= end.secs) && p.last.is_none_or(|l| l >= start.secs);
    let unmapped: Vec<i32> = snap.iter().filter(|p| overlaps(p) && !p.mapped).map(|p| p.year).collect();
    if !unmapped.is_empty() {
        b.map_years(&unmapped)?;
        snap = b.snapshot();
    }
    // Candidates in year order: local views by index, cold years by entry.
    let mut cands: Vec<(i32, Option<usize>, Option<&ColdYear>)> = Vec::new();
    for (i, p) in snap.iter().enumerate() {
        if overlaps(p) && p.mapped {
            cands.push((p.year, Some(i), None));
        }
    }
    for c in cold.iter() {
        if c.rows > 0 && c.first.0 <= end.secs && c.last.0 >= start.secs {
            cands.push((c.year, None, Some(c)));
        }
    }
    cands.sort_by_key(|c| c.0);
    let resolve = |c: &(i32, Option<usize>, Option<&ColdYear>)| -> Result<Option<Span>> {
        match c {
            (_, Some(i), _) => {
                let p = &snap[*i];
                p.touch();
                let (lo, hi) = read::row_range(p, b.schema.kind, start, end);
                Ok((hi > lo).then_some(Span::Hot(*i, lo, hi)))
            }
            (_, None, Some(y)) => {
                let batches = b.store()?.read_year(y, &schema, b.schema.kind, start, end)?;
                Ok((!batches.is_empty()).then_some(Span::Cold(batches)))
            }
            _ => Ok(None),
        }
    };
    let mut ranges = Vec::new();
    match req.limit {
        None => {
            for c in &cands {
                ranges.extend(resolve(c)?);
            }
        }
        Some(limit) => {
            let mut left = limit;
            let order: Box<dyn Iterator<Item = &(i32, Option<usize>, Option<&ColdYear>)>> =
                if req.from_start { Box::new(cands.iter()) } else { Box::new(cands.iter().rev()) };
            for c in order {
                if left == 0 {
                    break;
                }
                let Some(span) = resolve(c)? else { continue };
                let span = span.keep(left, req.from_start);
                left -= span.rows();
                ranges.push(span);
            }
            if !req.from_start {
                ranges.reverse();
            }
        }
    }
    Ok(Selection { snap, schema, cols, ranges })
}

/// Keep at most `budget` column files mapped: unmap the least recently used partitions (down to 80% of the
/// budget, so this does not run at every tick). Readers holding batches keep their own mappings alive.
pub(super) fn unmap_coldest(inner: &Inner, budget: usize) {
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
        b.publish(&mut parts);
    }
    tracing::debug!(unmapped, budget, "unmapped the least recently used partitions");
}
