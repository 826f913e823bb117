//! The `time_bucket(timeframe, ts [, timezone])` scalar function.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type, TimeUnit};
use datafusion::common::{ScalarValue, exec_err, plan_err};
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use crate::error::{Result, UdfError};
use crate::timeframe::{Bucketer, Timeframe, Unit, parse_timezone};

/// Monday 1970-01-05 00:00 UTC, the origin of week windows.
const FIRST_MONDAY_SECS: i64 = 4 * 86_400;

/// `time_bucket(timeframe, ts [, timezone])`: start of the MarketStore bar that contains `ts`.
///
/// * `timeframe` — a constant string such as `'5Min'`, `'1H'`, `'1D'`, `'1W'` (Monday-aligned),
///   `'1M'` (calendar month) or `'1Y'`; see [`crate::Timeframe`].
/// * `ts` — any `Timestamp(unit, tz)` column (or `Int64` Unix seconds); the result has the
///   same type, so it can be grouped on and sorted like the input.
/// * `timezone` — optional constant IANA name (e.g. `'America/New_York'`): windows follow that
///   zone's wall clock (local midnight for days/weeks/months, DST-aware). Without it the
///   timezone of the `ts` type is used, and UTC if it has none.
///
/// The function is monotone in `ts`, and declares so to DataFusion, which lets a `GROUP BY
/// time_bucket(...)` over time-sorted input run as a streaming aggregate.
///
/// ```sql
/// SELECT time_bucket('1H', "Epoch") AS "Epoch",
///        first_value("Open" ORDER BY "Epoch") AS "Open", max("High") AS "High",
///        min("Low") AS "Low", last_value("Close" ORDER BY "Epoch") AS "Close",
///        sum("Volume") AS "Volume"
/// FROM bars GROUP BY 1 ORDER BY 1;
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TimeBucket {
    signature: Signature,
}

