//! Reads: buckets (with MarketStore's `functions`), the `Symbol` merge of multi-bucket results, and SQL
//! (queries, DML row counts, plans for Flight SQL).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};

use super::error::ServiceError;
use super::policy::Access;
use super::request::ReadRequest;
use super::{Caller, Service};
use crate::engine::BucketKey;
use crate::query::confine::{self, Effect};
use crate::query::QueryEngine;

/// Name of the column added to multi-symbol results.
pub const SYMBOL_COLUMN: &str = "Symbol";

/// Rows per batch when a `Symbol` column has to be materialised: bounds the memory of a `*` read
/// however many buckets it spans.
pub const SYMBOL_SLICE_ROWS: usize = 65_536;

/// A lazily produced result.
pub type SqlStream = BoxStream<'static, Result<RecordBatch, ServiceError>>;

/// The rows of one bucket (after `functions`, if any).
#[derive(Debug, Clone)]
pub struct ReadPart {
    pub key: BucketKey,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

/// The result of a [`ReadRequest`]: one part per bucket, in key order.
#[derive(Debug, Clone)]
pub struct ReadResult {
    /// The request named exactly one bucket (no `Symbol` column is added when merging).
    pub single: bool,
    pub parts: Vec<ReadPart>,
}

impl ReadResult {
    /// Rows over all parts.
    pub fn rows(&self) -> usize {
        self.parts.iter().flat_map(|p| p.batches.iter()).map(|b| b.num_rows()).sum()
    }

    /// The schema [`ReadResult::into_stream`] produces.
    pub fn schema(&self) -> Result<SchemaRef, ServiceError> {
        let first = self.parts.first().ok_or_else(|| ServiceError::not_found("no data"))?;
        if self.single {
            return Ok(first.schema.clone());
        }
        // Same names and types; a column nullable in one bucket is nullable in the result.
        let mut fields: Vec<Field> = first.schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        for p in &self.parts {
            let same = p.schema.fields().len() == fields.len()
                && p.schema.fields().iter().zip(&fields).all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
            if !same {
                return Err(ServiceError::invalid(format!(
                    "symbols in a query must have the same data type or be filtered by common columns. symbols=[{}]",
                    p.key.symbol
                )));
            }
            for (f, a) in fields.iter_mut().zip(p.schema.fields()) {
                if a.is_nullable() && !f.is_nullable() {
                    *f = f.clone().with_nullable(true);
                }
            }
        }
        fields.push(Field::new(SYMBOL_COLUMN, DataType::Utf8, false));
        Ok(Arc::new(Schema::new(fields)))
    }

