//! What the exchange feeders share: configuration, the HTTP client with pacing and back-off, and the
//! backfill → follow loop that resumes from the last stored bar.
//!
//! Configuration keys (MarketStore's plus our own):
//!
//! | key | meaning |
//! |---|---|
//! | `symbols` | products / base assets; empty = all the exchange lists |
//! | `base_currencies` | (Binance) quote assets, default `[USDT]` |
//! | `query_start` | first bar to fetch when the bucket is empty (`2006-01-02 15:04:05`, `2006-01-02T15:04`, `2006-01-02`, … UTC); default now − 1h |
//! | `query_end` | last bar to fetch; with it the feeder stops after the backfill |
//! | `base_timeframe` | default `1Min` |
//! | `base_url` | the exchange's REST root (point it at another host or a test server) |
//! | `request_interval` | minimum time between requests, default `250ms` (inside both exchanges' public limits) |
//! | `timeout` | per-request timeout, default `15s` |
//! | `poll_delay` | wait after a bar closes before asking for it, default `2s` |
//!
//! **Backfill.** Per symbol, the next bar to fetch is the last stored bar + one timeframe (so a restart
//! resumes without a gap or a duplicate; MarketStore's binancefeeder restarted from `query_start`), else
//! `query_start`. Requests cover windows of the exchange's page size (Coinbase 300, Binance 1000 bars) and
//! only closed bars (open time + timeframe ≤ now) are written. **Rate limits.** Requests are paced by
//! `request_interval`; `429` and Binance's `418` wait for `Retry-After` (or 1 s, doubling up to 60 s) and
//! retry; `5xx` and transport errors retry with the same back-off; `401`/`403` (a key refused, an address
//! banned) are logged once and end the worker until the server is restarted; other `4xx` skip the symbol for
//! this round and are logged. **Follow.** Once caught up the feeder sleeps until the next bar closes (+ `poll_delay`)
//! and asks again; at the live edge the cursor only advances past bars actually received, so a bar the
//! exchange publishes late is not skipped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::array::{Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use chrono::{TimeZone, Utc};
use parking_lot::{Condvar, Mutex};
use serde::Deserialize;

use super::ContribError;
use crate::engine::{BucketKey, Timeframe};
use crate::service::{Client, WriteRequest};

/// One OHLCV bar as the exchanges give it (open time in Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bar {
    pub t: i64,
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    pub volume: f64,
}

/// Parse MarketStore's `query_start` (any spelling of [`crate::timestr`]) as UTC Unix seconds.
pub fn parse_time(s: &str) -> Option<i64> {
    crate::timestr::parse_time_secs(s).ok()
}

