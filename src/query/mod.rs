//! SQL over the catalog (DataFusion) and MarketStore's `functions` chains.
//!
//! Interfaces call [`QueryEngine::sql`] (collected) or [`QueryEngine::sql_stream`] (lazy, for Flight DoGet)
//! for SQL text and [`QueryEngine::apply_functions`] for MarketStore's `functions` parameter; all return
//! Arrow batches. The catalog ([`catalog`]) maps bucket keys to tables (`SELECT * FROM "AAPL/1Min/OHLCV"`,
//! `SELECT * FROM "*/1Min/OHLCV" WHERE "Symbol" IN ('AAPL','TSLA')`); scans ([`scan`]) push the Epoch range,
//! Symbol sets, projection and LIMIT into the engine's zero-copy reads. Interfaces reach it through the
//! operations layer (`crate::service`); `crate::flight_sql` serves it over Arrow Flight SQL.
//!
//! Confinement: SQL runs inside the store. Each statement is checked on its logical plan ([`confine`]: no
//! `COPY`, external tables, `SET`, in-memory tables) and runs in its own session cloned from one prepared
//! state; all sessions share one runtime with a bounded memory pool (`sql_memory_limit_mb`), no spill files
//! and no object stores.
//!
//! Dialect notes: identifiers are case-sensitive (MarketStore's columns are `Epoch`, `Open`, …, so
//! `SELECT Open FROM ...` works unquoted); MarketStore's backquoted table names and a trailing `;` are
//! accepted. The udf crate's `time_bucket(timeframe, ts [, tz])` and `asof_join(...)` are registered, and
//! MarketStore's functions as table functions over one bucket ([`functions`]).

pub mod alter; // ALTER TABLE "KEY" ADD/DROP COLUMN as bucket schema changes
pub mod catalog;
pub mod confine;
pub mod functions;
pub mod scan;
pub mod sorted_agg; // one-pass GROUP BY over input in group order
pub mod ticks;

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::SchemaRef;
use datafusion::catalog::SchemaProvider;
use datafusion::dataframe::DataFrame;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::context::{SessionConfig, SessionContext};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryConsumer, MemoryPool, TrackConsumersPool};
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry, ObjectStoreUrl};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::LogicalPlan;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use thiserror::Error;

use crate::engine::{BucketKey, BucketRead, Engine, EngineError};

/// Query errors.
#[derive(Debug, Error)]
pub enum QueryError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Sql(String),
    #[error("{0}")]
    Function(String),
    /// A statement SQL may not run here (files, settings, DDL outside the bucket catalog); refused before
    /// anything runs ([`confine`]).
    #[error("{0}")]
    NotAllowed(String),
    /// The statement needed more memory than the SQL memory pool (`sql_memory_limit_mb`) holds.
    #[error("{0}")]
    ResourcesExhausted(String),
    /// A table the statement names does not exist (a missing bucket): a client asking for something
    /// absent, not a malformed statement.
    #[error("{0}")]
    NotFound(String),
    /// DataFusion failed inside (an internal error or I/O), not because of the statement.
    #[error("{0}")]
    Internal(String),
}

/// True for DataFusion's planning error of an unknown table (`table 'x' not found`).
fn is_missing_table(e: &DataFusionError) -> bool {
    matches!(e, DataFusionError::Plan(m) if m.starts_with("table '") && m.contains("' not found"))
}

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        if let DataFusionError::ResourcesExhausted(m) = e.find_root() {
            return QueryError::ResourcesExhausted(format!(
                "the statement needs more memory than the SQL memory pool holds (sql_memory_limit_mb): {m}"
            ));
        }
        if is_missing_table(e.find_root()) {
            return QueryError::NotFound(e.strip_backtrace());
        }
        match e {
            DataFusionError::External(b) => match b.downcast::<EngineError>() {
                Ok(engine) => QueryError::Engine(*engine),
                Err(other) => QueryError::Sql(other.to_string()),
            },
            DataFusionError::Context(_, inner) => QueryError::from(*inner),
            DataFusionError::Diagnostic(_, inner) => QueryError::from(*inner),
            e @ (DataFusionError::Internal(_) | DataFusionError::IoError(_)) => {
                QueryError::Internal(e.strip_backtrace())
            }
            other => QueryError::Sql(other.strip_backtrace()),
        }
    }
}

