//! Analytics stages: `aggregate` (metrics per group over event-time windows),
//! `dedupe` (repeats of a key within a window) and `alert` (threshold and
//! absence rules with hold times and hysteresis).
//!
//! Windows close when the watermark (highest event time seen minus
//! `allowed_lateness`) passes their end, or after `idle_timeout` of silence;
//! later events go to the `late` port. Every accumulator is mergeable, which
//! is what sliding windows are built from.

mod accumulator;
mod alert;
mod checkpoint;
mod config;
mod dedupe;
mod durable;
mod metric;
mod stage;
mod window;

pub use alert::AlertConfig;
pub use config::AggregateConfig;
pub use dedupe::DedupeConfig;

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}

/// What a state limit dropped: a counter for `/metrics`, and when to log
/// (the first time and at every power of two, so a limit that keeps biting
/// does not flood the log).
pub(crate) struct Evictions {
    total: u64,
    counter: conflux_api::metrics::Counter,
}

impl Evictions {
    pub(crate) fn new(counter: conflux_api::metrics::Counter) -> Self {
        Evictions { total: 0, counter }
    }

    /// Counts one eviction; the running total when it is worth a log line.
    pub(crate) fn record(&mut self) -> Option<u64> {
        self.total += 1;
        self.counter.inc();
        self.total.is_power_of_two().then_some(self.total)
    }
}
