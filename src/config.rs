//! `mkts.yml`: MarketStore's configuration keys and defaults (reference §8), plus a few of our own.
//!
//! Every key MarketStore documents is parsed, and each either does what it does in MarketStore or is
//! warned about at start-up by name as accepted but ignored ([`IGNORED_KEYS`], with the reason); keys we
//! do not know are warned about by name too (MarketStore silently ignores them, which cost users
//! afternoons). `replication:` makes the server a master or a read-only replica ([`ReplicationConfig`]).
//! Booleans accept YAML booleans and MarketStore's string forms (`"true"`, `"1"`, `"t"`, …). The reference
//! of every key is `docs/config.md` (a test keeps it in step with this parser).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// Configuration errors: one clear line each.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("malformed config file {path}: {msg}")]
    Parse { path: String, msg: String },
    #[error("invalid config {key}: {msg}")]
    Invalid { key: String, msg: String },
}

/// A trigger entry: `{module, on, config}`.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerConfig {
    pub module: String,
    /// Glob over `SYMBOL/TIMEFRAME/ATTRGROUP` with `*` per segment.
    pub on: String,
    pub config: serde_json::Value,
    /// Appends that may wait for this trigger before further ones are dropped (mkts extension;
    /// default [`crate::plugins::TRIGGER_QUEUE`]).
    pub queue_size: Option<usize>,
    /// The role the trigger acts with when `auth:` is configured (mkts key `role`, default `read_write`).
    pub role: crate::service::Role,
}

/// A background worker entry: `{module, name, config}`.
#[derive(Debug, Clone, PartialEq)]
pub struct BgWorkerConfig {
    pub module: String,
    pub name: String,
    pub config: serde_json::Value,
    /// The role the worker acts with when `auth:` is configured (mkts key `role`, default `read_write`).
    pub role: crate::service::Role,
}

/// `tls:`: the certificate and key both ports serve (PEM; the certificate file may hold a chain).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA that signed `cert_file`, handed to out-of-process plugins so they can verify the server
    /// (default: `cert_file` itself, right for a self-signed certificate).
    pub ca_file: Option<PathBuf>,
}

/// `replication:` (MarketStore's keys, docs/operations.md).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationConfig {
    /// Serve the replication port: this server is a master.
    pub enabled: bool,
    pub listen_port: u16,
    /// Master: serve TLS with `cert_file` + `key_file`. Replica: dial with TLS, verifying the master
    /// against `cert_file`.
    pub tls_enabled: bool,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The master's replication address (`host:port`): this server is a read-only replica.
    pub master_host: Option<String>,
    pub retry_interval: std::time::Duration,
    pub retry_backoff_coeff: u32,
    /// A replica hands replicated rows to its own triggers and subscribers.
    pub fire_triggers: bool,
    /// When the master acknowledges a write.
    pub ack: ReplicationAck,
    /// `ack: replica`: how long a write waits for a replica before it fails.
    pub ack_timeout: std::time::Duration,
    /// Master: MiB of recent changes kept in memory for replicas that reconnect.
    pub retain_mb: usize,
    /// Replica: the name it reports to its master (default: its host name and root).
    pub name: Option<String>,
    /// Replica: the user it authenticates as when the master has `auth:` (any role: a replica reads).
    pub user: Option<String>,
    /// Replica: that user's password (or `MKTS_REPLICATION_PASSWORD`).
    pub password: Option<Secret>,
}

/// `replication.ack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationAck {
    /// As soon as the write is durable here (MarketStore's asynchronous replication).
    Local,
    /// Once a replica has it durable too.
    Replica,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            enabled: false,
            listen_port: 5996,
            tls_enabled: false,
            cert_file: None,
            key_file: None,
            master_host: None,
            retry_interval: std::time::Duration::from_secs(10),
            retry_backoff_coeff: 2,
            fire_triggers: true,
            ack: ReplicationAck::Local,
            ack_timeout: std::time::Duration::from_secs(5),
            retain_mb: 256,
            name: None,
            user: None,
            password: None,
        }
    }
}

impl ReplicationConfig {
    /// This server follows a master.
    pub fn is_replica(&self) -> bool {
        self.master_host.is_some()
    }
}

/// A value that must never reach a log line: its `Debug` is `"<redacted>"`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// One `auth.users` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct UserConfig {
    pub name: String,
    /// An argon2 PHC string, as `mkts hash-password` prints it.
    pub password_hash: Secret,
    pub role: crate::service::Role,
}

/// `auth:`: who may connect, and what tokens they get.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    pub users: Vec<UserConfig>,
    /// `/metrics` needs credentials too (default false: monitors scrape it open, like `/heartbeat`).
    pub protect_metrics: bool,
    /// How long a token from the Flight handshake is valid (default 12 h).
    pub token_ttl: std::time::Duration,
    /// Signs tokens. Set, tokens survive a restart; unset, a random key per process is used and a restart
    /// invalidates every token.
    pub token_secret: Option<Secret>,
}

/// Default `auth.token_ttl`.
pub const DEFAULT_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// The keys this parser applies (each does what its entry in `docs/config.md` says).
pub const KEYS: &[&str] = &[
    "root_directory", "listen_host", "listen_port", "grpc_listen_port", "grpc_max_send_msg_size", "grpc_max_recv_msg_size",
    "timezone", "log_level", "stop_grace_period", "enable_add", "enable_remove", "queryable", "sql_memory_limit_mb",
    "plugin_dir", "triggers", "bgworkers", "max_request_mb", "subscriber_queue_mb", "replication", "retention", "tls", "auth",
    "utilities_url", "auto_add_columns", "local_socket", "tiering",
];

/// MarketStore keys mkts accepts (the value is still checked) but does not act on, with why; each is
/// warned about at start-up when a file sets it.
pub const IGNORED_KEYS: &[(&str, &str)] = &[
    ("wal_rotate_interval", "mkts checkpoints every 10 s and whenever a log segment passes 256 MiB, then trims the log"),
    ("background_sync", "every write is fsync'd (group commit) before it is acknowledged; there is no background flusher"),
    ("wal_bypass", "every write goes through the write-ahead log; it cannot be bypassed"),
    ("disable_variable_compression", "the server stores variable-length buckets uncompressed; `mkts import-marketstore --config` reads the key to decode MarketStore's files"),
    ("init_catalog", "the catalog is always loaded at start-up"),
    ("init_wal_cache", "the write-ahead log is always replayed and writes are always enabled"),
    ("enable_last_known", "there is no last-known-value cache; queries read the buckets"),
    ("stale_threshold", "there is no last-known-value cache to expire"),
];

