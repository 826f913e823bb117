//! Polygon's REST history for `mkts backfill polygon` (MarketStore's separate `backfiller` binary): minute
//! aggregates, trades and quotes of a date range into the buckets the `polygon` stream writes, with the same
//! schemas (so a root fed by both never fails with MarketStore's "unable to match data columns", §5.8).
//!
//! Requests (Polygon's current REST API; the key goes in an `Authorization: Bearer` header, never in a URL):
//! - bars: `GET {base}/v2/aggs/ticker/{sym}/range/1/minute/{from_ms}/{to_ms}?adjusted=true&sort=asc&limit=50000`
//!   → `{"results":[{"t","o","h","l","c","v","n"}],"next_url"}` into `<SYM>/1Min/OHLCV`;
//! - trades: `GET {base}/v3/trades/{sym}?timestamp.gte={ns}&timestamp.lt={ns}&order=asc&sort=timestamp&limit=N`
//!   → `{"results":[{"sip_timestamp","price","size","exchange","tape","conditions","id","sequence_number"}],
//!   "next_url"}` into `<SYM>/1Sec/TRADE` (the stream's trade filter applied);
//! - quotes: `GET {base}/v3/quotes/{sym}?…` → `{"results":[{"sip_timestamp","bid_price","bid_size",
//!   "bid_exchange","ask_price","ask_size","ask_exchange","conditions"}],"next_url"}` into `<SYM>/1Sec/QUOTE`.
//!
//! Every `next_url` is followed with its path and query rebased on the configured base URL. Each page is
//! written as it arrives. `429` and `5xx` are retried with back-off (`Retry-After` honoured); a `401`/`403`
//! ends the run with one error.
//!
//! **Resume, gaps, duplicates.** After each page the run saves a checkpoint (the time its rows reached,
//! [`Checkpoint`]); a rerun of the same range continues from there, and a finished range is skipped. What
//! makes reruns safe is not the checkpoint but the comparison with stored rows: when the bucket already holds
//! rows in the range (a killed run's, or the stream's), each fetched page of trades or quotes is compared by
//! time and value with the stored rows of its time span, and a fetched row that is stored already is not
//! written again (counted: two identical trades in one nanosecond stay two). So a lost checkpoint costs
//! requests, never a gap or a duplicate; bars land in a fixed bucket, one row per minute, and cannot double.
//! Pages are asked for in time order and each is written before the next is fetched.
//!
//! **Schemas.** Batches are built by the stream's own functions ([`super::polygon::trades_batch`], …) and
//! a missing bucket is created from them as the stream's first write creates it; a stored bucket with other
//! columns (a MarketStore root fed by its 4-column stream) is refused before anything is fetched.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int32Type, Int64Type, Schema, TimeUnit, TimestampNanosecondType};
use arrow::util::display::array_value_to_string;
use serde::Deserialize;

use super::feeder::{fmt_time, Http, Stop};
use super::polygon::{bars_batch, bars_schema, bucket_symbol, parse_aggs, quotes_batch, quotes_schema, rebase_url, small, split_time, trade_kept, trades_batch, trades_schema, MinuteBar, Quote, Secret, Trade, DEFAULT_URL};
use super::ContribError;
use crate::engine::{BucketKey, BucketSchema, EPOCH, NANOSECONDS};

const PLUGIN: &str = "polygon backfill";

