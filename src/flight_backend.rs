//! The server side of the Flight contract: [`mkts_flight::FlightBackend`] over the operations layer.
//!
//! Each method decodes its ticket or action body into a request of [`crate::service`], calls the
//! operation as the call's caller (what the gRPC authentication layer verified, or anonymous without
//! `auth:`), and returns the result; errors map onto gRPC statuses in
//! [`crate::service::error`], nowhere else.

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use futures::stream::StreamExt;
use mkts_flight::ticket::{key_body, AddColumnAction, CreateAction, DeleteRangeAction, DropColumnAction, ListSymbolsAction};
use mkts_flight::{BackendError, BatchStream, BucketListing, Delivered, FlightBackend, KeyedBatchStream, QueryTicket, SubscribeRequest, SubscriptionStream};
use serde_json::json;
use tonic::Code;

use crate::context::{ServerContext, VERSION};
use crate::engine::{KeyPattern, RecordKind, SchemaChange, TimePoint};
use crate::flight_sql::FlightSqlHandler;
use crate::service::request::{nanos, parse_key};
use crate::service::{Access, Caller, CreateRequest, Interface, QueryRequest, ReadRequest, ServiceError, SymbolFormat, WriteRequest};

pub use crate::service::read::{with_symbol, SYMBOL_COLUMN, SYMBOL_SLICE_ROWS};

/// Flight backend over a running server's context.
pub struct EngineFlightBackend {
    pub ctx: Arc<ServerContext>,
    /// The Flight SQL handler, for parameter uploads that the Flight crate decodes itself.
    pub sql: Arc<FlightSqlHandler>,
}

/// The Flight and Flight SQL service as `mkts start` serves it, over `ctx`.
pub fn flight_service(ctx: &Arc<ServerContext>) -> mkts_flight::MktsFlightService<EngineFlightBackend, FlightSqlHandler> {
    let sql = Arc::new(FlightSqlHandler::new(ctx.clone()));
    let backend = Arc::new(EngineFlightBackend { ctx: ctx.clone(), sql: sql.clone() });
    mkts_flight::MktsFlightService::new(backend, sql)
}

fn err(e: ServiceError) -> BackendError {
    e.into()
}

