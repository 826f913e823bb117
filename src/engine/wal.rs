//! The write-ahead log: checksummed records in numbered segment files, fsync'd once per group.
//!
//! Record framing: `[u32 body_len][u32 crc32c(body)][body]`, body = `[u64 lsn][u8 op][u16 key_len][key][payload]`.
//! Unreadable bytes at the very end of the log are a torn tail (a crash mid-append) and are cut with a
//! warning; unreadable bytes followed by valid records are damage, and the engine refuses to start on them
//! rather than drop acknowledged writes ([`LogScan`]). Segments are named by the first LSN they may hold, so they sort
//! in log order, and a checkpoint deletes every segment older than the current one.
//!
//! The active segment is zero-filled ahead of its end ([`PREALLOC_BYTES`] at a time, like PostgreSQL's
//! `wal_init_zero`): an append then overwrites blocks the file already has, and its `fdatasync` flushes
//! only data. Appending past the end instead changes the file's size and extents with every commit, which
//! ext4 writes out synchronously on each `fdatasync` (measured in `benches/README.md`). So a segment ends
//! at its last valid record; zeros after it are the clean end, never damage.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

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
    /// Cancels the record whose LSN is the payload: a write that was logged but could not be applied, and
    /// was reported to its client as failed, must not reappear at replay.
    Abort = 6,
    /// Sets the upstream position without a change (a replica's snapshot start or end): the payload is
    /// the upstream's name, the record's origin the position. The key is empty.
    Mark = 7,
    /// A bucket's columns changed: the payload is the new schema (JSON). Every earlier record of the bucket
    /// was checkpointed before it, so replay never decodes them against the new columns.
    Alter = 8,
}

/// Set in a record's op byte when the record ends with an 8-byte origin: the position, in the log of the
/// server this change was replicated from, of the change this record applies. One record, one checksum,
/// so a change and its position are durable together or not at all.
const ORIGIN_FLAG: u8 = 0x80;

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Create,
            2 => Op::Write,
            3 => Op::Destroy,
            4 => Op::DeleteRange,
            5 => Op::AppendDirect,
            6 => Op::Abort,
            7 => Op::Mark,
            8 => Op::Alter,
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
    /// The upstream log position this record applies (replicas only, see [`ORIGIN_FLAG`]).
    pub origin: Option<u64>,
}

/// Appends records to the active segment. Owned by the engine's single writer thread.
pub struct WalWriter {
    dir: PathBuf,
    /// Written at its cursor, which stays at `size` (positioned writes fill the zeros).
    file: File,
    path: PathBuf,
    /// The logical end: bytes of valid records.
    size: u64,
    /// The file's length: from `size` to here the file holds zeros that were made durable.
    allocated: u64,
}

/// How far ahead of the log's end the active segment is zero-filled, and in what steps. One step costs a
/// 1 MiB write and an fdatasync about once every 1,700 per-call appends; a small root (a test's tmpfs)
/// gives up little space for it.
pub const PREALLOC_BYTES: u64 = 1 << 20;

/// A group at least this large grows the file itself: zero-filling first would write its bytes twice.
const GROW_DIRECTLY_BYTES: u64 = PREALLOC_BYTES / 4;

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
    encode_record_with(group, lsn, op, key, None, payload, &[]);
}

/// [`encode_record`] with an upstream position (`origin`) carried in the same record.
pub fn encode_record_from(group: &mut Group, lsn: u64, op: Op, key: &str, origin: Option<u64>, payload: impl FnOnce(&mut Vec<u8>)) {
    encode_record_with(group, lsn, op, key, origin, payload, &[]);
}

