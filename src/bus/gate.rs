//! The gated feed: what `/ws` clients (and Flight subscribers asking for `"feed": "stream"`) receive.
//!
//! When a `stream` trigger runs it [installs](StreamGate::install) itself and becomes the only publisher:
//! subscribers then get the rows it decides to push (newest row per write, shelved, filtered). Without one
//! the bus publishes every append here itself. Either way subscribers hold one receiver and never need to
//! know which is the case, so no interface searches the configuration for a module name.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::RecordBatch;
use tokio::sync::broadcast;

use crate::engine::BucketKey;

/// One message of the gated feed: a bucket, the log position of the append it came from, and rows of
/// the bucket's read schema (one row when the `stream` trigger pushed it; the whole append otherwise).
#[derive(Debug, Clone)]
pub struct StreamMessage {
    pub key: BucketKey,
    pub lsn: u64,
    pub row: RecordBatch,
}

/// The server-wide broadcast of the gated feed. Slow receivers lose the oldest messages (reported as
/// `Lagged`) instead of slowing writers.
pub struct StreamGate {
    tx: broadcast::Sender<Arc<StreamMessage>>,
    pushed: AtomicU64,
    installed: AtomicBool,
}

/// Messages each gated-feed receiver may have waiting (the `/ws` hub takes them at once; a burst larger
/// than this makes it lag and say so).
pub const GATE_QUEUE: usize = 8192;

impl Default for StreamGate {
    fn default() -> Self {
        Self::new(GATE_QUEUE)
    }
}

impl StreamGate {
    /// A gate whose receivers buffer up to `capacity` messages each.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        StreamGate { tx, pushed: AtomicU64::new(0), installed: AtomicBool::new(false) }
    }

    /// Called by the `stream` trigger when it starts: from now on only its pushes reach the gated feed.
    pub fn install(&self) {
        self.installed.store(true, Ordering::Release);
    }

    /// True while a `stream` trigger decides what the gated feed carries.
    pub fn is_installed(&self) -> bool {
        self.installed.load(Ordering::Acquire)
    }

    /// Publish one message to every current receiver.
    pub fn push(&self, key: BucketKey, lsn: u64, row: RecordBatch) {
        self.pushed.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Arc::new(StreamMessage { key, lsn, row }));
    }

    /// Whether anyone listens (the bus skips publishing raw appends to nobody).
    pub(crate) fn has_receivers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Receive every message published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StreamMessage>> {
        self.tx.subscribe()
    }

    /// Messages pushed since start.
    pub fn pushed(&self) -> u64 {
        self.pushed.load(Ordering::Relaxed)
    }
}
