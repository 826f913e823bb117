//! One year of one bucket: a dense, time-sorted, memory-mapped file per column.
//!
//! Writers own [`Partition`] (only the engine's writer thread touches it); readers get [`PartView`]s:
//! immutable `(row count, column buffers)` pairs whose buffers point into the mapped files.
//!
//! - In-order appends write past the committed row count with `pwrite` (files grow by doubling with
//!   `set_len`, never shrink), then publish a view with the larger count. Readers of older views never look
//!   past their own count, so they are unaffected.
//! - Out-of-order writes, overwrites and range deletes build a new generation directory `g<N+1>`, fsync it,
//!   switch the manifest by rename, then publish. The old generation's files are unlinked; mappings held by
//!   readers stay valid (a mapped file is never truncated).
//! - Live feeds re-send the newest bars; copying a year to replace its last bar would cost O(partition) per
//!   write. So after the first such overwrite the partition turns *hot*: every view it publishes from then
//!   on takes its last [`TAIL_ROWS`] rows from heap copies instead of the mapping, and later overwrites of
//!   rows within the last [`TAIL_ROWS`] are written in place with `pwrite`. No view ever reads those bytes
//!   from the mapping (a view's mapped region ends `TAIL_ROWS` before its own row count, and row counts only
//!   grow within a generation), so snapshots stay consistent. The log holds every overwrite, and replaying
//!   one in place is idempotent.
//! - Files are mapped lazily: a partition is mapped when it is first read or written, so a catalog with
//!   decades of history starts without mapping it; past a budget (half of `vm.max_map_count` by default)
//!   the engine unmaps the least recently used partitions, and their next use maps them again.
//! - The manifest (`manifest.json`) records the generation, the durable row count and the last applied log
//!   sequence number; replay applies only records after it, so no write is applied twice.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::buffer::Buffer;
use serde::{Deserialize, Serialize};

use super::error::{EngineError, Result};
use super::types::{ColumnType, RecordKind};
use super::wal::sync_dir;

/// Most rows a partition can hold (a year of nanosecond ticks would be 3e16; this bounds arithmetic on
/// row counts read from disk).
const MAX_ROWS: usize = 1 << 48;

/// Initial capacity of a new column file, in rows.
const MIN_CAPACITY_ROWS: usize = 1024;

/// Rows at the end of a hot partition that views copy to the heap and writers may overwrite in place.
pub const TAIL_ROWS: usize = 128;

/// Persisted partition state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub generation: u64,
    pub rows: usize,
    pub applied_lsn: u64,
    /// `(Epoch, Nanoseconds)` of the first and last durable row, so opening a catalog of many thousands of
    /// buckets reads one small file per partition and touches no column file (absent in older manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<(i64, i32)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<(i64, i32)>,
}

/// Rows to add to a partition, already validated, normalized and sorted (column bytes little-endian,
/// in the partition's physical column order: Epoch, [Nanoseconds], data columns).
#[derive(Debug, Clone)]
pub struct Rows {
    pub len: usize,
    /// Little-endian bytes of each physical column (shared, often the incoming Arrow buffer itself).
    pub cols: Vec<Buffer>,
}

impl Rows {
    /// Rows `lo..hi` (zero-copy); `widths` are the physical column widths.
    pub fn slice(&self, widths: &[usize], lo: usize, hi: usize) -> Rows {
        Rows { len: hi - lo, cols: self.cols.iter().zip(widths).map(|(c, w)| c.slice_with_length(lo * w, (hi - lo) * w)).collect() }
    }

