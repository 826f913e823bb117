//! Bucket tables for DataFusion: a [`TableProvider`] over one bucket or over every symbol of one
//! `TIMEFRAME/ATTRGROUP`, its scan ([`BucketScanExec`]) and its INSERT sink ([`BucketSink`]).
//!
//! The scan reads the engine's zero-copy batches (numeric buffers point into the mapped column files) and
//! pushes down what the engine can use: the `Epoch` range (binary search per partition), `Symbol` equality
//! and `IN` lists (which buckets to open), the projection (which column files to map) and `LIMIT` (how many
//! rows to slice). Pushed filters are still evaluated exactly on every batch, so the provider can report them
//! as [`TableProviderFilterPushDown::Exact`] and DataFusion can push `LIMIT` through them. `EXPLAIN` shows
//! the pushdown on the `BucketScanExec` line, e.g.
//! `BucketScanExec: table=*/1Min/OHLCV buckets=2 symbols=[AAPL, TSLA] epoch_range=[2024-01-02T00:00:00Z, +inf) limit=10 projection=[Epoch, Close, Symbol]`.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, RecordBatchOptions, StringArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, DataFusionError, Result as DfResult, ScalarValue};
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, Operator, TableProviderFilterPushDown, TableType};
use datafusion::physical_expr::expressions::Column as PhysColumn;
use datafusion::physical_expr::{EquivalenceProperties, LexOrdering, PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties};
use futures::StreamExt;

use crate::engine::{BucketKey, Engine, KeySelector, ReadRequest, TimePoint, WriteOptions, EPOCH, NANOSECONDS};

/// Name of the symbol column of multi-symbol tables (as in multi-symbol Flight reads).
pub const SYMBOL: &str = "Symbol";

/// What a table covers: one bucket, or a set of symbols (all when `None`) of one timeframe/attribute group.
#[derive(Debug, Clone)]
pub struct BucketTable {
    engine: Engine,
    /// The table name as written in SQL (`AAPL/1Min/OHLCV`, `*/1Min/OHLCV`, `AAPL,TSLA/1Min/OHLCV`).
    name: String,
    selector: KeySelector,
    /// True when the table has a `Symbol` column (anything but a single-bucket name).
    multi: bool,
    schema: SchemaRef,
}

impl BucketTable {
    /// Resolve a table name to a table, or `None` when it names no existing bucket.
    ///
    /// Naming rule: `SYM/TF/GROUP` is one bucket; `*/TF/GROUP` (or `TF/GROUP`) is every symbol of that
    /// timeframe and attribute group with a `Symbol` column; `A,B/TF/GROUP` is those symbols, also with `Symbol`.
    pub fn open(engine: &Engine, name: &str) -> Option<BucketTable> {
        let full = if name.split('/').count() == 2 { format!("*/{name}") } else { name.to_string() };
        let selector = KeySelector::parse(&full).ok()?;
        let keys = engine.resolve(&selector);
        let first = keys.first()?;
        let multi = !selector.is_single() || name.contains(',');
        let schema = if multi {
            let mut fields = union_fields(engine, &keys);
            fields.push(Field::new(SYMBOL, DataType::Utf8, false));
            Arc::new(Schema::new(fields))
        } else {
            engine.schema(first)?.arrow_schema()
        };
        Some(BucketTable { engine: engine.clone(), name: name.to_string(), selector, multi, schema })
    }

    /// The single bucket of a one-bucket table.
    fn single_key(&self) -> Option<BucketKey> {
        match (&self.selector.symbols, self.multi) {
            (Some(s), false) if s.len() == 1 => {
                BucketKey::from_parts(&s[0], &self.selector.timeframe, &self.selector.attr_group).ok()
            }
            _ => None,
        }
    }
}

fn is_pushable_column(name: &str) -> bool {
    name == EPOCH || name == SYMBOL || name == NANOSECONDS
}

