//! Typed errors of the storage engine.
//!
//! Interfaces map these onto their own error shapes (tonic `Status`, JSON-RPC error objects, HTTP codes);
//! the messages keep MarketStore's wording where clients are known to match on it (reference §14.25).

use thiserror::Error;

/// Everything the engine can refuse or fail with.
#[derive(Debug, Error)]
pub enum EngineError {
    /// A key that is not three safe path segments, or a malformed timeframe.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    /// The bucket does not exist (MarketStore's wording, asserted by its integration tests).
    #[error("no files returned from query parse: bucket {0} does not exist")]
    NotFound(String),
    /// `create` of a bucket that exists.
    #[error("bucket {0} already exists")]
    AlreadyExists(String),
    /// The incoming batch does not fit the bucket's schema.
    #[error("unable to match data columns ({incoming}) to bucket columns ({bucket}): {reason}")]
    SchemaMismatch { incoming: String, bucket: String, reason: String },
    /// Any other bad input (types, values, request shape).
    #[error("{0}")]
    InvalidInput(String),
    /// The operation is disabled by configuration (`enable_add`, `enable_remove`, `queryable`).
    #[error("{0}")]
    NotAllowed(String),
    /// The engine is shutting down or failed durably (an fsync error makes it read-only).
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// Disk I/O failed.
    #[error("I/O error on {path}: {source}")]
    Io { path: String, #[source] source: std::io::Error },
    /// Stored data failed validation (bad manifest, bad bucket.json).
    #[error("corrupt data in {path}: {reason}")]
    Corrupt { path: String, reason: String },
    /// The bucket's files failed to load or a logged write to it could not be applied: it refuses writes
    /// (and reads, when damaged at start-up) until repaired or destroyed; the rest of the engine goes on.
    #[error("bucket {key} is damaged and offline: {reason}")]
    Damaged { key: String, reason: String },
    /// The write raced a destroy or recreate of its bucket; retrying is safe.
    #[error("{0}")]
    Aborted(String),
    /// The write-ahead log is damaged in the middle: starting would drop acknowledged writes.
    #[error("{0}")]
    LogDamaged(String),
    /// An Arrow error while assembling batches.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

impl EngineError {
    /// True when the error is a full disk (or quota): the operation changed nothing and may be retried
    /// once space is freed.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, EngineError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull || source.kind() == std::io::ErrorKind::QuotaExceeded)
    }

    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        EngineError::Io { path: path.as_ref().display().to_string(), source }
    }
}

/// Engine result alias.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
