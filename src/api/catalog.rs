//! `GET /api/buckets` and `GET /api/buckets/{SYM/TF/GROUP}`: the catalog, through the operations layer's
//! listing and description ([`Service::list_buckets`], [`Service::get_info`]).
//!
//! A bucket is `{"key", "symbol", "timeframe", "attribute_group", "variable_length", "columns": [{"name",
//! "type"}], "ohlc", "rows", "years", "first_epoch", "last_epoch", "size_bytes"}`: `columns` are the
//! data columns (`Epoch`, and a tick bucket's `Nanoseconds`, are the engine's own and always there),
//! `ohlc` says it has `Open`, `High`, `Low` and `Close` (the console draws those as candles), epochs are
//! Unix seconds, `size_bytes` is what its files take on disk.
//!
//! [`Service::list_buckets`]: crate::service::Service::list_buckets
//! [`Service::get_info`]: crate::service::Service::get_info

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::Extensions;
use axum::Json;
use serde_json::{json, Value};

use super::{observe, ApiError};
use crate::context::ServerContext;
use crate::engine::{BucketInfo, BucketKey, RecordKind};
use crate::service::request::parse_key;
use crate::service::{Caller, Interface};

/// The columns a bucket needs for the console's candle chart.
pub const OHLC: [&str; 4] = ["Open", "High", "Low", "Close"];

fn bucket_json(key: &BucketKey, info: &BucketInfo, size: u64) -> Value {
    let columns: Vec<Value> = info.schema.columns.iter().map(|c| json!({ "name": c.name, "type": c.ty.wire_name() })).collect();
    let ohlc = OHLC.iter().all(|n| info.schema.columns.iter().any(|c| c.name == *n));
    json!({
        "key": info.key,
        "symbol": key.symbol,
        "timeframe": key.timeframe,
        "attribute_group": key.attr_group,
        "variable_length": info.schema.kind == RecordKind::Variable,
        "columns": columns,
        "ohlc": ohlc,
        "rows": info.rows,
        "years": info.years,
        "first_epoch": info.first_epoch,
        "last_epoch": info.last_epoch,
        "size_bytes": size,
        "partitions": info.partitions,
    })
}

/// Bytes on disk of each bucket's directory (measured off the runtime's threads).
async fn sizes(ctx: &ServerContext, keys: Vec<BucketKey>) -> Vec<u64> {
    let dirs: Vec<_> = keys.iter().map(|k| ctx.engine.bucket_dir(k)).collect();
    let n = dirs.len();
    tokio::task::spawn_blocking(move || dirs.iter().map(|d| crate::metrics::disk_usage(d)).collect()).await.unwrap_or_else(|_| vec![0; n])
}

/// `GET /api/buckets`: `{"buckets": [bucket, …]}`, sorted by key.
pub async fn list(State(ctx): State<Arc<ServerContext>>, ext: Extensions) -> Result<Json<Value>, ApiError> {
    let t0 = Instant::now();
    let r = list_inner(&ctx, &Caller::of_request(Interface::HttpApi, &ext)).await;
    observe(&ctx, "buckets", t0, &r);
    r.map(Json)
}

async fn list_inner(ctx: &ServerContext, caller: &Caller) -> Result<Value, ApiError> {
    let mut buckets = ctx.service.list_buckets(caller)?;
    buckets.sort_by_key(|(k, _)| k.to_string());
    let sizes = sizes(ctx, buckets.iter().map(|(k, _)| k.clone()).collect()).await;
    let out: Vec<Value> = buckets.iter().zip(sizes).map(|((k, i), s)| bucket_json(k, i, s)).collect();
    Ok(json!({ "buckets": out }))
}

/// `GET /api/buckets/{SYM/TF/GROUP}`: one bucket (404 when it does not exist, 400 for a malformed key).
pub async fn info(State(ctx): State<Arc<ServerContext>>, ext: Extensions, key: Result<Path<String>, PathRejection>) -> Result<Json<Value>, ApiError> {
    let t0 = Instant::now();
    let r = match key {
        Ok(Path(key)) => info_inner(&ctx, &Caller::of_request(Interface::HttpApi, &ext), &key).await,
        Err(e) => Err(ApiError::bad_request(format!("bucket key: {e}"))),
    };
    observe(&ctx, "bucket_info", t0, &r);
    r.map(Json)
}

async fn info_inner(ctx: &ServerContext, caller: &Caller, key: &str) -> Result<Value, ApiError> {
    let key = parse_key(key.trim_matches('/'))?;
    let info = ctx.service.get_info(caller, &key)?;
    let size = sizes(ctx, vec![key.clone()]).await.first().copied().unwrap_or(0);
    Ok(bucket_json(&key, &info, size))
}
