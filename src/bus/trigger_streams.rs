//! Delivery streams of out-of-process triggers: the trigger's host thread feeds appends in, the Flight
//! exchange opened with the trigger's secret ticket takes them out and the process acknowledges them.
//!
//! Every append handed in counts as *outstanding* until the process acknowledges it, so shutdown can wait
//! for what a process still holds (received but not yet handled) before the process is stopped: handing a
//! batch to a socket is not delivering it. Batches a broken exchange left unacknowledged are sent again,
//! first, on the next one (at least once across crashes).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::{mpsc, Notify};

use crate::engine::AppendEvent;

/// Batches a trigger process may hold unacknowledged: enough to hide the acknowledgement round trip, few
/// enough that a crash redelivers little.
pub const ACK_WINDOW: usize = 32;

/// One delivered batch of an exchange: the key, the append's log position, the rows.
pub type TriggerItem = (String, u64, arrow::array::RecordBatch);

/// The delivery side of one out-of-process trigger.
struct Bridge {
    tx: mpsc::Sender<Arc<AppendEvent>>,
    rx: Arc<tokio::sync::Mutex<BridgeRx>>,
    /// Handed in and not acknowledged yet (queued, in flight, or held by the process).
    outstanding: AtomicUsize,
    /// Notified whenever `outstanding` drops.
    acked: Notify,
}

impl Bridge {
    fn new(capacity: usize) -> Arc<Bridge> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        Arc::new(Bridge {
            tx,
            rx: Arc::new(tokio::sync::Mutex::new(BridgeRx { rx, unacked: VecDeque::new(), front: VecDeque::new() })),
            outstanding: AtomicUsize::new(0),
            acked: Notify::new(),
        })
    }
}

struct BridgeRx {
    rx: mpsc::Receiver<Arc<AppendEvent>>,
    /// Sent on the current (or last) exchange and not acknowledged yet, oldest first.
    unacked: VecDeque<Arc<AppendEvent>>,
    /// To send before anything new: the unacknowledged batches of a broken exchange, or an append whose
    /// schema ended the last one.
    front: VecDeque<Arc<AppendEvent>>,
}

/// The trigger streams of the running out-of-process triggers, by ticket secret. The Flight service opens
/// them for DoExchange on `{"trigger": secret}`.
#[derive(Default)]
pub struct TriggerStreams {
    bridges: parking_lot::Mutex<HashMap<String, Arc<Bridge>>>,
}

/// The host's handle on one trigger stream: hand appends in, see what the process has not acknowledged.
pub struct TriggerFeed {
    bridge: Arc<Bridge>,
}

/// The trigger stream is gone (its trigger was closed).
#[derive(Debug, thiserror::Error)]
#[error("trigger stream closed")]
pub struct StreamClosed;

impl TriggerFeed {
    /// Hand one append to the stream, waiting while the stream is full (the process is busy or
    /// restarting). It stays outstanding until the process acknowledges it.
    pub async fn send(&self, ev: Arc<AppendEvent>) -> Result<(), StreamClosed> {
        self.bridge.outstanding.fetch_add(1, Ordering::AcqRel);
        let r = self.bridge.tx.send(ev).await;
        if r.is_err() {
            self.bridge.outstanding.fetch_sub(1, Ordering::AcqRel);
        }
        r.map_err(|_| StreamClosed)
    }

    /// Appends handed in and not acknowledged by the process yet.
    pub fn outstanding(&self) -> usize {
        self.bridge.outstanding.load(Ordering::Acquire)
    }

