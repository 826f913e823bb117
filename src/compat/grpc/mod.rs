//! MarketStore's gRPC API, service `proto.Marketstore` (reference §3), served next to Arrow Flight on
//! `grpc_listen_port`.
//!
//! Proto3 has no field presence, so (§3.3): `epoch_start == 0` is "from the beginning", `epoch_end == 0` is
//! "no end", nanos fields always apply, `limit_record_count == 0` is "no limit". Query errors are gRPC
//! `Unknown` statuses with MarketStore's message text (`PermissionDenied` under `queryable: false`); write/create/destroy errors are per-request
//! `ServerResponse`s like over JSON-RPC.
//!
//! The message and service code in [`pb`] is generated from `proto/marketstore.proto` and committed
//! (regenerate with `proto/gen/regen.sh`), so building needs no `protoc`.

#[allow(clippy::all, missing_docs)]
pub mod pb;

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::context::{ServerContext, VERSION};
use crate::engine::TimePoint;

use super::numpy::NumpyIn;
use super::service::{self, CreateError, CreateSpec, QuerySpec};

pub use pb::marketstore_server::{Marketstore, MarketstoreServer};

/// The `proto.Marketstore` implementation over a server context.
pub struct MarketstoreGrpc {
    ctx: Arc<ServerContext>,
}

/// The tonic service value to add to the gRPC server (`Server::builder().add_service(service(ctx))`).
/// Message size limits come from `grpc_max_recv_msg_size` / `grpc_max_send_msg_size` ([`Config::grpc_limits`]).
///
/// [`Config::grpc_limits`]: crate::config::Config::grpc_limits
pub fn service(ctx: Arc<ServerContext>) -> MarketstoreServer<MarketstoreGrpc> {
    let (recv, send) = ctx.config.grpc_limits();
    MarketstoreServer::new(MarketstoreGrpc { ctx }).max_decoding_message_size(recv).max_encoding_message_size(send)
}

fn server_response(error: String) -> pb::ServerResponse {
    pb::ServerResponse { error, version: VERSION.to_string() }
}

/// Translate one gRPC `QueryRequest` (proto3 defaults mean "absent").
pub fn query_spec(r: &pb::QueryRequest) -> Result<QuerySpec, Status> {
    let nanos = |n: i64, what: &str| -> Result<i32, Status> {
        if (0..1_000_000_000).contains(&n) {
            Ok(n as i32)
        } else {
            Err(Status::invalid_argument(format!("{what} {n} is outside 0..1e9")))
        }
    };
    let start_ns = nanos(r.epoch_start_nanos, "epoch_start_nanos")?;
    let end_ns = nanos(r.epoch_end_nanos, "epoch_end_nanos")?;
    if r.limit_record_count < 0 {
        return Err(Status::invalid_argument("limit_record_count must not be negative"));
    }
    Ok(QuerySpec {
        sql: r.is_sql_statement.then(|| r.sql_statement.clone()),
        destination: r.destination.clone(),
        key_category: (!r.key_category.is_empty()).then(|| r.key_category.clone()),
        start: (r.epoch_start != 0 || start_ns != 0).then_some(TimePoint { secs: r.epoch_start, nanos: start_ns }),
        end: (r.epoch_end != 0).then_some(TimePoint { secs: r.epoch_end, nanos: end_ns }),
        limit: (r.limit_record_count > 0).then_some(r.limit_record_count as usize),
        from_start: r.limit_from_start,
        columns: (!r.columns.is_empty()).then(|| r.columns.clone()),
        functions: (!r.functions.is_empty()).then(|| r.functions.clone()),
    })
}

impl MarketstoreGrpc {
    #[cfg(test)]
    pub(crate) fn for_tests(ctx: Arc<ServerContext>) -> Self {
        MarketstoreGrpc { ctx }
    }

    fn observe<T>(&self, method: &str, t0: Instant, r: &Result<T, Status>) {
        self.ctx.metrics.observe("grpc", method, t0.elapsed(), r.is_ok());
    }

    async fn do_query(&self, req: pb::MultiQueryRequest) -> Result<pb::MultiQueryResponse, Status> {
        self.ctx.check_queryable().map_err(|e| Status::permission_denied(e.to_string()))?;
        let mut responses = Vec::with_capacity(req.requests.len());
        for r in &req.requests {
            let out = service::query(&self.ctx, query_spec(r)?).await.map_err(Status::unknown)?;
            let mut start_index = std::collections::HashMap::new();
            let mut lengths = std::collections::HashMap::new();
            for (k, s, n) in &out.keys {
                start_index.insert(k.clone(), *s as i32);
                lengths.insert(k.clone(), *n as i32);
            }
            let data = pb::NumpyDataset {
                column_data: out.column_bytes(),
                column_types: out.types,
                column_names: out.names,
                length: out.length as i32,
                data_shapes: Vec::new(),
            };
            responses.push(pb::QueryResponse { result: Some(pb::NumpyMultiDataset { data: Some(data), start_index, lengths }) });
        }
        Ok(pb::MultiQueryResponse { responses, version: VERSION.to_string(), timezone: self.ctx.config.timezone.clone() })
    }