/// `250ms`, `2s`, `1m`, or a bare number of seconds.
pub fn parse_duration(v: &serde_json::Value) -> Option<Duration> {
    match v {
        serde_json::Value::Number(n) => n.as_f64().filter(|x| *x >= 0.0).map(Duration::from_secs_f64),
        serde_json::Value::String(s) => {
            let s = s.trim();
            let (num, mult) = if let Some(x) = s.strip_suffix("ms") {
                (x, 0.001)
            } else if let Some(x) = s.strip_suffix('s') {
                (x, 1.0)
            } else if let Some(x) = s.strip_suffix('m') {
                (x, 60.0)
            } else {
                (s, 1.0)
            };
            num.trim().parse::<f64>().ok().filter(|x| *x >= 0.0).map(|x| Duration::from_secs_f64(x * mult))
        }
        _ => None,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    symbols: Vec<String>,
    #[serde(default)]
    base_currencies: Vec<String>,
    #[serde(default)]
    query_start: Option<String>,
    #[serde(default)]
    query_end: Option<String>,
    #[serde(default)]
    base_timeframe: Option<String>,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    request_interval: Option<serde_json::Value>,
    #[serde(default)]
    timeout: Option<serde_json::Value>,
    #[serde(default)]
    poll_delay: Option<serde_json::Value>,
}

/// Parsed feeder configuration.
#[derive(Debug, Clone)]
pub struct FeederConfig {
    pub symbols: Vec<String>,
    pub base_currencies: Vec<String>,
    pub query_start: Option<i64>,
    pub query_end: Option<i64>,
    pub timeframe: Timeframe,
    pub timeframe_name: String,
    pub base_url: String,
    pub request_interval: Duration,
    pub timeout: Duration,
    pub poll_delay: Duration,
}

impl FeederConfig {
    /// Parse a feeder's `config:` map with the exchange's default base URL.
    pub fn from_json(plugin: &'static str, v: &serde_json::Value, default_url: &str) -> Result<Self, ContribError> {
        let err = |msg: String| ContribError::Config { plugin, msg };
        let raw: RawConfig =
            serde_json::from_value(if v.is_null() { serde_json::json!({}) } else { v.clone() }).map_err(|e| err(e.to_string()))?;
        let time = |k: &str, s: &Option<String>| -> Result<Option<i64>, ContribError> {
            match s.as_deref().map(str::trim) {
                None | Some("") => Ok(None),
                Some(x) => parse_time(x).map(Some).ok_or_else(|| err(format!("{k}: cannot parse {x:?} (use e.g. 2024-01-02 15:04:05)"))),
            }
        };
        let tf_name = raw.base_timeframe.unwrap_or_else(|| "1Min".into());
        let timeframe = Timeframe::parse(&tf_name).map_err(|e| err(format!("base_timeframe: {e}")))?;
        let dur = |k: &str, v: &Option<serde_json::Value>, d: Duration| -> Result<Duration, ContribError> {
            match v {
                None => Ok(d),
                Some(x) => parse_duration(x).ok_or_else(|| err(format!("{k}: expected a duration like 250ms or 2s"))),
            }
        };
        let base_url = raw.base_url.unwrap_or_else(|| default_url.into()).trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(err(format!("base_url must start with http:// or https://, got {base_url:?}")));
        }
        let c = FeederConfig {
            symbols: raw.symbols.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
            base_currencies: if raw.base_currencies.is_empty() { vec!["USDT".into()] } else { raw.base_currencies },
            query_start: time("query_start", &raw.query_start)?,
            query_end: time("query_end", &raw.query_end)?,
            timeframe_name: timeframe.to_string(),
            timeframe,
            base_url,
            request_interval: dur("request_interval", &raw.request_interval, Duration::from_millis(250))?,
            timeout: dur("timeout", &raw.timeout, Duration::from_secs(15))?,
            poll_delay: dur("poll_delay", &raw.poll_delay, Duration::from_secs(2))?,
        };
        if timeframe.fixed_seconds().is_none() {
            return Err(err(format!("base_timeframe {tf_name} is not supported (calendar months/years)")));
        }
        if let (Some(a), Some(b)) = (c.query_start, c.query_end) {
            if b < a {
                return Err(err("query_end is before query_start".into()));
            }
        }
        Ok(c)
    }

    pub fn tf_secs(&self) -> i64 {
        self.timeframe.fixed_seconds().unwrap_or(60)
    }
}

/// A stop signal with interruptible sleeps.
#[derive(Default)]
pub struct Stop {
    stopped: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Stop {
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let _g = self.lock.lock();
        self.cv.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Sleep `d` or until stopped; returns false when stopped.
    pub fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut g = self.lock.lock();
        while !self.is_stopped() {
            if self.cv.wait_until(&mut g, deadline).timed_out() {
                break;
            }
        }
        !self.is_stopped()
    }
}

/// Retry delays of the exchange APIs (and the streaming feeders' reconnects): 1 s doubling to 60 s.
pub const RETRY_BACKOFF: crate::backoff::Backoff = crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// The wait before retry `attempt`: the server's `Retry-After` (at most 600 s), else [`RETRY_BACKOFF`].
pub fn backoff_delay(attempt: u32, retry_after: Option<u64>) -> Duration {
    match retry_after {
        Some(s) => Duration::from_secs(s.min(600)),
        None => RETRY_BACKOFF.delay(attempt),
    }
}

