//! Candlers over input already in time order, in one pass: bars are runs of equal bar starts, so no hash
//! table and no per-group ordering are needed (what a bucket read gives: rows sorted by `Epoch`, then
//! `Nanoseconds`).
//!
//! Same output as the DataFrame path of [`crate::apply_function`] (names, order and types; the schema is
//! taken from that path's plan): `Open`/`Close` are the first/last row of the bar, `High`/`Low` its
//! max/min (floats ordered as arrow's `max`/`min` order them), `<col>_SUM` / `<col>_AVG` in Float64. It
//! applies when every price input is one column of a primitive numeric type and no input column has
//! nulls; otherwise [`candle_sorted`] returns `None` and the caller takes the DataFrame path.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, ArrowNativeTypeOp, AsArray, Float64Array, PrimitiveArray, RecordBatch, UInt32Array};
use arrow::compute::{cast, concat, take};
use arrow::datatypes::{ArrowPrimitiveType, DataType, Float64Type, Int64Type, SchemaRef};
use datafusion::prelude::SessionContext;

use crate::apply::ApplyOptions;
use crate::call::Function;
use crate::error::Result;
use crate::time_bucket::bucket_array;
use crate::timeframe::Unit;

/// Run `f` (a candler) over `batches` (one table, in time order) in one pass; `None` when the input does
/// not qualify (see the module docs) or `f` is not a candler.
pub async fn candle_sorted(schema: &SchemaRef, batches: &[RecordBatch], f: &Function, opts: &ApplyOptions) -> Result<Option<RecordBatch>> {
    let (tf, ohlc, sums, avgs) = match f {
        Function::CandleCandler { timeframe, open, high, low, close, sum, avg } => (*timeframe, [open, high, low, close], sum, avg),
        Function::TickCandler { timeframe, price, sum, avg } => (*timeframe, [price, price, price, price], sum, avg),
        _ => return Ok(None),
    };
    if ohlc.iter().any(|c| c.len() != 1) {
        return Ok(None);
    }
    // The output schema (and every name check) from the DataFrame path's plan; nothing runs.
    let ctx = SessionContext::new();
    let empty = ctx.read_batch(RecordBatch::new_empty(schema.clone()))?;
    let planned = crate::apply::apply_function(&ctx, empty, f, opts).await?;
    let out_schema: SchemaRef = Arc::new(planned.schema().as_arrow().clone());
    let resolve = |name: &str| -> Option<usize> {
        schema.index_of(name).ok().or_else(|| {
            let ci: Vec<usize> = schema.fields().iter().enumerate().filter(|(_, fl)| fl.name().eq_ignore_ascii_case(name)).map(|(i, _)| i).collect();
            (ci.len() == 1).then(|| ci[0])
        })
    };
    let Some(epoch_i) = resolve("Epoch") else { return Ok(None) };
    let cols_of = |names: &[String]| names.iter().map(|n| resolve(n)).collect::<Option<Vec<usize>>>();
    let (Some(prices), Some(sum_i), Some(avg_i)) = (cols_of(&ohlc.iter().map(|c| c[0].clone()).collect::<Vec<_>>()), cols_of(sums), cols_of(avgs)) else {
        return Ok(None);
    };
    let concat_col = |i: usize| -> Result<ArrayRef> {
        let parts: Vec<&dyn Array> = batches.iter().map(|b| b.column(i).as_ref()).collect();
        Ok(if parts.is_empty() { arrow::array::new_empty_array(schema.field(i).data_type()) } else { concat(&parts)? })
    };
    let mut used: Vec<usize> = vec![epoch_i];
    used.extend(prices.iter().chain(&sum_i).chain(&avg_i));
    let cols: Vec<ArrayRef> = used.iter().map(|&i| concat_col(i)).collect::<Result<_>>()?;
    if cols.iter().any(|c| c.null_count() > 0) || prices.iter().any(|&i| !schema.field(i).data_type().is_numeric()) {
        return Ok(None);
    }
    let epoch = &cols[0];
    let n = epoch.len();
    if u32::try_from(n).is_err() {
        return Ok(None);
    }
    let bucket_tz = matches!(tf.unit, Unit::Day | Unit::Month | Unit::Year).then_some(opts.timezone.as_deref()).flatten();
    let starts = bucket_array(epoch, tf, bucket_tz)?;
    let keys = cast(&starts, &DataType::Int64)?;
    let keys = keys.as_primitive::<Int64Type>().values();
    // Run boundaries: bars are maximal runs of one bar start (the input is in time order).
    let mut bounds: Vec<usize> = Vec::with_capacity(n / 8 + 2);
    for i in 0..n {
        if i == 0 || keys[i] != keys[i - 1] {
            bounds.push(i);
        }
    }
    bounds.push(n);
    let firsts = UInt32Array::from_iter_values(bounds[..bounds.len() - 1].iter().map(|&i| i as u32));
    let lasts = UInt32Array::from_iter_values(bounds[1..].iter().map(|&i| (i - 1) as u32));
    let mut out: Vec<ArrayRef> = Vec::with_capacity(out_schema.fields().len());
    out.push(take(starts.as_ref(), &firsts, None)?);
    out.push(take(cols[1].as_ref(), &firsts, None)?);
    out.push(extreme(&cols[2], &bounds, true)?);
    out.push(extreme(&cols[3], &bounds, false)?);
    out.push(take(cols[4].as_ref(), &lasts, None)?);
    // Per-bar sums (and means) in float64, over the cast column's values without another copy.
    let per_bar = |a: &ArrayRef, mean: bool| -> Result<ArrayRef> {
        let f = cast(a, &DataType::Float64)?;
        let v = f.as_primitive::<Float64Type>().values();
        Ok(Arc::new(Float64Array::from_iter_values(bounds.windows(2).map(|w| {
            let total = v[w[0]..w[1]].iter().sum::<f64>();
            if mean { total / (w[1] - w[0]) as f64 } else { total }
        }))))
    };
    for k in 0..sum_i.len() {
        out.push(per_bar(&cols[5 + k], false)?);
    }
    for k in 0..avg_i.len() {
        out.push(per_bar(&cols[5 + sum_i.len() + k], true)?);
    }
    if out.len() != out_schema.fields().len() {
        return Ok(None);
    }
    let out = out
        .into_iter()
        .zip(out_schema.fields())
        .map(|(a, fl)| if a.data_type() == fl.data_type() { Ok(a) } else { Ok(cast(&a, fl.data_type())?) })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(RecordBatch::try_new(out_schema, out)?))
}

