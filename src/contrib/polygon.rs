//! `polygon` (background worker): Polygon's (now also branded Massive) stocks WebSocket stream of minute
//! aggregates, trades and quotes, with the gap a reconnect or restart leaves filled over REST aggregates.
//!
//! ```yaml
//! bgworkers:
//!   - module: polygon.so          # or polygon
//!     name: Polygon
//!     config:
//!       api_key: ""               # empty: $POLYGON_API_KEY
//!       data_types: [bars, trades, quotes]
//!       symbols: [AAPL, MSFT]     # empty or "*": every ticker
//!       ws_servers: wss://socket.polygon.io
//!       base_url: https://api.polygon.io
//! ```
//!
//! **Buckets** (one schema per bucket, whether a row came from the stream or from REST):
//!
//! | data type | bucket | kind | columns |
//! |---|---|---|---|
//! | `bars` (`AM.`) | `<SYM>/1Min/OHLCV` | fixed | Open, High, Low, Close float64, Volume uint64 (+ TickCnt int32 with `add_bar_tick_count`) |
//! | `trades` (`T.`) | `<SYM>/1Sec/TRADE` | ticks | Price float64, Size uint64, Exchange, TapeID, Cond1..Cond4 uint8 |
//! | `quotes` (`Q.`) | `<SYM>/1Sec/QUOTE` | ticks | BidPrice, AskPrice float64, BidSize, AskSize uint64, BidExchange, AskExchange, Cond uint8 |
//!
//! `/` in a ticker becomes `.` in the bucket name, as MarketStore does.
//!
//! **Protocol.** Connect to `<ws_server>/stocks` (a URL that already has a path is used as is), expect the
//! `connected` status, send `{"action":"auth","params":"<key>"}`, wait for `auth_success`, send
//! `{"action":"subscribe","params":"AM.AAPL,T.AAPL,…"}`. Events arrive as JSON arrays of objects with `ev`
//! `AM`, `T`, `Q` or `status`. The client pings every `ping_interval` and treats a connection silent for three
//! intervals as dead. On any error it reconnects with back-off (1 s doubling to 60 s, reset after a session
//! that delivered data), rotating through `ws_servers`. `auth_failed` (or HTTP 401/403 on the handshake) is
//! logged once and the worker stops until the server is restarted.
//!
//! **Filtering and duplicates.** Trades with size ≤ 0, price ≤ 0 or one of MarketStore's skipped conditions
//! (15, 16, 17, 18, 19, 51) are dropped. A trade or quote seen again (same symbol, exchange, id/sequence and
//! timestamp) within the last `dedupe_window` events is dropped; a bar re-sent for the same minute replaces
//! the stored one (fixed bucket), so neither shows up twice. Out-of-order events are stored in time order.
//!
//! **Gap fill.** The first bar of a symbol after each (re)connect is compared with the symbol's last stored
//! bar; the minutes strictly between them are fetched from
//! `GET {base_url}/v2/aggs/ticker/{sym}/range/1/minute/{from_ms}/{to_ms}?adjusted=true&sort=asc&limit=50000`
//! (following `next_url`, rebased on `base_url`), on a separate thread so the stream keeps being read. An
//! empty bucket is filled from `query_start` when it is set. The API key goes in an `Authorization: Bearer`
//! header, never in a URL or a log line. 429 and 5xx are retried with back-off; a 401/403 is logged once
//! and disables gap fills until restart (the stream goes on).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, UInt64Array, UInt8Array};
use arrow::datatypes::{DataType, Field, Schema};
use serde::Deserialize;

use super::feeder::{fmt_time, parse_duration, parse_time, FeederHandle, Http, Stop};
use super::ws::{read_loop, reconnect_loop, warn_once, Feed, Protocol, Trust, WsClient};
use super::ContribError;
use crate::engine::BucketKey;
use crate::service::{Client, WriteRequest};

const PLUGIN: &str = "polygon";
/// Polygon's REST root.
pub const DEFAULT_URL: &str = "https://api.polygon.io";
/// Polygon's real-time WebSocket cluster root (`/stocks` is appended).
pub const DEFAULT_WS: &str = "wss://socket.polygon.io";
/// Environment variable read when `api_key` is empty.
pub const API_KEY_ENV: &str = "POLYGON_API_KEY";
/// Trade conditions MarketStore's polygon handler skips (official/market-center open, close, reopening;
/// exchange summary).
pub const SKIPPED_CONDITIONS: [i64; 6] = [15, 16, 17, 18, 19, 51];

/// A credential: never printed by `Debug`.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    /// Wrap a credential.
    pub fn new(s: String) -> Self {
        Secret(s)
    }

    /// The credential itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    ws_servers: Option<String>,
    #[serde(default)]
    ws_server: Option<String>,
    #[serde(default)]
    data_types: Vec<String>,
    #[serde(default)]
    symbols: Vec<String>,
    #[serde(default)]
    add_bar_tick_count: bool,
    #[serde(default)]
    query_start: Option<String>,
    /// Obsolete in MarketStore's own example file; accepted and ignored.
    #[serde(default)]
    nats_servers: Option<serde_json::Value>,
    #[serde(default)]
    ping_interval: Option<serde_json::Value>,
    #[serde(default)]
    timeout: Option<serde_json::Value>,
    #[serde(default)]
    request_interval: Option<serde_json::Value>,
    #[serde(default)]
    dedupe_window: Option<usize>,
    #[serde(default)]
    ca_file: Option<std::path::PathBuf>,
}

/// Parsed `polygon` configuration.
#[derive(Debug, Clone)]
pub struct PolygonConfig {
    /// From `api_key`, else `$POLYGON_API_KEY`.
    pub api_key: Secret,
    /// REST root for gap fills.
    pub base_url: String,
    /// WebSocket URLs to connect to, in rotation.
    pub ws_urls: Vec<String>,
    /// `AM.` subscriptions.
    pub bars: bool,
    /// `T.` subscriptions.
    pub trades: bool,
    /// `Q.` subscriptions.
    pub quotes: bool,
    /// Tickers; empty = `*`.
    pub symbols: Vec<String>,
    /// Add a `TickCnt` int32 column to the bars bucket.
    pub add_bar_tick_count: bool,
    /// Fill an empty bars bucket from here (Unix seconds).
    pub query_start: Option<i64>,
    /// WebSocket ping period.
    pub ping_interval: Duration,
    /// Connect, handshake, auth and per-request timeout.
    pub timeout: Duration,
    /// Minimum time between REST requests.
    pub request_interval: Duration,
    /// How many recent trades/quotes are remembered to drop repeats.
    pub dedupe_window: usize,
    /// CAs a `wss://` server may be signed by (public roots, plus `ca_file`'s).
    pub trust: Trust,
}

