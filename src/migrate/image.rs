//! One MarketStore data file in memory, with MarketStore's WAL replay applied to it exactly as
//! `replayTGData` applies it (FIXED: the index and record written at the slot offset; VARIABLE: the new
//! tick records merged into the slot's blob), decoded into the rows MarketStore's reader returns.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int16Array, Int32Array, Int64Array, Int8Array, RecordBatch,
    StringArray, UInt16Array, UInt32Array, UInt64Array, UInt8Array,
};
use arrow::datatypes::{DataType, Field, Schema};

use super::catalog::DataFile;
use super::header::{self, Header, RecordType, HEADER_SIZE, VARIABLE_SLOT};
use super::variable::{self, BlobError, IndirectSlot};
use super::wal::WalWrite;
use super::{fixed, timeindex, Problem};
use crate::engine::{BucketSchema, ColumnDef, ColumnType, RecordKind, EPOCH, NANOSECONDS};

/// How MarketStore was configured when it wrote the files: neither is recorded in them.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Variable blobs are Snappy-compressed (MarketStore's default; `disable_variable_compression: false`).
    pub compressed: bool,
    /// `timezone`: interval indexes count from Jan 1 00:00 in this zone.
    pub tz: chrono_tz::Tz,
}

/// A data file's bytes, with the variable slots the WAL replay rewrote.
pub struct FileImage {
    pub file: DataFile,
    pub header: Header,
    bytes: Vec<u8>,
    /// VARIABLE slot position → (index, decompressed tick records) after a WAL merge.
    merged: BTreeMap<usize, (i64, Vec<u8>)>,
    /// Rows the WAL replay added or rewrote.
    pub wal_writes: usize,
}

/// The rows of one file.
pub struct Decoded {
    pub batch: Option<RecordBatch>,
    pub problems: Vec<Problem>,
}

/// The mkts schema of a MarketStore header: same names, types and record type.
pub fn bucket_schema(h: &Header) -> BucketSchema {
    BucketSchema {
        kind: if h.record_type == RecordType::Variable { RecordKind::Variable } else { RecordKind::Fixed },
        columns: h.columns.iter().map(|(n, t)| ColumnDef::new(n.clone(), *t)).collect(),
    }
}

/// The Arrow schema rows are written with: Epoch int64 seconds, the columns, Nanoseconds for ticks.
pub fn write_schema(s: &BucketSchema) -> Arc<Schema> {
    let mut fields = vec![Field::new(EPOCH, DataType::Int64, false)];
    fields.extend(s.columns.iter().map(|c| Field::new(&c.name, c.ty.arrow_type(), false)));
    if s.kind == RecordKind::Variable {
        fields.push(Field::new(NANOSECONDS, DataType::Int32, false));
    }
    Arc::new(Schema::new(fields))
}

macro_rules! prim {
    ($arr:ty, $native:ty, $bytes:expr, $w:expr) => {
        Arc::new(<$arr>::from($bytes.chunks_exact($w).map(|c| <$native>::from_le_bytes(c.try_into().unwrap_or([0; $w]))).collect::<Vec<$native>>())) as ArrayRef
    };
}

/// numpy `<U16`: 16 UTF-32LE code points, trailing NULs stripped (as numpy does).
pub fn decode_string16(raw: &[u8]) -> String {
    let mut cps: Vec<u32> = raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    while cps.last() == Some(&0) {
        cps.pop();
    }
    cps.into_iter().map(|c| char::from_u32(c).unwrap_or('\u{FFFD}')).collect()
}

