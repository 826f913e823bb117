//! Prometheus metrics (`/metrics`).

/// Server metrics registry.
#[derive(Debug, Default)]
pub struct Metrics {}

impl Metrics {
    pub fn new() -> Self {
        Metrics {}
    }
}
