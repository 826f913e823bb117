//! Executing MarketStore `functions` chains on DataFusion [`DataFrame`]s.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch};
use arrow::compute::{cast, concat};
use arrow::datatypes::{DataType, Field, Int64Type, Schema};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::functions_aggregate::expr_fn::{
    avg, count, first_value, last_value, max, min, sum,
};
use datafusion::logical_expr::{Expr, ExprSchemable, SortExpr, cast as cast_expr, ident, lit};
use datafusion::prelude::SessionContext;

use crate::adjust::{adjust_dataframe, load_actions};
use crate::call::Function;
use crate::error::{Result, UdfError};
use crate::time_bucket::{TimeBucket, units_per_second};
use crate::timeframe::{Timeframe, parse_timezone};

/// Options for [`apply_functions_with`].
///
/// * `timezone` — IANA zone whose wall clock defines day/week/month (and sub-day) bar
///   boundaries for the candlers (MarketStore's configured `timezone`); `None` = the
///   timezone of the `Epoch` type, i.e. UTC for `Timestamp(Second, Some("UTC"))`.
/// * `actions` — corporate actions for `adjust` (for MarketStore data: the
///   `<SYMBOL>/1D/ACTIONS` bucket of the queried symbol). A `DataFrame` is a lazy plan, so
///   passing one costs nothing unless an `adjust` call is present. See [`crate::adjust`] for
///   the accepted layouts. `adjust` without actions is an error.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Timezone for bar boundaries (`None` = UTC).
    pub timezone: Option<String>,
    /// Corporate actions for `adjust`.
    pub actions: Option<DataFrame>,
}

impl ApplyOptions {
    /// Options with a timezone.
    pub fn with_timezone(mut self, tz: impl Into<String>) -> Self {
        self.timezone = Some(tz.into());
        self
    }

    /// Options with a corporate-actions table for `adjust`.
    pub fn with_actions(mut self, actions: DataFrame) -> Self {
        self.actions = Some(actions);
        self
    }
}

/// Apply a chain of MarketStore function calls (`functions` query parameter) left to right:
/// the output of each call is the input of the next.
///
/// `input` must have an `Epoch` timestamp column (any unit; `Int64` seconds also accepted);
/// tick data may also carry `Nanoseconds` (Int32), which then orders rows within a second.
/// `tz` is the timezone for bar boundaries (`None` = the `Epoch` type's zone, normally UTC).
/// See [`apply_function`] for the semantics of each function.
pub async fn apply_functions(
    ctx: &SessionContext,
    input: DataFrame,
    calls: &[String],
    tz: Option<&str>,
) -> Result<DataFrame> {
    let opts = ApplyOptions {
        timezone: tz.map(str::to_string),
        actions: None,
    };
    apply_functions_with(ctx, input, calls, &opts).await
}