fn ws_url(server: &str) -> String {
    let s = server.trim().trim_end_matches('/');
    let after_scheme = s.split_once("://").map_or(s, |(_, r)| r);
    if after_scheme.contains('/') { s.to_string() } else { format!("{s}/stocks") }
}

impl PolygonConfig {
    /// Parse the `config:` map; `env` looks up environment variables (the API key fallback).
    pub fn from_json(v: &serde_json::Value, env: impl Fn(&str) -> Option<String>) -> Result<Self, ContribError> {
        let err = |msg: String| ContribError::Config { plugin: PLUGIN, msg };
        let raw: RawConfig = serde_json::from_value(if v.is_null() { serde_json::json!({}) } else { v.clone() }).map_err(|e| err(e.to_string()))?;
        if raw.nats_servers.is_some() {
            tracing::warn!(plugin = PLUGIN, "nats_servers is obsolete and ignored");
        }
        let (mut bars, mut trades, mut quotes) = (false, false, false);
        for t in &raw.data_types {
            match t.trim().to_ascii_lowercase().as_str() {
                "bars" => bars = true,
                "trades" => trades = true,
                "quotes" => quotes = true,
                other => return Err(err(format!("data_types: unknown {other:?} (use bars, trades, quotes)"))),
            }
        }
        if !(bars || trades || quotes) {
            return Err(err("at least one valid data_type is required (bars, trades, quotes)".into()));
        }
        let key = raw.api_key.map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).or_else(|| env(API_KEY_ENV).map(|k| k.trim().to_string()).filter(|k| !k.is_empty()));
        let Some(key) = key else {
            return Err(err(format!("no API key: set api_key or ${API_KEY_ENV}")));
        };
        let base_url = raw.base_url.map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).unwrap_or_else(|| DEFAULT_URL.into()).trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(err(format!("base_url must start with http:// or https://, got {base_url:?}")));
        }
        let servers = match (raw.ws_servers, raw.ws_server) {
            (Some(_), Some(_)) => return Err(err("set ws_servers or ws_server, not both".into())),
            (Some(s), None) | (None, Some(s)) => s,
            (None, None) => DEFAULT_WS.into(),
        };
        let ws_urls: Vec<String> = servers.split(',').map(str::trim).filter(|s| !s.is_empty()).map(ws_url).collect();
        if ws_urls.is_empty() {
            return Err(err("ws_servers is empty".into()));
        }
        for u in &ws_urls {
            if !(u.starts_with("ws://") || u.starts_with("wss://")) {
                return Err(err(format!("ws_servers: {u:?} must start with ws:// or wss://")));
            }
        }
        let mut symbols: Vec<String> = raw.symbols.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        if symbols.iter().any(|s| s == "*") {
            symbols.clear();
        }
        for s in &symbols {
            if s.contains(',') || s.contains('*') {
                return Err(err(format!("symbols: {s:?} is not a ticker")));
            }
        }
        let dur = |k: &str, v: &Option<serde_json::Value>, d: Duration| -> Result<Duration, ContribError> {
            match v {
                None => Ok(d),
                Some(x) => parse_duration(x).filter(|d| !d.is_zero() || k == "request_interval").ok_or_else(|| err(format!("{k}: expected a duration like 250ms or 10s"))),
            }
        };
        let query_start = match raw.query_start.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(x) => Some(parse_time(x).ok_or_else(|| err(format!("query_start: cannot parse {x:?} (use e.g. 2024-01-02 15:04)")))?),
        };
        Ok(PolygonConfig {
            api_key: Secret(key),
            base_url,
            ws_urls,
            bars,
            trades,
            quotes,
            symbols,
            add_bar_tick_count: raw.add_bar_tick_count,
            query_start,
            ping_interval: dur("ping_interval", &raw.ping_interval, Duration::from_secs(10))?,
            timeout: dur("timeout", &raw.timeout, Duration::from_secs(15))?,
            request_interval: dur("request_interval", &raw.request_interval, Duration::from_millis(250))?,
            dedupe_window: raw.dedupe_window.unwrap_or(100_000),
            trust: Trust::new(raw.ca_file.as_deref()).map_err(err)?,
        })
    }

    /// The subscribe message's `params`: `AM.AAPL,T.AAPL,…` or `AM.*,…`.
    pub fn subscriptions(&self) -> String {
        let mut out = Vec::new();
        for (on, prefix) in [(self.bars, "AM"), (self.trades, "T"), (self.quotes, "Q")] {
            if !on {
                continue;
            }
            if self.symbols.is_empty() {
                out.push(format!("{prefix}.*"));
            } else {
                out.extend(self.symbols.iter().map(|s| format!("{prefix}.{s}")));
            }
        }
        out.join(",")
    }
}

/// A minute aggregate (`AM` event or a REST aggregate), start time in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MinuteBar {
    pub t: i64,
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    pub volume: u64,
    pub ticks: i32,
}

/// A trade (`T` event).
#[derive(Debug, Clone, PartialEq)]
pub struct Trade {
    pub epoch: i64,
    pub nanos: i32,
    pub price: f64,
    pub size: u64,
    pub exchange: u8,
    pub tape: u8,
    pub conds: [u8; 4],
    /// Identity for duplicate detection.
    pub id: u64,
}

/// A quote (`Q` event).
#[derive(Debug, Clone, PartialEq)]
pub struct Quote {
    pub epoch: i64,
    pub nanos: i32,
    pub bid_price: f64,
    pub ask_price: f64,
    pub bid_size: u64,
    pub ask_size: u64,
    pub bid_exchange: u8,
    pub ask_exchange: u8,
    pub cond: u8,
    /// Identity for duplicate detection.
    pub id: u64,
}

/// One event of a stream message.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Status { status: String, message: String },
    Bar { sym: String, bar: MinuteBar },
    Trade { sym: String, trade: Trade },
    Quote { sym: String, quote: Quote },
    /// A trade dropped by the size/price/condition filter.
    Filtered,
    /// An event type we do not store (or a malformed event: the reason).
    Skipped(String),
}

