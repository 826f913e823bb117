//! The `/api/` and console routes over a real engine on a temporary directory, through their routers as
//! `mkts start` merges them into `listen_port`'s (`crate::server::http_router`).

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Float64Array, Int64Array, RecordBatch, TimestampSecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use futures::StreamExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::config::{AuthConfig, Config, Secret, UserConfig};
use crate::context::ServerContext;
use crate::engine::{BucketKey, Engine, EngineConfig};
use crate::service::{Caller, Interface, Role, WriteRequest};

const T0: i64 = 1_704_187_800; // 2024-01-02T09:30:00Z

fn ctx(dir: &std::path::Path, auth: Option<AuthConfig>) -> Arc<ServerContext> {
    let engine = Engine::open(EngineConfig::new(dir)).unwrap();
    let authenticator = auth.as_ref().map(|a| crate::auth::Authenticator::new(a).unwrap());
    let ctx = ServerContext::new(engine, Config { root_directory: dir.to_path_buf(), auth, ..Config::default() }, authenticator);
    ctx.set_ready(true);
    ctx
}

/// `n` one-minute bars from T0: Open = 100 + i, High = Open + 2, Low = Open - 1, Close = Open + 0.5.
fn bars(from: i64, n: i64) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Timestamp(TimeUnit::Second, Some("UTC".into())), false),
        Field::new("Open", DataType::Float64, false),
        Field::new("High", DataType::Float64, false),
        Field::new("Low", DataType::Float64, false),
        Field::new("Close", DataType::Float64, false),
        Field::new("Volume", DataType::Int64, false),
    ]));
    let i: Vec<i64> = (from..from + n).collect();
    let open: Vec<f64> = i.iter().map(|i| 100.0 + *i as f64).collect();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(TimestampSecondArray::from(i.iter().map(|i| T0 + 60 * i).collect::<Vec<_>>()).with_timezone("UTC")),
            Arc::new(Float64Array::from(open.clone())),
            Arc::new(Float64Array::from(open.iter().map(|o| o + 2.0).collect::<Vec<_>>())),
            Arc::new(Float64Array::from(open.iter().map(|o| o - 1.0).collect::<Vec<_>>())),
            Arc::new(Float64Array::from(open.iter().map(|o| o + 0.5).collect::<Vec<_>>())),
            Arc::new(Int64Array::from(i.iter().map(|i| 1000 + i).collect::<Vec<_>>())),
        ],
    )
    .unwrap()
}

async fn write(ctx: &ServerContext, from: i64, n: i64) {
    let key = BucketKey::parse("AAPL/1Min/OHLCV").unwrap();
    ctx.service.write(&Caller::anonymous(Interface::Cli), &WriteRequest::new(key, bars(from, n))).await.unwrap();
}

fn router(ctx: &Arc<ServerContext>) -> axum::Router {
    super::router(ctx.clone()).merge(crate::console::router(ctx.auth.clone()))
}

async fn call(ctx: &Arc<ServerContext>, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = router(ctx).oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (parts.status, parts.headers, axum::body::to_bytes(body, usize::MAX).await.unwrap().to_vec())
}

async fn get(ctx: &Arc<ServerContext>, uri: &str) -> (StatusCode, Value) {
    let (status, headers, body) = call(ctx, Request::get(uri).body(Body::empty()).unwrap()).await;
    assert!(headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("application/json"), "{uri}: {headers:?}");
    (status, serde_json::from_slice(&body).unwrap())
}

async fn sql(ctx: &Arc<ServerContext>, body: &str) -> (StatusCode, Value) {
    let req = Request::post("/api/sql").header(header::CONTENT_TYPE, "application/json").body(Body::from(body.to_string())).unwrap();
    let (status, _, body) = call(ctx, req).await;
    (status, serde_json::from_slice(&body).unwrap())
}

fn error_code(v: &Value) -> (&str, u64) {
    (v["error"]["code"].as_str().unwrap(), v["error"]["status"].as_u64().unwrap())
}

