//! Turning an incoming Arrow batch into the rows a bucket stores: validate, cast, truncate, sort, dedupe.
//!
//! Rules (MarketStore's, minus its bugs — reference §1.10, §14):
//! - `Epoch` must be int64 seconds or an Arrow timestamp (any unit; sub-second parts feed `Nanoseconds`).
//! - `Nanoseconds`, when sent, must be int32 in `0..1e9`.
//! - Every bucket column must be present, except nullable ones (stored as nulls), and no unknown column may
//!   be sent; columns are matched by name (never by position). Numeric types are cast to the bucket's type
//!   (values that do not fit are rejected); bool and string columns must be sent as bool and string;
//!   timestamps may be cast to a finer unit, never a coarser one; dictionary columns are stored as their values.
//! - Nulls only in nullable columns; `Epoch` and `Nanoseconds` are never null.
//! - Fixed buckets: Epoch is truncated to the interval start (days and longer on the calendar of
//!   `EngineConfig::timezone`) and the last row of an interval wins.
//! - Variable buckets: rows are stably sorted by (Epoch, Nanoseconds); duplicates are kept.

use std::sync::Arc;

use arrow::array::{new_null_array, Array, ArrayRef, AsArray, FixedSizeBinaryArray, Int32Array, Int64Array, PrimitiveArray, RecordBatch, UInt32Array, UInt8Array};
use arrow::buffer::ScalarBuffer;
use arrow::compute::{cast_with_options, take, CastOptions};
use arrow::datatypes::{self as adt, DataType, Field, TimeUnit};

use super::error::{EngineError, Result};
use super::key::Timeframe;
use super::partition::Rows;
use super::types::{BucketSchema, ColumnDef, ColumnType, RecordKind, EPOCH, NANOSECONDS, STRING16_WIDTH};

/// The schema a first write creates: its columns in incoming order, variable-length when the batch carries
/// a `Nanoseconds` column or the caller says so.
pub fn infer_schema(batch: &RecordBatch, variable: Option<bool>) -> Result<BucketSchema> {
    let has_nanos = batch.schema().column_with_name(NANOSECONDS).is_some();
    let kind = match variable {
        Some(true) => RecordKind::Variable,
        Some(false) => RecordKind::Fixed,
        None if has_nanos => RecordKind::Variable,
        None => RecordKind::Fixed,
    };
    let mut columns = Vec::new();
    for f in batch.schema().fields() {
        if f.name() == EPOCH || (f.name() == NANOSECONDS && kind == RecordKind::Variable) {
            continue;
        }
        columns.push(column_of_field(f)?);
    }
    // An Epoch-only bucket is made only by an explicit create (as MarketStore's empty column list); a write
    // with no data column is far more often a mistake than a wish for one, so it does not create a bucket.
    if columns.is_empty() {
        return Err(EngineError::InvalidInput(
            "a write that creates a bucket needs at least one data column besides Epoch (create an Epoch-only bucket explicitly)".into(),
        ));
    }
    let s = BucketSchema { kind, columns };
    s.validate()?;
    Ok(s)
}

/// The column a field creates: its Arrow type (or the type named by its `mkts:type` metadata, which the
/// MarketStore interfaces set to keep `U16` strings as string16) and its nullability.
pub fn column_of_field(f: &Field) -> Result<ColumnDef> {
    if let Some(t) = f.metadata().get(TYPE_METADATA) {
        let mut c = ColumnDef::parse(f.name().clone(), t)?;
        c.nullable |= f.is_nullable();
        return Ok(c);
    }
    let (ty, tz) = ColumnType::from_arrow(f.data_type())
        .ok_or_else(|| EngineError::InvalidInput(format!("column {:?} has type {} which cannot be stored", f.name(), f.data_type())))?;
    Ok(ColumnDef { name: f.name().clone(), ty, nullable: f.is_nullable(), tz, file: None })
}

/// Field metadata key naming the column type a first write creates (`string16`, `utf8`, …).
pub const TYPE_METADATA: &str = "mkts:type";

fn names_of(batch: &RecordBatch) -> String {
    batch.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(",")
}

fn bucket_names(schema: &BucketSchema) -> String {
    let mut v = vec![EPOCH.to_string()];
    v.extend(schema.columns.iter().map(|c| c.name.clone()));
    if schema.kind == RecordKind::Variable {
        v.push(NANOSECONDS.into());
    }
    v.join(",")
}

