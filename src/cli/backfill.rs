//! `mkts backfill polygon`: MarketStore's polygon `backfiller` binary as a subcommand. Minute bars, trades and
//! quotes of a date range over Polygon's REST API ([`crate::contrib::polygon_backfill`]) into a running server
//! (`--url grpc://host:5995`, written through its Flight operations layer, policy and replication included),
//! a data directory (`--dir`, the server stopped) or the data directory of a server's `mkts.yml` (`--config`,
//! MarketStore's `-config`; its `polygon` worker's `api_key`, `base_url` and `add_bar_tick_count` are the
//! defaults), in the buckets and schemas the `polygon` stream writes. Checkpoints (`--state-dir`, default
//! `~/.cache/mkts/backfill`) let a rerun continue where a killed run stopped; Ctrl-C stops after the page in
//! flight is written.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use arrow::array::{Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit, TimestampNanosecondType};
use indicatif::{ProgressBar, ProgressStyle};

use super::connect::{Client, Protocol, RemoteArgs};
use crate::contrib::feeder::{parse_duration, Stop};
use crate::contrib::polygon::{PolygonConfig, Secret, API_KEY_ENV, DEFAULT_URL};
use crate::contrib::polygon_backfill::{Backfill, Checkpoint, Done, Options, Progress, Store};
use crate::contrib::ContribError;
use crate::engine::{BucketKey, BucketSchema};

/// Providers `mkts backfill` knows.
#[derive(Debug, clap::Subcommand)]
pub enum BackfillCmd {
    /// Polygon (Massive) REST: minute aggregates, trades, quotes (MarketStore's polygon backfiller).
    Polygon(PolygonArgs),
}

/// Arguments of `mkts backfill polygon`.
#[derive(Debug, Clone, clap::Args)]
pub struct PolygonArgs {
    /// Tickers, comma separated (`AAPL,MSFT,BRK/A`).
    #[arg(long, value_delimiter = ',', required = true)]
    pub symbols: Vec<String>,
    /// First day (YYYY-MM-DD, UTC, included); default: a year ago.
    #[arg(long)]
    pub from: Option<String>,
    /// Last day (YYYY-MM-DD, UTC, not included); default: today.
    #[arg(long)]
    pub to: Option<String>,
    /// Backfill minute bars into <SYM>/1Min/OHLCV.
    #[arg(long)]
    pub bars: bool,
    /// Backfill trades into <SYM>/1Sec/TRADE.
    #[arg(long)]
    pub trades: bool,
    /// Backfill quotes into <SYM>/1Sec/QUOTE.
    #[arg(long)]
    pub quotes: bool,
    /// Polygon API key (better: $POLYGON_API_KEY, which stays out of the process list).
    #[arg(long = "api-key", alias = "apiKey", env = API_KEY_ENV, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Polygon's REST root (a proxy or a test server); default https://api.polygon.io.
    #[arg(long)]
    pub base_url: Option<String>,
    /// Rows per request (Polygon's `limit`, at most 50000).
    #[arg(long = "batch-size", alias = "batchSize", default_value_t = 50_000)]
    pub batch_size: usize,
    /// Bars not adjusted for splits.
    #[arg(long)]
    pub unadjusted: bool,
    /// Bars get a TickCnt int32 column (as the stream's add_bar_tick_count; a stored bucket decides).
    #[arg(long)]
    pub add_bar_tick_count: bool,
    /// Least time between requests (e.g. 250ms); 429s are retried after Retry-After either way.
    #[arg(long, default_value = "0ms")]
    pub request_interval: String,
    /// Server address: grpc://host:5995 or grpc+tls://host:port (Flight).
    #[arg(short = 'u', long, conflicts_with_all = ["dir", "config"], required_unless_present_any = ["dir", "config"])]
    pub url: Option<String>,
    /// Data directory to write into in-process (the server must be stopped).
    #[arg(short = 'd', long, conflicts_with = "config")]
    pub dir: Option<PathBuf>,
    /// A server's mkts.yml: write into its root_directory in-process (the server must be stopped), with its
    /// polygon worker's api_key, base_url and add_bar_tick_count as defaults.
    #[arg(short = 'c', long)]
    pub config: Option<PathBuf>,
    /// Where the per-range checkpoints that let a rerun continue are kept (default
    /// ~/.cache/mkts/backfill; `none`: not kept, a rerun compares with the stored rows from the start).
    #[arg(long)]
    pub state_dir: Option<String>,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

fn day(s: &str, what: &str) -> anyhow::Result<i64> {
    let d = chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").with_context(|| format!("--{what} {s:?}: use YYYY-MM-DD"))?;
    Ok(d.and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp()))
}

