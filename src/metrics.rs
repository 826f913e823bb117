//! Prometheus metrics (`/metrics` on `listen_port`), exposed with the `prometheus-client` crate.
//!
//! Request counts and durations are recorded per interface and method, by thin layers around the
//! listeners rather than in handlers ([`layer`]): the tonic server's [`GrpcMetricsLayer`] for Arrow
//! Flight, Flight SQL and `proto.Marketstore` (`api="flight"`, `"flight_sql"`, `"grpc"`, `method` = the
//! gRPC method), the HTTP router's [`layer::record_http`] for `/ws` (`api="ws"`) and MarketStore's total
//! `/rpc` histogram, and `/rpc`'s dispatcher for its JSON-RPC methods (`api="jsonrpc"`; the method is in
//! the body). Series names follow MarketStore where it had one (`alpaca_marketstore_*`, reference §2.9) so
//! existing dashboards keep working; the rest are `mkts_*`. Values the engine owns (rows written, log
//! syncs, health) and the plugins' counters are sampled when `/metrics` is scraped.

pub mod layer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub use layer::GrpcMetricsLayer;

/// Histogram bucket bounds in seconds (MarketStore's write histogram bounds, extended to 10 s).
pub const BUCKETS: [f64; 12] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

fn duration_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Labels of the per-interface series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiMethod {
    api: String,
    method: String,
}

/// Labels of MarketStore's per-method JSON-RPC series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

type DurationFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Values sampled from the engine when `/metrics` is scraped.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineSample {
    pub rows_written: u64,
    pub wal_syncs: u64,
    pub wal_records: u64,
    /// Writes committed on their caller's thread (the writer idle), of `wal_records`.
    pub writes_inline: u64,
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
    /// Rows and bytes retention removed since start.
    pub retention_rows: u64,
    pub retention_bytes: u64,
}

/// One replication link as sampled at scrape time: on a master, one per replica (`peer` = the name it
/// reported); on a replica, its link to the master (`peer` = `master_host`).
#[derive(Debug, Clone, Default)]
pub struct ReplicationSample {
    pub peer: String,
    pub connected: bool,
    /// Master: the position the replica acknowledged. Replica: the position applied here.
    pub position: u64,
    pub lag_records: u64,
    pub lag_seconds: f64,
}

/// What is sampled at scrape time: the engine's numbers (set by [`Metrics::render`]) and the plugins.
#[derive(Debug, Default)]
struct Sampled {
    engine: Mutex<EngineSample>,
    plugins: Mutex<Vec<Arc<PluginStats>>>,
    replication: Mutex<Vec<ReplicationSample>>,
}

/// Encodes [`Sampled`] into the exposition.
#[derive(Debug)]
struct SampledCollector(Arc<Sampled>);

/// Server metrics registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: DurationFamily<ApiMethod>,
    calls: Family<ApiMethod, Counter>,
    errors: Family<ApiMethod, Counter>,
    rpc_methods: DurationFamily<MethodLabel>,
    rpc_total: Histogram,
    ws_connections: Gauge,
    ws_messages: Counter,
    ws_dropped_clients: Counter,
    flight_dropped_subscribers: Counter,
    flight_subscribers: Gauge,
    sampled: Arc<Sampled>,
    /// One scrape at a time: the engine sample and the encoding belong together.
    render_lock: Mutex<()>,
    /// Cached disk usage: `(measured at, bytes)`.
    pub disk_usage: Mutex<Option<(std::time::Instant, u64)>>,
}

