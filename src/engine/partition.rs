//! One year of one bucket: Arrow's own buffers, one memory-mapped file each, per column.
//!
//! Writers own [`Partition`] (only the engine's writer thread touches it); readers get [`PartView`]s:
//! immutable `(row count, column buffers)` pairs whose buffers point into the mapped files.
//!
//! A column is the files of its Arrow layout in the generation directory: `c<i>.<type>` holds the values
//! (fixed-width types) or the `n + 1` offsets (`utf8`, `large_utf8`, `binary`, whose bytes are in
//! `c<i>.data`), and a nullable column gets `c<i>.valid`, its validity bitmap (LSB first, as Arrow), once
//! the partition receives its first null; until then the column has no nulls in that partition and no
//! bitmap, exactly as an Arrow array without a validity buffer. The manifest lists which columns have one.
//!
//! - In-order appends write past the committed row count with `pwrite` (files grow by doubling with
//!   `fallocate`, never shrink), then publish a view with the larger count. Readers of older views never look
//!   past their own count, so they are unaffected (a bitmap's last byte is rewritten with the same bits
//!   for the rows a view can see).
//! - Out-of-order writes, overwrites and range deletes build a new generation directory `g<N+1>`, fsync it,
//!   switch the manifest by rename, then publish. The old generation's files are unlinked; mappings held by
//!   readers stay valid (a mapped file is never truncated).
//! - Live feeds re-send the newest bars; copying a year to replace its last bar would cost O(partition) per
//!   write. So after the first such overwrite the partition turns *hot*: every view it publishes from then
//!   on takes its last [`TAIL_ROWS`] rows from heap copies instead of the mapping, and later overwrites of
//!   rows within the last [`TAIL_ROWS`] are written in place with `pwrite`. No view ever reads those bytes
//!   from the mapping (a view's mapped region ends `TAIL_ROWS` before its own row count, and row counts only
//!   grow within a generation), so snapshots stay consistent. The log holds every overwrite, and replaying
//!   one in place is idempotent. Buckets with variable-length columns never turn hot (a value's length may
//!   change); their overwrites merge.
//! - Files are mapped lazily: a partition is mapped when it is first read or written, so a catalog with
//!   decades of history starts without mapping it; past a budget (half of `vm.max_map_count` by default)
//!   the engine unmaps the least recently used partitions, and their next use maps them again.
//! - The manifest (`manifest.json`) records the generation, the durable row count and the last applied log
//!   sequence number; replay applies only records after it, so no write is applied twice.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::cell::OnceCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use arrow::array::{make_array, Array, ArrayData, ArrayRef, AsArray, MutableArrayData};
use arrow::buffer::{BooleanBuffer, Buffer};
use arrow::datatypes::{self as adt};
use arrow::util::bit_util;
use serde::{Deserialize, Serialize};

use super::error::{EngineError, Result};
use super::types::{ColumnDef, ColumnType, RecordKind};
use super::wal::sync_dir;

/// Most rows a partition can hold (a year of nanosecond ticks would be 3e16; this bounds arithmetic on
/// row counts read from disk).
const MAX_ROWS: usize = 1 << 48;

/// Initial capacity of a new column file, in rows.
const MIN_CAPACITY_ROWS: usize = 1024;

/// Initial capacity of a new data file (variable-length column), in bytes.
const MIN_DATA_BYTES: usize = 16 << 10;

/// Rows at the end of a hot partition that views copy to the heap and writers may overwrite in place.
pub const TAIL_ROWS: usize = 128;

/// The newest partition format this build reads: 1 = fixed-width columns only (every release before
/// validity bitmaps and variable-length columns), 2 = validity bitmaps and offsets + data files.
pub const FORMAT: u32 = 2;

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
    /// Partition format ([`FORMAT`]); absent (1) when the partition uses nothing newer.
    #[serde(default, skip_serializing_if = "is_format_1")]
    pub format: u32,
    /// Physical columns that have a validity bitmap in this generation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validity: Vec<u32>,
}

fn is_format_1(f: &u32) -> bool {
    *f <= 1
}

impl Manifest {
    /// An empty partition's manifest.
    pub fn empty() -> Manifest {
        Manifest { generation: 0, rows: 0, applied_lsn: 0, first: None, last: None, format: 0, validity: Vec::new() }
    }
}

/// How one physical column is stored: its type and whether it may hold nulls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub ty: ColumnType,
    pub nullable: bool,
    /// The column's file index: its files are `c<file>.*`. Stable across schema changes (a dropped column's
    /// index is never reused by a live column), equal to the column's position for every bucket whose
    /// schema never changed.
    pub file: u32,
}

/// Physical layouts of a bucket: Epoch, [Nanoseconds], then the data columns.
pub fn physical_layouts(kind: RecordKind, data: &[ColumnDef]) -> Vec<Layout> {
    let mut v = vec![Layout { ty: ColumnType::I64, nullable: false, file: 0 }];
    if kind == RecordKind::Variable {
        v.push(Layout { ty: ColumnType::I32, nullable: false, file: 1 });
    }
    let base = v.len() as u32;
    v.extend(data.iter().zip(base..).map(|(c, pos)| Layout { ty: c.ty, nullable: c.nullable, file: c.file.unwrap_or(pos) }));
    v
}

/// Rows to add to a partition, already validated, normalized and sorted: one array per physical column
/// (Epoch, [Nanoseconds], data columns) in its storage type ([`ColumnType::storage_type`]), often the
/// incoming Arrow array itself.
#[derive(Debug, Clone)]
pub struct Rows {
    pub len: usize,
    pub cols: Vec<ArrayRef>,
}

impl Rows {
    /// Rows `lo..hi` (zero-copy).
    pub fn slice(&self, lo: usize, hi: usize) -> Rows {
        Rows { len: hi - lo, cols: self.cols.iter().map(|c| c.slice(lo, hi - lo)).collect() }
    }

    pub fn epoch(&self, i: usize) -> i64 {
        self.cols[0].as_primitive::<adt::Int64Type>().value(i)
    }
    pub fn nanos(&self, i: usize) -> i32 {
        self.cols[1].as_primitive::<adt::Int32Type>().value(i)
    }

    /// Bytes of column data the rows carry (values, offsets, string bytes, bitmaps), for write limits and
    /// queue accounting.
    pub fn byte_len(&self) -> usize {
        self.cols.iter().map(|c| array_bytes(c.as_ref())).sum()
    }

    /// True when any column holds a null.
    pub fn has_nulls(&self) -> bool {
        self.cols.iter().any(|c| c.null_count() > 0)
    }
}

/// Logical bytes of an array's rows (not of the buffers it shares).
fn array_bytes(a: &dyn Array) -> usize {
    let d = a.to_data();
    let bits = if a.null_count() > 0 { a.len().div_ceil(8) } else { 0 };
    let w = match d.data_type() {
        adt::DataType::Utf8 | adt::DataType::Binary => {
            let o = d.buffers()[0].typed_data::<i32>();
            return (a.len() + 1) * 4 + (o[d.offset() + a.len()] - o[d.offset()]).max(0) as usize + bits;
        }
        adt::DataType::LargeUtf8 => {
            let o = d.buffers()[0].typed_data::<i64>();
            return (a.len() + 1) * 8 + (o[d.offset() + a.len()] - o[d.offset()]).max(0) as usize + bits;
        }
        adt::DataType::FixedSizeBinary(w) => *w as usize,
        dt => dt.primitive_width().unwrap_or(8),
    };
    a.len() * w + bits
}

