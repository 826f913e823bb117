//! `mkts connect`: an interactive SQL shell over a running server (`--url`) or an embedded engine
//! (`--dir <root>`, the data directory opened in-process; not while a server holds it).
//!
//! Which protocol `--url` speaks (see [`Protocol::of_url`]): `http://` / `https://` → MarketStore's msgpack
//! JSON-RPC on `/rpc` (the HTTP port, 5993 by default, as MarketStore's own `connect --url`); `grpc://` /
//! `grpc+tls://` → Arrow Flight SQL (the gRPC port, 5995); a bare `host:port` → JSON-RPC for port 5993,
//! Flight SQL for 5995, and for any other port JSON-RPC if `HEAD /rpc` there answers with MarketStore's
//! version header, else Flight SQL.
//!
//! Lines starting with `\` are session commands (MarketStore's set: `\show`, `\create`, `\destroy`,
//! `\getinfo`, `\load`, `\o`, `\timing`, `\help`, plus `\tables`); anything else is SQL. `-c/--command`
//! runs commands non-interactively (repeatable); without a terminal, commands are read from stdin.
//! History lives in `~/.mkts_history`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::{Action, FlightClient, FlightDescriptor};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::engine::{BucketKey, BucketSchema, ColumnDef, Engine, EngineConfig, RecordKind};
use super::jsonrpc::RpcClient;
use crate::service::{Caller, CreateRequest, ErrorCode, Interface, Service, ServiceError, WriteRequest};

/// Arguments of `mkts connect`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Server address: `http://host:5993` or `https://…` (MarketStore's JSON-RPC on /rpc),
    /// `grpc://host:5995` or `grpc+tls://…` (Flight SQL), or a bare `host:port` (5993: JSON-RPC, 5995: Flight
    /// SQL, another port: JSON-RPC if it answers as /rpc does, else Flight SQL).
    #[arg(short = 'u', long, conflicts_with = "dir", required_unless_present_any = ["dir", "ballista"])]
    pub url: Option<String>,
    /// A Ballista scheduler started with `mkts ballista scheduler` (`grpc://host:50050`, its Flight SQL
    /// endpoint): SQL runs on the cluster over the same catalog. `\` commands that change buckets need a
    /// server (`--url`).
    #[arg(long, value_name = "URL", conflicts_with_all = ["url", "dir"])]
    pub ballista: Option<String>,
    /// Open this data directory in-process instead of connecting to a server.
    #[arg(short = 'd', long)]
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// Run this command (SQL or a `\` command) and exit; may be repeated.
    #[arg(short = 'c', long = "command")]
    pub command: Vec<String>,
}

/// How to reach a server that uses TLS or `auth:` (shared by `connect`, `import` and `export`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RemoteArgs {
    /// PEM file of the CA that signed the server's certificate (default: the system's roots).
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// User to authenticate as; the password comes from MKTS_PASSWORD or is asked for.
    #[arg(long, env = "MKTS_USER")]
    pub user: Option<String>,
}

/// Largest message the CLI accepts from a server.
const MAX_MSG: usize = 256 << 20;

/// Where commands go: a server over Flight (SQL) or the operations layer over a data directory opened in
/// this process.
#[allow(clippy::large_enum_variant)]
pub enum Client {
    Remote { sql: FlightSqlServiceClient<Channel>, flight: FlightClient },
    /// MarketStore's msgpack JSON-RPC on a server's HTTP port.
    Rpc { rpc: RpcClient },
    Local { service: Box<Service> },
}

/// The protocol a `--url` is spoken in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// MarketStore's JSON-RPC at this `http(s)://…/rpc` endpoint.
    JsonRpc(String),
    /// Arrow Flight SQL at this gRPC url.
    FlightSql(String),
}

/// MarketStore's default HTTP (`listen_port`) and gRPC (`grpc_listen_port`) ports.
const HTTP_PORT: u16 = 5993;
const GRPC_PORT: u16 = 5995;

impl Protocol {
    /// The protocol of a `--url`: by scheme (`http://`, `https://` → JSON-RPC; `grpc://`, `grpc+tcp://`,
    /// `grpc+tls://` → Flight SQL), and for a bare `host:port` by port (5993 → JSON-RPC, 5995 → Flight SQL)
    /// or, for another port, by asking: `HEAD http://host:port/rpc` answered with a `Marketstore-Version`
    /// header (mkts's and MarketStore's `/rpc` do) or with mkts's 401 challenge → JSON-RPC, anything else →
    /// Flight SQL. A url carrying `user:password@` is refused (without echoing it): credentials go in
    /// `--user` and `MKTS_PASSWORD`, so they never reach an error message or a shell history.
    pub fn of_url(url: &str) -> anyhow::Result<Protocol> {
        let u = url.trim();
        let authority = u.split_once("://").map_or(u, |(_, r)| r);
        if authority.split('/').next().is_some_and(|a| a.contains('@')) {
            bail!("--url must not carry credentials (user:password@): give --user NAME and the password in MKTS_PASSWORD");
        }
        let lower = u.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return Ok(Protocol::JsonRpc(u.to_string()));
        }
        if lower.starts_with("grpc://") || lower.starts_with("grpc+tcp://") || lower.starts_with("grpc+tls://") {
            return Ok(Protocol::FlightSql(u.to_string()));
        }
        if u.contains("://") {
            bail!("unknown url scheme in {u:?}: use http(s)://host:port (JSON-RPC) or grpc(+tls)://host:port (Flight SQL)");
        }
        let port = u.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).ok_or_else(|| anyhow!("--url {u:?} must be host:port or carry a scheme"))?;
        Ok(match port {
            HTTP_PORT => Protocol::JsonRpc(format!("http://{u}")),
            GRPC_PORT => Protocol::FlightSql(u.to_string()),
            _ if answers_as_rpc(u) => Protocol::JsonRpc(format!("http://{u}")),
            _ => Protocol::FlightSql(u.to_string()),
        })
    }
}

