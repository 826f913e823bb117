//! `/rpc`: MarketStore's JSON-RPC 2.0 `DataService` over msgpack (`application/x-msgpack`) or JSON
//! (`application/json`), with the transport rules of reference §2.1:
//!
//! - POST only; anything else is `405 text/plain` (`rpc: POST method required, received HEAD`), which still
//!   carries `Marketstore-Version` — pymarketstore's `server_version()` reads it from a HEAD.
//! - unknown content type: `415 text/plain`;
//! - JSON-RPC errors travel as HTTP 200 with `{code, message, data}`; the request `id` is echoed with its
//!   msgpack type; a request without `id` (a notification) gets no body.
//!
//! Memory is bounded before anything is decoded: a body larger than `max_request_mb` is read to its end
//! and discarded (so the client sees the reply, not a reset) and answered with a JSON-RPC error; a body
//! that would decode into more than [`MAX_REQUEST_VALUES`] values, nest too deep or claim lengths past
//! its end is refused likewise.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use futures::StreamExt;
use rmpv::Value;

use crate::context::{ServerContext, VERSION};
use crate::service::{Access, Caller, Interface, QueryRequest, ReadRequest, ServiceError};

use super::dataservice::{self, CreateError};
use super::numpy::NumpyIn;
use super::value::{
    base64_decode, check_json, check_msgpack, BodyCheck, json_to_msgpack, to_json, to_msgpack, Codec, Fields, ParamError, Val,
    MAX_REQUEST_DEPTH, MAX_REQUEST_VALUES,
};

/// Header carrying the server version on every `/rpc` response.
pub const VERSION_HEADER: &str = "marketstore-version";

/// JSON-RPC error codes used by MarketStore's RPC framework.
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const SERVER_ERROR: i64 = -32000;

/// A JSON-RPC error object.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    fn server(msg: impl Into<String>) -> Self {
        RpcError { code: SERVER_ERROR, message: msg.into() }
    }
}

impl From<ParamError> for RpcError {
    fn from(e: ParamError) -> Self {
        RpcError { code: INVALID_REQUEST, message: e.0 }
    }
}

/// The JSON-RPC form of an operation's failure: MarketStore's code for method errors and the
/// operation's message (its clients match on the text).
impl From<ServiceError> for RpcError {
    fn from(e: ServiceError) -> Self {
        RpcError { code: e.code.jsonrpc(), message: e.message }
    }
}

fn text(status: StatusCode, body: String) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(VERSION_HEADER, HeaderValue::from_static(VERSION));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    r
}

/// The `/rpc` handler (any method; non-POST answers 405).
pub async fn handle(
    State(ctx): State<Arc<ServerContext>>,
    ext: axum::http::Extensions,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Who the calls run as: what the authentication middleware verified, or anonymous without `auth:`.
    let caller = Caller::of_request(Interface::JsonRpc, &ext);
    handle_inner(&ctx, &caller, method, &headers, body).await
}

/// Past this many bytes an oversize body is no longer drained: the connection is closed instead.
const MAX_DRAIN: u64 = 1 << 30;

/// Why a body was not read.
enum BodyError {
    /// Larger than the limit (bytes seen, at least).
    TooLarge(u64),
    /// The client's stream failed.
    Broken(String),
}

/// Read at most `limit` bytes of `body`; a longer body is drained without being kept.
async fn read_body(body: Body, limit: usize, hint: Option<u64>) -> Result<Bytes, BodyError> {
    let mut over = hint.is_some_and(|n| n > limit as u64);
    let mut buf = bytes::BytesMut::with_capacity(if over { 0 } else { hint.unwrap_or(0).min(limit as u64) as usize });
    let mut seen = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::Broken(e.to_string()))?;
        seen += chunk.len() as u64;
        if !over && buf.len() + chunk.len() > limit {
            over = true;
            buf = bytes::BytesMut::new();
        }
        if over {
            if seen > MAX_DRAIN {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&chunk);
    }
    if over {
        return Err(BodyError::TooLarge(seen.max(hint.unwrap_or(0))));
    }
    Ok(buf.freeze())
}

