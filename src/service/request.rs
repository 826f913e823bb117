//! The request types of the operations layer. Every interface decodes its wire form (a Flight ticket, a
//! JSON-RPC or gRPC `QueryRequest`, a plugin's JSON, a CLI command) into these, through the same
//! validating constructors, so a range, a limit or a column list means one thing everywhere.

use arrow::array::RecordBatch;

use super::error::ServiceError;
use crate::engine::{BucketKey, BucketSchema, ColumnDef, EngineError, KeySelector, RecordKind, TimePoint, DEFAULT_CATEGORIES, EPOCH, NANOSECONDS};

/// A query: a read of buckets (with MarketStore's `functions`) or a SQL statement.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryRequest {
    Read(ReadRequest),
    Sql(String),
}

/// A read of one bucket, a list of symbols or `*` in one timeframe and attribute group.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadRequest {
    pub selector: KeySelector,
    /// Inclusive bounds (seconds and nanoseconds).
    pub start: Option<TimePoint>,
    pub end: Option<TimePoint>,
    /// At most this many rows per bucket; `None`: all.
    pub limit: Option<usize>,
    /// With a limit: the first rows (`true`) or the last (`false`, MarketStore's default).
    pub from_start: bool,
    /// Data columns to return (`Epoch`, and `Nanoseconds` for ticks, always come along).
    pub columns: Option<Vec<String>>,
    /// MarketStore function chain applied to each bucket's rows, e.g.
    /// `candlecandler('1H',Open,High,Low,Close,Sum::Volume)`; empty: none.
    pub functions: Vec<String>,
    /// Return a tick bucket's time as one `Epoch` column of `timestamp[ns, UTC]` (its `Epoch` seconds and
    /// `Nanoseconds` combined) instead of the two columns MarketStore clients expect. Buckets without a
    /// `Nanoseconds` column (fixed timeframes, function results such as candles) are returned unchanged.
    pub epoch_ns: bool,
}

/// A nanoseconds field, checked to `0..1e9`; `field` names it in the error.
pub fn nanos(field: &str, v: i64) -> Result<i32, ServiceError> {
    if (0..1_000_000_000).contains(&v) {
        Ok(v as i32)
    } else {
        Err(ServiceError::invalid(format!("{field} {v} is outside 0..1e9")))
    }
}

/// A bucket key (`SYM/TF/GROUP`, optionally with `:Symbol/Timeframe/AttributeGroup`).
pub fn parse_key(key: &str) -> Result<BucketKey, ServiceError> {
    Ok(BucketKey::parse(key)?)
}

impl ReadRequest {
    /// Every row of `destination` (`SYM/TF/GROUP`, `A,B/TF/GROUP` or `*/TF/GROUP`).
    pub fn parse(destination: &str) -> Result<ReadRequest, ServiceError> {
        let selector = KeySelector::parse(destination).map_err(|e| match e {
            // MarketStore's text for a destination without three parts.
            EngineError::InvalidKey { reason, .. } if reason.starts_with("destinations must") => ServiceError::invalid(reason),
            other => other.into(),
        })?;
        Ok(ReadRequest { selector, start: None, end: None, limit: None, from_start: false, columns: None, functions: Vec::new(), epoch_ns: false })
    }

    /// Every row of one bucket.
    pub fn key(key: &BucketKey) -> ReadRequest {
        let r = crate::engine::ReadRequest::key(key);
        ReadRequest { selector: r.selector, start: None, end: None, limit: None, from_start: false, columns: None, functions: Vec::new(), epoch_ns: false }
    }

    /// Only MarketStore's one key category is supported; anything else is refused, not ignored.
    pub fn check_key_category(self, category: Option<&str>) -> Result<ReadRequest, ServiceError> {
        match category {
            Some(cat) if !cat.is_empty() && !cat.eq_ignore_ascii_case(DEFAULT_CATEGORIES) => {
                Err(ServiceError::invalid(format!("key category {cat:?} is not supported (only {DEFAULT_CATEGORIES})")))
            }
            _ => Ok(self),
        }
    }

    /// Inclusive start at `secs` + `nanos` (checked to `0..1e9`).
    pub fn starting(mut self, secs: i64, nanos_: i64) -> Result<ReadRequest, ServiceError> {
        self.start = Some(TimePoint { secs, nanos: nanos("epoch_start_nanos", nanos_)? });
        Ok(self)
    }

    /// Inclusive end at `secs` + `nanos`. As in MarketStore, an end without nanoseconds is the exact
    /// second (`secs.000000000`).
    pub fn ending(mut self, secs: i64, nanos_: i64) -> Result<ReadRequest, ServiceError> {
        self.end = Some(TimePoint { secs, nanos: nanos("epoch_end_nanos", nanos_)? });
        Ok(self)
    }

