//! `alpaca` (background worker): Alpaca's v2 market-data WebSocket (the v1 stream MarketStore's plugin spoke
//! is retired) — minute bars, trades and quotes into MarketStore's buckets, with the schemas the `polygon`
//! worker writes (`<SYM>/1Min/OHLCV`, `<SYM>/1Sec/TRADE`, `<SYM>/1Sec/QUOTE`).
//!
//! ```yaml
//! bgworkers:
//!   - module: alpaca.so
//!     name: Alpaca
//!     config:
//!       api_key: ""            # empty: $APCA_API_KEY_ID
//!       api_secret: ""         # empty: $APCA_API_SECRET_KEY
//!       feed: iex              # iex (default), sip, delayed_sip, or test
//!       minute_bar_symbols: [AAPL, SPY]
//!       trade_symbols: [AAPL]
//!       quote_symbols: ["*"]
//! ```
//!
//! Protocol: connect to `<ws_server>/v2/<feed>` (a URL with a path is used as is), expect
//! `[{"T":"success","msg":"connected"}]`, send `{"action":"auth","key","secret"}`, expect
//! `{"T":"success","msg":"authenticated"}`, send `{"action":"subscribe","bars":[…],"trades":[…],"quotes":[…]}`,
//! expect `{"T":"subscription",…}`. Events: `{"T":"b","S","o","h","l","c","v","t","n","vw"}`,
//! `{"T":"t","S","i","x","p","s","t","c":[…],"z"}`, `{"T":"q","S","bx","bp","bs","ax","ap","as","t","c":[…],"z"}`
//! with RFC 3339 times. Errors `{"T":"error","code","msg"}`: 402 (auth failed), 401 and 409 (insufficient
//! subscription, e.g. `sip` without the plan) stop the worker with one log line; others are logged and the
//! connection is retried with back-off.
//!
//! Alpaca gives exchanges, tapes and conditions as letters; they are stored as their ASCII codes in the uint8
//! columns (`"D"` → 68, tape `"C"` → 67, condition `"@"` → 64).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::feeder::{parse_duration, parse_time, FeederHandle, Http, Stop};
use super::polygon::{spawn_gap_worker, BarSource, FeedStats, GapJob, MinuteBar, Quote, Secret, Sink, Trade};
use super::ws::{read_loop, reconnect_loop, warn_once, Feed, Protocol, Trust, WsClient};
use super::ContribError;
use crate::service::Client;

const PLUGIN: &str = "alpaca";
/// Alpaca's market-data stream root (`/v2/<feed>` is appended).
pub const DEFAULT_WS: &str = "wss://stream.data.alpaca.markets";
/// Alpaca's market-data REST root (gap fills).
pub const DEFAULT_URL: &str = "https://data.alpaca.markets";
/// Environment variables read when `api_key` / `api_secret` are empty (Alpaca's SDK names).
pub const KEY_ENV: &str = "APCA_API_KEY_ID";
pub const SECRET_ENV: &str = "APCA_API_SECRET_KEY";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default)]
    api_secret: Option<String>,
    #[serde(default)]
    ws_server: Option<String>,
    /// MarketStore's v1 worker count; one connection carries every subscription in v2. Ignored.
    #[serde(default)]
    ws_worker_count: Option<serde_json::Value>,
    #[serde(default)]
    feed: Option<String>,
    #[serde(default)]
    minute_bar_symbols: Vec<String>,
    #[serde(default)]
    quote_symbols: Vec<String>,
    #[serde(default)]
    trade_symbols: Vec<String>,
    #[serde(default)]
    ping_interval: Option<serde_json::Value>,
    #[serde(default)]
    timeout: Option<serde_json::Value>,
    #[serde(default)]
    dedupe_window: Option<usize>,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    query_start: Option<String>,
    #[serde(default)]
    request_interval: Option<serde_json::Value>,
    #[serde(default)]
    ca_file: Option<std::path::PathBuf>,
}