/// The operations-layer query of a MarketStore QueryRequest-shaped ticket.
pub fn query_request(q: &QueryTicket) -> Result<QueryRequest, ServiceError> {
    if let Some(sql) = &q.sql {
        return Ok(QueryRequest::Sql(sql.clone()));
    }
    let dest = q.destination.as_deref().ok_or_else(|| ServiceError::invalid("missing destination"))?;
    let mut r = ReadRequest::parse(dest)?.check_key_category(q.key_category.as_deref())?;
    if let Some(s) = q.epoch_start {
        r = r.starting(s, q.epoch_start_nanos.unwrap_or(0))?;
    }
    if let Some(e) = q.epoch_end {
        r = r.ending(e, q.epoch_end_nanos.unwrap_or(0))?;
    }
    r = r.limited(q.limit_record_count.unwrap_or(0), q.limit_from_start.unwrap_or(false))?;
    r.columns = q.columns.clone();
    r.functions = q.functions.clone().unwrap_or_default();
    r.epoch_ns = q.epoch_ns.unwrap_or(false);
    Ok(QueryRequest::Read(r))
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

#[async_trait::async_trait]
impl FlightBackend for EngineFlightBackend {
    type Caller = Caller;

    fn caller(&self, extensions: &tonic::Extensions, sql: bool) -> Caller {
        Caller::of_request(if sql { Interface::FlightSql } else { Interface::Flight }, extensions)
    }

    async fn handshake(&self, caller: &Caller) -> Result<Option<String>, BackendError> {
        match (&self.ctx.auth, &caller.principal) {
            (Some(auth), Some(p)) => Ok(Some(auth.issue_token(p))),
            (Some(_), None) => Err(err(ServiceError::new(crate::service::ErrorCode::Unauthenticated, crate::service::UNAUTHENTICATED))),
            (None, _) => Ok(None),
        }
    }

    async fn query(&self, caller: &Caller, q: QueryTicket) -> Result<(SchemaRef, BatchStream), BackendError> {
        let svc = &self.ctx.service;
        let (schema, stream) = match query_request(&q).map_err(err)? {
            QueryRequest::Sql(sql) => svc.sql_stream(caller, &sql, None).await,
            QueryRequest::Read(r) => svc.read(caller, &r).await.and_then(|res| res.into_stream()),
        }
        .map_err(err)?;
        Ok((schema, stream.map(|r| r.map_err(err)).boxed()))
    }

    async fn describe(&self, caller: &Caller, q: QueryTicket) -> Result<(SchemaRef, Option<i64>), BackendError> {
        let svc = &self.ctx.service;
        match query_request(&q).map_err(err)? {
            // Planned, never run: describing a statement must neither execute it (a DELETE, an INSERT) nor
            // compute a result only to count it. The row count is unknown (-1 on the wire).
            QueryRequest::Sql(sql) => {
                let plan = svc.sql_plan(caller, &sql).await.map_err(err)?;
                Ok((Arc::new(plan.schema().as_arrow().clone()), None))
            }
            QueryRequest::Read(r) => {
                let res = svc.read(caller, &r).await.map_err(err)?;
                Ok((res.schema().map_err(err)?, Some(res.rows() as i64)))
            }
        }
    }

    async fn write(&self, caller: &Caller, key: &str, batch: RecordBatch) -> Result<usize, BackendError> {
        let w = WriteRequest::new(parse_key(key).map_err(err)?, batch);
        Ok(self.ctx.service.write(caller, &w).await.map_err(err)?.rows)
    }

    async fn submit_write(&self, caller: &Caller, key: &str, batch: RecordBatch) -> Result<mkts_flight::PendingAck, BackendError> {
        let w = WriteRequest::new(parse_key(key).map_err(err)?, batch);
        let pending = self.ctx.service.submit_write(caller, &w).await.map_err(err)?;
        Ok(Box::pin(async move { pending.await.map(|ack| ack.rows).map_err(err) }))
    }

    async fn subscribe(&self, caller: &Caller, req: SubscribeRequest, peer: &str) -> Result<SubscriptionStream, BackendError> {
        self.ctx.service.authorize(caller, Access::Read).map_err(err)?;
        let pat = KeyPattern::parse(&req.pattern).map_err(|e| err(e.into()))?;
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

    async fn trigger_exchange(&self, caller: &Caller, token: &str, acks: mkts_flight::AckStream) -> Result<KeyedBatchStream, BackendError> {
        // The ticket's secret names the trigger; with `auth:` the plugin also authenticated (its token).
        self.ctx.service.authorize_caller(caller, Access::Read).map_err(err)?;
        let s = self.ctx.bus.trigger_streams().exchange(token, acks).await.map_err(|e| BackendError::new(Code::PermissionDenied, e))?;
        Ok(s.map(|(key, lsn, batch)| Delivered { key, lsn, batch, gap: None }).boxed())
    }

    fn check_readable(&self, caller: &Caller) -> Result<(), BackendError> {
        self.ctx.service.authorize(caller, Access::Read).map_err(err)
    }

    async fn list(&self, caller: &Caller) -> Result<Vec<BucketListing>, BackendError> {
        let buckets = self.ctx.service.list_buckets(caller).map_err(err)?;
        Ok(buckets
            .into_iter()
            .map(|(k, info)| BucketListing {
                key: k.to_string(),
                schema: info.schema.arrow_schema(),
                rows: info.rows as i64,
                bytes: info.partitions.iter().map(|p| p.bytes).sum::<u64>().try_into().unwrap_or(i64::MAX),
                app_metadata: serde_json::to_vec(&json!({ "partitions": info.partitions })).unwrap_or_default(),
            })
            .collect())
    }

    async fn action(&self, caller: &Caller, name: &str, body: &[u8]) -> Result<serde_json::Value, BackendError> {
        self.run_action(caller, name, body).await.map_err(err)
    }

    async fn sql_bind_parameters(&self, caller: &Caller, handle: &[u8], params: Vec<RecordBatch>) -> Result<Vec<u8>, BackendError> {
        self.ctx.service.authorize(caller, Access::Read).map_err(err)?;
        self.sql.bind_parameters(handle, params).map_err(err)
    }

    async fn sql_prepared_update(&self, caller: &Caller, handle: &[u8], params: Vec<RecordBatch>) -> Result<i64, BackendError> {
        self.sql.execute_prepared_update(caller, handle, params).await.map_err(err)
    }

    async fn sql_update(&self, caller: &Caller, sql: &str) -> Result<i64, BackendError> {
        self.ctx.service.sql_update(caller, sql, None).await.map_err(err)
    }
}

/// A bucket's data columns as the actions report them: name, type (as `create` takes it) and nullability.
fn columns_json(schema: &crate::engine::BucketSchema) -> Vec<serde_json::Value> {
    schema
        .columns
        .iter()
        .map(|c| {
            let ty = c.type_name();
            json!({"name": c.name, "type": ty.strip_suffix('?').unwrap_or(&ty), "nullable": c.nullable})
        })
        .collect()
}

fn json_body<T: serde::de::DeserializeOwned>(action: &str, body: &[u8]) -> Result<T, ServiceError> {
    serde_json::from_slice(body).map_err(|e| ServiceError::invalid(format!("{action}: {e}")))
}

impl EngineFlightBackend {
    /// The plain actions (`mkts_flight::ACTIONS`).
    async fn run_action(&self, caller: &Caller, name: &str, body: &[u8]) -> Result<serde_json::Value, ServiceError> {
        let svc = &self.ctx.service;
        match name {
            "create" => {
                let c: CreateAction = json_body("create", body)?;
                let variable = c.is_variable_length || c.row_type.as_deref() == Some("variable");
                let req = CreateRequest::parse(&c.key, &c.column_names, &c.column_types, variable)?;
                svc.create(caller, &req).await?;
                Ok(json!({ "created": req.key.to_string() }))
            }
            "destroy" => {
                let key = parse_key(&key_body(body).map_err(ServiceError::invalid)?)?;
                svc.destroy(caller, &key).await?;
                Ok(json!({ "destroyed": key.to_string() }))
            }
            "get_info" => {
                let key = parse_key(&key_body(body).map_err(ServiceError::invalid)?)?;
                let info = svc.get_info(caller, &key)?;
                let cols = columns_json(&info.schema);
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
                    "partitions": info.partitions,
                }))
            }
            "delete_range" => {
                let d: DeleteRangeAction = json_body("delete_range", body)?;
                let key = parse_key(&d.key)?;
                let start = TimePoint { secs: d.epoch_start, nanos: nanos("epoch_start_nanos", d.epoch_start_nanos.unwrap_or(0))? };
                let end = TimePoint { secs: d.epoch_end, nanos: nanos("epoch_end_nanos", d.epoch_end_nanos.unwrap_or(999_999_999))? };
                let n = svc.delete_range(caller, &key, start, end).await?;
                Ok(json!({ "deleted": n }))
            }
            "add_column" => {
                let a: AddColumnAction = json_body("add_column", body)?;
                let key = parse_key(&a.key)?;
                let cols = crate::service::request::parse_columns(&a.column_names, &a.column_types, false)?.columns;
                let schema = svc.alter(caller, &key, SchemaChange::AddColumns(cols)).await?;
                Ok(json!({ "key": key.to_string(), "columns": columns_json(&schema) }))
            }
            "drop_column" => {
                let a: DropColumnAction = json_body("drop_column", body)?;
                let key = parse_key(&a.key)?;
                let schema = svc.alter(caller, &key, SchemaChange::DropColumns(a.column_names)).await?;
                Ok(json!({ "key": key.to_string(), "columns": columns_json(&schema) }))
            }
            "list_symbols" => {
                let a: ListSymbolsAction =
                    if body.iter().all(|b| b.is_ascii_whitespace()) { ListSymbolsAction::default() } else { json_body("list_symbols", body)? };
                let format = if a.format.as_deref() == Some("tbk") { SymbolFormat::Keys } else { SymbolFormat::Symbols };
                Ok(json!(svc.list_symbols(caller, format)?))
            }
            "server_version" => Ok(json!({ "version": VERSION })),
            "replication_status" => {
                svc.authorize(caller, Access::Read)?;
                Ok(self.ctx.replication.status_json(&self.ctx.engine))
            }
            "local_socket" => {
                svc.authorize(caller, Access::Read)?;
                match self.ctx.local_socket.get() {
                    // The store id lets a client check that the socket it reaches at this path belongs to
                    // this server (the same path on another host, or another root's, would not).
                    Some(p) => Ok(json!({ "path": p.display().to_string(), "store_id": self.ctx.engine.store_id() })),
                    None => Err(ServiceError::new(crate::service::ErrorCode::NotFound, "this server offers no same-host reads (local_socket is off or could not be bound)")),
                }
            }
            "plugins" => {
                svc.authorize(caller, Access::Read)?;
                let list: Vec<serde_json::Value> = self.ctx.metrics.plugins().iter().map(|p| p.summary()).collect();
                Ok(json!({ "plugins": list }))
            }
            other => Err(ServiceError::new(crate::service::ErrorCode::Unimplemented, format!("unknown action {other:?}"))),
        }
    }
}
