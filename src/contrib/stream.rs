//! `stream` (trigger): push the newest row of each write to stream subscribers (`/ws`, Flight).
//!
//! ```yaml
//! triggers:
//!   - module: stream             # or stream.so
//!     on: "*/*/*"
//!     config:
//!       filter: nasdaq           # optional: only rows inside the NASDAQ regular session
//!       shelf: true              # default: hold bars above 1Min until their window closes
//! ```
//!
//! For every matching write the trigger takes the write's newest row (the last row in time order) and
//! publishes `(key, row)` on the event bus's gate ([`StreamGate`], which it installs itself on at start:
//! from then on the gated feed carries only its pushes); the `/ws` endpoint sends it to WebSocket subscribers
//! as MarketStore's msgpack frame `{"key": "SYM/TF/GROUP", "data": {"Epoch": …, "Open": …}}` (see
//! [`ws_frame`]) and Flight subscribers that ask for `"feed": "stream"` receive it as a one-row batch
//! (a plain Flight subscription carries every append, whole, whether or not this trigger runs).
//!
//! **Shelf.** Bars of timeframes above 1Min (`5Min`, `1H`, `1D`, typically written by `ondiskagg`) are held
//! until their window closes — per bucket only the latest version is kept — and pushed once, complete, when
//! the window ends (for `1D` and longer with `filter: nasdaq`, at that day's NASDAQ close, which MarketStore
//! only knew on early-close days). Day-and-longer windows end at midnights of the server's `timezone`, as
//! MarketStore draws them. A bar whose window has already closed (a backfill, a correction) is
//! pushed at once; MarketStore dropped those silently. `shelf: false` pushes every write at once.
//!
//! **Filter.** With `filter: nasdaq`, rows of intraday timeframes are pushed only when their time is inside
//! the regular session, and daily-or-longer bars only for market days.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{self as adt, DataType};
use chrono::{TimeZone, Utc};
use parking_lot::Mutex;
use serde::Deserialize;

use super::calendar::Nasdaq;
use super::ondiskagg::Filter;
use super::ContribError;
use crate::bus::{StreamGate, StreamMessage};
use crate::engine::{AppendEvent, BucketKey, Timeframe, EPOCH};

const PLUGIN: &str = "stream";

/// MarketStore's WebSocket data frame for a pushed row: msgpack `{"key": "...", "data": {column: value}}`.
/// `Epoch` is int64 Unix seconds; other values keep their column type (float32 stays float32).
pub fn ws_frame(m: &StreamMessage) -> Vec<u8> {
    use rmpv::Value;
    let mut data = Vec::new();
    let schema = m.row.schema();
    for (i, f) in schema.fields().iter().enumerate() {
        let c = m.row.column(i);
        if c.is_empty() || c.is_null(0) {
            continue;
        }
        let v = match c.data_type() {
            DataType::Timestamp(_, _) => match arrow::compute::cast(c, &DataType::Int64) {
                Ok(a) => Value::from(a.as_primitive::<adt::Int64Type>().value(0)),
                Err(_) => Value::Nil,
            },
            DataType::Float32 => Value::F32(c.as_primitive::<adt::Float32Type>().value(0)),
            DataType::Float64 => Value::F64(c.as_primitive::<adt::Float64Type>().value(0)),
            DataType::Int8 => Value::from(c.as_primitive::<adt::Int8Type>().value(0)),
            DataType::Int16 => Value::from(c.as_primitive::<adt::Int16Type>().value(0)),
            DataType::Int32 => Value::from(c.as_primitive::<adt::Int32Type>().value(0)),
            DataType::Int64 => Value::from(c.as_primitive::<adt::Int64Type>().value(0)),
            DataType::UInt8 => Value::from(c.as_primitive::<adt::UInt8Type>().value(0)),
            DataType::UInt16 => Value::from(c.as_primitive::<adt::UInt16Type>().value(0)),
            DataType::UInt32 => Value::from(c.as_primitive::<adt::UInt32Type>().value(0)),
            DataType::UInt64 => Value::from(c.as_primitive::<adt::UInt64Type>().value(0)),
            DataType::Boolean => Value::from(c.as_boolean().value(0)),
            DataType::Utf8 => Value::from(c.as_string::<i32>().value(0)),
            _ => Value::Nil,
        };
        data.push((Value::from(f.name().as_str()), v));
    }
    let frame = Value::Map(vec![(Value::from("key"), Value::from(m.key.to_string())), (Value::from("data"), Value::Map(data))]);
    let mut out = Vec::new();
    let _ = rmpv::encode::write_value(&mut out, &frame);
    out
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    filter: Option<String>,
    #[serde(default)]
    shelf: Option<bool>,
}

