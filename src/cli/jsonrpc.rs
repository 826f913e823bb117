//! The JSON-RPC side of `mkts connect --url http://host:5993` (and `import`/`export`): MarketStore's msgpack
//! `/rpc` protocol, the one pymarketstore and MarketStore's own `connect --url` speak, so the shell works
//! against the HTTP port of mkts or of a MarketStore server.
//!
//! Each call is one HTTP POST of a msgpack JSON-RPC 2.0 envelope (`DataService.<Method>`); a JSON-RPC error
//! becomes an error carrying the server's message. Results in MarketStore's `NumpyMultiDataset` form are
//! decoded with the server's own codec ([`crate::compat::numpy`]) and `Epoch` is shown as a timestamp.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use arrow::array::{Array, ArrayRef, AsArray, Int32Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use rmpv::Value;

use super::connect::RemoteArgs;
use crate::compat::numpy::{self, NumpyIn, Part};
use crate::compat::value::{self as wire, Codec, Fields};
use crate::engine::{BucketKey, BucketSchema, ColumnDef, ColumnType, RecordKind, EPOCH, NANOSECONDS};

/// Largest reply body accepted (a whole query result travels in one reply).
const MAX_REPLY: u64 = 1 << 30;
/// MarketStore's key categories, which its `Create` requires after the key.
const CATEGORIES: &str = "Symbol/Timeframe/AttributeGroup";

/// A connection to a server's `/rpc` endpoint.
#[derive(Clone)]
pub struct RpcClient {
    agent: ureq::Agent,
    /// The full endpoint, e.g. `http://localhost:5993/rpc`.
    url: String,
    /// `Basic …` when `--user` is given.
    authorization: Option<String>,
}

/// The `/rpc` endpoint of a `http://` / `https://` url: its own path, or `/rpc` when it has none.
pub fn endpoint(url: &str) -> String {
    let u = url.trim().trim_end_matches('/');
    let after_scheme = u.split_once("://").map(|(_, r)| r).unwrap_or(u);
    if after_scheme.contains('/') {
        u.to_string()
    } else {
        format!("{u}/rpc")
    }
}

fn tls_config(remote: &RemoteArgs) -> anyhow::Result<ureq::tls::TlsConfig> {
    let mut b = ureq::tls::TlsConfig::builder();
    if let Some(ca) = &remote.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read --ca-file {}", ca.display()))?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            if let ureq::tls::PemItem::Certificate(c) = item.with_context(|| format!("--ca-file {}", ca.display()))? {
                certs.push(c);
            }
        }
        if certs.is_empty() {
            bail!("--ca-file {} holds no certificate", ca.display());
        }
        b = b.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    Ok(b.build())
}

impl RpcClient {
    /// A client for `url` (`http://host:port[/path]` or `https://…`), authenticating with HTTP Basic when
    /// `remote.user` is set (password from `MKTS_PASSWORD` or asked for), trusting `remote.ca_file` for
    /// `https://`. Nothing is sent until the first call.
    pub fn new(url: &str, remote: &RemoteArgs) -> anyhow::Result<RpcClient> {
        let url = endpoint(url);
        let tls = url.starts_with("https://");
        if !tls && remote.ca_file.is_some() {
            bail!("--ca-file needs a TLS url (https://host:port or grpc+tls://host:port)");
        }
        let mut cfg = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .user_agent(format!("mkts-connect/{}", crate::context::VERSION));
        if tls {
            cfg = cfg.tls_config(tls_config(remote)?);
        }
        let agent: ureq::Agent = cfg.build().into();
        let authorization = match &remote.user {
            Some(user) => {
                let password = match std::env::var("MKTS_PASSWORD") {
                    Ok(p) => p,
                    Err(_) => crate::cli::read_password(&format!("password for {user}: "))?,
                };
                Some(format!("Basic {}", wire::base64_encode(format!("{user}:{password}").as_bytes())))
            }
            None => None,
        };
        Ok(RpcClient { agent, url, authorization })
    }

