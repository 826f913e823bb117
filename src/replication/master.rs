//! The master side: the `Follow` stream each replica opens, what each replica has acknowledged, and the
//! wait of `ack: replica` writes.
//!
//! A replica says where it stands (master store id + position). When this master's change feed still
//! holds that position, the stream continues from it; otherwise (an empty replica, another master's
//! position, one further behind than `retain_mb` reaches, or a master restart that lost the window) the
//! replica gets an image of every bucket taken at one log position, then the changes after it. Each
//! replica is served by its own task from the shared in-memory feed, so a slow or dead replica never
//! blocks the writer: when it falls out of the window its stream ends and it reconnects for an image.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use super::pb::{self, master_message::Msg as Out, replica_message::Msg as In};
use super::wire;
use crate::engine::Engine;

/// How often an idle stream carries a heartbeat (the master's position, for lag figures and liveness).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// What the master knows of one replica (by the name it reported).
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    pub name: String,
    /// The replica's address as this master sees it.
    pub addr: String,
    pub connected: bool,
    /// "image" while it receives an image, "streaming" after.
    pub phase: &'static str,
    /// The last master position it acknowledged as durable.
    pub acked_position: u64,
    /// Master positions not yet acknowledged (changes applied here since).
    pub lag_records: u64,
    /// How long ago the oldest change it has not acknowledged was applied here (0 when caught up).
    pub lag_ms: u64,
    /// Images sent to it since this master started.
    pub images: u64,
}

struct ReplicaState {
    status: ReplicaStatus,
    session: u64,
    /// Changes sent and not yet acknowledged, oldest first: `(lsn, applied here at)`, for lag_ms.
    unacked: std::collections::VecDeque<(u64, SystemTime)>,
}

/// Unacknowledged changes remembered per replica for its lag figure (the oldest ones are what count).
const UNACKED_TRACKED: usize = 100_000;

/// The master's replication state, shared by the `Follow` streams and the write path.
pub struct Master {
    engine: Engine,
    store_id: String,
    replicas: Mutex<BTreeMap<String, ReplicaState>>,
    /// The highest position any connected replica acknowledged.
    best_ack: watch::Sender<u64>,
    next_session: std::sync::atomic::AtomicU64,
}

