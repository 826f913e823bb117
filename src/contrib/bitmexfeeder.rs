//! `bitmexfeeder` (background worker): BitMEX bucketed trades into `bitmex_<SYM>/<tf>/OHLCV` (float64
//! Open/High/Low/Close/Volume, MarketStore's bucket names and types).
//!
//! ```yaml
//! bgworkers:
//!   - module: bitmexfeeder.so
//!     name: BitmexFetcher
//!     config:
//!       symbols: [XBTUSD, ETHUSD]   # default: every active instrument
//!       query_start: "2024-01-01 00:00"
//!       base_timeframe: 1Min        # 1Min, 5Min, 1H, 1D; MarketStore's spellings 1m, 5m, 1h, 1d too
//!       base_url: https://www.bitmex.com
//! ```
//!
//! API: `GET {base_url}/api/v1/trade/bucketed?binSize=1m&partial=false&reverse=false&count=500&symbol=XBTUSD
//! &startTime=<RFC 3339>&endTime=<RFC 3339>` returns up to 500 buckets, oldest first, as objects with
//! `timestamp` (the **end** of the bucket), `open`, `high`, `low`, `close`, `volume`, …; `GET
//! {base_url}/api/v1/instrument/active` lists instruments (`symbol`) when `symbols` is empty. Errors come as
//! `{"error": {"message", "name"}}`. Bars are labelled with their open time (timestamp − timeframe), like
//! the other feeders. MarketStore's default `base_timeframe` `1m` was rejected by its own parser; here it
//! means `1Min`. See [`super::feeder`] for backfill, resume, rate limits and follow mode.

use chrono::{TimeZone, Utc};

use super::feeder::{Bar, Exchange, FeederConfig, FeederHandle, Http, Stop};
use super::ContribError;
use crate::engine::BucketKey;
use crate::service::Client;

const PLUGIN: &str = "bitmexfeeder";
/// BitMEX's REST root.
pub const DEFAULT_URL: &str = "https://www.bitmex.com";

/// The BitMEX bucketed-trades API.
pub struct Bitmex;

/// BitMEX `binSize` of a timeframe in seconds.
pub fn bin_size(tf_secs: i64) -> Option<&'static str> {
    match tf_secs {
        60 => Some("1m"),
        300 => Some("5m"),
        3600 => Some("1h"),
        86400 => Some("1d"),
        _ => None,
    }
}

fn rfc3339(t: i64) -> String {
    Utc.timestamp_opt(t, 0).single().map(|d| d.format("%Y-%m-%dT%H:%M:%S.000Z").to_string()).unwrap_or_default()
}

/// Parse a bucketed response; `tf` shifts BitMEX's end-of-bucket timestamps to open times.
pub fn parse_buckets(body: &str, url: &str, tf: i64) -> Result<Vec<Bar>, ContribError> {
    let perr = |msg: String| ContribError::Parse { url: url.into(), msg };
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| perr(e.to_string()))?;
    let arr = v.as_array().ok_or_else(|| perr(format!("expected an array of buckets, got {}", body.chars().take(200).collect::<String>())))?;
    let mut out = Vec::with_capacity(arr.len());
    for b in arr {
        let f = |k: &str| b.get(k).and_then(|x| x.as_f64());
        let ts = b.get("timestamp").and_then(|x| x.as_str()).and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok()).ok_or_else(|| perr(format!("bad timestamp in {b}")))?;
        // A bucket without trades has null prices: skip it (no bar for that period).
        let (Some(open), Some(high), Some(low), Some(close)) = (f("open"), f("high"), f("low"), f("close")) else { continue };
        out.push(Bar { t: ts.timestamp() - tf, open, high, low, close, volume: f("volume").unwrap_or(0.0) });
    }
    Ok(out)
}

/// Instruments of an `instrument/active` response.
pub fn parse_instruments(body: &str, url: &str) -> Result<Vec<String>, ContribError> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| ContribError::Parse { url: url.into(), msg: e.to_string() })?;
    let arr = v.as_array().ok_or_else(|| ContribError::Parse { url: url.into(), msg: "expected an array of instruments".into() })?;
    Ok(arr.iter().filter_map(|i| i.get("symbol").and_then(|s| s.as_str()).map(String::from)).collect())
}

