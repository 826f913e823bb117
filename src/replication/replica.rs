//! The replica side: follow the master's replication port, apply what comes through this server's own
//! engine (its own log, fsync'd), acknowledge each position once durable, and reconnect with MarketStore's
//! backoff (`retry_interval * retry_backoff_coeff^n`) whenever the stream breaks.
//!
//! Each change is applied with its master position ([`Engine::apply`]), which the engine stores in the
//! same log record, so after a crash [`Engine::origin`] says exactly which changes are here and the next
//! Hello resumes after it: nothing missed, nothing applied twice. An image is applied from scratch: the
//! position is reset to nothing first (durably), every local bucket is dropped, the image's buckets are
//! written, and only then is the image's position recorded. A crash in between asks for a new image.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;

use super::pb::{self, master_message::Msg as In, replica_message::Msg as Out};
use super::wire;
use crate::config::ReplicationConfig;
use crate::engine::{Change, Engine, Origin};

type CredentialsFn = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;
type Client = pb::replication_client::ReplicationClient<tonic::codegen::InterceptedService<tonic::transport::Channel, CredentialsFn>>;

/// The longest wait between two connection attempts, whatever the backoff says.
const MAX_RETRY: Duration = Duration::from_secs(300);

/// What a replica reports (`replication_status`, `/metrics`).
#[derive(Debug, Clone, Serialize, Default)]
pub struct FollowerStatus {
    pub master_host: String,
    pub connected: bool,
    /// "connecting", "image", "streaming" or "retrying".
    pub phase: &'static str,
    /// The master store this replica's data comes from ("" before its first image).
    pub master_id: String,
    /// The last master position applied here durably.
    pub applied_position: u64,
    /// The master's position as last heard.
    pub master_position: u64,
    pub lag_records: u64,
    /// Master apply time to local apply time of the last change applied (0 when idle and caught up).
    pub lag_ms: u64,
    pub images_applied: u64,
    pub last_error: Option<String>,
}

/// A replica's follower loop and its status.
pub struct Follower {
    engine: Engine,
    cfg: ReplicationConfig,
    name: String,
    status: Mutex<FollowerStatus>,
}

