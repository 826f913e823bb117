//! Prometheus metrics (`/metrics` on `listen_port`).
//!
//! A small hand-written registry and text exposition (format 0.0.4) instead of a metrics crate: the server
//! has a dozen fixed series (request-duration histograms per API and method, a few counters and gauges),
//! the exposition format is a few lines of text, and this keeps the dependency tree and build time flat.
//! Series names follow MarketStore where it had one (`alpaca_marketstore_*`, reference §2.9) so existing
//! dashboards keep working; the rest are `mkts_*`.
//!
//! Interfaces record with [`Metrics::observe`] (`api` = `jsonrpc`, `grpc`, `flight`, …); the HTTP layer
//! renders with [`Metrics::render`], passing the engine-side numbers it samples at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// Histogram bucket bounds in seconds (MarketStore's write histogram bounds, extended to 10 s).
pub const BUCKETS: [f64; 12] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A cumulative histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}", self.counts[i].load(Ordering::Relaxed));
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {n}");
        let l = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{l} {}", self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count{l} {n}");
    }
}

#[derive(Debug, Default)]
struct MethodStats {
    duration: Histogram,
    errors: AtomicU64,
}

/// Values sampled from the engine when `/metrics` is scraped.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineSample {
    pub rows_written: u64,
    pub wal_syncs: u64,
    pub wal_records: u64,
    pub buckets: u64,
    /// Bytes used under the root directory (`None` while not yet measured).
    pub disk_usage_bytes: Option<u64>,
    pub uptime: Duration,
    pub ready: bool,
    /// The engine accepts writes (not halted by a log failure or an unfinished start-up).
    pub writable: bool,
    /// Buckets offline for damage.
    pub damaged_buckets: u64,
    /// The last checkpoint failed (e.g. a full disk) and none has succeeded since.
    pub checkpoint_failing: bool,
    /// Bytes of writes waiting for the writer thread.
    pub writer_queue_bytes: u64,
}

/// Server metrics registry.
#[derive(Debug, Default)]
pub struct Metrics {
    rpc_total: Histogram,
    methods: Mutex<BTreeMap<(String, String), std::sync::Arc<MethodStats>>>,
    ws_connections: AtomicI64,
    ws_messages: AtomicU64,
    ws_dropped_clients: AtomicU64,
    flight_dropped_subscribers: AtomicU64,
    flight_subscribers: std::sync::atomic::AtomicI64,
    /// Cached disk usage: `(measured at, bytes)`.
    pub disk_usage: Mutex<Option<(std::time::Instant, u64)>>,
    /// One entry per configured trigger and worker (registered by the plugin host).
    plugins: Mutex<Vec<std::sync::Arc<PluginStats>>>,
}

/// Counters of one plugin instance, shared between the plugin host (which updates them) and `/metrics`.
///
/// A trigger's queue is its own engine subscription: `queued` samples how many appends wait in it (the
/// trigger's lag, in appends) and `dropped` counts appends that overflowed it.
pub struct PluginStats {
    /// `trigger` or `worker`.
    pub role: &'static str,
    /// `triggers[0]`, `bgworkers[1]`, …: unique per configuration entry.
    pub entry: String,
    /// The configured `module`.
    pub module: String,
    /// `builtin`, `shared_library` or `process`.
    pub kind: &'static str,
    /// Appended batches handed to the trigger.
    pub fired: AtomicU64,
    /// Calls that returned an error, panics, crashes.
    pub errors: AtomicU64,
    /// Restarts of an out-of-process plugin after it exited.
    pub restarts: AtomicU64,
    /// 1 while the plugin runs (0 once disabled, finished or stopped).
    pub up: std::sync::atomic::AtomicBool,
    /// Appends dropped because the trigger's queue was full.
    pub dropped: std::sync::Arc<AtomicU64>,
    /// Samples the trigger's queue depth.
    pub queued: Option<Box<dyn Fn() -> usize + Send + Sync>>,
}

impl std::fmt::Debug for PluginStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginStats").field("entry", &self.entry).field("module", &self.module).field("kind", &self.kind).finish()
    }
}

impl PluginStats {
    /// Fresh counters for one configuration entry.
    pub fn new(role: &'static str, entry: String, module: String, kind: &'static str) -> Self {
        PluginStats {
            role,
            entry,
            module,
            kind,
            fired: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            up: std::sync::atomic::AtomicBool::new(false),
            dropped: Default::default(),
            queued: None,
        }
    }

    fn labels(&self) -> String {
        format!("entry=\"{}\",module=\"{}\",kind=\"{}\"", esc(&self.entry), esc(&self.module), self.kind)
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics::default()
    }

