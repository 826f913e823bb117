//! Same-host reads: instead of batches, the files behind a read snapshot, opened for a process on this
//! machine that maps them itself, so the bytes never cross a socket.
//!
//! Per bucket a reader gets the read schema and *pieces* in row order. A mapped piece names, for each output
//! column, the open files (values or offsets, validity bitmap, string data), the bytes of each it may map,
//! and the rows `offset..offset + rows` to read. An inline piece is a batch: the tail rows of a hot partition,
//! which the writer may still change in place, and pieces with a column whose disk layout is not Arrow's
//! (bool, string16). The files are opened here and kept only when they are the inodes the snapshot mapped,
//! so what the reader maps is exactly that snapshot: appends write past its rows, overwrites and deletes
//! build a new generation (new files), and a mapped file is never truncated. The open file is the lease: it
//! keeps an unlinked generation's data alive until the reader has mapped and closed it.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use super::bucket::{select, Bucket, Selection, Span};
use super::error::{EngineError, Result};
use super::partition::{ColBufs, FileId, PartView, Piece};
use super::read::{batches_of, OutCol};
use super::types::ColumnType;
use super::{BucketKey, ReadRequest};

/// How often a read retries when the writer replaced a generation between the snapshot and opening its
/// files (each retry takes a new snapshot).
const OPEN_ATTEMPTS: usize = 8;

/// One bucket's rows as files to map and batches.
#[derive(Debug)]
pub struct LocalRead {
    pub key: BucketKey,
    pub schema: SchemaRef,
    pub pieces: Vec<LocalPiece>,
    pub rows: usize,
}

/// Rows of a [`LocalRead`], in order.
#[derive(Debug)]
pub enum LocalPiece {
    /// Rows `offset..offset + rows` of the files, one [`LocalColumn`] per schema field.
    Mapped { offset: usize, rows: usize, columns: Vec<LocalColumn> },
    /// Rows sent as they are.
    Inline(RecordBatch),
}

/// The files of one column of a mapped piece, as Arrow's buffers: values (or `n + 1` offsets), validity
/// bitmap (absent: no nulls), string or binary data.
#[derive(Debug)]
pub struct LocalColumn {
    pub values: LocalFile,
    pub validity: Option<LocalFile>,
    pub data: Option<LocalFile>,
}

/// An open file and how many of its bytes, from the start, the piece's rows use.
#[derive(Debug)]
pub struct LocalFile {
    pub file: File,
    pub len: usize,
}

/// The files (or batches) of `req`'s rows of bucket `b`.
pub(super) fn local_bucket(b: &Bucket, req: &ReadRequest, tz: Option<chrono_tz::Tz>) -> Result<LocalRead> {
    let mut last_err = None;
    for attempt in 0..OPEN_ATTEMPTS {
        if attempt > 0 {
            // A snapshot taken just before the writer published a new generation may name files it
            // removed right after (Bucket::publish): the next snapshot names the new ones.
            std::thread::sleep(std::time::Duration::from_micros(250 << attempt));
        }
        let sel = select(b, req, tz)?;
        match pieces(&sel) {
            Ok((pieces, rows)) => return Ok(LocalRead { key: b.key.clone(), schema: sel.schema, pieces, rows }),
            // The writer switched generations after the snapshot: take a new one.
            Err(Fail::Stale(why)) => last_err = Some(why),
            Err(Fail::Engine(e)) => return Err(e),
        }
    }
    Err(EngineError::Unavailable(format!(
        "{}: the bucket changed while its files were opened {OPEN_ATTEMPTS} times ({}); retry",
        b.key,
        last_err.unwrap_or_default()
    )))
}

enum Fail {
    /// A file of the snapshot is gone or replaced.
    Stale(String),
    Engine(EngineError),
}

impl From<EngineError> for Fail {
    fn from(e: EngineError) -> Fail {
        Fail::Engine(e)
    }
}

fn stale(why: impl Into<String>) -> Fail {
    Fail::Stale(why.into())
}

fn corrupt(id: &Option<Arc<FileId>>, reason: impl Into<String>) -> Fail {
    let path = id.as_ref().map(|i| i.path.display().to_string()).unwrap_or_default();
    Fail::Engine(EngineError::Corrupt { path, reason: reason.into() })
}