impl Protocol {
    /// [`Protocol::of_url`] off the async runtime (its probe is a blocking HTTP request).
    pub async fn detect(url: &str) -> anyhow::Result<Protocol> {
        let probe = url.to_string();
        tokio::task::spawn_blocking(move || Protocol::of_url(&probe)).await.map_err(|e| anyhow!("{e}"))?
    }
}

/// Whether `host:port` answers `HEAD /rpc` as MarketStore's `/rpc` does (with its version header), or as
/// mkts's `/rpc` does under `auth:` (a 401 challenge for the `mkts` realm).
fn answers_as_rpc(host_port: &str) -> bool {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(3)))
        .build()
        .into();
    agent
        .head(&format!("http://{host_port}/rpc"))
        .call()
        .is_ok_and(|r| {
            let h = r.headers();
            // A server with `auth:` answers 401 before `/rpc` sees the request: its Basic challenge names
            // the mkts realm.
            h.contains_key(crate::compat::rpc::VERSION_HEADER)
                || (r.status() == 401
                    && h.get("www-authenticate").and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("realm=\"mkts\"")))
        })
}

/// Who embedded-mode commands run as.
fn caller() -> Caller {
    Caller::anonymous(Interface::Cli)
}

/// The CLI's message of a failed operation: its class, then the message (`not found: …`).
fn local(e: ServiceError) -> anyhow::Error {
    anyhow!(e.describe())
}

/// The same message for an operation a server refused over Flight.
pub fn remote(e: &arrow_flight::error::FlightError) -> anyhow::Error {
    match e {
        arrow_flight::error::FlightError::Tonic(s) => local(ServiceError::new(ErrorCode::from_grpc(s.code()), s.message())),
        other => anyhow!("{other}"),
    }
}

/// A lazy stream of result batches.
pub type Batches = BoxStream<'static, anyhow::Result<RecordBatch>>;

/// `(uri for tonic, tls)` of a `--url`.
fn normalize_url(url: &str) -> (String, bool) {
    let u = url.trim();
    for tls in ["grpc+tls://", "https://"] {
        if let Some(rest) = u.strip_prefix(tls) {
            return (format!("https://{rest}"), true);
        }
    }
    let rest = u.trim_start_matches("grpc://").trim_start_matches("grpc+tcp://").trim_start_matches("http://");
    (format!("http://{rest}"), false)
}

impl Client {
    /// Connect to a server in the protocol of `url` ([`Protocol::of_url`]).
    pub async fn connect(url: &str, remote: &RemoteArgs) -> anyhow::Result<Client> {
        match Protocol::detect(url).await? {
            Protocol::JsonRpc(u) => Ok(Client::Rpc { rpc: RpcClient::new(&u, remote)? }),
            Protocol::FlightSql(u) => Client::connect_flight(&u, remote).await,
        }
    }

