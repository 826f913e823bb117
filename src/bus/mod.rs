//! The event bus: every subscription to appended data, whoever asks — triggers, `/ws`, Flight
//! `{"subscribe"}` streams, out-of-process trigger exchanges.
//!
//! The bus sits between the engine's trigger bus ([`Engine::subscribe_matching`]) and the interfaces and
//! plugins, and owns what they used to decide each for themselves:
//!
//! - **One entry point** [`Bus::subscribe`] with [`SubscribeOptions`]: which [`Feed`] (every append, or the
//!   gated feed the `stream` trigger decides), and where to start ([`SubscribeOptions::from_lsn`]).
//! - **Gating** ([`gate`]): the `stream` trigger installs itself on the bus; subscribers to the gated feed
//!   get its pushes, or every append when no `stream` trigger runs. Nobody searches the configuration.
//! - **Resume** ([`retained`]): the bus keeps the most recent appends (64 MiB / 100,000 appends) with their
//!   log positions, so a subscriber that reconnects with the LSN of the last batch it handled gets exactly
//!   the appends after it, then live ones, with no gap and no duplicate, as long as they are still held;
//!   otherwise the first delivery names the gap ([`Gap`]).
//! - **Trigger delivery streams** ([`trigger_streams`]) of out-of-process triggers.
//!
//! One thread (`mkts-bus`) takes every append from one engine subscription, keeps it, and fans it out to
//! the append subscribers (each with its own bounded queue: one that falls behind is ended with
//! [`BusError::FellBehind`], never silently thinned) and, without a `stream` trigger, to the gated feed.
//! Triggers keep an engine subscription of their own ([`Bus::subscribe_trigger`]): their queue depth and
//! drops are the plugin metrics, and the engine fills it from the writer in commit order.
//!
//! The bus depends on the engine only; interfaces and the plugin host depend on it, never the reverse.

pub mod gate;
pub mod retained;
pub mod trigger_streams;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use arrow::array::RecordBatch;
use futures::stream::{BoxStream, StreamExt};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::engine::{AppendEvent, BucketKey, Engine, KeyPattern, Subscription};

pub use gate::{StreamGate, StreamMessage};
pub use retained::Retained;
pub use trigger_streams::{TriggerFeed, TriggerStreams};

/// Appends the bus's own engine subscription may have waiting before it loses some (the bus thread takes
/// them at once; this only absorbs scheduling hiccups).
const BUS_QUEUE: usize = 65_536;

/// Which feed a subscription reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Feed {
    /// Every durable append of a matching key, whole, as written (after normalisation), with its LSN.
    #[default]
    Appends,
    /// The gated feed: the `stream` trigger's pushes (newest row per write, shelved, filtered) when one
    /// runs, else every append. What `/ws` clients receive.
    Stream,
}

impl Feed {
    /// `"appends"` (or absent) / `"stream"`, as Flight tickets spell it.
    pub fn parse(s: Option<&str>) -> Result<Feed, BusError> {
        match s.map(str::trim) {
            None | Some("") | Some("appends") => Ok(Feed::Appends),
            Some("stream") => Ok(Feed::Stream),
            Some(other) => Err(BusError::Invalid(format!("unknown feed {other:?} (\"appends\" or \"stream\")"))),
        }
    }
}

/// How to subscribe.
#[derive(Debug, Clone, Copy)]
pub struct SubscribeOptions {
    pub feed: Feed,
    /// Resume after this log position: deliver the held appends with a greater LSN first, then live ones.
    /// Only for [`Feed::Appends`] (the gated feed's shelf has no replayable history).
    pub from_lsn: Option<u64>,
    /// Deliveries that may wait in this subscription's queue before it is ended as too slow.
    pub capacity: usize,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions { feed: Feed::Appends, from_lsn: None, capacity: 4096 }
    }
}

/// Appends a resume could not replay: every append with an LSN in `(after_lsn, through_lsn]` is no
/// longer held by the bus (evicted, or written before this server started), so matching ones among them
/// were not delivered. Read the buckets to catch up on that span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub after_lsn: u64,
    pub through_lsn: u64,
}

/// One delivered batch.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub key: BucketKey,
    /// Log position of the append. Resume with `from_lsn` = the last one handled.
    pub lsn: u64,
    pub batch: RecordBatch,
    /// Set on the first delivery of a resume that could not be exact.
    pub gap: Option<Gap>,
}

/// A subscription's deliveries; an error item ends it.
pub type BusStream = BoxStream<'static, Result<Delivery, BusError>>;