/// Extract (seconds, optional sub-second nanos) from the Epoch column.
fn epoch_column(arr: &ArrayRef) -> Result<(Vec<i64>, Option<Vec<i32>>)> {
    if arr.null_count() > 0 {
        return Err(EngineError::InvalidInput("Epoch column contains nulls".into()));
    }
    let split = |v: &[i64], per_sec: i64| -> (Vec<i64>, Option<Vec<i32>>) {
        let secs = v.iter().map(|x| x.div_euclid(per_sec)).collect();
        let ns = v.iter().map(|x| (x.rem_euclid(per_sec) * (1_000_000_000 / per_sec)) as i32).collect();
        (secs, Some(ns))
    };
    Ok(match arr.data_type() {
        DataType::Int64 => (arr.as_primitive::<adt::Int64Type>().values().to_vec(), None),
        DataType::Timestamp(TimeUnit::Second, _) => (arr.as_primitive::<adt::TimestampSecondType>().values().to_vec(), None),
        DataType::Timestamp(TimeUnit::Millisecond, _) => split(arr.as_primitive::<adt::TimestampMillisecondType>().values(), 1_000),
        DataType::Timestamp(TimeUnit::Microsecond, _) => split(arr.as_primitive::<adt::TimestampMicrosecondType>().values(), 1_000_000),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => split(arr.as_primitive::<adt::TimestampNanosecondType>().values(), 1_000_000_000),
        other => {
            return Err(EngineError::InvalidInput(format!(
                "unexpected data type for Epoch column: {other} (must be int64 seconds or a timestamp)"
            )));
        }
    })
}

/// `arr` as the storage array of column `def` ([`ColumnType::storage_type`]). Arrays already of the
/// column's type are shared, not copied. Nulls are refused unless the column is nullable; a cast that
/// cannot represent a value is refused, never turned into a null.
fn storage_column(def: &ColumnDef, arr: &ArrayRef) -> Result<ArrayRef> {
    let name = &def.name;
    let ty = def.ty;
    // Dictionary-encoded columns are stored as their values.
    let arr = match arr.data_type() {
        DataType::Dictionary(_, v) => cast_with_options(arr, v, &CastOptions::default()).map_err(|e| EngineError::InvalidInput(format!("column {name:?}: {e}")))?,
        _ => arr.clone(),
    };
    if arr.null_count() > 0 && !def.nullable {
        return Err(EngineError::InvalidInput(format!("column {name:?} contains nulls and is not nullable")));
    }
    let refuse = |what: &str| EngineError::InvalidInput(format!("column {name:?} is {} and can not be stored as {what}", arr.data_type()));
    // A safe cast turns what it cannot represent into nulls: more nulls after it than before is a refusal.
    let cast_checked = |to: &DataType| -> Result<ArrayRef> {
        if arr.data_type() == to {
            return Ok(arr.clone());
        }
        let c = cast_with_options(&arr, to, &CastOptions { safe: true, ..Default::default() }).map_err(|e| EngineError::InvalidInput(format!("column {name:?}: {e}")))?;
        if c.null_count() > arr.null_count() {
            return Err(EngineError::InvalidInput(format!("column {name:?}: values do not fit the bucket type {}", ty.wire_name())));
        }
        Ok(c)
    };
    let nulls = arr.nulls().cloned();
    match ty {
        ColumnType::Bool => {
            let b = arr.as_boolean_opt().ok_or_else(|| EngineError::InvalidInput(format!("can not cast to boolean: column {name:?} is {}", arr.data_type())))?;
            let v: Vec<u8> = (0..b.len()).map(|i| b.value(i) as u8).collect();
            Ok(Arc::new(UInt8Array::new(v.into(), nulls)))
        }
        ColumnType::String16 => {
            if !matches!(arr.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
                return Err(EngineError::InvalidInput(format!("can not cast to string: column {name:?} is {}", arr.data_type())));
            }
            let casted = cast_with_options(&arr, &DataType::Utf8, &CastOptions::default())?;
            let s = casted.as_string::<i32>();
            let mut out = vec![0u8; s.len() * STRING16_WIDTH];
            for i in 0..s.len() {
                if s.is_null(i) {
                    continue;
                }
                let v = s.value(i);
                if v.chars().count() > 16 {
                    return Err(EngineError::InvalidInput(format!("column {name:?}: string {v:?} is longer than 16 characters (string16)")));
                }
                for (j, ch) in v.chars().enumerate() {
                    let o = i * STRING16_WIDTH + j * 4;
                    out[o..o + 4].copy_from_slice(&(ch as u32).to_le_bytes());
                }
            }
            Ok(Arc::new(FixedSizeBinaryArray::try_new(STRING16_WIDTH as i32, out.into(), nulls)?))
        }
        ColumnType::Timestamp(unit) => {
            let target = DataType::Timestamp(unit.arrow(), None);
            let casted = match arr.data_type() {
                // Integers are taken as counts of the column's unit.
                DataType::Int64 => arr.clone(),
                DataType::Timestamp(from, _) => {
                    if unit_rank(from) > unit_rank(&unit.arrow()) {
                        return Err(EngineError::InvalidInput(format!(
                            "column {name:?} is {} and would lose precision as {}",
                            arr.data_type(),
                            ty.wire_name()
                        )));
                    }
                    cast_checked(&target)?
                }
                _ => return Err(refuse(&ty.wire_name())),
            };
            Ok(reinterpret::<adt::Int64Type>(&casted))
        }
        ColumnType::Date32 => match arr.data_type() {
            DataType::Date32 | DataType::Int32 => Ok(reinterpret::<adt::Int32Type>(&arr)),
            _ => Err(refuse("date32")),
        },
        ColumnType::Decimal128(p, sc) => {
            let ok = arr.data_type().is_numeric() || matches!(arr.data_type(), DataType::Decimal128(..));
            if !ok {
                return Err(refuse(&ty.wire_name()));
            }
            cast_checked(&DataType::Decimal128(p, sc))
        }
        ColumnType::Utf8 | ColumnType::LargeUtf8 => {
            if !matches!(arr.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
                return Err(refuse(&ty.wire_name()));
            }
            cast_with_options(&arr, &ty.storage_type(), &CastOptions::default())
                .map_err(|e| EngineError::InvalidInput(format!("column {name:?}: {e} (a year partition of a utf8 column holds at most 2 GiB of strings; large_utf8 has no such bound)")))
        }
        ColumnType::Binary => {
            if !matches!(arr.data_type(), DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) | DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
                return Err(refuse("binary"));
            }
            cast_with_options(&arr, &DataType::Binary, &CastOptions::default()).map_err(|e| EngineError::InvalidInput(format!("column {name:?}: {e}")))
        }
        _ => {
            if !arr.data_type().is_numeric() {
                return Err(EngineError::InvalidInput(format!("column {name:?} is {} and can not be cast to {}", arr.data_type(), ty.arrow_type())));
            }
            cast_checked(&ty.arrow_type())
        }
    }
}

