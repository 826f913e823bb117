//! Arrow results as JSON tables: `{"columns": [{"name": "Epoch", "type": "Timestamp(s, \"UTC\")"}, …],
//! "rows": [[…], …]}`, one array per row in column order (so duplicate column names of a SQL result stay
//! apart).
//!
//! Integers, finite floats and booleans are JSON numbers and booleans; strings are strings; a float that
//! is NaN or infinite is the string `"NaN"`, `"inf"` or `"-inf"` (JSON has no such numbers); null is
//! null. Every other type — timestamps (RFC 3339, e.g. `2024-01-02T09:30:00Z`), dates, decimals,
//! binary, lists — is the text Arrow's display gives it.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{self as adt, DataType, Schema};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde::Serialize;
use serde_json::Value;

use crate::service::ServiceError;

/// One column of a [`Table`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Column {
    pub name: String,
    /// The Arrow type, as Arrow displays it (`Float64`, `Int64`, `Timestamp(s, "UTC")`, …).
    #[serde(rename = "type")]
    pub ty: String,
}

/// Rows of a result, ready to serialize.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Value>>,
}

/// RFC 3339 with only the fractional digits a value has (`+00:00` is then written `Z`).
const TIMESTAMP_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.f%:z";

/// The rows of `batches` (all of `schema`) as a [`Table`].
pub fn table(schema: &Schema, batches: &[RecordBatch]) -> Result<Table, ServiceError> {
    let columns = schema.fields().iter().map(|f| Column { name: f.name().clone(), ty: f.data_type().to_string() }).collect();
    let mut rows = Vec::with_capacity(batches.iter().map(|b| b.num_rows()).sum());
    let options = FormatOptions::default().with_null("null").with_timestamp_tz_format(Some(TIMESTAMP_FORMAT));
    for b in batches {
        if b.num_columns() != schema.fields().len() {
            return Err(ServiceError::internal(format!("a batch of {} columns in a result of {}", b.num_columns(), schema.fields().len())));
        }
        let formatters = b.columns().iter().map(|c| ArrayFormatter::try_new(c.as_ref(), &options)).collect::<Result<Vec<_>, _>>()?;
        for i in 0..b.num_rows() {
            rows.push(b.columns().iter().zip(&formatters).map(|(c, f)| cell(c.as_ref(), f, i)).collect());
        }
    }
    Ok(Table { columns, rows })
}

fn float(v: f64) -> Value {
    match serde_json::Number::from_f64(v) {
        Some(n) => Value::Number(n),
        None if v.is_nan() => Value::from("NaN"),
        None if v > 0.0 => Value::from("inf"),
        None => Value::from("-inf"),
    }
}

/// Row `i` of `arr` as a JSON value.
fn cell(arr: &dyn Array, fmt: &ArrayFormatter<'_>, i: usize) -> Value {
    if arr.is_null(i) {
        return Value::Null;
    }
    match arr.data_type() {
        DataType::Int8 => arr.as_primitive::<adt::Int8Type>().value(i).into(),
        DataType::Int16 => arr.as_primitive::<adt::Int16Type>().value(i).into(),
        DataType::Int32 => arr.as_primitive::<adt::Int32Type>().value(i).into(),
        DataType::Int64 => arr.as_primitive::<adt::Int64Type>().value(i).into(),
        DataType::UInt8 => arr.as_primitive::<adt::UInt8Type>().value(i).into(),
        DataType::UInt16 => arr.as_primitive::<adt::UInt16Type>().value(i).into(),
        DataType::UInt32 => arr.as_primitive::<adt::UInt32Type>().value(i).into(),
        DataType::UInt64 => arr.as_primitive::<adt::UInt64Type>().value(i).into(),
        // Widened through its shortest decimal text, so 1.1f32 is 1.1, not 1.100000023841858.
        DataType::Float32 => {
            let v = arr.as_primitive::<adt::Float32Type>().value(i);
            float(v.to_string().parse::<f64>().unwrap_or(f64::from(v)))
        }
        DataType::Float64 => float(arr.as_primitive::<adt::Float64Type>().value(i)),
        DataType::Boolean => arr.as_boolean().value(i).into(),
        DataType::Utf8 => arr.as_string::<i32>().value(i).into(),
        DataType::LargeUtf8 => arr.as_string::<i64>().value(i).into(),
        DataType::Utf8View => arr.as_string_view().value(i).into(),
        DataType::Timestamp(_, Some(_)) => {
            let text = fmt.value(i).to_string();
            match text.strip_suffix("+00:00") {
                Some(utc) => format!("{utc}Z").into(),
                None => text.into(),
            }
        }
        _ => fmt.value(i).to_string().into(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Float32Array, Float64Array, Int64Array, StringArray, TimestampSecondArray};
    use arrow::datatypes::{Field, TimeUnit};
    use serde_json::json;

    use super::*;

    #[test]
    fn values_keep_their_json_types_and_times_are_rfc3339() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("Epoch", DataType::Timestamp(TimeUnit::Second, Some("UTC".into())), false),
            Field::new("Open", DataType::Float32, true),
            Field::new("Close", DataType::Float64, false),
            Field::new("n", DataType::Int64, true),
            Field::new("s", DataType::Utf8, true),
        ]));
        let cols: Vec<ArrayRef> = vec![
            Arc::new(TimestampSecondArray::from(vec![1_704_187_800, 1_704_187_860]).with_timezone("UTC")),
            Arc::new(Float32Array::from(vec![Some(1.1), None])),
            Arc::new(Float64Array::from(vec![2.5, f64::NAN])),
            Arc::new(Int64Array::from(vec![Some(-3), None])),
            Arc::new(StringArray::from(vec![Some("AAPL"), None])),
        ];
        let b = RecordBatch::try_new(schema.clone(), cols).unwrap();
        let t = table(&schema, &[b]).unwrap();
        assert_eq!(t.columns[0], Column { name: "Epoch".into(), ty: "Timestamp(s, \"UTC\")".into() });
        assert_eq!(t.rows[0], vec![json!("2024-01-02T09:30:00Z"), json!(1.1), json!(2.5), json!(-3), json!("AAPL")]);
        assert_eq!(t.rows[1], vec![json!("2024-01-02T09:31:00Z"), Value::Null, json!("NaN"), Value::Null, Value::Null]);
    }
}