    /// The endpoint this client posts to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Call `DataService.<method>` with `params`; its `result`, or the server's error message.
    pub async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let me = self.clone();
        let method = format!("DataService.{method}");
        tokio::task::spawn_blocking(move || me.call_blocking(&method, params)).await.map_err(|e| anyhow!("JSON-RPC call: {e}"))?
    }

    fn call_blocking(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let envelope = Value::Map(vec![
            ("jsonrpc".into(), "2.0".into()),
            ("method".into(), method.into()),
            ("id".into(), "1".into()),
            ("params".into(), params),
        ]);
        let mut body = Vec::new();
        rmpv::encode::write_value(&mut body, &envelope).map_err(|e| anyhow!("encoding {method}: {e}"))?;
        let mut req = self.agent.post(&self.url).header("Content-Type", "application/x-msgpack");
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a);
        }
        let mut resp = req.send(&body[..]).map_err(|e| anyhow!("cannot reach {}: {e}", self.url))?;
        let status = resp.status().as_u16();
        let bytes = resp.body_mut().with_config().limit(MAX_REPLY).read_to_vec().map_err(|e| anyhow!("reading the reply of {}: {e}", self.url))?;
        match status {
            200 => {}
            401 => bail!("authentication failed at {} (HTTP 401): give --user (password in MKTS_PASSWORD)", self.url),
            _ => {
                let text = String::from_utf8_lossy(&bytes[..bytes.len().min(500)]).trim().to_string();
                bail!("{} answered HTTP {status}: {text}", self.url)
            }
        }
        let reply = rmpv::decode::read_value(&mut &bytes[..]).map_err(|e| anyhow!("{} sent a reply that is not msgpack: {e}", self.url))?;
        let f = Fields::of(&reply, Codec::Msgpack, "reply").map_err(|e| anyhow!("{}: {e}", self.url))?;
        if let Some(err) = f.get("error", "Error") {
            let msg = Fields::of(err, Codec::Msgpack, "error").ok().and_then(|e| e.get("message", "Message")).and_then(wire::as_string);
            bail!("{}", msg.unwrap_or_else(|| wire::msgpack_to_json(err).to_string()));
        }
        Ok(f.get("result", "Result").cloned().unwrap_or(Value::Nil))
    }

    /// One `DataService.Query` request (a map of MarketStore's `QueryRequest` keys): every keyed part of
    /// its result as a batch, `Epoch` as `timestamp[s, UTC]`.
    pub async fn query(&self, request: Vec<(&str, Value)>) -> anyhow::Result<(SchemaRef, Vec<RecordBatch>)> {
        let req = Value::Map(request.into_iter().map(|(k, v)| (k.into(), v)).collect());
        let result = self.call("Query", requests(vec![req])).await?;
        let responses = list(&result, "responses")?;
        let first = responses.first().ok_or_else(|| anyhow!("Query: the reply holds no response"))?;
        let ds = Fields::of(first, Codec::Msgpack, "response").and_then(|r| r.get("result", "Result").map(|v| Fields::of(v, Codec::Msgpack, "result")).transpose());
        let Some(ds) = ds.map_err(|e| anyhow!("Query: {e}"))? else { return Ok((Arc::new(Schema::empty()), Vec::new())) };
        decode_dataset(&ds)
    }

    /// `DataService.Create` of one bucket.
    pub async fn create(&self, key: &BucketKey, schema: &BucketSchema) -> anyhow::Result<()> {
        let variable = schema.kind == RecordKind::Variable;
        let names: Vec<Value> = schema.columns.iter().map(|c| c.name.as_str().into()).collect();
        let types: Vec<Value> = schema.columns.iter().map(|c| c.ty.wire_name().into()).collect();
        let req = Value::Map(vec![
            ("key".into(), format!("{key}:{CATEGORIES}").into()),
            ("column_names".into(), Value::Array(names)),
            ("column_types".into(), Value::Array(types)),
            ("is_variable_length".into(), variable.into()),
            ("row_type".into(), if variable { "variable" } else { "fixed" }.into()),
        ]);
        server_errors(&self.call("Create", requests(vec![req])).await?)
    }

    /// `DataService.Destroy` of one bucket.
    pub async fn destroy(&self, key: &BucketKey) -> anyhow::Result<()> {
        let req = Value::Map(vec![("key".into(), key.to_string().into())]);
        server_errors(&self.call("Destroy", requests(vec![req])).await?)
    }

    /// `DataService.GetInfo` of one bucket: `Ok(Err(message))` when the server answers with an error for it
    /// (MarketStore's reply does not tell a missing bucket from another failure: callers that look for a
    /// bucket read either as absent, `\getinfo` shows the message).
    pub async fn info(&self, key: &BucketKey) -> anyhow::Result<Result<RpcInfo, String>> {
        let req = Value::Map(vec![("key".into(), key.to_string().into())]);
        let result = self.call("GetInfo", requests(vec![req])).await?;
        let responses = list(&result, "responses")?;
        let r = responses.first().ok_or_else(|| anyhow!("GetInfo: the reply holds no response"))?;
        let r = Fields::of(r, Codec::Msgpack, "GetInfo response").map_err(|e| anyhow!("{e}"))?;
        let error = r.get("ServerResp", "ServerResp").and_then(|s| Fields::of(s, Codec::Msgpack, "ServerResp").ok()).and_then(|s| s.get("error", "Error")).and_then(wire::as_string).unwrap_or_default();
        if !error.is_empty() {
            return Ok(Err(error));
        }
        let mut columns = Vec::new();
        for d in r.array("DSV", "DSV").map_err(|e| anyhow!("GetInfo: {e}"))?.unwrap_or_default() {
            let d = Fields::of(d, Codec::Msgpack, "DSV").map_err(|e| anyhow!("GetInfo: {e}"))?;
            let name = d.str("Name", "Name").map_err(|e| anyhow!("GetInfo: {e}"))?.unwrap_or_default().to_string();
            let code = d.i64("Type", "Type").map_err(|e| anyhow!("GetInfo: {e}"))?.unwrap_or(-1);
            if name == EPOCH || name == NANOSECONDS {
                continue;
            }
            let ty = u8::try_from(code).ok().and_then(ColumnType::from_marketstore_code).ok_or_else(|| anyhow!("GetInfo: column {name:?} has type code {code}, which mkts cannot store"))?;
            columns.push(ColumnDef::new(name, ty));
        }
        let kind = if r.i64("RecordType", "RecordType").map_err(|e| anyhow!("GetInfo: {e}"))? == Some(1) { RecordKind::Variable } else { RecordKind::Fixed };
        Ok(Ok(RpcInfo {
            schema: BucketSchema { kind, columns },
            latest_year: r.i64("LatestYear", "LatestYear").map_err(|e| anyhow!("GetInfo: {e}"))?.unwrap_or(0),
            timeframe_ns: r.i64("TimeFrame", "TimeFrame").map_err(|e| anyhow!("GetInfo: {e}"))?.unwrap_or(0),
        }))
    }

    /// `DataService.ListSymbols` with `format: tbk`: every bucket key.
    pub async fn keys(&self) -> anyhow::Result<Vec<String>> {
        let result = self.call("ListSymbols", Value::Map(vec![("format".into(), "tbk".into())])).await?;
        let f = Fields::of(&result, Codec::Msgpack, "ListSymbols reply").map_err(|e| anyhow!("{e}"))?;
        Ok(f.strings("Results", "Results").map_err(|e| anyhow!("ListSymbols: {e}"))?.unwrap_or_default())
    }

    /// `DataService.Write` of one batch to `key` (created by the server when absent, as a fixed bucket
    /// unless `variable`). `Epoch` may be a timestamp of any unit; for a variable-length bucket its
    /// sub-second part travels as `Nanoseconds`, as MarketStore's loader sends it; a fixed bucket gets whole
    /// seconds. Returns the rows sent.
    pub async fn write(&self, key: &BucketKey, batch: &RecordBatch, variable: bool) -> anyhow::Result<usize> {
        let batch = wire_batch(batch, variable)?;
        let rows = batch.num_rows();
        let out = numpy::pack(vec![Part { key: key.to_string(), schema: batch.schema(), batches: vec![batch] }]).map_err(|e| anyhow!("{e}"))?;
        let data: Vec<Value> = out.column_bytes().into_iter().map(|b| Value::Binary(b.to_vec())).collect();
        let ds = Value::Map(vec![
            ("types".into(), Value::Array(out.types.iter().map(|t| t.as_str().into()).collect())),
            ("names".into(), Value::Array(out.names.iter().map(|t| t.as_str().into()).collect())),
            ("data".into(), Value::Array(data)),
            ("length".into(), (out.length as i64).into()),
            ("startindex".into(), Value::Map(vec![(key.to_string().into(), 0.into())])),
            ("lengths".into(), Value::Map(vec![(key.to_string().into(), (rows as i64).into())])),
        ]);
        let req = Value::Map(vec![("dataset".into(), ds), ("is_variable_length".into(), variable.into())]);
        server_errors(&self.call("Write", requests(vec![req])).await?)?;
        Ok(rows)
    }
}