/// True when `e` only references Epoch/Symbol/Nanoseconds and is deterministic: such filters are evaluated
/// exactly inside the scan.
fn exact_filter(e: &Expr) -> bool {
    if e.is_volatile() {
        return false;
    }
    let mut ok = true;
    let _ = e.apply(|n| {
        match n {
            Expr::Column(c) if !is_pushable_column(&c.name) => ok = false,
            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) | Expr::OuterReferenceColumn(..) => ok = false,
            Expr::Placeholder(_) => ok = false,
            _ => {}
        }
        Ok(if ok { TreeNodeRecursion::Continue } else { TreeNodeRecursion::Stop })
    });
    ok && !e.column_refs().is_empty()
}

/// The pushdown extracted from filters: a time range and a symbol set (both supersets of the matching rows).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pushdown {
    pub start: Option<TimePoint>,
    pub end: Option<TimePoint>,
    /// `None` = every symbol.
    pub symbols: Option<BTreeSet<String>>,
    /// True when every filter is an Epoch bound (then the engine's range is exact up to bar alignment).
    pub only_epoch: bool,
}

fn column_name(e: &Expr) -> Option<&str> {
    match e {
        Expr::Column(c) => Some(c.name.as_str()),
        // Casts between timestamp units/zones keep the order, so a bound on the cast is a bound on the column.
        Expr::Cast(c) if matches!(c.field.data_type(), DataType::Timestamp(..)) => column_name(&c.expr),
        Expr::TryCast(c) if matches!(c.field.data_type(), DataType::Timestamp(..)) => column_name(&c.expr),
        _ => None,
    }
}

fn literal(e: &Expr) -> Option<&ScalarValue> {
    match e {
        Expr::Literal(v, _) => Some(v),
        _ => None,
    }
}

/// A time literal as (seconds, nanoseconds); integers are Unix seconds.
fn time_of(v: &ScalarValue) -> Option<TimePoint> {
    let split = |v: i64, per: i64| TimePoint { secs: v.div_euclid(per), nanos: (v.rem_euclid(per) * (1_000_000_000 / per)) as i32 };
    match v {
        ScalarValue::TimestampSecond(Some(s), _) => Some(TimePoint::secs(*s)),
        ScalarValue::TimestampMillisecond(Some(s), _) => Some(split(*s, 1_000)),
        ScalarValue::TimestampMicrosecond(Some(s), _) => Some(split(*s, 1_000_000)),
        ScalarValue::TimestampNanosecond(Some(s), _) => Some(split(*s, 1_000_000_000)),
        ScalarValue::Int64(Some(s)) => Some(TimePoint::secs(*s)),
        ScalarValue::Int32(Some(s)) => Some(TimePoint::secs(*s as i64)),
        _ => None,
    }
}

fn string_of(v: &ScalarValue) -> Option<String> {
    match v {
        ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => Some(s.clone()),
        ScalarValue::Dictionary(_, inner) => string_of(inner),
        _ => None,
    }
}

/// The first instant of second `s`.
fn second_start(s: i64) -> TimePoint {
    TimePoint { secs: s, nanos: 0 }
}

/// The last instant of second `s` (every tick whose `Epoch` reads as `s`).
fn second_end(s: i64) -> TimePoint {
    TimePoint { secs: s, nanos: 999_999_999 }
}

impl Pushdown {
    fn narrow_start(&mut self, t: TimePoint) {
        self.start = Some(self.start.map_or(t, |s| s.max(t)));
    }
    fn narrow_end(&mut self, t: TimePoint) {
        self.end = Some(self.end.map_or(t, |e| e.min(t)));
    }
    fn narrow_symbols(&mut self, set: BTreeSet<String>) {
        self.symbols = Some(match self.symbols.take() {
            None => set,
            Some(old) => old.intersection(&set).cloned().collect(),
        });
    }

    /// Extract the range and symbol set from filters (each one a conjunction).
    pub fn from_filters(filters: &[Expr]) -> Pushdown {
        let mut p = Pushdown { only_epoch: true, ..Default::default() };
        for f in filters {
            for e in split_conjunction(f) {
                if !p.apply(e) {
                    p.only_epoch = false;
                }
            }
        }
        p
    }