    /// Connect to a server's gRPC listener (over TLS for `grpc+tls://`), authenticating with the Flight
    /// handshake when `remote.user` is set: the token it returns goes on every later call.
    pub async fn connect_flight(url: &str, remote: &RemoteArgs) -> anyhow::Result<Client> {
        let (uri, tls) = normalize_url(url);
        let mut endpoint = tonic::transport::Endpoint::from_shared(uri).with_context(|| format!("bad url {url:?}"))?;
        if tls {
            let mut cfg = tonic::transport::ClientTlsConfig::new();
            cfg = match &remote.ca_file {
                Some(ca) => {
                    let pem = std::fs::read(ca).with_context(|| format!("cannot read --ca-file {}", ca.display()))?;
                    cfg.ca_certificate(tonic::transport::Certificate::from_pem(pem))
                }
                None => cfg.with_native_roots(),
            };
            endpoint = endpoint.tls_config(cfg).context("TLS configuration")?;
        } else if remote.ca_file.is_some() {
            bail!("--ca-file needs a TLS url (grpc+tls://host:port)");
        }
        let channel = endpoint.connect().await.with_context(|| format!("cannot connect to {url}"))?;
        let inner = || FlightServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MSG).max_encoding_message_size(MAX_MSG);
        let mut sql = FlightSqlServiceClient::new_from_inner(inner());
        let mut flight = FlightClient::new_from_inner(inner());
        if let Some(user) = &remote.user {
            let password = match std::env::var("MKTS_PASSWORD") {
                Ok(p) => p,
                Err(_) => crate::cli::read_password(&format!("password for {user}: "))?,
            };
            sql.handshake(user, &password).await.map_err(|e| anyhow!("authentication as {user:?} failed: {e}"))?;
            let token = sql.token().cloned().ok_or_else(|| anyhow!("the server returned no token from the handshake"))?;
            flight.add_header("authorization", &format!("Bearer {token}")).map_err(|e| anyhow!("{e}"))?;
        }
        Ok(Client::Remote { sql, flight })
    }

    /// Open a data directory in-process.
    pub fn open(dir: &Path) -> anyhow::Result<Client> {
        // The zone the server that wrote the directory ran with, so day bars land where it put them.
        Client::open_in_zone(dir, crate::engine::recorded_timezone(dir).unwrap_or(chrono_tz::UTC))
    }

    /// [`Client::open`] for a server that runs with `timezone: tz` (where fixed day-and-longer intervals
    /// start, and the zone of function windows).
    pub fn open_in_zone(dir: &Path, tz: chrono_tz::Tz) -> anyhow::Result<Client> {
        let mut cfg = EngineConfig::new(dir);
        cfg.timezone = mkts_udf::parse_timezone(Some(tz.name())).ok().flatten();
        let engine = Engine::open(cfg).map_err(|e| anyhow!("cannot open {}: {e}", dir.display()))?;
        Ok(Client::Local { service: Box::new(Service::new(engine, tz, None)) })
    }

    /// From `--url`/`--dir`.
    pub async fn from_args(url: Option<&str>, dir: Option<&Path>, remote: &RemoteArgs) -> anyhow::Result<Client> {
        match (url, dir) {
            (Some(u), None) => Client::connect(u, remote).await,
            (None, Some(d)) => Client::open(d),
            _ => bail!("give exactly one of --url host:port or --dir <root>"),
        }
    }

    /// Close cleanly (the embedded engine checkpoints).
    pub async fn close(self) -> anyhow::Result<()> {
        if let Client::Local { service } = self {
            service.engine().shutdown().await.map_err(|e| anyhow!("checkpoint on close failed: {e}"))?;
        }
        Ok(())
    }

    /// Run SQL and stream the result.
    pub async fn sql_stream(&mut self, text: &str) -> anyhow::Result<(SchemaRef, Batches)> {
        match self {
            Client::Local { service } => {
                let (schema, s) = service.sql_stream(&caller(), text, None).await.map_err(local)?;
                Ok((schema, s.map_err(local).boxed()))
            }
            Client::Remote { sql, .. } => {
                let info = sql.execute(text.to_string(), None).await.map_err(|e| remote(&e))?;
                let schema: SchemaRef = Arc::new(info.clone().try_decode_schema().map_err(|e| anyhow!("bad schema from server: {e}"))?);
                let mut streams = Vec::new();
                for ep in info.endpoint {
                    let ticket = ep.ticket.ok_or_else(|| anyhow!("server returned an endpoint without a ticket"))?;
                    let s = sql.do_get(ticket).await.map_err(|e| remote(&e))?;
                    streams.push(s.map_err(|e| remote(&e)));
                }
                Ok((schema, futures::stream::iter(streams).flatten().boxed()))
            }
            Client::Rpc { rpc } => {
                // MarketStore's SQL statement path: DataService.Query with is_sqlstatement.
                let (schema, batches) = rpc.query(vec![("is_sqlstatement", true.into()), ("sql_statement", text.into())]).await?;
                Ok((schema, futures::stream::iter(batches.into_iter().map(Ok)).boxed()))
            }
        }
    }

    /// The rows of `key` with `start <= Epoch <= end` (Unix seconds; `end` absent: to the last row), in
    /// time order: `\show`.
    pub async fn show(&mut self, key: &BucketKey, start: i64, end: Option<i64>) -> anyhow::Result<(SchemaRef, Vec<RecordBatch>)> {
        if let Client::Rpc { rpc } = self {
            let mut req = vec![("destination", key.to_string().into()), ("epoch_start", start.into())];
            if let Some(e) = end {
                req.push(("epoch_end", e.into()));
            }
            return rpc.query(req).await;
        }
        let mut sql = format!("SELECT * FROM \"{key}\" WHERE \"Epoch\" >= to_timestamp({start})");
        if let Some(end) = end {
            sql.push_str(&format!(" AND \"Epoch\" <= to_timestamp({end})"));
        }
        sql.push_str(" ORDER BY \"Epoch\"");
        self.sql(&sql).await
    }

    /// Every table: bucket keys (and, over Flight SQL or `--dir`, the `*/TF/GROUP` tables): `\tables`.
    pub async fn tables(&mut self) -> anyhow::Result<(SchemaRef, Vec<RecordBatch>)> {
        if let Client::Rpc { rpc } = self {
            let keys = rpc.keys().await?;
            let schema = Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new("table_name", arrow::datatypes::DataType::Utf8, false)]));
            let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(arrow::array::StringArray::from(keys))])?;
            return Ok((schema, vec![b]));
        }
        self.sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1").await
    }

    /// Run SQL and collect the result.
    pub async fn sql(&mut self, text: &str) -> anyhow::Result<(SchemaRef, Vec<RecordBatch>)> {
        let (schema, s) = self.sql_stream(text).await?;
        let batches: Vec<RecordBatch> = s.try_collect().await?;
        Ok((schema, batches))
    }

    async fn action(&mut self, name: &str, body: Value) -> anyhow::Result<Value> {
        let Client::Remote { flight, .. } = self else { bail!("not connected to a server over Flight") };
        let mut s = flight.do_action(Action::new(name, body.to_string())).await.map_err(|e| remote(&e))?;
        let first = s.next().await.ok_or_else(|| anyhow!("{name}: empty reply"))?.map_err(|e| remote(&e))?;
        Ok(serde_json::from_slice(&first).unwrap_or(Value::Null))
    }

    /// Create a bucket.
    pub async fn create(&mut self, key: &BucketKey, schema: BucketSchema) -> anyhow::Result<()> {
        match self {
            Client::Local { service } => service.create(&caller(), &CreateRequest { key: key.clone(), schema }).await.map_err(local),
            Client::Remote { .. } => {
                let names: Vec<&str> = schema.columns.iter().map(|c| c.name.as_str()).collect();
                let types: Vec<String> = schema.columns.iter().map(|c| c.type_name()).collect();
                let body = json!({"key": key.to_string(), "column_names": names, "column_types": types,
                                  "is_variable_length": schema.kind == RecordKind::Variable});
                self.action("create", body).await.map(|_| ())
            }
            Client::Rpc { rpc } => rpc.create(key, &schema).await,
        }
    }

    /// Destroy a bucket.
    pub async fn destroy(&mut self, key: &BucketKey) -> anyhow::Result<()> {
        match self {
            Client::Local { service } => service.destroy(&caller(), key).await.map_err(local),
            Client::Remote { .. } => self.action("destroy", json!({"key": key.to_string()})).await.map(|_| ()),
            Client::Rpc { rpc } => rpc.destroy(key).await,
        }
    }

    /// Delete the rows of `key` with `start <= Epoch <= end` (a logged range delete); returns how many.
    pub async fn delete_range(&mut self, key: &BucketKey, start: crate::engine::TimePoint, end: crate::engine::TimePoint) -> anyhow::Result<u64> {
        match self {
            Client::Local { service } => Ok(service.delete_range(&caller(), key, start, end).await.map_err(local)? as u64),
            Client::Remote { .. } => {
                let body = json!({"key": key.to_string(), "epoch_start": start.secs, "epoch_start_nanos": start.nanos,
                                  "epoch_end": end.secs, "epoch_end_nanos": end.nanos});
                let v = self.action("delete_range", body).await?;
                Ok(v.get("deleted").and_then(Value::as_u64).unwrap_or(0))
            }
            Client::Rpc { rpc } => bail!(
                "deleting rows is not part of MarketStore's JSON-RPC API ({}); connect with --url grpc://host:5995 or --dir",
                rpc.url()
            ),
        }
    }

    /// Add or drop columns of `key`; returns the new data columns as `name:type` strings.
    pub async fn alter(&mut self, key: &BucketKey, change: crate::engine::SchemaChange) -> anyhow::Result<Vec<String>> {
        use crate::engine::SchemaChange;
        match self {
            Client::Local { service } => {
                let s = service.alter(&caller(), key, change).await.map_err(local)?;
                Ok(s.columns.iter().map(|c| format!("{}:{}", c.name, c.type_name())).collect())
            }
            Client::Remote { .. } => {
                let (name, body) = match &change {
                    SchemaChange::AddColumns(cols) => (
                        "add_column",
                        json!({"key": key.to_string(), "column_names": cols.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                               "column_types": cols.iter().map(ColumnDef::type_name).collect::<Vec<_>>()}),
                    ),
                    SchemaChange::DropColumns(names) => ("drop_column", json!({"key": key.to_string(), "column_names": names})),
                };
                let v = self.action(name, body).await?;
                Ok(v.get("columns")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|c| {
                                let q = if c["nullable"].as_bool().unwrap_or(false) { "?" } else { "" };
                                format!("{}:{}{q}", c["name"].as_str().unwrap_or(""), c["type"].as_str().unwrap_or(""))
                            })
                            .collect()
                    })
                    .unwrap_or_default())
            }
            Client::Rpc { rpc } => bail!(
                "changing columns is not part of MarketStore's JSON-RPC API ({}); connect with --url grpc://host:5995 or --dir",
                rpc.url()
            ),
        }
    }

    /// Bucket description: `{key, timeframe, is_variable_length, columns: [{name, type}], rows, years, first_epoch, last_epoch}`.
    pub async fn info(&mut self, key: &BucketKey) -> anyhow::Result<Value> {
        match self {
            Client::Local { service } => {
                let info = service.get_info(&caller(), key).map_err(local)?;
                let cols: Vec<Value> = info.schema.columns.iter().map(|c| json!({"name": c.name, "type": c.ty.wire_name()})).collect();
                Ok(json!({"key": info.key, "timeframe": key.timeframe, "timeframe_ns": key.tf().nominal_nanos(),
                          "is_variable_length": info.schema.kind == RecordKind::Variable, "columns": cols,
                          "rows": info.rows, "years": info.years, "first_epoch": info.first_epoch, "last_epoch": info.last_epoch}))
            }
            Client::Remote { .. } => self.action("get_info", json!({"key": key.to_string()})).await,
            Client::Rpc { rpc } => {
                let info = rpc.info(key).await?.map_err(|e| anyhow!("not found: {e}"))?;
                let cols: Vec<Value> = info.schema.columns.iter().map(|c| json!({"name": c.name, "type": c.ty.wire_name()})).collect();
                // GetInfo carries no row count or year list: only the latest year.
                Ok(json!({"key": key.to_string(), "timeframe": key.timeframe, "timeframe_ns": info.timeframe_ns,
                          "is_variable_length": info.schema.kind == RecordKind::Variable, "columns": cols,
                          "years": [info.latest_year]}))
            }
        }
    }

    /// The bucket's schema, or `None` when it does not exist.
    pub async fn bucket_schema(&mut self, key: &BucketKey) -> anyhow::Result<Option<BucketSchema>> {
        match self {
            Client::Local { service } => match service.get_info(&caller(), key) {
                Ok(info) => Ok(Some(info.schema)),
                Err(e) if e.code == ErrorCode::NotFound => Ok(None),
                Err(e) => Err(local(e)),
            },
            Client::Remote { flight, .. } => {
                let action = Action::new("get_info", json!({"key": key.to_string()}).to_string());
                let reply = match flight.do_action(action).await {
                    Ok(mut s) => s.next().await.ok_or_else(|| anyhow!("get_info: empty reply"))?,
                    Err(e) => Err(e),
                };
                match reply {
                    Ok(body) => Ok(Some(schema_from_info(&serde_json::from_slice(&body).unwrap_or(Value::Null))?)),
                    Err(arrow_flight::error::FlightError::Tonic(s)) if s.code() == tonic::Code::NotFound => Ok(None),
                    Err(e) => Err(remote(&e)),
                }
            }
            Client::Rpc { rpc } => Ok(rpc.info(key).await?.ok().map(|i| i.schema)),
        }
    }

    /// Write batches to a bucket (durably); returns rows stored. Remote writes stream over one DoPut.
    pub async fn write_stream(&mut self, key: &BucketKey, batches: Batches) -> anyhow::Result<u64> {
        match self {
            Client::Local { service } => {
                let mut total = 0u64;
                let mut batches = batches;
                while let Some(b) = batches.next().await {
                    let b = b?;
                    if b.num_rows() > 0 {
                        total += service.write(&caller(), &WriteRequest::new(key.clone(), b)).await.map_err(local)?.rows as u64;
                    }
                }
                Ok(total)
            }
            Client::Remote { flight, .. } => {
                let (err_tx, mut err_rx) = tokio::sync::mpsc::unbounded_channel::<anyhow::Error>();
                let input = batches
                    .take_while(move |r| {
                        let ok = match r {
                            Ok(_) => true,
                            Err(e) => {
                                let _ = err_tx.send(anyhow!("{e:#}"));
                                false
                            }
                        };
                        futures::future::ready(ok)
                    })
                    .filter_map(|r| futures::future::ready(r.ok()))
                    .map(Ok);
                let data = arrow_flight::encode::FlightDataEncoderBuilder::new()
                    .with_flight_descriptor(Some(FlightDescriptor::new_path(vec![key.to_string()])))
                    .build(input);
                let sent = async {
                    let mut results = flight.do_put(data).await.map_err(|e| remote(&e))?;
                    let mut total = 0u64;
                    while let Some(r) = results.next().await {
                        let r = r.map_err(|e| remote(&e))?;
                        let v: Value = serde_json::from_slice(&r.app_metadata).unwrap_or(Value::Null);
                        total += v.get("rows").and_then(Value::as_u64).unwrap_or(0);
                    }
                    anyhow::Ok(total)
                }
                .await;
                // A bad input row ends the stream early: its error is the one to report, not what the server
                // says of the cut stream (an empty DoPut when the first batch was bad).
                if let Ok(e) = err_rx.try_recv() {
                    return Err(e);
                }
                sent
            }
            Client::Rpc { rpc } => {
                // One DataService.Write per batch, as MarketStore's loader writes one per chunk.
                let variable = rpc.info(key).await?.is_ok_and(|i| i.schema.kind == RecordKind::Variable);
                let mut total = 0u64;
                let mut batches = batches;
                while let Some(b) = batches.next().await {
                    let b = b?;
                    if b.num_rows() > 0 {
                        total += rpc.write(key, &b, variable).await? as u64;
                    }
                }
                Ok(total)
            }
        }
    }
}

