//! Handler tests: the real router and gRPC service over an engine on a temporary directory.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use rmpv::Value;
use tonic::codegen::Service;

use crate::config::Config;
use crate::context::{ServerContext, VERSION};
use crate::engine::{Engine, EngineConfig, Policy};

use super::grpc::{pb, Marketstore};
use super::http_router;

fn ctx_with(dir: &std::path::Path, policy: Policy) -> Arc<ServerContext> {
    let mut cfg = EngineConfig::new(dir);
    cfg.policy = policy;
    let engine = Engine::open(cfg).unwrap();
    let ctx = ServerContext::new(engine, Config { root_directory: dir.to_path_buf(), ..Config::default() }, None);
    ctx.set_ready(true);
    ctx
}

fn ctx(dir: &std::path::Path) -> Arc<ServerContext> {
    ctx_with(dir, Policy::default())
}

async fn call(ctx: &Arc<ServerContext>, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut router = http_router(ctx.clone());
    let resp = router.call(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    (parts.status, parts.headers, bytes.to_vec())
}

fn mp(v: &Value) -> Vec<u8> {
    let mut o = Vec::new();
    rmpv::encode::write_value(&mut o, v).unwrap();
    o
}

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(pairs.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
}

async fn rpc(ctx: &Arc<ServerContext>, method: &str, params: Value) -> Value {
    let body = mp(&map(vec![
        ("method", Value::from(method)),
        ("id", Value::from("1")),
        ("jsonrpc", Value::from("2.0")),
        ("params", params),
    ]));
    let req = Request::post("/rpc").header("content-type", "application/x-msgpack").body(Body::from(body)).unwrap();
    let (status, headers, body) = call(ctx, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/x-msgpack");
    assert_eq!(headers["marketstore-version"], VERSION);
    rmpv::decode::read_value(&mut &body[..]).unwrap()
}

fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Value {
    Value::Binary(v.iter().flat_map(|x| f(*x)).collect())
}

fn write_params(tbk: &str, epochs: &[i64], close: &[f32], variable: bool) -> Value {
    map(vec![(
        "requests",
        Value::Array(vec![map(vec![
            (
                "dataset",
                map(vec![
                    ("types", Value::Array(vec![Value::from("i8"), Value::from("f4")])),
                    ("names", Value::Array(vec![Value::from("Epoch"), Value::from("Close")])),
                    ("data", Value::Array(vec![le(epochs, i64::to_le_bytes), le(close, f32::to_le_bytes)])),
                    ("length", Value::from(epochs.len() as i64)),
                    ("startindex", map(vec![(tbk, Value::from(0))])),
                    ("lengths", map(vec![(tbk, Value::from(epochs.len() as i64))])),
                ]),
            ),
            ("is_variable_length", Value::from(variable)),
        ])]),
    )])
}

fn query_params(dest: &str, extra: Vec<(&str, Value)>) -> Value {
    let mut q = vec![("destination", Value::from(dest))];
    q.extend(extra);
    map(vec![("requests", Value::Array(vec![map(q)]))])
}

#[tokio::test]
async fn head_is_405_with_version_and_unknown_type_is_415() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ctx(dir.path());
    let (status, headers, _) = call(&ctx, Request::head("/rpc").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(headers["marketstore-version"], VERSION);
    let (status, _, body) = call(&ctx, Request::get("/rpc").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(String::from_utf8(body).unwrap(), "rpc: POST method required, received GET");
    let req = Request::post("/rpc").header("content-type", "text/plain").body(Body::from("x")).unwrap();
    let (status, headers, body) = call(&ctx, req).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(headers["marketstore-version"], VERSION);
    assert_eq!(String::from_utf8(body).unwrap(), "rpc: unrecognized Content-Type: text/plain");
}

#[tokio::test]
async fn msgpack_write_query_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ctx(dir.path());
    let t0 = 1_704_067_200i64;
    let r = rpc(&ctx, "DataService.Write", write_params("AAPL/1Min/OHLCV", &[t0, t0 + 60, t0 + 120], &[1.5, 2.5, 3.5], false)).await;
    assert_eq!(r["result"]["responses"], Value::Nil, "{r}");
    assert_eq!(r["id"], Value::from("1"));

    let r = rpc(&ctx, "DataService.Query", query_params("AAPL/1Min/OHLCV", vec![("epoch_start", Value::from(t0 + 60))])).await;
    let res = &r["result"];
    assert_eq!(res["version"], Value::from(VERSION));
    assert_eq!(res["timezone"], Value::from("UTC"));
    let ds = &res["responses"][0]["result"];
    assert_eq!(ds["types"], Value::Array(vec![Value::from("i8"), Value::from("f4")]));
    assert_eq!(ds["names"], Value::Array(vec![Value::from("Epoch"), Value::from("Close")]));
    assert_eq!(ds["length"], Value::from(2));
    assert_eq!(ds["data"][0], le(&[t0 + 60, t0 + 120], i64::to_le_bytes));
    assert_eq!(ds["data"][1], le(&[2.5f32, 3.5], f32::to_le_bytes));
    let key = "AAPL/1Min/OHLCV:Symbol/Timeframe/AttributeGroup";
    assert_eq!(ds["startindex"], map(vec![(key, Value::from(0))]));
    assert_eq!(ds["lengths"], map(vec![(key, Value::from(2))]));

    // Missing bucket: a JSON-RPC error object with MarketStore's text, HTTP 200.
    let r = rpc(&ctx, "DataService.Query", query_params("MSFT/1Min/OHLCV", vec![])).await;
    assert_eq!(r["error"]["code"], Value::from(-32000));
    assert!(r["error"]["message"].as_str().unwrap().starts_with("no files returned from query parse"), "{r}");
    assert_eq!(r["error"]["data"], Value::Nil);

    // Bad write: per-request error, data unchanged.
    let r = rpc(&ctx, "DataService.Write", write_params("AAPL/1Min/OHLCV", &[t0], &[9.0], false)).await;
    assert_eq!(r["result"]["responses"], Value::Nil);
    let mut bad = write_params("AAPL/1Min/OHLCV", &[t0], &[9.0], false);
    if let Value::Map(m) = &mut bad
        && let Value::Array(a) = &mut m[0].1
        && let Value::Map(fields) = &mut a[0]
        && let Value::Map(ds) = &mut fields[0].1
    {
        ds[1].1 = Value::Array(vec![Value::from("Epoch"), Value::from("Bogus")]);
    }
    let r = rpc(&ctx, "DataService.Write", bad).await;
    let errs = r["result"]["responses"].as_array().unwrap();
    assert_eq!(errs.len(), 1);
    assert!(errs[0]["error"].as_str().unwrap().contains("unable to match data columns"), "{r}");
    let r = rpc(&ctx, "DataService.Query", query_params("AAPL/1Min/OHLCV", vec![("limit_record_count", Value::from(1)), ("limit_from_start", Value::from(true))])).await;
    assert_eq!(r["result"]["responses"][0]["result"]["data"][1], le(&[9.0f32], f32::to_le_bytes));
}

#[tokio::test]
async fn notification_has_no_body_and_envelope_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ctx(dir.path());
    let body = mp(&map(vec![
        ("method", Value::from("DataService.ListSymbols")),
        ("jsonrpc", Value::from("2.0")),
        ("params", map(vec![])),
    ]));
    let req = Request::post("/rpc").header("content-type", "application/x-msgpack").body(Body::from(body)).unwrap();
    let (status, _, body) = call(&ctx, req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());

    // The id keeps its msgpack type (here an integer).
    let body = mp(&map(vec![("method", Value::from("DataService.Nope")), ("jsonrpc", Value::from("2.0")), ("id", Value::from(7))]));
    let req = Request::post("/rpc").header("content-type", "application/x-msgpack").body(Body::from(body)).unwrap();
    let (_, _, body) = call(&ctx, req).await;
    let r = rmpv::decode::read_value(&mut &body[..]).unwrap();
    assert_eq!(r["id"], Value::from(7));
    assert_eq!(r["error"]["message"], Value::from("rpc: can't find method \"DataService.Nope\""));

    let body = mp(&map(vec![("method", Value::from("DataService.Query")), ("jsonrpc", Value::from("1.0")), ("id", Value::from("x"))]));
    let req = Request::post("/rpc").header("content-type", "application/x-msgpack").body(Body::from(body)).unwrap();
    let (_, _, body) = call(&ctx, req).await;
    let r = rmpv::decode::read_value(&mut &body[..]).unwrap();
    assert_eq!(r["error"]["code"], Value::from(-32600));
    assert_eq!(r["error"]["message"], Value::from("jsonrpc must be 2.0"));
}

#[tokio::test]
async fn json_codec_uses_go_field_names() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ctx(dir.path());
    let t0 = 1_704_067_200i64;
    rpc(&ctx, "DataService.Write", write_params("TSLA/1Min/OHLCV", &[t0], &[4.25], false)).await;
    let body = serde_json::json!({
        "jsonrpc": "2.0", "method": "DataService.Query", "id": 1,
        "params": {"Requests": [{"destination": "TSLA/1Min/OHLCV", "LimitRecordCount": 5}]}
    });
    let req = Request::post("/rpc")
        .header("content-type", "application/json; charset=UTF-8")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    let (status, headers, body) = call(&ctx, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json; charset=utf-8");
    let r: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(r["id"], 1);
    let ds = &r["result"]["Responses"][0]["Result"];
    assert_eq!(ds["ColumnNames"], serde_json::json!(["Epoch", "Close"]));
    assert_eq!(ds["Length"], 1);
    let b64 = |b: &[u8]| super::value::base64_encode(b);
    assert_eq!(ds["ColumnData"][0], b64(&t0.to_le_bytes()));
    assert_eq!(ds["ColumnData"][1], b64(&4.25f32.to_le_bytes()));
    assert_eq!(r["result"]["Timezone"], "UTC");

    // A JSON write (base64 columns) and ListSymbols with the Go key `Results`.
    let body = serde_json::json!({
        "jsonrpc": "2.0", "method": "DataService.Write", "id": "w",
        "params": [{"Requests": [{"Data": {
            "ColumnTypes": ["i8", "f4"], "ColumnNames": ["Epoch", "Close"],
            "ColumnData": [b64(&(t0 + 60).to_le_bytes()), b64(&5.5f32.to_le_bytes())],
            "Length": 1, "StartIndex": {"NVDA/1Min/OHLCV": 0}, "Lengths": {"NVDA/1Min/OHLCV": 1}
        }, "IsVariableLength": false}]}]
    });
    let req = Request::post("/rpc").header("content-type", "application/json").body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap();
    let (_, _, body) = call(&ctx, req).await;
    let r: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(r["result"]["Responses"], serde_json::Value::Null, "{r}");
    let r = rpc(&ctx, "DataService.ListSymbols", map(vec![("format", Value::from("tbk"))])).await;
    assert_eq!(r["result"]["Results"], Value::Array(vec![Value::from("NVDA/1Min/OHLCV"), Value::from("TSLA/1Min/OHLCV")]));
}

#[tokio::test]
async fn create_getinfo_destroy_and_policy_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ctx(dir.path());
    let create = |key: &str, variable: &str| {
        map(vec![(
            "requests",
            Value::Array(vec![map(vec![
                ("key", Value::from(key)),
                ("column_names", Value::Array(vec![Value::from("Epoch"), Value::from("Bid"), Value::from("Sym")])),
                ("column_types", Value::Array(vec![Value::from("i8"), Value::from("f8"), Value::from("U16")])),
                ("row_type", Value::from(variable)),
            ])]),
        )])
    };
    let r = rpc(&ctx, "DataService.Create", create("BTC/1Sec/TICK:Symbol/Timeframe/AttributeGroup", "variable")).await;
    assert_eq!(r["result"]["responses"][0]["error"], Value::from(""), "{r}");
    let r = rpc(&ctx, "DataService.Create", create("ETH/1Sec/TICK", "fixed")).await;
    assert!(r["result"]["responses"][0]["error"].as_str().unwrap().starts_with("key \"ETH/1Sec/TICK\" is not in proper format"));
    let r = rpc(&ctx, "DataService.GetInfo", map(vec![("requests", Value::Array(vec![map(vec![("key", Value::from("BTC/1Sec/TICK"))])]))])).await;
    let info = &r["result"]["responses"][0];
    assert_eq!(info["RecordType"], Value::from(1));
    assert_eq!(info["TimeFrame"], Value::from(1_000_000_000i64));
    assert_eq!(info["DSV"][1], map(vec![("Name", Value::from("Bid")), ("Type", Value::from(2))]));
    assert_eq!(info["ServerResp"]["error"], Value::from(""));
    let r = rpc(&ctx, "DataService.Destroy", map(vec![("requests", Value::Array(vec![map(vec![("key", Value::from("BTC/1Sec/TICK"))])]))])).await;
    assert_eq!(r["result"]["responses"][0]["error"], Value::from(""));
    let r = rpc(&ctx, "DataService.Destroy", map(vec![("requests", Value::Array(vec![map(vec![("key", Value::from("BTC/1Sec/TICK"))])]))])).await;
    assert_eq!(
        r["result"]["responses"][0]["error"],
        Value::from("removal of catalog entry failed: Unable to find level item: BTC in directory")
    );

    // enable_add / queryable refusals surface per request and as a JSON-RPC error.
    let dir2 = tempfile::tempdir().unwrap();
    let locked = ctx_with(dir2.path(), Policy { enable_add: false, enable_remove: false, queryable: false });
    let r = rpc(&locked, "DataService.Write", write_params("AAPL/1Min/OHLCV", &[1_704_067_200], &[1.0], false)).await;
    assert!(r["result"]["responses"][0]["error"].as_str().unwrap().contains("enable_add: false"), "{r}");
    let r = rpc(&locked, "DataService.ListSymbols", map(vec![])).await;
    assert_eq!(r["error"]["message"], Value::from("server is not queryable"));
}

