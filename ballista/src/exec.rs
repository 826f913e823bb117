//! The hot scan: hot years of buckets, fetched from the mkts server over Flight DoGet, as a DataFusion file
//! scan whose "files" are [`HotPart`]s ([`FlightSource`]).
//!
//! One partition per (bucket, run of consecutive hot years), so Ballista spreads the fetches over its
//! executors. The source holds only plain fields (server URL, parts, the output schema): the physical
//! codec ([`crate::codec`]) ships it to executors as JSON, and each executor opens its own connection. Rows come back as the server stores them (`Epoch` as `timestamp[s, UTC]`, data columns,
//! `Nanoseconds` for ticks); the node arranges them into its schema by name and adds `Symbol` for
//! multi-symbol tables.

use std::fmt;
use std::sync::Arc;

use arrow::array::{new_null_array, ArrayRef, RecordBatch, RecordBatchOptions, StringArray};
use arrow::compute::cast;
use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileOpenFuture, FileOpener, FileScanConfig, FileScanConfigBuilder, FileSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::physical_plan::{DisplayFormatType, ExecutionPlan};
use futures::StreamExt;
use object_store::ObjectStore;
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

/// Where hot-scan "files" live: every cluster process registers an empty in-memory store here (the scan
/// never reads it; DataFusion's file scan asks for one).
pub const HOT_STORE_URL: &str = "mkts-hot://flight";

/// The file source of the hot scan: each "file" of its scan is a [`HotPart`], named by its index.
///
/// Why a file source and not a plan node of its own: Ballista hands each task only the partitions it owns
/// by rewriting the leaves it knows, file scans among them (their file groups are sliced), and runs any
/// other leaf whole in every task, which would read hot years once per task.
#[derive(Debug, Clone)]
pub struct FlightSource {
    pub remote: Remote,
    /// The SQL table name (for `EXPLAIN`).
    pub table: String,
    pub parts: Arc<Vec<HotPart>>,
    table_schema: TableSchema,
    metrics: ExecutionPlanMetricsSet,
}

impl FlightSource {
    /// `schema`: the scan's output (the table's schema, projected).
    pub fn new(remote: Remote, table: String, parts: Vec<HotPart>, schema: SchemaRef) -> Self {
        FlightSource { remote, table, parts: Arc::new(parts), table_schema: TableSchema::from(schema), metrics: ExecutionPlanMetricsSet::new() }
    }

    /// The output schema.
    pub fn schema(&self) -> &SchemaRef {
        self.table_schema.file_schema()
    }

    /// The scan over `groups` (indexes into `parts`, one partition per group).
    pub fn scan(self, groups: Vec<Vec<usize>>) -> DfResult<Arc<DataSourceExec>> {
        let url = ObjectStoreUrl::parse(HOT_STORE_URL)?;
        let groups = groups.into_iter().map(|g| FileGroup::new(g.into_iter().map(|i| PartitionedFile::new(i.to_string(), 1)).collect())).collect();
        Ok(DataSourceExec::from_data_source(FileScanConfigBuilder::new(url, Arc::new(self)).with_file_groups(groups).build()))
    }

    /// A scan with one partition per part.
    pub fn scan_all(self) -> DfResult<Arc<DataSourceExec>> {
        let groups = (0..self.parts.len()).map(|i| vec![i]).collect();
        self.scan(groups)
    }

    /// The source and the part indexes of each partition, if `plan` is a hot scan.
    pub fn of(plan: &dyn ExecutionPlan) -> Option<(&FlightSource, Vec<Vec<usize>>)> {
        let exec = plan.downcast_ref::<DataSourceExec>()?;
        let any: &dyn std::any::Any = exec.data_source().as_ref();
        let config = any.downcast_ref::<FileScanConfig>()?;
        let src: &dyn std::any::Any = config.file_source().as_ref();
        let src = src.downcast_ref::<FlightSource>()?;
        let groups = config.file_groups.iter().map(|g| g.files().iter().filter_map(|f| f.object_meta.location.as_ref().parse().ok()).collect()).collect();
        Some((src, groups))
    }
}

impl FileSource for FlightSource {
    fn create_file_opener(&self, _store: Arc<dyn ObjectStore>, _config: &FileScanConfig, _partition: usize) -> DfResult<Arc<dyn FileOpener>> {
        Ok(Arc::new(FlightOpener { remote: self.remote.clone(), parts: self.parts.clone(), schema: self.schema().clone() }))
    }

    fn table_schema(&self) -> &TableSchema {
        &self.table_schema
    }

    fn with_batch_size(&self, _batch_size: usize) -> Arc<dyn FileSource> {
        Arc::new(self.clone())
    }

    fn metrics(&self) -> &ExecutionPlanMetricsSet {
        &self.metrics
    }

    fn file_type(&self) -> &str {
        "mkts-flight"
    }

    /// No expressions: filters are applied above the scan.
    fn apply_expressions(&self, _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn fmt_extra(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let cols: Vec<&str> = self.schema().fields().iter().map(|f| f.name().as_str()).collect();
        write!(f, ", server={} table={} parts={} columns=[{}]", self.remote.url, self.table, self.parts.len(), cols.join(", "))
    }

    /// A part is one DoGet; it is not split by byte ranges.
    fn supports_repartitioning(&self) -> bool {
        false
    }
}

/// Opens one part: a DoGet of its range and columns.
struct FlightOpener {
    remote: Remote,
    parts: Arc<Vec<HotPart>>,
    schema: SchemaRef,
}

impl FileOpener for FlightOpener {
    fn open(&self, file: PartitionedFile) -> DfResult<FileOpenFuture> {
        let name = file.object_meta.location.to_string();
        let part = name
            .parse::<usize>()
            .ok()
            .and_then(|i| self.parts.get(i).cloned())
            .ok_or_else(|| DataFusionError::Internal(format!("hot scan: no part {name:?}")))?;
        let schema = self.schema.clone();
        let columns: Vec<String> = schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| n != "Epoch" && n != "Nanoseconds" && !(part.symbol.is_some() && n == SYMBOL))
            .collect();
        let remote = self.remote.clone();
        Ok(Box::pin(async move {
            let ext = |e: crate::ClusterError| DataFusionError::External(Box::new(e));
            let batches = remote.do_get(part.ticket(&columns)).await.map_err(ext)?;
            let symbol = part.symbol.clone();
            Ok(batches.map(move |r| r.map_err(ext).and_then(|b| arrange(&schema, symbol.as_deref(), &b))).boxed())
        }))
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
