//! Authentication of HTTP requests (`/rpc`, `/ws`, and `/metrics` with `auth.protect_metrics`): an axum
//! middleware. pymarketstore sends HTTP Basic when its URL carries `user:password@`; a token from the
//! Flight handshake works as `Bearer`. Missing or wrong credentials are a 401 with a `WWW-Authenticate`
//! challenge; a verified request carries its [`Principal`] in its extensions.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Authenticator;
use crate::service::Principal;

/// The `WWW-Authenticate` challenge of a 401 on the HTTP port.
pub const CHALLENGE: &str = "Basic realm=\"mkts\", charset=\"UTF-8\"";

/// The middleware (`axum::middleware::from_fn_with_state(auth, require)`).
pub async fn require(State(auth): State<Arc<Authenticator>>, mut req: Request, next: Next) -> Response {
    let h = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    match auth.authenticate(h.as_deref()).await {
        Ok(p) => {
            req.extensions_mut().insert::<Principal>(p);
            next.run(req).await
        }
        Err(e) => {
            let mut r = (StatusCode::UNAUTHORIZED, format!("{e}\n")).into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(CHALLENGE));
            r
        }
    }
}
