//! The operations layer: what the server does, once, for every interface.
//!
//! Flight, Flight SQL, MarketStore's `/rpc` and gRPC, `/ws`, the plugin host and the CLI's embedded mode
//! decode their wire forms into the request types of [`request`], call a [`Service`] method with the
//! [`Caller`] they serve, and encode what comes back. Policy ([`policy`]) is checked here, once per
//! operation, against that caller; failures are one [`ServiceError`] type whose class each protocol maps
//! exactly once ([`error`]).
//!
//! Rooms: [`caller`] (who asks), [`client`] (the operations of one caller, handed to plugins), [`policy`] (what they may do), [`request`] (what they ask for),
//! [`read`] (reads, functions, SQL), [`write`] (durable writes), [`catalog`] (create, destroy, delete a
//! range, list, describe). The layer uses the engine and the SQL engine and nothing above them: it knows no
//! protocol, and no interface touches the engine for an operation this layer offers.

pub mod caller;
pub mod catalog;
pub mod client;
pub mod error;
pub mod policy;
pub mod read;
pub mod request;
pub mod write;

pub use caller::{Caller, Interface, Principal, Role};
pub use catalog::SymbolFormat;
pub use client::Client;
pub use error::{ErrorCode, ServiceError};
pub use policy::{Access, Policy, NOT_QUERYABLE, REPLICA_READ_ONLY, UNAUTHENTICATED};
pub use read::{ReadPart, ReadResult, SqlStream};
pub use request::{CreateRequest, QueryRequest, ReadRequest, WriteRequest};

use crate::engine::Engine;
use crate::query::QueryEngine;

/// The operations of a server (or of a data directory opened by the CLI): the engine, the SQL engine over
/// it, and the policy they run under.
pub struct Service {
    engine: Engine,
    query: QueryEngine,
    policy: Policy,
    /// `replication.ack: replica`: a change is acknowledged only once a replica holds it.
    ack_gate: Option<std::sync::Arc<dyn AckGate>>,
}

/// Wait until the change at `upto` (and every change before it) may be acknowledged under `gate`.
async fn acknowledged(engine: &Engine, gate: Option<&dyn AckGate>, upto: u64) -> Result<(), ServiceError> {
    match gate {
        None => Ok(()),
        Some(g) => g.wait(upto.max(engine.last_change_lsn())).await.map_err(|m| ServiceError::new(ErrorCode::Unavailable, m)),
    }
}

/// What a change waits for after it is durable here and before it is acknowledged to its caller
/// (`replication.ack: replica`: a replica's acknowledgement of every log position up to it).
pub trait AckGate: Send + Sync {
    /// Wait until the change at log position `lsn` may be acknowledged; `Err` says why it may not.
    fn wait(&self, lsn: u64) -> futures::future::BoxFuture<'_, Result<(), String>>;
    /// [`AckGate::wait`] for threads outside the async runtime (plugins, the CLI).
    fn wait_blocking(&self, lsn: u64) -> Result<(), String>;
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("policy", &self.policy).finish()
    }
}

impl Service {
    /// Operations over `engine` under the engine's policy. `tz` aligns MarketStore function bars (daily
    /// candles) to local time; `sql_memory_limit` bounds what SQL statements hold together (bytes; `None`:
    /// the default pool).
    pub fn new(engine: Engine, tz: chrono_tz::Tz, sql_memory_limit: Option<usize>) -> Service {
        let query = QueryEngine::with_memory_limit(engine.clone(), tz, sql_memory_limit);
        let policy = engine.policy().into();
        Service { engine, query, policy, ack_gate: None }
    }

    /// The same operations on a replica: every change is refused ([`REPLICA_READ_ONLY`]).
    pub fn as_replica(mut self) -> Service {
        self.policy.replica = true;
        self
    }

    /// The same operations, each change acknowledged only once `gate` allows it.
    pub fn with_ack_gate(mut self, gate: std::sync::Arc<dyn AckGate>) -> Service {
        self.ack_gate = Some(gate);
        self
    }

    /// Wait for the ack gate (if any) to allow acknowledging everything logged so far, `upto` at least.
    async fn acknowledged(&self, upto: u64) -> Result<(), ServiceError> {
        acknowledged(&self.engine, self.ack_gate.as_deref(), upto).await
    }

    fn acknowledged_blocking(&self, upto: u64) -> Result<(), ServiceError> {
        match &self.ack_gate {
            None => Ok(()),
            Some(g) => g.wait_blocking(upto.max(self.engine.last_change_lsn())).map_err(|m| ServiceError::new(ErrorCode::Unavailable, m)),
        }
    }

    /// The same operations, refusing every caller that has not authenticated (`auth:` configured).
    pub fn requiring_authentication(mut self) -> Service {
        self.policy.require_auth = true;
        self
    }

    /// The engine, for what is not an operation of a client: health, metrics, subscriptions of the
    /// event bus, shutdown.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The SQL engine, for Flight SQL's metadata calls (catalog listings, plan schemas).
    pub fn query_engine(&self) -> &QueryEngine {
        &self.query
    }

    /// The rules operations run under.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// `Ok` when `caller` may do `access`: for interfaces that serve something this layer does not
    /// produce (Flight SQL metadata, subscriptions) and must refuse it the same way.
    pub fn authorize(&self, caller: &Caller, access: Access<'_>) -> Result<(), ServiceError> {
        self.policy.check(caller, access)
    }

    /// `Ok` when `caller` is authenticated (if the server requires it) and its role covers `access`;
    /// the switches are not looked at ([`Policy::check_caller`]).
    pub fn authorize_caller(&self, caller: &Caller, access: Access<'_>) -> Result<(), ServiceError> {
        self.policy.check_caller(caller, access)
    }
}
