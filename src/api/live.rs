//! `GET /api/live?key=…`: server-sent events (`text/event-stream`) of every append to the buckets matching
//! `key` (`SYM/TF/GROUP`, each part may be `*`), read from the event bus's appends feed
//! ([`crate::bus::Feed::Appends`]) after the caller was checked for reading ([`Service::authorize`]).
//!
//! Events: one `subscribed` (`{"key": pattern}`) when the subscription is in place, so a client knows
//! that later writes will reach it (the bus fans appends out on its own thread, so a write acknowledged
//! just before may arrive too); then an `append` per durable write, `{"key", "lsn", "columns",
//! "rows"}` (the written rows as a [`super::json`] table). A subscriber that falls behind the bus's queue
//! gets one `error` event (`{"error": {"code", "status", "message"}}`) and the stream ends; browsers'
//! `EventSource` reconnects by itself. The stream also ends when the server starts shutting down.
//!
//! [`Service::authorize`]: crate::service::Service::authorize

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::Extensions;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;

use super::json::table;
use super::ApiError;
use crate::bus::{BusError, Delivery, Feed, SubscribeOptions};
use crate::context::ServerContext;
use crate::engine::KeyPattern;
use crate::service::{Access, Caller, ErrorCode, Interface, ServiceError};

/// Appends that may wait for one slow event-stream client before its subscription is ended.
pub const LIVE_QUEUE: usize = 1024;

/// The query string of `/api/live`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveParams {
    pub key: Option<String>,
}

/// `GET /api/live`.
pub async fn live(State(ctx): State<Arc<ServerContext>>, ext: Extensions, q: Result<Query<LiveParams>, QueryRejection>) -> Response {
    let caller = Caller::of_request(Interface::HttpApi, &ext);
    let t0 = std::time::Instant::now();
    let r = match q {
        Ok(Query(p)) => events(&ctx, &caller, p.key.as_deref()),
        Err(e) => Err(ApiError::bad_request(e.body_text())),
    };
    // Counted when the stream starts (or is refused), not when it ends.
    super::observe(&ctx, "live", t0, &r);
    match r {
        Ok(s) => Sse::new(s).keep_alive(KeepAlive::default()).into_response(),
        Err(e) => e.into_response(),
    }
}

fn error_event(e: ApiError) -> Event {
    Event::default().event("error").data(json!({ "error": { "code": e.code, "status": e.status.as_u16(), "message": e.message } }).to_string())
}

fn append_event(d: &Delivery) -> Event {
    match table(&d.batch.schema(), std::slice::from_ref(&d.batch)) {
        Ok(t) => Event::default()
            .event("append")
            .data(json!({ "key": d.key.to_string(), "lsn": d.lsn, "columns": t.columns, "rows": t.rows }).to_string()),
        Err(e) => error_event(e.into()),
    }
}

/// Resolves once the server, ready when the stream started, is no longer ready (shutting down).
async fn shutting_down(ctx: Arc<ServerContext>) {
    if !ctx.is_ready() {
        return std::future::pending().await;
    }
    while ctx.is_ready() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The event stream of one subscriber, or why it cannot start.
fn events(ctx: &Arc<ServerContext>, caller: &Caller, key: Option<&str>) -> Result<impl Stream<Item = Result<Event, Infallible>> + use<>, ApiError> {
    let key = key.map(str::trim).filter(|k| !k.is_empty()).ok_or_else(|| ApiError::bad_request("key is required (SYM/TF/GROUP; parts may be *)"))?;
    if key.split('/').count() != 3 {
        return Err(ApiError::bad_request(format!("key {key:?} must have three parts, SYM/TF/GROUP")));
    }
    let pattern = KeyPattern::parse(key).map_err(ServiceError::from)?;
    ctx.service.authorize(caller, Access::Read)?;
    let opts = SubscribeOptions { feed: Feed::Appends, from_lsn: None, capacity: LIVE_QUEUE };
    let deliveries = ctx.bus.subscribe(pattern, opts).map_err(|e| match e {
        BusError::Invalid(m) => ServiceError::invalid(m),
        other => ServiceError::new(ErrorCode::Unavailable, other.to_string()),
    })?;
    let first = Event::default().event("subscribed").data(json!({ "key": key }).to_string());
    let appends = deliveries.map(|d| match d {
        Ok(d) => append_event(&d),
        Err(e) => error_event(ServiceError::new(ErrorCode::Unavailable, e.to_string()).into()),
    });
    let s = stream::iter([first]).chain(appends).map(Ok).take_until(Box::pin(shutting_down(ctx.clone())));
    Ok(s)
}
