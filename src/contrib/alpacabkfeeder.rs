//! `alpacabkfeeder` (background worker): MarketStore's Alpaca Broker/Data API v2 poller. Every `interval`
//! seconds while the market is open (or at the minutes of `off_hours_schedule`) it asks Alpaca's snapshots
//! endpoint for every symbol of the configured exchanges and writes one row per symbol to
//! `<SYM>/<timeframe>/TICK`; at start-up and every day at `update_time` it backfills bars into
//! `<SYM>/<backfill.timeframe>/OHLCV`.
//!
//! ```yaml
//! bgworkers:
//!   - module: alpacabkfeeder.so
//!     config:
//!       exchanges: [NASDAQ, NYSE]
//!       update_time: "13:30:00"          # UTC: daily backfill (and symbol refresh unless symbols_update_time)
//!       timeframe: 1Sec                  # snapshots go to <SYM>/1Sec/TICK
//!       api_key_id: ""                   # or $ALPACA_BROKER_FEEDER_API_KEY_ID, else $APCA_API_KEY_ID
//!       api_secret_key: ""               # or $ALPACA_BROKER_FEEDER_API_SECRET_KEY, else $APCA_API_SECRET_KEY
//!       interval: 10
//!       off_hours_schedule: "0,15,30,45"
//!       open_time_NY: "9:30:00"
//!       close_time_NY: "16:00:00"
//!       closedDaysOfTheWeek: [Saturday, Sunday]
//!       closedDays: ["2024-12-25"]
//!       backfill: {enabled: true, since: "2024-01-01", timeframe: 1D}
//! ```
//!
//! Requests (Alpaca's current v2 formats): `GET {assets_url}/v2/assets?status=active` (`/v1/assets` when the
//! URL names the broker API) → `[{"symbol","exchange","status",…}]`, filtered by `exchanges`, or, with
//! `stocks_json_url`, the keys of that file's `data` object; `GET {base_url}/v2/stocks/snapshots?symbols=A,B`
//! → `{"A": {"latestTrade","latestQuote","minuteBar","dailyBar","prevDailyBar"}, "B": null}`; `GET
//! {base_url}/v2/stocks/bars?symbols=A,B&timeframe=1Day&start&end&limit&adjustment=raw[&page_token]` →
//! `{"bars": {"A": [{"t","o","h","l","c","v","n","vw"}]}, "next_page_token"}`. Credentials go in headers
//! (Basic, `APCA-API-KEY-ID`/`APCA-API-SECRET-KEY`, or an OAuth Bearer token), never in a URL or a log line.
//! 429 and 5xx are retried with back-off (`Retry-After` honoured); a 401 or 403 is logged once and the worker
//! stops until the server is restarted.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float32Array, Int64Array, RecordBatch, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use base64::Engine as _;
use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, TimeZone, Timelike, Utc, Weekday};
use chrono_tz::America::New_York;
use parking_lot::Mutex;
use serde::Deserialize;

use super::feeder::{fmt_time, now_secs, parse_duration, FeederHandle, Http, Stop};
use super::polygon::{bars_batch, bucket_symbol, store_all, FeedStats, MinuteBar, Secret};
use super::ContribError;
use crate::engine::{BucketKey, Timeframe};
use crate::service::Client;

const PLUGIN: &str = "alpacabkfeeder";
/// Alpaca's market-data REST root (snapshots, bars).
pub const DEFAULT_DATA_URL: &str = "https://data.alpaca.markets";
/// Alpaca's trading REST root (assets).
pub const DEFAULT_ASSETS_URL: &str = "https://api.alpaca.markets";
/// The exchanges MarketStore accepts in `exchanges`.
pub const EXCHANGES: [&str; 7] = ["AMEX", "ARCA", "BATS", "NYSE", "NASDAQ", "NYSEARCA", "OTC"];
/// Symbols per snapshots request.
const SNAPSHOT_CHUNK: usize = 500;
/// Symbols per bars request (Alpaca's limit).
const BARS_CHUNK: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackfill {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    timeframe: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    exchanges: Vec<String>,
    #[serde(default)]
    symbols_update_time: Option<String>,
    #[serde(default)]
    update_time: Option<String>,
    #[serde(default)]
    stocks_json_url: Option<String>,
    #[serde(default)]
    stocks_json_basic_auth: Option<String>,
    #[serde(default)]
    timeframe: Option<String>,
    #[serde(default)]
    api_key_id: Option<String>,
    #[serde(default)]
    api_secret_key: Option<String>,
    #[serde(default)]
    auth_method: Option<String>,
    #[serde(default)]
    interval: Option<serde_json::Value>,
    #[serde(default)]
    off_hours_schedule: Option<String>,
    #[serde(default, rename = "open_time_NY")]
    open_time_ny: Option<String>,
    #[serde(default, rename = "close_time_NY")]
    close_time_ny: Option<String>,
    #[serde(default, rename = "openTime")]
    open_time: Option<serde_json::Value>,
    #[serde(default, rename = "closeTime")]
    close_time: Option<serde_json::Value>,
    #[serde(default)]
    extended_hours: bool,
    #[serde(default, rename = "closedDaysOfTheWeek")]
    closed_days_of_the_week: Option<Vec<String>>,
    #[serde(default, rename = "closedDays")]
    closed_days: Vec<String>,
    #[serde(default)]
    backfill: Option<RawBackfill>,
    // mkts's own keys.
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    assets_url: Option<String>,
    #[serde(default)]
    feed: Option<String>,
    #[serde(default)]
    timeout: Option<serde_json::Value>,
    #[serde(default)]
    request_interval: Option<serde_json::Value>,
}

/// How requests authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// HTTP Basic with key and secret (MarketStore's default).
    Basic,
    /// `APCA-API-KEY-ID` / `APCA-API-SECRET-KEY` headers.
    Header,
    /// `Authorization: Bearer` with `$APCA_API_OAUTH`.
    OAuth,
}

/// When the market is open for the poller: `open_time_NY`..`close_time_NY` (New York time, both inclusive) on
/// days that are neither in `closedDaysOfTheWeek` nor in `closedDays` (New York dates).
#[derive(Debug, Clone)]
pub struct MarketHours {
    pub open: NaiveTime,
    pub close: NaiveTime,
    pub closed_weekdays: Vec<Weekday>,
    pub closed_days: Vec<NaiveDate>,
}

impl MarketHours {
    /// Whether `t` is inside the open hours of an open day.
    pub fn is_open(&self, t: DateTime<Utc>) -> bool {
        let ny = t.with_timezone(&New_York);
        let tod = ny.time();
        tod >= self.open && tod <= self.close && !self.closed_weekdays.contains(&ny.weekday()) && !self.closed_days.contains(&ny.date_naive())
    }
}

