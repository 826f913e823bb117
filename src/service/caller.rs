//! Who is asking, and through which interface: the identity every operation is checked against.
//!
//! Interfaces build a [`Caller`] per request and pass it to the operations layer. Today every caller is
//! anonymous (MarketStore has no authentication); the authentication issue fills [`Principal`] from a
//! token or password the interface verified, and [`super::policy`] then checks its roles. Nothing here
//! ever holds a credential: only the name it resolved to.

use std::fmt;

/// The interface a request came in through. Labels metrics and log lines; with authentication it also
/// says where the credentials came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interface {
    /// Plain Arrow Flight (DoGet/DoPut/DoAction/ListFlights on MarketStore-shaped tickets).
    Flight,
    /// Arrow Flight SQL.
    FlightSql,
    /// MarketStore's JSON-RPC `/rpc`.
    JsonRpc,
    /// MarketStore's gRPC service `proto.Marketstore`.
    Grpc,
    /// MarketStore's WebSocket stream `/ws`.
    Ws,
    /// A plugin calling back into the server (shared-library host API, built-in plugins).
    Plugin,
    /// The CLI on a data directory opened in-process (`--dir`).
    Cli,
}

impl Interface {
    /// The label used in metrics (`api="…"`) and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Interface::Flight => "flight",
            Interface::FlightSql => "flight_sql",
            Interface::JsonRpc => "jsonrpc",
            Interface::Grpc => "grpc",
            Interface::Ws => "ws",
            Interface::Plugin => "plugin",
            Interface::Cli => "cli",
        }
    }
}

/// An authenticated user: the name the credentials resolved to and the roles granted to it. Filled by
/// the authentication issue; never built from unverified input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub roles: Vec<String>,
}

/// The identity an operation runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub interface: Interface,
    /// `None`: anonymous (no authentication configured, or none offered).
    pub principal: Option<Principal>,
}

impl Caller {
    /// An anonymous caller on `interface`: what every interface passes until authentication exists.
    pub fn anonymous(interface: Interface) -> Caller {
        Caller { interface, principal: None }
    }

    /// A caller that authenticated as `principal`.
    pub fn authenticated(interface: Interface, principal: Principal) -> Caller {
        Caller { interface, principal: Some(principal) }
    }
}

/// `flight (anonymous)`, `jsonrpc (user alice)`: for log lines; carries no credential.
impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.principal {
            None => write!(f, "{} (anonymous)", self.interface.as_str()),
            Some(p) => write!(f, "{} (user {})", self.interface.as_str(), p.user),
        }
    }
}
