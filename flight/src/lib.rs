//! Arrow Flight and Flight SQL for mkts, served over a narrow backend trait.
//!
//! One gRPC service answers both protocols on the same port:
//! - **Plain Flight** (the contract in `docs/flight.md`): DoPut to a path descriptor writes a
//!   bucket; DoGet with a JSON `QueryRequest` ticket (MarketStore's field names) or a bare key reads one;
//!   GetFlightInfo / GetSchema / ListFlights describe buckets; DoAction runs `create`, `destroy`, `get_info`,
//!   `delete_range`, `list_symbols`, `server_version`, `plugins`, `replication_status`.
//! - **Flight SQL**: requests whose ticket or command is a protobuf `Any` of a Flight SQL message are handed
//!   to a [`FlightSqlService`] (the SQL engine's), except DoPut updates/ingests, which this crate decodes and
//!   passes to the backend (arrow-flight does not let a service re-wrap a consumed `Streaming`).
//!
//! The crate knows nothing about storage: [`FlightBackend`] is implemented by the server.
//!
//! ```ignore
//! let svc = mkts_flight::MktsFlightService::new(my_backend, my_flight_sql);
//! tonic::transport::Server::builder().add_service(svc.into_server(256 << 20, 256 << 20)).serve(addr).await?;
//! ```

pub mod ipc;
pub mod ticket;
pub mod wire;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{Any, Command, DoPutUpdateResult, ProstMessageExt, SqlInfo};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest,
    HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

pub use ticket::QueryTicket;

/// A backend failure with the gRPC code it maps to.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    pub code: tonic::Code,
    pub message: String,
}