/// Parsed `alpacabkfeeder` configuration.
#[derive(Debug, Clone)]
pub struct AlpacaBkConfig {
    pub exchanges: Vec<String>,
    /// Seconds after 00:00 UTC of the daily symbol refresh.
    pub symbols_update_time: u32,
    /// Seconds after 00:00 UTC of the daily backfill.
    pub update_time: u32,
    pub stocks_json_url: Option<String>,
    pub stocks_json_basic_auth: Option<Secret>,
    /// The TICK buckets' timeframe.
    pub timeframe: String,
    pub key: Secret,
    pub secret: Secret,
    pub oauth: Option<Secret>,
    pub auth_method: AuthMethod,
    pub interval: Duration,
    /// Minutes of the hour at which to poll even when the market is closed.
    pub off_hours_schedule: Vec<u32>,
    pub hours: MarketHours,
    pub extended_hours: bool,
    pub backfill_enabled: bool,
    /// First day to backfill (Unix seconds, 00:00 UTC).
    pub backfill_since: i64,
    pub backfill_timeframe: String,
    /// Market-data REST root.
    pub base_url: String,
    /// Trading (or broker) REST root for the assets list.
    pub assets_url: String,
    /// `feed=` sent with snapshots and bars (`iex`, `sip`, …); none: Alpaca's default for the account.
    pub feed: Option<String>,
    pub timeout: Duration,
    pub request_interval: Duration,
    /// Attempts per request.
    pub attempts: u32,
}

