//! `GET /api/status`: what the console's status panel shows.
//!
//! `{"version", "git_hash", "uptime", "uptime_seconds", "ready", "health", "policy", "metrics", "plugins",
//! "replication"}`: `health` is the engine's (as on `/heartbeat`), `policy` the server's switches and
//! whether `auth:` is on, `metrics` a summary of the `/metrics` numbers (buckets, rows written, log
//! syncs and records, the writer's queue, disk usage, open `/ws` connections), `plugins` each configured
//! plugin with its state (as Flight's `plugins` action), `replication` as Flight's `replication_status`.
//! It needs an authenticated caller with `auth:` (any role) and is answered under `queryable: false`
//! too, like `/heartbeat`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::Extensions;
use axum::Json;
use serde_json::{json, Value};

use super::{observe, ApiError};
use crate::context::{ServerContext, VERSION};
use crate::service::{Access, Caller, Interface};

/// `GET /api/status`.
pub async fn status(State(ctx): State<Arc<ServerContext>>, ext: Extensions) -> Result<Json<Value>, ApiError> {
    let t0 = Instant::now();
    let r = status_inner(&ctx, &Caller::of_request(Interface::HttpApi, &ext)).await;
    observe(&ctx, "status", t0, &r);
    r.map(Json)
}

async fn status_inner(ctx: &ServerContext, caller: &Caller) -> Result<Value, ApiError> {
    ctx.service.authorize_caller(caller, Access::Read)?;
    let health = ctx.engine.health();
    let (wal_syncs, wal_records) = ctx.engine.wal_stats();
    let (retention_rows, retention_bytes) = ctx.engine.retention_stats();
    let disk = crate::metrics::cached_disk_usage(&ctx.metrics, ctx.engine.root()).await;
    let policy = ctx.service.policy();
    let plugins: Vec<Value> = ctx.metrics.plugins().iter().map(|p| p.summary()).collect();
    let uptime = ctx.started.elapsed();
    Ok(json!({
        "version": VERSION,
        "git_hash": option_env!("MKTS_GIT_HASH").unwrap_or(""),
        "uptime": crate::compat::go_duration(uptime),
        "uptime_seconds": uptime.as_secs_f64(),
        "ready": ctx.is_ready(),
        "health": health,
        "policy": {
            "queryable": policy.queryable, "enable_add": policy.enable_add, "enable_remove": policy.enable_remove,
            "auth": policy.require_auth, "replica": policy.replica,
        },
        "metrics": {
            "buckets": ctx.engine.keys().len(),
            "rows_written": ctx.engine.rows_written(),
            "wal_syncs": wal_syncs,
            "wal_records": wal_records,
            "writer_queue_bytes": health.queued_bytes,
            "disk_usage_bytes": disk,
            "retention_deleted_rows": retention_rows,
            "retention_deleted_bytes": retention_bytes,
            "ws_connections": ctx.metrics.ws_connections(),
        },
        "plugins": plugins,
        "replication": ctx.replication.status_json(&ctx.engine),
    }))
}