impl BackendError {
    pub fn new(code: tonic::Code, message: impl Into<String>) -> Self {
        BackendError { code, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(tonic::Code::InvalidArgument, message)
    }
}

impl From<BackendError> for Status {
    fn from(e: BackendError) -> Status {
        let mut m = e.message;
        m.truncate(4000);
        Status::new(e.code, m)
    }
}

/// Tells a server's request layer that a call was Flight SQL. Plain Flight and Flight SQL share the
/// gRPC methods (DoGet, GetFlightInfo, DoPut, DoAction …); only the service, once it has decoded the
/// ticket or command, knows which one a call is. A layer that wants to tell them apart (per-interface
/// metrics) inserts a `FlightSqlCall` into the request's extensions and reads it when the call ends.
#[derive(Debug, Clone, Default)]
pub struct FlightSqlCall(Arc<AtomicBool>);

impl FlightSqlCall {
    /// True once the service handed the call to Flight SQL.
    pub fn is_sql(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Mark `request` as Flight SQL for a layer that asked ([`FlightSqlCall`]).
fn mark_sql<T>(request: &Request<T>) {
    if let Some(m) = request.extensions().get::<FlightSqlCall>() {
        m.0.store(true, Ordering::Relaxed);
    }
}

/// What a DoGet ticket answers (see [`MktsFlightService::do_get_reply`]).
pub(crate) enum DoGetReply {
    /// Stored data: the wire path frames these batches without copying their buffers.
    Stored(SchemaRef, BatchStream),
    /// Messages already made (Flight SQL results, subscriptions).
    Messages(Response<Bs<FlightData>>),
}

/// A stream of result batches.
pub type BatchStream = BoxStream<'static, Result<RecordBatch, BackendError>>;

/// One appended batch delivered to a subscription or a trigger exchange: the key it was written to, its
/// log position, and, on the first batch of a resume that could not be exact, the span it could not
/// replay. Sent as the batch's `app_metadata` `{"key": …, "lsn": …[, "gap": {"after_lsn", "through_lsn"}]}`.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub key: String,
    pub lsn: u64,
    pub batch: RecordBatch,
    /// `(after_lsn, through_lsn]`: appends no longer held when the subscription resumed.
    pub gap: Option<(u64, u64)>,
}

/// Delivered batches of a trigger exchange.
pub type KeyedBatchStream = BoxStream<'static, Delivered>;

/// A subscription's batches; an error ends it (e.g. `RESOURCE_EXHAUSTED` for a subscriber that fell too
/// far behind and was dropped).
pub type SubscriptionStream = BoxStream<'static, Result<Delivered, BackendError>>;

/// A `{"subscribe": pattern, "feed": …, "from_lsn": …}` ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeRequest {
    pub pattern: String,
    /// `None`/`"appends"`: every append, whole; `"stream"`: the `stream` trigger's pushes.
    pub feed: Option<String>,
    /// Resume after this log position.
    pub from_lsn: Option<u64>,
}

/// Acknowledgements of a trigger exchange: each item is a number of batches handled by the client.
pub type AckStream = BoxStream<'static, u64>;

/// A bucket as listed by ListFlights.
#[derive(Debug, Clone)]
pub struct BucketListing {
    pub key: String,
    pub schema: SchemaRef,
    pub rows: i64,
    /// Bytes stored, local and in object storage (`FlightInfo.total_bytes`).
    pub bytes: i64,
    /// JSON sent as the FlightInfo's `app_metadata` (mkts: `{"partitions": [{year, tier, rows, bytes}]}`).
    pub app_metadata: Vec<u8>,
}

/// The acknowledgement of a submitted write ([`FlightBackend::submit_write`]): rows stored, once durable.
pub type PendingAck = futures::future::BoxFuture<'static, Result<usize, BackendError>>;

/// Batches of one DoPut stream handed to the backend but not acknowledged yet, at most (the engine's
/// write queue bounds their bytes as well).
const PUT_IN_FLIGHT: usize = 256;

/// What the Flight service needs from the server. Implemented in `mkts` over the engine and SQL.
///
/// Every call is made on behalf of a [`FlightBackend::Caller`], which the backend builds from the gRPC
/// request's extensions (where the server's authentication layer put the identity it verified) before
/// anything else runs; the crate itself knows nothing about users.
#[async_trait::async_trait]
pub trait FlightBackend: Send + Sync + 'static {
    /// Who a call runs as.
    type Caller: Send + Sync + 'static;
    /// The caller of a request with these extensions; `sql` tells Flight SQL calls from plain Flight.
    fn caller(&self, extensions: &tonic::Extensions, sql: bool) -> Self::Caller;
    /// Answer a Flight handshake (the authentication layer has verified its credentials): a bearer
    /// token for later calls, sent back as the `authorization: Bearer …` header and as the payload.
    /// `None` (the default, for a server without authentication): an empty payload.
    async fn handshake(&self, caller: &Self::Caller) -> Result<Option<String>, BackendError> {
        let _ = caller;
        Ok(None)
    }
    /// Run a read, SQL or function ticket; batches stream lazily.
    async fn query(&self, caller: &Self::Caller, q: QueryTicket) -> Result<(SchemaRef, BatchStream), BackendError>;
    /// Schema and exact row count (if cheap) of what `query` would return.
    async fn describe(&self, caller: &Self::Caller, q: QueryTicket) -> Result<(SchemaRef, Option<i64>), BackendError>;
    /// Durably write one batch to `key`; returns rows stored once they are durable.
    async fn write(&self, caller: &Self::Caller, key: &str, batch: RecordBatch) -> Result<usize, BackendError>;
    /// [`FlightBackend::write`] in two steps, for a DoPut stream of many batches: check the batch and hand
    /// it on (writes submitted one after another are applied in that order), then the returned future
    /// gives the rows stored once they are durable. Batches submitted while earlier ones wait for their
    /// fsync may share the next one. The default writes fully before returning.
    async fn submit_write(&self, caller: &Self::Caller, key: &str, batch: RecordBatch) -> Result<PendingAck, BackendError> {
        let rows = self.write(caller, key, batch).await;
        Ok(Box::pin(futures::future::ready(rows)))
    }
    /// Appended batches of keys matching `req.pattern` (`*` per segment), until dropped. `peer` names the
    /// client (its address) for logs.
    async fn subscribe(&self, caller: &Self::Caller, req: SubscribeRequest, peer: &str) -> Result<SubscriptionStream, BackendError>;
    /// The queued appends of an out-of-process trigger identified by its secret `token` (DoExchange).
    /// `acks` yields, for each client message, how many delivered batches the client has handled; a batch
    /// not acknowledged when the exchange ends is delivered again on the next one. Every batch of one
    /// exchange has the same schema: it ends before an append of another schema, and the plugin opens the
    /// next (docs/plugins.md). At most one exchange per trigger at a time.
    async fn trigger_exchange(&self, caller: &Self::Caller, token: &str, acks: AckStream) -> Result<KeyedBatchStream, BackendError> {
        let _ = (caller, token, acks);
        Err(BackendError::new(tonic::Code::Unimplemented, "trigger streams are not supported"))
    }
    /// Whether reads are allowed at all (a server configured `queryable: false` says no). Checked before
    /// a Flight SQL read is handed to the SQL service; the backend's own read methods check it themselves.
    fn check_readable(&self, caller: &Self::Caller) -> Result<(), BackendError> {
        let _ = caller;
        Ok(())
    }
    /// Every bucket with schema and row count.
    async fn list(&self, caller: &Self::Caller) -> Result<Vec<BucketListing>, BackendError>;
    /// Run a plain action (`create`, `destroy`, ...); returns the JSON result body.
    async fn action(&self, caller: &Self::Caller, name: &str, body: &[u8]) -> Result<serde_json::Value, BackendError>;
    /// Execute a SQL statement that modifies data (Flight SQL `CommandStatementUpdate`); returns rows affected.
    async fn sql_update(&self, caller: &Self::Caller, sql: &str) -> Result<i64, BackendError>;
    /// Bind parameter rows to a prepared statement (Flight SQL DoPut `CommandPreparedStatementQuery`);
    /// returns the handle to use from now on.
    async fn sql_bind_parameters(&self, caller: &Self::Caller, handle: &[u8], params: Vec<RecordBatch>) -> Result<Vec<u8>, BackendError> {
        let _ = (caller, handle, params);
        Err(BackendError::new(tonic::Code::Unimplemented, "prepared statement parameters are not supported"))
    }
    /// Execute a prepared update with parameter rows (Flight SQL DoPut `CommandPreparedStatementUpdate`).
    async fn sql_prepared_update(&self, caller: &Self::Caller, handle: &[u8], params: Vec<RecordBatch>) -> Result<i64, BackendError> {
        let _ = (caller, handle, params);
        Err(BackendError::new(tonic::Code::Unimplemented, "prepared updates are not supported"))
    }
}

