//! Out-of-process plugins: one executable per plugin, in any language, talking Arrow Flight to the server.
//!
//! The host starts the executable with everything it needs in its environment (`MKTS_PLUGIN_*`,
//! `MKTS_FLIGHT_ADDR`, …; the full protocol is in `docs/plugins.md`). A worker writes with DoPut like any
//! client. A trigger does DoGet with the ticket in `MKTS_TRIGGER_TICKET` and receives the appends queued for
//! it: one Flight stream of batches of one schema, each batch's `app_metadata` naming its key; before an
//! append of another schema the stream ends and the plugin asks again.
//!
//! [`Supervisor`] runs the process: stdout and stderr go to the server log line by line, an exit other than
//! a clean one restarts it after an exponential backoff (0.5 s doubling to 30 s, reset after 30 s of
//! uptime), and shutdown sends SIGTERM, then SIGKILL after 5 s. On Linux the child also gets SIGTERM if the
//! server dies, so no plugin outlives it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use futures::stream::BoxStream;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};

use super::{PluginError, TriggerPlugin, WorkerPlugin};
use crate::context::ServerContext;
use crate::engine::{AppendEvent, KeyPattern};
use crate::metrics::PluginStats;

/// First restart delay; doubles per consecutive crash.
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A process that ran this long before exiting starts its backoff over.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// Between SIGTERM and SIGKILL at shutdown.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// The addresses out-of-process plugins are given, as bound (a port configured as 0 is resolved).
#[derive(Debug, Clone, Copy)]
pub struct ServerAddrs {
    pub http: SocketAddr,
    pub flight: Option<SocketAddr>,
}

impl ServerAddrs {
    fn local(a: SocketAddr) -> SocketAddr {
        // A wildcard listener is reached on loopback by a child process.
        if a.ip().is_unspecified() { SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), a.port()) } else { a }
    }
}

/// The delivery side of one out-of-process trigger: the trigger's thread pushes appends in, the Flight
/// stream opened with the trigger's ticket takes them out.
struct Bridge {
    tx: mpsc::Sender<Arc<AppendEvent>>,
    rx: Arc<tokio::sync::Mutex<BridgeRx>>,
}

struct BridgeRx {
    rx: mpsc::Receiver<Arc<AppendEvent>>,
    /// An append of another schema than the stream that just ended: the next stream starts with it.
    pending: Option<Arc<AppendEvent>>,
}

/// The trigger streams of the running out-of-process triggers, by ticket secret. The Flight service opens
/// them for DoGet `{"trigger": secret}`.
#[derive(Default)]
pub struct TriggerStreams {
    bridges: parking_lot::Mutex<HashMap<String, Arc<Bridge>>>,
}

impl TriggerStreams {
    /// The stream of the trigger holding `secret`: its appends, all of one schema, as `(key, batch)`.
    /// Waits up to 10 s for a previous stream of the same trigger to be dropped (a restarted process
    /// reconnecting before the server noticed the old connection is gone).
    pub async fn open(&self, secret: &str) -> Result<BoxStream<'static, (String, RecordBatch)>, String> {
        let bridge = self.bridges.lock().get(secret).cloned().ok_or_else(|| "unknown trigger ticket".to_string())?;
        let guard = tokio::time::timeout(Duration::from_secs(10), bridge.rx.clone().lock_owned())
            .await
            .map_err(|_| "this trigger's stream is already open elsewhere".to_string())?;
        let s = futures::stream::unfold((guard, None::<SchemaRef>), |(mut g, schema)| async move {
            let ev = match g.pending.take() {
                Some(ev) => ev,
                None => g.rx.recv().await?,
            };
            let ev_schema = ev.batch.schema();
            if let Some(s) = &schema
                && s.fields() != ev_schema.fields()
            {
                g.pending = Some(ev);
                return None;
            }
            Some(((ev.key.to_string(), ev.batch.clone()), (g, Some(ev_schema))))
        });
        Ok(Box::pin(s))
    }

    fn insert(&self, secret: String, bridge: Arc<Bridge>) {
        self.bridges.lock().insert(secret, bridge);
    }

    fn remove(&self, secret: &str) {
        self.bridges.lock().remove(secret);
    }
}

/// An out-of-process trigger as the host's trigger thread sees it: `fire` hands the append to the
/// process's stream, waiting while the process is busy or restarting (appends queue up meanwhile).
pub struct ProcessTrigger {
    bridge: Arc<Bridge>,
    stop: watch::Receiver<Option<Instant>>,
    rt: tokio::runtime::Handle,
    streams: Arc<TriggerStreams>,
    secret: String,
}

