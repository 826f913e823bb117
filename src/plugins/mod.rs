//! The plugin host: MarketStore's two plugin roles (triggers and background workers) behind one pair of
//! traits, provided three ways.
//!
//! - **Built in** ([`builtin`]): the plugins compiled into mkts (`ondiskagg`, `stream`, `gdaxfeeder`,
//!   `binancefeeder`, `bitmexfeeder`, `polygon`, `alpaca`); `module: ondiskagg.so` names the same one as `module: ondiskagg`.
//! - **Shared library** ([`shared`]): a `cdylib` speaking the versioned C ABI of the `mkts-plugin-api` crate,
//!   loaded with libloading. Batches cross as Arrow C Data Interface structs, config as JSON. A panic is caught
//!   at the boundary and disables that plugin only.
//! - **Out-of-process** ([`process`]): an executable in any language, started with its config and the
//!   server's Flight address in its environment; a worker writes with DoPut, a trigger reads its appends
//!   over a Flight DoExchange and acknowledges them (at least once across its crashes). Supervised: output
//!   to the log, restarted with exponential backoff after a crash, stopped at shutdown.
//!
//! Triggers are fed from the engine's trigger bus: each has its own bounded subscription filtered by its
//! `on:` pattern and its own thread, so a slow or stuck trigger never delays a write acknowledgement (its
//! queue overflows instead, counted in `/metrics`). Triggers see appends made durable after start-up, from
//! every interface and from plugins; WAL replay at start-up does not fire them (the rows were seen, or
//! lost with the queue, before the restart).
//!
//! `module` resolution: an absolute path; else a file in `plugin_dir` (default `plugins/` beside the config
//! file); else a built-in. A missing or incompatible plugin is one error line and the server runs on.
//! The protocol for out-of-process plugins and how to write each kind: `docs/plugins.md`.

pub mod builtin;
pub mod process;
pub mod shared;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::context::ServerContext;
use crate::engine::{AppendEvent, KeyPattern};
use crate::metrics::PluginStats;
use crate::service::{Caller, Client, Interface, Principal};

pub use process::ServerAddrs;

/// Appends a trigger may have waiting before further ones are dropped (and counted).
pub const TRIGGER_QUEUE: usize = 4096;

/// What can go wrong with a plugin. None of it reaches a writer: the host logs it and counts it.
#[derive(Debug, Error)]
pub enum PluginError {
    /// `module` names nothing: not an absolute path, not in `plugin_dir`, not a built-in.
    #[error("{0}")]
    NotFound(String),
    /// The file is not an mkts plugin, has another ABI version, or lacks the role it is configured for.
    #[error("{0}")]
    Incompatible(String),
    /// The plugin refused its configuration or failed to start.
    #[error("{0}")]
    Start(String),
    /// One call failed; the plugin stays enabled.
    #[error("{0}")]
    Call(String),
    /// The plugin panicked or broke its contract; it is disabled.
    #[error("{0}")]
    Fatal(String),
}

/// A trigger, however provided: called with each durable append whose key matches its `on:` pattern.
///
/// The host calls it from the trigger's own thread, one append at a time, in commit order; it may block
/// (the appends wait in the trigger's queue meanwhile).
pub trait TriggerPlugin: Send {
    /// Handle rows just made durable in `ev.key`.
    fn fire(&mut self, ev: &AppendEvent) -> Result<(), PluginError>;
    /// Every queued append has been handed over (or the deadline passed): finish and release resources.
    fn close(&mut self, deadline: Instant) {
        let _ = deadline;
    }
}

/// A background worker, however provided: started with the server, runs on its own, stopped at shutdown.
pub trait WorkerPlugin: Send {
    /// Ask the worker to stop and wait for it, at most until `deadline`.
    fn stop(self: Box<Self>, deadline: Instant);
}

/// Where a `module` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A plugin compiled into mkts, by its short name (`ondiskagg`).
    Builtin(&'static str),
    /// A `cdylib` on the mkts-plugin-api C ABI.
    SharedLibrary(PathBuf),
    /// An executable file started as a supervised child process.
    Executable(PathBuf),
}

/// Which role a configuration entry asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Trigger,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Trigger => "trigger",
            Role::Worker => "worker",
        }
    }

    fn builtins(self) -> &'static [&'static str] {
        match self {
            Role::Trigger => crate::contrib::TRIGGERS,
            Role::Worker => crate::contrib::BGWORKERS,
        }
    }
}

