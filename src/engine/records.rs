//! Payload codecs of the log records (the frame, LSN and checksum are [`super::wal`]'s): a write's rows,
//! a range delete's bounds, a bulk append's commit entries.

use arrow::array::{make_array, ArrayData, ArrayRef};
use arrow::buffer::Buffer;
use arrow::datatypes::DataType;

use super::partition::{Layout, Rows};
use super::wal::{self, Op};
use super::TimePoint;

/// One year partition's part of a bulk append commit record.
#[derive(Debug, Clone, Copy)]
pub(super) struct DirectEntry {
    pub(super) year: i32,
    pub(super) generation: u64,
    pub(super) start: u64,
    pub(super) rows: u64,
    pub(super) crc: u32,
}

/// Writes at least this large skip copying their rows into the log when they are pure appends.
pub(super) const DIRECT_APPEND_ROWS: usize = 32_768;

pub(super) fn encode_direct(buf: &mut Vec<u8>, entries: &[DirectEntry]) {
    buf.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for e in entries {
        buf.extend_from_slice(&e.year.to_le_bytes());
        buf.extend_from_slice(&e.generation.to_le_bytes());
        buf.extend_from_slice(&e.start.to_le_bytes());
        buf.extend_from_slice(&e.rows.to_le_bytes());
        buf.extend_from_slice(&e.crc.to_le_bytes());
    }
}

