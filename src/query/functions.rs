//! MarketStore's functions in SQL, as table functions over one bucket:
//!
//! ```sql
//! SELECT * FROM candlecandler('AAPL/1Min/OHLCV', '1H', 'Open', 'High', 'Low', 'Close', 'Sum::Volume');
//! SELECT * FROM tickcandler('TSLA/1Sec/TICK', '1Min', 'Price', 'Sum::Size');
//! SELECT * FROM gap('AAPL/1Min/OHLCV', '5Min');
//! SELECT * FROM ms_count('AAPL/1Min/OHLCV', 'Close');     -- also ms_min, ms_max, ms_avg
//! SELECT * FROM adjust('AAPL/1D/OHLCV');                  -- corporate actions from AAPL/1D/ACTIONS
//! SELECT * FROM functions('AAPL/1Min/OHLCV', 'candlecandler(''1H'',Open,High,Low,Close,Sum::Volume)', 'gap()');
//! ```
//!
//! Each runs the same code as the `functions` parameter of Flight and `/rpc` reads ([`mkts_udf`]), so the
//! results are the same; `functions(...)` takes a whole chain, applied left to right. The first argument
//! names one bucket (functions are per bucket, as in MarketStore; over many symbols use `time_bucket` with
//! `GROUP BY "Symbol"`). The summary functions are `ms_count`, `ms_min`, `ms_max` and `ms_avg` in SQL,
//! since `count`/`min`/`max`/`avg` are SQL's own aggregates. The result is a table: filter, join and
//! aggregate it like any other. Rows are read when the query runs, not when it is planned.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{plan_err, DataFusionError, Result as DfResult, ScalarValue};
use datafusion::datasource::MemTable;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;

use super::scan::BucketTable;
use crate::engine::{BucketKey, Engine, ReadRequest};

/// The SQL names and the MarketStore function each stands for (`None`: `functions`, a whole chain).
pub const SQL_FUNCTIONS: &[(&str, Option<&str>)] = &[
    ("functions", None),
    ("candlecandler", Some("candlecandler")),
    ("tickcandler", Some("tickcandler")),
    ("gap", Some("gap")),
    ("adjust", Some("adjust")),
    ("ms_count", Some("count")),
    ("ms_min", Some("min")),
    ("ms_max", Some("max")),
    ("ms_avg", Some("avg")),
];

/// One of [`SQL_FUNCTIONS`], bound to the engine.
#[derive(Debug, Clone)]
pub struct MarketstoreFunction {
    sql_name: &'static str,
    function: Option<&'static str>,
    engine: Engine,
    timezone: Option<String>,
}

impl MarketstoreFunction {
    /// Every SQL function of this module, ready to register with `register_udtf`.
    pub fn all(engine: &Engine, timezone: Option<String>) -> Vec<(&'static str, Arc<dyn TableFunctionImpl>)> {
        SQL_FUNCTIONS
            .iter()
            .map(|(sql_name, function)| {
                let f: Arc<dyn TableFunctionImpl> =
                    Arc::new(MarketstoreFunction { sql_name, function: *function, engine: engine.clone(), timezone: timezone.clone() });
                (*sql_name, f)
            })
            .collect()
    }

    /// The MarketStore call strings the SQL arguments after the table stand for.
    fn calls(&self, args: &[String]) -> Vec<String> {
        match self.function {
            None => args.to_vec(),
            Some(name) => {
                // The first argument of the candlers and of gap is the timeframe, a quoted literal in
                // MarketStore's syntax; the others are column names.
                let takes_timeframe = matches!(name, "candlecandler" | "tickcandler" | "gap");
                let parts: Vec<String> = args
                    .iter()
                    .enumerate()
                    .map(|(i, a)| if i == 0 && takes_timeframe { format!("'{}'", a.replace('\'', "")) } else { a.clone() })
                    .collect();
                vec![format!("{name}({})", parts.join(","))]
            }
        }
    }
}

fn string_arg(sql_name: &str, e: &Expr, what: &str) -> DfResult<String> {
    match e {
        Expr::Literal(ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)), _) => Ok(s.clone()),
        other => plan_err!("{sql_name}: {what} must be a string literal, got {other}"),
    }
}