/// HTTP GET with pacing and retries on 429/418/5xx/transport errors.
pub struct Http {
    agent: ureq::Agent,
    interval: Duration,
    last: Mutex<Option<Instant>>,
    pub requests: AtomicU64,
    pub plugin: &'static str,
    /// Attempts per request (the first try included), default 8.
    attempts: u32,
}

impl Http {
    pub fn new(plugin: &'static str, timeout: Duration, interval: Duration) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .user_agent(format!("mkts/{}", crate::VERSION))
            .build()
            .into();
        Http { agent, interval, last: Mutex::new(None), requests: AtomicU64::new(0), plugin, attempts: 8 }
    }

    /// Try each request at most `n` times (at least once).
    pub fn with_attempts(mut self, n: u32) -> Self {
        self.attempts = n.max(1);
        self
    }

    fn once(&self, url: &str, headers: &[(&str, &str)]) -> Result<String, ContribError> {
        {
            let mut last = self.last.lock();
            if let Some(l) = *last {
                let since = l.elapsed();
                if since < self.interval {
                    std::thread::sleep(self.interval - since);
                }
            }
            *last = Some(Instant::now());
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = self.agent.get(url).header("Accept", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut resp = req.call().map_err(|e| ContribError::Transport { url: url.into(), msg: e.to_string() })?;
        let status = resp.status().as_u16();
        let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|s| s.trim().parse::<u64>().ok());
        let body = resp.body_mut().read_to_string().map_err(|e| ContribError::Transport { url: url.into(), msg: e.to_string() })?;
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            let mut b = body;
            b.truncate(500);
            Err(ContribError::Http { status, url: url.into(), body: b, retry_after })
        }
    }

    /// GET `url`, retrying rate limits (429, 418), server errors and transport errors with back-off.
    /// Gives up after 8 attempts ([`Http::with_attempts`]), or at once on other 4xx, or when `stop` is set.
    pub fn get(&self, url: &str, stop: &Stop) -> Result<String, ContribError> {
        self.get_with(url, &[], stop)
    }

    /// [`Http::get`] with extra request headers (credentials go here, never into the URL: URLs appear in
    /// errors and logs, headers do not).
    pub fn get_with(&self, url: &str, headers: &[(&str, &str)], stop: &Stop) -> Result<String, ContribError> {
        let mut attempt = 0;
        loop {
            match self.once(url, headers) {
                Ok(b) => return Ok(b),
                Err(e) => {
                    let (retry, after) = match &e {
                        ContribError::Http { status, retry_after, .. } => (matches!(status, 429 | 418) || *status >= 500, *retry_after),
                        ContribError::Transport { .. } => (true, None),
                        _ => (false, None),
                    };
                    if !retry || attempt + 1 >= self.attempts || stop.is_stopped() {
                        return Err(e);
                    }
                    let d = backoff_delay(attempt, after);
                    tracing::warn!(plugin = self.plugin, "{e}; retrying in {d:?}");
                    if !stop.sleep(d) {
                        return Err(e);
                    }
                    attempt += 1;
                }
            }
        }
    }
}

/// One exchange's REST API.
pub trait Exchange: Send + Sync + 'static {
    /// Plugin name for logs (`gdaxfeeder`).
    fn plugin(&self) -> &'static str;
    /// Largest number of bars one request returns.
    fn page_size(&self) -> i64;
    /// Symbols to feed (from `symbols`, else listed by the exchange), as the names `bucket` and `fetch` take.
    fn symbols(&self, http: &Http, cfg: &FeederConfig, stop: &Stop) -> Result<Vec<String>, ContribError>;
    /// The bucket of a symbol (`gdax_BTC-USD/1Min/OHLCV`).
    fn bucket(&self, symbol: &str, cfg: &FeederConfig) -> Result<BucketKey, ContribError>;
    /// Bars with open time in `[start, end]` (inclusive, Unix seconds), any order.
    fn fetch(&self, http: &Http, cfg: &FeederConfig, symbol: &str, start: i64, end: i64, stop: &Stop) -> Result<Vec<Bar>, ContribError>;
}