#[tokio::test]
async fn heartbeat_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ctx(dir.path());
    rpc(&ctx, "DataService.ListSymbols", map(vec![])).await;
    let (status, _, body) = call(&ctx, Request::get("/heartbeat").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let hb: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(hb["status"], "queryable");
    assert_eq!(hb["version"], VERSION);
    let (status, _, body) = call(&ctx, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("alpaca_marketstore_rpc_successful_request_duration_seconds_count{method=\"ListSymbols\"} 1\n"), "{text}");
    assert!(text.contains("alpaca_marketstore_total_disk_usage_bytes "));
    ctx.set_ready(false);
    let (status, _, body) = call(&ctx, Request::get("/heartbeat").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["status"], "not queryable");
}

#[tokio::test]
async fn grpc_service_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ctx(dir.path());
    let svc = super::grpc::MarketstoreGrpc::for_tests(ctx.clone());
    let t0 = 1_704_067_200i64;
    let ds = pb::NumpyMultiDataset {
        data: Some(pb::NumpyDataset {
            column_types: vec!["i8".into(), "f8".into()],
            column_names: vec!["Epoch".into(), "Ask".into()],
            column_data: vec![
                [t0, t0 + 1].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into(),
                [1.25f64, 2.5].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into(),
            ],
            length: 2,
            data_shapes: vec![],
        }),
        start_index: [("EUR/1Sec/FX".to_string(), 0)].into(),
        lengths: [("EUR/1Sec/FX".to_string(), 2)].into(),
    };
    let w = svc
        .write(tonic::Request::new(pb::MultiWriteRequest { requests: vec![pb::WriteRequest { data: Some(ds), is_variable_length: false }] }))
        .await
        .unwrap()
        .into_inner();
    assert!(w.responses.is_empty(), "{w:?}");
    let q = pb::QueryRequest { destination: "EUR/1Sec/FX".into(), epoch_end: 0, limit_record_count: 1, ..Default::default() };
    let r = svc.query(tonic::Request::new(pb::MultiQueryRequest { requests: vec![q] })).await.unwrap().into_inner();
    let res = r.responses[0].result.as_ref().unwrap();
    let d = res.data.as_ref().unwrap();
    assert_eq!(d.length, 1);
    assert_eq!(&d.column_data[0][..], &(t0 + 1).to_le_bytes());
    assert_eq!(&d.column_data[1][..], &2.5f64.to_le_bytes());
    assert_eq!(res.start_index["EUR/1Sec/FX:Symbol/Timeframe/AttributeGroup"], 0);
    let missing = pb::QueryRequest { destination: "NOPE/1Sec/FX".into(), ..Default::default() };
    let e = svc.query(tonic::Request::new(pb::MultiQueryRequest { requests: vec![missing] })).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unknown);
    assert!(e.message().starts_with("no files returned from query parse"));
    let l = svc.list_symbols(tonic::Request::new(pb::ListSymbolsRequest { format: 1 })).await.unwrap().into_inner();
    assert_eq!(l.results, vec!["EUR/1Sec/FX".to_string()]);
    let v = svc.server_version(tonic::Request::new(pb::ServerVersionRequest {})).await.unwrap().into_inner();
    assert_eq!(v.version, VERSION);
}

