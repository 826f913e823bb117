//! `mkts tool integrity`: check a stopped data directory without changing it.
//!
//! What is checked is what start-up relies on, read the way start-up reads it, but nothing is repaired,
//! removed or created:
//! - the write-ahead log: every record's CRC32C and framing in every segment and in `held.log`; unreadable
//!   bytes followed by valid records are damage, a torn tail (a crash mid-append, which start-up cuts) is
//!   reported as a note;
//! - the catalog snapshot (`.catalog`): its CRC32C and decoding (a damaged snapshot only costs start-up
//!   time, so it is a note);
//! - every bucket: `bucket.json` (key equal to its directory, valid schema), every year's `manifest.json`
//!   (parses, plausible numbers, a format this build reads, validity only for nullable columns), every file
//!   of the manifest's generation: values present and at least `rows` × width bytes; a validity bitmap the
//!   manifest lists at least `rows / 8` bytes rounded up; a variable-length column's `rows + 1` offsets
//!   starting at 0, never decreasing, the last within its data file; and the rows themselves: every Epoch inside the partition's UTC year, in order
//!   (strictly increasing for fixed buckets, each at its interval start; by Epoch and Nanoseconds for tick
//!   buckets, Nanoseconds in 0..1e9), the first and last row equal to the manifest's `first`/`last`.
//!
//! Data columns carry no checksum of their own, so their values cannot be checked beyond their length.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::catalog::read_bucket_file;
use super::partition::{check_manifest, column_file_names, physical_layouts, Layout, Manifest};
use super::{wal, EngineError, RecordKind, Result};

/// One problem found, with the file it is in.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    /// The damaged (or noted) file or directory.
    pub path: String,
    /// What is wrong with it.
    pub what: String,
}

/// What [`check_integrity`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IntegrityReport {
    /// Bucket directories with a `bucket.json`.
    pub buckets: usize,
    /// Year partitions (directories with a manifest, or that should have one).
    pub partitions: usize,
    /// Rows the manifests hold.
    pub rows: u64,
    /// Files of the current generations looked at (values or offsets, validity bitmaps, data).
    pub column_files: usize,
    /// Write-ahead log segments.
    pub log_segments: usize,
    /// Valid write-ahead log records.
    pub log_records: usize,
    /// Damage: start-up would refuse the directory or mark a bucket damaged, or rows are out of order.
    pub damage: Vec<Finding>,
    /// Not damage: what start-up repairs by itself (a torn log tail, a stale or damaged snapshot, generations
    /// a crash left behind).
    pub notes: Vec<Finding>,
}

impl IntegrityReport {
    /// No damage found.
    pub fn intact(&self) -> bool {
        self.damage.is_empty()
    }
}

fn finding(path: &Path, what: impl Into<String>) -> Finding {
    Finding { path: path.display().to_string(), what: what.into() }
}

