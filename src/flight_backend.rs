//! The server side of the Flight contract: [`mkts_flight::FlightBackend`] over the engine and SQL.

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use futures::stream::StreamExt;
use mkts_flight::ticket::{key_body, CreateAction, DeleteRangeAction, ListSymbolsAction};
use mkts_flight::{BackendError, BatchStream, BucketListing, Delivered, FlightBackend, KeyedBatchStream, QueryTicket, SubscribeRequest, SubscriptionStream};
use serde_json::json;
use tonic::Code;

use crate::context::{ServerContext, VERSION};
use crate::engine::{
    BucketKey, BucketRead, BucketSchema, ColumnDef, ColumnType, EngineError, KeyPattern, KeySelector, ReadRequest,
    RecordKind, TimePoint, WriteOptions,
};
use crate::query::QueryError;

/// Name of the column added to multi-symbol results.
pub const SYMBOL_COLUMN: &str = "Symbol";

/// Flight backend over a running server's context.
pub struct EngineFlightBackend {
    pub ctx: Arc<ServerContext>,
    /// The Flight SQL handler, for parameter uploads that the Flight crate decodes itself.
    pub sql: Arc<crate::query::flight_sql::FlightSqlHandler>,
}

/// Map engine errors onto gRPC codes.
pub fn engine_status(e: EngineError) -> BackendError {
    let code = match &e {
        EngineError::InvalidKey { .. } | EngineError::SchemaMismatch { .. } | EngineError::InvalidInput(_) => Code::InvalidArgument,
        EngineError::NotFound(_) => Code::NotFound,
        EngineError::AlreadyExists(_) => Code::AlreadyExists,
        EngineError::NotAllowed(_) => Code::PermissionDenied,
        EngineError::Unavailable(_) | EngineError::Damaged { .. } => Code::Unavailable,
        EngineError::Aborted(_) => Code::Aborted,
        EngineError::Io { .. } if e.is_disk_full() => Code::ResourceExhausted,
        EngineError::Io { .. } | EngineError::Corrupt { .. } | EngineError::LogDamaged(_) | EngineError::Arrow(_) => Code::Internal,
    };
    BackendError::new(code, e.to_string())
}

fn query_status(e: QueryError) -> BackendError {
    match e {
        QueryError::Engine(e) => engine_status(e),
        QueryError::NotAllowed(m) => BackendError::new(Code::PermissionDenied, m),
        QueryError::ResourcesExhausted(m) => BackendError::new(Code::ResourceExhausted, m),
        other => BackendError::invalid(other.to_string()),
    }
}

/// Build a [`ReadRequest`] from a MarketStore QueryRequest-shaped ticket.
pub fn read_request(q: &QueryTicket) -> Result<ReadRequest, EngineError> {
    let dest = q.destination.as_deref().ok_or_else(|| EngineError::InvalidInput("missing destination".into()))?;
    let selector = KeySelector::parse(dest)?;
    let nanos = |n: Option<i64>| -> Result<i32, EngineError> {
        match n {
            None => Ok(0),
            Some(v) if (0..1_000_000_000).contains(&v) => Ok(v as i32),
            Some(v) => Err(EngineError::InvalidInput(format!("nanoseconds {v} outside 0..1e9"))),
        }
    };
    let start = q.epoch_start.map(|s| Ok::<_, EngineError>(TimePoint { secs: s, nanos: nanos(q.epoch_start_nanos)? })).transpose()?;
    let end = q
        .epoch_end
        .map(|s| {
            // As MarketStore: an end without nanoseconds is the exact second (`secs.000000000`), inclusive.
            let ns = nanos(q.epoch_end_nanos)?;
            Ok::<_, EngineError>(TimePoint { secs: s, nanos: ns })
        })
        .transpose()?;
    let limit = match q.limit_record_count {
        None | Some(0) => None,
        Some(n) if n < 0 => return Err(EngineError::InvalidInput("limit_record_count must be positive".into())),
        Some(n) => Some(n as usize),
    };
    Ok(ReadRequest { selector, start, end, limit, from_start: q.limit_from_start.unwrap_or(false), columns: q.columns.clone() })
}