/// Parsed `alpaca` configuration.
#[derive(Debug, Clone)]
pub struct AlpacaConfig {
    pub key: Secret,
    pub secret: Secret,
    pub ws_url: String,
    pub feed: String,
    /// Subscriptions (`["*"]` = every symbol).
    pub bars: Vec<String>,
    pub trades: Vec<String>,
    pub quotes: Vec<String>,
    pub ping_interval: Duration,
    pub timeout: Duration,
    pub dedupe_window: usize,
    /// REST root for gap fills.
    pub base_url: String,
    /// Fill an empty bars bucket from here (Unix seconds).
    pub query_start: Option<i64>,
    /// Minimum time between REST requests.
    pub request_interval: Duration,
    /// CAs a `wss://` server may be signed by (public roots, plus `ca_file`'s).
    pub trust: Trust,
}

fn symbols(v: &[String]) -> Vec<String> {
    let s: Vec<String> = v.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    if s.iter().any(|x| x.contains('*')) { vec!["*".into()] } else { s }
}

impl AlpacaConfig {
    /// Parse the `config:` map; `env` looks up the credential fallbacks.
    pub fn from_json(v: &serde_json::Value, env: impl Fn(&str) -> Option<String>) -> Result<Self, ContribError> {
        let err = |msg: String| ContribError::Config { plugin: PLUGIN, msg };
        let raw: RawConfig = serde_json::from_value(if v.is_null() { serde_json::json!({}) } else { v.clone() }).map_err(|e| err(e.to_string()))?;
        let _ = raw.ws_worker_count;
        let cred = |c: Option<String>, var: &str| c.map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).or_else(|| env(var).map(|k| k.trim().to_string()).filter(|k| !k.is_empty()));
        let key = cred(raw.api_key, KEY_ENV).ok_or_else(|| err(format!("no API key: set api_key or ${KEY_ENV}")))?;
        let secret = cred(raw.api_secret, SECRET_ENV).ok_or_else(|| err(format!("no API secret: set api_secret or ${SECRET_ENV}")))?;
        let feed = raw.feed.map(|f| f.trim().to_ascii_lowercase()).filter(|f| !f.is_empty()).unwrap_or_else(|| "iex".into());
        if !matches!(feed.as_str(), "iex" | "sip" | "delayed_sip" | "test") {
            return Err(err(format!("feed: {feed:?} is not a v2 feed (iex, sip, delayed_sip, test); v1 prefixes such as alpacadatav1 are retired")));
        }
        let server = raw.ws_server.map(|s| s.trim().trim_end_matches('/').to_string()).filter(|s| !s.is_empty()).unwrap_or_else(|| DEFAULT_WS.into());
        if !(server.starts_with("ws://") || server.starts_with("wss://")) {
            return Err(err(format!("ws_server must start with ws:// or wss://, got {server:?}")));
        }
        let has_path = server.split_once("://").is_some_and(|(_, r)| r.contains('/'));
        let ws_url = if has_path { server } else { format!("{server}/v2/{feed}") };
        let (bars, trades, quotes) = (symbols(&raw.minute_bar_symbols), symbols(&raw.trade_symbols), symbols(&raw.quote_symbols));
        if bars.is_empty() && trades.is_empty() && quotes.is_empty() {
            return Err(err("nothing to subscribe to: set minute_bar_symbols, trade_symbols or quote_symbols".into()));
        }
        let dur = |k: &str, v: &Option<serde_json::Value>, d: Duration| -> Result<Duration, ContribError> {
            match v {
                None => Ok(d),
                Some(x) => parse_duration(x).filter(|d| !d.is_zero() || k == "request_interval").ok_or_else(|| err(format!("{k}: expected a duration like 10s"))),
            }
        };
        let base_url = raw.base_url.map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty()).unwrap_or_else(|| DEFAULT_URL.into());
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(err(format!("base_url must start with http:// or https://, got {base_url:?}")));
        }
        let query_start = match raw.query_start.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(x) => Some(parse_time(x).ok_or_else(|| err(format!("query_start: cannot parse {x:?}")))?),
        };
        Ok(AlpacaConfig {
            key: Secret::new(key),
            secret: Secret::new(secret),
            ws_url,
            feed,
            bars,
            trades,
            quotes,
            ping_interval: dur("ping_interval", &raw.ping_interval, Duration::from_secs(10))?,
            timeout: dur("timeout", &raw.timeout, Duration::from_secs(15))?,
            dedupe_window: raw.dedupe_window.unwrap_or(100_000),
            base_url,
            query_start,
            request_interval: dur("request_interval", &raw.request_interval, Duration::from_millis(250))?,
            trust: Trust::new(raw.ca_file.as_deref()).map_err(err)?,
        })
    }

    /// The subscribe message.
    pub fn subscribe_message(&self) -> String {
        serde_json::json!({"action": "subscribe", "bars": self.bars, "trades": self.trades, "quotes": self.quotes}).to_string()
    }
}

