//! One bucket in memory: its year partitions (writer side, behind a lock) and the published views readers
//! take without blocking the writer; reading a bucket's rows; keeping the number of mapped files bounded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{Datelike, TimeZone, Utc};
use parking_lot::{Mutex, RwLock};

use super::catalog::BucketStamp;
use super::partition::{self, Ahead, Generation, PartView, Partition, Rows};
use super::records::DirectEntry;
use super::{read, BucketKey, BucketRead, BucketSchema, Inner, ReadRequest, RecordKind, Result, TimePoint};

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
    pub(super) view: RwLock<Arc<Vec<PartView>>>,
    /// Directory times as last recorded for the catalog snapshot (writer side; `None` once the bucket
    /// changed, so the next snapshot reads them again).
    pub(super) stamp: Mutex<Option<BucketStamp>>,
}

impl Bucket {
    /// A bucket with no partitions loaded yet.
    pub(super) fn new(key: BucketKey, schema: Arc<BucketSchema>, created_lsn: u64, dir: PathBuf) -> Bucket {
        let layouts = Arc::new(partition::physical_layouts(schema.kind, &schema.columns));
        Bucket::with_layouts(key, schema, layouts, created_lsn, dir)
    }

    /// A bucket whose partitions were loaded with `layouts` (shared with them).
    pub(super) fn with_layouts(key: BucketKey, schema: Arc<BucketSchema>, layouts: Arc<Vec<partition::Layout>>, created_lsn: u64, dir: PathBuf) -> Bucket {
        Bucket { key, schema, layouts, created_lsn, schema_lsn: 0, dir, parts: Mutex::new(BTreeMap::new()), view: RwLock::new(Arc::new(Vec::new())), stamp: Mutex::new(None) }
    }

    /// Make the partitions' current state the view readers snapshot, then remove the generations it
    /// replaced (after, not before: a reader of the published view finds every file it names).
    pub(super) fn publish(&self, parts: &mut BTreeMap<i32, Partition>) {
        let v: Vec<PartView> = parts.values().map(|p| p.view()).collect();
        *self.view.write() = Arc::new(v);
        for p in parts.values_mut() {
            p.remove_retired();
        }
    }

    pub(super) fn snapshot(&self) -> Arc<Vec<PartView>> {
        self.view.read().clone()
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
            if let Err(err) = part.commit_direct_append(e.generation, e.start as usize, e.rows as usize, e.crc, lsn) {
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
    pub(super) fn prepare_delete(&self, start: TimePoint, end: TimePoint) -> Result<Vec<(i32, Generation)>> {
        let mut parts = self.parts.lock();
        let mut out = Vec::new();
        for (year, p) in parts.iter_mut() {
            if let Some(g) = p.prepare_delete((start.secs, start.nanos), (end.secs, end.nanos))? {
                out.push((*year, g));
            }
        }
        Ok(out)
    }

    /// Switch to the generations [`Bucket::prepare_delete`] built (the record is durable). Returns rows removed.
    pub(super) fn commit_delete(&self, prepared: Vec<(i32, Generation)>, lsn: u64) -> usize {
        let mut parts = self.parts.lock();
        let mut removed = 0;
        for (year, g) in prepared {
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
        let mut removed = 0;
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

fn year_of(t: i64) -> i32 {
    Utc.timestamp_opt(t, 0).single().map(|d| d.year()).unwrap_or(if t < 0 { -262143 } else { 262142 })
}

fn year_start(y: i32) -> i64 {
    Utc.with_ymd_and_hms(y, 1, 1, 0, 0, 0).single().map(|d| d.timestamp()).unwrap_or(i64::MAX)
}

/// What a read of one bucket covers: the snapshot, the output columns, and `(view index, lo, hi)` row
/// ranges in order. Shared by [`read_bucket`] and same-host reads ([`super::local`]).
pub(super) struct Selection {
    pub snap: Arc<Vec<PartView>>,
    pub schema: arrow::datatypes::SchemaRef,
    pub cols: Vec<read::OutCol>,
    pub ranges: Vec<(usize, usize, usize)>,
}

/// `tz`: [`super::EngineConfig::timezone`], where day-and-longer intervals start.
pub(super) fn read_bucket(b: &Bucket, req: &ReadRequest, tz: Option<chrono_tz::Tz>) -> Result<BucketRead> {
    let Selection { snap, schema, cols, ranges } = select(b, req, tz)?;
    let mut batches = Vec::with_capacity(ranges.len());
    let mut rows = 0;
    for (i, lo, hi) in ranges {
        read::batches_of(&schema, &cols, &snap[i], lo, hi, &mut batches)?;
        rows += hi - lo;
    }
    Ok(BucketRead { key: b.key.clone(), kind: b.schema.kind, schema, batches, rows })
}

/// The partitions and row ranges `req` reads from `b` (mapping the partitions it needs).
pub(super) fn select(b: &Bucket, req: &ReadRequest, tz: Option<chrono_tz::Tz>) -> Result<Selection> {
    let mut snap = b.snapshot();
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
