//! mkts: an Arrow-native market data server, successor to Alpaca's MarketStore.
//!
//! The crate is the server's composition: the storage [`engine`], the configuration, the interfaces
//! (Arrow Flight, MarketStore's JSON-RPC/gRPC/WebSocket, the JSON [`api`] behind the web [`console`]), SQL,
//! plugins and the CLI.
//! Each interface learns who is calling from [`auth`] (over [`tls`] when configured); [`replication`] keeps
//! read-only replicas in step with a master.
//! Data flows one way: interfaces → operations layer ([`service`]: policy, requests, one error type) →
//! engine (log → partitions) → trigger bus → plugins.

pub mod api;
pub mod auth;
pub mod backoff;
pub mod bus;
pub mod compat;
pub mod cli;
pub mod config;
pub mod console;
pub mod context;
pub mod contrib;
pub mod engine;
pub mod flight_backend;
pub mod flight_sql;
/// Entry points of the fuzz targets (`fuzz/`) and their replay test; not an API.
#[doc(hidden)]
pub mod fuzzing;
pub mod local;
pub mod metrics;
/// `mkts import-marketstore`: reads MarketStore's files; used only by the binary.
pub mod migrate;
pub mod plugins;
pub mod query;
pub mod replication;
pub mod server;
pub mod service;
pub mod timestr;
pub mod tls;
pub mod utilities;

/// Server version reported to clients (MarketStore's `version` fields, the `Marketstore-Version` header,
/// the plugin environment).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