/// The whole server configuration with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Data directory (relative paths resolve against the config file's directory... and, as in
    /// MarketStore, against the working directory when no file is used).
    pub root_directory: PathBuf,
    pub listen_host: String,
    /// HTTP port: /rpc, /ws, /heartbeat, /metrics.
    pub listen_port: u16,
    /// gRPC port: Arrow Flight, Flight SQL and MarketStore's gRPC service. `None` disables it.
    pub grpc_listen_port: Option<u16>,
    /// Largest gRPC message sent / accepted, MiB (MarketStore's keys; see [`Config::grpc_limits`]).
    pub grpc_max_send_msg_size_mb: usize,
    pub grpc_max_recv_msg_size_mb: usize,
    /// IANA zone reported to clients and used for calendar windows; storage is always UTC.
    pub timezone: String,
    pub log_level: String,
    pub stop_grace_period: u64,
    /// `utilities_url` (`host:port`, MarketStore's key): a second HTTP listener serving `/heartbeat` and
    /// CPU profiles in pprof format (`/debug/pprof/profile`, `/pprof/profile`). `None`: not served.
    pub utilities_url: Option<String>,
    pub enable_add: bool,
    pub enable_remove: bool,
    /// A write that carries columns its existing bucket lacks adds them (nullable) instead of being refused.
    pub auto_add_columns: bool,
    /// `local_socket` as written: `None` = `$TMPDIR/mkts-<hash of the root's absolute path>.sock`, `""` or `off` = no same-host reads
    /// (see [`Config::local_socket_path`]).
    pub local_socket: Option<String>,
    pub queryable: bool,
    /// Memory all SQL statements together may hold, in MB (mkts extension; default a quarter of physical
    /// memory). A statement needing more fails with a clear error; the server stays up.
    pub sql_memory_limit_mb: Option<usize>,
    /// Where plugin modules named by a relative path are looked up (default: `plugins/` beside the config).
    pub plugin_dir: PathBuf,
    pub triggers: Vec<TriggerConfig>,
    pub bgworkers: Vec<BgWorkerConfig>,
    /// Largest `/rpc` request body, MiB (mkts key `max_request_mb`). Checked before anything is decoded.
    pub max_request_mb: usize,
    /// What one stream subscriber (Flight `{"subscribe"}` ticket, `/ws` client) may have waiting, MiB
    /// (mkts key `subscriber_queue_mb`); past it the subscriber is dropped, logged and counted.
    pub subscriber_queue_mb: usize,
    /// `retention: [{on: "*/1Min/*", keep: 2y}, ...]` (mkts key): the first matching rule says how long a
    /// bucket keeps rows; buckets no rule matches keep everything.
    pub retention: Vec<crate::engine::RetentionRule>,
    /// `tls:` (mkts key): TLS on both ports. `None`: plaintext, as MarketStore.
    pub tls: Option<TlsConfig>,
    /// `auth:` (mkts key): users and roles on every interface. `None`: open, as MarketStore.
    pub auth: Option<AuthConfig>,
    /// `replication:` (none: a standalone server).
    pub replication: Option<ReplicationConfig>,
    /// `tiering:` (mkts key): sealed years moved to object storage as Parquet. `None`: all years local.
    pub tiering: Option<crate::engine::TierConfig>,
    /// Where the file was read from (for resolving relative paths).
    pub base_dir: PathBuf,
    /// Problems that do not stop the server (unknown keys), logged once logging is up.
    pub warnings: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root_directory: PathBuf::from("data"),
            listen_host: String::new(),
            listen_port: 5993,
            grpc_listen_port: Some(5995),
            grpc_max_send_msg_size_mb: DEFAULT_GRPC_MSG_MB,
            grpc_max_recv_msg_size_mb: DEFAULT_GRPC_MSG_MB,
            timezone: "UTC".into(),
            log_level: "info".into(),
            stop_grace_period: 0,
            utilities_url: None,
            enable_add: true,
            enable_remove: true,
            auto_add_columns: false,
            local_socket: None,
            queryable: true,
            sql_memory_limit_mb: None,
            plugin_dir: PathBuf::from("plugins"),
            triggers: Vec::new(),
            bgworkers: Vec::new(),
            max_request_mb: DEFAULT_MAX_REQUEST_MB,
            subscriber_queue_mb: DEFAULT_SUBSCRIBER_QUEUE_MB,
            retention: Vec::new(),
            tls: None,
            auth: None,
            replication: None,
            tiering: None,
            base_dir: PathBuf::from("."),
            warnings: Vec::new(),
        }
    }
}

/// Default `grpc_max_{send,recv}_msg_size` (MiB). MarketStore's 1024 let one message hold a GiB of memory;
/// 256 MiB still carries a symbol-decade of 1Min bars.
pub const DEFAULT_GRPC_MSG_MB: usize = 256;
/// Largest gRPC message size honoured (MiB), whatever the file says.
pub const MAX_GRPC_MSG_MB: usize = 1024;
/// `retention:` entries: a list of `{on, keep}` maps, each checked (pattern and duration).
fn parse_retention(v: &serde_json::Value) -> Result<Vec<crate::engine::RetentionRule>, ConfigError> {
    let bad = |msg: String| ConfigError::Invalid { key: "retention".into(), msg };
    let list = v.as_array().ok_or_else(|| bad("expected a list of {on, keep} entries".into()))?;
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            let field = |name: &str| -> Result<String, ConfigError> {
                match e.get(name) {
                    Some(serde_json::Value::String(s)) => Ok(s.clone()),
                    Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                    _ => Err(bad(format!("entry {i}: `{name}` is required (e.g. {{on: \"*/1Min/*\", keep: 2y}})"))),
                }
            };
            crate::engine::RetentionRule::parse(&field("on")?, &field("keep")?).map_err(|err| bad(format!("entry {i}: {err}")))
        })
        .collect()
}