/// Alpaca's REST minute bars (`GET /v2/stocks/{sym}/bars`) as a gap-fill source.
struct AlpacaRest {
    key: Secret,
    secret: Secret,
    base_url: String,
    feed: String,
}

/// Parse a bars page: `{"bars": [{"t","o","h","l","c","v","n","vw"}] | null, "symbol", "next_page_token"}`.
pub fn parse_bars_page(body: &str, url: &str) -> Result<(Vec<MinuteBar>, Option<String>), ContribError> {
    #[derive(Deserialize)]
    struct B {
        t: String,
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
        bars: Option<Vec<B>>,
        #[serde(default)]
        next_page_token: Option<String>,
    }
    let perr = |msg: String| ContribError::Parse { url: url.into(), msg };
    let p: P = serde_json::from_str(body).map_err(|e| perr(e.to_string()))?;
    let mut out = Vec::new();
    for b in p.bars.unwrap_or_default() {
        let (t, _) = rfc3339(&b.t).ok_or_else(|| perr(format!("bad bar time {:?}", b.t)))?;
        out.push(MinuteBar { t, open: b.o, high: b.h, low: b.l, close: b.c, volume: b.v.max(0.0).round() as u64, ticks: b.n.unwrap_or(0.0) as i32 });
    }
    Ok((out, p.next_page_token.filter(|t| !t.is_empty())))
}

fn rfc3339_secs(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0).map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default()
}

impl BarSource for AlpacaRest {
    fn plugin(&self) -> &'static str {
        PLUGIN
    }

    fn tick_count(&self) -> bool {
        false
    }

    fn pages(&self, http: &Http, job: &GapJob, stop: &Stop, sink: &mut dyn FnMut(Vec<MinuteBar>) -> Result<(), ContribError>) -> Result<(), ContribError> {
        let headers = [("APCA-API-KEY-ID", self.key.expose()), ("APCA-API-SECRET-KEY", self.secret.expose())];
        let feed = if self.feed == "test" { String::new() } else { format!("&feed={}", self.feed) };
        let first = format!("{}/v2/stocks/{}/bars?timeframe=1Min&start={}&end={}&limit=10000&adjustment=raw{feed}", self.base_url, job.sym, rfc3339_secs(job.from), rfc3339_secs(job.to));
        let mut url = first.clone();
        for _ in 0..10_000 {
            let body = http.get_with(&url, &headers, stop)?;
            let (bars, next) = parse_bars_page(&body, &url)?;
            sink(bars)?;
            match next {
                Some(tok) if !stop.is_stopped() => url = format!("{first}&page_token={tok}"),
                _ => break,
            }
        }
        Ok(())
    }
}

