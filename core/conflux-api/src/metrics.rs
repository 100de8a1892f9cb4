//! Counters a plugin declares for what only it can see (windows closed early,
//! snapshots written). The engine exports each one as
//! `conflux_<name>_total{pipeline, component}` next to its own metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A monotonically increasing count; cloning shares it.
#[derive(Clone, Default, Debug)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One declared counter.
#[derive(Clone, Debug)]
pub struct Declared {
    /// Metric name without prefix or `_total` (`aggregate_windows_evicted`).
    pub name: &'static str,
    pub help: &'static str,
    pub counter: Counter,
}

/// The counters one component declared while it was built.
#[derive(Clone, Default, Debug)]
pub struct PluginMetrics(Arc<Mutex<Vec<Declared>>>);

impl PluginMetrics {
    /// Declares a counter (once per name; declaring it again returns the same one).
    pub fn counter(&self, name: &'static str, help: &'static str) -> Counter {
        let mut declared = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = declared.iter().find(|d| d.name == name) {
            return existing.counter.clone();
        }
        let counter = Counter::default();
        declared.push(Declared { name, help, counter: counter.clone() });
        counter
    }

    /// Everything declared so far.
    pub fn declared(&self) -> Vec<Declared> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declaring_twice_shares_one_counter() {
        let metrics = PluginMetrics::default();
        let a = metrics.counter("x", "help");
        let b = metrics.counter("x", "help");
        a.inc();
        b.inc_by(2);
        assert_eq!(metrics.declared().len(), 1);
        assert_eq!(metrics.declared()[0].counter.get(), 3);
    }
}