/// `tiering: {store, after, cache_bytes, s3: {…}}`. `store` is `file:///dir` (a relative `file://dir` is
/// taken from the config file's directory) or `s3://bucket/prefix`; `s3` takes object_store's S3 settings
/// (`endpoint`, `region`, `allow_http`, `access_key_id`, `secret_access_key`, …); values are never logged.
fn parse_tiering(v: &serde_json::Value, base_dir: &Path, warnings: &mut Vec<String>) -> Result<crate::engine::TierConfig, ConfigError> {
    let m = obj("tiering", v)?;
    let store = str_field(m, "store").filter(|s| !s.trim().is_empty()).ok_or_else(|| ConfigError::Invalid {
        key: "tiering.store".into(),
        msg: "required: file:///dir or s3://bucket/prefix".into(),
    })?;
    let store = match store.strip_prefix("file://") {
        Some(rest) if !rest.starts_with('/') => format!("file://{}", base_dir.join(rest).display()),
        _ => store,
    };
    let mut t = crate::engine::TierConfig::new(store);
    for (k, val) in m {
        let key = format!("tiering.{k}");
        match k.as_str() {
            "store" => {}
            "after" => {
                let s: Scalar = serde_json::from_value(val.clone()).map_err(|_| ConfigError::Invalid { key: key.clone(), msg: "expected a duration such as 1y or 90d".into() })?;
                t.after = crate::engine::RetentionRule::parse("*/*/*", &s.as_string()).map_err(|e| ConfigError::Invalid { key: key.clone(), msg: e.to_string() })?.keep;
            }
            "cache_bytes" => t.cache_bytes = parse_int::<usize>(&key, &serde_json::from_value(val.clone()).map_err(|_| ConfigError::Invalid { key: key.clone(), msg: "expected a number of bytes".into() })?)?,
            "s3" => {
                for (sk, sv) in obj(&key, val)? {
                    let value = match sv {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Bool(b) => b.to_string(),
                        serde_json::Value::Number(n) => n.to_string(),
                        _ => return Err(ConfigError::Invalid { key: format!("tiering.s3.{sk}"), msg: "expected a scalar".into() }),
                    };
                    if sk.parse::<object_store::aws::AmazonS3ConfigKey>().is_err() {
                        return Err(ConfigError::Invalid { key: format!("tiering.s3.{sk}"), msg: "not an S3 setting (endpoint, region, allow_http, access_key_id, secret_access_key, …)".into() });
                    }
                    t.s3.push((sk.clone(), value));
                }
            }
            _ => warnings.push(format!("unknown configuration key \"{key}\" is ignored")),
        }
    }
    Ok(t)
}

/// Default `max_request_mb`: a pymarketstore bulk write of ~10 symbol-years of 1Min bars.
pub const DEFAULT_MAX_REQUEST_MB: usize = 256;
/// Default `subscriber_queue_mb`.
pub const DEFAULT_SUBSCRIBER_QUEUE_MB: usize = 64;

/// The commented default file written by `mkts init`.
pub const DEFAULT_YAML: &str = include_str!("../mkts.yml");

/// A scalar as YAML gives it to us (MarketStore accepts strings for numbers and booleans).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Scalar {
    fn as_string(&self) -> String {
        match self {
            Scalar::Bool(b) => b.to_string(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Str(s) => s.clone(),
        }
    }
}

fn parse_bool(key: &str, v: &Scalar) -> Result<bool, ConfigError> {
    match v {
        Scalar::Bool(b) => Ok(*b),
        Scalar::Int(i) => Ok(*i != 0),
        Scalar::Float(_) => Err(ConfigError::Invalid { key: key.into(), msg: "expected a boolean".into() }),
        // Go's strconv.ParseBool forms.
        Scalar::Str(s) => match s.as_str() {
            "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
            "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
            _ => Err(ConfigError::Invalid { key: key.into(), msg: format!("invalid value for {key}: {s:?}") }),
        },
    }
}

fn parse_int<T: std::str::FromStr>(key: &str, v: &Scalar) -> Result<T, ConfigError> {
    v.as_string()
        .trim()
        .parse::<T>()
        .map_err(|_| ConfigError::Invalid { key: key.into(), msg: format!("expected a number, got {:?}", v.as_string()) })
}

fn parse_positive(key: &str, v: &Scalar) -> Result<usize, ConfigError> {
    match parse_int::<usize>(key, v)? {
        0 => Err(ConfigError::Invalid { key: key.into(), msg: "must be at least 1".into() }),
        n => Ok(n),
    }
}