/// One event of a v2 stream message.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Success(String),
    Subscription(String),
    Error { code: i64, msg: String },
    Bar { sym: String, bar: MinuteBar },
    Trade { sym: String, trade: Trade },
    Quote { sym: String, quote: Quote },
    Skipped(String),
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "T")]
    kind: Option<String>,
    msg: Option<String>,
    code: Option<i64>,
    #[serde(rename = "S")]
    sym: Option<String>,
    o: Option<f64>,
    h: Option<f64>,
    l: Option<f64>,
    c: Option<serde_json::Value>,
    v: Option<f64>,
    n: Option<f64>,
    t: Option<String>,
    i: Option<serde_json::Value>,
    x: Option<String>,
    p: Option<f64>,
    s: Option<f64>,
    z: Option<String>,
    bx: Option<String>,
    bp: Option<f64>,
    bs: Option<f64>,
    ax: Option<String>,
    ap: Option<f64>,
    #[serde(rename = "as")]
    as_: Option<f64>,
}

fn letter(s: Option<&str>) -> u8 {
    s.and_then(|s| s.bytes().next()).filter(|b| b.is_ascii()).unwrap_or(0)
}

fn rfc3339(t: &str) -> Option<(i64, i32)> {
    let d = chrono::DateTime::parse_from_rfc3339(t).ok()?;
    Some((d.timestamp(), d.timestamp_subsec_nanos().min(999_999_999) as i32))
}

fn hash(parts: impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

fn conds(c: &Option<serde_json::Value>) -> Vec<u8> {
    match c {
        Some(serde_json::Value::Array(a)) => a.iter().map(|x| letter(x.as_str())).collect(),
        _ => Vec::new(),
    }
}

fn parse_event(e: Raw) -> Event {
    let sym = e.sym.clone().filter(|s| !s.is_empty());
    match e.kind.as_deref().unwrap_or("") {
        "success" => Event::Success(e.msg.unwrap_or_default()),
        "subscription" => Event::Subscription(String::new()),
        "error" => Event::Error { code: e.code.unwrap_or(0), msg: e.msg.unwrap_or_default() },
        "b" => {
            let close = e.c.as_ref().and_then(|c| c.as_f64());
            match (sym, e.o, e.h, e.l, close, e.v, e.t.as_deref().and_then(rfc3339)) {
                (Some(sym), Some(o), Some(h), Some(l), Some(c), Some(v), Some((t, _))) => {
                    Event::Bar { sym, bar: MinuteBar { t: t - t.rem_euclid(60), open: o, high: h, low: l, close: c, volume: v.max(0.0).round() as u64, ticks: e.n.unwrap_or(0.0) as i32 } }
                }
                _ => Event::Skipped("bar without S/o/h/l/c/v/t".into()),
            }
        }
        "t" => {
            let (Some(sym), Some(p), Some(sz), Some((epoch, nanos))) = (sym, e.p, e.s, e.t.as_deref().and_then(rfc3339)) else {
                return Event::Skipped("trade without S/p/s/t".into());
            };
            let c = conds(&e.c);
            let mut cs = [0u8; 4];
            for (k, v) in c.iter().take(4).enumerate() {
                cs[k] = *v;
            }
            let id = hash(("t", &sym, e.i.as_ref().map(|i| i.to_string()), &e.x, epoch, nanos, p.to_bits(), sz.to_bits()));
            Event::Trade { sym, trade: Trade { epoch, nanos, price: p, size: sz.max(0.0).round() as u64, exchange: letter(e.x.as_deref()), tape: letter(e.z.as_deref()), conds: cs, id } }
        }
        "q" => {
            let (Some(sym), Some((epoch, nanos))) = (sym, e.t.as_deref().and_then(rfc3339)) else {
                return Event::Skipped("quote without S/t".into());
            };
            let (bp, ap, bs, as_) = (e.bp.unwrap_or(0.0), e.ap.unwrap_or(0.0), e.bs.unwrap_or(0.0), e.as_.unwrap_or(0.0));
            let id = hash(("q", &sym, epoch, nanos, &e.bx, &e.ax, bp.to_bits(), ap.to_bits(), bs.to_bits(), as_.to_bits()));
            Event::Quote {
                sym,
                quote: Quote {
                    epoch,
                    nanos,
                    bid_price: bp,
                    ask_price: ap,
                    bid_size: bs.max(0.0).round() as u64,
                    ask_size: as_.max(0.0).round() as u64,
                    bid_exchange: letter(e.bx.as_deref()),
                    ask_exchange: letter(e.ax.as_deref()),
                    cond: conds(&e.c).first().copied().unwrap_or(0),
                    id,
                },
            }
        }
        other => Event::Skipped(format!("event type {other:?}")),
    }
}

/// Parse one stream message (a JSON array of events).
pub fn parse_message(text: &str) -> Result<Vec<Event>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let items = match v {
        serde_json::Value::Array(a) => a,
        o @ serde_json::Value::Object(_) => vec![o],
        _ => return Err("expected a JSON array of events".into()),
    };
    Ok(items.into_iter().map(|it| serde_json::from_value::<Raw>(it).map_or_else(|e| Event::Skipped(format!("malformed event: {e}")), parse_event)).collect())
}

