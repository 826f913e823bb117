//! What every interface shares: the engine, the configuration, SQL, metrics and readiness.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::query::QueryEngine;

/// Server version reported to clients (MarketStore's `version` fields and the `Marketstore-Version` header).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Shared state of a running server, handed to every interface.
pub struct ServerContext {
    pub engine: Engine,
    pub config: Config,
    pub query: QueryEngine,
    pub metrics: Arc<Metrics>,
    ready: AtomicBool,
    pub started: Instant,
}

impl ServerContext {
    pub fn new(engine: Engine, config: Config) -> Arc<Self> {
        let query = QueryEngine::new(engine.clone(), config.tz());
        Arc::new(ServerContext { engine, config, query, metrics: Arc::new(Metrics::new()), ready: AtomicBool::new(false), started: Instant::now() })
    }

    /// True once start-up (replay, listeners, plugins) is complete and until shutdown begins.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, v: bool) {
        self.ready.store(v, Ordering::Release)
    }
}