#[derive(Deserialize)]
struct RawEvent {
    ev: Option<String>,
    status: Option<String>,
    message: Option<String>,
    sym: Option<String>,
    // AM
    o: Option<f64>,
    h: Option<f64>,
    l: Option<f64>,
    c: Option<serde_json::Value>,
    v: Option<f64>,
    s: Option<f64>,
    n: Option<f64>,
    z: Option<i64>,
    // T
    p: Option<f64>,
    x: Option<i64>,
    i: Option<serde_json::Value>,
    t: Option<i64>,
    q: Option<i64>,
    // Q
    bp: Option<f64>,
    ap: Option<f64>,
    bs: Option<f64>,
    #[serde(rename = "as")]
    as_: Option<f64>,
    bx: Option<i64>,
    ax: Option<i64>,
}

/// A timestamp in ms, µs or ns since the epoch (by magnitude; Polygon's stocks stream sends ms) →
/// (seconds, nanoseconds).
pub fn split_time(t: i64) -> (i64, i32) {
    let ns: i128 = if t.abs() >= 100_000_000_000_000_000 {
        t as i128
    } else if t.abs() >= 100_000_000_000_000 {
        t as i128 * 1_000
    } else {
        t as i128 * 1_000_000
    };
    (ns.div_euclid(1_000_000_000) as i64, ns.rem_euclid(1_000_000_000) as i32)
}

/// A code (exchange, tape, condition) as its `uint8` column stores it; out of range → 0.
pub(crate) fn small(v: i64) -> u8 {
    u8::try_from(v).unwrap_or(0)
}

fn id_hash(parts: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

fn parse_event(e: RawEvent) -> Event {
    let ev = e.ev.as_deref().unwrap_or("");
    let sym = || e.sym.clone().filter(|s| !s.is_empty());
    match ev {
        "status" => Event::Status { status: e.status.unwrap_or_default(), message: e.message.unwrap_or_default() },
        "AM" => {
            let close = e.c.as_ref().and_then(|c| c.as_f64());
            match (sym(), e.o, e.h, e.l, close, e.v, e.s) {
                (Some(sym), Some(o), Some(h), Some(l), Some(c), Some(v), Some(s)) => {
                    let (secs, _) = split_time(s as i64);
                    Event::Bar { sym, bar: MinuteBar { t: secs - secs.rem_euclid(60), open: o, high: h, low: l, close: c, volume: v.max(0.0).round() as u64, ticks: e.n.unwrap_or(0.0) as i32 } }
                }
                _ => Event::Skipped("AM event without sym/o/h/l/c/v/s".into()),
            }
        }
        "T" => {
            let (Some(sym), Some(p), Some(sz), Some(t)) = (sym(), e.p, e.s, e.t) else {
                return Event::Skipped("T event without sym/p/s/t".into());
            };
            let conds: Vec<i64> = match &e.c {
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
                _ => Vec::new(),
            };
            if !trade_kept(p, sz, &conds) {
                return Event::Filtered;
            }
            let mut cs = [0u8; 4];
            for (k, c) in conds.iter().take(4).enumerate() {
                cs[k] = small(*c);
            }
            let (epoch, nanos) = split_time(t);
            let id = id_hash(("T", &sym, e.x, e.i.as_ref().map(|i| i.to_string()), e.q, t, p.to_bits(), sz.to_bits()));
            Event::Trade { sym, trade: Trade { epoch, nanos, price: p, size: sz.round() as u64, exchange: small(e.x.unwrap_or(0)), tape: small(e.z.unwrap_or(0)), conds: cs, id } }
        }
        "Q" => {
            let (Some(sym), Some(t)) = (sym(), e.t) else {
                return Event::Skipped("Q event without sym/t".into());
            };
            let cond = e.c.as_ref().and_then(|c| c.as_i64()).unwrap_or(0);
            let (epoch, nanos) = split_time(t);
            let (bp, ap, bs, as_) = (e.bp.unwrap_or(0.0), e.ap.unwrap_or(0.0), e.bs.unwrap_or(0.0), e.as_.unwrap_or(0.0));
            let id = id_hash(("Q", &sym, t, e.q, e.bx, e.ax, bp.to_bits(), ap.to_bits(), bs.to_bits(), as_.to_bits()));
            Event::Quote {
                sym,
                quote: Quote {
                    epoch,
                    nanos,
                    bid_price: bp,
                    ask_price: ap,
                    bid_size: bs.max(0.0).round() as u64,
                    ask_size: as_.max(0.0).round() as u64,
                    bid_exchange: small(e.bx.unwrap_or(0)),
                    ask_exchange: small(e.ax.unwrap_or(0)),
                    cond: small(cond),
                    id,
                },
            }
        }
        other => Event::Skipped(format!("event type {other:?}")),
    }
}

/// MarketStore's trade filter: size and price positive, none of [`SKIPPED_CONDITIONS`] (stream and backfill).
pub fn trade_kept(price: f64, size: f64, conds: &[i64]) -> bool {
    size > 0.0 && price > 0.0 && !conds.iter().any(|c| SKIPPED_CONDITIONS.contains(c))
}

/// Parse one stream message: a JSON array of events (a single object is accepted too).
pub fn parse_message(text: &str) -> Result<Vec<Event>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let items = match v {
        serde_json::Value::Array(a) => a,
        o @ serde_json::Value::Object(_) => vec![o],
        _ => return Err("expected a JSON array of events".into()),
    };
    Ok(items
        .into_iter()
        .map(|it| match serde_json::from_value::<RawEvent>(it) {
            Ok(e) => parse_event(e),
            Err(e) => Event::Skipped(format!("malformed event: {e}")),
        })
        .collect())
}

/// The bucket segment of a ticker (`BRK/A` → `BRK.A`).
pub fn bucket_symbol(sym: &str) -> String {
    sym.replacen('/', ".", 1)
}

/// The bars bucket schema.
pub fn bars_schema(tick_count: bool) -> Arc<Schema> {
    let mut f = vec![
        Field::new("Epoch", DataType::Int64, false),
        Field::new("Open", DataType::Float64, false),
        Field::new("High", DataType::Float64, false),
        Field::new("Low", DataType::Float64, false),
        Field::new("Close", DataType::Float64, false),
        Field::new("Volume", DataType::UInt64, false),
    ];
    if tick_count {
        f.push(Field::new("TickCnt", DataType::Int32, false));
    }
    Arc::new(Schema::new(f))
}

/// Minute bars as a batch of the bars schema.
pub fn bars_batch(bars: &[MinuteBar], tick_count: bool) -> Result<RecordBatch, ContribError> {
    let f = |g: fn(&MinuteBar) -> f64| Arc::new(Float64Array::from_iter_values(bars.iter().map(g))) as ArrayRef;
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(bars.iter().map(|b| b.t))),
        f(|b| b.open),
        f(|b| b.high),
        f(|b| b.low),
        f(|b| b.close),
        Arc::new(UInt64Array::from_iter_values(bars.iter().map(|b| b.volume))),
    ];
    if tick_count {
        cols.push(Arc::new(Int32Array::from_iter_values(bars.iter().map(|b| b.ticks))));
    }
    Ok(RecordBatch::try_new(bars_schema(tick_count), cols)?)
}