/// Error codes that retrying cannot fix: not authenticated (401), auth failed (402), insufficient
/// subscription (409).
fn fatal(code: i64) -> bool {
    matches!(code, 401 | 402 | 409)
}

/// Alpaca's v2 messages and control events.
struct Alpaca;

impl Protocol for Alpaca {
    type Event = Event;
    const PLUGIN: &'static str = PLUGIN;

    fn parse(text: &str) -> Result<Vec<Event>, String> {
        parse_message(text)
    }

    fn is_data(ev: &Event) -> bool {
        matches!(ev, Event::Bar { .. } | Event::Trade { .. } | Event::Quote { .. })
    }

    fn route(&self, ev: Event, sink: &mut Sink<'_>, checked: &mut HashSet<String>) -> Result<(), ContribError> {
        match ev {
            Event::Error { code, msg } if fatal(code) => return Err(ContribError::Auth { plugin: PLUGIN, msg: format!("error {code}: {msg}") }),
            Event::Error { code, msg } => tracing::warn!(plugin = PLUGIN, "error {code}: {msg}"),
            Event::Success(m) => tracing::info!(plugin = PLUGIN, "{m}"),
            Event::Subscription(_) => tracing::info!(plugin = PLUGIN, "subscribed"),
            Event::Bar { sym, bar } => sink.bar(&sym, bar, checked),
            Event::Trade { sym, trade } => sink.trade(&sym, trade),
            Event::Quote { sym, quote } => sink.quote(&sym, quote),
            Event::Skipped(why) => warn_once(PLUGIN, &mut sink.warned, format!("skipped: {why}")),
        }
        Ok(())
    }
}