/// Resolve `module` for `role`: an absolute path, then a file in `plugin_dir`, then a built-in.
///
/// ```
/// use mkts::plugins::{resolve, Role, Source};
/// let dir = std::path::Path::new("/nonexistent");
/// assert_eq!(resolve("ondiskagg.so", dir, Role::Trigger).unwrap(), Source::Builtin("ondiskagg"));
/// assert!(resolve("nope.so", dir, Role::Trigger).is_err());
/// ```
pub fn resolve(module: &str, plugin_dir: &Path, role: Role) -> Result<Source, PluginError> {
    let module = module.trim();
    if module.is_empty() {
        return Err(PluginError::NotFound("empty module".into()));
    }
    let path = Path::new(module);
    let builtin = || {
        let name = crate::contrib::module_name(module);
        role.builtins().iter().find(|b| **b == name).copied()
    };
    if path.is_absolute() {
        if path.exists() {
            return classify(path);
        }
        return Err(PluginError::NotFound(format!("module {module:?} not found: {} does not exist", path.display())));
    }
    let in_dir = plugin_dir.join(path);
    if in_dir.is_file() {
        return classify(&in_dir);
    }
    if let Some(b) = builtin() {
        return Ok(Source::Builtin(b));
    }
    Err(PluginError::NotFound(format!(
        "module {module:?} not found: not an absolute path, not in plugin_dir {}, and not a built-in {} ({})",
        plugin_dir.display(),
        role.as_str(),
        role.builtins().join(", ")
    )))
}

/// A shared library by its extension, else an executable file.
fn classify(path: &Path) -> Result<Source, PluginError> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if matches!(ext, "so" | "dylib" | "dll") {
        return Ok(Source::SharedLibrary(path.to_path_buf()));
    }
    let md = std::fs::metadata(path).map_err(|e| PluginError::NotFound(format!("{}: {e}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if md.is_file() && md.permissions().mode() & 0o111 != 0 {
            return Ok(Source::Executable(path.to_path_buf()));
        }
    }
    #[cfg(not(unix))]
    if md.is_file() {
        return Ok(Source::Executable(path.to_path_buf()));
    }
    Err(PluginError::Incompatible(format!(
        "{} is neither a shared library (.so) nor an executable file (chmod +x for a script)",
        path.display()
    )))
}

/// A resolved module, with a shared library already loaded (so a file that is no mkts plugin can still
/// fall back to the built-in of its name before anything is counted under the wrong kind).
enum Provider {
    Builtin(&'static str),
    Shared(shared::Library, PathBuf),
    Process(PathBuf),
}

impl Provider {
    fn load(source: Source, module: &str, role: Role) -> Result<Provider, PluginError> {
        Ok(match source {
            Source::Builtin(b) => Provider::Builtin(b),
            Source::Executable(p) => Provider::Process(p),
            Source::SharedLibrary(p) => match shared::Library::load(&p) {
                Ok(lib) => Provider::Shared(lib, p),
                Err(e) => Provider::Builtin(builtin_fallback(module, role, &e)?),
            },
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Provider::Builtin(_) => "builtin",
            Provider::Shared(..) => "shared_library",
            Provider::Process(_) => "process",
        }
    }
}

/// A running trigger: its thread, its stop signal and its counters.
struct TriggerSlot {
    stats: Arc<PluginStats>,
    stop: tokio::sync::watch::Sender<Option<Instant>>,
    done: std::sync::mpsc::Receiver<()>,
    /// For out-of-process triggers: the supervised process, stopped after the queue is drained.
    process: Option<process::Supervisor>,
}

/// A running worker.
struct WorkerSlot {
    stats: Arc<PluginStats>,
    worker: Box<dyn WorkerPlugin>,
}

/// Every plugin of a server's configuration, running. Built by [`PluginHost::start`], stopped by
/// [`PluginHost::shutdown`].
pub struct PluginHost {
    triggers: Vec<TriggerSlot>,
    workers: Vec<WorkerSlot>,
    addrs: ServerAddrs,
}

impl PluginHost {
    /// Start every configured trigger and worker. Must run inside the tokio runtime. A plugin that cannot
    /// start is one error line; the others (and the server) run on.
    pub fn start(ctx: &Arc<ServerContext>, addrs: ServerAddrs) -> PluginHost {
        let mut host = PluginHost { triggers: Vec::new(), workers: Vec::new(), addrs };
        for (i, t) in ctx.config.triggers.iter().enumerate() {
            let entry = format!("triggers[{i}]");
            if let Err(e) = host.start_trigger(ctx, &entry, t) {
                tracing::error!(entry, module = %t.module, "trigger not started: {e}");
            }
        }
        for (i, w) in ctx.config.bgworkers.iter().enumerate() {
            let entry = format!("bgworkers[{i}]");
            if let Err(e) = host.start_worker(ctx, &entry, w) {
                tracing::error!(entry, module = %w.module, name = %w.name, "worker not started: {e}");
            }
        }
        host
    }