/// Why a subscription cannot start or had to end.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// The request itself is wrong (unknown feed, resume on the gated feed).
    #[error("{0}")]
    Invalid(String),
    /// The subscriber did not take its deliveries fast enough; it is ended rather than thinned. Resume
    /// with the last LSN handled.
    #[error("subscription ended: it fell {0} deliveries behind; resubscribe with from_lsn = the last LSN handled")]
    FellBehind(usize),
    /// The bus itself lost appends (its engine queue overflowed); live subscribers are ended so none
    /// silently misses data.
    #[error("subscription ended: the event bus lost appends after LSN {0}; resubscribe with from_lsn to learn the gap")]
    Lost(u64),
}

/// An append subscriber registered with the bus thread.
struct Subscriber {
    pattern: KeyPattern,
    tx: mpsc::Sender<Result<Delivery, BusError>>,
    /// Set when the subscriber's queue overflowed: it ends with [`BusError::FellBehind`].
    overflowed: Arc<AtomicBool>,
    /// A resume gap with nothing held to attach it to: it rides on the first live delivery.
    gap: Option<Gap>,
}

struct State {
    retained: Retained,
    subscribers: Vec<Subscriber>,
}

struct Shared {
    state: Mutex<State>,
    gate: Arc<StreamGate>,
}

/// The event bus of one engine. Build it right after [`Engine::open`] (before anything can write), so it
/// sees every append of this run; see [`Bus::new`].
pub struct Bus {
    engine: Engine,
    shared: Arc<Shared>,
    triggers: Arc<TriggerStreams>,
}

impl Bus {
    /// Start the bus of `engine`. Must be called before the engine takes writes: the resume floor is the
    /// log position the engine opened at (the first LSN of its active log segment, minus one).
    pub fn new(engine: Engine) -> Arc<Bus> {
        let floor = crate::engine::wal::list_segments(&engine.root().join(".wal"))
            .ok()
            .and_then(|s| s.last().map(|(first, _)| first.saturating_sub(1)))
            .unwrap_or(0);
        Self::with_limits(engine, floor, retained::RETAIN_BYTES, retained::RETAIN_EVENTS)
    }

