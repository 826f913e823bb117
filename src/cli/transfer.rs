//! `mkts import` / `mkts export`: CSV and Parquet in and out of buckets, over a server (`--url`) or an
//! embedded engine (`--dir`), with a progress bar and a throughput summary. The CSV reader also serves the
//! shell's `\load` and understands MarketStore's control file (YAML):
//!
//! ```yaml
//! firstRowHasColumnNames: true      # default false (then columnNameMap must name the columns)
//! timeFormat: "1/2/2006 3:04:05 PM" # Go layout (the default), or "timestamp" = Unix seconds[.fraction]
//! timeZone: America/New_York        # IANA zone for times without an offset (default UTC)
//! columnNameMap:                    # column position (0-based) -> name; a list means positions 0, 1, 2, ...
//!   0: Epoch-date
//!   1: Epoch-time
//! ```
//!
//! Header names are trimmed of spaces (`Epoch, Bid, Ask` names `Bid`), as MarketStore's loader does. A time
//! longer than `timeFormat` may end in a sub-second field after a space, as MarketStore's loader reads it
//! (` 383000`: microseconds, ` 14`: milliseconds; see `split_subsecond`), or in a `.fraction`.
//! Columns match bucket columns by name (case-insensitive); `Epoch` holds the time, or `Epoch-date` and
//! `Epoch-time` hold its two halves. Without a control file the first row must be a header and `Epoch` may be
//! Unix seconds (fractions allowed), RFC 3339 or `YYYY-MM-DD[ HH:MM:SS]`. When the bucket does not exist its
//! column types are inferred (int64, float64, else string).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use arrow::array::{ArrayRef, AsArray, RecordBatch, StringArray, TimestampNanosecondArray};
use arrow::compute::{cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::{NaiveDate, NaiveDateTime, TimeZone};
use futures::stream::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use super::connect::{Batches, Client};
use crate::engine::{BucketKey, BucketSchema, EPOCH, NANOSECONDS};

/// Arguments of `mkts import`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// Bucket to write, SYMBOL/TIMEFRAME/ATTRGROUP (created from the file's columns when absent).
    pub key: String,
    /// Input file: `.csv` or `.parquet`.
    pub file: PathBuf,
    /// MarketStore control file (YAML) for CSV input.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Server address, as for `mkts connect`: `http(s)://host:5993` (JSON-RPC), `grpc(+tls)://host:5995`
    /// (Flight), or a bare `host:port`.
    #[arg(short = 'u', long, conflicts_with = "dir", required_unless_present = "dir")]
    pub url: Option<String>,
    /// Data directory to open in-process.
    #[arg(short = 'd', long)]
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    pub remote: super::connect::RemoteArgs,
}

/// Arguments of `mkts export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// Output file: `.csv` or `.parquet` (or set --format).
    pub output: PathBuf,
    /// Bucket or table to export (`AAPL/1Min/OHLCV`, `*/1Min/OHLCV`).
    #[arg(long, conflicts_with = "sql", required_unless_present = "sql")]
    pub key: Option<String>,
    /// A SQL query whose result is exported.
    #[arg(long)]
    pub sql: Option<String>,
    /// With --key: first time (inclusive): 2024-01-02, RFC 3339 or Unix seconds.
    #[arg(long)]
    pub start: Option<String>,
    /// With --key: last time (inclusive).
    #[arg(long)]
    pub end: Option<String>,
    /// csv or parquet (default: from the output file's extension).
    #[arg(long)]
    pub format: Option<String>,
    /// Server address, as for `mkts connect`: `http(s)://host:5993` (JSON-RPC), `grpc(+tls)://host:5995`
    /// (Flight), or a bare `host:port`.
    #[arg(short = 'u', long, conflicts_with = "dir", required_unless_present = "dir")]
    pub url: Option<String>,
    /// Data directory to open in-process.
    #[arg(short = 'd', long)]
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    pub remote: super::connect::RemoteArgs,
}