pub(crate) async fn handle_inner(ctx: &ServerContext, caller: &Caller, method: Method, headers: &HeaderMap, body: Body) -> Response {
    if method != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, format!("rpc: POST method required, received {method}"));
    }
    let ct_raw = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let ct = ct_raw.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let codec = match ct.as_str() {
        "application/x-msgpack" => Codec::Msgpack,
        "application/json" => Codec::Json,
        _ => return text(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("rpc: unrecognized Content-Type: {ct_raw}")),
    };
    let limit = ctx.config.max_request_bytes();
    let hint = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let body = match read_body(body, limit, hint).await {
        Ok(b) => b,
        Err(BodyError::TooLarge(n)) => {
            tracing::warn!(bytes = n, limit, "refused an /rpc request larger than max_request_mb");
            let message = format!(
                "rpc: request body of {n} bytes is larger than max_request_mb ({} MiB); split the write",
                ctx.config.max_request_mb
            );
            return reply(codec, &Value::Nil, Err(RpcError { code: INVALID_REQUEST, message }), true);
        }
        Err(BodyError::Broken(e)) => return text(StatusCode::BAD_REQUEST, format!("rpc: cannot read the request body: {e}")),
    };
    let checked = match codec {
        Codec::Msgpack => check_msgpack(&body, MAX_REQUEST_VALUES, MAX_REQUEST_DEPTH),
        Codec::Json => check_json(&body, MAX_REQUEST_VALUES, MAX_REQUEST_DEPTH),
    };
    if let Err(e) = checked {
        let code = if matches!(e, BodyCheck::Malformed(_)) { PARSE_ERROR } else { INVALID_REQUEST };
        return reply(codec, &Value::Nil, Err(RpcError { code, message: e.to_string() }), true);
    }
    let req: Result<Value, String> = match codec {
        Codec::Msgpack => rmpv::decode::read_value(&mut &body[..]).map_err(|e| e.to_string()),
        Codec::Json => serde_json::from_slice::<serde_json::Value>(&body).map(json_to_msgpack).map_err(|e| e.to_string()),
    };
    let req = match req {
        Ok(v) => v,
        Err(e) => return reply(codec, &Value::Nil, Err(RpcError { code: PARSE_ERROR, message: e }), true),
    };
    let env = match Fields::of(&req, codec, "request") {
        Ok(f) => f,
        Err(e) => return reply(codec, &Value::Nil, Err(RpcError { code: PARSE_ERROR, message: e.0 }), true),
    };
    let id = env.get("id", "id").cloned().unwrap_or(Value::Nil);
    let notification = id.is_nil();
    if env.get("jsonrpc", "jsonrpc").and_then(|v| v.as_str()) != Some("2.0") {
        let e = RpcError { code: INVALID_REQUEST, message: "jsonrpc must be 2.0".into() };
        return reply(codec, &id, Err(e), !notification);
    }
    let mname = env.get("method", "method").and_then(|v| v.as_str()).unwrap_or("").to_string();
    // A caller without the role for the whole call is refused outright, with an HTTP status (403) that
    // says so, before any of its requests runs.
    let access = match mname.as_str() {
        "DataService.Query" | "DataService.GetInfo" | "DataService.ListSymbols" => Some(Access::Read),
        "DataService.Write" => Some(Access::Append),
        "DataService.Create" => Some(Access::Create),
        "DataService.Destroy" => Some(Access::Remove),
        _ => None,
    };
    if let Some(Err(e)) = access.map(|a| ctx.service.authorize_caller(caller, a)) {
        let status = e.code.http();
        let mut r = reply(codec, &id, Err(e.into()), true);
        *r.status_mut() = status;
        return r;
    }
    let t0 = Instant::now();
    let result = dispatch(ctx, caller, codec, &mname, env.get("params", "params")).await;
    if let Some(m) = mname.strip_prefix("DataService.")
        && METHODS.contains(&m)
    {
        ctx.metrics.observe("jsonrpc", m, t0.elapsed(), result.is_ok());
    }
    reply(codec, &id, result, !notification)
}