/// Bucket schema from a `get_info` reply.
pub fn schema_from_info(v: &Value) -> anyhow::Result<BucketSchema> {
    let variable = v.get("is_variable_length").and_then(Value::as_bool).unwrap_or(false);
    let mut columns = Vec::new();
    for c in v.get("columns").and_then(Value::as_array).ok_or_else(|| anyhow!("get_info reply without columns"))? {
        let name = c.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        columns.push(ColumnDef::parse(name, c.get("type").and_then(Value::as_str).unwrap_or_default())?);
    }
    Ok(BucketSchema { kind: if variable { RecordKind::Variable } else { RecordKind::Fixed }, columns })
}

/// Parse MarketStore's `\create` shape: `Open,High,Low,Close/float32:Volume/int64`.
pub fn parse_shape(shape: &str, kind: RecordKind) -> anyhow::Result<BucketSchema> {
    let mut columns = Vec::new();
    for group in shape.split(':').filter(|g| !g.is_empty()) {
        let (names, ty) = group.rsplit_once('/').ok_or_else(|| anyhow!("shape group {group:?} must be name1,name2/type"))?;
        let col = ColumnDef::parse("", ty)?;
        for n in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if n == "Epoch" || (kind == RecordKind::Variable && n == "Nanoseconds") {
                continue;
            }
            columns.push(ColumnDef { name: n.to_string(), ..col.clone() });
        }
    }
    let s = BucketSchema { kind, columns };
    s.validate()?;
    Ok(s)
}

