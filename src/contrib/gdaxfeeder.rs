//! `gdaxfeeder` (background worker): Coinbase Exchange (formerly GDAX / Coinbase Pro) candles into
//! `gdax_<PRODUCT>/<tf>/OHLCV` (float64 Open/High/Low/Close/Volume, MarketStore's bucket names and types).
//!
//! ```yaml
//! bgworkers:
//!   - module: gdaxfeeder         # or gdaxfeeder.so
//!     name: GdaxFetcher
//!     config:
//!       symbols: [BTC-USD, ETH-USD]
//!       query_start: "2024-01-01 00:00"
//!       base_timeframe: 1Min     # 1Min, 5Min, 15Min, 1H, 6H or 1D (Coinbase granularities)
//!       base_url: https://api.exchange.coinbase.com
//! ```
//!
//! API: `GET {base_url}/products/{id}/candles?start=<RFC 3339>&end=<RFC 3339>&granularity=<seconds>` returns
//! at most 300 candles, newest first, as `[time, low, high, open, close, volume]`; `GET {base_url}/products`
//! lists products (`id`) when `symbols` is empty. Errors come as `{"message": "..."}`. See [`super::feeder`]
//! for backfill, resume, rate limits and follow mode.

use chrono::{TimeZone, Utc};

use super::feeder::{Bar, Exchange, FeederConfig, FeederHandle, Http, Stop};
use super::ContribError;
use crate::engine::BucketKey;
use crate::service::Client;

const PLUGIN: &str = "gdaxfeeder";
/// Coinbase Exchange's public REST root.
pub const DEFAULT_URL: &str = "https://api.exchange.coinbase.com";
const GRANULARITIES: [i64; 6] = [60, 300, 900, 3600, 21600, 86400];

/// The Coinbase Exchange candles API.
pub struct Gdax;

fn rfc3339(t: i64) -> String {
    Utc.timestamp_opt(t, 0).single().map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default()
}

fn num(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Parse a candles response: `[[time, low, high, open, close, volume], ...]`.
pub fn parse_candles(body: &str, url: &str) -> Result<Vec<Bar>, ContribError> {
    let perr = |msg: String| ContribError::Parse { url: url.into(), msg };
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| perr(e.to_string()))?;
    let arr = v.as_array().ok_or_else(|| perr(format!("expected an array of candles, got {}", truncate(body))))?;
    let mut out = Vec::with_capacity(arr.len());
    for c in arr {
        let row = c.as_array().filter(|r| r.len() >= 6).ok_or_else(|| perr(format!("bad candle {c}")))?;
        let f: Vec<f64> = row.iter().take(6).map(num).collect::<Option<Vec<_>>>().ok_or_else(|| perr(format!("bad candle {c}")))?;
        out.push(Bar { t: f[0] as i64, low: f[1], high: f[2], open: f[3], close: f[4], volume: f[5] });
    }
    Ok(out)
}

/// Parse a products response: the `id` of every product that is online (or has no status).
pub fn parse_products(body: &str, url: &str) -> Result<Vec<String>, ContribError> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| ContribError::Parse { url: url.into(), msg: e.to_string() })?;
    let arr = v.as_array().ok_or_else(|| ContribError::Parse { url: url.into(), msg: "expected an array of products".into() })?;
    Ok(arr
        .iter()
        .filter(|p| p.get("status").and_then(|s| s.as_str()).is_none_or(|s| s == "online"))
        .filter(|p| !p.get("trading_disabled").and_then(|s| s.as_bool()).unwrap_or(false))
        .filter_map(|p| p.get("id").and_then(|s| s.as_str()).map(String::from))
        .collect())
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

impl Exchange for Gdax {
    fn plugin(&self) -> &'static str {
        PLUGIN
    }

    fn page_size(&self) -> i64 {
        300
    }

    fn symbols(&self, http: &Http, cfg: &FeederConfig, stop: &Stop) -> Result<Vec<String>, ContribError> {
        if !cfg.symbols.is_empty() {
            return Ok(cfg.symbols.clone());
        }
        let url = format!("{}/products", cfg.base_url);
        parse_products(&http.get(&url, stop)?, &url)
    }

    fn bucket(&self, symbol: &str, cfg: &FeederConfig) -> Result<BucketKey, ContribError> {
        Ok(BucketKey::from_parts(&format!("gdax_{symbol}"), &cfg.timeframe_name, "OHLCV")?)
    }

    fn fetch(&self, http: &Http, cfg: &FeederConfig, symbol: &str, start: i64, end: i64, stop: &Stop) -> Result<Vec<Bar>, ContribError> {
        let url = format!(
            "{}/products/{}/candles?start={}&end={}&granularity={}",
            cfg.base_url,
            symbol,
            rfc3339(start),
            rfc3339(end),
            cfg.tf_secs()
        );
        parse_candles(&http.get(&url, stop)?, &url)
    }
}

/// Parse the config (the granularity must be one Coinbase serves).
pub fn config(v: &serde_json::Value) -> Result<FeederConfig, ContribError> {
    let c = FeederConfig::from_json(PLUGIN, v, DEFAULT_URL)?;
    if !GRANULARITIES.contains(&c.tf_secs()) {
        return Err(ContribError::Config {
            plugin: PLUGIN,
            msg: format!("base_timeframe {} is not a Coinbase granularity (1Min, 5Min, 15Min, 1H, 6H, 1D)", c.timeframe_name),
        });
    }
    Ok(c)
}

/// Start the worker from its `config:` map.
pub fn start(v: &serde_json::Value, client: Client, name: &str, feed: std::sync::Arc<crate::metrics::FeedStats>) -> Result<FeederHandle, ContribError> {
    let c = config(v)?;
    Ok(super::feeder::spawn(Gdax, c, client, name.to_string(), feed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_candles() {
        let body = r#"[[1704067320,42210.01,42238.5,42226.07,42236.9,3.51],[1704067260,42190.0,42231.0,42196.6,42226.07,12.0046]]"#;
        let bars = parse_candles(body, "u").unwrap();
        assert_eq!(bars[0], Bar { t: 1_704_067_320, low: 42210.01, high: 42238.5, open: 42226.07, close: 42236.9, volume: 3.51 });
        assert_eq!(bars.len(), 2);
        assert!(parse_candles(r#"{"message":"NotFound"}"#, "u").is_err());
        assert!(parse_candles(r#"[[1,2,3]]"#, "u").is_err());
    }

    #[test]
    fn parses_products_and_config() {
        let p = parse_products(r#"[{"id":"BTC-USD","status":"online"},{"id":"OLD-USD","status":"delisted"},{"id":"ETH-USD","trading_disabled":false}]"#, "u").unwrap();
        assert_eq!(p, vec!["BTC-USD", "ETH-USD"]);
        assert!(config(&serde_json::json!({"base_timeframe": "2Min"})).is_err());
        assert_eq!(config(&serde_json::json!({})).unwrap().base_url, DEFAULT_URL);
        assert_eq!(rfc3339(1_704_067_200), "2024-01-01T00:00:00Z");
        assert_eq!(Gdax.bucket("BTC-USD", &config(&serde_json::json!({})).unwrap()).unwrap().to_string(), "gdax_BTC-USD/1Min/OHLCV");
    }
}