/// Parsed `stream` configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamConfig {
    pub filter: Option<Filter>,
    pub shelf: bool,
    /// The server's `timezone` (not a plugin key): day-and-longer windows close at its midnights, as the
    /// buckets' own intervals are drawn ([`Timeframe::truncate_in`]). `None` is UTC.
    pub tz: Option<chrono_tz::Tz>,
}

impl StreamConfig {
    pub fn from_json(v: &serde_json::Value) -> Result<Self, ContribError> {
        let raw: RawConfig = serde_json::from_value(if v.is_null() { serde_json::json!({}) } else { v.clone() })
            .map_err(|e| ContribError::Config { plugin: PLUGIN, msg: e.to_string() })?;
        let filter = match raw.filter.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(f) if f.eq_ignore_ascii_case("nasdaq") => Some(Filter::Nasdaq),
            Some(other) => {
                return Err(ContribError::Config { plugin: PLUGIN, msg: format!("unknown filter {other:?} (only \"nasdaq\")") });
            }
        };
        Ok(StreamConfig { filter, shelf: raw.shelf.unwrap_or(true), tz: None })
    }
}

/// What to do with a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Filtered out.
    Drop,
    /// Push now.
    Push,
    /// Hold until this Unix time, then push.
    Hold(i64),
}

/// The gating rule, pure: row time `t` of a bucket with timeframe `tf`, at wall-clock `now`.
pub fn decide(cfg: &StreamConfig, tf: Timeframe, t: i64, now: i64) -> Decision {
    let daily = tf.nominal_nanos() >= 86_400_000_000_000;
    let nasdaq = cfg.filter == Some(Filter::Nasdaq);
    if nasdaq {
        if daily {
            // A daily bar starts at its day's midnight in the server zone; the market day is that date.
            let date = local_date(tf.truncate_in(t, cfg.tz), cfg.tz);
            if !date.is_some_and(Nasdaq::is_market_day) {
                return Decision::Drop;
            }
        } else if !Nasdaq::is_open(t) {
            return Decision::Drop;
        }
    }
    if !cfg.shelf || tf.nominal_nanos() <= 60_000_000_000 {
        return Decision::Push;
    }
    let ws = tf.truncate_in(t, cfg.tz);
    let mut deadline = tf.window_end_in(ws, cfg.tz);
    if nasdaq && tf == (Timeframe { n: 1, unit: crate::engine::TfUnit::Day }) {
        let date = local_date(ws, cfg.tz);
        if let Some((_, close)) = date.and_then(Nasdaq::session) {
            deadline = close;
        }
    }
    if deadline <= now { Decision::Push } else { Decision::Hold(deadline) }
}

/// The calendar date of Unix second `t` on the wall clock of `tz` (UTC when `None`).
fn local_date(t: i64, tz: Option<chrono_tz::Tz>) -> Option<chrono::NaiveDate> {
    let utc = Utc.timestamp_opt(t, 0).single()?;
    Some(match tz {
        Some(tz) => utc.with_timezone(&tz).date_naive(),
        None => utc.date_naive(),
    })
}