/// The plain actions, with descriptions for ListActions.
pub const ACTIONS: &[(&str, &str)] = &[
    ("create", "Create a bucket: {\"key\", \"column_names\", \"column_types\" (i1..u8, f4, f8, U16, b1), \"is_variable_length\"}"),
    ("destroy", "Destroy a bucket and its data: a bare key or {\"key\"}"),
    ("get_info", "Schema, record type, row count and time span of a bucket: a bare key or {\"key\"}"),
    ("delete_range", "Delete rows with epoch_start <= Epoch <= epoch_end (inclusive): {\"key\", \"epoch_start\", \"epoch_end\"}"),
    ("add_column", "Add nullable columns to a bucket (stored rows read as null): {\"key\", \"column_names\", \"column_types\"}"),
    ("drop_column", "Drop columns of a bucket with their data: {\"key\", \"column_names\"}"),
    ("list_symbols", "List symbols ({\"format\": \"symbol\"}, default) or full keys ({\"format\": \"tbk\"})"),
    ("server_version", "The server version"),
    ("replication_status", "Replication role and links: on a master each replica's acknowledged position, lag in records and ms, connected; on a replica its applied and master positions"),
    ("local_socket", "The Unix socket of same-host reads ({\"path\"}, absolute), or NOT_FOUND when the server has none; a client on the same machine maps the files of its reads (docs/local-reads.md)"),
    ("plugins", "Configured triggers and background workers with their state: up, fired, dropped, queued, errors, restarts"),
];

type Bs<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Largest FlightData message the server emits (rows of a batch are split to fit). Large enough that a
/// symbol-year of 1Min bars (~17 MB) travels as one batch: clients then hand pandas one contiguous array
/// instead of concatenating chunks; small enough to bound the per-message copy.
const MAX_FLIGHT_DATA: usize = 64 << 20;

/// A Flight SQL service that answers nothing (for servers without SQL, and tests).
#[derive(Debug, Clone, Default)]
pub struct NoSql;