/// The `<SYM>/1Sec/TRADE` schema (MarketStore's `models.Trade` columns), streamed or backfilled.
pub fn trades_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Int64, false),
        Field::new("Nanoseconds", DataType::Int32, false),
        Field::new("Price", DataType::Float64, false),
        Field::new("Size", DataType::UInt64, false),
        Field::new("Exchange", DataType::UInt8, false),
        Field::new("TapeID", DataType::UInt8, false),
        Field::new("Cond1", DataType::UInt8, false),
        Field::new("Cond2", DataType::UInt8, false),
        Field::new("Cond3", DataType::UInt8, false),
        Field::new("Cond4", DataType::UInt8, false),
    ]))
}

/// Trades as a batch of [`trades_schema`].
pub fn trades_batch(t: &[Trade]) -> Result<RecordBatch, ContribError> {
    let u8c = |g: &dyn Fn(&Trade) -> u8| Arc::new(UInt8Array::from_iter_values(t.iter().map(g))) as ArrayRef;
    Ok(RecordBatch::try_new(
        trades_schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(t.iter().map(|x| x.epoch))),
            Arc::new(Int32Array::from_iter_values(t.iter().map(|x| x.nanos))),
            Arc::new(Float64Array::from_iter_values(t.iter().map(|x| x.price))),
            Arc::new(UInt64Array::from_iter_values(t.iter().map(|x| x.size))),
            u8c(&|x| x.exchange),
            u8c(&|x| x.tape),
            u8c(&|x| x.conds[0]),
            u8c(&|x| x.conds[1]),
            u8c(&|x| x.conds[2]),
            u8c(&|x| x.conds[3]),
        ],
    )?)
}

/// The `<SYM>/1Sec/QUOTE` schema (MarketStore's `models.Quote` columns), streamed or backfilled.
pub fn quotes_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Int64, false),
        Field::new("Nanoseconds", DataType::Int32, false),
        Field::new("BidPrice", DataType::Float64, false),
        Field::new("AskPrice", DataType::Float64, false),
        Field::new("BidSize", DataType::UInt64, false),
        Field::new("AskSize", DataType::UInt64, false),
        Field::new("BidExchange", DataType::UInt8, false),
        Field::new("AskExchange", DataType::UInt8, false),
        Field::new("Cond", DataType::UInt8, false),
    ]))
}

/// Quotes as a batch of [`quotes_schema`].
pub fn quotes_batch(q: &[Quote]) -> Result<RecordBatch, ContribError> {
    Ok(RecordBatch::try_new(
        quotes_schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(q.iter().map(|x| x.epoch))),
            Arc::new(Int32Array::from_iter_values(q.iter().map(|x| x.nanos))),
            Arc::new(Float64Array::from_iter_values(q.iter().map(|x| x.bid_price))),
            Arc::new(Float64Array::from_iter_values(q.iter().map(|x| x.ask_price))),
            Arc::new(UInt64Array::from_iter_values(q.iter().map(|x| x.bid_size))),
            Arc::new(UInt64Array::from_iter_values(q.iter().map(|x| x.ask_size))),
            Arc::new(UInt8Array::from_iter_values(q.iter().map(|x| x.bid_exchange))),
            Arc::new(UInt8Array::from_iter_values(q.iter().map(|x| x.ask_exchange))),
            Arc::new(UInt8Array::from_iter_values(q.iter().map(|x| x.cond))),
        ],
    )?)
}

/// A REST aggregates page: its bars and the `next_url` to follow.
#[derive(Debug, Clone, PartialEq)]
pub struct AggsPage {
    pub bars: Vec<MinuteBar>,
    pub next_url: Option<String>,
}

/// Parse `GET /v2/aggs/ticker/...` (`{"status":"OK","results":[{"t","o","h","l","c","v","n"}],"next_url"}`);
/// `"status":"ERROR"` is an error.
pub fn parse_aggs(body: &str, url: &str) -> Result<AggsPage, ContribError> {
    #[derive(Deserialize)]
    struct R {
        t: i64,
        o: f64,
        h: f64,
        l: f64,
        c: f64,
        #[serde(default)]
        v: f64,
        #[serde(default)]
        n: Option<f64>,
    }
    #[derive(Deserialize)]
    struct P {
        #[serde(default)]
        status: Option<String>,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        results: Option<Vec<R>>,
        #[serde(default)]
        next_url: Option<String>,
    }
    let p: P = serde_json::from_str(body).map_err(|e| ContribError::Parse { url: url.into(), msg: e.to_string() })?;
    if p.status.as_deref() == Some("ERROR") {
        return Err(ContribError::Parse { url: url.into(), msg: p.error.unwrap_or_else(|| "status ERROR".into()) });
    }
    let bars = p
        .results
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            let (s, _) = split_time(r.t);
            MinuteBar { t: s, open: r.o, high: r.h, low: r.l, close: r.c, volume: r.v.max(0.0).round() as u64, ticks: r.n.unwrap_or(0.0) as i32 }
        })
        .collect();
    Ok(AggsPage { bars, next_url: p.next_url.filter(|u| !u.is_empty()) })
}

/// `next_url` rebased on `base_url` (its path and query kept; a proxy or test server stays in the loop and
/// the key is never sent to another host). `None` when it is not a URL.
pub fn rebase_url(next: &str, base_url: &str) -> Option<String> {
    let rest = next.split_once("://").map(|(_, r)| r)?;
    let path = &rest[rest.find('/')?..];
    Some(format!("{base_url}{path}"))
}

/// A set of the last `cap` event ids.
pub struct Recent {
    cap: usize,
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

impl Recent {
    /// Remember at most `cap` ids (0 disables duplicate detection).
    pub fn new(cap: usize) -> Self {
        Recent { cap, set: HashSet::new(), order: VecDeque::new() }
    }

