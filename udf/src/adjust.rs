//! `adjust`: split and (stock) dividend adjustment of historical prices and volumes.
//!
//! # What it does
//! Every corporate action has an effective (ex-) time `t` and a `rate` (new shares per old
//! share: a 4-for-1 split has rate 4, a 1-for-10 reverse split 0.1, a 5 % stock dividend
//! 1.05). For each input row at time `e`, the cumulative factor is the product of the rates of
//! all selected actions with `t > e` (actions on or before the row do not touch it). Then:
//!
//! * a column named `Volume` (any case, any numeric type) is **multiplied** by the factor and
//!   rounded to an integer for integer types;
//! * every other floating-point column (Float32/Float64) is **divided** by the factor and
//!   rounded to 4 decimals;
//! * all other columns (`Epoch`, `Nanoseconds`, integer columns, …) pass through unchanged.
//!
//! Rows with factor 1 are returned bit-for-bit unchanged. Columns keep their order and types.
//! (MarketStore only adjusted Float64 columns and Int64 `Volume`, rounded all rows, and emitted
//! the columns in random order.)
//!
//! # Actions table
//! [`load_actions`] accepts either layout:
//!
//! 1. **Simple**: `Epoch` (effective time; timestamp or Int64 seconds), `Type` (Utf8:
//!    `split`, `reverse_split` → split events; `dividend`, `stock_dividend` → dividend
//!    events), `Rate` (numeric).
//! 2. **MarketStore/ICE `<SYM>/1D/ACTIONS`**: `TextNumber`, `UpdateTextNumber`,
//!    `DeleteTextNumber` (Int64), `NotificationType`, `Status` (UInt8 ASCII codes),
//!    `ExpirationDate` (Int64 Unix seconds) and `Rate` (Float64). Rows are read in `Epoch`
//!    order: status `N` adds announcement `TextNumber`, `U` replaces announcement
//!    `UpdateTextNumber` by the row, `D` deletes `DeleteTextNumber`. NotificationType `7`
//!    (split) and `+` (reverse split) are split events, `/` (stock dividend) dividend events;
//!    the event time is `ExpirationDate`.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::common::{exec_err, plan_err};
use datafusion::dataframe::DataFrame;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility, ident,
};

use crate::apply::{resolve_column, time_keys};
use crate::error::{Result, UdfError};
use crate::time_bucket::units_per_second;

/// Kind of a corporate action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActionKind {
    /// Stock split or reverse split.
    Split,
    /// Stock dividend.
    Dividend,
}

/// One corporate action: rows strictly before `epoch` are adjusted by `rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Action {
    /// Effective time, Unix seconds.
    pub epoch: i64,
    /// Split or dividend.
    pub kind: ActionKind,
    /// New shares per old share.
    pub rate: f64,
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Option<&'a ArrayRef> {
    let schema = batch.schema();
    let idx = schema
        .fields()
        .iter()
        .position(|f| f.name() == name)
        .or_else(|| {
            schema
                .fields()
                .iter()
                .position(|f| f.name().eq_ignore_ascii_case(name))
        })?;
    Some(batch.column(idx))
}

fn i64_column(batch: &RecordBatch, name: &str) -> Result<Vec<Option<i64>>> {
    let a = column(batch, name)
        .ok_or_else(|| UdfError::Actions(format!("actions table has no {name} column")))?;
    let a = match a.data_type() {
        DataType::Timestamp(_, _) => {
            let scale = units_per_second(a.data_type())?;
            let raw = cast(a, &DataType::Int64)?;
            return Ok(raw
                .as_primitive::<Int64Type>()
                .iter()
                .map(|v| v.map(|v| v.div_euclid(scale)))
                .collect());
        }
        _ => cast(a, &DataType::Int64)?,
    };
    Ok(a.as_primitive::<Int64Type>().iter().collect())
}

fn f64_column(batch: &RecordBatch, name: &str) -> Result<Vec<Option<f64>>> {
    let a = column(batch, name)
        .ok_or_else(|| UdfError::Actions(format!("actions table has no {name} column")))?;
    Ok(cast(a, &DataType::Float64)?
        .as_primitive::<Float64Type>()
        .iter()
        .collect())
}