/// One column from its packed little-endian values.
pub fn column_array(ty: ColumnType, bytes: &[u8]) -> ArrayRef {
    match ty {
        ColumnType::I8 => prim!(Int8Array, i8, bytes, 1),
        ColumnType::I16 => prim!(Int16Array, i16, bytes, 2),
        ColumnType::I32 => prim!(Int32Array, i32, bytes, 4),
        ColumnType::I64 => prim!(Int64Array, i64, bytes, 8),
        ColumnType::U8 => prim!(UInt8Array, u8, bytes, 1),
        ColumnType::U16 => prim!(UInt16Array, u16, bytes, 2),
        ColumnType::U32 => prim!(UInt32Array, u32, bytes, 4),
        ColumnType::U64 => prim!(UInt64Array, u64, bytes, 8),
        ColumnType::F32 => prim!(Float32Array, f32, bytes, 4),
        ColumnType::F64 => prim!(Float64Array, f64, bytes, 8),
        ColumnType::Bool => Arc::new(BooleanArray::from(bytes.iter().map(|&b| b != 0).collect::<Vec<bool>>())),
        ColumnType::String16 => Arc::new(StringArray::from(
            bytes.chunks_exact(64).map(decode_string16).collect::<Vec<String>>(),
        )),
        // MarketStore files hold only the types above (its element codes, `header.rs`).
        other => arrow::array::new_null_array(&other.arrow_type(), bytes.len() / other.width().max(1)),
    }
}

/// Rows being collected: epoch, nanos, and each column's packed bytes.
struct Rows {
    epochs: Vec<i64>,
    nanos: Vec<i32>,
    cols: Vec<Vec<u8>>,
    offsets: Vec<(usize, usize)>,
}

impl Rows {
    fn new(h: &Header) -> Rows {
        let mut offsets = Vec::new();
        let mut at = 0;
        for (_, t) in &h.columns {
            offsets.push((at, t.width()));
            at += t.width();
        }
        Rows { epochs: Vec::new(), nanos: Vec::new(), cols: vec![Vec::new(); h.columns.len()], offsets }
    }

    fn push(&mut self, epoch: i64, nanos: Option<i32>, payload: &[u8]) {
        self.epochs.push(epoch);
        if let Some(n) = nanos {
            self.nanos.push(n);
        }
        for (c, (at, len)) in self.cols.iter_mut().zip(&self.offsets) {
            c.extend_from_slice(&payload[*at..*at + *len]);
        }
    }

    fn finish(self, h: &Header) -> Result<Option<RecordBatch>, String> {
        if self.epochs.is_empty() {
            return Ok(None);
        }
        let schema = bucket_schema(h);
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(self.epochs))];
        for (c, (_, t)) in self.cols.iter().zip(&h.columns) {
            arrays.push(column_array(*t, c));
        }
        if schema.kind == RecordKind::Variable {
            arrays.push(Arc::new(Int32Array::from(self.nanos)));
        }
        RecordBatch::try_new(write_schema(&schema), arrays).map(Some).map_err(|e| e.to_string())
    }
}

/// Read a file whose unwritten slots are holes (MarketStore `ftruncate`s every year file to its full size)
/// reading only its data extents: a 1Sec tick file is 758 MB of mostly holes. The buffer is zeroed
/// lazily by the allocator, so holes cost no I/O. Falls back to a plain read where SEEK_DATA is unknown.
fn read_sparse(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use rustix::fs::{seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let len = usize::try_from(f.metadata()?.len()).map_err(|_| std::io::Error::other("file too large"))?;
    let mut bytes = vec![0u8; len];
    let mut at = 0u64;
    while (at as usize) < len {
        let start = match seek(&f, SeekFrom::Data(at)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) if at == 0 => {
                f.read_exact_at(&mut bytes, 0)?;
                return Ok(bytes);
            }
            Err(e) => return Err(e.into()),
        };
        let end = seek(&f, SeekFrom::Hole(start)).map_err(std::io::Error::from)?.min(len as u64);
        if end <= start {
            break;
        }
        f.read_exact_at(&mut bytes[start as usize..end as usize], start)?;
        at = end;
    }
    Ok(bytes)
}

