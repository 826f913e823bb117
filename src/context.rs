//! What every interface shares: the operations layer, the engine, the configuration, metrics and readiness.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::service::{Access, Caller, Interface, Service, ServiceError};

/// Server version reported to clients (MarketStore's `version` fields and the `Marketstore-Version` header).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The message of a read refused by `queryable: false` (the engine's own wording).
pub use crate::service::NOT_QUERYABLE;

/// Shared state of a running server, handed to every interface.
pub struct ServerContext {
    pub engine: Engine,
    pub config: Config,
    /// The operations every interface calls (reads, SQL, writes, catalog), policy checked there.
    pub service: Service,
    pub metrics: Arc<Metrics>,
    /// Rows the `stream` trigger decided to push; `/ws` and Flight stream subscriptions read it when a
    /// `stream` trigger is configured ([`ServerContext::streams_gated`]).
    pub stream: Arc<crate::contrib::stream::StreamHub>,
    /// Delivery streams of out-of-process triggers, opened by the Flight service for their tickets.
    pub trigger_streams: Arc<crate::plugins::TriggerStreams>,
    ready: AtomicBool,
    pub started: Instant,
}

impl ServerContext {
    pub fn new(engine: Engine, config: Config) -> Arc<Self> {
        let service = Service::new(engine.clone(), config.tz(), config.sql_memory_limit_mb.map(|mb| mb.saturating_mul(1 << 20)));
        Arc::new(ServerContext { engine, config, service, metrics: Arc::new(Metrics::new()), stream: Arc::default(), trigger_streams: Arc::default(), ready: AtomicBool::new(false), started: Instant::now() })
    }

    /// True when a `stream` trigger is configured: subscribers then receive what it pushes (gated, shelved,
    /// filtered) instead of every append.
    pub fn streams_gated(&self) -> bool {
        self.config.triggers.iter().any(|t| crate::contrib::module_name(&t.module) == "stream")
    }

    /// `Ok` when an anonymous `/ws` client may read: the operations layer's refusal under `queryable:
    /// false` (kept for the `/ws` handler; other interfaces ask [`Service::authorize`] with their caller).
    pub fn check_queryable(&self) -> Result<(), ServiceError> {
        self.service.authorize(&Caller::anonymous(Interface::Ws), Access::Read)
    }

    /// True once start-up (replay, listeners, plugins) is complete and until shutdown begins.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, v: bool) {
        self.ready.store(v, Ordering::Release)
    }
}
