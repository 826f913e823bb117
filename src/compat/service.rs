//! MarketStore's DataService operations, shared by the JSON-RPC (`/rpc`) and gRPC (`proto.Marketstore`)
//! front ends. Each front end only decodes its wire form into these specs and encodes the results.

use std::collections::BTreeSet;

use chrono::{Datelike, Utc};

use crate::context::ServerContext;
use crate::engine::{
    BucketKey, BucketSchema, ColumnDef, ColumnType, EngineError, KeySelector, ReadRequest, RecordKind, TimePoint,
    WriteOptions, DEFAULT_CATEGORIES, EPOCH, NANOSECONDS,
};
use crate::query::QueryError;

use super::numpy::{pack, unpack, NumpyIn, NumpyOut, Part};

/// One query request (a `QueryRequest` of either protocol).
#[derive(Debug, Clone, Default)]
pub struct QuerySpec {
    /// `is_sqlstatement` + `sql_statement`.
    pub sql: Option<String>,
    pub destination: String,
    pub key_category: Option<String>,
    pub start: Option<TimePoint>,
    pub end: Option<TimePoint>,
    pub limit: Option<usize>,
    pub from_start: bool,
    pub columns: Option<Vec<String>>,
    pub functions: Option<Vec<String>>,
}

fn engine_msg(e: EngineError) -> String {
    e.to_string()
}

fn query_msg(e: QueryError) -> String {
    e.to_string()
}

/// Make MarketStore-style SQL acceptable to the SQL engine: drop the trailing `;` (mandatory in
/// MarketStore) and turn backquoted identifiers (`` `AAPL/1Min/OHLCV` ``) into double-quoted ones.
pub fn normalize_sql(text: &str) -> String {
    let t = text.trim().trim_end_matches(|c: char| c == ';' || c.is_whitespace());
    let mut out = String::with_capacity(t.len());
    let mut in_str = false;
    for c in t.chars() {
        match c {
            '\'' => {
                in_str = !in_str;
                out.push(c);
            }
            '`' if !in_str => out.push('"'),
            _ => out.push(c),
        }
    }
    out
}

/// Run one query and pack its result. Errors carry MarketStore's wording.
pub async fn query(ctx: &ServerContext, q: QuerySpec) -> Result<NumpyOut, String> {
    ctx.check_queryable().map_err(engine_msg)?;
    if let Some(sql) = &q.sql {
        let (schema, batches) = ctx.query.sql(&normalize_sql(sql)).await.map_err(query_msg)?;
        return pack(vec![Part { key: format!("{sql}:SQL"), schema, batches }]);
    }
    if let Some(cat) = &q.key_category
        && !cat.is_empty()
        && !cat.eq_ignore_ascii_case(DEFAULT_CATEGORIES)
    {
        return Err(format!("key category {cat:?} is not supported (only {DEFAULT_CATEGORIES})"));
    }
    let selector = KeySelector::parse(&q.destination).map_err(|e| match e {
        EngineError::InvalidKey { reason, .. } if reason.starts_with("destinations must") => reason,
        other => other.to_string(),
    })?;
    let req = ReadRequest {
        selector,
        start: q.start,
        end: q.end,
        limit: q.limit,
        from_start: q.from_start,
        columns: q.columns.clone(),
    };
    let reads = ctx.engine.read(&req).map_err(engine_msg)?;
    let mut parts = Vec::with_capacity(reads.len());
    match q.functions.as_deref() {
        Some(f) if !f.is_empty() => {
            for r in reads {
                let key = r.key.with_categories();
                let (schema, batches) = ctx.query.apply_functions(r, f).await.map_err(query_msg)?;
                parts.push(Part { key, schema, batches });
            }
        }
        _ => {
            for r in reads {
                parts.push(Part { key: r.key.with_categories(), schema: r.schema, batches: r.batches });
            }
        }
    }
    pack(parts)
}

/// Write one dataset (possibly several bucket keys). The first failing key aborts the rest.
pub async fn write(ctx: &ServerContext, ds: &NumpyIn<'_>, variable: bool) -> Result<(), String> {
    let batches = unpack(ds)?;
    for (key, batch) in batches {
        let k = BucketKey::parse(&key).map_err(engine_msg)?;
        ctx.engine.write(&k, &batch, WriteOptions { variable: Some(variable) }).await.map_err(engine_msg)?;
    }
    Ok(())
}

/// A create request.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub key: String,
    /// `(name, wire type)` pairs; an `Epoch` entry is ignored.
    pub columns: Vec<(String, String)>,
    pub variable: bool,
}

