//! Prometheus metrics and readiness, shared by every pipeline of a process.
//!
//! Handles are looked up once per component at start, so the hot path only
//! increments atomics. Labels carry pipeline and component names, never
//! option values (which may hold secrets).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use conflux_api::metrics::{Declared, Metric};
use conflux_api::{Health, HealthState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

fn batch_histogram() -> Histogram {
    // 10 µs .. ~40 s
    Histogram::new(exponential_buckets(0.000_01, 4.0, 12))
}

/// Every metric family of the process.
pub struct Metrics {
    registry: Registry,
    received: Family<Labels, Counter>,
    sent: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    discarded: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    acks: Family<Labels, Counter>,
    unacked: Family<Labels, Gauge>,
    queued: Family<Labels, Gauge>,
    batch_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    plugin: PluginCounters,
    /// The dashboard's live tap of every component.
    pub taps: Arc<crate::tap::Taps>,
    /// Every label set handed out, by pipeline, so that [`Metrics::forget`] finds them.
    issued: Mutex<BTreeMap<String, Vec<Labels>>>,
}

/// Counters plugins declared, read at each scrape.
#[derive(Debug, Default, Clone)]
struct PluginCounters(Arc<Mutex<Vec<(Labels, Declared)>>>);

impl Collector for PluginCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let declared = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<(&'static str, &'static str, MetricType)> =
            declared.iter().map(|(_, d)| (d.name, d.help, metric_type(&d.metric))).collect();
        names.sort_by_key(|(name, _, _)| *name);
        names.dedup_by_key(|(name, _, _)| *name);
        for (name, help, kind) in names {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for (labels, d) in declared.iter().filter(|(_, d)| d.name == name) {
                let encoder = family.encode_family(labels)?;
                match &d.metric {
                    Metric::Counter(c) => ConstCounter::new(c.get()).encode(encoder)?,
                    Metric::Gauge(g) => ConstGauge::new(g.get()).encode(encoder)?,
                }
            }
        }
        Ok(())
    }
}

fn metric_type(metric: &Metric) -> MetricType {
    match metric {
        Metric::Counter(_) => MetricType::Counter,
        Metric::Gauge(_) => MetricType::Gauge,
    }
}