/// The buffers of one physical column in a view: the mapped values (or offsets), the mapped validity
/// bitmap when the partition has one for it, and the mapped data of a variable-length column.
#[derive(Debug, Clone)]
pub struct ColBufs {
    pub values: Buffer,
    pub validity: Option<Buffer>,
    pub data: Option<Buffer>,
    /// The files behind `values`, `validity`, `data` (for same-host readers that map them themselves).
    pub ids: [Option<Arc<FileId>>; 3],
}

/// Rows of a view to read: over the mapped files, or over a hot partition's heap tail.
pub enum Piece<'a> {
    Mapped(&'a [ColBufs]),
    Tail(&'a [ArrayRef]),
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
    /// Layout of each physical column.
    pub layouts: Arc<Vec<Layout>>,
    /// One entry per physical column over the mapped files; only rows `0..split` may be read from them.
    pub cols: Vec<ColBufs>,
    pub split: usize,
    /// One storage array per physical column holding rows `split..rows`.
    pub tail: Vec<ArrayRef>,
}

impl PartView {
    /// Record a use by a reader now.
    pub fn touch(&self) {
        self.last_used.store(now_millis(), Ordering::Relaxed);
    }

    /// Epoch of row `i`.
    pub fn epoch(&self, i: usize) -> i64 {
        if i < self.split { typed::<i64>(&self.cols[0].values, self.split)[i] } else { self.tail[0].as_primitive::<adt::Int64Type>().value(i - self.split) }
    }

    /// Nanoseconds of row `i` (variable buckets only).
    pub fn nanos_at(&self, i: usize) -> i32 {
        if i < self.split { typed::<i32>(&self.cols[1].values, self.split)[i] } else { self.tail[1].as_primitive::<adt::Int32Type>().value(i - self.split) }
    }

    /// Rows `lo..hi` as `(piece, first row in it, row count)`: one or two (mapped, heap).
    pub fn pieces(&self, lo: usize, hi: usize) -> Vec<(Piece<'_>, usize, usize)> {
        let mut out = Vec::with_capacity(2);
        if lo < self.split {
            let h = hi.min(self.split);
            out.push((Piece::Mapped(self.cols.as_slice()), lo, h - lo));
        }
        if hi > self.split {
            let l = lo.max(self.split);
            out.push((Piece::Tail(self.tail.as_slice()), l - self.split, hi - l));
        }
        out
    }

    /// Every stored Epoch; only for dense views (`split == rows`), i.e. the writer's own.
    fn epochs(&self) -> &[i64] {
        typed::<i64>(&self.cols[0].values, self.rows)
    }

    fn nanos(&self) -> &[i32] {
        typed::<i32>(&self.cols[1].values, self.rows)
    }

    /// Physical column `c`, rows `lo..lo+len` of the mapped region, as a storage array (zero-copy).
    pub fn storage(&self, c: usize, lo: usize, len: usize) -> Result<ArrayRef> {
        storage_array(self.layouts[c], &self.cols[c], lo, len)
    }
}

fn typed<T: arrow::datatypes::ArrowNativeType>(b: &Buffer, rows: usize) -> &[T] {
    let s: &[T] = b.typed_data::<T>();
    &s[..rows.min(s.len())]
}

/// Rows `lo..lo+len` of one column's buffers as an array of its storage type, without copying. The
/// offsets and UTF-8 of variable-length columns are validated (a damaged file is an error, never
/// undefined behaviour).
pub(crate) fn storage_array(layout: Layout, bufs: &ColBufs, lo: usize, len: usize) -> Result<ArrayRef> {
    let mut b = ArrayData::builder(layout.ty.storage_type()).len(len).offset(lo).add_buffer(bufs.values.clone());
    if let Some(d) = &bufs.data {
        b = b.add_buffer(d.clone());
    }
    if let Some(v) = &bufs.validity {
        b = b.null_bit_buffer(Some(v.clone()));
    }
    let data = b.build().map_err(|e| EngineError::Corrupt { path: "(mapped column)".into(), reason: format!("column files do not form an Arrow array: {e}") })?;
    Ok(make_array(data))
}

/// A copy of an array on the heap (hot tails must not point into bytes that change in place).
fn deep_copy(a: &ArrayRef) -> Option<ArrayRef> {
    let d = a.to_data();
    let mut m = MutableArrayData::new(vec![&d], false, a.len());
    m.try_extend(0, 0, a.len()).ok()?;
    Some(make_array(m.freeze()))
}

/// Bulk path: write `bytes` at `at` into the values file at `path` and fsync it; the bytes' crc32c.
fn stage_column(path: &Path, bytes: &[u8], at: usize) -> Result<u32> {
    let crc = crc32c::crc32c(bytes);
    let file = open_rw(path)?;
    file.write_all_at(bytes, at as u64).and_then(|_| file.sync_data()).map_err(|e| EngineError::io(path, e))?;
    Ok(crc)
}

/// One mapped file of a column.
struct Plane {
    path: PathBuf,
    /// `None` until the partition is first read or written.
    buffer: Option<Buffer>,
    /// The mapped file's identity (set with `buffer`).
    id: Option<Arc<FileId>>,
    /// The file, kept open from its first write until the partition's next checkpoint (within
    /// [`held_files_max`]), so that a small append costs one `pwrite` per column, not `open` + `pwrite` +
    /// `close`.
    held: OnceCell<HeldFile>,
}

/// Descriptors held by planes across the process ([`HeldFile`]).
static HELD_FILES: AtomicUsize = AtomicUsize::new(0);

/// Most descriptors planes hold at once: a quarter of the soft open-file limit, at most 4,096. Past it a
/// plane opens its file per write, so thousands of buckets never exhaust the limit (MarketStore #183); the
/// checkpoint releases what the partitions written since the last one hold.
fn held_files_max() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct it is given.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 { lim.rlim_cur } else { 1024 };
        usize::try_from(soft / 4).unwrap_or(usize::MAX).min(4096)
    })
}

/// An open plane file counted in [`HELD_FILES`] for as long as it lives.
struct HeldFile(File);

impl HeldFile {
    /// `file` as a held descriptor, when the process holds fewer than [`held_files_max`].
    fn take(file: File) -> std::result::Result<HeldFile, File> {
        match HELD_FILES.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < held_files_max()).then_some(n + 1)) {
            Ok(_) => Ok(HeldFile(file)),
            Err(_) => Err(file),
        }
    }
}