/// Check every checksum and manifest of the data directory `root` (see the module docs). Takes the
/// directory's lock, so it refuses to run beside a server; writes nothing. `tz`: the `timezone` the server
/// runs with ([`super::EngineConfig::timezone`]), where fixed day-and-longer intervals start.
pub fn check_integrity(root: &Path, tz: Option<chrono_tz::Tz>) -> Result<IntegrityReport> {
    let meta = fs::metadata(root).map_err(|e| EngineError::io(root, e))?;
    if !meta.is_dir() {
        return Err(EngineError::InvalidInput(format!("{} is not a directory", root.display())));
    }
    let wal_dir = root.join(".wal");
    if !wal_dir.is_dir() && !root.join(".store_id").exists() {
        return Err(EngineError::InvalidInput(format!("{} is not an mkts data directory (no .wal/ and no .store_id)", root.display())));
    }
    // The lock, without creating it: a directory that has none has no process on it.
    let lock_path = root.join(".lock");
    let _lock = match fs::OpenOptions::new().write(true).open(&lock_path) {
        Ok(f) => {
            f.try_lock().map_err(|_| EngineError::Unavailable(format!("data directory {} is in use by another mkts process", root.display())))?;
            Some(f)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(EngineError::io(&lock_path, e)),
    };
    let mut rep = IntegrityReport::default();

    if wal_dir.is_dir() {
        let scan = wal::LogScan::read(&wal_dir)?;
        rep.log_segments = wal::list_segments(&wal_dir)?.len();
        rep.log_records = scan.records().count();
        for d in scan.damage() {
            rep.damage.push(finding(&d.path, format!("unreadable log bytes {}..{} followed by valid records: {d}", d.offset, d.offset + d.len)));
        }
        if let Some(t) = scan.torn_tail() {
            rep.notes.push(finding(&t.path, format!("torn tail ({} bytes at {}): a crash mid-append, cut at the next start", t.len, t.offset)));
        }
        if wal_dir.join(wal::HELD_FILE).exists() {
            rep.notes.push(finding(&wal_dir.join(wal::HELD_FILE), "holds the log records of buckets found damaged at an earlier start"));
        }
    }
    match super::catalog::snapshot_intact(root) {
        Some(false) => rep.notes.push(finding(&root.join(super::catalog::SNAPSHOT_FILE), "catalog snapshot is damaged or of an older format; start-up reads the files instead")),
        Some(true) | None => {}
    }

    for sym in subdirs(root) {
        for tf in subdirs(&sym) {
            for group in subdirs(&tf) {
                check_bucket(root, &group, tz, &mut rep);
            }
        }
    }
    Ok(rep)
}

/// Visible subdirectories, sorted.
fn subdirs(p: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn check_bucket(root: &Path, dir: &Path, tz: Option<chrono_tz::Tz>, rep: &mut IntegrityReport) {
    let rel = dir.strip_prefix(root).unwrap_or(dir).to_string_lossy().into_owned();
    let years: Vec<(i32, PathBuf)> = subdirs(dir).into_iter().filter_map(|p| Some((p.file_name()?.to_str()?.parse::<i32>().ok()?, p))).collect();
    if !dir.join("bucket.json").exists() {
        if !years.is_empty() {
            rep.damage.push(finding(dir, "year partitions without bucket.json"));
        }
        return;
    }
    rep.buckets += 1;
    let (key, schema) = match read_bucket_file(dir) {
        Ok(v) => v,
        Err(e) => return rep.damage.push(finding(&dir.join("bucket.json"), e.to_string())),
    };
    if key.to_string() != rel {
        rep.damage.push(finding(&dir.join("bucket.json"), format!("names bucket {key}, but sits in {rel}")));
    }
    let layouts = physical_layouts(schema.kind, &schema.columns);
    let tf = key.tf();
    for (year, ydir) in years {
        rep.partitions += 1;
        let mpath = ydir.join("manifest.json");
        let m: Manifest = match fs::read_to_string(&mpath).map_err(|e| e.to_string()).and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string())) {
            Ok(m) => m,
            Err(e) => {
                rep.damage.push(finding(&mpath, format!("unreadable manifest: {e}")));
                continue;
            }
        };
        if let Err(e) = check_manifest(&m, &mpath, &layouts) {
            rep.damage.push(finding(&mpath, e.to_string()));
            continue;
        }
        for stale in subdirs(&ydir).iter().filter(|p| p.file_name().is_some_and(|n| n != format!("g{}", m.generation).as_str())) {
            rep.notes.push(finding(stale, "generation left by an interrupted merge; removed at the next start"));
        }
        rep.rows += m.rows as u64;
        let files = partition_files(&ydir.join(format!("g{}", m.generation)), &layouts, &m);
        let mut ok = true;
        for f in &files {
            rep.column_files += 1 + usize::from(f.validity.is_some()) + usize::from(f.data.is_some());
            if let Err(bad) = check_column(f, m.rows) {
                rep.damage.push(bad);
                ok = false;
            }
        }
        if ok && m.rows > 0 {
            let nanos_path = (schema.kind == RecordKind::Variable).then(|| files[1].values.as_path());
            if let Err(f) = check_rows(&files[0].values, nanos_path, &m, year, schema.kind, (tf, tz)) {
                rep.damage.push(f);
            }
        }
    }
}

/// The files of one physical column in a generation directory.
struct ColumnFiles {
    layout: Layout,
    /// Values (fixed width) or offsets (variable length).
    values: PathBuf,
    /// The validity bitmap, when the manifest lists one for the column.
    validity: Option<PathBuf>,
    /// The value bytes of a variable-length column.
    data: Option<PathBuf>,
}

/// The files of every physical column of a partition: the one place that asks the partition module for
/// file names.
fn partition_files(gdir: &Path, layouts: &[Layout], m: &Manifest) -> Vec<ColumnFiles> {
    layouts
        .iter()
        .map(|&layout| {
            let (values, validity, data) = column_file_names(layout);
            ColumnFiles {
                layout,
                values: gdir.join(values),
                validity: m.validity.contains(&layout.file).then(|| gdir.join(validity)),
                data: data.map(|d| gdir.join(d)),
            }
        })
        .collect()
}

fn file_len(path: &Path) -> std::result::Result<u64, Finding> {
    fs::metadata(path).map(|md| md.len()).map_err(|e| finding(path, format!("missing column file: {e}")))
}