/// One component's handles.
#[derive(Clone)]
pub struct ComponentMetrics {
    pub received: Counter,
    /// Events emitted per port (inputs, stages) or delivered (outputs, port 0).
    pub sent: Vec<Counter>,
    pub errors: Counter,
    /// Events sent to an unwired `error`/named port, per port.
    pub discarded: Vec<Counter>,
    pub retries: Counter,
    /// Acknowledgements heard by an input, by status (delivered, rejected, errored).
    pub acks: [Counter; 3],
    pub unacked: Gauge,
    pub queued: Gauge,
    pub batch_seconds: Histogram,
    /// The dashboard's view of what this component emits.
    pub tap: crate::tap::Tap,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_readiness(Arc::new(Readiness::default()))
    }

    /// Metrics that also export the health of the components `readiness` tracks.
    pub fn with_readiness(readiness: Arc<Readiness>) -> Self {
        let mut registry = Registry::with_prefix("conflux");
        let received = Family::<Labels, Counter>::default();
        let sent = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let discarded = Family::<Labels, Counter>::default();
        let retries = Family::<Labels, Counter>::default();
        let acks = Family::<Labels, Counter>::default();
        let unacked = Family::<Labels, Gauge>::default();
        let queued = Family::<Labels, Gauge>::default();
        let batch_seconds =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(batch_histogram as fn() -> Histogram);
        registry.register("events_received", "Events received by a stage or output", received.clone());
        registry.register(
            "events_sent",
            "Events emitted by an input or stage (per port), or delivered by an output",
            sent.clone(),
        );
        registry.register("errors", "Events failed by a component, and failed output writes", errors.clone());
        registry.register(
            "events_discarded",
            "Events emitted on a port nothing reads (counted, logged, failed back as rejected)",
            discarded.clone(),
        );
        registry.register("output_retries", "Output write retries", retries.clone());
        registry.register("input_acks", "Acknowledgements heard by an input, by status", acks.clone());
        registry.register(
            "input_unacked_events",
            "Events an input emitted that are not yet acknowledged",
            unacked.clone(),
        );
        registry.register("queued_batches", "Batches waiting in a component's input channel", queued.clone());
        registry.register(
            "batch_duration_seconds",
            "Time to process (stage) or write (output) one batch",
            batch_seconds.clone(),
        );
        let plugin = PluginCounters::default();
        registry.register_collector(Box::new(plugin.clone()));
        registry.register_collector(Box::new(ComponentUp(readiness)));
        Metrics {
            registry,
            received,
            sent,
            errors,
            discarded,
            retries,
            acks,
            unacked,
            queued,
            batch_seconds,
            plugin,
            taps: Arc::default(),
            issued: Mutex::default(),
        }
    }

    /// Exports the counters a component declared, labelled with its pipeline and name.
    pub fn adopt(&self, pipeline: &str, component: &str, counters: Vec<Declared>) {
        let labels: Labels = vec![("pipeline".into(), pipeline.into()), ("component".into(), component.into())];
        let mut all = self.plugin.0.lock().unwrap_or_else(|p| p.into_inner());
        all.extend(counters.into_iter().map(|d| (labels.clone(), d)));
    }

    /// Handles for one component with the given port names (`""` = default).
    pub fn component(&self, pipeline: &str, component: &str, kind: &str, ports: &[String]) -> ComponentMetrics {
        let base: Labels = vec![
            ("pipeline".into(), pipeline.into()),
            ("component".into(), component.into()),
            ("kind".into(), kind.into()),
        ];
        let with = |k: &str, v: &str| {
            let mut l = base.clone();
            l.push((k.into(), v.into()));
            l
        };
        let port_names: Vec<&str> =
            if ports.is_empty() { vec![""] } else { ports.iter().map(String::as_str).collect() };
        let port_label = |p: &str| if p.is_empty() { "default".to_string() } else { p.to_string() };
        {
            let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
            let labels = issued.entry(pipeline.to_string()).or_default();
            labels.push(base.clone());
            labels.extend(port_names.iter().map(|p| with("port", &port_label(p))));
            labels.extend(["delivered", "rejected", "errored"].map(|s| with("status", s)));
        }
        ComponentMetrics {
            received: self.received.get_or_create(&base).clone(),
            sent: port_names.iter().map(|p| self.sent.get_or_create(&with("port", &port_label(p))).clone()).collect(),
            errors: self.errors.get_or_create(&base).clone(),
            discarded: port_names
                .iter()
                .map(|p| self.discarded.get_or_create(&with("port", &port_label(p))).clone())
                .collect(),
            retries: self.retries.get_or_create(&base).clone(),
            acks: ["delivered", "rejected", "errored"].map(|s| self.acks.get_or_create(&with("status", s)).clone()),
            unacked: self.unacked.get_or_create(&base).clone(),
            queued: self.queued.get_or_create(&base).clone(),
            batch_seconds: self.batch_seconds.get_or_create(&base).clone(),
            tap: crate::tap::Tap::new(self.taps.clone(), pipeline, component),
        }
    }

    /// Drops every series of a pipeline that ended, so that a process
    /// running on (or a replacement of the same name) shows only what runs.
    pub fn forget(&self, pipeline: &str) {
        self.taps.forget(pipeline);
        let labels = self.issued.lock().unwrap_or_else(|p| p.into_inner()).remove(pipeline).unwrap_or_default();
        for l in &labels {
            self.received.remove(l);
            self.sent.remove(l);
            self.errors.remove(l);
            self.discarded.remove(l);
            self.retries.remove(l);
            self.acks.remove(l);
            self.unacked.remove(l);
            self.queued.remove(l);
            self.batch_seconds.remove(l);
        }
        let mut plugin = self.plugin.0.lock().unwrap_or_else(|p| p.into_inner());
        plugin.retain(|(labels, _)| !labels.iter().any(|(k, v)| k == "pipeline" && v == pipeline));
    }

    /// The Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Each running component's health; `/ready` answers 200 while all are up.
