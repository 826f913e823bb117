//! `ondiskagg` (trigger): keep downsampled buckets up to date as base bars or ticks are written.
//!
//! ```yaml
//! triggers:
//!   - module: ondiskagg          # or ondiskagg.so
//!     on: "*/1Min/OHLCV"
//!     config:
//!       destinations: [5Min, 15Min, 1H, 1D]
//!       filter: nasdaq           # optional: daily-and-longer bars from the regular session only
//! ```
//!
//! **What is written.** For a write to `SYM/<base>/<GROUP>` every destination `D` gets `SYM/D/<GROUP>` (group
//! `TRADE` becomes `OHLCV`, and tick input always produces `OHLCV`). Only the destination windows the write
//! touched are recomputed, from the stored base rows (so out-of-order writes and overwrites are handled), with
//! DataFusion, and written through the engine like any other write (fixed buckets, upsert).
//!
//! **Windows and labels.** A bar covers `[start, start + D)` and is labelled with `start` (left-closed,
//! left-labelled: pandas' `resample(D)` default for minutes, hours and days). Windows are the engine's own
//! intervals ([`Timeframe::truncate_in`] in [`crate::engine::Engine::timezone`]): minutes and hours aligned
//! to the Unix epoch; days, weeks (from Monday), months and years on the calendar of the server's
//! `timezone` (midnight in that zone, UTC by default), as MarketStore draws day-and-longer windows in its
//! zone (MarketStore issue #184: a 5Min bar labelled 09:30 holds 09:30–09:34).
//!
//! **Bars → bars** (the base schema has `Open`, `High`, `Low`, `Close`): `Open` = first, `High` = max,
//! `Low` = min, `Close` = last, `Volume` = sum; every other column takes the window's last value, unless
//! the config names a rule for it (`sum: [Trades]`, `max: [...]`, `min: [...]`, `first: [...]`,
//! `last: [...]`). Output types are the input types.
//!
//! **Ticks → bars** (any other schema with a price column; MarketStore panicked here, issue #338):
//! `Open/High/Low/Close` of `price_column` (default `Price`) and `Volume` = sum of `size_column` (default
//! `Size`, optional), in tick order (time, then arrival).
//!
//! **`filter: nasdaq`** keeps, for destinations of one day or longer, only rows inside the NASDAQ regular
//! session ([`Nasdaq`](super::calendar::Nasdaq)); intraday destinations aggregate every row. As in
//! MarketStore, the filter applies only when the server's `timezone` is `America/New_York` (the calendar's
//! zone): under any other zone (UTC included) a warning is logged at start and no row is filtered.
//!
//! **Scale** (MarketStore issue #183, 1,500 symbols of 1Min bars). `fire` only records the dirty time range
//! of the bucket (merged per bucket) and returns; a fixed set of workers (`workers`, default 2) recomputes
//! dirty buckets, one bucket at a time each, reading zero-copy snapshots in chunks of at most a month of
//! windows. Nothing is kept open between runs, so file handles and memory stay bounded by the number of
//! workers, not the number of symbols, and a backfill of many small writes to one bucket coalesces into few
//! recomputations.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, TimestampSecondType};
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use parking_lot::Mutex;
use serde::Deserialize;

use super::calendar::SessionCache;
use super::ContribError;
use crate::engine::{AppendEvent, BucketKey, Timeframe, TimePoint, EPOCH, NANOSECONDS};
use crate::service::{Client, ErrorCode, ReadRequest, WriteRequest};

const PLUGIN: &str = "ondiskagg";

/// How a column is aggregated into a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    First,
    Max,
    Min,
    Last,
    Sum,
}

/// Calendar filter of `filter:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nasdaq,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    destinations: Vec<serde_json::Value>,
    #[serde(default)]
    filter: Option<String>,
    #[serde(default)]
    price_column: Option<String>,
    #[serde(default)]
    size_column: Option<String>,
    #[serde(default)]
    sum: Vec<String>,
    #[serde(default)]
    max: Vec<String>,
    #[serde(default)]
    min: Vec<String>,
    #[serde(default)]
    first: Vec<String>,
    #[serde(default)]
    last: Vec<String>,
    #[serde(default)]
    workers: Option<usize>,
}

/// Parsed `ondiskagg` configuration.
#[derive(Debug, Clone)]
pub struct AggConfig {
    /// Destination timeframes with their names as written in the config (`5Min`, `1H`, …).
    pub destinations: Vec<(String, Timeframe)>,
    pub filter: Option<Filter>,
    pub price_column: String,
    pub size_column: String,
    /// Per-column rule overrides for bars.
    pub rules: HashMap<String, Rule>,
    pub workers: usize,
}