/// Read the corporate actions from a DataFrame (either layout of the [module docs](self)),
/// sorted by time. Rows with a null time/rate or a non-positive rate are skipped.
pub async fn load_actions(actions: DataFrame) -> Result<Vec<Action>> {
    let schema = Arc::new(actions.schema().as_arrow().clone());
    let batches = actions.collect().await?;
    let batch = concat_batches(&schema, &batches)?;
    let mut out =
        if column(&batch, "NotificationType").is_some() && column(&batch, "Status").is_some() {
            ice_actions(&batch)?
        } else {
            simple_actions(&batch)?
        };
    out.sort_by_key(|a| a.epoch);
    Ok(out)
}

fn simple_actions(batch: &RecordBatch) -> Result<Vec<Action>> {
    let epoch = i64_column(batch, "Epoch")?;
    let rate = f64_column(batch, "Rate")?;
    let kind = column(batch, "Type")
        .ok_or_else(|| UdfError::Actions("actions table has no Type column".into()))?;
    let kind = cast(kind, &DataType::Utf8)?;
    let kind = kind.as_string::<i32>();
    let mut out = Vec::new();
    for i in 0..batch.num_rows() {
        let (Some(epoch), Some(rate), Some(k)) =
            (epoch[i], rate[i], kind.is_valid(i).then(|| kind.value(i)))
        else {
            continue;
        };
        let kind = match k
            .trim()
            .to_ascii_lowercase()
            .replace(['-', ' '], "_")
            .as_str()
        {
            "split" | "reverse_split" | "stock_split" | "7" | "+" => ActionKind::Split,
            "dividend" | "stock_dividend" | "/" => ActionKind::Dividend,
            other => return Err(UdfError::Actions(format!("unknown action type {other:?}"))),
        };
        if rate > 0.0 && rate.is_finite() {
            out.push(Action { epoch, kind, rate });
        }
    }
    Ok(out)
}

