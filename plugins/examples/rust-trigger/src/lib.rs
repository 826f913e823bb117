//! Example shared-library trigger: copy every appended batch to another bucket.
//!
//! ```yaml
//! triggers:
//!   - module: libmkts_example_trigger.so     # in plugin_dir, or an absolute path
//!     on: "*/1Min/OHLCV"
//!     config:
//!       destination: "{symbol}_COPY/{timeframe}/{attrgroup}"   # the default
//!       panic_on: BOOM        # optional: panic when this symbol is written (to test isolation)
//! ```
//!
//! The copy is written through the host, so it is durable and fires the triggers of the destination.

use mkts_plugin_api::{export_plugin, Host, RecordBatch, Trigger};

struct CopyTrigger {
    host: Host,
    destination: String,
    panic_on: Option<String>,
    fired: u64,
}

impl Trigger for CopyTrigger {
    fn new(config: mkts_plugin_api::serde_json::Value, host: Host) -> Result<Self, String> {
        let destination = match config.get("destination") {
            None | Some(mkts_plugin_api::serde_json::Value::Null) => "{symbol}_COPY/{timeframe}/{attrgroup}".to_string(),
            Some(mkts_plugin_api::serde_json::Value::String(s)) => s.clone(),
            Some(other) => return Err(format!("destination must be a string, got {other}")),
        };
        let panic_on = config.get("panic_on").and_then(|v| v.as_str()).map(str::to_string);
        host.info(&format!("copying appended rows to {destination}"));
        Ok(CopyTrigger { host, destination, panic_on, fired: 0 })
    }

    fn fire(&mut self, key: &str, batch: RecordBatch) -> Result<(), String> {
        let parts: Vec<&str> = key.split('/').collect();
        let [symbol, timeframe, attrgroup] = parts[..] else {
            return Err(format!("unexpected key {key}"));
        };
        if self.panic_on.as_deref() == Some(symbol) {
            panic!("asked to panic on {symbol}");
        }
        let dest = self.destination.replace("{symbol}", symbol).replace("{timeframe}", timeframe).replace("{attrgroup}", attrgroup);
        if dest == key {
            return Err("destination equals the source key; refusing to loop".into());
        }
        self.host.write(&dest, &batch)?;
        self.fired += 1;
        Ok(())
    }
}

export_plugin!(trigger = CopyTrigger);
