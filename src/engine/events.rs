//! Appended batches, published to subscribers (triggers, `/ws`, Flight subscriptions) after each durable
//! write. Queues are bounded per subscriber: a slow one loses events (counted), never slows the writer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::RecordBatch;
use tokio::sync::mpsc;

use super::bucket::Bucket;
use super::partition::Rows;
use super::{read, BucketKey, Inner, KeyPattern};

/// Rows appended to a bucket by one durable write, published to subscribers (triggers).
#[derive(Debug, Clone)]
pub struct AppendEvent {
    pub key: BucketKey,
    pub lsn: u64,
    /// The rows as stored, in the bucket's read schema.
    pub batch: RecordBatch,
}

/// A subscription to appended batches. Bounded: when the subscriber falls behind, events are dropped and
/// counted instead of slowing writers down.
pub struct Subscription {
    pub rx: mpsc::Receiver<Arc<AppendEvent>>,
    pub dropped: Arc<AtomicU64>,
    pub(super) probe: mpsc::WeakSender<Arc<AppendEvent>>,
}

impl Subscription {
    /// A function reporting how many events wait in this subscription's queue (for lag metrics); usable
    /// from any thread while the subscription lives, 0 after.
    pub fn depth_probe(&self) -> impl Fn() -> usize + Send + Sync + 'static {
        let probe = self.probe.clone();
        move || probe.upgrade().map(|tx| tx.max_capacity() - tx.capacity()).unwrap_or(0)
    }
}

pub(super) struct Subscriber {
    pub(super) tx: mpsc::Sender<Arc<AppendEvent>>,
    pub(super) dropped: Arc<AtomicU64>,
    /// Only keys matching this pattern are queued (all when `None`), so unrelated writes neither fill the
    /// queue nor count as drops.
    pub(super) filter: Option<KeyPattern>,
}

/// `built`: the rows as a batch, when the caller has it already.
pub(super) fn publish_event(inner: &Inner, bucket: &Bucket, rows: &Rows, lsn: u64, built: Option<&RecordBatch>) {
    let mut subs = inner.subscribers.lock();
    subs.retain(|s| !s.tx.is_closed());
    if !subs.iter().any(|s| s.filter.as_ref().is_none_or(|f| f.matches(&bucket.key))) {
        return;
    }
    let batch = match built.map(|b| Ok(b.clone())).unwrap_or_else(|| read::rows_batch(&bucket.schema, rows)) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("cannot build the appended batch for triggers: {e}");
            return;
        }
    };
    let ev = Arc::new(AppendEvent { key: bucket.key.clone(), lsn, batch });
    for s in subs.iter().filter(|s| s.filter.as_ref().is_none_or(|f| f.matches(&bucket.key))) {
        if s.tx.try_send(ev.clone()).is_err() {
            s.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
