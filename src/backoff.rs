//! The one exponential back-off rule: the feeders' HTTP retries and the plugin supervisor's restarts
//! both wait `start · 2^attempt`, capped at `max`.

use std::time::Duration;

/// An exponential back-off schedule.
///
/// ```
/// use std::time::Duration;
/// use mkts::backoff::Backoff;
/// let b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
/// assert_eq!(b.delay(0), Duration::from_millis(500));
/// assert_eq!(b.delay(3), Duration::from_secs(4));
/// assert_eq!(b.delay(40), Duration::from_secs(30));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub start: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(start: Duration, max: Duration) -> Self {
        Backoff { start, max }
    }

    /// The wait before retry number `attempt` (0 = the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        self.start.saturating_mul(1u32 << attempt.min(31)).min(self.max)
    }
}
