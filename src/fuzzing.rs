//! Entry points of the fuzz targets (`fuzz/`, docs/fuzzing.md) and of their replay test
//! (`tests/fuzz_replay.rs`). Not an API: each function hands untrusted bytes to the code the server runs on
//! them (the `/rpc` handler, the Flight and MarketStore gRPC services, the `/ws` frame handler, the
//! `mkts.yml` parser, the CSV importer, `Engine::open` over a log segment or a bucket directory,
//! `Engine::write` over Arrow IPC batches) and
//! ignores the outcome: an error is a correct answer, only a panic, a hang or a crash is a finding.
//!
//! The server-level targets share one engine per process, on a temporary directory (under `/dev/shm` when
//! it exists, so the log's fsyncs are cheap), seeded with one fixed-timeframe and one tick bucket. Inputs
//! may change that state (write, create, destroy); a finding is replayed on a fresh process.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arrow::array::{ArrayRef, Float32Array, Int32Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{Action, FlightDescriptor, Ticket};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use futures::StreamExt;
use tonic::codegen::Service;

use crate::config::Config;
use crate::context::ServerContext;
use crate::engine::{BucketKey, BucketSchema, ColumnDef, ColumnType, Engine, EngineConfig, RecordKind, WriteOptions};
use crate::flight_backend::EngineFlightBackend;
use crate::flight_sql::FlightSqlHandler;

type Flight = mkts_flight::MktsFlightService<EngineFlightBackend, FlightSqlHandler>;

/// Separates the parts of a multi-file input (never in UTF-8 text).
pub const SEPARATOR: u8 = 0xFF;

/// Most Flight messages / record batches drained from one response stream.
const MAX_STREAM_ITEMS: usize = 16;
/// How long a response stream may wait for its next item (a subscription waits for appends forever).
const STREAM_ITEM_WAIT: Duration = Duration::from_millis(20);

/// The per-process server state shared by the server-level targets.
pub struct Harness {
    rt: tokio::runtime::Runtime,
    ctx: Arc<ServerContext>,
    flight: Flight,
    base: PathBuf,
    next_dir: AtomicU64,
}

fn base_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MKTS_FUZZ_DIR") {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() }
}

/// Remove directories of earlier fuzzing processes that are gone (libFuzzer exits without unwinding).
fn remove_stale(base: &Path) {
    let Ok(rd) = std::fs::read_dir(base) else { return };
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.strip_prefix("mkts-fuzz-")
            && pid.parse::<u32>().is_ok()
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_dir_all(ent.path());
        }
    }
}

fn seed_batch() -> RecordBatch {
    let f32s = |v: [f32; 3]| -> ArrayRef { Arc::new(Float32Array::from(v.to_vec())) };
    let schema = Arc::new(Schema::new(
        ["Epoch", "Open", "High", "Low", "Close", "Volume"]
            .iter()
            .map(|n| {
                let ty = match *n {
                    "Epoch" | "Volume" => DataType::Int64,
                    _ => DataType::Float32,
                };
                Field::new(*n, ty, false)
            })
            .collect::<Vec<_>>(),
    ));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(vec![1_704_187_800, 1_704_187_860, 1_704_187_920])),
            f32s([1.0, 2.0, 3.0]),
            f32s([1.5, 2.5, 3.5]),
            f32s([0.5, 1.5, 2.5]),
            f32s([1.2, 2.2, 3.2]),
            Arc::new(Int64Array::from(vec![10, 20, 30])),
        ],
    )
    .expect("static seed batch")
}

fn seed_ticks() -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Int64, false),
        Field::new("Price", DataType::Float32, false),
        Field::new("Nanoseconds", DataType::Int32, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(vec![1_704_187_800, 1_704_187_800, 1_704_187_801])),
            Arc::new(Float32Array::from(vec![100.0, 100.5, 101.0])),
            Arc::new(Int32Array::from(vec![1, 500, 0])),
        ],
    )
    .expect("static seed batch")
}