    /// MarketStore's `limit_record_count` (0: no limit; negative: refused) and `limit_from_start`.
    pub fn limited(mut self, count: i64, from_start: bool) -> Result<ReadRequest, ServiceError> {
        self.limit = match count {
            0 => None,
            n if n < 0 => return Err(ServiceError::invalid("limit_record_count must not be negative")),
            n => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        self.from_start = from_start;
        Ok(self)
    }

    /// The engine's form (without `functions`, which the operations layer applies after reading).
    pub fn to_engine(&self) -> crate::engine::ReadRequest {
        crate::engine::ReadRequest {
            selector: self.selector.clone(),
            start: self.start,
            end: self.end,
            limit: self.limit,
            from_start: self.from_start,
            columns: self.columns.clone(),
        }
    }
}

/// A durable write of one batch to one bucket (created by the write when absent, if allowed).
#[derive(Debug, Clone)]
pub struct WriteRequest {
    pub key: BucketKey,
    pub batch: RecordBatch,
    /// When the bucket does not exist: create it variable-length (`Some(true)`) or fixed; `None` infers
    /// it from the batch (a `Nanoseconds` column makes a tick bucket).
    pub variable: Option<bool>,
}

impl WriteRequest {
    pub fn new(key: BucketKey, batch: RecordBatch) -> WriteRequest {
        WriteRequest { key, batch, variable: None }
    }
}

/// The creation of an empty bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateRequest {
    pub key: BucketKey,
    pub schema: BucketSchema,
}

/// A column list as MarketStore clients send it — names and type strings (`f4`, `<i8`, `|b1`, `U16`,
/// or `float32`, …) — as a bucket schema. `Epoch`, and `Nanoseconds` of a variable-length bucket, are the
/// engine's own and skipped. An unknown type is refused with MarketStore's `unexpected data type:<t>`.
pub fn parse_columns(names: &[String], types: &[String], variable: bool) -> Result<BucketSchema, ServiceError> {
    if names.len() != types.len() {
        return Err(ServiceError::invalid(format!("{} column names but {} column types", names.len(), types.len())));
    }
    let kind = if variable { RecordKind::Variable } else { RecordKind::Fixed };
    let mut columns = Vec::with_capacity(names.len());
    for (name, t) in names.iter().zip(types) {
        let col = ColumnDef::parse(name.clone(), t).map_err(|_| ServiceError::invalid(format!("unexpected data type:{t}")))?;
        if name == EPOCH || (name == NANOSECONDS && kind == RecordKind::Variable) {
            continue;
        }
        columns.push(col);
    }
    Ok(BucketSchema { kind, columns })
}

impl CreateRequest {
    /// `key` with the columns `names`/`types` ([`parse_columns`]).
    pub fn parse(key: &str, names: &[String], types: &[String], variable: bool) -> Result<CreateRequest, ServiceError> {
        let key = parse_key(key)?;
        Ok(CreateRequest { key, schema: parse_columns(names, types, variable)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_requests_validate_ranges_and_limits_once() {
        let r = ReadRequest::parse("A,B/1Min/OHLCV").unwrap().starting(60, 5).unwrap().limited(10, true).unwrap();
        assert_eq!(r.start, Some(TimePoint { secs: 60, nanos: 5 }));
        assert_eq!((r.limit, r.from_start), (Some(10), true));
        assert_eq!(ReadRequest::parse("A/1Min/X").unwrap().limited(0, false).unwrap().limit, None);
        let e = ReadRequest::parse("A/1Min/X").unwrap().limited(-1, false).unwrap_err();
        assert_eq!(e.message, "limit_record_count must not be negative");
        let e = ReadRequest::parse("A/1Min/X").unwrap().ending(0, 1_000_000_000).unwrap_err();
        assert_eq!(e.message, "epoch_end_nanos 1000000000 is outside 0..1e9");
        let e = ReadRequest::parse("A/1Min").unwrap_err();
        assert!(e.message.starts_with("destinations must have"), "{}", e.message);
        assert!(ReadRequest::parse("A/1Min/X").unwrap().check_key_category(Some("Symbol/Timeframe/AttributeGroup")).is_ok());
        assert!(ReadRequest::parse("A/1Min/X").unwrap().check_key_category(Some("Other")).is_err());
    }

    #[test]
    fn create_columns_accept_numpy_and_long_type_names() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let c = CreateRequest::parse("T/1Sec/TICK", &s(&["Epoch", "Price", "Nanoseconds"]), &s(&["i8", "<f4", "i4"]), true).unwrap();
        assert_eq!(c.schema.columns.len(), 1);
        assert_eq!(c.schema.kind, RecordKind::Variable);
        let c = CreateRequest::parse("T/1Min/X", &s(&["Open"]), &s(&["float32"]), false).unwrap();
        assert_eq!(c.schema.columns[0].ty, crate::engine::ColumnType::F32);
        assert_eq!(parse_columns(&s(&["P"]), &s(&["b8"]), false).unwrap_err().message, "unexpected data type:b8");
        assert!(parse_columns(&s(&["P", "Q"]), &s(&["f4"]), false).unwrap_err().message.contains("2 column names but 1"));
    }
}