/// `H:MM:SS` or `HH:MM:SS` (MarketStore's `15:04:05` layout).
pub fn parse_clock(s: &str) -> Option<NaiveTime> {
    let p: Vec<&str> = s.trim().split(':').collect();
    if p.len() != 3 || p.iter().any(|x| x.is_empty() || x.len() > 2 || !x.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    NaiveTime::from_hms_opt(p[0].parse().ok()?, p[1].parse().ok()?, p[2].parse().ok()?)
}

/// MarketStore's `off_hours_schedule`: comma-separated minutes 0..59, spaces ignored, sorted.
pub fn parse_schedule(s: &str) -> Result<Vec<u32>, String> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if s.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for m in s.split(',') {
        let v: u32 = m.parse().map_err(|_| format!("off_hours_schedule: {m:?} is not a minute"))?;
        if v >= 60 {
            return Err(format!("off_hours_schedule: minutes must be between 0 and 59, got {v}"));
        }
        out.push(v);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn weekday(s: &str) -> Option<Weekday> {
    Some(match s.trim() {
        "Sunday" => Weekday::Sun,
        "Monday" => Weekday::Mon,
        "Tuesday" => Weekday::Tue,
        "Wednesday" => Weekday::Wed,
        "Thursday" => Weekday::Thu,
        "Friday" => Weekday::Fri,
        "Saturday" => Weekday::Sat,
        _ => return None,
    })
}

/// Alpaca's `timeframe` parameter for a bucket timeframe (`1D` → `1Day`, `1H` → `1Hour`, `5Min` → `5Min`).
pub fn alpaca_timeframe(tf: &str) -> Option<String> {
    let secs = Timeframe::parse(tf).ok()?.fixed_seconds()?;
    Some(if secs % 86_400 == 0 {
        format!("{}Day", secs / 86_400)
    } else if secs % 3600 == 0 {
        format!("{}Hour", secs / 3600)
    } else if secs % 60 == 0 {
        format!("{}Min", secs / 60)
    } else {
        return None;
    })
}

fn url_of(v: Option<String>) -> Option<String> {
    v.map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty())
}

impl AlpacaBkConfig {
    /// Parse the `config:` map; `env` looks up MarketStore's environment overrides and Alpaca's SDK variables.
    pub fn from_json(v: &serde_json::Value, env: impl Fn(&str) -> Option<String>) -> Result<Self, ContribError> {
        let err = |msg: String| ContribError::Config { plugin: PLUGIN, msg };
        let env = |k: &str| env(k).map(|x| x.trim().to_string()).filter(|x| !x.is_empty());
        let raw: RawConfig = serde_json::from_value(if v.is_null() { serde_json::json!({}) } else { v.clone() }).map_err(|e| err(e.to_string()))?;
        if raw.open_time.is_some() || raw.close_time.is_some() {
            return Err(err("openTime and closeTime are deprecated: use open_time_NY and close_time_NY (New York time)".into()));
        }
        if raw.exchanges.is_empty() {
            return Err(err("must have 1 or more stock exchanges in exchanges".into()));
        }
        let mut exchanges = Vec::new();
        for e in &raw.exchanges {
            let e = e.trim().to_string();
            if !EXCHANGES.contains(&e.as_str()) {
                return Err(err(format!("invalid exchange: {e} (use {})", EXCHANGES.join(", "))));
            }
            exchanges.push(e);
        }
        let clock = |k: &str, v: Option<String>, d: &str| -> Result<NaiveTime, ContribError> {
            let s = v.unwrap_or_else(|| d.to_string());
            parse_clock(&s).ok_or_else(|| err(format!("{k}: {s:?} is not a time of day like 13:30:00")))
        };
        let secs_of = |t: NaiveTime| t.num_seconds_from_midnight();
        let update_time = secs_of(clock("update_time", env("ALPACA_BROKER_FEEDER_UPDATE_TIME").or(raw.update_time), "00:00:00")?);
        let symbols_update_time = match env("ALPACA_BROKER_FEEDER_SYMBOLS_UPDATE_TIME").or(raw.symbols_update_time) {
            Some(s) => secs_of(clock("symbols_update_time", Some(s), "")?),
            None => update_time,
        };
        let timeframe = raw.timeframe.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).unwrap_or_else(|| "1Sec".into());
        let tf = Timeframe::parse(&timeframe).map_err(|e| err(format!("timeframe: {e}")))?;
        if tf.fixed_seconds().is_none() {
            return Err(err(format!("timeframe {timeframe} is not supported")));
        }
        let cred = |over: &str, cfg: Option<String>| env(over).or(cfg.map(|c| c.trim().to_string()).filter(|c| !c.is_empty()));
        let (mut key, mut secret) = (cred("ALPACA_BROKER_FEEDER_API_KEY_ID", raw.api_key_id), cred("ALPACA_BROKER_FEEDER_API_SECRET_KEY", raw.api_secret_key));
        let oauth = env("APCA_API_OAUTH");
        let mut method = raw.auth_method.map(|m| m.trim().to_ascii_lowercase()).filter(|m| !m.is_empty());
        if key.is_none() || secret.is_none() {
            // MarketStore: without both in the config, the Alpaca SDK's environment variables.
            key = env("APCA_API_KEY_ID");
            secret = env("APCA_API_SECRET_KEY");
            method = method.or_else(|| env("APCA_API_AUTH_METHOD").map(|m| m.to_ascii_lowercase()));
        }
        let auth_method = match method.as_deref() {
            _ if oauth.is_some() && (key.is_none() || secret.is_none()) => AuthMethod::OAuth,
            None | Some("basic") => AuthMethod::Basic,
            Some("header") => AuthMethod::Header,
            Some(other) => return Err(err(format!("auth_method: {other:?} (use basic or header)"))),
        };
        if auth_method != AuthMethod::OAuth && (key.is_none() || secret.is_none()) {
            return Err(err("no credentials: set api_key_id and api_secret_key (or $ALPACA_BROKER_FEEDER_API_KEY_ID / $ALPACA_BROKER_FEEDER_API_SECRET_KEY, or $APCA_API_KEY_ID / $APCA_API_SECRET_KEY)".into()));
        }
        let interval = match &raw.interval {
            None => Duration::from_secs(10),
            Some(x) => parse_duration(x).filter(|d| !d.is_zero()).ok_or_else(|| err("interval: expected seconds (10) or a duration (500ms)".into()))?,
        };
        let off_hours_schedule = parse_schedule(raw.off_hours_schedule.as_deref().unwrap_or("")).map_err(err)?;
        let open = clock("open_time_NY", raw.open_time_ny, "9:30:00")?;
        let close = clock("close_time_NY", raw.close_time_ny, "16:00:00")?;
        let weekdays = raw.closed_days_of_the_week.unwrap_or_else(|| vec!["Saturday".into(), "Sunday".into()]);
        let mut closed_weekdays = Vec::new();
        for w in &weekdays {
            closed_weekdays.push(weekday(w).ok_or_else(|| err(format!("closedDaysOfTheWeek: invalid weekday {w:?}")))?);
        }
        let mut closed_days = Vec::new();
        for d in &raw.closed_days {
            closed_days.push(NaiveDate::parse_from_str(d.trim(), "%Y-%m-%d").map_err(|_| err(format!("closedDays: {d:?} is not YYYY-MM-DD")))?);
        }
        let bf = raw.backfill.unwrap_or(RawBackfill { enabled: false, since: None, timeframe: None });
        let backfill_timeframe = bf.timeframe.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).unwrap_or_else(|| "1D".into());
        if bf.enabled && alpaca_timeframe(&backfill_timeframe).is_none() {
            return Err(err(format!("backfill.timeframe: {backfill_timeframe:?} is not a timeframe Alpaca serves (1Min..59Min, 1H..23H, 1D)")));
        }
        let backfill_since = match bf.since.as_deref().map(str::trim) {
            None | Some("") if bf.enabled => return Err(err("backfill.since is required when backfill is enabled (YYYY-MM-DD)".into())),
            None | Some("") => 0,
            Some(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| err(format!("backfill.since: {s:?} is not YYYY-MM-DD")))?.and_hms_opt(0, 0, 0).map_or(0, |d| d.and_utc().timestamp()),
        };
        let base_url = url_of(raw.base_url).or_else(|| url_of(env("APCA_API_DATA_URL"))).or_else(|| url_of(env("APCA_DATA_URL"))).unwrap_or_else(|| DEFAULT_DATA_URL.into());
        let assets_url = url_of(raw.assets_url).or_else(|| url_of(env("APCA_API_BASE_URL"))).or_else(|| url_of(env("ALPACA_BASE_URL"))).unwrap_or_else(|| DEFAULT_ASSETS_URL.into());
        for (k, u) in [("base_url", &base_url), ("assets_url", &assets_url)] {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(err(format!("{k} must start with http:// or https://, got {u:?}")));
            }
        }
        let stocks_json_url = url_of(env("ALPACA_BROKER_FEEDER_STOCKS_JSON_URL").or(raw.stocks_json_url));
        let stocks_json_basic_auth = env("ALPACA_BROKER_FEEDER_STOCKS_JSON_BASIC_AUTH").or(raw.stocks_json_basic_auth.filter(|s| !s.trim().is_empty())).map(Secret::new);
        let timeout = match (env("APCA_API_CLIENT_TIMEOUT"), &raw.timeout) {
            (Some(s), _) => parse_duration(&serde_json::Value::String(s.clone())).filter(|d| !d.is_zero()).ok_or_else(|| err(format!("$APCA_API_CLIENT_TIMEOUT: {s:?} is not a duration like 10s")))?,
            (None, Some(x)) => parse_duration(x).filter(|d| !d.is_zero()).ok_or_else(|| err("timeout: expected a duration like 10s".into()))?,
            (None, None) => Duration::from_secs(10),
        };
        let attempts = match env("APCA_API_RETRY_MAX") {
            Some(s) => s.parse::<u32>().map_err(|_| err(format!("$APCA_API_RETRY_MAX: {s:?} is not a number")))?.saturating_add(1),
            None => 8,
        };
        let request_interval = match &raw.request_interval {
            None => Duration::from_millis(100),
            Some(x) => parse_duration(x).ok_or_else(|| err("request_interval: expected a duration like 100ms".into()))?,
        };
        let feed = raw.feed.map(|f| f.trim().to_ascii_lowercase()).filter(|f| !f.is_empty());
        if let Some(f) = &feed {
            if !matches!(f.as_str(), "iex" | "sip" | "delayed_sip" | "otc") {
                return Err(err(format!("feed: {f:?} (use iex, sip, delayed_sip or otc)")));
            }
        }
        Ok(AlpacaBkConfig {
            exchanges,
            symbols_update_time,
            update_time,
            stocks_json_url,
            stocks_json_basic_auth,
            timeframe: tf.to_string(),
            key: Secret::new(key.unwrap_or_default()),
            secret: Secret::new(secret.unwrap_or_default()),
            oauth: oauth.map(Secret::new),
            auth_method,
            interval,
            off_hours_schedule,
            hours: MarketHours { open, close, closed_weekdays, closed_days },
            extended_hours: raw.extended_hours,
            backfill_enabled: bf.enabled,
            backfill_since,
            backfill_timeframe,
            base_url,
            assets_url,
            feed,
            timeout,
            request_interval,
            attempts,
        })
    }

    /// The request headers carrying the credentials.
    fn auth_headers(&self) -> Vec<(&'static str, String)> {
        match self.auth_method {
            AuthMethod::OAuth => vec![("Authorization", format!("Bearer {}", self.oauth.as_ref().map_or("", |s| s.expose())))],
            AuthMethod::Header => vec![("APCA-API-KEY-ID", self.key.expose().to_string()), ("APCA-API-SECRET-KEY", self.secret.expose().to_string())],
            AuthMethod::Basic => {
                let b = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", self.key.expose(), self.secret.expose()));
                vec![("Authorization", format!("Basic {b}"))]
            }
        }
    }
}

