//! Example shared-library trigger: copy every appended batch to another bucket.
//!
//! ```yaml
//! triggers:
//!   - module: libmkts_example_trigger.so     # in plugin_dir, or an absolute path
//!     on: "*/1Min/OHLCV"
//!     config:
//!       destination: "{symbol}_COPY/{timeframe}/{attrgroup}"   # the default
//!       sleep_ms: 0           # optional: pause in every call (to see that a slow trigger delays no writer)
//!       panic_on: BOOM        # optional: panic when this symbol is written (to see the isolation)
//! ```
//!
//! The copy is written through the host, so it is durable and fires the triggers of the destination —
//! including this one when the destination matches `on:`. The trigger remembers the keys it wrote and
//! ignores their appends, so a copy is never copied again.

use std::collections::HashSet;
use std::time::Duration;

use mkts_plugin_api::serde_json::Value;
use mkts_plugin_api::{export_plugin, Host, RecordBatch, Trigger};

struct CopyTrigger {
    host: Host,
    destination: String,
    sleep: Duration,
    panic_on: Option<String>,
    written: HashSet<String>,
}

impl Trigger for CopyTrigger {
    fn new(config: Value, host: Host) -> Result<Self, String> {
        let destination = match config.get("destination") {
            None | Some(Value::Null) => "{symbol}_COPY/{timeframe}/{attrgroup}".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(format!("destination must be a string, got {other}")),
        };
        let sleep = Duration::from_millis(config.get("sleep_ms").and_then(Value::as_u64).unwrap_or(0));
        let panic_on = config.get("panic_on").and_then(Value::as_str).map(str::to_string);
        host.info(&format!("copying appended rows to {destination}"));
        Ok(CopyTrigger { host, destination, sleep, panic_on, written: HashSet::new() })
    }

    fn fire(&mut self, key: &str, batch: RecordBatch) -> Result<(), String> {
        if self.written.contains(key) {
            return Ok(()); // our own copy coming back
        }
        let parts: Vec<&str> = key.split('/').collect();
        let [symbol, timeframe, attrgroup] = parts[..] else {
            return Err(format!("unexpected key {key}"));
        };
        if self.panic_on.as_deref() == Some(symbol) {
            panic!("asked to panic on {symbol}");
        }
        if !self.sleep.is_zero() {
            std::thread::sleep(self.sleep);
        }
        let dest = self.destination.replace("{symbol}", symbol).replace("{timeframe}", timeframe).replace("{attrgroup}", attrgroup);
        if dest == key {
            return Err("destination equals the source key; refusing to loop".into());
        }
        self.written.insert(dest.clone());
        self.host.write(&dest, &batch)?;
        Ok(())
    }
}

export_plugin!(trigger = CopyTrigger);
