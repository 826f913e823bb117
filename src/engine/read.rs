//! Building Arrow batches from partition views without copying numeric column data.

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, PrimitiveArray, RecordBatch, StringArray};
use arrow::buffer::{Buffer, ScalarBuffer};
use arrow::datatypes::{self as adt, ArrowPrimitiveType, Field, Schema, SchemaRef};

use super::error::Result;
use super::partition::{PartView, Rows};
use super::types::{epoch_type, BucketSchema, ColumnType, RecordKind, EPOCH, NANOSECONDS, STRING16_WIDTH};

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

/// Physical column chosen for output: index into the partition's columns and its type.
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
        out.push(OutCol { phys: base + i, ty: c.ty, field: Field::new(&c.name, c.ty.arrow_type(), false) });
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

fn prim<T: ArrowPrimitiveType>(buf: &Buffer, lo: usize, len: usize) -> ArrayRef {
    Arc::new(PrimitiveArray::<T>::new(ScalarBuffer::new(buf.clone(), lo, len), None))
}

/// A zero-copy (numeric) or converted (bool, string16) array over rows `lo..lo+len` of a column buffer.
pub(crate) fn column_array(ty: ColumnType, buf: &Buffer, lo: usize, len: usize, is_epoch: bool) -> ArrayRef {
    if is_epoch {
        let a = PrimitiveArray::<adt::TimestampSecondType>::new(ScalarBuffer::new(buf.clone(), lo, len), None)
            .with_timezone("UTC");
        return Arc::new(a);
    }
    match ty {
        ColumnType::I8 => prim::<adt::Int8Type>(buf, lo, len),
        ColumnType::I16 => prim::<adt::Int16Type>(buf, lo, len),
        ColumnType::I32 => prim::<adt::Int32Type>(buf, lo, len),
        ColumnType::I64 => prim::<adt::Int64Type>(buf, lo, len),
        ColumnType::U8 => prim::<adt::UInt8Type>(buf, lo, len),
        ColumnType::U16 => prim::<adt::UInt16Type>(buf, lo, len),
        ColumnType::U32 => prim::<adt::UInt32Type>(buf, lo, len),
        ColumnType::U64 => prim::<adt::UInt64Type>(buf, lo, len),
        ColumnType::F32 => prim::<adt::Float32Type>(buf, lo, len),
        ColumnType::F64 => prim::<adt::Float64Type>(buf, lo, len),
        ColumnType::Bool => {
            let b = &buf.as_slice()[lo..lo + len];
            Arc::new(b.iter().map(|v| Some(*v != 0)).collect::<BooleanArray>())
        }
        ColumnType::String16 => {
            let b = &buf.as_slice()[lo * STRING16_WIDTH..(lo + len) * STRING16_WIDTH];
            Arc::new(b.chunks_exact(STRING16_WIDTH).map(|c| Some(decode_string16(c))).collect::<StringArray>())
        }
    }
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

fn partition_point_by(len: usize, pred: impl Fn(usize) -> bool) -> usize {
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
    for (bufs, first, len) in view.pieces(lo, hi) {
        let arrays: Vec<ArrayRef> = cols.iter().map(|c| column_array(c.ty, &bufs[c.phys], first, len, c.phys == 0)).collect();
        out.push(RecordBatch::try_new(schema.clone(), arrays)?);
    }
    Ok(())
}

/// The rows of a write as a batch in the bucket's read schema (for triggers).
pub(crate) fn rows_batch(schema: &BucketSchema, rows: &Rows) -> Result<RecordBatch> {
    let (s, cols) = projection(schema, None);
    let bufs: Vec<Buffer> = rows.cols.iter().map(|c| Buffer::from(c.as_slice())).collect();
    let arrays: Vec<ArrayRef> = cols.iter().map(|c| column_array(c.ty, &bufs[c.phys], 0, rows.len, c.phys == 0)).collect();
    Ok(RecordBatch::try_new(s, arrays)?)
}