    /// Use one conjunct; returns true when it was an Epoch bound.
    fn apply(&mut self, e: &Expr) -> bool {
        match e {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                let (col, lit, op) = match (column_name(left), literal(right), column_name(right), literal(left)) {
                    (Some(c), Some(v), _, _) => (c, v, *op),
                    (_, _, Some(c), Some(v)) => match op.swap() {
                        Some(o) => (c, v, o),
                        None => return false,
                    },
                    _ => {
                        if *op == Operator::Or {
                            if let Some(set) = symbol_disjunction(e) {
                                self.narrow_symbols(set);
                            }
                        }
                        return false;
                    }
                };
                if col == EPOCH {
                    let Some(t) = time_of(lit) else { return false };
                    // The column holds whole seconds (a tick's sub-second part is its own `Nanoseconds`
                    // column), so a row at (s, 500 ns) has `Epoch` = s: bounds apply to the second.
                    let whole = t.nanos == 0;
                    match op {
                        Operator::Eq if whole => {
                            self.narrow_start(second_start(t.secs));
                            self.narrow_end(second_end(t.secs));
                        }
                        Operator::Gt => self.narrow_start(second_start(t.secs.saturating_add(1))),
                        Operator::GtEq => self.narrow_start(second_start(if whole { t.secs } else { t.secs.saturating_add(1) })),
                        Operator::Lt => self.narrow_end(second_end(if whole { t.secs.saturating_sub(1) } else { t.secs })),
                        Operator::LtEq => self.narrow_end(second_end(t.secs)),
                        _ => return false,
                    }
                    return true;
                }
                if col == SYMBOL && op == Operator::Eq {
                    if let Some(s) = string_of(lit) {
                        self.narrow_symbols([s].into_iter().collect());
                    }
                }
                false
            }
            Expr::Between(Between { expr, negated: false, low, high }) if column_name(expr) == Some(EPOCH) => {
                match (literal(low).and_then(time_of), literal(high).and_then(time_of)) {
                    (Some(lo), Some(hi)) => {
                        self.narrow_start(second_start(if lo.nanos == 0 { lo.secs } else { lo.secs.saturating_add(1) }));
                        self.narrow_end(second_end(hi.secs));
                        true
                    }
                    _ => false,
                }
            }
            Expr::InList(l) if !l.negated && column_name(&l.expr) == Some(SYMBOL) => {
                let set: Option<BTreeSet<String>> = l.list.iter().map(|x| literal(x).and_then(string_of)).collect();
                if let Some(set) = set {
                    self.narrow_symbols(set);
                }
                false
            }
            _ => false,
        }
    }
}

/// A DELETE condition the engine's range delete applies exactly: an Epoch bound, or a Symbol choice.
fn deletable(e: &Expr) -> bool {
    let mut p = Pushdown::default();
    if p.apply(e) {
        return true;
    }
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) => {
            (column_name(left) == Some(SYMBOL) && literal(right).and_then(string_of).is_some())
                || (column_name(right) == Some(SYMBOL) && literal(left).and_then(string_of).is_some())
        }
        Expr::BinaryExpr(BinaryExpr { op: Operator::Or, .. }) => symbol_disjunction(e).is_some(),
        Expr::InList(l) => !l.negated && column_name(&l.expr) == Some(SYMBOL) && l.list.iter().all(|x| literal(x).and_then(string_of).is_some()),
        _ => false,
    }
}

/// The plan of a SQL DELETE: range deletes of its buckets, run when executed; one `count` row (UInt64).
#[derive(Debug)]
pub struct BucketDeleteExec {
    engine: Engine,
    table: String,
    keys: Vec<BucketKey>,
    start: TimePoint,
    end: TimePoint,
    props: Arc<PlanProperties>,
}

impl BucketDeleteExec {
    fn new(engine: Engine, table: String, keys: Vec<BucketKey>, start: TimePoint, end: TimePoint) -> Self {
        let schema = Arc::new(Schema::new(vec![Field::new("count", DataType::UInt64, false)]));
        let props = PlanProperties::new(EquivalenceProperties::new(schema), Partitioning::UnknownPartitioning(1), EmissionType::Final, Boundedness::Bounded);
        BucketDeleteExec { engine, table, keys, start, end, props: Arc::new(props) }
    }
}

