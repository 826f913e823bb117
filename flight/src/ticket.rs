//! The plain Flight contract's request bodies: MarketStore `QueryRequest` JSON tickets and action bodies.

use serde::{Deserialize, Serialize};

/// A DoGet ticket / GetFlightInfo command: MarketStore's QueryRequest field names, plus `sql` and `subscribe`.
///
/// ```
/// let t = mkts_flight::ticket::QueryTicket::parse(br#"{"destination":"AAPL/1Min/OHLCV","limit_record_count":10}"#).unwrap();
/// assert_eq!(t.limit_record_count, Some(10));
/// let bare = mkts_flight::ticket::QueryTicket::parse(b"AAPL/1Min/OHLCV").unwrap();
/// assert_eq!(bare.destination.as_deref(), Some("AAPL/1Min/OHLCV"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryTicket {
    /// `SYM/TF/GROUP`, `A,B/TF/GROUP` or `*/TF/GROUP` (optionally with `:Symbol/Timeframe/AttributeGroup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_category: Option<String>,
    /// Inclusive start, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_start: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_start_nanos: Option<i64>,
    /// Inclusive end, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_end: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_end_nanos: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_record_count: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_from_start: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
    /// MarketStore function chain, e.g. `["candlecandler('1H',Open,High,Low,Close,Sum::Volume)"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<String>>,
    /// With `destination`: return a tick bucket's `Epoch` and `Nanoseconds` as one `Epoch` column of
    /// `timestamp[ns, UTC]` (docs/flight.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_ns: Option<bool>,
    /// A SQL statement instead of a key read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// MarketStore's SQL flag (accepted for symmetry with JSON-RPC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_sqlstatement: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql_statement: Option<String>,
    /// Stream appended rows of keys matching this glob until the client cancels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<String>,
    /// With `subscribe`: `"appends"` (the default: every append, whole) or `"stream"` (what the `stream`
    /// trigger pushes, as `/ws` clients get it: the newest row per write, shelved and filtered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed: Option<String>,
    /// With `subscribe`: resume after this log position (the `lsn` of the last batch handled): the
    /// appends after it that the server still holds come first, then live ones (docs/flight.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_lsn: Option<u64>,
    /// The stream of an out-of-process trigger: the secret the plugin host handed the process (in
    /// `MKTS_TRIGGER_TICKET`), opened with DoExchange. Delivers that trigger's queued appends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
}

impl QueryTicket {
    /// Parse a ticket: a JSON object, or a bare key.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "ticket is not UTF-8 (expected JSON or a bucket key)".to_string())?;
        let t = text.trim();
        if t.starts_with('{') {
            let mut q: QueryTicket = serde_json::from_str(t).map_err(|e| format!("invalid ticket JSON: {e}"))?;
            if q.sql.is_none() && q.is_sqlstatement == Some(true) {
                q.sql = q.sql_statement.take();
            }
            if q.destination.is_none() && q.sql.is_none() && q.subscribe.is_none() && q.trigger.is_none() {
                return Err("ticket needs \"destination\", \"sql\", \"subscribe\" or \"trigger\"".into());
            }
            Ok(q)
        } else if t.is_empty() {
            Err("empty ticket".into())
        } else {
            Ok(QueryTicket { destination: Some(t.to_string()), ..Default::default() })
        }
    }
}

/// Body of the `create` action.
#[derive(Debug, Clone, Deserialize)]
pub struct CreateAction {
    pub key: String,
    /// Omitted or empty: an Epoch-only bucket, as MarketStore creates from an empty column list.
    #[serde(default)]
    pub column_names: Vec<String>,
    #[serde(default)]
    pub column_types: Vec<String>,
    #[serde(default)]
    pub is_variable_length: bool,
    #[serde(default)]
    pub row_type: Option<String>,
}

/// Body of `destroy` / `get_info` when given as JSON.
#[derive(Debug, Clone, Deserialize)]
pub struct KeyAction {
    pub key: String,
}

/// Body of `delete_range`.
#[derive(Debug, Clone, Deserialize)]
pub struct DeleteRangeAction {
    pub key: String,
    pub epoch_start: i64,
    pub epoch_end: i64,
    #[serde(default)]
    pub epoch_start_nanos: Option<i64>,
    #[serde(default)]
    pub epoch_end_nanos: Option<i64>,
}

/// Body of `add_column`: the columns to add, typed as for `create` (they become nullable).
#[derive(Debug, Clone, Deserialize)]
pub struct AddColumnAction {
    pub key: String,
    pub column_names: Vec<String>,
    pub column_types: Vec<String>,
}

/// Body of `drop_column`.
#[derive(Debug, Clone, Deserialize)]
pub struct DropColumnAction {
    pub key: String,
    pub column_names: Vec<String>,
}

/// Body of `list_symbols`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListSymbolsAction {
    #[serde(default)]
    pub format: Option<String>,
}

/// A key given either bare or as `{"key": ...}`.
pub fn key_body(body: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(body).map_err(|_| "action body is not UTF-8".to_string())?.trim();
    if text.starts_with('{') {
        serde_json::from_str::<KeyAction>(text).map(|k| k.key).map_err(|e| format!("invalid action body: {e}"))
    } else if text.is_empty() {
        Err("action needs a key".into())
    } else {
        Ok(text.to_string())
    }
}