/// Append a constant `Symbol` column to each batch of a multi-bucket result.
pub fn with_symbol(batch: &RecordBatch, symbol: &str) -> Result<RecordBatch, arrow::error::ArrowError> {
    let mut fields: Vec<Field> = batch.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(SYMBOL_COLUMN, DataType::Utf8, false));
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    cols.push(Arc::new(StringArray::from(vec![symbol; batch.num_rows()])));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
}

impl EngineFlightBackend {
    async fn run_functions(&self, reads: Vec<BucketRead>, functions: &[String]) -> Result<Vec<(String, SchemaRef, Vec<RecordBatch>)>, BackendError> {
        let mut out = Vec::new();
        for r in reads {
            let sym = r.key.symbol.clone();
            let (schema, batches) = self.ctx.query.apply_functions(r, functions).await.map_err(query_status)?;
            out.push((sym, schema, batches));
        }
        Ok(out)
    }

    /// Read (and optionally transform) the buckets of a ticket: one (symbol, schema, batches) per bucket.
    async fn read(&self, q: &QueryTicket) -> Result<(bool, Vec<(String, SchemaRef, Vec<RecordBatch>)>), BackendError> {
        let req = read_request(q).map_err(engine_status)?;
        let single = req.selector.is_single();
        let reads = self.ctx.engine.read(&req).map_err(engine_status)?;
        let parts = match q.functions.as_ref().filter(|f| !f.is_empty()) {
            Some(f) => self.run_functions(reads, f).await?,
            None => reads.into_iter().map(|r| (r.key.symbol.clone(), r.schema, r.batches)).collect(),
        };
        Ok((single, parts))
    }

    /// One schema and a lazy batch stream over per-bucket results. Multi-bucket results get a `Symbol`
    /// column, built per slice of at most [`SYMBOL_SLICE_ROWS`] rows as the client consumes the stream, so
    /// memory stays bounded however many buckets a `*` read spans.
    fn merge_parts(single: bool, parts: Vec<(String, SchemaRef, Vec<RecordBatch>)>) -> Result<(SchemaRef, BatchStream), BackendError> {
        if single {
            let (_, schema, batches) = parts.into_iter().next().ok_or_else(|| BackendError::new(Code::NotFound, "no data"))?;
            return Ok((schema, futures::stream::iter(batches.into_iter().map(Ok)).boxed()));
        }
        let first_schema = parts.first().map(|p| p.1.clone()).ok_or_else(|| BackendError::new(Code::NotFound, "no data"))?;
        for (sym, s, _) in &parts {
            if s.fields() != first_schema.fields() {
                return Err(BackendError::invalid(format!(
                    "symbols in a query must have the same data type or be filtered by common columns. symbols=[{sym}]"
                )));
            }
        }
        let mut fields: Vec<Field> = first_schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new(SYMBOL_COLUMN, DataType::Utf8, false));
        let schema = Arc::new(Schema::new(fields));
        let slices = parts.into_iter().flat_map(|(sym, _, batches)| {
            batches.into_iter().flat_map(move |b| {
                let sym = sym.clone();
                (0..b.num_rows()).step_by(SYMBOL_SLICE_ROWS).map(move |off| (sym.clone(), b.slice(off, SYMBOL_SLICE_ROWS.min(b.num_rows() - off))))
            })
        });
        let stream = futures::stream::iter(slices)
            .map(|(sym, b)| with_symbol(&b, &sym).map_err(|e| BackendError::new(Code::Internal, e.to_string())));
        Ok((schema, stream.boxed()))
    }
}

/// Deliveries the bus queues for one subscription before the forwarder below takes them (it takes them at
/// once; the byte bound applies after it).
const SUBSCRIPTION_EVENTS: usize = 4096;

struct SubQueue {
    items: VecDeque<(Delivered, usize)>,
    bytes: usize,
    /// Set when the subscriber was dropped: the error to send, once.
    dropped: Option<String>,
    /// The source ended, or the consumer is gone.
    closed: bool,
}

struct SubShared {
    q: parking_lot::Mutex<SubQueue>,
    wake: tokio::sync::Notify,
}

/// Ends the forwarder when the client's stream is dropped.
struct ConsumerGone(Arc<SubShared>, Arc<crate::metrics::Metrics>);

impl Drop for ConsumerGone {
    fn drop(&mut self) {
        self.1.flight_subscribers_add(-1);
        let mut q = self.0.q.lock();
        q.closed = true;
        q.items.clear();
        q.bytes = 0;
    }
}

