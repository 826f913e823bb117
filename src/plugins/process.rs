//! Out-of-process plugins: one executable per plugin, in any language, talking Arrow Flight to the server.
//!
//! The host starts the executable with everything it needs in its environment (`MKTS_PLUGIN_*`,
//! `MKTS_FLIGHT_ADDR`, …; the full protocol is in `docs/plugins.md`). A worker writes with DoPut like any
//! client. A trigger opens a DoExchange whose descriptor command is the ticket in `MKTS_TRIGGER_TICKET` and
//! receives the appends queued for it: batches of one schema, each batch's `app_metadata` naming its key;
//! it answers each handled batch with `{"ack": 1}`. Before an append of another schema the exchange ends
//! and the plugin opens the next. Batches unacknowledged when a process dies are delivered again to its
//! successor: delivery is at least once.
//!
//! [`Supervisor`] runs the process: stdout and stderr go to the server log line by line, an exit other than
//! a clean one restarts it after an exponential backoff (0.5 s doubling to 30 s, reset after 30 s of
//! uptime), and shutdown sends SIGTERM, then SIGKILL after 5 s. On Linux the child also gets SIGTERM if the
//! server dies, so no plugin outlives it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use futures::stream::{BoxStream, StreamExt};
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

/// Batches a trigger process may hold unacknowledged: enough to hide the acknowledgement round trip, few
/// enough that a crash redelivers little.
const ACK_WINDOW: usize = 32;

/// The delivery side of one out-of-process trigger: the trigger's thread pushes appends in, the Flight
/// exchange opened with the trigger's ticket takes them out.
struct Bridge {
    tx: mpsc::Sender<Arc<AppendEvent>>,
    rx: Arc<tokio::sync::Mutex<BridgeRx>>,
}

struct BridgeRx {
    rx: mpsc::Receiver<Arc<AppendEvent>>,
    /// Sent on the current (or last) exchange and not acknowledged yet, oldest first.
    unacked: VecDeque<Arc<AppendEvent>>,
    /// To send before anything new: the unacknowledged batches of a broken exchange, or an append whose
    /// schema ended the last one.
    front: VecDeque<Arc<AppendEvent>>,
}

/// The trigger streams of the running out-of-process triggers, by ticket secret. The Flight service opens
/// them for DoExchange on `{"trigger": secret}`.
#[derive(Default)]
pub struct TriggerStreams {
    bridges: parking_lot::Mutex<HashMap<String, Arc<Bridge>>>,
}

/// One open exchange: the bridge (locked for the exchange's life), the acknowledgements, the schema.
struct Exchange {
    rx: tokio::sync::OwnedMutexGuard<BridgeRx>,
    acks: BoxStream<'static, u64>,
    schema: Option<SchemaRef>,
}

impl Exchange {
    fn ack(&mut self, n: u64) {
        for _ in 0..n {
            if self.rx.unacked.pop_front().is_none() {
                break;
            }
        }
    }

    /// The next batch to send, or `None` to end the exchange (client gone, trigger closed, or a schema
    /// change once everything sent is acknowledged).
    async fn next(&mut self) -> Option<(String, RecordBatch)> {
        loop {
            if self.rx.unacked.len() >= ACK_WINDOW {
                let n = self.acks.next().await?;
                self.ack(n);
                continue;
            }
            let ev = match self.rx.front.pop_front() {
                Some(ev) => ev,
                None => {
                    let BridgeRx { rx, .. } = &mut *self.rx;
                    tokio::select! {
                        ev = rx.recv() => ev?,
                        n = self.acks.next() => {
                            self.ack(n?);
                            continue;
                        }
                    }
                }
            };
            let ev_schema = ev.batch.schema();
            if let Some(s) = &self.schema
                && s.fields() != ev_schema.fields()
            {
                // One schema per exchange: end it once the client has acknowledged what it holds.
                self.rx.front.push_front(ev);
                while !self.rx.unacked.is_empty() {
                    let n = self.acks.next().await?;
                    self.ack(n);
                }
                return None;
            }
            self.schema = Some(ev_schema);
            self.rx.unacked.push_back(ev.clone());
            return Some((ev.key.to_string(), ev.batch.clone()));
        }
    }
}