/// Order of time units from coarse to fine.
fn unit_rank(u: &TimeUnit) -> u8 {
    match u {
        TimeUnit::Second => 0,
        TimeUnit::Millisecond => 1,
        TimeUnit::Microsecond => 2,
        TimeUnit::Nanosecond => 3,
    }
}

/// The same values and nulls as a primitive array of `T` (same width: timestamps as Int64, dates as Int32).
fn reinterpret<T: adt::ArrowPrimitiveType>(arr: &ArrayRef) -> ArrayRef {
    let d = arr.to_data();
    let values = ScalarBuffer::<T::Native>::new(d.buffers()[0].clone(), d.offset(), d.len());
    Arc::new(PrimitiveArray::<T>::new(values, arr.nulls().cloned()))
}

/// Validate and convert `batch` to the rows `schema` stores, sorted and (fixed) deduplicated.
pub fn normalize(batch: &RecordBatch, schema: &BucketSchema, tf: Timeframe, tz: Option<chrono_tz::Tz>) -> Result<Rows> {
    let bs = batch.schema();
    let mismatch = |reason: String| EngineError::SchemaMismatch {
        incoming: names_of(batch),
        bucket: bucket_names(schema),
        reason,
    };
    // Unknown columns.
    for f in bs.fields() {
        let n = f.name().as_str();
        let known = n == EPOCH
            || schema.column(n).is_some()
            || (n == NANOSECONDS && schema.kind == RecordKind::Variable)
            // A fixed bucket without a Nanoseconds column ignores it: in MarketStore it only refines the
            // row time, which truncation to the interval discards anyway.
            || (n == NANOSECONDS && schema.kind == RecordKind::Fixed);
        if !known {
            return Err(mismatch(format!(
                "unknown column {n:?}: add it first (add_column action, ALTER TABLE … ADD COLUMN, \\addcolumn) or set auto_add_columns: true"
            )));
        }
    }
    let epoch_arr = batch.column_by_name(EPOCH).ok_or_else(|| mismatch("missing column \"Epoch\"".into()))?;
    let (mut secs, ts_nanos) = epoch_column(epoch_arr)?;
    let n = secs.len();

    let mut nanos: Option<Vec<i32>> = None;
    if schema.kind == RecordKind::Variable {
        nanos = Some(match batch.column_by_name(NANOSECONDS) {
            Some(a) => {
                if a.data_type() != &DataType::Int32 {
                    return Err(EngineError::InvalidInput(format!(
                        "unexpected data type for Nanoseconds column: {} (must be int32)",
                        a.data_type()
                    )));
                }
                if a.null_count() > 0 {
                    return Err(EngineError::InvalidInput("Nanoseconds column contains nulls".into()));
                }
                let v = a.as_primitive::<adt::Int32Type>().values().to_vec();
                if let Some(bad) = v.iter().find(|x| !(0..1_000_000_000).contains(*x)) {
                    return Err(EngineError::InvalidInput(format!("Nanoseconds value {bad} is outside 0..1e9")));
                }
                v
            }
            None => ts_nanos.unwrap_or_else(|| vec![0; n]),
        });
    } else {
        tf.truncate_all_in(&mut secs, tz);
    }

    let mut data_cols = Vec::with_capacity(schema.columns.len());
    for c in &schema.columns {
        match batch.column_by_name(&c.name) {
            Some(arr) => data_cols.push(storage_column(c, arr)?),
            // A write that omits a nullable column stores nulls in it.
            None if c.nullable => data_cols.push(new_null_array(&c.ty.storage_type(), n)),
            None => return Err(mismatch(format!("missing column {:?}", c.name))),
        }
    }

    // Order rows. Fast path: already sorted (and, for fixed, unique).
    let order: Option<Vec<u32>> = match &nanos {
        None => {
            let sorted_unique = secs.windows(2).all(|w| w[0] < w[1]);
            if sorted_unique {
                None
            } else {
                let mut idx: Vec<u32> = (0..n as u32).collect();
                idx.sort_by_key(|&i| secs[i as usize]); // stable: arrival order within an interval
                // Last write of each interval wins.
                let mut keep = Vec::with_capacity(n);
                for (k, &i) in idx.iter().enumerate() {
                    let last_of_run = k + 1 == idx.len() || secs[idx[k + 1] as usize] != secs[i as usize];
                    if last_of_run {
                        keep.push(i);
                    }
                }
                Some(keep)
            }
        }
        Some(ns) => {
            let sorted = (1..n).all(|i| (secs[i - 1], ns[i - 1]) <= (secs[i], ns[i]));
            if sorted {
                None
            } else {
                let mut idx: Vec<u32> = (0..n as u32).collect();
                idx.sort_by_key(|&i| (secs[i as usize], ns[i as usize]));
                Some(idx)
            }
        }
    };

    let mut cols: Vec<ArrayRef> = Vec::with_capacity(2 + data_cols.len());
    cols.push(Arc::new(Int64Array::from(secs)));
    if let Some(ns) = nanos {
        cols.push(Arc::new(Int32Array::from(ns)));
    }
    cols.extend(data_cols);
    let len = match &order {
        None => n,
        Some(o) => {
            let idx = UInt32Array::from(o.clone());
            for c in cols.iter_mut() {
                *c = take(c.as_ref(), &idx, None)?;
            }
            o.len()
        }
    };
    Ok(Rows { len, cols })
}

/// Rows normalized against `from` mapped onto the columns of `to` (the bucket's columns changed while the
/// write was queued): columns kept by name, added nullable columns as nulls, dropped ones left out.
pub(super) fn adapt_rows(rows: Rows, from: &BucketSchema, to: &BucketSchema) -> Result<Rows> {
    let base = if to.kind == RecordKind::Variable { 2 } else { 1 };
    let mut cols: Vec<ArrayRef> = rows.cols.iter().take(base).cloned().collect();
    for c in &to.columns {
        match from.column(&c.name) {
            Some((i, old)) if old.ty == c.ty && (c.nullable || !old.nullable) => match rows.cols.get(base + i) {
                Some(a) => cols.push(a.clone()),
                None => return Err(EngineError::Aborted("the bucket's columns changed while this write was queued; retry".into())),
            },
            None if c.nullable => cols.push(new_null_array(&c.ty.storage_type(), rows.len)),
            _ => {
                return Err(EngineError::Aborted(format!(
                    "column {:?} changed while this write was queued; retry",
                    c.name
                )))
            }
        }
    }
    Ok(Rows { len: rows.len, cols })
}
