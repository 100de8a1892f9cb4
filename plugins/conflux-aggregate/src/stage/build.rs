//! Building an `aggregate` stage from its options: every check happens
//! here, before any I/O.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use conflux_api::{inventory, BuildContext, BuildError, BuiltStage, Registration, StageConfig, Value};
use conflux_json::path::FieldSet;

use super::AggregateStage;
use crate::checkpoint::Store;
use crate::config::{field_path, AggregateConfig, WindowConfig};
use crate::durable::Durability;
use crate::metric::{Kind, Metric};
use crate::window::Windower;

/// A duration option in nanoseconds, above zero.
fn nanos(d: conflux_api::config::Duration, option: &[&str]) -> Result<i64, BuildError> {
    let n = d.0.as_nanos() as i64;
    if n <= 0 {
        return Err(BuildError::at(option.iter().copied(), "must be longer than zero"));
    }
    Ok(n)
}

/// Opens (lazily) where snapshots go; the fingerprint ties them to this configuration.
fn durability(config: &AggregateConfig, cx: &BuildContext) -> Result<Option<Durability>, BuildError> {
    let Some(checkpoint) = &config.checkpoint else { return Ok(None) };
    if checkpoint.interval.0.is_zero() {
        return Err(BuildError::at(["checkpoint", "interval"], "must be longer than zero"));
    }
    let store = match &checkpoint.redis {
        Some(url) => {
            let key = checkpoint
                .key
                .clone()
                .unwrap_or_else(|| format!("conflux:checkpoint:{}:{}", cx.pipeline, cx.component));
            Store::redis(url, key)
                .map_err(|e| BuildError::at(["checkpoint", "redis"], format!("bad Redis URL: {e}")))?
        }
        None => {
            if checkpoint.key.is_some() {
                return Err(BuildError::at(["checkpoint", "key"], "key only applies with `redis`"));
            }
            Store::file(cx.data_dir.join(&cx.pipeline).join(format!("{}.checkpoint.json", cx.component)))
        }
    };
    let mut fingerprint = format!("{:?} {:?} {:?}", config.window, config.group_by, config.metrics);
    if config.metrics.values().any(|m| m.gauge.is_some()) {
        // Gauge state changed meaning (per-window increments, not levels): older snapshots do not apply.
        fingerprint.push_str(" gauge-increments");
    }
    Ok(Some(Durability::new(store, checkpoint.interval.0, fingerprint, crate::durable::Counters::declare(cx))))
}

impl StageConfig for AggregateConfig {
    const TYPE: &'static str = "aggregate";
    fn build(self, cx: &BuildContext) -> Result<BuiltStage, BuildError> {
        let durability = durability(&self, cx)?;
        let windower = match &self.window {
            WindowConfig::Tumbling(size) => Windower::Tumbling { size: nanos(*size, &["window", "tumbling"])? },
            WindowConfig::Hopping { size, slide } => {
                let (size, slide) =
                    (nanos(*size, &["window", "hopping", "size"])?, nanos(*slide, &["window", "hopping", "slide"])?);
                if slide > size || size / slide > 1000 {
                    return Err(BuildError::at(
                        ["window", "hopping", "slide"],
                        "slide must be at most size, and size at most 1000 slides (use sliding for finer refresh)",
                    ));
                }
                Windower::Hopping { size, slide }
            }
            WindowConfig::Sliding { size, every } => {
                let (size, every) =
                    (nanos(*size, &["window", "sliding", "size"])?, nanos(*every, &["window", "sliding", "every"])?);
                if every > size {
                    return Err(BuildError::at(["window", "sliding", "every"], "every must be at most size"));
                }
                Windower::Sliding { size, every }
            }
            WindowConfig::Session { gap } => Windower::Session { gap: nanos(*gap, &["window", "session", "gap"])? },
            WindowConfig::Cumulative { period, timezone } => Windower::Cumulative {
                period: *period,
                tz: timezone.parse().map_err(|_| {
                    BuildError::at(
                        ["window", "cumulative", "timezone"],
                        format!("unknown time zone `{timezone}` (use an IANA name such as Europe/Paris)"),
                    )
                })?,
            },
        };
        if self.metrics.is_empty() {
            return Err(BuildError::at(["metrics"], "name at least one metric"));
        }
        let metrics = self
            .metrics
            .iter()
            .map(|(name, spec)| Metric::build(name, spec, &self.limits))
            .collect::<Result<Vec<_>, _>>()?;
        let group_paths = self
            .group_by
            .iter()
            .enumerate()
            .map(|(i, g)| field_path(g, &["group_by", &i.to_string()]))
            .collect::<Result<Vec<_>, _>>()?;
        let time_field = match &self.time.field {
            Some(f) => Some(field_path(f, &["time", "field"])?),
            None => None,
        };
        let has_gauge = metrics.iter().any(|m| matches!(m.kind, Kind::Gauge { .. }));
        let fields = FieldSet::new(
            time_field.iter().chain(&group_paths).chain(metrics.iter().filter_map(|m| m.field.as_ref())).cloned(),
        );
        let stage = AggregateStage {
            fields,
            windower,
            group_paths,
            missing_group: self.missing_group,
            default_group: Value::from(self.default_group.as_str()),
            time_field,
            lateness: self.time.allowed_lateness.0.as_nanos() as i64,
            metrics,
            emit: self.emit,
            idle_timeout: self.idle_timeout.0,
            max_groups: self.max_groups.max(1),
            windows: BTreeMap::new(),
            states: 0,
            sessions: HashMap::new(),
            gauges: HashMap::new(),
            has_gauge,
            max_event_time: None,
            closed_early: None,
            last_event_wall: Instant::now(),
            last_updates: Instant::now(),
            last_slide_emitted: i64::MIN,
            evictions: crate::Evictions::new(cx.counter(
                "aggregate_windows_evicted",
                "Windows an aggregate closed early because max_groups was reached",
            )),
            key: String::new(),
            assigned: Vec::new(),
            contributions: Vec::new(),
            durability,
            component: cx.component.clone(),
            key_prefix: format!("{}/{}/", cx.pipeline, cx.component),
        };
        Ok(BuiltStage::new(stage).with_ports(["late", "invalid"]))
    }
}

inventory::submit!(Registration::stage::<AggregateConfig>());