/// The SQL engine: a prepared DataFusion session whose catalog is the bucket catalog.
///
/// Every statement runs in its own session cloned from that prepared one (same catalog, UDFs and memory
/// pool), so nothing a statement does to its session reaches another client. All sessions share one
/// [`RuntimeEnv`]: one bounded memory pool, no spill files, no object stores.
pub struct QueryEngine {
    pub engine: Engine,
    pub tz: chrono_tz::Tz,
    base: SessionState,
    runtime: Arc<RuntimeEnv>,
}

impl std::fmt::Debug for QueryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryEngine").field("engine", &self.engine).field("tz", &self.tz).finish()
    }
}

/// Turn MarketStore-flavoured SQL into DataFusion's: backquoted identifiers become double-quoted ones and
/// trailing semicolons go. Text inside single-quoted strings is left alone.
pub fn normalize_sql(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_str = false;
    for c in text.chars() {
        match c {
            '\'' => {
                in_str = !in_str;
                out.push(c);
            }
            '`' if !in_str => out.push('"'),
            _ => out.push(c),
        }
    }
    let trimmed = out.trim_end();
    trimmed.trim_end_matches(|c: char| c == ';' || c.is_whitespace()).to_string()
}

/// How deeply a SQL statement may nest (sqlparser's recursion limit; DataFusion's default is 50).
///
/// sqlparser 0.62 backtracks exponentially on some malformed nestings: the `flight_ticket` fuzzer found a
/// 388-byte statement that took 3.7 s to be refused (release build), and each further `.(((`-group of that
/// shape multiplies the time by about 65 (four groups: minutes). Every such group costs about 10 levels,
/// so at 30 the worst of that shape is refused within milliseconds, with "recursion limit exceeded".
/// Legitimate statements rarely nest past 10 (each parenthesis, function call or subquery is a level or two).
pub const SQL_RECURSION_LIMIT: usize = 30;

/// Default size of the SQL memory pool: a quarter of physical memory (1 GiB when that cannot be read).
pub fn default_memory_limit() -> usize {
    // SAFETY: sysconf has no preconditions; it returns -1 for unknown names.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages > 0 && page > 0 {
        usize::try_from((pages as u64).saturating_mul(page as u64) / 4).unwrap_or(usize::MAX)
    } else {
        1 << 30
    }
}

/// The runtime every SQL session shares: a bounded memory pool (errors name the largest consumers), spilling
/// disabled (SQL never writes files; the data root's space is for acknowledged writes), and an object-store
/// registry with nothing in it (not even the local file system).
fn runtime(memory_limit: usize) -> Result<Arc<RuntimeEnv>, QueryError> {
    let top = std::num::NonZeroUsize::new(3).unwrap_or(std::num::NonZeroUsize::MIN);
    let pool: Arc<dyn MemoryPool> = Arc::new(TrackConsumersPool::new(GreedyMemoryPool::new(memory_limit), top));
    let stores = DefaultObjectStoreRegistry::new();
    let _ = stores.deregister_store(ObjectStoreUrl::local_filesystem().as_ref());
    Ok(RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled))
        .with_object_store_registry(Arc::new(stores))
        .build_arc()?)
}

impl QueryEngine {
    /// A SQL engine over `engine` with the default memory pool ([`default_memory_limit`]); `tz` aligns
    /// MarketStore function bars (e.g. daily candles) to local time.
    pub fn new(engine: Engine, tz: chrono_tz::Tz) -> Self {
        Self::with_memory_limit(engine, tz, None)
    }

