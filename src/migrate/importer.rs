//! The `mkts import-marketstore` command: read a MarketStore root bucket by bucket (its `.bin` files with
//! its WAL replayed onto them), write each bucket through the operations layer, report.
//!
//! Idempotent and resumable: fixed buckets are upserts (rewriting a row leaves the same row); a variable
//! (tick) bucket keeps every row written, so each of its UTC years is compared by row count first — equal:
//! already imported, skipped; zero: written; anything else (a killed import): the year is deleted and
//! written again, so a rerun after a kill ends with exactly the MarketStore rows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use arrow::array::{Array, Int64Array, RecordBatch};
use futures::StreamExt;
use serde_json::json;

use super::catalog::{self, DataFile};
use super::image::{self, FileImage, Settings};
use super::wal::{self, WalWrite};
use super::{MigrateError, Problem};
use crate::cli::connect::{Client, Protocol};
use crate::engine::{BucketKey, BucketSchema, RecordKind, TimePoint};
use crate::service::{Caller, Interface};

/// Arguments of `mkts import-marketstore`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportMarketstoreArgs {
    /// MarketStore's data directory (its `root_directory`, the one holding `category_name` and WAL files).
    pub source: PathBuf,
    /// mkts.yml: its `root_directory` is where the data goes (unless --url), and its MarketStore keys
    /// `timezone` and `disable_variable_compression` say how MarketStore wrote the files. Default: ./mkts.yml
    /// if present, else the embedded default.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Write to a running server over Flight instead (`grpc://host:5995`).
    #[arg(long, short = 'u')]
    pub url: Option<String>,
    /// Import nothing: compare row counts and a checksum of every column between the MarketStore files and
    /// the imported buckets.
    #[arg(long)]
    pub verify: bool,
    /// TLS CA and user for --url, as for `mkts connect`.
    #[command(flatten)]
    pub remote: crate::cli::connect::RemoteArgs,
}

/// A MarketStore bucket as its reader returns it: all years, WAL replayed.
pub struct SourceBucket {
    pub key: BucketKey,
    pub schema: BucketSchema,
    pub years: Vec<i64>,
    pub batches: Vec<RecordBatch>,
    pub rows: usize,
    /// Bytes of its MarketStore files (for MB/s).
    pub file_bytes: u64,
    pub wal_rows: usize,
}

/// The tree and WAL writes of a MarketStore root, read bucket by bucket on demand.
pub struct Source {
    buckets: BTreeMap<String, Vec<DataFile>>,
    wal_writes: BTreeMap<String, Vec<(PathBuf, WalWrite)>>,
    pub settings: Settings,
    pub problems: Vec<Problem>,
}

impl Source {
    /// Walk the root and read its WAL files (TGDATA still to replay, grouped by data file in replay order).
    pub fn open(root: &Path, settings: Settings) -> Result<Source, MigrateError> {
        let tree = catalog::walk(root)?;
        let mut problems = tree.problems;
        let mut buckets: BTreeMap<String, Vec<DataFile>> = BTreeMap::new();
        for f in tree.files {
            buckets.entry(f.key.clone()).or_default().push(f);
        }
        let known: std::collections::HashSet<String> = buckets.values().flatten().map(|f| f.rel.clone()).collect();
        let mut wal_writes: BTreeMap<String, Vec<(PathBuf, WalWrite)>> = BTreeMap::new();
        for wf in &tree.wal_files {
            let bytes = std::fs::read(wf).map_err(|e| MigrateError::Io { path: wf.clone(), source: e })?;
            let r = wal::read(wf, &bytes);
            problems.extend(r.problems);
            for (_, writes) in r.groups {
                for w in writes {
                    let rel = w.key_path.trim_start_matches('/').to_string();
                    if !known.contains(&rel) {
                        problems.push(Problem::whole(wf, format!("write to {rel}, a data file that does not exist, skipped")));
                        continue;
                    }
                    let key = rel.rsplit_once('/').map(|(k, _)| k.to_string()).unwrap_or_default();
                    wal_writes.entry(key).or_default().push((wf.clone(), w));
                }
            }
        }
        Ok(Source { buckets, wal_writes, settings, problems })
    }

    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    pub fn keys(&self) -> Vec<String> {
        self.buckets.keys().cloned().collect()
    }