/// What `GetInfo` says of a bucket.
#[derive(Debug, Clone)]
pub struct RpcInfo {
    pub schema: BucketSchema,
    pub latest_year: i64,
    pub timeframe_ns: i64,
}

fn requests(v: Vec<Value>) -> Value {
    Value::Map(vec![("requests".into(), Value::Array(v))])
}

fn list<'a>(v: &'a Value, key: &str) -> anyhow::Result<&'a [Value]> {
    let f = Fields::of(v, Codec::Msgpack, "reply").map_err(|e| anyhow!("{e}"))?;
    Ok(f.array(key, key).map_err(|e| anyhow!("{e}"))?.unwrap_or_default())
}

/// The per-request errors of a `MultiServerResponse` (`responses` nil or entries with `error`), joined.
fn server_errors(result: &Value) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    for r in list(result, "responses")? {
        let e = Fields::of(r, Codec::Msgpack, "response").ok().and_then(|f| f.get("error", "Error")).and_then(wire::as_string).unwrap_or_default();
        if !e.is_empty() {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("; "))
    }
}

/// A `NumpyMultiDataset` as one schema and its batches (one per key, in the server's order).
fn decode_dataset(ds: &Fields<'_>) -> anyhow::Result<(SchemaRef, Vec<RecordBatch>)> {
    let e = |e: wire::ParamError| anyhow!("bad dataset in the reply: {e}");
    let input = NumpyIn {
        types: ds.strings("types", "ColumnTypes").map_err(e)?.unwrap_or_default(),
        names: ds.strings("names", "ColumnNames").map_err(e)?.unwrap_or_default(),
        data: ds.blobs("data", "ColumnData").map_err(e)?.unwrap_or_default(),
        length: ds.i64("length", "Length").map_err(e)?.unwrap_or(0),
        start_index: ds.int_map("startindex", "StartIndex").map_err(e)?.unwrap_or_default(),
        lengths: ds.int_map("lengths", "Lengths").map_err(e)?.unwrap_or_default(),
    };
    let parts = numpy::unpack_reply(&input).map_err(|m| anyhow!("bad dataset in the reply: {m}"))?;
    let batches = parts.into_iter().map(|(_, b)| epoch_as_timestamp(b)).collect::<anyhow::Result<Vec<_>>>()?;
    let schema = match batches.first() {
        Some(b) => b.schema(),
        // No rows: the columns as named and typed.
        None => Arc::new(Schema::new(
            input
                .names
                .iter()
                .zip(&input.types)
                .map(|(n, t)| {
                    let ty = if n == EPOCH { crate::engine::epoch_type() } else { ColumnType::from_wire(t).map(ColumnType::arrow_type).unwrap_or(DataType::Utf8) };
                    Field::new(n, ty, false)
                })
                .collect::<Vec<_>>(),
        )),
    };
    Ok((schema, batches))
}