#[tokio::test]
async fn ws_hub_drops_a_client_that_falls_behind_without_blocking() {
    use arrow::array::{Float32Array, RecordBatch, TimestampSecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use crate::engine::{AppendEvent, BucketKey, KeyPattern};
    use super::ws::{WsHub, CLIENT_QUEUE};

    let dir = tempfile::tempdir().unwrap();
    let ctx = ctx(dir.path());
    let hub = WsHub::new(ctx.clone());
    let all = Arc::new(parking_lot::RwLock::new(vec![KeyPattern::parse("*/*/*").unwrap()]));
    let other = Arc::new(parking_lot::RwLock::new(vec![KeyPattern::parse("MSFT/*/*").unwrap()]));
    let mut slow_rx = hub.register(all, "slow".into()).rx;
    let mut other_rx = hub.register(other, "other".into()).rx;
    let schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Timestamp(TimeUnit::Second, Some("UTC".into())), false),
        Field::new("Close", DataType::Float32, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![Arc::new(TimestampSecondArray::from(vec![60, 120]).with_timezone("UTC")), Arc::new(Float32Array::from(vec![1.0, 2.0]))],
    )
    .unwrap();
    let ev = AppendEvent { key: BucketKey::parse("AAPL/1Min/OHLCV").unwrap(), lsn: 1, batch };
    let t0 = std::time::Instant::now();
    for _ in 0..CLIENT_QUEUE + 5 {
        hub.publish(&ev);
    }
    assert!(t0.elapsed() < std::time::Duration::from_secs(2));
    // The slow client was disconnected (its queue closes after the buffered frames); the other stays.
    assert_eq!(hub.clients(), 1);
    let mut got = 0;
    while let Some(f) = slow_rx.recv().await {
        if got == 0 {
            let v = rmpv::decode::read_value(&mut &f[..]).unwrap();
            assert_eq!(v["key"], Value::from("AAPL/1Min/OHLCV"));
            assert_eq!(v["data"]["Epoch"], Value::from(120));
            assert_eq!(v["data"]["Close"], Value::F32(2.0));
        }
        got += 1;
    }
    assert_eq!(got, CLIENT_QUEUE);
    assert!(other_rx.try_recv().is_err(), "non-matching client got a frame");
    let text = ctx.metrics.render(&Default::default());
    assert!(text.contains("mkts_ws_dropped_clients_total 1\n"), "{text}");
}
