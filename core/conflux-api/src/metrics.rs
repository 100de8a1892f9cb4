//! Counters and gauges a plugin declares for what only it can see (windows
//! closed early, snapshots written, partitions paused). The engine exports
//! each as `conflux_<name>{pipeline, component}` (counters with `_total`)
//! next to its own metrics. Updating one is a single atomic operation.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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

/// A level that goes up and down; cloning shares it.
#[derive(Clone, Default, Debug)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What a declared metric measures.
#[derive(Clone, Debug)]
pub enum Metric {
    Counter(Counter),
    Gauge(Gauge),
}

/// One declared metric.
#[derive(Clone, Debug)]
pub struct Declared {
    /// Metric name without prefix or `_total` (`aggregate_windows_evicted`).
    pub name: &'static str,
    pub help: &'static str,
    pub metric: Metric,
}

/// The metrics one component declared while it was built.
#[derive(Clone, Default, Debug)]
pub struct PluginMetrics(Arc<Mutex<Vec<Declared>>>);

impl PluginMetrics {
    /// Declares a counter (once per name; declaring it again returns the same one).
    pub fn counter(&self, name: &'static str, help: &'static str) -> Counter {
        match self.declare(name, help, || Metric::Counter(Counter::default())) {
            Metric::Counter(c) => c,
            Metric::Gauge(_) => panic!("metric `{name}` was declared as a gauge"),
        }
    }

    /// Declares a gauge (once per name; declaring it again returns the same one).
    pub fn gauge(&self, name: &'static str, help: &'static str) -> Gauge {
        match self.declare(name, help, || Metric::Gauge(Gauge::default())) {
            Metric::Gauge(g) => g,
            Metric::Counter(_) => panic!("metric `{name}` was declared as a counter"),
        }
    }

    fn declare(&self, name: &'static str, help: &'static str, new: impl FnOnce() -> Metric) -> Metric {
        let mut declared = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = declared.iter().find(|d| d.name == name) {
            return existing.metric.clone();
        }
        let metric = new();
        declared.push(Declared { name, help, metric: metric.clone() });
        metric
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
    fn declaring_twice_shares_one_metric() {
        let metrics = PluginMetrics::default();
        let a = metrics.counter("x", "help");
        let b = metrics.counter("x", "help");
        a.inc();
        b.inc_by(2);
        let g = metrics.gauge("level", "help");
        g.set(5);
        metrics.gauge("level", "help").add(-2);
        assert_eq!(metrics.declared().len(), 2);
        assert!(matches!(&metrics.declared()[0].metric, Metric::Counter(c) if c.get() == 3));
        assert!(matches!(&metrics.declared()[1].metric, Metric::Gauge(g) if g.get() == 3));
    }
}