    /// Record one call of `method` on `api` (`jsonrpc`, `grpc`, `flight`, …) that took `d`.
    pub fn observe(&self, api: &str, method: &str, d: Duration, ok: bool) {
        let stats = {
            let mut m = self.methods.lock();
            m.entry((api.to_string(), method.to_string())).or_default().clone()
        };
        stats.duration.observe(d);
        if !ok {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Add a plugin's counters to the exposition.
    pub fn register_plugin(&self, stats: std::sync::Arc<PluginStats>) {
        self.plugins.lock().push(stats);
    }

    /// The registered plugins' counters.
    pub fn plugins(&self) -> Vec<std::sync::Arc<PluginStats>> {
        self.plugins.lock().clone()
    }

    /// Record one `/rpc` HTTP request (any outcome), MarketStore's total request histogram.
    pub fn observe_rpc_request(&self, d: Duration) {
        self.rpc_total.observe(d);
    }

    /// Calls recorded for `api`/`method` so far.
    pub fn calls(&self, api: &str, method: &str) -> u64 {
        self.methods.lock().get(&(api.to_string(), method.to_string())).map(|s| s.duration.count()).unwrap_or(0)
    }

    pub fn ws_connected(&self) {
        self.ws_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ws_disconnected(&self) {
        self.ws_connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn ws_connections(&self) -> i64 {
        self.ws_connections.load(Ordering::Relaxed)
    }

    pub fn ws_message_sent(&self) {
        self.ws_messages.fetch_add(1, Ordering::Relaxed);
    }

    /// A WebSocket client was disconnected because it could not keep up.
    pub fn ws_client_dropped(&self) {
        self.ws_dropped_clients.fetch_add(1, Ordering::Relaxed);
    }

    /// A Flight `{"subscribe"}` subscriber was dropped because its unread batches passed the bound.
    pub fn flight_subscriber_dropped(&self) {
        self.flight_dropped_subscribers.fetch_add(1, Ordering::Relaxed);
    }

    /// A Flight subscription opened (`+1`) or ended (`-1`).
    pub fn flight_subscribers_add(&self, d: i64) {
        self.flight_subscribers.fetch_add(d, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, e: &EngineSample) -> String {
        let mut out = String::with_capacity(8192);
        let h = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let name = "alpaca_marketstore_rpc_total_request_duration_seconds";
        h(&mut out, name, "histogram", "Duration of every /rpc request.");
        self.rpc_total.render(&mut out, name, "");

        let methods: Vec<((String, String), std::sync::Arc<MethodStats>)> =
            self.methods.lock().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let name = "alpaca_marketstore_rpc_successful_request_duration_seconds";
        h(&mut out, name, "histogram", "Duration of JSON-RPC method calls (MarketStore's name: observed on errors too).");
        for ((api, m), s) in &methods {
            if api == "jsonrpc" {
                s.duration.render(&mut out, name, &format!("method=\"{}\"", esc(m)));
            }
        }
        let name = "mkts_request_duration_seconds";
        h(&mut out, name, "histogram", "Duration of API calls by interface and method.");
        for ((api, m), s) in &methods {
            s.duration.render(&mut out, name, &format!("api=\"{}\",method=\"{}\"", esc(api), esc(m)));
        }
        let name = "mkts_request_errors_total";
        h(&mut out, name, "counter", "API calls that returned an error, by interface and method.");
        for ((api, m), s) in &methods {
            let _ = writeln!(out, "{name}{{api=\"{}\",method=\"{}\"}} {}", esc(api), esc(m), s.errors.load(Ordering::Relaxed));
        }

        let gauge = |out: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        gauge(&mut out, "alpaca_marketstore_ws_connections", "gauge", "Open /ws connections.", self.ws_connections().to_string());
        gauge(&mut out, "mkts_ws_messages_sent_total", "counter", "Stream messages sent to /ws clients.", self.ws_messages.load(Ordering::Relaxed).to_string());
        gauge(&mut out, "mkts_ws_dropped_clients_total", "counter", "/ws clients disconnected for falling behind.", self.ws_dropped_clients.load(Ordering::Relaxed).to_string());
        gauge(&mut out, "mkts_flight_dropped_subscribers_total", "counter", "Flight subscriptions ended for leaving more than subscriber_queue_mb unread.", self.flight_dropped_subscribers.load(Ordering::Relaxed).to_string());
        gauge(&mut out, "mkts_flight_subscribers", "gauge", "Open Flight {\"subscribe\"} streams.", self.flight_subscribers.load(Ordering::Relaxed).to_string());
        gauge(&mut out, "mkts_rows_written_total", "counter", "Rows acknowledged by the engine since start.", e.rows_written.to_string());
        gauge(&mut out, "mkts_wal_syncs_total", "counter", "Durable log appends (fdatasync) since start.", e.wal_syncs.to_string());
        gauge(&mut out, "mkts_wal_records_total", "counter", "Write records carried by those appends (group commit).", e.wal_records.to_string());
        gauge(&mut out, "mkts_buckets", "gauge", "Buckets in the catalog.", e.buckets.to_string());
        if let Some(d) = e.disk_usage_bytes {
            gauge(&mut out, "alpaca_marketstore_total_disk_usage_bytes", "gauge", "Bytes used under root_directory.", d.to_string());
        }
        gauge(&mut out, "mkts_uptime_seconds", "gauge", "Seconds since the server started.", format!("{:.3}", e.uptime.as_secs_f64()));
        gauge(&mut out, "mkts_ready", "gauge", "1 when the server is queryable.", (e.ready as u8).to_string());
        gauge(&mut out, "mkts_engine_writable", "gauge", "1 when the engine accepts writes (0: halted or start-up unfinished; see /heartbeat).", (e.writable as u8).to_string());
        gauge(&mut out, "mkts_damaged_buckets", "gauge", "Buckets offline because their files or log records could not be used (see /heartbeat).", e.damaged_buckets.to_string());
        gauge(&mut out, "mkts_checkpoint_failing", "gauge", "1 while checkpoints fail (the log keeps everything and grows).", (e.checkpoint_failing as u8).to_string());
        gauge(&mut out, "mkts_writer_queue_bytes", "gauge", "Bytes of writes waiting for the writer thread (writers wait past 256 MiB).", e.writer_queue_bytes.to_string());
        self.render_plugins(&mut out);
        out
    }

    fn render_plugins(&self, out: &mut String) {
        let plugins = self.plugins();
        if plugins.is_empty() {
            return;
        }
        type Sample = fn(&PluginStats) -> Option<u64>;
        let series: [(&str, &str, &str, Sample); 6] = [
            ("mkts_plugin_up", "gauge", "1 while the plugin runs.", |p| Some(p.up.load(Ordering::Relaxed) as u64)),
            ("mkts_plugin_errors_total", "counter", "Plugin calls that failed, panics and crashes.", |p| Some(p.errors.load(Ordering::Relaxed))),
            ("mkts_plugin_restarts_total", "counter", "Restarts of out-of-process plugins.", |p| Some(p.restarts.load(Ordering::Relaxed))),
            ("mkts_trigger_fired_total", "counter", "Appended batches handed to a trigger.", |p| (p.role == "trigger").then(|| p.fired.load(Ordering::Relaxed))),
            ("mkts_trigger_dropped_total", "counter", "Appends a trigger missed because its queue was full.", |p| (p.role == "trigger").then(|| p.dropped.load(Ordering::Relaxed))),
            ("mkts_trigger_queue_depth", "gauge", "Appends durable but not yet handed to a trigger: its lag.", |p| p.queued.as_ref().map(|q| q() as u64)),
        ];
        for (name, kind, help, f) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for p in &plugins {
                if let Some(v) = f(p) {
                    let _ = writeln!(out, "{name}{{role=\"{}\",{}}} {v}", p.role, p.labels());
                }
            }
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Bytes allocated on disk under `root` (sparse and preallocated files count what they use).
pub fn disk_usage(root: &std::path::Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for ent in rd.flatten() {
            let Ok(md) = ent.metadata() else { continue };
            if md.is_dir() {
                stack.push(ent.path());
            } else {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::MetadataExt;
                    total += md.blocks() * 512;
                }
                #[cfg(not(unix))]
                {
                    total += md.len();
                }
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_histograms_and_gauges() {
        let m = Metrics::new();
        m.observe("jsonrpc", "Query", Duration::from_millis(3), true);
        m.observe("jsonrpc", "Query", Duration::from_millis(30), false);
        m.ws_connected();
        let text = m.render(&EngineSample { rows_written: 42, disk_usage_bytes: Some(4096), ..Default::default() });
        assert!(text.contains("alpaca_marketstore_rpc_successful_request_duration_seconds_bucket{method=\"Query\",le=\"0.005\"} 1\n"), "{text}");
        assert!(text.contains("alpaca_marketstore_rpc_successful_request_duration_seconds_count{method=\"Query\"} 2\n"));
        assert!(text.contains("mkts_request_errors_total{api=\"jsonrpc\",method=\"Query\"} 1\n"));
        assert!(text.contains("alpaca_marketstore_ws_connections 1\n"));
        assert!(text.contains("mkts_rows_written_total 42\n"));
        assert!(text.contains("alpaca_marketstore_total_disk_usage_bytes 4096\n"));
        assert_eq!(m.calls("jsonrpc", "Query"), 2);
    }
}
