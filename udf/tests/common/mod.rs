//! Shared helpers for the integration tests: build small MemTables and read results back.
#![allow(dead_code)]

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, TimestampSecondArray,
};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, TimeUnit};
use chrono::NaiveDateTime;
use datafusion::dataframe::DataFrame;
use datafusion::prelude::SessionContext;

/// `"2024-01-02 09:30:00"` (UTC) as Unix seconds.
pub fn ts(s: &str) -> i64 {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
        .expect("test timestamp")
        .and_utc()
        .timestamp()
}

pub fn epoch_type() -> DataType {
    DataType::Timestamp(TimeUnit::Second, Some("UTC".into()))
}

pub fn epoch_array(v: &[i64]) -> ArrayRef {
    Arc::new(TimestampSecondArray::from(v.to_vec()).with_timezone("UTC"))
}

/// 1Min-style OHLCV bars: Epoch, Open..Close Float32, Volume Int64.
pub fn bars_batch(rows: &[(i64, f32, f32, f32, f32, i64)]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", epoch_type(), false),
        Field::new("Open", DataType::Float32, false),
        Field::new("High", DataType::Float32, false),
        Field::new("Low", DataType::Float32, false),
        Field::new("Close", DataType::Float32, false),
        Field::new("Volume", DataType::Int64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            epoch_array(&rows.iter().map(|r| r.0).collect::<Vec<_>>()),
            Arc::new(Float32Array::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
            Arc::new(Float32Array::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
            Arc::new(Float32Array::from(
                rows.iter().map(|r| r.3).collect::<Vec<_>>(),
            )),
            Arc::new(Float32Array::from(
                rows.iter().map(|r| r.4).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.5).collect::<Vec<_>>(),
            )),
        ],
    )
    .expect("bars batch")
}

/// Tick rows: Epoch, Nanoseconds Int32, Price Float64, Size Int64.
pub fn ticks_batch(rows: &[(i64, i32, f64, i64)]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", epoch_type(), false),
        Field::new("Nanoseconds", DataType::Int32, false),
        Field::new("Price", DataType::Float64, false),
        Field::new("Size", DataType::Int64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            epoch_array(&rows.iter().map(|r| r.0).collect::<Vec<_>>()),
            Arc::new(Int32Array::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.3).collect::<Vec<_>>(),
            )),
        ],
    )
    .expect("ticks batch")
}

pub fn strings(v: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from(v.to_vec()))
}

/// Register a batch as a MemTable and return it as a DataFrame.
pub async fn table(ctx: &SessionContext, name: &str, batch: RecordBatch) -> DataFrame {
    ctx.register_batch(name, batch).expect("register");
    ctx.table(name).await.expect("table")
}

/// Collect a DataFrame into one batch.
pub async fn collect(df: DataFrame) -> RecordBatch {
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.expect("collect");
    concat_batches(&schema, &batches).expect("concat")
}

pub fn names(b: &RecordBatch) -> Vec<String> {
    b.schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

fn column(b: &RecordBatch, name: &str) -> ArrayRef {
    b.column(
        b.schema()
            .index_of(name)
            .unwrap_or_else(|_| panic!("no column {name} in {:?}", names(b))),
    )
    .clone()
}

/// Column as i64 (timestamps as their raw value); nulls become i64::MIN.
pub fn ints(b: &RecordBatch, name: &str) -> Vec<i64> {
    let c = cast(&column(b, name), &DataType::Int64).expect("cast i64");
    c.as_primitive::<Int64Type>()
        .iter()
        .map(|v| v.unwrap_or(i64::MIN))
        .collect()
}

/// Column as f64; nulls become NaN.
pub fn floats(b: &RecordBatch, name: &str) -> Vec<f64> {
    let c = cast(&column(b, name), &DataType::Float64).expect("cast f64");
    c.as_primitive::<Float64Type>()
        .iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect()
}

pub fn dtype(b: &RecordBatch, name: &str) -> DataType {
    column(b, name).data_type().clone()
}

pub fn nulls(b: &RecordBatch, name: &str) -> Vec<bool> {
    let c = column(b, name);
    (0..c.len()).map(|i| c.is_null(i)).collect()
}