impl FileImage {
    /// Read a data file and its header.
    pub fn load(file: &DataFile) -> Result<FileImage, Problem> {
        let bytes = read_sparse(&file.path).map_err(|e| Problem::whole(&file.path, format!("cannot read: {e}")))?;
        let header = header::parse(&bytes).map_err(|(o, r)| Problem::at(&file.path, o, format!("bad header: {r}")))?;
        if header.year != file.year {
            return Err(Problem::at(&file.path, 264, format!("header says year {} but the file is named {}.bin", header.year, file.year)));
        }
        if header.record_type == RecordType::Variable && timeindex::intervals_per_day(header.timeframe_ns) == 0 {
            return Err(Problem::at(&file.path, 272, "a variable-length bucket with a timeframe above 1D cannot be decoded (MarketStore divides by zero intervals per day)"));
        }
        Ok(FileImage { file: file.clone(), header, bytes, merged: BTreeMap::new(), wal_writes: 0 })
    }

    fn slot_count(&self) -> usize {
        fixed::slots_in_year(self.header.year, self.header.timeframe_ns).unwrap_or(0)
    }

    /// Apply one WAL write as MarketStore's replay does. `wal` names the WAL file in reports.
    pub fn apply(&mut self, w: &WalWrite, settings: &Settings, wal: &std::path::Path) -> Result<(), Problem> {
        let bad = |r: String| Problem::whole(wal, format!("write to {} skipped: {r}", self.file.rel));
        if (w.record_type == RecordType::Variable) != (self.header.record_type == RecordType::Variable) {
            return Err(bad("its record type differs from the data file's".into()));
        }
        let Ok(offset) = usize::try_from(w.offset) else { return Err(bad(format!("negative slot offset {}", w.offset))) };
        if offset < HEADER_SIZE {
            // A 1D record of Jan 1 (index 0): MarketStore writes it into the header's reserved tail, where
            // its reader never looks (§1.3). It is not served, so it is not imported.
            return Ok(());
        }
        let rl = self.header.record_length;
        if (offset - HEADER_SIZE) % rl != 0 || (offset - HEADER_SIZE) / rl >= self.slot_count().max(1) {
            return Err(bad(format!("slot offset {offset} is not a slot of this file")));
        }
        match self.header.record_type {
            RecordType::Fixed => {
                if w.data.len() != self.header.payload_len() {
                    return Err(bad(format!("{} data bytes for a {}-byte record", w.data.len(), self.header.payload_len())));
                }
                let end = offset + 8 + w.data.len();
                if self.bytes.len() < end {
                    self.bytes.resize(end, 0);
                }
                self.bytes[offset..offset + 8].copy_from_slice(&w.index.to_le_bytes());
                self.bytes[offset + 8..end].copy_from_slice(&w.data);
                self.wal_writes += 1;
            }
            RecordType::Variable => {
                let vrl = self.header.var_record_len();
                if w.var_record_len as i64 != vrl as i64 || w.data.len() % vrl != 0 {
                    return Err(bad(format!("tick records of {} bytes for a {vrl}-byte record", w.var_record_len)));
                }
                let pos = (offset - HEADER_SIZE) / VARIABLE_SLOT;
                let old = match self.merged.remove(&pos) {
                    Some((_, recs)) => recs,
                    None => {
                        let idx = super::le_i64(&self.bytes, offset).unwrap_or(0);
                        if idx == 0 {
                            Vec::new()
                        } else {
                            let slot = IndirectSlot {
                                at: offset as u64,
                                index: idx,
                                blob_offset: super::le_i64(&self.bytes, offset + 8).unwrap_or(0),
                                blob_len: super::le_i64(&self.bytes, offset + 16).unwrap_or(0),
                            };
                            variable::blob(&self.bytes, &slot, settings.compressed, vrl)
                                .map_err(|e| bad(format!("the interval it extends does not decode: {e:?}")))?
                        }
                    }
                };
                self.wal_writes += w.data.len() / vrl;
                self.merged.insert(pos, (w.index, variable::merge(&old, &w.data, vrl)));
            }
        }
        Ok(())
    }

