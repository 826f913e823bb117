//! Column types and bucket schemas.
//!
//! Every stored column is Arrow's own layout on disk — a dense values file, plus a validity bitmap for
//! nullable columns and an offsets + data pair for variable-length ones — so a partition column is an
//! array Arrow wraps without copying. Wire names follow MarketStore's numpy dtype strings (reference §1.5).

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

use super::error::{EngineError, Result};

/// Name of the mandatory first column (int64 Unix seconds).
pub const EPOCH: &str = "Epoch";
/// Name of the sub-second column of variable-length (tick) buckets.
pub const NANOSECONDS: &str = "Nanoseconds";
/// Most data columns a bucket may have. Checked before anything is logged: a log record stores the column
/// count in 16 bits, and every column is one mapped file per partition.
pub const MAX_COLUMNS: usize = 1024;
/// Byte width of MarketStore's `U16` strings: 16 UTF-32LE code points.
pub const STRING16_WIDTH: usize = 64;

/// Unit of a `timestamp` data column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TsUnit {
    S,
    Ms,
    Us,
    Ns,
}

impl TsUnit {
    fn name(self) -> &'static str {
        match self {
            TsUnit::S => "s",
            TsUnit::Ms => "ms",
            TsUnit::Us => "us",
            TsUnit::Ns => "ns",
        }
    }

    /// The Arrow time unit.
    pub fn arrow(self) -> TimeUnit {
        match self {
            TsUnit::S => TimeUnit::Second,
            TsUnit::Ms => TimeUnit::Millisecond,
            TsUnit::Us => TimeUnit::Microsecond,
            TsUnit::Ns => TimeUnit::Nanosecond,
        }
    }

    fn of(u: &TimeUnit) -> TsUnit {
        match u {
            TimeUnit::Second => TsUnit::S,
            TimeUnit::Millisecond => TsUnit::Ms,
            TimeUnit::Microsecond => TsUnit::Us,
            TimeUnit::Nanosecond => TsUnit::Ns,
        }
    }
}

/// A storable column type.
///
/// Fixed-width types are one dense file per partition; `utf8`, `large_utf8` and `binary` are an offsets
/// file (Arrow's `n + 1` offsets) plus a data file. Any data column may also be nullable (a validity bitmap
/// file beside it, Arrow's layout). Names (in `bucket.json` and on the wire) are MarketStore's numpy
/// strings for its types and Arrow's spelling for the rest (`timestamp[ns]`, `decimal128(18,4)`, `utf8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ColumnType {
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    F32,
    F64,
    Bool,
    /// MarketStore's `U16`: 16 UTF-32LE code points, kept for the MarketStore interfaces.
    String16,
    /// An instant in the given unit (the time zone, display only, is the column's [`ColumnDef::tz`]).
    Timestamp(TsUnit),
    /// Days since the Unix epoch.
    Date32,
    /// A decimal of `precision` digits, `scale` of them after the point.
    Decimal128(u8, i8),
    /// UTF-8 strings of any length, `i32` offsets (up to 2 GiB of string data per year partition).
    Utf8,
    /// UTF-8 strings with `i64` offsets.
    LargeUtf8,
    /// Byte strings of any length, `i32` offsets.
    Binary,
}

impl From<ColumnType> for String {
    fn from(t: ColumnType) -> String {
        t.name()
    }
}

impl TryFrom<String> for ColumnType {
    type Error = EngineError;
    fn try_from(s: String) -> Result<Self> {
        ColumnType::from_name(&s)
    }
}

impl ColumnType {
    /// MarketStore's types, in a stable order.
    pub const ALL: [ColumnType; 12] = [
        ColumnType::I8,
        ColumnType::I16,
        ColumnType::I32,
        ColumnType::I64,
        ColumnType::U8,
        ColumnType::U16,
        ColumnType::U32,
        ColumnType::U64,
        ColumnType::F32,
        ColumnType::F64,
        ColumnType::Bool,
        ColumnType::String16,
    ];