    fn start_trigger(&mut self, ctx: &Arc<ServerContext>, entry: &str, t: &crate::config::TriggerConfig) -> Result<(), PluginError> {
        let (module, config) = (t.module.as_str(), &t.config);
        let on = if t.on.trim().is_empty() { "*/*/*" } else { t.on.trim() };
        let pattern = KeyPattern::parse(on).map_err(|e| PluginError::Start(format!("bad `on` pattern {on:?}: {e}")))?;
        let source = resolve(module, &ctx.config.plugin_dir, Role::Trigger)?;
        let name = format!("{entry}:{}", display_name(module));
        let identity = plugin_identity(ctx, &name, t.role);
        let provider = Provider::load(source, module, Role::Trigger)?;
        let kind = provider.kind();
        // Subscribe before anything else: appends acknowledged from here on reach this trigger.
        let queue = t.queue_size.unwrap_or(TRIGGER_QUEUE);
        let sub = ctx.bus.subscribe_trigger(pattern.clone(), queue);
        let mut stats = PluginStats::new("trigger", entry.to_string(), module.to_string(), kind);
        stats.dropped = sub.dropped.clone();
        stats.queued = Some(Box::new(sub.depth_probe()));
        let stats = Arc::new(stats);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(None);
        let mut process = None;
        let plugin: Box<dyn FnOnce() -> Result<Box<dyn TriggerPlugin>, PluginError> + Send> = match provider {
            Provider::Builtin(b) => {
                let t = builtin::trigger(b, config, &plugin_client(ctx, &identity), &ctx.bus)?;
                Box::new(move || Ok(t))
            }
            Provider::Shared(lib, path) => {
                if !lib.has_trigger() {
                    return Err(PluginError::Incompatible(format!("{} exports no trigger", path.display())));
                }
                let host = shared::HostState::new(plugin_client(ctx, &identity), name.clone());
                let config = config.to_string();
                Box::new(move || lib.create_trigger(&config, host).map(|t| Box::new(t) as Box<dyn TriggerPlugin>))
            }
            Provider::Process(path) => {
                let (t, sup) = process::trigger(&process_env(ctx, &identity), self.addrs, &path, &name, &pattern, config, stop_rx.clone(), stats.clone())?;
                process = Some(sup);
                Box::new(move || Ok(Box::new(t) as Box<dyn TriggerPlugin>))
            }
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let rt = tokio::runtime::Handle::current();
        let thread_stats = stats.clone();
        let thread_name = name.clone();
        std::thread::Builder::new()
            .name(format!("trigger {}", display_name(module)))
            .spawn(move || {
                run_trigger(&thread_name, plugin, sub, queue, stop_rx, &thread_stats, &rt);
                thread_stats.up.store(false, Ordering::Relaxed);
                let _ = done_tx.send(());
            })
            .map_err(|e| PluginError::Start(format!("cannot start a thread: {e}")))?;
        stats.up.store(true, Ordering::Relaxed);
        ctx.metrics.register_plugin(stats.clone());
        tracing::info!(entry, module, on, kind, queue, "trigger started");
        self.triggers.push(TriggerSlot { stats, stop: stop_tx, done: done_rx, process });
        Ok(())
    }

    fn start_worker(&mut self, ctx: &Arc<ServerContext>, entry: &str, w: &crate::config::BgWorkerConfig) -> Result<(), PluginError> {
        let (module, name, config) = (w.module.as_str(), w.name.as_str(), &w.config);
        let source = resolve(module, &ctx.config.plugin_dir, Role::Worker)?;
        let label = format!("{entry}:{name}");
        let identity = plugin_identity(ctx, &label, w.role);
        let provider = Provider::load(source, module, Role::Worker)?;
        let kind = provider.kind();
        let mut stats = PluginStats::new("worker", entry.to_string(), module.to_string(), kind);
        let feed = Arc::new(crate::metrics::FeedStats::default());
        if matches!(provider, Provider::Builtin(_)) {
            stats.feed = Some(feed.clone());
        }
        let stats = Arc::new(stats);
        let worker: Box<dyn WorkerPlugin> = match provider {
            Provider::Builtin(b) => builtin::worker(b, name, config, &plugin_client(ctx, &identity), feed)?,
            Provider::Shared(lib, path) => {
                if !lib.has_worker() {
                    return Err(PluginError::Incompatible(format!("{} exports no worker", path.display())));
                }
                let host = shared::HostState::new(plugin_client(ctx, &identity), label.clone());
                Box::new(lib.start_worker(&config.to_string(), host, stats.clone())?)
            }
            Provider::Process(path) => Box::new(process::worker(&process_env(ctx, &identity), self.addrs, &path, &label, name, config, stats.clone())?),
        };
        stats.up.store(true, Ordering::Relaxed);
        ctx.metrics.register_plugin(stats.clone());
        tracing::info!(entry, module, name, kind, "worker started");
        self.workers.push(WorkerSlot { stats, worker });
        Ok(())
    }

    /// Number of triggers and workers that started.
    pub fn len(&self) -> (usize, usize) {
        (self.triggers.len(), self.workers.len())
    }

    /// Stop every plugin: workers first (they write), then triggers get what is queued for them (until
    /// `timeout`), then out-of-process triggers are stopped.
    pub async fn shutdown(self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let PluginHost { triggers, workers, .. } = self;
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let entry = w.stats.entry.clone();
                w.worker.stop(deadline);
                w.stats.up.store(false, Ordering::Relaxed);
                tracing::info!(entry, "worker stopped");
            }
        })
        .await;
        for t in &triggers {
            let _ = t.stop.send(Some(deadline));
        }
        let triggers = tokio::task::spawn_blocking(move || {
            for t in &triggers {
                let left = deadline.saturating_duration_since(Instant::now());
                if t.done.recv_timeout(left).is_err() {
                    tracing::warn!(entry = %t.stats.entry, "trigger did not finish its queue before the shutdown deadline");
                } else {
                    tracing::info!(entry = %t.stats.entry, "trigger stopped");
                }
            }
            triggers
        })
        .await
        .unwrap_or_default();
        for mut t in triggers {
            if let Some(p) = t.process.take() {
                p.stop().await;
            }
        }
    }
}