/// MarketStore's CSV control file.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ControlFile {
    #[serde(rename = "firstRowHasColumnNames", default)]
    pub first_row_has_column_names: bool,
    #[serde(rename = "timeFormat", default)]
    pub time_format: Option<String>,
    #[serde(rename = "timeZone", default)]
    pub time_zone: Option<String>,
    #[serde(rename = "columnNameMap", default)]
    pub column_name_map: Option<NameMap>,
}

/// `columnNameMap`: a list (positions 0..) or a map of positions to names.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum NameMap {
    List(Vec<String>),
    Map(BTreeMap<usize, String>),
}

impl NameMap {
    fn get(&self, i: usize) -> Option<&str> {
        match self {
            NameMap::List(v) => v.get(i).map(String::as_str),
            NameMap::Map(m) => m.get(&i).map(String::as_str),
        }
    }
}

impl ControlFile {
    pub fn load(path: &Path) -> anyhow::Result<ControlFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read control file {}", path.display()))?;
        serde_saphyr::from_str(&text).map_err(|e| anyhow!("control file {}: {e}", path.display()))
    }
}

/// Translate a Go time layout (`2006-01-02 15:04:05`) into a chrono format string.
pub fn go_layout_to_chrono(layout: &str) -> String {
    const TOKENS: &[(&str, &str)] = &[
        ("January", "%B"),
        ("Monday", "%A"),
        ("2006", "%Y"),
        ("-07:00", "%:z"),
        ("Z07:00", "%:z"),
        ("-0700", "%z"),
        ("Z0700", "%z"),
        (".000000000", "%.f"),
        (".999999999", "%.f"),
        (".000000", "%.f"),
        (".999999", "%.f"),
        (".000", "%.f"),
        (".999", "%.f"),
        ("Jan", "%b"),
        ("Mon", "%a"),
        ("MST", "%Z"),
        ("01", "%m"),
        ("02", "%d"),
        ("_2", "%e"),
        ("06", "%y"),
        ("15", "%H"),
        ("03", "%I"),
        ("04", "%M"),
        ("05", "%S"),
        ("PM", "%p"),
        ("pm", "%P"),
        ("1", "%m"),
        ("2", "%d"),
        ("3", "%I"),
        ("4", "%M"),
        ("5", "%S"),
    ];
    let mut out = String::new();
    let mut rest = layout;
    'outer: while !rest.is_empty() {
        for (go, ch) in TOKENS {
            if let Some(r) = rest.strip_prefix(go) {
                out.push_str(ch);
                rest = r;
                continue 'outer;
            }
        }
        let c = rest.chars().next().unwrap_or(' ');
        if c == '%' {
            out.push_str("%%");
        } else {
            out.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// How CSV times are parsed.
#[derive(Debug, Clone)]
enum TimeParser {
    /// Unix seconds with optional fraction.
    Unix,
    /// chrono format; `tz` applies when the format has no offset.
    Format { fmt: String, has_zone: bool, date_only: bool, tz: chrono_tz::Tz },
    /// No control file: try the usual forms.
    Auto,
}

impl TimeParser {
    fn from_control(c: Option<&ControlFile>) -> anyhow::Result<TimeParser> {
        let Some(c) = c else { return Ok(TimeParser::Auto) };
        let tz: chrono_tz::Tz = match &c.time_zone {
            Some(z) => z.parse().map_err(|_| anyhow!("unknown timeZone {z:?}"))?,
            None => chrono_tz::UTC,
        };
        let layout = c.time_format.clone().unwrap_or_else(|| "1/2/2006 3:04:05 PM".to_string());
        if layout.eq_ignore_ascii_case("timestamp") || layout.eq_ignore_ascii_case("unix") {
            return Ok(TimeParser::Unix);
        }
        let fmt = go_layout_to_chrono(&layout);
        let has_zone = fmt.contains("%z") || fmt.contains("%:z");
        let date_only = !fmt.contains("%H") && !fmt.contains("%I");
        Ok(TimeParser::Format { fmt, has_zone, date_only, tz })
    }

    /// Nanoseconds since the epoch (UTC).
    ///
    /// With a `timeFormat`, a value that does not match it but ends in a sub-second field after the part
    /// that does is read as MarketStore's loader reads it: `20161230 21:59:20 383000` with layout
    /// `20060102 15:04:05` is 21:59:20.383. See [`split_subsecond`] for the field's forms.
    fn parse(&self, s: &str) -> anyhow::Result<i64> {
        let s = s.trim();
        let whole = self.parse_exact(s);
        if whole.is_ok() || !matches!(self, TimeParser::Format { .. }) {
            return whole;
        }
        let Some((head, sub)) = split_subsecond(s) else { return whole };
        let Ok(secs) = self.parse_exact(head) else { return whole };
        let sub = sub.with_context(|| format!("time {s:?}"))?;
        secs.checked_add(sub).ok_or_else(|| anyhow!("time {s:?} out of range"))
    }

    /// [`TimeParser::parse`] without the sub-second field.
    fn parse_exact(&self, s: &str) -> anyhow::Result<i64> {
        let ns = |d: chrono::DateTime<chrono::Utc>| d.timestamp_nanos_opt().ok_or_else(|| anyhow!("time {s:?} out of range"));
        match self {
            TimeParser::Unix => unix_nanos(s),
            TimeParser::Format { fmt, has_zone, date_only, tz } => {
                if *has_zone {
                    let d = chrono::DateTime::parse_from_str(s, fmt).with_context(|| format!("time {s:?} does not match {fmt:?}"))?;
                    return ns(d.with_timezone(&chrono::Utc));
                }
                let naive = if *date_only {
                    NaiveDate::parse_from_str(s, fmt).map(|d| d.and_hms_opt(0, 0, 0).unwrap_or_default())
                } else {
                    NaiveDateTime::parse_from_str(s, fmt)
                }
                .with_context(|| format!("time {s:?} does not match {fmt:?}"))?;
                let local = tz.from_local_datetime(&naive).earliest().ok_or_else(|| anyhow!("time {s:?} does not exist in {tz}"))?;
                ns(local.with_timezone(&chrono::Utc))
            }
            TimeParser::Auto => Ok(crate::timestr::parse_time_nanos(s)?),
        }
    }
}

/// A trailing sub-second field of a time value: `(the time before it, its nanoseconds)`, or `None` when the
/// value does not end in one. MarketStore's loader accepts a field after the `timeFormat` part, separated
/// by a space, as milliseconds when it is short (` 14` = 14 ms; MarketStore's 3-character suffix) and as
/// microseconds when it has six digits (` 383000`); mkts takes nine digits as nanoseconds too, and a field
/// after `.` or `,` as a decimal fraction (`.5` = 500 ms). Other lengths are an error, not silently
/// dropped as MarketStore did.
fn split_subsecond(s: &str) -> Option<(&str, anyhow::Result<i64>)> {
    let digits_at = s.len() - s.bytes().rev().take_while(u8::is_ascii_digit).count();
    let digits = &s[digits_at..];
    let sep = s[..digits_at].chars().next_back()?;
    if digits.is_empty() || !matches!(sep, ' ' | '.' | ',') {
        return None;
    }
    let head = s[..digits_at - sep.len_utf8()].trim_end();
    if head.is_empty() {
        return None;
    }
    let n = digits.len() as u32;
    let value: Option<i64> = digits.parse().ok();
    let nanos = match (sep, n, value) {
        ('.' | ',', 1..=9, Some(v)) => Ok(v * 10i64.pow(9 - n)),
        (' ', 1..=3, Some(v)) => Ok(v * 1_000_000),
        (' ', 6, Some(v)) => Ok(v * 1_000),
        (' ', 9, Some(v)) => Ok(v),
        _ => Err(anyhow!(
            "the sub-second field {digits:?} after the timeFormat part must be 1-3 digits (milliseconds), 6 (microseconds) or 9 (nanoseconds), or a fraction after '.'"
        )),
    };
    Some((head, nanos))
}

fn unix_nanos(s: &str) -> anyhow::Result<i64> {
    crate::timestr::parse_unix_nanos(s).ok_or_else(|| anyhow!("not a Unix time: {s:?}"))?.map_err(Into::into)
}

/// Counts bytes read (for the progress bar).
struct Counting<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

fn progress(total: u64, unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    let tpl = if unit == "bytes" {
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}"
    } else {
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} rows ({per_sec}, eta {eta}) {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(tpl) {
        pb.set_style(style);
    }
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Throughput summary line.
fn summary(verb: &str, rows: u64, bytes: u64, what: &str, elapsed: Duration) -> String {
    let s = elapsed.as_secs_f64().max(1e-9);
    format!(
        "{verb} {rows} rows {what} in {:.3} s ({:.0} rows/s, {:.1} MB/s)",
        s,
        rows as f64 / s,
        bytes as f64 / s / 1e6
    )
}

/// The column plan for CSV input: which CSV column feeds which output column.
struct CsvPlan {
    /// Output schema written to the bucket (Epoch as timestamp[ns, UTC]).
    schema: SchemaRef,
    /// CSV column index of each data column of `schema` (after Epoch).
    sources: Vec<usize>,
    epoch: EpochSource,
    /// CSV column of an explicit `Nanoseconds` column.
    nanos: Option<usize>,
}

enum EpochSource {
    One(usize),
    DateTime(usize, usize),
}

fn plan_csv(names: &[String], sample: Option<&RecordBatch>, target: Option<&BucketSchema>) -> anyhow::Result<CsvPlan> {
    let find = |want: &str| names.iter().position(|n| n.eq_ignore_ascii_case(want));
    let epoch = match (find("Epoch"), find("Epoch-date"), find("Epoch-time")) {
        (Some(i), _, _) => EpochSource::One(i),
        (None, Some(d), Some(t)) => EpochSource::DateTime(d, t),
        (None, Some(d), None) => EpochSource::One(d),
        _ => bail!("no Epoch column (or Epoch-date and Epoch-time) among the CSV columns {names:?}; not enough info to map DB column names"),
    };
    let nanos = find(NANOSECONDS);
    let mut fields = vec![Field::new(EPOCH, DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())), false)];
    let mut sources = Vec::new();
    match target {
        Some(schema) => {
            for c in &schema.columns {
                let i = find(&c.name).ok_or_else(|| anyhow!("CSV has no column for bucket column {:?} (have {names:?})", c.name))?;
                fields.push(Field::new(&c.name, c.ty.arrow_type(), false));
                sources.push(i);
            }
        }
        None => {
            let special = |n: &str| ["epoch", "epoch-date", "epoch-time", "nanoseconds", "symbol"].contains(&n.to_ascii_lowercase().as_str());
            for (i, n) in names.iter().enumerate() {
                if special(n) {
                    continue;
                }
                let col = sample.map(|b| b.column(i).clone());
                let ty = infer_type(col.as_ref());
                fields.push(Field::new(n, ty, false));
                sources.push(i);
            }
        }
    }
    if nanos.is_some() {
        fields.push(Field::new(NANOSECONDS, DataType::Int32, false));
    }
    Ok(CsvPlan { schema: Arc::new(Schema::new(fields)), sources, epoch, nanos })
}

fn infer_type(col: Option<&ArrayRef>) -> DataType {
    let Some(col) = col else { return DataType::Float64 };
    let strict = CastOptions { safe: false, ..Default::default() };
    for ty in [DataType::Int64, DataType::Float64] {
        if cast_with_options(col, &ty, &strict).is_ok() {
            return ty;
        }
    }
    DataType::Utf8
}

fn convert_csv_batch(plan: &CsvPlan, parser: &TimeParser, b: &RecordBatch) -> anyhow::Result<RecordBatch> {
    let text = |i: usize| b.column(i).as_string::<i32>();
    let n = b.num_rows();
    let mut epochs = Vec::with_capacity(n);
    for r in 0..n {
        let s = match plan.epoch {
            EpochSource::One(i) => text(i).value(r).to_string(),
            EpochSource::DateTime(d, t) => format!("{} {}", text(d).value(r).trim(), text(t).value(r).trim()),
        };
        epochs.push(parser.parse(&s).with_context(|| format!("row {}", r + 1))?);
    }
    let mut cols: Vec<ArrayRef> = vec![Arc::new(TimestampNanosecondArray::from(epochs).with_timezone("UTC"))];
    let strict = CastOptions { safe: false, ..Default::default() };
    for (f, src) in plan.schema.fields().iter().skip(1).zip(&plan.sources) {
        let col = b.column(*src);
        let trimmed: StringArray = col.as_string::<i32>().iter().map(|v| v.map(str::trim)).collect();
        let c = cast_with_options(&trimmed, f.data_type(), &strict).with_context(|| format!("column {:?}", f.name()))?;
        cols.push(c);
    }
    if let Some(i) = plan.nanos {
        let ns = cast_with_options(b.column(i), &DataType::Int32, &strict).context("column Nanoseconds")?;
        // Explicit nanoseconds replace the fraction of the time column.
        let secs = cols[0].as_primitive::<arrow::datatypes::TimestampNanosecondType>();
        let ns = ns.as_primitive::<arrow::datatypes::Int32Type>();
        let combined: TimestampNanosecondArray = (0..n)
            .map(|r| {
                let whole = secs.value(r).div_euclid(1_000_000_000) * 1_000_000_000;
                whole.checked_add(ns.value(r) as i64).map(Some).ok_or_else(|| anyhow!("row {}: time with Nanoseconds {} out of range", r + 1, ns.value(r)))
            })
            .collect::<anyhow::Result<_>>()?;
        cols[0] = Arc::new(combined.with_timezone("UTC"));
        // The engine derives Nanoseconds from the timestamp; drop the explicit column.
        let schema = Arc::new(Schema::new(plan.schema.fields().iter().take(plan.schema.fields().len() - 1).cloned().collect::<Vec<_>>()));
        return Ok(RecordBatch::try_new(schema, cols)?);
    }
    Ok(RecordBatch::try_new(plan.schema.clone(), cols)?)
}

/// A CSV file as a lazy stream of bucket-ready batches.
pub(crate) fn csv_batches(path: &Path, control: Option<&ControlFile>, target: Option<&BucketSchema>, counter: Arc<AtomicU64>) -> anyhow::Result<Batches> {
    let has_header = control.map(|c| c.first_row_has_column_names).unwrap_or(true);
    let open = || File::open(path).with_context(|| format!("cannot open {}", path.display()));
    let (inferred, _) = arrow::csv::reader::Format::default()
        .with_header(has_header)
        .infer_schema(BufReader::new(open()?), Some(1))
        .with_context(|| format!("cannot read the first line of {}", path.display()))?;
    // Header names are trimmed of spaces, as MarketStore's loader does: `Epoch, Bid, Ask` names `Bid`.
    let mut names: Vec<String> = inferred.fields().iter().map(|f| f.name().trim().to_string()).collect();
    if let Some(map) = control.and_then(|c| c.column_name_map.as_ref()) {
        for (i, n) in names.iter_mut().enumerate() {
            if let Some(m) = map.get(i).map(str::trim).filter(|m| !m.is_empty()) {
                *n = m.to_string();
            }
        }
    } else if !has_header {
        bail!("the control file says the first row has no column names and has no columnNameMap: not enough info to map DB column names");
    }
    let text_schema = Arc::new(Schema::new(names.iter().map(|n| Field::new(n, DataType::Utf8, true)).collect::<Vec<_>>()));
    let reader = arrow::csv::ReaderBuilder::new(text_schema.clone())
        .with_header(has_header)
        .with_batch_size(65_536)
        .build(Counting { inner: BufReader::with_capacity(1 << 20, open()?), n: counter })?;
    let parser = TimeParser::from_control(control)?;
    let target = target.cloned();
    let mut plan: Option<CsvPlan> = None;
    let iter = reader.map(move |b| -> anyhow::Result<RecordBatch> {
        let b = b?;
        if plan.is_none() {
            plan = Some(plan_csv(&names, Some(&b), target.as_ref())?);
        }
        let p = plan.as_ref().ok_or_else(|| anyhow!("no column plan"))?;
        convert_csv_batch(p, &parser, &b)
    });
    Ok(futures::stream::iter(iter).boxed())
}

/// Import a CSV or Parquet file into a bucket; returns the summary line. Used by `mkts import` and `\load`.
pub async fn import_file(client: &mut Client, key: &BucketKey, file: &Path, control: Option<&Path>, quiet: bool) -> anyhow::Result<String> {
    let started = Instant::now();
    let size = std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?.len();
    let target = client.bucket_schema(key).await?;
    let is_parquet = file.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("parquet") || e.eq_ignore_ascii_case("pq"));
    let counter = Arc::new(AtomicU64::new(0));
    let pb = if quiet { ProgressBar::hidden() } else { progress(size, "bytes") };
    let batches: Batches = if is_parquet {
        let f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)?;
        let total_rows = builder.metadata().file_metadata().num_rows().max(1) as u64;
        let reader = builder.with_batch_size(65_536).build()?;
        let counter = counter.clone();
        let mut seen = 0u64;
        futures::stream::iter(reader.map(move |b| {
            let b = b?;
            seen += b.num_rows() as u64;
            counter.store(size.saturating_mul(seen) / total_rows, Ordering::Relaxed);
            Ok(b)
        }))
        .boxed()
    } else {
        let ctl = control.map(ControlFile::load).transpose()?;
        csv_batches(file, ctl.as_ref(), target.as_ref(), counter.clone())?
    };
    let rows_in = Arc::new(AtomicU64::new(0));
    let (pb2, counter2, rows2) = (pb.clone(), counter.clone(), rows_in.clone());
    let batches = batches
        .inspect(move |b| {
            if let Ok(b) = b {
                rows2.fetch_add(b.num_rows() as u64, Ordering::Relaxed);
            }
            pb2.set_position(counter2.load(Ordering::Relaxed));
        })
        .boxed();
    let stored = client.write_stream(key, batches).await;
    pb.finish_and_clear();
    let stored = stored?;
    Ok(summary("imported", rows_in.load(Ordering::Relaxed), size, &format!("into {key} ({stored} stored)"), started.elapsed()))
}

