//! `binancefeeder` (background worker): Binance spot klines into `binance_<BASE>-<QUOTE>/<tf>/OHLCV`
//! (float64 Open/High/Low/Close/Volume, MarketStore's bucket names and types).
//!
//! ```yaml
//! bgworkers:
//!   - module: binancefeeder      # or binancefeeder.so
//!     name: BinanceFetcher
//!     config:
//!       symbols: [ETH, BTC]      # base assets
//!       base_currencies: [USDT]  # quote assets (default USDT)
//!       query_start: "2024-01-01 00:00"
//!       base_timeframe: 1Min     # 1Min→1m, 1H→1h, 1D→1d, 1W→1w (Binance intervals)
//!       base_url: https://api.binance.com
//! ```
//!
//! API: `GET {base_url}/api/v3/klines?symbol=ETHUSDT&interval=1m&startTime=<ms>&endTime=<ms>&limit=1000`
//! returns up to 1000 klines, oldest first, as `[openTime ms, "open", "high", "low", "close", "volume",
//! closeTime ms, …]`; `GET {base_url}/api/v3/exchangeInfo` lists `TRADING` pairs when `symbols` is empty.
//! Errors come as `{"code": -1121, "msg": "Invalid symbol."}`; `429` and `418` carry `Retry-After`. Unlike
//! MarketStore's feeder, a restart resumes after the last stored bar. See [`super::feeder`].

use super::feeder::{Bar, Exchange, FeederConfig, FeederHandle, Http, Stop};
use super::ContribError;
use crate::engine::{BucketKey, TfUnit, Timeframe};
use crate::service::Client;

const PLUGIN: &str = "binancefeeder";
/// Binance's public REST root.
pub const DEFAULT_URL: &str = "https://api.binance.com";
const INTERVALS: [&str; 16] = ["1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w", "1M"];

/// The Binance klines API.
pub struct Binance;

/// Binance interval of a timeframe (`1Min` → `1m`), if Binance serves it.
pub fn interval(tf: Timeframe) -> Option<String> {
    let u = match tf.unit {
        TfUnit::Sec => "s",
        TfUnit::Min => "m",
        TfUnit::Hour => "h",
        TfUnit::Day => "d",
        TfUnit::Week => "w",
        TfUnit::Month => "M",
        TfUnit::Year => return None,
    };
    let s = format!("{}{}", tf.n, u);
    INTERVALS.contains(&s.as_str()).then_some(s)
}

fn num(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// Parse a klines response.
pub fn parse_klines(body: &str, url: &str) -> Result<Vec<Bar>, ContribError> {
    let perr = |msg: String| ContribError::Parse { url: url.into(), msg };
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| perr(e.to_string()))?;
    let arr = v.as_array().ok_or_else(|| perr(format!("expected an array of klines, got {}", body.chars().take(200).collect::<String>())))?;
    let mut out = Vec::with_capacity(arr.len());
    for k in arr {
        let row = k.as_array().filter(|r| r.len() >= 11).ok_or_else(|| perr(format!("bad kline {k}")))?;
        let f: Vec<f64> = row.iter().take(6).map(num).collect::<Option<Vec<_>>>().ok_or_else(|| perr(format!("bad kline {k}")))?;
        let open_ms = row[0].as_i64().ok_or_else(|| perr(format!("bad open time in {k}")))?;
        out.push(Bar { t: open_ms.div_euclid(1000), open: f[1], high: f[2], low: f[3], close: f[4], volume: f[5] });
    }
    Ok(out)
}

/// Pairs of an exchangeInfo response: `TRADING` symbols quoted in one of `quotes`, as `BASE-QUOTE`.
pub fn parse_exchange_info(body: &str, url: &str, bases: &[String], quotes: &[String]) -> Result<Vec<String>, ContribError> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| ContribError::Parse { url: url.into(), msg: e.to_string() })?;
    let arr = v.get("symbols").and_then(|s| s.as_array()).ok_or_else(|| ContribError::Parse { url: url.into(), msg: "no symbols array".into() })?;
    Ok(arr
        .iter()
        .filter(|s| s.get("status").and_then(|x| x.as_str()) == Some("TRADING"))
        .filter_map(|s| Some((s.get("baseAsset")?.as_str()?, s.get("quoteAsset")?.as_str()?)))
        .filter(|(b, q)| quotes.iter().any(|x| x == q) && (bases.is_empty() || bases.iter().any(|x| x == b)))
        .map(|(b, q)| format!("{b}-{q}"))
        .collect())
}