/// Encode one record whose payload is `head` (small, owned) followed by `tail` (shared buffers, not copied).
pub fn encode_record_with(
    group: &mut Group,
    lsn: u64,
    op: Op,
    key: &str,
    origin: Option<u64>,
    head: impl FnOnce(&mut Vec<u8>),
    tail: &[arrow::buffer::Buffer],
) {
    let mut buf = Vec::with_capacity(64 + key.len());
    buf.extend_from_slice(&[0u8; HEADER]);
    buf.extend_from_slice(&lsn.to_le_bytes());
    buf.push(op as u8 | if origin.is_some() { ORIGIN_FLAG } else { 0 });
    buf.extend_from_slice(&(key.len() as u16).to_le_bytes());
    buf.extend_from_slice(key.as_bytes());
    head(&mut buf);
    let mut crc = crc32c::crc32c(&buf[HEADER..]);
    let mut body_len = buf.len() - HEADER;
    for t in tail {
        crc = crc32c::crc32c_append(crc, t.as_slice());
        body_len += t.len();
    }
    let trailer = origin.map(u64::to_le_bytes);
    if let Some(o) = &trailer {
        crc = crc32c::crc32c_append(crc, o);
        body_len += o.len();
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
    if let Some(o) = trailer {
        group.pieces.push(Piece::Owned(o.to_vec()));
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

/// Highest LSN a record may carry: far beyond any real log (one record per nanosecond for 146 years), and
/// leaves room so that "next LSN" arithmetic can never overflow.
pub const MAX_LSN: u64 = 1 << 62;

/// File holding the log records of damaged buckets, carried over from checkpoint to checkpoint so that
/// trimming the log never drops them (replayed first, before the segments).
pub const HELD_FILE: &str = "held.log";
/// Directory damaged segments are copied to by recovery before they are rewritten.
pub const QUARANTINE_DIR: &str = "quarantine";

/// Where a scan found bytes that are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadSpan {
    pub path: PathBuf,
    pub offset: usize,
    pub len: usize,
    /// LSN of the last valid record before the span (0 if none).
    pub after_lsn: u64,
    /// LSN of the first valid record after the span, when one follows (then this is damage, not a torn tail).
    pub before_lsn: Option<u64>,
}

impl std::fmt::Display for BadSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes {}..{} (after LSN {}", self.path.display(), self.offset, self.offset + self.len, self.after_lsn)?;
        match self.before_lsn {
            Some(b) => write!(f, ", before LSN {b})"),
            None => write!(f, ", up to the end of the log)"),
        }
    }
}

struct SegmentScan {
    path: PathBuf,
    data: Vec<u8>,
    /// `(start, end)` byte ranges of the valid records, in log order.
    records: Vec<(usize, usize)>,
    bad: Vec<BadSpan>,
}

/// Every segment of a log directory read and checked: valid records, a torn tail, damage in the middle.
///
/// A crash can only tear the last record written, so unreadable bytes with no valid record anywhere after
/// them are a torn tail and may be cut. Unreadable bytes followed by valid records are damage (a flipped
/// bit, a bad sector): cutting there would drop acknowledged writes, so the engine refuses to start until
/// [`LogScan::recover`] (the `mkts tool recover-wal` command) quarantines the segment.
pub struct LogScan {
    dir: PathBuf,
    /// The held file (if any) first, then the segments in log order.
    segments: Vec<SegmentScan>,
    /// Index into `segments` of the torn tail's segment and its offset.
    torn: Option<(usize, usize)>,
}

/// What [`LogScan::recover`] did.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Unreadable spans dropped (each was copied to the quarantine directory first).
    pub dropped: Vec<BadSpan>,
    /// Copies of the damaged segments as they were.
    pub quarantined: Vec<PathBuf>,
}

