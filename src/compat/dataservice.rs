//! MarketStore's `DataService` as JSON-RPC (`/rpc`) and gRPC (`proto.Marketstore`) share it: the parts
//! that are MarketStore's own — results packed as NumpyMultiDataset, per-request error texts, the
//! stop-at-an-unknown-type rule of `Create` — around the operations layer ([`crate::service`]), which
//! does the work and checks policy. Each front end decodes its wire form into [`QueryRequest`]s and these
//! calls, and encodes what comes back.

use chrono::{Datelike, Utc};

use crate::context::ServerContext;
use crate::engine::{RecordKind, EPOCH};
use crate::service::request::{parse_columns, parse_key};
use crate::service::{Caller, CreateRequest, ErrorCode, QueryRequest, ServiceError, SymbolFormat, WriteRequest};

use super::numpy::{pack, unpack, NumpyIn, NumpyOut, Part};

/// Run one query and pack its result (one part per bucket, keys with their categories).
pub async fn query(ctx: &ServerContext, caller: &Caller, q: &QueryRequest) -> Result<NumpyOut, ServiceError> {
    let parts = match q {
        QueryRequest::Sql(sql) => {
            // MarketStore's SQL subset (its time literals, BETWEEN, select-list functions), else mkts's SQL.
            let (schema, batches) = super::sql::run(&ctx.service, caller, sql).await?;
            vec![Part { key: format!("{sql}:SQL"), schema, batches }]
        }
        QueryRequest::Read(r) => {
            // The requested timeframe as it is stored; if no selected bucket exists under it, the one
            // MarketStore reads for it (§1.11), whose key the reply then carries.
            let res = match ctx.service.read(caller, r).await {
                Err(e) if e.code == ErrorCode::NotFound => match super::timeframe::mapped(r) {
                    Some(m) => ctx.service.read(caller, &m).await?,
                    None => return Err(e),
                },
                other => other?,
            };
            res.parts.into_iter().map(|p| Part { key: p.key.with_categories(), schema: p.schema, batches: p.batches }).collect()
        }
    };
    pack(parts).map_err(ServiceError::invalid)
}

/// Write one dataset (possibly several bucket keys). The first failing key aborts the rest.
pub async fn write(ctx: &ServerContext, caller: &Caller, ds: &NumpyIn<'_>, variable: bool) -> Result<(), ServiceError> {
    for (key, batch) in unpack(ds).map_err(ServiceError::invalid)? {
        let w = WriteRequest { key: parse_key(&key)?, batch, variable: Some(variable) };
        ctx.service.write(caller, &w).await?;
    }
    Ok(())
}

/// Why a create failed: `Stop` ends the processing of the remaining requests (an unknown column type,
/// as in MarketStore).
#[derive(Debug)]
pub enum CreateError {
    Continue(String),
    Stop(String),
}

/// Create one bucket from MarketStore's `(name, type)` pairs. `require_categories`: the JSON-RPC key must
/// carry `:Symbol/Timeframe/AttributeGroup`.
pub async fn create(
    ctx: &ServerContext,
    caller: &Caller,
    key: &str,
    columns: &[(String, String)],
    variable: bool,
    require_categories: bool,
) -> Result<(), CreateError> {
    if require_categories && key.matches(':').count() != 1 {
        return Err(CreateError::Continue(format!(
            "key \"{key}\" is not in proper format, should be like: TSLA/1Min/OHLCV:Symbol/TimeFrame/AttributeGroup"
        )));
    }
    let bucket = parse_key(key).map_err(|e| CreateError::Continue(e.message))?;
    let (names, types): (Vec<String>, Vec<String>) = columns.iter().cloned().unzip();
    let schema = parse_columns(&names, &types, variable).map_err(|e| CreateError::Stop(e.message))?;
    ctx.service
        .create(caller, &CreateRequest { key: bucket, schema })
        .await
        .map_err(|e| CreateError::Continue(format!("creation of new catalog entry failed: {}", e.message)))
}

/// Destroy one bucket (categories suffix optional); MarketStore's texts on failure.
pub async fn destroy(ctx: &ServerContext, caller: &Caller, key: &str) -> Result<(), String> {
    let k = parse_key(key).map_err(|e| format!("removal of catalog entry failed: {}", e.message))?;
    ctx.service.destroy(caller, &k).await.map_err(|e| match e.code {
        ErrorCode::NotFound => format!("removal of catalog entry failed: Unable to find level item: {} in directory", k.symbol),
        _ => format!("removal of catalog entry failed: {}", e.message),
    })
}

/// Symbols (`tbk == false`) or `SYM/TF/GROUP` keys, sorted. Before start-up finishes the answer is
/// MarketStore's "not queryable".
pub fn list_symbols(ctx: &ServerContext, caller: &Caller, tbk: bool) -> Result<Vec<String>, ServiceError> {
    if !ctx.is_ready() {
        return Err(ServiceError::new(ErrorCode::Unavailable, crate::service::NOT_QUERYABLE));
    }
    ctx.service.list_symbols(caller, if tbk { SymbolFormat::Keys } else { SymbolFormat::Symbols })
}

/// GetInfo of one key: `(latest year, timeframe ns, [(name, type code)], record type, error)`.
pub struct Info {
    pub latest_year: i64,
    pub timeframe_ns: i64,
    pub dsv: Vec<(String, u8)>,
    pub record_type: i64,
    pub error: String,
}

/// Describe one bucket (zeroed fields and an error text when it cannot be described).
pub fn get_info(ctx: &ServerContext, caller: &Caller, key: &str) -> Info {
    let res = parse_key(key).and_then(|k| ctx.service.get_info(caller, &k).map(|i| (k, i)));
    match res {
        Ok((k, info)) => {
            // Columns of types MarketStore lacks are left out: its clients cannot read them.
            let mut dsv = vec![(EPOCH.to_string(), 3)];
            dsv.extend(info.schema.columns.iter().filter_map(|c| Some((c.name.clone(), c.ty.marketstore_code()?))));
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
            error: format!("unable to get info about key {key}: {}", e.message),
        },
    }
}