/// Progress of one built-in feeder (`/metrics`: `mkts_feeder_*`, labelled like the plugin), updated by the
/// feeder's threads.
#[derive(Debug, Default)]
pub struct FeedStats {
    /// Stream messages (or REST responses for the polling feeders) received.
    pub messages: AtomicU64,
    /// Rows written, streamed and backfilled.
    pub rows: AtomicU64,
    /// Of those, rows written by a gap fill over REST.
    pub backfilled: AtomicU64,
    /// Trades and quotes dropped as repeats.
    pub duplicates: AtomicU64,
    /// Reconnects after a lost connection.
    pub reconnects: AtomicU64,
    /// Start time of the newest bar received (Unix seconds; 0 before the first).
    pub last_bar: AtomicU64,
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
    /// A built-in worker's feed progress.
    pub feed: Option<Arc<FeedStats>>,
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
            feed: None,
        }
    }

    /// The plugin's configuration and counters as JSON (Flight's `plugins` action, `/api/status`).
    pub fn summary(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        serde_json::json!({
            "entry": self.entry, "role": self.role, "module": self.module, "kind": self.kind,
            "up": self.up.load(Relaxed), "fired": self.fired.load(Relaxed), "dropped": self.dropped.load(Relaxed),
            "queued": self.queued.as_ref().map(|q| q()), "errors": self.errors.load(Relaxed), "restarts": self.restarts.load(Relaxed),
        })
    }

    fn labels(&self) -> [(&'static str, &str); 4] {
        [("role", self.role), ("entry", &self.entry), ("module", &self.module), ("kind", self.kind)]
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let requests: DurationFamily<ApiMethod> = Family::new_with_constructor(duration_histogram);
        let calls: Family<ApiMethod, Counter> = Family::default();
        let errors: Family<ApiMethod, Counter> = Family::default();
        let rpc_methods: DurationFamily<MethodLabel> = Family::new_with_constructor(duration_histogram);
        let rpc_total = duration_histogram();
        let (ws_connections, ws_messages, ws_dropped_clients) = (Gauge::default(), Counter::default(), Counter::default());
        let (flight_dropped_subscribers, flight_subscribers) = (Counter::default(), Gauge::default());
        let sampled = Arc::new(Sampled::default());
        let mut r = Registry::default();
        r.register("alpaca_marketstore_rpc_total_request_duration_seconds", "Duration of every /rpc request", rpc_total.clone());
        r.register(
            "alpaca_marketstore_rpc_successful_request_duration_seconds",
            "Duration of JSON-RPC method calls (MarketStore's name: observed on errors too)",
            rpc_methods.clone(),
        );
        r.register("mkts_request_duration_seconds", "Duration of API calls by interface and method", requests.clone());
        r.register("mkts_requests", "API calls by interface and method", calls.clone());
        r.register("mkts_request_errors", "API calls that returned an error, by interface and method", errors.clone());
        r.register("alpaca_marketstore_ws_connections", "Open /ws connections", ws_connections.clone());
        r.register("mkts_ws_messages_sent", "Stream messages sent to /ws clients", ws_messages.clone());
        r.register("mkts_ws_dropped_clients", "/ws clients disconnected for falling behind", ws_dropped_clients.clone());
        r.register(
            "mkts_flight_dropped_subscribers",
            "Flight subscriptions ended for leaving more than subscriber_queue_mb unread",
            flight_dropped_subscribers.clone(),
        );
        r.register("mkts_flight_subscribers", "Open Flight {\"subscribe\"} streams", flight_subscribers.clone());
        r.register_collector(Box::new(SampledCollector(sampled.clone())));
        Metrics {
            registry: r,
            requests,
            calls,
            errors,
            rpc_methods,
            rpc_total,
            ws_connections,
            ws_messages,
            ws_dropped_clients,
            flight_dropped_subscribers,
            flight_subscribers,
            sampled,
            render_lock: Mutex::new(()),
            disk_usage: Mutex::new(None),
        }
    }

    /// Record one call of `method` on `api` (`jsonrpc`, `grpc`, `flight`, `flight_sql`, `ws`) that took
    /// `d`. JSON-RPC calls also feed MarketStore's per-method histogram.
    pub fn observe(&self, api: &str, method: &str, d: Duration, ok: bool) {
        let labels = ApiMethod { api: api.to_string(), method: method.to_string() };
        self.requests.get_or_create(&labels).observe(d.as_secs_f64());
        self.calls.get_or_create(&labels).inc();
        // Created on every call so a method without errors shows 0, not nothing.
        let errors = self.errors.get_or_create(&labels);
        if !ok {
            errors.inc();
        }
        if api == "jsonrpc" {
            self.rpc_methods.get_or_create(&MethodLabel { method: method.to_string() }).observe(d.as_secs_f64());
        }
    }

    /// Add a plugin's counters to the exposition.
    pub fn register_plugin(&self, stats: Arc<PluginStats>) {
        self.sampled.plugins.lock().push(stats);
    }

    /// The registered plugins' counters.
    pub fn plugins(&self) -> Vec<Arc<PluginStats>> {
        self.sampled.plugins.lock().clone()
    }

    /// Record one `/rpc` HTTP request (any outcome), MarketStore's total request histogram.
    pub fn observe_rpc_request(&self, d: Duration) {
        self.rpc_total.observe(d.as_secs_f64());
    }

    /// Calls recorded for `api`/`method` so far.
    pub fn calls(&self, api: &str, method: &str) -> u64 {
        let labels = ApiMethod { api: api.to_string(), method: method.to_string() };
        self.calls.get(&labels).map(|c| c.get()).unwrap_or(0)
    }

    pub fn ws_connected(&self) {
        self.ws_connections.inc();
    }

    pub fn ws_disconnected(&self) {
        self.ws_connections.dec();
    }

    pub fn ws_connections(&self) -> i64 {
        self.ws_connections.get()
    }

    pub fn ws_message_sent(&self) {
        self.ws_messages.inc();
    }

    /// A WebSocket client was disconnected because it could not keep up.
    pub fn ws_client_dropped(&self) {
        self.ws_dropped_clients.inc();
    }

    /// A Flight `{"subscribe"}` subscriber was dropped because its unread batches passed the bound.
    pub fn flight_subscriber_dropped(&self) {
        self.flight_dropped_subscribers.inc();
    }

    /// A Flight subscription opened (`+1`) or ended (`-1`).
    pub fn flight_subscribers_add(&self, d: i64) {
        self.flight_subscribers.inc_by(d);
    }

    /// The exposition (OpenMetrics text, which Prometheus also reads as its text format), with the
    /// engine's numbers as sampled now.
    pub fn render(&self, e: &EngineSample) -> String {
        self.render_with(e, Vec::new())
    }

    /// [`Metrics::render`] with the replication links as sampled now.
    pub fn render_with(&self, e: &EngineSample, replication: Vec<ReplicationSample>) -> String {
        let _one = self.render_lock.lock();
        *self.sampled.engine.lock() = *e;
        *self.sampled.replication.lock() = replication;
        let mut out = String::with_capacity(8192);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("cannot encode /metrics: {e}");
        }
        out
    }
}

