//! SQL over the catalog (DataFusion) and MarketStore's `functions` chains.
//!
//! Interfaces call [`QueryEngine::sql`] for SQL text and [`QueryEngine::apply_functions`] for MarketStore's
//! `functions` parameter; both return Arrow batches.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use thiserror::Error;

use crate::engine::{BucketRead, Engine, EngineError};

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

/// The SQL engine: a DataFusion context whose catalog is the bucket catalog.
pub struct QueryEngine {
    pub engine: Engine,
    pub tz: chrono_tz::Tz,
}

impl QueryEngine {
    pub fn new(engine: Engine, tz: chrono_tz::Tz) -> Self {
        QueryEngine { engine, tz }
    }

    /// Run one SQL statement and collect its result.
    pub async fn sql(&self, text: &str) -> Result<(SchemaRef, Vec<RecordBatch>), QueryError> {
        Err(QueryError::Sql(format!("SQL is not available yet: {text}")))
    }

    /// Apply a MarketStore `functions` chain (e.g. `candlecandler('1H',Open,High,Low,Close,Sum::Volume)`)
    /// to the result of reading one bucket.
    pub async fn apply_functions(&self, input: BucketRead, functions: &[String]) -> Result<(SchemaRef, Vec<RecordBatch>), QueryError> {
        let _ = input;
        Err(QueryError::Function(format!("functions are not available yet: {functions:?}")))
    }
}