/// YAML → JSON for plugin `config` maps (plugins receive JSON).
fn yaml_to_json(v: serde_json::Value) -> serde_json::Value {
    v
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.display().to_string(), source: e })?;
        let base = path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }).unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { msg, .. } => ConfigError::Parse { path: path.display().to_string(), msg },
            other => other,
        })
    }

    /// Parse config text; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        // Unquoted `on: */1Min/OHLCV` is an alias in YAML and `on` alone is a YAML 1.1 boolean key in some
        // parsers; MarketStore files write both. Normalise before parsing.
        let text = normalise_on_keys(text);
        let raw: BTreeMap<String, serde_json::Value> = if text.trim().is_empty() {
            BTreeMap::new()
        } else {
            serde_saphyr::from_str(&text).map_err(|e| ConfigError::Parse { path: String::new(), msg: e.to_string() })?
        };
        let mut c = Config { base_dir: base_dir.to_path_buf(), ..Config::default() };
        let sc = |k: &str, v: &serde_json::Value| -> Result<Scalar, ConfigError> {
            serde_json::from_value::<Scalar>(v.clone())
                .map_err(|_| ConfigError::Invalid { key: k.into(), msg: "expected a scalar value".into() })
        };
        for (k, v) in &raw {
            if v.is_null() {
                continue;
            }
            match k.as_str() {
                "root_directory" => c.root_directory = PathBuf::from(sc(k, v)?.as_string()),
                "listen_host" => c.listen_host = sc(k, v)?.as_string(),
                "listen_port" => c.listen_port = parse_int(k, &sc(k, v)?)?,
                "grpc_listen_port" => {
                    let s = sc(k, v)?.as_string();
                    c.grpc_listen_port = if s.is_empty() { None } else { Some(parse_int(k, &sc(k, v)?)?) };
                }
                "grpc_max_send_msg_size" => c.grpc_max_send_msg_size_mb = parse_int(k, &sc(k, v)?)?,
                "grpc_max_recv_msg_size" => c.grpc_max_recv_msg_size_mb = parse_int(k, &sc(k, v)?)?,
                "timezone" => c.timezone = sc(k, v)?.as_string(),
                "log_level" => c.log_level = sc(k, v)?.as_string(),
                "stop_grace_period" => c.stop_grace_period = parse_int(k, &sc(k, v)?)?,
                "enable_add" => c.enable_add = parse_bool(k, &sc(k, v)?)?,
                "enable_remove" => c.enable_remove = parse_bool(k, &sc(k, v)?)?,
                "auto_add_columns" => c.auto_add_columns = parse_bool(k, &sc(k, v)?)?,
                "local_socket" => c.local_socket = Some(sc(k, v)?.as_string()),
                "queryable" => c.queryable = parse_bool(k, &sc(k, v)?)?,
                // Accepted (and checked as MarketStore checks them), but without effect: say so.
                "wal_rotate_interval" => ignored(k, parse_int::<u64>(k, &sc(k, v)?), &mut c.warnings)?,
                "disable_variable_compression" | "init_catalog" | "init_wal_cache" | "background_sync" | "wal_bypass"
                | "enable_last_known" => ignored(k, parse_bool(k, &sc(k, v)?), &mut c.warnings)?,
                "stale_threshold" => ignored(k, sc(k, v).map(|s| s.as_string()), &mut c.warnings)?,
                "utilities_url" => c.utilities_url = parse_utilities_url(&sc(k, v)?.as_string())?,
                "sql_memory_limit_mb" => match parse_int::<usize>(k, &sc(k, v)?)? {
                    0 => return Err(ConfigError::Invalid { key: k.clone(), msg: "must be at least 1 (MB)".into() }),
                    mb => c.sql_memory_limit_mb = Some(mb),
                },
                "plugin_dir" => c.plugin_dir = PathBuf::from(sc(k, v)?.as_string()),
                "replication" => c.replication = Some(parse_replication(v, base_dir, &mut c.warnings)?),
                "triggers" => c.triggers = parse_triggers(v, &mut c.warnings)?,
                "bgworkers" => c.bgworkers = parse_bgworkers(v, &mut c.warnings)?,
                "max_request_mb" => c.max_request_mb = parse_positive(k, &sc(k, v)?)?,
                "subscriber_queue_mb" => c.subscriber_queue_mb = parse_positive(k, &sc(k, v)?)?,
                "retention" => c.retention = parse_retention(v)?,
                "tiering" => c.tiering = Some(parse_tiering(v, base_dir, &mut c.warnings)?),
                "tls" => c.tls = Some(parse_tls(v, base_dir, &mut c.warnings)?),
                "auth" => c.auth = Some(parse_auth(v, &mut c.warnings)?),
                other => c.warnings.push(format!("unknown configuration key {other:?} is ignored")),
            }
        }
        for (key, v) in [("grpc_max_send_msg_size", &mut c.grpc_max_send_msg_size_mb), ("grpc_max_recv_msg_size", &mut c.grpc_max_recv_msg_size_mb)] {
            if *v == 0 || *v > MAX_GRPC_MSG_MB {
                let to = (*v).clamp(1, MAX_GRPC_MSG_MB);
                c.warnings.push(format!("{key}: {v} MB is outside 1..={MAX_GRPC_MSG_MB}; using {to} MB"));
                *v = to;
            }
        }
        if c.listen_port == 0 && !raw.contains_key("listen_port") {
            return Err(ConfigError::Invalid { key: "listen_port".into(), msg: "listen port can't be empty".into() });
        }
        if c.timezone.parse::<chrono_tz::Tz>().is_err() {
            return Err(ConfigError::Invalid { key: "timezone".into(), msg: format!("unknown time zone {:?}", c.timezone) });
        }
        if c.root_directory.as_os_str().is_empty() {
            return Err(ConfigError::Invalid { key: "root_directory".into(), msg: "root_directory can't be empty".into() });
        }
        if c.root_directory.is_relative() {
            c.root_directory = base_dir.join(&c.root_directory);
        }
        if c.plugin_dir.is_relative() {
            c.plugin_dir = base_dir.join(&c.plugin_dir);
        }
        Ok(c)
    }

    /// The parsed `timezone`.
    pub fn tz(&self) -> chrono_tz::Tz {
        self.timezone.parse().unwrap_or(chrono_tz::UTC)
    }

    /// `(recv, send)` gRPC message limits in bytes.
    pub fn grpc_limits(&self) -> (usize, usize) {
        let b = |mb: usize| mb.clamp(1, MAX_GRPC_MSG_MB) << 20;
        (b(self.grpc_max_recv_msg_size_mb), b(self.grpc_max_send_msg_size_mb))
    }

    /// `max_request_mb` in bytes.
    pub fn max_request_bytes(&self) -> usize {
        self.max_request_mb.max(1) << 20
    }

    /// `subscriber_queue_mb` in bytes.
    pub fn subscriber_queue_bytes(&self) -> usize {
        self.subscriber_queue_mb.max(1) << 20
    }

    /// `host:port` to bind for HTTP.
    /// The Unix socket of same-host reads ([`crate::local`]), `None` when switched off.
    pub fn local_socket_path(&self) -> Option<PathBuf> {
        match self.local_socket.as_deref().map(str::trim) {
            // Outside the data directory (copies and backups of a root must not meet a socket), named after
            // it so each root has its own; clients find it with the Flight action `local_socket`.
            None => {
                use std::hash::{Hash, Hasher};
                let abs = std::path::absolute(&self.root_directory).unwrap_or_else(|_| self.root_directory.clone());
                let mut h = std::hash::DefaultHasher::new();
                abs.hash(&mut h);
                Some(std::env::temp_dir().join(format!("mkts-{:016x}.sock", h.finish())))
            }
            // YAML 1.1 reads a bare `off` as false.
            Some("") | Some("off") | Some("false") => None,
            Some(p) => Some(PathBuf::from(p)),
        }
    }

    pub fn http_addr(&self) -> String {
        format!("{}:{}", if self.listen_host.is_empty() { "0.0.0.0" } else { &self.listen_host }, self.listen_port)
    }

    /// `host:port` to bind for gRPC, if enabled.
    pub fn grpc_addr(&self) -> Option<String> {
        self.grpc_listen_port
            .map(|p| format!("{}:{}", if self.listen_host.is_empty() { "0.0.0.0" } else { &self.listen_host }, p))
    }
}

/// `utilities_url`: MarketStore's `host:port` (an optional `http://` is accepted; an empty host listens on
/// every interface); empty: disabled.
fn parse_utilities_url(v: &str) -> Result<Option<String>, ConfigError> {
    let v = v.trim();
    let v = v.strip_prefix("http://").unwrap_or(v).trim_end_matches('/');
    if v.is_empty() {
        return Ok(None);
    }
    let bad = |msg: &str| ConfigError::Invalid { key: "utilities_url".into(), msg: format!("{v:?}: {msg}") };
    let (host, port) = v.rsplit_once(':').ok_or_else(|| bad("expected host:port, e.g. localhost:5994"))?;
    let port: u16 = port.parse().map_err(|_| bad("the port must be a number 0..=65535"))?;
    if host.contains('/') || host.contains(char::is_whitespace) {
        return Err(bad("expected host:port, e.g. localhost:5994"));
    }
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    Ok(Some(format!("{host}:{port}")))
}

/// Warn that MarketStore key `key` (whose value parsed) has no effect in mkts, and why.
fn ignored<T>(key: &str, parsed: Result<T, ConfigError>, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
    parsed?;
    let why = IGNORED_KEYS.iter().find(|(k, _)| *k == key).map(|(_, w)| *w).unwrap_or("it has no effect in mkts");
    warnings.push(format!("configuration key {key:?} is accepted but ignored: {why}"));
    Ok(())
}

/// Quote the value of `on:` keys so `on: */1Min/OHLCV` (a YAML alias otherwise) parses as a string.
fn normalise_on_keys(text: &str) -> String {
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            let (dash, rest) = match trimmed.strip_prefix("- ") {
                Some(r) => ("- ", r.trim_start()),
                None => ("", trimmed),
            };
            if let Some(val) = rest.strip_prefix("on:") {
                let v = val.trim();
                if !v.is_empty() && !v.starts_with('"') && !v.starts_with('\'') && !v.starts_with('#') {
                    let (pat, comment) = match v.find(" #") {
                        Some(i) => (&v[..i], &v[i..]),
                        None => (v, ""),
                    };
                    return format!("{indent}{dash}\"on\": \"{}\"{comment}", pat.trim());
                }
                return format!("{indent}{dash}\"on\":{val}");
            }
            line.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn obj<'a>(key: &str, v: &'a serde_json::Value) -> Result<&'a serde_json::Map<String, serde_json::Value>, ConfigError> {
    v.as_object().ok_or_else(|| ConfigError::Invalid { key: key.into(), msg: "expected a map".into() })
}

