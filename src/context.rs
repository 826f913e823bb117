//! What every interface shares: the engine, the configuration, SQL, metrics and readiness.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::bus::Bus;
use crate::config::Config;
use crate::engine::{Engine, EngineError};
use crate::metrics::Metrics;
use crate::query::QueryEngine;

pub use crate::VERSION;

/// The message of a read refused by `queryable: false` (the engine's own wording).
pub const NOT_QUERYABLE: &str = "server is not queryable";

/// Shared state of a running server, handed to every interface.
pub struct ServerContext {
    pub engine: Engine,
    pub config: Config,
    pub query: QueryEngine,
    pub metrics: Arc<Metrics>,
    /// Every subscription to appended data (triggers, `/ws`, Flight streams, trigger exchanges).
    pub bus: Arc<Bus>,
    ready: AtomicBool,
    pub started: Instant,
}

impl ServerContext {
    /// Build the context of a just-opened engine (the event bus starts here, before anything can write,
    /// so it sees every append of this run).
    pub fn new(engine: Engine, config: Config) -> Arc<Self> {
        let query = QueryEngine::with_memory_limit(engine.clone(), config.tz(), config.sql_memory_limit_mb.map(|mb| mb.saturating_mul(1 << 20)));
        let bus = Bus::new(engine.clone());
        Arc::new(ServerContext { engine, config, query, metrics: Arc::new(Metrics::new()), bus, ready: AtomicBool::new(false), started: Instant::now() })
    }

    /// `Ok` when reads are allowed; the one refusal every read, listing and subscription path gives
    /// under `queryable: false` (writes are governed by `enable_add` / `enable_remove` only).
    pub fn check_queryable(&self) -> Result<(), EngineError> {
        if self.engine.policy().queryable {
            Ok(())
        } else {
            Err(EngineError::NotAllowed(NOT_QUERYABLE.into()))
        }
    }

    /// True once start-up (replay, listeners, plugins) is complete and until shutdown begins.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, v: bool) {
        self.ready.store(v, Ordering::Release)
    }
}