/// The CLI's client as the backfill's [`Store`].
struct ClientStore {
    rt: tokio::runtime::Runtime,
    client: Client,
    /// Where checkpoints are kept (`None`: not kept).
    state_dir: Option<PathBuf>,
    /// The server or data directory written to, as checkpoints name it.
    target: String,
    /// A failure to save a checkpoint was logged.
    warned: bool,
}

fn store_err(e: anyhow::Error) -> ContribError {
    ContribError::Store(format!("{e:#}"))
}

/// Unix seconds of row `i` of a query's `Epoch` column (a timestamp or int64 seconds); `None` when null.
fn epoch_at(col: &dyn Array, i: usize) -> Result<Option<i64>, ContribError> {
    if col.is_null(i) {
        return Ok(None);
    }
    let ns = cast(col, &DataType::Timestamp(TimeUnit::Nanosecond, None)).map_err(|e| ContribError::Store(e.to_string()))?;
    let v = ns.as_any().downcast_ref::<arrow::array::PrimitiveArray<TimestampNanosecondType>>().ok_or_else(|| ContribError::Store("Epoch is not a time".into()))?;
    // int64 seconds cast to a timestamp are read as nanoseconds: keep them as they are.
    Ok(Some(if matches!(col.data_type(), DataType::Int64) { v.value(i) } else { v.value(i).div_euclid(1_000_000_000) }))
}

impl Store for ClientStore {
    fn schema(&mut self, key: &BucketKey) -> Result<Option<BucketSchema>, ContribError> {
        let client = &mut self.client;
        self.rt.block_on(async { client.bucket_schema(key).await.map_err(store_err) })
    }

    fn last_in(&mut self, key: &BucketKey, from: i64, to: i64) -> Result<Option<i64>, ContribError> {
        let client = &mut self.client;
        let sql = format!("SELECT max(\"Epoch\") AS \"Epoch\" FROM \"{key}\" WHERE \"Epoch\" >= to_timestamp({from}) AND \"Epoch\" < to_timestamp({to})");
        let (_, batches) = self.rt.block_on(async { client.sql(&sql).await.map_err(store_err) })?;
        match batches.iter().find(|b| b.num_rows() > 0) {
            Some(b) => epoch_at(b.column(0).as_ref(), 0),
            None => Ok(None),
        }
    }

    fn rows_between(&mut self, key: &BucketKey, from: i64, to: i64) -> Result<Vec<RecordBatch>, ContribError> {
        let client = &mut self.client;
        // `< to`, never `<= to - 1`: for a tick bucket the latter stops at (to - 1, 0 ns).
        let sql = format!("SELECT * FROM \"{key}\" WHERE \"Epoch\" >= to_timestamp({from}) AND \"Epoch\" < to_timestamp({to})");
        self.rt.block_on(async { client.sql(&sql).await.map(|(_, b)| b).map_err(store_err) })
    }

    fn write(&mut self, key: &BucketKey, batch: RecordBatch) -> Result<u64, ContribError> {
        let client = &mut self.client;
        let n = batch.num_rows() as u64;
        self.rt.block_on(async {
            let stream = futures::StreamExt::boxed(futures::stream::iter(vec![Ok(batch)]));
            let stored = client.write_stream(key, stream).await.map_err(|e| store_err(e.context(format!("writing {key}"))))?;
            Ok(if stored == 0 { n } else { stored })
        })
    }

    fn checkpoint(&mut self, id: &str) -> Option<Checkpoint> {
        let path = self.checkpoint_path(id)?;
        let text = std::fs::read_to_string(&path).ok()?;
        let (target, c): (String, Checkpoint) = serde_json::from_str(&text).ok()?;
        (target == self.target).then_some(c)
    }

    fn save_checkpoint(&mut self, id: &str, c: &Checkpoint) {
        let Some(path) = self.checkpoint_path(id) else { return };
        let tmp = path.with_extension("tmp");
        let text = serde_json::json!([self.target, c]).to_string();
        let r = std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).and_then(|_| std::fs::write(&tmp, text)).and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = r
            && !self.warned
        {
            self.warned = true;
            tracing::warn!("cannot save the backfill checkpoint {}: {e} (a rerun compares with the stored rows instead)", path.display());
        }
    }
}

