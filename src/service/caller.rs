//! Who is asking, and through which interface: the identity every operation is checked against.
//!
//! Interfaces build a [`Caller`] per request and pass it to the operations layer. Without `auth:` every
//! caller is anonymous (MarketStore has no authentication); with it, each interface's authentication
//! ([`crate::auth`]) verifies the request's password or token and fills [`Principal`], and
//! [`super::policy`] checks its [`Role`]. Nothing here ever holds a credential: only the name it resolved to.

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
    /// The JSON endpoints under `/api/` that the web console uses.
    HttpApi,
    /// A plugin calling back into the server (shared-library host API, built-in plugins).
    Plugin,
    /// The CLI on a data directory opened in-process (`--dir`).
    Cli,
    /// Same-host reads on the Unix socket (`local_socket`).
    Local,
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
            Interface::HttpApi => "http_api",
            Interface::Plugin => "plugin",
            Interface::Cli => "cli",
            Interface::Local => "local",
        }
    }
}

/// What a user may do (`auth.users[].role`, a plugin entry's `role`). Each role includes the ones
/// before it: `read_only` < `read_write` < `admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Queries, SQL `SELECT`, subscriptions, listings and bucket info.
    ReadOnly,
    /// Plus writes (creating a bucket by writing to it) and SQL `INSERT`.
    ReadWrite,
    /// Plus explicit create, destroy, range deletes, SQL `DELETE` and DDL.
    Admin,
}

impl Role {
    /// The names `mkts.yml` uses.
    pub fn parse(s: &str) -> Result<Role, String> {
        match s.trim() {
            "read_only" => Ok(Role::ReadOnly),
            "read_write" => Ok(Role::ReadWrite),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?}: expected read_only, read_write or admin")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read_only",
            Role::ReadWrite => "read_write",
            Role::Admin => "admin",
        }
    }
}

/// An authenticated user: the name the credentials resolved to and the role granted to it. Built only by
/// [`crate::auth`] from verified credentials (or by the plugin host for its plugins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub role: Role,
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

    /// The caller of a request whose extensions hold what the authentication layer verified (nothing
    /// when the server runs without `auth:`).
    pub fn of_request(interface: Interface, extensions: &axum::http::Extensions) -> Caller {
        Caller { interface, principal: extensions.get::<Principal>().cloned() }
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
