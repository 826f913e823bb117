//! Building Arrow batches from partition views without copying column data (bool and string16 are converted).

use std::sync::Arc;

use arrow::array::{make_array, Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray};
use arrow::buffer::BooleanBuffer;
use arrow::datatypes::{self as adt, Field, Schema, SchemaRef};

use super::error::Result;
use super::partition::{storage_array, PartView, Piece, Rows};
use super::types::{epoch_type, BucketSchema, ColumnType, RecordKind, EPOCH, NANOSECONDS};

/// A point in time: Unix seconds plus nanoseconds (the latter only matters for tick buckets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimePoint {
    pub secs: i64,
    pub nanos: i32,
}

impl TimePoint {
    pub const MIN: TimePoint = TimePoint { secs: i64::MIN, nanos: 0 };
    pub const MAX: TimePoint = TimePoint { secs: i64::MAX, nanos: 999_999_999 };
    pub fn secs(secs: i64) -> Self {
        TimePoint { secs, nanos: 0 }
    }
}

/// Physical column chosen for output: index into the partition's columns, its type and read field.
#[derive(Debug, Clone)]
pub(crate) struct OutCol {
    pub phys: usize,
    pub ty: ColumnType,
    pub field: Field,
}

/// Output columns for a projection: Epoch, the requested data columns in request order (unknown names
/// ignored, as MarketStore does), then Nanoseconds for tick buckets.
pub(crate) fn projection(schema: &BucketSchema, columns: Option<&[String]>) -> (SchemaRef, Vec<OutCol>) {
    let base = if schema.kind == RecordKind::Variable { 2 } else { 1 };
    let mut out = vec![OutCol { phys: 0, ty: ColumnType::I64, field: Field::new(EPOCH, epoch_type(), false) }];
    let mut push = |i: usize| {
        let c = &schema.columns[i];
        out.push(OutCol { phys: base + i, ty: c.ty, field: c.field() });
    };
    match columns {
        None => (0..schema.columns.len()).for_each(&mut push),
        Some(list) => {
            for name in list {
                if let Some((i, _)) = schema.column(name) {
                    push(i);
                }
            }
        }
    }
    if schema.kind == RecordKind::Variable {
        out.push(OutCol { phys: 1, ty: ColumnType::I32, field: Field::new(NANOSECONDS, adt::DataType::Int32, false) });
    }
    let s = Arc::new(Schema::new(out.iter().map(|c| c.field.clone()).collect::<Vec<_>>()));
    (s, out)
}

/// A storage array (see [`ColumnType::storage_type`]) as the array reads return: the same buffers under
/// the read type (timestamps, dates, Epoch), or converted (bool is bit-packed in Arrow, string16 is
/// UTF-32 on disk).
pub(crate) fn read_array(ty: ColumnType, field: &Field, storage: ArrayRef) -> Result<ArrayRef> {
    let target = field.data_type();
    if storage.data_type() == target {
        return Ok(storage);
    }
    Ok(match ty {
        ColumnType::Bool => {
            let b = storage.as_primitive::<adt::UInt8Type>();
            let values: BooleanBuffer = b.values().iter().map(|v| *v != 0).collect();
            Arc::new(BooleanArray::new(values, storage.nulls().cloned()))
        }
        ColumnType::String16 => {
            let f = storage.as_fixed_size_binary();
            Arc::new((0..f.len()).map(|i| f.is_valid(i).then(|| decode_string16(f.value(i)))).collect::<StringArray>())
        }
        // Same width and bytes, another logical type: Int64 → timestamp, Int32 → date32.
        _ => make_array(storage.to_data().into_builder().data_type(target.clone()).build()?),
    })
}

/// Decode a NUL-padded UTF-32LE string16 value.
pub fn decode_string16(c: &[u8]) -> String {
    c.chunks_exact(4)
        .map(|q| u32::from_le_bytes([q[0], q[1], q[2], q[3]]))
        .take_while(|&u| u != 0)
        .map(|u| char::from_u32(u).unwrap_or('\u{FFFD}'))
        .collect()
}

/// Row range `[lo, hi)` of a partition inside `[start, end]` (inclusive).
pub(crate) fn row_range(view: &PartView, kind: RecordKind, start: TimePoint, end: TimePoint) -> (usize, usize) {
    let e = |i| view.epoch(i);
    match kind {
        RecordKind::Fixed => {
            let lo = partition_point_by(view.rows, |i| e(i) < start.secs);
            let hi = partition_point_by(view.rows, |i| e(i) <= end.secs);
            (lo, hi.max(lo))
        }
        RecordKind::Variable => {
            let n = |i| view.nanos_at(i);
            let lo = partition_point_by(view.rows, |i| (e(i), n(i)) < (start.secs, start.nanos));
            let hi = partition_point_by(view.rows, |i| (e(i), n(i)) <= (end.secs, end.nanos));
            (lo, hi.max(lo))
        }
    }
}

/// The first index in `0..len` where `pred` turns false (`pred` true then false, as on sorted rows).
pub(crate) fn partition_point_by(len: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Rows `lo..hi` of a view as batches: one zero-copy over the mapping, plus one over the heap tail of a
/// hot partition when the range reaches into it.
pub(crate) fn batches_of(schema: &SchemaRef, cols: &[OutCol], view: &PartView, lo: usize, hi: usize, out: &mut Vec<RecordBatch>) -> Result<()> {
    for (piece, first, len) in view.pieces(lo, hi) {
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(cols.len());
        for c in cols {
            let storage = match &piece {
                Piece::Mapped(bufs) => storage_array(view.layouts[c.phys], &bufs[c.phys], first, len)?,
                Piece::Tail(tail) => tail[c.phys].slice(first, len),
            };
            arrays.push(read_array(c.ty, &c.field, storage)?);
        }
        out.push(RecordBatch::try_new(schema.clone(), arrays)?);
    }
    Ok(())
}

/// The rows of a write as a batch in the bucket's read schema (for triggers).
pub(crate) fn rows_batch(schema: &BucketSchema, rows: &Rows) -> Result<RecordBatch> {
    let (s, cols) = projection(schema, None);
    let arrays = cols.iter().map(|c| read_array(c.ty, &c.field, rows.cols[c.phys].clone())).collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(s, arrays)?)
}
