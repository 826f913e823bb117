//! Arrow Flight SQL over the operations layer: statements, prepared statements (with `$1` parameters),
//! updates (`INSERT INTO "KEY" SELECT ...`), and the metadata calls (GetCatalogs, GetDbSchemas, GetTables,
//! GetTableTypes, GetSqlInfo) that ADBC and JDBC drivers need. Every statement runs through
//! [`crate::service::Service`] as the request's caller (authenticated when `auth:` is configured).
//!
//! DoPut is not served here: the server's Flight service (`mkts_flight::MktsFlightService`) takes every
//! DoPut stream itself and hands Flight SQL updates, bulk ingest and parameter uploads to the Flight
//! backend ([`crate::flight_backend`]), which calls [`FlightSqlHandler::bind_parameters`] and
//! [`FlightSqlHandler::execute_prepared_update`] here and the operations layer for the rest.
//!
//! The handler is stateless for statements (the ticket carries the SQL text, re-planned on DoGet) and keeps
//! prepared statements in memory until closed, at most [`MAX_PREPARED`] of them holding at most
//! [`MAX_PREPARED_PARAM_BYTES`] of bound parameters: past either bound the least recently used statements
//! are closed (a client that later uses one gets a clear "unknown prepared statement handle"). It implements [`FlightSqlService`], so it is itself a Flight
//! service (the blanket impl); the server's Flight service hands every Flight SQL request to it.
//!
//! ```ignore
//! let flight = mkts::flight_backend::flight_service(&ctx); // MktsFlightService over the backend and this handler
//! ```

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandPreparedStatementQuery, CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, IpcMessage, SchemaAsIpc, Ticket};
use datafusion::common::ParamValues;
use datafusion::scalar::ScalarValue;
use futures::stream::{Stream, StreamExt, TryStreamExt};
use parking_lot::Mutex;
use prost::Message;
use tonic::{Request, Response, Status};

use crate::context::{ServerContext, VERSION};
use crate::query::catalog::{CATALOG, SCHEMA};
use crate::service::{Caller, ErrorCode, Interface, ServiceError, SqlStream};

type DoGetStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

/// A prepared statement: its SQL and the parameter rows bound by the last DoPut.
#[derive(Debug, Clone)]
struct Prepared {
    sql: String,
    params: Option<RecordBatch>,
}

/// Open prepared statements kept per server; creating one more closes the least recently used.
pub const MAX_PREPARED: usize = 1024;
/// Bytes of bound parameters kept over all open prepared statements (least recently used closed beyond).
pub const MAX_PREPARED_PARAM_BYTES: usize = 256 << 20;

const UNKNOWN_HANDLE: &str = "unknown prepared statement handle (closed, closed as least recently used past the server's limit of open statements, or the server restarted)";

/// Open prepared statements, bounded by count and by bound-parameter bytes; least recently used go first.
#[derive(Debug)]
struct PreparedCache {
    map: HashMap<Vec<u8>, PreparedEntry>,
    tick: u64,
    param_bytes: usize,
    max_count: usize,
    max_bytes: usize,
}

#[derive(Debug)]
struct PreparedEntry {
    p: Prepared,
    used: u64,
    bytes: usize,
}