/// Parse a `\show` time (Unix seconds): every spelling of [`crate::timestr`].
pub fn parse_time_arg(s: &str) -> anyhow::Result<i64> {
    Ok(crate::timestr::parse_time_secs(s)?)
}

/// Shell state.
pub struct Shell {
    pub client: Client,
    timing: bool,
    output: Option<(PathBuf, std::fs::File)>,
}

const HELP: &str = r#"Commands (anything else is SQL; quote keys: SELECT * FROM "AAPL/1Min/OHLCV"):
  \show KEY START [END]          rows of a bucket in a time range (2024-01-02, 2024-01-02T09:30, RFC 3339, Unix s)
  \create KEY SHAPE fixed|variable
                                 e.g. \create TSLA/1Min/OHLCV Open,High,Low,Close/float32:Volume/int64 fixed
  \destroy KEY                   remove a bucket and its data
  \getinfo KEY                   schema, record type, timeframe, rows, years
  \trim KEY DATE                 delete the rows of KEY from DATE to the end of DATE's year (UTC), as
                                 MarketStore's \trim (which trimmed every bucket; this trims KEY only)
  \addcolumn KEY SHAPE           add nullable columns (stored rows read as null), e.g.
                                 \addcolumn AAPL/1Min/OHLCV Vwap/float64:Venue/utf8
  \dropcolumn KEY NAME[,NAME]    drop columns with their data
  \load KEY FILE.csv [CTL.yaml]  load a CSV (MarketStore control file: firstRowHasColumnNames, timeFormat,
                                 timeZone, columnNameMap)
  \tables                        list tables (bucket keys and */TF/GROUP tables)
  \o [FILE]                      write results as CSV to FILE (no argument: back to the terminal)
  \timing                        toggle printing elapsed time
  \help, \?                      this text
  \q, \quit, \stop, exit         leave