impl Feed<'_, Alpaca> {
    /// One connection: connected → auth → authenticated → subscribe → subscription, then [`read_loop`].
    fn session(&mut self, cfg: &AlpacaConfig, stop: &Stop, got_data: &mut bool) -> Result<(), ContribError> {
        let url = cfg.ws_url.as_str();
        let mut ws = WsClient::connect(PLUGIN, url, cfg.timeout, &cfg.trust)?;
        ws.set_read_timeout(Duration::from_millis(500))?;
        let auth = serde_json::json!({"action": "auth", "key": cfg.key.expose(), "secret": cfg.secret.expose()}).to_string();
        let deadline = Instant::now() + cfg.timeout;
        let mut checked = HashSet::new();
        let mut stage = 0; // 0 waiting for connected, 1 for authenticated, 2 for subscription
        while stage < 3 {
            if stop.is_stopped() {
                ws.close();
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ContribError::Transport { url: url.into(), msg: "handshake messages timed out".into() });
            }
            let text = match ws.read_text(left.min(Duration::from_secs(1))) {
                Ok(t) => t,
                Err(e) if left <= Duration::from_secs(1) => return Err(e),
                Err(_) => continue,
            };
            let events = parse_message(&text).map_err(|m| ContribError::Parse { url: url.into(), msg: m })?;
            for ev in events {
                match ev {
                    Event::Success(m) if m == "connected" && stage == 0 => {
                        ws.send_text(&auth)?;
                        stage = 1;
                    }
                    Event::Success(m) if m == "authenticated" && stage <= 1 => {
                        tracing::info!(plugin = PLUGIN, url = %url, "authenticated");
                        ws.send_text(&cfg.subscribe_message())?;
                        stage = 2;
                    }
                    Event::Subscription(_) if stage == 2 => {
                        tracing::info!(plugin = PLUGIN, "subscribed: bars {:?}, trades {:?}, quotes {:?}", cfg.bars, cfg.trades, cfg.quotes);
                        stage = 3;
                    }
                    Event::Error { code, msg } if fatal(code) => return Err(ContribError::Auth { plugin: PLUGIN, msg: format!("error {code}: {msg}") }),
                    Event::Error { code, msg } => return Err(ContribError::Transport { url: url.into(), msg: format!("error {code}: {msg}") }),
                    other => self.handle(vec![other], &mut checked)?,
                }
            }
        }
        read_loop(self, ws, &mut checked, stop, cfg.ping_interval, got_data)
    }
}

/// The worker loop: stream, reconnect with back-off, stop for good on an authentication or entitlement error.
pub fn run(cfg: AlpacaConfig, client: Client, stop: Arc<Stop>, stats: Arc<FeedStats>) {
    let rest = AlpacaRest { key: cfg.key.clone(), secret: cfg.secret.clone(), base_url: cfg.base_url.clone(), feed: cfg.feed.clone() };
    let (jobs, gap) = spawn_gap_worker(rest, cfg.timeout, cfg.request_interval, client.clone(), stats.clone(), stop.clone());
    let mut feed = Feed { proto: Alpaca, sink: Sink::new(PLUGIN, &client, &stats, jobs, cfg.dedupe_window, cfg.query_start, false) };
    tracing::info!(plugin = PLUGIN, feed = %cfg.feed, "streaming from {}", cfg.ws_url);
    let hint = format!("check api_key/api_secret (${KEY_ENV}/${SECRET_ENV}) and the feed");
    reconnect_loop(PLUGIN, std::slice::from_ref(&cfg.ws_url), &hint, &stop, &stats, |_, got_data| feed.session(&cfg, &stop, got_data));
    drop(feed);
    stop.stop();
    if let Some(g) = gap {
        let _ = g.join();
    }
}