/// Where backfilled rows go: a data directory or a running server (the CLI's client). Errors are
/// [`ContribError::Store`].
pub trait Store {
    /// The bucket's schema, `None` when it does not exist.
    fn schema(&mut self, key: &BucketKey) -> Result<Option<BucketSchema>, ContribError>;
    /// The last stored `Epoch` second `t` with `from <= t < to`, `None` when there is none.
    fn last_in(&mut self, key: &BucketKey, from: i64, to: i64) -> Result<Option<i64>, ContribError>;
    /// The bucket's rows whose `Epoch` second `t` has `from <= t < to`.
    fn rows_between(&mut self, key: &BucketKey, from: i64, to: i64) -> Result<Vec<RecordBatch>, ContribError>;
    /// Write one batch (a missing bucket is created from the batch as the streaming feeder's first write
    /// creates it: ticks when it carries `Nanoseconds`); returns the rows stored.
    fn write(&mut self, key: &BucketKey, batch: RecordBatch) -> Result<u64, ContribError>;
    /// The checkpoint saved under `id` (one symbol, data type and range of one target), if any.
    fn checkpoint(&mut self, id: &str) -> Option<Checkpoint>;
    /// Save a checkpoint (a failure is the store's to report; the run goes on).
    fn save_checkpoint(&mut self, id: &str, c: &Checkpoint);
}

/// How far a run got: every row of the range up to `upto` (seconds, nanoseconds) is stored; `complete`
/// when the whole range is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Checkpoint {
    /// The time of the last row fetched and stored (or found stored).
    pub upto: (i64, i32),
    /// The range is done.
    pub complete: bool,
}

/// What a run reports as it goes (for a progress bar).
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// One symbol's data type begins at `start` (Unix seconds; after the stored rows) of the run's range.
    Begin { symbol: &'a str, kind: &'static str, start: i64 },
    /// A page was fetched: `rows` stored from it, the data reached `upto` (Unix seconds).
    Page { rows: u64, upto: i64 },
    /// One symbol's data type is done.
    Done(&'a Done),
}

/// What to backfill.
#[derive(Debug, Clone)]
pub struct Options {
    /// Tickers as Polygon names them (`BRK/A` is stored as `BRK.A`).
    pub symbols: Vec<String>,
    /// First second of the range (inclusive), Unix seconds.
    pub from: i64,
    /// End of the range (exclusive), Unix seconds.
    pub to: i64,
    /// Minute aggregates into `<SYM>/1Min/OHLCV`.
    pub bars: bool,
    /// Trades into `<SYM>/1Sec/TRADE`.
    pub trades: bool,
    /// Quotes into `<SYM>/1Sec/QUOTE`.
    pub quotes: bool,
    /// Sent as `Authorization: Bearer`, never in a URL or a log line.
    pub api_key: Secret,
    /// REST root (`https://api.polygon.io`, a proxy or a test server); `next_url`s are rebased on it.
    pub base_url: String,
    /// Rows per page (`limit=`).
    pub limit: usize,
    pub adjusted: bool,
    /// Bars carry `TickCnt` (as the stream's `add_bar_tick_count`).
    pub tick_count: bool,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Least time between requests.
    pub request_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            symbols: Vec::new(),
            from: 0,
            to: 0,
            bars: false,
            trades: false,
            quotes: false,
            api_key: Secret::default(),
            base_url: DEFAULT_URL.into(),
            limit: 50_000,
            adjusted: true,
            tick_count: false,
            timeout: Duration::from_secs(30),
            request_interval: Duration::ZERO,
        }
    }
}

/// Rows written for one symbol and data type.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    /// The ticker.
    pub symbol: String,
    /// `bars`, `trades` or `quotes`.
    pub kind: &'static str,
    /// Rows stored by this run.
    pub rows: u64,
    /// Pages fetched.
    pub pages: u64,
    /// Where this run started (Unix seconds) and whether that continued an earlier run.
    pub start: i64,
    pub resumed: bool,
}

#[derive(Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
struct V3Page<T> {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default = "Option::default")]
    results: Option<Vec<T>>,
    #[serde(default)]
    next_url: Option<String>,
}

#[derive(Deserialize)]
struct V3Trade {
    sip_timestamp: i64,
    price: f64,
    size: f64,
    #[serde(default)]
    exchange: i64,
    #[serde(default)]
    tape: i64,
    #[serde(default)]
    conditions: Vec<i64>,
}