    /// [`Bus::new`] with an explicit resume floor and retention bounds (tests).
    pub fn with_limits(engine: Engine, floor: u64, retain_bytes: usize, retain_events: usize) -> Arc<Bus> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { retained: Retained::new(floor, retain_bytes, retain_events), subscribers: Vec::new() }),
            gate: Arc::default(),
        });
        let sub = engine.subscribe_matching(None, BUS_QUEUE);
        let weak = Arc::downgrade(&shared);
        if let Err(e) = std::thread::Builder::new().name("mkts-bus".into()).spawn(move || run(weak, sub)) {
            tracing::error!("cannot start the event bus thread: {e}; subscriptions will receive nothing");
        }
        Arc::new(Bus { engine, shared, triggers: Arc::default() })
    }

    /// Subscribe to appends of keys matching `pattern`.
    ///
    /// [`Feed::Appends`]: whole batches with their LSN; with `from_lsn`, the held appends after it first
    /// (registered under the same lock as the live queue, so nothing falls between them or arrives twice).
    /// [`Feed::Stream`]: the gated feed (see [`gate`]).
    pub fn subscribe(&self, pattern: KeyPattern, opts: SubscribeOptions) -> Result<BusStream, BusError> {
        match opts.feed {
            Feed::Stream => {
                if opts.from_lsn.is_some() {
                    return Err(BusError::Invalid("from_lsn resumes the appends feed only; the stream feed has no history".into()));
                }
                Ok(self.gated(pattern))
            }
            Feed::Appends => Ok(self.appends(pattern, opts)),
        }
    }

    fn appends(&self, pattern: KeyPattern, opts: SubscribeOptions) -> BusStream {
        let (tx, rx) = mpsc::channel(opts.capacity.max(1));
        let overflowed = Arc::new(AtomicBool::new(false));
        let backlog: Vec<Delivery> = {
            let mut st = self.shared.state.lock();
            let mut pending = None;
            let backlog = match opts.from_lsn {
                None => Vec::new(),
                Some(l) => {
                    let (evs, gap) = st.retained.after(l, &pattern);
                    let mut out: Vec<Delivery> = evs.iter().map(|e| delivery(e, None)).collect();
                    if let Some(through) = gap {
                        let g = Gap { after_lsn: l, through_lsn: through };
                        tracing::info!(pattern = %pattern, after_lsn = l, through_lsn = through, "subscription resumed with a gap: those appends are no longer held");
                        match out.first_mut() {
                            Some(d) => d.gap = Some(g),
                            None => pending = Some(g),
                        }
                    }
                    out
                }
            };
            st.subscribers.push(Subscriber { pattern, tx, overflowed: overflowed.clone(), gap: pending });
            backlog
        };
        let capacity = opts.capacity;
        let live = futures::stream::unfold((rx, overflowed, false), move |(mut rx, overflowed, done)| async move {
            if done {
                return None;
            }
            match rx.recv().await {
                Some(item) => {
                    let end = item.is_err();
                    Some((item, (rx, overflowed, end)))
                }
                None if overflowed.load(Ordering::Acquire) => Some((Err(BusError::FellBehind(capacity)), (rx, overflowed, true))),
                None => None,
            }
        });
        futures::stream::iter(backlog.into_iter().map(Ok)).chain(live).boxed()
    }

    fn gated(&self, pattern: KeyPattern) -> BusStream {
        let rx = self.shared.gate.subscribe();
        tokio_stream::wrappers::BroadcastStream::new(rx)
            .filter_map(move |m| {
                let out = match m {
                    Ok(m) if pattern.matches(&m.key) => Some(Ok(Delivery { key: m.key.clone(), lsn: m.lsn, batch: m.row.clone(), gap: None })),
                    Ok(_) => None,
                    Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                        tracing::warn!(pattern = %pattern, missed = n, "a stream-feed subscriber fell behind and missed messages");
                        None
                    }
                };
                futures::future::ready(out)
            })
            .boxed()
    }

    /// The gated feed's receiver, unfiltered (the `/ws` hub filters per client).
    pub fn subscribe_gated(&self) -> tokio::sync::broadcast::Receiver<Arc<StreamMessage>> {
        self.shared.gate.subscribe()
    }

    /// A trigger's own subscription: the engine's bounded queue of the appends matching `pattern`, filled
    /// by the writer in commit order; overflow is dropped and counted (the trigger's metrics).
    pub fn subscribe_trigger(&self, pattern: KeyPattern, queue: usize) -> Subscription {
        self.engine.subscribe_matching(Some(pattern), queue)
    }

    /// The gate the `stream` trigger installs itself on and pushes to.
    pub fn gate(&self) -> &Arc<StreamGate> {
        &self.shared.gate
    }

    /// Delivery streams of out-of-process triggers.
    pub fn trigger_streams(&self) -> &Arc<TriggerStreams> {
        &self.triggers
    }

    /// The resume floor now: a `from_lsn` at or above it resumes exactly.
    pub fn floor(&self) -> u64 {
        self.shared.state.lock().retained.floor()
    }
}

fn delivery(e: &AppendEvent, gap: Option<Gap>) -> Delivery {
    Delivery { key: e.key.clone(), lsn: e.lsn, batch: e.batch.clone(), gap }
}

/// The bus thread: take each append, keep it, fan it out.
fn run(shared: Weak<Shared>, mut sub: Subscription) {
    let mut seen_drops = 0;
    let mut last_lsn = 0;
    while let Some(ev) = sub.rx.blocking_recv() {
        let Some(shared) = shared.upgrade() else { return };
        let mut st = shared.state.lock();
        let drops = sub.dropped.load(Ordering::Relaxed);
        if drops > seen_drops {
            tracing::warn!(lost = drops - seen_drops, after_lsn = last_lsn, "the event bus fell behind the engine and lost appends; ending live subscriptions");
            seen_drops = drops;
            st.retained.lost_through(ev.lsn.saturating_sub(1));
            for s in st.subscribers.drain(..) {
                if s.tx.try_send(Err(BusError::Lost(last_lsn))).is_err() {
                    s.overflowed.store(true, Ordering::Release);
                }
            }
        }
        last_lsn = ev.lsn;
        st.retained.push(ev.clone());
        st.subscribers.retain_mut(|s| {
            if s.tx.is_closed() {
                return false;
            }
            if !s.pattern.matches(&ev.key) {
                return true;
            }
            match s.tx.try_send(Ok(delivery(&ev, s.gap.take()))) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.overflowed.store(true, Ordering::Release);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        drop(st);
        if !shared.gate.is_installed() && shared.gate.has_receivers() {
            shared.gate.push(ev.key.clone(), ev.lsn, ev.batch.clone());
        }
    }
}

#[cfg(test)]
mod tests;