impl TriggerPlugin for ProcessTrigger {
    fn fire(&mut self, ev: &AppendEvent) -> Result<(), PluginError> {
        let ev = Arc::new(ev.clone());
        let (tx, mut stop) = (self.bridge.tx.clone(), self.stop.clone());
        self.rt.block_on(async move {
            let send = tx.send(ev);
            tokio::pin!(send);
            loop {
                let deadline = *stop.borrow_and_update();
                match deadline {
                    Some(d) => {
                        return match tokio::time::timeout_at(d.into(), send).await {
                            Ok(r) => r.map_err(|_| PluginError::Call("trigger stream closed".into())),
                            Err(_) => Err(PluginError::Call("not delivered: the process did not read it before the shutdown deadline".into())),
                        };
                    }
                    None => tokio::select! {
                        r = &mut send => return r.map_err(|_| PluginError::Call("trigger stream closed".into())),
                        _ = stop.changed() => continue,
                    },
                }
            }
        })
    }

    fn close(&mut self, _deadline: Instant) {
        self.streams.remove(&self.secret);
    }
}

/// Prepare an out-of-process trigger: the delivery bridge and the supervised process.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename the same eight things
pub fn trigger(
    ctx: &Arc<ServerContext>,
    addrs: ServerAddrs,
    path: &Path,
    label: &str,
    on: &KeyPattern,
    config: &serde_json::Value,
    stop: watch::Receiver<Option<Instant>>,
    stats: Arc<PluginStats>,
) -> Result<(ProcessTrigger, Supervisor), PluginError> {
    let flight = addrs.flight.ok_or_else(|| PluginError::Start("out-of-process plugins need the Flight port (grpc_listen_port)".into()))?;
    let secret = secret()?;
    let (tx, rx) = mpsc::channel(1);
    let bridge = Arc::new(Bridge { tx, rx: Arc::new(tokio::sync::Mutex::new(BridgeRx { rx, pending: None })) });
    ctx.trigger_streams.insert(secret.clone(), bridge.clone());
    let ticket = serde_json::json!({ "trigger": secret }).to_string();
    let env = vec![
        ("MKTS_PLUGIN_ROLE".to_string(), "trigger".to_string()),
        ("MKTS_PLUGIN_NAME".to_string(), label.to_string()),
        ("MKTS_PLUGIN_ON".to_string(), on.to_string()),
        ("MKTS_TRIGGER_TICKET".to_string(), ticket),
    ];
    let spec = Spec { path: path.to_path_buf(), label: label.to_string(), env: base_env(ctx, addrs, flight, config, env), restart_clean_exit: true };
    let sup = Supervisor::start(spec, stats);
    let t = ProcessTrigger { bridge, stop, rt: tokio::runtime::Handle::current(), streams: ctx.trigger_streams.clone(), secret };
    Ok((t, sup))
}

/// An out-of-process background worker.
pub struct ProcessWorker {
    supervisor: Supervisor,
    rt: tokio::runtime::Handle,
}

impl WorkerPlugin for ProcessWorker {
    fn stop(self: Box<Self>, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now()).max(TERM_GRACE);
        let sup = self.supervisor;
        self.rt.block_on(async move {
            let _ = tokio::time::timeout(left + Duration::from_secs(1), sup.stop()).await;
        });
    }
}

/// Start an out-of-process background worker named `name`.
pub fn worker(
    ctx: &Arc<ServerContext>,
    addrs: ServerAddrs,
    path: &Path,
    label: &str,
    name: &str,
    config: &serde_json::Value,
    stats: Arc<PluginStats>,
) -> Result<ProcessWorker, PluginError> {
    let flight = addrs.flight.ok_or_else(|| PluginError::Start("out-of-process plugins need the Flight port (grpc_listen_port)".into()))?;
    let env = vec![("MKTS_PLUGIN_ROLE".to_string(), "worker".to_string()), ("MKTS_PLUGIN_NAME".to_string(), name.to_string())];
    let spec = Spec { path: path.to_path_buf(), label: label.to_string(), env: base_env(ctx, addrs, flight, config, env), restart_clean_exit: false };
    Ok(ProcessWorker { supervisor: Supervisor::start(spec, stats), rt: tokio::runtime::Handle::current() })
}

fn base_env(ctx: &ServerContext, addrs: ServerAddrs, flight: SocketAddr, config: &serde_json::Value, mut env: Vec<(String, String)>) -> Vec<(String, String)> {
    let flight = ServerAddrs::local(flight);
    env.push(("MKTS_PLUGIN_CONFIG".into(), config.to_string()));
    env.push(("MKTS_FLIGHT_ADDR".into(), format!("grpc://{flight}")));
    env.push(("MKTS_HTTP_ADDR".into(), format!("http://{}", ServerAddrs::local(addrs.http))));
    env.push(("MKTS_PLUGIN_ABI".into(), "1".into()));
    env.push(("MKTS_VERSION".into(), crate::context::VERSION.into()));
    env.push(("MKTS_CONFIG_DIR".into(), ctx.config.base_dir.display().to_string()));
    env
}

