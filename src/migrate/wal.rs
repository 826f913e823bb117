//! MarketStore's write-ahead log (§1.7), read as its start-up replay (`WALFileType.Replay`) reads it.
//!
//! Pass 1 collects every TGDATA group by TGID and, on a CHECKPOINT/COMMITCOMPLETE TXNINFO for a TGID
//! already seen, drops every collected group with TGID ≤ it (those reached the `.bin` files durably).
//! What remains is replayed in ascending TGID. Differences, deliberate: a torn last group is *reported*
//! (MarketStore ends the pass silently); a group whose MD5 does not match is reported and skipped
//! (MarketStore logs and skips it too); an unknown message id or an impossible length stops the pass at
//! that offset with a report (MarketStore would scan on byte by byte).

use md5::{Digest, Md5};

use super::header::RecordType;
use super::Problem;
use std::path::Path;

const MID_TGDATA: u8 = 0;
const MID_TXNINFO: u8 = 1;
const MID_STATUS: u8 = 2;
const DEST_CHECKPOINT: i8 = 1;
const COMMIT_COMPLETE: i8 = 2;
/// ReplayState values that mean "not replayed yet".
const NOT_REPLAYED: i8 = 1;
const REPLAY_IN_PROCESS: i8 = 3;

/// One write of a transaction group: a FIXED record or a batch of VARIABLE tick records at one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalWrite {
    pub record_type: RecordType,
    /// Data file path relative to the root (`AAPL/1Min/OHLCV/2020.bin`).
    pub key_path: String,
    pub var_record_len: i32,
    /// Slot byte offset in the data file.
    pub offset: i64,
    pub index: i64,
    /// FIXED: one record's columns; VARIABLE: whole tick records.
    pub data: Vec<u8>,
    /// Column names and type codes as the writer saw them, Epoch first.
    pub data_shapes: Vec<(String, u8)>,
}

/// The writes of one WAL file still to apply, in replay order, and what was skipped.
#[derive(Debug, Default)]
pub struct Replay {
    pub groups: Vec<(i64, Vec<WalWrite>)>,
    pub problems: Vec<Problem>,
    /// False when the file is already replayed (or too short to hold anything), as MarketStore decides.
    pub needs_replay: bool,
}

fn parse_group(tg: &[u8]) -> Result<(i64, Vec<WalWrite>), String> {
    let short = |what: &str| format!("transaction group ends inside {what}");
    let tgid = super::le_i64(tg, 0).ok_or_else(|| short("its TGID"))?;
    let count = super::le_i64(tg, 8).ok_or_else(|| short("its write count"))?;
    if count < 0 || count as u64 > tg.len() as u64 {
        return Err(format!("impossible write count {count}"));
    }
    let mut at = 16usize;
    let mut writes = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let rt = *tg.get(at).ok_or_else(|| short("a record type"))? as i8;
        let record_type = match rt {
            0 => RecordType::Fixed,
            1 => RecordType::Variable,
            o => return Err(format!("record type {o} at group byte {at}")),
        };
        at += 1;
        let plen = super::le_i16(tg, at).ok_or_else(|| short("a key path length"))?;
        let plen = usize::try_from(plen).map_err(|_| format!("negative key path length {plen}"))?;
        at += 2;
        let path_end = at.checked_add(plen).ok_or_else(|| short("a key path"))?;
        let key_path = std::str::from_utf8(tg.get(at..path_end).ok_or_else(|| short("a key path"))?)
            .map_err(|_| "key path is not UTF-8".to_string())?
            .to_string();
        at = path_end;
        let dlen = super::le_i32(tg, at).ok_or_else(|| short("a data length"))?;
        let dlen = usize::try_from(dlen).map_err(|_| format!("negative data length {dlen}"))?;
        let var_record_len = super::le_i32(tg, at + 4).ok_or_else(|| short("a record length"))?;
        at += 8;
        let offset = super::le_i64(tg, at).ok_or_else(|| short("an offset"))?;
        let index = super::le_i64(tg, at + 8).ok_or_else(|| short("an index"))?;
        at += 16;
        let data_end = at.checked_add(dlen).ok_or_else(|| short("data"))?;
        let data = tg.get(at..data_end).ok_or_else(|| short("data"))?.to_vec();
        at = data_end;
        let n = *tg.get(at).ok_or_else(|| short("a data shape vector"))? as usize;
        at += 1;
        let mut data_shapes = Vec::with_capacity(n);
        for _ in 0..n {
            let nl = *tg.get(at).ok_or_else(|| short("a data shape"))? as usize;
            at += 1;
            let name = tg.get(at..at + nl).ok_or_else(|| short("a data shape name"))?;
            at += nl;
            let ty = *tg.get(at).ok_or_else(|| short("a data shape type"))?;
            at += 1;
            data_shapes.push((String::from_utf8_lossy(name).into_owned(), ty));
        }
        writes.push(WalWrite { record_type, key_path, var_record_len, offset, index, data, data_shapes });
    }
    Ok((tgid, writes))
}

