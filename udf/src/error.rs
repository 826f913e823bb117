//! Typed errors of the crate.

use arrow::error::ArrowError;
use datafusion::error::DataFusionError;

/// Everything that can go wrong while parsing or applying a MarketStore function.
///
/// The `Display` texts of [`UdfError::UnknownFunction`] and [`UdfError::Arguments`] keep the
/// wording of MarketStore's own messages where clients are known to match on them.
/// Converts into [`DataFusionError`] (as `DataFusionError::External`, or the wrapped
/// DataFusion error itself), so it can be returned from UDF bodies with `?`.
#[derive(Debug, thiserror::Error)]
pub enum UdfError {
    /// The call string is not of the form `name(arg, …)`.
    #[error("cannot parse function call {call:?}: {reason}")]
    Parse {
        /// The offending call text.
        call: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The function name is not one of MarketStore's functions.
    #[error("no function in the UDA Registry named \"{0}\"")]
    UnknownFunction(String),
    /// Argument binding failed (too few / too many / unknown named inputs, bad literals).
    #[error("{function}: {message}")]
    Arguments {
        /// Canonical (lower-case) function name.
        function: String,
        /// Human-readable reason.
        message: String,
    },
    /// A timeframe string such as `5Min` could not be parsed.
    #[error("invalid timeframe {0:?} (expected <n><Sec|Min|H|D|W|M|Y>, e.g. '5Min', '1H', '1D')")]
    InvalidTimeframe(String),
    /// An IANA timezone name could not be resolved.
    #[error("unknown timezone {0:?}")]
    InvalidTimezone(String),
    /// A column named in a call is not in the input.
    #[error("{function}: column {column:?} not found in input (have {available:?})")]
    ColumnNotFound {
        /// Canonical function name.
        function: String,
        /// Requested column.
        column: String,
        /// Columns present in the input.
        available: Vec<String>,
    },
    /// A column has a type the function cannot handle.
    #[error("{0}")]
    Type(String),
    /// Corporate-action data for `adjust` is missing or malformed.
    #[error("adjust: {0}")]
    Actions(String),
    /// A timestamp is outside the range chrono can represent.
    #[error("timestamp {0} out of range")]
    OutOfRange(i64),
    /// Error from DataFusion while planning or executing.
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
    /// Error from an Arrow kernel.
    #[error(transparent)]
    Arrow(#[from] ArrowError),
}

impl UdfError {
    pub(crate) fn args(function: &str, message: impl Into<String>) -> Self {
        UdfError::Arguments {
            function: function.to_string(),
            message: message.into(),
        }
    }
}

impl From<UdfError> for DataFusionError {
    fn from(e: UdfError) -> Self {
        match e {
            UdfError::DataFusion(e) => e,
            UdfError::Arrow(e) => DataFusionError::ArrowError(Box::new(e), None),
            other => DataFusionError::External(Box::new(other)),
        }
    }
}

/// Result alias used throughout the crate.
pub type Result<T, E = UdfError> = std::result::Result<T, E>;