    pub fn epoch(&self, i: usize) -> i64 {
        i64::from_le_bytes(self.cols[0][i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
    }
    pub fn nanos(&self, i: usize) -> i32 {
        i32::from_le_bytes(self.cols[1][i * 4..i * 4 + 4].try_into().unwrap_or([0; 4]))
    }
}

/// An immutable view of a partition's committed rows: rows `0..split` zero-copy over the mapped files,
/// rows `split..rows` from heap copies (hot partitions only; otherwise `split == rows`). A partition not
/// mapped yet has `mapped == false` and no buffers; readers ask the engine to map it first.
#[derive(Debug, Clone)]
pub struct PartView {
    pub year: i32,
    pub rows: usize,
    pub mapped: bool,
    /// When a reader last used this partition (shared with the partition, for unmapping the coldest).
    pub last_used: Arc<AtomicU64>,
    /// Epoch of the first and last row (known without mapping).
    pub first: Option<i64>,
    pub last: Option<i64>,
    /// One buffer per physical column over the mapped file; only rows `0..split` may be read from it.
    pub cols: Vec<Buffer>,
    pub split: usize,
    /// One buffer per physical column holding rows `split..rows`.
    pub tail: Vec<Buffer>,
}

impl PartView {
    /// Record a use by a reader now.
    pub fn touch(&self) {
        self.last_used.store(now_millis(), Ordering::Relaxed);
    }

    /// Epoch of row `i`.
    pub fn epoch(&self, i: usize) -> i64 {
        if i < self.split { typed::<i64>(&self.cols[0], self.split)[i] } else { typed::<i64>(&self.tail[0], self.rows - self.split)[i - self.split] }
    }

    /// Nanoseconds of row `i` (variable buckets only).
    pub fn nanos_at(&self, i: usize) -> i32 {
        if i < self.split { typed::<i32>(&self.cols[1], self.split)[i] } else { typed::<i32>(&self.tail[1], self.rows - self.split)[i - self.split] }
    }

    /// Rows `lo..hi` as `(buffers, first row in them, row count)` pieces: one or two (mapped, heap).
    pub fn pieces(&self, lo: usize, hi: usize) -> Vec<(&[Buffer], usize, usize)> {
        let mut out = Vec::with_capacity(2);
        if lo < self.split {
            let h = hi.min(self.split);
            out.push((self.cols.as_slice(), lo, h - lo));
        }
        if hi > self.split {
            let l = lo.max(self.split);
            out.push((self.tail.as_slice(), l - self.split, hi - l));
        }
        out
    }

    /// Every stored Epoch; only for dense views (`split == rows`), i.e. the writer's own.
    fn epochs(&self) -> &[i64] {
        typed::<i64>(&self.cols[0], self.rows)
    }

    fn nanos(&self) -> &[i32] {
        typed::<i32>(&self.cols[1], self.rows)
    }
}

fn typed<T: arrow::datatypes::ArrowNativeType>(b: &Buffer, rows: usize) -> &[T] {
    let s: &[T] = b.typed_data::<T>();
    &s[..rows.min(s.len())]
}

/// A column file: its path and current mapping. No file descriptor is kept open (a mapping outlives its
/// descriptor), so thousands of buckets never exhaust the process's open-file limit (MarketStore #183).
struct ColumnFile {
    path: PathBuf,
    width: usize,
    /// `None` until the partition is first read or written.
    buffer: Option<Buffer>,
}

impl ColumnFile {
    fn mapped(&self) -> Buffer {
        self.buffer.clone().unwrap_or_else(|| Buffer::from_vec(Vec::<u64>::new()))
    }
}

fn now_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn read_at(path: &Path, buf: &mut [u8], offset: usize) -> Result<()> {
    File::open(path).and_then(|f| f.read_exact_at(buf, offset as u64)).map_err(|e| EngineError::io(path, e))
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new().read(true).write(true).open(path).map_err(|e| EngineError::io(path, e))
}

/// A new generation's files, written and fsync'd, not yet in use ([`Partition::prepare_merge`]).
pub struct Generation {
    number: u64,
    rows: usize,
    capacity: usize,
    files: Vec<ColumnFile>,
}

/// Grow `file` to `len` bytes with its blocks allocated, so later writes into it cannot fail for lack of
/// space (plain `set_len` only makes a sparse file). Falls back to `set_len` where `fallocate` is not
/// supported.
fn allocate(file: &File, path: &Path, len: usize) -> Result<()> {
    use std::os::fd::AsRawFd;
    let current = file.metadata().map_err(|e| EngineError::io(path, e))?.len() as usize;
    if len <= current {
        return Ok(());
    }
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, current as libc::off_t, (len - current) as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => file.set_len(len as u64).map_err(|e| EngineError::io(path, e)),
        _ => Err(EngineError::io(path, err)),
    }
}

/// Writer-side state of one partition.
pub struct Partition {
    pub year: i32,
    dir: PathBuf,
    kind: RecordKind,
    types: Vec<ColumnType>,
    manifest: Manifest,
    /// The generation in use; newer than the manifest's between a merge and the next checkpoint.
    generation: u64,
    capacity: usize,
    files: Vec<ColumnFile>,
    /// The column files were checked and sized ([`Partition::open_files`]); until then only the manifest
    /// was read.
    opened: bool,
    /// Rows applied (visible), possibly more than the manifest's durable count.
    pub rows: usize,
    /// LSN of the last record applied (persisted at checkpoint).
    pub applied_lsn: u64,
    /// True when rows were appended since the last checkpoint.
    pub dirty: bool,
    /// Views carry heap copies of the last [`TAIL_ROWS`] rows, so those may be overwritten in place.
    hot: bool,
    /// A bulk append's commit record re-validates its bytes at replay until a checkpoint covers it, so
    /// until then nothing may change rows in place (a later in-place overwrite would fail that check).
    direct_unchecked: bool,
    /// `(Epoch, Nanoseconds)` of the first and last row, kept without mapping.
    first_key: Option<(i64, i32)>,
    last_key: Option<(i64, i32)>,
    /// Milliseconds since the Unix epoch of the last read or write (for unmapping the coldest).
    last_used: Arc<AtomicU64>,
}

/// Physical column types of a bucket: Epoch, [Nanoseconds], then the data columns.
pub fn physical_types(kind: RecordKind, data: &[ColumnType]) -> Vec<ColumnType> {
    let mut v = vec![ColumnType::I64];
    if kind == RecordKind::Variable {
        v.push(ColumnType::I32);
    }
    v.extend_from_slice(data);
    v
}

fn col_file_name(i: usize, ty: ColumnType) -> String {
    format!("c{i:03}.{}", ty.file_suffix())
}

fn map_file(file: &File, path: &Path) -> Result<Buffer> {
    let len = file.metadata().map_err(|e| EngineError::io(path, e))?.len() as usize;
    if len == 0 {
        return Ok(Buffer::from_vec(Vec::<u64>::new()));
    }
    // SAFETY: the file is only ever grown (set_len upward) or unlinked, never truncated, so the mapping stays
    // valid for its lifetime. Bytes change in place only in the tail of a hot partition, which no view reads
    // from the mapping (module docs).
    let mmap = unsafe { memmap2::Mmap::map(file) }.map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOMEM) {
            // Almost always the per-process mapping limit, not memory.
            EngineError::io(path, std::io::Error::other(format!("{e}: too many mapped files? raise vm.max_map_count (sysctl -w vm.max_map_count=262144)")))
        } else {
            EngineError::io(path, e)
        }
    })?;
    let ptr = NonNull::new(mmap.as_ptr() as *mut u8)
        .ok_or_else(|| EngineError::Corrupt { path: path.display().to_string(), reason: "null mapping".into() })?;
    let n = mmap.len();
    // SAFETY: ptr/len describe the mapping, which the Arc keeps alive as long as the buffer.
    Ok(unsafe { Buffer::from_custom_allocation(ptr, n, Arc::new(mmap)) })
}