/// A MarketStore install may keep its Go `ondiskagg.so` in the plugin directory: that file is no mkts plugin,
/// but the name still means the built-in. Other load failures stand.
fn builtin_fallback(module: &str, role: Role, load_error: &PluginError) -> Result<&'static str, PluginError> {
    let name = crate::contrib::module_name(module);
    match role.builtins().iter().find(|b| **b == name) {
        Some(b) => {
            tracing::warn!(module, "{load_error}; using the built-in {b} instead");
            Ok(b)
        }
        None => Err(PluginError::Incompatible(load_error.to_string())),
    }
}

/// Who a plugin acts as: with `auth:`, a principal named by its entry (`bgworkers[0]:feed`) with the role
/// its entry gives it (`role:`, default `read_write`); without, anonymous like every caller.
fn plugin_identity(ctx: &ServerContext, label: &str, role: crate::service::Role) -> Option<Principal> {
    ctx.auth.as_ref().map(|_| Principal { user: label.to_string(), role })
}

/// What an in-process plugin (built-in or shared library) works through: the operations layer as the plugin
/// interface, never the engine or the rest of the server.
fn plugin_client(ctx: &ServerContext, identity: &Option<Principal>) -> Client {
    let caller = match identity {
        Some(p) => Caller::authenticated(Interface::Plugin, p.clone()),
        None => Caller::anonymous(Interface::Plugin),
    };
    Client::new(ctx.service.clone(), caller)
}

/// The narrow handles out-of-process plugins are started with: the bus's trigger streams, and, with
/// `auth:` or `tls:`, the credentials and CA they connect back with.
fn process_env(ctx: &ServerContext, identity: &Option<Principal>) -> process::ProcessEnv {
    let auth_header = match (&ctx.auth, identity) {
        (Some(a), Some(p)) => Some(format!("Bearer {}", a.plugin_token(&p.user, p.role))),
        _ => None,
    };
    let tls_root_certs = ctx.config.tls.as_ref().map(|t| t.ca_file.clone().unwrap_or_else(|| t.cert_file.clone()));
    process::ProcessEnv { streams: ctx.bus.trigger_streams().clone(), config_dir: ctx.config.base_dir.clone(), auth_header, tls_root_certs }
}

/// The short name of a module for logs and thread names: the file name.
fn display_name(module: &str) -> &str {
    module.rsplit('/').next().unwrap_or(module)
}