#[derive(Default)]
pub struct Readiness {
    components: Mutex<BTreeMap<String, Health>>,
}

/// Why the process is not ready.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NotReady {
    /// Components that have not connected yet.
    pub starting: Vec<String>,
    /// Components that were up and are not, with their last error.
    pub down: Vec<(String, String)>,
}

impl NotReady {
    pub fn is_empty(&self) -> bool {
        self.starting.is_empty() && self.down.is_empty()
    }
}

impl Readiness {
    /// Tracks a component (`pipeline/component`) through its health handle.
    pub fn register(&self, key: &str, health: Health) {
        self.lock().insert(key.to_string(), health);
    }

    /// Forgets a component whose pipeline has ended.
    pub fn remove(&self, key: &str) {
        self.lock().remove(key);
    }

    /// What keeps the process from being ready; empty when every component is up
    /// (and at least one exists).
    pub fn not_ready(&self) -> NotReady {
        let components = self.lock();
        let mut report = NotReady::default();
        if components.is_empty() {
            report.starting.push("(no pipeline running)".into());
        }
        for (key, health) in components.iter() {
            match health.state() {
                HealthState::Up => {}
                HealthState::Starting => report.starting.push(key.clone()),
                HealthState::Down(error) => report.down.push((key.clone(), error)),
            }
        }
        report
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Health>> {
        self.components.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Exports `conflux_component_up{pipeline, component}`: 1 while up, else 0.
#[derive(Clone)]
struct ComponentUp(Arc<Readiness>);

impl std::fmt::Debug for ComponentUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ComponentUp")
    }
}

impl Collector for ComponentUp {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let components = self.0.lock();
        let mut family = encoder.encode_descriptor(
            "component_up",
            "Whether a component is up (connected, its last write or read succeeded): 1, or 0",
            None,
            MetricType::Gauge,
        )?;
        for (key, health) in components.iter() {
            let (pipeline, component) = key.split_once('/').unwrap_or(("", key));
            let labels: Labels = vec![("pipeline".into(), pipeline.into()), ("component".into(), component.into())];
            ConstGauge::new(i64::from(health.is_up())).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgetting_a_pipeline_drops_its_series_only() {
        let metrics = Metrics::new();
        for pipeline in ["ended", "running"] {
            let handles = metrics.component(pipeline, "out", "output", &["".into(), "error".into()]);
            handles.received.inc();
            handles.acks[0].inc();
            let declared = conflux_api::metrics::PluginMetrics::default();
            declared.counter("kafka_redeliveries", "Seeks back").inc();
            metrics.adopt(pipeline, "out", declared.declared());
        }
        metrics.forget("ended");
        let text = metrics.encode();
        assert!(!text.contains(r#"pipeline="ended""#), "{text}");
        for family in ["conflux_events_received_total", "conflux_input_acks_total", "conflux_kafka_redeliveries_total"]
        {
            assert!(
                text.lines().any(|l| l.starts_with(family) && l.contains(r#"pipeline="running""#)),
                "{family}: {text}"
            );
        }
    }

    #[test]
    fn plugin_counters_are_exported_with_their_component() {
        let metrics = Metrics::new();
        let declared = conflux_api::metrics::PluginMetrics::default();
        let evicted = declared.counter("aggregate_windows_evicted", "Windows closed early");
        evicted.inc_by(3);
        declared.gauge("kafka_paused_partitions", "Partitions paused").set(2);
        metrics.adopt("bookings", "per_minute", declared.declared());
        let text = metrics.encode();
        assert!(
            text.contains(r#"conflux_aggregate_windows_evicted_total{pipeline="bookings",component="per_minute"} 3"#),
            "{text}"
        );
        assert!(text.contains("# HELP conflux_aggregate_windows_evicted Windows closed early"), "{text}");
        assert!(text.contains("# TYPE conflux_kafka_paused_partitions gauge"), "{text}");
        assert!(
            text.contains(r#"conflux_kafka_paused_partitions{pipeline="bookings",component="per_minute"} 2"#),
            "{text}"
        );
    }
}