fn str_field(m: &serde_json::Map<String, serde_json::Value>, k: &str) -> Option<String> {
    m.get(k).and_then(|v| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(true) if k == "on" => None,
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    })
}

fn parse_triggers(v: &serde_json::Value, warnings: &mut Vec<String>) -> Result<Vec<TriggerConfig>, ConfigError> {
    let arr = v.as_array().ok_or_else(|| ConfigError::Invalid { key: "triggers".into(), msg: "expected a list".into() })?;
    let mut out = Vec::new();
    for (i, t) in arr.iter().enumerate() {
        let key = format!("triggers[{i}]");
        let m = obj(&key, t)?;
        let module = str_field(m, "module").ok_or_else(|| ConfigError::Invalid { key: key.clone(), msg: "missing module".into() })?;
        // `on` may have been read as the boolean key `true` by a YAML 1.1 reader.
        let on = str_field(m, "on")
            .or_else(|| str_field(m, "true"))
            .ok_or_else(|| ConfigError::Invalid { key: key.clone(), msg: "missing on".into() })?;
        for k in m.keys() {
            if !matches!(k.as_str(), "module" | "on" | "true" | "config" | "queue_size" | "role") {
                warnings.push(format!("unknown configuration key \"{key}.{k}\" is ignored"));
            }
        }
        let queue_size = match m.get("queue_size") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_u64().filter(|n| *n > 0).ok_or_else(|| ConfigError::Invalid { key: format!("{key}.queue_size"), msg: "expected a positive integer".into() })? as usize),
        };
        let role = plugin_role(&key, m)?;
        out.push(TriggerConfig { module, on, config: yaml_to_json(m.get("config").cloned().unwrap_or(serde_json::Value::Null)), queue_size, role });
    }
    Ok(out)
}

fn parse_bgworkers(v: &serde_json::Value, warnings: &mut Vec<String>) -> Result<Vec<BgWorkerConfig>, ConfigError> {
    let arr = v.as_array().ok_or_else(|| ConfigError::Invalid { key: "bgworkers".into(), msg: "expected a list".into() })?;
    let mut out = Vec::new();
    for (i, t) in arr.iter().enumerate() {
        let key = format!("bgworkers[{i}]");
        let m = obj(&key, t)?;
        let module = str_field(m, "module").ok_or_else(|| ConfigError::Invalid { key: key.clone(), msg: "missing module".into() })?;
        let name = str_field(m, "name").unwrap_or_else(|| module.clone());
        for k in m.keys() {
            if !matches!(k.as_str(), "module" | "name" | "config" | "role") {
                warnings.push(format!("unknown configuration key \"{key}.{k}\" is ignored"));
            }
        }
        let role = plugin_role(&key, m)?;
        out.push(BgWorkerConfig { module, name, config: yaml_to_json(m.get("config").cloned().unwrap_or(serde_json::Value::Null)), role });
    }
    Ok(out)
}

/// A plugin entry's `role` (default `read_write`).
fn plugin_role(key: &str, m: &serde_json::Map<String, serde_json::Value>) -> Result<crate::service::Role, ConfigError> {
    match str_field(m, "role") {
        None => Ok(crate::service::Role::ReadWrite),
        Some(r) => crate::service::Role::parse(&r).map_err(|msg| ConfigError::Invalid { key: format!("{key}.role"), msg }),
    }
}

/// A duration as Go writes it (`90s`, `12h`, `1h30m`, `500ms`) or a number of seconds.
pub fn parse_duration(key: &str, v: &serde_json::Value) -> Result<std::time::Duration, ConfigError> {
    let bad = || ConfigError::Invalid { key: key.into(), msg: format!("expected a duration such as 90s, 12h or 1h30m, got {v}") };
    match v {
        serde_json::Value::Number(n) => n.as_u64().map(std::time::Duration::from_secs).ok_or_else(bad),
        serde_json::Value::String(s) => {
            let mut total = std::time::Duration::ZERO;
            let mut rest = s.trim();
            if rest.is_empty() {
                return Err(bad());
            }
            while !rest.is_empty() {
                let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
                let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
                rest = &rest[digits..];
                let unit = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
                let nanos_per: u64 = match &rest[..unit] {
                    "ms" => 1_000_000,
                    "s" | "" => 1_000_000_000,
                    "m" => 60_000_000_000,
                    "h" => 3_600_000_000_000,
                    "d" => 86_400_000_000_000,
                    _ => return Err(bad()),
                };
                rest = &rest[unit..];
                total = total.checked_add(std::time::Duration::from_nanos(n.checked_mul(nanos_per).ok_or_else(bad)?)).ok_or_else(bad)?;
            }
            Ok(total)
        }
        _ => Err(bad()),
    }
}

/// `tls: {cert_file, key_file[, ca_file]}`; relative paths resolve against the config file's directory.
/// The files are read and checked at start-up ([`crate::tls`]), not here.
fn parse_tls(v: &serde_json::Value, base_dir: &Path, warnings: &mut Vec<String>) -> Result<TlsConfig, ConfigError> {
    let m = obj("tls", v)?;
    let path = |k: &str| -> Option<PathBuf> {
        str_field(m, k).filter(|s| !s.trim().is_empty()).map(|s| {
            let p = PathBuf::from(s);
            if p.is_relative() { base_dir.join(p) } else { p }
        })
    };
    let need = |k: &str| path(k).ok_or_else(|| ConfigError::Invalid { key: format!("tls.{k}"), msg: "required when tls: is set (a PEM file)".into() });
    for k in m.keys() {
        if !matches!(k.as_str(), "cert_file" | "key_file" | "ca_file") {
            warnings.push(format!("unknown configuration key \"tls.{k}\" is ignored"));
        }
    }
    Ok(TlsConfig { cert_file: need("cert_file")?, key_file: need("key_file")?, ca_file: path("ca_file") })
}