/// A trigger's thread: build the plugin, then hand it every queued append until shutdown; at shutdown hand
/// it what is still queued (until the deadline) and close it.
fn run_trigger(
    name: &str,
    make: Box<dyn FnOnce() -> Result<Box<dyn TriggerPlugin>, PluginError> + Send>,
    mut sub: crate::engine::Subscription,
    queue: usize,
    mut stop: tokio::sync::watch::Receiver<Option<Instant>>,
    stats: &PluginStats,
    rt: &tokio::runtime::Handle,
) {
    let mut plugin = match catch_unwind(AssertUnwindSafe(make)) {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(trigger = name, "trigger not started: {e}");
            return;
        }
        Err(p) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(trigger = name, "trigger panicked while starting and is disabled: {}", mkts_plugin_api::panic_message(p.as_ref()));
            return;
        }
    };
    let mut reported_drops = 0;
    let deadline = loop {
        let next = rt.block_on(async {
            tokio::select! {
                biased;
                ev = sub.rx.recv() => Ok(ev),
                _ = stop.wait_for(|d| d.is_some()) => Err(()),
            }
        });
        match next {
            Ok(Some(ev)) => {
                if !deliver(name, plugin.as_mut(), &ev, stats) {
                    return;
                }
                let d = sub.dropped.load(Ordering::Relaxed);
                if d > reported_drops {
                    tracing::warn!(trigger = name, "trigger fell behind: {} appends dropped (queue of {queue} full)", d - reported_drops);
                    reported_drops = d;
                }
            }
            Ok(None) => break Instant::now(),
            Err(()) => break stop.borrow().unwrap_or_else(Instant::now),
        }
    };
    // Shutdown: what was acknowledged before it still reaches the trigger, within the deadline.
    while Instant::now() < deadline {
        match sub.rx.try_recv() {
            Ok(ev) => {
                if !deliver(name, plugin.as_mut(), &ev, stats) {
                    return;
                }
            }
            Err(_) => break,
        }
    }
    let left = sub.rx.len();
    if left > 0 {
        tracing::warn!(trigger = name, undelivered = left, "shutdown deadline passed with appends still queued for the trigger; they are not delivered");
    }
    drop(sub);
    if catch_unwind(AssertUnwindSafe(|| plugin.close(deadline))).is_err() {
        tracing::error!(trigger = name, "trigger panicked while closing");
    }
}

/// Fire one append; false when the plugin is now disabled.
fn deliver(name: &str, plugin: &mut dyn TriggerPlugin, ev: &AppendEvent, stats: &PluginStats) -> bool {
    stats.fired.fetch_add(1, Ordering::Relaxed);
    match catch_unwind(AssertUnwindSafe(|| plugin.fire(ev))) {
        Ok(Ok(())) => true,
        Ok(Err(PluginError::Fatal(e))) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(trigger = name, key = %ev.key, "trigger disabled: {e}");
            false
        }
        Ok(Err(e)) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(trigger = name, key = %ev.key, "trigger failed: {e}");
            true
        }
        Err(p) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(trigger = name, key = %ev.key, "trigger panicked and is disabled: {}", mkts_plugin_api::panic_message(p.as_ref()));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_order() {
        let dir = tempfile::tempdir().unwrap();
        // Built-ins by either name; a role's built-ins only.
        assert_eq!(resolve("ondiskagg", dir.path(), Role::Trigger).unwrap(), Source::Builtin("ondiskagg"));
        assert_eq!(resolve("stream.so", dir.path(), Role::Trigger).unwrap(), Source::Builtin("stream"));
        assert_eq!(resolve("gdaxfeeder.so", dir.path(), Role::Worker).unwrap(), Source::Builtin("gdaxfeeder"));
        assert!(matches!(resolve("gdaxfeeder.so", dir.path(), Role::Trigger), Err(PluginError::NotFound(_))));
        // A file in plugin_dir wins over a built-in of the same name.
        let so = dir.path().join("ondiskagg.so");
        std::fs::write(&so, b"not really").unwrap();
        assert_eq!(resolve("ondiskagg.so", dir.path(), Role::Trigger).unwrap(), Source::SharedLibrary(so.clone()));
        // Absolute paths; executables; plain files are refused.
        assert_eq!(resolve(so.to_str().unwrap(), Path::new("/x"), Role::Trigger).unwrap(), Source::SharedLibrary(so));
        let script = dir.path().join("feed.py");
        std::fs::write(&script, b"#!/usr/bin/env python3\n").unwrap();
        assert!(matches!(resolve("feed.py", dir.path(), Role::Worker), Err(PluginError::Incompatible(_))));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(resolve("feed.py", dir.path(), Role::Worker).unwrap(), Source::Executable(script));
        let e = resolve("/no/such/plugin.so", dir.path(), Role::Trigger).unwrap_err().to_string();
        assert!(e.contains("/no/such/plugin.so does not exist"), "{e}");
    }
}
