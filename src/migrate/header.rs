//! MarketStore's data file header (`io.Header`, §1.2): 37,024 bytes, little-endian.
//!
//! Only what the reader needs is decoded: year, timeframe (a duration in nanoseconds), record type, the
//! element names (32 bytes each, NUL-padded) and type codes, and the record length.

use crate::engine::ColumnType;

/// Size of the header; slot 1 starts right after it.
pub const HEADER_SIZE: usize = 37_024;
const NAMES_AT: usize = 312;
const NAME_WIDTH: usize = 32;
const TYPES_AT: usize = 33_080;
const MAX_ELEMENTS: usize = 1024;
/// Bytes of one VARIABLE slot: `{Index, Offset, Len}` int64s.
pub const VARIABLE_SLOT: usize = 24;
/// Bytes of the IntervalTicks field that ends every variable record.
pub const TICKS_LEN: usize = 4;

/// FIXED (one record per interval slot) or VARIABLE (an indirect blob of tick records per slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordType {
    Fixed,
    Variable,
}

/// A decoded header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: i64,
    pub year: i64,
    /// Bucket duration in nanoseconds.
    pub timeframe_ns: i64,
    pub record_type: RecordType,
    /// Data columns (without Epoch, and without Nanoseconds for VARIABLE) in file order.
    pub columns: Vec<(String, ColumnType)>,
    /// FIXED: bytes per slot (8-byte index + packed columns, padded to 8). VARIABLE: 24.
    pub record_length: usize,
}

impl Header {
    /// Bytes of the packed columns of one record.
    pub fn payload_len(&self) -> usize {
        self.columns.iter().map(|(_, t)| t.width()).sum()
    }

    /// VARIABLE: bytes of one tick record (columns + IntervalTicks), MarketStore's `VariableRecordLength`.
    pub fn var_record_len(&self) -> usize {
        self.payload_len() + TICKS_LEN
    }
}

/// MarketStore element type code (§1.5) → mkts column type; `Err` names the codes mkts cannot store.
pub fn element_type(code: u8) -> Result<ColumnType, String> {
    Ok(match code {
        0 => ColumnType::F32,
        1 => ColumnType::I32,
        2 => ColumnType::F64,
        3 => ColumnType::I64,
        5 => ColumnType::I8,
        6 => ColumnType::Bool,
        9 => ColumnType::I16,
        10 => ColumnType::U8,
        11 => ColumnType::U16,
        12 => ColumnType::U32,
        13 => ColumnType::U64,
        14 => ColumnType::String16,
        4 => return Err("element type EPOCH (4, deprecated) is not a storable column".into()),
        7 => return Err("element type NONE (7) has no size and cannot be stored".into()),
        8 => return Err("element type STRING (8) has no size and cannot be stored".into()),
        c => return Err(format!("unknown element type code {c}")),
    })
}