/// `auth: {users: [{name, password_hash, role}], protect_metrics, token_ttl, token_secret}`.
fn parse_auth(v: &serde_json::Value, warnings: &mut Vec<String>) -> Result<AuthConfig, ConfigError> {
    let m = obj("auth", v)?;
    let mut a = AuthConfig { users: Vec::new(), protect_metrics: false, token_ttl: DEFAULT_TOKEN_TTL, token_secret: None };
    for (k, val) in m {
        let key = format!("auth.{k}");
        match k.as_str() {
            "users" => {
                let list = val.as_array().ok_or_else(|| ConfigError::Invalid { key: key.clone(), msg: "expected a list of {name, password_hash, role}".into() })?;
                for (i, u) in list.iter().enumerate() {
                    let ukey = format!("auth.users[{i}]");
                    let um = obj(&ukey, u)?;
                    let field = |f: &str| {
                        str_field(um, f).filter(|s| !s.is_empty()).ok_or_else(|| ConfigError::Invalid { key: format!("{ukey}.{f}"), msg: "required".into() })
                    };
                    let name = field("name")?;
                    if name.contains(':') {
                        return Err(ConfigError::Invalid { key: format!("{ukey}.name"), msg: "a user name cannot contain ':' (HTTP Basic separates name and password with it)".into() });
                    }
                    // Checked as a hash when the server starts (crate::auth), before anything opens.
                    let hash = field("password_hash")?;
                    let role = crate::service::Role::parse(&field("role")?).map_err(|msg| ConfigError::Invalid { key: format!("{ukey}.role"), msg })?;
                    if a.users.iter().any(|x: &UserConfig| x.name == name) {
                        return Err(ConfigError::Invalid { key: format!("{ukey}.name"), msg: format!("user {name:?} is listed twice") });
                    }
                    for f in um.keys() {
                        if !matches!(f.as_str(), "name" | "password_hash" | "role") {
                            warnings.push(format!("unknown configuration key \"{ukey}.{f}\" is ignored"));
                        }
                    }
                    a.users.push(UserConfig { name, password_hash: Secret(hash), role });
                }
            }
            "protect_metrics" => {
                let s: Scalar = serde_json::from_value(val.clone()).map_err(|_| ConfigError::Invalid { key: key.clone(), msg: "expected a boolean".into() })?;
                a.protect_metrics = parse_bool(&key, &s)?;
            }
            "token_ttl" => {
                a.token_ttl = parse_duration(&key, val)?;
                if a.token_ttl.is_zero() {
                    return Err(ConfigError::Invalid { key, msg: "must be longer than 0s".into() });
                }
            }
            "token_secret" => match val {
                serde_json::Value::String(s) if s.len() >= 16 => a.token_secret = Some(Secret(s.clone())),
                _ => return Err(ConfigError::Invalid { key, msg: "expected a string of at least 16 characters".into() }),
            },
            _ => warnings.push(format!("unknown configuration key {key:?} is ignored")),
        }
    }
    if a.users.is_empty() {
        return Err(ConfigError::Invalid { key: "auth.users".into(), msg: "auth: needs at least one user (or remove the block to run open)".into() });
    }
    Ok(a)
}