impl AggConfig {
    /// Parse the plugin's `config:` map. An empty or invalid destination list is an error (plugin not loaded).
    pub fn from_json(v: &serde_json::Value) -> Result<Self, ContribError> {
        let err = |msg: String| ContribError::Config { plugin: PLUGIN, msg };
        let raw: RawConfig = serde_json::from_value(if v.is_null() { serde_json::json!({}) } else { v.clone() })
            .map_err(|e| err(e.to_string()))?;
        if raw.destinations.is_empty() {
            return Err(err("destinations must list at least one timeframe, e.g. [5Min, 1H, 1D]".into()));
        }
        let mut destinations = Vec::new();
        for d in &raw.destinations {
            let s = match d {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let tf = Timeframe::parse(&s).map_err(|e| err(format!("destination {s:?}: {e}")))?;
            if !destinations.iter().any(|(_, t)| *t == tf) {
                destinations.push((tf.to_string(), tf));
            }
        }
        let filter = match raw.filter.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(f) if f.eq_ignore_ascii_case("nasdaq") => Some(Filter::Nasdaq),
            Some(other) => return Err(err(format!("unknown filter {other:?} (only \"nasdaq\" is supported)"))),
        };
        let mut rules = HashMap::new();
        for (list, rule) in [(&raw.sum, Rule::Sum), (&raw.max, Rule::Max), (&raw.min, Rule::Min), (&raw.first, Rule::First), (&raw.last, Rule::Last)] {
            for c in list {
                if rules.insert(c.clone(), rule).is_some() {
                    return Err(err(format!("column {c:?} has more than one rule")));
                }
            }
        }
        Ok(AggConfig {
            destinations,
            filter,
            price_column: raw.price_column.unwrap_or_else(|| "Price".into()),
            size_column: raw.size_column.unwrap_or_else(|| "Size".into()),
            rules,
            workers: raw.workers.unwrap_or(2).clamp(1, 64),
        })
    }

    /// The rule for a bar column: config override, else OHLC/Volume defaults, else last.
    pub fn rule_for(&self, col: &str) -> Rule {
        if let Some(r) = self.rules.get(col) {
            return *r;
        }
        match col {
            "Open" => Rule::First,
            "High" => Rule::Max,
            "Low" => Rule::Min,
            "Close" => Rule::Last,
            "Volume" => Rule::Sum,
            _ => Rule::Last,
        }
    }
}

/// Output bucket of an aggregation: `SYM/D/GROUP`, `TRADE` → `OHLCV`, ticks → `OHLCV`.
pub fn destination_key(src: &BucketKey, dest: &str, ticks: bool) -> Result<BucketKey, ContribError> {
    let group = if ticks || src.attr_group == "TRADE" { "OHLCV" } else { src.attr_group.as_str() };
    Ok(BucketKey::from_parts(&src.symbol, dest, group)?)
}

