//! The appends the bus still holds, for resuming a subscription from a log position.
//!
//! Pure bookkeeping (no threads, no engine): the bus pushes every append it forwards, in commit order, and
//! asks which ones follow a given LSN. What is evicted (the ring is bounded by bytes and by count) moves the
//! *floor*: every append with an LSN above the floor is still held (or has not happened yet), so a resume
//! from an LSN at or above the floor is exact, and one below it has a gap the bus names instead of hiding.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::engine::{AppendEvent, KeyPattern};

/// Appends held for resumes: at most this many bytes of batches …
pub const RETAIN_BYTES: usize = 64 << 20;
/// … and at most this many appends.
pub const RETAIN_EVENTS: usize = 100_000;

/// The bounded history of recent appends.
pub struct Retained {
    events: VecDeque<(Arc<AppendEvent>, usize)>,
    bytes: usize,
    max_bytes: usize,
    max_events: usize,
    /// Every append with an LSN above this is held (or still to come).
    floor: u64,
}

impl Retained {
    /// An empty history that knows every append up to and including `floor` happened before it (the log
    /// position the engine opened at).
    pub fn new(floor: u64, max_bytes: usize, max_events: usize) -> Self {
        Retained { events: VecDeque::new(), bytes: 0, max_bytes, max_events: max_events.max(1), floor }
    }

    /// Hold one append (LSNs arrive increasing), evicting the oldest beyond the bounds.
    pub fn push(&mut self, ev: Arc<AppendEvent>) {
        let size = ev.batch.get_array_memory_size();
        self.bytes += size;
        self.events.push_back((ev, size));
        while self.events.len() > self.max_events || (self.bytes > self.max_bytes && self.events.len() > 1) {
            if let Some((old, s)) = self.events.pop_front() {
                self.bytes -= s;
                self.floor = self.floor.max(old.lsn);
            }
        }
    }

    /// Forget everything up to `lsn`: appends may have been lost on the way in (the bus's own queue
    /// overflowed), so nothing at or below it can be resumed exactly.
    pub fn lost_through(&mut self, lsn: u64) {
        self.events.retain(|(e, _)| e.lsn > lsn);
        self.bytes = self.events.iter().map(|(_, s)| s).sum();
        self.floor = self.floor.max(lsn);
    }

    /// The floor: appends above it are all held.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// The held appends after `lsn` whose key matches `pattern`, oldest first, and the gap before them:
    /// `Some(floor)` when appends in `(lsn, floor]` are no longer held.
    pub fn after(&self, lsn: u64, pattern: &KeyPattern) -> (Vec<Arc<AppendEvent>>, Option<u64>) {
        let gap = (lsn < self.floor).then_some(self.floor);
        let start = self.events.partition_point(|(e, _)| e.lsn <= lsn);
        let evs = self.events.range(start..).filter(|(e, _)| pattern.matches(&e.key)).map(|(e, _)| e.clone()).collect();
        (evs, gap)
    }

    /// Appends held now.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::BucketKey;
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    fn ev(sym: &str, lsn: u64) -> Arc<AppendEvent> {
        let schema = Arc::new(Schema::new(vec![Field::new("Epoch", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![lsn as i64; 100]))]).unwrap();
        Arc::new(AppendEvent { key: BucketKey::parse(&format!("{sym}/1Min/OHLCV")).unwrap(), lsn, batch })
    }

    fn lsns(v: &[Arc<AppendEvent>]) -> Vec<u64> {
        v.iter().map(|e| e.lsn).collect()
    }

    #[test]
    fn resumes_exactly_above_the_floor_and_names_the_gap_below() {
        let all = KeyPattern::parse("*/*/*").unwrap();
        let mut r = Retained::new(10, usize::MAX, 3);
        for l in [11, 13, 14] {
            r.push(ev("A", l));
        }
        assert_eq!(r.after(10, &all).1, None);
        assert_eq!(lsns(&r.after(10, &all).0), [11, 13, 14]);
        assert_eq!(r.after(12, &all).1, None);
        assert_eq!(lsns(&r.after(12, &all).0), [13, 14]);
        r.push(ev("B", 15)); // evicts 11
        assert_eq!(r.floor(), 11);
        let (evs, gap) = r.after(5, &all);
        assert_eq!((lsns(&evs), gap), (vec![13, 14, 15], Some(11)));
        let (evs, gap) = r.after(11, &KeyPattern::parse("B/*/*").unwrap());
        assert_eq!((lsns(&evs), gap), (vec![15], None));
        r.lost_through(14);
        assert_eq!((r.floor(), r.len()), (14, 1));
    }

    #[test]
    fn byte_bound_keeps_at_least_the_newest() {
        let mut r = Retained::new(0, 1, 100);
        r.push(ev("A", 1));
        r.push(ev("A", 2));
        assert_eq!((r.len(), r.floor()), (1, 1));
    }

}