/// When polls run: every `interval` while [`MarketHours::is_open`], and at most once in each minute of
/// `off_hours_schedule` otherwise (MarketStore's `ScheduledMarketTimeChecker`).
pub struct Schedule {
    pub hours: MarketHours,
    pub minutes: Vec<u32>,
    last_off_hours: Option<i64>,
}

impl Schedule {
    pub fn new(hours: MarketHours, minutes: Vec<u32>) -> Self {
        Schedule { hours, minutes, last_off_hours: None }
    }

    /// Whether a poll due at `t` runs.
    pub fn due(&mut self, t: DateTime<Utc>) -> bool {
        if self.hours.is_open(t) {
            return true;
        }
        let minute = t.timestamp().div_euclid(60);
        if self.minutes.contains(&t.minute()) && self.last_off_hours != Some(minute) {
            self.last_off_hours = Some(minute);
            return true;
        }
        false
    }
}

/// The next time (Unix seconds, after `now`) that is `secs_of_day` seconds after 00:00 UTC.
pub fn next_daily(now: i64, secs_of_day: u32) -> i64 {
    let day = now.div_euclid(86_400) * 86_400;
    let t = day + secs_of_day as i64;
    if t > now { t } else { t + 86_400 }
}

/// One bar of a snapshot or a bars page.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ApiBar {
    #[serde(default)]
    pub t: Option<String>,
    #[serde(default)]
    pub o: f64,
    #[serde(default)]
    pub h: f64,
    #[serde(default)]
    pub l: f64,
    #[serde(default)]
    pub c: f64,
    #[serde(default)]
    pub v: f64,
}

#[derive(Debug, Clone, Deserialize)]
struct ApiTrade {
    t: String,
    #[serde(default)]
    p: f64,
    #[serde(default)]
    s: f64,
}

