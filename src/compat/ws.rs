//! `/ws`: MarketStore's WebSocket stream (reference §4).
//!
//! A client sends a msgpack `{"streams": ["AAPL/1Min/OHLCV", "*/1Min/*", …]}` (three-part globs); the server
//! echoes the exact frame on success, or answers `{"error": "<stream> is an invalid stream"}` and keeps the
//! previous subscriptions. After every durable write the newest written row of each matching bucket is
//! pushed as `{"key": "SYM/TF/GROUP", "data": {"Epoch": …, "<column>": …}}` (numeric types kept: float32
//! stays float32).
//!
//! Back-pressure: one hub task reads the engine's appended batches (its own bounded subscription, so
//! writers never wait on it) and hands each frame to every matching client's queue with `try_send`. The
//! queue is bounded by frames ([`CLIENT_QUEUE`]) and by bytes (`subscriber_queue_mb`). A client whose
//! queue is full — slow or dead — is disconnected instead of stalling anyone, and so is one whose socket
//! send does not complete within [`SEND_TIMEOUT`]; either drop is logged with the client's address and
//! patterns and counted in `mkts_ws_dropped_clients_total`. The server pings every [`PING_INTERVAL`] and
//! drops a client that has sent nothing (not even a pong) for two intervals.
//!
//! Under `queryable: false` a subscribe is answered `{"error": "server is not queryable"}` and nothing is
//! pushed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{self as adt, DataType, TimeUnit};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use parking_lot::{Mutex, RwLock};
use rmpv::Value;
use tokio::sync::{mpsc, Notify};

use crate::context::ServerContext;
use crate::engine::{AppendEvent, KeyPattern};
use crate::service::{Caller, Interface};

use super::value::{to_msgpack, Val};

/// Frames buffered per client before it is considered too slow and disconnected.
pub const CLIENT_QUEUE: usize = 1024;
/// Keepalive ping period (MarketStore: 54 s).
pub const PING_INTERVAL: Duration = Duration::from_secs(54);
/// Longest a single socket send may take.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest client message (a subscribe is a few hundred bytes).
pub const MAX_CLIENT_MESSAGE: usize = 1 << 20;

struct Client {
    id: u64,
    peer: String,
    patterns: Arc<RwLock<Vec<KeyPattern>>>,
    tx: mpsc::Sender<Bytes>,
    /// Bytes queued for this client and not yet sent.
    queued: Arc<AtomicUsize>,
    /// Ends the session at once when the hub drops the client.
    kill: Arc<Notify>,
}

impl Client {
    fn drop_slow(&self, ctx: &ServerContext, why: &str) {
        let patterns: Vec<String> = self.patterns.read().iter().map(|p| p.to_string()).collect();
        tracing::warn!(client = self.id, peer = %self.peer, ?patterns, "dropping /ws client: {why}");
        ctx.metrics.ws_client_dropped();
        self.kill.notify_one();
    }
}

/// What a session needs from its registration.
pub(crate) struct Registration {
    pub id: u64,
    pub rx: mpsc::Receiver<Bytes>,
    pub queued: Arc<AtomicUsize>,
    pub kill: Arc<Notify>,
}

/// Routes appended rows to WebSocket subscribers.
pub struct WsHub {
    ctx: Arc<ServerContext>,
    clients: Mutex<Vec<Client>>,
    next_id: AtomicU64,
    started: OnceLock<()>,
}

impl WsHub {
    pub fn new(ctx: Arc<ServerContext>) -> Arc<Self> {
        Arc::new(WsHub { ctx, clients: Mutex::new(Vec::new()), next_id: AtomicU64::new(1), started: OnceLock::new() })
    }