/// Why a create failed: `Stop` ends the processing of the remaining requests (unknown type, MarketStore).
#[derive(Debug)]
pub enum CreateError {
    Continue(String),
    Stop(String),
}

/// Create one bucket. `require_categories`: the JSON-RPC key must carry `:Symbol/Timeframe/AttributeGroup`.
pub async fn create(ctx: &ServerContext, c: &CreateSpec, require_categories: bool) -> Result<(), CreateError> {
    if require_categories && c.key.matches(':').count() != 1 {
        return Err(CreateError::Continue(format!(
            "key \"{}\" is not in proper format, should be like: TSLA/1Min/OHLCV:Symbol/TimeFrame/AttributeGroup",
            c.key
        )));
    }
    let key = BucketKey::parse(&c.key).map_err(|e| CreateError::Continue(e.to_string()))?;
    let kind = if c.variable { RecordKind::Variable } else { RecordKind::Fixed };
    let mut columns = Vec::with_capacity(c.columns.len());
    for (name, t) in &c.columns {
        let ty = match t.trim_start_matches(['<', '|', '=']) {
            s if s.len() == 2 || s == "U16" => ColumnType::from_wire(s).ok(),
            _ => None,
        }
        .ok_or_else(|| CreateError::Stop(format!("unexpected data type:{t}")))?;
        if name == EPOCH || (name == NANOSECONDS && kind == RecordKind::Variable) {
            continue;
        }
        columns.push(ColumnDef { name: name.clone(), ty });
    }
    ctx.engine
        .create(&key, BucketSchema { kind, columns })
        .await
        .map_err(|e| CreateError::Continue(format!("creation of new catalog entry failed: {e}")))
}

/// Destroy one bucket (categories suffix optional).
pub async fn destroy(ctx: &ServerContext, key: &str) -> Result<(), String> {
    let k = BucketKey::parse(key).map_err(|e| format!("removal of catalog entry failed: {e}"))?;
    ctx.engine.destroy(&k).await.map_err(|e| match e {
        EngineError::NotFound(_) => {
            format!("removal of catalog entry failed: Unable to find level item: {} in directory", k.symbol)
        }
        other => format!("removal of catalog entry failed: {other}"),
    })
}

/// Symbols (`tbk == false`) or `SYM/TF/GROUP` keys, sorted.
pub fn list_symbols(ctx: &ServerContext, tbk: bool) -> Result<Vec<String>, String> {
    if ctx.check_queryable().is_err() || !ctx.is_ready() {
        return Err(crate::context::NOT_QUERYABLE.into());
    }
    let keys = ctx.engine.keys();
    Ok(if tbk {
        keys.iter().map(|k| k.to_string()).collect()
    } else {
        keys.iter().map(|k| k.symbol.clone()).collect::<BTreeSet<_>>().into_iter().collect()
    })
}

/// GetInfo of one key: `(latest year, timeframe ns, [(name, type code)], record type, error)`.
pub struct Info {
    pub latest_year: i64,
    pub timeframe_ns: i64,
    pub dsv: Vec<(String, u8)>,
    pub record_type: i64,
    pub error: String,
}

/// Describe one bucket (zeroed fields and an error text when it does not exist).
pub fn get_info(ctx: &ServerContext, key: &str) -> Info {
    let res = BucketKey::parse(key).and_then(|k| ctx.engine.info(&k).map(|i| (k, i)));
    match res {
        Ok((k, info)) => {
            let mut dsv = vec![(EPOCH.to_string(), ColumnType::I64.marketstore_code())];
            dsv.extend(info.schema.columns.iter().map(|c| (c.name.clone(), c.ty.marketstore_code())));
            Info {
                latest_year: info.years.last().map(|y| *y as i64).unwrap_or_else(|| Utc::now().year() as i64),
                timeframe_ns: k.tf().nominal_nanos(),
                dsv,
                record_type: if info.schema.kind == RecordKind::Variable { 1 } else { 0 },
                error: String::new(),
            }
        }
        Err(e) => Info {
            latest_year: 0,
            timeframe_ns: 0,
            dsv: Vec::new(),
            record_type: 0,
            error: format!("unable to get info about key {key}: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_normalization() {
        assert_eq!(normalize_sql("SELECT * FROM `AAPL/1Min/OHLCV`;"), "SELECT * FROM \"AAPL/1Min/OHLCV\"");
        assert_eq!(normalize_sql("select '`x`' from t ; ;\n"), "select '`x`' from t");
    }
}
