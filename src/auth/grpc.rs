//! Authentication of gRPC calls (Flight, Flight SQL, `proto.Marketstore`): a tower layer in front of
//! every service on the gRPC port.
//!
//! It reads the call's `authorization` metadata (Basic or Bearer), refuses the call with
//! `UNAUTHENTICATED` when it is missing or wrong, and otherwise puts the [`Principal`] into the request's
//! extensions, where the services build their caller from it. The Flight handshake is a call like any
//! other: pyarrow's `authenticate_basic_token` sends Basic credentials on it, and the Flight service
//! answers with a token.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;

use super::Authenticator;
use crate::service::Principal;

/// The layer; without an authenticator (no `auth:`) it passes every call through untouched.
#[derive(Clone, Default)]
pub struct GrpcAuthLayer {
    auth: Option<Arc<Authenticator>>,
}

impl GrpcAuthLayer {
    pub fn new(auth: Option<Arc<Authenticator>>) -> Self {
        GrpcAuthLayer { auth }
    }
}

impl<S> tower::Layer<S> for GrpcAuthLayer {
    type Service = GrpcAuth<S>;
    fn layer(&self, inner: S) -> GrpcAuth<S> {
        GrpcAuth { inner, auth: self.auth.clone() }
    }
}

/// The service the layer wraps around the gRPC routes.
#[derive(Clone)]
pub struct GrpcAuth<S> {
    inner: S,
    auth: Option<Arc<Authenticator>>,
}

impl<S, B> tower::Service<axum::http::Request<B>> for GrpcAuth<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> Self::Future {
        let Some(auth) = self.auth.clone() else {
            return Box::pin(self.inner.call(req));
        };
        // The clone is not ready; the instance polled ready is the one that serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let header = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
            match auth.authenticate(header.as_deref()).await {
                Ok(principal) => {
                    req.extensions_mut().insert::<Principal>(principal);
                    inner.call(req).await
                }
                Err(e) => Ok(tonic::Status::unauthenticated(e.to_string()).into_http()),
            }
        })
    }
}
