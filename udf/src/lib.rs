//! MarketStore's financial functions on Apache DataFusion.
//!
//! This crate is independent of the mkts server: everything works on plain DataFusion
//! [`DataFrame`](datafusion::dataframe::DataFrame)s and tables whose time column is `Epoch`
//! (`Timestamp(Second, Some("UTC"))`, other units and `Int64` seconds also work), with numeric
//! data columns; tick tables may also have `Nanoseconds` (Int32).
//!
//! Two ways in:
//!
//! * **SQL** — [`register_all`] adds `time_bucket(timeframe, ts [, tz])` (bar start for any
//!   MarketStore timeframe) and the table function `asof_join('left', 'right', 'Epoch' [, 'Symbol'])`.
//!   Candles are then ordinary `GROUP BY` queries with DataFusion's built-in
//!   `first_value(x ORDER BY "Epoch")`, `max`, `min`, `last_value(x ORDER BY "Epoch")`, `sum`.
//! * **MarketStore `functions` strings** — [`apply_functions`] / [`apply_functions_with`] run a
//!   chain such as `["candlecandler('1H',Open,High,Low,Close,Sum::Volume)"]` on a DataFrame;
//!   [`parse_call`] / [`Function::parse`] expose the parsing and argument binding.
//!
//! Functions: `candlecandler`, `tickcandler`, `count`, `min`, `max`, `avg`, `gap`, `adjust` —
//! see [`apply_function`] for their exact output, [`adjust`] for corporate actions,
//! [`Timeframe`] for bar boundaries, and [`asof_join`] for trades-to-quotes joins.
//! Compared with MarketStore: summary functions return a data timestamp instead of "now",
//! output column order is deterministic, a single positional optional argument binds, bars
//! keep the input column types, and a timezone aligns bars to the local wall clock.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mkts_udf::UdfError> {
//! use datafusion::prelude::SessionContext;
//!
//! let ctx = SessionContext::new();
//! mkts_udf::register_all(&ctx);
//! // `bars` is any table with Epoch, Open, High, Low, Close, Volume.
//! let bars = ctx.table("bars").await?;
//! let hourly = mkts_udf::apply_functions(
//!     &ctx,
//!     bars,
//!     &["candlecandler('1H',Open,High,Low,Close,Sum::Volume)".to_string()],
//!     Some("America/New_York"),
//! )
//! .await?;
//! hourly.show().await?;
//!
//! // The same in SQL:
//! ctx.sql(r#"SELECT time_bucket('1H', "Epoch", 'America/New_York') AS "Epoch",
//!                   first_value("Open" ORDER BY "Epoch") AS "Open", max("High") AS "High",
//!                   min("Low") AS "Low", last_value("Close" ORDER BY "Epoch") AS "Close",
//!                   sum(CAST("Volume" AS DOUBLE)) AS "Volume_SUM"
//!            FROM bars GROUP BY 1 ORDER BY 1"#).await?.show().await?;
//! # Ok(()) }
//! ```

pub mod adjust;
mod apply;
mod asof;
mod call;
mod error;
mod sorted_candle;
mod time_bucket;
mod timeframe;

use std::sync::Arc;

use datafusion::prelude::SessionContext;

pub use adjust::{Action, ActionKind, adjust_dataframe, load_actions};
pub use apply::{ApplyOptions, apply_function, apply_functions, apply_functions_with};
pub use asof::{AsofJoinFunction, asof_join, asof_join_batches, asof_schema};
pub use call::{Call, Function, Param, REGISTRY, parse_call};
pub use error::{Result, UdfError};
pub use sorted_candle::candle_sorted;
pub use time_bucket::{TimeBucket, bucket_array};
pub use timeframe::{Bucketer, Timeframe, Unit, parse_timezone};

/// Register the crate's SQL functions on a session: the scalar `time_bucket` and the table
/// function `asof_join`. Idempotent (re-registering replaces the previous definitions).
pub fn register_all(ctx: &SessionContext) {
    ctx.register_udf(TimeBucket::udf());
    ctx.register_udtf("asof_join", Arc::new(AsofJoinFunction));
}