#[derive(Deserialize)]
struct V3Quote {
    sip_timestamp: i64,
    #[serde(default)]
    bid_price: f64,
    #[serde(default)]
    bid_size: f64,
    #[serde(default)]
    bid_exchange: i64,
    #[serde(default)]
    ask_price: f64,
    #[serde(default)]
    ask_size: f64,
    #[serde(default)]
    ask_exchange: i64,
    #[serde(default)]
    conditions: Vec<i64>,
}

fn page<T: for<'de> Deserialize<'de>>(body: &str, url: &str) -> Result<(Vec<T>, Option<String>), ContribError> {
    let p: V3Page<T> = serde_json::from_str(body).map_err(|e| ContribError::Parse { url: url.into(), msg: e.to_string() })?;
    if p.status.as_deref() == Some("ERROR") {
        return Err(ContribError::Parse { url: url.into(), msg: p.error.unwrap_or_else(|| "status ERROR".into()) });
    }
    Ok((p.results.unwrap_or_default(), p.next_url.filter(|u| !u.is_empty())))
}

/// Parse a `/v3/trades` page: the trades the stream would keep (size > 0, price > 0, none of MarketStore's
/// skipped conditions) and the `next_url`.
pub fn parse_trades(body: &str, url: &str) -> Result<(Vec<Trade>, Option<String>), ContribError> {
    let (rows, next) = page::<V3Trade>(body, url)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        if !trade_kept(r.price, r.size, &r.conditions) {
            continue;
        }
        let mut conds = [0u8; 4];
        for (k, c) in r.conditions.iter().take(4).enumerate() {
            conds[k] = small(*c);
        }
        let (epoch, nanos) = split_time(r.sip_timestamp);
        out.push(Trade { epoch, nanos, price: r.price, size: r.size.round() as u64, exchange: small(r.exchange), tape: small(r.tape), conds, id: 0 });
    }
    Ok((out, next))
}

/// Parse a `/v3/quotes` page and its `next_url`.
pub fn parse_quotes(body: &str, url: &str) -> Result<(Vec<Quote>, Option<String>), ContribError> {
    let (rows, next) = page::<V3Quote>(body, url)?;
    let out = rows
        .into_iter()
        .map(|r| {
            let (epoch, nanos) = split_time(r.sip_timestamp);
            Quote {
                epoch,
                nanos,
                bid_price: r.bid_price,
                ask_price: r.ask_price,
                bid_size: r.bid_size.max(0.0).round() as u64,
                ask_size: r.ask_size.max(0.0).round() as u64,
                bid_exchange: small(r.bid_exchange),
                ask_exchange: small(r.ask_exchange),
                cond: r.conditions.first().copied().map_or(0, small),
                id: 0,
            }
        })
        .collect();
    Ok((out, next))
}

/// Each row's time (seconds, nanoseconds) from an `Epoch` column (int64 seconds or a timestamp) and an
/// optional `Nanoseconds` column.
pub fn row_times(b: &RecordBatch) -> Result<Vec<(i64, i32)>, ContribError> {
    let bad = |m: String| ContribError::Store(m);
    let e = b.column_by_name(EPOCH).ok_or_else(|| bad("stored rows without an Epoch column".into()))?;
    let mut out: Vec<(i64, i32)> = match e.data_type() {
        DataType::Int64 => e.as_primitive::<Int64Type>().values().iter().map(|s| (*s, 0)).collect(),
        DataType::Timestamp(_, _) => {
            let ns = cast(e, &DataType::Timestamp(TimeUnit::Nanosecond, None)).map_err(|x| bad(x.to_string()))?;
            ns.as_primitive::<TimestampNanosecondType>().values().iter().map(|v| (v.div_euclid(1_000_000_000), v.rem_euclid(1_000_000_000) as i32)).collect()
        }
        other => return Err(bad(format!("stored Epoch column of type {other}"))),
    };
    if let Some(n) = b.column_by_name(NANOSECONDS) {
        let n = cast(n, &DataType::Int32).map_err(|x| bad(x.to_string()))?;
        for (o, v) in out.iter_mut().zip(n.as_primitive::<Int32Type>().values().iter()) {
            o.1 = *v;
        }
    }
    Ok(out)
}