impl Drop for HeldFile {
    fn drop(&mut self) {
        HELD_FILES.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A plane's file for one operation: its held descriptor, or one opened for the operation alone.
enum FileRef<'a> {
    Held(&'a File),
    Opened(File),
}

impl std::ops::Deref for FileRef<'_> {
    type Target = File;
    fn deref(&self) -> &File {
        match self {
            FileRef::Held(f) => f,
            FileRef::Opened(f) => f,
        }
    }
}

/// Which file a mapped buffer came from: its path and inode. A same-host reader ([`crate::engine::Engine::local_read`])
/// opens the path and keeps the file only if it is this inode, i.e. the file of the view it was given (a
/// newer generation's file at a reused path would be another inode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileId {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    fn of(file: &File, path: &Path) -> Result<Arc<FileId>> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata().map_err(|e| EngineError::io(path, e))?;
        Ok(Arc::new(FileId { path: path.to_path_buf(), dev: m.dev(), ino: m.ino() }))
    }
}

impl Plane {
    fn new(path: PathBuf) -> Plane {
        Plane { path, buffer: None, id: None, held: OnceCell::new() }
    }
    fn mapped(&self) -> Buffer {
        self.buffer.clone().unwrap_or_else(|| Buffer::from_vec(Vec::<u64>::new()))
    }
    /// The plane's file: the held descriptor, or one opened now — held from now on when `hold` and the
    /// budget allows (writes hold, reads do not).
    fn file(&self, hold: bool) -> Result<FileRef<'_>> {
        if let Some(h) = self.held.get() {
            return Ok(FileRef::Held(&h.0));
        }
        let file = open_rw(&self.path)?;
        if !hold {
            return Ok(FileRef::Opened(file));
        }
        Ok(match HeldFile::take(file) {
            Ok(h) => FileRef::Held(&self.held.get_or_init(|| h).0),
            Err(file) => FileRef::Opened(file),
        })
    }
    /// Close the held descriptor (at a checkpoint: the partition may not be written again for long).
    fn release(&mut self) {
        self.held.take();
    }
    fn map(&mut self) -> Result<()> {
        if self.buffer.is_none() {
            let (buffer, id) = {
                let file = self.file(false)?;
                (map_file(&file, &self.path)?, FileId::of(&file, &self.path)?)
            };
            self.buffer = Some(buffer);
            self.id = Some(id);
        }
        Ok(())
    }
    /// Grow to at least `len` bytes (blocks allocated), remapping when mapped.
    fn grow(&mut self, len: usize) -> Result<()> {
        let remapped = {
            let file = self.file(true)?;
            allocate(&file, &self.path, len)?;
            match self.buffer {
                Some(_) => Some((map_file(&file, &self.path)?, FileId::of(&file, &self.path)?)),
                None => None,
            }
        };
        if let Some((buffer, id)) = remapped {
            self.buffer = Some(buffer);
            self.id = Some(id);
        }
        Ok(())
    }
    fn write_at(&self, bytes: &[u8], at: usize) -> Result<()> {
        self.file(true)?.write_all_at(bytes, at as u64).map_err(|e| EngineError::io(&self.path, e))
    }
    fn read_at(&self, buf: &mut [u8], at: usize) -> Result<()> {
        self.file(true)?.read_exact_at(buf, at as u64).map_err(|e| EngineError::io(&self.path, e))
    }
    fn sync(&self) -> Result<()> {
        self.file(false)?.sync_data().map_err(|e| EngineError::io(&self.path, e))
    }
    fn len(&self) -> Result<usize> {
        fs::metadata(&self.path).map(|m| m.len() as usize).map_err(|e| EngineError::io(&self.path, e))
    }
}

/// The files of one physical column. A mapping outlives its descriptor, so descriptors are held only
/// between a write and the partition's next checkpoint, within a process-wide budget ([`held_files_max`]):
/// thousands of buckets never exhaust the process's open-file limit (MarketStore #183).
struct ColumnFile {
    layout: Layout,
    values: Plane,
    validity: Option<Plane>,
    data: Option<Plane>,
    /// Bytes of the data file in use (the offset after the last row); variable-length columns only.
    data_len: usize,
    /// Bytes the data file holds (allocated).
    data_cap: usize,
}

impl ColumnFile {
    fn new(gdir: &Path, layout: Layout, validity: bool) -> ColumnFile {
        let (values, valid, data) = column_file_names(layout);
        ColumnFile {
            layout,
            values: Plane::new(gdir.join(values)),
            validity: validity.then(|| Plane::new(gdir.join(valid))),
            data: data.map(|d| Plane::new(gdir.join(d))),
            data_len: 0,
            data_cap: 0,
        }
    }

    fn width(&self) -> usize {
        self.layout.ty.width()
    }

    /// Bytes of the values file holding `rows` rows (offsets files hold one more entry).
    fn values_bytes(&self, rows: usize) -> Option<usize> {
        let n = if self.layout.ty.is_var() { rows.checked_add(1)? } else { rows };
        n.checked_mul(self.width())
    }

    /// Rows the values file can hold.
    fn rows_in(&self, values_len: usize) -> usize {
        let n = values_len / self.width();
        if self.layout.ty.is_var() { n.saturating_sub(1) } else { n }
    }

    fn planes(&self) -> impl Iterator<Item = &Plane> {
        std::iter::once(&self.values).chain(self.validity.as_ref()).chain(self.data.as_ref())
    }

    fn planes_mut(&mut self) -> impl Iterator<Item = &mut Plane> {
        std::iter::once(&mut self.values).chain(self.validity.as_mut()).chain(self.data.as_mut())
    }

    fn bufs(&self) -> ColBufs {
        ColBufs {
            values: self.values.mapped(),
            validity: self.validity.as_ref().map(Plane::mapped),
            data: self.data.as_ref().map(Plane::mapped),
            ids: [self.values.id.clone(), self.validity.as_ref().and_then(|p| p.id.clone()), self.data.as_ref().and_then(|p| p.id.clone())],
        }
    }

    fn is_mapped(&self) -> bool {
        self.planes().all(|p| p.buffer.is_some())
    }

