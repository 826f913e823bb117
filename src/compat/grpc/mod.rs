//! MarketStore's gRPC API, service `proto.Marketstore` (reference §3), served next to Arrow Flight on
//! `grpc_listen_port`.
//!
//! Proto3 has no field presence, so (§3.3): `epoch_start == 0` is "from the beginning", `epoch_end == 0` is
//! "no end", nanos fields always apply, `limit_record_count == 0` is "no limit". Query and ListSymbols
//! errors are gRPC statuses with MarketStore's message text, coded as MarketStore codes them
//! ([`marketstore_status`]: `Unknown`, except policy refusals and exhausted limits); write/create/destroy
//! errors are per-request `ServerResponse`s like over JSON-RPC. Request counts and durations are recorded for the whole gRPC server by
//! [`crate::metrics::GrpcMetricsLayer`].
//!
//! The message and service code in [`pb`] is generated from `proto/marketstore.proto` and committed
//! (regenerate with `proto/gen/regen.sh`), so building needs no `protoc`.

#[allow(clippy::all, missing_docs)]
pub mod pb;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::context::{ServerContext, VERSION};
use crate::service::{Access, Caller, Interface, QueryRequest, ReadRequest, ServiceError};

use super::dataservice::{self, CreateError};
use super::numpy::NumpyIn;

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

/// Who a `proto.Marketstore` call runs as: what the gRPC authentication layer verified, or anonymous.
fn caller<T>(request: &Request<T>) -> Caller {
    Caller::of_request(Interface::Grpc, request.extensions())
}

/// The status of a failed Query or ListSymbols. MarketStore answers every query error with `Unknown`
/// and its message, and its clients rely on that; mkts keeps it except where the class says more than
/// the text: a refusal by policy is `PermissionDenied`, an exhausted limit `ResourceExhausted`.
pub fn marketstore_status(e: ServiceError) -> Status {
    use crate::service::ErrorCode;
    let code = match e.code {
        ErrorCode::PermissionDenied | ErrorCode::Unauthenticated | ErrorCode::ResourceExhausted => e.code.grpc(),
        _ => tonic::Code::Unknown,
    };
    Status::new(code, e.to_status().message())
}

/// Translate one gRPC `QueryRequest` (proto3 defaults mean "absent").
pub fn query_spec(r: &pb::QueryRequest) -> Result<QueryRequest, ServiceError> {
    if r.is_sql_statement {
        return Ok(QueryRequest::Sql(r.sql_statement.clone()));
    }
    let mut q = ReadRequest::parse(&r.destination)?.check_key_category(Some(&r.key_category))?;
    if r.epoch_start != 0 || r.epoch_start_nanos != 0 {
        q = q.starting(r.epoch_start, r.epoch_start_nanos)?;
    } else {
        crate::service::request::nanos("epoch_start_nanos", r.epoch_start_nanos)?;
    }
    if r.epoch_end != 0 {
        q = q.ending(r.epoch_end, r.epoch_end_nanos)?;
    } else {
        crate::service::request::nanos("epoch_end_nanos", r.epoch_end_nanos)?;
    }
    q = q.limited(r.limit_record_count.into(), r.limit_from_start)?;
    q.columns = (!r.columns.is_empty()).then(|| r.columns.clone());
    q.functions = r.functions.clone();
    Ok(q).map(QueryRequest::Read)
}

impl MarketstoreGrpc {
    #[cfg(test)]
    pub(crate) fn for_tests(ctx: Arc<ServerContext>) -> Self {
        MarketstoreGrpc { ctx }
    }

    async fn do_query(&self, caller: &Caller, req: pb::MultiQueryRequest) -> Result<pb::MultiQueryResponse, ServiceError> {
        self.ctx.service.authorize(caller, Access::Read)?;
        let mut responses = Vec::with_capacity(req.requests.len());
        for r in &req.requests {
            let out = dataservice::query(&self.ctx, caller, &query_spec(r)?).await?;
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

    async fn do_write(&self, caller: &Caller, req: pb::MultiWriteRequest) -> pb::MultiServerResponse {
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
            if let Err(e) = dataservice::write(&self.ctx, caller, &input, r.is_variable_length).await {
                responses.push(server_response(e.message));
            }
        }
        pb::MultiServerResponse { responses }
    }

    async fn do_create(&self, caller: &Caller, req: pb::MultiCreateRequest) -> pb::MultiServerResponse {
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
            let columns: Vec<(String, String)> = r.data_shapes.iter().map(|s| (s.name.clone(), s.r#type.clone())).collect();
            match dataservice::create(&self.ctx, caller, &r.key, &columns, variable, false).await {
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
        let caller = caller(&request);
        Ok(Response::new(self.do_query(&caller, request.into_inner()).await.map_err(marketstore_status)?))
    }

    async fn create(&self, request: Request<pb::MultiCreateRequest>) -> Result<Response<pb::MultiServerResponse>, Status> {
        let caller = caller(&request);
        self.ctx.service.authorize_caller(&caller, Access::Create)?;
        Ok(Response::new(self.do_create(&caller, request.into_inner()).await))
    }

    async fn write(&self, request: Request<pb::MultiWriteRequest>) -> Result<Response<pb::MultiServerResponse>, Status> {
        let caller = caller(&request);
        self.ctx.service.authorize_caller(&caller, Access::Append)?;
        Ok(Response::new(self.do_write(&caller, request.into_inner()).await))
    }

    async fn destroy(&self, request: Request<pb::MultiKeyRequest>) -> Result<Response<pb::MultiServerResponse>, Status> {
        let caller = caller(&request);
        self.ctx.service.authorize_caller(&caller, Access::Remove)?;
        let mut responses = Vec::new();
        for k in &request.get_ref().requests {
            responses.push(server_response(dataservice::destroy(&self.ctx, &caller, &k.key).await.err().unwrap_or_default()));
        }
        Ok(Response::new(pb::MultiServerResponse { responses }))
    }

    async fn list_symbols(&self, request: Request<pb::ListSymbolsRequest>) -> Result<Response<pb::ListSymbolsResponse>, Status> {
        // Default/0 = SYMBOL, any other value = TIME_BUCKET_KEY (MarketStore).
        let tbk = request.get_ref().format != 0;
        let caller = caller(&request);
        self.ctx.service.authorize(&caller, Access::Read).map_err(marketstore_status)?;
        let results = dataservice::list_symbols(&self.ctx, &caller, tbk).map_err(marketstore_status)?;
        Ok(Response::new(pb::ListSymbolsResponse { results }))
    }

    async fn server_version(&self, _request: Request<pb::ServerVersionRequest>) -> Result<Response<pb::ServerVersionResponse>, Status> {
        Ok(Response::new(pb::ServerVersionResponse { version: VERSION.to_string() }))
    }
}
