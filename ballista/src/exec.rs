//! [`MktsFlightScanExec`]: hot years of buckets, fetched from the mkts server over Flight DoGet.
//!
//! One partition per (bucket, run of consecutive hot years), so Ballista spreads the fetches over its
//! executors. The node holds only plain fields (server URL, keys, time bounds, the output schema): the
//! physical codec ([`crate::codec`]) ships it to executors as JSON, and each executor opens its own
//! connection. Rows come back as the server stores them (`Epoch` as `timestamp[s, UTC]`, data columns,
//! `Nanoseconds` for ticks); the node arranges them into its schema by name and adds `Symbol` for
//! multi-symbol tables.

use std::fmt;
use std::sync::Arc;

use arrow::array::{new_null_array, ArrayRef, RecordBatch, RecordBatchOptions, StringArray};
use arrow::compute::cast;
use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::remote::Remote;

/// The `Symbol` column of multi-symbol tables.
pub const SYMBOL: &str = "Symbol";

/// One partition: a time range of one bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotPart {
    pub key: String,
    /// `Some` for multi-symbol tables: the value of their `Symbol` column.
    pub symbol: Option<String>,
    /// Inclusive bounds `(seconds, nanoseconds)`.
    pub start: (i64, i32),
    pub end: (i64, i32),
}

impl HotPart {
    /// The server's JSON ticket for this part, reading only `columns` (data columns; `Epoch` always comes).
    pub fn ticket(&self, columns: &[String]) -> String {
        serde_json::json!({
            "destination": self.key,
            "epoch_start": self.start.0,
            "epoch_start_nanos": self.start.1,
            "epoch_end": self.end.0,
            "epoch_end_nanos": self.end.1,
            "limit_from_start": true,
            "columns": columns,
        })
        .to_string()
    }
}

/// Reads hot years of mkts buckets over Flight.
#[derive(Debug, Clone)]
pub struct MktsFlightScanExec {
    pub remote: Remote,
    /// The SQL table name (for `EXPLAIN`).
    pub table: String,
    pub parts: Vec<HotPart>,
    /// Output schema (the table's, projected).
    pub schema: SchemaRef,
    props: Arc<PlanProperties>,
}

impl MktsFlightScanExec {
    pub fn new(remote: Remote, table: String, parts: Vec<HotPart>, schema: SchemaRef) -> Self {
        let props = PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(parts.len().max(1)),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        MktsFlightScanExec { remote, table, parts, schema, props: Arc::new(props) }
    }
}

impl DisplayAs for MktsFlightScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let cols: Vec<&str> = self.schema.fields().iter().map(|f| f.name().as_str()).collect();
        write!(f, "MktsFlightScanExec: server={} table={} parts={} projection=[{}]", self.remote.url, self.table, self.parts.len(), cols.join(", "))
    }
}

/// Arrange a batch from the server into `schema`: columns by name, cast where the type differs, null where
/// the bucket lacks one, `Symbol` filled with `symbol`.
fn arrange(schema: &SchemaRef, symbol: Option<&str>, b: &RecordBatch) -> DfResult<RecordBatch> {
    let n = b.num_rows();
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        if f.name() == SYMBOL {
            if let Some(s) = symbol {
                cols.push(Arc::new(StringArray::from(vec![s; n])));
                continue;
            }
        }
        match b.column_by_name(f.name()) {
            Some(a) if a.data_type() == f.data_type() => cols.push(a.clone()),
            Some(a) => cols.push(cast(a, f.data_type())?),
            None => cols.push(new_null_array(f.data_type(), n)),
        }
    }
    Ok(RecordBatch::try_new_with_options(schema.clone(), cols, &RecordBatchOptions::new().with_row_count(Some(n)))?)
}

impl ExecutionPlan for MktsFlightScanExec {
    fn name(&self) -> &str {
        "MktsFlightScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(&self, _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, _children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, partition: usize, _context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let schema = self.schema.clone();
        let Some(part) = self.parts.get(partition).cloned() else {
            return Ok(Box::pin(RecordBatchStreamAdapter::new(schema, futures::stream::empty())));
        };
        let columns: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| n != "Epoch" && n != "Nanoseconds" && !(part.symbol.is_some() && n == SYMBOL))
            .collect();
        let remote = self.remote.clone();
        let out = schema.clone();
        let stream = futures::stream::once(async move {
            let ext = |e: crate::ClusterError| DataFusionError::External(Box::new(e));
            let batches = remote.do_get(part.ticket(&columns)).await.map_err(ext)?;
            let symbol = part.symbol.clone();
            Ok::<_, DataFusionError>(batches.map(move |r| r.map_err(ext).and_then(|b| arrange(&out, symbol.as_deref(), &b))))
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}
