//! The plugins mkts ships built in, MarketStore's "contrib" batteries done right.
//!
//! - [`ondiskagg`] (trigger): keeps downsampled buckets (`5Min`, `1H`, `1D`, …) up to date from bars or ticks.
//! - [`stream`] (trigger): pushes the newest row of each write to `/ws` and Flight stream subscribers, holding
//!   higher-timeframe bars until their window closes.
//! - [`gdaxfeeder`] / [`binancefeeder`] (background workers): backfill and follow Coinbase Exchange candles and
//!   Binance klines into `gdax_<PRODUCT>/<tf>/OHLCV` and `binance_<BASE>-<QUOTE>/<tf>/OHLCV`.
//! - [`polygon`] (background worker): Polygon's WebSocket stream of minute bars, trades and quotes into
//!   `<SYM>/1Min/OHLCV`, `<SYM>/1Sec/TRADE` and `<SYM>/1Sec/QUOTE`, gaps after a reconnect filled over REST.
//! - [`bitmexfeeder`] (background worker): BitMEX bucketed trades into `bitmex_<SYM>/<tf>/OHLCV`.
//! - [`alpaca`] (background worker): Alpaca's v2 market-data WebSocket (`iex`/`sip`) into the same buckets.
//! - [`alpacabkfeeder`] (background worker): Alpaca's v2 snapshots polled into `<SYM>/<tf>/TICK` on
//!   MarketStore's schedule, and the daily backfill of bars into `<SYM>/<tf>/OHLCV`.
//! - [`calendar`]: the NASDAQ regular-session calendar behind `filter: nasdaq`.
//!
//! Each plugin is a small testable core (window arithmetic, calendar, response parsing, backfill windows,
//! back-off) plus a thin runner over a [`Client`](crate::service::Client) of the operations layer (reads and
//! writes as the plugin interface, policy checked there; never the engine itself). The plugin host
//! ([`crate::plugins`]) starts them by name through [`trigger`] and [`bgworker`]. Plugin configuration arrives as
//! the JSON form of the YAML `config:` map, exactly as MarketStore's `map[string]interface{}`.

pub mod alpaca;
pub mod alpacabkfeeder;
pub mod binancefeeder;
pub mod bitmexfeeder;
pub mod calendar;
pub mod feeder;
pub mod gdaxfeeder;
pub mod ondiskagg;
pub mod polygon;
pub mod polygon_backfill;
pub mod stream;
pub mod ws;

use thiserror::Error;

/// Errors of the built-in plugins: configuration problems (the plugin is not started) and runtime problems
/// (logged; they never reach the writer whose write fired a trigger).
#[derive(Debug, Error)]
pub enum ContribError {
    #[error("invalid {plugin} config: {msg}")]
    Config { plugin: &'static str, msg: String },
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Service(#[from] crate::service::ServiceError),
    #[error("aggregation failed: {0}")]
    Aggregate(String),
    #[error("HTTP {status} from {url}: {body}")]
    Http { status: u16, url: String, body: String, retry_after: Option<u64> },
    #[error("request to {url} failed: {msg}")]
    Transport { url: String, msg: String },
    #[error("unexpected response from {url}: {msg}")]
    Parse { url: String, msg: String },
    /// Reading or writing the backfill's target (a data directory or a server) failed.
    #[error("{0}")]
    Store(String),
    /// The provider refused the credentials (HTTP 401/403, `auth_failed`): not retried until a restart.
    #[error("{plugin}: authentication failed: {msg}")]
    Auth { plugin: &'static str, msg: String },
}

impl From<datafusion::error::DataFusionError> for ContribError {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        ContribError::Aggregate(e.to_string())
    }
}

impl From<arrow::error::ArrowError> for ContribError {
    fn from(e: arrow::error::ArrowError) -> Self {
        ContribError::Aggregate(e.to_string())
    }
}

/// Names of the built-in trigger modules (`ondiskagg.so` is accepted as `ondiskagg`).
pub const TRIGGERS: &[&str] = &["ondiskagg", "stream"];
/// Names of the built-in background-worker modules.
pub const BGWORKERS: &[&str] = &["gdaxfeeder", "binancefeeder", "bitmexfeeder", "polygon", "alpaca", "alpacabkfeeder"];

/// `ondiskagg.so`, `/bin/ondiskagg.so`, `ondiskagg` → `ondiskagg`.
pub fn module_name(module: &str) -> &str {
    let base = module.rsplit('/').next().unwrap_or(module);
    base.strip_suffix(".so").unwrap_or(base)
}

use std::time::Duration;

use crate::bus::Bus;
use crate::engine::AppendEvent;
use crate::service::Client;

/// A built-in trigger instance, ready to be fired with appended batches.
#[derive(Clone)]
pub enum BuiltinTrigger {
    OnDiskAgg(ondiskagg::OnDiskAgg),
    Stream(stream::StreamTrigger),
}

impl BuiltinTrigger {
    /// Handle one durable append. Never blocks: ondiskagg queues the range, stream pushes or shelves.
    pub fn fire(&self, ev: &AppendEvent) {
        match self {
            BuiltinTrigger::OnDiskAgg(a) => a.fire(ev),
            BuiltinTrigger::Stream(s) => s.fire(ev),
        }
    }

    /// Wait until queued work is done (ondiskagg), at most `timeout`.
    pub async fn drain(&self, timeout: Duration) {
        if let BuiltinTrigger::OnDiskAgg(a) = self {
            let _ = tokio::time::timeout(timeout, a.drain()).await;
        }
    }
}

/// Construct and start the built-in trigger named by `module`, or `None` when it is not a built-in.
/// Built-ins get narrow handles: a client of the operations layer to read and write through (`ondiskagg`),
/// the bus they publish on (`stream`). Must run inside the tokio runtime (workers and timers are spawned on
/// it).
pub fn trigger(module: &str, config: &serde_json::Value, client: &Client, bus: &Bus) -> Option<Result<BuiltinTrigger, ContribError>> {
    Some(match module_name(module) {
        "ondiskagg" => ondiskagg::OnDiskAgg::from_config(config).map(|a| {
            a.start(client.clone());
            BuiltinTrigger::OnDiskAgg(a)
        }),
        "stream" => stream::StreamTrigger::from_config(config, bus.gate().clone(), client.timezone()).map(|s| {
            s.start();
            BuiltinTrigger::Stream(s)
        }),
        _ => return None,
    })
}

/// Start the built-in background worker named by `module`, or `None` when it is not a built-in.
/// Its progress goes to `feed` (`/metrics`).
pub fn bgworker(module: &str, name: &str, config: &serde_json::Value, client: &Client, feed: std::sync::Arc<crate::metrics::FeedStats>) -> Option<Result<feeder::FeederHandle, ContribError>> {
    Some(match module_name(module) {
        "gdaxfeeder" => gdaxfeeder::start(config, client.clone(), name, feed),
        "binancefeeder" => binancefeeder::start(config, client.clone(), name, feed),
        "bitmexfeeder" => bitmexfeeder::start(config, client.clone(), name, feed),
        "polygon" => polygon::start(config, client.clone(), name, feed),
        "alpaca" => alpaca::start(config, client.clone(), name, feed),
        "alpacabkfeeder" => alpacabkfeeder::start(config, client.clone(), name, feed),
        _ => return None,
    })
}