/// Run `mkts import`.
pub fn run_import(args: ImportArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let key = BucketKey::parse(&args.key)?;
        let mut client = Client::from_args(args.url.as_deref(), args.dir.as_deref(), &args.remote).await?;
        let r = import_file(&mut client, &key, &args.file, args.control.as_deref(), false).await;
        client.close().await?;
        eprintln!("{}", r?);
        Ok(())
    })
}

/// The query an export runs.
pub fn export_sql(args: &ExportArgs) -> anyhow::Result<String> {
    if let Some(sql) = &args.sql {
        return Ok(sql.clone());
    }
    let key = args.key.as_deref().ok_or_else(|| anyhow!("give --key or --sql"))?;
    if key.contains('"') {
        bail!("bad key {key:?}");
    }
    let mut conds = Vec::new();
    if let Some(s) = &args.start {
        conds.push(format!("\"Epoch\" >= to_timestamp({})", super::connect::parse_time_arg(s)?));
    }
    if let Some(e) = &args.end {
        conds.push(format!("\"Epoch\" <= to_timestamp({})", super::connect::parse_time_arg(e)?));
    }
    let mut sql = format!("SELECT * FROM \"{key}\"");
    if !conds.is_empty() {
        sql.push_str(&format!(" WHERE {}", conds.join(" AND ")));
    }
    Ok(sql)
}