/// A subscription whose unread batches are bounded by bytes. A task takes every batch from `source` at
/// once (so the bus never queues or drops for this subscriber) into a queue the client's stream reads.
/// An error from `source` is passed on after what was queued before it, and ends the stream.
/// When the queue would pass `limit` bytes the subscriber is dropped: the queue is freed, the stream ends
/// with `RESOURCE_EXHAUSTED`, a warning names `who`, and `mkts_flight_dropped_subscribers_total` counts it.
/// A single batch larger than `limit` still passes when nothing else is waiting.
pub fn bounded_subscription(
    mut source: SubscriptionStream,
    limit: usize,
    who: String,
    metrics: Arc<crate::metrics::Metrics>,
) -> SubscriptionStream {
    let shared = Arc::new(SubShared {
        q: parking_lot::Mutex::new(SubQueue { items: VecDeque::new(), bytes: 0, dropped: None, closed: false }),
        wake: tokio::sync::Notify::new(),
    });
    let fwd = shared.clone();
    metrics.flight_subscribers_add(1);
    let guard = ConsumerGone(shared, metrics.clone());
    tokio::spawn(async move {
        while let Some(item) = source.next().await {
            let item = match item {
                Ok(d) => d,
                Err(e) => {
                    let mut q = fwd.q.lock();
                    q.dropped = Some(e.message);
                    q.closed = true;
                    drop(q);
                    fwd.wake.notify_one();
                    return;
                }
            };
            let size = item.batch.get_array_memory_size();
            let mut q = fwd.q.lock();
            if q.closed {
                return;
            }
            if q.bytes > 0 && q.bytes.saturating_add(size) > limit {
                let waiting = q.bytes;
                q.items.clear();
                q.bytes = 0;
                q.closed = true;
                q.dropped = Some(format!(
                    "subscription dropped: {waiting} bytes were waiting unread, past subscriber_queue_mb ({limit} bytes)"
                ));
                drop(q);
                tracing::warn!(subscriber = %who, waiting, limit, "dropping Flight subscriber: it does not keep up");
                metrics.flight_subscriber_dropped();
                fwd.wake.notify_one();
                return;
            }
            q.bytes += size;
            q.items.push_back((item, size));
            drop(q);
            fwd.wake.notify_one();
        }
        fwd.q.lock().closed = true;
        fwd.wake.notify_one();
    });
    futures::stream::unfold(guard, |g| async move {
        loop {
            // `Some(None)`: the end; `None`: nothing yet (the forwarder's notify_one leaves a permit).
            let next = {
                let mut q = g.0.q.lock();
                if let Some((item, size)) = q.items.pop_front() {
                    q.bytes -= size;
                    Some(Some(Ok(item)))
                } else if let Some(msg) = q.dropped.take() {
                    Some(Some(Err(BackendError::new(Code::ResourceExhausted, msg))))
                } else if q.closed {
                    Some(None)
                } else {
                    None
                }
            };
            match next {
                Some(Some(r)) => return Some((r, g)),
                Some(None) => return None,
                None => g.0.wake.notified().await,
            }
        }
    })
    .boxed()
}

/// Rows per batch when a `Symbol` column has to be materialised.
pub const SYMBOL_SLICE_ROWS: usize = 65_536;

fn status_to_backend(s: tonic::Status) -> BackendError {
    BackendError::new(s.code(), s.message())
}

fn parse_key(k: &str) -> Result<BucketKey, BackendError> {
    BucketKey::parse(k).map_err(engine_status)
}

#[async_trait::async_trait]
impl FlightBackend for EngineFlightBackend {
    async fn query(&self, q: QueryTicket) -> Result<(SchemaRef, BatchStream), BackendError> {
        self.ctx.check_queryable().map_err(engine_status)?;
        if let Some(sql) = &q.sql {
            let (schema, stream) = self.ctx.query.sql_stream(sql).await.map_err(query_status)?;
            return Ok((schema, stream.map(|r| r.map_err(query_status)).boxed()));
        }
        let (single, parts) = self.read(&q).await?;
        Self::merge_parts(single, parts)
    }