impl LogScan {
    /// Read and check the held file and every segment of `dir`. Changes nothing on disk.
    pub fn read(dir: &Path) -> Result<LogScan> {
        let mut files: Vec<PathBuf> = Vec::new();
        let held = dir.join(HELD_FILE);
        if held.exists() {
            files.push(held);
        }
        files.extend(list_segments(dir)?.into_iter().map(|(_, p)| p));
        let mut segments = Vec::with_capacity(files.len());
        let mut max_lsn = 0u64;
        for path in files {
            let mut data = Vec::new();
            File::open(&path).and_then(|mut fh| fh.read_to_end(&mut data)).map_err(|e| EngineError::io(&path, e))?;
            let mut records = Vec::new();
            let mut bad = Vec::new();
            let mut pos = 0usize;
            while pos < data.len() {
                if let Some((rec, next)) = decode_at(&data, pos).filter(|(r, _)| r.lsn > max_lsn) {
                    max_lsn = rec.lsn;
                    records.push((pos, next));
                    pos = next;
                    continue;
                }
                // Zeros to the end: the zero-filled space after the last record, the clean end.
                if data[pos..].iter().all(|&b| b == 0) {
                    break;
                }
                // Unreadable here: look for the next valid record (resynchronise on the framing).
                match resync(&data, pos + 1, max_lsn) {
                    Some(q) => {
                        let before = decode_at(&data, q).map(|(r, _)| r.lsn);
                        bad.push(BadSpan { path: path.clone(), offset: pos, len: q - pos, after_lsn: max_lsn, before_lsn: before });
                        pos = q;
                    }
                    None => {
                        bad.push(BadSpan { path: path.clone(), offset: pos, len: data.len() - pos, after_lsn: max_lsn, before_lsn: None });
                        pos = data.len();
                    }
                }
            }
            segments.push(SegmentScan { path, data, records, bad });
        }
        // The last unreadable span is a torn tail when nothing valid follows it in any later file.
        let mut torn = None;
        for (i, s) in segments.iter().enumerate().rev() {
            if let Some(last) = s.bad.last() {
                let valid_after = s.records.last().is_some_and(|r| r.0 > last.offset);
                if last.before_lsn.is_none() && !valid_after && s.path.file_name().is_some_and(|n| n != HELD_FILE) {
                    torn = Some((i, last.offset));
                }
                break;
            }
            if !s.records.is_empty() {
                break;
            }
        }
        let mut scan = LogScan { dir: dir.to_path_buf(), segments, torn };
        // A later valid record makes every span before it damage; fix up `before_lsn` across files.
        let mut next_valid: Option<u64> = None;
        for s in scan.segments.iter_mut().rev() {
            let mut recs = s.records.iter().rev().peekable();
            for b in s.bad.iter_mut().rev() {
                while let Some(r) = recs.peek() {
                    if r.0 > b.offset {
                        next_valid = decode_at(&s.data, r.0).map(|(r, _)| r.lsn);
                        recs.next();
                    } else {
                        break;
                    }
                }
                if b.before_lsn.is_none() {
                    b.before_lsn = next_valid;
                }
            }
            if let Some(r) = s.records.first() {
                next_valid = decode_at(&s.data, r.0).map(|(r, _)| r.lsn);
            }
        }
        if let Some((i, off)) = scan.torn {
            if scan.segments[i].bad.last().is_some_and(|b| b.offset == off && b.before_lsn.is_some()) {
                scan.torn = None;
            }
        }
        Ok(scan)
    }

    /// Unreadable spans that are not the torn tail: acknowledged writes may be in them.
    pub fn damage(&self) -> Vec<BadSpan> {
        let mut out = Vec::new();
        for (i, s) in self.segments.iter().enumerate() {
            for b in &s.bad {
                if self.torn != Some((i, b.offset)) {
                    out.push(b.clone());
                }
            }
        }
        out
    }

    /// The torn tail, if the log ends in one.
    pub fn torn_tail(&self) -> Option<BadSpan> {
        self.torn.and_then(|(i, off)| self.segments[i].bad.iter().find(|b| b.offset == off).cloned())
    }

    /// Cut the torn tail (the only unreadable bytes that may be dropped silently: a crash mid-append).
    pub fn cut_torn_tail(&mut self) -> Result<()> {
        let Some((i, at)) = self.torn.take() else { return Ok(()) };
        let s = &mut self.segments[i];
        tracing::warn!(segment = %s.path.display(), offset = at, bytes_dropped = s.data.len() - at, "write-ahead log: torn tail (a record cut short by a crash); cutting it, everything before is kept");
        let fh = OpenOptions::new().write(true).open(&s.path).map_err(|e| EngineError::io(&s.path, e))?;
        fh.set_len(at as u64).map_err(|e| EngineError::io(&s.path, e))?;
        fh.sync_all().map_err(|e| EngineError::io(&s.path, e))?;
        s.data.truncate(at);
        s.bad.retain(|b| b.offset != at);
        Ok(())
    }