    /// Read one bucket; problems found go to `problems`. `None` when nothing of it can be imported.
    pub fn read_bucket(&self, key: &str, problems: &mut Vec<Problem>) -> Option<SourceBucket> {
        let files = self.buckets.get(key)?;
        let bkey = match BucketKey::parse(key) {
            Ok(k) => k,
            Err(e) => {
                problems.push(Problem::whole(files[0].path.parent().unwrap_or(Path::new(key)), format!("bucket {key} skipped: {e}")));
                return None;
            }
        };
        let mut images: Vec<FileImage> = Vec::new();
        for f in files {
            match FileImage::load(f) {
                Ok(img) => images.push(img),
                Err(p) => problems.push(p),
            }
        }
        let first = images.first()?;
        let schema = image::bucket_schema(&first.header);
        if let Err(e) = schema.validate() {
            problems.push(Problem::whole(&first.file.path, format!("bucket {key} skipped: {e}")));
            return None;
        }
        let tf_ns = first.header.timeframe_ns;
        images.retain(|img| {
            let same = image::bucket_schema(&img.header) == schema && img.header.timeframe_ns == tf_ns;
            if !same {
                problems.push(Problem::at(&img.file.path, 0, "year skipped: its columns, types, record type or timeframe differ from the bucket's first year"));
            }
            same
        });
        if let Some(writes) = self.wal_writes.get(key) {
            for (wf, w) in writes {
                let rel = w.key_path.trim_start_matches('/');
                if let Some(img) = images.iter_mut().find(|i| i.file.rel == rel) {
                    if let Err(p) = img.apply(w, &self.settings, wf) {
                        problems.push(p);
                    }
                }
            }
        }
        let mut out = SourceBucket { key: bkey, schema, years: Vec::new(), batches: Vec::new(), rows: 0, file_bytes: 0, wal_rows: 0 };
        for img in &images {
            out.file_bytes += std::fs::metadata(&img.file.path).map(|m| m.len()).unwrap_or(0);
            out.wal_rows += img.wal_writes;
            let d = img.decode(&self.settings);
            problems.extend(d.problems);
            if let Some(b) = d.batch {
                out.rows += b.num_rows();
                out.batches.push(b);
            }
            out.years.push(img.file.year);
        }
        Some(out)
    }
}

/// `strconv.ParseBool`, which MarketStore uses for its boolean keys.
fn go_bool(key: &str, v: &serde_json::Value) -> Result<bool, MigrateError> {
    match v {
        serde_json::Value::Bool(b) => Ok(*b),
        serde_json::Value::Number(n) if n.as_i64() == Some(1) => Ok(true),
        serde_json::Value::Number(n) if n.as_i64() == Some(0) => Ok(false),
        serde_json::Value::String(s) => match s.as_str() {
            "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
            "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
            _ => Err(MigrateError::Config(format!("{key}: {s:?} is not a boolean"))),
        },
        other => Err(MigrateError::Config(format!("{key}: {other} is not a boolean"))),
    }
}

/// Where to write, and how MarketStore wrote: from --config/--url.
struct Target {
    dir: Option<PathBuf>,
    url: Option<String>,
    remote: crate::cli::connect::RemoteArgs,
    settings: Settings,
}

fn target(args: &ImportMarketstoreArgs) -> Result<Target, MigrateError> {
    let cfg_path = match (&args.config, &args.url) {
        (Some(p), _) => Some(p.clone()),
        (None, None) if Path::new("mkts.yml").exists() => Some(PathBuf::from("mkts.yml")),
        _ => None,
    };
    let (cfg, text) = match &cfg_path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| MigrateError::Io { path: p.clone(), source: e })?;
            let cfg = crate::config::Config::load(p).map_err(|e| MigrateError::Config(format!("{}: {e}", p.display())))?;
            (cfg, text)
        }
        None => {
            let cwd = std::env::current_dir().map_err(|e| MigrateError::Io { path: ".".into(), source: e })?;
            let cfg = crate::config::Config::parse(crate::config::DEFAULT_YAML, &cwd).map_err(|e| MigrateError::Config(e.to_string()))?;
            (cfg, String::new())
        }
    };
    // The config type keeps `disable_variable_compression` only as a warning (mkts has no such storage
    // switch); the importer needs its value, so it reads the key itself.
    let raw: BTreeMap<String, serde_json::Value> = if text.trim().is_empty() {
        BTreeMap::new()
    } else {
        serde_saphyr::from_str(&text).map_err(|e| MigrateError::Config(format!("config: {e}")))?
    };
    let disabled = match raw.get("disable_variable_compression") {
        Some(v) if !v.is_null() => go_bool("disable_variable_compression", v)?,
        _ => false,
    };
    let settings = Settings { compressed: !disabled, tz: cfg.tz() };
    Ok(Target { dir: if args.url.is_some() { None } else { Some(cfg.root_directory.clone()) }, url: args.url.clone(), remote: args.remote.clone(), settings })
}

fn caller() -> Caller {
    Caller::anonymous(Interface::Cli)
}