    /// True the first time `id` is seen (within the window).
    pub fn first(&mut self, id: u64) -> bool {
        if self.cap == 0 {
            return true;
        }
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

/// Counters of a running feed (also in `/metrics`).
pub use crate::metrics::FeedStats;

/// How many threads write one flush's buckets at once (their appends share the engine's group commit).
const WRITE_THREADS: usize = 4;

/// Write every `(bucket, batch, tick bucket?)` of one flush, on up to [`WRITE_THREADS`] threads; failures
/// are logged per bucket.
pub(crate) fn store_all(plugin: &'static str, client: &Client, stats: &FeedStats, items: Vec<(BucketKey, Result<RecordBatch, ContribError>, bool)>) {
    let one = |(key, batch, variable): (BucketKey, Result<RecordBatch, ContribError>, bool)| {
        if let Err(e) = batch.and_then(|b| write(client, &key, b, variable, stats)) {
            tracing::error!(plugin, bucket = %key, "write failed: {e}");
        }
    };
    if items.len() <= 1 {
        items.into_iter().for_each(one);
        return;
    }
    let per = items.len().div_ceil(WRITE_THREADS);
    let mut items = items;
    let mut chunks = Vec::new();
    while !items.is_empty() {
        let rest = items.split_off(per.min(items.len()));
        chunks.push(std::mem::replace(&mut items, rest));
    }
    std::thread::scope(|s| {
        for chunk in chunks {
            s.spawn(|| chunk.into_iter().for_each(one));
        }
    });
}

/// A range of minute bars missing from a bucket, to fetch over REST.
pub(crate) struct GapJob {
    pub sym: String,
    pub key: BucketKey,
    /// First and last missing bar start (Unix seconds, inclusive).
    pub from: i64,
    pub to: i64,
}

/// The gap before the first bar `t` of a symbol after a (re)connect: `Some(range)` to fetch, and whether
/// the symbol is now checked for this session (not when `t` is at or before the last stored bar: an old bar
/// re-sent says nothing about the gap). An empty bucket is filled from `query_start` when set.
pub(crate) fn gap_before(client: &Client, key: &BucketKey, t: i64, query_start: Option<i64>) -> (Option<(i64, i64)>, bool) {
    let last = client.info(key).ok().and_then(|i| i.last_epoch);
    let from = match last {
        Some(l) if t > l => Some(l + 60),
        Some(_) => None,
        None => query_start.map(|s| s + (-s).rem_euclid(60)),
    };
    (from.filter(|f| *f <= t - 60).map(|f| (f, t - 60)), last.is_none_or(|l| t > l))
}

/// A provider's REST minute bars, page by page.
pub(crate) trait BarSource: Send + 'static {
    /// For log lines.
    fn plugin(&self) -> &'static str;
    /// Whether bars carry `TickCnt`.
    fn tick_count(&self) -> bool;
    /// Hand every page of bars of `job` to `sink`.
    fn pages(&self, http: &Http, job: &GapJob, stop: &Stop, sink: &mut dyn FnMut(Vec<MinuteBar>) -> Result<(), ContribError>) -> Result<(), ContribError>;
}

/// Start the thread that fills gaps: jobs arrive on the returned sender; a 401/403 disables it (one line).
pub(crate) fn spawn_gap_worker<S: BarSource>(src: S, timeout: Duration, interval: Duration, client: Client, stats: Arc<FeedStats>, stop: Arc<Stop>) -> (mpsc::Sender<GapJob>, Option<std::thread::JoinHandle<()>>) {
    let (tx, rx) = mpsc::channel();
    let name = format!("{}-gapfill", src.plugin());
    let h = std::thread::Builder::new().name(name).spawn(move || gap_worker(src, timeout, interval, client, stats, stop, rx)).ok();
    (tx, h)
}

/// Write one batch (creating the bucket fixed or as ticks) and count its rows.
pub(crate) fn write(client: &Client, key: &BucketKey, batch: RecordBatch, variable: bool, stats: &FeedStats) -> Result<(), ContribError> {
    let n = batch.num_rows() as u64;
    client.write_blocking(&WriteRequest { key: key.clone(), batch, variable: Some(variable) })?;
    stats.rows.fetch_add(n, Ordering::Relaxed);
    Ok(())
}

/// Polygon's REST aggregates as a [`BarSource`].
struct PolygonRest {
    api_key: Secret,
    base_url: String,
    tick_count: bool,
}

impl BarSource for PolygonRest {
    fn plugin(&self) -> &'static str {
        PLUGIN
    }

    fn tick_count(&self) -> bool {
        self.tick_count
    }