    /// Start the hub task (first connection): subscribe to the bus's gated feed and fan out. That feed is
    /// the `stream` trigger's pushes when one runs, else every append (see [`crate::bus::gate`]); each
    /// frame carries the newest row of what arrives.
    fn ensure_started(self: &Arc<Self>) {
        self.started.get_or_init(|| {
            let hub = Arc::downgrade(self);
            let mut rx = self.ctx.bus.subscribe_gated();
            tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(m) => {
                            let Some(hub) = hub.upgrade() else { break };
                            hub.publish(&AppendEvent { key: m.key.clone(), lsn: m.lsn, batch: m.row.clone() });
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "/ws hub fell behind the event bus");
                            continue;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
            });
        });
    }

    /// Hand one appended batch to every matching client (drops clients whose queue is full).
    pub(crate) fn publish(&self, ev: &AppendEvent) {
        let mut clients = self.clients.lock();
        if clients.is_empty() {
            return;
        }
        let mut frame: Option<Bytes> = None;
        let limit = self.ctx.config.subscriber_queue_bytes();
        clients.retain(|c| {
            if !c.patterns.read().iter().any(|p| p.matches(&ev.key)) {
                return true;
            }
            let f = frame.get_or_insert_with(|| Bytes::from(push_frame(&ev.key.to_string(), &ev.batch))).clone();
            let (len, waiting) = (f.len(), c.queued.load(Ordering::Acquire));
            if waiting > 0 && waiting.saturating_add(len) > limit {
                c.drop_slow(&self.ctx, &format!("{waiting} bytes wait unsent, past subscriber_queue_mb ({limit} bytes)"));
                return false;
            }
            c.queued.fetch_add(len, Ordering::AcqRel);
            match c.tx.try_send(f) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    c.drop_slow(&self.ctx, &format!("its queue of {CLIENT_QUEUE} frames is full"));
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    pub(crate) fn register(&self, patterns: Arc<RwLock<Vec<KeyPattern>>>, peer: String) -> Registration {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (queued, kill) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        self.clients.lock().push(Client { id, peer, patterns, tx, queued: queued.clone(), kill: kill.clone() });
        Registration { id, rx, queued, kill }
    }

    fn unregister(&self, id: u64) {
        self.clients.lock().retain(|c| c.id != id);
    }

    /// Drop a client whose socket send timed out (logged and counted like a full queue).
    fn drop_stalled(&self, id: u64) {
        let mut clients = self.clients.lock();
        if let Some(i) = clients.iter().position(|c| c.id == id) {
            let c = clients.remove(i);
            c.drop_slow(&self.ctx, &format!("a send did not complete within {}s", SEND_TIMEOUT.as_secs()));
        }
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        self.clients.lock().len()
    }
}

/// One scalar of a row as a msgpack value of the column's own type.
fn scalar(arr: &dyn Array, i: usize) -> Val {
    if arr.is_null(i) {
        return Val::Nil;
    }
    match arr.data_type() {
        DataType::Int8 => Val::Int(arr.as_primitive::<adt::Int8Type>().value(i) as i64),
        DataType::Int16 => Val::Int(arr.as_primitive::<adt::Int16Type>().value(i) as i64),
        DataType::Int32 => Val::Int(arr.as_primitive::<adt::Int32Type>().value(i) as i64),
        DataType::Int64 => Val::Int(arr.as_primitive::<adt::Int64Type>().value(i)),
        DataType::UInt8 => Val::UInt(arr.as_primitive::<adt::UInt8Type>().value(i) as u64),
        DataType::UInt16 => Val::UInt(arr.as_primitive::<adt::UInt16Type>().value(i) as u64),
        DataType::UInt32 => Val::UInt(arr.as_primitive::<adt::UInt32Type>().value(i) as u64),
        DataType::UInt64 => Val::UInt(arr.as_primitive::<adt::UInt64Type>().value(i)),
        DataType::Float32 => Val::F32(arr.as_primitive::<adt::Float32Type>().value(i)),
        DataType::Float64 => Val::F64(arr.as_primitive::<adt::Float64Type>().value(i)),
        DataType::Boolean => Val::Bool(arr.as_boolean().value(i)),
        DataType::Utf8 => Val::Str(arr.as_string::<i32>().value(i).to_string()),
        DataType::Timestamp(TimeUnit::Second, _) => Val::Int(arr.as_primitive::<adt::TimestampSecondType>().value(i)),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            Val::Int(arr.as_primitive::<adt::TimestampNanosecondType>().value(i).div_euclid(1_000_000_000))
        }
        _ => Val::Nil,
    }
}

/// The push frame for the newest (last) row of `batch`.
pub fn push_frame(key: &str, batch: &RecordBatch) -> Vec<u8> {
    let last = batch.num_rows().saturating_sub(1);
    let data = if batch.num_rows() == 0 {
        Val::Map(Vec::new())
    } else {
        Val::Map(
            batch
                .schema()
                .fields()
                .iter()
                .zip(batch.columns())
                .map(|(f, c)| (f.name().clone(), scalar(c.as_ref(), last)))
                .collect(),
        )
    };
    let frame = Val::Map(vec![("key".into(), Val::str(key)), ("data".into(), data)]);
    let mut out = Vec::new();
    to_msgpack(&frame, &mut out);
    out
}

/// What a client message asks for.
enum Subscribe {
    /// Valid: replace the subscription set, echo the frame.
    Set(Vec<KeyPattern>),
    /// Invalid stream: reply with this error, keep the old set.
    Invalid(String),
    /// Undecodable or empty: ignore.
    Ignore,
}

fn parse_subscribe(frame: &[u8]) -> Subscribe {
    let Ok(v) = rmpv::decode::read_value(&mut &frame[..]) else { return Subscribe::Ignore };
    let Value::Map(m) = &v else { return Subscribe::Ignore };
    let Some(Value::Array(streams)) = m.iter().find(|(k, _)| k.as_str() == Some("streams")).map(|(_, v)| v) else {
        return Subscribe::Ignore;
    };
    if streams.is_empty() {
        return Subscribe::Ignore;
    }
    let mut pats = Vec::with_capacity(streams.len());
    for s in streams {
        let text = s.as_str().unwrap_or("");
        match KeyPattern::parse(text) {
            Ok(p) if text.split('/').count() == 3 => pats.push(p),
            _ => return Subscribe::Invalid(format!("{text} is an invalid stream")),
        }
    }
    Subscribe::Set(pats)
}

/// `GET /ws` upgrade handler.
pub async fn handle(State(hub): State<Arc<WsHub>>, ext: axum::http::Extensions, ws: WebSocketUpgrade) -> Response {
    let peer = ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.to_string()).unwrap_or_else(|| "unknown".into());
    let caller = Caller::of_request(Interface::Ws, &ext);
    ws.max_message_size(MAX_CLIENT_MESSAGE).max_frame_size(MAX_CLIENT_MESSAGE).on_upgrade(move |socket| session(hub, socket, peer, caller))
}