impl Partition {
    /// Open an existing partition directory or create an empty one.
    pub fn open(dir: &Path, year: i32, kind: RecordKind, data_types: &[ColumnType]) -> Result<Self> {
        Self::open_with(dir, year, kind, data_types, true)
    }

    /// Open an existing partition at start-up: a missing manifest is damage, not a new partition.
    pub fn load(dir: &Path, year: i32, kind: RecordKind, data_types: &[ColumnType]) -> Result<Self> {
        Self::open_with(dir, year, kind, data_types, false)
    }

    fn open_with(dir: &Path, year: i32, kind: RecordKind, data_types: &[ColumnType], create: bool) -> Result<Self> {
        let types = physical_types(kind, data_types);
        let mpath = dir.join("manifest.json");
        let existing = match fs::read_to_string(&mpath) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EngineError::Corrupt { path: mpath.display().to_string(), reason: "year partition without manifest.json".into() });
            }
            Err(e) => return Err(EngineError::io(&mpath, e)),
        };
        let manifest = if let Some(text) = existing {
            let m = serde_json::from_str::<Manifest>(&text)
                .map_err(|e| EngineError::Corrupt { path: mpath.display().to_string(), reason: e.to_string() })?;
            check_manifest(&m, &mpath)?;
            m
        } else {
            fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
            let m = Manifest { generation: 0, rows: 0, applied_lsn: 0, first: None, last: None };
            write_manifest(dir, &m)?;
            m
        };
        Self::with_manifest(dir, year, kind, types, manifest)
    }

    /// A partition whose manifest is already known (the catalog snapshot holds it): nothing is read unless
    /// the manifest predates first/last keys.
    pub fn from_manifest(dir: &Path, year: i32, kind: RecordKind, data_types: &[ColumnType], manifest: Manifest) -> Result<Self> {
        check_manifest(&manifest, &dir.join("manifest.json"))?;
        Self::with_manifest(dir, year, kind, physical_types(kind, data_types), manifest)
    }

    fn with_manifest(dir: &Path, year: i32, kind: RecordKind, types: Vec<ColumnType>, manifest: Manifest) -> Result<Self> {
        // The column files are described when first opened ([`Partition::open_files`]): a catalog of many
        // thousands of partitions holds no per-column paths it never uses.
        let (first_key, last_key) = (manifest.first, manifest.last);
        let mut p = Partition {
            year,
            dir: dir.to_path_buf(),
            kind,
            types,
            generation: manifest.generation,
            rows: manifest.rows,
            applied_lsn: manifest.applied_lsn,
            manifest,
            capacity: 0,
            files: Vec::new(),
            opened: false,
            dirty: false,
            hot: false,
            direct_unchecked: false,
            first_key,
            last_key,
            last_used: Arc::new(AtomicU64::new(now_millis())),
        };
        // Older manifests do not carry the bounds: read them from the column files now.
        if p.rows > 0 && (p.first_key.is_none() || p.last_key.is_none()) {
            p.open_files()?;
        }
        Ok(p)
    }

    /// Check and size the column files (first use after opening): remove generations a crash left behind,
    /// create missing files of an empty partition, refuse files shorter than the manifest's rows.
    fn open_files(&mut self) -> Result<()> {
        if self.opened {
            return Ok(());
        }
        if let Ok(rd) = fs::read_dir(&self.dir) {
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().to_string();
                if let Some(g) = name.strip_prefix('g').and_then(|g| g.parse::<u64>().ok()) {
                    if g != self.manifest.generation && g != self.generation {
                        let _ = fs::remove_dir_all(ent.path());
                    }
                }
            }
        }
        let gdir = self.gen_dir(self.generation);
        fs::create_dir_all(&gdir).map_err(|e| EngineError::io(&gdir, e))?;
        if self.files.is_empty() {
            self.files = self.types.iter().enumerate().map(|(i, ty)| ColumnFile { path: gdir.join(col_file_name(i, *ty)), width: ty.width(), buffer: None }).collect();
        }
        let mut capacity = usize::MAX;
        for f in &self.files {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(self.rows == 0)
                .truncate(false)
                .open(&f.path)
                .map_err(|e| EngineError::io(&f.path, e))?;
            let len = file.metadata().map_err(|e| EngineError::io(&f.path, e))?.len() as usize;
            if self.rows.checked_mul(f.width).is_none_or(|need| len < need) {
                return Err(EngineError::Corrupt {
                    path: f.path.display().to_string(),
                    reason: format!("file holds {} bytes, manifest says {} rows", len, self.rows),
                });
            }
            capacity = capacity.min(len / f.width);
        }
        self.capacity = if capacity == usize::MAX { 0 } else { capacity };
        if self.rows > 0 && (self.first_key.is_none() || self.last_key.is_none()) {
            let key_at = |i: usize| -> Result<(i64, i32)> {
                let mut e = [0u8; 8];
                read_at(&self.files[0].path, &mut e, i * 8)?;
                let mut n = [0u8; 4];
                if self.kind == RecordKind::Variable {
                    read_at(&self.files[1].path, &mut n, i * 4)?;
                }
                Ok((i64::from_le_bytes(e), i32::from_le_bytes(n)))
            };
            self.first_key = Some(key_at(0)?);
            self.last_key = Some(key_at(self.rows - 1)?);
        }
        self.opened = true;
        Ok(())
    }

    /// Drop this partition's mappings (readers holding batches keep theirs until they drop them); the next
    /// read or write maps again. Returns the files unmapped.
    pub fn unmap(&mut self) -> usize {
        let n = self.files.iter().filter(|f| f.buffer.is_some()).count();
        for f in &mut self.files {
            f.buffer = None;
        }
        n
    }

    /// Mapped column files and the last use, for the engine's unmapping of cold partitions.
    pub fn mapping_state(&self) -> (usize, u64) {
        (self.files.iter().filter(|f| f.buffer.is_some()).count(), self.last_used.load(Ordering::Relaxed))
    }

    /// Map the column files (no-op when mapped). The writer maps before every change; readers through
    /// the engine before reading a partition the first time.
    pub fn ensure_mapped(&mut self) -> Result<()> {
        self.open_files()?;
        for f in &mut self.files {
            if f.buffer.is_none() {
                let file = open_rw(&f.path)?;
                f.buffer = Some(map_file(&file, &f.path)?);
            }
        }
        Ok(())
    }

    pub fn is_mapped(&self) -> bool {
        self.opened && self.files.iter().all(|f| f.buffer.is_some())
    }

    /// Re-read the first and last keys from the (mapped) files after a change.
    fn refresh_bounds(&mut self) {
        if self.rows == 0 {
            self.first_key = None;
            self.last_key = None;
            return;
        }
        let v = self.file_view();
        let key = |i: usize| (v.epochs()[i], if self.kind == RecordKind::Variable { v.nanos()[i] } else { 0 });
        self.first_key = Some(key(0));
        self.last_key = Some(key(self.rows - 1));
    }

    /// The current committed view for readers.
    pub fn view(&self) -> PartView {
        let (first, last) = (self.first_key.map(|k| k.0), self.last_key.map(|k| k.0));
        let base = PartView { year: self.year, rows: self.rows, mapped: false, last_used: self.last_used.clone(), first, last, cols: Vec::new(), split: self.rows, tail: Vec::new() };
        if !self.is_mapped() {
            return base;
        }
        let cols: Vec<Buffer> = self.files.iter().map(|f| f.mapped()).collect();
        if !self.hot {
            return PartView { mapped: true, cols, ..base };
        }
        let split = self.rows.saturating_sub(TAIL_ROWS);
        let tail = cols.iter().zip(&self.files).map(|(b, f)| Buffer::from(&b.as_slice()[split * f.width..self.rows * f.width])).collect();
        PartView { mapped: true, cols, split, tail, ..base }
    }

    /// All rows straight from the mapping, as the writer (the only one who modifies them) sees them. Only
    /// after [`Partition::ensure_mapped`].
    fn file_view(&self) -> PartView {
        let (first, last) = (self.first_key.map(|k| k.0), self.last_key.map(|k| k.0));
        let cols = self.files.iter().map(|f| f.mapped()).collect();
        PartView { year: self.year, rows: self.rows, mapped: true, last_used: self.last_used.clone(), first, last, cols, split: self.rows, tail: Vec::new() }
    }

    fn widths(&self) -> Vec<usize> {
        self.types.iter().map(|t| t.width()).collect()
    }

    /// The generation in use.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn gen_dir(&self, g: u64) -> PathBuf {
        self.dir.join(format!("g{g}"))
    }

    fn last_key(&self) -> Option<(i64, i32)> {
        self.last_key
    }

    /// Apply sorted rows (fixed: unique truncated epochs, last write already chosen). Appends when every new
    /// row sorts after the stored ones; otherwise merges copy-on-write. Returns rows added.
    ///
    /// `prepared` is the new generation built by [`Partition::prepare_merge`] before the write was logged,
    /// when the write needs one (built here otherwise, e.g. at replay).
    pub fn apply_rows(&mut self, rows: &Rows, lsn: u64, mut prepared: Option<Generation>) -> Result<()> {
        if rows.len == 0 {
            self.applied_lsn = lsn;
            return Ok(());
        }
        self.ensure_mapped()?;
        self.last_used.store(now_millis(), Ordering::Relaxed);
        let first = (rows.epoch(0), if self.kind == RecordKind::Variable { rows.nanos(0) } else { 0 });
        let in_order = match self.last_key() {
            None => true,
            Some(last) => match self.kind {
                RecordKind::Fixed => first.0 > last.0,
                RecordKind::Variable => first >= last,
            },
        };
        if in_order {
            self.append(rows)?;
        } else if !self.overwrite_tail_in_place(rows)? {
            // The first overwrite near the end copies the partition once and makes it hot, so the next
            // ones (a live feed re-sending its newest bar) are written in place.
            let near_end = self.kind == RecordKind::Fixed && first.0 >= self.file_view().epochs()[self.rows.saturating_sub(TAIL_ROWS)];
            let next_gen = match prepared.take() {
                Some(g) => g,
                None => self.prepare_merge(rows)?,
            };
            self.commit_generation(next_gen);
            self.hot |= near_end;
        }
        self.refresh_bounds();
        self.applied_lsn = lsn;
        Ok(())
    }

    /// Fixed buckets, hot partitions: when every new row either replaces one of the last [`TAIL_ROWS`] rows
    /// or sorts after all of them, the rows to overwrite and where the appended rows start. `None` otherwise.
    fn tail_plan(&self, rows: &Rows) -> Option<(Vec<usize>, usize)> {
        if !self.hot || self.direct_unchecked || self.kind != RecordKind::Fixed || self.rows == 0 || !self.is_mapped() {
            return None;
        }
        let view = self.file_view();
        let stored = view.epochs();
        let floor = self.rows.saturating_sub(TAIL_ROWS);
        let last = stored[self.rows - 1];
        let mut targets = Vec::with_capacity(rows.len);
        let mut appended_from = rows.len;
        for j in 0..rows.len {
            let e = rows.epoch(j);
            if e > last {
                appended_from = j;
                break;
            }
            match stored[floor..].binary_search(&e) {
                Ok(k) => targets.push(floor + k),
                Err(_) => return None, // an insertion between stored rows, or before the tail
            }
        }
        Some((targets, appended_from))
    }

    /// Write the replacements of a hot partition's tail in place and append the rest. False (nothing
    /// written) when the rows do not fit [`Partition::tail_plan`].
    fn overwrite_tail_in_place(&mut self, rows: &Rows) -> Result<bool> {
        let Some((targets, appended_from)) = self.tail_plan(rows) else { return Ok(false) };
        self.open_files()?;
        for (i, f) in self.files.iter().enumerate() {
            let file = open_rw(&f.path)?;
            let src = rows.cols[i].as_slice();
            for (j, &row) in targets.iter().enumerate() {
                file.write_all_at(&src[j * f.width..(j + 1) * f.width], (row * f.width) as u64).map_err(|e| EngineError::io(&f.path, e))?;
            }
        }
        self.dirty = true;
        if appended_from < rows.len {
            let widths = self.widths();
            self.append(&rows.slice(&widths, appended_from, rows.len))?;
        }
        Ok(true)
    }

    fn append(&mut self, rows: &Rows) -> Result<()> {
        self.reserve(rows.len)?;
        for (i, f) in self.files.iter().enumerate() {
            let file = open_rw(&f.path)?;
            file.write_all_at(rows.cols[i].as_slice(), (self.rows * f.width) as u64).map_err(|e| EngineError::io(&f.path, e))?;
        }
        self.rows += rows.len;
        self.dirty = true;
        Ok(())
    }

    /// Make room for `extra` more rows past the visible ones, with the disk blocks allocated
    /// (`fallocate`), so that writing them cannot fail for lack of space. The engine calls this before a
    /// write is logged: a full disk then fails the write cleanly, with nothing logged.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        self.open_files()?;
        let need = self.rows.checked_add(extra).ok_or_else(|| EngineError::InvalidInput("row count overflow".into()))?;
        if need <= self.capacity {
            return Ok(());
        }
        let new_cap = need.max(self.capacity.saturating_mul(2)).max(MIN_CAPACITY_ROWS);
        for f in self.files.iter_mut() {
            let file = open_rw(&f.path)?;
            allocate(&file, &f.path, new_cap * f.width)?;
            if f.buffer.is_some() {
                f.buffer = Some(map_file(&file, &f.path)?);
            }
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// How [`Partition::apply_rows`] would apply `rows`: true when it needs a new generation (a merge), so
    /// the engine prepares that before logging.
    pub fn needs_merge(&self, rows: &Rows) -> bool {
        if rows.len == 0 || self.is_append(rows) {
            return false;
        }
        !self.tail_plan(rows).is_some()
    }

    /// True when `rows` would be a pure append (every row sorts after the stored ones).
    pub fn is_append(&self, rows: &Rows) -> bool {
        if rows.len == 0 {
            return false;
        }
        let first = (rows.epoch(0), if self.kind == RecordKind::Variable { rows.nanos(0) } else { 0 });
        match self.last_key() {
            None => true,
            Some(last) => match self.kind {
                RecordKind::Fixed => first.0 > last.0,
                RecordKind::Variable => first >= last,
            },
        }
    }

    /// Bulk path, step 1: write `rows` past the visible row count and fsync the column files, without
    /// publishing them. Returns what the log record must carry to re-validate the data at replay:
    /// `(generation, start_row, crc32c over the written column bytes)`.
    pub fn stage_direct_append(&mut self, rows: &Rows) -> Result<(u64, usize, u32)> {
        // A bulk append starts from a checkpointed partition, so that replay finds exactly the state it was
        // staged on: the staged rows sit in the files a restart opens, and no earlier record is replayed
        // onto them (replay may take another path than run time did, e.g. a merge for an overwrite that
        // was in place, which would leave the staged rows behind in the old generation).
        self.checkpoint()?;
        let start = self.rows;
        self.reserve(rows.len)?;
        let mut crc = 0u32;
        for (i, f) in self.files.iter().enumerate() {
            let file = open_rw(&f.path)?;
            let bytes = rows.cols[i].as_slice();
            crc = crc32c::crc32c_append(crc, bytes);
            file.write_all_at(bytes, (start * f.width) as u64).map_err(|e| EngineError::io(&f.path, e))?;
            file.sync_data().map_err(|e| EngineError::io(&f.path, e))?;
        }
        Ok((self.generation, start, crc))
    }

    /// Bulk path, step 2 (after the commit record is durable), and replay: make rows `start..start+n`
    /// visible, after checking that they are the bytes the record describes.
    pub fn commit_direct_append(&mut self, generation: u64, start: usize, n: usize, crc: u32, lsn: u64) -> Result<()> {
        if generation != self.generation || start != self.rows {
            return Err(EngineError::Corrupt {
                path: self.dir.display().to_string(),
                reason: format!(
                    "bulk append record (lsn {lsn}) expects generation {generation} at row {start}, partition is generation {} with {} rows",
                    self.generation, self.rows
                ),
            });
        }
        self.open_files()?;
        if start + n > self.capacity {
            return Err(EngineError::Corrupt { path: self.dir.display().to_string(), reason: format!("bulk append record (lsn {lsn}) beyond the column files") });
        }
        self.ensure_mapped()?;
        let mut got = 0u32;
        for f in &self.files {
            got = crc32c::crc32c_append(got, &f.mapped().as_slice()[start * f.width..(start + n) * f.width]);
        }
        if got != crc {
            return Err(EngineError::Corrupt { path: self.dir.display().to_string(), reason: format!("bulk append record (lsn {lsn}): checksum mismatch") });
        }
        self.rows = start + n;
        self.applied_lsn = lsn;
        self.dirty = true;
        self.direct_unchecked = true;
        self.refresh_bounds();
        Ok(())
    }

    /// Write `cols` (already merged) as the next generation's files, fsync'd, without switching to it: the
    /// engine builds it before logging the write (so a full disk fails the write cleanly) and switches with
    /// [`Partition::commit_generation`] once the record is durable. The manifest moves to it at the next
    /// checkpoint; until then a crash restarts from the previous generation and replays the log.
    fn prepare_generation(&self, n: usize, cols: Vec<Vec<u8>>) -> Result<Generation> {
        let g = self.generation + 1;
        let gdir = self.gen_dir(g);
        let _ = fs::remove_dir_all(&gdir);
        let built = (|| {
            fs::create_dir_all(&gdir).map_err(|e| EngineError::io(&gdir, e))?;
            let cap = n.max(MIN_CAPACITY_ROWS);
            let mut files = Vec::with_capacity(cols.len());
            for (i, bytes) in cols.iter().enumerate() {
                let ty = self.types[i];
                let p = gdir.join(col_file_name(i, ty));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&p)
                    .map_err(|e| EngineError::io(&p, e))?;
                allocate(&file, &p, cap * ty.width())?;
                file.write_all_at(bytes, 0).map_err(|e| EngineError::io(&p, e))?;
                file.sync_data().map_err(|e| EngineError::io(&p, e))?;
                let buffer = map_file(&file, &p)?;
                files.push(ColumnFile { path: p, width: ty.width(), buffer: Some(buffer) });
            }
            sync_dir(&gdir)?;
            Ok(Generation { number: g, rows: n, capacity: cap, files })
        })();
        if built.is_err() {
            let _ = fs::remove_dir_all(&gdir);
        }
        built
    }

    /// The new generation a merge of `rows` produces (see [`Partition::prepare_generation`]).
    pub fn prepare_merge(&mut self, rows: &Rows) -> Result<Generation> {
        self.ensure_mapped()?;
        let (n, cols) = self.merged(rows);
        self.prepare_generation(n, cols)
    }

    /// The new generation without the rows of `start..=end`, or `None` when no row is in that range.
    pub fn prepare_delete(&mut self, start: (i64, i32), end: (i64, i32)) -> Result<Option<Generation>> {
        self.ensure_mapped()?;
        let view = self.file_view();
        let e = view.epochs();
        let n: &[i32] = if self.kind == RecordKind::Variable { view.nanos() } else { &[] };
        let key = |i: usize| (e[i], if n.is_empty() { 0 } else { n[i] });
        let picks: Vec<(bool, u32)> =
            (0..self.rows).filter(|&i| !(key(i) >= start && key(i) <= end)).map(|i| (false, i as u32)).collect();
        if picks.len() == self.rows {
            return Ok(None);
        }
        let empty = Rows { len: 0, cols: vec![Buffer::from_vec(Vec::<u8>::new()); self.types.len()] };
        let cols = self.gather(&view, &empty, &picks);
        self.prepare_generation(picks.len(), cols).map(Some)
    }

    /// Switch to a prepared generation (after its log record is durable). The previous generation's files
    /// are unlinked unless the manifest still names them (then at the next checkpoint); mappings held by
    /// readers stay valid either way.
    pub fn commit_generation(&mut self, g: Generation) {
        let old = self.generation;
        self.generation = g.number;
        self.files = g.files;
        self.opened = true;
        self.capacity = g.capacity;
        self.rows = g.rows;
        self.dirty = true;
        // The new files were written whole: nothing a bulk append record checks lives in them.
        self.direct_unchecked = false;
        if old != self.manifest.generation {
            let _ = fs::remove_dir_all(self.gen_dir(old));
        }
        self.refresh_bounds();
    }

    /// Rows `rows` merged into the stored ones: `(row count, column bytes)`.
    fn merged(&self, rows: &Rows) -> (usize, Vec<Vec<u8>>) {
        let view = self.file_view();
        let old_e = view.epochs();
        let old_n: &[i32] = if self.kind == RecordKind::Variable { view.nanos() } else { &[] };
        // Plan: a list of (from_new, index) picks in output order.
        let mut picks: Vec<(bool, u32)> = Vec::with_capacity(self.rows + rows.len);
        let (mut i, mut j) = (0usize, 0usize);
        while i < self.rows || j < rows.len {
            if j >= rows.len {
                picks.push((false, i as u32));
                i += 1;
                continue;
            }
            if i >= self.rows {
                picks.push((true, j as u32));
                j += 1;
                continue;
            }
            match self.kind {
                RecordKind::Fixed => {
                    let (a, b) = (old_e[i], rows.epoch(j));
                    if a < b {
                        picks.push((false, i as u32));
                        i += 1;
                    } else if a > b {
                        picks.push((true, j as u32));
                        j += 1;
                    } else {
                        // Same interval: the new row replaces the stored one.
                        picks.push((true, j as u32));
                        i += 1;
                        j += 1;
                    }
                }
                RecordKind::Variable => {
                    // Stored rows first on ties: ticks keep arrival order.
                    if (old_e[i], old_n[i]) <= (rows.epoch(j), rows.nanos(j)) {
                        picks.push((false, i as u32));
                        i += 1;
                    } else {
                        picks.push((true, j as u32));
                        j += 1;
                    }
                }
            }
        }
        let cols = self.gather(&view, rows, &picks);
        (picks.len(), cols)
    }

    fn gather(&self, view: &PartView, rows: &Rows, picks: &[(bool, u32)]) -> Vec<Vec<u8>> {
        self.types
            .iter()
            .enumerate()
            .map(|(c, ty)| {
                let w = ty.width();
                let old = &view.cols[c].as_slice()[..view.rows * w];
                let new = rows.cols[c].as_slice();
                let mut out = Vec::with_capacity(picks.len() * w);
                for &(from_new, idx) in picks {
                    let k = idx as usize * w;
                    let src = if from_new { &new[k..k + w] } else { &old[k..k + w] };
                    out.extend_from_slice(src);
                }
                out
            })
            .collect()
    }

    /// Delete stored rows with `start <= (Epoch, Nanoseconds) <= end` (at replay; the engine prepares the
    /// generation before logging at run time). Returns rows removed.
    pub fn delete_range(&mut self, start: (i64, i32), end: (i64, i32), lsn: u64) -> Result<usize> {
        let before = self.rows;
        if let Some(g) = self.prepare_delete(start, end)? {
            self.commit_generation(g);
        }
        self.applied_lsn = lsn;
        Ok(before - self.rows)
    }

    /// Make appended rows durable and record the applied LSN (checkpoint).
    pub fn checkpoint(&mut self) -> Result<()> {
        if !self.dirty && self.manifest.applied_lsn == self.applied_lsn && self.manifest.rows == self.rows && self.manifest.generation == self.generation {
            return Ok(());
        }
        // Files never checked were never written: nothing of theirs to make durable.
        if self.opened {
            for f in &self.files {
                open_rw(&f.path)?.sync_data().map_err(|e| EngineError::io(&f.path, e))?;
            }
        }
        let m = Manifest { generation: self.generation, rows: self.rows, applied_lsn: self.applied_lsn, first: self.first_key, last: self.last_key };
        write_manifest(&self.dir, &m)?;
        let old = std::mem::replace(&mut self.manifest, m).generation;
        if old != self.generation {
            let _ = fs::remove_dir_all(self.gen_dir(old));
        }
        self.dirty = false;
        self.direct_unchecked = false;
        Ok(())
    }

    /// Record kind of the bucket.
    pub fn kind(&self) -> RecordKind {
        self.kind
    }

    /// The durable state (what `manifest.json` holds).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
}

/// Refuse manifests whose numbers no partition can have (they bound arithmetic later).
fn check_manifest(m: &Manifest, path: &Path) -> Result<()> {
    if m.rows > MAX_ROWS || m.applied_lsn > super::wal::MAX_LSN {
        return Err(EngineError::Corrupt { path: path.display().to_string(), reason: format!("implausible rows {} or applied_lsn {}", m.rows, m.applied_lsn) });
    }
    Ok(())
}

/// Atomically replace `manifest.json` (write temp, fsync, rename, fsync directory).
fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let tmp = dir.join("manifest.json.tmp");
    let text = serde_json::to_vec(m).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
    {
        let mut f = File::create(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
        use std::io::Write;
        f.write_all(&text).map_err(|e| EngineError::io(&tmp, e))?;
        f.sync_all().map_err(|e| EngineError::io(&tmp, e))?;
    }
    fs::rename(&tmp, dir.join("manifest.json")).map_err(|e| EngineError::io(dir, e))?;
    sync_dir(dir)
}