    /// One schema and a lazy batch stream over all parts. A multi-bucket result gets a `Symbol` column,
    /// built per slice of at most [`SYMBOL_SLICE_ROWS`] rows as the stream is consumed.
    pub fn into_stream(self) -> Result<(SchemaRef, SqlStream), ServiceError> {
        let schema = self.schema()?;
        if self.single {
            let batches = self.parts.into_iter().flat_map(|p| p.batches).map(Ok);
            return Ok((schema, futures::stream::iter(batches).boxed()));
        }
        let slices = self.parts.into_iter().flat_map(|p| {
            let sym = p.key.symbol;
            p.batches.into_iter().flat_map(move |b| {
                let sym = sym.clone();
                (0..b.num_rows()).step_by(SYMBOL_SLICE_ROWS).map(move |off| (sym.clone(), b.slice(off, SYMBOL_SLICE_ROWS.min(b.num_rows() - off))))
            })
        });
        let out = schema.clone();
        let stream = futures::stream::iter(slices).map(move |(sym, b)| {
            let mut cols: Vec<ArrayRef> = b.columns().to_vec();
            cols.push(Arc::new(StringArray::from(vec![sym.as_str(); b.num_rows()])));
            RecordBatch::try_new(out.clone(), cols).map_err(ServiceError::from)
        });
        Ok((schema, stream.boxed()))
    }
}

/// A tick bucket's rows with `Epoch` (seconds) and `Nanoseconds` folded into one `Epoch` column of
/// `timestamp[ns, UTC]`, in the place of `Epoch`; a part without `Nanoseconds` is returned as it is. A
/// time outside what 64-bit nanoseconds hold (before 1677 or after 2262) is an error, not a wrapped value.
pub fn epoch_as_nanos(part: ReadPart) -> Result<ReadPart, ServiceError> {
    let (Ok(e), Ok(n)) = (part.schema.index_of(crate::engine::EPOCH), part.schema.index_of(crate::engine::NANOSECONDS)) else {
        return Ok(part);
    };
    let ty = DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, Some("UTC".into()));
    let fields: Vec<Field> = part
        .schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != n)
        .map(|(i, f)| if i == e { Field::new(crate::engine::EPOCH, ty.clone(), false) } else { f.as_ref().clone() })
        .collect();
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    let mut batches = Vec::with_capacity(part.batches.len());
    for b in &part.batches {
        let secs = arrow::compute::cast(b.column(e), &DataType::Int64)?;
        let secs = secs.as_any().downcast_ref::<Int64Array>().ok_or_else(|| ServiceError::internal("Epoch is not int64 seconds"))?;
        let nanos = b.column(n).as_any().downcast_ref::<arrow::array::Int32Array>().ok_or_else(|| ServiceError::internal("Nanoseconds is not int32"))?;
        let mut out = Vec::with_capacity(b.num_rows());
        for (s, ns) in secs.values().iter().zip(nanos.values().iter()) {
            let t = s.checked_mul(1_000_000_000).and_then(|v| v.checked_add(i64::from(*ns))).ok_or_else(|| {
                ServiceError::invalid(format!("epoch_ns: time {s}.{ns:09} s is outside what timestamp[ns] holds (years 1677-2262)"))
            })?;
            out.push(t);
        }
        let epoch: ArrayRef = Arc::new(arrow::array::TimestampNanosecondArray::from(out).with_timezone("UTC"));
        let cols: Vec<ArrayRef> =
            b.columns().iter().enumerate().filter(|(i, _)| *i != n).map(|(i, c)| if i == e { epoch.clone() } else { c.clone() }).collect();
        batches.push(RecordBatch::try_new(schema.clone(), cols)?);
    }
    Ok(ReadPart { key: part.key, schema, batches })
}

/// Append a constant `Symbol` column to a batch of a multi-bucket result.
pub fn with_symbol(batch: &RecordBatch, symbol: &str) -> Result<RecordBatch, arrow::error::ArrowError> {
    let mut fields: Vec<Field> = batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(SYMBOL_COLUMN, DataType::Utf8, false));
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    cols.push(Arc::new(StringArray::from(vec![symbol; batch.num_rows()])));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
}

/// Rows affected by a DML result (DataFusion returns a `count` column); `-1` when the statement
/// returned no count (not DML).
pub fn affected_rows(batches: &[RecordBatch]) -> i64 {
    let counts: Vec<i64> = batches
        .iter()
        .filter_map(|b| b.column_by_name("count").cloned())
        .filter_map(|c| arrow::compute::cast(&c, &DataType::Int64).ok())
        .filter_map(|c| c.as_any().downcast_ref::<Int64Array>().map(|a| (0..a.len()).map(|i| a.value(i)).sum::<i64>()))
        .collect();
    if counts.is_empty() { -1 } else { counts.iter().sum() }
}

impl Service {
    /// Read the buckets of `req` and apply its `functions` to each. `NotFound` when no selected bucket
    /// exists.
    pub async fn read(&self, caller: &Caller, req: &ReadRequest) -> Result<ReadResult, ServiceError> {
        self.authorize(caller, Access::Read)?;
        let single = req.selector.is_single();
        let reads = self.engine.read(&req.to_engine())?;
        let mut parts = Vec::with_capacity(reads.len());
        for r in reads {
            let key = r.key.clone();
            let part = if req.functions.is_empty() {
                ReadPart { key, schema: r.schema, batches: r.batches }
            } else {
                let (schema, batches) = self.query.apply_functions(r, &req.functions).await?;
                ReadPart { key, schema, batches }
            };
            parts.push(if req.epoch_ns { epoch_as_nanos(part)? } else { part });
        }
        Ok(ReadResult { single, parts })
    }