/// MarketStore's `replication:` block (reference §9), plus mkts's `ack`, `ack_timeout`, `fire_triggers`,
/// `retain_mb` and `name`. `enabled: true` makes this server a master serving `listen_port`; a
/// `master_host` makes it a read-only replica of that master's replication port. Both at once is a
/// chain, which mkts does not do: an error. Relative `cert_file`/`key_file` resolve against the config
/// file's directory.
fn parse_replication(v: &serde_json::Value, base_dir: &Path, warnings: &mut Vec<String>) -> Result<ReplicationConfig, ConfigError> {
    let m = obj("replication", v)?;
    let mut r = ReplicationConfig::default();
    let path = |s: String| {
        let p = PathBuf::from(s);
        if p.is_relative() { base_dir.join(p) } else { p }
    };
    for (k, val) in m {
        let key = format!("replication.{k}");
        let s: Scalar = serde_json::from_value(val.clone())
            .map_err(|_| ConfigError::Invalid { key: key.clone(), msg: "expected a scalar".into() })?;
        match k.as_str() {
            "enabled" => r.enabled = parse_bool(&key, &s)?,
            "master_host" => r.master_host = Some(s.as_string().trim().to_string()).filter(|h| !h.is_empty()),
            "listen_port" => r.listen_port = parse_int::<u16>(&key, &s)?,
            "tls_enabled" => r.tls_enabled = parse_bool(&key, &s)?,
            "cert_file" => r.cert_file = Some(s.as_string()).filter(|p| !p.trim().is_empty()).map(path),
            "key_file" => r.key_file = Some(s.as_string()).filter(|p| !p.trim().is_empty()).map(path),
            "retry_interval" => r.retry_interval = parse_duration(&key, val)?,
            "retry_backoff_coeff" => {
                r.retry_backoff_coeff = parse_int::<u32>(&key, &s)?;
                if r.retry_backoff_coeff == 0 {
                    return Err(ConfigError::Invalid { key, msg: "must be at least 1".into() });
                }
            }
            "fire_triggers" => r.fire_triggers = parse_bool(&key, &s)?,
            "ack" => {
                r.ack = match s.as_string().as_str() {
                    "local" => ReplicationAck::Local,
                    "replica" => ReplicationAck::Replica,
                    other => return Err(ConfigError::Invalid { key, msg: format!("expected local or replica, got {other:?}") }),
                }
            }
            "ack_timeout" => r.ack_timeout = parse_duration(&key, val)?,
            "retain_mb" => {
                r.retain_mb = parse_int::<usize>(&key, &s)?;
                if r.retain_mb == 0 {
                    return Err(ConfigError::Invalid { key, msg: "must be at least 1".into() });
                }
            }
            "name" => r.name = Some(s.as_string()).filter(|n| !n.trim().is_empty()),
            "user" => r.user = Some(s.as_string()).filter(|n| !n.trim().is_empty()),
            "password" => r.password = Some(Secret(s.as_string())),
            _ => warnings.push(format!("unknown configuration key {key:?} is ignored")),
        }
    }
    if r.enabled && r.master_host.is_some() {
        return Err(ConfigError::Invalid {
            key: "replication".into(),
            msg: "a server is either a master (enabled: true) or a replica (master_host), not both: mkts does not chain replicas".into(),
        });
    }
    if r.tls_enabled && r.enabled && (r.cert_file.is_none() || r.key_file.is_none()) {
        return Err(ConfigError::Invalid {
            key: "replication.tls_enabled".into(),
            msg: "a master with tls_enabled needs cert_file and key_file (PEM)".into(),
        });
    }
    if r.tls_enabled && r.master_host.is_some() && r.cert_file.is_none() {
        return Err(ConfigError::Invalid {
            key: "replication.tls_enabled".into(),
            msg: "a replica with tls_enabled needs cert_file: the certificate (or CA) to verify the master with".into(),
        });
    }
    if !r.enabled && r.master_host.is_none() {
        warnings.push("the replication block enables nothing (enabled: false and no master_host): this server neither serves nor follows a master".into());
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_marketstore_file() {
        let y = r#"
root_directory: /tmp/x
listen_port: 5993
grpc_listen_port: "5995"
log_level: info
queryable: "true"
stop_grace_period: 0
wal_rotate_interval: 5
stale_threshold: 5
triggers:
  - module: ondiskagg.so
    on: */1Min/OHLCV
    config:
      destinations:
        - 5Min
        - 1D
bgworkers:
  - module: gdaxfeeder.so
    name: GdaxFetcher
    config:
      query_start: "2017-09-01 00:00"
"#;
        let c = Config::parse(y, Path::new(".")).unwrap();
        assert_eq!(c.grpc_listen_port, Some(5995));
        assert_eq!(c.triggers[0].on, "*/1Min/OHLCV");
        assert_eq!(c.triggers[0].config["destinations"][1], "1D");
        assert_eq!(c.bgworkers[0].name, "GdaxFetcher");
    }

    #[test]
    fn default_file_parses() {
        let c = Config::parse(DEFAULT_YAML, Path::new("/srv")).unwrap();
        assert_eq!(c.root_directory, PathBuf::from("/srv/data"));
        assert_eq!(c.listen_port, 5993);
    }

    #[test]
    fn size_limits() {
        let c = Config::parse("listen_port: 1\n", Path::new(".")).unwrap();
        assert_eq!(c.grpc_limits(), (256 << 20, 256 << 20));
        assert_eq!((c.max_request_bytes(), c.subscriber_queue_bytes()), (256 << 20, 64 << 20));
        let y = "listen_port: 1\ngrpc_max_recv_msg_size: 4096\ngrpc_max_send_msg_size: 2\nmax_request_mb: 3\nsubscriber_queue_mb: 5\n";
        let c = Config::parse(y, Path::new(".")).unwrap();
        assert_eq!(c.grpc_limits(), (1024 << 20, 2 << 20));
        assert!(c.warnings.iter().any(|w| w.contains("grpc_max_recv_msg_size")), "{:?}", c.warnings);
        assert_eq!((c.max_request_bytes(), c.subscriber_queue_bytes()), (3 << 20, 5 << 20));
        let e = Config::parse("listen_port: 1\nmax_request_mb: 0\n", Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("max_request_mb"), "{e}");
    }

    #[test]
    fn bad_bool_is_clear() {
        let e = Config::parse("listen_port: 1\nqueryable: maybe\n", Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("queryable"), "{e}");
    }

    #[test]
    fn sql_memory_limit_key() {
        assert_eq!(Config::parse("listen_port: 1\n", Path::new(".")).unwrap().sql_memory_limit_mb, None);
        assert_eq!(Config::parse("listen_port: 1\nsql_memory_limit_mb: 32\n", Path::new(".")).unwrap().sql_memory_limit_mb, Some(32));
        for bad in ["0", "-5", "lots"] {
            let e = Config::parse(&format!("listen_port: 1\nsql_memory_limit_mb: {bad}\n"), Path::new(".")).unwrap_err();
            assert!(e.to_string().contains("sql_memory_limit_mb"), "{e}");
        }
    }

    #[test]
    fn trigger_on_key_in_every_spelling() {
        let y = r#"
listen_port: 1
triggers:
  - module: a.so
    on: */1Min/OHLCV
  - module: b.so
    on: "AAPL/*/*"   # quoted
  - on: 'X*/1D/OHLCV'
    module: c.so
    queue_size: 16
  - {module: d.so, on: "*/*/TRADE"}
  - module: e.so
    true: "*/5Min/OHLCV"
"#;
        let c = Config::parse(y, Path::new(".")).unwrap();
        let on: Vec<&str> = c.triggers.iter().map(|t| t.on.as_str()).collect();
        assert_eq!(on, ["*/1Min/OHLCV", "AAPL/*/*", "X*/1D/OHLCV", "*/*/TRADE", "*/5Min/OHLCV"]);
        assert_eq!(c.triggers[2].queue_size, Some(16));
        assert_eq!(c.triggers[0].queue_size, None);
        let e = Config::parse("listen_port: 1\ntriggers:\n  - module: a.so\n    on: \"*/*/*\"\n    queue_size: 0\n", Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("queue_size"), "{e}");
    }

    #[test]
    fn ignored_keys_are_warned_by_name() {
        let y = "listen_port: 1\nwal_rotate_interval: 5\nbackground_sync: true\nwal_bypass: false\ndisable_variable_compression: false\n\
                 init_catalog: true\ninit_wal_cache: true\nenable_last_known: false\nstale_threshold: 5\n";
        let c = Config::parse(y, Path::new(".")).unwrap();
        for (key, why) in IGNORED_KEYS {
            let w = c.warnings.iter().find(|w| w.contains(&format!("{key:?} is accepted but ignored"))).unwrap_or_else(|| panic!("{key}: {:?}", c.warnings));
            assert!(w.ends_with(why), "{w}");
        }
        // The value is still checked.
        let e = Config::parse("listen_port: 1\nwal_bypass: perhaps\n", Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("wal_bypass"), "{e}");
        // Keys mkts applies are not warned about.
        let c = Config::parse("listen_port: 1\nqueryable: true\nenable_add: false\n", Path::new(".")).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn utilities_url_is_host_and_port() {
        let p = |y: &str| Config::parse(&format!("listen_port: 1\n{y}"), Path::new("."));
        let d = p("root_directory: /d\n").unwrap().local_socket_path().unwrap();
        assert!(d.starts_with(std::env::temp_dir()) && d.to_string_lossy().ends_with(".sock"), "{d:?}");
        assert_eq!(p("root_directory: /d\n").unwrap().local_socket_path(), Some(d.clone()));
        assert_ne!(p("root_directory: /e\n").unwrap().local_socket_path(), Some(d));
        assert_eq!(p("local_socket: /run/m.sock\n").unwrap().local_socket_path(), Some(PathBuf::from("/run/m.sock")));
        for off in ["off", "false", "\"\"", "\"off\""] {
            assert_eq!(p(&format!("local_socket: {off}\n")).unwrap().local_socket_path(), None, "{off}");
        }
        assert_eq!(p("utilities_url: localhost:5994\n").unwrap().utilities_url.as_deref(), Some("localhost:5994"));
        assert_eq!(p("utilities_url: \"http://127.0.0.1:5994/\"\n").unwrap().utilities_url.as_deref(), Some("127.0.0.1:5994"));
        assert_eq!(p("utilities_url: \":5994\"\n").unwrap().utilities_url.as_deref(), Some("0.0.0.0:5994"));
        assert_eq!(p("utilities_url: \"\"\n").unwrap().utilities_url, None);
        assert!(p("utilities_url: localhost:5994\n").unwrap().warnings.is_empty());
        for bad in ["localhost", "localhost:x", "localhost:70000", "a/b:1"] {
            let e = p(&format!("utilities_url: \"{bad}\"\n")).unwrap_err().to_string();
            assert!(e.contains("utilities_url"), "{bad}: {e}");
        }
    }

    #[test]
    fn replication_keys_parse_and_contradictions_are_refused() {
        let c = Config::parse("listen_port: 1\nreplication:\n  master_host: \"10.0.0.1:5996\"\n  retry_interval: 2s\n  fire_triggers: false\n", Path::new("/etc/mkts")).unwrap();
        let r = c.replication.unwrap();
        assert_eq!(r.master_host.as_deref(), Some("10.0.0.1:5996"));
        assert!(r.is_replica() && !r.fire_triggers && !r.enabled);
        let c = Config::parse("listen_port: 1\nreplication:\n  master_host: a:1\n  user: rep\n  password: s3cret-pw\n", Path::new(".")).unwrap();
        assert_eq!(c.replication.as_ref().and_then(|r| r.user.as_deref()), Some("rep"));
        assert!(!format!("{c:?}").contains("s3cret-pw"), "the password must never be printed");
        assert_eq!(r.retry_interval, std::time::Duration::from_secs(2));
        let c = Config::parse("listen_port: 1\nreplication:\n  enabled: true\n  listen_port: 6000\n  ack: replica\n  ack_timeout: 1500ms\n  tls_enabled: true\n  cert_file: c.pem\n  key_file: k.pem\n", Path::new("/etc/mkts")).unwrap();
        let r = c.replication.unwrap();
        assert_eq!((r.enabled, r.listen_port, r.ack), (true, 6000, ReplicationAck::Replica));
        assert_eq!(r.ack_timeout, std::time::Duration::from_millis(1500));
        assert_eq!(r.cert_file.as_deref(), Some(Path::new("/etc/mkts/c.pem")));
        for (bad, says) in [
            ("replication:\n  enabled: true\n  master_host: a:1\n", "not both"),
            ("replication:\n  enabled: maybe\n", "replication.enabled"),
            ("replication:\n  ack: sometimes\n", "replication.ack"),
            ("replication:\n  enabled: true\n  tls_enabled: true\n", "cert_file and key_file"),
            ("replication:\n  master_host: a:1\n  tls_enabled: true\n", "verify the master"),
            ("replication:\n  retry_backoff_coeff: 0\n", "at least 1"),
        ] {
            let e = Config::parse(&format!("listen_port: 1\n{bad}"), Path::new(".")).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let c = Config::parse("listen_port: 1\nreplication:\n  enabled: false\n", Path::new(".")).unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("enables nothing")), "{:?}", c.warnings);
    }

    #[test]
    fn tls_and_auth_blocks_are_checked_when_read() {
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g";
        let y = format!(
            "listen_port: 1\ntls:\n  cert_file: certs/server.pem\n  key_file: /abs/key.pem\nauth:\n  users:\n    - name: alice\n      password_hash: \"{hash}\"\n      role: admin\n    - name: bob\n      password_hash: \"{hash}\"\n      role: read_only\n  token_ttl: 1h30m\n  protect_metrics: true\n  token_secret: \"0123456789abcdef\"\ntriggers:\n  - module: ondiskagg\n    on: \"*/1Min/OHLCV\"\n    role: read_only\nbgworkers:\n  - module: gdaxfeeder\n"
        );
        let c = Config::parse(&y, Path::new("/etc/mkts")).unwrap();
        let tls = c.tls.as_ref().unwrap();
        assert_eq!((tls.cert_file.as_path(), tls.key_file.as_path()), (Path::new("/etc/mkts/certs/server.pem"), Path::new("/abs/key.pem")));
        let auth = c.auth.as_ref().unwrap();
        assert_eq!(auth.users.iter().map(|u| (u.name.as_str(), u.role)).collect::<Vec<_>>(), [("alice", crate::service::Role::Admin), ("bob", crate::service::Role::ReadOnly)]);
        assert_eq!(auth.token_ttl, std::time::Duration::from_secs(5400));
        assert!(auth.protect_metrics);
        assert_eq!(c.triggers[0].role, crate::service::Role::ReadOnly);
        assert_eq!(c.bgworkers[0].role, crate::service::Role::ReadWrite);
        // Secrets never reach a log line through Debug.
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("0123456789abcdef") && !dbg.contains(&hash), "{dbg}");
        for (bad, says) in [
            ("auth:\n  users: []\n", "at least one user"),
            (&format!("auth:\n  users:\n    - name: a\n      password_hash: \"{hash}\"\n      role: root\n") as &str, "unknown role"),
            (&format!("auth:\n  users:\n    - name: a:b\n      password_hash: \"{hash}\"\n      role: admin\n"), "cannot contain ':'"),
            ("tls:\n  cert_file: a.pem\n", "tls.key_file"),
            ("auth:\n  token_ttl: soon\n", "duration"),
        ] {
            let e = Config::parse(&format!("listen_port: 1\n{bad}"), Path::new(".")).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    /// `docs/config.md` names every key this parser applies or ignores, and no other.
    #[test]
    fn docs_config_reference_matches_the_parser() {
        let doc = include_str!("../docs/config.md");
        let documented: std::collections::BTreeSet<&str> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .filter(|k| !k.contains('.'))
            .collect();
        let known: std::collections::BTreeSet<&str> = KEYS.iter().copied().chain(IGNORED_KEYS.iter().map(|(k, _)| *k)).collect();
        assert_eq!(documented, known, "docs/config.md and src/config.rs disagree");
        for (k, _) in IGNORED_KEYS {
            assert!(!KEYS.contains(k), "{k} is both applied and ignored");
            let line = doc.lines().find(|l| l.starts_with(&format!("| `{k}`"))).unwrap_or_default();
            assert!(line.contains("ignored"), "docs/config.md must say {k} is ignored: {line}");
        }
        // A key outside both lists is reported as unknown (so the lists are the parser's whole vocabulary).
        let c = Config::parse("listen_port: 1\nno_such_key: 1\n", Path::new(".")).unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("unknown configuration key \"no_such_key\"")), "{:?}", c.warnings);
    }

    #[test]
    fn retention_rules_parse_and_bad_ones_are_refused() {
        let c = Config::parse("listen_port: 1\nretention:\n  - {on: \"*/1Min/*\", keep: 2y}\n  - {on: \"AAPL/*/*\", keep: 30d}\n", Path::new(".")).unwrap();
        assert_eq!(c.retention.len(), 2);
        assert_eq!(c.retention[0].keep.as_secs(), 2 * 365 * 86_400);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        for bad in ["retention: 5\n", "retention:\n  - {on: \"*/1Min/*\"}\n", "retention:\n  - {on: \"*/1Min\", keep: 1d}\n", "retention:\n  - {on: \"*/1Min/*\", keep: 10}\n"] {
            let e = Config::parse(&format!("listen_port: 1\n{bad}"), Path::new(".")).unwrap_err();
            assert!(e.to_string().contains("retention"), "{bad}: {e}");
        }
    }
}