/// The `stream` trigger.
#[derive(Clone)]
pub struct StreamTrigger {
    cfg: StreamConfig,
    hub: Arc<StreamGate>,
    /// Held bars by bucket: (deadline, LSN of the append, row).
    shelf: Arc<Mutex<HashMap<BucketKey, (i64, u64, RecordBatch)>>>,
    wake: Arc<tokio::sync::Notify>,
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl StreamTrigger {
    /// Build from the plugin `config:` map, publishing on `hub` (the bus's gate); `tz` is the server's
    /// `timezone`.
    pub fn from_config(v: &serde_json::Value, hub: Arc<StreamGate>, tz: Option<chrono_tz::Tz>) -> Result<Self, ContribError> {
        let cfg = StreamConfig { tz, ..StreamConfig::from_json(v)? };
        Ok(StreamTrigger { cfg, hub, shelf: Arc::default(), wake: Arc::default() })
    }

    /// Install on the gate (the gated feed now carries only this trigger's pushes) and start the shelf
    /// timer on the current tokio runtime.
    pub fn start(&self) {
        self.hub.install();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let next = me.shelf.lock().values().map(|(d, _, _)| *d).min();
                let notified = me.wake.notified();
                match next {
                    None => notified.await,
                    Some(d) => {
                        let wait = (d - now_secs()).max(0) as u64;
                        if wait > 0 {
                            let _ = tokio::time::timeout(Duration::from_millis(wait * 1000), notified).await;
                        }
                    }
                }
                let now = now_secs();
                let due: Vec<(BucketKey, u64, RecordBatch)> = {
                    let mut s = me.shelf.lock();
                    let keys: Vec<BucketKey> = s.iter().filter(|(_, (d, _, _))| *d <= now).map(|(k, _)| k.clone()).collect();
                    keys.into_iter().filter_map(|k| s.remove(&k).map(|(_, l, r)| (k, l, r))).collect()
                };
                for (k, l, r) in due {
                    me.hub.push(k, l, r);
                }
            }
        });
    }

    /// Handle one append: push, hold or drop its newest row.
    pub fn fire(&self, ev: &AppendEvent) {
        let n = ev.batch.num_rows();
        if n == 0 {
            return;
        }
        let row = ev.batch.slice(n - 1, 1);
        let Some(t) = row_epoch(&row) else { return };
        match decide(&self.cfg, ev.key.tf(), t, now_secs()) {
            Decision::Drop => {}
            Decision::Push => {
                // A newer complete version replaces anything held for the same bucket.
                let held = self.shelf.lock().remove(&ev.key);
                if let Some((_, lsn, old)) = held {
                    if row_epoch(&old).is_some_and(|o| o < t) {
                        self.hub.push(ev.key.clone(), lsn, old);
                    }
                }
                self.hub.push(ev.key.clone(), ev.lsn, row);
            }
            Decision::Hold(deadline) => {
                let prev = self.shelf.lock().insert(ev.key.clone(), (deadline, ev.lsn, row));
                // A different (older) bar that was still held is complete now: push it.
                if let Some((d, lsn, old)) = prev {
                    if d < deadline {
                        self.hub.push(ev.key.clone(), lsn, old);
                    }
                }
                self.wake.notify_one();
            }
        }
    }
}