impl DisplayAs for BucketDeleteExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "BucketDeleteExec: table={} buckets={} epoch_range=[{}, {}]", self.table, self.keys.len(), fmt_time(self.start), fmt_time(self.end))
    }
}

impl ExecutionPlan for BucketDeleteExec {
    fn name(&self) -> &str {
        "BucketDeleteExec"
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

    fn execute(&self, _partition: usize, _context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let schema = self.props.eq_properties.schema().clone();
        let (engine, keys, start, end) = (self.engine.clone(), self.keys.clone(), self.start, self.end);
        let out_schema = schema.clone();
        let run = async move {
            let mut removed = 0u64;
            for k in &keys {
                match engine.delete_range(k, start, end).await {
                    Ok(n) => removed += n as u64,
                    // Destroyed since planning: nothing left to delete.
                    Err(crate::engine::EngineError::NotFound(_)) => {}
                    Err(e) => return Err(DataFusionError::External(Box::new(e))),
                }
            }
            Ok(RecordBatch::try_new(out_schema, vec![Arc::new(arrow::array::UInt64Array::from(vec![removed]))])?)
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, futures::stream::once(run))))
    }
}

fn split_or<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op: Operator::Or, right }) => {
            split_or(left, out);
            split_or(right, out);
        }
        other => out.push(other),
    }
}

/// `Symbol = 'A' OR Symbol = 'B' OR Symbol IN (...)` → {A, B, ...}.
fn symbol_disjunction(e: &Expr) -> Option<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut terms = Vec::new();
    split_or(e, &mut terms);
    for d in terms {
        match d {
            Expr::BinaryExpr(BinaryExpr { left, op: Operator::Eq, right }) => {
                let v = match (column_name(left.as_ref()), literal(right.as_ref()), column_name(right.as_ref()), literal(left.as_ref())) {
                    (Some(SYMBOL), Some(v), _, _) | (_, _, Some(SYMBOL), Some(v)) => string_of(v)?,
                    _ => return None,
                };
                out.insert(v);
            }
            Expr::InList(l) if !l.negated && column_name(&l.expr) == Some(SYMBOL) => {
                for x in &l.list {
                    out.insert(literal(x).and_then(string_of)?);
                }
            }
            _ => return None,
        }
    }
    Some(out)
}

fn fmt_time(t: TimePoint) -> String {
    match Utc.timestamp_opt(t.secs, t.nanos.clamp(0, 999_999_999) as u32).single() {
        Some(d) if t.nanos == 0 => d.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Some(d) => d.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string(),
        None => t.secs.to_string(),
    }
}