/// Start the worker from its `config:` map.
pub fn start(v: &serde_json::Value, client: Client, name: &str, feed: Arc<FeedStats>) -> Result<FeederHandle, ContribError> {
    let cfg = AlpacaConfig::from_json(v, |k| std::env::var(k).ok())?;
    Ok(super::feeder::spawn_worker(format!("{PLUGIN}-{name}"), move |stop| run(cfg, client, stop, feed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config() {
        let c = AlpacaConfig::from_json(&serde_json::json!({"api_key": "k", "api_secret": "s", "feed": "sip", "minute_bar_symbols": ["SPY"], "trade_symbols": ["AAPL", "*"]}), |_| None).unwrap();
        assert_eq!(c.ws_url, "wss://stream.data.alpaca.markets/v2/sip");
        assert_eq!(c.trades, vec!["*"]);
        assert_eq!(c.subscribe_message(), r#"{"action":"subscribe","bars":["SPY"],"quotes":[],"trades":["*"]}"#);
        assert!(!format!("{c:?}").contains("\"k\""));
        assert!(AlpacaConfig::from_json(&serde_json::json!({"api_key": "k", "api_secret": "s", "feed": "alpacadatav1", "trade_symbols": ["A"]}), |_| None).is_err());
        assert!(AlpacaConfig::from_json(&serde_json::json!({"api_key": "k", "api_secret": "s"}), |_| None).is_err());
        let e = AlpacaConfig::from_json(&serde_json::json!({"quote_symbols": ["A"], "ws_server": "ws://127.0.0.1:9/v2/test"}), |k| Some(format!("{k}-v"))).unwrap();
        assert_eq!((e.key.expose(), e.secret.expose(), e.ws_url.as_str()), ("APCA_API_KEY_ID-v", "APCA_API_SECRET_KEY-v", "ws://127.0.0.1:9/v2/test"));
    }

    #[test]
    fn parses_v2_messages() {
        let ev = parse_message(r#"[{"T":"t","S":"AAPL","i":96921,"x":"D","p":126.55,"s":1,"t":"2021-02-22T15:51:44.208Z","c":["@","I"],"z":"C"}]"#).unwrap();
        match &ev[0] {
            Event::Trade { sym, trade } => {
                assert_eq!(sym, "AAPL");
                assert_eq!((trade.epoch, trade.nanos, trade.price, trade.size, trade.exchange, trade.tape, trade.conds), (1_614_009_104, 208_000_000, 126.55, 1, b'D', b'C', [b'@', b'I', 0, 0]));
            }
            e => panic!("{e:?}"),
        }
        let ev = parse_message(r#"[{"T":"q","S":"AMD","bx":"U","bp":87.66,"bs":1,"ax":"Q","ap":87.68,"as":4,"t":"2021-02-22T15:51:45.335689322Z","c":["R"],"z":"C"}]"#).unwrap();
        match &ev[0] {
            Event::Quote { quote, .. } => assert_eq!((quote.nanos, quote.bid_exchange, quote.ask_exchange, quote.cond, quote.ask_size), (335_689_322, b'U', b'Q', b'R', 4)),
            e => panic!("{e:?}"),
        }
        let ev = parse_message(r#"[{"T":"b","S":"SPY","o":388.985,"h":389.13,"l":388.975,"c":389.12,"v":49378,"t":"2021-02-22T19:15:00Z","n":461,"vw":389.062639}]"#).unwrap();
        assert_eq!(ev[0], Event::Bar { sym: "SPY".into(), bar: MinuteBar { t: 1_614_021_300, open: 388.985, high: 389.13, low: 388.975, close: 389.12, volume: 49378, ticks: 461 } });
        assert_eq!(parse_message(r#"[{"T":"error","code":402,"msg":"auth failed"}]"#).unwrap()[0], Event::Error { code: 402, msg: "auth failed".into() });
        assert_eq!(parse_message(r#"[{"T":"success","msg":"connected"}]"#).unwrap()[0], Event::Success("connected".into()));
        assert!(matches!(parse_message(r#"[{"T":"t","S":"A","t":"yesterday","p":1,"s":1}]"#).unwrap()[0], Event::Skipped(_)));
        assert!(fatal(402) && fatal(409) && !fatal(406));
        let (bars, next) = parse_bars_page(r#"{"bars":[{"t":"2021-02-01T16:01:00Z","o":133.32,"h":133.74,"l":133.31,"c":133.5,"v":9876,"n":50,"vw":133.5}],"symbol":"AAPL","next_page_token":"QUFQTHxNfDIwMjEtMDItMDFUMTY6MDE6MDAuMDAwMDAwMDAwWg=="}"#, "u").unwrap();
        assert_eq!(bars, vec![MinuteBar { t: 1_612_195_260, open: 133.32, high: 133.74, low: 133.31, close: 133.5, volume: 9876, ticks: 50 }]);
        assert!(next.is_some());
        assert_eq!(parse_bars_page(r#"{"bars":null,"symbol":"AAPL","next_page_token":null}"#, "u").unwrap(), (vec![], None));
    }
}