impl TriggerStreams {
    /// The exchange of the trigger holding `secret`: its appends, all of one schema, as `(key, batch)`,
    /// at most [`ACK_WINDOW`] unacknowledged. Batches a previous exchange left unacknowledged come first.
    /// Waits up to 10 s for a previous exchange of the same trigger to close (a restarted process
    /// reconnecting before the server noticed the old connection is gone).
    pub async fn exchange(&self, secret: &str, acks: BoxStream<'static, u64>) -> Result<BoxStream<'static, (String, RecordBatch)>, String> {
        let bridge = self.bridges.lock().get(secret).cloned().ok_or_else(|| "unknown trigger ticket".to_string())?;
        let mut rx = tokio::time::timeout(Duration::from_secs(10), bridge.rx.clone().lock_owned())
            .await
            .map_err(|_| "this trigger's stream is already open elsewhere".to_string())?;
        // Whatever the last exchange did not get acknowledged is delivered again, first.
        let redeliver = std::mem::take(&mut rx.unacked);
        for ev in redeliver.into_iter().rev() {
            rx.front.push_front(ev);
        }
        let ex = Exchange { rx, acks, schema: None };
        let s = futures::stream::unfold(ex, |mut ex| async move { ex.next().await.map(|item| (item, ex)) });
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
    let bridge = Arc::new(Bridge { tx, rx: Arc::new(tokio::sync::Mutex::new(BridgeRx { rx, unacked: VecDeque::new(), front: VecDeque::new() })) });
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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    fn event(sym: &str, col: &str, v: i64) -> Arc<AppendEvent> {
        let schema = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false), Field::new(col, DataType::Float64, false)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![v])), Arc::new(Float64Array::from(vec![v as f64]))]).unwrap();
        Arc::new(AppendEvent { key: crate::engine::BucketKey::parse(&format!("{sym}/1Min/OHLCV")).unwrap(), lsn: v as u64, batch })
    }

    fn epoch(b: &RecordBatch) -> i64 {
        b.column(0).as_any().downcast_ref::<Int64Array>().unwrap().value(0)
    }

    #[tokio::test]
    async fn exchange_redelivers_unacknowledged_and_splits_on_schema() {
        let streams = TriggerStreams::default();
        let (tx, rx) = mpsc::channel(16);
        let bridge = Arc::new(Bridge { tx, rx: Arc::new(tokio::sync::Mutex::new(BridgeRx { rx, unacked: VecDeque::new(), front: VecDeque::new() })) });
        streams.insert("s".into(), bridge.clone());
        for (sym, col, v) in [("A", "Open", 1), ("A", "Open", 2), ("A", "Open", 3), ("B", "Close", 4)] {
            bridge.tx.send(event(sym, col, v)).await.unwrap();
        }
        assert!(streams.exchange("nope", futures::stream::empty().boxed()).await.is_err());

        // First exchange: receives 1, 2, 3, acknowledges only 1, then breaks.
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let mut s = streams.exchange("s", tokio_stream::wrappers::UnboundedReceiverStream::new(ack_rx).boxed()).await.unwrap();
        let got: Vec<i64> = vec![epoch(&s.next().await.unwrap().1), epoch(&s.next().await.unwrap().1), epoch(&s.next().await.unwrap().1)];
        assert_eq!(got, [1, 2, 3]);
        ack_tx.send(1).unwrap();
        drop(ack_tx); // the process died
        assert!(s.next().await.is_none());
        drop(s);

        // Second exchange: 2 and 3 again, then it ends before B's other schema once both are acknowledged.
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let mut s = streams.exchange("s", tokio_stream::wrappers::UnboundedReceiverStream::new(ack_rx).boxed()).await.unwrap();
        assert_eq!(epoch(&s.next().await.unwrap().1), 2);
        assert_eq!(epoch(&s.next().await.unwrap().1), 3);
        ack_tx.send(2).unwrap();
        assert!(s.next().await.is_none());
        drop(s);

        // Third: B.
        let (_ack_tx, ack_rx) = mpsc::unbounded_channel();
        let mut s = streams.exchange("s", tokio_stream::wrappers::UnboundedReceiverStream::new(ack_rx).boxed()).await.unwrap();
        let (key, b) = s.next().await.unwrap();
        assert_eq!((key.as_str(), epoch(&b)), ("B/1Min/OHLCV", 4));
        assert_eq!(b.schema().field(1).name(), "Close");
    }
}
