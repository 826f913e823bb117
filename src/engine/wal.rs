//! The write-ahead log: checksummed records in numbered segment files, fsync'd once per group.
//!
//! Record framing: `[u32 body_len][u32 crc32c(body)][body]`, body = `[u64 lsn][u8 op][u16 key_len][key][payload]`.
//! A short or mismatching record ends the log (a torn tail after a crash): the segment is cut there with a
//! warning and everything before it is kept. Segments are named by the first LSN they may hold, so they sort
//! in log order, and a checkpoint deletes every segment older than the current one.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};

use std::path::{Path, PathBuf};

use super::error::{EngineError, Result};

/// Operation codes of log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Create = 1,
    Write = 2,
    Destroy = 3,
    DeleteRange = 4,
    /// A bulk append whose rows were written to the column files (and fsync'd) before this record.
    AppendDirect = 5,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Create,
            2 => Op::Write,
            3 => Op::Destroy,
            4 => Op::DeleteRange,
            5 => Op::AppendDirect,
            _ => return None,
        })
    }
}

/// One decoded record, borrowing its payload from the segment buffer.
#[derive(Debug)]
pub struct Record<'a> {
    pub lsn: u64,
    pub op: Op,
    pub key: &'a str,
    pub payload: &'a [u8],
}

/// Appends records to the active segment. Owned by the engine's single writer thread.
pub struct WalWriter {
    dir: PathBuf,
    file: File,
    path: PathBuf,
    size: u64,
}

const HEADER: usize = 8;

/// Records queued for one durable append. Small parts are owned bytes; column data is referenced as shared
/// Arrow buffers and written with `writev`, so a bulk write is not copied into the log buffer.
#[derive(Default)]
pub struct Group {
    pieces: Vec<Piece>,
    bytes: usize,
}

enum Piece {
    Owned(Vec<u8>),
    Shared(arrow::buffer::Buffer),
}

impl Piece {
    fn as_slice(&self) -> &[u8] {
        match self {
            Piece::Owned(v) => v,
            Piece::Shared(b) => b.as_slice(),
        }
    }
}

impl Group {
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }
    pub fn clear(&mut self) {
        self.pieces.clear();
        self.bytes = 0;
    }
    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.bytes
    }
}

/// Encode one record with a small payload into `group`.
pub fn encode_record(group: &mut Group, lsn: u64, op: Op, key: &str, payload: impl FnOnce(&mut Vec<u8>)) {
    encode_record_with(group, lsn, op, key, payload, &[]);
}

/// Encode one record whose payload is `head` (small, owned) followed by `tail` (shared buffers, not copied).
pub fn encode_record_with(group: &mut Group, lsn: u64, op: Op, key: &str, head: impl FnOnce(&mut Vec<u8>), tail: &[arrow::buffer::Buffer]) {
    let mut buf = Vec::with_capacity(64 + key.len());
    buf.extend_from_slice(&[0u8; HEADER]);
    buf.extend_from_slice(&lsn.to_le_bytes());
    buf.push(op as u8);
    buf.extend_from_slice(&(key.len() as u16).to_le_bytes());
    buf.extend_from_slice(key.as_bytes());
    head(&mut buf);
    let mut crc = crc32c::crc32c(&buf[HEADER..]);
    let mut body_len = buf.len() - HEADER;
    for t in tail {
        crc = crc32c::crc32c_append(crc, t.as_slice());
        body_len += t.len();
    }
    buf[0..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    group.bytes += HEADER + body_len;
    group.pieces.push(Piece::Owned(buf));
    for t in tail {
        if !t.is_empty() {
            group.pieces.push(Piece::Shared(t.clone()));
        }
    }
}

fn segment_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}.log")
}