impl Exchange for Binance {
    fn plugin(&self) -> &'static str {
        PLUGIN
    }

    fn page_size(&self) -> i64 {
        1000
    }

    fn symbols(&self, http: &Http, cfg: &FeederConfig, stop: &Stop) -> Result<Vec<String>, ContribError> {
        if !cfg.symbols.is_empty() {
            return Ok(cfg.symbols.iter().flat_map(|b| cfg.base_currencies.iter().map(move |q| format!("{b}-{q}"))).collect());
        }
        let url = format!("{}/api/v3/exchangeInfo", cfg.base_url);
        parse_exchange_info(&http.get(&url, stop)?, &url, &[], &cfg.base_currencies)
    }

    fn bucket(&self, symbol: &str, cfg: &FeederConfig) -> Result<BucketKey, ContribError> {
        Ok(BucketKey::from_parts(&format!("binance_{symbol}"), &cfg.timeframe_name, "OHLCV")?)
    }

    fn fetch(&self, http: &Http, cfg: &FeederConfig, symbol: &str, start: i64, end: i64, stop: &Stop) -> Result<Vec<Bar>, ContribError> {
        let iv = interval(cfg.timeframe).unwrap_or_else(|| "1m".into());
        let pair = symbol.replace('-', "");
        let limit = ((end - start) / cfg.tf_secs() + 1).clamp(1, 1000);
        let url = format!(
            "{}/api/v3/klines?symbol={pair}&interval={iv}&startTime={}&endTime={}&limit={limit}",
            cfg.base_url,
            start * 1000,
            end * 1000 + 999
        );
        parse_klines(&http.get(&url, stop)?, &url)
    }
}

/// Parse the config (the timeframe must be a Binance interval).
pub fn config(v: &serde_json::Value) -> Result<FeederConfig, ContribError> {
    let c = FeederConfig::from_json(PLUGIN, v, DEFAULT_URL)?;
    if interval(c.timeframe).is_none() {
        return Err(ContribError::Config { plugin: PLUGIN, msg: format!("base_timeframe {} is not a Binance interval", c.timeframe_name) });
    }
    Ok(c)
}

/// Start the worker from its `config:` map.
pub fn start(v: &serde_json::Value, client: Client, name: &str, feed: std::sync::Arc<crate::metrics::FeedStats>) -> Result<FeederHandle, ContribError> {
    let c = config(v)?;
    Ok(super::feeder::spawn(Binance, c, client, name.to_string(), feed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_klines() {
        let body = r#"[[1704067200000,"2281.87000000","2283.52000000","2281.06000000","2283.01000000","150.73850000",1704067259999,"343977.99846300",413,"88.65130000","202313.13224000","0"]]"#;
        let b = parse_klines(body, "u").unwrap();
        assert_eq!(b, vec![Bar { t: 1_704_067_200, open: 2281.87, high: 2283.52, low: 2281.06, close: 2283.01, volume: 150.7385 }]);
        assert!(parse_klines(r#"{"code":-1121,"msg":"Invalid symbol."}"#, "u").is_err());
        assert!(parse_klines(r#"[[1704067200000,"1","1","1","1","1"]]"#, "u").is_err());
    }

    #[test]
    fn intervals_and_pairs() {
        assert_eq!(interval(Timeframe::parse("1Min").unwrap()).as_deref(), Some("1m"));
        assert_eq!(interval(Timeframe::parse("4H").unwrap()).as_deref(), Some("4h"));
        assert_eq!(interval(Timeframe::parse("7Min").unwrap()), None);
        let info = r#"{"symbols":[{"symbol":"ETHUSDT","status":"TRADING","baseAsset":"ETH","quoteAsset":"USDT"},{"symbol":"ETHBTC","status":"TRADING","baseAsset":"ETH","quoteAsset":"BTC"},{"symbol":"XUSDT","status":"BREAK","baseAsset":"X","quoteAsset":"USDT"}]}"#;
        assert_eq!(parse_exchange_info(info, "u", &[], &["USDT".into()]).unwrap(), vec!["ETH-USDT"]);
        let c = config(&serde_json::json!({"symbols": ["ETH"], "base_currencies": ["USDT", "BTC"]})).unwrap();
        assert_eq!(Binance.bucket("ETH-USDT", &c).unwrap().to_string(), "binance_ETH-USDT/1Min/OHLCV");
        assert!(config(&serde_json::json!({"base_timeframe": "7Min"})).is_err());
    }
}
