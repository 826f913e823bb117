//! The plugins compiled into mkts (`src/contrib`), behind the host's traits.
//!
//! They are looked up by short name (`ondiskagg.so` and `ondiskagg` are the same module), so MarketStore
//! configuration files keep working unchanged.

use std::time::Instant;

use super::{PluginError, TriggerPlugin, WorkerPlugin};
use crate::bus::Bus;
use crate::contrib::{self, feeder::FeederHandle, BuiltinTrigger};
use crate::engine::AppendEvent;
use crate::service::Client;

/// A built-in trigger with the runtime its background work runs on.
struct Builtin {
    trigger: BuiltinTrigger,
    rt: tokio::runtime::Handle,
}

impl TriggerPlugin for Builtin {
    fn fire(&mut self, ev: &AppendEvent) -> Result<(), PluginError> {
        // Never blocks: ondiskagg queues the time range for its own task, stream pushes or shelves the row.
        self.trigger.fire(ev);
        Ok(())
    }

    fn close(&mut self, deadline: Instant) {
        // ondiskagg: finish aggregating what was queued, so downsampled buckets match at restart.
        let left = deadline.saturating_duration_since(Instant::now());
        self.rt.block_on(self.trigger.drain(left));
    }
}

/// Start the built-in trigger `name` with its `config:` map. Must run inside the tokio runtime.
pub fn trigger(name: &str, config: &serde_json::Value, client: &Client, bus: &Bus) -> Result<Box<dyn TriggerPlugin>, PluginError> {
    match contrib::trigger(name, config, client, bus) {
        Some(Ok(trigger)) => Ok(Box::new(Builtin { trigger, rt: tokio::runtime::Handle::current() })),
        Some(Err(e)) => Err(PluginError::Start(e.to_string())),
        None => Err(PluginError::NotFound(format!("no built-in trigger {name:?}"))),
    }
}

struct BuiltinWorker(FeederHandle);

impl WorkerPlugin for BuiltinWorker {
    fn stop(self: Box<Self>, _deadline: Instant) {
        // The feeders check their stop flag between requests, each bounded by the HTTP client's timeout.
        self.0.stop();
    }
}

/// Start the built-in background worker `module` as `name`.
/// `feed` receives its progress counters (`/metrics`).
pub fn worker(module: &str, name: &str, config: &serde_json::Value, client: &Client, feed: std::sync::Arc<crate::metrics::FeedStats>) -> Result<Box<dyn WorkerPlugin>, PluginError> {
    match contrib::bgworker(module, name, config, client, feed) {
        Some(Ok(h)) => Ok(Box::new(BuiltinWorker(h))),
        Some(Err(e)) => Err(PluginError::Start(e.to_string())),
        None => Err(PluginError::NotFound(format!("no built-in worker {module:?}"))),
    }
}