    /// The rows MarketStore's reader returns for this file, in its order.
    pub fn decode(&self, settings: &Settings) -> Decoded {
        let h = &self.header;
        let path = &self.file.path;
        let mut problems = Vec::new();
        let mut rows = Rows::new(h);
        let clock = timeindex::YearClock::new(h.year, h.timeframe_ns, settings.tz);
        match h.record_type {
            RecordType::Fixed => {
                let (slots, damage) = fixed::slots(&self.bytes, h);
                if let Some((o, r)) = damage {
                    problems.push(Problem::at(path, o, r));
                }
                for s in slots {
                    match clock.epoch(s.index) {
                        Some(e) => rows.push(e, None, s.payload),
                        None => problems.push(Problem::at(path, s.offset, format!("record index {} is outside any time; skipped", s.index))),
                    }
                }
            }
            RecordType::Variable => {
                let vrl = h.var_record_len();
                let ipd = timeindex::intervals_per_day(h.timeframe_ns);
                let (slots, damage) = variable::slots(&self.bytes, self.slot_count());
                if let Some((o, r)) = damage {
                    problems.push(Problem::at(path, o, r));
                }
                let mut from_file: BTreeMap<usize, IndirectSlot> = BTreeMap::new();
                for s in slots {
                    from_file.insert((s.at as usize - HEADER_SIZE) / VARIABLE_SLOT, s);
                }
                let positions: std::collections::BTreeSet<usize> = from_file.keys().chain(self.merged.keys()).copied().collect();
                let (mut decoded_ok, mut undecodable) = (0usize, Vec::new());
                for pos in positions {
                    let (index, recs, at) = if let Some((idx, recs)) = self.merged.get(&pos) {
                        (*idx, std::borrow::Cow::Borrowed(recs.as_slice()), (HEADER_SIZE + pos * VARIABLE_SLOT) as u64)
                    } else {
                        let s = &from_file[&pos];
                        match variable::blob(&self.bytes, s, settings.compressed, vrl) {
                            Ok(b) => (s.index, std::borrow::Cow::Owned(b), s.at),
                            Err(BlobError::OutOfFile(r)) => {
                                problems.push(Problem::at(path, s.at, format!("interval {} skipped: {r}", s.index)));
                                continue;
                            }
                            Err(BlobError::Undecodable(r)) => {
                                undecodable.push(Problem::at(path, s.blob_offset.max(0) as u64, format!("interval {} skipped: {r}", s.index)));
                                continue;
                            }
                        }
                    };
                    if index == 0 {
                        continue;
                    }
                    decoded_ok += 1;
                    let Some(start) = clock.epoch(index) else {
                        problems.push(Problem::at(path, at, format!("interval index {index} is outside any time; skipped")));
                        continue;
                    };
                    for r in recs.chunks_exact(vrl) {
                        let (sec, ns) = timeindex::time_from_ticks(start, ipd, variable::record_ticks(r));
                        rows.push(sec, Some(ns), &r[..vrl - header::TICKS_LEN]);
                    }
                }
                if decoded_ok == 0 && !undecodable.is_empty() {
                    let (said, other) = if settings.compressed {
                        ("Snappy-compressed (disable_variable_compression: false, MarketStore's default)", "true")
                    } else {
                        ("uncompressed (disable_variable_compression: true)", "false")
                    };
                    let first = &undecodable[0];
                    return Decoded {
                        batch: None,
                        problems: vec![Problem {
                            path: path.clone(),
                            offset: first.offset,
                            reason: format!(
                                "refused: none of its {} intervals decodes as {said} ({}); if MarketStore ran with \
                                 disable_variable_compression: {other}, put that in the --config file",
                                undecodable.len(),
                                first.reason
                            ),
                        }],
                    };
                }
                problems.extend(undecodable);
            }
        }
        match rows.finish(h) {
            Ok(batch) => Decoded { batch, problems },
            Err(e) => {
                problems.push(Problem::whole(path, format!("cannot build rows: {e}")));
                Decoded { batch: None, problems }
            }
        }
    }
}