#[tonic::async_trait]
impl FlightSqlService for NoSql {
    type FlightService = NoSql;
    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// The Flight service: plain contract + delegation of Flight SQL.
pub struct MktsFlightService<B: FlightBackend, S: FlightSqlService> {
    backend: Arc<B>,
    sql: Arc<S>,
    /// Target size of one emitted FlightData message (below the send limit).
    max_flight_data: usize,
}

impl<B: FlightBackend, S: FlightSqlService> Clone for MktsFlightService<B, S> {
    fn clone(&self) -> Self {
        MktsFlightService { backend: self.backend.clone(), sql: self.sql.clone(), max_flight_data: self.max_flight_data }
    }
}

/// tonic refuses an oversize message with `OUT_OF_RANGE`; gRPC-Go and its clients say
/// `RESOURCE_EXHAUSTED` for the same condition. Every other status is kept.
pub fn oversize_status(s: Status) -> Status {
    if s.code() == tonic::Code::OutOfRange && s.message().contains("message length too large") {
        Status::resource_exhausted(s.message().to_string())
    } else {
        s
    }
}

fn decode_error(e: FlightError) -> Status {
    match e {
        FlightError::Tonic(s) if s.code() == tonic::Code::OutOfRange => oversize_status(*s),
        other => Status::invalid_argument(format!("DoPut: cannot decode the stream: {other}")),
    }
}

const SQL_TYPE_PREFIX: &str = "type.googleapis.com/arrow.flight.protocol.sql.";

/// Decode a Flight SQL `Any`, if that is what `bytes` holds.
fn as_sql_any(bytes: &[u8]) -> Option<Any> {
    if bytes.first() == Some(&b'{') {
        return None;
    }
    let any = Any::decode(bytes).ok()?;
    any.type_url.starts_with(SQL_TYPE_PREFIX).then_some(any)
}

fn descriptor_ticket(d: &FlightDescriptor) -> Result<QueryTicket, Status> {
    if !d.path.is_empty() {
        let key = d.path.join("/");
        return Ok(QueryTicket { destination: Some(key), ..Default::default() });
    }
    QueryTicket::parse(&d.cmd).map_err(Status::invalid_argument)
}

fn descriptor_key(d: &FlightDescriptor) -> Result<String, Status> {
    if !d.path.is_empty() {
        return Ok(d.path.join("/"));
    }
    let t = QueryTicket::parse(&d.cmd).map_err(Status::invalid_argument)?;
    t.destination.ok_or_else(|| Status::invalid_argument("DoPut needs a path descriptor naming the bucket (SYMBOL/TIMEFRAME/ATTRGROUP)"))
}

impl<B: FlightBackend, S: FlightSqlService<FlightService = S>> MktsFlightService<B, S> {
    pub fn new(backend: Arc<B>, sql: Arc<S>) -> Self {
        MktsFlightService { backend, sql, max_flight_data: MAX_FLIGHT_DATA }
    }

    /// The tonic server for this service with these message limits (bytes): a larger incoming message
    /// is refused, outgoing batches are split to stay within half of `send_bytes`. Stored-data DoGet is
    /// framed by [`wire::FlightServer`] without copying column buffers; every other call goes to arrow-flight's
    /// generated server.
    pub fn into_server(mut self, recv_bytes: usize, send_bytes: usize) -> wire::FlightServer<B, S> {
        self.max_flight_data = MAX_FLIGHT_DATA.min(send_bytes / 2).max(1);
        let inner = FlightServiceServer::new(self.clone()).max_decoding_message_size(recv_bytes).max_encoding_message_size(send_bytes);
        wire::FlightServer::new(inner, self, recv_bytes, send_bytes)
    }

    fn encode(&self, schema: SchemaRef, batches: BatchStream) -> Bs<FlightData> {
        let s = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .with_max_flight_data_size(self.max_flight_data)
            .build(batches.map_err(|e| FlightError::Tonic(Box::new(Status::from(e)))))
            .map_err(Status::from);
        Box::pin(s)
    }

    /// Answer a DoGet ticket: stored data as its schema and batches, everything else (Flight SQL,
    /// subscriptions) as finished messages.
    pub(crate) async fn do_get_reply(&self, request: Request<Ticket>) -> Result<DoGetReply, Status> {
        if as_sql_any(&request.get_ref().ticket).is_some() {
            mark_sql(&request);
            self.backend.check_readable(&self.backend.caller(request.extensions(), true))?;
            return Ok(DoGetReply::Messages(FlightService::do_get(self.sql.as_ref(), request).await?));
        }
        let q = QueryTicket::parse(&request.get_ref().ticket).map_err(Status::invalid_argument)?;
        let caller = self.backend.caller(request.extensions(), false);
        if let Some(pattern) = &q.subscribe {
            let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "unknown".into());
            let req = SubscribeRequest { pattern: pattern.clone(), feed: q.feed.clone(), from_lsn: q.from_lsn };
            let s = self.backend.subscribe(&caller, req, &peer).await?;
            return Ok(DoGetReply::Messages(Response::new(Self::subscription_stream(s))));
        }
        if q.trigger.is_some() {
            return Err(Status::invalid_argument("a trigger ticket is opened with DoExchange, acknowledging each batch (docs/plugins.md)"));
        }
        let (schema, batches) = self.backend.query(&caller, q).await?;
        Ok(DoGetReply::Stored(schema, batches))
    }

    async fn flight_info(&self, caller: &B::Caller, desc: FlightDescriptor) -> Result<FlightInfo, Status> {
        let q = descriptor_ticket(&desc)?;
        if q.subscribe.is_some() || q.trigger.is_some() {
            return Err(Status::invalid_argument("subscriptions have no FlightInfo; DoGet the ticket directly"));
        }
        let (schema, rows) = self.backend.describe(caller, q.clone()).await?;
        let ticket = serde_json::to_vec(&q).map_err(|e| Status::internal(e.to_string()))?;
        let info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_descriptor(desc)
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
            .with_total_records(rows.unwrap_or(-1))
            .with_ordered(true);
        Ok(info)
    }