/// Stream a query result into a CSV or Parquet file; returns the summary line.
pub async fn export_to(client: &mut Client, sql: &str, output: &Path, format: Option<&str>, quiet: bool) -> anyhow::Result<String> {
    let started = Instant::now();
    let fmt = format
        .map(str::to_ascii_lowercase)
        .or_else(|| output.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase))
        .unwrap_or_else(|| "csv".into());
    let (schema, mut stream) = client.sql_stream(sql).await?;
    let file = File::create(output).with_context(|| format!("cannot create {}", output.display()))?;
    let pb = if quiet { ProgressBar::hidden() } else { progress(0, "rows") };
    if !quiet {
        if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {pos} rows ({per_sec}) {msg}") {
            pb.set_style(style);
        }
    }
    let mut rows = 0u64;
    match fmt.as_str() {
        "parquet" | "pq" => {
            let props = parquet::file::properties::WriterProperties::builder()
                .set_compression(parquet::basic::Compression::SNAPPY)
                .build();
            // Parquet has no second-resolution timestamps: write Epoch (and any other second timestamps) as
            // microseconds so every reader sees a timestamp, not a bare int64.
            let pq_schema = parquet_schema(&schema);
            let mut w = parquet::arrow::ArrowWriter::try_new(file, pq_schema.clone(), Some(props))?;
            while let Some(b) = stream.try_next().await? {
                rows += b.num_rows() as u64;
                let cols = b
                    .columns()
                    .iter()
                    .zip(pq_schema.fields())
                    .map(|(c, f)| if c.data_type() == f.data_type() { Ok(c.clone()) } else { arrow::compute::cast(c, f.data_type()) })
                    .collect::<Result<Vec<_>, _>>()?;
                let b = RecordBatch::try_new_with_options(
                    pq_schema.clone(),
                    cols,
                    &arrow::array::RecordBatchOptions::new().with_row_count(Some(b.num_rows())),
                )?;
                w.write(&b)?;
                pb.set_position(rows);
            }
            w.close()?;
        }
        "csv" => {
            let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(std::io::BufWriter::with_capacity(1 << 20, file));
            while let Some(b) = stream.try_next().await? {
                rows += b.num_rows() as u64;
                w.write(&b)?;
                pb.set_position(rows);
            }
        }
        other => bail!("unknown export format {other:?} (csv or parquet)"),
    }
    pb.finish_and_clear();
    let bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(summary("exported", rows, bytes, &format!("to {} ({bytes} bytes)", output.display()), started.elapsed()))
}