/// Sizes of one column's files against the manifest's row count; for variable-length columns the offsets
/// themselves: `rows + 1` of them, never decreasing, the last inside the data file.
fn check_column(f: &ColumnFiles, rows: usize) -> std::result::Result<(), Finding> {
    let width = f.layout.ty.width() as u128;
    let entries = if f.layout.ty.is_var() { rows as u128 + 1 } else { rows as u128 };
    if rows == 0 {
        // An empty partition's files may not exist yet (they are made at its first write).
        return Ok(());
    }
    let len = file_len(&f.values)?;
    if (len as u128) < entries * width {
        let what = if f.layout.ty.is_var() { "offsets" } else { "rows" };
        return Err(finding(&f.values, format!("holds {len} bytes, manifest says {rows} rows ({entries} {what} of {width} bytes)")));
    }
    if let Some(v) = &f.validity {
        let vlen = file_len(v)?;
        if (vlen as u128) < (rows as u128).div_ceil(8) {
            return Err(finding(v, format!("validity bitmap holds {vlen} bytes, {rows} rows need {}", rows.div_ceil(8))));
        }
    }
    if let Some(d) = &f.data {
        let dlen = file_len(d)?;
        let mut offsets = Column::open(&f.values, width as usize)?;
        let mut prev = 0i64;
        for i in 0..=rows {
            let o = offsets.next(rows + 1 - i)?;
            if o < prev || (i == 0 && o != 0) {
                return Err(finding(&f.values, format!("offset {i} is {o}, after {prev}: offsets must start at 0 and never decrease")));
            }
            prev = o;
        }
        if prev as u64 > dlen {
            return Err(finding(d, format!("holds {dlen} bytes, the last offset is {prev}")));
        }
    }
    Ok(())
}

/// Reads a column file of little-endian values front to back, in chunks.
struct Column {
    file: fs::File,
    path: PathBuf,
    width: usize,
    buf: Vec<u8>,
    pos: usize,
}

impl Column {
    fn open(path: &Path, width: usize) -> std::result::Result<Column, Finding> {
        let file = fs::File::open(path).map_err(|e| finding(path, e.to_string()))?;
        Ok(Column { file, path: path.to_path_buf(), width, buf: Vec::new(), pos: 0 })
    }

    /// The next value; `left` values remain to be read (including this one).
    fn next(&mut self, left: usize) -> std::result::Result<i64, Finding> {
        if self.pos == self.buf.len() {
            let take = left.min(65_536) * self.width;
            self.buf.resize(take, 0);
            self.file.read_exact(&mut self.buf).map_err(|e| finding(&self.path, e.to_string()))?;
            self.pos = 0;
        }
        let c = &self.buf[self.pos..self.pos + self.width];
        self.pos += self.width;
        let mut b8 = [0u8; 8];
        b8[..self.width].copy_from_slice(c);
        Ok(if self.width == 8 { i64::from_le_bytes(b8) } else { i64::from(i32::from_le_bytes([b8[0], b8[1], b8[2], b8[3]])) })
    }
}

fn check_rows(epoch_path: &Path, nanos_path: Option<&Path>, m: &Manifest, year: i32, kind: RecordKind, (tf, tz): (super::Timeframe, Option<chrono_tz::Tz>)) -> std::result::Result<(), Finding> {
    let lo = chrono::NaiveDate::from_ymd_opt(year, 1, 1).and_then(|d| d.and_hms_opt(0, 0, 0)).map(|d| d.and_utc().timestamp());
    let hi = chrono::NaiveDate::from_ymd_opt(year + 1, 1, 1).and_then(|d| d.and_hms_opt(0, 0, 0)).map(|d| d.and_utc().timestamp());
    let (Some(lo), Some(hi)) = (lo, hi) else {
        return Err(finding(epoch_path, format!("year {year} is out of range")));
    };
    let bad = |w: String| finding(epoch_path, w);
    let mut epochs = Column::open(epoch_path, 8)?;
    let mut nanos = nanos_path.map(|p| Column::open(p, 4)).transpose()?;
    let (mut first, mut prev) = (None, (0i64, 0i32));
    for i in 0..m.rows {
        let e = epochs.next(m.rows - i)?;
        let n = match &mut nanos {
            Some(c) => {
                let n = c.next(m.rows - i)?;
                if !(0..1_000_000_000).contains(&n) {
                    return Err(finding(&c.path, format!("row {i}: Nanoseconds {n} is outside 0..1e9")));
                }
                n as i32
            }
            None => 0,
        };
        if !(lo..hi).contains(&e) {
            return Err(bad(format!("row {i}: Epoch {e} is outside the year {year}")));
        }
        if kind == RecordKind::Fixed && tf.truncate_in(e, tz) != e {
            let zone = tz.map_or("UTC", |z| z.name());
            return Err(bad(format!("row {i}: Epoch {e} is not the start of its {tf} interval (timezone {zone}; give --timezone as the server's mkts.yml)")));
        }
        let cur = (e, n);
        if i > 0 && !(if kind == RecordKind::Fixed { prev < cur } else { prev <= cur }) {
            return Err(bad(format!("rows {} and {i} are out of order ({}.{:09} then {}.{:09})", i - 1, prev.0, prev.1, e, n)));
        }
        first.get_or_insert(cur);
        prev = cur;
    }
    if m.first.is_some_and(|f| Some(f) != first) || m.last.is_some_and(|l| l != prev) {
        return Err(bad(format!("first/last rows {first:?}/{prev:?} differ from the manifest's {:?}/{:?}", m.first, m.last)));
    }
    Ok(())
}