impl TableFunctionImpl for MarketstoreFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> DfResult<Arc<dyn TableProvider>> {
        let exprs = args.exprs();
        let Some(first) = exprs.first() else {
            return plan_err!("{}: the first argument names a bucket, e.g. {}('AAPL/1Min/OHLCV', ...)", self.sql_name, self.sql_name);
        };
        let table = string_arg(self.sql_name, first, "the bucket")?;
        let rest = exprs[1..].iter().map(|e| string_arg(self.sql_name, e, "every argument")).collect::<DfResult<Vec<_>>>()?;
        let key = BucketKey::parse(&table).map_err(|e| {
            DataFusionError::Plan(format!("{}: {table:?} is not one bucket ({e}); MarketStore's functions apply per bucket", self.sql_name))
        })?;
        let Some(input) = BucketTable::open(&self.engine, &table) else {
            return Err(DataFusionError::External(Box::new(crate::engine::EngineError::NotFound(table))));
        };
        let calls = self.calls(&rest);
        if calls.is_empty() {
            return plan_err!("functions: give at least one call, e.g. functions('{table}', 'candlecandler(''1H'',Open,High,Low,Close)')");
        }
        let input: Arc<dyn TableProvider> = Arc::new(input);
        let Some(state) = args.session().as_any().downcast_ref::<SessionState>() else {
            return plan_err!("{}: unsupported session type", self.sql_name);
        };
        let actions = if calls.iter().any(|c| c.trim_start().to_ascii_lowercase().starts_with("adjust")) { actions_of(&self.engine, &key) } else { None };
        // The output schema: the chain applied to no rows (the candlers only build a plan; gap and adjust
        // read their input, which is empty here, so nothing waits on I/O or other tasks).
        let ctx = SessionContext::new_with_state(state.clone());
        let empty = ctx.read_table(Arc::new(MemTable::try_new(input.schema(), vec![vec![]])?))?;
        let opts = self.options(&ctx, actions.as_ref().map(|(s, _)| (s.clone(), vec![])))?;
        let planned = futures::executor::block_on(mkts_udf::apply_functions_with(&ctx, empty, &calls, &opts))
            .map_err(|e| DataFusionError::Plan(format!("{}: {e}", self.sql_name)))?;
        let schema: SchemaRef = Arc::new(planned.schema().as_arrow().clone());
        Ok(Arc::new(FunctionTable { sql_name: self.sql_name, input, calls, actions, schema, function: Arc::new(self.clone()) }))
    }
}

impl MarketstoreFunction {
    fn options(&self, ctx: &SessionContext, actions: Option<(SchemaRef, Vec<arrow::array::RecordBatch>)>) -> DfResult<mkts_udf::ApplyOptions> {
        let mut opts = mkts_udf::ApplyOptions::default();
        if let Some(tz) = &self.timezone {
            opts = opts.with_timezone(tz.clone());
        }
        if let Some((schema, batches)) = actions {
            opts = opts.with_actions(ctx.read_table(Arc::new(MemTable::try_new(schema, vec![batches])?))?);
        }
        Ok(opts)
    }
}

/// The corporate actions `adjust` uses for a bucket: `<SYMBOL>/1D/ACTIONS`, as for the `functions` parameter.
fn actions_of(engine: &Engine, key: &BucketKey) -> Option<(SchemaRef, Vec<arrow::array::RecordBatch>)> {
    let k = BucketKey::from_parts(&key.symbol, "1D", "ACTIONS").ok()?;
    let r = engine.read(&ReadRequest::key(&k)).ok()?.into_iter().next()?;
    Some((r.schema, r.batches))
}

/// The table a MarketStore function call in SQL produces; computed when scanned.
#[derive(Debug)]
struct FunctionTable {
    sql_name: &'static str,
    input: Arc<dyn TableProvider>,
    calls: Vec<String>,
    actions: Option<(SchemaRef, Vec<arrow::array::RecordBatch>)>,
    schema: SchemaRef,
    function: Arc<MarketstoreFunction>,
}

#[async_trait]
impl TableProvider for FunctionTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let Some(state) = state.as_any().downcast_ref::<SessionState>() else {
            return plan_err!("{}: unsupported session type", self.sql_name);
        };
        let ctx = SessionContext::new_with_state(state.clone());
        let input = ctx.read_table(self.input.clone())?;
        let opts = self.function.options(&ctx, self.actions.clone())?;
        let mut out = mkts_udf::apply_functions_with(&ctx, input, &self.calls, &opts)
            .await
            .map_err(|e| DataFusionError::Execution(format!("{}: {e}", self.sql_name)))?;
        if let Some(p) = projection {
            let names: Vec<String> = p.iter().map(|i| self.schema.field(*i).name().clone()).collect();
            out = out.select_columns(&names.iter().map(String::as_str).collect::<Vec<_>>())?;
        }
        out.create_physical_plan().await
    }
}