/// The schema written to Parquet: second timestamps become microsecond timestamps.
fn parquet_schema(schema: &SchemaRef) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Timestamp(TimeUnit::Second, tz) => f.as_ref().clone().with_data_type(DataType::Timestamp(TimeUnit::Microsecond, tz.clone())),
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// Run `mkts export`.
pub fn run_export(args: ExportArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let sql = export_sql(&args)?;
        let mut client = Client::from_args(args.url.as_deref(), args.dir.as_deref(), &args.remote).await?;
        let r = export_to(&mut client, &sql, &args.output, args.format.as_deref(), false).await;
        client.close().await?;
        eprintln!("{}", r?);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ColumnDef, ColumnType, RecordKind};

    fn control(yaml: &str) -> ControlFile {
        serde_saphyr::from_str(yaml).expect("control file")
    }

    fn ns(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s).expect("rfc3339").timestamp_nanos_opt().expect("in range")
    }

    #[test]
    fn time_format_with_a_subsecond_field_as_marketstore_reads_it() {
        let p = TimeParser::from_control(Some(&control("timeFormat: \"20060102 15:04:05\"\n"))).expect("parser");
        // MarketStore's own loader test: six digits after the layout are microseconds.
        assert_eq!(p.parse("20161230 21:59:20 383000").expect("µs"), ns("2016-12-30T21:59:20.383Z"));
        assert_eq!(p.parse("20161230 21:59:20 14").expect("ms"), ns("2016-12-30T21:59:20.014Z"));
        assert_eq!(p.parse("20161230 21:59:20 000000007").expect("ns"), ns("2016-12-30T21:59:20.000000007Z"));
        assert_eq!(p.parse("20161230 21:59:20.5").expect("fraction"), ns("2016-12-30T21:59:20.5Z"));
        assert_eq!(p.parse("20161230 21:59:20").expect("whole"), ns("2016-12-30T21:59:20Z"));
        let e = format!("{:#}", p.parse("20161230 21:59:20 3830").expect_err("4 digits"));
        assert!(e.contains("sub-second field \"3830\""), "{e}");
        let e = format!("{:#}", p.parse("2016-12-30 21:59:20 383000").expect_err("layout mismatch"));
        assert!(e.contains("does not match"), "{e}");
    }

    #[test]
    fn control_file_time_zone_applies_to_times_without_an_offset() {
        let c = control("timeFormat: \"2006-01-02 15:04:05\"\ntimeZone: America/New_York\n");
        let p = TimeParser::from_control(Some(&c)).expect("parser");
        assert_eq!(p.parse("2024-01-02 09:30:00").expect("winter"), ns("2024-01-02T14:30:00Z"));
        assert_eq!(p.parse("2024-07-01 09:30:00 250").expect("summer, ms"), ns("2024-07-01T13:30:00.250Z"));
        // A layout with an offset ignores timeZone.
        let c = control("timeFormat: \"2006-01-02 15:04:05 -0700\"\ntimeZone: America/New_York\n");
        let p = TimeParser::from_control(Some(&c)).expect("parser");
        assert_eq!(p.parse("2024-01-02 09:30:00 +0100").expect("offset"), ns("2024-01-02T08:30:00Z"));
        assert!(TimeParser::from_control(Some(&control("timeZone: Mars/Olympus\n"))).is_err());
    }

    #[test]
    fn header_names_are_trimmed_and_match_the_bucket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let csv = dir.path().join("q.csv");
        std::fs::write(&csv, "Epoch, Bid, Ask\n2024-01-02 09:30:00 500000, 1.5, 2.5\n2024-01-02 09:30:01, 1.25 ,2.75\n").expect("write");
        let c = control("firstRowHasColumnNames: true\ntimeFormat: \"2006-01-02 15:04:05\"\ntimeZone: America/New_York\n");
        let target = BucketSchema {
            kind: RecordKind::Variable,
            columns: vec![ColumnDef::new("Bid", ColumnType::F32), ColumnDef::new("Ask", ColumnType::F64)],
        };
        let batches: Vec<RecordBatch> =
            futures::executor::block_on(csv_batches(&csv, Some(&c), Some(&target), Arc::new(AtomicU64::new(0))).expect("reader").try_collect()).expect("rows");
        let b = &batches[0];
        let names: Vec<String> = b.schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["Epoch", "Bid", "Ask"]);
        let epoch = b.column(0).as_primitive::<arrow::datatypes::TimestampNanosecondType>();
        assert_eq!(epoch.values().to_vec(), vec![ns("2024-01-02T14:30:00.5Z"), ns("2024-01-02T14:30:01Z")]);
        assert_eq!(b.column(1).as_primitive::<arrow::datatypes::Float32Type>().values().to_vec(), vec![1.5, 1.25]);
        assert_eq!(b.column(2).as_primitive::<arrow::datatypes::Float64Type>().values().to_vec(), vec![2.5, 2.75]);
        // Without a bucket, the trimmed names become its columns.
        let batches: Vec<RecordBatch> =
            futures::executor::block_on(csv_batches(&csv, Some(&c), None, Arc::new(AtomicU64::new(0))).expect("reader").try_collect()).expect("rows");
        let names: Vec<String> = batches[0].schema().fields().iter().map(|f| f.name().clone()).collect();
        assert_eq!(names, ["Epoch", "Bid", "Ask"]);
    }
}
