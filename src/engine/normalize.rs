//! Turning an incoming Arrow batch into the rows a bucket stores: validate, cast, truncate, sort, dedupe.
//!
//! Rules (MarketStore's, minus its bugs — reference §1.10, §14):
//! - `Epoch` must be int64 seconds or an Arrow timestamp (any unit; sub-second parts feed `Nanoseconds`).
//! - `Nanoseconds`, when sent, must be int32 in `0..1e9`.
//! - Every bucket column must be present and no unknown column may be sent; columns are matched by name
//!   (never by position). Numeric types are cast to the bucket's type (values that do not fit are rejected);
//!   bool and string columns must be sent as bool and string.
//! - Fixed buckets: Epoch is truncated to the interval start and the last row of an interval wins.
//! - Variable buckets: rows are stably sorted by (Epoch, Nanoseconds); duplicates are kept.

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::buffer::Buffer;
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::{self as adt, DataType, TimeUnit};

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
        let ty = ColumnType::from_arrow(f.data_type()).ok_or_else(|| {
            EngineError::InvalidInput(format!("column {:?} has type {} which cannot be stored", f.name(), f.data_type()))
        })?;
        columns.push(ColumnDef { name: f.name().clone(), ty });
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

/// Little-endian bytes of `arr` stored as `ty`. Numeric columns already of the bucket's type are shared,
/// not copied.
fn column_bytes(name: &str, arr: &ArrayRef, ty: ColumnType) -> Result<Buffer> {
    if arr.null_count() > 0 {
        return Err(EngineError::InvalidInput(format!("column {name:?} contains nulls")));
    }
    let target = ty.arrow_type();
    match ty {
        ColumnType::Bool => {
            let b = arr.as_boolean_opt().ok_or_else(|| {
                EngineError::InvalidInput(format!("can not cast to boolean: column {name:?} is {}", arr.data_type()))
            })?;
            Ok(Buffer::from_vec((0..b.len()).map(|i| b.value(i) as u8).collect::<Vec<u8>>()))
        }
        ColumnType::String16 => {
            let casted = match arr.data_type() {
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                    cast_with_options(arr, &DataType::Utf8, &CastOptions::default())?
                }
                other => {
                    return Err(EngineError::InvalidInput(format!(
                        "can not cast to string: column {name:?} is {other}"
                    )));
                }
            };
            let s = casted.as_string::<i32>();
            let mut out = vec![0u8; s.len() * STRING16_WIDTH];
            for i in 0..s.len() {
                let v = s.value(i);
                if v.chars().count() > 16 {
                    return Err(EngineError::InvalidInput(format!(
                        "column {name:?}: string {v:?} is longer than 16 characters (string16)"
                    )));
                }
                for (j, ch) in v.chars().enumerate() {
                    let o = i * STRING16_WIDTH + j * 4;
                    out[o..o + 4].copy_from_slice(&(ch as u32).to_le_bytes());
                }
            }
            Ok(Buffer::from_vec(out))
        }
        _ => {
            let src_numeric = arr.data_type().is_numeric();
            if !src_numeric {
                return Err(EngineError::InvalidInput(format!(
                    "column {name:?} is {} and can not be cast to {}",
                    arr.data_type(),
                    target
                )));
            }
            let casted = if arr.data_type() == &target {
                arr.clone()
            } else {
                let c = cast_with_options(arr, &target, &CastOptions { safe: true, ..Default::default() })
                    .map_err(|e| EngineError::InvalidInput(format!("column {name:?}: {e}")))?;
                if c.null_count() > 0 {
                    return Err(EngineError::InvalidInput(format!(
                        "column {name:?}: values do not fit the bucket type {}",
                        ty.wire_name()
                    )));
                }
                c
            };
            let data = casted.to_data();
            let w = ty.width();
            Ok(data.buffers()[0].slice_with_length(data.offset() * w, data.len() * w))
        }
    }
}

/// Validate and convert `batch` to the rows `schema` stores, sorted and (fixed) deduplicated.
pub fn normalize(batch: &RecordBatch, schema: &BucketSchema, tf: Timeframe) -> Result<Rows> {
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
            return Err(mismatch(format!("unknown column {n:?}")));
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
        for s in secs.iter_mut() {
            *s = tf.truncate(*s);
        }
    }

    let mut data_cols = Vec::with_capacity(schema.columns.len());
    for c in &schema.columns {
        let arr = batch.column_by_name(&c.name).ok_or_else(|| mismatch(format!("missing column {:?}", c.name)))?;
        data_cols.push(column_bytes(&c.name, arr, c.ty)?);
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

    let mut cols: Vec<Buffer> = Vec::with_capacity(2 + data_cols.len());
    let has_nanos = nanos.is_some();
    cols.push(Buffer::from_vec(secs));
    if let Some(ns) = nanos {
        cols.push(Buffer::from_vec(ns));
    }
    cols.extend(data_cols);
    let len = match &order {
        None => n,
        Some(o) => {
            let widths: Vec<usize> = std::iter::once(8)
                .chain(has_nanos.then_some(4))
                .chain(schema.columns.iter().map(|c| c.ty.width()))
                .collect();
            for (c, w) in cols.iter_mut().zip(widths) {
                let mut out = Vec::with_capacity(o.len() * w);
                let src = c.as_slice();
                for &i in o {
                    let k = i as usize * w;
                    out.extend_from_slice(&src[k..k + w]);
                }
                *c = Buffer::from_vec(out);
            }
            o.len()
        }
    };
    Ok(Rows { len, cols })
}