    async fn do_write(&self, req: pb::MultiWriteRequest) -> pb::MultiServerResponse {
        let mut responses = Vec::new();
        for r in &req.requests {
            let Some(ds) = &r.data else {
                responses.push(server_response("write request has no data".into()));
                continue;
            };
            let empty = pb::NumpyDataset::default();
            let d = ds.data.as_ref().unwrap_or(&empty);
            let input = NumpyIn {
                types: d.column_types.clone(),
                names: d.column_names.clone(),
                data: d.column_data.iter().map(|b| &b[..]).collect(),
                length: d.length as i64,
                start_index: ds.start_index.iter().map(|(k, v)| (k.clone(), *v as i64)).collect(),
                lengths: ds.lengths.iter().map(|(k, v)| (k.clone(), *v as i64)).collect(),
            };
            if let Err(e) = service::write(&self.ctx, &input, r.is_variable_length).await {
                responses.push(server_response(e));
            }
        }
        pb::MultiServerResponse { responses }
    }

    async fn do_create(&self, req: pb::MultiCreateRequest) -> pb::MultiServerResponse {
        let mut responses = Vec::new();
        for r in &req.requests {
            let variable = match r.row_type.as_str() {
                "fixed" => false,
                "variable" => true,
                other => {
                    responses.push(server_response(format!("record type \"{other}\" must be one of fixed or variable")));
                    continue;
                }
            };
            let spec = CreateSpec {
                key: r.key.clone(),
                columns: r.data_shapes.iter().map(|s| (s.name.clone(), s.r#type.clone())).collect(),
                variable,
            };
            match service::create(&self.ctx, &spec, false).await {
                Ok(()) => responses.push(server_response(String::new())),
                Err(CreateError::Continue(e)) => responses.push(server_response(e)),
                Err(CreateError::Stop(e)) => {
                    let t = e.strip_prefix("unexpected data type:").unwrap_or(&e);
                    responses.push(server_response(format!("not supported data type: {t}")));
                    break;
                }
            }
        }
        pb::MultiServerResponse { responses }
    }
}

#[tonic::async_trait]
impl Marketstore for MarketstoreGrpc {
    async fn query(&self, request: Request<pb::MultiQueryRequest>) -> Result<Response<pb::MultiQueryResponse>, Status> {
        let t0 = Instant::now();
        let r = self.do_query(request.into_inner()).await;
        self.observe("Query", t0, &r);
        r.map(Response::new)
    }

    async fn create(&self, request: Request<pb::MultiCreateRequest>) -> Result<Response<pb::MultiServerResponse>, Status> {
        let t0 = Instant::now();
        let r = Ok(self.do_create(request.into_inner()).await);
        self.observe("Create", t0, &r);
        r.map(Response::new)
    }

    async fn write(&self, request: Request<pb::MultiWriteRequest>) -> Result<Response<pb::MultiServerResponse>, Status> {
        let t0 = Instant::now();
        let r = Ok(self.do_write(request.into_inner()).await);
        self.observe("Write", t0, &r);
        r.map(Response::new)
    }

    async fn destroy(&self, request: Request<pb::MultiKeyRequest>) -> Result<Response<pb::MultiServerResponse>, Status> {
        let t0 = Instant::now();
        let mut responses = Vec::new();
        for k in &request.get_ref().requests {
            responses.push(server_response(service::destroy(&self.ctx, &k.key).await.err().unwrap_or_default()));
        }
        let r = Ok(pb::MultiServerResponse { responses });
        self.observe("Destroy", t0, &r);
        r.map(Response::new)
    }

    async fn list_symbols(&self, request: Request<pb::ListSymbolsRequest>) -> Result<Response<pb::ListSymbolsResponse>, Status> {
        let t0 = Instant::now();
        // Default/0 = SYMBOL, any other value = TIME_BUCKET_KEY (MarketStore).
        let tbk = request.get_ref().format != 0;
        if let Err(e) = self.ctx.check_queryable() {
            let r: Result<pb::ListSymbolsResponse, Status> = Err(Status::permission_denied(e.to_string()));
            self.observe("ListSymbols", t0, &r);
            return r.map(Response::new);
        }
        let r = service::list_symbols(&self.ctx, tbk).map(|results| pb::ListSymbolsResponse { results }).map_err(Status::unknown);
        self.observe("ListSymbols", t0, &r);
        r.map(Response::new)
    }

    async fn server_version(&self, _request: Request<pb::ServerVersionRequest>) -> Result<Response<pb::ServerVersionResponse>, Status> {
        Ok(Response::new(pb::ServerVersionResponse { version: VERSION.to_string() }))
    }
}