#[derive(Debug, Clone, Deserialize)]
struct ApiQuote {
    t: String,
    #[serde(default)]
    bp: f64,
    #[serde(default)]
    bs: f64,
    #[serde(default)]
    ap: f64,
    #[serde(default, rename = "as")]
    as_: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiSnapshot {
    #[serde(default)]
    latest_trade: Option<ApiTrade>,
    #[serde(default)]
    latest_quote: Option<ApiQuote>,
    #[serde(default)]
    minute_bar: Option<ApiBar>,
    #[serde(default)]
    daily_bar: Option<ApiBar>,
    #[serde(default)]
    prev_daily_bar: Option<ApiBar>,
}

/// One `TICK` row: a snapshot's latest quote and trade and its minute, daily and previous daily bars.
#[derive(Debug, Clone, PartialEq)]
pub struct TickRow {
    /// The later of the quote's and the trade's time.
    pub epoch: i64,
    pub quote_ts: i64,
    pub ask: f32,
    pub ask_size: u32,
    pub bid: f32,
    pub bid_size: u32,
    pub trade_ts: i64,
    pub price: f32,
    pub size: u32,
    /// Daily, minute and previous daily bar: (timestamp, open, high, low, close, volume).
    pub daily: (i64, f32, f32, f32, f32, u64),
    pub minute: (i64, f32, f32, f32, f32, u64),
    pub previous: (i64, f32, f32, f32, f32, u64),
}

fn secs(t: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(t).ok().map(|d| d.timestamp())
}

fn bar_tuple(b: &Option<ApiBar>) -> (i64, f32, f32, f32, f32, u64) {
    match b {
        Some(b) => (b.t.as_deref().and_then(secs).unwrap_or(0), b.o as f32, b.h as f32, b.l as f32, b.c as f32, b.v.max(0.0).round() as u64),
        None => (0, 0.0, 0.0, 0.0, 0.0, 0),
    }
}

/// Parse a snapshots response (`{"SYM": {…} | null}`): the TICK row of every symbol with both a latest
/// quote and a latest trade (others are skipped, as MarketStore does), sorted by symbol.
pub fn parse_snapshots(body: &str, url: &str) -> Result<Vec<(String, TickRow)>, ContribError> {
    let m: HashMap<String, Option<ApiSnapshot>> = serde_json::from_str(body).map_err(|e| ContribError::Parse { url: url.into(), msg: e.to_string() })?;
    let mut out = Vec::new();
    for (sym, snap) in m {
        let Some(s) = snap else { continue };
        let (Some(q), Some(t)) = (&s.latest_quote, &s.latest_trade) else { continue };
        let (Some(qt), Some(tt)) = (secs(&q.t), secs(&t.t)) else { continue };
        out.push((
            sym,
            TickRow {
                epoch: qt.max(tt),
                quote_ts: qt,
                ask: q.ap as f32,
                ask_size: q.as_.max(0.0).min(u32::MAX as f64) as u32,
                bid: q.bp as f32,
                bid_size: q.bs.max(0.0).min(u32::MAX as f64) as u32,
                trade_ts: tt,
                price: t.p as f32,
                size: t.s.max(0.0).min(u32::MAX as f64) as u32,
                daily: bar_tuple(&s.daily_bar),
                minute: bar_tuple(&s.minute_bar),
                previous: bar_tuple(&s.prev_daily_bar),
            },
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The `TICK` bucket's schema: MarketStore's columns and types.
pub fn tick_schema() -> Arc<Schema> {
    let mut f = vec![Field::new("Epoch", DataType::Int64, false)];
    let mut add = |n: &str, t: DataType| f.push(Field::new(n, t, false));
    add("QuoteTimestamp", DataType::Int64);
    add("Ask", DataType::Float32);
    add("AskSize", DataType::UInt32);
    add("Bid", DataType::Float32);
    add("BidSize", DataType::UInt32);
    add("TradeTimestamp", DataType::Int64);
    add("Price", DataType::Float32);
    add("Size", DataType::UInt32);
    for p in ["Daily", "Minute", "Previous"] {
        let (ts, pre) = match p {
            "Daily" => ("DailyTimestamp".to_string(), ""),
            _ => (format!("{p}Timestamp"), p),
        };
        add(&ts, DataType::Int64);
        for c in ["Open", "High", "Low", "Close"] {
            add(&format!("{pre}{c}"), DataType::Float32);
        }
        add(&format!("{pre}Volume"), DataType::UInt64);
    }
    Arc::new(Schema::new(f))
}

/// One row as a batch of [`tick_schema`].
pub fn tick_batch(r: &TickRow) -> Result<RecordBatch, ContribError> {
    let i = |v: i64| Arc::new(Int64Array::from(vec![v])) as ArrayRef;
    let f = |v: f32| Arc::new(Float32Array::from(vec![v])) as ArrayRef;
    let u = |v: u32| Arc::new(UInt32Array::from(vec![v])) as ArrayRef;
    let mut cols = vec![i(r.epoch), i(r.quote_ts), f(r.ask), u(r.ask_size), f(r.bid), u(r.bid_size), i(r.trade_ts), f(r.price), u(r.size)];
    for b in [r.daily, r.minute, r.previous] {
        cols.extend([i(b.0), f(b.1), f(b.2), f(b.3), f(b.4), Arc::new(UInt64Array::from(vec![b.5])) as ArrayRef]);
    }
    Ok(RecordBatch::try_new(tick_schema(), cols)?)
}

/// Parse a multi-symbol bars page: `{"bars": {"SYM": [bar…]} | null, "next_page_token": str | null}`.
pub fn parse_bars(body: &str, url: &str) -> Result<(HashMap<String, Vec<MinuteBar>>, Option<String>), ContribError> {
    #[derive(Deserialize)]
    struct P {
        #[serde(default)]
        bars: Option<HashMap<String, Option<Vec<ApiBar>>>>,
        #[serde(default)]
        next_page_token: Option<String>,
    }
    let perr = |msg: String| ContribError::Parse { url: url.into(), msg };
    let p: P = serde_json::from_str(body).map_err(|e| perr(e.to_string()))?;
    let mut out = HashMap::new();
    for (sym, bars) in p.bars.unwrap_or_default() {
        let mut v = Vec::new();
        for b in bars.unwrap_or_default() {
            let t = b.t.as_deref().and_then(secs).ok_or_else(|| perr(format!("bar of {sym} without a valid time: {:?}", b.t)))?;
            v.push(MinuteBar { t, open: b.o, high: b.h, low: b.l, close: b.c, volume: b.v.max(0.0).round() as u64, ticks: 0 });
        }
        out.insert(sym, v);
    }
    Ok((out, p.next_page_token.filter(|t| !t.is_empty())))
}

/// Symbols of an assets list on the given exchanges, sorted.
pub fn parse_assets(body: &str, url: &str, exchanges: &[String]) -> Result<Vec<String>, ContribError> {
    #[derive(Deserialize)]
    struct A {
        symbol: String,
        #[serde(default)]
        exchange: String,
    }
    let v: Vec<A> = serde_json::from_str(body).map_err(|e| ContribError::Parse { url: url.into(), msg: e.to_string() })?;
    let set: BTreeSet<String> = v.into_iter().filter(|a| exchanges.contains(&a.exchange)).map(|a| a.symbol).collect();
    Ok(set.into_iter().collect())
}

/// Symbols of a `stocks_json_url` file: the keys of its `data` object, sorted.
pub fn parse_stocks_json(body: &str, url: &str) -> Result<Vec<String>, ContribError> {
    #[derive(Deserialize)]
    struct F {
        data: serde_json::Map<String, serde_json::Value>,
    }
    let f: F = serde_json::from_str(body).map_err(|e| ContribError::Parse { url: url.into(), msg: e.to_string() })?;
    let set: BTreeSet<String> = f.data.keys().cloned().collect();
    Ok(set.into_iter().collect())
}

fn rfc3339(t: i64) -> String {
    Utc.timestamp_opt(t, 0).single().map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default()
}

/// Percent-encode a query value (symbols, page tokens).
fn q(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~,".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// What the worker threads share.
struct Shared {
    cfg: AlpacaBkConfig,
    client: Client,
    stats: Arc<FeedStats>,
    stop: Arc<Stop>,
    http: Http,
    headers: Vec<(&'static str, String)>,
    symbols: Mutex<Vec<String>>,
    auth_failed: AtomicBool,
}

impl Shared {
    fn get(&self, url: &str) -> Result<String, ContribError> {
        let headers: Vec<(&str, &str)> = self.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let body = self.http.get_with(url, &headers, &self.stop)?;
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        Ok(body)
    }

    /// A 401/403 ends the worker with one log line; other errors are returned to be logged by the caller.
    fn fatal(&self, e: &ContribError) -> bool {
        if let ContribError::Http { status: status @ (401 | 403), body, url, .. } = e {
            if !self.auth_failed.swap(true, Ordering::SeqCst) {
                let path = url.split('?').next().unwrap_or(url);
                tracing::error!(
                    plugin = PLUGIN,
                    "authentication failed (HTTP {status} from {path}: {}); check api_key_id/api_secret_key ($ALPACA_BROKER_FEEDER_API_KEY_ID/$ALPACA_BROKER_FEEDER_API_SECRET_KEY, $APCA_API_KEY_ID/$APCA_API_SECRET_KEY) and auth_method; not retrying until restart",
                    body.trim()
                );
            }
            self.stop.stop();
            return true;
        }
        false
    }

    fn feed_param(&self) -> String {
        self.cfg.feed.as_ref().map(|f| format!("&feed={f}")).unwrap_or_default()
    }

    /// Refresh the symbol list (kept as it was when the refresh fails).
    fn update_symbols(&self) -> Result<usize, ContribError> {
        let syms = match &self.cfg.stocks_json_url {
            Some(u) => {
                let auth = self.cfg.stocks_json_basic_auth.as_ref().map(|a| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(a.expose())));
                let headers: Vec<(&str, &str)> = auth.as_deref().map(|a| vec![("Authorization", a)]).unwrap_or_default();
                let body = self.http.get_with(u, &headers, &self.stop)?;
                parse_stocks_json(&body, u)?
            }
            None => {
                let ver = if self.cfg.assets_url.contains("broker") { "v1" } else { "v2" };
                let url = format!("{}/{ver}/assets?status=active", self.cfg.assets_url);
                parse_assets(&self.get(&url)?, &url, &self.cfg.exchanges)?
            }
        };
        let n = syms.len();
        *self.symbols.lock() = syms;
        Ok(n)
    }

    /// One poll: snapshots of every symbol into their TICK buckets. Returns the rows written.
    fn poll(&self) -> Result<u64, ContribError> {
        let syms = self.symbols.lock().clone();
        let before = self.stats.rows.load(Ordering::Relaxed);
        for chunk in syms.chunks(SNAPSHOT_CHUNK) {
            if self.stop.is_stopped() {
                break;
            }
            let url = format!("{}/v2/stocks/snapshots?symbols={}{}", self.cfg.base_url, q(&chunk.join(",")), self.feed_param());
            let rows = parse_snapshots(&self.get(&url)?, &url)?;
            let mut items = Vec::with_capacity(rows.len());
            for (sym, row) in rows {
                // Without extended_hours, a snapshot last updated outside the market hours is not stored.
                if !self.cfg.extended_hours && !Utc.timestamp_opt(row.epoch, 0).single().is_some_and(|t| self.cfg.hours.is_open(t)) {
                    continue;
                }
                let key = match BucketKey::from_parts(&bucket_symbol(&sym), &self.cfg.timeframe, "TICK") {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::warn!(plugin = PLUGIN, symbol = %sym, "skipped: {e}");
                        continue;
                    }
                };
                self.stats.last_bar.fetch_max(row.epoch.max(0) as u64, Ordering::Relaxed);
                items.push((key, tick_batch(&row), false));
            }
            store_all(PLUGIN, &self.client, &self.stats, items);
        }
        Ok(self.stats.rows.load(Ordering::Relaxed) - before)
    }

    /// Backfill bars of every symbol from its last stored bar (else `backfill.since`) to 16 minutes ago
    /// (recent data needs a paid plan). Returns the rows written.
    fn backfill(&self) -> Result<u64, ContribError> {
        let cfg = &self.cfg;
        let tf_secs = Timeframe::parse(&cfg.backfill_timeframe).ok().and_then(|t| t.fixed_seconds()).unwrap_or(86_400);
        let api_tf = alpaca_timeframe(&cfg.backfill_timeframe).unwrap_or_else(|| "1Day".into());
        let end = now_secs() - 16 * 60;
        let syms = self.symbols.lock().clone();
        let mut total = 0u64;
        for chunk in syms.chunks(BARS_CHUNK) {
            // Per symbol: its bucket and the last stored bar (bars at or before it are not written again).
            let mut keys: HashMap<String, (BucketKey, Option<i64>)> = HashMap::new();
            for s in chunk {
                match BucketKey::from_parts(&bucket_symbol(s), &cfg.backfill_timeframe, "OHLCV") {
                    Ok(k) => {
                        let last = self.client.info(&k).ok().and_then(|i| i.last_epoch);
                        keys.insert(s.clone(), (k, last));
                    }
                    Err(e) => tracing::warn!(plugin = PLUGIN, symbol = %s, "skipped: {e}"),
                }
            }
            let start = keys.values().map(|(_, last)| last.map_or(cfg.backfill_since, |l| l + tf_secs)).min().unwrap_or(cfg.backfill_since).max(cfg.backfill_since);
            if start > end || keys.is_empty() {
                continue;
            }
            let mut names: Vec<&String> = keys.keys().collect();
            names.sort();
            let names: Vec<&str> = names.into_iter().map(String::as_str).collect();
            let first = format!("{}/v2/stocks/bars?symbols={}&timeframe={api_tf}&start={}&end={}&limit=10000&adjustment=raw{}", cfg.base_url, q(&names.join(",")), rfc3339(start), rfc3339(end), self.feed_param());
            let mut url = first.clone();
            for _ in 0..100_000 {
                if self.stop.is_stopped() {
                    return Ok(total);
                }
                let (bars, next) = parse_bars(&self.get(&url)?, &url)?;
                let mut items = Vec::new();
                let mut syms: Vec<_> = bars.into_iter().collect();
                syms.sort_by(|a, b| a.0.cmp(&b.0));
                for (sym, mut bars) in syms {
                    let Some((key, last)) = keys.get(&sym) else { continue };
                    // The bucket's own intervals (a 1D bar at the zone's midnight under `timezone`), so that
                    // the stored Epoch is the one compared with `last`.
                    let tf = key.tf();
                    let tz = self.client.timezone();
                    for b in bars.iter_mut() {
                        b.t = tf.truncate_in(b.t, tz);
                    }
                    bars.retain(|b| last.is_none_or(|l| b.t > l) && b.t >= cfg.backfill_since);
                    bars.sort_by_key(|b| b.t);
                    bars.dedup_by_key(|b| b.t);
                    if bars.is_empty() {
                        continue;
                    }
                    total += bars.len() as u64;
                    self.stats.backfilled.fetch_add(bars.len() as u64, Ordering::Relaxed);
                    if let Some(b) = bars.last() {
                        self.stats.last_bar.fetch_max(b.t.max(0) as u64, Ordering::Relaxed);
                    }
                    items.push((key.clone(), bars_batch(&bars, false), false));
                }
                store_all(PLUGIN, &self.client, &self.stats, items);
                match next {
                    Some(tok) => url = format!("{first}&page_token={}", q(&tok)),
                    None => break,
                }
            }
        }
        Ok(total)
    }
}

/// The backfill thread: at start-up, then every day at `update_time`.
fn backfill_loop(sh: Arc<Shared>) {
    let mut next = now_secs();
    while !sh.stop.is_stopped() {
        let now = now_secs();
        if now >= next {
            let t0 = Instant::now();
            match sh.backfill() {
                Ok(n) => tracing::info!(plugin = PLUGIN, "backfill of {} bars done: {n} bars written in {:.1?}", sh.cfg.backfill_timeframe, t0.elapsed()),
                Err(e) if sh.fatal(&e) => return,
                Err(e) => tracing::warn!(plugin = PLUGIN, "backfill failed: {e}; next attempt at {}", fmt_time(next_daily(now_secs(), sh.cfg.update_time))),
            }
            next = next_daily(now_secs(), sh.cfg.update_time);
        }
        if !sh.stop.sleep(Duration::from_secs((next - now_secs()).clamp(0, 1) as u64).max(Duration::from_millis(200))) {
            return;
        }
    }
}

/// The worker: list the symbols, start the backfill thread, then poll on the schedule; refresh the symbols
/// every day at `symbols_update_time`.
pub fn run(cfg: AlpacaBkConfig, client: Client, stop: Arc<Stop>, stats: Arc<FeedStats>) {
    let http = Http::new(PLUGIN, cfg.timeout, cfg.request_interval).with_attempts(cfg.attempts);
    let headers = cfg.auth_headers();
    let sh = Arc::new(Shared { cfg, client, stats, stop, http, headers, symbols: Mutex::new(Vec::new()), auth_failed: AtomicBool::new(false) });
    let mut attempt = 0;
    loop {
        match sh.update_symbols() {
            Ok(n) => {
                tracing::info!(plugin = PLUGIN, "{n} symbols to poll ({})", sh.cfg.stocks_json_url.as_ref().map_or_else(|| sh.cfg.exchanges.join(", "), |_| "stocks_json_url".to_string()));
                break;
            }
            Err(e) if sh.fatal(&e) => return,
            Err(e) => {
                let d = super::feeder::backoff_delay(attempt, None);
                tracing::warn!(plugin = PLUGIN, "cannot list symbols: {e}; retrying in {d:?}");
                if !sh.stop.sleep(d) {
                    return;
                }
                attempt += 1;
            }
        }
    }
    let bf = if sh.cfg.backfill_enabled {
        let s2 = sh.clone();
        std::thread::Builder::new().name(format!("{PLUGIN}-backfill")).spawn(move || backfill_loop(s2)).ok()
    } else {
        None
    };
    let mut schedule = Schedule::new(sh.cfg.hours.clone(), sh.cfg.off_hours_schedule.clone());
    let mut next_symbols = next_daily(now_secs(), sh.cfg.symbols_update_time);
    let mut next_poll = Instant::now();
    let mut last_log = Instant::now();
    while !sh.stop.is_stopped() {
        if Instant::now() >= next_poll {
            next_poll += sh.cfg.interval;
            if next_poll < Instant::now() {
                next_poll = Instant::now() + sh.cfg.interval;
            }
            if schedule.due(Utc::now()) {
                match sh.poll() {
                    Ok(n) => tracing::debug!(plugin = PLUGIN, "snapshots: {n} rows"),
                    Err(e) if sh.fatal(&e) => break,
                    Err(e) => tracing::warn!(plugin = PLUGIN, "snapshot poll failed: {e}"),
                }
            }
        }
        if now_secs() >= next_symbols {
            match sh.update_symbols() {
                Ok(n) => tracing::info!(plugin = PLUGIN, "symbols updated: {n}"),
                Err(e) if sh.fatal(&e) => break,
                Err(e) => tracing::warn!(plugin = PLUGIN, "cannot update symbols: {e}; keeping the previous list"),
            }
            next_symbols = next_daily(now_secs(), sh.cfg.symbols_update_time);
        }
        if last_log.elapsed() >= Duration::from_secs(60) {
            let s = &sh.stats;
            tracing::info!(
                plugin = PLUGIN,
                "{} responses, {} rows written, {} backfilled, newest row {}",
                s.messages.load(Ordering::Relaxed),
                s.rows.load(Ordering::Relaxed),
                s.backfilled.load(Ordering::Relaxed),
                fmt_time(s.last_bar.load(Ordering::Relaxed) as i64)
            );
            last_log = Instant::now();
        }
        let wait = next_poll.saturating_duration_since(Instant::now()).min(Duration::from_millis(500));
        if !sh.stop.sleep(wait) {
            break;
        }
    }
    sh.stop.stop();
    if let Some(h) = bf {
        let _ = h.join();
    }
}

/// Start the worker from its `config:` map.
pub fn start(v: &serde_json::Value, client: Client, name: &str, feed: Arc<FeedStats>) -> Result<FeederHandle, ContribError> {
    let cfg = AlpacaBkConfig::from_json(v, |k| std::env::var(k).ok())?;
    if !cfg.off_hours_schedule.is_empty() && !cfg.extended_hours {
        tracing::warn!(plugin = PLUGIN, "off_hours_schedule is set but extended_hours is false: snapshots taken outside the market hours are not stored");
    }
    Ok(super::feeder::spawn_worker(format!("{PLUGIN}-{name}"), move |stop| run(cfg, client, stop, feed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: serde_json::Value) -> Result<AlpacaBkConfig, ContribError> {
        AlpacaBkConfig::from_json(&v, |_| None)
    }

    #[test]
    fn config_keys_env_overrides_and_errors() {
        let c = cfg(serde_json::json!({"exchanges": ["NASDAQ"], "api_key_id": "k", "api_secret_key": "s", "update_time": "13:30:00", "off_hours_schedule": " 45, 0,15 ,30", "open_time_NY": "9:25:00", "close_time_NY": "16:10:00", "closedDays": ["2024-12-25"], "backfill": {"enabled": true, "since": "2024-01-02", "timeframe": "1D"}})).unwrap();
        assert_eq!((c.update_time, c.symbols_update_time), (13 * 3600 + 1800, 13 * 3600 + 1800));
        assert_eq!(c.off_hours_schedule, vec![0, 15, 30, 45]);
        assert_eq!(c.timeframe, "1Sec");
        assert_eq!(c.interval, Duration::from_secs(10));
        assert_eq!(c.hours.closed_weekdays, vec![Weekday::Sat, Weekday::Sun]);
        assert_eq!(c.backfill_since, 1_704_153_600);
        assert_eq!(c.auth_method, AuthMethod::Basic);
        assert_eq!(c.auth_headers(), vec![("Authorization", "Basic azpz".to_string())]);
        assert!(!format!("{c:?}").contains("\"k\""));
        let env = |k: &str| match k {
            "ALPACA_BROKER_FEEDER_UPDATE_TIME" => Some("01:02:03".to_string()),
            "ALPACA_BROKER_FEEDER_SYMBOLS_UPDATE_TIME" => Some("04:05:06".to_string()),
            "ALPACA_BROKER_FEEDER_API_KEY_ID" => Some("envkey".to_string()),
            "ALPACA_BROKER_FEEDER_API_SECRET_KEY" => Some("envsecret".to_string()),
            "APCA_API_DATA_URL" => Some("http://127.0.0.1:9/".to_string()),
            "APCA_API_RETRY_MAX" => Some("2".to_string()),
            "APCA_API_CLIENT_TIMEOUT" => Some("2.5s".to_string()),
            _ => None,
        };
        let e = AlpacaBkConfig::from_json(&serde_json::json!({"exchanges": ["NYSE"], "api_key_id": "k", "api_secret_key": "s", "auth_method": "header"}), env).unwrap();
        assert_eq!((e.update_time, e.symbols_update_time), (3723, 4 * 3600 + 5 * 60 + 6));
        assert_eq!((e.key.expose(), e.secret.expose(), e.base_url.as_str(), e.attempts, e.timeout), ("envkey", "envsecret", "http://127.0.0.1:9", 3, Duration::from_millis(2500)));
        assert_eq!(e.auth_headers(), vec![("APCA-API-KEY-ID", "envkey".to_string()), ("APCA-API-SECRET-KEY", "envsecret".to_string())]);
        let sdk = AlpacaBkConfig::from_json(&serde_json::json!({"exchanges": ["NYSE"]}), |k| matches!(k, "APCA_API_KEY_ID" | "APCA_API_SECRET_KEY" | "APCA_API_AUTH_METHOD").then(|| if k == "APCA_API_AUTH_METHOD" { "header".to_string() } else { format!("{k}-v") })).unwrap();
        assert_eq!((sdk.key.expose(), sdk.auth_method), ("APCA_API_KEY_ID-v", AuthMethod::Header));
        for bad in [
            serde_json::json!({"api_key_id": "k", "api_secret_key": "s"}),
            serde_json::json!({"exchanges": ["LSE"], "api_key_id": "k", "api_secret_key": "s"}),
            serde_json::json!({"exchanges": ["NYSE"]}),
            serde_json::json!({"exchanges": ["NYSE"], "api_key_id": "k", "api_secret_key": "s", "openTime": "14:30:00"}),
            serde_json::json!({"exchanges": ["NYSE"], "api_key_id": "k", "api_secret_key": "s", "off_hours_schedule": "60"}),
            serde_json::json!({"exchanges": ["NYSE"], "api_key_id": "k", "api_secret_key": "s", "off_hours_schedule": "0-10"}),
            serde_json::json!({"exchanges": ["NYSE"], "api_key_id": "k", "api_secret_key": "s", "update_time": "25:00:00"}),
            serde_json::json!({"exchanges": ["NYSE"], "api_key_id": "k", "api_secret_key": "s", "closedDaysOfTheWeek": ["Caturday"]}),
            serde_json::json!({"exchanges": ["NYSE"], "api_key_id": "k", "api_secret_key": "s", "backfill": {"enabled": true}}),
            serde_json::json!({"exchanges": ["NYSE"], "api_key_id": "k", "api_secret_key": "s", "bogus": 1}),
        ] {
            assert!(cfg(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn market_hours_and_schedule() {
        let hours = MarketHours { open: parse_clock("9:30:00").unwrap(), close: parse_clock("16:00:00").unwrap(), closed_weekdays: vec![Weekday::Sat, Weekday::Sun], closed_days: vec![NaiveDate::from_ymd_opt(2024, 7, 4).unwrap()] };
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert!(hours.is_open(at("2024-01-02T14:30:00Z"))); // 09:30 EST
        assert!(!hours.is_open(at("2024-01-02T14:29:59Z")));
        assert!(hours.is_open(at("2024-07-02T13:30:00Z"))); // 09:30 EDT
        assert!(!hours.is_open(at("2024-07-02T20:00:01Z")));
        assert!(!hours.is_open(at("2024-07-04T15:00:00Z"))); // closedDays
        assert!(!hours.is_open(at("2024-01-06T15:00:00Z"))); // Saturday
        let mut s = Schedule::new(hours, vec![0, 30]);
        assert!(s.due(at("2024-01-02T15:07:00Z")));
        assert!(!s.due(at("2024-01-06T15:07:00Z")));
        assert!(s.due(at("2024-01-06T15:30:01Z")));
        assert!(!s.due(at("2024-01-06T15:30:20Z")), "at most once a minute");
        assert!(s.due(at("2024-01-06T16:00:05Z")));
        assert_eq!(next_daily(1_704_153_600 + 100, 50), 1_704_153_600 + 86_400 + 50);
        assert_eq!(next_daily(1_704_153_600 + 10, 50), 1_704_153_600 + 50);
        assert_eq!(alpaca_timeframe("1D").as_deref(), Some("1Day"));
        assert_eq!(alpaca_timeframe("1H").as_deref(), Some("1Hour"));
        assert_eq!(alpaca_timeframe("15Min").as_deref(), Some("15Min"));
        assert_eq!(alpaca_timeframe("1Sec"), None);
    }

    #[test]
    fn parses_v2_snapshots_bars_assets() {
        let body = r#"{"AAPL":{"latestTrade":{"t":"2021-05-11T20:00:00.435997104Z","x":"Q","p":125.91,"s":5589631,"c":["@","M"],"i":179430,"z":"C"},"latestQuote":{"t":"2021-05-11T22:05:02.307304704Z","ax":"P","ap":125.68,"as":12,"bx":"P","bp":125.6,"bs":4,"c":["R"],"z":"C"},"minuteBar":{"t":"2021-05-11T22:02:00Z","o":125.66,"h":125.66,"l":125.66,"c":125.66,"v":396,"n":1,"vw":125.66},"dailyBar":{"t":"2021-05-11T04:00:00Z","o":123.5,"h":126.27,"l":122.77,"c":125.91,"v":126142826,"n":1,"vw":125.0},"prevDailyBar":{"t":"2021-05-10T04:00:00Z","o":129.41,"h":129.54,"l":126.81,"c":126.85,"v":88071229,"n":1,"vw":127.0}},"NOPE":null,"HALF":{"latestTrade":{"t":"2021-05-11T20:00:00Z","p":1,"s":1}}}"#;
        let rows = parse_snapshots(body, "u").unwrap();
        assert_eq!(rows.len(), 1);
        let (sym, r) = &rows[0];
        assert_eq!(sym, "AAPL");
        assert_eq!((r.epoch, r.quote_ts, r.trade_ts, r.ask, r.ask_size, r.bid, r.bid_size, r.price, r.size), (1_620_770_702, 1_620_770_702, 1_620_763_200, 125.68, 12, 125.6, 4, 125.91, 5_589_631));
        assert_eq!(r.daily, (1_620_705_600, 123.5, 126.27, 122.77, 125.91, 126_142_826));
        assert_eq!(tick_batch(r).unwrap().num_columns(), 27);
        assert_eq!(tick_schema().field(9).name(), "DailyTimestamp");
        assert_eq!(tick_schema().field(15).name(), "MinuteTimestamp");
        assert_eq!(tick_schema().field(26).name(), "PreviousVolume");
        let (bars, next) = parse_bars(r#"{"bars":{"AAPL":[{"t":"2021-02-01T05:00:00Z","o":133.75,"h":135.38,"l":130.93,"c":134.14,"v":106239823,"n":1,"vw":133.5}],"MSFT":null},"next_page_token":"QUFQTHxE"}"#, "u").unwrap();
        assert_eq!(bars["AAPL"][0], MinuteBar { t: 1_612_155_600, open: 133.75, high: 135.38, low: 130.93, close: 134.14, volume: 106_239_823, ticks: 0 });
        assert!(bars["MSFT"].is_empty());
        assert_eq!(next.as_deref(), Some("QUFQTHxE"));
        assert_eq!(parse_bars(r#"{"bars":{},"next_page_token":null}"#, "u").unwrap().1, None);
        let assets = r#"[{"id":"1","class":"us_equity","exchange":"NASDAQ","symbol":"AAPL","status":"active","tradable":true},{"exchange":"NYSE","symbol":"IBM"},{"exchange":"OTC","symbol":"XYZ"}]"#;
        assert_eq!(parse_assets(assets, "u", &["NASDAQ".into(), "NYSE".into()]).unwrap(), vec!["AAPL", "IBM"]);
        assert_eq!(parse_stocks_json(r#"{"data":{"MSFT":{},"AAPL":{"x":1}}}"#, "u").unwrap(), vec!["AAPL", "MSFT"]);
        assert_eq!(q("BRK/A,X Y"), "BRK%2FA,X%20Y");
    }
}
