//! `ticks('TSLA/1Sec/TICK')`: a tick bucket (or `*/1Sec/TICK`, `A,B/1Sec/TICK`) with its time as one
//! column, `Epoch` of `timestamp[ns, UTC]`, instead of MarketStore's `Epoch` seconds plus `Nanoseconds`:
//!
//! ```sql
//! SELECT "Epoch", "Price" FROM ticks('TSLA/1Sec/TICK') WHERE "Epoch" >= TIMESTAMP '2024-01-02 14:30:00.000000123';
//! ```
//!
//! A view over the bucket's table, so filters and projections reach the scan as for the table itself.
//! The Flight equivalent is the ticket key `"epoch_ns": true`.

use std::sync::Arc;

use arrow::datatypes::{DataType, TimeUnit};
use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{plan_err, DataFusionError, Result as DfResult, ScalarValue};
use datafusion::datasource::ViewTable;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{cast, lit, Expr};
use datafusion::prelude::{ident, SessionContext};

use super::scan::BucketTable;
use crate::engine::{Engine, EPOCH, NANOSECONDS};

/// The SQL name of the function.
pub const TICKS: &str = "ticks";

/// `ticks(table)`, bound to the engine.
#[derive(Debug, Clone)]
pub struct TicksFunction {
    engine: Engine,
}

impl TicksFunction {
    pub fn new(engine: Engine) -> Self {
        TicksFunction { engine }
    }
}

impl TableFunctionImpl for TicksFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> DfResult<Arc<dyn TableProvider>> {
        let table = match args.exprs() {
            [Expr::Literal(ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)), _)] => s.clone(),
            _ => return plan_err!("{TICKS}: takes one string literal naming tick buckets, e.g. {TICKS}('TSLA/1Sec/TICK')"),
        };
        let Some(bucket) = BucketTable::open(&self.engine, &table) else {
            return Err(DataFusionError::External(Box::new(crate::engine::EngineError::NotFound(table))));
        };
        let schema = bucket.schema();
        if schema.index_of(NANOSECONDS).is_err() {
            return plan_err!("{TICKS}: {table} has no {NANOSECONDS} column (it is not a tick bucket); query it directly");
        }
        let Some(state) = args.session().as_any().downcast_ref::<SessionState>() else {
            return plan_err!("{TICKS}: unsupported session type");
        };
        let nanos = cast(cast(ident(EPOCH), DataType::Int64) * lit(1_000_000_000i64) + cast(ident(NANOSECONDS), DataType::Int64), DataType::Int64);
        let epoch = cast(nanos, DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))).alias(EPOCH);
        let rest = schema.fields().iter().map(|f| f.name()).filter(|n| *n != EPOCH && *n != NANOSECONDS).map(|n| ident(n.as_str()));
        let ctx = SessionContext::new_with_state(state.clone());
        let plan = ctx.read_table(Arc::new(bucket))?.select(std::iter::once(epoch).chain(rest).collect::<Vec<Expr>>())?.into_unoptimized_plan();
        Ok(Arc::new(ViewTable::new(plan, Some(format!("{TICKS}('{table}')")))))
    }
}