impl ClientStore {
    /// `<state dir>/<target>__<symbol>__<kind>__<from>_<to>.json`, names made of letters, digits, `.`, `-`, `_`.
    fn checkpoint_path(&self, id: &str) -> Option<PathBuf> {
        let dir = self.state_dir.as_ref()?;
        let clean = |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect::<String>();
        let mut name = format!("{}__{}", clean(&self.target), clean(id));
        if name.len() > 200 {
            name = name.split_off(name.len() - 200);
        }
        Some(dir.join(format!("{name}.json")))
    }
}

/// The `polygon` worker's settings in a server's config file, if it has one.
fn worker_config(path: &Path, key: Option<&str>) -> anyhow::Result<(PathBuf, Option<PolygonConfig>)> {
    let cfg = crate::config::Config::load(path).with_context(|| format!("cannot load {}", path.display()))?;
    let worker = cfg.bgworkers.iter().find(|w| crate::contrib::module_name(&w.module) == "polygon");
    let polygon = match worker {
        Some(w) => Some(
            PolygonConfig::from_json(&w.config, |k| if k == API_KEY_ENV { key.map(str::to_string) } else { None })
                .with_context(|| format!("the polygon worker of {}", path.display()))?,
        ),
        None => None,
    };
    Ok((cfg.root_directory.clone(), polygon))
}

/// What the progress bar shows: the share of every symbol's range that is done.
struct Bar {
    pb: ProgressBar,
    from: i64,
    span: u64,
    units: u64,
    rows: u64,
}

impl Bar {
    fn new(units: u64, from: i64, to: i64) -> Bar {
        let span = (to - from).max(1) as u64;
        let pb = ProgressBar::new(units * span);
        if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {percent}% (eta {eta}) {msg}") {
            pb.set_style(style);
        }
        pb.enable_steady_tick(Duration::from_millis(200));
        Bar { pb, from, span, units: 0, rows: 0 }
    }

    fn at(&self, t: i64) {
        let within = (t - self.from).clamp(0, self.span as i64) as u64;
        self.pb.set_position(self.units.saturating_sub(1) * self.span + within);
    }

    fn event(&mut self, p: Progress<'_>) {
        match p {
            Progress::Begin { symbol, kind, start } => {
                self.units += 1;
                self.pb.set_message(format!("{symbol} {kind}, {} rows", self.rows));
                self.at(start);
            }
            Progress::Page { rows, upto } => {
                self.rows += rows;
                self.at(upto);
                let msg = self.pb.message();
                let head = msg.rsplit_once(", ").map_or(msg.as_str(), |(h, _)| h).to_string();
                self.pb.set_message(format!("{head}, {} rows", self.rows));
            }
            Progress::Done(d) => {
                self.pb.set_position(self.units * self.span);
                self.line(&d.line());
            }
        }
    }

    /// A line above the bar (on stderr when there is no terminal to draw the bar on).
    fn line(&self, s: &str) {
        if self.pb.is_hidden() {
            eprintln!("{s}");
        } else {
            self.pb.println(s);
        }
    }
}

