//! Where request counts and durations are recorded: one tower layer around the gRPC server and one axum
//! middleware around the HTTP router, so no handler records anything itself.
//!
//! A duration is the time until the response head: for a unary call the whole call, for a stream the
//! time to its first message. A gRPC call counts as failed when it ends with a non-OK status in its head
//! (unary errors and refused streams; an error in the middle of a stream is not seen here).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::Metrics;

/// Records every call of the tonic server: `api="flight"` or `"flight_sql"` for
/// `arrow.flight.protocol.FlightService` (the Flight service says which, [`mkts_flight::FlightSqlCall`]),
/// `api="grpc"` for `proto.Marketstore`; `method` is the gRPC method.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner, metrics: self.metrics.clone() }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the gRPC routes.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Which interface a gRPC path belongs to, and its method.
fn grpc_call(path: &str) -> Option<(&'static str, String)> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    let api = match service {
        "arrow.flight.protocol.FlightService" => "flight",
        "proto.Marketstore" => "grpc",
        _ => return None,
    };
    Some((api, method.to_string()))
}

impl<S, B, RB> tower::Service<axum::http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> Self::Future {
        let call = grpc_call(req.uri().path());
        let sql = mkts_flight::FlightSqlCall::default();
        req.extensions_mut().insert(sql.clone());
        let t0 = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let r = fut.await;
            if let Some((api, method)) = call {
                let api = if api == "flight" && sql.is_sql() { "flight_sql" } else { api };
                let ok = match &r {
                    Ok(resp) => resp.headers().get("grpc-status").is_none_or(|s| s == "0"),
                    Err(_) => false,
                };
                metrics.observe(api, &method, t0.elapsed(), ok);
            }
            r
        })
    }
}

/// Records `/ws` connections (`api="ws"`, `method="connect"`: the upgrade) and every `/rpc` request in
/// MarketStore's total histogram; `/rpc`'s JSON-RPC methods are recorded by its dispatcher, which alone
/// knows them.
pub async fn record_http(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let t0 = Instant::now();
    let resp = next.run(req).await;
    match path.as_str() {
        "/rpc" => metrics.observe_rpc_request(t0.elapsed()),
        "/ws" => {
            let ok = resp.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS;
            metrics.observe("ws", "connect", t0.elapsed(), ok);
        }
        _ => {}
    }
    resp
}
