//! Example shared-library background worker: append one row per interval to a bucket.
//!
//! ```yaml
//! bgworkers:
//!   - module: libmkts_example_worker.so
//!     name: ticker
//!     config:
//!       key: TICKER/1Min/OHLCV   # where to write (the default)
//!       interval_ms: 100         # pause between rows (default 1000)
//!       count: 5                 # stop after this many rows in total (default: run until shutdown)
//!       panic_after: 3           # optional: panic after writing this many rows (to see the isolation)
//! ```
//!
//! Row `i` has `Epoch = i * 60` and `Value = i`. On start the worker reads the bucket back through the host
//! and resumes after the last row it finds, so restarts do not rewrite history.

use std::sync::Arc;
use std::time::Duration;

use mkts_plugin_api::arrow::array::{Float64Array, Int64Array};
use mkts_plugin_api::arrow::datatypes::{DataType, Field, Schema};
use mkts_plugin_api::{export_plugin, Host, RecordBatch, Stop, Worker};

struct Ticker {
    host: Host,
    key: String,
    interval: Duration,
    count: Option<u64>,
    panic_after: Option<u64>,
}

impl Worker for Ticker {
    fn new(config: mkts_plugin_api::serde_json::Value, host: Host) -> Result<Self, String> {
        let key = config.get("key").and_then(|v| v.as_str()).unwrap_or("TICKER/1Min/OHLCV").to_string();
        let interval = Duration::from_millis(config.get("interval_ms").and_then(|v| v.as_u64()).unwrap_or(1000));
        let count = config.get("count").and_then(|v| v.as_u64());
        let panic_after = config.get("panic_after").and_then(|v| v.as_u64());
        Ok(Ticker { host, key, interval, count, panic_after })
    }

    fn run(&self, stop: &Stop) -> Result<(), String> {
        // Resume after what is already stored (nothing to resume from when the bucket cannot be read).
        let existing: usize = match self.host.read(&self.key, None, None) {
            Ok(b) => b.iter().map(|b| b.num_rows()).sum(),
            Err(e) => {
                self.host.info(&format!("nothing to resume from in {}: {e}", self.key));
                0
            }
        };
        let mut i = existing as u64;
        self.host.info(&format!("writing to {} from row {i}", self.key));
        let schema = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false), Field::new("Value", DataType::Float64, false)]));
        while !stop.is_stopped() && self.count.is_none_or(|c| i < c) {
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from(vec![i as i64 * 60])), Arc::new(Float64Array::from(vec![i as f64]))],
            )
            .map_err(|e| e.to_string())?;
            self.host.write(&self.key, &batch)?;
            i += 1;
            if self.panic_after.is_some_and(|n| i >= n) {
                panic!("asked to panic after row {i}");
            }
            if stop.sleep(self.interval) {
                break;
            }
        }
        self.host.info(&format!("stopped after row {i}"));
        Ok(())
    }
}

export_plugin!(worker = Ticker);