/// One unlabelled sampled series.
fn sample<M: EncodeMetric>(enc: &mut DescriptorEncoder, name: &str, help: &str, m: M) -> Result<(), std::fmt::Error> {
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

impl Collector for SampledCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = *self.0.engine.lock();
        let enc = &mut enc;
        sample(enc, "mkts_rows_written", "Rows acknowledged by the engine since start.", ConstCounter::new(e.rows_written))?;
        sample(enc, "mkts_wal_syncs", "Durable log appends (fdatasync) since start.", ConstCounter::new(e.wal_syncs))?;
        sample(enc, "mkts_wal_records", "Write records carried by those appends (group commit).", ConstCounter::new(e.wal_records))?;
        sample(enc, "mkts_writes_inline", "Writes committed on their caller's thread while the writer was idle.", ConstCounter::new(e.writes_inline))?;
        sample(enc, "mkts_buckets", "Buckets in the catalog.", ConstGauge::new(e.buckets as i64))?;
        if let Some(d) = e.disk_usage_bytes {
            sample(enc, "alpaca_marketstore_total_disk_usage_bytes", "Bytes used under root_directory.", ConstGauge::new(d as i64))?;
        }
        sample(enc, "mkts_uptime_seconds", "Seconds since the server started.", ConstGauge::new(e.uptime.as_secs_f64()))?;
        sample(enc, "mkts_ready", "1 when the server is queryable.", ConstGauge::new(e.ready as i64))?;
        let writable = "1 when the engine accepts writes (0: halted or start-up unfinished; see /heartbeat).";
        sample(enc, "mkts_engine_writable", writable, ConstGauge::new(e.writable as i64))?;
        let damaged = "Buckets offline because their files or log records could not be used (see /heartbeat).";
        sample(enc, "mkts_damaged_buckets", damaged, ConstGauge::new(e.damaged_buckets as i64))?;
        let failing = "1 while checkpoints fail (the log keeps everything and grows).";
        sample(enc, "mkts_checkpoint_failing", failing, ConstGauge::new(e.checkpoint_failing as i64))?;
        let queue = "Bytes of writes waiting for the writer thread (writers wait past 256 MiB).";
        sample(enc, "mkts_writer_queue_bytes", queue, ConstGauge::new(e.writer_queue_bytes as i64))?;
        sample(enc, "mkts_retention_rows", "Rows retention removed since start.", ConstCounter::new(e.retention_rows))?;
        sample(enc, "mkts_retention_bytes", "Bytes of rows retention removed since start.", ConstCounter::new(e.retention_bytes))?;
        self.encode_plugins(enc)?;
        self.encode_replication(enc)
    }
}