    /// The offset stored for row boundary `i` of a variable-length column (from the file).
    fn offset_at(&self, i: usize) -> Result<usize> {
        let w = self.width();
        let mut b = [0u8; 8];
        read_at(&self.values.path, &mut b[..w], i * w)?;
        let v = if w == 4 { i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64 } else { i64::from_le_bytes(b) };
        usize::try_from(v).map_err(|_| EngineError::Corrupt { path: self.values.path.display().to_string(), reason: format!("negative offset {v}") })
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

fn create_rw(path: &Path, truncate: bool) -> Result<File> {
    OpenOptions::new().read(true).write(true).create(true).truncate(truncate).open(path).map_err(|e| EngineError::io(path, e))
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

/// Little-endian value bytes of rows of a fixed-width storage array (shared with the array).
fn value_bytes(a: &ArrayRef, width: usize) -> Buffer {
    let d = a.to_data();
    d.buffers()[0].slice_with_length(d.offset() * width, d.len() * width)
}

/// The offsets of a variable-length storage array shifted so its first row starts at `base`, as the
/// `len` little-endian entries after the first (`skip_first`) or all `len + 1`; and its bytes.
fn var_parts(a: &ArrayRef, base: usize, skip_first: bool) -> Result<(Vec<u8>, Buffer)> {
    let d = a.to_data();
    let n = d.len();
    let from = if skip_first { 1 } else { 0 };
    let (offs, first, last): (Vec<u8>, usize, usize) = match d.data_type() {
        adt::DataType::LargeUtf8 => {
            let o = &d.buffers()[0].typed_data::<i64>()[d.offset()..=d.offset() + n];
            let (f, l) = (o[0] as usize, o[n] as usize);
            let shift = base as i64 - o[0];
            (o[from..].iter().flat_map(|v| (v + shift).to_le_bytes()).collect(), f, l)
        }
        _ => {
            let o = &d.buffers()[0].typed_data::<i32>()[d.offset()..=d.offset() + n];
            let (f, l) = (o[0] as usize, o[n] as usize);
            let shift = base as i64 - o[0] as i64;
            let mut v = Vec::with_capacity((n + 1 - from) * 4);
            for x in &o[from..] {
                let s = i32::try_from(*x as i64 + shift).map_err(|_| {
                    EngineError::InvalidInput("a year partition of a utf8 or binary column holds at most 2 GiB of data (use large_utf8)".into())
                })?;
                v.extend_from_slice(&s.to_le_bytes());
            }
            (v, f, l)
        }
    };
    Ok((offs, d.buffers()[1].slice_with_length(first, last - first)))
}

/// True when every row of `rows` (sorted) goes after a row keyed `last`: fixed buckets hold one row per
/// interval, so the first new one must be later; ticks at the same time keep arrival order.
fn sorts_after(kind: RecordKind, last: (i64, i32), rows: &Rows) -> bool {
    match kind {
        RecordKind::Fixed => rows.epoch(0) > last.0,
        RecordKind::Variable => (rows.epoch(0), rows.nanos(0)) >= last,
    }
}

/// Appends to one partition logged in the current group but not applied yet: what a further append in
/// the same group must reserve room after ([`Partition::reserve_after`]).
#[derive(Debug, Clone, Default)]
pub struct Ahead {
    pub year: i32,
    /// Rows of those appends, and bytes of variable-length data per physical column.
    pub rows: usize,
    pub data: Vec<usize>,
    /// `(Epoch, Nanoseconds)` of their last row.
    pub last: (i64, i32),
}

impl Ahead {
    /// Whether `rows` (sorted, non-empty) go after these appends.
    pub fn followed_by(&self, kind: RecordKind, rows: &Rows) -> bool {
        rows.len > 0 && sorts_after(kind, self.last, rows)
    }

    /// These appends and then `rows` (of a partition whose physical columns are `layouts`).
    pub fn then(&self, kind: RecordKind, layouts: &[Layout], rows: &Rows) -> Ahead {
        let data = rows
            .cols
            .iter()
            .zip(layouts)
            .enumerate()
            .map(|(i, (c, l))| self.data.get(i).copied().unwrap_or(0) + if l.ty.is_var() { var_data_len(c) } else { 0 })
            .collect();
        let last_row = rows.len - 1;
        let last = (rows.epoch(last_row), if kind == RecordKind::Variable { rows.nanos(last_row) } else { 0 });
        Ahead { year: self.year, rows: self.rows + rows.len, data, last }
    }
}

/// Bytes of variable-length data rows of `a` carry.
fn var_data_len(a: &ArrayRef) -> usize {
    let d = a.to_data();
    let n = d.len();
    match d.data_type() {
        adt::DataType::LargeUtf8 => {
            let o = &d.buffers()[0].typed_data::<i64>()[d.offset()..=d.offset() + n];
            (o[n] - o[0]) as usize
        }
        _ => {
            let o = &d.buffers()[0].typed_data::<i32>()[d.offset()..=d.offset() + n];
            (o[n] - o[0]) as usize
        }
    }
}

/// The validity bits of `a` (all set when it has no nulls).
fn validity_bits(a: &ArrayRef) -> BooleanBuffer {
    match a.nulls() {
        Some(n) => n.inner().clone(),
        None => BooleanBuffer::new_set(a.len()),
    }
}

/// Write `bits` into the bitmap file `plane` starting at bit `at`, keeping the bits before `at` in the
/// first byte (read from `old`, the plane's current mapping).
fn write_bits(plane: &Plane, at: usize, bits: &BooleanBuffer) -> Result<()> {
    if bits.is_empty() {
        return Ok(());
    }
    let first = at / 8;
    let keep = at % 8;
    let mut b = arrow::array::BooleanBufferBuilder::new(keep + bits.len());
    if keep > 0 {
        let mut byte = [0u8; 1];
        plane.read_at(&mut byte, first)?;
        for k in 0..keep {
            b.append(bit_util::get_bit(&byte, k));
        }
    }
    b.append_buffer(bits);
    let out = b.finish();
    plane.write_at(&out.inner().as_slice()[..(keep + bits.len()).div_ceil(8)], first)
}

/// Set or clear one bit of a bitmap file (an in-place overwrite of a hot tail row).
fn write_bit(plane: &Plane, at: usize, valid: bool) -> Result<()> {
    let mut byte = [0u8; 1];
    plane.read_at(&mut byte, at / 8)?;
    if valid {
        bit_util::set_bit(&mut byte, at % 8);
    } else {
        bit_util::unset_bit(&mut byte, at % 8);
    }
    plane.write_at(&byte, at / 8)
}

/// Writer-side state of one partition.
pub struct Partition {
    pub year: i32,
    dir: PathBuf,
    kind: RecordKind,
    layouts: Arc<Vec<Layout>>,
    manifest: Manifest,
    /// The generation in use; newer than the manifest's between a merge and the next checkpoint.
    generation: u64,
    /// Rows every values (and validity) file can hold.
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
    /// A file was created in the generation directory since the last checkpoint (its entry needs an fsync
    /// of the directory).
    created_files: bool,
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
    /// Generations replaced since the last publish of the bucket's view: their directories are removed
    /// only once no published view names them ([`Partition::remove_retired`]), so a same-host reader that
    /// opens the files of the current view never finds them gone.
    retired: Vec<u64>,
}

/// The file names of one physical column in a generation directory: values (or offsets), validity,
/// and data for variable-length columns. The one place that names column files (tools and tests too).
pub fn column_file_names(layout: Layout) -> (String, String, Option<String>) {
    let i = layout.file;
    (format!("c{i:03}.{}", layout.ty.file_suffix()), format!("c{i:03}.valid"), layout.ty.is_var().then(|| format!("c{i:03}.data")))
}

fn map_file(file: &File, path: &Path) -> Result<Buffer> {
    let len = file.metadata().map_err(|e| EngineError::io(path, e))?.len() as usize;
    if len == 0 {
        return Ok(Buffer::from_vec(Vec::<u64>::new()));
    }
    // SAFETY: the file is only ever grown (set_len upward) or unlinked, never truncated, so the mapping stays
    // valid for its lifetime. Bytes change in place only in the tail of a hot partition, which no view reads
    // from the mapping, and in bits of a bitmap's last byte past every view's rows (module docs).
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
    pub fn open(dir: &Path, year: i32, kind: RecordKind, layouts: Arc<Vec<Layout>>) -> Result<Self> {
        Self::open_with(dir, year, kind, layouts, true)
    }

    /// Open an existing partition at start-up: a missing manifest is damage, not a new partition.
    pub fn load(dir: &Path, year: i32, kind: RecordKind, layouts: Arc<Vec<Layout>>) -> Result<Self> {
        Self::open_with(dir, year, kind, layouts, false)
    }

    fn open_with(dir: &Path, year: i32, kind: RecordKind, layouts: Arc<Vec<Layout>>, create: bool) -> Result<Self> {
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
            check_manifest(&m, &mpath, &layouts)?;
            m
        } else {
            fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
            let m = Manifest::empty();
            write_manifest(dir, &m)?;
            m
        };
        Self::with_manifest(dir, year, kind, layouts, manifest)
    }

    /// A partition whose manifest is already known (the catalog snapshot holds it): nothing is read unless
    /// the manifest predates first/last keys.
    pub fn from_manifest(dir: &Path, year: i32, kind: RecordKind, layouts: Arc<Vec<Layout>>, manifest: Manifest) -> Result<Self> {
        check_manifest(&manifest, &dir.join("manifest.json"), &layouts)?;
        Self::with_manifest(dir, year, kind, layouts, manifest)
    }

    fn with_manifest(dir: &Path, year: i32, kind: RecordKind, layouts: Arc<Vec<Layout>>, manifest: Manifest) -> Result<Self> {
        // The column files are described when first opened ([`Partition::open_files`]): a catalog of many
        // thousands of partitions holds no per-column paths it never uses.
        let (first_key, last_key) = (manifest.first, manifest.last);
        let mut p = Partition {
            year,
            dir: dir.to_path_buf(),
            kind,
            layouts,
            generation: manifest.generation,
            rows: manifest.rows,
            applied_lsn: manifest.applied_lsn,
            manifest,
            capacity: 0,
            files: Vec::new(),
            opened: false,
            dirty: false,
            created_files: false,
            hot: false,
            direct_unchecked: false,
            first_key,
            last_key,
            last_used: Arc::new(AtomicU64::new(now_millis())),
            retired: Vec::new(),
        };
        // Older manifests do not carry the bounds: read them from the column files now.
        if p.rows > 0 && (p.first_key.is_none() || p.last_key.is_none()) {
            p.open_files()?;
        }
        Ok(p)
    }

    fn has_var(&self) -> bool {
        self.layouts.iter().any(|l| l.ty.is_var())
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
            let with_validity = |l: &Layout| self.manifest.validity.contains(&l.file);
            self.files = self.layouts.iter().map(|l| ColumnFile::new(&gdir, *l, with_validity(l))).collect();
            // A bitmap the manifest does not list was made after the last checkpoint: replay makes it again.
            for f in &self.files {
                if f.validity.is_none() {
                    let _ = fs::remove_file(gdir.join(column_file_names(f.layout).1));
                }
            }
        }
        let rows = self.rows;
        let mut capacity = usize::MAX;
        for f in self.files.iter_mut() {
            let file = if rows == 0 { create_rw(&f.values.path, false)? } else { open_rw(&f.values.path)? };
            let mut len = file.metadata().map_err(|e| EngineError::io(&f.values.path, e))?.len() as usize;
            if rows == 0 && f.layout.ty.is_var() && len < f.width() {
                // An empty offsets file still holds its first offset (0).
                allocate(&file, &f.values.path, f.width())?;
                len = f.width();
            }
            let short = |path: &Path, len: usize| EngineError::Corrupt { path: path.display().to_string(), reason: format!("file holds {len} bytes, manifest says {rows} rows") };
            if f.values_bytes(rows).is_none_or(|need| len < need) {
                return Err(short(&f.values.path, len));
            }
            capacity = capacity.min(f.rows_in(len));
            if let Some(v) = &f.validity {
                let vlen = v.len()?;
                if vlen < rows.div_ceil(8) {
                    return Err(short(&v.path, vlen));
                }
                capacity = capacity.min(vlen.saturating_mul(8));
            }
            if let Some(d) = &f.data {
                if rows == 0 {
                    create_rw(&d.path, false)?;
                }
                let dlen = d.len()?;
                f.data_len = if rows == 0 { 0 } else { f.offset_at(rows)? };
                if dlen < f.data_len {
                    return Err(EngineError::Corrupt { path: d.path.display().to_string(), reason: format!("file holds {dlen} bytes, offsets say {}", f.data_len) });
                }
                f.data_cap = dlen;
            }
        }
        self.capacity = if capacity == usize::MAX { 0 } else { capacity };
        // Files of an empty partition may have been created just now: their entries become durable with
        // the directory's fsync at the checkpoint that first counts rows in them.
        self.created_files |= rows == 0;
        if self.rows > 0 && (self.first_key.is_none() || self.last_key.is_none()) {
            let key_at = |i: usize| -> Result<(i64, i32)> {
                let mut e = [0u8; 8];
                read_at(&self.files[0].values.path, &mut e, i * 8)?;
                let mut n = [0u8; 4];
                if self.kind == RecordKind::Variable {
                    read_at(&self.files[1].values.path, &mut n, i * 4)?;
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
        let mut n = 0;
        for f in &mut self.files {
            for p in f.planes_mut() {
                if p.buffer.take().is_some() {
                    n += 1;
                }
            }
        }
        n
    }

    /// Mapped files and the last use, for the engine's unmapping of cold partitions.
    pub fn mapping_state(&self) -> (usize, u64) {
        (self.files.iter().flat_map(|f| f.planes()).filter(|p| p.buffer.is_some()).count(), self.last_used.load(Ordering::Relaxed))
    }

    /// Map the column files (no-op when mapped). The writer maps before every change; readers through
    /// the engine before reading a partition the first time.
    pub fn ensure_mapped(&mut self) -> Result<()> {
        self.open_files()?;
        for f in &mut self.files {
            for p in f.planes_mut() {
                p.map()?;
            }
        }
        Ok(())
    }

    pub fn is_mapped(&self) -> bool {
        self.opened && self.files.iter().all(ColumnFile::is_mapped)
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

    fn base_view(&self) -> PartView {
        let (first, last) = (self.first_key.map(|k| k.0), self.last_key.map(|k| k.0));
        PartView {
            year: self.year,
            rows: self.rows,
            mapped: false,
            last_used: self.last_used.clone(),
            first,
            last,
            layouts: self.layouts.clone(),
            cols: Vec::new(),
            split: self.rows,
            tail: Vec::new(),
        }
    }

    /// The current committed view for readers.
    pub fn view(&self) -> PartView {
        let base = self.base_view();
        if !self.is_mapped() {
            return base;
        }
        let cols: Vec<ColBufs> = self.files.iter().map(ColumnFile::bufs).collect();
        if !self.hot {
            return PartView { mapped: true, cols, ..base };
        }
        let split = self.rows.saturating_sub(TAIL_ROWS);
        let tail: Option<Vec<ArrayRef>> =
            cols.iter().zip(self.layouts.iter()).map(|(b, l)| storage_array(*l, b, split, self.rows - split).ok().and_then(|a| deep_copy(&a))).collect();
        match tail {
            Some(tail) => PartView { mapped: true, cols, split, tail, ..base },
            // Unreachable for files the writer sized itself; a view without the tail rows beats a panic.
            None => PartView { mapped: true, cols, rows: split, ..base },
        }
    }

    /// All rows straight from the mapping, as the writer (the only one who modifies them) sees them. Only
    /// after [`Partition::ensure_mapped`].
    fn file_view(&self) -> PartView {
        PartView { mapped: true, cols: self.files.iter().map(ColumnFile::bufs).collect(), ..self.base_view() }
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
        if self.is_append(rows) {
            self.append(rows)?;
        } else if !self.overwrite_tail_in_place(rows)? {
            // The first overwrite near the end copies the partition once and makes it hot, so the next
            // ones (a live feed re-sending its newest bar) are written in place.
            let near_end = self.kind == RecordKind::Fixed
                && !self.has_var()
                && rows.epoch(0) >= self.file_view().epochs()[self.rows.saturating_sub(TAIL_ROWS)];
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
        if !self.hot || self.direct_unchecked || self.kind != RecordKind::Fixed || self.rows == 0 || !self.is_mapped() || self.has_var() {
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
        self.ensure_validity(&rows.slice(0, targets.len()))?;
        for (i, f) in self.files.iter().enumerate() {
            let w = f.width();
            let col = &rows.cols[i];
            let src = value_bytes(col, w);
            for (j, &row) in targets.iter().enumerate() {
                f.values.write_at(&src.as_slice()[j * w..(j + 1) * w], row * w)?;
                if let Some(v) = &f.validity {
                    write_bit(v, row, col.is_valid(j))?;
                }
            }
        }
        self.dirty = true;
        if appended_from < rows.len {
            self.append(&rows.slice(appended_from, rows.len))?;
        }
        Ok(true)
    }

    fn append(&mut self, rows: &Rows) -> Result<()> {
        self.reserve(rows)?;
        let at = self.rows;
        for (i, f) in self.files.iter_mut().enumerate() {
            let col = &rows.cols[i];
            match &f.data {
                None => f.values.write_at(value_bytes(col, f.layout.ty.width()).as_slice(), at * f.layout.ty.width())?,
                Some(d) => {
                    let (offs, bytes) = var_parts(col, f.data_len, true)?;
                    d.write_at(bytes.as_slice(), f.data_len)?;
                    f.values.write_at(&offs, (at + 1) * f.layout.ty.width())?;
                    f.data_len += bytes.len();
                }
            }
            if let Some(v) = &f.validity {
                write_bits(v, at, &validity_bits(col))?;
            }
        }
        self.rows += rows.len;
        self.dirty = true;
        Ok(())
    }

    /// Create the validity bitmap of every nullable column that `rows` carry nulls for and that has none
    /// in this generation yet: every stored row valid, blocks allocated, fsync'd with its directory entry
    /// (it holds the validity of rows the manifest already counts, so it must be durable before use).
    fn ensure_validity(&mut self, rows: &Rows) -> Result<()> {
        let gdir = self.gen_dir(self.generation);
        let mut made = false;
        for (i, f) in self.files.iter_mut().enumerate() {
            if f.validity.is_some() || rows.cols[i].null_count() == 0 {
                continue;
            }
            if !f.layout.nullable {
                return Err(EngineError::InvalidInput("nulls in a column that is not nullable".into()));
            }
            let path = gdir.join(column_file_names(f.layout).1);
            let file = create_rw(&path, true)?;
            allocate(&file, &path, self.capacity.max(1).div_ceil(8))?;
            let mut bytes = vec![0xFFu8; self.rows / 8];
            if self.rows % 8 != 0 {
                bytes.push((1u8 << (self.rows % 8)) - 1);
            }
            file.write_all_at(&bytes, 0).map_err(|e| EngineError::io(&path, e))?;
            file.sync_data().map_err(|e| EngineError::io(&path, e))?;
            let mut plane = Plane::new(path);
            if f.values.buffer.is_some() {
                plane.map()?;
            }
            f.validity = Some(plane);
            made = true;
        }
        if made {
            sync_dir(&gdir)?;
            self.created_files = true;
        }
        Ok(())
    }

    /// Make room for `rows` past the visible ones, with the disk blocks allocated (`fallocate`), so that
    /// writing them cannot fail for lack of space; create the validity bitmaps their nulls need. The
    /// engine calls this before a write is logged: a full disk then fails the write cleanly, with nothing
    /// logged.
    pub fn reserve(&mut self, rows: &Rows) -> Result<()> {
        self.reserve_after(rows, &Ahead::default())
    }

    /// [`Partition::reserve`] for `rows` that will be appended after the appends in `ahead` (logged in the
    /// same group, applied first), so that every write of the group finds its space reserved.
    pub fn reserve_after(&mut self, rows: &Rows, ahead: &Ahead) -> Result<()> {
        self.open_files()?;
        let overflow = || EngineError::InvalidInput("row count overflow".into());
        let need = self.rows.checked_add(ahead.rows).and_then(|n| n.checked_add(rows.len)).ok_or_else(overflow)?;
        if need > self.capacity {
            let new_cap = need.max(self.capacity.saturating_mul(2)).max(MIN_CAPACITY_ROWS);
            for f in self.files.iter_mut() {
                let vbytes = f.values_bytes(new_cap).ok_or_else(|| EngineError::InvalidInput("row count overflow".into()))?;
                f.values.grow(vbytes)?;
                if let Some(v) = &mut f.validity {
                    v.grow(new_cap.div_ceil(8))?;
                }
            }
            self.capacity = new_cap;
        }
        for (i, f) in self.files.iter_mut().enumerate() {
            if f.data.is_none() {
                continue;
            }
            let add = var_data_len(&rows.cols[i]).checked_add(ahead.data.get(i).copied().unwrap_or(0));
            let need = add.and_then(|a| f.data_len.checked_add(a)).ok_or_else(|| EngineError::InvalidInput("data length overflow".into()))?;
            if f.layout.ty != ColumnType::LargeUtf8 && need > i32::MAX as usize {
                return Err(EngineError::InvalidInput(
                    "a year partition of a utf8 or binary column holds at most 2 GiB of data (use large_utf8)".into(),
                ));
            }
            if need > f.data_cap {
                let cap = need.max(f.data_cap.saturating_mul(2)).max(MIN_DATA_BYTES);
                if let Some(d) = &mut f.data {
                    d.grow(cap)?;
                }
                f.data_cap = cap;
            }
        }
        self.ensure_validity(rows)
    }

    /// How [`Partition::apply_rows`] would apply `rows`: true when it needs a new generation (a merge), so
    /// the engine prepares that before logging.
    pub fn needs_merge(&self, rows: &Rows) -> bool {
        if rows.len == 0 || self.is_append(rows) {
            return false;
        }
        self.tail_plan(rows).is_none()
    }

    /// True when `rows` would be a pure append (every row sorts after the stored ones).
    pub fn is_append(&self, rows: &Rows) -> bool {
        rows.len > 0 && self.last_key().is_none_or(|last| sorts_after(self.kind, last, rows))
    }

    /// True when a bulk append of `rows` may skip the log ([`Partition::stage_direct_append`]): fixed-width
    /// columns only, no nulls and no validity bitmap (their bytes are what the commit record checksums).
    pub fn direct_ok(&mut self, rows: &Rows) -> Result<bool> {
        self.open_files()?;
        Ok(!self.has_var() && !rows.has_nulls() && self.files.iter().all(|f| f.validity.is_none()))
    }

    /// Bulk path, step 1: write `rows` past the visible row count and fsync the column files, without
    /// publishing them. Returns what the log record must carry to re-validate the data at replay:
    /// `(generation, start_row, crc32c over the written column bytes)`. Only where [`Partition::direct_ok`].
    pub fn stage_direct_append(&mut self, rows: &Rows) -> Result<(u64, usize, u32)> {
        // A bulk append starts from a checkpointed partition, so that replay finds exactly the state it was
        // staged on: the staged rows sit in the files a restart opens, and no earlier record is replayed
        // onto them (replay may take another path than run time did, e.g. a merge for an overwrite that
        // was in place, which would leave the staged rows behind in the old generation).
        self.checkpoint()?;
        let start = self.rows;
        self.reserve(rows)?;
        let columns: Vec<(&Path, Buffer, usize)> = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.values.path.as_path(), value_bytes(&rows.cols[i], f.width()), start * f.width()))
            .collect();
        // Each column is checksummed, written and fsync'd on its own thread (a few at a time): the time is
        // the page cache taking megabytes into new pages and the device taking them, which overlap across
        // files. The checksums combine in column order, as the record carries them.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
        let per_thread = columns.len().div_ceil(threads).max(1);
        let crcs: Vec<Result<u32>> = std::thread::scope(|scope| {
            let handles: Vec<_> = columns
                .chunks(per_thread)
                .map(|chunk| scope.spawn(move || chunk.iter().map(|(path, bytes, at)| stage_column(path, bytes.as_slice(), *at)).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|_| vec![Err(EngineError::Unavailable("a column writer thread panicked".into()))]))
                .collect()
        });
        // In column order (a panicked thread's chunk is one error, met before any column after it).
        let mut crc = 0u32;
        for (c, (_, bytes, _)) in crcs.into_iter().zip(&columns) {
            crc = crc32c::crc32c_combine(crc, c?, bytes.len());
        }
        Ok((self.generation, start, crc))
    }

    /// Bulk path, step 2 (after the commit record is durable), and replay: make rows `start..start+n`
    /// visible. At replay (`verify`) the files' bytes are checked against the record's checksum first; at
    /// run time the checksum was just taken over the very bytes written, under the same lock, so reading
    /// them back (and faulting in every page of the mapping) would check nothing.
    pub fn commit_direct_append(&mut self, generation: u64, start: usize, n: usize, crc: u32, lsn: u64, verify: bool) -> Result<()> {
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
        if start + n > self.capacity || self.has_var() || self.files.iter().any(|f| f.validity.is_some()) {
            return Err(EngineError::Corrupt { path: self.dir.display().to_string(), reason: format!("bulk append record (lsn {lsn}) beyond the column files") });
        }
        self.ensure_mapped()?;
        let staged_crc = || self.files.iter().fold(0u32, |c, f| crc32c::crc32c_append(c, &f.values.mapped().as_slice()[start * f.width()..(start + n) * f.width()]));
        if verify && staged_crc() != crc {
            return Err(EngineError::Corrupt { path: self.dir.display().to_string(), reason: format!("bulk append record (lsn {lsn}): checksum mismatch") });
        }
        self.rows = start + n;
        self.applied_lsn = lsn;
        self.dirty = true;
        self.direct_unchecked = true;
        self.refresh_bounds();
        Ok(())
    }

    /// Write `cols` (the merged rows, one storage array per physical column) as the next generation's
    /// files, fsync'd, without switching to it: the engine builds it before logging the write (so a full
    /// disk fails the write cleanly) and switches with [`Partition::commit_generation`] once the record is
    /// durable. The manifest moves to it at the next checkpoint; until then a crash restarts from the
    /// previous generation and replays the log.
    fn prepare_generation(&self, n: usize, cols: Vec<ArrayRef>) -> Result<Generation> {
        let g = self.generation + 1;
        let gdir = self.gen_dir(g);
        let _ = fs::remove_dir_all(&gdir);
        let built = (|| {
            fs::create_dir_all(&gdir).map_err(|e| EngineError::io(&gdir, e))?;
            let cap = n.max(MIN_CAPACITY_ROWS);
            let mut files = Vec::with_capacity(cols.len());
            for (i, col) in cols.iter().enumerate() {
                let layout = self.layouts[i];
                let mut f = ColumnFile::new(&gdir, layout, col.null_count() > 0);
                let write = |plane: &Plane, bytes: &[u8], alloc: usize| -> Result<()> {
                    let file = create_rw(&plane.path, true)?;
                    allocate(&file, &plane.path, alloc.max(bytes.len()))?;
                    file.write_all_at(bytes, 0).map_err(|e| EngineError::io(&plane.path, e))?;
                    file.sync_data().map_err(|e| EngineError::io(&plane.path, e))
                };
                let vbytes = f.values_bytes(cap).ok_or_else(|| EngineError::InvalidInput("row count overflow".into()))?;
                match &f.data {
                    None => write(&f.values, value_bytes(col, layout.ty.width()).as_slice(), vbytes)?,
                    Some(d) => {
                        let (offs, bytes) = var_parts(col, 0, false)?;
                        write(&f.values, &offs, vbytes)?;
                        let dcap = bytes.len().max(MIN_DATA_BYTES);
                        write(d, bytes.as_slice(), dcap)?;
                        f.data_len = bytes.len();
                        f.data_cap = dcap;
                    }
                }
                if let Some(v) = &f.validity {
                    let bits = validity_bits(col);
                    write(v, bits.sliced().as_slice(), cap.div_ceil(8))?;
                }
                for p in f.planes_mut() {
                    p.map()?;
                }
                files.push(f);
            }
            sync_dir(&gdir)?;
            Ok(Generation { number: g, rows: n, capacity: cap, files })
        })();
        if built.is_err() {
            let _ = fs::remove_dir_all(&gdir);
        }
        built
    }

    /// The stored rows as storage arrays (zero-copy over the mapping; the writer's own view).
    fn stored_arrays(&self) -> Result<Vec<ArrayRef>> {
        let v = self.file_view();
        (0..self.layouts.len()).map(|c| v.storage(c, 0, self.rows)).collect()
    }

    /// The new generation a merge of `rows` produces (see [`Partition::prepare_generation`]).
    pub fn prepare_merge(&mut self, rows: &Rows) -> Result<Generation> {
        self.ensure_mapped()?;
        let (n, cols) = self.merged(rows)?;
        self.prepare_generation(n, cols)
    }

    /// The new generation without the rows of `start..=end`, or `None` when no row is in that range.
    pub fn prepare_delete(&mut self, start: (i64, i32), end: (i64, i32)) -> Result<Option<Generation>> {
        self.ensure_mapped()?;
        let view = self.file_view();
        let e = view.epochs();
        let n: &[i32] = if self.kind == RecordKind::Variable { view.nanos() } else { &[] };
        let key = |i: usize| (e[i], if n.is_empty() { 0 } else { n[i] });
        let keep: Vec<u32> = (0..self.rows).filter(|&i| !(key(i) >= start && key(i) <= end)).map(|i| i as u32).collect();
        if keep.len() == self.rows {
            return Ok(None);
        }
        let idx = arrow::array::UInt32Array::from(keep);
        let cols = self.stored_arrays()?.iter().map(|a| arrow::compute::take(a.as_ref(), &idx, None)).collect::<std::result::Result<Vec<_>, _>>()?;
        self.prepare_generation(idx.len(), cols).map(Some)
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
            self.retired.push(old);
        }
        self.refresh_bounds();
    }

    /// Remove the directories of generations replaced before the view just published (see `retired`).
    /// Readers that mapped their files keep them: an unlinked file lives while it is mapped or open.
    pub fn remove_retired(&mut self) {
        for g in std::mem::take(&mut self.retired) {
            let _ = fs::remove_dir_all(self.gen_dir(g));
        }
    }

    /// Rows `rows` merged into the stored ones: `(row count, one storage array per physical column)`.
    fn merged(&self, rows: &Rows) -> Result<(usize, Vec<ArrayRef>)> {
        let view = self.file_view();
        let old_e = view.epochs();
        let old_n: &[i32] = if self.kind == RecordKind::Variable { view.nanos() } else { &[] };
        // Plan: (source, row) picks in output order; source 0 = stored, 1 = new.
        let mut picks: Vec<(usize, usize)> = Vec::with_capacity(self.rows + rows.len);
        let (mut i, mut j) = (0usize, 0usize);
        while i < self.rows || j < rows.len {
            if j >= rows.len {
                picks.push((0, i));
                i += 1;
                continue;
            }
            if i >= self.rows {
                picks.push((1, j));
                j += 1;
                continue;
            }
            match self.kind {
                RecordKind::Fixed => {
                    let (a, b) = (old_e[i], rows.epoch(j));
                    if a < b {
                        picks.push((0, i));
                        i += 1;
                    } else if a > b {
                        picks.push((1, j));
                        j += 1;
                    } else {
                        // Same interval: the new row replaces the stored one.
                        picks.push((1, j));
                        i += 1;
                        j += 1;
                    }
                }
                RecordKind::Variable => {
                    // Stored rows first on ties: ticks keep arrival order.
                    if (old_e[i], old_n[i]) <= (rows.epoch(j), rows.nanos(j)) {
                        picks.push((0, i));
                        i += 1;
                    } else {
                        picks.push((1, j));
                        j += 1;
                    }
                }
            }
        }
        let old = self.stored_arrays()?;
        let cols = old
            .iter()
            .zip(&rows.cols)
            .map(|(o, n)| arrow::compute::interleave(&[o.as_ref(), n.as_ref()], &picks))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok((picks.len(), cols))
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
        let validity: Vec<u32> =
            if self.opened { self.files.iter().filter(|f| f.validity.is_some()).map(|f| f.layout.file).collect() } else { self.manifest.validity.clone() };
        if !self.dirty
            && self.manifest.applied_lsn == self.applied_lsn
            && self.manifest.rows == self.rows
            && self.manifest.generation == self.generation
            && self.manifest.validity == validity
        {
            return Ok(());
        }
        // Files never checked were never written: nothing of theirs to make durable.
        if self.opened {
            for f in &mut self.files {
                for p in f.planes_mut() {
                    p.sync()?;
                    p.release();
                }
            }
            if self.created_files {
                sync_dir(&self.gen_dir(self.generation))?;
            }
        }
        let format = if !validity.is_empty() || self.has_var() { FORMAT } else { 0 };
        let m = Manifest { generation: self.generation, rows: self.rows, applied_lsn: self.applied_lsn, first: self.first_key, last: self.last_key, format, validity };
        write_manifest(&self.dir, &m)?;
        let old = std::mem::replace(&mut self.manifest, m).generation;
        if old != self.generation {
            let _ = fs::remove_dir_all(self.gen_dir(old));
        }
        self.dirty = false;
        self.created_files = false;
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

    /// Create the files of columns a schema change adds, for every row this partition holds: zero values
    /// (empty strings for variable-length columns) and a validity bitmap saying every row is null, fsync'd,
    /// then listed in the manifest. Runs on a checkpointed partition before the change commits; a crash
    /// before the commit leaves files no layout names (ignored, and recreated by a retry).
    pub fn add_columns(&mut self, added: &[Layout]) -> Result<()> {
        if added.is_empty() {
            return Ok(());
        }
        let gdir = self.gen_dir(self.generation);
        fs::create_dir_all(&gdir).map_err(|e| EngineError::io(&gdir, e))?;
        let rows = self.manifest.rows;
        for l in added {
            let f = ColumnFile::new(&gdir, *l, true);
            let vbytes = f.values_bytes(rows).ok_or_else(|| EngineError::InvalidInput("row count overflow".into()))?;
            let zeros = |path: &Path, len: usize| -> Result<()> {
                let file = create_rw(path, true)?;
                if len > 0 {
                    allocate(&file, path, len)?;
                }
                file.sync_data().map_err(|e| EngineError::io(path, e))
            };
            zeros(&f.values.path, vbytes)?;
            if let Some(v) = &f.validity {
                zeros(&v.path, rows.div_ceil(8))?;
            }
            if let Some(d) = &f.data {
                zeros(&d.path, 0)?;
            }
            if !self.manifest.validity.contains(&l.file) {
                self.manifest.validity.push(l.file);
            }
        }
        sync_dir(&gdir)?;
        self.manifest.format = FORMAT;
        write_manifest(&self.dir, &self.manifest)
    }

    /// Remove the files of columns a committed schema change dropped (best effort).
    pub fn remove_columns(&self, dropped: &[Layout]) {
        let gdir = self.gen_dir(self.generation);
        for l in dropped {
            let (values, valid, data) = column_file_names(*l);
            for name in [Some(values), Some(valid), data].into_iter().flatten() {
                let _ = fs::remove_file(gdir.join(name));
            }
        }
    }
}

/// Refuse manifests whose numbers no partition can have (they bound arithmetic later), and formats newer
/// than this build reads.
pub(crate) fn check_manifest(m: &Manifest, path: &Path, layouts: &[Layout]) -> Result<()> {
    if m.rows > MAX_ROWS || m.applied_lsn > super::wal::MAX_LSN {
        return Err(EngineError::Corrupt { path: path.display().to_string(), reason: format!("implausible rows {} or applied_lsn {}", m.rows, m.applied_lsn) });
    }
    if m.format > FORMAT {
        return Err(EngineError::Corrupt {
            path: path.display().to_string(),
            reason: format!("partition format {} is newer than this build reads ({FORMAT}): upgrade mkts", m.format),
        });
    }
    // A bitmap of a file index no layout has belongs to a column added by a schema change that did not
    // commit, or to a dropped one: not ours, ignored.
    if let Some(bad) = m.validity.iter().find(|&&c| layouts.iter().any(|l| l.file == c && !l.nullable)) {
        return Err(EngineError::Corrupt { path: path.display().to_string(), reason: format!("validity bitmap listed for column {bad}, which is not nullable") });
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