    /// A subscription or trigger exchange as Flight data: one schema message, then each batch with
    /// `{"key", "lsn"[, "gap"]}` in its `app_metadata`. An IPC stream has one schema, so a batch of another
    /// schema ends the *segment*: a metadata-only message `{"end": "schema_change", "key": …,
    /// "from_lsn": <last lsn sent>}` is sent and the stream ends without error; the client subscribes again
    /// with that `from_lsn` and the new segment starts with the batch that did not fit.
    fn subscription_stream(stream: SubscriptionStream) -> Bs<FlightData> {
        let mut schema: Option<SchemaRef> = None;
        let mut last_lsn: Option<u64> = None;
        let mut ended = false;
        let s = stream.map(move |item| {
            let mut out: Vec<Result<FlightData, Status>> = Vec::new();
            if ended {
                return (true, out);
            }
            let d = match item {
                Ok(d) => d,
                Err(e) => {
                    ended = true;
                    out.push(Err(Status::from(e)));
                    return (true, out);
                }
            };
            match &schema {
                None => {
                    let opts = arrow::ipc::writer::IpcWriteOptions::default();
                    out.push(Ok(SchemaAsIpc::new(d.batch.schema().as_ref(), &opts).into()));
                    schema = Some(d.batch.schema());
                }
                Some(s) if s.fields() != d.batch.schema().fields() => {
                    ended = true;
                    let mut end = serde_json::json!({ "end": "schema_change", "key": d.key });
                    if let Some(l) = last_lsn {
                        end["from_lsn"] = l.into();
                    }
                    out.push(Ok(FlightData { app_metadata: Bytes::from(end.to_string()), ..Default::default() }));
                    return (true, out);
                }
                Some(_) => {}
            }
            let mut meta = serde_json::json!({ "key": d.key, "lsn": d.lsn });
            if let Some((after, through)) = d.gap {
                meta["gap"] = serde_json::json!({ "after_lsn": after, "through_lsn": through });
            }
            last_lsn = Some(d.lsn);
            match arrow_flight::utils::batches_to_flight_data(d.batch.schema().as_ref(), vec![d.batch]) {
                Ok(mut fds) => {
                    fds.remove(0); // the schema message, sent once above
                    if let Some(last) = fds.last_mut() {
                        last.app_metadata = Bytes::from(meta.to_string());
                    }
                    out.extend(fds.into_iter().map(Ok));
                }
                Err(e) => {
                    ended = true;
                    out.push(Err(Status::internal(e.to_string())));
                }
            }
            (ended, out)
        });
        // Send each item's messages; stop after the one that ended the stream.
        let s = futures::stream::unfold((s.boxed(), false), |(mut s, done)| async move {
            if done {
                return None;
            }
            let (end, out) = s.next().await?;
            Some((futures::stream::iter(out), (s, end)))
        })
        .flatten();
        Box::pin(s)
    }