Tables: "SYM/TF/GROUP" (one bucket), "*/TF/GROUP" or "TF/GROUP" (all symbols, with a Symbol column)."#;

impl Shell {
    pub fn new(client: Client) -> Self {
        Shell { client, timing: false, output: None }
    }

    fn print(&mut self, text: &str) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}")?;
        Ok(())
    }

    fn emit(&mut self, schema: &SchemaRef, batches: &[RecordBatch]) -> anyhow::Result<()> {
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if let Some((path, file)) = &mut self.output {
            let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(&mut *file);
            for b in batches {
                w.write(b)?;
            }
            drop(w);
            file.flush()?;
            let p = path.display().to_string();
            return self.print(&format!("wrote {rows} rows to {p}"));
        }
        let table = if batches.is_empty() {
            arrow::util::pretty::pretty_format_batches(&[RecordBatch::new_empty(schema.clone())])?
        } else {
            arrow::util::pretty::pretty_format_batches(batches)?
        };
        let cols = schema.fields().len();
        self.print(&format!("{table}\n({rows} row{} * {cols} column{})", if rows == 1 { "" } else { "s" }, if cols == 1 { "" } else { "s" }))
    }

    /// Run one line; returns false when the shell should exit.
    pub async fn execute(&mut self, line: &str) -> anyhow::Result<bool> {
        let line = line.trim();
        if line.is_empty() || line.starts_with("--") {
            return Ok(true);
        }
        if matches!(line, "\\q" | "\\quit" | "\\stop" | "exit" | "quit") {
            return Ok(false);
        }
        let started = Instant::now();
        if let Some(cmd) = line.strip_prefix('\\') {
            self.command(cmd).await?;
        } else if line == "help" {
            self.print(HELP)?;
        } else {
            let (schema, batches) = self.client.sql(line).await?;
            self.emit(&schema, &batches)?;
        }
        if self.timing {
            self.print(&format!("Elapsed query time: {:.3} ms", started.elapsed().as_secs_f64() * 1000.0))?;
        }
        Ok(true)
    }

    async fn command(&mut self, cmd: &str) -> anyhow::Result<()> {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let (name, args) = words.split_first().map(|(n, a)| (*n, a.to_vec())).unwrap_or(("help", Vec::new()));
        let key_arg = |i: usize| -> anyhow::Result<BucketKey> {
            let k = args.get(i).ok_or_else(|| anyhow!("\\{name} needs a bucket key SYMBOL/TIMEFRAME/ATTRGROUP"))?;
            Ok(BucketKey::parse(k)?)
        };
        match name {
            "help" | "?" | "h" => self.print(HELP),
            "timing" => {
                self.timing = !self.timing;
                let s = if self.timing { "on" } else { "off" };
                self.print(&format!("Timing is {s}."))
            }
            "o" => {
                match args.first() {
                    None => {
                        self.output = None;
                        self.print("Output goes to the terminal.")?;
                    }
                    Some(p) => {
                        let f = std::fs::File::create(p).with_context(|| format!("cannot create {p}"))?;
                        self.output = Some((PathBuf::from(p), f));
                        self.print(&format!("Output goes to {p} (CSV)."))?;
                    }
                }
                Ok(())
            }
            "show" => {
                let key = key_arg(0)?;
                let times: Vec<&str> = args[1..].iter().copied().filter(|w| !w.eq_ignore_ascii_case("between") && !w.eq_ignore_ascii_case("and")).collect();
                let start = times.first().ok_or_else(|| anyhow!("\\show KEY START [END]"))?;
                let start = parse_time_arg(start)?;
                let end = times.get(1).map(|e| parse_time_arg(e)).transpose()?;
                let (schema, batches) = self.client.show(&key, start, end).await?;
                self.emit(&schema, &batches)
            }
            "create" => {
                let key = key_arg(0)?;
                let shape = args.get(1).ok_or_else(|| anyhow!("\\create KEY SHAPE fixed|variable"))?;
                let kind = match args.get(2).map(|s| s.to_ascii_lowercase()).as_deref() {
                    Some("variable") => RecordKind::Variable,
                    Some("fixed") | None => RecordKind::Fixed,
                    Some(o) => bail!("record type must be fixed or variable, not {o:?}"),
                };
                let schema = parse_shape(shape, kind)?;
                self.client.create(&key, schema).await?;
                self.print(&format!("created {key}"))
            }
            "destroy" => {
                if args.len() != 1 {
                    bail!("\\destroy takes exactly one key");
                }
                let key = key_arg(0)?;
                self.client.destroy(&key).await?;
                self.print(&format!("destroyed {key}"))
            }
            "trim" => {
                if args.len() != 2 {
                    bail!("\\trim KEY DATE (e.g. \\trim AAPL/1Min/OHLCV 2024-06-01)");
                }
                let key = key_arg(0)?;
                let from = parse_time_arg(args[1])?;
                let year = chrono::DateTime::from_timestamp(from, 0).map(|t| chrono::Datelike::year(&t)).ok_or_else(|| anyhow!("\\trim: date out of range"))?;
                let next = chrono::NaiveDate::from_ymd_opt(year + 1, 1, 1)
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .map(|t| t.and_utc().timestamp())
                    .ok_or_else(|| anyhow!("\\trim: date out of range"))?;
                let start = crate::engine::TimePoint { secs: from, nanos: 0 };
                let end = crate::engine::TimePoint { secs: next - 1, nanos: 999_999_999 };
                let n = self.client.delete_range(&key, start, end).await?;
                self.print(&format!("trimmed {n} rows of {key} from {} to the end of {year}", args[1]))
            }
            "addcolumn" | "dropcolumn" => {
                if args.len() != 2 {
                    bail!("\\addcolumn KEY NAME/TYPE[:NAME/TYPE…] or \\dropcolumn KEY NAME[,NAME…]");
                }
                let key = key_arg(0)?;
                let change = if name == "addcolumn" {
                    crate::engine::SchemaChange::AddColumns(parse_shape(args[1], RecordKind::Fixed)?.columns)
                } else {
                    crate::engine::SchemaChange::DropColumns(args[1].split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect())
                };
                let cols = self.client.alter(&key, change).await?;
                self.print(&format!("{key}: {}", cols.join(" ")))
            }
            "getinfo" => {
                let key = key_arg(0)?;
                let v = self.client.info(&key).await?;
                let rt = if v.get("is_variable_length").and_then(Value::as_bool).unwrap_or(false) { "VARIABLE" } else { "FIXED" };
                let years: Vec<String> = v.get("years").and_then(Value::as_array).map(|a| a.iter().map(|y| y.to_string()).collect()).unwrap_or_default();
                let cols: Vec<String> = v
                    .get("columns")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(|c| format!("{}:{}", c["name"].as_str().unwrap_or(""), c["type"].as_str().unwrap_or(""))).collect())
                    .unwrap_or_default();
                let mut text = format!(
                    "Bucket: {key}\nLatest Year: {}, RecordType: {rt}, TF: {}\nData Types: {{Epoch:i8 {}}}",
                    years.last().cloned().unwrap_or_else(|| "-".into()),
                    key.timeframe,
                    cols.join(" ")
                );
                // MarketStore's GetInfo (JSON-RPC) has no row count.
                if let Some(rows) = v.get("rows") {
                    text.push_str(&format!("\nRows: {rows}"));
                }
                self.print(&text)
            }
            "load" => {
                let key = key_arg(0)?;
                let file = args.get(1).ok_or_else(|| anyhow!("\\load KEY FILE.csv [CONTROL.yaml]"))?;
                let ctl = args.get(2).map(PathBuf::from);
                let summary = super::transfer::import_file(&mut self.client, &key, Path::new(file), ctl.as_deref(), false).await?;
                self.print(&summary)
            }
            "tables" | "list" | "d" => {
                let (schema, batches) = self.client.tables().await?;
                self.emit(&schema, &batches)
            }
            other => bail!("unknown command \\{other}; \\help lists them"),
        }
    }
}