#[async_trait]
impl TableProvider for BucketTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| if exact_filter(f) { TableProviderFilterPushDown::Exact } else { TableProviderFilterPushDown::Unsupported })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let pd = Pushdown::from_filters(filters);
        // Which buckets: the table's selector narrowed by the Symbol filters.
        let mut keys = self.engine.resolve(&self.selector);
        if let Some(set) = &pd.symbols {
            keys.retain(|k| set.contains(&k.symbol));
        }
        let out_idx: Vec<usize> = projection.cloned().unwrap_or_else(|| (0..self.schema.fields().len()).collect());
        // Columns the scan must produce before filtering: the projection plus the filter columns.
        let mut needed: BTreeSet<usize> = out_idx.iter().copied().collect();
        for f in filters {
            for c in f.column_refs() {
                if let Ok(i) = self.schema.index_of(&c.name) {
                    needed.insert(i);
                }
            }
        }
        let work_idx: Vec<usize> = needed.into_iter().collect();
        let work_schema = Arc::new(self.schema.project(&work_idx)?);
        let out_schema = Arc::new(self.schema.project(&out_idx)?);
        let out_in_work: Vec<usize> =
            out_idx.iter().map(|i| work_idx.iter().position(|w| w == i).unwrap_or_default()).collect();
        let df_schema = DFSchema::try_from(work_schema.as_ref().clone())?;
        let mut predicates = Vec::new();
        for f in filters {
            predicates.push(state.create_physical_expr(f.clone(), &df_schema)?);
        }
        let data_columns: Vec<String> = work_schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| n != EPOCH && n != NANOSECONDS && n != SYMBOL)
            .collect();
        let parts = state.config().target_partitions().max(1).min(keys.len().max(1));
        let per = keys.len().div_ceil(parts).max(1);
        let partitions: Vec<Vec<BucketKey>> = if keys.is_empty() { vec![Vec::new()] } else { keys.chunks(per).map(|c| c.to_vec()).collect() };
        let filter_text: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        let exec = BucketScanExec::new(ScanSpec {
            engine: self.engine.clone(),
            table: self.name.clone(),
            multi: self.multi,
            partitions,
            start: pd.start,
            end: pd.end,
            symbols: pd.symbols.clone(),
            engine_limit: if pd.only_epoch { limit.map(|l| l.saturating_add(1)) } else { None },
            limit,
            data_columns,
            work_schema,
            predicates,
            out_in_work,
            out_schema,
            filter_text,
        });
        Ok(Arc::new(exec))
    }

    /// `DELETE FROM "KEY" WHERE "Epoch" < '2024-01-01'`: a range delete through the engine (logged, durable,
    /// policy-checked). The conditions must be Epoch bounds (`<`, `<=`, `>`, `>=`, `=`, `BETWEEN`) and, on a
    /// table over several symbols, `Symbol =` / `IN` / `OR` of those; anything else is refused rather than
    /// deleting a superset. No condition deletes every row. The rows go when the statement runs (not when it
    /// is planned, so `EXPLAIN DELETE` deletes nothing); the result is one `count` row.
    async fn delete_from(&self, _state: &dyn Session, filters: Vec<Expr>) -> DfResult<Arc<dyn ExecutionPlan>> {
        for f in &filters {
            for e in split_conjunction(f) {
                if !deletable(e) {
                    return Err(DataFusionError::NotImplemented(format!(
                        "DELETE on {:?} takes Epoch ranges{}; this condition is not supported: {e}",
                        self.name,
                        if self.multi { " and Symbol = / IN" } else { "" }
                    )));
                }
            }
        }
        let pd = Pushdown::from_filters(&filters);
        let mut keys = self.engine.resolve(&self.selector);
        if let Some(set) = &pd.symbols {
            keys.retain(|k| set.contains(&k.symbol));
        }
        let start = pd.start.unwrap_or(TimePoint::MIN);
        let end = pd.end.unwrap_or(TimePoint::MAX);
        Ok(Arc::new(BucketDeleteExec::new(self.engine.clone(), self.name.clone(), keys, start, end)))
    }

    async fn insert_into(&self, _state: &dyn Session, input: Arc<dyn ExecutionPlan>, op: InsertOp) -> DfResult<Arc<dyn ExecutionPlan>> {
        if op == InsertOp::Overwrite || op == InsertOp::Replace {
            return Err(DataFusionError::NotImplemented(format!(
                "INSERT {op} is not supported; buckets upsert by time (fixed) or append (variable): use INSERT INTO"
            )));
        }
        let sink = BucketSink {
            engine: self.engine.clone(),
            table: self.name.clone(),
            single: self.single_key(),
            timeframe: self.selector.timeframe.clone(),
            attr_group: self.selector.attr_group.clone(),
            allowed: if self.multi { self.selector.symbols.clone() } else { None },
            schema: self.schema.clone(),
        };
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }
}

/// Everything one scan needs, fixed at planning time.
#[derive(Debug, Clone)]
struct ScanSpec {
    engine: Engine,
    table: String,
    multi: bool,
    partitions: Vec<Vec<BucketKey>>,
    start: Option<TimePoint>,
    end: Option<TimePoint>,
    symbols: Option<BTreeSet<String>>,
    /// Per-bucket row limit handed to the engine (only when the filters are Epoch bounds).
    engine_limit: Option<usize>,
    limit: Option<usize>,
    data_columns: Vec<String>,
    work_schema: SchemaRef,
    predicates: Vec<Arc<dyn PhysicalExpr>>,
    out_in_work: Vec<usize>,
    out_schema: SchemaRef,
    filter_text: Vec<String>,
}

