//! Payload codecs of the log records (the frame, LSN and checksum are [`super::wal`]'s): a write's rows,
//! a range delete's bounds, a bulk append's commit entries.

use super::partition::Rows;
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

pub(super) fn encode_write(group: &mut wal::Group, lsn: u64, key: &str, origin: Option<u64>, rows: &Rows) {
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
        &rows.cols,
    );
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

/// The rows of a write record (checked against the bucket's column widths, every length bounded).
pub(crate) fn decode_write_payload(payload: &[u8], widths: &[usize]) -> Option<Rows> {
    let len = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?) as usize;
    let ncols = u16::from_le_bytes(payload.get(4..6)?.try_into().ok()?) as usize;
    if ncols != widths.len() {
        return None;
    }
    let mut pos = 6usize;
    let mut cols = Vec::with_capacity(ncols);
    for w in widths {
        let n = len.checked_mul(*w)?;
        let end = pos.checked_add(n)?;
        cols.push(arrow::buffer::Buffer::from(payload.get(pos..end)?));
        pos = end;
    }
    Some(Rows { len, cols })
}
