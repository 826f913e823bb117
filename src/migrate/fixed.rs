//! FIXED records (§1.4): slot `p` (0-based) at `37024 + p * RecordLength` holds `[index int64][columns…]
//! [padding]`; index 0 is a hole. The reader takes the epoch from the stored index, not the position, so
//! a 1D file (0-based indexes, Jan 1 written inside the header and never read back, §1.3) reads exactly as
//! MarketStore reads it.

use super::header::{Header, HEADER_SIZE};

/// Number of interval slots MarketStore preallocates for a year: `(Jan 1 next year − Jan 1) / timeframe`.
pub fn slots_in_year(year: i64, timeframe_ns: i64) -> Option<usize> {
    let y = i32::try_from(year).ok()?;
    let days = if chrono::NaiveDate::from_ymd_opt(y, 2, 29).is_some() { 366i64 } else { 365 };
    let ns = days.checked_mul(super::timeindex::DAY_NS)?;
    usize::try_from(ns.checked_div(timeframe_ns)?).ok()
}

/// One occupied slot: its byte offset, stored index and packed column bytes.
#[derive(Debug, Clone, Copy)]
pub struct Slot<'a> {
    pub offset: u64,
    pub index: i64,
    pub payload: &'a [u8],
}

/// The occupied slots of a fixed file in file order, and the damage found: a file shorter than its
/// preallocated size, or a partial record at its end (offset, reason).
pub fn slots<'a>(bytes: &'a [u8], header: &Header) -> (Vec<Slot<'a>>, Option<(u64, String)>) {
    let rl = header.record_length;
    let payload_len = header.payload_len();
    let mut out = Vec::new();
    let mut damage = None;
    if rl == 0 || bytes.len() < HEADER_SIZE {
        return (out, Some((bytes.len() as u64, "no record region".into())));
    }
    let region = &bytes[HEADER_SIZE..];
    let whole = region.len() / rl;
    for p in 0..whole {
        let at = p * rl;
        let index = super::le_i64(region, at).unwrap_or(0);
        if index == 0 {
            continue;
        }
        out.push(Slot { offset: (HEADER_SIZE + at) as u64, index, payload: &region[at + 8..at + 8 + payload_len] });
    }
    let tail = region.len() % rl;
    if tail != 0 {
        let at = HEADER_SIZE + whole * rl;
        damage = Some((at as u64, format!("truncated: a partial {tail}-byte record of {rl} at the end of the file is skipped")));
    } else if let Some(expect) = slots_in_year(header.year, header.timeframe_ns) {
        if whole < expect {
            damage = Some((bytes.len() as u64, format!("truncated: {whole} of the year's {expect} record slots are present; the rest is missing")));
        }
    }
    (out, damage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::header;

    #[test]
    fn holes_are_skipped_and_partial_tail_reported() {
        let mut b = header::tests::make(2021, 60_000_000_000, 0, &[("Close", 2)]);
        let expect = slots_in_year(2021, 60_000_000_000).unwrap();
        assert_eq!(expect, 525_600);
        b.resize(HEADER_SIZE + 16 * 3, 0);
        b[HEADER_SIZE + 16..HEADER_SIZE + 24].copy_from_slice(&2i64.to_le_bytes());
        b[HEADER_SIZE + 24..HEADER_SIZE + 32].copy_from_slice(&1.5f64.to_le_bytes());
        let h = header::parse(&b).unwrap();
        let (s, d) = slots(&b, &h);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].index, 2);
        assert_eq!(s[0].payload, &1.5f64.to_le_bytes());
        assert!(d.unwrap().1.contains("truncated"));
        b.push(7);
        let (_, d) = slots(&b, &h);
        assert_eq!(d.unwrap().0, (HEADER_SIZE + 48) as u64);
    }
}