/// The scan of bucket tables: reads snapshots lazily per output partition (a contiguous run of buckets).
#[derive(Debug)]
pub struct BucketScanExec {
    spec: Arc<ScanSpec>,
    props: Arc<PlanProperties>,
}

impl BucketScanExec {
    fn new(spec: ScanSpec) -> Self {
        let schema = spec.out_schema.clone();
        // Each partition yields its buckets in key order and each bucket in time order.
        let sort = |name: &str| -> Option<PhysicalSortExpr> {
            schema.index_of(name).ok().map(|i| PhysicalSortExpr::new_default(Arc::new(PhysColumn::new(name, i))))
        };
        let one_bucket_per_part = spec.partitions.iter().all(|p| p.len() <= 1);
        let order: Vec<PhysicalSortExpr> = if !spec.multi || one_bucket_per_part {
            sort(EPOCH).into_iter().collect()
        } else {
            // Buckets of a partition come in key (= symbol) order.
            match sort(SYMBOL) {
                Some(s) => std::iter::once(s).chain(sort(EPOCH)).collect(),
                None => Vec::new(),
            }
        };
        let eq = match LexOrdering::new(order) {
            Some(o) => EquivalenceProperties::new_with_orderings(schema.clone(), [o]),
            None => EquivalenceProperties::new(schema.clone()),
        };
        let props = PlanProperties::new(
            eq,
            Partitioning::UnknownPartitioning(spec.partitions.len()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        BucketScanExec { spec: Arc::new(spec), props: Arc::new(props) }
    }

    fn describe(&self) -> Vec<(&'static str, String)> {
        let s = &self.spec;
        let buckets: usize = s.partitions.iter().map(|p| p.len()).sum();
        let mut v = vec![("table", s.table.clone()), ("buckets", buckets.to_string())];
        if let Some(sy) = &s.symbols {
            v.push(("symbols", format!("[{}]", sy.iter().cloned().collect::<Vec<_>>().join(", "))));
        }
        if s.start.is_some() || s.end.is_some() {
            let a = s.start.map(|t| format!("[{}", fmt_time(t))).unwrap_or_else(|| "(-inf".into());
            let b = s.end.map(|t| format!("{}]", fmt_time(t))).unwrap_or_else(|| "+inf)".into());
            v.push(("epoch_range", format!("{a}, {b}")));
        }
        if let Some(l) = s.limit {
            v.push(("limit", l.to_string()));
        }
        let names: Vec<String> = s.out_schema.fields().iter().map(|f| f.name().clone()).collect();
        v.push(("projection", format!("[{}]", names.join(", "))));
        if !s.filter_text.is_empty() {
            v.push(("filters", format!("[{}]", s.filter_text.join(", "))));
        }
        v
    }
}

impl DisplayAs for BucketScanExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match t {
            DisplayFormatType::TreeRender => {
                for (k, v) in self.describe() {
                    writeln!(f, "{k}={v}")?;
                }
                Ok(())
            }
            _ => {
                let parts: Vec<String> = self.describe().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "BucketScanExec: {}", parts.join(" "))
            }
        }
    }
}

impl ExecutionPlan for BucketScanExec {
    fn name(&self) -> &str {
        "BucketScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        for p in &self.spec.predicates {
            if f(p)? == TreeNodeRecursion::Stop {
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(self: Arc<Self>, _children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let spec = self.spec.clone();
        let keys = spec.partitions.get(partition).cloned().unwrap_or_default();
        let chunk = context.session_config().batch_size().max(1024);
        let schema = spec.out_schema.clone();
        let mut remaining = spec.limit;
        let per_bucket = futures::stream::iter(keys).flat_map(move |key| {
            let batches = read_bucket(&spec, &key, chunk);
            let spec = spec.clone();
            futures::stream::iter(batches).map(move |b| b.and_then(|b| finish_batch(&spec, b)))
        });
        let limited = per_bucket
            .filter_map(|r| futures::future::ready(match r {
                Ok(b) if b.num_rows() == 0 => None,
                other => Some(other),
            }))
            .scan((), move |_, r| {
                let out = match r {
                    Err(e) => Some(Err(e)),
                    Ok(b) => match remaining {
                        Some(0) => None,
                        Some(n) => {
                            let take = n.min(b.num_rows());
                            remaining = Some(n - take);
                            Some(Ok(b.slice(0, take)))
                        }
                        None => Some(Ok(b)),
                    },
                };
                futures::future::ready(out)
            });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, limited)))
    }
}