/// Run `mkts backfill polygon`.
pub fn run_polygon(args: PolygonArgs) -> anyhow::Result<()> {
    if !(args.bars || args.trades || args.quotes) {
        bail!("nothing to backfill: give at least one of --bars, --trades, --quotes");
    }
    let flag_key = args.api_key.as_deref().map(str::trim).filter(|k| !k.is_empty());
    let (config_root, worker) = match &args.config {
        Some(p) => {
            let (root, w) = worker_config(p, flag_key)?;
            (Some(root), w)
        }
        None => (None, None),
    };
    let key = match (flag_key, &worker) {
        (Some(k), _) => k.to_string(),
        (None, Some(w)) => w.api_key.expose().to_string(),
        (None, None) => bail!("no API key: set ${API_KEY_ENV} (or --api-key)"),
    };
    let today = chrono::Utc::now().date_naive().and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp());
    let from = args.from.as_deref().map(|s| day(s, "from")).transpose()?.unwrap_or(today - 365 * 86_400);
    let to = args.to.as_deref().map(|s| day(s, "to")).transpose()?.unwrap_or(today);
    if to <= from {
        bail!("--to must be after --from");
    }
    let base_url = args.base_url.clone().or_else(|| worker.as_ref().map(|w| w.base_url.clone())).unwrap_or_else(|| DEFAULT_URL.into());
    let base_url = base_url.trim().trim_end_matches('/').to_string();
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        bail!("--base-url must start with http:// or https://");
    }
    let request_interval = parse_duration(&serde_json::Value::String(args.request_interval.clone())).ok_or_else(|| anyhow!("--request-interval {:?}: use e.g. 250ms", args.request_interval))?;
    let symbols: Vec<String> = args.symbols.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    if symbols.is_empty() {
        bail!("--symbols is empty");
    }
    let opts = Options {
        symbols,
        from,
        to,
        bars: args.bars,
        trades: args.trades,
        quotes: args.quotes,
        api_key: Secret::new(key),
        base_url,
        limit: args.batch_size.clamp(1, 50_000),
        adjusted: !args.unadjusted,
        tick_count: args.add_bar_tick_count || worker.as_ref().is_some_and(|w| w.add_bar_tick_count),
        timeout: Duration::from_secs(60),
        request_interval,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    if let Some(u) = &args.url
        && matches!(Protocol::of_url(u)?, Protocol::JsonRpc(_))
    {
        bail!("--url {u}: the backfill writes over Flight; give the gRPC port (grpc://host:5995), --dir or --config");
    }
    let dir = args.dir.clone().or(config_root);
    let client = rt.block_on(Client::from_args(args.url.as_deref(), dir.as_deref(), &args.remote))?;
    let stop = Arc::new(Stop::default());
    {
        let stop = stop.clone();
        rt.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.stop();
            }
        });
    }
    let target = match (&args.url, &dir) {
        (Some(u), _) => u.trim().to_string(),
        (None, Some(d)) => std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()).display().to_string(),
        (None, None) => String::new(),
    };
    let state_dir = match args.state_dir.as_deref() {
        Some("none") => None,
        Some(d) => Some(PathBuf::from(d)),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/mkts/backfill")),
    };
    let mut store = ClientStore { rt, client, state_dir, target, warned: false };
    let bf = Backfill::new(&opts, &stop);
    let kinds = [opts.bars, opts.trades, opts.quotes].iter().filter(|b| **b).count() as u64;
    let mut bar = Bar::new(opts.symbols.len() as u64 * kinds, from, to);
    let t0 = Instant::now();
    let res = bf.run(&mut store, &mut |p| bar.event(p));
    bar.pb.finish_and_clear();
    let ClientStore { rt, client, .. } = store;
    rt.block_on(client.close())?;
    let done = match res {
        Ok(done) => done,
        Err(ContribError::Auth { msg, .. }) => bail!("polygon refused the API key ({msg}); check ${API_KEY_ENV} / --api-key"),
        Err(e @ (ContribError::Http { .. } | ContribError::Transport { .. })) => bail!("{e} (the rows stored so far are kept: rerun the same command to continue)"),
        Err(e) => bail!("{e}"),
    };
    eprintln!("{}", summary(&done, bf.requests(), t0.elapsed()));
    if stop.is_stopped() {
        bail!("interrupted: rerun the same command to continue after the stored rows");
    }
    Ok(())
}

/// The closing line: rows per data type, pages, requests (retries), time and rate.
fn summary(done: &[Done], requests: u64, elapsed: Duration) -> String {
    let rows = |k: &str| done.iter().filter(|d| d.kind == k).map(|d| d.rows).sum::<u64>();
    let total: u64 = done.iter().map(|d| d.rows).sum();
    let pages: u64 = done.iter().map(|d| d.pages).sum();
    let secs = elapsed.as_secs_f64().max(1e-3);
    format!(
        "backfill done: {total} rows (bars {}, trades {}, quotes {}) for {} symbols in {pages} pages, {requests} requests ({} retried), {:.1}s, {:.0} rows/s",
        rows("bars"),
        rows("trades"),
        rows("quotes"),
        done.iter().map(|d| d.symbol.as_str()).collect::<std::collections::BTreeSet<_>>().len(),
        requests.saturating_sub(pages),
        secs,
        total as f64 / secs
    )
}