    fn pages(&self, http: &Http, job: &GapJob, stop: &Stop, sink: &mut dyn FnMut(Vec<MinuteBar>) -> Result<(), ContribError>) -> Result<(), ContribError> {
        let auth = format!("Bearer {}", self.api_key.expose());
        let headers = [("Authorization", auth.as_str())];
        let mut url = format!("{}/v2/aggs/ticker/{}/range/1/minute/{}/{}?adjusted=true&sort=asc&limit=50000", self.base_url, job.sym, job.from * 1000, job.to * 1000 + 59_999);
        for _ in 0..10_000 {
            let body = http.get_with(&url, &headers, stop)?;
            let page = parse_aggs(&body, &url)?;
            sink(page.bars)?;
            match page.next_url.as_deref().and_then(|n| rebase_url(n, &self.base_url)) {
                Some(next) if !stop.is_stopped() => url = next,
                _ => break,
            }
        }
        Ok(())
    }
}

/// Fetch the minute bars of `job` from `src`, writing page by page; returns the rows written.
fn fill_gap<S: BarSource>(src: &S, http: &Http, client: &Client, job: &GapJob, stats: &FeedStats, stop: &Stop) -> Result<u64, ContribError> {
    let mut total = 0;
    src.pages(http, job, stop, &mut |page| {
        let mut bars: Vec<MinuteBar> = page.into_iter().filter(|b| b.t >= job.from && b.t <= job.to && b.t % 60 == 0).collect();
        bars.sort_by_key(|b| b.t);
        bars.dedup_by_key(|b| b.t);
        if !bars.is_empty() {
            write(client, &job.key, bars_batch(&bars, src.tick_count())?, false, stats)?;
            total += bars.len() as u64;
            stats.backfilled.fetch_add(bars.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    })?;
    Ok(total)
}

fn gap_worker<S: BarSource>(src: S, timeout: Duration, interval: Duration, client: Client, stats: Arc<FeedStats>, stop: Arc<Stop>, jobs: mpsc::Receiver<GapJob>) {
    let plugin = src.plugin();
    let http = Http::new(plugin, timeout, interval);
    let mut disabled = false;
    loop {
        let job = match jobs.recv_timeout(Duration::from_millis(500)) {
            Ok(j) => j,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if stop.is_stopped() {
                    return;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if disabled || stop.is_stopped() {
            continue;
        }
        match fill_gap(&src, &http, &client, &job, &stats, &stop) {
            Ok(n) => tracing::info!(plugin, bucket = %job.key, "gap {} .. {} filled over REST: {n} bars", fmt_time(job.from), fmt_time(job.to)),
            Err(ContribError::Http { status: status @ (401 | 403), body, .. }) => {
                tracing::error!(plugin, "REST authentication failed (HTTP {status}: {body}); gap fills disabled until restart");
                disabled = true;
            }
            Err(e) => tracing::warn!(plugin, bucket = %job.key, "gap {} .. {} not filled: {e}", fmt_time(job.from), fmt_time(job.to)),
        }
    }
}

/// What kind of bucket an event goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Bars,
    Trades,
    Quotes,
}

/// Where the streaming feeders (`polygon`, `alpaca`) put their events: per-bucket batches of bars, trades and
/// quotes (one schema per bucket, whichever feeder), repeats dropped, the gap before a symbol's first bar
/// after a (re)connect queued for the REST gap-fill thread. [`Sink::flush`] writes what was gathered.
pub(crate) struct Sink<'a> {
    plugin: &'static str,
    client: &'a Client,
    stats: &'a FeedStats,
    jobs: mpsc::Sender<GapJob>,
    recent: Recent,
    query_start: Option<i64>,
    tick_count: bool,
    keys: HashMap<(String, Kind), Option<BucketKey>>,
    /// Warnings already logged.
    pub warned: HashSet<String>,
    bars: HashMap<BucketKey, Vec<MinuteBar>>,
    trades: HashMap<BucketKey, Vec<Trade>>,
    quotes: HashMap<BucketKey, Vec<Quote>>,
}

impl<'a> Sink<'a> {
    /// A sink writing through `client`; `dedupe_window` recent trades/quotes are remembered; an empty bars
    /// bucket is filled from `query_start`; `tick_count` adds the `TickCnt` column.
    pub fn new(plugin: &'static str, client: &'a Client, stats: &'a FeedStats, jobs: mpsc::Sender<GapJob>, dedupe_window: usize, query_start: Option<i64>, tick_count: bool) -> Self {
        Sink { plugin, client, stats, jobs, recent: Recent::new(dedupe_window), query_start, tick_count, keys: HashMap::new(), warned: HashSet::new(), bars: HashMap::new(), trades: HashMap::new(), quotes: HashMap::new() }
    }

    /// The feed's counters.
    pub fn stats(&self) -> &'a FeedStats {
        self.stats
    }

    fn key(&mut self, sym: &str, kind: Kind) -> Option<BucketKey> {
        let cache_key = (sym.to_string(), kind);
        if let Some(k) = self.keys.get(&cache_key) {
            return k.clone();
        }
        let (tf, group) = match kind {
            Kind::Bars => ("1Min", "OHLCV"),
            Kind::Trades => ("1Sec", "TRADE"),
            Kind::Quotes => ("1Sec", "QUOTE"),
        };
        let k = match BucketKey::from_parts(&bucket_symbol(sym), tf, group) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(plugin = self.plugin, symbol = %sym, "skipped: {e}");
                None
            }
        };
        if self.keys.len() > 100_000 {
            self.keys.clear();
        }
        self.keys.insert(cache_key, k.clone());
        k
    }

    /// A minute bar; the first of a symbol this session (not yet in `checked`) queues the gap before it.
    pub fn bar(&mut self, sym: &str, bar: MinuteBar, checked: &mut HashSet<String>) {
        let Some(key) = self.key(sym, Kind::Bars) else { return };
        if !checked.contains(sym) {
            // The first bar after a (re)connect: fill the minutes between the last stored bar and it.
            let (gap, done) = gap_before(self.client, &key, bar.t, self.query_start);
            if done {
                checked.insert(sym.to_string());
            }
            if let Some((from, to)) = gap {
                let _ = self.jobs.send(GapJob { sym: sym.to_string(), key: key.clone(), from, to });
            }
        }
        self.stats.last_bar.fetch_max(bar.t.max(0) as u64, Ordering::Relaxed);
        self.bars.entry(key).or_default().push(bar);
    }

    /// A trade, unless it repeats one of the recent ones.
    pub fn trade(&mut self, sym: &str, trade: Trade) {
        if !self.recent.first(trade.id) {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        } else if let Some(key) = self.key(sym, Kind::Trades) {
            self.trades.entry(key).or_default().push(trade);
        }
    }

    /// A quote, unless it repeats one of the recent ones.
    pub fn quote(&mut self, sym: &str, quote: Quote) {
        if !self.recent.first(quote.id) {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        } else if let Some(key) = self.key(sym, Kind::Quotes) {
            self.quotes.entry(key).or_default().push(quote);
        }
    }

    /// Write what was gathered, one batch per bucket, in time order (the last version of a bar wins).
    pub fn flush(&mut self) {
        let mut items = Vec::with_capacity(self.bars.len() + self.trades.len() + self.quotes.len());
        for (key, mut b) in self.bars.drain() {
            // Within one flush the last version of a minute wins.
            b.reverse();
            b.sort_by_key(|x| x.t);
            b.dedup_by_key(|x| x.t);
            items.push((key, bars_batch(&b, self.tick_count), false));
        }
        for (key, mut t) in self.trades.drain() {
            t.sort_by_key(|x| (x.epoch, x.nanos));
            items.push((key, trades_batch(&t), true));
        }
        for (key, mut q) in self.quotes.drain() {
            q.sort_by_key(|x| (x.epoch, x.nanos));
            items.push((key, quotes_batch(&q), true));
        }
        store_all(self.plugin, self.client, self.stats, items);
    }
}

/// Polygon's messages and control events.
struct Polygon<'a>(&'a PolygonConfig);

impl Protocol for Polygon<'_> {
    type Event = Event;
    const PLUGIN: &'static str = PLUGIN;

    fn parse(text: &str) -> Result<Vec<Event>, String> {
        parse_message(text)
    }

    fn is_data(ev: &Event) -> bool {
        matches!(ev, Event::Bar { .. } | Event::Trade { .. } | Event::Quote { .. })
    }

    fn route(&self, ev: Event, sink: &mut Sink<'_>, checked: &mut HashSet<String>) -> Result<(), ContribError> {
        let cfg = self.0;
        match ev {
            Event::Status { status, message } => match status.as_str() {
                "auth_failed" => return Err(ContribError::Auth { plugin: PLUGIN, msg: format!("{status}: {message}") }),
                // One `success` per subscribed channel: thousands for a large symbol list.
                "success" | "connected" | "auth_success" => tracing::debug!(plugin = PLUGIN, "{status}: {message}"),
                _ => tracing::warn!(plugin = PLUGIN, "{status}: {message}"),
            },
            Event::Bar { sym, bar } if cfg.bars => sink.bar(&sym, bar, checked),
            Event::Trade { sym, trade } if cfg.trades => sink.trade(&sym, trade),
            Event::Quote { sym, quote } if cfg.quotes => sink.quote(&sym, quote),
            Event::Skipped(why) => warn_once(PLUGIN, &mut sink.warned, format!("skipped: {why}")),
            _ => {}
        }
        Ok(())
    }
}

