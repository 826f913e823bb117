//! The one error type of the operations layer, and its mapping onto each protocol.
//!
//! Every operation fails with a [`ServiceError`]: a class ([`ErrorCode`]) and a message. The message is
//! the text the client sees — MarketStore's wording where its clients match on it (the engine keeps
//! those texts). Each protocol maps the class exactly once, here: gRPC (Flight, Flight SQL,
//! `proto.Marketstore`) with [`ErrorCode::grpc`], JSON-RPC with [`ErrorCode::jsonrpc`], HTTP with
//! [`ErrorCode::http`], and interfaces that only carry text (the CLI, the plugin C ABI) with
//! [`ServiceError::describe`], which prefixes the class.

use thiserror::Error;

use crate::engine::EngineError;
use crate::query::QueryError;

/// What kind of failure an operation had; decides the status each protocol reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The bucket (or table, prepared statement, …) does not exist.
    NotFound,
    /// `create` of a bucket that exists.
    AlreadyExists,
    /// The request is malformed or does not fit the data (bad key, type, schema, SQL).
    InvalidArgument,
    /// Refused by policy: `enable_add`, `enable_remove`, `queryable`, or the caller's role.
    PermissionDenied,
    /// No credentials, or wrong ones, on a server with `auth:` (the same message whether the user
    /// exists or not).
    Unauthenticated,
    /// The server cannot do it now (shutting down, halted writer, damaged bucket); may work later.
    Unavailable,
    /// A write raced a destroy or recreate of its bucket: nothing was stored, retrying is safe.
    Aborted,
    /// A limit was reached: SQL memory pool, message size, full disk, bound parameters.
    ResourceExhausted,
    /// The interface does not offer this operation (unknown action).
    Unimplemented,
    /// A bug or an I/O failure inside the server.
    Internal,
}

/// JSON-RPC error code of MarketStore's RPC framework for every method error (gorilla/rpc's
/// `E_SERVER`): its clients tell failures apart by message, not code.
pub const JSONRPC_SERVER_ERROR: i64 = -32000;

impl ErrorCode {
    /// The gRPC status code (Flight, Flight SQL, `proto.Marketstore`).
    pub fn grpc(self) -> tonic::Code {
        use tonic::Code;
        match self {
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::AlreadyExists => Code::AlreadyExists,
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::Unauthenticated => Code::Unauthenticated,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::Aborted => Code::Aborted,
            ErrorCode::ResourceExhausted => Code::ResourceExhausted,
            ErrorCode::Unimplemented => Code::Unimplemented,
            ErrorCode::Internal => Code::Internal,
        }
    }

    /// The class of a gRPC status a server answered (the CLI over Flight reports it like a local error).
    pub fn from_grpc(code: tonic::Code) -> ErrorCode {
        use tonic::Code;
        match code {
            Code::NotFound => ErrorCode::NotFound,
            Code::AlreadyExists => ErrorCode::AlreadyExists,
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => ErrorCode::InvalidArgument,
            Code::PermissionDenied => ErrorCode::PermissionDenied,
            Code::Unauthenticated => ErrorCode::Unauthenticated,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => ErrorCode::Unavailable,
            Code::Aborted => ErrorCode::Aborted,
            Code::ResourceExhausted => ErrorCode::ResourceExhausted,
            Code::Unimplemented => ErrorCode::Unimplemented,
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => ErrorCode::Internal,
        }
    }

    /// The JSON-RPC error code on `/rpc`: MarketStore answers every method error with
    /// [`JSONRPC_SERVER_ERROR`] and the message, and its clients match on the message.
    pub fn jsonrpc(self) -> i64 {
        JSONRPC_SERVER_ERROR
    }

    /// The HTTP status for interfaces that answer a refused operation with one (Google's gRPC ↔ HTTP
    /// mapping).
    pub fn http(self) -> axum::http::StatusCode {
        use axum::http::StatusCode as S;
        match self {
            ErrorCode::NotFound => S::NOT_FOUND,
            ErrorCode::AlreadyExists | ErrorCode::Aborted => S::CONFLICT,
            ErrorCode::InvalidArgument => S::BAD_REQUEST,
            ErrorCode::PermissionDenied => S::FORBIDDEN,
            ErrorCode::Unauthenticated => S::UNAUTHORIZED,
            ErrorCode::Unavailable => S::SERVICE_UNAVAILABLE,
            ErrorCode::ResourceExhausted => S::TOO_MANY_REQUESTS,
            ErrorCode::Unimplemented => S::NOT_IMPLEMENTED,
            ErrorCode::Internal => S::INTERNAL_SERVER_ERROR,
        }
    }

    /// Words for text-only channels (CLI, plugin ABI): `permission denied`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not found",
            ErrorCode::AlreadyExists => "already exists",
            ErrorCode::InvalidArgument => "invalid argument",
            ErrorCode::PermissionDenied => "permission denied",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Aborted => "aborted",
            ErrorCode::ResourceExhausted => "resource exhausted",
            ErrorCode::Unimplemented => "unimplemented",
            ErrorCode::Internal => "internal error",
        }
    }
}