pub(super) fn decode_direct(p: &[u8]) -> Option<Vec<DirectEntry>> {
    let n = u16::from_le_bytes(p.get(0..2)?.try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(n);
    let mut pos = 2;
    for _ in 0..n {
        let b = p.get(pos..pos + 32)?;
        out.push(DirectEntry {
            year: i32::from_le_bytes(b[0..4].try_into().ok()?),
            generation: u64::from_le_bytes(b[4..12].try_into().ok()?),
            start: u64::from_le_bytes(b[12..20].try_into().ok()?),
            rows: u64::from_le_bytes(b[20..28].try_into().ok()?),
            crc: u32::from_le_bytes(b[28..32].try_into().ok()?),
        });
        pos += 32;
    }
    Some(out)
}

/// A write record's rows: `len` (u32) and the column count (u16), then per physical column its values
/// (`len` × width bytes) — exactly the format of the releases before nullable and variable-length
/// columns — and, for a nullable column, one byte (1 when a bitmap follows) and `ceil(len / 8)` bitmap
/// bytes; for a variable-length column, the `len + 1` offsets (from 0) and then their bytes.
pub(super) fn encode_write(group: &mut wal::Group, lsn: u64, key: &str, origin: Option<u64>, rows: &Rows, layouts: &[Layout]) {
    let mut tail: Vec<Buffer> = Vec::with_capacity(rows.cols.len());
    for (col, layout) in rows.cols.iter().zip(layouts) {
        if layout.ty.is_var() {
            let (offs, bytes) = var_offsets_from_zero(col);
            tail.push(Buffer::from_vec(offs));
            tail.push(bytes);
        } else {
            let d = col.to_data();
            let w = layout.ty.width();
            tail.push(d.buffers()[0].slice_with_length(d.offset() * w, d.len() * w));
        }
        if layout.nullable {
            match col.nulls().filter(|n| n.null_count() > 0) {
                Some(n) => {
                    tail.push(Buffer::from_vec(vec![1u8]));
                    tail.push(n.inner().sliced());
                }
                None => tail.push(Buffer::from_vec(vec![0u8])),
            }
        }
    }
    wal::encode_record_with(
        group,
        lsn,
        Op::Write,
        key,
        origin,
        |b| {
            b.extend_from_slice(&(rows.len as u32).to_le_bytes());
            b.extend_from_slice(&(rows.cols.len() as u16).to_le_bytes());
        },
        &tail,
    );
}

/// The offsets of a variable-length array rebased to start at 0 (little-endian, `len + 1` entries) and
/// the bytes they index. Rows come from `normalize`, which gives a variable-length column its storage type.
fn var_offsets_from_zero(a: &ArrayRef) -> (Vec<u8>, Buffer) {
    let d = a.to_data();
    let n = d.len();
    let (offs, first, last): (Vec<u8>, i64, i64) = match d.data_type() {
        DataType::LargeUtf8 => {
            let o = &d.buffers()[0].typed_data::<i64>()[d.offset()..=d.offset() + n];
            (o.iter().flat_map(|v| (v - o[0]).to_le_bytes()).collect(), o[0], o[n])
        }
        DataType::Utf8 | DataType::Binary => {
            let o = &d.buffers()[0].typed_data::<i32>()[d.offset()..=d.offset() + n];
            (o.iter().flat_map(|v| (v - o[0]).to_le_bytes()).collect(), o[0] as i64, o[n] as i64)
        }
        other => {
            debug_assert!(false, "{other} is not a variable-length storage type");
            return (vec![0u8; (n + 1) * 4], Buffer::from_vec(Vec::<u8>::new()));
        }
    };
    (offs, d.buffers()[1].slice_with_length(first as usize, (last - first) as usize))
}

pub(super) fn encode_range(buf: &mut Vec<u8>, start: TimePoint, end: TimePoint) {
    buf.extend_from_slice(&start.secs.to_le_bytes());
    buf.extend_from_slice(&start.nanos.to_le_bytes());
    buf.extend_from_slice(&end.secs.to_le_bytes());
    buf.extend_from_slice(&end.nanos.to_le_bytes());
}

pub(super) fn decode_range(p: &[u8]) -> Option<(TimePoint, TimePoint)> {
    Some((
        TimePoint { secs: i64::from_le_bytes(p.get(0..8)?.try_into().ok()?), nanos: i32::from_le_bytes(p.get(8..12)?.try_into().ok()?) },
        TimePoint { secs: i64::from_le_bytes(p.get(12..20)?.try_into().ok()?), nanos: i32::from_le_bytes(p.get(20..24)?.try_into().ok()?) },
    ))
}

/// The rows of a write record (checked against the bucket's column layouts, every length bounded, the
/// arrays validated).
pub(crate) fn decode_write_payload(payload: &[u8], layouts: &[Layout]) -> Option<Rows> {
    let len = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?) as usize;
    let ncols = u16::from_le_bytes(payload.get(4..6)?.try_into().ok()?) as usize;
    if ncols != layouts.len() {
        return None;
    }
    let mut pos = 6usize;
    let mut take = |n: usize| -> Option<Buffer> {
        let end = pos.checked_add(n)?;
        let b = Buffer::from(payload.get(pos..end)?);
        pos = end;
        Some(b)
    };
    let mut cols = Vec::with_capacity(ncols);
    for l in layouts {
        let w = l.ty.width();
        let mut buffers = Vec::with_capacity(2);
        if l.ty.is_var() {
            let offs = take(len.checked_add(1)?.checked_mul(w)?)?;
            let data_len = if w == 8 {
                i64::from_le_bytes(offs.as_slice().get(len * 8..len * 8 + 8)?.try_into().ok()?)
            } else {
                i32::from_le_bytes(offs.as_slice().get(len * 4..len * 4 + 4)?.try_into().ok()?) as i64
            };
            let data = take(usize::try_from(data_len).ok()?)?;
            buffers.push(offs);
            buffers.push(data);
        } else {
            buffers.push(take(len.checked_mul(w)?)?);
        }
        let mut nulls = None;
        if l.nullable {
            let flag = take(1)?;
            if flag.as_slice()[0] == 1 {
                nulls = Some(take(len.div_ceil(8))?);
            }
        }
        let data = ArrayData::try_new(l.ty.storage_type(), len, nulls, 0, buffers, vec![]).ok()?;
        cols.push(make_array(data));
    }
    Some(Rows { len, cols })
}