/// Read one bucket's snapshot as work-schema batches of at most `chunk` rows (zero-copy slices).
fn read_bucket(spec: &ScanSpec, key: &BucketKey, chunk: usize) -> Vec<DfResult<RecordBatch>> {
    let req = ReadRequest {
        selector: KeySelector { symbols: Some(vec![key.symbol.clone()]), timeframe: key.timeframe.clone(), attr_group: key.attr_group.clone() },
        start: spec.start,
        end: spec.end,
        limit: spec.engine_limit,
        from_start: true,
        columns: Some(spec.data_columns.clone()),
    };
    let reads = match spec.engine.read(&req) {
        Ok(r) => r,
        // A bucket destroyed between planning and execution reads as empty.
        Err(crate::engine::EngineError::NotFound(_)) => return Vec::new(),
        Err(e) => return vec![Err(DataFusionError::External(Box::new(e)))],
    };
    let mut out = Vec::new();
    for r in reads {
        for b in r.batches {
            let mut off = 0;
            while off < b.num_rows() {
                let n = chunk.min(b.num_rows() - off);
                out.push(to_work(spec, key, &b.slice(off, n)));
                off += n;
            }
        }
    }
    out
}

/// The columns of a table over several buckets: the union of their columns (`Epoch` first, data columns
/// in the order first seen going through the buckets in key order, `Nanoseconds` last), so one bucket
/// lacking a column never hides it from the others. A column that some bucket lacks is nullable and reads
/// as null there; a column whose type differs between buckets takes the first bucket's type, and the
/// others' values are cast to it (a value that does not fit reads as null).
fn union_fields(engine: &Engine, keys: &[BucketKey]) -> Vec<Field> {
    let mut fields: Vec<Field> = Vec::new();
    let mut present: Vec<usize> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut buckets = 0usize;
    let mut last_schema = None;
    for k in keys {
        let Some(bs) = engine.schema(k) else { continue };
        buckets += 1;
        // Most buckets of a table share one schema: reuse the previous one's Arrow schema.
        let arrow = match &last_schema {
            Some((prev, a)) if *prev == bs => Arc::clone(a),
            _ => {
                let a = bs.arrow_schema();
                last_schema = Some((bs, Arc::clone(&a)));
                a
            }
        };
        for f in arrow.fields() {
            match index.get(f.name()) {
                Some(&i) => present[i] += 1,
                None => {
                    index.insert(f.name().clone(), fields.len());
                    fields.push(f.as_ref().clone());
                    present.push(1);
                }
            }
        }
    }
    let mut out: Vec<Field> = fields
        .into_iter()
        .zip(present)
        .map(|(f, n)| if n < buckets { f.with_nullable(true) } else { f })
        .collect();
    // Nanoseconds (tick buckets) after the data columns, as in a single tick bucket.
    if let Some(i) = out.iter().position(|f| f.name() == NANOSECONDS) {
        let f = out.remove(i);
        out.push(f);
    }
    out
}

/// Arrange an engine batch into the work schema (adding `Symbol`; null for a column the bucket lacks, a
/// cast for one whose type differs, see [`union_fields`]).
fn to_work(spec: &ScanSpec, key: &BucketKey, b: &RecordBatch) -> DfResult<RecordBatch> {
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(spec.work_schema.fields().len());
    for f in spec.work_schema.fields() {
        if f.name() == SYMBOL {
            cols.push(Arc::new(StringArray::from(vec![key.symbol.as_str(); b.num_rows()])));
            continue;
        }
        match b.column_by_name(f.name()) {
            None => cols.push(arrow::array::new_null_array(f.data_type(), b.num_rows())),
            Some(c) if c.data_type() == f.data_type() => cols.push(c.clone()),
            Some(c) => cols.push(arrow::compute::cast(c, f.data_type()).map_err(|e| {
                DataFusionError::Execution(format!(
                    "column {:?} of bucket {key} is {}, the table's is {} (from the first bucket): {e}",
                    f.name(),
                    c.data_type(),
                    f.data_type()
                ))
            })?),
        }
    }
    let opts = RecordBatchOptions::new().with_row_count(Some(b.num_rows()));
    Ok(RecordBatch::try_new_with_options(spec.work_schema.clone(), cols, &opts)?)
}