fn pieces(sel: &Selection) -> std::result::Result<(Vec<LocalPiece>, usize), Fail> {
    let mut out = Vec::new();
    let mut total = 0;
    // Columns whose files are not Arrow's layout for the read type come inline.
    let arrow_layout = sel.cols.iter().all(|c| !matches!(c.ty, ColumnType::Bool | ColumnType::String16));
    for span in &sel.ranges {
        let &Span::Hot(i, lo, hi) = span else {
            // Cold years (object storage) come inline.
            if let Span::Cold(batches) = span {
                total += batches.iter().map(|b| b.num_rows()).sum::<usize>();
                out.extend(batches.iter().cloned().map(LocalPiece::Inline));
            }
            continue;
        };
        let view = &sel.snap[i];
        total += hi - lo;
        for (piece, first, len) in view.pieces(lo, hi) {
            match piece {
                Piece::Mapped(bufs) if arrow_layout => {
                    let columns = sel.cols.iter().map(|c| column(view, c, &bufs[c.phys], first + len)).collect::<std::result::Result<Vec<_>, Fail>>()?;
                    out.push(LocalPiece::Mapped { offset: first, rows: len, columns });
                }
                _ => {
                    let mut batches = Vec::new();
                    let (lo, hi) = match piece {
                        Piece::Mapped(_) => (first, first + len),
                        Piece::Tail(_) => (view.split + first, view.split + first + len),
                    };
                    batches_of(&sel.schema, &sel.cols, view, lo, hi, &mut batches)?;
                    out.extend(batches.into_iter().map(LocalPiece::Inline));
                }
            }
        }
    }
    Ok((out, total))
}

/// The files of one column holding rows `0..end` of the view's mapped region.
fn column(view: &PartView, c: &OutCol, bufs: &ColBufs, end: usize) -> std::result::Result<LocalColumn, Fail> {
    let layout = view.layouts[c.phys];
    let w = layout.ty.width();
    let values_len = if layout.ty.is_var() { end.checked_add(1).and_then(|n| n.checked_mul(w)) } else { end.checked_mul(w) }
        .ok_or_else(|| corrupt(&bufs.ids[0], "row count overflows"))?;
    let values = open(&bufs.ids[0], values_len, bufs.values.len())?;
    let validity = match (&bufs.validity, &bufs.ids[1]) {
        (Some(v), id) => Some(open(id, end.div_ceil(8), v.len())?),
        (None, _) => None,
    };
    let data = match (&bufs.data, &bufs.ids[2]) {
        (Some(d), id) => {
            // The data a piece uses ends at its last offset, read from the snapshot's own mapping.
            let off = &bufs.values.as_slice()[..values_len];
            let last = if w == 4 {
                i32::from_le_bytes(off[values_len - 4..].try_into().map_err(|_| corrupt(&bufs.ids[0], "offsets"))?) as i64
            } else {
                i64::from_le_bytes(off[values_len - 8..].try_into().map_err(|_| corrupt(&bufs.ids[0], "offsets"))?)
            };
            let last = usize::try_from(last).map_err(|_| corrupt(&bufs.ids[0], format!("negative offset {last}")))?;
            Some(open(id, last, d.len())?)
        }
        (None, _) => None,
    };
    Ok(LocalColumn { values, validity, data })
}

/// Open the file behind a mapped buffer of `mapped` bytes, for its first `len` bytes; stale when it is no
/// longer that file.
fn open(id: &Option<Arc<FileId>>, len: usize, mapped: usize) -> std::result::Result<LocalFile, Fail> {
    let id = id.as_ref().ok_or_else(|| stale("a column file is not mapped"))?;
    if len > mapped {
        return Err(stale(format!("{}: {len} bytes needed, {mapped} mapped", id.path.display())));
    }
    let file = File::open(&id.path).map_err(|e| stale(format!("{}: {e}", id.path.display())))?;
    let m = file.metadata().map_err(|e| stale(format!("{}: {e}", id.path.display())))?;
    if (m.dev(), m.ino()) != (id.dev, id.ino) || (m.len() as usize) < len {
        return Err(stale(format!("{}: replaced", id.path.display())));
    }
    Ok(LocalFile { file, len })
}
