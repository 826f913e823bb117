//! MarketStore's `NumpyMultiDataset` ⇄ Arrow.
//!
//! A NumpyMultiDataset is column-major: one little-endian byte string per column holding the rows of every
//! bucket back to back, plus `startindex`/`lengths` slicing it per bucket key. Reading, numeric columns are
//! the engine's mapped buffers handed out as zero-copy [`Bytes`] chunks (no per-row work); only strings
//! (UTF-32 `U16`), booleans and sub-second timestamps are converted. Writing, each column's bytes are copied
//! once into an aligned Arrow buffer and the engine validates, casts and sorts.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, PrimitiveArray, RecordBatch, StringArray};
use arrow::buffer::{Buffer, ScalarBuffer};
use arrow::compute::cast;
use arrow::datatypes::{self as adt, ArrowPrimitiveType, DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;

use crate::engine::{decode_string16, ColumnType, EPOCH, NANOSECONDS};

use super::value::Val;

/// A query result in NumpyMultiDataset form.
#[derive(Debug, Clone, Default)]
pub struct NumpyOut {
    /// numpy type strings (`i8`, `f4`, `U16`, …).
    pub types: Vec<String>,
    pub names: Vec<String>,
    /// Per column: the byte chunks whose concatenation is the column.
    pub columns: Vec<Vec<Bytes>>,
    /// Total rows.
    pub length: usize,
    /// `(key with categories, first row, row count)` per bucket, in result order.
    pub keys: Vec<(String, usize, usize)>,
}

/// One keyed part of a result (a bucket read, a function output, an SQL result).
pub struct Part {
    pub key: String,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

/// Keeps an Arrow buffer alive behind a [`Bytes`].
struct BufOwner(Buffer);

impl AsRef<[u8]> for BufOwner {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

fn buffer_bytes(b: Buffer) -> Bytes {
    if b.is_empty() {
        Bytes::new()
    } else {
        Bytes::from_owner(BufOwner(b))
    }
}

/// How an Arrow column travels: numpy type string and the per-row conversion (if any).
#[derive(Debug, Clone, PartialEq)]
enum Wire {
    /// Fixed-width primitive: the values buffer as is.
    Raw(&'static str, usize),
    /// Timestamp of a sub-second unit: converted to whole seconds (`i8`).
    Seconds(i64),
    /// Strings as NUL-padded UTF-32LE of `n` code points (`U<n>`).
    Utf32(usize),
    /// Booleans as one byte each (`b1`).
    Bool,
    /// Anything else: cast to f8 (or to strings when not numeric).
    Cast(DataType),
    /// Byte strings: numpy datasets have no type for them.
    Unsupported,
}

fn wire_of(dt: &DataType) -> Wire {
    match dt {
        DataType::Int8 => Wire::Raw("i1", 1),
        DataType::Int16 => Wire::Raw("i2", 2),
        DataType::Int32 => Wire::Raw("i4", 4),
        DataType::Int64 => Wire::Raw("i8", 8),
        DataType::UInt8 => Wire::Raw("u1", 1),
        DataType::UInt16 => Wire::Raw("u2", 2),
        DataType::UInt32 => Wire::Raw("u4", 4),
        DataType::UInt64 => Wire::Raw("u8", 8),
        DataType::Float32 => Wire::Raw("f4", 4),
        DataType::Float64 => Wire::Raw("f8", 8),
        DataType::Timestamp(TimeUnit::Second, _) => Wire::Raw("i8", 8),
        DataType::Timestamp(TimeUnit::Millisecond, _) => Wire::Seconds(1_000),
        DataType::Timestamp(TimeUnit::Microsecond, _) => Wire::Seconds(1_000_000),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => Wire::Seconds(1_000_000_000),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Wire::Utf32(16),
        DataType::Boolean => Wire::Bool,
        DataType::Float16 | DataType::Decimal128(..) | DataType::Decimal256(..) => Wire::Cast(DataType::Float64),
        DataType::Date32 | DataType::Date64 => Wire::Cast(DataType::Timestamp(TimeUnit::Second, None)),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => Wire::Unsupported,
        _ => Wire::Cast(DataType::Utf8),
    }
}

fn type_name(w: &Wire) -> String {
    match w {
        Wire::Raw(t, _) => t.to_string(),
        Wire::Seconds(_) => "i8".into(),
        Wire::Utf32(n) => format!("U{n}"),
        Wire::Bool => "b1".into(),
        // Cast columns are resolved to their target's wire form before naming.
        Wire::Cast(_) => "f8".into(),
        Wire::Unsupported => "binary".into(),
    }
}

fn max_chars(arr: &ArrayRef) -> usize {
    let Ok(s) = cast(arr, &DataType::Utf8) else { return 0 };
    let s = s.as_string::<i32>();
    (0..s.len()).filter(|&i| s.is_valid(i)).map(|i| s.value(i).chars().count()).max().unwrap_or(0)
}

/// `arr` in its wire form; `name` names the column in errors. Nulls travel only where numpy has a value
/// for them: NaN in float columns, an empty string in string columns; integer and bool columns holding
/// nulls are refused (MarketStore's types have no null), naming the column.
fn encode(name: &str, arr: &ArrayRef, w: &Wire) -> Result<Bytes, String> {
    if arr.null_count() > 0 {
        let filled: Option<ArrayRef> = match arr.data_type() {
            DataType::Float32 => Some(Arc::new(PrimitiveArray::<adt::Float32Type>::from_iter_values(arr.as_primitive::<adt::Float32Type>().iter().map(|v| v.unwrap_or(f32::NAN))))),
            DataType::Float64 => Some(Arc::new(PrimitiveArray::<adt::Float64Type>::from_iter_values(arr.as_primitive::<adt::Float64Type>().iter().map(|v| v.unwrap_or(f64::NAN))))),
            _ => None,
        };
        match (filled, w) {
            (Some(f), _) => return encode(name, &f, w),
            (None, Wire::Utf32(_)) => {}
            (None, _) => {
                return Err(format!(
                    "column {name:?} holds nulls, which MarketStore's {} type cannot carry; read it over Flight or SQL (or select other columns)",
                    type_name(w)
                ))
            }
        }
    }
    match w {
        Wire::Raw(_, width) => {
            let data = arr.to_data();
            let Some(buf) = data.buffers().first() else { return Ok(Bytes::new()) };
            let lo = data.offset() * width;
            let n = data.len() * width;
            if lo + n > buf.len() {
                return Err("column buffer shorter than its length".into());
            }
            Ok(buffer_bytes(buf.slice_with_length(lo, n)))
        }
        Wire::Seconds(per) => {
            let v = cast(arr, &DataType::Int64).map_err(|e| e.to_string())?;
            let v = v.as_primitive::<adt::Int64Type>();
            let mut out = Vec::with_capacity(v.len() * 8);
            for x in v.values().iter() {
                out.extend_from_slice(&x.div_euclid(*per).to_le_bytes());
            }
            Ok(Bytes::from(out))
        }
        Wire::Utf32(n) => {
            let s = cast(arr, &DataType::Utf8).map_err(|e| e.to_string())?;
            let s = s.as_string::<i32>();
            let mut out = vec![0u8; s.len() * n * 4];
            for i in 0..s.len() {
                if s.is_null(i) {
                    continue;
                }
                for (j, ch) in s.value(i).chars().take(*n).enumerate() {
                    let o = (i * n + j) * 4;
                    out[o..o + 4].copy_from_slice(&(ch as u32).to_le_bytes());
                }
            }
            Ok(Bytes::from(out))
        }
        Wire::Bool => {
            let b = arr.as_boolean_opt().ok_or("expected a boolean column")?;
            Ok(Bytes::from((0..b.len()).map(|i| b.value(i) as u8).collect::<Vec<u8>>()))
        }
        Wire::Cast(_) => Err("internal: unresolved cast".into()),
        Wire::Unsupported => Err(format!("column {name:?} is {}, which MarketStore's datasets cannot carry; read it over Flight or SQL (or select other columns)", arr.data_type())),
    }
}

/// The error MarketStore returns when a multi-bucket result cannot be one dataset.
fn mixed_columns(keys: &[String]) -> String {
    let syms: Vec<&str> = keys.iter().map(|k| k.split('/').next().unwrap_or(k)).collect();
    format!(
        "symbols in a query must have the same data type or be filtered by common columns. symbols=[{}]",
        syms.join(" ")
    )
}

/// Pack keyed parts into one NumpyMultiDataset. Every part must have the same column names and types.
pub fn pack(parts: Vec<Part>) -> Result<NumpyOut, String> {
    let Some(first) = parts.first() else { return Ok(NumpyOut::default()) };
    let schema = first.schema.clone();
    let keys: Vec<String> = parts.iter().map(|p| p.key.clone()).collect();
    for p in &parts[1..] {
        let same = p.schema.fields().len() == schema.fields().len()
            && p.schema.fields().iter().zip(schema.fields()).all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        if !same {
            return Err(mixed_columns(&keys));
        }
    }
    // Resolve each column's wire form (casts first, then string widths over every part).
    let mut wires: Vec<Wire> = schema.fields().iter().map(|f| wire_of(f.data_type())).collect();
    let mut cast_to: Vec<Option<DataType>> = vec![None; wires.len()];
    for (i, w) in wires.iter_mut().enumerate() {
        if let Wire::Cast(t) = w.clone() {
            let target = if schema.field(i).data_type().is_numeric() || t != DataType::Utf8 { t } else { DataType::Utf8 };
            *w = wire_of(&target);
            cast_to[i] = Some(target);
        }
    }
    for (i, w) in wires.iter_mut().enumerate() {
        if let Wire::Utf32(n) = w {
            for p in &parts {
                for b in &p.batches {
                    *n = (*n).max(max_chars(b.column(i)));
                }
            }
        }
    }
    let mut out = NumpyOut {
        types: wires.iter().map(type_name).collect(),
        names: schema.fields().iter().map(|f| f.name().clone()).collect(),
        columns: vec![Vec::new(); wires.len()],
        length: 0,
        keys: Vec::with_capacity(parts.len()),
    };
    for p in parts {
        let start = out.length;
        for b in &p.batches {
            if b.num_rows() == 0 {
                continue;
            }
            for (i, w) in wires.iter().enumerate() {
                let col = match &cast_to[i] {
                    Some(t) => cast(b.column(i), t).map_err(|e| e.to_string())?,
                    None => b.column(i).clone(),
                };
                let bytes = encode(schema.field(i).name(), &col, w)?;
                if !bytes.is_empty() {
                    out.columns[i].push(bytes);
                }
            }
            out.length += b.num_rows();
        }
        out.keys.push((p.key, start, out.length - start));
    }
    Ok(out)
}

impl NumpyOut {
    /// The msgpack/JSON reply form (`types`, `names`, `data`, `length`, `startindex`, `lengths`).
    pub fn to_val(&self) -> Val {
        Val::Obj(vec![
            ("types", "ColumnTypes", Val::Arr(self.types.iter().map(|t| Val::str(t.as_str())).collect())),
            ("names", "ColumnNames", Val::Arr(self.names.iter().map(|t| Val::str(t.as_str())).collect())),
            ("data", "ColumnData", Val::Arr(self.columns.iter().map(|c| Val::Bin(c.clone())).collect())),
            ("length", "Length", Val::Int(self.length as i64)),
            ("startindex", "StartIndex", Val::Map(self.keys.iter().map(|(k, s, _)| (k.clone(), Val::Int(*s as i64))).collect())),
            ("lengths", "Lengths", Val::Map(self.keys.iter().map(|(k, _, n)| (k.clone(), Val::Int(*n as i64))).collect())),
        ])
    }

    /// Each column as one contiguous byte string (zero-copy when it is a single chunk).
    pub fn column_bytes(&self) -> Vec<Bytes> {
        self.columns
            .iter()
            .map(|chunks| match chunks.len() {
                0 => Bytes::new(),
                1 => chunks[0].clone(),
                _ => {
                    let mut v = Vec::with_capacity(chunks.iter().map(|c| c.len()).sum());
                    for c in chunks {
                        v.extend_from_slice(c);
                    }
                    Bytes::from(v)
                }
            })
            .collect()
    }
}

/// A write's dataset as received (either codec, or gRPC).
pub struct NumpyIn<'a> {
    pub types: Vec<String>,
    pub names: Vec<String>,
    pub data: Vec<&'a [u8]>,
    pub length: i64,
    /// `(key, first row)` per bucket.
    pub start_index: Vec<(String, i64)>,
    pub lengths: Vec<(String, i64)>,
}

fn prim_from<T: ArrowPrimitiveType>(bytes: &[u8]) -> ArrayRef {
    // Copy into an aligned buffer: the request bytes have no alignment guarantee.
    let buf = Buffer::from(bytes);
    let n = bytes.len() / std::mem::size_of::<T::Native>();
    Arc::new(PrimitiveArray::<T>::new(ScalarBuffer::new(buf, 0, n), None))
}

fn utf32_strings(bytes: &[u8], width: usize) -> ArrayRef {
    if width == 64 {
        return Arc::new(bytes.chunks_exact(64).map(|c| Some(decode_string16(c))).collect::<StringArray>());
    }
    Arc::new(bytes.chunks_exact(width.max(4)).map(|c| Some(decode_string16(c))).collect::<StringArray>())
}

/// Parse a numpy type string: `(Arrow type, bytes per value)`. Accepts MarketStore's eleven wire types,
/// `b1` and `U<n>` of any width.
fn parse_type(t: &str) -> Option<(DataType, usize)> {
    let s = t.trim_start_matches(['<', '|', '=']);
    if let Some(n) = s.strip_prefix('U') {
        let n: usize = n.parse().ok()?;
        return (n > 0).then_some(()).and(n.checked_mul(4)).map(|w| (DataType::Utf8, w));
    }
    let ct = ColumnType::from_wire(s).ok()?;
    if ct == ColumnType::String16 {
        return Some((DataType::Utf8, 64));
    }
    // Only the numpy spellings travel on the wire (not the CLI names).
    if s.len() != 2 {
        return None;
    }
    Some((ct.arrow_type(), ct.width()))
}

/// Split a write dataset into one Arrow batch per bucket key (columns in request order, `Epoch` Int64).
///
/// Every length and offset comes from the client: each is checked (no overflow, inside the column
/// bytes) before any slice is taken, so a crafted dataset gets an error naming the field, never a panic.
pub fn unpack(ds: &NumpyIn<'_>) -> Result<Vec<(String, RecordBatch)>, String> {
    split(ds, true)
}

/// [`unpack`] for a dataset a server sent back (a client reading a query reply): the same checks, but no
/// `Epoch` column is required, since an SQL result need not have one.
pub fn unpack_reply(ds: &NumpyIn<'_>) -> Result<Vec<(String, RecordBatch)>, String> {
    split(ds, false)
}

fn split(ds: &NumpyIn<'_>, need_epoch: bool) -> Result<Vec<(String, RecordBatch)>, String> {
    let ncol = ds.names.len();
    if ds.types.len() != ncol || ds.data.len() != ncol {
        return Err(format!(
            "dataset has {} names, {} types and {} data columns",
            ncol,
            ds.types.len(),
            ds.data.len()
        ));
    }
    if ncol == 0 || ds.data[0].is_empty() {
        return Ok(Vec::new()); // an empty dataset writes nothing (MarketStore)
    }
    let mut cols = Vec::with_capacity(ncol);
    for i in 0..ncol {
        let (name, t) = (&ds.names[i], &ds.types[i]);
        let (dt, width) = parse_type(t).ok_or_else(|| format!("unsupported type string {t}"))?;
        if name == EPOCH && dt != DataType::Int64 {
            return Err(format!("unexpected data type for Epoch column: {t} (must be i8)"));
        }
        if name == NANOSECONDS && dt != DataType::Int32 {
            return Err(format!("unexpected data type for Nanoseconds column: {t} (must be i4)"));
        }
        cols.push((name.clone(), dt, width));
    }
    if need_epoch && !ds.names.iter().any(|n| n == EPOCH) {
        return Err("unable to match data columns: the dataset has no Epoch column".into());
    }
    if ds.length < 0 {
        return Err(format!("length {} must not be negative", ds.length));
    }
    let total = if ds.length > 0 { usize::try_from(ds.length).unwrap_or(usize::MAX) } else { ds.data[0].len() / cols[0].2 };
    for (i, (name, _, w)) in cols.iter().enumerate() {
        let need = total.checked_mul(*w).ok_or_else(|| format!("length {total} is too large for column {name} of {w}-byte values"))?;
        if ds.data[i].len() < need {
            return Err(format!("column {name}: {} bytes for {total} rows of {w} bytes", ds.data[i].len()));
        }
    }
    let lengths: std::collections::HashMap<&str, i64> = ds.lengths.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let starts: Vec<(String, i64)> =
        if ds.start_index.is_empty() { Vec::new() } else { ds.start_index.clone() };
    if starts.is_empty() {
        return Err("dataset has no startindex: which bucket is it for?".into());
    }
    // Strings of MarketStore's width create string16 columns (its `U16`, which GetInfo reports back);
    // wider numpy strings create utf8 columns (strings of any length).
    let fields: Vec<Field> = cols
        .iter()
        .map(|(n, dt, w)| {
            let f = Field::new(n, dt.clone(), false);
            if *dt == DataType::Utf8 {
                let t = if *w <= crate::engine::STRING16_WIDTH { "string16" } else { "utf8" };
                f.with_metadata([(crate::engine::TYPE_METADATA.to_string(), t.to_string())].into())
            } else {
                f
            }
        })
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let mut out = Vec::with_capacity(starts.len());
    for (key, start) in starts {
        let n = *lengths.get(key.as_str()).ok_or_else(|| format!("dataset has no lengths entry for {key}"))?;
        let outside = || format!("rows {start} (+{n}) of {key} are outside the dataset's {total} rows");
        let end = start.checked_add(n).filter(|_| start >= 0 && n >= 0).ok_or_else(outside)?;
        let (lo, hi) = (usize::try_from(start).map_err(|_| outside())?, usize::try_from(end).map_err(|_| outside())?);
        if hi > total {
            return Err(outside());
        }
        let arrays: Vec<ArrayRef> = cols
            .iter()
            .enumerate()
            .map(|(i, (_, dt, w))| {
                let b = &ds.data[i][lo * w..hi * w];
                match dt {
                    DataType::Int8 => prim_from::<adt::Int8Type>(b),
                    DataType::Int16 => prim_from::<adt::Int16Type>(b),
                    DataType::Int32 => prim_from::<adt::Int32Type>(b),
                    DataType::Int64 => prim_from::<adt::Int64Type>(b),
                    DataType::UInt8 => prim_from::<adt::UInt8Type>(b),
                    DataType::UInt16 => prim_from::<adt::UInt16Type>(b),
                    DataType::UInt32 => prim_from::<adt::UInt32Type>(b),
                    DataType::UInt64 => prim_from::<adt::UInt64Type>(b),
                    DataType::Float32 => prim_from::<adt::Float32Type>(b),
                    DataType::Float64 => prim_from::<adt::Float64Type>(b),
                    DataType::Boolean => Arc::new(b.iter().map(|v| Some(*v != 0)).collect::<BooleanArray>()),
                    _ => utf32_strings(b, *w),
                }
            })
            .collect();
        let batch = RecordBatch::try_new(schema.clone(), arrays).map_err(|e| e.to_string())?;
        out.push((key, batch));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float32Array, Int64Array, TimestampSecondArray};

    fn part(key: &str, epochs: &[i64], vals: &[f32], names: (&str, &str)) -> Part {
        let schema = Arc::new(Schema::new(vec![
            Field::new(names.0, DataType::Timestamp(TimeUnit::Second, Some("UTC".into())), false),
            Field::new(names.1, DataType::Float32, false),
        ]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(TimestampSecondArray::from(epochs.to_vec()).with_timezone("UTC")),
                Arc::new(Float32Array::from(vals.to_vec())),
            ],
        )
        .unwrap();
        Part { key: key.into(), schema, batches: vec![b] }
    }

    #[test]
    fn packs_zero_copy_and_slices_keys() {
        let out = pack(vec![part("A:x", &[1, 2], &[1.5, 2.5], ("Epoch", "Close")), part("B:x", &[3], &[3.5], ("Epoch", "Close"))]).unwrap();
        assert_eq!(out.types, ["i8", "f4"]);
        assert_eq!(out.length, 3);
        assert_eq!(out.keys, vec![("A:x".to_string(), 0, 2), ("B:x".to_string(), 2, 1)]);
        let cols = out.column_bytes();
        assert_eq!(&cols[0][..], [1i64, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>().as_slice());
        assert_eq!(&cols[1][..], [1.5f32, 2.5, 3.5].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>().as_slice());
        let err = pack(vec![part("A/1Min/X:x", &[1], &[1.0], ("Epoch", "Close")), part("B/1Min/X:x", &[1], &[1.0], ("Epoch", "Open"))]).unwrap_err();
        assert!(err.starts_with("symbols in a query must have the same data type or be filtered by common columns"), "{err}");
    }

    #[test]
    fn unpacks_numpy_columns_and_strings() {
        let epoch: Vec<u8> = [10i64, 20, 30].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut s = vec![0u8; 3 * 64];
        for (i, txt) in ["a", "ü€", "😀x"].iter().enumerate() {
            for (j, c) in txt.chars().enumerate() {
                s[i * 64 + j * 4..i * 64 + j * 4 + 4].copy_from_slice(&(c as u32).to_le_bytes());
            }
        }
        let ds = NumpyIn {
            types: vec!["i8".into(), "U16".into()],
            names: vec!["Epoch".into(), "Name".into()],
            data: vec![&epoch, &s],
            length: 3,
            start_index: vec![("A/1Min/X".into(), 0), ("B/1Min/X".into(), 2)],
            lengths: vec![("A/1Min/X".into(), 2), ("B/1Min/X".into(), 1)],
        };
        let out = unpack(&ds).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.column(0).as_any().downcast_ref::<Int64Array>().unwrap().values(), &[10, 20]);
        let names = out[0].1.column(1).as_string::<i32>();
        assert_eq!((names.value(0), names.value(1)), ("a", "ü€"));
        assert_eq!(out[1].1.column(1).as_string::<i32>().value(0), "😀x");
        let bad = NumpyIn { types: vec!["i4".into(), "U16".into()], ..ds };
        assert!(unpack(&bad).unwrap_err().starts_with("unexpected data type for Epoch column"));
    }

    /// Crafted lengths, offsets and type widths: a clear error each, never a panic or a huge allocation.
    #[test]
    fn crafted_lengths_are_errors() {
        let epoch: Vec<u8> = [10i64, 20, 30].iter().flat_map(|v| v.to_le_bytes()).collect();
        let close: Vec<u8> = [1f64, 2., 3.].iter().flat_map(|v| v.to_le_bytes()).collect();
        let base = || NumpyIn {
            types: vec!["i8".into(), "f8".into()],
            names: vec!["Epoch".into(), "Close".into()],
            data: vec![&epoch[..], &close[..]],
            length: 3,
            start_index: vec![("A/1Min/X".into(), 0)],
            lengths: vec![("A/1Min/X".into(), 3)],
        };
        assert_eq!(unpack(&base()).unwrap()[0].1.num_rows(), 3);
        let err = |ds: NumpyIn<'_>| unpack(&ds).unwrap_err();
        // length * width overflows usize.
        let e = err(NumpyIn { length: i64::MAX, ..base() });
        assert!(e.contains("is too large"), "{e}");
        let e = err(NumpyIn { length: (1i64 << 61) + 1, ..base() });
        assert!(e.contains("is too large") || e.contains("bytes for"), "{e}");
        let e = err(NumpyIn { length: 4, ..base() });
        assert_eq!(e, "column Epoch: 24 bytes for 4 rows of 8 bytes");
        let e = err(NumpyIn { length: -1, ..base() });
        assert_eq!(e, "length -1 must not be negative");
        // start + n overflows i64, a negative start, a range past the rows.
        for (start, n) in [(i64::MAX, 1), (1, i64::MAX), (-1, 2), (0, -1), (2, 2), (i64::MIN, i64::MIN)] {
            let e = err(NumpyIn { start_index: vec![("A/1Min/X".into(), start)], lengths: vec![("A/1Min/X".into(), n)], ..base() });
            assert!(e.contains("are outside the dataset's 3 rows"), "{start} {n}: {e}");
        }
        // A string width whose byte size overflows.
        let e = err(NumpyIn { types: vec!["i8".into(), format!("U{}", usize::MAX / 2)], ..base() });
        assert!(e.starts_with("unsupported type string U"), "{e}");
        let e = err(NumpyIn { types: vec!["i8".into(), "U1000000000".into()], ..base() });
        assert!(e.contains("bytes for 3 rows"), "{e}");
        let e = err(NumpyIn { start_index: vec![], lengths: vec![], ..base() });
        assert!(e.contains("no startindex"), "{e}");
        let e = err(NumpyIn { lengths: vec![("B/1Min/X".into(), 1)], ..base() });
        assert_eq!(e, "dataset has no lengths entry for A/1Min/X");
    }
}