    /// Bytes per row of the column's first file: the value, or for variable-length types the offset.
    pub fn width(self) -> usize {
        match self {
            ColumnType::I8 | ColumnType::U8 | ColumnType::Bool => 1,
            ColumnType::I16 | ColumnType::U16 => 2,
            ColumnType::I32 | ColumnType::U32 | ColumnType::F32 | ColumnType::Date32 => 4,
            ColumnType::I64 | ColumnType::U64 | ColumnType::F64 | ColumnType::Timestamp(_) => 8,
            ColumnType::Decimal128(..) => 16,
            ColumnType::String16 => STRING16_WIDTH,
            ColumnType::Utf8 | ColumnType::Binary => 4,
            ColumnType::LargeUtf8 => 8,
        }
    }

    /// Variable-length: an offsets file plus a data file.
    pub fn is_var(self) -> bool {
        matches!(self, ColumnType::Utf8 | ColumnType::LargeUtf8 | ColumnType::Binary)
    }

    /// The name stored in `bucket.json` (serde) and shown by the CLI.
    pub fn name(self) -> String {
        match self {
            ColumnType::I8 => "i8".into(),
            ColumnType::I16 => "i16".into(),
            ColumnType::I32 => "i32".into(),
            ColumnType::I64 => "i64".into(),
            ColumnType::U8 => "u8".into(),
            ColumnType::U16 => "u16".into(),
            ColumnType::U32 => "u32".into(),
            ColumnType::U64 => "u64".into(),
            ColumnType::F32 => "f32".into(),
            ColumnType::F64 => "f64".into(),
            ColumnType::Bool => "bool".into(),
            ColumnType::String16 => "string16".into(),
            other => other.wire_name(),
        }
    }

    /// The type of a `bucket.json` name ([`ColumnType::name`]). Not [`ColumnType::from_wire`]: the stored
    /// names `i8` and `u8` are the one-byte types, while numpy's `i8`/`u8` are eight bytes.
    pub fn from_name(s: &str) -> Result<Self> {
        Ok(match s {
            "i8" => ColumnType::I8,
            "i16" => ColumnType::I16,
            "i32" => ColumnType::I32,
            "i64" => ColumnType::I64,
            "u8" => ColumnType::U8,
            "u16" => ColumnType::U16,
            "u32" => ColumnType::U32,
            "u64" => ColumnType::U64,
            "f32" => ColumnType::F32,
            "f64" => ColumnType::F64,
            "bool" => ColumnType::Bool,
            "string16" => ColumnType::String16,
            other => ColumnType::from_wire(other)?,
        })
    }

    /// MarketStore/numpy wire type string (`i1`..`u8`, `f4`, `f8`, `U16`, and `b1` for bool); Arrow's
    /// spelling for the types MarketStore lacks (`timestamp[ns]`, `date32`, `decimal128(18,4)`, `utf8`, …).
    pub fn wire_name(self) -> String {
        match self {
            ColumnType::I8 => "i1".into(),
            ColumnType::I16 => "i2".into(),
            ColumnType::I32 => "i4".into(),
            ColumnType::I64 => "i8".into(),
            ColumnType::U8 => "u1".into(),
            ColumnType::U16 => "u2".into(),
            ColumnType::U32 => "u4".into(),
            ColumnType::U64 => "u8".into(),
            ColumnType::F32 => "f4".into(),
            ColumnType::F64 => "f8".into(),
            ColumnType::Bool => "b1".into(),
            ColumnType::String16 => "U16".into(),
            ColumnType::Timestamp(u) => format!("timestamp[{}]", u.name()),
            ColumnType::Date32 => "date32".into(),
            ColumnType::Decimal128(p, s) => format!("decimal128({p},{s})"),
            ColumnType::Utf8 => "utf8".into(),
            ColumnType::LargeUtf8 => "large_utf8".into(),
            ColumnType::Binary => "binary".into(),
        }
    }

    /// True for the types MarketStore's interfaces (numpy datasets) can carry.
    pub fn is_marketstore(self) -> bool {
        ColumnType::ALL.contains(&self)
    }