fn history_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".mkts_history"))
}

/// Run `mkts connect`.
pub fn run(args: ConnectArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let client = match &args.ballista {
            Some(b) => Client::connect_flight(b, &args.remote).await?,
            None => Client::from_args(args.url.as_deref(), args.dir.as_deref(), &args.remote).await?,
        };
        let mut shell = Shell::new(client);
        let mut failed = false;
        if !args.command.is_empty() {
            for c in &args.command {
                match shell.execute(c).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        failed = true;
                        break;
                    }
                }
            }
        } else if std::io::stdin().is_terminal() {
            interactive(&mut shell).await?;
        } else {
            for line in std::io::stdin().lock().lines() {
                let line = line?;
                match shell.execute(&line).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        failed = true;
                    }
                }
            }
        }
        shell.client.close().await?;
        if failed {
            bail!("a command failed");
        }
        Ok(())
    })
}

async fn interactive(shell: &mut Shell) -> anyhow::Result<()> {
    use rustyline::error::ReadlineError;
    let mut rl = rustyline::DefaultEditor::new()?;
    let hist = history_path();
    if let Some(h) = &hist {
        let _ = rl.load_history(h);
    }
    let target = match &shell.client {
        Client::Remote { .. } => "server, Flight SQL".to_string(),
        Client::Rpc { rpc } => format!("server, JSON-RPC at {}", rpc.url()),
        Client::Local { .. } => "local".to_string(),
    };
    println!("mkts {} connected ({target}). \\help for commands, \\q to quit.", crate::context::VERSION);
    loop {
        match rl.readline("» ") {
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = rl.add_history_entry(line.as_str());
                }
                match shell.execute(&line).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => eprintln!("error: {e:#}"),
                }
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(h) = &hist {
        let _ = rl.save_history(h);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_comes_from_the_scheme_or_the_port() {
        let p = |u: &str| Protocol::of_url(u).expect(u);
        assert_eq!(p("http://h:1"), Protocol::JsonRpc("http://h:1".into()));
        assert_eq!(p("HTTPS://h:1/rpc"), Protocol::JsonRpc("HTTPS://h:1/rpc".into()));
        assert_eq!(p("grpc://h:5993"), Protocol::FlightSql("grpc://h:5993".into()));
        assert_eq!(p("grpc+tls://h:1"), Protocol::FlightSql("grpc+tls://h:1".into()));
        assert_eq!(p("h:5993"), Protocol::JsonRpc("http://h:5993".into()));
        assert_eq!(p("h:5995"), Protocol::FlightSql("h:5995".into()));
        // Another port is asked; nothing listening there answers as /rpc.
        assert_eq!(p("127.0.0.1:1"), Protocol::FlightSql("127.0.0.1:1".into()));
    }

    #[test]
    fn bad_urls_are_clear_errors_and_credentials_are_not_echoed() {
        let e = |u: &str| format!("{:#}", Protocol::of_url(u).expect_err(u));
        assert!(e("ftp://h:1").contains("unknown url scheme"));
        assert!(e("localhost").contains("must be host:port"));
        assert!(e("h:5993/rpc").contains("must be host:port"));
        for u in ["http://bob:s3cret@h:5993", "bob:s3cret@h:5993", "grpc+tls://bob:s3cret@h:5995/x"] {
            let m = e(u);
            assert!(m.contains("must not carry credentials") && !m.contains("s3cret"), "{m}");
        }
    }
}