/// Segment files in log order.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(EngineError::io(dir, e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| EngineError::io(dir, e))?;
        let name = ent.file_name().to_string_lossy().to_string();
        if let Some(num) = name.strip_suffix(".log") {
            if let Ok(n) = num.parse::<u64>() {
                out.push((n, ent.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Read every valid record of every segment, calling `f` for each in order. A corrupt or torn record cuts
/// its segment at that point (the file is truncated, later segments are removed) and ends the scan.
/// Returns the highest LSN seen.
pub fn replay(dir: &Path, mut f: impl FnMut(Record<'_>) -> Result<()>) -> Result<u64> {
    let segs = list_segments(dir)?;
    let mut max_lsn = 0;
    for (i, (_, path)) in segs.iter().enumerate() {
        let mut data = Vec::new();
        File::open(path).and_then(|mut fh| fh.read_to_end(&mut data)).map_err(|e| EngineError::io(path, e))?;
        let mut pos = 0usize;
        let mut cut = None;
        while pos < data.len() {
            match decode_at(&data, pos) {
                Some((rec, next)) => {
                    if rec.lsn <= max_lsn {
                        cut = Some((pos, format!("LSN {} not after {}", rec.lsn, max_lsn)));
                        break;
                    }
                    max_lsn = rec.lsn;
                    f(rec)?;
                    pos = next;
                }
                None => {
                    cut = Some((pos, "torn or corrupt record".to_string()));
                    break;
                }
            }
        }
        if let Some((at, why)) = cut {
            tracing::warn!(segment = %path.display(), offset = at, bytes_dropped = data.len() - at, "write-ahead log: {why}; cutting the log here (everything before is kept)");
            let fh = OpenOptions::new().write(true).open(path).map_err(|e| EngineError::io(path, e))?;
            fh.set_len(at as u64).map_err(|e| EngineError::io(path, e))?;
            fh.sync_all().map_err(|e| EngineError::io(path, e))?;
            for (_, later) in &segs[i + 1..] {
                tracing::warn!(segment = %later.display(), "write-ahead log: removing segment after the cut");
                fs::remove_file(later).map_err(|e| EngineError::io(later, e))?;
            }
            break;
        }
    }
    Ok(max_lsn)
}

fn decode_at(data: &[u8], pos: usize) -> Option<(Record<'_>, usize)> {
    let hdr = data.get(pos..pos + HEADER)?;
    let len = u32::from_le_bytes(hdr[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(hdr[4..8].try_into().ok()?);
    if len < 11 {
        return None;
    }
    let body = data.get(pos + HEADER..pos + HEADER + len)?;
    if crc32c::crc32c(body) != crc {
        return None;
    }
    let lsn = u64::from_le_bytes(body[0..8].try_into().ok()?);
    let op = Op::from_u8(body[8])?;
    let klen = u16::from_le_bytes(body[9..11].try_into().ok()?) as usize;
    let key = std::str::from_utf8(body.get(11..11 + klen)?).ok()?;
    let payload = body.get(11 + klen..)?;
    Some((Record { lsn, op, key, payload }, pos + HEADER + len))
}

impl WalWriter {
    /// Open a fresh segment for records from `next_lsn` on.
    pub fn create(dir: &Path, next_lsn: u64) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        let path = dir.join(segment_name(next_lsn));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| EngineError::io(&path, e))?;
        let size = file.metadata().map_err(|e| EngineError::io(&path, e))?.len();
        sync_dir(dir)?;
        Ok(WalWriter { dir: dir.to_path_buf(), file, path, size })
    }

    /// Append a group of records and make them durable (one fdatasync for the whole group).
    pub fn append_durable(&mut self, group: &Group) -> Result<()> {
        let mut slices: Vec<&[u8]> = group.pieces.iter().map(|p| p.as_slice()).collect();
        let mut idx = 0;
        while idx < slices.len() {
            let end = (idx + 512).min(slices.len());
            let io: Vec<std::io::IoSlice<'_>> = slices[idx..end].iter().map(|s| std::io::IoSlice::new(s)).collect();
            let n = self.file.write_vectored(&io).map_err(|e| EngineError::io(&self.path, e))?;
            if n == 0 {
                return Err(EngineError::io(&self.path, std::io::Error::new(std::io::ErrorKind::WriteZero, "log write returned 0")));
            }
            // Advance past what was written (a short write leaves a partial slice to retry).
            let mut left = n;
            while left > 0 && idx < slices.len() {
                if left >= slices[idx].len() {
                    left -= slices[idx].len();
                    idx += 1;
                } else {
                    slices[idx] = &slices[idx][left..];
                    left = 0;
                }
            }
        }
        self.file.sync_data().map_err(|e| EngineError::io(&self.path, e))?;
        self.size += group.bytes as u64;
        Ok(())
    }

    /// Bytes in the active segment.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Start a new segment at `next_lsn` and delete all older ones. Only call once everything logged so
    /// far is durable in the partitions (after a checkpoint).
    pub fn rotate_and_trim(&mut self, next_lsn: u64) -> Result<()> {
        let new = WalWriter::create(&self.dir, next_lsn)?;
        let old_path = std::mem::replace(self, new).path;
        for (_, p) in list_segments(&self.dir)? {
            if p != self.path {
                fs::remove_file(&p).map_err(|e| EngineError::io(&p, e))?;
            }
        }
        let _ = old_path;
        sync_dir(&self.dir)
    }
}

/// fsync a directory so renames and new files in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| EngineError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 1).unwrap();
        let mut g = Group::default();
        encode_record(&mut g, 1, Op::Write, "A/1Min/X", |b| b.extend_from_slice(b"hel"));
        encode_record_with(&mut g, 2, Op::Write, "A/1Min/X", |b| b.extend_from_slice(b"wo"), &[arrow::buffer::Buffer::from(b"rld".as_slice())]);
        w.append_durable(&g).unwrap();
        let flat: Vec<u8> = g.pieces.iter().flat_map(|p| p.as_slice().to_vec()).collect();
        let mut torn = Group::default();
        torn.pieces.push(Piece::Owned(flat[..10].to_vec()));
        w.append_durable(&torn).unwrap(); // torn tail
        let mut seen = vec![];
        let max = replay(dir.path(), |r| {
            seen.push((r.lsn, r.payload.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(max, 2);
        assert_eq!(seen, vec![(1, b"hel".to_vec()), (2, b"world".to_vec())]);
        let segs = list_segments(dir.path()).unwrap();
        assert_eq!(fs::metadata(&segs[0].1).unwrap().len() as usize, flat.len());
    }
}
