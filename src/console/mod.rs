//! The web console: one page (HTML, script, stylesheet) built from `console/` by `npm run build` and
//! compiled into the binary, so a server serves it with nothing else installed.
//!
//! Routes on `listen_port`: `/console` (and `/console/`) the page, `/console/console.js`,
//! `/console/console.css`, `/console/licenses.txt` (the bundled packages' licenses); `/` redirects to
//! `/console/`. The page reads everything through the JSON endpoints of [`crate::api`]; with `auth:` the
//! console routes need credentials too (the browser asks for them once, then sends them to `/api/`).

use std::sync::Arc;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use crate::auth::Authenticator;

/// The built page (`console/src/index.html`).
pub const INDEX_HTML: &str = include_str!("assets/index.html");
/// The bundled script (`console/src/main.ts` with lightweight-charts).
pub const CONSOLE_JS: &str = include_str!("assets/console.js");
/// The stylesheet (`console/src/style.css`).
pub const CONSOLE_CSS: &str = include_str!("assets/console.css");
/// The licenses of the packages in [`CONSOLE_JS`].
pub const LICENSES: &str = include_str!("assets/licenses.txt");

/// What the page may load: its own script and styles (the chart sets inline styles), and `/api/`.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The assets change with the binary: revalidate rather than keep an old build.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    r
}

async fn index() -> Response {
    let mut r = asset("text/html; charset=utf-8", INDEX_HTML);
    r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    r
}

/// The console's routes; behind [`crate::auth::http::require`] when `auth` is set. `/` stays open (it only
/// redirects).
pub fn router(auth: Option<Arc<Authenticator>>) -> Router {
    let pages = Router::new()
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/console.js", get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }))
        .route("/console/console.css", get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }))
        .route("/console/licenses.txt", get(|| async { asset("text/plain; charset=utf-8", LICENSES) }));
    let pages = match auth {
        Some(a) => pages.layer(axum::middleware::from_fn_with_state(a, crate::auth::http::require)),
        None => pages,
    };
    Router::new().route("/", get(|| async { Redirect::temporary("/console/") })).merge(pages)
}