    /// Recovery from damage: copy every damaged file to `quarantine/`, then rewrite it with only its valid
    /// records. Acknowledged writes inside the unreadable spans are lost; the spans are returned so the
    /// operator knows which LSNs they sat between.
    pub fn recover(&mut self) -> Result<Recovery> {
        let mut out = Recovery::default();
        let qdir = self.dir.join(QUARANTINE_DIR);
        for s in &mut self.segments {
            if s.bad.is_empty() {
                continue;
            }
            fs::create_dir_all(&qdir).map_err(|e| EngineError::io(&qdir, e))?;
            let name = s.path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let q = qdir.join(format!("{name}.{stamp}.damaged"));
            fs::write(&q, &s.data).map_err(|e| EngineError::io(&q, e))?;
            File::open(&q).and_then(|f| f.sync_all()).map_err(|e| EngineError::io(&q, e))?;
            sync_dir(&qdir)?;
            let mut clean = Vec::with_capacity(s.data.len());
            let mut records = Vec::with_capacity(s.records.len());
            for &(a, b) in &s.records {
                let at = clean.len();
                clean.extend_from_slice(&s.data[a..b]);
                records.push((at, clean.len()));
            }
            let tmp = s.path.with_extension("log.recovering");
            fs::write(&tmp, &clean).map_err(|e| EngineError::io(&tmp, e))?;
            File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| EngineError::io(&tmp, e))?;
            fs::rename(&tmp, &s.path).map_err(|e| EngineError::io(&s.path, e))?;
            sync_dir(&self.dir)?;
            for b in s.bad.drain(..) {
                tracing::warn!(span = %b, quarantined = %q.display(), "write-ahead log recovery: dropped unreadable bytes");
                out.dropped.push(b);
            }
            s.data = clean;
            s.records = records;
            out.quarantined.push(q);
        }
        self.torn = None;
        Ok(out)
    }

    /// Every valid record in log order (held file first).
    pub fn records(&self) -> impl Iterator<Item = Record<'_>> + '_ {
        self.segments.iter().flat_map(|s| s.records.iter().filter_map(move |&(a, _)| decode_at(&s.data, a).map(|(r, _)| r)))
    }

    /// Every valid record with its encoded bytes (for carrying records into the held file).
    pub fn records_raw(&self) -> impl Iterator<Item = (Record<'_>, &[u8])> + '_ {
        self.segments
            .iter()
            .flat_map(|s| s.records.iter().filter_map(move |&(a, b)| decode_at(&s.data, a).map(|(r, _)| (r, &s.data[a..b]))))
    }

    /// LSNs cancelled by `Abort` records (writes that failed after being logged).
    pub fn aborted(&self) -> std::collections::HashSet<u64> {
        self.records()
            .filter(|r| r.op == Op::Abort)
            .filter_map(|r| r.payload.get(0..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes))
            .collect()
    }

    /// Highest LSN of any valid record.
    pub fn max_lsn(&self) -> u64 {
        self.records().map(|r| r.lsn).max().unwrap_or(0)
    }
}