const METHODS: [&str; 6] = ["Query", "Write", "Create", "Destroy", "GetInfo", "ListSymbols"];

fn reply(codec: Codec, id: &Value, result: Result<Val, RpcError>, with_body: bool) -> Response {
    let mut r = if !with_body {
        Response::new(Body::empty())
    } else {
        let (k, v) = match result {
            Ok(v) => ("result", v),
            Err(e) => (
                "error",
                Val::Obj(vec![
                    ("code", "code", Val::Int(e.code)),
                    ("message", "message", Val::Str(e.message)),
                    ("data", "data", Val::Nil),
                ]),
            ),
        };
        let env = Val::Obj(vec![("jsonrpc", "jsonrpc", Val::str("2.0")), (k, k, v), ("id", "id", Val::Raw(id.clone()))]);
        let (ct, body) = match codec {
            Codec::Msgpack => {
                let mut out = Vec::new();
                to_msgpack(&env, &mut out);
                ("application/x-msgpack", out)
            }
            Codec::Json => ("application/json; charset=utf-8", serde_json::to_vec(&to_json(&env)).unwrap_or_default()),
        };
        let mut r = Response::new(Body::from(body));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        r
    };
    let h = r.headers_mut();
    h.insert(VERSION_HEADER, HeaderValue::from_static(VERSION));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    r
}

/// The argument struct: `params` itself or a one-element array holding it.
fn params_of(p: Option<&Value>) -> Result<Value, RpcError> {
    match p {
        None => Ok(Value::Map(Vec::new())),
        Some(Value::Array(a)) if a.len() == 1 => Ok(a[0].clone()),
        Some(v @ Value::Map(_)) => Ok(v.clone()),
        Some(_) => Err(RpcError { code: INVALID_REQUEST, message: "params must be a map or a one-element array".into() }),
    }
}

async fn dispatch(ctx: &ServerContext, caller: &Caller, codec: Codec, m: &str, params: Option<&Value>) -> Result<Val, RpcError> {
    let parts: Vec<&str> = m.split('.').collect();
    if parts.len() != 2 {
        return Err(RpcError::server(format!("rpc: service/method request ill-formed: \"{m}\"")));
    }
    if parts[0] != "DataService" {
        return Err(RpcError::server(format!("rpc: can't find service \"{m}\"")));
    }
    if !METHODS.contains(&parts[1]) {
        return Err(RpcError::server(format!("rpc: can't find method \"{m}\"")));
    }
    let p = params_of(params)?;
    let f = Fields::of(&p, codec, "params")?;
    if matches!(parts[1], "Query" | "GetInfo" | "ListSymbols") {
        // One JSON-RPC error for the whole call, before any request runs (MarketStore's behaviour).
        ctx.service.authorize(caller, Access::Read)?;
    }
    match parts[1] {
        "Query" => query(ctx, caller, f).await,
        "Write" => write(ctx, caller, f).await,
        "Create" => create(ctx, caller, f).await,
        "Destroy" => destroy(ctx, caller, f).await,
        "GetInfo" => get_info(ctx, caller, f),
        _ => list_symbols(ctx, caller, f),
    }
}

fn requests<'a>(f: &Fields<'a>) -> Result<Vec<Fields<'a>>, ParamError> {
    let codec = f.codec();
    f.array("requests", "Requests")?.unwrap_or(&[]).iter().map(|r| Fields::of(r, codec, "request")).collect()
}

fn server_response(error: String) -> Val {
    Val::Obj(vec![("error", "Error", Val::Str(error)), ("version", "Version", Val::str(VERSION))])
}