/// Whether the source is aggregated as bars or as ticks.
#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Bars,
    Ticks { price: String, size: Option<String> },
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Aggregate rows (in time order) into windows of `tf` (days and longer on the calendar of `tz`, as
/// [`Timeframe::truncate_in`]), keeping only windows starting in `[w_lo, w_hi]`.
/// Returns `None` when nothing remains. This is the pure core: no engine involved.
pub async fn aggregate_batches(
    batches: &[RecordBatch],
    tf: Timeframe,
    tz: Option<chrono_tz::Tz>,
    w_lo: i64,
    w_hi: i64,
    session_filter: bool,
    cfg: &AggConfig,
) -> Result<Option<RecordBatch>, ContribError> {
    let Some(first) = batches.first() else { return Ok(None) };
    let schema = first.schema();
    let has = |n: &str| schema.column_with_name(n).is_some();
    let mode = if ["Open", "High", "Low", "Close"].iter().all(|c| has(c)) {
        Mode::Bars
    } else if has(&cfg.price_column) {
        Mode::Ticks { price: cfg.price_column.clone(), size: has(&cfg.size_column).then(|| cfg.size_column.clone()) }
    } else {
        return Err(ContribError::Aggregate(format!(
            "columns {:?} have neither Open/High/Low/Close nor the price column {:?} (set price_column)",
            schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>(),
            cfg.price_column
        )));
    };

    // Window start and arrival order per row, then the rows of the selected windows.
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("__w", DataType::Int64, false));
    fields.push(Field::new("__rn", DataType::Int64, false));
    let ext_schema = Arc::new(Schema::new(fields));
    let mut parts = Vec::new();
    let mut rn: i64 = 0;
    let mut cache = SessionCache::default();
    for b in batches {
        if b.num_rows() == 0 {
            continue;
        }
        let ep = b
            .column_by_name(EPOCH)
            .and_then(|c| c.as_primitive_opt::<TimestampSecondType>())
            .ok_or_else(|| ContribError::Aggregate("Epoch column is missing or not timestamp[s]".into()))?;
        let w: Vec<i64> = ep.values().iter().map(|t| tf.truncate_in(*t, tz)).collect();
        let keep: BooleanArray = ep
            .values()
            .iter()
            .zip(&w)
            .map(|(t, w)| Some(*w >= w_lo && *w <= w_hi && (!session_filter || cache.is_open(*t))))
            .collect();
        let n = b.num_rows() as i64;
        let mut cols: Vec<ArrayRef> = b.columns().to_vec();
        cols.push(Arc::new(Int64Array::from(w)));
        cols.push(Arc::new(Int64Array::from_iter_values(rn..rn + n)));
        rn += n;
        let ext = RecordBatch::try_new(ext_schema.clone(), cols)?;
        let kept = filter_record_batch(&ext, &keep)?;
        if kept.num_rows() > 0 {
            parts.push(kept);
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }

    // The select list and the type each output column must have.
    let mut select = vec![format!("\"__w\" AS {}", quote(EPOCH))];
    let mut out_types: Vec<(String, DataType)> = Vec::new();
    let agg = |rule: Rule, col: &str| -> String {
        let q = quote(col);
        match rule {
            Rule::First => format!("first_value({q} ORDER BY \"__rn\")"),
            Rule::Last => format!("last_value({q} ORDER BY \"__rn\")"),
            Rule::Max => format!("max({q})"),
            Rule::Min => format!("min({q})"),
            Rule::Sum => format!("sum({q})"),
        }
    };
    match &mode {
        Mode::Bars => {
            for f in schema.fields() {
                let n = f.name();
                if n == EPOCH || n == NANOSECONDS {
                    continue;
                }
                let mut rule = cfg.rule_for(n);
                if rule == Rule::Sum && !f.data_type().is_numeric() {
                    rule = Rule::Last;
                }
                select.push(format!("{} AS {}", agg(rule, n), quote(n)));
                out_types.push((n.clone(), f.data_type().clone()));
            }
        }
        Mode::Ticks { price, size } => {
            let pt = schema.field_with_name(price)?.data_type().clone();
            for (name, rule) in [("Open", Rule::First), ("High", Rule::Max), ("Low", Rule::Min), ("Close", Rule::Last)] {
                select.push(format!("{} AS {}", agg(rule, price), quote(name)));
                out_types.push((name.into(), pt.clone()));
            }
            if let Some(s) = size {
                let st = schema.field_with_name(s)?.data_type().clone();
                select.push(format!("{} AS \"Volume\"", agg(Rule::Sum, s)));
                out_types.push(("Volume".into(), st));
            }
        }
    }
    let sql = format!("SELECT {} FROM t GROUP BY \"__w\" ORDER BY \"__w\"", select.join(", "));

    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    ctx.register_table("t", Arc::new(MemTable::try_new(ext_schema, vec![parts])?))?;
    let out = ctx.sql(&sql).await?.collect().await?;

    // Restore the input types (sum widens) and build one batch: Epoch int64 seconds + columns.
    let mut fields = vec![Field::new(EPOCH, DataType::Int64, false)];
    fields.extend(out_types.iter().map(|(n, t)| Field::new(n, t.clone(), false)));
    let out_schema = Arc::new(Schema::new(fields));
    let mut result = Vec::new();
    for b in out {
        if b.num_rows() == 0 {
            continue;
        }
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(b.num_columns());
        for (i, f) in out_schema.fields().iter().enumerate() {
            let c = b.column(i);
            cols.push(if c.data_type() == f.data_type() { c.clone() } else { cast(c, f.data_type())? });
        }
        result.push(RecordBatch::try_new(out_schema.clone(), cols)?);
    }
    if result.is_empty() {
        return Ok(None);
    }
    Ok(Some(arrow::compute::concat_batches(&out_schema, &result)?))
}

/// Whether `filter: nasdaq` filters under the server zone `tz`: only in the calendar's own zone, as
/// MarketStore (`None` is UTC).
fn nasdaq_applies(tz: Option<chrono_tz::Tz>) -> bool {
    tz == Some(chrono_tz::America::New_York)
}

/// Windows per read chunk: about a month of windows, at least one (bounds memory per recomputation).
fn windows_per_chunk(tf: Timeframe) -> i64 {
    let secs = tf.fixed_seconds().unwrap_or(31 * 86400).max(1);
    (31 * 86400 / secs).max(1)
}

/// Recompute the windows of every destination that intersect `[head, tail]` (Unix seconds) of `key`.
/// Returns the number of bars written.
pub async fn recompute(client: &Client, cfg: &AggConfig, key: &BucketKey, head: i64, tail: i64) -> Result<usize, ContribError> {
    let schema = match client.info(key) {
        Ok(info) => info.schema,
        Err(e) if e.code == ErrorCode::NotFound => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let src_tf = key.tf();
    let arrow_schema = schema.arrow_schema();
    let has = |n: &str| arrow_schema.column_with_name(n).is_some();
    let ticks = !["Open", "High", "Low", "Close"].iter().all(|c| has(c));
    let tz = client.timezone();
    let mut written = 0;
    for (dname, dtf) in &cfg.destinations {
        // Bars only aggregate upwards; never write a bucket onto itself.
        if !ticks && dtf.nominal_nanos() <= src_tf.nominal_nanos() {
            continue;
        }
        let dkey = destination_key(key, dname, ticks)?;
        if &dkey == key {
            continue;
        }
        let session_filter = cfg.filter == Some(Filter::Nasdaq) && nasdaq_applies(tz) && dtf.nominal_nanos() >= 86_400_000_000_000;
        let first_w = dtf.truncate_in(head, tz);
        let last_w = dtf.truncate_in(tail, tz);
        let per = windows_per_chunk(*dtf);
        let mut ws = first_w;
        while ws <= last_w {
            // A chunk of `per` windows starting at ws.
            let mut we = ws;
            let mut chunk_last = ws;
            for _ in 0..per {
                chunk_last = we;
                we = dtf.window_end_in(we, tz);
                if we > last_w {
                    break;
                }
            }
            let mut req = ReadRequest::key(key);
            req.start = Some(TimePoint::secs(ws));
            req.end = Some(TimePoint { secs: we.saturating_sub(1), nanos: 999_999_999 });
            let read = match client.read(&req).await {
                Ok(r) => r,
                Err(e) if e.code == ErrorCode::NotFound => return Ok(written),
                Err(e) => return Err(e.into()),
            };
            let batches: Vec<RecordBatch> = read.parts.into_iter().flat_map(|r| r.batches).collect();
            if let Some(bars) = aggregate_batches(&batches, *dtf, tz, ws, chunk_last, session_filter, cfg).await? {
                drop(batches);
                let n = bars.num_rows();
                client.write(&WriteRequest { key: dkey.clone(), batch: bars, variable: Some(false) }).await?;
                written += n;
            }
            ws = we;
        }
    }
    Ok(written)
}

/// Dirty time ranges per bucket, coalesced.
#[derive(Default)]
struct Queue {
    dirty: HashMap<BucketKey, Vec<(i64, i64)>>,
    order: VecDeque<BucketKey>,
    running: HashSet<BucketKey>,
}

struct Shared {
    cfg: AggConfig,
    /// Largest destination: ranges closer than one of its windows are merged.
    merge_gap: i64,
    q: Mutex<Queue>,
    wake: tokio::sync::Notify,
    idle: tokio::sync::Notify,
    /// Counters for logs and tests.
    pub fired: AtomicU64,
    pub runs: AtomicU64,
    pub bars: AtomicU64,
    pub errors: AtomicU64,
}

/// The `ondiskagg` trigger: [`fire`](OnDiskAgg::fire) records work, [`start`](OnDiskAgg::start)ed workers do it.
#[derive(Clone)]
pub struct OnDiskAgg {
    shared: Arc<Shared>,
}

impl OnDiskAgg {
    /// Build from the plugin `config:` map.
    pub fn from_config(v: &serde_json::Value) -> Result<Self, ContribError> {
        let cfg = AggConfig::from_json(v)?;
        let merge_gap = cfg.destinations.iter().map(|(_, t)| t.fixed_seconds().unwrap_or(31 * 86400)).max().unwrap_or(60);
        Ok(OnDiskAgg {
            shared: Arc::new(Shared {
                cfg,
                merge_gap,
                q: Mutex::new(Queue::default()),
                wake: tokio::sync::Notify::new(),
                idle: tokio::sync::Notify::new(),
                fired: AtomicU64::new(0),
                runs: AtomicU64::new(0),
                bars: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            }),
        })
    }

    pub fn config(&self) -> &AggConfig {
        &self.shared.cfg
    }

    /// Spawn the workers on the current tokio runtime. They run until the runtime stops.
    pub fn start(&self, client: Client) {
        let tz = client.timezone();
        if self.shared.cfg.filter == Some(Filter::Nasdaq) && !nasdaq_applies(tz) {
            tracing::warn!(
                "ondiskagg: filter: nasdaq applies only when the server's timezone is America/New_York (as in MarketStore); \
                 timezone is {}, so no rows are filtered",
                tz.map_or("UTC", |z| z.name())
            );
        }
        for i in 0..self.shared.cfg.workers {
            let (s, e) = (self.shared.clone(), client.clone());
            tokio::spawn(async move { worker(i, s, e).await });
        }
    }

    /// Record the time range an append touched; returns at once (the work is done by the workers).
    pub fn fire(&self, ev: &AppendEvent) {
        let Some((head, tail)) = epoch_span(&ev.batch) else { return };
        self.fire_range(&ev.key, head, tail);
    }

    /// Record `[head, tail]` (Unix seconds) of `key` as needing recomputation.
    pub fn fire_range(&self, key: &BucketKey, head: i64, tail: i64) {
        let s = &self.shared;
        s.fired.fetch_add(1, Ordering::Relaxed);
        let mut q = s.q.lock();
        let new_key = !q.dirty.contains_key(key);
        let ranges = q.dirty.entry(key.clone()).or_default();
        merge_range(ranges, (head, tail), s.merge_gap);
        if new_key && !q.running.contains(key) {
            q.order.push_back(key.clone());
        }
        drop(q);
        s.wake.notify_one();
    }

    /// True when nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        let q = self.shared.q.lock();
        q.dirty.is_empty() && q.running.is_empty()
    }

    /// Wait until every recorded range has been recomputed.
    pub async fn drain(&self) {
        loop {
            let notified = self.shared.idle.notified();
            if self.is_idle() {
                return;
            }
            let _ = tokio::time::timeout(std::time::Duration::from_millis(50), notified).await;
        }
    }

    /// (fired, runs, bars written, errors) since start.
    pub fn stats(&self) -> (u64, u64, u64, u64) {
        let s = &self.shared;
        (s.fired.load(Ordering::Relaxed), s.runs.load(Ordering::Relaxed), s.bars.load(Ordering::Relaxed), s.errors.load(Ordering::Relaxed))
    }
}

/// First and last Epoch of a batch (seconds).
fn epoch_span(b: &RecordBatch) -> Option<(i64, i64)> {
    let c = b.column_by_name(EPOCH)?;
    let v: Vec<i64> = match c.data_type() {
        DataType::Timestamp(_, _) | DataType::Int64 => {
            let c = cast(c, &DataType::Int64).ok()?;
            let c = c.as_primitive::<arrow::datatypes::Int64Type>();
            if c.is_empty() {
                return None;
            }
            // Timestamps of reads are seconds; other units are not produced by the engine.
            vec![*c.values().iter().min()?, *c.values().iter().max()?]
        }
        _ => return None,
    };
    Some((v[0], v[1]))
}

/// Insert a range, merging with ranges closer than `gap`; at most 16 ranges are kept (then all merge).
fn merge_range(ranges: &mut Vec<(i64, i64)>, r: (i64, i64), gap: i64) {
    let (mut lo, mut hi) = r;
    ranges.retain(|&(a, b)| {
        if a <= hi.saturating_add(gap) && lo <= b.saturating_add(gap) {
            lo = lo.min(a);
            hi = hi.max(b);
            false
        } else {
            true
        }
    });
    ranges.push((lo, hi));
    if ranges.len() > 16 {
        let lo = ranges.iter().map(|r| r.0).min().unwrap_or(lo);
        let hi = ranges.iter().map(|r| r.1).max().unwrap_or(hi);
        ranges.clear();
        ranges.push((lo, hi));
    }
}

async fn worker(id: usize, s: Arc<Shared>, client: Client) {
    loop {
        let job = {
            let mut q = s.q.lock();
            match q.order.pop_front() {
                Some(k) => {
                    let ranges = q.dirty.remove(&k).unwrap_or_default();
                    q.running.insert(k.clone());
                    Some((k, ranges))
                }
                None => None,
            }
        };
        let Some((key, ranges)) = job else {
            s.idle.notify_waiters();
            let notified = s.wake.notified();
            if s.q.lock().order.is_empty() {
                notified.await;
            }
            continue;
        };
        for (head, tail) in ranges {
            s.runs.fetch_add(1, Ordering::Relaxed);
            match recompute(&client, &s.cfg, &key, head, tail).await {
                Ok(n) => {
                    s.bars.fetch_add(n as u64, Ordering::Relaxed);
                    tracing::debug!(worker = id, %key, head, tail, bars = n, "ondiskagg: recomputed");
                }
                Err(e) => {
                    s.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%key, "ondiskagg: {e}");
                }
            }
        }
        let mut q = s.q.lock();
        q.running.remove(&key);
        if q.dirty.contains_key(&key) {
            q.order.push_back(key);
            drop(q);
            s.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float32Array, Float64Array, TimestampSecondArray, UInt64Array};
    use crate::engine::{Engine, WriteOptions};

    fn cfg(v: serde_json::Value) -> AggConfig {
        AggConfig::from_json(&v).unwrap()
    }

    fn bars(epochs: &[i64], o: &[f32], h: &[f32], l: &[f32], c: &[f32], v: &[u64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new(EPOCH, crate::engine::epoch_type(), false),
            Field::new("Open", DataType::Float32, false),
            Field::new("High", DataType::Float32, false),
            Field::new("Low", DataType::Float32, false),
            Field::new("Close", DataType::Float32, false),
            Field::new("Volume", DataType::UInt64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampSecondArray::from(epochs.to_vec()).with_timezone("UTC")),
                Arc::new(Float32Array::from(o.to_vec())),
                Arc::new(Float32Array::from(h.to_vec())),
                Arc::new(Float32Array::from(l.to_vec())),
                Arc::new(Float32Array::from(c.to_vec())),
                Arc::new(UInt64Array::from(v.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn config_validation() {
        assert!(AggConfig::from_json(&serde_json::json!({"destinations": []})).is_err());
        assert!(AggConfig::from_json(&serde_json::json!({"destinations": ["7Foo"]})).is_err());
        assert!(AggConfig::from_json(&serde_json::json!({"destinations": ["5Min"], "filter": "nyse"})).is_err());
        assert!(AggConfig::from_json(&serde_json::json!({"destinations": ["5Min"], "bogus": 1})).is_err());
        let c = cfg(serde_json::json!({"destinations": ["5Min", "1H", "1D", "5Min"], "filter": "NASDAQ", "sum": ["Trades"]}));
        assert_eq!(c.destinations.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(), vec!["5Min", "1H", "1D"]);
        assert_eq!(c.filter, Some(Filter::Nasdaq));
        assert_eq!(c.rule_for("Trades"), Rule::Sum);
        assert_eq!(c.rule_for("VWAP"), Rule::Last);
        assert_eq!(c.rule_for("Open"), Rule::First);
    }

    #[test]
    fn windows() {
        let m = Timeframe::parse("1M").unwrap();
        assert_eq!(m.window_end(1_698_796_800), 1_701_388_800); // Nov → Dec 2023
        let q = Timeframe::parse("3M").unwrap();
        assert_eq!(q.window_end(1_696_118_400), 1_704_067_200); // Oct 2023 → Jan 2024
        assert_eq!(Timeframe::parse("5Min").unwrap().window_end(300), 600);
        assert_eq!(windows_per_chunk(Timeframe::parse("5Min").unwrap()), 8928);
        assert_eq!(windows_per_chunk(Timeframe::parse("1M").unwrap()), 1);
    }

    #[test]
    fn destination_keys() {
        let k = BucketKey::parse("AAPL/1Sec/TRADE").unwrap();
        assert_eq!(destination_key(&k, "1Min", false).unwrap().to_string(), "AAPL/1Min/OHLCV");
        let k = BucketKey::parse("AAPL/1Min/BARS").unwrap();
        assert_eq!(destination_key(&k, "5Min", false).unwrap().to_string(), "AAPL/5Min/BARS");
        assert_eq!(destination_key(&k, "5Min", true).unwrap().to_string(), "AAPL/5Min/OHLCV");
    }

    #[test]
    fn merges_ranges() {
        let mut r = Vec::new();
        merge_range(&mut r, (100, 200), 60);
        merge_range(&mut r, (250, 300), 60);
        assert_eq!(r, vec![(100, 300)]);
        merge_range(&mut r, (10_000, 10_060), 60);
        assert_eq!(r.len(), 2);
        for i in 0..40 {
            merge_range(&mut r, (100_000 * (i + 1), 100_000 * (i + 1)), 60);
        }
        assert!(r.len() <= 16);
        assert_eq!(r.iter().map(|x| x.0).min(), Some(100));
        assert_eq!(r.iter().map(|x| x.1).max(), Some(4_000_000));
        assert_eq!(r[0], (100, 3_100_000)); // the 17th range collapsed everything before it
    }

    #[tokio::test]
    async fn bars_to_bars_left_labelled() {
        // 1Min bars at 09:30..09:36 UTC of 2024-01-02, written out of order inside the batch list.
        let t0 = 1_704_187_800; // 2024-01-02 09:30:00 UTC
        let ep: Vec<i64> = (0..7).map(|i| t0 + 60 * i).collect();
        let b = bars(&ep, &[1., 2., 3., 4., 5., 6., 7.], &[10., 20., 30., 40., 50., 60., 70.], &[0.5, 1.5, 0.1, 3.5, 4.5, 5.5, 6.5], &[1.1, 2.1, 3.1, 4.1, 5.1, 6.1, 7.1], &[1, 2, 3, 4, 5, 6, 7]);
        let c = cfg(serde_json::json!({"destinations": ["5Min"]}));
        let tf = Timeframe::parse("5Min").unwrap();
        let out = aggregate_batches(&[b], tf, None, 0, i64::MAX, false, &c).await.unwrap().unwrap();
        assert_eq!(out.num_rows(), 2);
        let e = out.column(0).as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(e.values().to_vec(), vec![t0, t0 + 300]);
        let f = |i: usize| out.column(i).as_any().downcast_ref::<Float32Array>().unwrap().values().to_vec();
        assert_eq!(f(1), vec![1., 6.]);
        assert_eq!(f(2), vec![50., 70.]);
        assert_eq!(f(3), vec![0.1, 5.5]);
        assert_eq!(f(4), vec![5.1, 7.1]);
        let v = out.column(5).as_any().downcast_ref::<UInt64Array>().unwrap().values().to_vec();
        assert_eq!(v, vec![15, 13]);
        assert_eq!(out.schema().field(5).data_type(), &DataType::UInt64);
    }

    #[tokio::test]
    async fn ticks_to_bars_any_schema() {
        // Bid/Ask ticks with a Price column and no Size (issue #338's shape): OHLC only.
        let schema = Arc::new(Schema::new(vec![
            Field::new(EPOCH, crate::engine::epoch_type(), false),
            Field::new("Price", DataType::Float64, false),
            Field::new("Bid", DataType::Float64, false),
            Field::new(NANOSECONDS, DataType::Int32, false),
        ]));
        let b = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampSecondArray::from(vec![60, 60, 61, 125]).with_timezone("UTC")),
                Arc::new(Float64Array::from(vec![3.0, 1.0, 2.0, 9.0])),
                Arc::new(Float64Array::from(vec![0.0; 4])),
                Arc::new(arrow::array::Int32Array::from(vec![5, 5, 0, 0])),
            ],
        )
        .unwrap();
        let c = cfg(serde_json::json!({"destinations": ["1Min"]}));
        let out = aggregate_batches(&[b], Timeframe::parse("1Min").unwrap(), None, 0, i64::MAX, false, &c).await.unwrap().unwrap();
        assert_eq!(out.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>(), vec!["Epoch", "Open", "High", "Low", "Close"]);
        let f = |i: usize| out.column(i).as_any().downcast_ref::<Float64Array>().unwrap().values().to_vec();
        assert_eq!(f(1), vec![3.0, 9.0]);
        assert_eq!(f(2), vec![3.0, 9.0]);
        assert_eq!(f(3), vec![1.0, 9.0]);
        assert_eq!(f(4), vec![2.0, 9.0]);
    }

    #[tokio::test]
    async fn nasdaq_filter_for_daily() {
        // 2024-01-02: one bar before the open (14:00 UTC), two inside; 2024-01-06 is a Saturday.
        let ep = [1_704_204_000, 1_704_205_800, 1_704_225_540, 1_704_549_600];
        let b = bars(&ep, &[1., 2., 3., 4.], &[5., 6., 7., 8.], &[1., 2., 3., 4.], &[1., 2., 3., 4.], &[10, 20, 30, 40]);
        let c = cfg(serde_json::json!({"destinations": ["1D"], "filter": "nasdaq"}));
        let out = aggregate_batches(&[b], Timeframe::parse("1D").unwrap(), None, 0, i64::MAX, true, &c).await.unwrap().unwrap();
        assert_eq!(out.num_rows(), 1);
        assert_eq!(out.column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 1_704_153_600);
        assert_eq!(out.column(1).as_any().downcast_ref::<Float32Array>().unwrap().value(0), 2.0);
        assert_eq!(out.column(5).as_any().downcast_ref::<UInt64Array>().unwrap().value(0), 50);
    }

    #[tokio::test]
    async fn no_price_column_is_an_error_not_a_panic() {
        let schema = Arc::new(Schema::new(vec![
            Field::new(EPOCH, crate::engine::epoch_type(), false),
            Field::new("Bid", DataType::Float64, false),
        ]));
        let b = RecordBatch::try_new(schema, vec![Arc::new(TimestampSecondArray::from(vec![60]).with_timezone("UTC")), Arc::new(Float64Array::from(vec![1.0]))]).unwrap();
        let c = cfg(serde_json::json!({"destinations": ["5Min"]}));
        assert!(aggregate_batches(&[b], Timeframe::parse("5Min").unwrap(), None, 0, i64::MAX, false, &c).await.is_err());
        let c = cfg(serde_json::json!({"destinations": ["5Min"], "price_column": "Bid"}));
        assert!(aggregate_batches(&[b_clone()], Timeframe::parse("5Min").unwrap(), None, 0, i64::MAX, false, &c).await.unwrap().is_some());
    }

    fn b_clone() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new(EPOCH, crate::engine::epoch_type(), false),
            Field::new("Bid", DataType::Float64, false),
        ]));
        RecordBatch::try_new(schema, vec![Arc::new(TimestampSecondArray::from(vec![60]).with_timezone("UTC")), Arc::new(Float64Array::from(vec![1.0]))]).unwrap()
    }

    #[tokio::test]
    async fn recompute_through_the_engine_handles_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(crate::engine::EngineConfig::new(dir.path())).unwrap();
        let service = Arc::new(crate::service::Service::new(engine.clone(), chrono_tz::UTC, None));
        let client = Client::new(service, crate::service::Caller::anonymous(crate::service::Interface::Plugin));
        let key = BucketKey::parse("AAPL/1Min/OHLCV").unwrap();
        let t0 = 1_704_187_800;
        let ep: Vec<i64> = (0..10).map(|i| t0 + 60 * i).collect();
        let b = bars(&ep, &[1.; 10], &[2.; 10], &[0.5; 10], &[1.5; 10], &[1; 10]);
        engine.write(&key, &b, WriteOptions::default()).await.unwrap();
        let agg = OnDiskAgg::from_config(&serde_json::json!({"destinations": ["5Min", "1H"]})).unwrap();
        agg.start(client);
        agg.fire_range(&key, t0, t0 + 540);
        agg.drain().await;
        // Overwrite one bar (new high): only its windows are recomputed.
        let b2 = bars(&[t0 + 120], &[1.], &[9.], &[0.5], &[1.5], &[5]);
        engine.write(&key, &b2, WriteOptions::default()).await.unwrap();
        agg.fire_range(&key, t0 + 120, t0 + 120);
        agg.drain().await;
        let read = engine.read(&crate::engine::ReadRequest::key(&BucketKey::parse("AAPL/5Min/OHLCV").unwrap())).unwrap();
        let b = &read[0].batches;
        let all = arrow::compute::concat_batches(&b[0].schema(), b).unwrap();
        assert_eq!(all.num_rows(), 2);
        assert_eq!(all.column(2).as_any().downcast_ref::<Float32Array>().unwrap().values().to_vec(), vec![9.0, 2.0]);
        assert_eq!(all.column(5).as_any().downcast_ref::<UInt64Array>().unwrap().values().to_vec(), vec![9, 5]);
        let h = engine.read(&crate::engine::ReadRequest::key(&BucketKey::parse("AAPL/1H/OHLCV").unwrap())).unwrap();
        assert_eq!(h[0].rows, 1);
        assert_eq!(agg.stats().3, 0);
        engine.shutdown().await.unwrap();
    }
}