/// Apply the pushed filters exactly and project to the output schema.
fn finish_batch(spec: &ScanSpec, b: RecordBatch) -> DfResult<RecordBatch> {
    let mut b = b;
    for p in &spec.predicates {
        let mask = p.evaluate(&b)?.into_array(b.num_rows())?;
        let mask = mask.as_boolean_opt().ok_or_else(|| DataFusionError::Execution("filter is not boolean".into()))?;
        if mask.true_count() < b.num_rows() {
            b = filter_record_batch(&b, mask)?;
        }
    }
    Ok(b.project(&spec.out_in_work)?.with_schema(spec.out_schema.clone())?)
}

/// The INSERT sink: writes each batch durably through the engine (log, triggers); multi-symbol tables route
/// rows by their `Symbol` value.
#[derive(Debug)]
pub struct BucketSink {
    engine: Engine,
    table: String,
    single: Option<BucketKey>,
    timeframe: String,
    attr_group: String,
    /// Symbols a listed table (`A,B/TF/G`) accepts; `None` = any.
    allowed: Option<Vec<String>>,
    schema: SchemaRef,
}

impl DisplayAs for BucketSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "BucketSink: table={}", self.table)
    }
}

impl BucketSink {
    async fn write_one(&self, key: &BucketKey, batch: &RecordBatch) -> DfResult<u64> {
        let batch = normalize_for_write(batch)?;
        let ack = self.engine.write(key, &batch, WriteOptions::default()).await.map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(ack.rows as u64)
    }
}

/// Drop nullability and keep the Epoch type; the engine validates the rest.
fn normalize_for_write(b: &RecordBatch) -> DfResult<RecordBatch> {
    for (i, c) in b.columns().iter().enumerate() {
        if c.null_count() > 0 {
            return Err(DataFusionError::Execution(format!("column {:?} has NULL values; buckets store no NULLs", b.schema().field(i).name())));
        }
    }
    Ok(b.clone())
}

#[async_trait]
impl DataSink for BucketSink {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(&self, mut data: SendableRecordBatchStream, _context: &Arc<TaskContext>) -> DfResult<u64> {
        let mut total = 0u64;
        while let Some(batch) = data.next().await {
            let batch = batch?;
            if batch.num_rows() == 0 {
                continue;
            }
            if let Some(key) = &self.single {
                total += self.write_one(key, &batch).await?;
                continue;
            }
            let idx = batch.schema().index_of(SYMBOL)?;
            let syms = arrow::compute::cast(batch.column(idx), &DataType::Utf8)?;
            let syms = syms.as_string::<i32>();
            if syms.null_count() > 0 {
                return Err(DataFusionError::Execution("INSERT into a multi-symbol table needs a non-NULL Symbol on every row".into()));
            }
            let distinct: BTreeSet<&str> = syms.iter().flatten().collect();
            let keep: Vec<usize> = (0..batch.num_columns()).filter(|i| *i != idx).collect();
            for s in distinct {
                if let Some(allowed) = &self.allowed {
                    if !allowed.iter().any(|a| a == s) {
                        return Err(DataFusionError::Execution(format!("symbol {s:?} is not part of table {}", self.table)));
                    }
                }
                let key = BucketKey::from_parts(s, &self.timeframe, &self.attr_group).map_err(|e| DataFusionError::External(Box::new(e)))?;
                let mask = arrow::compute::kernels::cmp::eq(syms, &StringArray::new_scalar(s))?;
                let part = filter_record_batch(&batch, &mask)?.project(&keep)?;
                total += self.write_one(&key, &part).await?;
            }
        }
        Ok(total)
    }
}