/// Decode a header. `Err((offset, reason))` points at the first field that makes no sense.
pub fn parse(bytes: &[u8]) -> Result<Header, (u64, String)> {
    if bytes.len() < HEADER_SIZE {
        return Err((bytes.len() as u64, format!("file is {} bytes, shorter than the {HEADER_SIZE}-byte header", bytes.len())));
    }
    let i64_at = |at: usize| super::le_i64(bytes, at).unwrap_or(0);
    let version = i64_at(0);
    let year = i64_at(264);
    let timeframe_ns = i64_at(272);
    let record_type = match i64_at(280) {
        0 => RecordType::Fixed,
        1 => RecordType::Variable,
        other => return Err((280, format!("record type {other} is neither FIXED (0) nor VARIABLE (1)"))),
    };
    let n = i64_at(288);
    if n < 0 || n as usize > MAX_ELEMENTS {
        return Err((288, format!("element count {n} outside 0..={MAX_ELEMENTS}")));
    }
    if timeframe_ns <= 0 {
        return Err((272, format!("timeframe {timeframe_ns} ns is not positive")));
    }
    let mut columns = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        let at = NAMES_AT + i * NAME_WIDTH;
        let raw = &bytes[at..at + NAME_WIDTH];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(NAME_WIDTH);
        let name = std::str::from_utf8(&raw[..end]).map_err(|_| (at as u64, format!("element name {i} is not UTF-8")))?;
        if name.is_empty() {
            return Err((at as u64, format!("element name {i} is empty")));
        }
        let ty = element_type(bytes[TYPES_AT + i]).map_err(|r| ((TYPES_AT + i) as u64, format!("column {name:?}: {r}")))?;
        columns.push((name.to_string(), ty));
    }
    let rl = i64_at(296);
    let payload: usize = columns.iter().map(|(_, t)| t.width()).sum();
    let record_length = match record_type {
        RecordType::Fixed => {
            let expect = 8 + payload.div_ceil(8) * 8;
            if rl < 0 || (rl as usize) < 8 + payload {
                return Err((296, format!("record length {rl} cannot hold an index and {payload} bytes of columns")));
            }
            if rl as usize != expect {
                // MarketStore reads with the recorded length; so do we, but the columns must fit.
                rl as usize
            } else {
                expect
            }
        }
        RecordType::Variable => VARIABLE_SLOT,
    };
    Ok(Header { version, year, timeframe_ns, record_type, columns, record_length })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header as MarketStore writes one (test helper shared by the decoder tests).
    pub(crate) fn make(year: i64, tf_ns: i64, rt: i64, cols: &[(&str, u8)]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&2i64.to_le_bytes());
        b[264..272].copy_from_slice(&year.to_le_bytes());
        b[272..280].copy_from_slice(&tf_ns.to_le_bytes());
        b[280..288].copy_from_slice(&rt.to_le_bytes());
        b[288..296].copy_from_slice(&(cols.len() as i64).to_le_bytes());
        let payload: usize = cols.iter().map(|(_, c)| element_type(*c).map(|t| t.width()).unwrap_or(0)).sum();
        let rl = if rt == 0 { 8 + payload.div_ceil(8) * 8 } else { 24 };
        b[296..304].copy_from_slice(&(rl as i64).to_le_bytes());
        for (i, (n, c)) in cols.iter().enumerate() {
            b[NAMES_AT + i * 32..NAMES_AT + i * 32 + n.len()].copy_from_slice(n.as_bytes());
            b[TYPES_AT + i] = *c;
        }
        b
    }

    #[test]
    fn parses_names_types_and_record_length() {
        let b = make(2020, 60_000_000_000, 0, &[("Open", 0), ("High", 0), ("Low", 0), ("Close", 0), ("Volume", 1)]);
        let h = parse(&b).unwrap();
        assert_eq!(h.year, 2020);
        assert_eq!(h.record_type, RecordType::Fixed);
        assert_eq!(h.record_length, 32);
        assert_eq!(h.columns[4], ("Volume".to_string(), ColumnType::I32));
    }

    #[test]
    fn refuses_short_and_nonsense_headers() {
        assert!(parse(&[0u8; 100]).is_err());
        let mut b = make(2020, 60_000_000_000, 0, &[("A", 0)]);
        b[280] = 7;
        assert_eq!(parse(&b).unwrap_err().0, 280);
        let mut b = make(2020, 60_000_000_000, 0, &[("A", 0)]);
        b[288..296].copy_from_slice(&(-1i64).to_le_bytes());
        assert_eq!(parse(&b).unwrap_err().0, 288);
        let b = make(2020, 60_000_000_000, 0, &[("S", 8)]);
        assert!(parse(&b).unwrap_err().1.contains("STRING"));
    }

    #[test]
    fn string16_is_64_bytes() {
        let b = make(2021, 86_400_000_000_000, 1, &[("Sym", 14), ("Px", 2)]);
        let h = parse(&b).unwrap();
        assert_eq!(h.var_record_len(), 64 + 8 + 4);
        assert_eq!(h.record_length, 24);
    }
}