impl SampledCollector {
    fn encode_replication(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let links = self.0.replication.lock().clone();
        if links.is_empty() {
            return Ok(());
        }
        type Sample = fn(&ReplicationSample) -> f64;
        let series: [(&str, &str, Sample); 4] = [
            ("mkts_replication_connected", "1 while the replication link to this peer is up.", |r| r.connected as u8 as f64),
            ("mkts_replication_position", "Master log position: acknowledged by the replica (on a master), applied here (on a replica).", |r| r.position as f64),
            ("mkts_replication_lag_records", "Master log positions the replica does not hold yet.", |r| r.lag_records as f64),
            ("mkts_replication_lag_seconds", "How far the replica is behind the master in time.", |r| r.lag_seconds),
        ];
        for (name, help, f) in series {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for r in &links {
                let labels = [("peer", r.peer.as_str())];
                ConstGauge::new(f(r)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl SampledCollector {
    fn encode_plugins(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let plugins = self.0.plugins.lock().clone();
        if plugins.is_empty() {
            return Ok(());
        }
        type Sample = fn(&PluginStats) -> Option<u64>;
        let series: [(&str, MetricType, &str, Sample); 6] = [
            ("mkts_plugin_up", MetricType::Gauge, "1 while the plugin runs.", |p| Some(p.up.load(Ordering::Relaxed) as u64)),
            ("mkts_plugin_errors", MetricType::Counter, "Plugin calls that failed, panics and crashes.", |p| Some(p.errors.load(Ordering::Relaxed))),
            ("mkts_plugin_restarts", MetricType::Counter, "Restarts of out-of-process plugins.", |p| Some(p.restarts.load(Ordering::Relaxed))),
            ("mkts_trigger_fired", MetricType::Counter, "Appended batches handed to a trigger.", |p| (p.role == "trigger").then(|| p.fired.load(Ordering::Relaxed))),
            ("mkts_trigger_dropped", MetricType::Counter, "Appends a trigger missed because its queue was full.", |p| (p.role == "trigger").then(|| p.dropped.load(Ordering::Relaxed))),
            ("mkts_trigger_queue_depth", MetricType::Gauge, "Appends durable but not yet handed to a trigger: its lag.", |p| p.queued.as_ref().map(|q| q() as u64)),
        ];
        type FeedSample = fn(&FeedStats) -> u64;
        let feed_series: [(&str, MetricType, &str, FeedSample); 6] = [
            ("mkts_feeder_messages", MetricType::Counter, "Stream messages (REST responses for polling feeders) a feeder received.", |f| f.messages.load(Ordering::Relaxed)),
            ("mkts_feeder_rows_written", MetricType::Counter, "Rows a feeder wrote (streamed and backfilled).", |f| f.rows.load(Ordering::Relaxed)),
            ("mkts_feeder_rows_backfilled", MetricType::Counter, "Rows a feeder wrote from a gap fill over REST.", |f| f.backfilled.load(Ordering::Relaxed)),
            ("mkts_feeder_duplicates_dropped", MetricType::Counter, "Trades and quotes a feeder dropped as repeats.", |f| f.duplicates.load(Ordering::Relaxed)),
            ("mkts_feeder_reconnects", MetricType::Counter, "Reconnects of a streaming feeder after a lost connection.", |f| f.reconnects.load(Ordering::Relaxed)),
            ("mkts_feeder_last_bar_time_seconds", MetricType::Gauge, "Start time of the newest bar a feeder received (Unix seconds).", |f| f.last_bar.load(Ordering::Relaxed)),
        ];
        for (name, ty, help, f) in feed_series {
            if !plugins.iter().any(|p| p.feed.is_some()) {
                break;
            }
            let mut family = enc.encode_descriptor(name, help, None, ty.clone())?;
            for p in &plugins {
                let Some(feed) = &p.feed else { continue };
                let labels = p.labels();
                let m = family.encode_family(&labels)?;
                match ty {
                    MetricType::Counter => ConstCounter::new(f(feed)).encode(m)?,
                    _ => ConstGauge::new(f(feed) as i64).encode(m)?,
                }
            }
        }
        for (name, ty, help, f) in series {
            let mut family = enc.encode_descriptor(name, help, None, ty.clone())?;
            for p in &plugins {
                let Some(v) = f(p) else { continue };
                let labels = p.labels();
                let m = family.encode_family(&labels)?;
                match ty {
                    MetricType::Counter => ConstCounter::new(v).encode(m)?,
                    _ => ConstGauge::new(v as i64).encode(m)?,
                }
            }
        }
        Ok(())
    }
}

/// How long a measured disk usage is reused before it is measured again (`/metrics`, `/api/status`).
pub const DISK_USAGE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// The disk usage under `root`, measured (off the runtime's threads) at most once per
/// [`DISK_USAGE_MAX_AGE`] and cached in `metrics`; `None` when the measurement could not run.
pub async fn cached_disk_usage(metrics: &Metrics, root: &std::path::Path) -> Option<u64> {
    let cached = *metrics.disk_usage.lock();
    match cached {
        Some((at, bytes)) if at.elapsed() < DISK_USAGE_MAX_AGE => Some(bytes),
        _ => {
            let root = root.to_path_buf();
            let bytes = tokio::task::spawn_blocking(move || disk_usage(&root)).await.ok();
            if let Some(b) = bytes {
                *metrics.disk_usage.lock() = Some((std::time::Instant::now(), b));
            }
            bytes
        }
    }
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
    fn renders_histograms_counters_and_gauges() {
        let m = Metrics::new();
        m.observe("jsonrpc", "Query", Duration::from_millis(3), true);
        m.observe("jsonrpc", "Query", Duration::from_millis(30), false);
        m.observe("flight", "DoGet", Duration::from_millis(1), true);
        m.ws_connected();
        let p = Arc::new(PluginStats::new("trigger", "triggers[0]".into(), "ondiskagg".into(), "builtin"));
        p.fired.store(4, Ordering::Relaxed);
        m.register_plugin(p);
        let text = m.render(&EngineSample { rows_written: 42, disk_usage_bytes: Some(4096), ..Default::default() });
        let lines: Vec<&str> = text.lines().collect();
        let has = |l: &str| lines.contains(&l);
        assert!(has("alpaca_marketstore_rpc_successful_request_duration_seconds_bucket{le=\"0.005\",method=\"Query\"} 1"), "{text}");
        assert!(has("alpaca_marketstore_rpc_successful_request_duration_seconds_count{method=\"Query\"} 2"));
        assert!(has("mkts_request_duration_seconds_count{api=\"flight\",method=\"DoGet\"} 1"));
        assert!(has("mkts_request_errors_total{api=\"jsonrpc\",method=\"Query\"} 1"));
        assert!(has("mkts_request_errors_total{api=\"flight\",method=\"DoGet\"} 0"));
        assert!(has("mkts_requests_total{api=\"jsonrpc\",method=\"Query\"} 2"));
        assert!(has("alpaca_marketstore_ws_connections 1"));
        assert!(has("mkts_rows_written_total 42"));
        assert!(has("alpaca_marketstore_total_disk_usage_bytes 4096"));
        assert!(has("mkts_trigger_fired_total{role=\"trigger\",entry=\"triggers[0]\",module=\"ondiskagg\",kind=\"builtin\"} 4"), "{text}");
        assert_eq!(lines.last(), Some(&"# EOF"));
        assert_eq!(m.calls("jsonrpc", "Query"), 2);
    }
}
