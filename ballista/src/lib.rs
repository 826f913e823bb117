//! Distributed SQL over mkts on Apache DataFusion Ballista.
//!
//! A Ballista cluster (one scheduler, any number of executors; `mkts-ballista scheduler|executor`) plans the
//! same SQL as an mkts server over the same catalog: the table names, `time_bucket`, `asof_join` and the
//! server's SQL settings. Cold years (Parquet objects in the tiering store) are scanned by the executors
//! straight from the store; hot years are fetched from the mkts server over Flight by a scan node that the
//! cluster's codecs ship to executors. Users submit SQL to the scheduler's Flight SQL endpoint (ADBC,
//! `mkts connect --ballista grpc://scheduler:50050`) or with a Ballista client that installs
//! [`codec::MktsLogicalCodec`] and [`codec::MktsPhysicalCodec`]. See `docs/scale-out.md`.
//!
//! ```no_run
//! # async fn demo() -> mkts_ballista::Result<()> {
//! use mkts_ballista::cluster::{run_scheduler, ClusterSettings, SchedulerOptions};
//! use mkts_ballista::remote::Remote;
//!
//! let settings = ClusterSettings::new(Remote::new("grpc://127.0.0.1:5995"), None)?;
//! let opts = SchedulerOptions { bind_host: "127.0.0.1".into(), port: 50050,
//!                               executor_timeout: std::time::Duration::from_secs(10), task_max_failures: 4 };
//! run_scheduler(settings, opts).await
//! # }
//! ```

pub mod cluster;
pub mod codec;
pub mod exec;
pub mod remote;
pub mod table;

/// The URL every cluster process registers its view of the tiering store under; cold-year scans name
/// their objects relative to it, so plans carry no store address or credentials.
pub const COLD_STORE_URL: &str = "mkts-cold://store";

/// Errors of the cluster's own parts (Ballista's and DataFusion's errors are carried as text).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    Remote(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("ballista: {0}")]
    Ballista(String),
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;