/// `Epoch` (int64 seconds on the wire) as `timestamp[s, UTC]`, as the other modes show it.
fn epoch_as_timestamp(b: RecordBatch) -> anyhow::Result<RecordBatch> {
    let Some(i) = b.schema().index_of(EPOCH).ok() else { return Ok(b) };
    let schema = b.schema();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut cols = b.columns().to_vec();
    cols[i] = cast(&cols[i], &crate::engine::epoch_type())?;
    fields[i] = Field::new(EPOCH, crate::engine::epoch_type(), false);
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
}

/// A batch as MarketStore's Write takes it: `Epoch` int64 seconds, plus `Nanoseconds` (int32) for a
/// variable-length bucket when the batch has none.
fn wire_batch(b: &RecordBatch, variable: bool) -> anyhow::Result<RecordBatch> {
    let schema = b.schema();
    let i = schema.index_of(EPOCH).map_err(|_| anyhow!("the rows have no Epoch column"))?;
    let epoch = b.column(i);
    let per_second: i64 = match epoch.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) | DataType::Int64 => 1,
        DataType::Timestamp(TimeUnit::Millisecond, _) => 1_000,
        DataType::Timestamp(TimeUnit::Microsecond, _) => 1_000_000,
        DataType::Timestamp(TimeUnit::Nanosecond, _) => 1_000_000_000,
        other => bail!("Epoch has type {other}; expected int64 seconds or a timestamp"),
    };
    let raw = cast(epoch, &DataType::Int64)?;
    let raw = raw.as_primitive::<arrow::datatypes::Int64Type>();
    if raw.null_count() > 0 {
        bail!("Epoch has empty values");
    }
    let secs: ArrayRef = Arc::new(arrow::array::Int64Array::from_iter_values(raw.values().iter().map(|v| v.div_euclid(per_second))));
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut cols = b.columns().to_vec();
    fields[i] = Field::new(EPOCH, DataType::Int64, false);
    cols[i] = secs;
    if variable && schema.index_of(NANOSECONDS).is_err() {
        let scale = 1_000_000_000 / per_second;
        let ns = Int32Array::from_iter_values(raw.values().iter().map(|v| (v.rem_euclid(per_second) * scale) as i32));
        fields.push(Field::new(NANOSECONDS, DataType::Int32, false));
        cols.push(Arc::new(ns));
    }
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_appends_rpc_only_without_a_path() {
        assert_eq!(endpoint("http://localhost:5993"), "http://localhost:5993/rpc");
        assert_eq!(endpoint("http://localhost:5993/"), "http://localhost:5993/rpc");
        assert_eq!(endpoint("https://h:1/rpc"), "https://h:1/rpc");
        assert_eq!(endpoint("http://h:1/mkts/rpc"), "http://h:1/mkts/rpc");
    }

    #[test]
    fn write_batches_carry_seconds_and_nanoseconds_for_ticks() {
        let ts = arrow::array::TimestampNanosecondArray::from(vec![1_704_067_200_250_000_000i64, -1]).with_timezone("UTC");
        let price = arrow::array::Float64Array::from(vec![1.5, 2.5]);
        let schema = Arc::new(Schema::new(vec![
            Field::new(EPOCH, ts.data_type().clone(), false),
            Field::new("Price", DataType::Float64, false),
        ]));
        let b = RecordBatch::try_new(schema, vec![Arc::new(ts), Arc::new(price)]).expect("batch");
        let w = wire_batch(&b, true).expect("variable");
        let names: Vec<String> = w.schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["Epoch", "Price", "Nanoseconds"]);
        assert_eq!(w.column(0).as_primitive::<arrow::datatypes::Int64Type>().values().to_vec(), vec![1_704_067_200, -1]);
        assert_eq!(w.column(2).as_primitive::<arrow::datatypes::Int32Type>().values().to_vec(), vec![250_000_000, 999_999_999]);
        let w = wire_batch(&b, false).expect("fixed");
        assert_eq!(w.num_columns(), 2);
    }
}