#[tokio::test]
async fn catalog_and_query_answer_json_and_bad_input_is_a_json_error() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ctx(dir.path(), None);
    write(&ctx, 0, 30).await;

    let (s, v) = get(&ctx, "/api/buckets").await;
    assert_eq!(s, StatusCode::OK);
    let b = &v["buckets"][0];
    assert_eq!((b["key"].as_str(), b["rows"].as_u64(), b["ohlc"].as_bool()), (Some("AAPL/1Min/OHLCV"), Some(30), Some(true)));
    assert_eq!(b["columns"][0], json!({"name": "Open", "type": "f8"}));
    assert_eq!((b["years"].clone(), b["first_epoch"].as_i64(), b["last_epoch"].as_i64()), (json!([2024]), Some(T0), Some(T0 + 29 * 60)));
    assert!(b["size_bytes"].as_u64().unwrap() > 0);
    let (s, one) = get(&ctx, "/api/buckets/AAPL/1Min/OHLCV").await;
    assert_eq!((s, &one), (StatusCode::OK, b));
    let (s, enc) = get(&ctx, "/api/buckets/AAPL%2F1Min%2FOHLCV").await;
    assert_eq!((s, enc["rows"].as_u64()), (StatusCode::OK, Some(30)));

    let (s, v) = get(&ctx, "/api/buckets/NOPE/1Min/OHLCV").await;
    assert_eq!((s, error_code(&v)), (StatusCode::NOT_FOUND, ("not_found", 404)));
    assert!(v["error"]["message"].as_str().unwrap().contains("NOPE/1Min/OHLCV"), "{v}");
    let (s, v) = get(&ctx, "/api/buckets/AAPL/1Min").await;
    assert_eq!((s, error_code(&v)), (StatusCode::BAD_REQUEST, ("invalid_argument", 400)));

    // The newest 3 rows, then a range from the start.
    let (s, v) = get(&ctx, "/api/query?key=AAPL/1Min/OHLCV&limit=3").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["row_count"], 3);
    assert_eq!(v["columns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect::<Vec<_>>(), ["Epoch", "Open", "High", "Low", "Close", "Volume"]);
    assert_eq!(v["rows"][2], json!(["2024-01-02T09:59:00Z", 129.0, 131.0, 128.0, 129.5, 1029]));
    let (_, v) = get(&ctx, "/api/query?key=AAPL/1Min/OHLCV&start=2024-01-02T09:31:00Z&end=1704187980&from=first&columns=Close").await;
    assert_eq!(v["rows"], json!([["2024-01-02T09:31:00Z", 101.5], ["2024-01-02T09:32:00Z", 102.5], ["2024-01-02T09:33:00Z", 103.5]]));

    for (uri, needle) in [
        ("/api/query", "key is required"),
        ("/api/query?key=AAPL/1Min/OHLCV&limit=0", "limit \"0\""),
        ("/api/query?key=AAPL/1Min/OHLCV&limit=abc", "limit \"abc\""),
        ("/api/query?key=AAPL/1Min/OHLCV&start=yesterday", "start: cannot parse time"),
        ("/api/query?key=AAPL/1Min/OHLCV&from=middle", "from \"middle\""),
        ("/api/query?key=AAPL/1Min/OHLCV&lmit=3", "unknown field `lmit`"),
        ("/api/query?key=AAPL", "destinations must"),
    ] {
        let (s, v) = get(&ctx, uri).await;
        assert_eq!((s, error_code(&v).0), (StatusCode::BAD_REQUEST, "invalid_argument"), "{uri}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{uri}: {v}");
    }
    let (s, v) = get(&ctx, "/api/query?key=NOPE/1Min/OHLCV").await;
    assert_eq!((s, error_code(&v).0), (StatusCode::NOT_FOUND, "not_found"));
    let (s, v) = get(&ctx, "/api/nothing/here").await;
    assert_eq!((s, error_code(&v).0), (StatusCode::NOT_FOUND, "not_found"));
    let (s, _, body) = call(&ctx, Request::delete("/api/buckets").body(Body::empty()).unwrap()).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((s, error_code(&v).0), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
    ctx.engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn sql_returns_exact_values_and_refuses_bad_statements_with_400() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ctx(dir.path(), None);
    write(&ctx, 0, 30).await;
    let (s, v) = sql(&ctx, r#"{"sql": "SELECT \"Epoch\", \"Close\", \"Volume\" FROM \"AAPL/1Min/OHLCV\" ORDER BY \"Epoch\" DESC LIMIT 2"}"#).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rows"], json!([["2024-01-02T09:59:00Z", 129.5, 1029], ["2024-01-02T09:58:00Z", 128.5, 1028]]));
    assert_eq!((v["row_count"].as_u64(), v["truncated"].as_bool()), (Some(2), Some(false)));
    let (_, v) = sql(&ctx, r#"{"sql": "SELECT \"Close\" FROM \"AAPL/1Min/OHLCV\" ORDER BY \"Epoch\"", "limit": 5}"#).await;
    assert_eq!((v["row_count"].as_u64(), v["truncated"].as_bool()), (Some(5), Some(true)));
    assert_eq!(v["rows"][4], json!([104.5]));

    for body in [r#"{"sql": "SELEC 1"}"#, r#"{"sql": "  "}"#, r#"{"query": "SELECT 1"}"#, "not json", r#"{"sql": "SELECT 1", "limit": 0}"#] {
        let (s, v) = sql(&ctx, body).await;
        assert_eq!((s, error_code(&v).0), (StatusCode::BAD_REQUEST, "invalid_argument"), "{body}: {v}");
    }
    let (s, v) = sql(&ctx, r#"{"sql": "SELECT * FROM \"NOPE/1Min/OHLCV\""}"#).await;
    assert_eq!((s, error_code(&v).0), (StatusCode::NOT_FOUND, "not_found"), "{v}");
    // Each call is counted under the console's interface.
    assert_eq!(ctx.metrics.calls("http_api", "sql"), 8);
    ctx.engine.shutdown().await.unwrap();
}

fn with_users() -> AuthConfig {
    let users = vec![UserConfig { name: "bob".into(), password_hash: Secret(crate::auth::password::hash("builder").unwrap()), role: Role::ReadOnly }];
    AuthConfig { users, protect_metrics: false, token_ttl: Duration::from_secs(60), token_secret: None }
}

#[tokio::test]
async fn with_auth_every_api_route_and_the_page_need_credentials() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let ctx = ctx(dir.path(), Some(with_users()));
    write(&ctx, 0, 3).await;
    for uri in ["/api/status", "/api/buckets", "/api/buckets/AAPL/1Min/OHLCV", "/api/query?key=AAPL/1Min/OHLCV", "/api/live?key=AAPL/1Min/OHLCV"] {
        let (s, h, body) = call(&ctx, Request::get(uri).body(Body::empty()).unwrap()).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{uri}");
        assert!(h[header::WWW_AUTHENTICATE].to_str().unwrap().starts_with("Basic"), "{uri}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error_code(&v), ("unauthenticated", 401), "{uri}");
    }
    let (s, _, _) = call(&ctx, Request::get("/console/").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let wrong = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("bob:wrong"));
    let (s, _, _) = call(&ctx, Request::get("/api/buckets").header(header::AUTHORIZATION, wrong).body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let bob = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("bob:builder"));
    let (s, _, body) = call(&ctx, Request::get("/api/buckets").header(header::AUTHORIZATION, &bob).body(Body::empty()).unwrap()).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((s, v["buckets"][0]["rows"].as_u64()), (StatusCode::OK, Some(3)));
    // bob is read_only: a DELETE is refused by his role (403), as on every interface.
    let req = Request::post("/api/sql").header(header::AUTHORIZATION, &bob).header(header::CONTENT_TYPE, "application/json");
    let (s, _, body) = call(&ctx, req.body(Body::from(r#"{"sql": "DELETE FROM \"AAPL/1Min/OHLCV\""}"#)).unwrap()).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((s, error_code(&v).0), (StatusCode::FORBIDDEN, "permission_denied"), "{v}");
    let (s, _, body) = call(&ctx, Request::get("/api/status").header(header::AUTHORIZATION, &bob).body(Body::empty()).unwrap()).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((s, v["policy"]["auth"].as_bool(), v["metrics"]["buckets"].as_u64()), (StatusCode::OK, Some(true), Some(1)));
    assert_eq!(v["version"], crate::VERSION);
    ctx.engine.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_page_is_served_from_the_binary_and_slash_redirects_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ctx(dir.path(), None);
    let (s, h, body) = call(&ctx, Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!((s, h[header::LOCATION].to_str().unwrap(), body.len()), (StatusCode::TEMPORARY_REDIRECT, "/console/", 0));
    for uri in ["/console", "/console/"] {
        let (s, h, body) = call(&ctx, Request::get(uri).body(Body::empty()).unwrap()).await;
        assert_eq!((s, h[header::CONTENT_TYPE].to_str().unwrap()), (StatusCode::OK, "text/html; charset=utf-8"));
        assert!(h[header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("script-src 'self'"));
        assert!(String::from_utf8(body).unwrap().contains("<script src=\"/console/console.js\">"));
    }
    let (s, h, body) = call(&ctx, Request::get("/console/console.js").body(Body::empty()).unwrap()).await;
    assert_eq!((s, h[header::CONTENT_TYPE].to_str().unwrap()), (StatusCode::OK, "text/javascript; charset=utf-8"));
    assert_eq!(body.len(), crate::console::CONSOLE_JS.len());
    let (s, _, body) = call(&ctx, Request::get("/console/licenses.txt").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(String::from_utf8(body).unwrap().contains("lightweight-charts"));
    ctx.engine.shutdown().await.unwrap();
}

/// The next `event:`/`data:` frame of a server-sent event stream.
async fn next_event(body: &mut (impl futures::Stream<Item = Result<bytes::Bytes, axum::Error>> + Unpin), buf: &mut String) -> (String, Value) {
    loop {
        if let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let mut event = String::new();
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            if event.is_empty() {
                continue; // a keep-alive comment
            }
            return (event, serde_json::from_str(&data).unwrap());
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next()).await.expect("no event in 10 s").unwrap().unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn live_streams_each_append_as_a_server_sent_event() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = ctx(dir.path(), None);
    write(&ctx, 0, 2).await;
    let (s, v) = get(&ctx, "/api/live?key=AAPL/1Min").await;
    assert_eq!((s, error_code(&v).0), (StatusCode::BAD_REQUEST, "invalid_argument"));
    let (s, _) = get(&ctx, "/api/live").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let resp = router(&ctx).oneshot(Request::get("/api/live?key=AAPL/*/OHLCV").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = resp.into_body().into_data_stream();
    let mut buf = String::new();
    assert_eq!(next_event(&mut body, &mut buf).await, ("subscribed".to_string(), json!({"key": "AAPL/*/OHLCV"})));
    write(&ctx, 2, 1).await;
    // The bus fans appends out on its own thread: the write made before subscribing may still arrive
    // (whole, as one event); the new one must.
    let mut appends = Vec::new();
    while appends.last().is_none_or(|v: &Value| v["rows"][0][0] != "2024-01-02T09:32:00Z") {
        let (event, v) = next_event(&mut body, &mut buf).await;
        assert_eq!((event.as_str(), v["key"].as_str()), ("append", Some("AAPL/1Min/OHLCV")));
        appends.push(v);
    }
    assert!(appends.len() <= 2, "{appends:?}");
    assert_eq!(appends.last().unwrap()["rows"], json!([["2024-01-02T09:32:00Z", 102.0, 104.0, 101.0, 102.5, 1002]]));
    // Shutting down ends the stream.
    ctx.set_ready(false);
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(c) = body.next().await {
            c.unwrap();
        }
    });
    end.await.expect("the stream did not end after shutdown began");
    ctx.engine.shutdown().await.unwrap();
}