/// A random ticket secret: only the process the host started can read its trigger's stream.
fn secret() -> Result<String, PluginError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| PluginError::Start(format!("no randomness for the trigger ticket: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// How to run one plugin process.
struct Spec {
    path: PathBuf,
    label: String,
    env: Vec<(String, String)>,
    /// Triggers run until stopped, so any exit is restarted; a worker exiting 0 has finished its job.
    restart_clean_exit: bool,
}

/// A supervised plugin process (restarted after crashes until [`Supervisor::stop`]).
pub struct Supervisor {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Supervisor {
    fn start(spec: Spec, stats: Arc<PluginStats>) -> Supervisor {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(supervise(spec, stats, rx));
        Supervisor { stop, task }
    }

    /// Stop the process (SIGTERM, SIGKILL after 5 s) and end supervision.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn supervise(spec: Spec, stats: Arc<PluginStats>, mut stop: watch::Receiver<bool>) {
    let plugin = spec.label.as_str();
    let mut crashes: u32 = 0;
    loop {
        let stopped = *stop.borrow();
        if stopped {
            return;
        }
        let started = Instant::now();
        let exit = match spawn(&spec) {
            Err(e) => {
                tracing::error!(plugin, "cannot start {}: {e}", spec.path.display());
                None
            }
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                stats.up.store(true, Ordering::Relaxed);
                tracing::info!(plugin, pid, path = %spec.path.display(), "plugin process started");
                forward_output(&mut child, plugin);
                let status = tokio::select! {
                    status = child.wait() => Some(status),
                    _ = stop.wait_for(|s| *s) => None,
                };
                if status.is_none() {
                    terminate(&mut child, pid).await;
                    stats.up.store(false, Ordering::Relaxed);
                    tracing::info!(plugin, pid, "plugin process stopped");
                    return;
                }
                status
            }
        };
        stats.up.store(false, Ordering::Relaxed);
        match exit {
            Some(Ok(st)) if st.success() && !spec.restart_clean_exit => {
                tracing::info!(plugin, "plugin process finished (exit status 0)");
                return;
            }
            Some(Ok(st)) => tracing::warn!(plugin, "plugin process exited ({st})"),
            Some(Err(e)) => tracing::warn!(plugin, "lost the plugin process: {e}"),
            None => {}
        }
        stats.errors.fetch_add(1, Ordering::Relaxed);
        if started.elapsed() >= HEALTHY_AFTER {
            crashes = 0;
        }
        let delay = BACKOFF_START.saturating_mul(1u32 << crashes.min(6)).min(BACKOFF_MAX);
        crashes = crashes.saturating_add(1);
        tracing::warn!(plugin, "restarting in {:.1}s", delay.as_secs_f64());
        let stopped = tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopped {
            return;
        }
        stats.restarts.fetch_add(1, Ordering::Relaxed);
    }
}

fn spawn(spec: &Spec) -> std::io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&spec.path);
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = spec.env.iter().find(|(k, _)| k == "MKTS_CONFIG_DIR").map(|(_, v)| v) {
        cmd.current_dir(dir);
    }
    #[cfg(unix)]
    {
        // Its own process group: a Ctrl-C at the server's terminal reaches the server, which then stops the
        // plugin in order, instead of reaching both at once.
        cmd.process_group(0);
    }
    #[cfg(target_os = "linux")]
    unsafe {
        // If the server dies without stopping it, the plugin gets SIGTERM rather than living on.
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
}

/// Copy the child's stdout (info) and stderr (warn) to the server log, one line per event.
fn forward_output(child: &mut tokio::process::Child, plugin: &str) {
    if let Some(out) = child.stdout.take() {
        let plugin = plugin.to_string();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                tracing::info!(plugin, "{l}");
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        let plugin = plugin.to_string();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                tracing::warn!(plugin, "{l}");
            }
        });
    }
}

/// SIGTERM, then SIGKILL if it has not exited after [`TERM_GRACE`].
async fn terminate(child: &mut tokio::process::Child, pid: u32) {
    #[cfg(unix)]
    if pid > 0 {
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        if tokio::time::timeout(TERM_GRACE, child.wait()).await.is_ok() {
            return;
        }
        tracing::warn!(pid, "plugin process ignored SIGTERM for {}s; killing it", TERM_GRACE.as_secs());
    }
    let _ = child.kill().await;
}
