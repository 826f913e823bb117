//! The one error of the `/api/` endpoints and its JSON form.
//!
//! An operation's failure keeps its [`ServiceError`] class, and its HTTP status is the class's
//! ([`ErrorCode::http`]): unknown bucket 404, bad key, range or SQL 400, refused by policy or role 403,
//! missing or wrong credentials 401. A request the endpoint cannot decode (query string, JSON body) is
//! [`ErrorCode::InvalidArgument`]. The body is always
//! `{"error": {"code": "not_found", "status": 404, "message": "…"}}`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::Authenticator;
use crate::service::{ErrorCode, Principal, ServiceError};

/// A failed `/api/` request: its HTTP status, a machine-readable code and the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    /// `not_found`, `invalid_argument`, …: the operations layer's class in snake case, or
    /// `method_not_allowed`.
    pub code: String,
    pub message: String,
}

impl ApiError {
    /// A request the endpoint cannot decode.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ServiceError::invalid(message).into()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        ApiError { status: e.code.http(), code: e.code.as_str().replace(' ', "_"), message: e.message }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "status": self.status.as_u16(), "message": self.message } });
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(crate::auth::http::CHALLENGE));
        }
        r
    }
}

/// Any path under `/api/` that is not an endpoint.
pub async fn no_route(uri: Uri) -> ApiError {
    ServiceError::not_found(format!("no endpoint {}", uri.path())).into()
}

/// An endpoint asked with the wrong method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError { status: StatusCode::METHOD_NOT_ALLOWED, code: "method_not_allowed".into(), message: format!("{method} is not allowed on {}", uri.path()) }
}

/// The authentication middleware of the `/api/` routes: the credentials are verified as on `/rpc`
/// ([`Authenticator::authenticate`]); a refusal is the JSON error (401, with the Basic challenge).
pub async fn authenticate(State(auth): State<Arc<Authenticator>>, mut req: Request, next: Next) -> Response {
    let h = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    match auth.authenticate(h.as_deref()).await {
        Ok(p) => {
            req.extensions_mut().insert::<Principal>(p);
            next.run(req).await
        }
        Err(e) => ApiError::from(ServiceError::new(ErrorCode::Unauthenticated, e.to_string())).into_response(),
    }
}