impl PreparedCache {
    fn new(max_count: usize, max_bytes: usize) -> Self {
        PreparedCache { map: HashMap::new(), tick: 0, param_bytes: 0, max_count: max_count.max(1), max_bytes, }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Close the least recently used statement other than `keep`; false when there is none.
    fn evict_one(&mut self, keep: Option<&[u8]>) -> bool {
        let victim = self.map.iter().filter(|(h, _)| Some(h.as_slice()) != keep).min_by_key(|(_, e)| e.used).map(|(h, _)| h.clone());
        match victim {
            Some(h) => {
                self.remove(&h);
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, handle: Vec<u8>, p: Prepared) {
        while self.map.len() >= self.max_count && self.evict_one(None) {}
        let used = self.touch();
        if let Some(old) = self.map.insert(handle, PreparedEntry { p, used, bytes: 0 }) {
            self.param_bytes -= old.bytes;
        }
    }

    fn get(&mut self, handle: &[u8]) -> Option<Prepared> {
        let used = self.touch();
        let e = self.map.get_mut(handle)?;
        e.used = used;
        Some(e.p.clone())
    }

    /// Replace the bound parameters of a statement, closing other statements if the byte budget needs it.
    fn bind(&mut self, handle: &[u8], params: Option<RecordBatch>) -> Result<(), ServiceError> {
        let bytes = params.as_ref().map_or(0, |b| b.get_array_memory_size());
        if bytes > self.max_bytes {
            return Err(ServiceError::new(
                ErrorCode::ResourceExhausted,
                format!("bound parameters of {bytes} bytes exceed the server's limit of {} bytes for prepared statements", self.max_bytes),
            ));
        }
        let old = self.map.get(handle).map(|e| e.bytes).ok_or_else(|| ServiceError::not_found(UNKNOWN_HANDLE))?;
        self.param_bytes -= old;
        if let Some(e) = self.map.get_mut(handle) {
            e.bytes = 0;
        }
        while self.param_bytes + bytes > self.max_bytes && self.evict_one(Some(handle)) {}
        let used = self.touch();
        if let Some(e) = self.map.get_mut(handle) {
            e.p.params = params;
            e.bytes = bytes;
            e.used = used;
            self.param_bytes += bytes;
        }
        Ok(())
    }

    fn remove(&mut self, handle: &[u8]) {
        if let Some(e) = self.map.remove(handle) {
            self.param_bytes -= e.bytes;
        }
    }
}

/// The Flight SQL service of the server.
pub struct FlightSqlHandler {
    ctx: Arc<ServerContext>,
    prepared: Mutex<PreparedCache>,
    next_id: AtomicU64,
    info: SqlInfoData,
}

impl std::fmt::Debug for FlightSqlHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightSqlHandler").field("prepared", &self.prepared.lock().len()).finish()
    }
}

/// Who a Flight SQL call runs as: what the gRPC authentication layer verified, or anonymous.
fn caller(extensions: &tonic::Extensions) -> Caller {
    Caller::of_request(Interface::FlightSql, extensions)
}

fn status(e: ServiceError) -> Status {
    e.into()
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn schema_bytes(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let msg: IpcMessage = SchemaAsIpc::new(schema, &IpcWriteOptions::default()).try_into().map_err(internal)?;
    Ok(msg.0)
}

/// Encode a schema and a batch stream as Flight data (the schema is sent even for empty results).
fn encode(schema: SchemaRef, batches: SqlStream) -> DoGetStream {
    let s = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .with_max_flight_data_size(4 << 20)
        .build(batches.map_err(|e| FlightError::Tonic(Box::new(status(e)))))
        .map_err(Status::from);
    Box::pin(s)
}

fn one_batch(batch: RecordBatch) -> DoGetStream {
    let schema = batch.schema();
    encode(schema, futures::stream::iter(vec![Ok(batch)]).boxed())
}

/// The scalars of one parameter row.
fn param_row(batch: &RecordBatch, row: usize) -> Result<ParamValues, ServiceError> {
    let mut v = Vec::with_capacity(batch.num_columns());
    for c in batch.columns() {
        v.push(ScalarValue::try_from_array(c, row).map_err(|e| ServiceError::invalid(e.to_string()))?);
    }
    Ok(ParamValues::List(v.into_iter().map(Into::into).collect()))
}

impl FlightSqlHandler {
    /// A handler over a running server's SQL engine.
    pub fn new(ctx: Arc<ServerContext>) -> Self {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "mkts");
        b.append(SqlInfo::FlightSqlServerVersion, VERSION);
        b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        b.append(SqlInfo::FlightSqlServerReadOnly, false);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        b.append(SqlInfo::FlightSqlServerCancel, false);
        b.append(SqlInfo::FlightSqlServerBulkIngestion, true);
        b.append(SqlInfo::FlightSqlServerIngestTransactionsSupported, false);
        b.append(SqlInfo::FlightSqlServerStatementTimeout, 0i32);
        b.append(SqlInfo::FlightSqlServerTransactionTimeout, 0i32);
        b.append(SqlInfo::SqlDdlCatalog, false);
        b.append(SqlInfo::SqlDdlSchema, false);
        b.append(SqlInfo::SqlDdlTable, false);
        b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        b.append(SqlInfo::SqlIdentifierCase, 3i32); // SQL_CASE_SENSITIVITY_CASE_SENSITIVE... (see SqlSupportedCaseSensitivity)
        b.append(SqlInfo::SqlQuotedIdentifierCase, 3i32);
        let info = b.build().unwrap_or_else(|_| SqlInfoDataBuilder::new().build().expect("empty SqlInfo builds"));
        FlightSqlHandler { ctx, prepared: Mutex::new(PreparedCache::new(MAX_PREPARED, MAX_PREPARED_PARAM_BYTES)), next_id: AtomicU64::new(1), info }
    }

    fn lookup(&self, handle: &[u8]) -> Result<Prepared, ServiceError> {
        self.prepared.lock().get(handle).ok_or_else(|| ServiceError::not_found(UNKNOWN_HANDLE))
    }

    /// Result schema of a statement, without running it.
    async fn plan_schema(&self, caller: &Caller, sql: &str) -> Result<Schema, Status> {
        let plan = self.ctx.service.sql_plan(caller, sql).await.map_err(status)?;
        Ok(result_schema(&plan))
    }

    fn info_for(&self, schema: &Schema, ticket: Vec<u8>, desc: FlightDescriptor) -> Result<Response<FlightInfo>, Status> {
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(internal)?
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
            .with_descriptor(desc)
            .with_total_records(-1)
            .with_ordered(true);
        Ok(Response::new(info))
    }

    /// Run a statement with optional parameters and stream its result.
    async fn run(&self, caller: &Caller, sql: &str, params: Option<ParamValues>) -> Result<DoGetStream, Status> {
        let (schema, stream) = self.ctx.service.sql_stream(caller, sql, params).await.map_err(status)?;
        Ok(encode(schema, stream))
    }

    /// Run a DML statement once per parameter row (or once without parameters); returns rows affected.
    async fn run_update(&self, caller: &Caller, sql: &str, params: Option<&RecordBatch>) -> Result<i64, ServiceError> {
        let rows: Vec<Option<ParamValues>> = match params {
            Some(b) if b.num_columns() > 0 => (0..b.num_rows()).map(|r| param_row(b, r).map(Some)).collect::<Result<_, _>>()?,
            _ => vec![None],
        };
        let mut total = 0;
        for p in rows {
            total += self.ctx.service.sql_update(caller, sql, p).await?.max(0);
        }
        Ok(total)
    }

    /// Bind parameter rows to a prepared statement (Flight SQL DoPut `CommandPreparedStatementQuery`);
    /// returns the handle to use from now on. Public so a Flight front end that has already consumed the
    /// DoPut stream can call it with the decoded batches.
    pub fn bind_parameters(&self, handle: &[u8], batches: Vec<RecordBatch>) -> Result<Vec<u8>, ServiceError> {
        let params = match batches.first() {
            None => None,
            Some(first) => Some(arrow::compute::concat_batches(&first.schema(), &batches)?),
        };
        self.prepared.lock().bind(handle, params)?;
        Ok(handle.to_vec())
    }

    /// Execute a prepared DML statement once per parameter row (Flight SQL DoPut
    /// `CommandPreparedStatementUpdate`); returns rows affected. Public for the same reason as
    /// [`Self::bind_parameters`].
    pub async fn execute_prepared_update(&self, caller: &Caller, handle: &[u8], batches: Vec<RecordBatch>) -> Result<i64, ServiceError> {
        let p = self.lookup(handle)?;
        let params = if batches.iter().any(|b| b.num_rows() > 0) {
            let first = &batches[0];
            Some(arrow::compute::concat_batches(&first.schema(), &batches)?)
        } else {
            p.params.clone()
        };
        self.run_update(caller, &p.sql, params.as_ref()).await
    }
}

/// Prefix of statement handles that carry an already computed result (Arrow IPC stream) instead of SQL.
const RESULT_PREFIX: &[u8] = b"\0mkts-result\0";

/// Statements that change something (DML, DDL, COPY, SET ...): executed when planned, not on DoGet.
fn has_side_effects(plan: &datafusion::logical_expr::LogicalPlan) -> bool {
    use datafusion::logical_expr::LogicalPlan as P;
    matches!(plan, P::Dml(_) | P::Ddl(_) | P::Copy(_) | P::Statement(_))
}

/// The schema a statement's result will have: empty for DDL and statements (a DDL plan's own schema is its
/// input's, e.g. the columns of the view being created), the plan's otherwise (DML: `count`).
fn result_schema(plan: &datafusion::logical_expr::LogicalPlan) -> Schema {
    use datafusion::logical_expr::LogicalPlan as P;
    match plan {
        P::Ddl(_) | P::Statement(_) => Schema::empty(),
        other => other.schema().as_arrow().clone(),
    }
}

/// Table types listed by GetTableTypes / GetTables.
const TABLE_TYPES: [&str; 2] = ["TABLE", "VIEW"];

#[tonic::async_trait]
impl FlightSqlService for FlightSqlHandler {
    type FlightService = FlightSqlHandler;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = caller(request.extensions());
        let plan = self.ctx.service.sql_plan(&caller, &query.query).await.map_err(status)?;
        let mut schema = plan.schema().as_arrow().clone();
        // ALTER TABLE plans as its result's shape only (`Service::sql_plan`): it changes a bucket too.
        let alters = crate::query::alter::schema_change(&query.query).is_ok_and(|c| c.is_some());
        let handle = if alters || has_side_effects(&plan) {
            // Clients such as ADBC's DBAPI never DoGet the result of an INSERT or CREATE: run it now and put
            // its (tiny) result into the ticket. The FlightInfo then carries that result's schema (a DDL plan's
            // schema is its input's, e.g. the columns of a view, not what CREATE VIEW returns).
            let (result, batches) = self.ctx.service.sql(&caller, &query.query).await.map_err(status)?;
            schema = result.as_ref().clone();
            let mut buf = RESULT_PREFIX.to_vec();
            {
                let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, &result).map_err(internal)?;
                for b in &batches {
                    w.write(b).map_err(internal)?;
                }
                w.finish().map_err(internal)?;
            }
            buf
        } else {
            query.query.clone().into_bytes()
        };
        let ticket = TicketStatementQuery { statement_handle: handle.into() };
        self.info_for(&schema, ticket.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_statement(&self, ticket: TicketStatementQuery, request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        if ticket.statement_handle.starts_with(RESULT_PREFIX) {
            let ipc = ticket.statement_handle.slice(RESULT_PREFIX.len()..);
            let (schema, batches) = mkts_flight::ipc::decode_stream(ipc).map_err(|e| Status::invalid_argument(format!("statement handle: {e}")))?;
            let schema = schema.ok_or_else(|| Status::invalid_argument("statement handle: empty result stream"))?;
            let batches: Vec<Result<RecordBatch, ServiceError>> = batches.into_iter().map(Ok).collect();
            return Ok(Response::new(encode(schema, futures::stream::iter(batches).boxed())));
        }
        let sql = String::from_utf8(ticket.statement_handle.to_vec()).map_err(|_| Status::invalid_argument("statement handle is not UTF-8"))?;
        Ok(Response::new(self.run(&caller(request.extensions()), &sql, None).await?))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let p = self.lookup(&cmd.prepared_statement_handle).map_err(status)?;
        let schema = self.plan_schema(&caller(request.extensions()), &p.sql).await?;
        self.info_for(&schema, cmd.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let p = self.lookup(&cmd.prepared_statement_handle).map_err(status)?;
        let params = match &p.params {
            Some(b) if b.num_rows() > 0 => Some(param_row(b, 0).map_err(status)?),
            _ => None,
        };
        Ok(Response::new(self.run(&caller(request.extensions()), &p.sql, params).await?))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let plan = self.ctx.service.sql_plan(&caller(request.extensions()), &query.query).await.map_err(status)?;
        let dataset = result_schema(&plan);
        let types = plan.get_parameter_types().map_err(|e| status(e.into()))?;
        let mut names: Vec<(usize, String, DataType)> = types
            .into_iter()
            .map(|(name, ty)| {
                let n = name.trim_start_matches('$').parse::<usize>().unwrap_or(usize::MAX);
                (n, name, ty.unwrap_or(DataType::Utf8))
            })
            .collect();
        names.sort();
        let params = Schema::new(names.into_iter().map(|(_, n, t)| Field::new(n, t, true)).collect::<Vec<_>>());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let handle = format!("mkts-ps-{id}").into_bytes();
        self.prepared.lock().insert(handle.clone(), Prepared { sql: query.query.clone(), params: None });
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into(),
            dataset_schema: schema_bytes(&dataset)?,
            parameter_schema: schema_bytes(&params)?,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        _request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        self.prepared.lock().remove(query.prepared_statement_handle.as_ref());
        Ok(())
    }

    async fn get_flight_info_catalogs(&self, query: CommandGetCatalogs, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.info_for(&schema, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_catalogs(&self, query: CommandGetCatalogs, _request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let mut b = query.into_builder();
        b.append(CATALOG);
        Ok(Response::new(one_batch(b.build().map_err(internal)?)))
    }

    async fn get_flight_info_schemas(&self, query: CommandGetDbSchemas, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.info_for(&schema, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_schemas(&self, query: CommandGetDbSchemas, _request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let mut b = query.into_builder();
        b.append(CATALOG, SCHEMA);
        Ok(Response::new(one_batch(b.build().map_err(internal)?)))
    }

    async fn get_flight_info_tables(&self, query: CommandGetTables, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.info_for(&schema, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_tables(&self, query: CommandGetTables, _request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let include_schema = query.include_schema;
        let mut b = query.into_builder();
        // Buckets and views (bucket names only when the server is queryable).
        let cat = self.ctx.service.query_engine().schema_provider();
        let names = cat.as_ref().map(|s| s.table_names()).unwrap_or_default();
        for name in names {
            let (ty, schema) = match &cat {
                Some(s) if include_schema => match s.table(&name).await {
                    Ok(Some(t)) => {
                        let ty = if t.table_type() == datafusion::logical_expr::TableType::View { "VIEW" } else { "TABLE" };
                        (ty, t.schema())
                    }
                    _ => continue,
                },
                _ => ("TABLE", Arc::new(Schema::empty())),
            };
            b.append(CATALOG, SCHEMA, &name, ty, &schema).map_err(internal)?;
        }
        Ok(Response::new(one_batch(b.build().map_err(internal)?)))
    }

    async fn get_flight_info_table_types(&self, query: CommandGetTableTypes, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.info_for(&schema, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_table_types(&self, query: CommandGetTableTypes, _request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let mut b = query.into_builder();
        for t in TABLE_TYPES {
            b.append(t);
        }
        Ok(Response::new(one_batch(b.build().map_err(internal)?)))
    }

    async fn get_flight_info_sql_info(&self, query: CommandGetSqlInfo, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.info).schema();
        self.info_for(&schema, query.as_any().encode_to_vec(), request.into_inner())
    }

    async fn do_get_sql_info(&self, query: CommandGetSqlInfo, _request: Request<Ticket>) -> Result<Response<DoGetStream>, Status> {
        let batch = query.into_builder(&self.info).build().map_err(internal)?;
        Ok(Response::new(one_batch(batch)))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmt(i: usize) -> (Vec<u8>, Prepared) {
        (format!("h{i}").into_bytes(), Prepared { sql: format!("SELECT {i}"), params: None })
    }

    fn params(rows: usize) -> RecordBatch {
        let a = arrow::array::Int64Array::from((0..rows as i64).collect::<Vec<_>>());
        RecordBatch::try_new(Arc::new(Schema::new(vec![Field::new("$1", DataType::Int64, false)])), vec![Arc::new(a)]).unwrap()
    }

    #[test]
    fn prepared_statements_are_capped_least_recently_used_first() {
        let mut c = PreparedCache::new(MAX_PREPARED, MAX_PREPARED_PARAM_BYTES);
        for i in 0..MAX_PREPARED {
            let (h, p) = stmt(i);
            c.insert(h, p);
        }
        // Using the oldest keeps it; the next ones out are the least recently used.
        assert_eq!(c.get(b"h0").unwrap().sql, "SELECT 0");
        for i in MAX_PREPARED..MAX_PREPARED + 10 {
            let (h, p) = stmt(i);
            c.insert(h, p);
        }
        assert_eq!(c.len(), MAX_PREPARED);
        assert!(c.get(b"h0").is_some());
        assert!((1..=10).all(|i| c.get(format!("h{i}").as_bytes()).is_none()));
        assert!(c.get(b"h11").is_some() && c.get(format!("h{}", MAX_PREPARED + 9).as_bytes()).is_some());
        c.remove(b"h0");
        assert_eq!(c.len(), MAX_PREPARED - 1);
    }

    #[test]
    fn bound_parameters_are_capped_by_bytes() {
        let one = params(1000).get_array_memory_size();
        let mut c = PreparedCache::new(16, one * 3);
        for i in 0..4 {
            let (h, p) = stmt(i);
            c.insert(h, p);
        }
        for i in 0..3 {
            c.bind(format!("h{i}").as_bytes(), Some(params(1000))).unwrap();
        }
        assert_eq!(c.param_bytes, one * 3);
        // A fourth binding closes the least recently used statement (h0) to stay within the budget.
        c.bind(b"h3", Some(params(1000))).unwrap();
        assert!(c.get(b"h0").is_none());
        assert_eq!((c.len(), c.param_bytes), (3, one * 3));
        // Rebinding replaces, it does not add.
        c.bind(b"h3", Some(params(10))).unwrap();
        assert_eq!(c.param_bytes, one * 2 + params(10).get_array_memory_size());
        // More than the whole budget for one statement is refused, and unknown handles are clear errors.
        let e = c.bind(b"h1", Some(params(4000))).unwrap_err();
        assert_eq!(e.code, ErrorCode::ResourceExhausted);
        assert_eq!(c.bind(b"nope", None).unwrap_err().code, ErrorCode::NotFound);
        c.remove(b"h1");
        c.remove(b"h2");
        c.remove(b"h3");
        assert_eq!((c.len(), c.param_bytes), (0, 0));
    }
}
