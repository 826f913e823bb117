//! MarketStore compatibility: everything an existing MarketStore client (pymarketstore, the Go client,
//! dashboards) talks to, on the ports it expects.
//!
//! - `listen_port` (HTTP, [`http_router`]): `/rpc` JSON-RPC `DataService` over msgpack or JSON ([`rpc`]),
//!   `/ws` streaming ([`ws`]), `/heartbeat`, Prometheus `/metrics`.
//! - `grpc_listen_port` ([`grpc::service`]): `proto.Marketstore`, added to the same tonic server as Flight.
//!
//! Both protocols decode into the requests of the operations layer ([`crate::service`]) through the
//! MarketStore-specific adapter [`dataservice`]; results are packed into MarketStore's NumpyMultiDataset
//! straight from the engine's zero-copy Arrow batches ([`numpy`]). `enable_add` / `enable_remove` /
//! `queryable` are checked by the operations layer, and its refusals surface as a JSON-RPC error
//! (queries, listings), a per-request error (writes, creates, destroys) or a gRPC status.
//! `queryable: false` refuses every read and listing (Query, GetInfo, ListSymbols, `/ws` subscribes) with
//! one error, `server is not queryable`.

pub mod dataservice;
pub mod grpc;
pub mod numpy;
pub mod rpc;
pub mod sql;
pub mod timeframe;
pub mod value;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;

use crate::context::{ServerContext, VERSION};
use crate::metrics::{cached_disk_usage, EngineSample};

/// How long a measured disk usage is reused before `/metrics` measures again.
pub use crate::metrics::DISK_USAGE_MAX_AGE;

/// The HTTP routes of `listen_port`: `/rpc`, `/ws`, `/heartbeat`, `/metrics`.
///
/// With `auth:`, `/rpc` and `/ws` (and `/metrics` under `auth.protect_metrics`) need credentials
/// ([`crate::auth::http`]); `/heartbeat` stays open for load balancers.
pub fn http_router(ctx: Arc<ServerContext>) -> Router {
    let hub = ws::WsHub::new(ctx.clone());
    let recorder = ctx.metrics.clone();
    let auth = ctx.auth.clone();
    let protect_metrics = ctx.config.auth.as_ref().is_some_and(|a| a.protect_metrics);
    let mut protected = Router::new().route("/rpc", any(rpc::handle));
    let mut open = Router::new().route("/heartbeat", any(heartbeat));
    if protect_metrics {
        protected = protected.route("/metrics", get(metrics));
    } else {
        open = open.route("/metrics", get(metrics));
    }
    let mut protected = protected.with_state(ctx.clone()).merge(Router::new().route("/ws", any(ws::handle)).with_state(hub));
    if let Some(a) = auth {
        protected = protected.layer(axum::middleware::from_fn_with_state(a, crate::auth::http::require));
    }
    open.with_state(ctx).merge(protected).layer(axum::middleware::from_fn_with_state(recorder, crate::metrics::layer::record_http))
}

/// `/heartbeat` (any method): 200 `queryable` once ready, 503 `not queryable` before/while shutting down;
/// `health` is `degraded` (with `writable`, `halted`, `damaged`, `checkpoint_error`) when the engine
/// refuses writes, holds a damaged bucket or cannot checkpoint.
pub async fn heartbeat(State(ctx): State<Arc<ServerContext>>) -> Response {
    let ok = ctx.is_ready();
    // MarketStore's fields first; then what the engine can do right now, so a monitor sees a server that
    // still answers queries but refuses writes, or a damaged bucket.
    let health = ctx.engine.health();
    let degraded = !health.writable || !health.damaged.is_empty() || health.checkpoint_error.is_some();
    let body = serde_json::json!({
        "status": if ok { "queryable" } else { "not queryable" },
        "version": VERSION,
        "git_hash": option_env!("MKTS_GIT_HASH").unwrap_or(""),
        "uptime": go_duration(ctx.started.elapsed()),
        "health": if degraded { "degraded" } else { "ok" },
        "writable": health.writable,
        "halted": health.halted,
        "damaged": health.damaged,
        "checkpoint_error": health.checkpoint_error,
    });
    (if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, axum::Json(body)).into_response()
}

/// Prometheus text exposition.
async fn metrics(State(ctx): State<Arc<ServerContext>>) -> Response {
    let disk = cached_disk_usage(&ctx.metrics, ctx.engine.root()).await;
    let (wal_syncs, wal_records) = ctx.engine.wal_stats();
    let health = ctx.engine.health();
    let sample = EngineSample {
        rows_written: ctx.engine.rows_written(),
        wal_syncs,
        wal_records,
        writes_inline: ctx.engine.inline_commits(),
        buckets: ctx.engine.keys().len() as u64,
        disk_usage_bytes: disk,
        uptime: ctx.started.elapsed(),
        ready: ctx.is_ready(),
        writable: health.writable,
        damaged_buckets: health.damaged.len() as u64,
        checkpoint_failing: health.checkpoint_error.is_some(),
        writer_queue_bytes: health.queued_bytes,
        retention_rows: ctx.engine.retention_stats().0,
        retention_bytes: ctx.engine.retention_stats().1,
    };
    let mut r = ctx.metrics.render_with(&sample, ctx.replication.samples()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

/// A duration the way Go prints it (`1h2m3.5s`, `250ms`), as MarketStore's heartbeat `uptime`.
pub fn go_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    let frac = |v: u128, div: u128| -> String {
        let whole = v / div;
        let rest = v % div;
        if rest == 0 {
            whole.to_string()
        } else {
            let width = div.to_string().len() - 1;
            let s = format!("{whole}.{rest:0width$}");
            s.trim_end_matches('0').to_string()
        }
    };
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return format!("{}µs", frac(ns, 1_000));
    }
    if ns < 1_000_000_000 {
        return format!("{}ms", frac(ns, 1_000_000));
    }
    let total_s = ns / 1_000_000_000;
    let (h, m) = (total_s / 3600, (total_s / 60) % 60);
    let secs = frac(ns % 60_000_000_000, 1_000_000_000);
    if h > 0 {
        format!("{h}h{m}m{secs}s")
    } else if m > 0 {
        format!("{m}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests;