fn ice_actions(batch: &RecordBatch) -> Result<Vec<Action>> {
    let n = batch.num_rows();
    let order: Vec<Option<i64>> = match column(batch, "Epoch") {
        Some(_) => i64_column(batch, "Epoch")?,
        None => vec![Some(0); n],
    };
    let text = i64_column(batch, "TextNumber")?;
    let update = i64_column(batch, "UpdateTextNumber")?;
    let delete = i64_column(batch, "DeleteTextNumber")?;
    let ntype = i64_column(batch, "NotificationType")?;
    let status = i64_column(batch, "Status")?;
    let expiry = i64_column(batch, "ExpirationDate")?;
    let rate = f64_column(batch, "Rate")?;
    let mut rows: Vec<usize> = (0..n).collect();
    rows.sort_by_key(|&i| order[i].unwrap_or(i64::MIN));
    let mut live: BTreeMap<i64, usize> = BTreeMap::new();
    for i in rows {
        match status[i].and_then(|s| u8::try_from(s).ok()).map(char::from) {
            Some('N') => {
                if let Some(t) = text[i] {
                    live.insert(t, i);
                }
            }
            Some('U') => {
                if let Some(t) = update[i] {
                    live.insert(t, i);
                }
            }
            Some('D') => {
                if let Some(t) = delete[i] {
                    live.remove(&t);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for &i in live.values() {
        let kind = match ntype[i].and_then(|s| u8::try_from(s).ok()).map(char::from) {
            Some('7' | '+') => ActionKind::Split,
            Some('/') => ActionKind::Dividend,
            _ => continue,
        };
        if let (Some(epoch), Some(rate)) = (expiry[i], rate[i])
            && rate > 0.0
            && rate.is_finite()
        {
            out.push(Action { epoch, kind, rate });
        }
    }
    Ok(out)
}

/// Scalar UDF `(value, epoch) -> adjusted value` with the action schedule baked in.
#[derive(Debug, PartialEq, Eq, Hash)]
struct AdjustFn {
    signature: Signature,
    /// Event times, ascending (Unix seconds).
    bounds: Vec<i64>,
    /// `suffix[i]` = product of rates of events `i..` as f64 bits; `suffix[len] = 1`.
    suffix: Vec<u64>,
    /// Multiply (volumes) instead of divide-and-round (prices).
    multiply: bool,
}

impl AdjustFn {
    fn new(actions: &[Action], multiply: bool) -> Self {
        let bounds: Vec<i64> = actions.iter().map(|a| a.epoch).collect();
        let mut suffix = vec![1.0f64; actions.len() + 1];
        for i in (0..actions.len()).rev() {
            suffix[i] = suffix[i + 1] * actions[i].rate;
        }
        AdjustFn {
            signature: Signature::any(2, Volatility::Immutable),
            bounds,
            suffix: suffix.into_iter().map(f64::to_bits).collect(),
            multiply,
        }
    }

    fn factor(&self, secs: i64) -> f64 {
        let idx = self.bounds.partition_point(|b| *b <= secs);
        f64::from_bits(self.suffix[idx])
    }
}

impl ScalarUDFImpl for AdjustFn {
    fn name(&self) -> &str {
        if self.multiply {
            "__mkts_adjust_volume"
        } else {
            "__mkts_adjust_price"
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        match arg_types.first() {
            Some(t) => Ok(t.clone()),
            None => plan_err!("adjust expects (value, epoch)"),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let n = args.number_rows;
        let [value, epoch] = args.args.as_slice() else {
            return exec_err!("adjust expects (value, epoch)");
        };
        let value = value.to_array(n)?;
        let epoch = epoch.to_array(n)?;
        let scale = units_per_second(epoch.data_type())?;
        let epoch = cast(&epoch, &DataType::Int64)?;
        let epoch = epoch.as_primitive::<Int64Type>();
        let vals = cast(&value, &DataType::Float64)?;
        let vals = vals.as_primitive::<Float64Type>();
        let out: Float64Array = vals
            .iter()
            .zip(epoch.iter())
            .map(|(v, e)| {
                let (Some(v), Some(e)) = (v, e) else { return v };
                let f = self.factor(e.div_euclid(scale));
                if f == 1.0 {
                    Some(v)
                } else if self.multiply {
                    Some(if value.data_type().is_floating() {
                        v * f
                    } else {
                        (v * f).round()
                    })
                } else {
                    Some(((v / f) * 10_000.0).round() / 10_000.0)
                }
            })
            .collect();
        Ok(ColumnarValue::Array(cast(
            &(Arc::new(out) as ArrayRef),
            value.data_type(),
        )?))
    }
}

/// Apply the adjustment described in the [module docs](self) to `input` (lazy: returns a new
/// plan). `splits` / `dividends` select which kinds of `actions` are applied.
pub fn adjust_dataframe(
    input: DataFrame,
    actions: &[Action],
    splits: bool,
    dividends: bool,
) -> Result<DataFrame> {
    let selected: Vec<Action> = actions
        .iter()
        .filter(|a| match a.kind {
            ActionKind::Split => splits,
            ActionKind::Dividend => dividends,
        })
        .copied()
        .collect();
    let schema = input.schema().clone();
    let (epoch, nanos) = time_keys(&schema, "adjust")?;
    let price = ScalarUDF::new_from_impl(AdjustFn::new(&selected, false));
    let volume = ScalarUDF::new_from_impl(AdjustFn::new(&selected, true));
    let mut exprs = Vec::new();
    for f in schema.fields() {
        let name = f.name();
        let is_time = *name == epoch || Some(name) == nanos.as_ref();
        let e = if is_time {
            ident(name)
        } else if name.eq_ignore_ascii_case("volume") && f.data_type().is_numeric() {
            volume.call(vec![ident(name), ident(&epoch)]).alias(name)
        } else if f.data_type().is_floating() {
            price.call(vec![ident(name), ident(&epoch)]).alias(name)
        } else {
            ident(name)
        };
        exprs.push(e);
    }
    // Make sure a misspelt Epoch is reported consistently.
    resolve_column(&schema, &epoch, "adjust")?;
    Ok(input.select(exprs)?)
}
