//! Out-of-process plugins: one executable per plugin, in any language, talking Arrow Flight to the server.
//!
//! The host starts the executable with everything it needs in its environment (`MKTS_PLUGIN_*`,
//! `MKTS_FLIGHT_ADDR`, …; the full protocol is in `docs/plugins.md`). A worker writes with DoPut like any
//! client. A trigger opens a DoExchange whose descriptor command is the ticket in `MKTS_TRIGGER_TICKET` and
//! receives the appends queued for it (the bus's [`TriggerStreams`]): batches of one schema, each batch's
//! `app_metadata` naming its key and log position;
//! it answers each handled batch with `{"ack": 1}`. Before an append of another schema the exchange ends
//! and the plugin opens the next. Batches unacknowledged when a process dies are delivered again to its
//! successor: delivery is at least once.
//!
//! [`Supervisor`] runs the process: stdout and stderr go to the server log line by line, an exit other than
//! a clean one restarts it after an exponential backoff (0.5 s doubling to 30 s, reset after 30 s of
//! uptime), and shutdown sends SIGTERM, then SIGKILL after 5 s. On Linux the child also gets SIGTERM if the
//! server dies, so no plugin outlives it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use super::{PluginError, TriggerPlugin, WorkerPlugin};
use crate::backoff::Backoff;
use crate::bus::{TriggerFeed, TriggerStreams};
use crate::engine::{AppendEvent, KeyPattern};
use crate::metrics::PluginStats;

/// Restart delays: 0.5 s doubling per consecutive crash, at most 30 s.
const RESTART_BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
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

/// An out-of-process trigger as the host's trigger thread sees it: `fire` hands the append to the
/// process's stream, waiting while the process is busy or restarting (appends queue up meanwhile); `close`
/// waits until the process has acknowledged everything it was handed, so stopping it loses nothing.
pub struct ProcessTrigger {
    feed: TriggerFeed,
    stop: watch::Receiver<Option<Instant>>,
    rt: tokio::runtime::Handle,
    streams: Arc<TriggerStreams>,
    secret: String,
    label: String,
}

impl TriggerPlugin for ProcessTrigger {
    fn fire(&mut self, ev: &AppendEvent) -> Result<(), PluginError> {
        let ev = Arc::new(ev.clone());
        let (feed, mut stop) = (&self.feed, self.stop.clone());
        self.rt.block_on(async move {
            let send = feed.send(ev);
            tokio::pin!(send);
            loop {
                let deadline = *stop.borrow_and_update();
                match deadline {
                    Some(d) => {
                        return match tokio::time::timeout_at(d.into(), send).await {
                            Ok(r) => r.map_err(|e| PluginError::Call(e.to_string())),
                            Err(_) => Err(PluginError::Call("not delivered: the process did not read it before the shutdown deadline".into())),
                        };
                    }
                    None => tokio::select! {
                        r = &mut send => return r.map_err(|e| PluginError::Call(e.to_string())),
                        _ = stop.changed() => continue,
                    },
                }
            }
        })
    }

    fn close(&mut self, deadline: Instant) {
        // Handed over is not handled: wait for the process to acknowledge what it holds (it may also be
        // restarting, and then gets it again) before the host stops it.
        let feed = &self.feed;
        let settled = self.rt.block_on(async { tokio::time::timeout_at(deadline.into(), feed.settled()).await.is_ok() });
        if !settled {
            tracing::warn!(
                trigger = %self.label,
                unacknowledged = self.feed.outstanding(),
                "shutdown deadline passed: the trigger process did not acknowledge these appends; they are not delivered"
            );
        }
        self.streams.close(&self.secret);
    }
}

/// Prepare an out-of-process trigger: its delivery stream on the bus and the supervised process.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename the same eight things
pub fn trigger(
    env: &ProcessEnv,
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
    let feed = env.streams.open(secret.clone(), 1);
    let ticket = serde_json::json!({ "trigger": secret }).to_string();
    let vars = vec![
        ("MKTS_PLUGIN_ROLE".to_string(), "trigger".to_string()),
        ("MKTS_PLUGIN_NAME".to_string(), label.to_string()),
        ("MKTS_PLUGIN_ON".to_string(), on.to_string()),
        ("MKTS_TRIGGER_TICKET".to_string(), ticket),
    ];
    let spec = Spec { path: path.to_path_buf(), label: label.to_string(), env: base_env(env, addrs, flight, config, vars), restart_clean_exit: true };
    let sup = Supervisor::start(spec, stats);
    let t = ProcessTrigger { feed, stop, rt: tokio::runtime::Handle::current(), streams: env.streams.clone(), secret, label: label.to_string() };
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
    env: &ProcessEnv,
    addrs: ServerAddrs,
    path: &Path,
    label: &str,
    name: &str,
    config: &serde_json::Value,
    stats: Arc<PluginStats>,
) -> Result<ProcessWorker, PluginError> {
    let flight = addrs.flight.ok_or_else(|| PluginError::Start("out-of-process plugins need the Flight port (grpc_listen_port)".into()))?;
    let vars = vec![("MKTS_PLUGIN_ROLE".to_string(), "worker".to_string()), ("MKTS_PLUGIN_NAME".to_string(), name.to_string())];
    let spec = Spec { path: path.to_path_buf(), label: label.to_string(), env: base_env(env, addrs, flight, config, vars), restart_clean_exit: false };
    Ok(ProcessWorker { supervisor: Supervisor::start(spec, stats), rt: tokio::runtime::Handle::current() })
}

/// What the host hands the process side: the bus's trigger streams and the configuration directory (the
/// processes' working directory), nothing else of the server.
pub struct ProcessEnv {
    pub streams: Arc<TriggerStreams>,
    pub config_dir: PathBuf,
    /// `authorization` header value for every call back to the server (`auth:` configured): a token
    /// with the plugin's role, valid while this server runs.
    pub auth_header: Option<String>,
    /// The CA to verify the server with (`tls:` configured); the Flight address is then `grpc+tls://`.
    pub tls_root_certs: Option<PathBuf>,
}

fn base_env(pe: &ProcessEnv, addrs: ServerAddrs, flight: SocketAddr, config: &serde_json::Value, mut env: Vec<(String, String)>) -> Vec<(String, String)> {
    let flight = ServerAddrs::local(flight);
    env.push(("MKTS_PLUGIN_CONFIG".into(), config.to_string()));
    // With TLS the certificate names a host, not an address: connect by name (`localhost` for loopback).
    let scheme = if pe.tls_root_certs.is_some() { ("grpc+tls", "https") } else { ("grpc", "http") };
    let host = |a: SocketAddr| if pe.tls_root_certs.is_some() && a.ip().is_loopback() { format!("localhost:{}", a.port()) } else { a.to_string() };
    env.push(("MKTS_FLIGHT_ADDR".into(), format!("{}://{}", scheme.0, host(flight))));
    env.push(("MKTS_HTTP_ADDR".into(), format!("{}://{}", scheme.1, host(ServerAddrs::local(addrs.http)))));
    if let Some(h) = &pe.auth_header {
        env.push(("MKTS_AUTH_HEADER".into(), h.clone()));
    }
    if let Some(ca) = &pe.tls_root_certs {
        env.push(("MKTS_TLS_ROOT_CERTS".into(), ca.display().to_string()));
    }
    env.push(("MKTS_PLUGIN_ABI".into(), "1".into()));
    env.push(("MKTS_VERSION".into(), crate::VERSION.into()));
    env.push(("MKTS_CONFIG_DIR".into(), pe.config_dir.display().to_string()));
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
        let delay = RESTART_BACKOFF.delay(crashes);
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