impl Default for TimeBucket {
    fn default() -> Self {
        TimeBucket {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl TimeBucket {
    /// The function wrapped as a [`ScalarUDF`], ready for `ctx.register_udf` or `.call(args)`.
    pub fn udf() -> ScalarUDF {
        ScalarUDF::new_from_impl(TimeBucket::default())
    }
}

fn is_string(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null
    )
}

impl ScalarUDFImpl for TimeBucket {
    fn name(&self) -> &str {
        "time_bucket"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        if !(2..=3).contains(&arg_types.len()) {
            return plan_err!(
                "time_bucket expects (timeframe, ts [, timezone]), got {} arguments",
                arg_types.len()
            );
        }
        let mut out = Vec::with_capacity(arg_types.len());
        if !is_string(&arg_types[0]) {
            return plan_err!(
                "time_bucket: timeframe must be a string such as '5Min', got {}",
                arg_types[0]
            );
        }
        out.push(DataType::Utf8);
        out.push(match &arg_types[1] {
            t @ DataType::Timestamp(_, _) => t.clone(),
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64 => DataType::Int64,
            DataType::Date32 | DataType::Date64 => DataType::Timestamp(TimeUnit::Second, None),
            t => return plan_err!("time_bucket: ts must be a timestamp or Int64 seconds, got {t}"),
        });
        if let Some(t) = arg_types.get(2) {
            if !is_string(t) {
                return plan_err!("time_bucket: timezone must be a string, got {t}");
            }
            out.push(DataType::Utf8);
        }
        Ok(out)
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        match arg_types.get(1) {
            Some(t @ (DataType::Timestamp(_, _) | DataType::Int64)) => Ok(t.clone()),
            Some(t) => plan_err!("time_bucket: unsupported ts type {t}"),
            None => plan_err!("time_bucket expects (timeframe, ts [, timezone])"),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let tf = match args.args.first() {
            Some(ColumnarValue::Scalar(v)) => match v.try_as_str() {
                Some(Some(s)) => s.parse::<Timeframe>()?,
                _ => return exec_err!("time_bucket: timeframe must be a non-null string"),
            },
            _ => return exec_err!("time_bucket: timeframe must be a constant"),
        };
        let Some(ts) = args.args.get(1) else {
            return exec_err!("time_bucket: missing ts");
        };
        let tz_name: Option<String> = match args.args.get(2) {
            None => None,
            Some(ColumnarValue::Scalar(v)) => match v.try_as_str() {
                Some(s) => s.map(str::to_string),
                None if v.is_null() => None,
                None => return exec_err!("time_bucket: timezone must be a string"),
            },
            Some(ColumnarValue::Array(_)) => {
                return exec_err!("time_bucket: timezone must be a constant");
            }
        };
        let tz_name = tz_name.or_else(|| match ts.data_type() {
            DataType::Timestamp(_, Some(tz)) => Some(tz.to_string()),
            _ => None,
        });
        match ts {
            ColumnarValue::Array(a) => Ok(ColumnarValue::Array(bucket_array(
                a,
                tf,
                tz_name.as_deref(),
            )?)),
            ColumnarValue::Scalar(s) => {
                let a = s.to_array()?;
                let out = bucket_array(&a, tf, tz_name.as_deref())?;
                Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?))
            }
        }
    }

    fn output_ordering(&self, input: &[ExprProperties]) -> DfResult<SortProperties> {
        let constant = |i: usize| {
            input
                .get(i)
                .is_none_or(|p| p.sort_properties == SortProperties::Singleton)
        };
        match input.get(1) {
            Some(ts) if constant(0) && constant(2) => Ok(ts.sort_properties),
            _ => Ok(SortProperties::Unordered),
        }
    }

    fn preserves_lex_ordering(&self, _inputs: &[ExprProperties]) -> DfResult<bool> {
        Ok(false)
    }
}

/// Units per second of a timestamp type (1 for `Int64` seconds).
pub(crate) fn units_per_second(t: &DataType) -> Result<i64> {
    match t {
        DataType::Int64 | DataType::Timestamp(TimeUnit::Second, _) => Ok(1),
        DataType::Timestamp(TimeUnit::Millisecond, _) => Ok(1_000),
        DataType::Timestamp(TimeUnit::Microsecond, _) => Ok(1_000_000),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => Ok(1_000_000_000),
        t => Err(UdfError::Type(format!(
            "expected a timestamp or Int64 seconds column, got {t}"
        ))),
    }
}

/// Bucket every value of a timestamp (or Int64 seconds) array; output has the input's type.
pub fn bucket_array(array: &ArrayRef, tf: Timeframe, timezone: Option<&str>) -> Result<ArrayRef> {
    let tz = parse_timezone(timezone)?;
    let dtype = array.data_type().clone();
    let scale = units_per_second(&dtype)?;
    let raw = cast(array, &DataType::Int64)?;
    let raw = raw.as_primitive::<Int64Type>();
    let nulls = raw.nulls();
    // Fast path: UTC and a fixed window length -> pure arithmetic on the raw values.
    if tz.is_none()
        && let Some(d) = tf.fixed_seconds()
    {
        let du = d.checked_mul(scale).ok_or(UdfError::OutOfRange(d))?;
        let origin = if tf.unit == Unit::Week {
            FIRST_MONDAY_SECS * scale
        } else {
            0
        };
        // Input in time order (a bucket read) mostly stays in the last bar: reuse its bounds and divide only
        // when a value leaves it. A bar start before i64::MIN units cannot be represented: an error, not a
        // wrapped value.
        let mut out: Vec<i64> = Vec::with_capacity(raw.len());
        let (mut lo, mut hi) = (1i64, 0i64);
        for &v in raw.values().iter() {
            if v < lo || v > hi {
                lo = v.checked_sub(v.wrapping_sub(origin).rem_euclid(du)).ok_or_else(|| UdfError::OutOfRange(v))?;
                hi = lo.saturating_add(du - 1);
            }
            out.push(lo);
        }
        let out: ArrayRef = Arc::new(Int64Array::new(out.into(), nulls.cloned()));
        return Ok(if dtype == DataType::Int64 {
            out
        } else {
            cast(&out, &dtype)?
        });
    }
    let mut bucketer = Bucketer::new(tf, tz);
    let mut out = Vec::with_capacity(raw.len());
    for (i, &v) in raw.values().iter().enumerate() {
        if nulls.is_some_and(|n| n.is_null(i)) {
            out.push(0);
            continue;
        }
        let secs = v.div_euclid(scale);
        let start = bucketer.bucket(secs)?;
        out.push(start.checked_mul(scale).ok_or_else(|| UdfError::OutOfRange(secs))?);
    }
    let out: ArrayRef = Arc::new(Int64Array::new(out.into(), nulls.cloned()));
    Ok(if dtype == DataType::Int64 {
        out
    } else {
        cast(&out, &dtype)?
    })
}