/// Per-run max (or min) of a primitive column.
fn extreme(a: &ArrayRef, bounds: &[usize], max: bool) -> Result<ArrayRef> {
    macro_rules! typed {
        ($($t:ty),*) => {
            match a.data_type() {
                $(dt if dt == &<$t as ArrowPrimitiveType>::DATA_TYPE => Ok(Arc::new(runs::<$t>(a.as_primitive::<$t>(), bounds, max)))),*,
                other => Err(crate::error::UdfError::args("candlecandler", format!("unsupported price type {other}"))),
            }
        };
    }
    use arrow::datatypes::*;
    typed!(Float64Type, Float32Type, Int64Type, Int32Type, Int16Type, Int8Type, UInt64Type, UInt32Type, UInt16Type, UInt8Type)
}

fn runs<T: ArrowPrimitiveType>(a: &PrimitiveArray<T>, bounds: &[usize], max: bool) -> PrimitiveArray<T> {
    let v = a.values();
    PrimitiveArray::<T>::from_iter_values(bounds.windows(2).map(|w| {
        let mut best = v[w[0]];
        for &x in &v[w[0] + 1..w[1]] {
            if if max { x.is_gt(best) } else { x.is_lt(best) } {
                best = x;
            }
        }
        best
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float32Array, Int32Array, Int64Array, TimestampSecondArray};
    use arrow::datatypes::{Field, Schema, TimeUnit};

    fn input() -> (SchemaRef, Vec<RecordBatch>) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("Epoch", DataType::Timestamp(TimeUnit::Second, Some("UTC".into())), false),
            Field::new("Open", DataType::Float32, false),
            Field::new("High", DataType::Float64, false),
            Field::new("Low", DataType::Int64, false),
            Field::new("Close", DataType::Float64, false),
            Field::new("Volume", DataType::Int32, false),
        ]));
        let mut out = Vec::new();
        let mut t = 1_700_000_000i64;
        let mut x = 7u64;
        for part in 0..3 {
            let n = 5_000 + part * 777;
            let mut rnd = || {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 33) as i64
            };
            let ep: Vec<i64> = (0..n).map(|_| { t += 1 + rnd() % 400; t }).collect();
            let v: Vec<f64> = (0..n).map(|_| (rnd() % 10_000) as f64 / 7.0).collect();
            out.push(RecordBatch::try_new(schema.clone(), vec![
                Arc::new(TimestampSecondArray::from(ep).with_timezone("UTC")),
                Arc::new(Float32Array::from_iter_values(v.iter().map(|x| *x as f32))),
                Arc::new(Float64Array::from(v.clone())),
                Arc::new(Int64Array::from_iter_values(v.iter().map(|x| *x as i64))),
                Arc::new(Float64Array::from_iter_values(v.iter().map(|x| x * 2.0))),
                Arc::new(Int32Array::from_iter_values((0..n).map(|i| i as i32 % 1000))),
            ]).unwrap());
        }
        (schema, out)
    }

    #[tokio::test]
    async fn one_pass_bars_equal_the_dataframe_path() {
        let (schema, batches) = input();
        for (call, tz) in [
            ("candlecandler('1H',Open,High,Low,Close,Sum::Volume,Avg::Close)", None),
            ("candlecandler('5Min',Open,High,Low,Close)", None),
            ("candlecandler('1D',Open,High,Low,Close,Sum::Volume)", Some("America/New_York")),
            ("tickcandler('15Min',Close,Sum::Volume)", None),
        ] {
            let f = Function::parse(call).unwrap();
            let opts = ApplyOptions { timezone: tz.map(str::to_string), actions: None };
            let fast = candle_sorted(&schema, &batches, &f, &opts).await.unwrap().expect("qualifies");
            let ctx = SessionContext::new();
            let df = ctx.read_batches(batches.clone()).unwrap();
            let slow = crate::apply::apply_function(&ctx, df, &f, &opts).await.unwrap().collect().await.unwrap();
            let slow = arrow::compute::concat_batches(&slow[0].schema(), &slow).unwrap();
            assert_eq!(fast.schema(), slow.schema(), "{call}");
            assert!(fast.num_rows() > 10 && fast.num_rows() == slow.num_rows(), "{call}");
            for (i, fl) in fast.schema().fields().iter().enumerate() {
                if fl.name().ends_with("_SUM") || fl.name().ends_with("_AVG") {
                    let (a, b) = (fast.column(i).as_primitive::<Float64Type>(), slow.column(i).as_primitive::<Float64Type>());
                    for (x, y) in a.values().iter().zip(b.values()) {
                        assert!((x - y).abs() <= 1e-9 * y.abs().max(1.0), "{call} {}: {x} vs {y}", fl.name());
                    }
                } else {
                    assert_eq!(fast.column(i), slow.column(i), "{call} {}", fl.name());
                }
            }
        }
        // Input with nulls takes the DataFrame path.
        let mut cols = batches[0].columns().to_vec();
        cols[4] = Arc::new(Float64Array::from_iter((0..batches[0].num_rows()).map(|i| (i != 3).then_some(1.0))));
        let nullable = Arc::new(Schema::new(schema.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect::<Vec<_>>()));
        let with_null = RecordBatch::try_new(nullable.clone(), cols).unwrap();
        let f = Function::parse("candlecandler('1H',Open,High,Low,Close)").unwrap();
        assert!(candle_sorted(&nullable, &[with_null], &f, &ApplyOptions::default()).await.unwrap().is_none());
        // Not a candler: not this path.
        let f = Function::parse("count()").unwrap();
        assert!(candle_sorted(&schema, &batches, &f, &ApplyOptions::default()).await.unwrap().is_none());
    }
}