impl Feed<'_, Polygon<'_>> {
    /// One connection: handshake, auth, subscribe, then [`read_loop`] until an error or stop.
    fn session(&mut self, url: &str, stop: &Stop, got_data: &mut bool) -> Result<(), ContribError> {
        let cfg = self.proto.0;
        let mut ws = WsClient::connect(PLUGIN, url, cfg.timeout, &cfg.trust)?;
        ws.set_read_timeout(Duration::from_millis(500))?;
        // `connected`, then `auth_success` (a server may batch or skip the first).
        let mut authed = false;
        let deadline = Instant::now() + cfg.timeout;
        let mut sent_auth = false;
        while !authed {
            if stop.is_stopped() {
                ws.close();
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ContribError::Transport { url: url.into(), msg: "no auth_success within the timeout".into() });
            }
            let text = match ws.read_text(left.min(Duration::from_secs(1))) {
                Ok(t) => t,
                Err(_) if !sent_auth => {
                    // No `connected` greeting: authenticate anyway.
                    ws.send_text(&auth_message(cfg.api_key.expose()))?;
                    sent_auth = true;
                    continue;
                }
                Err(_) => continue,
            };
            let events = parse_message(&text).map_err(|m| ContribError::Parse { url: url.into(), msg: m })?;
            for ev in &events {
                if let Event::Status { status, message } = ev {
                    match status.as_str() {
                        "connected" if !sent_auth => {
                            ws.send_text(&auth_message(cfg.api_key.expose()))?;
                            sent_auth = true;
                        }
                        "auth_success" => authed = true,
                        "auth_failed" => return Err(ContribError::Auth { plugin: PLUGIN, msg: format!("{status}: {message}") }),
                        _ => {}
                    }
                }
            }
        }
        tracing::info!(plugin = PLUGIN, url = %url, "authenticated");
        let subs = cfg.subscriptions();
        ws.send_text(&serde_json::json!({"action": "subscribe", "params": subs}).to_string())?;
        tracing::info!(plugin = PLUGIN, "subscribing to {} channels", subs.split(',').count());
        read_loop(self, ws, &mut HashSet::new(), stop, cfg.ping_interval, got_data)
    }
}

fn auth_message(key: &str) -> String {
    serde_json::json!({"action": "auth", "params": key}).to_string()
}

/// The worker loop: stream, reconnect with back-off, stop for good on an authentication failure.
pub fn run(cfg: PolygonConfig, client: Client, stop: Arc<Stop>, stats: Arc<FeedStats>) {
    let rest = PolygonRest { api_key: cfg.api_key.clone(), base_url: cfg.base_url.clone(), tick_count: cfg.add_bar_tick_count };
    let (tx, gap) = spawn_gap_worker(rest, cfg.timeout, cfg.request_interval, client.clone(), stats.clone(), stop.clone());
    let mut feed = Feed { proto: Polygon(&cfg), sink: Sink::new(PLUGIN, &client, &stats, tx, cfg.dedupe_window, cfg.query_start, cfg.add_bar_tick_count) };
    let types: Vec<&str> = [(cfg.bars, "bars"), (cfg.trades, "trades"), (cfg.quotes, "quotes")].into_iter().filter(|(on, _)| *on).map(|(_, t)| t).collect();
    let what = if cfg.symbols.is_empty() { "all tickers".to_string() } else { format!("{} symbols", cfg.symbols.len()) };
    tracing::info!(plugin = PLUGIN, "streaming {} for {what}", types.join(", "));
    reconnect_loop(PLUGIN, &cfg.ws_urls, &format!("check api_key / ${API_KEY_ENV}"), &stop, &stats, |url, got_data| feed.session(url, &stop, got_data));
    drop(feed);
    stop.stop();
    if let Some(g) = gap {
        let _ = g.join();
    }
}