    /// Parse a wire type string; byte-order characters (`<`, `>`, `|`, `=`) are ignored as pymarketstore strips them.
    /// Also accepts the CLI names (`float32`, `int64`, `string16`, …) and Arrow's spellings of the other types
    /// (`timestamp[ns]`, `date32`, `decimal128(18,4)`, `utf8`/`string`, `large_utf8`/`large_string`, `binary`).
    pub fn from_wire(s: &str) -> Result<Self> {
        let t = s.trim_start_matches(['<', '>', '|', '=']);
        if let Some(unit) = t.strip_prefix("timestamp[").and_then(|r| r.strip_suffix(']')) {
            let unit = unit.split(',').next().unwrap_or("").trim();
            return Ok(ColumnType::Timestamp(match unit {
                "s" => TsUnit::S,
                "ms" => TsUnit::Ms,
                "us" => TsUnit::Us,
                "ns" => TsUnit::Ns,
                _ => return Err(EngineError::InvalidInput(format!("unexpected data type:{s} (timestamp units are s, ms, us, ns)"))),
            }));
        }
        if let Some(ps) = t.strip_prefix("decimal128(").or_else(|| t.strip_prefix("decimal(")).and_then(|r| r.strip_suffix(')')) {
            let bad = || EngineError::InvalidInput(format!("unexpected data type:{s} (decimal128(precision, scale), precision 1..38, scale 0..precision)"));
            let (p, sc) = ps.split_once(',').ok_or_else(bad)?;
            let p: u8 = p.trim().parse().map_err(|_| bad())?;
            let sc: i8 = sc.trim().parse().map_err(|_| bad())?;
            if !(1..=38).contains(&p) || sc < 0 || sc as u8 > p {
                return Err(bad());
            }
            return Ok(ColumnType::Decimal128(p, sc));
        }
        Ok(match t {
            "i1" | "int8" | "byte" => ColumnType::I8,
            "i2" | "int16" => ColumnType::I16,
            "i4" | "int32" => ColumnType::I32,
            "i8" | "int64" => ColumnType::I64,
            "u1" | "uint8" => ColumnType::U8,
            "u2" | "uint16" => ColumnType::U16,
            "u4" | "uint32" => ColumnType::U32,
            "u8" | "uint64" => ColumnType::U64,
            "f4" | "float32" => ColumnType::F32,
            "f8" | "float64" => ColumnType::F64,
            "b1" | "?" | "bool" => ColumnType::Bool,
            "U16" | "string16" => ColumnType::String16,
            "date32" => ColumnType::Date32,
            "utf8" | "string" | "str" => ColumnType::Utf8,
            "large_utf8" | "large_string" => ColumnType::LargeUtf8,
            "binary" | "bytes" => ColumnType::Binary,
            _ => return Err(EngineError::InvalidInput(format!("unexpected data type:{s}"))),
        })
    }

    /// MarketStore's on-disk element type code (GetInfo `DSV[].Type`); `None` for types MarketStore lacks.
    pub fn marketstore_code(self) -> Option<u8> {
        Some(match self {
            ColumnType::F32 => 0,
            ColumnType::I32 => 1,
            ColumnType::F64 => 2,
            ColumnType::I64 => 3,
            ColumnType::I8 => 5,
            ColumnType::Bool => 6,
            ColumnType::I16 => 9,
            ColumnType::U8 => 10,
            ColumnType::U16 => 11,
            ColumnType::U32 => 12,
            ColumnType::U64 => 13,
            ColumnType::String16 => 14,
            _ => return None,
        })
    }

    /// The column type of a MarketStore element type code (the inverse of [`ColumnType::marketstore_code`]),
    /// for clients reading a `GetInfo` reply; `None` for codes mkts cannot store (EPOCH, NONE, STRING).
    pub fn from_marketstore_code(code: u8) -> Option<Self> {
        ColumnType::ALL.into_iter().find(|t| t.marketstore_code() == Some(code))
    }