/// Per row of `b`, its time and its data columns (those of `schema` but `Epoch` and `Nanoseconds`, cast to
/// `schema`'s types) as one comparable text.
fn row_keys(b: &RecordBatch, schema: &Schema) -> Result<Vec<((i64, i32), String)>, ContribError> {
    let times = row_times(b)?;
    let mut cols = Vec::new();
    for f in schema.fields() {
        if f.name() == EPOCH || f.name() == NANOSECONDS {
            continue;
        }
        let c = b.column_by_name(f.name()).ok_or_else(|| ContribError::Store(format!("stored rows lack column {}", f.name())))?;
        cols.push(cast(c, f.data_type()).map_err(|e| ContribError::Store(e.to_string()))?);
    }
    let mut out = Vec::with_capacity(b.num_rows());
    for (i, t) in times.into_iter().enumerate() {
        let mut k = String::new();
        for c in &cols {
            if c.is_null(i) {
                k.push_str("null");
            } else {
                k.push_str(&array_value_to_string(c, i).map_err(|e| ContribError::Store(e.to_string()))?);
            }
            k.push('|');
        }
        out.push((t, k));
    }
    Ok(out)
}

/// Fetched rows compared with stored ones (see the module doc): the stored rows of the seconds a page spans,
/// by time and value, counted.
#[derive(Default)]
struct Dedupe {
    /// Stored rows not matched yet; after a page only those of its last second are kept (the next page starts
    /// at or after it).
    stored: HashMap<((i64, i32), String), usize>,
    /// Seconds up to this one (inclusive) have been looked up.
    looked: Option<i64>,
}

impl Dedupe {
    /// Drop the rows of `b` (in time order) that are stored already.
    fn filter(&mut self, store: &mut dyn Store, key: &BucketKey, b: RecordBatch, schema: &Schema) -> Result<RecordBatch, ContribError> {
        let keys = row_keys(&b, schema)?;
        let (Some(first), Some(last)) = (keys.first().map(|k| k.0 .0), keys.last().map(|k| k.0 .0)) else { return Ok(b) };
        let lo = self.looked.map_or(first, |l| first.max(l + 1));
        if lo <= last {
            for sb in store.rows_between(key, lo, last + 1)? {
                for (t, k) in row_keys(&sb, schema)? {
                    if t.0 >= lo && t.0 <= last {
                        *self.stored.entry((t, k)).or_insert(0) += 1;
                    }
                }
            }
            self.looked = Some(last);
        }
        let keep: Vec<bool> = keys
            .into_iter()
            .map(|tk| match self.stored.get_mut(&tk) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    false
                }
                _ => true,
            })
            .collect();
        self.stored.retain(|(t, _), n| t.0 == last && *n > 0);
        Ok(arrow::compute::filter_record_batch(&b, &arrow::array::BooleanArray::from(keep))?)
    }
}

/// The bucket schema a batch of `schema` creates ([`crate::engine::infer_schema`], as the stream's first
/// write), to compare with a stored bucket.
fn bucket_schema_of(schema: &Arc<Schema>) -> Result<BucketSchema, ContribError> {
    let empty = RecordBatch::new_empty(schema.clone());
    crate::engine::infer_schema(&empty, None).map_err(|e| ContribError::Store(e.to_string()))
}

/// Refuse a stored bucket whose columns differ from what the feeder writes (MarketStore's "unable to match
/// data columns", §5.8), before anything is fetched.
fn check_schema(key: &BucketKey, stored: &BucketSchema, want: &BucketSchema) -> Result<(), ContribError> {
    let cols = |s: &BucketSchema| s.columns.iter().map(|c| format!("{} {}", c.name, c.ty.wire_name())).collect::<Vec<_>>();
    if stored.kind != want.kind || cols(stored) != cols(want) {
        return Err(ContribError::Store(format!(
            "bucket {key} is stored as {:?} [{}], but the polygon feeder and this backfill write {:?} [{}] (one schema per bucket); move the bucket aside or backfill another data directory",
            stored.kind,
            cols(stored).join(", "),
            want.kind,
            cols(want).join(", ")
        )));
    }
    Ok(())
}