/// Parse one msgpack/JSON `QueryRequest`: field errors are `INVALID_REQUEST`, what the operations
/// layer refuses (a bad destination, nanoseconds, limit) its own error.
pub fn query_spec(r: &Fields<'_>) -> Result<QueryRequest, RpcError> {
    if r.bool("is_sqlstatement", "IsSQLStatement")?.unwrap_or(false) {
        return Ok(QueryRequest::Sql(r.str("sql_statement", "SQLStatement")?.unwrap_or("").to_string()));
    }
    let mut q = ReadRequest::parse(r.str("destination", "Destination")?.unwrap_or(""))?
        .check_key_category(r.str("key_category", "KeyCategory")?)?;
    let (start_ns, end_ns) = (r.i64("epoch_start_nanos", "EpochStartNanos")?, r.i64("epoch_end_nanos", "EpochEndNanos")?);
    if let Some(s) = r.i64("epoch_start", "EpochStart")? {
        q = q.starting(s, start_ns.unwrap_or(0))?;
    }
    if let Some(e) = r.i64("epoch_end", "EpochEnd")? {
        q = q.ending(e, end_ns.unwrap_or(0))?;
    }
    q = q.limited(r.i64("limit_record_count", "LimitRecordCount")?.unwrap_or(0), r.bool("limit_from_start", "LimitFromStart")?.unwrap_or(false))?;
    q.columns = r.strings("columns", "Columns")?;
    q.functions = r.strings("functions", "Functions")?.unwrap_or_default();
    Ok(QueryRequest::Read(q))
}

async fn query(ctx: &ServerContext, caller: &Caller, f: Fields<'_>) -> Result<Val, RpcError> {
    let specs = requests(&f)?.iter().map(query_spec).collect::<Result<Vec<_>, _>>()?;
    let mut responses = Vec::with_capacity(specs.len());
    for spec in specs {
        let out = dataservice::query(ctx, caller, &spec).await?;
        responses.push(Val::Obj(vec![("result", "Result", out.to_val())]));
    }
    Ok(Val::Obj(vec![
        ("responses", "Responses", Val::Arr(responses)),
        ("version", "Version", Val::str(VERSION)),
        ("timezone", "Timezone", Val::str(ctx.config.timezone.as_str())),
    ]))
}

async fn write(ctx: &ServerContext, caller: &Caller, f: Fields<'_>) -> Result<Val, RpcError> {
    let mut errors = Vec::new();
    for r in requests(&f)? {
        let res = write_one(ctx, caller, &r).await;
        if let Err(e) = res {
            errors.push(server_response(e));
        }
    }
    Ok(Val::Obj(vec![("responses", "Responses", if errors.is_empty() { Val::Nil } else { Val::Arr(errors) })]))
}

pub(crate) async fn write_one(ctx: &ServerContext, caller: &Caller, r: &Fields<'_>) -> Result<(), String> {
    let codec = r.codec();
    let dsv = r.get("dataset", "Data").or_else(|| r.get("dataset", "Dataset")).ok_or("write request has no dataset")?;
    let ds = Fields::of(dsv, codec, "dataset").map_err(|e| e.0)?;
    let variable = r.bool("is_variable_length", "IsVariableLength").map_err(|e| e.0)?.unwrap_or(false);
    let blobs = ds.blobs("data", "ColumnData").map_err(|e| e.0)?.unwrap_or_default();
    // JSON carries the columns base64-encoded.
    let decoded: Vec<Vec<u8>> = match codec {
        Codec::Json => blobs
            .iter()
            .map(|b| base64_decode(b).ok_or_else(|| "ColumnData must be base64".to_string()))
            .collect::<Result<_, _>>()?,
        Codec::Msgpack => Vec::new(),
    };
    let data: Vec<&[u8]> = match codec {
        Codec::Json => decoded.iter().map(|v| v.as_slice()).collect(),
        Codec::Msgpack => blobs,
    };
    let input = NumpyIn {
        types: ds.strings("types", "ColumnTypes").map_err(|e| e.0)?.unwrap_or_default(),
        names: ds.strings("names", "ColumnNames").map_err(|e| e.0)?.unwrap_or_default(),
        data,
        length: ds.i64("length", "Length").map_err(|e| e.0)?.unwrap_or(0),
        start_index: ds.int_map("startindex", "StartIndex").map_err(|e| e.0)?.unwrap_or_default(),
        lengths: ds.int_map("lengths", "Lengths").map_err(|e| e.0)?.unwrap_or_default(),
    };
    dataservice::write(ctx, caller, &input, variable).await.map_err(|e| e.message)
}