    /// The Arrow type this column is read as (a timestamp without its time zone: see
    /// [`ColumnDef::arrow_type`]). Fixed-width and variable-length columns are zero-copy views of the mapped
    /// files; bool (bit-packed in Arrow) and string16 (UTF-32 on disk) are converted.
    pub fn arrow_type(self) -> DataType {
        match self {
            ColumnType::I8 => DataType::Int8,
            ColumnType::I16 => DataType::Int16,
            ColumnType::I32 => DataType::Int32,
            ColumnType::I64 => DataType::Int64,
            ColumnType::U8 => DataType::UInt8,
            ColumnType::U16 => DataType::UInt16,
            ColumnType::U32 => DataType::UInt32,
            ColumnType::U64 => DataType::UInt64,
            ColumnType::F32 => DataType::Float32,
            ColumnType::F64 => DataType::Float64,
            ColumnType::Bool => DataType::Boolean,
            ColumnType::String16 => DataType::Utf8,
            ColumnType::Timestamp(u) => DataType::Timestamp(u.arrow(), None),
            ColumnType::Date32 => DataType::Date32,
            ColumnType::Decimal128(p, s) => DataType::Decimal128(p, s),
            ColumnType::Utf8 => DataType::Utf8,
            ColumnType::LargeUtf8 => DataType::LargeUtf8,
            ColumnType::Binary => DataType::Binary,
        }
    }

    /// The Arrow type of the rows the engine moves internally (write payloads, merges): the on-disk
    /// bytes as an array — bool as one byte per row, string16 as 64-byte values, timestamps and dates as
    /// their integers.
    pub fn storage_type(self) -> DataType {
        match self {
            ColumnType::Bool => DataType::UInt8,
            ColumnType::String16 => DataType::FixedSizeBinary(STRING16_WIDTH as i32),
            ColumnType::Timestamp(_) => DataType::Int64,
            ColumnType::Date32 => DataType::Int32,
            other => other.arrow_type(),
        }
    }

    /// The column type (and time zone) an Arrow type is stored as when it creates a bucket. Dictionary
    /// columns are stored as their values.
    pub fn from_arrow(dt: &DataType) -> Option<(Self, Option<String>)> {
        Some((
            match dt {
                DataType::Int8 => ColumnType::I8,
                DataType::Int16 => ColumnType::I16,
                DataType::Int32 => ColumnType::I32,
                DataType::Int64 => ColumnType::I64,
                DataType::UInt8 => ColumnType::U8,
                DataType::UInt16 => ColumnType::U16,
                DataType::UInt32 => ColumnType::U32,
                DataType::UInt64 => ColumnType::U64,
                DataType::Float16 | DataType::Float32 => ColumnType::F32,
                DataType::Float64 => ColumnType::F64,
                DataType::Boolean => ColumnType::Bool,
                DataType::Utf8 | DataType::Utf8View => ColumnType::Utf8,
                DataType::LargeUtf8 => ColumnType::LargeUtf8,
                DataType::Binary | DataType::BinaryView | DataType::LargeBinary | DataType::FixedSizeBinary(_) => ColumnType::Binary,
                DataType::Timestamp(u, tz) => return Some((ColumnType::Timestamp(TsUnit::of(u)), tz.as_ref().map(|t| t.to_string()))),
                DataType::Date32 => ColumnType::Date32,
                DataType::Decimal128(p, s) if *s >= 0 => ColumnType::Decimal128(*p, *s),
                DataType::Dictionary(_, v) => return ColumnType::from_arrow(v),
                _ => return None,
            },
            None,
        ))
    }

    /// True for integer and float types (the ones MarketStore casts between on write).
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            ColumnType::I8
                | ColumnType::I16
                | ColumnType::I32
                | ColumnType::I64
                | ColumnType::U8
                | ColumnType::U16
                | ColumnType::U32
                | ColumnType::U64
                | ColumnType::F32
                | ColumnType::F64
        )
    }

    /// Short file suffix for the column file (`c003.f32`).
    pub fn file_suffix(self) -> &'static str {
        match self {
            ColumnType::I8 => "i8",
            ColumnType::I16 => "i16",
            ColumnType::I32 => "i32",
            ColumnType::I64 => "i64",
            ColumnType::U8 => "u8",
            ColumnType::U16 => "u16",
            ColumnType::U32 => "u32",
            ColumnType::U64 => "u64",
            ColumnType::F32 => "f32",
            ColumnType::F64 => "f64",
            ColumnType::Bool => "bool",
            ColumnType::String16 => "s16",
            ColumnType::Timestamp(_) => "ts",
            ColumnType::Date32 => "d32",
            ColumnType::Decimal128(..) => "d128",
            ColumnType::Utf8 => "utf8.off",
            ColumnType::LargeUtf8 => "lutf8.off",
            ColumnType::Binary => "bin.off",
        }
    }
}