/// Replace the held file with `records` (already-encoded records, in LSN order), or remove it when empty.
pub fn write_held(dir: &Path, records: &[Vec<u8>]) -> Result<()> {
    let path = dir.join(HELD_FILE);
    if records.is_empty() {
        if path.exists() {
            fs::remove_file(&path).map_err(|e| EngineError::io(&path, e))?;
            sync_dir(dir)?;
        }
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let tmp = dir.join("held.log.tmp");
    let mut f = File::create(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
    for r in records {
        f.write_all(r).map_err(|e| EngineError::io(&tmp, e))?;
    }
    f.sync_all().map_err(|e| EngineError::io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| EngineError::io(&path, e))?;
    sync_dir(dir)
}

/// The next offset at or after `from` where a valid record with an LSN after `after_lsn` starts.
fn resync(data: &[u8], from: usize, after_lsn: u64) -> Option<usize> {
    (from..data.len().saturating_sub(HEADER + 10)).find(|&q| decode_at(data, q).is_some_and(|(r, _)| r.lsn > after_lsn))
}

/// Read every valid record of every segment, calling `f` for each in order (for tools and tests; the
/// engine uses [`LogScan`]). A torn tail is cut; damage is an error and changes nothing.
pub fn replay(dir: &Path, mut f: impl FnMut(Record<'_>) -> Result<()>) -> Result<u64> {
    let mut scan = LogScan::read(dir)?;
    let damage = scan.damage();
    if let Some(d) = damage.first() {
        return Err(EngineError::Corrupt { path: d.path.display().to_string(), reason: format!("write-ahead log damaged: {d}") });
    }
    scan.cut_torn_tail()?;
    for r in scan.records() {
        f(r)?;
    }
    Ok(scan.max_lsn())
}

/// Where the valid records at the start of `data` end: the logical end of a segment.
fn records_end(data: &[u8]) -> usize {
    let mut pos = 0;
    let mut last = 0;
    while let Some((r, next)) = decode_at(data, pos).filter(|(r, _)| r.lsn > last) {
        last = r.lsn;
        pos = next;
    }
    pos
}

/// The logical end of the segment file at `path` (for tools and tests that damage a log on purpose).
pub fn segment_end(path: &Path) -> Result<u64> {
    let data = fs::read(path).map_err(|e| EngineError::io(path, e))?;
    Ok(records_end(&data) as u64)
}

fn decode_at(data: &[u8], pos: usize) -> Option<(Record<'_>, usize)> {
    let hdr = data.get(pos..pos.checked_add(HEADER)?)?;
    let len = u32::from_le_bytes(hdr[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(hdr[4..8].try_into().ok()?);
    if len < 11 {
        return None;
    }
    let body = data.get(pos + HEADER..(pos + HEADER).checked_add(len)?)?;
    // Cheap plausibility checks first: resynchronisation calls this at every offset of a damaged span.
    let op = Op::from_u8(body[8] & !ORIGIN_FLAG)?;
    let trailer = if body[8] & ORIGIN_FLAG != 0 { 8 } else { 0 };
    let klen = u16::from_le_bytes(body[9..11].try_into().ok()?) as usize;
    if 11 + klen + trailer > len {
        return None;
    }
    if crc32c::crc32c(body) != crc {
        return None;
    }
    let lsn = u64::from_le_bytes(body[0..8].try_into().ok()?);
    if lsn == 0 || lsn > MAX_LSN {
        return None;
    }
    let key = std::str::from_utf8(body.get(11..11 + klen)?).ok()?;
    let payload = body.get(11 + klen..len - trailer)?;
    let origin = match trailer {
        0 => None,
        _ => Some(u64::from_le_bytes(body.get(len - 8..)?.try_into().ok()?)).filter(|o| *o <= MAX_LSN),
    };
    if trailer != 0 && origin.is_none() {
        return None;
    }
    Some((Record { lsn, op, key, payload, origin }, pos + HEADER + len))
}

impl WalWriter {
    /// Open the segment for records from `next_lsn` on: a new file, or the existing one of that name
    /// (start-up opens it twice; such a file can hold no record yet, every LSN in the log is below
    /// `next_lsn`). Its zero-filled space is kept; anything else after its records is cut.
    pub fn create(dir: &Path, next_lsn: u64) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        let path = dir.join(segment_name(next_lsn));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| EngineError::io(&path, e))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(|e| EngineError::io(&path, e))?;
        let size = records_end(&data);
        let mut allocated = data.len() as u64;
        if data[size..].iter().any(|&b| b != 0) {
            file.set_len(size as u64).and_then(|_| file.sync_data()).map_err(|e| EngineError::io(&path, e))?;
            allocated = size as u64;
        }
        let size = size as u64;
        file.seek(SeekFrom::Start(size)).map_err(|e| EngineError::io(&path, e))?;
        sync_dir(dir)?;
        Ok(WalWriter { dir: dir.to_path_buf(), file, path, size, allocated })
    }

    /// Append a group of records and make them durable (one fdatasync for the whole group).
    ///
    /// On failure nothing of the group stays in the log: a failed or short write (a full disk) is cut back
    /// to the previous end, so a write reported as failed never reappears at replay. Only when even that
    /// cannot be made durable does this return [`EngineError::Unavailable`], meaning the log can no longer
    /// be trusted and the engine must stop writing.
    pub fn append_durable(&mut self, group: &Group) -> Result<()> {
        let bytes = group.bytes as u64;
        self.zero_fill_for(bytes);
        match self.write_group(group) {
            Ok(()) => {
                self.size += bytes;
                self.allocated = self.allocated.max(self.size);
                Ok(())
            }
            Err(e) => {
                // Cut back to the last record (giving up the zero-filled space: the bytes of the failed
                // write may sit in it) and put the cursor there again.
                self.allocated = self.size;
                let undo = self
                    .file
                    .set_len(self.size)
                    .and_then(|_| self.file.seek(SeekFrom::Start(self.size)))
                    .and_then(|_| self.file.sync_data());
                match undo {
                    Ok(()) => Err(e),
                    Err(u) => Err(EngineError::Unavailable(format!(
                        "write-ahead log {} failed ({e}) and could not be cut back ({u}); writes are stopped",
                        self.path.display()
                    ))),
                }
            }
        }
    }

    /// Make sure `bytes` more fit into zero-filled space, extending it by whole [`PREALLOC_BYTES`] steps.
    /// Best effort: when the zeros cannot be written (a full disk), the append grows the file as it would
    /// without them, and what was written of the zeros is harmless (zeros after the records are the end).
    fn zero_fill_for(&mut self, bytes: u64) {
        let need = self.size.saturating_add(bytes);
        if need <= self.allocated || bytes >= GROW_DIRECTLY_BYTES {
            return;
        }
        let target = need.div_ceil(PREALLOC_BYTES).saturating_mul(PREALLOC_BYTES);
        let zeros = vec![0u8; (target - self.allocated).min(PREALLOC_BYTES) as usize];
        let mut at = self.allocated;
        let filled = (|| -> std::io::Result<()> {
            while at < target {
                let n = (target - at).min(zeros.len() as u64) as usize;
                self.file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            self.file.sync_data()
        })();
        match filled {
            Ok(()) => self.allocated = target,
            Err(e) => {
                tracing::debug!(segment = %self.path.display(), "write-ahead log: cannot zero-fill ahead ({e}); appending at the end");
                let _ = self.file.set_len(self.allocated);
            }
        }
    }

    fn write_group(&mut self, group: &Group) -> Result<()> {
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
        self.file.sync_data().map_err(|e| EngineError::io(&self.path, e))
    }

    /// Bytes of records in the active segment (its zero-filled space not counted).
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

/// Replace `dir/name` with `bytes` durably: a temporary file, fsync'd, renamed over it, the directory
/// fsync'd. A crash leaves the old content or the new, never a torn file.
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
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
        encode_record_with(&mut g, 2, Op::Write, "A/1Min/X", None, |b| b.extend_from_slice(b"wo"), &[arrow::buffer::Buffer::from(b"rld".as_slice())]);
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

    fn group_of(first_lsn: u64, n: u64, payload: &[u8]) -> Group {
        let mut g = Group::default();
        for lsn in first_lsn..first_lsn + n {
            encode_record(&mut g, lsn, Op::Write, "A/1Min/X", |b| b.extend_from_slice(payload));
        }
        g
    }

    /// Small appends overwrite zero-filled space (the file's length moves in whole steps, not per append);
    /// the zeros after the records read as the clean end; reopening the segment continues at its last
    /// record; a large group grows the file itself.
    #[test]
    fn appends_go_into_zero_filled_space_and_the_zeros_are_the_clean_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 1).unwrap();
        let path = w.path.clone();
        let len = || fs::metadata(&path).unwrap().len();
        assert_eq!(len(), 0, "a segment is zero-filled when the first append needs it");
        w.append_durable(&group_of(1, 1, b"a")).unwrap();
        assert_eq!(len(), PREALLOC_BYTES);
        let mut written = w.size();
        for lsn in 2..=100 {
            let g = group_of(lsn, 1, &[7u8; 600]);
            written += g.len() as u64;
            w.append_durable(&g).unwrap();
            assert_eq!(len(), PREALLOC_BYTES, "append {lsn} stays inside the zero-filled space");
        }
        assert_eq!(w.size(), written);
        assert_eq!(segment_end(&path).unwrap(), written);
        let scan = LogScan::read(dir.path()).unwrap();
        assert!(scan.damage().is_empty() && scan.torn_tail().is_none(), "zeros after the records are no damage");
        assert_eq!(scan.records().count(), 100);
        drop(w);
        // Start-up opens the segment of the next LSN again (no record of it yet): it continues at the end.
        let mut w = WalWriter::create(dir.path(), 101).unwrap();
        w.append_durable(&group_of(101, 1, b"b")).unwrap();
        let mut w1 = WalWriter::create(dir.path(), 101).unwrap();
        assert_eq!(w1.size(), w.size(), "reopened at its last record");
        w1.append_durable(&group_of(102, 1, b"c")).unwrap();
        drop((w, w1));
        let mut seen = vec![];
        replay(dir.path(), |r| {
            seen.push(r.lsn);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, (1..=102).collect::<Vec<_>>());
        // A group of a quarter step or more is written at the end, growing the file, not zero-filled first.
        let big = group_of(103, 1, &vec![1u8; GROW_DIRECTLY_BYTES as usize]);
        let mut w = WalWriter::create(dir.path(), 103).unwrap();
        let seg = w.path.clone();
        w.append_durable(&big).unwrap();
        assert_eq!(fs::metadata(&seg).unwrap().len(), big.len() as u64);
    }

    /// Bytes after a segment's records that are not zeros (a torn write into the zero-filled space) are a
    /// torn tail for the scan, and opening the segment for writing cuts them.
    #[test]
    fn garbage_in_the_zero_filled_space_is_a_torn_tail_and_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 1).unwrap();
        w.append_durable(&group_of(1, 3, b"x")).unwrap();
        let end = w.size();
        let path = w.path.clone();
        drop(w);
        let fh = OpenOptions::new().write(true).open(&path).unwrap();
        fh.write_all_at(&[9, 9, 9], end + 100).unwrap();
        let scan = LogScan::read(dir.path()).unwrap();
        assert!(scan.damage().is_empty());
        assert_eq!(scan.torn_tail().map(|t| t.offset as u64), Some(end));
        let w = WalWriter::create(dir.path(), 1).unwrap();
        assert_eq!((w.size(), fs::metadata(&path).unwrap().len()), (end, end));
    }

    /// A record's upstream position rides in the same frame, under its checksum; records without one
    /// decode as before, and a flipped bit in the position makes the record unreadable, not different.
    #[test]
    fn origin_trailer_round_trips_and_is_checksummed() {
        let mut g = Group::default();
        encode_record_from(&mut g, 7, Op::Destroy, "A/1Min/X", Some(41), |_| {});
        encode_record_with(&mut g, 8, Op::Write, "A/1Min/X", Some(42), |b| b.extend_from_slice(b"he"), &[arrow::buffer::Buffer::from(b"llo".as_slice())]);
        encode_record(&mut g, 9, Op::Write, "A/1Min/X", |b| b.extend_from_slice(b"plain"));
        let flat: Vec<u8> = g.pieces.iter().flat_map(|p| p.as_slice().to_vec()).collect();
        assert_eq!(flat.len(), g.len());
        let mut pos = 0;
        let mut seen = vec![];
        while let Some((r, next)) = decode_at(&flat, pos) {
            seen.push((r.lsn, r.op, r.payload.to_vec(), r.origin));
            pos = next;
        }
        assert_eq!(
            seen,
            vec![(7, Op::Destroy, vec![], Some(41)), (8, Op::Write, b"hello".to_vec(), Some(42)), (9, Op::Write, b"plain".to_vec(), None)]
        );
        let first_len = HEADER + u32::from_le_bytes(flat[0..4].try_into().unwrap()) as usize;
        let mut bad = flat.clone();
        bad[first_len - 1] ^= 1; // the first record's position
        assert!(decode_at(&bad, 0).is_none());
    }
}
