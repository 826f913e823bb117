//! VARIABLE records (§1.6): slot `p` at `37024 + 24p` holds `{Index, Offset, Len}`; the blob at
//! `Offset..Offset+Len` is the interval's tick records `[columns…][IntervalTicks uint32]`, Snappy block
//! compressed unless MarketStore ran with `disable_variable_compression: true` (not recorded in the file).

use super::header::{HEADER_SIZE, TICKS_LEN, VARIABLE_SLOT};

/// One occupied indirect slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndirectSlot {
    /// Byte offset of the slot itself.
    pub at: u64,
    pub index: i64,
    pub blob_offset: i64,
    pub blob_len: i64,
}

/// Occupied slots of the preallocated region (`slots` entries), and how much of it the file lacks.
pub fn slots(bytes: &[u8], slot_count: usize) -> (Vec<IndirectSlot>, Option<(u64, String)>) {
    let mut out = Vec::new();
    let region_end = slot_count.checked_mul(VARIABLE_SLOT).and_then(|n| n.checked_add(HEADER_SIZE)).unwrap_or(usize::MAX);
    let end = region_end.min(bytes.len());
    let mut at = HEADER_SIZE;
    while at + VARIABLE_SLOT <= end {
        let index = super::le_i64(bytes, at).unwrap_or(0);
        if index != 0 {
            out.push(IndirectSlot {
                at: at as u64,
                index,
                blob_offset: super::le_i64(bytes, at + 8).unwrap_or(0),
                blob_len: super::le_i64(bytes, at + 16).unwrap_or(0),
            });
        }
        at += VARIABLE_SLOT;
    }
    let damage = (bytes.len() < region_end).then(|| {
        (bytes.len() as u64, format!("truncated: the file ends inside its {slot_count}-slot index region"))
    });
    (out, damage)
}

/// Why a blob does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobError {
    /// Offset/length point outside the file.
    OutOfFile(String),
    /// The bytes are not what the compression setting says (wrong setting, or damage).
    Undecodable(String),
}

/// The tick records of a slot: its blob, decompressed when `compressed`, whole records only.
pub fn blob(bytes: &[u8], slot: &IndirectSlot, compressed: bool, var_record_len: usize) -> Result<Vec<u8>, BlobError> {
    let start = usize::try_from(slot.blob_offset).map_err(|_| BlobError::OutOfFile(format!("negative blob offset {}", slot.blob_offset)))?;
    let len = usize::try_from(slot.blob_len).map_err(|_| BlobError::OutOfFile(format!("negative blob length {}", slot.blob_len)))?;
    let end = start.checked_add(len).ok_or_else(|| BlobError::OutOfFile("blob offset + length overflows".into()))?;
    let raw = bytes.get(start..end).ok_or_else(|| {
        BlobError::OutOfFile(format!("blob {start}..{end} lies beyond the end of the file ({} bytes)", bytes.len()))
    })?;
    let data = if compressed {
        let n = snap::raw::decompress_len(raw).map_err(|e| BlobError::Undecodable(format!("not Snappy data: {e}")))?;
        // A Snappy block can expand at most ~6x per byte of input plus literals; a claimed length far beyond
        // that is not a blob MarketStore wrote, and must not allocate gigabytes.
        if n > raw.len().saturating_mul(64).saturating_add(1 << 16) {
            return Err(BlobError::Undecodable(format!("Snappy header claims {n} bytes from {} input bytes", raw.len())));
        }
        snap::raw::Decoder::new().decompress_vec(raw).map_err(|e| BlobError::Undecodable(format!("not Snappy data: {e}")))?
    } else {
        raw.to_vec()
    };
    if var_record_len == 0 || data.len() % var_record_len != 0 {
        return Err(BlobError::Undecodable(format!(
            "{} bytes are not a whole number of {var_record_len}-byte tick records",
            data.len()
        )));
    }
    Ok(data)
}

/// IntervalTicks of a tick record (its last 4 bytes).
pub fn record_ticks(record: &[u8]) -> u32 {
    let n = record.len();
    if n < TICKS_LEN {
        return 0;
    }
    super::le_u32(record, n - TICKS_LEN).unwrap_or(0)
}

/// MarketStore's merge of new tick records into an interval (`WriteBufferToFileIndirect`): old records,
/// then new ones, stable-sorted by IntervalTicks.
pub fn merge(old: &[u8], new: &[u8], var_record_len: usize) -> Vec<u8> {
    let mut recs: Vec<&[u8]> = old.chunks_exact(var_record_len).chain(new.chunks_exact(var_record_len)).collect();
    recs.sort_by_key(|r| record_ticks(r));
    recs.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_blob(blob: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE + 2 * VARIABLE_SLOT];
        let off = b.len() as i64;
        b[HEADER_SIZE + 24..HEADER_SIZE + 32].copy_from_slice(&2i64.to_le_bytes());
        b[HEADER_SIZE + 32..HEADER_SIZE + 40].copy_from_slice(&off.to_le_bytes());
        b[HEADER_SIZE + 40..HEADER_SIZE + 48].copy_from_slice(&(blob.len() as i64).to_le_bytes());
        b.extend_from_slice(blob);
        b
    }

    #[test]
    fn snappy_and_raw_blobs() {
        let mut recs = Vec::new();
        for (px, t) in [(1.0f32, 30u32), (2.0, 10)] {
            recs.extend_from_slice(&px.to_le_bytes());
            recs.extend_from_slice(&t.to_le_bytes());
        }
        let comp = snap::raw::Encoder::new().compress_vec(&recs).unwrap();
        let f = file_with_blob(&comp);
        let (s, d) = slots(&f, 2);
        assert!(d.is_none());
        assert_eq!(s.len(), 1);
        assert_eq!(blob(&f, &s[0], true, 8).unwrap(), recs);
        // The same bytes read as uncompressed are not whole records (or garbage): refused, no panic.
        let raw = file_with_blob(&recs);
        let (s2, _) = slots(&raw, 2);
        assert_eq!(blob(&raw, &s2[0], false, 8).unwrap(), recs);
        assert!(matches!(blob(&raw, &s2[0], true, 8), Err(BlobError::Undecodable(_))));
    }

    #[test]
    fn blob_out_of_file_is_an_error() {
        let mut f = file_with_blob(&[1, 2, 3, 4]);
        f.truncate(f.len() - 2);
        let (s, _) = slots(&f, 2);
        assert!(matches!(blob(&f, &s[0], false, 4), Err(BlobError::OutOfFile(_))));
        let bad = IndirectSlot { at: 0, index: 1, blob_offset: i64::MAX, blob_len: i64::MAX };
        assert!(blob(&f, &bad, true, 4).is_err());
    }

    #[test]
    fn merge_is_stable_by_ticks() {
        let rec = |v: u8, t: u32| {
            let mut r = vec![v];
            r.extend_from_slice(&t.to_le_bytes());
            r
        };
        let old = [rec(1, 5), rec(2, 9)].concat();
        let new = [rec(3, 5), rec(4, 1)].concat();
        let m = merge(&old, &new, 5);
        let vals: Vec<u8> = m.chunks(5).map(|r| r[0]).collect();
        assert_eq!(vals, vec![4, 1, 3, 2]);
    }
}