    /// A same-host read ([`crate::local`]): the open files of `req`'s snapshot for the caller to map, and
    /// batches for what is not on disk in Arrow's layout. Functions and `epoch_ns` compute new arrays, so
    /// they are refused here (Flight reads offer both).
    pub fn local_read(&self, caller: &Caller, req: &ReadRequest) -> Result<Vec<crate::engine::LocalRead>, ServiceError> {
        if !req.functions.is_empty() {
            return Err(ServiceError::invalid("functions run on the server: read them over Flight"));
        }
        if req.epoch_ns {
            return Err(ServiceError::invalid("epoch_ns is not offered on same-host reads: the files hold Epoch and Nanoseconds as stored"));
        }
        self.authorize(caller, Access::Read)?;
        Ok(self.engine.local_read(&req.to_engine())?)
    }

    /// Blocking form of [`Service::read`] without `functions`, for threads outside the runtime (plugins).
    pub fn read_blocking(&self, caller: &Caller, req: &ReadRequest) -> Result<ReadResult, ServiceError> {
        if !req.functions.is_empty() {
            return Err(ServiceError::invalid("functions need the async read"));
        }
        self.authorize(caller, Access::Read)?;
        let reads = self.engine.read(&req.to_engine())?;
        let parts = reads.into_iter().map(|r| ReadPart { key: r.key, schema: r.schema, batches: r.batches }).collect();
        Ok(ReadResult { single: req.selector.is_single(), parts })
    }

    /// Plan one statement and check what it does against `caller`'s policy: every statement reads
    /// (`queryable`); `INSERT` also appends, `DELETE` removes (`enable_remove`), `CREATE`/`DROP VIEW` change
    /// the SQL catalog. Nothing has run yet.
    async fn authorized_plan(&self, caller: &Caller, text: &str) -> Result<LogicalPlan, ServiceError> {
        self.authorize(caller, Access::Read)?;
        let plan = self.query.logical_plan(text).await?;
        match confine::effect(&plan) {
            Effect::Read => {}
            Effect::Append => self.authorize(caller, Access::Append)?,
            Effect::Remove => self.authorize(caller, Access::Remove)?,
            Effect::Schema => self.authorize(caller, Access::Schema)?,
        }
        Ok(plan)
    }

    /// Statements that change data are acknowledged like any other change (`ack: replica`).
    async fn acknowledged_if_changed(&self, plan: &LogicalPlan) -> Result<(), ServiceError> {
        match confine::effect(plan) {
            Effect::Append | Effect::Remove => self.acknowledged(0).await,
            Effect::Read | Effect::Schema => Ok(()),
        }
    }

    /// `ALTER TABLE "KEY" ADD COLUMN …` / `DROP COLUMN …` ([`crate::query::alter`]) run as a schema change;
    /// its result is one row, `count`: the columns added or dropped. `None` for every other statement.
    async fn sql_alter(&self, caller: &Caller, text: &str) -> Result<Option<RecordBatch>, ServiceError> {
        let Some((key, change)) = crate::query::alter::schema_change(text)? else { return Ok(None) };
        let n = match &change {
            crate::engine::SchemaChange::AddColumns(c) => c.len(),
            crate::engine::SchemaChange::DropColumns(c) => c.len(),
        };
        self.alter(caller, &key, change).await?;
        Ok(Some(alter_result(n as u64)))
    }

    /// Run one SQL statement and collect its result (bounded by the SQL memory pool).
    pub async fn sql(&self, caller: &Caller, text: &str) -> Result<(SchemaRef, Vec<RecordBatch>), ServiceError> {
        if let Some(b) = self.sql_alter(caller, text).await? {
            return Ok((b.schema(), vec![b]));
        }
        let plan = self.authorized_plan(caller, text).await?;
        let df = self.query.execute_plan(plan.clone()).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = self.query.collect(df).await?;
        self.acknowledged_if_changed(&plan).await?;
        Ok((schema, batches))
    }