/// A named data column of a bucket (Epoch and Nanoseconds are implied by the record kind).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDef {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// May hold nulls (a validity bitmap beside the values, written once a partition sees its first null).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nullable: bool,
    /// Time zone of a `timestamp` column (display only: the stored values are UTC instants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tz: Option<String>,
    /// Index of the column's files (`c<file>.*`) once a schema change made it differ from the column's
    /// position; absent for every bucket whose schema never changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<u32>,
}

impl ColumnDef {
    /// A non-nullable column.
    pub fn new(name: impl Into<String>, ty: ColumnType) -> ColumnDef {
        ColumnDef { name: name.into(), ty, nullable: false, tz: None, file: None }
    }

    /// The same column, nullable or not.
    pub fn with_nullable(mut self, nullable: bool) -> ColumnDef {
        self.nullable = nullable;
        self
    }

    /// A column from a type string as [`ColumnType::from_wire`] reads it, where `timestamp[ns, UTC]` also
    /// names the time zone and a trailing `?` (`f8?`, `utf8?`) makes the column nullable.
    pub fn parse(name: impl Into<String>, type_str: &str) -> Result<ColumnDef> {
        let t = type_str.trim();
        let (t, nullable) = match t.strip_suffix('?') {
            Some(rest) if !rest.is_empty() && !rest.ends_with(['<', '>', '|', '=']) => (rest.trim_end(), true),
            _ => (t, false),
        };
        let ty = ColumnType::from_wire(t)?;
        let tz = match ty {
            ColumnType::Timestamp(_) => t
                .strip_suffix(']')
                .and_then(|r| r.split_once(','))
                .map(|(_, z)| z.trim().to_string())
                .filter(|z| !z.is_empty()),
            _ => None,
        };
        Ok(ColumnDef { name: name.into(), ty, nullable, tz, file: None })
    }

    /// The type string [`ColumnDef::parse`] reads back: the wire name, the time zone of a timestamp, `?`
    /// when nullable.
    pub fn type_name(&self) -> String {
        let mut s = match (self.ty, &self.tz) {
            (ColumnType::Timestamp(u), Some(tz)) => format!("timestamp[{}, {tz}]", u.name()),
            (t, _) => t.wire_name(),
        };
        if self.nullable {
            s.push('?');
        }
        s
    }

    /// The Arrow type reads return (with the time zone of a timestamp).
    pub fn arrow_type(&self) -> DataType {
        match self.ty {
            ColumnType::Timestamp(u) => DataType::Timestamp(u.arrow(), self.tz.as_deref().map(Into::into)),
            t => t.arrow_type(),
        }
    }

    /// The Arrow field of reads.
    pub fn field(&self) -> Field {
        Field::new(&self.name, self.arrow_type(), self.nullable)
    }
}

/// Fixed: one row per interval (upsert). Variable: every row kept, exact nanoseconds (ticks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    Fixed,
    Variable,
}

/// The schema of a bucket, persisted in `bucket.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSchema {
    pub kind: RecordKind,
    /// Data columns in bucket order (without Epoch and Nanoseconds).
    pub columns: Vec<ColumnDef>,
}

