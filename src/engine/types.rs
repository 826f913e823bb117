//! Column types and bucket schemas.
//!
//! Every stored column is fixed width so a partition column is one dense array on disk that Arrow can
//! wrap without copying. Wire names follow MarketStore's numpy dtype strings (reference §1.5).

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

/// A storable column type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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
    String16,
}

impl ColumnType {
    /// Every type, in a stable order.
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

    /// Bytes per value on disk.
    pub fn width(self) -> usize {
        match self {
            ColumnType::I8 | ColumnType::U8 | ColumnType::Bool => 1,
            ColumnType::I16 | ColumnType::U16 => 2,
            ColumnType::I32 | ColumnType::U32 | ColumnType::F32 => 4,
            ColumnType::I64 | ColumnType::U64 | ColumnType::F64 => 8,
            ColumnType::String16 => STRING16_WIDTH,
        }
    }

    /// MarketStore/numpy wire type string (`i1`..`u8`, `f4`, `f8`, `U16`, and `b1` for bool).
    pub fn wire_name(self) -> &'static str {
        match self {
            ColumnType::I8 => "i1",
            ColumnType::I16 => "i2",
            ColumnType::I32 => "i4",
            ColumnType::I64 => "i8",
            ColumnType::U8 => "u1",
            ColumnType::U16 => "u2",
            ColumnType::U32 => "u4",
            ColumnType::U64 => "u8",
            ColumnType::F32 => "f4",
            ColumnType::F64 => "f8",
            ColumnType::Bool => "b1",
            ColumnType::String16 => "U16",
        }
    }

    /// Parse a wire type string; byte-order characters (`<`, `>`, `|`, `=`) are ignored as pymarketstore strips them.
    /// Also accepts the CLI names (`float32`, `int64`, `string16`, …).
    pub fn from_wire(s: &str) -> Result<Self> {
        let t = s.trim_start_matches(['<', '>', '|', '=']);
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
            _ => return Err(EngineError::InvalidInput(format!("unexpected data type:{s}"))),
        })
    }

    /// MarketStore's on-disk element type code (GetInfo `DSV[].Type`).
    pub fn marketstore_code(self) -> u8 {
        match self {
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
        }
    }

    /// The column type of a MarketStore element type code (the inverse of [`ColumnType::marketstore_code`]),
    /// for clients reading a `GetInfo` reply; `None` for codes mkts cannot store (EPOCH, NONE, STRING).
    pub fn from_marketstore_code(code: u8) -> Option<Self> {
        [
            ColumnType::F32,
            ColumnType::I32,
            ColumnType::F64,
            ColumnType::I64,
            ColumnType::I8,
            ColumnType::Bool,
            ColumnType::I16,
            ColumnType::U8,
            ColumnType::U16,
            ColumnType::U32,
            ColumnType::U64,
            ColumnType::String16,
        ]
        .into_iter()
        .find(|t| t.marketstore_code() == code)
    }

    /// The Arrow type this column is read as. Numeric columns are zero-copy views of the mapped file;
    /// bool (bit-packed in Arrow) and string16 (UTF-32 on disk) are converted.
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
        }
    }

    /// The column type an Arrow type is stored as when it creates a bucket.
    pub fn from_arrow(dt: &DataType) -> Option<Self> {
        Some(match dt {
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
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => ColumnType::String16,
            _ => return None,
        })
    }

    /// True for integer and float types (the ones MarketStore casts between on write).
    pub fn is_numeric(self) -> bool {
        !matches!(self, ColumnType::Bool | ColumnType::String16)
    }

    /// Short file suffix for the column file (`Open.f32`).
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
        }
    }
}

/// A named data column of a bucket (Epoch and Nanoseconds are implied by the record kind).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDef {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ColumnType,
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
            if !seen.insert(n.to_ascii_lowercase()) {
                return Err(EngineError::InvalidInput(format!("duplicate column name {n:?}")));
            }
        }
        Ok(())
    }

    /// The Arrow schema of reads: `Epoch` timestamp[s, UTC], data columns, then `Nanoseconds` for ticks.
    pub fn arrow_schema(&self) -> SchemaRef {
        let mut fields = vec![Field::new(EPOCH, epoch_type(), false)];
        fields.extend(self.columns.iter().map(|c| Field::new(&c.name, c.ty.arrow_type(), false)));
        if self.kind == RecordKind::Variable {
            fields.push(Field::new(NANOSECONDS, DataType::Int32, false));
        }
        Arc::new(Schema::new(fields))
    }

    /// Column index by name.
    pub fn column(&self, name: &str) -> Option<(usize, &ColumnDef)> {
        self.columns.iter().enumerate().find(|(_, c)| c.name == name)
    }
}

/// The Arrow type of the `Epoch` column on reads.
pub fn epoch_type() -> DataType {
    DataType::Timestamp(TimeUnit::Second, Some("UTC".into()))
}
