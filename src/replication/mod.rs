//! Replication: one master, any number of read-only replicas, MarketStore's `replication:` keys.
//!
//! MarketStore ships raw WAL transaction groups and forgets a replica that was away. mkts ships logical
//! changes ([`crate::engine::Change`]) with their master log positions over one bidirectional gRPC stream
//! per replica (`mkts.replication.Replication/Follow`, `proto/replication.proto`) on the master's
//! `listen_port` (5996). A replica resumes from the position it holds, or takes an image of every bucket
//! when the master no longer keeps what follows it ([`master`]); it applies through its own engine, so
//! the position is durable with each change ([`replica`]). Everything replicates: writes, bulk appends,
//! creates, destroys, range deletes (SQL `DELETE` and retention included).
//!
//! Rooms: [`master`] (the stream, acknowledgements, `ack: replica` waits), [`replica`] (the follower
//! loop), [`wire`] (changes to messages), [`pb`] (generated from the proto, committed).

#[allow(clippy::all, missing_docs)]
pub mod pb;
pub mod master;
pub mod replica;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

pub use master::{Master, ReplicaStatus};
pub use replica::{Follower, FollowerStatus};

use crate::config::{ReplicationAck, ReplicationConfig};
use crate::engine::Engine;

/// Largest replication message either side accepts (a write is at most the engine's write limit).
pub const MAX_MESSAGE: usize = 1200 << 20;

/// What this server is, replication-wise.
pub enum Replication {
    Standalone,
    Master { master: Arc<Master>, cfg: ReplicationConfig },
    Replica { follower: Arc<Follower>, cfg: ReplicationConfig },
}

impl Replication {
    /// From the configuration (nothing starts here: [`crate::server`] binds the port or runs the loop).
    pub fn new(engine: &Engine, cfg: Option<&ReplicationConfig>) -> Replication {
        match cfg {
            Some(c) if c.enabled => Replication::Master { master: Master::new(engine.clone()), cfg: c.clone() },
            Some(c) if c.is_replica() => Replication::Replica { follower: Follower::new(engine.clone(), c.clone()), cfg: c.clone() },
            _ => Replication::Standalone,
        }
    }

    pub fn is_replica(&self) -> bool {
        matches!(self, Replication::Replica { .. })
    }

    /// The `replication_status` action's answer.
    pub fn status_json(&self, engine: &Engine) -> serde_json::Value {
        match self {
            Replication::Standalone => json!({ "role": "standalone", "store_id": engine.store_id() }),
            Replication::Master { master, cfg } => json!({
                "role": "master",
                "store_id": engine.store_id(),
                "position": engine.last_change_lsn(),
                "ack": match cfg.ack { ReplicationAck::Local => "local", ReplicationAck::Replica => "replica" },
                "replicas": master.status(),
            }),
            Replication::Replica { follower, .. } => json!({
                "role": "replica",
                "store_id": engine.store_id(),
                "replica": follower.status(),
            }),
        }
    }

    /// The replication links for `/metrics`.
    pub fn samples(&self) -> Vec<crate::metrics::ReplicationSample> {
        use crate::metrics::ReplicationSample;
        match self {
            Replication::Standalone => Vec::new(),
            Replication::Master { master, .. } => master
                .status()
                .into_iter()
                .map(|r| ReplicationSample {
                    peer: r.name,
                    connected: r.connected,
                    position: r.acked_position,
                    lag_records: r.lag_records,
                    lag_seconds: r.lag_ms as f64 / 1000.0,
                })
                .collect(),
            Replication::Replica { follower, .. } => {
                let s = follower.status();
                vec![ReplicationSample {
                    peer: s.master_host,
                    connected: s.connected,
                    position: s.applied_position,
                    lag_records: s.lag_records,
                    lag_seconds: s.lag_ms as f64 / 1000.0,
                }]
            }
        }
    }

    /// The `ack: replica` gate for the operations layer, if this server needs one (call inside the
    /// server's runtime).
    pub fn ack_gate(&self) -> Option<Arc<dyn crate::service::AckGate>> {
        match self {
            Replication::Master { master, cfg } if cfg.ack == ReplicationAck::Replica => {
                let runtime = tokio::runtime::Handle::try_current().ok()?;
                Some(Arc::new(ReplicaAck { master: master.clone(), timeout: cfg.ack_timeout, runtime }))
            }
            _ => None,
        }
    }
}

/// `ack: replica` as the operations layer sees it.
struct ReplicaAck {
    master: Arc<Master>,
    timeout: Duration,
    /// The server's runtime: blocking waits (plugin threads) need its timers.
    runtime: tokio::runtime::Handle,
}

impl crate::service::AckGate for ReplicaAck {
    fn wait(&self, lsn: u64) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(self.master.wait_replicated(lsn, self.timeout))
    }

    fn wait_blocking(&self, lsn: u64) -> Result<(), String> {
        let _in_runtime = self.runtime.enter();
        futures::executor::block_on(self.master.wait_replicated(lsn, self.timeout))
    }
}