/// Read one WAL file's bytes (named `path` in reports).
pub fn read(path: &Path, bytes: &[u8]) -> Replay {
    let mut out = Replay::default();
    // MarketStore deletes WAL files of at most 10 bytes without reading them.
    if bytes.len() <= 10 {
        return out;
    }
    if bytes[0] != MID_STATUS {
        out.problems.push(Problem::at(path, 0, format!("WAL file does not start with a STATUS message (id {})", bytes[0])));
        return out;
    }
    let replay_state = bytes[2] as i8;
    if replay_state != NOT_REPLAYED && replay_state != REPLAY_IN_PROCESS {
        return out;
    }
    out.needs_replay = true;
    let mut groups: std::collections::BTreeMap<i64, Vec<WalWrite>> = Default::default();
    let mut seen = std::collections::HashSet::new();
    let mut at = 0usize;
    let torn = |at: usize, what: &str| {
        Problem::at(path, at as u64, format!("torn WAL tail: the last {what} is incomplete ({} bytes); skipped", bytes.len() - at))
    };
    while at < bytes.len() {
        let start = at;
        match bytes[at] {
            MID_STATUS => {
                if at + 11 > bytes.len() {
                    out.problems.push(torn(start, "status message"));
                    break;
                }
                at += 11;
            }
            MID_TXNINFO => {
                if at + 11 > bytes.len() {
                    out.problems.push(torn(start, "transaction info"));
                    break;
                }
                let tgid = super::le_i64(bytes, at + 1).unwrap_or(0);
                let dest = bytes[at + 9] as i8;
                let status = bytes[at + 10] as i8;
                if dest == DEST_CHECKPOINT && status == COMMIT_COMPLETE && groups.contains_key(&tgid) {
                    groups.retain(|&id, _| id > tgid);
                }
                at += 11;
            }
            MID_TGDATA => {
                let Some(tglen) = super::le_i64(bytes, at + 1) else {
                    out.problems.push(torn(start, "transaction group"));
                    break;
                };
                if tglen < 16 {
                    out.problems.push(Problem::at(path, start as u64, format!("transaction group length {tglen} is impossible; the rest of this WAL file is not read")));
                    break;
                }
                let body = at + 9;
                let end = (tglen as u64).checked_add(body as u64 + 16);
                if end.is_none_or(|e| e > bytes.len() as u64) {
                    out.problems.push(torn(start, "transaction group"));
                    break;
                }
                let body_end = body + tglen as usize;
                let tg = &bytes[body..body_end];
                let mut h = Md5::new();
                h.update(&bytes[at + 1..body]);
                h.update(tg);
                let sum = h.finalize();
                at = body_end + 16;
                if sum.as_slice() != &bytes[body_end..body_end + 16] {
                    out.problems.push(Problem::at(path, start as u64, "transaction group fails its MD5 checksum; skipped"));
                    continue;
                }
                match parse_group(tg) {
                    Ok((tgid, writes)) => {
                        if !seen.insert(tgid) {
                            out.problems.push(Problem::at(path, start as u64, format!(
                                "duplicate transaction group {tgid}: MarketStore gives up replaying this WAL file, so does the import")));
                            out.groups.clear();
                            return out;
                        }
                        groups.insert(tgid, writes);
                    }
                    Err(reason) => out.problems.push(Problem::at(path, start as u64, format!("{reason}; group skipped"))),
                }
            }
            other => {
                out.problems.push(Problem::at(path, start as u64, format!("unknown WAL message id {other}; the rest of this WAL file is not read")));
                break;
            }
        }
    }
    out.groups = groups.into_iter().collect();
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn status(state: i8) -> Vec<u8> {
        let mut b = vec![MID_STATUS, 1, state as u8];
        b.extend_from_slice(&7i64.to_le_bytes());
        b
    }

    pub(crate) fn txn(tgid: i64, dest: i8, st: i8) -> Vec<u8> {
        let mut b = vec![MID_TXNINFO];
        b.extend_from_slice(&tgid.to_le_bytes());
        b.push(dest as u8);
        b.push(st as u8);
        b
    }

    pub(crate) fn tgdata(tgid: i64, w: &WalWrite) -> Vec<u8> {
        let mut tg = Vec::new();
        tg.extend_from_slice(&tgid.to_le_bytes());
        tg.extend_from_slice(&1i64.to_le_bytes());
        tg.push(if w.record_type == RecordType::Fixed { 0 } else { 1 });
        tg.extend_from_slice(&(w.key_path.len() as i16).to_le_bytes());
        tg.extend_from_slice(w.key_path.as_bytes());
        tg.extend_from_slice(&(w.data.len() as i32).to_le_bytes());
        tg.extend_from_slice(&w.var_record_len.to_le_bytes());
        tg.extend_from_slice(&w.offset.to_le_bytes());
        tg.extend_from_slice(&w.index.to_le_bytes());
        tg.extend_from_slice(&w.data);
        tg.push(w.data_shapes.len() as u8);
        for (n, t) in &w.data_shapes {
            tg.push(n.len() as u8);
            tg.extend_from_slice(n.as_bytes());
            tg.push(*t);
        }
        let len = (tg.len() as i64).to_le_bytes();
        let mut h = Md5::new();
        h.update(len);
        h.update(&tg);
        let mut b = vec![MID_TGDATA];
        b.extend_from_slice(&len);
        b.extend_from_slice(&tg);
        b.extend_from_slice(&h.finalize());
        b
    }

    fn write(i: i64) -> WalWrite {
        WalWrite {
            record_type: RecordType::Fixed,
            key_path: "A/1Min/OHLCV/2020.bin".into(),
            var_record_len: 12,
            offset: 37024 + 16 * (i - 1),
            index: i,
            data: 1.0f64.to_le_bytes().to_vec(),
            data_shapes: vec![("Epoch".into(), 3), ("Close".into(), 2)],
        }
    }

    #[test]
    fn checkpoint_drops_older_groups_and_torn_tail_is_reported() {
        let p = Path::new("w");
        let mut b = status(NOT_REPLAYED);
        b.extend(txn(10, 0, 0));
        b.extend(tgdata(10, &write(1)));
        b.extend(txn(10, 0, 2));
        b.extend(tgdata(11, &write(2)));
        b.extend(txn(10, DEST_CHECKPOINT, COMMIT_COMPLETE));
        b.extend(tgdata(12, &write(3)));
        let full = b.len();
        b.extend(&tgdata(13, &write(4))[..20]);
        let r = read(p, &b);
        assert!(r.needs_replay);
        let ids: Vec<i64> = r.groups.iter().map(|g| g.0).collect();
        assert_eq!(ids, vec![11, 12]);
        assert_eq!(r.groups[0].1[0], write(2));
        assert_eq!(r.problems.len(), 1);
        assert_eq!(r.problems[0].offset, Some(full as u64));
        assert!(r.problems[0].reason.contains("torn"));
    }

    #[test]
    fn bad_md5_skips_one_group_replayed_file_is_ignored() {
        let p = Path::new("w");
        let mut b = status(NOT_REPLAYED);
        let mut g = tgdata(5, &write(1));
        let n = g.len();
        g[n - 20] ^= 1;
        b.extend(g);
        b.extend(tgdata(6, &write(2)));
        let r = read(p, &b);
        assert_eq!(r.groups.len(), 1);
        assert!(r.problems[0].reason.contains("MD5"));
        let mut done = status(2);
        done.extend(tgdata(6, &write(2)));
        assert!(!read(p, &done).needs_replay);
        assert!(read(p, &done).groups.is_empty());
    }

    #[test]
    fn garbage_never_panics() {
        let p = Path::new("w");
        for len in 0..200 {
            let mut b = status(NOT_REPLAYED);
            b.extend((0..len).map(|i| (i * 37 % 251) as u8));
            let _ = read(p, &b);
        }
        let mut b = status(NOT_REPLAYED);
        b.push(MID_TGDATA);
        b.extend_from_slice(&i64::MAX.to_le_bytes());
        assert!(read(p, &b).problems[0].reason.contains("torn"));
    }
}