async fn session(hub: Arc<WsHub>, socket: WebSocket, peer: String, caller: Caller) {
    hub.ensure_started();
    let metrics = hub.ctx.metrics.clone();
    metrics.ws_connected();
    let patterns = Arc::new(RwLock::new(Vec::new()));
    let Registration { id, mut rx, queued, kill } = hub.register(patterns.clone(), peer);
    let (mut sink, mut stream) = socket.split();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let mut last_seen = Instant::now();
    loop {
        let mut from_queue = 0;
        let out: Option<Message> = tokio::select! {
            msg = stream.next() => {
                last_seen = Instant::now();
                match msg {
                    Some(Ok(Message::Binary(b))) => subscribe_reply(&hub.ctx, &caller, &patterns, b),
                    Some(Ok(Message::Text(t))) => subscribe_reply(&hub.ctx, &caller, &patterns, Bytes::copy_from_slice(t.as_str().as_bytes())),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                }
            }
            frame = rx.recv() => match frame {
                Some(f) => {
                    from_queue = f.len();
                    metrics.ws_message_sent();
                    Some(Message::Binary(f))
                }
                None => break, // dropped by the hub (too slow)
            },
            _ = kill.notified() => break, // dropped by the hub (too slow)
            _ = ping.tick() => {
                if last_seen.elapsed() > 2 * PING_INTERVAL {
                    break;
                }
                Some(Message::Ping(Bytes::new()))
            }
        };
        if let Some(m) = out {
            tokio::select! {
                r = tokio::time::timeout(SEND_TIMEOUT, sink.send(m)) => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break,
                    Err(_) => {
                        hub.drop_stalled(id);
                        break;
                    }
                },
                _ = kill.notified() => break,
            }
            if from_queue > 0 {
                queued.fetch_sub(from_queue, Ordering::AcqRel);
            }
        }
    }
    hub.unregister(id);
    metrics.ws_disconnected();
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