impl Master {
    pub fn new(engine: Engine) -> Arc<Master> {
        let store_id = engine.store_id().to_string();
        Arc::new(Master {
            engine,
            store_id,
            replicas: Mutex::new(BTreeMap::new()),
            best_ack: watch::Sender::new(0),
            next_session: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// This master's store id (replicas keep it with their position).
    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    /// Every replica seen since start, with lag figures as of now.
    pub fn status(&self) -> Vec<ReplicaStatus> {
        let head = self.engine.last_change_lsn();
        let now = SystemTime::now();
        self.replicas
            .lock()
            .values()
            .map(|r| {
                let mut s = r.status.clone();
                s.lag_records = head.saturating_sub(s.acked_position);
                s.lag_ms = match (s.lag_records, r.unacked.front()) {
                    (0, _) | (_, None) => 0,
                    (_, Some((_, t))) => now.duration_since(*t).map(|d| d.as_millis() as u64).unwrap_or(0),
                };
                s
            })
            .collect()
    }

    /// Wait until a connected replica has every change up to `lsn` durable (`ack: replica`).
    pub async fn wait_replicated(&self, lsn: u64, timeout: Duration) -> Result<(), String> {
        let mut rx = self.best_ack.subscribe();
        let wait = rx.wait_for(|acked| *acked >= lsn);
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err("replication stopped".into()),
            Err(_) => {
                let connected = self.replicas.lock().values().filter(|r| r.status.connected).count();
                Err(format!(
                    "the write is durable on the master but no replica acknowledged it within {} ms ({connected} replica(s) connected; replication.ack: replica)",
                    timeout.as_millis()
                ))
            }
        }
    }

    fn recompute_best(&self, map: &BTreeMap<String, ReplicaState>) {
        let best = map.values().filter(|r| r.status.connected).map(|r| r.status.acked_position).max().unwrap_or(0);
        self.best_ack.send_if_modified(|v| {
            let changed = *v != best;
            *v = best;
            changed
        });
    }

    fn register(&self, name: &str, addr: String, position: u64) -> u64 {
        let session = self.next_session.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut map = self.replicas.lock();
        let images = map.get(name).map(|r| r.status.images).unwrap_or(0);
        map.insert(
            name.to_string(),
            ReplicaState {
                status: ReplicaStatus {
                    name: name.to_string(),
                    addr,
                    connected: true,
                    phase: "streaming",
                    acked_position: position,
                    lag_records: 0,
                    lag_ms: 0,
                    images,
                },
                session,
                unacked: Default::default(),
            },
        );
        self.recompute_best(&map);
        session
    }

    fn update(&self, name: &str, session: u64, f: impl FnOnce(&mut ReplicaState)) {
        let mut map = self.replicas.lock();
        if let Some(r) = map.get_mut(name).filter(|r| r.session == session) {
            f(r);
        }
        self.recompute_best(&map);
    }

    /// Serve one replica's `Follow` stream: returns the outgoing messages; acknowledgements are read by a
    /// task of their own.
    async fn serve(self: Arc<Self>, addr: String, mut inbound: Streaming<pb::ReplicaMessage>) -> Result<mpsc::Receiver<Result<pb::MasterMessage, Status>>, Status> {
        let hello = match inbound.message().await? {
            Some(pb::ReplicaMessage { msg: Some(In::Hello(h)) }) => h,
            _ => return Err(Status::invalid_argument("a replica must send Hello first")),
        };
        let name = if hello.name.trim().is_empty() { addr.clone() } else { hello.name.clone() };
        // Continue from the replica's position when it is ours and the feed still has what follows it.
        let resume = (hello.master_id == self.store_id && hello.position <= self.engine.last_change_lsn())
            .then(|| self.engine.changes_after(hello.position).ok())
            .flatten();
        let session = self.register(&name, addr.clone(), if resume.is_some() { hello.position } else { 0 });
        tracing::info!(replica = %name, %addr, position = hello.position, resume = resume.is_some(), "replica connected");
        let (tx, rx) = mpsc::channel(16);

        // Acknowledgements: advance the replica's position (and `ack: replica` waiters).
        {
            let me = self.clone();
            let name = name.clone();
            tokio::spawn(async move {
                loop {
                    match inbound.message().await {
                        Ok(Some(pb::ReplicaMessage { msg: Some(In::Ack(a)) })) => me.update(&name, session, |r| {
                            if a.position > r.status.acked_position {
                                r.status.acked_position = a.position;
                            }
                            while r.unacked.front().is_some_and(|(l, _)| *l <= a.position) {
                                r.unacked.pop_front();
                            }
                        }),
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
                me.update(&name, session, |r| r.status.connected = false);
                tracing::info!(replica = %name, "replica disconnected");
            });
        }

        // Changes (after an image when needed).
        let me = self.clone();
        tokio::spawn(async move {
            let r = me.clone().send_all(&name, session, resume, &tx).await;
            if let Err(e) = r {
                tracing::info!(replica = %name, "replication stream ended: {}", e.message());
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(rx)
    }

    async fn send_all(
        self: Arc<Self>,
        name: &str,
        session: u64,
        resume: Option<crate::engine::ChangeCursor>,
        tx: &mpsc::Sender<Result<pb::MasterMessage, Status>>,
    ) -> Result<(), Status> {
        let send = |m: Out| async move { tx.send(Ok(pb::MasterMessage { msg: Some(m) })).await.map_err(|_| Status::cancelled("the replica went away")) };
        let mut cursor = match resume {
            Some(c) => c,
            None => {
                self.update(name, session, |r| {
                    r.status.phase = "image";
                    r.status.images += 1;
                });
                let t0 = Instant::now();
                let image = self.engine.capture().await.map_err(|e| Status::unavailable(format!("cannot take an image: {e}")))?;
                // Registered before the image is sent: the changes after it stay readable while it goes.
                let cursor = self
                    .engine
                    .changes_after(image.lsn)
                    .map_err(|e| Status::unavailable(format!("the change feed moved during the image: {e}")))?;
                send(Out::ImageBegin(pb::ImageBegin { master_id: self.store_id.clone(), position: image.lsn, buckets: image.buckets.len() as u32 })).await?;
                let mut rows = 0usize;
                for b in &image.buckets {
                    let schema_json = serde_json::to_string(&b.schema).map_err(|e| Status::internal(e.to_string()))?;
                    let chunks = wire::image_chunks(&b.batches);
                    let mut first = true;
                    if chunks.is_empty() {
                        send(Out::ImageBucket(pb::ImageBucket { key: b.key.to_string(), schema_json: schema_json.clone(), first: true, arrow_ipc: Default::default() })).await?;
                    }
                    for c in chunks {
                        rows += c.num_rows();
                        let ipc = wire::to_ipc(std::slice::from_ref(&c)).map_err(|e| Status::internal(e.to_string()))?;
                        send(Out::ImageBucket(pb::ImageBucket {
                            key: b.key.to_string(),
                            schema_json: if first { schema_json.clone() } else { String::new() },
                            first,
                            arrow_ipc: ipc.into(),
                        }))
                        .await?;
                        first = false;
                    }
                }
                send(Out::ImageEnd(pb::ImageEnd { position: image.lsn })).await?;
                tracing::info!(replica = %name, buckets = image.buckets.len(), rows, position = image.lsn, ms = t0.elapsed().as_millis() as u64, "sent an image");
                self.update(name, session, |r| r.status.phase = "streaming");
                cursor
            }
        };
        loop {
            let next = tokio::time::timeout(HEARTBEAT, cursor.next()).await;
            match next {
                Ok(Ok(rec)) => {
                    self.update(name, session, |r| {
                        if rec.lsn > r.status.acked_position && r.unacked.len() < UNACKED_TRACKED {
                            r.unacked.push_back((rec.lsn, rec.applied_at));
                        }
                    });
                    let m = wire::encode_change(&rec).map_err(|e| Status::internal(e.to_string()))?;
                    send(Out::Change(m)).await?;
                }
                Ok(Err(gap)) => {
                    return Err(Status::resource_exhausted(format!(
                        "replica fell behind what the master keeps (replication.retain_mb): {gap}; reconnect for an image"
                    )))
                }
                Err(_) => {
                    send(Out::Heartbeat(pb::Heartbeat { position: self.engine.last_change_lsn().max(cursor.position()), now_ns: wire::unix_nanos(SystemTime::now()) })).await?;
                }
            }
        }
    }
}

/// The tonic service of the replication port.
pub struct ReplicationService(pub Arc<Master>);

type FollowStream = Pin<Box<dyn Stream<Item = Result<pb::MasterMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::replication_server::Replication for ReplicationService {
    type FollowStream = FollowStream;

    async fn follow(&self, request: Request<Streaming<pb::ReplicaMessage>>) -> Result<Response<Self::FollowStream>, Status> {
        let addr = request.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "unknown".into());
        let rx = self.0.clone().serve(addr, request.into_inner()).await?;
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