fn dest(e: anyhow::Error) -> MigrateError {
    MigrateError::Destination(format!("{e:#}"))
}

async fn connect(t: &Target) -> Result<Client, MigrateError> {
    match (&t.url, &t.dir) {
        (Some(u), _) => match Protocol::detect(u).await.map_err(|e| MigrateError::Config(format!("{e:#}")))? {
            // The import counts and deletes rows (SQL, delete_range), which MarketStore's JSON-RPC cannot.
            Protocol::JsonRpc(_) => Err(MigrateError::Config(format!("--url {u} speaks JSON-RPC; import-marketstore writes over Flight: give the gRPC port, grpc://host:5995"))),
            Protocol::FlightSql(f) => Client::connect_flight(&f, &t.remote).await.map_err(dest),
        },
        (None, Some(d)) => {
            std::fs::create_dir_all(d).map_err(|e| MigrateError::Io { path: d.clone(), source: e })?;
            Client::open_in_zone(d, t.settings.tz).map_err(dest)
        }
        (None, None) => Err(MigrateError::Config("no destination".into())),
    }
}

/// UTC year bounds `[start, end)` in epoch seconds.
fn year_bounds(y: i32) -> (i64, i64) {
    use chrono::TimeZone;
    let s = chrono::Utc.with_ymd_and_hms(y, 1, 1, 0, 0, 0).single().map(|t| t.timestamp()).unwrap_or(i64::MIN);
    let e = chrono::Utc.with_ymd_and_hms(y + 1, 1, 1, 0, 0, 0).single().map(|t| t.timestamp()).unwrap_or(i64::MAX);
    (s, e)
}

fn utc_year(epoch: i64) -> i32 {
    chrono::DateTime::from_timestamp(epoch, 0).map(|t| chrono::Datelike::year(&t)).unwrap_or(0)
}

/// Rows of `key` whose Epoch lies in `[start, end)`.
async fn count_rows(client: &mut Client, key: &BucketKey, start: i64, end: i64) -> Result<u64, MigrateError> {
    let sql = format!("SELECT count(*) AS n FROM \"{key}\" WHERE \"Epoch\" >= to_timestamp({start}) AND \"Epoch\" < to_timestamp({end})");
    let (_, batches) = client.sql(&sql).await.map_err(dest)?;
    let n = batches
        .first()
        .and_then(|b| b.column(0).as_any().downcast_ref::<Int64Array>().map(|a| if a.is_empty() { 0 } else { a.value(0) }))
        .unwrap_or(0);
    Ok(n.max(0) as u64)
}

async fn delete_range(client: &mut Client, key: &BucketKey, start: i64, end: i64) -> Result<(), MigrateError> {
    let (from, to) = (TimePoint { secs: start, nanos: 0 }, TimePoint { secs: end - 1, nanos: 999_999_999 });
    match client {
        Client::Local { service } => service.delete_range(&caller(), key, from, to).await.map(|_| ()).map_err(|e| MigrateError::Destination(e.describe())),
        Client::Rpc { .. } => Err(MigrateError::Config("import-marketstore needs a Flight (grpc://) destination".into())),
        Client::Remote { flight, .. } => {
            let body = json!({"key": key.to_string(), "epoch_start": start, "epoch_end": end - 1});
            let mut s = flight
                .do_action(arrow_flight::Action::new("delete_range", body.to_string()))
                .await
                .map_err(|e| dest(crate::cli::connect::remote(&e)))?;
            while let Some(r) = s.next().await {
                r.map_err(|e| dest(crate::cli::connect::remote(&e)))?;
            }
            Ok(())
        }
    }
}

/// Rows per write: large enough for the engine's bulk-append path, far below the 1 GiB write limit.
const WRITE_ROWS: usize = 1 << 20;

async fn write_rows(client: &mut Client, key: &BucketKey, batches: Vec<RecordBatch>) -> Result<u64, MigrateError> {
    let mut parts = Vec::new();
    for b in batches {
        let mut off = 0;
        while off < b.num_rows() {
            let n = WRITE_ROWS.min(b.num_rows() - off);
            parts.push(Ok(b.slice(off, n)));
            off += n;
        }
    }
    client.write_stream(key, futures::stream::iter(parts).boxed()).await.map_err(dest)
}