    async fn describe(&self, q: QueryTicket) -> Result<(SchemaRef, Option<i64>), BackendError> {
        self.ctx.check_queryable().map_err(engine_status)?;
        if let Some(sql) = &q.sql {
            let (schema, batches) = self.ctx.query.sql(sql).await.map_err(query_status)?;
            return Ok((schema, Some(batches.iter().map(|b| b.num_rows() as i64).sum())));
        }
        let (single, parts) = self.read(&q).await?;
        let rows = parts.iter().flat_map(|p| p.2.iter()).map(|b| b.num_rows() as i64).sum();
        let (schema, _) = Self::merge_parts(single, parts)?;
        Ok((schema, Some(rows)))
    }

    async fn write(&self, key: &str, batch: arrow::array::RecordBatch) -> Result<usize, BackendError> {
        let key = parse_key(key)?;
        let ack = self.ctx.engine.write(&key, &batch, WriteOptions::default()).await.map_err(engine_status)?;
        Ok(ack.rows)
    }

    async fn subscribe(&self, req: SubscribeRequest, peer: &str) -> Result<SubscriptionStream, BackendError> {
        self.ctx.check_queryable().map_err(engine_status)?;
        let pat = KeyPattern::parse(&req.pattern).map_err(engine_status)?;
        let feed = crate::bus::Feed::parse(req.feed.as_deref()).map_err(|e| BackendError::invalid(e.to_string()))?;
        let opts = crate::bus::SubscribeOptions { feed, from_lsn: req.from_lsn, capacity: SUBSCRIPTION_EVENTS };
        let source = self.ctx.bus.subscribe(pat, opts).map_err(|e| BackendError::invalid(e.to_string()))?;
        let source = source
            .map(|r| {
                r.map(|d| Delivered { key: d.key.to_string(), lsn: d.lsn, batch: d.batch, gap: d.gap.map(|g| (g.after_lsn, g.through_lsn)) })
                    .map_err(|e| BackendError::new(Code::ResourceExhausted, e.to_string()))
            })
            .boxed();
        let who = format!("peer {peer}, pattern {:?}", req.pattern);
        Ok(bounded_subscription(source, self.ctx.config.subscriber_queue_bytes(), who, self.ctx.metrics.clone()))
    }

    async fn trigger_exchange(&self, token: &str, acks: mkts_flight::AckStream) -> Result<KeyedBatchStream, BackendError> {
        let s = self.ctx.bus.trigger_streams().exchange(token, acks).await.map_err(|e| BackendError::new(Code::PermissionDenied, e))?;
        Ok(s.map(|(key, lsn, batch)| Delivered { key, lsn, batch, gap: None }).boxed())
    }

    fn check_readable(&self) -> Result<(), BackendError> {
        self.ctx.check_queryable().map_err(engine_status)
    }

    async fn list(&self) -> Result<Vec<BucketListing>, BackendError> {
        self.ctx.check_queryable().map_err(engine_status)?;
        let mut out = Vec::new();
        for k in self.ctx.engine.keys() {
            if let Ok(info) = self.ctx.engine.info(&k) {
                out.push(BucketListing { key: k.to_string(), schema: info.schema.arrow_schema(), rows: info.rows as i64 });
            }
        }
        Ok(out)
    }

