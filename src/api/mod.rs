//! The JSON endpoints under `/api/` on `listen_port`: what the web console ([`crate::console`]) shows,
//! for any HTTP client.
//!
//! | endpoint | answers |
//! | --- | --- |
//! | `GET /api/status` | version, uptime, health, a metrics summary, plugins and their state, replication ([`status`]) |
//! | `GET /api/buckets` | every bucket: columns, rows, years, time span, size on disk ([`catalog`]) |
//! | `GET /api/buckets/{SYM/TF/GROUP}` | one bucket ([`catalog`]) |
//! | `GET /api/query?key=…&start=…&end=…&limit=…&from=…&columns=…` | rows of a bucket, a symbol list or `*` ([`read`]) |
//! | `POST /api/sql` `{"sql": "…", "limit": n}` | one SQL statement's result ([`read`]) |
//! | `GET /api/live?key=…` | server-sent events: every append to the matching buckets ([`live`]) |
//!
//! Each endpoint decodes its request into the operations layer's request types and calls [`Service`]
//! with a [`Caller`] of [`Interface::HttpApi`], so policy and roles are checked there, as for every other
//! interface. With `auth:`, every route here needs HTTP Basic credentials or a Bearer token, verified
//! the same way as on `/rpc` ([`crate::auth`]). Results are JSON tables ([`json`]); failures are
//! `{"error": {"code", "status", "message"}}` with the HTTP status of the error's class ([`error`]).
//!
//! [`Service`]: crate::service::Service
//! [`Caller`]: crate::service::Caller
//! [`Interface::HttpApi`]: crate::service::Interface::HttpApi

pub mod catalog;
pub mod error;
pub mod json;
pub mod live;
pub mod read;
pub mod status;

use std::sync::Arc;
use std::time::Instant;

use axum::routing::{any, get, post};
use axum::Router;

use crate::context::ServerContext;

pub use error::ApiError;

/// The `/api/` routes (behind authentication when `auth:` is configured).
pub fn router(ctx: Arc<ServerContext>) -> Router {
    let auth = ctx.auth.clone();
    let r = Router::new()
        .route("/api/status", get(status::status))
        .route("/api/buckets", get(catalog::list))
        .route("/api/buckets/{*key}", get(catalog::info))
        .route("/api/query", get(read::query))
        .route("/api/sql", post(read::sql))
        .route("/api/live", get(live::live))
        .route("/api", any(error::no_route))
        .route("/api/{*rest}", any(error::no_route))
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(ctx);
    match auth {
        Some(a) => r.layer(axum::middleware::from_fn_with_state(a, error::authenticate)),
        None => r,
    }
}

/// Record one call of an endpoint in the request metrics (`api="http_api"`, `method=…`).
fn observe<T>(ctx: &ServerContext, method: &str, t0: Instant, result: &Result<T, ApiError>) {
    ctx.metrics.observe(crate::service::Interface::HttpApi.as_str(), method, t0.elapsed(), result.is_ok());
}

#[cfg(test)]
mod tests;
