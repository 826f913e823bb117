//! What every interface shares: the operations layer, the engine, the configuration, metrics and readiness.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::auth::Authenticator;
use crate::bus::Bus;
use crate::config::Config;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::replication::Replication;
use crate::service::{Access, Caller, Service, ServiceError};

pub use crate::VERSION;

/// The message of a read refused by `queryable: false` (the engine's own wording).
pub use crate::service::NOT_QUERYABLE;

/// Shared state of a running server, handed to every interface.
pub struct ServerContext {
    pub engine: Engine,
    pub config: Config,
    /// The operations every interface calls (reads, SQL, writes, catalog), policy checked there.
    pub service: Arc<Service>,
    pub metrics: Arc<Metrics>,
    /// Every subscription to appended data (triggers, `/ws`, Flight streams, trigger exchanges).
    pub bus: Arc<Bus>,
    /// The users of `auth:`; `None`: the server is open.
    pub auth: Option<Arc<Authenticator>>,
    /// Master, replica or neither (`replication:`).
    pub replication: Arc<Replication>,
    ready: AtomicBool,
    pub started: Instant,
    /// The bound socket of same-host reads (absolute path), once listening.
    pub local_socket: std::sync::OnceLock<std::path::PathBuf>,
}

impl ServerContext {
    /// Build the context of a just-opened engine (the event bus starts here, before anything can write,
    /// so it sees every append of this run). With `auth`, every operation needs an authenticated caller.
    pub fn new(engine: Engine, config: Config, auth: Option<Arc<Authenticator>>) -> Arc<Self> {
        let mut service = Service::new(engine.clone(), config.tz(), config.sql_memory_limit_mb.map(|mb| mb.saturating_mul(1 << 20)));
        if auth.is_some() {
            service = service.requiring_authentication();
        }
        let replication = Arc::new(Replication::new(&engine, config.replication.as_ref()));
        if replication.is_replica() {
            service = service.as_replica();
        }
        if let Some(gate) = replication.ack_gate() {
            service = service.with_ack_gate(gate);
        }
        let bus = Bus::new(engine.clone());
        Arc::new(ServerContext {
            engine,
            config,
            service: Arc::new(service),
            metrics: Arc::new(Metrics::new()),
            bus,
            auth,
            replication,
            ready: AtomicBool::new(false),
            started: Instant::now(),
            local_socket: std::sync::OnceLock::new(),
        })
    }

    /// `Ok` when `caller` may read: the operations layer's refusal under `queryable: false` or for the
    /// caller's role (for the `/ws` handler; other interfaces ask [`Service::authorize`] directly).
    pub fn check_queryable(&self, caller: &Caller) -> Result<(), ServiceError> {
        self.service.authorize(caller, Access::Read)
    }

    /// True once start-up (replay, listeners, plugins) is complete and until shutdown begins.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, v: bool) {
        self.ready.store(v, Ordering::Release)
    }
}