/// The backfill of one run.
pub struct Backfill<'a> {
    opts: &'a Options,
    http: Http,
    stop: &'a Stop,
    auth: String,
}

impl<'a> Backfill<'a> {
    /// A run of `opts`, ended early when `stop` is set (the page in flight is written first).
    pub fn new(opts: &'a Options, stop: &'a Stop) -> Self {
        let http = Http::new(PLUGIN, opts.timeout, opts.request_interval);
        Backfill { opts, http, stop, auth: format!("Bearer {}", opts.api_key.expose()) }
    }

    /// HTTP requests sent so far (retries included).
    pub fn requests(&self) -> u64 {
        self.http.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn get(&self, url: &str) -> Result<String, ContribError> {
        match self.http.get_with(url, &[("Authorization", self.auth.as_str())], self.stop) {
            Err(ContribError::Http { status: status @ (401 | 403), body, .. }) => {
                // Polygon's error body is one JSON object; keep it on one line.
                let body: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
                Err(ContribError::Auth { plugin: "polygon", msg: format!("HTTP {status}: {body}") })
            }
            r => r,
        }
    }

    /// Follow `first` and every `next_url` (rebased on `base_url`), handing each page body to `f`; returns
    /// the pages fetched.
    fn pages(&self, first: String, f: &mut dyn FnMut(&str, &str) -> Result<Option<String>, ContribError>) -> Result<u64, ContribError> {
        let mut url = first;
        let mut n = 0;
        loop {
            if self.stop.is_stopped() {
                return Ok(n);
            }
            let body = self.get(&url)?;
            n += 1;
            match f(&body, &url)? {
                Some(next) => url = rebase_url(&next, &self.opts.base_url).ok_or_else(|| ContribError::Parse { url: url.clone(), msg: format!("next_url {next:?} is not a URL") })?,
                None => return Ok(n),
            }
        }
    }

    /// Backfill every symbol and data type, in order; `progress` hears of each page.
    pub fn run(&self, store: &mut dyn Store, progress: &mut dyn FnMut(Progress<'_>)) -> Result<Vec<Done>, ContribError> {
        let mut out = Vec::new();
        for sym in &self.opts.symbols {
            for (on, kind) in [(self.opts.bars, "bars"), (self.opts.trades, "trades"), (self.opts.quotes, "quotes")] {
                if !on || self.stop.is_stopped() {
                    continue;
                }
                let d = match kind {
                    "bars" => self.bars(store, sym, progress)?,
                    "trades" => self.ticks(store, sym, true, progress)?,
                    _ => self.ticks(store, sym, false, progress)?,
                };
                progress(Progress::Done(&d));
                out.push(d);
            }
        }
        Ok(out)
    }

    /// The checkpoint id of one symbol and data type of this run's range.
    fn id(&self, sym: &str, kind: &str) -> String {
        let o = self.opts;
        format!("polygon {sym} {kind} {} {}{}", o.from, o.to, if kind == "bars" && !o.adjusted { " unadjusted" } else { "" })
    }

    /// The saved checkpoint of `id`, unless the bucket holds nothing of the range up to it any more (dropped
    /// since): then the run starts over.
    fn checkpoint(&self, store: &mut dyn Store, key: &BucketKey, id: &str, exists: bool) -> Result<Option<Checkpoint>, ContribError> {
        let Some(c) = store.checkpoint(id) else { return Ok(None) };
        if c.complete && c.upto.0 < self.opts.from {
            return Ok(Some(c)); // a range without rows
        }
        Ok(if exists && store.last_in(key, self.opts.from, c.upto.0 + 1)?.is_some() { Some(c) } else { None })
    }

    fn bars(&self, store: &mut dyn Store, sym: &str, progress: &mut dyn FnMut(Progress<'_>)) -> Result<Done, ContribError> {
        let o = self.opts;
        let key = BucketKey::from_parts(&bucket_symbol(sym), "1Min", "OHLCV")?;
        // A stored bucket decides whether bars carry TickCnt (the stream's `add_bar_tick_count`).
        let stored = store.schema(&key)?;
        let tick_count = match &stored {
            Some(s) => {
                let has = s.columns.iter().any(|c| c.name == "TickCnt");
                if o.tick_count && !has {
                    return Err(ContribError::Store(format!("bucket {key} has no TickCnt column (it was created without add_bar_tick_count); drop --add-bar-tick-count")));
                }
                has
            }
            None => o.tick_count,
        };
        if let Some(s) = &stored {
            check_schema(&key, s, &bucket_schema_of(&bars_schema(tick_count))?)?;
        }
        let id = self.id(sym, "bars");
        let cp = self.checkpoint(store, &key, &id, stored.is_some())?;
        let from = o.from + (-o.from).rem_euclid(60);
        let end = o.to - 1;
        let start = match cp {
            Some(c) if c.complete => o.to,
            Some(c) => c.upto.0 + 60,
            None => from,
        };
        let mut done = Done { symbol: sym.into(), kind: "bars", rows: 0, pages: 0, start: start.min(o.to), resumed: cp.is_some() };
        progress(Progress::Begin { symbol: sym, kind: "bars", start: done.start });
        if start > end {
            return Ok(done);
        }
        let first = format!("{}/v2/aggs/ticker/{sym}/range/1/minute/{}/{}?adjusted={}&sort=asc&limit={}", o.base_url, start * 1000, end * 1000 + 999, o.adjusted, o.limit.min(50_000));
        let mut rows = 0;
        let mut upto = (start - 60, 0);
        done.pages = self.pages(first, &mut |body, url| {
            let p = parse_aggs(body, url)?;
            let mut bars: Vec<MinuteBar> = p.bars.into_iter().filter(|b| b.t >= start && b.t <= end && b.t % 60 == 0).collect();
            bars.sort_by_key(|b| b.t);
            bars.dedup_by_key(|b| b.t);
            let mut n = 0;
            if let Some(last) = bars.last().map(|b| b.t) {
                n = store.write(&key, bars_batch(&bars, tick_count)?)?;
                rows += n;
                upto = (last, 0);
                store.save_checkpoint(&id, &Checkpoint { upto, complete: false });
            }
            progress(Progress::Page { rows: n, upto: upto.0.max(start) });
            Ok(p.next_url)
        })?;
        if !self.stop.is_stopped() {
            store.save_checkpoint(&id, &Checkpoint { upto, complete: true });
        }
        done.rows = rows;
        Ok(done)
    }

    fn ticks(&self, store: &mut dyn Store, sym: &str, trades: bool, progress: &mut dyn FnMut(Progress<'_>)) -> Result<Done, ContribError> {
        let o = self.opts;
        let (group, kind, path) = if trades { ("TRADE", "trades", "trades") } else { ("QUOTE", "quotes", "quotes") };
        let key = BucketKey::from_parts(&bucket_symbol(sym), "1Sec", group)?;
        let schema = if trades { trades_schema() } else { quotes_schema() };
        let stored = store.schema(&key)?;
        if let Some(s) = &stored {
            check_schema(&key, s, &bucket_schema_of(&schema)?)?;
        }
        let id = self.id(sym, kind);
        let cp = self.checkpoint(store, &key, &id, stored.is_some())?;
        let ns = |(s, n): (i64, i32)| s as i128 * 1_000_000_000 + n as i128;
        let end_ns = o.to as i128 * 1_000_000_000;
        let start_ns = match cp {
            Some(c) if c.complete => end_ns,
            Some(c) => ns(c.upto),
            None => o.from as i128 * 1_000_000_000,
        };
        // Compare with stored rows when the range holds any (a killed run's, the stream's).
        let mut dedupe = match (&stored, cp) {
            (_, Some(_)) => Some(Dedupe::default()),
            (Some(_), None) => store.last_in(&key, o.from, o.to)?.map(|_| Dedupe::default()),
            (None, None) => None,
        };
        let start = (start_ns.min(end_ns) / 1_000_000_000) as i64;
        let mut done = Done { symbol: sym.into(), kind, rows: 0, pages: 0, start, resumed: cp.is_some() };
        progress(Progress::Begin { symbol: sym, kind, start });
        if start_ns >= end_ns {
            return Ok(done);
        }
        let first = format!("{}/v3/{path}/{sym}?timestamp.gte={start_ns}&timestamp.lt={end_ns}&order=asc&sort=timestamp&limit={}", o.base_url, o.limit.min(50_000));
        let mut rows = 0;
        let mut upto = ((start_ns / 1_000_000_000) as i64, (start_ns % 1_000_000_000) as i32);
        done.pages = self.pages(first, &mut |body, url| {
            let (batch, next) = if trades {
                let (mut t, next) = parse_trades(body, url)?;
                t.retain(|x| ns((x.epoch, x.nanos)) >= start_ns && ns((x.epoch, x.nanos)) < end_ns);
                t.sort_by_key(|x| (x.epoch, x.nanos));
                (trades_batch(&t)?, next)
            } else {
                let (mut q, next) = parse_quotes(body, url)?;
                q.retain(|x| ns((x.epoch, x.nanos)) >= start_ns && ns((x.epoch, x.nanos)) < end_ns);
                q.sort_by_key(|x| (x.epoch, x.nanos));
                (quotes_batch(&q)?, next)
            };
            let last = row_times(&batch)?.last().copied();
            let batch = match dedupe.as_mut() {
                Some(d) => d.filter(store, &key, batch, &schema)?,
                None => batch,
            };
            let mut n = 0;
            if batch.num_rows() > 0 {
                n = store.write(&key, batch)?;
                rows += n;
            }
            if let Some(l) = last {
                upto = l;
                store.save_checkpoint(&id, &Checkpoint { upto, complete: false });
            }
            progress(Progress::Page { rows: n, upto: upto.0 });
            Ok(next)
        })?;
        if !self.stop.is_stopped() {
            store.save_checkpoint(&id, &Checkpoint { upto, complete: true });
        }
        done.rows = rows;
        Ok(done)
    }
}

impl Done {
    /// One line for the terminal.
    pub fn line(&self) -> String {
        format!("{} {}: {} rows in {} pages from {}{}", self.symbol, self.kind, self.rows, self.pages, fmt_time(self.start), if self.resumed { " (continuing after the stored rows)" } else { "" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v3_trades_and_quotes() {
        let body = r#"{"results":[{"conditions":[12,41],"exchange":11,"id":"1","participant_timestamp":1517562000015577000,"price":171.55,"sequence_number":1063,"sip_timestamp":1517562000016036600,"size":100,"tape":3},{"conditions":[15],"exchange":4,"id":"2","price":171.6,"sip_timestamp":1517562000016036601,"size":10,"tape":3},{"exchange":4,"id":"3","price":171.6,"sip_timestamp":1517562000016036602,"size":0,"tape":3}],"status":"OK","request_id":"a47d","next_url":"https://api.polygon.io/v3/trades/AAPL?cursor=YWN0aXZl"}"#;
        let (t, next) = parse_trades(body, "u").unwrap();
        assert_eq!(t.len(), 1, "official-open condition and size 0 dropped");
        assert_eq!((t[0].epoch, t[0].nanos, t[0].price, t[0].size, t[0].exchange, t[0].tape, t[0].conds), (1_517_562_000, 16_036_600, 171.55, 100, 11, 3, [12, 41, 0, 0]));
        assert_eq!(next.as_deref(), Some("https://api.polygon.io/v3/trades/AAPL?cursor=YWN0aXZl"));
        let q = r#"{"results":[{"ask_exchange":0,"ask_price":0,"ask_size":0,"bid_exchange":11,"bid_price":102.7,"bid_size":60,"conditions":[1],"participant_timestamp":1517562000065321200,"sequence_number":2060,"sip_timestamp":1517562000065700400,"tape":3}],"status":"OK","request_id":"x"}"#;
        let (q, next) = parse_quotes(q, "u").unwrap();
        assert_eq!((q[0].epoch, q[0].nanos, q[0].bid_price, q[0].bid_size, q[0].bid_exchange, q[0].cond), (1_517_562_000, 65_700_400, 102.7, 60, 11, 1));
        assert!(next.is_none());
        assert!(parse_trades(r#"{"status":"ERROR","error":"Unknown API Key"}"#, "u").is_err());
    }

    /// Buckets in memory.
    #[derive(Default)]
    struct Mem(HashMap<String, Vec<RecordBatch>>);

    impl Store for Mem {
        fn schema(&mut self, _: &BucketKey) -> Result<Option<BucketSchema>, ContribError> {
            Ok(None)
        }
        fn last_in(&mut self, _: &BucketKey, _: i64, _: i64) -> Result<Option<i64>, ContribError> {
            Ok(None)
        }
        fn rows_between(&mut self, key: &BucketKey, from: i64, to: i64) -> Result<Vec<RecordBatch>, ContribError> {
            let mut out = Vec::new();
            for b in self.0.get(&key.to_string()).into_iter().flatten() {
                let keep: Vec<bool> = row_times(b)?.iter().map(|t| t.0 >= from && t.0 < to).collect();
                out.push(arrow::compute::filter_record_batch(b, &arrow::array::BooleanArray::from(keep))?);
            }
            Ok(out)
        }
        fn write(&mut self, key: &BucketKey, batch: RecordBatch) -> Result<u64, ContribError> {
            let n = batch.num_rows() as u64;
            self.0.entry(key.to_string()).or_default().push(batch);
            Ok(n)
        }
        fn checkpoint(&mut self, _: &str) -> Option<Checkpoint> {
            None
        }
        fn save_checkpoint(&mut self, _: &str, _: &Checkpoint) {}
    }

    #[test]
    fn stored_rows_are_not_written_again_and_twins_are_counted() {
        let t = |nanos: i32, price: f64| Trade { epoch: 10, nanos, price, size: 1, exchange: 1, tape: 1, conds: [0; 4], id: 0 };
        let key = BucketKey::parse("A/1Sec/TRADE").unwrap();
        let mut store = Mem::default();
        store.write(&key, trades_batch(&[t(5, 1.0), t(7, 2.0), t(7, 3.0)]).unwrap()).unwrap();
        let schema = trades_schema();
        let mut d = Dedupe::default();
        let prices = |b: &RecordBatch| b.column(2).as_primitive::<arrow::datatypes::Float64Type>().values().to_vec();
        // 2.0 and 3.0 at (10, 7) are stored; 4.0 at the same nanosecond and 1.0 later are new.
        let kept = d.filter(&mut store, &key, trades_batch(&[t(7, 2.0), t(7, 3.0), t(7, 4.0), t(8, 1.0)]).unwrap(), &schema).unwrap();
        assert_eq!(prices(&kept), vec![4.0, 1.0]);
        store.write(&key, kept).unwrap();
        // The next page starts in the same second: a second 2.0 at (10, 7) is a trade of its own, and what this
        // run wrote is not mistaken for stored rows.
        let kept = d.filter(&mut store, &key, trades_batch(&[t(7, 2.0), t(8, 1.0), t(9, 5.0)]).unwrap(), &schema).unwrap();
        assert_eq!(prices(&kept), vec![2.0, 1.0, 5.0]);
    }
}