    /// Wait until the process has acknowledged everything handed in (returns at once when it has).
    pub async fn settled(&self) {
        loop {
            let notified = self.bridge.acked.notified();
            if self.outstanding() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One open exchange: the bridge (locked for the exchange's life), the acknowledgements, the schema.
struct Exchange {
    bridge: Arc<Bridge>,
    rx: tokio::sync::OwnedMutexGuard<BridgeRx>,
    acks: BoxStream<'static, u64>,
    schema: Option<SchemaRef>,
}

impl Exchange {
    fn ack(&mut self, n: u64) {
        let mut done = 0;
        for _ in 0..n {
            if self.rx.unacked.pop_front().is_none() {
                break;
            }
            done += 1;
        }
        if done > 0 {
            self.bridge.outstanding.fetch_sub(done, Ordering::AcqRel);
            self.bridge.acked.notify_waiters();
        }
    }

    /// The next batch to send, or `None` to end the exchange (client gone, trigger closed, or a schema
    /// change once everything sent is acknowledged).
    async fn next(&mut self) -> Option<TriggerItem> {
        loop {
            if self.rx.unacked.len() >= ACK_WINDOW {
                let n = self.acks.next().await?;
                self.ack(n);
                continue;
            }
            let ev = match self.rx.front.pop_front() {
                Some(ev) => ev,
                None => {
                    let BridgeRx { rx, .. } = &mut *self.rx;
                    tokio::select! {
                        ev = rx.recv() => ev?,
                        n = self.acks.next() => {
                            self.ack(n?);
                            continue;
                        }
                    }
                }
            };
            let ev_schema = ev.batch.schema();
            if let Some(s) = &self.schema
                && s.fields() != ev_schema.fields()
            {
                // One schema per exchange: end it once the client has acknowledged what it holds.
                self.rx.front.push_front(ev);
                while !self.rx.unacked.is_empty() {
                    let n = self.acks.next().await?;
                    self.ack(n);
                }
                return None;
            }
            self.schema = Some(ev_schema);
            self.rx.unacked.push_back(ev.clone());
            return Some((ev.key.to_string(), ev.lsn, ev.batch.clone()));
        }
    }
}

impl TriggerStreams {
    /// Register a trigger stream under `secret`, buffering up to `capacity` appends before `send` waits.
    pub fn open(&self, secret: String, capacity: usize) -> TriggerFeed {
        let bridge = Bridge::new(capacity);
        self.bridges.lock().insert(secret, bridge.clone());
        TriggerFeed { bridge }
    }

    /// Unregister a trigger stream (its trigger is closing): new exchanges are refused.
    pub fn close(&self, secret: &str) {
        self.bridges.lock().remove(secret);
    }

    /// The exchange of the trigger holding `secret`: its appends, all of one schema, as
    /// `(key, lsn, batch)`, at most [`ACK_WINDOW`] unacknowledged. Batches a previous exchange left
    /// unacknowledged come first. Waits up to 10 s for a previous exchange of the same trigger to close (a
    /// restarted process reconnecting before the server noticed the old connection is gone).
    pub async fn exchange(&self, secret: &str, acks: BoxStream<'static, u64>) -> Result<BoxStream<'static, TriggerItem>, String> {
        let bridge = self.bridges.lock().get(secret).cloned().ok_or_else(|| "unknown trigger ticket".to_string())?;
        let mut rx = tokio::time::timeout(Duration::from_secs(10), bridge.rx.clone().lock_owned())
            .await
            .map_err(|_| "this trigger's stream is already open elsewhere".to_string())?;
        // Whatever the last exchange did not get acknowledged is delivered again, first.
        let redeliver = std::mem::take(&mut rx.unacked);
        for ev in redeliver.into_iter().rev() {
            rx.front.push_front(ev);
        }
        let ex = Exchange { bridge, rx, acks, schema: None };
        let s = futures::stream::unfold(ex, |mut ex| async move { ex.next().await.map(|item| (item, ex)) });
        Ok(Box::pin(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    fn event(sym: &str, col: &str, v: i64) -> Arc<AppendEvent> {
        let schema = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false), Field::new(col, DataType::Float64, false)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![v])), Arc::new(Float64Array::from(vec![v as f64]))]).unwrap();
        Arc::new(AppendEvent { key: crate::engine::BucketKey::parse(&format!("{sym}/1Min/OHLCV")).unwrap(), lsn: v as u64, batch })
    }

    fn epoch(b: &RecordBatch) -> i64 {
        b.column(0).as_any().downcast_ref::<Int64Array>().unwrap().value(0)
    }

    #[tokio::test]
    async fn exchange_redelivers_unacknowledged_and_splits_on_schema() {
        let streams = TriggerStreams::default();
        let feed = streams.open("s".into(), 16);
        for (sym, col, v) in [("A", "Open", 1), ("A", "Open", 2), ("A", "Open", 3), ("B", "Close", 4)] {
            feed.send(event(sym, col, v)).await.unwrap();
        }
        assert_eq!(feed.outstanding(), 4);
        assert!(streams.exchange("nope", futures::stream::empty().boxed()).await.is_err());

        // First exchange: receives 1, 2, 3, acknowledges only 1, then breaks.
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let mut s = streams.exchange("s", tokio_stream::wrappers::UnboundedReceiverStream::new(ack_rx).boxed()).await.unwrap();
        let got: Vec<i64> = vec![epoch(&s.next().await.unwrap().2), epoch(&s.next().await.unwrap().2), epoch(&s.next().await.unwrap().2)];
        assert_eq!(got, [1, 2, 3]);
        ack_tx.send(1).unwrap();
        drop(ack_tx); // the process died
        assert!(s.next().await.is_none());
        drop(s);
        assert_eq!(feed.outstanding(), 3);

        // Second exchange: 2 and 3 again, then it ends before B's other schema once both are acknowledged.
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let mut s = streams.exchange("s", tokio_stream::wrappers::UnboundedReceiverStream::new(ack_rx).boxed()).await.unwrap();
        assert_eq!(epoch(&s.next().await.unwrap().2), 2);
        assert_eq!(epoch(&s.next().await.unwrap().2), 3);
        ack_tx.send(2).unwrap();
        assert!(s.next().await.is_none());
        drop(s);
        assert_eq!(feed.outstanding(), 1);

        // Third: B, carrying its log position; settled once acknowledged.
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let mut s = streams.exchange("s", tokio_stream::wrappers::UnboundedReceiverStream::new(ack_rx).boxed()).await.unwrap();
        let (key, lsn, b) = s.next().await.unwrap();
        assert_eq!((key.as_str(), lsn, epoch(&b)), ("B/1Min/OHLCV", 4, 4));
        assert_eq!(b.schema().field(1).name(), "Close");
        let waiter = tokio::spawn(async move {
            feed.settled().await;
            feed.outstanding()
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        ack_tx.send(1).unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(100), s.next()).await; // processes the ack
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap(), 0);
    }
}