async fn create(ctx: &ServerContext, caller: &Caller, f: Fields<'_>) -> Result<Val, RpcError> {
    let mut out = Vec::new();
    for r in requests(&f)? {
        let names = r.strings("column_names", "ColumnNames")?.unwrap_or_default();
        let types = r.strings("column_types", "ColumnTypes")?.unwrap_or_default();
        if names.len() != types.len() {
            out.push(server_response(format!("{} column names but {} column types", names.len(), types.len())));
            continue;
        }
        // pymarketstore sends `row_type`; MarketStore's Go client `is_variable_length`: accept both.
        let variable = r.bool("is_variable_length", "IsVariableLength")?.unwrap_or(false)
            || r.str("row_type", "RowType")?.is_some_and(|t| t.eq_ignore_ascii_case("variable"));
        let key = r.str("key", "Key")?.unwrap_or("");
        let columns: Vec<(String, String)> = names.into_iter().zip(types).collect();
        match dataservice::create(ctx, caller, key, &columns, variable, true).await {
            Ok(()) => out.push(server_response(String::new())),
            Err(CreateError::Continue(e)) => out.push(server_response(e)),
            Err(CreateError::Stop(e)) => {
                out.push(server_response(e));
                break;
            }
        }
    }
    Ok(Val::Obj(vec![("responses", "Responses", Val::Arr(out))]))
}

async fn destroy(ctx: &ServerContext, caller: &Caller, f: Fields<'_>) -> Result<Val, RpcError> {
    let mut out = Vec::new();
    for r in requests(&f)? {
        let key = r.str("key", "Key")?.unwrap_or("");
        out.push(server_response(dataservice::destroy(ctx, caller, key).await.err().unwrap_or_default()));
    }
    Ok(Val::Obj(vec![("responses", "Responses", Val::Arr(out))]))
}

fn get_info(ctx: &ServerContext, caller: &Caller, f: Fields<'_>) -> Result<Val, RpcError> {
    let mut out = Vec::new();
    for r in requests(&f)? {
        let key = r.str("key", "Key")?.unwrap_or("");
        let i = dataservice::get_info(ctx, caller, key);
        out.push(Val::Obj(vec![
            ("LatestYear", "LatestYear", Val::Int(i.latest_year)),
            ("TimeFrame", "TimeFrame", Val::Int(i.timeframe_ns)),
            (
                "DSV",
                "DSV",
                Val::Arr(
                    i.dsv
                        .into_iter()
                        .map(|(n, t)| Val::Obj(vec![("Name", "Name", Val::Str(n)), ("Type", "Type", Val::UInt(t as u64))]))
                        .collect(),
                ),
            ),
            ("RecordType", "RecordType", Val::Int(i.record_type)),
            ("ServerResp", "ServerResp", server_response(i.error)),
        ]));
    }
    Ok(Val::Obj(vec![("responses", "Responses", Val::Arr(out))]))
}

fn list_symbols(ctx: &ServerContext, caller: &Caller, f: Fields<'_>) -> Result<Val, RpcError> {
    let tbk = f.str("format", "Format")?.is_some_and(|s| s == "tbk");
    let list = dataservice::list_symbols(ctx, caller, tbk)?;
    Ok(Val::Obj(vec![("Results", "Results", Val::Arr(list.into_iter().map(Val::Str).collect()))]))
}