impl BucketSchema {
    /// Validate column names: unique, non-empty, not reserved, file-name safe. No data column at all is
    /// valid: MarketStore creates an Epoch-only bucket from an empty column list, and clients rely on it.
    pub fn validate(&self) -> Result<()> {
        if self.columns.len() > MAX_COLUMNS {
            return Err(EngineError::InvalidInput(format!(
                "a bucket holds at most {MAX_COLUMNS} data columns, this one has {}",
                self.columns.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.columns {
            let n = c.name.as_str();
            if n.is_empty() || n.len() > 128 || n.starts_with('.') || n.chars().any(|c| matches!(c, '/' | '\\' | '\0') || c.is_control()) {
                return Err(EngineError::InvalidInput(format!("invalid column name {n:?}")));
            }
            if n == EPOCH || (n == NANOSECONDS && self.kind == RecordKind::Variable) {
                return Err(EngineError::InvalidInput(format!("column name {n:?} is reserved")));
            }
            if let Some(tz) = &c.tz {
                if !matches!(c.ty, ColumnType::Timestamp(_)) {
                    return Err(EngineError::InvalidInput(format!("column {n:?}: only timestamp columns have a time zone")));
                }
                let offset = |z: &str| {
                    let b = z.as_bytes();
                    b.len() == 6 && matches!(b[0], b'+' | b'-') && b[3] == b':' && z[1..3].parse::<u8>().is_ok_and(|h| h < 24) && z[4..].parse::<u8>().is_ok_and(|m| m < 60)
                };
                if tz.parse::<chrono_tz::Tz>().is_err() && !offset(tz) {
                    return Err(EngineError::InvalidInput(format!("column {n:?}: unknown time zone {tz:?}")));
                }
            }
            if !seen.insert(n.to_ascii_lowercase()) {
                return Err(EngineError::InvalidInput(format!("duplicate column name {n:?}")));
            }
        }
        Ok(())
    }

    /// The Arrow schema of reads: `Epoch` timestamp[s, UTC], data columns, then `Nanoseconds` for ticks.
    pub fn arrow_schema(&self) -> SchemaRef {
        let mut fields = vec![Field::new(EPOCH, epoch_type(), false)];
        fields.extend(self.columns.iter().map(ColumnDef::field));
        if self.kind == RecordKind::Variable {
            fields.push(Field::new(NANOSECONDS, DataType::Int32, false));
        }
        Arc::new(Schema::new(fields))
    }

    /// Column index by name.
    pub fn column(&self, name: &str) -> Option<(usize, &ColumnDef)> {
        self.columns.iter().enumerate().find(|(_, c)| c.name == name)
    }

    /// The schema after `change`, checked: added columns get new names and become nullable (rows stored
    /// before read as null), dropped columns must exist. Every column keeps its file index, and added ones
    /// take indices no column of this schema uses, so no live column ever reads a dropped column's files.
    pub fn altered(&self, change: &SchemaChange) -> Result<BucketSchema> {
        let base = if self.kind == RecordKind::Variable { 2 } else { 1 };
        let mut columns: Vec<ColumnDef> = self
            .columns
            .iter()
            .zip(base..)
            .map(|(c, pos)| ColumnDef { file: Some(c.file.unwrap_or(pos)), ..c.clone() })
            .collect();
        match change {
            SchemaChange::AddColumns(add) => {
                if add.is_empty() {
                    return Err(EngineError::InvalidInput("add_column: no column given".into()));
                }
                let mut next = columns.iter().filter_map(|c| c.file).max().map_or(base, |m| m + 1);
                for c in add {
                    if self.column(&c.name).is_some() {
                        return Err(EngineError::AlreadyExists(format!("column {:?}", c.name)));
                    }
                    columns.push(ColumnDef { nullable: true, file: Some(next), ..c.clone() });
                    next += 1;
                }
            }
            SchemaChange::DropColumns(names) => {
                if names.is_empty() {
                    return Err(EngineError::InvalidInput("drop_column: no column given".into()));
                }
                for n in names {
                    if n == EPOCH || (n == NANOSECONDS && self.kind == RecordKind::Variable) {
                        return Err(EngineError::InvalidInput(format!("column {n:?} cannot be dropped")));
                    }
                    let before = columns.len();
                    columns.retain(|c| &c.name != n);
                    if columns.len() == before {
                        return Err(EngineError::NotFound(format!("column {n:?}")));
                    }
                }
            }
        }
        let s = BucketSchema { kind: self.kind, columns };
        s.validate()?;
        Ok(s)
    }
}

/// A change to a bucket's columns ([`crate::engine::Engine::alter`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemaChange {
    /// New columns, nullable: the rows already stored read as null in them.
    AddColumns(Vec<ColumnDef>),
    /// Columns removed with their data.
    DropColumns(Vec<String>),
}

/// The Arrow type of the `Epoch` column on reads.
pub fn epoch_type() -> DataType {
    DataType::Timestamp(TimeUnit::Second, Some("UTC".into()))
}