/// Start the worker from its `config:` map (`api_key` may come from `$POLYGON_API_KEY`).
pub fn start(v: &serde_json::Value, client: Client, name: &str, feed: Arc<FeedStats>) -> Result<FeederHandle, ContribError> {
    let cfg = PolygonConfig::from_json(v, |k| std::env::var(k).ok())?;
    Ok(super::feeder::spawn_worker(format!("{PLUGIN}-{name}"), move |stop| run(cfg, client, stop, feed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: serde_json::Value) -> Result<PolygonConfig, ContribError> {
        PolygonConfig::from_json(&v, |_| None)
    }

    #[test]
    fn config_keys_and_key_from_env() {
        let c = cfg(serde_json::json!({"api_key": "k", "data_types": ["bars", "trades"], "symbols": ["AAPL", "MSFT"], "ws_servers": "ws://127.0.0.1:1, ws://h:2/x"})).unwrap();
        assert_eq!(c.ws_urls, vec!["ws://127.0.0.1:1/stocks", "ws://h:2/x"]);
        assert_eq!(c.subscriptions(), "AM.AAPL,AM.MSFT,T.AAPL,T.MSFT");
        assert_eq!(c.base_url, DEFAULT_URL);
        assert_eq!(format!("{:?}", c.api_key), "<redacted>");
        assert!(!format!("{c:?}").contains("\"k\""));
        let c = cfg(serde_json::json!({"api_key": "k", "data_types": ["quotes"], "symbols": ["*"]})).unwrap();
        assert_eq!(c.subscriptions(), "Q.*");
        assert_eq!(c.ws_urls, vec!["wss://socket.polygon.io/stocks"]);
        assert!(cfg(serde_json::json!({"api_key": "k", "data_types": []})).is_err());
        assert!(cfg(serde_json::json!({"api_key": "k", "data_types": ["candles"]})).is_err());
        assert!(cfg(serde_json::json!({"data_types": ["bars"]})).is_err());
        assert!(cfg(serde_json::json!({"api_key": "k", "data_types": ["bars"], "bogus": 1})).is_err());
        let e = PolygonConfig::from_json(&serde_json::json!({"data_types": ["bars"]}), |k| (k == API_KEY_ENV).then(|| "envkey".to_string())).unwrap();
        assert_eq!(e.api_key.expose(), "envkey");
    }

    #[test]
    fn parses_real_stream_messages() {
        let m = r#"[{"ev":"status","status":"connected","message":"Connected Successfully"}]"#;
        assert_eq!(parse_message(m).unwrap(), vec![Event::Status { status: "connected".into(), message: "Connected Successfully".into() }]);
        let am = r#"[{"ev":"AM","sym":"GTE","v":4110,"av":9470157,"op":0.4372,"vw":0.4488,"o":0.4488,"c":0.4486,"h":0.4489,"l":0.4486,"a":0.4352,"z":685,"s":1610144640000,"e":1610144700000}]"#;
        match &parse_message(am).unwrap()[0] {
            Event::Bar { sym, bar } => {
                assert_eq!(sym, "GTE");
                assert_eq!(*bar, MinuteBar { t: 1_610_144_640, open: 0.4488, high: 0.4489, low: 0.4486, close: 0.4486, volume: 4110, ticks: 0 });
            }
            e => panic!("{e:?}"),
        }
        let t = r#"[{"ev":"T","sym":"MSFT","x":4,"i":"12345","z":3,"p":114.125,"s":100,"c":[0,12],"t":1536036818784,"q":3681328}]"#;
        match &parse_message(t).unwrap()[0] {
            Event::Trade { sym, trade } => {
                assert_eq!(sym, "MSFT");
                assert_eq!((trade.epoch, trade.nanos, trade.price, trade.size, trade.exchange, trade.tape, trade.conds), (1_536_036_818, 784_000_000, 114.125, 100, 4, 3, [0, 12, 0, 0]));
            }
            e => panic!("{e:?}"),
        }
        let filtered = r#"[{"ev":"T","sym":"MSFT","x":4,"i":"1","z":3,"p":114.1,"s":100,"c":[15],"t":1536036818784},{"ev":"T","sym":"MSFT","p":1.0,"s":0,"t":1}]"#;
        assert_eq!(parse_message(filtered).unwrap(), vec![Event::Filtered, Event::Filtered]);
        let q = r#"[{"ev":"Q","sym":"MSFT","bx":4,"bp":114.125,"bs":100,"ax":7,"ap":114.128,"as":160,"c":0,"i":[604],"t":1536036818784,"q":50385480,"z":3}]"#;
        match &parse_message(q).unwrap()[0] {
            Event::Quote { quote, .. } => assert_eq!((quote.bid_price, quote.ask_price, quote.bid_size, quote.ask_size, quote.bid_exchange, quote.ask_exchange), (114.125, 114.128, 100, 160, 4, 7)),
            e => panic!("{e:?}"),
        }
        assert!(matches!(parse_message(r#"[{"ev":"AM","sym":"X"}]"#).unwrap()[0], Event::Skipped(_)));
        assert!(matches!(parse_message(r#"[{"ev":"T","sym":"X","p":"bad"}]"#).unwrap()[0], Event::Skipped(_)));
        assert!(parse_message("nope").is_err());
        assert!(parse_message("3").is_err());
    }

    #[test]
    fn duplicates_are_recognised() {
        let t = r#"[{"ev":"T","sym":"A","x":4,"i":"1","p":1.5,"s":10,"t":1000},{"ev":"T","sym":"A","x":4,"i":"1","p":1.5,"s":10,"t":1000},{"ev":"T","sym":"A","x":4,"i":"2","p":1.5,"s":10,"t":1000}]"#;
        let ids: Vec<u64> = parse_message(t).unwrap().into_iter().filter_map(|e| if let Event::Trade { trade, .. } = e { Some(trade.id) } else { None }).collect();
        let mut r = Recent::new(2);
        assert!(r.first(ids[0]));
        assert!(!r.first(ids[1]));
        assert!(r.first(ids[2]));
        assert!(r.first(99));
        assert!(r.first(ids[0]), "evicted beyond the window");
    }

    #[test]
    fn times_and_rest_pages() {
        assert_eq!(split_time(1_536_036_818_784), (1_536_036_818, 784_000_000));
        assert_eq!(split_time(1_536_036_818_784_123), (1_536_036_818, 784_123_000));
        assert_eq!(split_time(1_536_036_818_784_123_456), (1_536_036_818, 784_123_456));
        let body = r#"{"ticker":"AAPL","queryCount":2,"resultsCount":2,"adjusted":true,"results":[{"v":70790813,"vw":131.6292,"o":131.25,"c":130.92,"h":132.63,"l":130.23,"t":1704205800000,"n":645365}],"status":"OK","request_id":"x","count":1,"next_url":"https://api.polygon.io/v2/aggs/ticker/AAPL/range/1/minute/1704205860000/1704239999999?cursor=bGltaXQ9Mg"}"#;
        let p = parse_aggs(body, "u").unwrap();
        assert_eq!(p.bars[0], MinuteBar { t: 1_704_205_800, open: 131.25, high: 132.63, low: 130.23, close: 130.92, volume: 70_790_813, ticks: 645_365 });
        assert_eq!(rebase_url(p.next_url.as_deref().unwrap(), "http://127.0.0.1:9").unwrap(), "http://127.0.0.1:9/v2/aggs/ticker/AAPL/range/1/minute/1704205860000/1704239999999?cursor=bGltaXQ9Mg");
        assert!(parse_aggs(r#"{"status":"ERROR","error":"Unknown API Key"}"#, "u").is_err());
        assert_eq!(parse_aggs(r#"{"status":"OK","resultsCount":0}"#, "u").unwrap().bars.len(), 0);
        assert_eq!(bucket_symbol("BRK/A"), "BRK.A");
    }

    #[test]
    fn batches_have_one_schema_per_bucket() {
        let b = bars_batch(&[MinuteBar { t: 60, open: 1.0, high: 2.0, low: 0.5, close: 1.5, volume: 7, ticks: 3 }], true).unwrap();
        assert_eq!(b.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>(), vec!["Epoch", "Open", "High", "Low", "Close", "Volume", "TickCnt"]);
        let t = trades_batch(&[Trade { epoch: 1, nanos: 2, price: 1.0, size: 1, exchange: 4, tape: 1, conds: [0; 4], id: 0 }]).unwrap();
        assert_eq!(t.num_columns(), 10);
        let q = quotes_batch(&[]).unwrap();
        assert_eq!(q.num_columns(), 9);
    }
}