impl Follower {
    pub fn new(engine: Engine, cfg: ReplicationConfig) -> Arc<Follower> {
        let host = cfg.master_host.clone().unwrap_or_default();
        let name = cfg.name.clone().unwrap_or_else(|| {
            let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}:{}", h.trim(), engine.root().display())
        });
        let origin = engine.origin();
        let status = FollowerStatus {
            master_host: host,
            phase: "connecting",
            master_id: origin.source,
            applied_position: origin.position,
            ..Default::default()
        };
        Arc::new(Follower { engine, cfg, name, status: Mutex::new(status) })
    }

    pub fn status(&self) -> FollowerStatus {
        let mut s = self.status.lock().clone();
        s.lag_records = s.master_position.saturating_sub(s.applied_position);
        s
    }

    /// Follow until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut failures: u32 = 0;
        loop {
            let started = std::time::Instant::now();
            let r = tokio::select! {
                r = self.session() => r,
                _ = shutdown.wait_for(|v| *v) => return,
            };
            let why = match r {
                Ok(()) => "the master ended the stream".to_string(),
                Err(e) => e,
            };
            {
                let mut s = self.status.lock();
                s.connected = false;
                s.phase = "retrying";
                s.last_error = Some(why.clone());
            }
            // A session that streamed for a while was a working link: start the backoff over.
            if started.elapsed() > Duration::from_secs(30) {
                failures = 0;
            }
            let coeff = (self.cfg.retry_backoff_coeff as f64).powi(failures.min(16) as i32);
            let wait = self.cfg.retry_interval.mul_f64(coeff).min(MAX_RETRY);
            failures = failures.saturating_add(1);
            tracing::warn!(master = %self.status.lock().master_host, retry_in_ms = wait.as_millis() as u64, "replication: {why}");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|v| *v) => return,
            }
        }
    }

    async fn connect(&self) -> Result<Client, String> {
        let host = self.cfg.master_host.clone().unwrap_or_default();
        let scheme = if self.cfg.tls_enabled { "https" } else { "http" };
        let mut ep = tonic::transport::Endpoint::from_shared(format!("{scheme}://{host}"))
            .map_err(|e| format!("replication.master_host {host:?}: {e}"))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .initial_stream_window_size(16u32 << 20)
            .initial_connection_window_size(64u32 << 20);
        if self.cfg.tls_enabled {
            let path = self.cfg.cert_file.clone().unwrap_or_default();
            let pem = std::fs::read(&path).map_err(|e| format!("replication.cert_file {}: {e}", path.display()))?;
            let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem));
            if let Some(h) = host.rsplit_once(':').map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']')) {
                tls = tls.domain_name(h.to_string());
            }
            ep = ep.tls_config(tls).map_err(|e| format!("replication TLS: {e}"))?;
        }
        let ch = ep.connect().await.map_err(|e| format!("cannot connect to the master at {host}: {e}"))?;
        // A master with `auth:` wants a user on the replication port too (HTTP Basic, as on its other ports).
        let authorization = match &self.cfg.user {
            Some(user) => {
                let password = std::env::var("MKTS_REPLICATION_PASSWORD").ok().or_else(|| self.cfg.password.as_ref().map(|p| p.0.clone())).unwrap_or_default();
                use base64::Engine as _;
                let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                Some(tonic::metadata::MetadataValue::try_from(format!("Basic {token}")).map_err(|_| "replication.user: not a valid header value".to_string())?)
            }
            None => None,
        };
        let add_credentials: CredentialsFn = Box::new(move |mut req: tonic::Request<()>| {
            if let Some(v) = &authorization {
                req.metadata_mut().insert("authorization", v.clone());
            }
            Ok(req)
        });
        Ok(pb::replication_client::ReplicationClient::with_interceptor(ch, add_credentials)
            .max_decoding_message_size(super::MAX_MESSAGE)
            .max_encoding_message_size(super::MAX_MESSAGE))
    }

    /// One connection: Hello, then apply until the stream ends or fails.
    async fn session(&self) -> Result<(), String> {
        self.status.lock().phase = "connecting";
        let mut client = self.connect().await?;
        let origin = self.engine.origin();
        let hello = pb::ReplicaMessage {
            msg: Some(Out::Hello(pb::Hello { master_id: origin.source.clone(), position: origin.position, name: self.name.clone() })),
        };
        let (ack_tx, ack_rx) = watch::channel(origin.position);
        let acks = tokio_stream::wrappers::WatchStream::from_changes(ack_rx)
            .map(|p| pb::ReplicaMessage { msg: Some(Out::Ack(pb::Ack { position: p })) });
        let outbound = futures::stream::iter([hello]).chain(acks);
        let mut inbound = client.follow(outbound).await.map_err(|s| format!("the master refused to stream: {}", s.message()))?.into_inner();
        {
            let mut s = self.status.lock();
            s.connected = true;
            s.last_error = None;
        }
        tracing::info!(master = %self.status.lock().master_host, position = origin.position, "replication: connected to the master");
        let mut source = origin.source;
        let mut position = origin.position;
        // Within an image: the key being filled and its schema's read order.
        let mut image: Option<(String, u64)> = None;
        loop {
            let msg = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(s) => return Err(format!("stream from the master failed: {}", s.message())),
            };
            match msg.msg {
                Some(In::ImageBegin(b)) => {
                    tracing::info!(buckets = b.buckets, position = b.position, "replication: receiving an image of the master");
                    self.status.lock().phase = "image";
                    // Nothing is trusted until the image is whole.
                    self.engine.mark_origin(Origin::default()).await.map_err(|e| format!("cannot reset the position: {e}"))?;
                    // Damaged buckets too: the image replaces them.
                    let damaged = self.engine.damaged().into_iter().filter_map(|d| crate::engine::BucketKey::parse(&d.key).ok());
                    for key in self.engine.keys().into_iter().chain(damaged) {
                        self.engine.apply(&Change::Destroy { key }, 0, false).await.map_err(|e| format!("cannot drop a local bucket: {e}"))?;
                    }
                    image = Some((b.master_id, b.position));
                }
                Some(In::ImageBucket(b)) => {
                    if image.is_none() {
                        return Err("an image bucket outside an image".into());
                    }
                    let key = crate::engine::BucketKey::parse(&b.key).map_err(|e| e.to_string())?;
                    if b.first {
                        let schema = wire::parse_schema(&b.schema_json).map_err(|e| e.to_string())?;
                        self.engine.apply(&Change::Create { key: key.clone(), schema }, 0, false).await.map_err(|e| format!("image {key}: {e}"))?;
                    }
                    for batch in wire::from_ipc(&b.arrow_ipc).map_err(|e| e.to_string())? {
                        self.engine.apply(&Change::Write { key: key.clone(), batch }, 0, false).await.map_err(|e| format!("image {key}: {e}"))?;
                    }
                }
                Some(In::ImageEnd(e)) => {
                    let Some((id, at)) = image.take() else { return Err("an image end outside an image".into()) };
                    if at != e.position {
                        return Err("the image ended at another position than it began".into());
                    }
                    self.engine
                        .mark_origin(Origin { source: id.clone(), position: at })
                        .await
                        .map_err(|e| format!("cannot record the image position: {e}"))?;
                    source = id;
                    position = at;
                    {
                        let mut s = self.status.lock();
                        s.phase = "streaming";
                        s.images_applied += 1;
                        s.master_id = source.clone();
                        s.applied_position = position;
                        s.master_position = s.master_position.max(position);
                    }
                    let _ = ack_tx.send(position);
                    tracing::info!(position, "replication: image applied");
                }
                Some(In::Change(c)) => {
                    if image.is_some() {
                        return Err("a change inside an image".into());
                    }
                    if source.is_empty() {
                        return Err("a change before any image (this replica holds nothing from the master)".into());
                    }
                    if c.lsn <= position {
                        continue; // already here (idempotent by position)
                    }
                    let changes = wire::decode_change(&c).map_err(|e| e.to_string())?;
                    for ch in &changes {
                        self.engine
                            .apply(ch, c.lsn, self.cfg.fire_triggers)
                            .await
                            .map_err(|e| format!("applying master change {} to {} failed: {e}", c.lsn, c.key))?;
                    }
                    position = c.lsn;
                    let lag = SystemTime::UNIX_EPOCH
                        .checked_add(Duration::from_nanos(c.applied_at_ns.max(0) as u64))
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    {
                        let mut s = self.status.lock();
                        s.applied_position = position;
                        s.master_position = s.master_position.max(position);
                        s.lag_ms = lag;
                        s.phase = "streaming";
                    }
                    let _ = ack_tx.send(position);
                }
                Some(In::Heartbeat(h)) => {
                    let mut s = self.status.lock();
                    s.master_position = h.position.max(position);
                    if h.position <= position {
                        s.lag_ms = 0;
                    }
                }
                None => {}
            }
        }
    }
}

use futures::StreamExt;