    async fn plain_do_put(&self, caller: B::Caller, first: FlightData, rest: Streaming<FlightData>) -> Result<Response<Bs<PutResult>>, Status> {
        let desc = first.flight_descriptor.clone().ok_or_else(|| Status::invalid_argument("DoPut: the first message needs a flight descriptor"))?;
        let key = descriptor_key(&desc)?;
        let input = futures::stream::once(async { Ok(first) }).chain(rest.map_err(FlightError::from));
        let batches = Box::pin(ipc::guard(arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(input)).peekable());
        let (backend, caller, key) = (self.backend.clone(), Arc::new(caller), Arc::new(key));
        // Batches are handed to the backend as they arrive, in order, without waiting for the previous
        // one's fsync, so a stream of appends shares fsyncs (group commit); one PutResult per batch, in
        // order, each sent once that batch is durable. A batch with nothing before it unacknowledged and
        // nothing after it received yet (a per-call append, or a stream's pause) is written with
        // `FlightBackend::write`, which may commit it without a queue. After a refused batch the ones
        // before it are still acknowledged, then the error ends the call; nothing after it is written.
        // The loop runs inside the response stream itself (no task of its own): tonic polls it as it sends,
        // so an acknowledgement is produced and written without a hand-off between tasks.
        let state = PutLoop { batches, in_flight: futures::stream::FuturesOrdered::new(), refused: None, input_done: false, ended: false };
        let out = futures::stream::unfold(state, move |mut st| {
            let (backend, caller, key) = (backend.clone(), caller.clone(), key.clone());
            async move {
                if st.ended {
                    return None;
                }
                loop {
                    let batch = tokio::select! {
                        biased;
                        Some(r) = st.in_flight.next(), if !st.in_flight.is_empty() => {
                            let r = put_ack(r);
                            st.ended = r.is_err();
                            return Some((r, st));
                        }
                        b = st.batches.next(), if !st.input_done && st.refused.is_none() && st.in_flight.len() < PUT_IN_FLIGHT => match b {
                            None => {
                                st.input_done = true;
                                continue;
                            }
                            Some(Err(e)) => {
                                st.refused = Some(decode_error(e));
                                continue;
                            }
                            Some(Ok(batch)) => batch,
                        },
                        else => break,
                    };
                    let alone = st.in_flight.is_empty() && !matches!(futures::poll!(st.batches.as_mut().peek()), std::task::Poll::Ready(Some(_)));
                    if alone {
                        let r = backend.write(&caller, key.as_str(), batch).await;
                        st.in_flight.push_back(Box::pin(futures::future::ready(r)) as PendingAck);
                    } else {
                        match backend.submit_write(&caller, key.as_str(), batch).await {
                            Ok(pending) => st.in_flight.push_back(pending),
                            Err(e) => st.refused = Some(Status::from(e)),
                        }
                    }
                }
                st.ended = true;
                st.refused.take().map(|e| (Err(e), st))
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn sql_do_put(&self, caller: &B::Caller, cmd: Command, _rest: Streaming<FlightData>) -> Result<Response<Bs<PutResult>>, Status> {
        let count = match cmd {
            Command::CommandStatementUpdate(u) => self.backend.sql_update(caller, &u.query).await?,
            other => {
                return Err(Status::unimplemented(format!("DoPut: {} is not supported", other.type_url())));
            }
        };
        let result = DoPutUpdateResult { record_count: count };
        let put = PutResult { app_metadata: result.encode_to_vec().into() };
        Ok(Response::new(Box::pin(futures::stream::iter(vec![Ok(put)]))))
    }

}

/// The state of one DoPut's write loop ([`MktsFlightService::plain_do_put`]).
struct PutLoop<S: futures::Stream> {
    batches: Pin<Box<futures::stream::Peekable<S>>>,
    in_flight: futures::stream::FuturesOrdered<PendingAck>,
    refused: Option<Status>,
    input_done: bool,
    ended: bool,
}

/// The PutResult of one acknowledged batch.
fn put_ack(r: Result<usize, BackendError>) -> Result<PutResult, Status> {
    r.map(|n| PutResult { app_metadata: Bytes::from(format!("{{\"rows\":{n}}}")) }).map_err(Status::from)
}

/// `{"ack": n}` in a client message's app_metadata.
fn parse_ack(meta: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(meta).ok()?.get("ack")?.as_u64()
}

fn json_result(v: serde_json::Value) -> arrow_flight::Result {
    arrow_flight::Result { body: Bytes::from(v.to_string()) }
}

#[tonic::async_trait]
impl<B: FlightBackend, S: FlightSqlService<FlightService = S>> FlightService for MktsFlightService<B, S> {
    type HandshakeStream = Bs<HandshakeResponse>;
    type ListFlightsStream = Bs<FlightInfo>;
    type DoGetStream = Bs<FlightData>;
    type DoPutStream = Bs<PutResult>;
    type DoActionStream = Bs<arrow_flight::Result>;
    type ListActionsStream = Bs<ActionType>;
    type DoExchangeStream = Bs<FlightData>;

    async fn handshake(&self, request: Request<Streaming<HandshakeRequest>>) -> Result<Response<Self::HandshakeStream>, Status> {
        let caller = self.backend.caller(request.extensions(), false);
        let token = self.backend.handshake(&caller).await?;
        let payload = token.as_ref().map(|t| Bytes::from(t.clone())).unwrap_or_default();
        // Answer each handshake message with the token (or nothing, without authentication); the token
        // also travels as the `authorization` response header, where pyarrow and ADBC look for it.
        let s = request.into_inner().map_ok(move |h| HandshakeResponse { protocol_version: h.protocol_version, payload: payload.clone() });
        let mut response = Response::new(Box::pin(s) as Self::HandshakeStream);
        if let Some(t) = token {
            let value: tonic::metadata::AsciiMetadataValue = format!("Bearer {t}").parse().map_err(|_| Status::internal("token is not a valid header value"))?;
            response.metadata_mut().insert("authorization", value);
        }
        Ok(response)
    }

    async fn list_flights(&self, request: Request<Criteria>) -> Result<Response<Self::ListFlightsStream>, Status> {
        let caller = self.backend.caller(request.extensions(), false);
        let list = self.backend.list(&caller).await?;
        let infos: Vec<Result<FlightInfo, Status>> = list
            .into_iter()
            .map(|b| {
                let ticket = Ticket::new(b.key.clone());
                FlightInfo::new()
                    .try_with_schema(&b.schema)
                    .map(|i| {
                        i.with_descriptor(FlightDescriptor::new_path(vec![b.key.clone()]))
                            .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
                            .with_total_records(b.rows)
                            .with_total_bytes(b.bytes)
                            .with_app_metadata(b.app_metadata.clone())
                            .with_ordered(true)
                    })
                    .map_err(|e| Status::internal(e.to_string()))
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(infos))))
    }

    async fn get_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        if as_sql_any(&request.get_ref().cmd).is_some() {
            mark_sql(&request);
            self.backend.check_readable(&self.backend.caller(request.extensions(), true))?;
            return FlightService::get_flight_info(self.sql.as_ref(), request).await;
        }
        let caller = self.backend.caller(request.extensions(), false);
        let info = self.flight_info(&caller, request.into_inner()).await?;
        Ok(Response::new(info))
    }

    async fn poll_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<PollInfo>, Status> {
        if as_sql_any(&request.get_ref().cmd).is_some() {
            mark_sql(&request);
            self.backend.check_readable(&self.backend.caller(request.extensions(), true))?;
            return FlightService::poll_flight_info(self.sql.as_ref(), request).await;
        }
        let caller = self.backend.caller(request.extensions(), false);
        let info = self.flight_info(&caller, request.into_inner()).await?;
        Ok(Response::new(PollInfo { info: Some(info), flight_descriptor: None, progress: Some(1.0), expiration_time: None }))
    }

    async fn get_schema(&self, request: Request<FlightDescriptor>) -> Result<Response<SchemaResult>, Status> {
        if as_sql_any(&request.get_ref().cmd).is_some() {
            mark_sql(&request);
            self.backend.check_readable(&self.backend.caller(request.extensions(), true))?;
            return FlightService::get_schema(self.sql.as_ref(), request).await;
        }
        let q = descriptor_ticket(request.get_ref())?;
        let caller = self.backend.caller(request.extensions(), false);
        let (schema, _) = self.backend.describe(&caller, q).await?;
        let opts = arrow::ipc::writer::IpcWriteOptions::default();
        let r: SchemaResult = SchemaAsIpc::new(schema.as_ref(), &opts)
            .try_into()
            .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
        Ok(Response::new(r))
    }

    /// Tonic's path (prost-encoded messages) for what [`wire::FlightServer`] does not frame itself: a
    /// compressed request, or a caller of the trait (the fuzzer).
    async fn do_get(&self, request: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        match self.do_get_reply(request).await? {
            DoGetReply::Stored(schema, batches) => Ok(Response::new(self.encode(schema, batches))),
            DoGetReply::Messages(m) => Ok(m),
        }
    }

    async fn do_put(&self, request: Request<Streaming<FlightData>>) -> Result<Response<Self::DoPutStream>, Status> {
        let marker = request.extensions().get::<FlightSqlCall>().cloned();
        let plain_caller = self.backend.caller(request.extensions(), false);
        let sql_caller = self.backend.caller(request.extensions(), true);
        let mut stream = request.into_inner();
        let first = match stream.message().await.map_err(oversize_status)? {
            Some(f) => f,
            None => return Err(Status::invalid_argument("DoPut: empty stream")),
        };
        let sql_cmd = first.flight_descriptor.as_ref().and_then(|d| as_sql_any(&d.cmd));
        match sql_cmd {
            Some(any) => {
                if let Some(m) = marker {
                    m.0.store(true, Ordering::Relaxed);
                }
                let cmd = Command::try_from(any).map_err(|e| Status::invalid_argument(e.to_string()))?;
                // The first message of an update carries only the descriptor; of an ingest or a parameter
                // upload, also the schema.
                if matches!(
                    cmd,
                    Command::CommandStatementIngest(_) | Command::CommandPreparedStatementQuery(_) | Command::CommandPreparedStatementUpdate(_)
                ) {
                    let rest = stream;
                    let first_only = first;
                    return self.sql_do_put_with_first(&sql_caller, cmd, first_only, rest).await;
                }
                self.sql_do_put(&sql_caller, cmd, stream).await
            }
            None => self.plain_do_put(plain_caller, first, stream).await,
        }
    }

    /// DoExchange serves out-of-process triggers: the descriptor command is the trigger's ticket
    /// (`{"trigger": secret}`), the server streams its appends, the client answers each handled batch with a
    /// message whose `app_metadata` is `{"ack": n}`.
    async fn do_exchange(&self, request: Request<Streaming<FlightData>>) -> Result<Response<Self::DoExchangeStream>, Status> {
        let caller = self.backend.caller(request.extensions(), false);
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("DoExchange: empty stream"))?;
        let desc = first.flight_descriptor.as_ref().ok_or_else(|| Status::invalid_argument("DoExchange: the first message needs a flight descriptor"))?;
        let q = QueryTicket::parse(&desc.cmd).map_err(Status::invalid_argument)?;
        let token = q.trigger.ok_or_else(|| {
            Status::invalid_argument("DoExchange serves trigger streams only: the descriptor command is the trigger's ticket {\"trigger\": …}")
        })?;
        let first_ack = parse_ack(&first.app_metadata);
        // A client error or half-close ends the acknowledgements, and with them the exchange.
        let rest = stream.take_while(|m| futures::future::ready(m.is_ok())).filter_map(|m| futures::future::ready(m.ok().and_then(|m| parse_ack(&m.app_metadata))));
        let acks = futures::stream::iter(first_ack).chain(rest).boxed();
        let s = self.backend.trigger_exchange(&caller, &token, acks).await?;
        Ok(Response::new(Self::subscription_stream(s.map(Ok).boxed())))
    }

    async fn do_action(&self, request: Request<Action>) -> Result<Response<Self::DoActionStream>, Status> {
        let name = request.get_ref().r#type.clone();
        if !ACTIONS.iter().any(|(n, _)| *n == name) {
            mark_sql(&request);
            return FlightService::do_action(self.sql.as_ref(), request).await;
        }
        let caller = self.backend.caller(request.extensions(), false);
        let v = self.backend.action(&caller, &name, &request.get_ref().body).await?;
        Ok(Response::new(Box::pin(futures::stream::iter(vec![Ok(json_result(v))]))))
    }

    async fn list_actions(&self, request: Request<Empty>) -> Result<Response<Self::ListActionsStream>, Status> {
        let mut all: Vec<Result<ActionType, Status>> = ACTIONS
            .iter()
            .map(|(n, d)| Ok(ActionType { r#type: n.to_string(), description: d.to_string() }))
            .collect();
        if let Ok(resp) = FlightService::list_actions(self.sql.as_ref(), request).await {
            let sql: Vec<Result<ActionType, Status>> = resp.into_inner().collect().await;
            all.extend(sql);
        }
        Ok(Response::new(Box::pin(futures::stream::iter(all))))
    }
}

impl<B: FlightBackend, S: FlightSqlService<FlightService = S>> MktsFlightService<B, S> {
    async fn sql_do_put_with_first(&self, caller: &B::Caller, cmd: Command, first: FlightData, rest: Streaming<FlightData>) -> Result<Response<Bs<PutResult>>, Status> {
        let input = futures::stream::once(async { Ok(first) }).chain(rest.map_err(FlightError::from));
        let mut batches = ipc::guard(arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(input));
        let put = match cmd {
            Command::CommandStatementIngest(ingest) => {
                let key = ingest.table.clone();
                let mut total = 0i64;
                while let Some(b) = batches.next().await {
                    let b = b.map_err(decode_error)?;
                    if b.num_rows() == 0 {
                        continue;
                    }
                    total += self.backend.write(caller, &key, b).await? as i64;
                }
                PutResult { app_metadata: DoPutUpdateResult { record_count: total }.encode_to_vec().into() }
            }
            Command::CommandPreparedStatementQuery(q) => {
                let params: Vec<RecordBatch> = batches.try_collect().await.map_err(|e| Status::invalid_argument(e.to_string()))?;
                let handle = self.backend.sql_bind_parameters(caller, &q.prepared_statement_handle, params).await?;
                let r = arrow_flight::sql::DoPutPreparedStatementResult { prepared_statement_handle: Some(handle.into()) };
                PutResult { app_metadata: r.encode_to_vec().into() }
            }
            Command::CommandPreparedStatementUpdate(u) => {
                let params: Vec<RecordBatch> = batches.try_collect().await.map_err(|e| Status::invalid_argument(e.to_string()))?;
                let n = self.backend.sql_prepared_update(caller, &u.prepared_statement_handle, params).await?;
                PutResult { app_metadata: DoPutUpdateResult { record_count: n }.encode_to_vec().into() }
            }
            other => return Err(Status::unimplemented(format!("DoPut: {} is not supported", other.type_url()))),
        };
        Ok(Response::new(Box::pin(futures::stream::iter(vec![Ok(put)]))))
    }
}

/// Shorthand used by the server: a Flight SQL `Any` for a message (re-exported for tests).
pub fn sql_any<M: ProstMessageExt>(m: &M) -> Any {
    m.as_any()
}