    /// Run one SQL statement (with `$n` parameters, if given) and stream its result lazily.
    /// A statement that changes data runs to completion first and is acknowledged like any other change
    /// (`ack: replica`) before its (one-row) result is streamed.
    pub async fn sql_stream(&self, caller: &Caller, text: &str, params: Option<ParamValues>) -> Result<(SchemaRef, SqlStream), ServiceError> {
        if let Some(b) = self.sql_alter(caller, text).await? {
            return Ok((b.schema(), futures::stream::iter([Ok(b)]).boxed()));
        }
        let plan = self.authorized_plan(caller, text).await?;
        let changes = matches!(confine::effect(&plan), Effect::Append | Effect::Remove);
        let mut df = self.query.execute_plan(plan).await?;
        if let Some(p) = params {
            df = df.with_param_values(p)?;
        }
        if changes {
            let schema = Arc::new(df.schema().as_arrow().clone());
            let batches = self.query.collect(df).await?;
            self.acknowledged(0).await?;
            return Ok((schema, futures::stream::iter(batches.into_iter().map(Ok)).boxed()));
        }
        let (schema, stream) = QueryEngine::stream_dataframe(df).await?;
        Ok((schema, stream.map_err(ServiceError::from).boxed()))
    }

    /// Run one SQL statement and keep at most `max_rows` rows of its result: the stream is read only that
    /// far, so a large result costs `max_rows` rows, not the whole set. `true` when rows were left unread.
    /// A statement that changes data is acknowledged like any other change (`ack: replica`).
    pub async fn sql_rows(&self, caller: &Caller, text: &str, max_rows: usize) -> Result<(SchemaRef, Vec<RecordBatch>, bool), ServiceError> {
        if let Some(b) = self.sql_alter(caller, text).await? {
            return Ok((b.schema(), vec![b], false));
        }
        let plan = self.authorized_plan(caller, text).await?;
        let df = self.query.execute_plan(plan.clone()).await?;
        let (schema, mut stream) = QueryEngine::stream_dataframe(df).await?;
        let (mut batches, mut rows, mut truncated) = (Vec::new(), 0usize, false);
        while let Some(b) = stream.next().await {
            let b = b?;
            let room = max_rows - rows;
            if b.num_rows() > room {
                if room > 0 {
                    batches.push(b.slice(0, room));
                }
                truncated = true;
                break;
            }
            rows += b.num_rows();
            batches.push(b);
        }
        drop(stream);
        self.acknowledged_if_changed(&plan).await?;
        Ok((schema, batches, truncated))
    }

    /// Run a statement that changes data (`INSERT INTO "KEY" SELECT …`); rows affected (`-1`: the
    /// statement reports no count).
    pub async fn sql_update(&self, caller: &Caller, text: &str, params: Option<ParamValues>) -> Result<i64, ServiceError> {
        if let Some(b) = self.sql_alter(caller, text).await? {
            return Ok(affected_rows(&[b]));
        }
        let plan = self.authorized_plan(caller, text).await?;
        let mut df = self.query.execute_plan(plan.clone()).await?;
        if let Some(p) = params {
            df = df.with_param_values(p)?;
        }
        let batches = self.query.collect(df).await?;
        self.acknowledged_if_changed(&plan).await?;
        Ok(affected_rows(&batches))
    }

    /// The logical plan of a statement without running it (result schemas and parameter types of Flight
    /// SQL statements).
    pub async fn sql_plan(&self, caller: &Caller, text: &str) -> Result<LogicalPlan, ServiceError> {
        self.authorize(caller, Access::Read)?;
        if crate::query::alter::schema_change(text)?.is_some() {
            // Only the result's shape: the change runs when the statement is executed.
            return Ok(self.query.logical_plan("SELECT CAST(0 AS BIGINT UNSIGNED) AS count").await?);
        }
        Ok(self.query.logical_plan(text).await?)
    }
}

/// The one-row result of an `ALTER TABLE`: `count`, the columns added or dropped (as DataFusion reports
/// DML counts).
fn alter_result(n: u64) -> RecordBatch {
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new("count", arrow::datatypes::DataType::UInt64, false)]));
    RecordBatch::try_new(schema.clone(), vec![Arc::new(arrow::array::UInt64Array::from(vec![n]))]).unwrap_or_else(|_| RecordBatch::new_empty(schema))
}