    async fn action(&self, name: &str, body: &[u8]) -> Result<serde_json::Value, BackendError> {
        let engine = &self.ctx.engine;
        match name {
            "create" => {
                let c: CreateAction = serde_json::from_slice(body).map_err(|e| BackendError::invalid(format!("create: {e}")))?;
                let key = parse_key(&c.key)?;
                if c.column_names.len() != c.column_types.len() {
                    return Err(BackendError::invalid("create: column_names and column_types differ in length"));
                }
                let variable = c.is_variable_length || c.row_type.as_deref() == Some("variable");
                let mut columns = Vec::new();
                for (n, t) in c.column_names.iter().zip(&c.column_types) {
                    if n == "Epoch" || (variable && n == "Nanoseconds") {
                        continue;
                    }
                    columns.push(ColumnDef { name: n.clone(), ty: ColumnType::from_wire(t).map_err(engine_status)? });
                }
                let schema = BucketSchema { kind: if variable { RecordKind::Variable } else { RecordKind::Fixed }, columns };
                engine.create(&key, schema).await.map_err(engine_status)?;
                Ok(json!({ "created": key.to_string() }))
            }
            "destroy" => {
                let key = parse_key(&key_body(body).map_err(BackendError::invalid)?)?;
                engine.destroy(&key).await.map_err(engine_status)?;
                Ok(json!({ "destroyed": key.to_string() }))
            }
            "get_info" => {
                self.ctx.check_queryable().map_err(engine_status)?;
                let key = parse_key(&key_body(body).map_err(BackendError::invalid)?)?;
                let info = engine.info(&key).map_err(engine_status)?;
                let cols: Vec<_> = info.schema.columns.iter().map(|c| json!({"name": c.name, "type": c.ty.wire_name()})).collect();
                Ok(json!({
                    "key": info.key,
                    "timeframe": key.timeframe,
                    "timeframe_ns": key.tf().nominal_nanos(),
                    "is_variable_length": info.schema.kind == RecordKind::Variable,
                    "columns": cols,
                    "rows": info.rows,
                    "years": info.years,
                    "first_epoch": info.first_epoch,
                    "last_epoch": info.last_epoch,
                }))
            }
            "delete_range" => {
                let d: DeleteRangeAction = serde_json::from_slice(body).map_err(|e| BackendError::invalid(format!("delete_range: {e}")))?;
                let key = parse_key(&d.key)?;
                let start = TimePoint { secs: d.epoch_start, nanos: d.epoch_start_nanos.unwrap_or(0) as i32 };
                let end = TimePoint { secs: d.epoch_end, nanos: d.epoch_end_nanos.unwrap_or(999_999_999) as i32 };
                let n = engine.delete_range(&key, start, end).await.map_err(engine_status)?;
                Ok(json!({ "deleted": n }))
            }
            "list_symbols" => {
                let a: ListSymbolsAction = if body.iter().all(|b| b.is_ascii_whitespace()) {
                    ListSymbolsAction::default()
                } else {
                    serde_json::from_slice(body).map_err(|e| BackendError::invalid(format!("list_symbols: {e}")))?
                };
                self.ctx.check_queryable().map_err(engine_status)?;
                let keys = engine.keys();
                let list: Vec<String> = if a.format.as_deref() == Some("tbk") {
                    keys.iter().map(|k| k.to_string()).collect()
                } else {
                    let mut s: Vec<String> = keys.iter().map(|k| k.symbol.clone()).collect();
                    s.dedup();
                    s
                };
                Ok(json!(list))
            }
            "server_version" => Ok(json!({ "version": VERSION })),
            "plugins" => {
                use std::sync::atomic::Ordering::Relaxed;
                let list: Vec<serde_json::Value> = self
                    .ctx
                    .metrics
                    .plugins()
                    .iter()
                    .map(|p| {
                        json!({
                            "entry": p.entry, "role": p.role, "module": p.module, "kind": p.kind,
                            "up": p.up.load(Relaxed), "fired": p.fired.load(Relaxed), "dropped": p.dropped.load(Relaxed),
                            "queued": p.queued.as_ref().map(|q| q()), "errors": p.errors.load(Relaxed), "restarts": p.restarts.load(Relaxed),
                        })
                    })
                    .collect();
                Ok(json!({ "plugins": list }))
            }
            other => Err(BackendError::new(Code::Unimplemented, format!("unknown action {other:?}"))),
        }
    }

    async fn sql_bind_parameters(&self, handle: &[u8], params: Vec<RecordBatch>) -> Result<Vec<u8>, BackendError> {
        self.sql.bind_parameters(handle, params).map_err(status_to_backend)
    }

    async fn sql_prepared_update(&self, handle: &[u8], params: Vec<RecordBatch>) -> Result<i64, BackendError> {
        self.sql.execute_prepared_update(handle, params).await.map_err(status_to_backend)
    }

    async fn sql_update(&self, sql: &str) -> Result<i64, BackendError> {
        let (_, batches) = self.ctx.query.sql(sql).await.map_err(query_status)?;
        // DataFusion DML returns one row with a `count` column.
        let n = batches
            .first()
            .and_then(|b| b.column_by_name("count").cloned())
            .and_then(|c| arrow::compute::cast(&c, &DataType::Int64).ok())
            .and_then(|c| c.as_any().downcast_ref::<arrow::array::Int64Array>().map(|a| a.value(0)))
            .unwrap_or(-1);
        Ok(n)
    }
}