/// Import one bucket; returns rows now in place for it.
async fn import_bucket(client: &mut Client, b: &SourceBucket, problems: &mut Vec<Problem>, src: &Path) -> Result<u64, MigrateError> {
    match client.bucket_schema(&b.key).await.map_err(dest)? {
        None => client.create(&b.key, b.schema.clone()).await.map_err(dest)?,
        Some(s) if s == b.schema => {}
        Some(s) => {
            problems.push(Problem::whole(src.join(b.key.to_string()), format!(
                "bucket skipped: it exists in the destination as {:?} {:?}, MarketStore has {:?} {:?}",
                s.kind, s.columns, b.schema.kind, b.schema.columns)));
            return Ok(0);
        }
    }
    if b.schema.kind == RecordKind::Fixed {
        return write_rows(client, &b.key, b.batches.clone()).await;
    }
    // Ticks: split by UTC year (the destination's partitions), compare counts, replace a partial year.
    let mut by_year: BTreeMap<i32, Vec<RecordBatch>> = BTreeMap::new();
    for batch in &b.batches {
        let epochs = batch.column(0).as_any().downcast_ref::<Int64Array>().cloned().unwrap_or_else(|| Int64Array::from(Vec::<i64>::new()));
        let mut run_start = 0;
        while run_start < batch.num_rows() {
            let y = utc_year(epochs.value(run_start));
            let (_, end) = year_bounds(y);
            let mut i = run_start;
            while i < batch.num_rows() && epochs.value(i) < end && utc_year(epochs.value(i)) == y {
                i += 1;
            }
            by_year.entry(y).or_default().push(batch.slice(run_start, i - run_start));
            run_start = i;
        }
    }
    let mut total = 0;
    for (y, batches) in by_year {
        let want: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        let (start, end) = year_bounds(y);
        let have = count_rows(client, &b.key, start, end).await?;
        if have == want {
            total += want;
            continue;
        }
        if have > 0 {
            delete_range(client, &b.key, start, end).await?;
        }
        total += write_rows(client, &b.key, batches).await?;
    }
    Ok(total)
}

fn years_text(years: &[i64]) -> String {
    match (years.first(), years.last()) {
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) if (b - a) as usize + 1 == years.len() => format!("{a}-{b}"),
        _ => years.iter().map(|y| y.to_string()).collect::<Vec<_>>().join(","),
    }
}

fn report_problems(problems: &[Problem]) {
    for p in problems {
        eprintln!("skipped: {p}");
    }
}

/// Run `mkts import-marketstore`. `Err(MigrateError::Incomplete)` when something was skipped (the rest is
/// imported) or, with `--verify`, when anything differs.
pub fn run(args: ImportMarketstoreArgs) -> Result<(), MigrateError> {
    let t = target(&args)?;
    let source = Source::open(&args.source, t.settings)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| MigrateError::Io { path: PathBuf::from("tokio runtime"), source: e })?;
    rt.block_on(async move {
        let mut client = connect(&t).await?;
        let result = if args.verify {
            super::verify::verify(&mut client, &source, &args.source).await
        } else {
            import(&mut client, &source, &args.source).await
        };
        let closed = client.close().await.map_err(dest);
        result.and(closed.map(|_| ()))?;
        Ok(())
    })?;
    Ok(())
}

async fn import(client: &mut Client, source: &Source, root: &Path) -> Result<(), MigrateError> {
    let started = Instant::now();
    let mut problems = source.problems.clone();
    let bar = indicatif::ProgressBar::new(source.bucket_count() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} buckets, {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut table = Vec::new();
    let (mut rows_total, mut bytes_total, mut wal_total) = (0u64, 0u64, 0usize);
    for key in source.keys() {
        let t0 = Instant::now();
        bar.set_message(format!("{rows_total} rows; reading {key}"));
        let Some(b) = source.read_bucket(&key, &mut problems) else {
            bar.inc(1);
            continue;
        };
        bar.set_message(format!("{rows_total} rows; writing {key} ({} rows)", b.rows));
        let n = import_bucket(client, &b, &mut problems, root).await?;
        rows_total += n;
        bytes_total += b.file_bytes;
        wal_total += b.wal_rows;
        table.push((key, years_text(&b.years), n, t0.elapsed().as_millis()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let w = table.iter().map(|r| r.0.len()).max().unwrap_or(6).max(6);
    println!("{:<w$}  {:<12}  {:>12}  {:>8}", "bucket", "years", "rows", "ms");
    for (k, y, n, ms) in &table {
        println!("{k:<w$}  {y:<12}  {n:>12}  {ms:>8}");
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "total: {rows_total} rows in {} buckets ({wal_total} from the WAL) in {secs:.2} s: {:.0} rows/s, {:.1} MB/s of MarketStore files; {} skipped",
        table.len(),
        rows_total as f64 / secs,
        bytes_total as f64 / 1e6 / secs,
        problems.len()
    );
    report_problems(&problems);
    if problems.is_empty() { Ok(()) } else { Err(MigrateError::Incomplete(problems.len())) }
}