/// The Arrow batch of bars: Epoch int64 seconds, Open/High/Low/Close/Volume float64 (MarketStore's types).
pub fn bars_batch(bars: &[Bar]) -> Result<RecordBatch, ContribError> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("Epoch", DataType::Int64, false),
        Field::new("Open", DataType::Float64, false),
        Field::new("High", DataType::Float64, false),
        Field::new("Low", DataType::Float64, false),
        Field::new("Close", DataType::Float64, false),
        Field::new("Volume", DataType::Float64, false),
    ]));
    let col = |f: fn(&Bar) -> f64| Arc::new(Float64Array::from_iter_values(bars.iter().map(f)));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(bars.iter().map(|b| b.t))),
            col(|b| b.open),
            col(|b| b.high),
            col(|b| b.low),
            col(|b| b.close),
            col(|b| b.volume),
        ],
    )?)
}

/// The wall clock in Unix seconds.
pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// `2024-01-02 15:04:05` (UTC) for log lines.
pub fn fmt_time(t: i64) -> String {
    Utc.timestamp_opt(t, 0).single().map(|d| d.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_else(|| t.to_string())
}

/// Where a symbol's feed continues: after the last stored bar, else `query_start`, else now − 1h.
pub fn resume_point(client: &Client, key: &BucketKey, cfg: &FeederConfig, now: i64) -> i64 {
    let tf = cfg.tf_secs();
    if let Ok(info) = client.info(key) {
        if let Some(last) = info.last_epoch {
            return last + tf;
        }
    }
    cfg.query_start.map(|s| cfg.timeframe.truncate(s) + if cfg.timeframe.truncate(s) < s { tf } else { 0 }).unwrap_or_else(|| cfg.timeframe.truncate(now - 3600))
}

/// The next request window for a cursor: `[cursor, end]` and whether it reaches the live edge, or `None`
/// when nothing closed is left to fetch. `limit` is the last bar open time that may be fetched.
pub fn next_window(cursor: i64, limit: i64, tf: i64, page: i64) -> Option<(i64, i64, bool)> {
    if cursor > limit {
        return None;
    }
    let end = cursor + (page - 1) * tf;
    if end >= limit { Some((cursor, limit, true)) } else { Some((cursor, end, false)) }
}

/// A running feeder: stop it with [`FeederHandle::stop`].
pub struct FeederHandle {
    pub stop: Arc<Stop>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FeederHandle {
    /// Signal the feeder and wait for its thread (an in-flight request finishes or times out first).
    pub fn stop(mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FeederHandle {
    fn drop(&mut self) {
        self.stop.stop();
    }
}

/// Run `f` on a dedicated thread named `thread_name`, stopped through the returned handle (the streaming
/// feeders' entry point; `f` must check the stop flag at least every few seconds).
pub fn spawn_worker(thread_name: String, f: impl FnOnce(Arc<Stop>) + Send + 'static) -> FeederHandle {
    let stop = Arc::new(Stop::default());
    let s2 = stop.clone();
    let thread = std::thread::Builder::new().name(thread_name.clone()).spawn(move || f(s2)).ok();
    if thread.is_none() {
        tracing::error!("cannot start feeder thread {thread_name}");
    }
    FeederHandle { stop, thread }
}

/// Start feeding on a dedicated thread (HTTP is blocking; writes use [`Client::write_blocking`]).
pub fn spawn<E: Exchange>(exchange: E, cfg: FeederConfig, client: Client, name: String, feed: Arc<crate::metrics::FeedStats>) -> FeederHandle {
    let stop = Arc::new(Stop::default());
    let s2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("{}-{}", exchange.plugin(), name))
        .spawn(move || run(&exchange, &cfg, &client, &s2, &feed))
        .ok();
    if thread.is_none() {
        tracing::error!("cannot start feeder thread {name}");
    }
    FeederHandle { stop, thread }
}

/// Whether the provider refused the client (HTTP 401/403): retrying cannot help.
fn refused(e: &ContribError) -> bool {
    matches!(e, ContribError::Http { status: 401 | 403, .. })
}

/// Log a refusal once and end the worker (until the server is restarted).
fn refused_stop(plugin: &'static str, e: &ContribError) {
    tracing::error!(plugin, "{e}: access refused; not retrying until the server is restarted");
}

/// The feeder loop: resolve symbols, backfill every symbol window by window, then follow closed bars.
pub fn run<E: Exchange>(ex: &E, cfg: &FeederConfig, client: &Client, stop: &Stop, feed: &crate::metrics::FeedStats) {
    let plugin = ex.plugin();
    let http = Http::new(plugin, cfg.timeout, cfg.request_interval);
    let tf = cfg.tf_secs();
    let symbols = loop {
        match ex.symbols(&http, cfg, stop) {
            Ok(s) => break s,
            Err(e) if refused(&e) => return refused_stop(plugin, &e),
            Err(e) => {
                tracing::warn!(plugin, "cannot list symbols: {e}");
                if !stop.sleep(Duration::from_secs(10)) {
                    return;
                }
            }
        }
    };
    let mut feeds: Vec<(String, BucketKey, i64, u64)> = Vec::new();
    for s in symbols {
        match ex.bucket(&s, cfg) {
            Ok(k) => {
                let cursor = resume_point(client, &k, cfg, now_secs());
                tracing::info!(plugin, symbol = %s, bucket = %k, "starting at {}", fmt_time(cursor));
                feeds.push((s, k, cursor, 0));
            }
            Err(e) => tracing::warn!(plugin, symbol = %s, "skipped: {e}"),
        }
    }
    let mut last_log = Instant::now();
    let mut logged_done = false;
    while !stop.is_stopped() {
        let mut busy = false;
        let mut all_done = true;
        for (sym, key, cursor, total) in feeds.iter_mut() {
            if stop.is_stopped() {
                return;
            }
            let now = now_secs();
            let last_closed = cfg.timeframe.truncate(now) - tf;
            let limit = cfg.query_end.map_or(last_closed, |e| e.min(last_closed));
            if cfg.query_end.is_none_or(|e| *cursor <= e) {
                all_done = false;
            }
            let Some((start, end, live)) = next_window(*cursor, limit, tf, ex.page_size()) else { continue };
            match ex.fetch(&http, cfg, sym, start, end, stop) {
                Ok(mut bars) => {
                    feed.messages.fetch_add(1, Ordering::Relaxed);
                    bars.retain(|b| b.t >= start && b.t <= end && b.t % tf == 0);
                    bars.sort_by_key(|b| b.t);
                    bars.dedup_by_key(|b| b.t);
                    if !bars.is_empty() {
                        let batch = match bars_batch(&bars) {
                            Ok(b) => b,
                            Err(e) => {
                                tracing::error!(plugin, "{e}");
                                continue;
                            }
                        };
                        if let Err(e) = client.write_blocking(&WriteRequest { key: key.clone(), batch, variable: Some(false) }) {
                            tracing::error!(plugin, bucket = %key, "write failed: {e}");
                            if !stop.sleep(Duration::from_secs(1)) {
                                return;
                            }
                            continue;
                        }
                        *total += bars.len() as u64;
                        feed.rows.fetch_add(bars.len() as u64, Ordering::Relaxed);
                        if let Some(b) = bars.last() {
                            feed.last_bar.fetch_max(b.t.max(0) as u64, Ordering::Relaxed);
                        }
                    }
                    let last_got = bars.last().map(|b| b.t);
                    // At the live edge only move past what arrived; historical windows are complete.
                    *cursor = if live { last_got.map_or(*cursor, |t| t + tf) } else { end + tf };
                    if !live {
                        busy = true;
                    }
                    let msg = format!("{} bars up to {} ({} this run)", bars.len(), fmt_time(last_got.unwrap_or(end)), total);
                    if live || last_log.elapsed() > Duration::from_secs(5) {
                        if !bars.is_empty() {
                            tracing::info!(plugin, bucket = %key, "{msg}");
                        }
                        last_log = Instant::now();
                    } else {
                        tracing::debug!(plugin, bucket = %key, "{msg}");
                    }
                }
                Err(e) if refused(&e) => return refused_stop(plugin, &e),
                Err(e) => {
                    tracing::warn!(plugin, symbol = %sym, "window {} .. {} failed: {e}", fmt_time(start), fmt_time(end));
                }
            }
        }
        if all_done && cfg.query_end.is_some() {
            if !logged_done {
                tracing::info!(plugin, "backfill to query_end complete");
                logged_done = true;
            }
            if !stop.sleep(Duration::from_secs(3600)) {
                return;
            }
            continue;
        }
        if !busy {
            // Caught up: wait for the next bar to close.
            let now = now_secs();
            let next_close = cfg.timeframe.truncate(now) + tf;
            let wait = Duration::from_secs((next_close - now).max(0) as u64) + cfg.poll_delay;
            if !stop.sleep(wait.min(Duration::from_secs(3600))) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_marketstore_time_layouts() {
        assert_eq!(parse_time("2024-01-02 03:04:05"), Some(1_704_164_645));
        assert_eq!(parse_time("2024-01-02T03:04:05"), Some(1_704_164_645));
        assert_eq!(parse_time("2024-01-02 03:04"), Some(1_704_164_640));
        assert_eq!(parse_time("2024-01-02T03:04"), Some(1_704_164_640));
        assert_eq!(parse_time("2024-01-02"), Some(1_704_153_600));
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration(&serde_json::json!("250ms")), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration(&serde_json::json!("2s")), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration(&serde_json::json!(1.5)), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration(&serde_json::json!("x")), None);
    }

    #[test]
    fn config() {
        let c = FeederConfig::from_json("t", &serde_json::json!({"symbols": ["BTC-USD"], "query_start": "2024-01-02", "base_url": "http://127.0.0.1:9/"}), "https://x").unwrap();
        assert_eq!(c.base_url, "http://127.0.0.1:9");
        assert_eq!(c.tf_secs(), 60);
        assert_eq!(c.query_start, Some(1_704_153_600));
        assert!(FeederConfig::from_json("t", &serde_json::json!({"query_start": "soon"}), "https://x").is_err());
        assert!(FeederConfig::from_json("t", &serde_json::json!({"base_timeframe": "1M"}), "https://x").is_err());
        assert!(FeederConfig::from_json("t", &serde_json::json!({"nonsense": 1}), "https://x").is_err());
    }

    #[test]
    fn windows() {
        assert_eq!(next_window(0, 100_000, 60, 300), Some((0, 299 * 60, false)));
        assert_eq!(next_window(0, 600, 60, 300), Some((0, 600, true)));
        assert_eq!(next_window(660, 600, 60, 300), None);
    }

    #[test]
    fn backoff() {
        assert_eq!(backoff_delay(0, None), Duration::from_secs(1));
        assert_eq!(backoff_delay(3, None), Duration::from_secs(8));
        assert_eq!(backoff_delay(10, None), Duration::from_secs(60));
        assert_eq!(backoff_delay(0, Some(7)), Duration::from_secs(7));
    }

    #[test]
    fn resume_after_last_stored_bar() {
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::engine::Engine::open(crate::engine::EngineConfig::new(dir.path())).unwrap();
        let service = Arc::new(crate::service::Service::new(engine, chrono_tz::UTC, None));
        let client = Client::new(service, crate::service::Caller::anonymous(crate::service::Interface::Plugin));
        let cfg = FeederConfig::from_json("t", &serde_json::json!({"query_start": "2024-01-02 00:00:30"}), "https://x").unwrap();
        let key = BucketKey::parse("gdax_BTC-USD/1Min/OHLCV").unwrap();
        assert_eq!(resume_point(&client, &key, &cfg, 0), 1_704_153_660);
        let b = bars_batch(&[Bar { t: 1_704_200_000 - 1_704_200_000 % 60, open: 1.0, high: 1.0, low: 1.0, close: 1.0, volume: 1.0 }]).unwrap();
        client.write_blocking(&WriteRequest::new(key.clone(), b)).unwrap();
        assert_eq!(resume_point(&client, &key, &cfg, 0), 1_704_199_980 + 60);
    }
}
