//! SQL over the catalog (DataFusion) and MarketStore's `functions` chains.
//!
//! Interfaces call [`QueryEngine::sql`] (collected) or [`QueryEngine::sql_stream`] (lazy, for Flight DoGet)
//! for SQL text and [`QueryEngine::apply_functions`] for MarketStore's `functions` parameter; all return
//! Arrow batches. The catalog ([`catalog`]) maps bucket keys to tables (`SELECT * FROM "AAPL/1Min/OHLCV"`,
//! `SELECT * FROM "*/1Min/OHLCV" WHERE "Symbol" IN ('AAPL','TSLA')`); scans ([`scan`]) push the Epoch range,
//! Symbol sets, projection and LIMIT into the engine's zero-copy reads. [`flight_sql`] serves it all over
//! Arrow Flight SQL.
//!
//! Dialect notes: identifiers are case-sensitive (MarketStore's columns are `Epoch`, `Open`, …, so
//! `SELECT Open FROM ...` works unquoted); MarketStore's backquoted table names and a trailing `;` are
//! accepted. The udf crate's `time_bucket(timeframe, ts [, tz])` and `asof_join(...)` are registered.

pub mod catalog;
pub mod flight_sql;
pub mod scan;

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::dataframe::DataFrame;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::context::{SessionConfig, SessionContext};
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
}

impl From<DataFusionError> for QueryError {
    fn from(e: DataFusionError) -> Self {
        match e {
            DataFusionError::External(b) => match b.downcast::<EngineError>() {
                Ok(engine) => QueryError::Engine(*engine),
                Err(other) => QueryError::Sql(other.to_string()),
            },
            DataFusionError::Context(_, inner) => QueryError::from(*inner),
            other => QueryError::Sql(other.strip_backtrace()),
        }
    }
}

/// The SQL engine: a DataFusion context whose catalog is the bucket catalog.
pub struct QueryEngine {
    pub engine: Engine,
    pub tz: chrono_tz::Tz,
    ctx: SessionContext,
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

impl QueryEngine {
    /// A SQL engine over `engine`; `tz` aligns MarketStore function bars (e.g. daily candles) to local time.
    pub fn new(engine: Engine, tz: chrono_tz::Tz) -> Self {
        let mut config = SessionConfig::new()
            .with_information_schema(true)
            .with_create_default_catalog_and_schema(false)
            .with_default_catalog_and_schema(catalog::CATALOG, catalog::SCHEMA);
        config.options_mut().sql_parser.enable_ident_normalization = false;
        let ctx = SessionContext::new_with_config(config);
        ctx.register_catalog(catalog::CATALOG, Arc::new(catalog::MktsCatalog::new(engine.clone())));
        mkts_udf::register_all(&ctx);
        QueryEngine { engine, tz, ctx }
    }

    /// The DataFusion session (bucket catalog and UDFs registered), for callers that build DataFrames.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Plan one statement into a DataFrame. DDL (`CREATE VIEW`, ...) runs here; queries and DML run when
    /// the DataFrame is executed.
    pub async fn dataframe(&self, text: &str) -> Result<DataFrame, QueryError> {
        Ok(self.ctx.sql(&normalize_sql(text)).await?)
    }

    /// The logical plan of a statement without running anything (not even DDL): for result schemas and
    /// parameter types of prepared statements.
    pub async fn logical_plan(&self, text: &str) -> Result<LogicalPlan, QueryError> {
        Ok(self.ctx.state().create_logical_plan(&normalize_sql(text)).await?)
    }

    /// Run one SQL statement and collect its result.
    pub async fn sql(&self, text: &str) -> Result<(SchemaRef, Vec<RecordBatch>), QueryError> {
        let df = self.dataframe(text).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        Ok((schema, batches))
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
        let symbol = input.key.symbol.clone();
        let mem = MemTable::try_new(input.schema.clone(), vec![input.batches])?;
        let df = self.ctx.read_table(Arc::new(mem))?;
        let mut opts = mkts_udf::ApplyOptions::default();
        if self.tz != chrono_tz::UTC {
            opts = opts.with_timezone(self.tz.name());
        }
        if functions.iter().any(|f| f.trim_start().to_ascii_lowercase().starts_with("adjust")) {
            if let Ok(key) = BucketKey::from_parts(&symbol, "1D", "ACTIONS") {
                if let Ok(reads) = self.engine.read(&crate::engine::ReadRequest::key(&key)) {
                    if let Some(r) = reads.into_iter().next() {
                        let mem = MemTable::try_new(r.schema.clone(), vec![r.batches])?;
                        opts = opts.with_actions(self.ctx.read_table(Arc::new(mem))?);
                    }
                }
            }
        }
        let out = mkts_udf::apply_functions_with(&self.ctx, df, functions, &opts)
            .await
            .map_err(|e| QueryError::Function(e.to_string()))?;
        let schema = Arc::new(out.schema().as_arrow().clone());
        let batches = out.collect().await?;
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