impl Harness {
    fn new() -> Harness {
        // libFuzzer's panic hook aborts even on a panic that is caught; a panic inside arrow's IPC decoder
        // is caught and reported by mkts_flight::ipc as the server does, so let that one unwind.
        let fuzzer_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !mkts_flight::ipc::in_guarded_decode() {
                fuzzer_hook(info)
            }
        }));
        let base = base_dir();
        remove_stale(&base);
        let base = base.join(format!("mkts-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("server");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("fuzz runtime");
        let ctx = rt.block_on(async {
            let mut ecfg = EngineConfig::new(&root);
            ecfg.checkpoint_interval = Duration::from_millis(200);
            let engine = Engine::open(ecfg).expect("fuzz engine");
            let bars = BucketKey::parse("AAPL/1Min/OHLCV").expect("static key");
            engine.write(&bars, &seed_batch(), WriteOptions::default()).await.expect("seed write");
            let ticks = BucketKey::parse("TSLA/1Sec/TICK").expect("static key");
            engine.write(&ticks, &seed_ticks(), WriteOptions { variable: Some(true) }).await.expect("seed write");
            let empty = BucketKey::parse("MSFT/1D/OHLCV").expect("static key");
            let schema = BucketSchema { kind: RecordKind::Fixed, columns: vec![ColumnDef::new("Close", ColumnType::F64)] };
            engine.create(&empty, schema).await.expect("seed create");
            let config = Config { root_directory: root.clone(), ..Config::default() };
            ServerContext::new(engine, config, None)
        });
        ctx.set_ready(true);
        let flight = crate::flight_backend::flight_service(&ctx);
        Harness { rt, ctx, flight, base, next_dir: AtomicU64::new(0) }
    }

    /// A fresh, empty directory for one input (removed by the caller).
    fn scratch(&self) -> PathBuf {
        let d = self.base.join(format!("x{}", self.next_dir.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::create_dir_all(&d);
        d
    }
}

/// The shared harness (created on first use).
pub fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(Harness::new)
}

async fn drain_body(b: Body) {
    let _ = axum::body::to_bytes(b, 256 << 20).await;
}

async fn drain_stream<T, E>(mut s: impl futures::Stream<Item = Result<T, E>> + Unpin) {
    for _ in 0..MAX_STREAM_ITEMS {
        match tokio::time::timeout(STREAM_ITEM_WAIT, s.next()).await {
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
}

/// `/rpc` (msgpack when `json` is false, else JSON): the HTTP handler itself, with the request body `data`.
pub fn rpc(data: &[u8], json: bool) {
    let h = harness();
    let mut headers = HeaderMap::new();
    let ct = if json { "application/json" } else { "application/x-msgpack" };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    h.rt.block_on(async {
        let resp = crate::compat::rpc::handle_inner(&h.ctx, &crate::service::Caller::anonymous(crate::service::Interface::JsonRpc), Method::POST, &headers, Body::from(Bytes::copy_from_slice(data))).await;
        drain_body(resp.into_body()).await;
    });
}

/// A NumpyMultiDataset write. `data[0]` even: the rest is a msgpack `/rpc` write request
/// (`{"dataset": {...}, "is_variable_length": ...}`), handled by the JSON-RPC write; odd: a protobuf
/// `proto.MultiWriteRequest`, sent through MarketStore's gRPC service (`/proto.Marketstore/Write`).
pub fn numpy_multidataset(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let h = harness();
    if mode % 2 == 0 {
        let Ok(v) = rmpv::decode::read_value(&mut &rest[..]) else { return };
        let Ok(f) = crate::compat::value::Fields::of(&v, crate::compat::value::Codec::Msgpack, "request") else { return };
        h.rt.block_on(async {
            let _ = crate::compat::rpc::write_one(&h.ctx, &crate::service::Caller::anonymous(crate::service::Interface::JsonRpc), &f).await;
        });
    } else {
        grpc_call(h, "/proto.Marketstore/Write", rest);
    }
}

/// One unary call of MarketStore's gRPC service with `msg` as the (unframed) protobuf request.
fn grpc_call(h: &Harness, path: &str, msg: &[u8]) {
    let mut body = Vec::with_capacity(msg.len() + 5);
    body.push(0);
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(msg);
    let Ok(req) = axum::http::Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(Body::from(body))
    else {
        return;
    };
    let mut svc = crate::compat::grpc::service(h.ctx.clone());
    h.rt.block_on(async {
        if std::future::poll_fn(|cx| Service::<axum::http::Request<Body>>::poll_ready(&mut svc, cx)).await.is_err() {
            return;
        }
        let Ok(resp) = svc.call(req).await;
        drain_body(Body::new(resp.into_body())).await;
    });
}

/// Plain Flight tickets, descriptors and action bodies. `data[0]` picks the call, the rest is the ticket
/// / command / body: 0 DoGet, 1 GetFlightInfo, 2 GetSchema, 3.. DoAction of each plain action in order
/// (`mkts_flight::ACTIONS`: create, destroy, get_info, delete_range, list_symbols, server_version, plugins).
pub fn flight_ticket(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let n = 3 + mkts_flight::ACTIONS.len();
    let mode = mode as usize % n;
    let h = harness();
    let body = Bytes::copy_from_slice(rest);
    h.rt.block_on(async {
        match mode {
            0 => do_get(&h.flight, body).await,
            1 => {
                let _ = h.flight.get_flight_info(tonic::Request::new(FlightDescriptor::new_cmd(body))).await;
            }
            2 => {
                let _ = h.flight.get_schema(tonic::Request::new(FlightDescriptor::new_cmd(body))).await;
            }
            k => {
                let name = mkts_flight::ACTIONS[k - 3].0;
                do_action(&h.flight, name, body).await;
            }
        }
    });
}

async fn do_get(f: &Flight, ticket: Bytes) {
    if let Ok(resp) = f.do_get(tonic::Request::new(Ticket { ticket })).await {
        drain_stream(resp.into_inner()).await;
    }
}

async fn do_action(f: &Flight, name: &str, body: Bytes) {
    if let Ok(resp) = f.do_action(tonic::Request::new(Action { r#type: name.to_string(), body })).await {
        drain_stream(resp.into_inner()).await;
    }
}

/// Flight SQL actions (DoAction types), the bodies of which are `Any`-wrapped requests.
pub const FLIGHT_SQL_ACTIONS: [&str; 8] = [
    "CreatePreparedStatement",
    "ClosePreparedStatement",
    "CreatePreparedSubstraitPlan",
    "CancelQuery",
    "BeginTransaction",
    "EndTransaction",
    "BeginSavepoint",
    "EndSavepoint",
];

/// Flight SQL: `data[0]` picks the call, the rest is the protobuf `Any` the client sends: 0 DoGet ticket,
/// 1 GetFlightInfo command, 2 GetSchema command, 3.. DoAction of each of [`FLIGHT_SQL_ACTIONS`].
pub fn flight_sql_command(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mode = mode as usize % (3 + FLIGHT_SQL_ACTIONS.len());
    let h = harness();
    let body = Bytes::copy_from_slice(rest);
    h.rt.block_on(async {
        match mode {
            0 => do_get(&h.flight, body).await,
            1 => {
                let _ = h.flight.get_flight_info(tonic::Request::new(FlightDescriptor::new_cmd(body))).await;
            }
            2 => {
                let _ = h.flight.get_schema(tonic::Request::new(FlightDescriptor::new_cmd(body))).await;
            }
            k => do_action(&h.flight, FLIGHT_SQL_ACTIONS[k - 3], body).await,
        }
    });
}

/// One `/ws` client frame (binary or text: both go to the same subscribe handler).
pub fn ws_message(data: &[u8]) {
    let patterns = parking_lot::RwLock::new(Vec::new());
    let _ = crate::compat::ws::subscribe_reply(&harness().ctx, &crate::service::Caller::anonymous(crate::service::Interface::Ws), &patterns, Bytes::copy_from_slice(data));
}

/// `mkts.yml` text (the file is read as UTF-8, so other bytes never reach the parser).
pub fn config_yaml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, Path::new("/nonexistent-base"));
    }
}

/// `mkts import` of a CSV file with a control file: `control` [`SEPARATOR` `csv`] (no separator: no control
/// file, the whole input is the CSV). `data[0]` odd: the bucket exists (Open/High/Low/Close f32, Volume
/// i64), even: it does not (types inferred).
pub fn csv_control(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let h = harness();
    let dir = h.scratch();
    let (control, csv) = match rest.iter().position(|b| *b == SEPARATOR) {
        Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
        None => (None, rest),
    };
    let csv_path = dir.join("in.csv");
    if std::fs::write(&csv_path, csv).is_err() {
        return;
    }
    let ctl = match control {
        Some(c) => {
            let p = dir.join("in.yml");
            if std::fs::write(&p, c).is_err() {
                return;
            }
            match crate::cli::transfer::ControlFile::load(&p) {
                Ok(c) => Some(c),
                Err(_) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return;
                }
            }
        }
        None => None,
    };
    let target = (mode % 2 == 1).then(|| BucketSchema {
        kind: RecordKind::Fixed,
        columns: [("Open", ColumnType::F32), ("High", ColumnType::F32), ("Low", ColumnType::F32), ("Close", ColumnType::F32), ("Volume", ColumnType::I64)]
            .into_iter()
            .map(|(n, ty)| ColumnDef::new(n, ty))
            .collect(),
    });
    if let Ok(batches) = crate::cli::transfer::csv_batches(&csv_path, ctl.as_ref(), target.as_ref(), Arc::new(AtomicU64::new(0))) {
        h.rt.block_on(async {
            let mut s = batches;
            while let Some(Ok(_)) = s.next().await {}
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Open an engine on `root` the way the server starts (catalog, log replay, checkpoint), read every
/// bucket, shut it down.
fn open_read_close(h: &Harness, root: &Path) {
    let mut cfg = EngineConfig::new(root);
    cfg.checkpoint_interval = Duration::from_millis(10);
    let Ok(engine) = Engine::open(cfg) else { return };
    for k in engine.keys() {
        let _ = engine.info(&k);
        let _ = engine.read(&crate::engine::ReadRequest::key(&k));
    }
    h.rt.block_on(async {
        let _ = engine.shutdown().await;
    });
}

/// Rewrite each `[u32 len][u32 crc][body]` frame's checksum to match its body, so mutated records get past
/// the checksum to the record decoders.
fn fix_crcs(seg: &mut [u8]) {
    let mut pos = 0usize;
    while let Some(hdr) = seg.get(pos..pos + 8) {
        let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        let Some(end) = pos.checked_add(8).and_then(|p| p.checked_add(len)).filter(|e| *e <= seg.len()) else { break };
        let crc = crc32c::crc32c(&seg[pos + 8..end]);
        seg[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos = end;
    }
}

/// A write-ahead log segment replayed by `Engine::open`. `data[0]` odd: the frames' checksums are fixed up
/// first (reaching the record decoders); even: the bytes are taken as they are (torn / corrupt records).
pub fn wal_segment(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let h = harness();
    let root = h.scratch();
    let wal = root.join(".wal");
    let mut seg = rest.to_vec();
    if mode % 2 == 1 {
        fix_crcs(&mut seg);
    }
    if std::fs::create_dir_all(&wal).is_ok() && std::fs::write(wal.join(format!("{:020}.log", 1)), &seg).is_ok() {
        open_read_close(h, &root);
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A bucket directory loaded by `Engine::open`: `bucket.json` [`SEPARATOR` partition `manifest.json`
/// [`SEPARATOR` column file]...]; the partition is the year 2024 and the column files (`c000.i64` (Epoch),
/// then the files the bucket's schema names) go to the generation the manifest names.
pub fn manifest(data: &[u8]) {
    let h = harness();
    let root = h.scratch();
    let mut parts = data.split(|b| *b == SEPARATOR);
    let bucket_json = parts.next().unwrap_or(&[]);
    let dir = root.join("FUZZ").join("1Min").join("OHLCV");
    let part = dir.join("2024");
    let ok = std::fs::create_dir_all(&part).is_ok() && std::fs::write(dir.join("bucket.json"), bucket_json).is_ok();
    if ok {
        if let Some(m) = parts.next() {
            let _ = std::fs::write(part.join("manifest.json"), m);
            let generation = serde_json::from_slice::<serde_json::Value>(m)
                .ok()
                .and_then(|v| v.get("generation").and_then(|g| g.as_u64()))
                .unwrap_or(0);
            let gdir = part.join(format!("g{generation}"));
            let types = serde_json::from_slice::<serde_json::Value>(bucket_json)
                .ok()
                .and_then(|v| serde_json::from_value::<BucketSchema>(v.get("schema")?.clone()).ok());
            let names = match &types {
                Some(s) => crate::engine::partition::physical_layouts(s.kind, &s.columns)
                    .iter()
                    .map(|l| crate::engine::partition::column_file_names(*l).0)
                    .collect(),
                None => vec!["c000.i64".to_string()],
            };
            if std::fs::create_dir_all(&gdir).is_ok() {
                for (name, bytes) in names.iter().zip(parts) {
                    let _ = std::fs::write(gdir.join(name), bytes);
                }
            }
        }
        open_read_close(h, &root);
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// Arrow record batches written through `Engine::write`, the write path behind every interface (Flight
/// DoPut, `/rpc`, gRPC, SQL INSERT, plugins): validation, casts, interval truncation, sorting, last-wins
/// dedupe, bucket creation. `data[0]` picks the key (0 the seeded `AAPL/1Min/OHLCV`, 1 the seeded tick
/// bucket `TSLA/1Sec/TICK`, 2 a new fixed bucket, 3 a new tick bucket, both destroyed afterwards); the rest
/// is an Arrow IPC stream (schema message, then batches), as a Flight DoPut carries it.
pub fn engine_write(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let h = harness(); // first: it installs the panic hook that lets a guarded decode's panic unwind
    // Decoded as the server decodes client IPC (a malformed stream is an error, see mkts_flight::ipc).
    let Ok((_, batches)) = mkts_flight::ipc::decode_stream(Bytes::copy_from_slice(rest)) else { return };
    let engine = h.ctx.engine.clone();
    let (key, variable) = match mode % 4 {
        0 => ("AAPL/1Min/OHLCV", None),
        1 => ("TSLA/1Sec/TICK", Some(true)),
        2 => ("FZNEW/1Min/OHLCV", Some(false)),
        _ => ("FZNEW/1Sec/TICK", Some(true)),
    };
    let Ok(key) = BucketKey::parse(key) else { return };
    h.rt.block_on(async {
        for batch in batches.into_iter().take(MAX_STREAM_ITEMS) {
            let _ = engine.write(&key, &batch, WriteOptions { variable }).await;
        }
        if mode % 4 >= 2 {
            let _ = engine.destroy(&key).await;
        }
    });
}

/// The targets by name, for the replay test: `(name, entry point)`.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("rpc_msgpack", |d| rpc(d, false)),
    ("rpc_json", |d| rpc(d, true)),
    ("numpy_multidataset", numpy_multidataset),
    ("flight_ticket", flight_ticket),
    ("flight_sql_command", flight_sql_command),
    ("ws_message", ws_message),
    ("config_yaml", config_yaml),
    ("csv_control", csv_control),
    ("wal_record", wal_segment),
    ("manifest", manifest),
    ("engine_write", engine_write),
];
