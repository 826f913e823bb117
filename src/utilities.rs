//! The `utilities_url` listener (MarketStore's key, reference §2.9): `/heartbeat`, as on `listen_port`, and
//! CPU profiles in pprof format.
//!
//! `GET /debug/pprof/profile?seconds=N` (also `/pprof/profile`, MarketStore's path) samples every thread
//! of the process at 99 Hz for N seconds (1..=300, default 30, as Go's `net/http/pprof`) and answers with
//! the profile as gzip-compressed protobuf (`perftools.profiles.Profile`), what `go tool pprof` and
//! `pprof` read. Profiles come from the `pprof` crate (SIGPROF sampling). One profile runs at a time; a
//! second request meanwhile is answered `409 Conflict`.
//!
//! Unlike MarketStore, which registers these routes on Go's default mux and so also serves `/rpc`, `/ws`
//! and `/metrics` on the utilities port (and `/pprof` on the main port), this listener serves only these
//! routes, and the main port serves no profiles.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;

use crate::context::ServerContext;

/// Longest profile a request may ask for.
pub const MAX_PROFILE_SECONDS: u64 = 300;
/// Profile length without `seconds` (Go's default).
pub const DEFAULT_PROFILE_SECONDS: u64 = 30;
/// Sampling frequency (Hz), as Go's runtime profiler (100) but off the timer's round numbers.
const FREQUENCY: i32 = 99;

/// Why a profile could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("seconds must be a whole number 1..={MAX_PROFILE_SECONDS}, got {0:?}")]
    BadSeconds(String),
    #[error("a CPU profile is already being taken; try again when it is done")]
    Busy,
    #[error("profiler: {0}")]
    Profiler(String),
}

impl IntoResponse for ProfileError {
    fn into_response(self) -> Response {
        let status = match self {
            ProfileError::BadSeconds(_) => StatusCode::BAD_REQUEST,
            ProfileError::Busy => StatusCode::CONFLICT,
            ProfileError::Profiler(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, self.to_string()).into_response()
    }
}

/// The routes of `utilities_url`.
pub fn router(ctx: Arc<ServerContext>) -> Router {
    let busy = Arc::new(AtomicBool::new(false));
    let profile = Router::new()
        .route("/debug/pprof/profile", get(profile))
        .route("/pprof/profile", get(profile))
        .with_state(busy);
    Router::new().route("/heartbeat", any(crate::compat::heartbeat)).with_state(ctx).merge(profile)
}

/// `seconds` of the query string, checked.
fn seconds_of(q: &HashMap<String, String>) -> Result<u64, ProfileError> {
    match q.get("seconds") {
        None => Ok(DEFAULT_PROFILE_SECONDS),
        Some(s) => match s.trim().parse::<u64>() {
            Ok(n) if (1..=MAX_PROFILE_SECONDS).contains(&n) => Ok(n),
            _ => Err(ProfileError::BadSeconds(s.clone())),
        },
    }
}

/// Clears the busy flag when the profile ends, however it ends.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

async fn profile(State(busy): State<Arc<AtomicBool>>, Query(q): Query<HashMap<String, String>>) -> Result<Response, ProfileError> {
    let secs = seconds_of(&q)?;
    if busy.swap(true, Ordering::SeqCst) {
        return Err(ProfileError::Busy);
    }
    let running = Running(busy);
    let body = tokio::task::spawn_blocking(move || {
        let _running = running;
        cpu_profile(Duration::from_secs(secs))
    })
    .await
    .map_err(|e| ProfileError::Profiler(e.to_string()))??;
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment; filename=\"profile\""));
    Ok(r)
}

/// Sample the whole process for `d` and return the profile as gzip-compressed pprof protobuf.
pub fn cpu_profile(d: Duration) -> Result<Vec<u8>, ProfileError> {
    use pprof::protos::Message;
    let err = |e: pprof::Error| ProfileError::Profiler(e.to_string());
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY)
        // Unwinding through these from a signal handler can deadlock (the crate's advice).
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .map_err(err)?;
    std::thread::sleep(d);
    let profile = guard.report().build().map_err(err)?.pprof().map_err(err)?;
    drop(guard);
    let mut raw = Vec::new();
    profile.encode(&mut raw).map_err(|e| ProfileError::Profiler(e.to_string()))?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).and_then(|_| gz.finish()).map_err(|e| ProfileError::Profiler(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_checked() {
        let q = |v: &str| HashMap::from([("seconds".to_string(), v.to_string())]);
        assert_eq!(seconds_of(&HashMap::new()).unwrap(), 30);
        assert_eq!(seconds_of(&q("2")).unwrap(), 2);
        for bad in ["0", "301", "-1", "1.5", "x"] {
            assert!(matches!(seconds_of(&q(bad)), Err(ProfileError::BadSeconds(_))), "{bad}");
        }
    }
}
