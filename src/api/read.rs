//! `GET /api/query` (rows of buckets) and `POST /api/sql` (one SQL statement), through the operations
//! layer's [`Service::read`] and [`Service::sql_rows`].
//!
//! `/api/query` parameters: `key` (`SYM/TF/GROUP`, `A,B/TF/GROUP` or `*/TF/GROUP`; required), `start` and
//! `end` (inclusive; Unix seconds or the time spellings of [`crate::timestr`], UTC), `limit` (rows per
//! bucket, 1 to [`MAX_ROWS`], default [`DEFAULT_ROWS`]), `from` (`last`, the default, keeps the newest
//! rows of a limited read; `first` the oldest), `columns` (comma-separated data columns; `Epoch` always
//! comes along). The answer is `{"key", "limit", "columns", "rows", "row_count"}` ([`super::json`]); a read
//! of several buckets gets a `Symbol` column.
//!
//! `/api/sql` takes `{"sql": "SELECT …", "limit": n}` (`limit`: rows kept, 1 to [`MAX_ROWS`], default
//! [`DEFAULT_ROWS`]) and answers `{"columns", "rows", "row_count", "truncated", "elapsed_ms"}`; `truncated`
//! says the statement had more rows than `limit`, which were not read.
//!
//! [`Service::read`]: crate::service::Service::read
//! [`Service::sql_rows`]: crate::service::Service::sql_rows

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::Extensions;
use axum::Json;
use futures::TryStreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{json::table, observe, ApiError};
use crate::context::ServerContext;
use crate::service::{Caller, Interface, ReadRequest};

/// Rows returned when a request names no `limit`.
pub const DEFAULT_ROWS: usize = 10_000;
/// The most rows one request returns (a JSON table of market data is ~100 bytes a row).
pub const MAX_ROWS: usize = 100_000;

/// The query string of `/api/query` (unknown parameters are refused, so a typo is not ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryParams {
    pub key: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub limit: Option<String>,
    pub from: Option<String>,
    pub columns: Option<String>,
}

/// A `limit` parameter: 1 to [`MAX_ROWS`]; absent: [`DEFAULT_ROWS`].
pub fn parse_limit(v: Option<&str>) -> Result<usize, ApiError> {
    let Some(v) = v.map(str::trim) else { return Ok(DEFAULT_ROWS) };
    match v.parse::<usize>() {
        Ok(n) if (1..=MAX_ROWS).contains(&n) => Ok(n),
        _ => Err(ApiError::bad_request(format!("limit {v:?} must be a whole number from 1 to {MAX_ROWS}"))),
    }
}

/// A `start`/`end` parameter as seconds and nanoseconds.
fn parse_time(name: &str, v: &str) -> Result<(i64, i64), ApiError> {
    let ns = crate::timestr::parse_time_nanos(v.trim()).map_err(|e| ApiError::bad_request(format!("{name}: {e}")))?;
    Ok((ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000)))
}

/// The read a query string asks for, validated by the operations layer's constructors.
pub fn read_request(p: &QueryParams) -> Result<(ReadRequest, usize), ApiError> {
    let key = p.key.as_deref().map(str::trim).filter(|k| !k.is_empty()).ok_or_else(|| ApiError::bad_request("key is required (SYM/TF/GROUP)"))?;
    let mut req = ReadRequest::parse(key)?;
    if let Some(s) = p.start.as_deref().filter(|s| !s.trim().is_empty()) {
        let (secs, nanos) = parse_time("start", s)?;
        req = req.starting(secs, nanos)?;
    }
    if let Some(e) = p.end.as_deref().filter(|s| !s.trim().is_empty()) {
        let (secs, nanos) = parse_time("end", e)?;
        req = req.ending(secs, nanos)?;
    }
    let from_start = match p.from.as_deref().map(str::trim) {
        None | Some("") | Some("last") => false,
        Some("first") => true,
        Some(other) => return Err(ApiError::bad_request(format!("from {other:?} must be first or last"))),
    };
    let limit = parse_limit(p.limit.as_deref())?;
    req = req.limited(i64::try_from(limit).unwrap_or(i64::MAX), from_start)?;
    if let Some(cols) = p.columns.as_deref().filter(|c| !c.trim().is_empty()) {
        req.columns = Some(cols.split(',').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect());
    }
    Ok((req, limit))
}

/// `GET /api/query`.
pub async fn query(State(ctx): State<Arc<ServerContext>>, ext: Extensions, q: Result<Query<QueryParams>, QueryRejection>) -> Result<Json<Value>, ApiError> {
    let t0 = Instant::now();
    let r = match q {
        Ok(Query(p)) => query_inner(&ctx, &Caller::of_request(Interface::HttpApi, &ext), &p).await,
        Err(e) => Err(ApiError::bad_request(e.body_text())),
    };
    observe(&ctx, "query", t0, &r);
    r.map(Json)
}

async fn query_inner(ctx: &ServerContext, caller: &Caller, p: &QueryParams) -> Result<Value, ApiError> {
    let (req, limit) = read_request(p)?;
    let result = ctx.service.read(caller, &req).await?;
    let (schema, stream) = result.into_stream()?;
    let batches: Vec<_> = stream.try_collect().await?;
    let t = table(&schema, &batches)?;
    let n = t.rows.len();
    Ok(json!({ "key": p.key, "limit": limit, "columns": t.columns, "rows": t.rows, "row_count": n }))
}

/// The body of `POST /api/sql`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlBody {
    pub sql: String,
    pub limit: Option<u64>,
}

/// `POST /api/sql`.
pub async fn sql(State(ctx): State<Arc<ServerContext>>, ext: Extensions, body: Result<Json<SqlBody>, JsonRejection>) -> Result<Json<Value>, ApiError> {
    let t0 = Instant::now();
    let r = match body {
        Ok(Json(b)) => sql_inner(&ctx, &Caller::of_request(Interface::HttpApi, &ext), &b, t0).await,
        Err(e) => Err(ApiError::bad_request(format!("{} (send {{\"sql\": \"SELECT …\"}} as application/json)", e.body_text()))),
    };
    observe(&ctx, "sql", t0, &r);
    r.map(Json)
}

async fn sql_inner(ctx: &ServerContext, caller: &Caller, b: &SqlBody, t0: Instant) -> Result<Value, ApiError> {
    if b.sql.trim().is_empty() {
        return Err(ApiError::bad_request("sql is empty"));
    }
    let limit = parse_limit(b.limit.map(|n| n.to_string()).as_deref())?;
    let (schema, batches, truncated) = ctx.service.sql_rows(caller, &b.sql, limit).await?;
    let t = table(&schema, &batches)?;
    let n = t.rows.len();
    Ok(json!({
        "columns": t.columns, "rows": t.rows, "row_count": n, "truncated": truncated,
        "elapsed_ms": t0.elapsed().as_secs_f64() * 1000.0,
    }))
}