    /// A SQL engine whose statements together may hold at most `memory_limit` bytes (None: the default).
    pub fn with_memory_limit(engine: Engine, tz: chrono_tz::Tz, memory_limit: Option<usize>) -> Self {
        let limit = memory_limit.filter(|b| *b > 0).unwrap_or_else(default_memory_limit);
        // Building the runtime only fails on a bad disk manager configuration, which this one is not.
        let runtime = runtime(limit).unwrap_or_else(|e| {
            tracing::error!("cannot build the bounded SQL runtime ({e}); SQL memory is unbounded");
            Arc::new(RuntimeEnv::default())
        });
        let mut config = SessionConfig::new()
            .with_information_schema(true)
            .with_create_default_catalog_and_schema(false)
            .with_default_catalog_and_schema(catalog::CATALOG, catalog::SCHEMA);
        config.options_mut().sql_parser.enable_ident_normalization = false;
        if let Ok(limit) = datafusion::common::config::ConfigNonZeroUsize::try_new(SQL_RECURSION_LIMIT) {
            config.options_mut().sql_parser.recursion_limit = limit;
        }
        // No table factories: CREATE EXTERNAL TABLE is refused by `confine`, and could not run anyway. (A COPY
        // that got past `confine` would find no object store to write to.)
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime.clone())
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(sorted_agg::SortedAggregateRule))
            .with_table_factories(HashMap::new())
            .build();
        let ctx = SessionContext::new_with_state(state);
        ctx.register_catalog(catalog::CATALOG, Arc::new(catalog::MktsCatalog::new(engine.clone())));
        mkts_udf::register_all(&ctx);
        let fn_tz = (tz != chrono_tz::UTC).then(|| tz.name().to_string());
        for (name, f) in functions::MarketstoreFunction::all(&engine, fn_tz) {
            ctx.register_udtf(name, f);
        }
        ctx.register_udtf(ticks::TICKS, Arc::new(ticks::TicksFunction::new(engine.clone())));
        QueryEngine { engine, tz, base: ctx.state(), runtime }
    }

    /// A fresh session over the bucket catalog (UDFs registered, shared memory pool), for callers that build
    /// DataFrames. What a caller changes in it stays in it.
    pub fn context(&self) -> SessionContext {
        SessionContext::new_with_state(self.base.clone())
    }

    /// The schema of buckets (and SQL views), for metadata listings.
    pub fn schema_provider(&self) -> Option<Arc<dyn SchemaProvider>> {
        self.base.catalog_list().catalog(catalog::CATALOG).and_then(|c| c.schema(catalog::SCHEMA))
    }

    /// Bytes the SQL memory pool holds now and its limit, if bounded (for diagnostics and tests).
    pub fn memory(&self) -> (usize, Option<usize>) {
        let pool = &self.runtime.memory_pool;
        let limit = match pool.memory_limit() {
            datafusion::execution::memory_pool::MemoryLimit::Finite(n) => Some(n),
            _ => None,
        };
        (pool.reserved(), limit)
    }

    /// Plan one statement into a DataFrame in its own session, after [`confine::check`]. DDL (`CREATE
    /// VIEW`, ...) runs here; queries and DML run when the DataFrame is executed.
    pub async fn dataframe(&self, text: &str) -> Result<DataFrame, QueryError> {
        let state = self.base.clone();
        let plan = Self::plan(&state, text).await?;
        Ok(SessionContext::new_with_state(state).execute_logical_plan(plan).await?)
    }

    /// Run a plan from [`QueryEngine::logical_plan`] (DDL such as `CREATE VIEW` takes effect here; queries
    /// and DML run when the DataFrame is executed).
    pub async fn execute_plan(&self, plan: LogicalPlan) -> Result<DataFrame, QueryError> {
        Ok(SessionContext::new_with_state(self.base.clone()).execute_logical_plan(plan).await?)
    }

    /// The logical plan of a statement without running anything (not even DDL): for result schemas and
    /// parameter types of prepared statements. Refused statements are refused here too.
    pub async fn logical_plan(&self, text: &str) -> Result<LogicalPlan, QueryError> {
        Self::plan(&self.base, text).await
    }

    /// Parse and plan one statement, refusing what [`confine`] refuses (on the parsed statement, then on the
    /// plan).
    async fn plan(state: &SessionState, text: &str) -> Result<LogicalPlan, QueryError> {
        let dialect = state.config().options().sql_parser.dialect;
        let statement = state.sql_to_statement(&normalize_sql(text), &dialect)?;
        confine::check_statement(&statement)?;
        let plan = state.statement_to_plan(statement).await?;
        confine::check(&plan)?;
        Ok(plan)
    }

    /// Run one SQL statement and collect its result. The collected batches count against the memory pool
    /// while they are gathered, so a result larger than the pool fails instead of exhausting the server.
    pub async fn sql(&self, text: &str) -> Result<(SchemaRef, Vec<RecordBatch>), QueryError> {
        let df = self.dataframe(text).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = self.collect(df).await?;
        Ok((schema, batches))
    }

    /// Execute a DataFrame and collect it, accounting the result in the memory pool.
    pub async fn collect(&self, df: DataFrame) -> Result<Vec<RecordBatch>, QueryError> {
        let reservation = MemoryConsumer::new("collected SQL result").register(&self.runtime.memory_pool);
        let mut stream = df.execute_stream().await?;
        let mut out = Vec::new();
        while let Some(b) = stream.next().await {
            let b = b?;
            let bytes: usize = b.columns().iter().map(|c| c.to_data().get_slice_memory_size().unwrap_or(0)).sum();
            reservation.try_grow(bytes)?;
            out.push(b);
        }
        Ok(out)
    }

    /// Run one SQL statement and stream its result lazily (for Flight DoGet `{"sql": ...}` tickets).
    pub async fn sql_stream(
        &self,
        text: &str,
    ) -> Result<(SchemaRef, BoxStream<'static, Result<RecordBatch, QueryError>>), QueryError> {
        let df = self.dataframe(text).await?;
        Self::stream_dataframe(df).await
    }

    /// Execute a planned DataFrame as a lazy stream.
    pub async fn stream_dataframe(
        df: DataFrame,
    ) -> Result<(SchemaRef, BoxStream<'static, Result<RecordBatch, QueryError>>), QueryError> {
        let stream = df.execute_stream().await?;
        let schema = stream.schema();
        Ok((schema, stream.map_err(QueryError::from).boxed()))
    }

    /// Apply a MarketStore `functions` chain (e.g. `candlecandler('1H',Open,High,Low,Close,Sum::Volume)`)
    /// to the result of reading one bucket. `adjust` reads corporate actions from `<Symbol>/1D/ACTIONS`.
    pub async fn apply_functions(&self, input: BucketRead, functions: &[String]) -> Result<(SchemaRef, Vec<RecordBatch>), QueryError> {
        let ctx = self.context();
        let symbol = input.key.symbol.clone();
        let mut opts = mkts_udf::ApplyOptions::default();
        if self.tz != chrono_tz::UTC {
            opts = opts.with_timezone(self.tz.name());
        }
        // A bucket read is in time order, so a leading candler runs in one pass over it (no hash table);
        // the rest of the chain, if any, runs on its bars.
        let (mut schema, mut batches, mut functions) = (input.schema.clone(), input.batches, functions);
        if let Some(first) = functions.first()
            && let Ok(f) = mkts_udf::Function::parse(first)
        {
            let bars = mkts_udf::candle_sorted(&schema, &batches, &f, &opts).await.map_err(|e| QueryError::Function(e.to_string()))?;
            if let Some(bars) = bars {
                if functions.len() == 1 {
                    return Ok((bars.schema(), vec![bars]));
                }
                (schema, batches, functions) = (bars.schema(), vec![bars], &functions[1..]);
            }
        }
        let mem = MemTable::try_new(schema, vec![batches])?;
        let df = ctx.read_table(Arc::new(mem))?;
        if functions.iter().any(|f| f.trim_start().to_ascii_lowercase().starts_with("adjust")) {
            if let Ok(key) = BucketKey::from_parts(&symbol, "1D", "ACTIONS") {
                if let Ok(reads) = self.engine.read(&crate::engine::ReadRequest::key(&key)) {
                    if let Some(r) = reads.into_iter().next() {
                        let mem = MemTable::try_new(r.schema.clone(), vec![r.batches])?;
                        opts = opts.with_actions(ctx.read_table(Arc::new(mem))?);
                    }
                }
            }
        }
        let out = mkts_udf::apply_functions_with(&ctx, df, functions, &opts)
            .await
            .map_err(|e| QueryError::Function(e.to_string()))?;
        let schema = Arc::new(out.schema().as_arrow().clone());
        let batches = self.collect(out).await?;
        Ok((schema, batches))
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_sql;

    #[test]
    fn marketstore_sql_is_normalized() {
        assert_eq!(normalize_sql("SELECT * FROM `AAPL/1Min/OHLCV`;"), "SELECT * FROM \"AAPL/1Min/OHLCV\"");
        assert_eq!(normalize_sql("SELECT '`x`;' AS a ;  "), "SELECT '`x`;' AS a");
    }
}