fn error_frame(e: String) -> Message {
    let mut out = Vec::new();
    to_msgpack(&Val::Map(vec![("error".into(), Val::Str(e))]), &mut out);
    Message::Binary(Bytes::from(out))
}

pub(crate) fn subscribe_reply(ctx: &ServerContext, caller: &Caller, patterns: &RwLock<Vec<KeyPattern>>, frame: Bytes) -> Option<Message> {
    match parse_subscribe(&frame) {
        Subscribe::Set(p) => match ctx.check_queryable(caller) {
            Err(e) => Some(error_frame(e.message)),
            Ok(()) => {
                *patterns.write() = p;
                Some(Message::Binary(frame))
            }
        },
        Subscribe::Invalid(e) => Some(error_frame(e)),
        Subscribe::Ignore => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float32Array, Int32Array, TimestampSecondArray};
    use arrow::datatypes::{Field, Schema};

    #[test]
    fn push_frame_is_newest_row_with_native_types() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("Epoch", DataType::Timestamp(TimeUnit::Second, Some("UTC".into())), false),
            Field::new("Close", DataType::Float32, false),
            Field::new("Nanoseconds", DataType::Int32, false),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampSecondArray::from(vec![10, 20]).with_timezone("UTC")),
                Arc::new(Float32Array::from(vec![1.5, 2.5])),
                Arc::new(Int32Array::from(vec![0, 7])),
            ],
        )
        .unwrap();
        let f = push_frame("A/1Sec/T", &b);
        let v = rmpv::decode::read_value(&mut &f[..]).unwrap();
        assert_eq!(v["key"], Value::from("A/1Sec/T"));
        assert_eq!(v["data"]["Epoch"], Value::from(20));
        assert_eq!(v["data"]["Close"], Value::F32(2.5));
        assert_eq!(v["data"]["Nanoseconds"], Value::from(7));
    }

    #[test]
    fn subscribe_validation() {
        let enc = |v: Value| {
            let mut o = Vec::new();
            rmpv::encode::write_value(&mut o, &v).unwrap();
            o
        };
        let ok = enc(Value::Map(vec![(Value::from("streams"), Value::Array(vec![Value::from("*/1Min/*")]))]));
        assert!(matches!(parse_subscribe(&ok), Subscribe::Set(p) if p.len() == 1));
        let bad = enc(Value::Map(vec![(Value::from("streams"), Value::Array(vec![Value::from("AAPL/1Min")]))]));
        assert!(matches!(parse_subscribe(&bad), Subscribe::Invalid(e) if e == "AAPL/1Min is an invalid stream"));
        let empty = enc(Value::Map(vec![(Value::from("streams"), Value::Array(vec![]))]));
        assert!(matches!(parse_subscribe(&empty), Subscribe::Ignore));
        assert!(matches!(parse_subscribe(b"\xc1garbage"), Subscribe::Ignore));
    }
}