/// A failed operation: its class and the message for the client.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct ServiceError {
    pub code: ErrorCode,
    pub message: String,
}

/// Longest message put into a gRPC status (a status travels in HTTP/2 trailers).
const MAX_STATUS_MESSAGE: usize = 4000;

impl ServiceError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ServiceError { code, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PermissionDenied, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// `permission denied: server is not queryable`: the class and the message, for channels that carry
    /// only text (the CLI, the plugin C ABI).
    pub fn describe(&self) -> String {
        format!("{}: {}", self.code.as_str(), self.message)
    }

    /// The gRPC status (message cut to what a trailer holds).
    pub fn to_status(&self) -> tonic::Status {
        let mut m = self.message.clone();
        if m.len() > MAX_STATUS_MESSAGE {
            let mut cut = MAX_STATUS_MESSAGE;
            while !m.is_char_boundary(cut) {
                cut -= 1;
            }
            m.truncate(cut);
        }
        tonic::Status::new(self.code.grpc(), m)
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> tonic::Status {
        e.to_status()
    }
}

impl From<ServiceError> for mkts_flight::BackendError {
    fn from(e: ServiceError) -> Self {
        mkts_flight::BackendError::new(e.code.grpc(), e.message)
    }
}

impl From<EngineError> for ServiceError {
    fn from(e: EngineError) -> Self {
        let code = match &e {
            EngineError::InvalidKey { .. } | EngineError::SchemaMismatch { .. } | EngineError::InvalidInput(_) => {
                ErrorCode::InvalidArgument
            }
            EngineError::NotFound(_) => ErrorCode::NotFound,
            EngineError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            EngineError::NotAllowed(_) => ErrorCode::PermissionDenied,
            EngineError::Unavailable(_) | EngineError::Damaged { .. } => ErrorCode::Unavailable,
            EngineError::Aborted(_) => ErrorCode::Aborted,
            EngineError::Io { .. } if e.is_disk_full() => ErrorCode::ResourceExhausted,
            EngineError::Io { .. } | EngineError::Corrupt { .. } | EngineError::LogDamaged(_) | EngineError::Arrow(_) => {
                ErrorCode::Internal
            }
        };
        ServiceError::new(code, e.to_string())
    }
}

impl From<QueryError> for ServiceError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Engine(e) => e.into(),
            QueryError::NotFound(m) => ServiceError::new(ErrorCode::NotFound, m),
            QueryError::Sql(m) | QueryError::Function(m) => ServiceError::new(ErrorCode::InvalidArgument, m),
            QueryError::NotAllowed(m) => ServiceError::new(ErrorCode::PermissionDenied, m),
            QueryError::ResourcesExhausted(m) => ServiceError::new(ErrorCode::ResourceExhausted, m),
            QueryError::Internal(m) => ServiceError::new(ErrorCode::Internal, m),
        }
    }
}

impl From<datafusion::error::DataFusionError> for ServiceError {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        QueryError::from(e).into()
    }
}

impl From<arrow::error::ArrowError> for ServiceError {
    fn from(e: arrow::error::ArrowError) -> Self {
        ServiceError::internal(format!("arrow: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_keep_their_text_and_get_a_class() {
        let e: ServiceError = EngineError::NotFound("A/1Min/X".into()).into();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(e.message, "no files returned from query parse: bucket A/1Min/X does not exist");
        assert_eq!(e.to_status().code(), tonic::Code::NotFound);
        let e: ServiceError = EngineError::NotAllowed("server is not queryable".into()).into();
        assert_eq!((e.code.grpc(), e.code.http().as_u16()), (tonic::Code::PermissionDenied, 403));
        assert_eq!(e.describe(), "permission denied: server is not queryable");
        let e: ServiceError = EngineError::Aborted("raced".into()).into();
        assert_eq!(e.code, ErrorCode::Aborted);
        let full = EngineError::Io { path: "x".into(), source: std::io::Error::from(std::io::ErrorKind::StorageFull) };
        assert_eq!(ServiceError::from(full).code, ErrorCode::ResourceExhausted);
    }

    #[test]
    fn every_class_round_trips_through_grpc() {
        use ErrorCode::*;
        for c in [NotFound, AlreadyExists, InvalidArgument, PermissionDenied, Unauthenticated, Unavailable, Aborted, ResourceExhausted, Unimplemented, Internal] {
            assert_eq!(ErrorCode::from_grpc(c.grpc()), c);
            assert_eq!(c.jsonrpc(), JSONRPC_SERVER_ERROR);
        }
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let e = ServiceError::invalid("é".repeat(3000));
        assert!(e.to_status().message().len() <= MAX_STATUS_MESSAGE);
    }
}