impl Exchange for Bitmex {
    fn plugin(&self) -> &'static str {
        PLUGIN
    }

    fn page_size(&self) -> i64 {
        500
    }

    fn symbols(&self, http: &Http, cfg: &FeederConfig, stop: &Stop) -> Result<Vec<String>, ContribError> {
        if !cfg.symbols.is_empty() {
            return Ok(cfg.symbols.clone());
        }
        let url = format!("{}/api/v1/instrument/active", cfg.base_url);
        parse_instruments(&http.get(&url, stop)?, &url)
    }

    fn bucket(&self, symbol: &str, cfg: &FeederConfig) -> Result<BucketKey, ContribError> {
        Ok(BucketKey::from_parts(&format!("bitmex_{symbol}"), &cfg.timeframe_name, "OHLCV")?)
    }

    fn fetch(&self, http: &Http, cfg: &FeederConfig, symbol: &str, start: i64, end: i64, stop: &Stop) -> Result<Vec<Bar>, ContribError> {
        let tf = cfg.tf_secs();
        let count = ((end - start) / tf + 1).clamp(1, 500);
        let url = format!(
            "{}/api/v1/trade/bucketed?binSize={}&partial=false&reverse=false&count={count}&symbol={symbol}&startTime={}&endTime={}",
            cfg.base_url,
            bin_size(tf).unwrap_or("1m"),
            rfc3339(start + tf),
            rfc3339(end + tf)
        );
        parse_buckets(&http.get(&url, stop)?, &url, tf)
    }
}

/// Parse the config: MarketStore's `1m`/`5m`/`1h`/`1d` spellings are accepted, and the timeframe must be a
/// BitMEX bin size.
pub fn config(v: &serde_json::Value) -> Result<FeederConfig, ContribError> {
    let mut v = if v.is_null() { serde_json::json!({}) } else { v.clone() };
    if let Some(tf) = v.get("base_timeframe").and_then(|t| t.as_str()) {
        let mapped = match tf.trim() {
            "1m" => Some("1Min"),
            "5m" => Some("5Min"),
            "1h" => Some("1H"),
            "1d" => Some("1D"),
            _ => None,
        };
        if let (Some(m), Some(obj)) = (mapped, v.as_object_mut()) {
            obj.insert("base_timeframe".into(), serde_json::Value::String(m.into()));
        }
    }
    let c = FeederConfig::from_json(PLUGIN, &v, DEFAULT_URL)?;
    if bin_size(c.tf_secs()).is_none() {
        return Err(ContribError::Config { plugin: PLUGIN, msg: format!("base_timeframe {} is not a BitMEX bin size (1Min, 5Min, 1H, 1D)", c.timeframe_name) });
    }
    Ok(c)
}

/// Start the worker from its `config:` map.
pub fn start(v: &serde_json::Value, client: Client, name: &str, feed: std::sync::Arc<crate::metrics::FeedStats>) -> Result<FeederHandle, ContribError> {
    let c = config(v)?;
    Ok(super::feeder::spawn(Bitmex, c, client, name.to_string(), feed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_buckets() {
        let body = r#"[{"timestamp":"2024-01-01T00:01:00.000Z","symbol":"XBTUSD","open":42280.5,"high":42300,"low":42270,"close":42290.5,"trades":120,"volume":1500000,"vwap":42285.1,"lastSize":100,"turnover":3547000000,"homeNotional":35.47,"foreignNotional":1500000},
                       {"timestamp":"2024-01-01T00:02:00.000Z","symbol":"XBTUSD","open":null,"high":null,"low":null,"close":null,"trades":0,"volume":0}]"#;
        let b = parse_buckets(body, "u", 60).unwrap();
        assert_eq!(b, vec![Bar { t: 1_704_067_200, open: 42280.5, high: 42300.0, low: 42270.0, close: 42290.5, volume: 1_500_000.0 }]);
        assert!(parse_buckets(r#"{"error":{"message":"Rate limit exceeded","name":"RateLimitError"}}"#, "u", 60).is_err());
        assert_eq!(parse_instruments(r#"[{"symbol":"XBTUSD","state":"Open"},{"symbol":"ETHUSD"}]"#, "u").unwrap(), vec!["XBTUSD", "ETHUSD"]);
    }

    #[test]
    fn marketstore_timeframe_spellings() {
        assert_eq!(config(&serde_json::json!({"base_timeframe": "1m"})).unwrap().timeframe_name, "1Min");
        assert_eq!(config(&serde_json::json!({"base_timeframe": "1h"})).unwrap().tf_secs(), 3600);
        assert_eq!(config(&serde_json::json!({})).unwrap().timeframe_name, "1Min");
        assert!(config(&serde_json::json!({"base_timeframe": "15Min"})).is_err());
        assert_eq!(Bitmex.bucket("XBTUSD", &config(&serde_json::json!({})).unwrap()).unwrap().to_string(), "bitmex_XBTUSD/1Min/OHLCV");
        assert_eq!(rfc3339(1_704_067_200), "2024-01-01T00:00:00.000Z");
    }
}