/// [`apply_functions`] with full [`ApplyOptions`] (timezone and the actions table for `adjust`).
pub async fn apply_functions_with<S: AsRef<str>>(
    ctx: &SessionContext,
    input: DataFrame,
    calls: &[S],
    opts: &ApplyOptions,
) -> Result<DataFrame> {
    let functions = calls
        .iter()
        .map(|c| Function::parse(c.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    let mut df = input;
    for f in &functions {
        df = apply_function(ctx, df, f, opts).await?;
    }
    Ok(df)
}

/// Apply one bound function.
///
/// * `candlecandler` / `tickcandler` — resample to bars of the given timeframe
///   ([`crate::Timeframe`] rules, in `opts.timezone`). Output: `Epoch` (bar start, same type as
///   the input `Epoch`), `Open` (first by time), `High` (max), `Low` (min), `Close` (last by
///   time), then one Float64 column per `Sum::` column (sum), named `<col>_SUM`, then one
///   Float64 column per `Avg::` column (mean), named `<col>_AVG`, as MarketStore names them.
///   Price columns keep their type (several columns bound to one input are averaged row-wise
///   as Float64). Bars are sorted by `Epoch`; empty windows do not appear; empty input gives
///   an empty result.
/// * `count` — one row: `Epoch` = last input `Epoch` (1970-01-01 when the input is empty),
///   `Count` Int64.
/// * `min` / `max` — one row: `Epoch` = time of the first row holding the extreme value,
///   `Min` / `Max` with the column's type. `avg` — `Epoch` = last input `Epoch`, `Avg`
///   Float64. Empty input: `Epoch` 1970-01-01 and a null value.
/// * `gap` — one row per gap: `Epoch` (time before the gap), `End` (time after), `Length`
///   (Int64 seconds). `gap('<tf>')` reports gaps strictly longer than the timeframe (months
///   = 30 days, years = 365 days); `gap()` reports gaps whose z-score (population standard
///   deviation of all gaps, 1 if that is 0) exceeds 3.
/// * `adjust` — split/dividend adjustment, see [`crate::adjust`].
pub async fn apply_function(
    ctx: &SessionContext,
    input: DataFrame,
    f: &Function,
    opts: &ApplyOptions,
) -> Result<DataFrame> {
    match f {
        Function::CandleCandler {
            timeframe,
            open,
            high,
            low,
            close,
            sum,
            avg,
        } => candle(
            input,
            "candlecandler",
            *timeframe,
            [open, high, low, close],
            sum,
            avg,
            opts,
        ),
        Function::TickCandler {
            timeframe,
            price,
            sum,
            avg,
        } => candle(
            input,
            "tickcandler",
            *timeframe,
            [price, price, price, price],
            sum,
            avg,
            opts,
        ),
        Function::Count { column } => summary(input, "count", column.as_deref()),
        Function::Min { column } => summary(input, "min", Some(column)),
        Function::Max { column } => summary(input, "max", Some(column)),
        Function::Avg { column } => summary(input, "avg", Some(column)),
        Function::Gap { threshold } => gap(ctx, input, *threshold).await,
        Function::Adjust { splits, dividends } => {
            let Some(actions) = opts.actions.clone() else {
                return Err(UdfError::Actions(
                    "no corporate actions table was provided".into(),
                ));
            };
            let actions = load_actions(actions).await?;
            adjust_dataframe(input, &actions, *splits, *dividends)
        }
    }
}

/// Find a column by exact name, else by a unique case-insensitive match.
pub(crate) fn resolve_column(schema: &DFSchema, name: &str, function: &str) -> Result<String> {
    let names: Vec<&String> = schema.fields().iter().map(|f| f.name()).collect();
    if let Some(n) = names.iter().find(|n| n.as_str() == name) {
        return Ok((*n).clone());
    }
    let ci: Vec<&&String> = names
        .iter()
        .filter(|n| n.eq_ignore_ascii_case(name))
        .collect();
    match ci.as_slice() {
        [n] => Ok((**n).clone()),
        _ => Err(UdfError::ColumnNotFound {
            function: function.to_string(),
            column: name.to_string(),
            available: names.iter().map(|n| n.to_string()).collect(),
        }),
    }
}

/// The time-ordering keys of a MarketStore table: `Epoch` and, for tick data, `Nanoseconds`.
pub(crate) fn time_keys(schema: &DFSchema, function: &str) -> Result<(String, Option<String>)> {
    let epoch = resolve_column(schema, "Epoch", function)?;
    let nanos = resolve_column(schema, "Nanoseconds", function).ok();
    Ok((epoch, nanos))
}

fn order_by(epoch: &str, nanos: Option<&str>, asc: bool) -> Vec<SortExpr> {
    let mut v = vec![ident(epoch).sort(asc, false)];
    if let Some(n) = nanos {
        v.push(ident(n).sort(asc, false));
    }
    v
}

/// Row-wise average of several columns (or the single column itself).
fn price_expr(schema: &DFSchema, cols: &[String], function: &str) -> Result<Expr> {
    let resolved = cols
        .iter()
        .map(|c| resolve_column(schema, c, function))
        .collect::<Result<Vec<_>>>()?;
    match resolved.as_slice() {
        [] => Err(UdfError::args(function, "no price column bound")),
        [c] => Ok(ident(c)),
        many => {
            let n = many.len() as f64;
            let total = many
                .iter()
                .map(|c| cast_expr(ident(c), DataType::Float64))
                .reduce(|a, b| a + b)
                .ok_or_else(|| UdfError::args(function, "no price column bound"))?;
            Ok(total / lit(n))
        }
    }
}

fn candle(
    input: DataFrame,
    function: &str,
    tf: Timeframe,
    ohlc: [&Vec<String>; 4],
    sums: &[String],
    avgs: &[String],
    opts: &ApplyOptions,
) -> Result<DataFrame> {
    // Validate the timezone once, up front (the UDF would fail per batch otherwise).
    parse_timezone(opts.timezone.as_deref())?;
    let schema = input.schema().clone();
    let (epoch, nanos) = time_keys(&schema, function)?;
    let [o, h, l, c] = ohlc;
    let order = order_by(&epoch, nanos.as_deref(), true);
    let mut bucket_args = vec![lit(tf.to_string()), ident(&epoch)];
    // As MarketStore's candler (`CandleDuration.Truncate`): days, months and years follow the wall clock
    // of the configured zone; seconds, minutes, hours and weeks are Go's `Time.Truncate`, multiples of the
    // duration counted in absolute time (so 4H bars start at 00:00, 04:00 … UTC in any zone, weeks on
    // Monday 00:00 UTC).
    if let Some(tz) = &opts.timezone
        && matches!(tf.unit, crate::timeframe::Unit::Day | crate::timeframe::Unit::Month | crate::timeframe::Unit::Year)
    {
        bucket_args.push(lit(tz.clone()));
    }
    let bucket = TimeBucket::udf().call(bucket_args).alias("Epoch");
    let mut names: Vec<String> = ["Epoch", "Open", "High", "Low", "Close"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut aggs = vec![
        first_value(price_expr(&schema, o, function)?, order.clone()).alias("Open"),
        max(price_expr(&schema, h, function)?).alias("High"),
        min(price_expr(&schema, l, function)?).alias("Low"),
        last_value(price_expr(&schema, c, function)?, order).alias("Close"),
    ];
    // MarketStore's candler names these `<col>_SUM` and `<col>_AVG` (every Sum column, then every Avg
    // column, whatever the order of the arguments) and computes them in float64; clients select them by
    // those names, so they are kept exactly.
    for (cols, suffix, agg) in [
        (sums, "_SUM", sum as fn(Expr) -> Expr),
        (avgs, "_AVG", avg as fn(Expr) -> Expr),
    ] {
        for col in cols {
            let col = resolve_column(&schema, col, function)?;
            let name = format!("{col}{suffix}");
            if names.contains(&name) {
                return Err(UdfError::args(
                    function,
                    format!("column {col:?} bound twice to the same input"),
                ));
            }
            aggs.push(agg(cast_expr(ident(&col), DataType::Float64)).alias(&name));
            names.push(name);
        }
    }
    let df = input
        .aggregate(vec![bucket], aggs)?
        .select(names.iter().map(ident).collect::<Vec<_>>())?
        .sort(vec![ident("Epoch").sort(true, false)])?;
    Ok(df)
}

/// count / min / max / avg: one summary row with a data timestamp.
fn summary(input: DataFrame, function: &str, column: Option<&str>) -> Result<DataFrame> {
    let schema = input.schema().clone();
    let (epoch, nanos) = time_keys(&schema, function)?;
    let epoch_type = schema
        .field_with_unqualified_name(&epoch)
        .map_err(UdfError::from)?
        .data_type()
        .clone();
    let zero = lit(ScalarValue::new_zero(&epoch_type)?);
    let last_epoch = || max(ident(&epoch));
    let (time, value, name) = match (function, column) {
        ("count", None) => (last_epoch(), count(lit(1i64)), "Count"),
        ("count", Some(c)) => (
            last_epoch(),
            count(ident(resolve_column(&schema, c, function)?)),
            "Count",
        ),
        ("avg", Some(c)) => {
            let c = resolve_column(&schema, c, function)?;
            (
                last_epoch(),
                avg(cast_expr(ident(&c), DataType::Float64)),
                "Avg",
            )
        }
        ("min" | "max", Some(c)) => {
            let c = resolve_column(&schema, c, function)?;
            let is_min = function == "min";
            // Time of the first row that holds the extreme value.
            let mut order = vec![ident(&c).sort(is_min, false)];
            order.extend(order_by(&epoch, nanos.as_deref(), true));
            let value = if is_min {
                min(ident(&c))
            } else {
                max(ident(&c))
            };
            (
                first_value(ident(&epoch), order),
                value,
                if is_min { "Min" } else { "Max" },
            )
        }
        _ => return Err(UdfError::args(function, "expects one column")),
    };
    let df = input.aggregate(vec![], vec![time.alias("__time"), value.alias(name)])?;
    let epoch_out = Expr::ScalarFunction(datafusion::logical_expr::expr::ScalarFunction::new_udf(
        datafusion::functions::core::coalesce(),
        vec![ident("__time"), zero],
    ))
    .alias("Epoch");
    // Keep the input Epoch type even if coalesce widened it.
    let epoch_out = match epoch_out.get_type(df.schema()) {
        Ok(t) if t == epoch_type => epoch_out,
        _ => cast_expr(epoch_out, epoch_type).alias("Epoch"),
    };
    Ok(df.select(vec![epoch_out, ident(name)])?)
}

/// Epoch values of a DataFrame as i64 in the column's own unit, plus units per second.
async fn epoch_values(input: DataFrame, epoch: &str) -> Result<(Vec<i64>, DataType, i64)> {
    let batches = input.select(vec![ident(epoch)])?.collect().await?;
    let dtype = match batches.first() {
        Some(b) => b.schema().field(0).data_type().clone(),
        None => DataType::Int64,
    };
    let scale = units_per_second(&dtype)?;
    let arrays: Vec<ArrayRef> = batches.iter().map(|b| b.column(0).clone()).collect();
    let mut values = Vec::new();
    if !arrays.is_empty() {
        let refs: Vec<&dyn Array> = arrays.iter().map(|a| a.as_ref()).collect();
        let all = cast(&concat(&refs)?, &DataType::Int64)?;
        let all = all.as_primitive::<Int64Type>();
        values.extend(all.iter().flatten());
    }
    Ok((values, dtype, scale))
}

async fn gap(
    ctx: &SessionContext,
    input: DataFrame,
    threshold: Option<Timeframe>,
) -> Result<DataFrame> {
    let schema = input.schema().clone();
    let (epoch, _) = time_keys(&schema, "gap")?;
    let declared = schema
        .field_with_unqualified_name(&epoch)
        .map_err(UdfError::from)?
        .data_type()
        .clone();
    let (mut t, _, scale) = epoch_values(input, &epoch).await?;
    if !t.is_sorted() {
        t.sort_unstable();
    }
    let diffs: Vec<i64> = t.windows(2).map(|w| w[1] - w[0]).collect();
    let flagged: Vec<bool> = match threshold {
        Some(tf) => {
            let limit = tf.nominal_seconds().saturating_mul(scale);
            diffs.iter().map(|d| *d > limit).collect()
        }
        None => {
            let n = diffs.len() as f64;
            let mean = diffs.iter().map(|d| *d as f64).sum::<f64>() / n;
            let var = diffs
                .iter()
                .map(|d| (*d as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            let sd = if var.sqrt() == 0.0 || var.is_nan() {
                1.0
            } else {
                var.sqrt()
            };
            diffs
                .iter()
                .map(|d| ((*d as f64 - mean) / sd).abs() > 3.0)
                .collect()
        }
    };
    let (mut start, mut end, mut len) = (Vec::new(), Vec::new(), Vec::new());
    for (i, f) in flagged.iter().enumerate() {
        if *f {
            start.push(t[i]);
            end.push(t[i + 1]);
            len.push(diffs[i] / scale);
        }
    }
    let to_time = |v: Vec<i64>| -> Result<ArrayRef> {
        Ok(cast(
            &(Arc::new(Int64Array::from(v)) as ArrayRef),
            &declared,
        )?)
    };
    let out_schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", declared.clone(), false),
        Field::new("End", declared.clone(), false),
        Field::new("Length", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        out_schema,
        vec![
            to_time(start)?,
            to_time(end)?,
            Arc::new(Int64Array::from(len)),
        ],
    )?;
    Ok(ctx.read_batch(batch)?)
}