fn row_epoch(row: &RecordBatch) -> Option<i64> {
    let c = row.column_by_name(EPOCH)?;
    let c = arrow::compute::cast(c, &DataType::Int64).ok()?;
    let c = c.as_primitive::<adt::Int64Type>();
    (!c.is_empty()).then(|| c.value(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tf(s: &str) -> Timeframe {
        Timeframe::parse(s).unwrap()
    }

    #[test]
    fn decisions() {
        let plain = StreamConfig { filter: None, shelf: true, tz: None };
        let t = 1_710_167_400; // 2024-03-11 14:30 UTC (10:30 New York)
        assert_eq!(decide(&plain, tf("1Min"), t, t + 5), Decision::Push);
        assert_eq!(decide(&plain, tf("5Min"), t, t + 5), Decision::Hold(t + 300));
        assert_eq!(decide(&plain, tf("5Min"), t, t + 300), Decision::Push);
        assert_eq!(decide(&StreamConfig { shelf: false, ..plain }, tf("1H"), t, t), Decision::Push);
        let nq = StreamConfig { filter: Some(Filter::Nasdaq), shelf: true, tz: None };
        assert_eq!(decide(&nq, tf("1Min"), t - 4 * 3600, t), Decision::Drop); // 06:30 New York
        let day = 1_710_115_200; // 2024-03-11 00:00 UTC
        assert_eq!(decide(&nq, tf("1D"), day, t), Decision::Hold(1_710_187_200)); // 16:00 New York
        assert_eq!(decide(&plain, tf("1D"), day, t), Decision::Hold(day + 86400));
        assert_eq!(decide(&nq, tf("1D"), day - 86400, t), Decision::Drop); // a Sunday
        // Under timezone: America/New_York a 1D bar starts at New York's midnight and closes at the next one
        // (or at 16:00 New York with the filter); intraday windows are as under UTC.
        let ny = StreamConfig { tz: Some(chrono_tz::America::New_York), ..plain };
        let ny_midnight = 1_710_129_600; // 2024-03-11 00:00 New York (EDT) = 04:00 UTC
        assert_eq!(decide(&ny, tf("1D"), ny_midnight, t), Decision::Hold(ny_midnight + 86400));
        assert_eq!(decide(&ny, tf("1D"), ny_midnight - 1, t), Decision::Push); // 2024-03-10 ended at ny_midnight
        assert_eq!(decide(&ny, tf("5Min"), t, t + 5), Decision::Hold(t + 300));
        let ny_nq = StreamConfig { filter: Some(Filter::Nasdaq), ..ny };
        assert_eq!(decide(&ny_nq, tf("1D"), ny_midnight, t), Decision::Hold(1_710_187_200));
        // 2024-03-11 02:00 UTC is still Sunday 2024-03-10 in New York: not a market day.
        assert_eq!(decide(&ny_nq, tf("1D"), day + 7200, t), Decision::Drop);
    }

    #[tokio::test]
    async fn pushes_and_shelves() {
        use arrow::array::{Float64Array, TimestampSecondArray};
        use arrow::datatypes::{Field, Schema};
        let hub = Arc::new(StreamGate::default());
        let mut rx = hub.subscribe();
        let s = StreamTrigger::from_config(&serde_json::json!({}), hub.clone(), None).unwrap();
        s.start();
        let schema = Arc::new(Schema::new(vec![Field::new(EPOCH, crate::engine::epoch_type(), false), Field::new("Close", DataType::Float64, false)]));
        let mk = |ep: Vec<i64>, c: Vec<f64>| RecordBatch::try_new(schema.clone(), vec![Arc::new(TimestampSecondArray::from(ep).with_timezone("UTC")), Arc::new(Float64Array::from(c))]).unwrap();
        let key = BucketKey::parse("AAPL/1Min/OHLCV").unwrap();
        s.fire(&AppendEvent { key: key.clone(), lsn: 1, batch: mk(vec![60, 120], vec![1.0, 2.0]) });
        let m = rx.recv().await.unwrap();
        assert_eq!(m.key, key);
        assert_eq!(m.row.num_rows(), 1);
        let frame: rmpv::Value = rmpv::decode::read_value(&mut &ws_frame(&m)[..]).unwrap();
        assert_eq!(frame["key"].as_str(), Some("AAPL/1Min/OHLCV"));
        assert_eq!(frame["data"]["Epoch"].as_i64(), Some(120));
        assert_eq!(frame["data"]["Close"].as_f64(), Some(2.0));
        // A 1H bar of the current hour is held; a second version replaces it; nothing is pushed yet.
        let now = now_secs();
        let hk = BucketKey::parse("AAPL/1H/OHLCV").unwrap();
        let h0 = tf("1H").truncate(now);
        s.fire(&AppendEvent { key: hk.clone(), lsn: 2, batch: mk(vec![h0], vec![5.0]) });
        s.fire(&AppendEvent { key: hk.clone(), lsn: 3, batch: mk(vec![h0], vec![6.0]) });
        assert!(tokio::time::timeout(Duration::from_millis(200), rx.recv()).await.is_err());
        assert_eq!(s.shelf.lock().get(&hk).map(|(d, _, _)| *d), Some(h0 + 3600));
    }
}
