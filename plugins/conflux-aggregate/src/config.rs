//! Options of the `aggregate` stage.

use std::collections::BTreeMap;

use conflux_api::config::Duration;
use conflux_api::BuildError;
use conflux_json::path::FieldPath;
use conflux_rhai::{Condition, Limits};
use schemars::JsonSchema;
use serde::Deserialize;

/// Computes metrics per group over windows of event time (or processing time).
///
/// Output events carry the group fields at their paths, `window.start` and
/// `window.end` (RFC 3339), one field per metric, and `final` (true once the
/// window has closed). Results are absolute values per (group, window), so
/// writing them with SET/HSET or an upsert is idempotent. Events later than
/// the watermark go to the `late` port; events missing a group field go to
/// `invalid` when `missing_group: invalid`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Field paths whose values form the group (e.g. `data.restaurantId`); empty = one group.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Where an event missing a group field goes (default `default`): into the `default_group`, or to
    /// port `invalid`.
    #[serde(default)]
    pub missing_group: MissingGroup,
    /// Group value used for missing fields with `missing_group: default`.
    #[serde(default = "unknown")]
    pub default_group: String,
    /// Where time comes from.
    #[serde(default)]
    pub time: TimeConfig,
    /// The window shape.
    pub window: WindowConfig,
    /// Metrics by output name.
    pub metrics: BTreeMap<String, MetricSpec>,
    /// When results are emitted (default `final`).
    #[serde(default)]
    pub emit: Emit,
    /// Close windows after this long without events, so a quiet stream still emits (default 1m).
    #[serde(default = "one_minute")]
    pub idle_timeout: Duration,
    /// Most (window, group) states kept; beyond it the oldest window is closed early and logged.
    #[serde(default = "default_max_groups")]
    pub max_groups: usize,
    /// Sandbox limits for `where` conditions.
    #[serde(default)]
    pub limits: Limits,
    /// Persist window state with the input positions it reflects, so a restart resumes
    /// without losing or double-counting events (off when absent).
    #[serde(default)]
    pub checkpoint: Option<CheckpointConfig>,
}

/// Durable window state: snapshots every `interval`, restored on start.
///
/// Source acknowledgements wait for the snapshot that contains their effect,
/// so a crash loses nothing; events a restored snapshot already counted
/// (by their source position) are skipped when the source replays them.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// How often a snapshot is written (and sources acknowledged); keep it below the
    /// source's redelivery timeout (JetStream `ack_wait`).
    #[serde(default = "five_seconds")]
    pub interval: Duration,
    /// Redis URL to keep snapshots in (shared across hosts); by default they go to
    /// `<data_dir>/<pipeline>/<component>.checkpoint.json`.
    #[serde(default)]
    pub redis: Option<String>,
    /// Redis key of the snapshot (default `conflux:checkpoint:<pipeline>:<component>`).
    #[serde(default)]
    pub key: Option<String>,
}

fn five_seconds() -> Duration {
    Duration::from_secs(5)
}

fn unknown() -> String {
    "unknown".into()
}

fn one_minute() -> Duration {
    Duration::from_secs(60)
}

fn default_max_groups() -> usize {
    1_000_000
}

/// What happens to events missing a group field.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MissingGroup {
    /// Use `default_group` as the value.
    #[default]
    Default,
    /// Send the event to port `invalid`.
    Invalid,
}

/// Event time from a field, with a watermark; without `field`, processing time.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeConfig {
    /// Field holding the event time: RFC 3339 text or epoch seconds/milliseconds.
    #[serde(default)]
    pub field: Option<String>,
    /// How far behind the highest event time seen an event may arrive and still count.
    #[serde(default)]
    pub allowed_lateness: Duration,
}

/// Window shapes.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WindowConfig {
    /// Fixed, back-to-back windows: `tumbling: 1m`.
    Tumbling(Duration),
    /// Fixed windows that overlap: `hopping: { size: 1h, slide: 5m }`.
    Hopping {
        /// Length of each window.
        size: Duration,
        /// Time between the starts of two consecutive windows (below `size`: they overlap).
        slide: Duration,
    },
    /// A rolling "last `size`", refreshed every `every`: `sliding: { size: 1h, every: 1s }`.
    Sliding {
        /// How far back the window reaches from now (event time).
        size: Duration,
        /// How often the window moves forward and its results are refreshed.
        every: Duration,
    },
    /// Activity sessions per group, closed after `gap` without events.
    Session {
        /// Time without events of the group that closes its session.
        gap: Duration,
    },
    /// Calendar periods so far in a time zone ("today"): `cumulative: { period: day, timezone: Europe/Paris }`.
    Cumulative {
        /// Calendar period results accumulate over, from its start: `hour` or `day`.
        period: Period,
        /// IANA time zone the periods follow, such as `Europe/Paris`.
        #[serde(default = "utc")]
        timezone: String,
    },
}

fn utc() -> String {
    "UTC".into()
}

/// Calendar period of a cumulative window.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Hour,
    Day,
}

/// When results leave the stage.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Emit {
    /// Once per window and group, when the window closes.
    #[default]
    Final,
    /// Also while open, at most once per interval per changed group: `{ updates: 1s }`.
    Updates(Duration),
    /// Also after every batch, once per group the batch changed.
    EveryBatch,
}

/// An empty option object (`count: {}`).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// One metric: exactly one kind, optionally with a `where` condition (Rhai).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    /// Number of events.
    #[serde(default)]
    pub count: Option<Empty>,
    /// Sum of a numeric field.
    #[serde(default)]
    pub sum: Option<String>,
    /// Mean of a numeric field.
    #[serde(default)]
    pub avg: Option<String>,
    /// Smallest value of a numeric field.
    #[serde(default)]
    pub min: Option<String>,
    /// Largest value of a numeric field.
    #[serde(default)]
    pub max: Option<String>,
    /// Value of a field in the earliest event (by event time).
    #[serde(default)]
    pub first: Option<String>,
    /// Value of a field in the latest event (by event time).
    #[serde(default)]
    pub last: Option<String>,
    /// Events per second over the window.
    #[serde(default)]
    pub rate: Option<Empty>,
    /// Distinct values of a field: exact up to 1024, HyperLogLog beyond (≈0.8% standard error).
    #[serde(default)]
    pub count_distinct: Option<String>,
    /// Quantiles of a numeric field from a DDSketch (relative error 1%).
    #[serde(default)]
    pub percentiles: Option<PercentilesSpec>,
    /// Most frequent values of a field (space-saving), with counts.
    #[serde(default)]
    pub top_k: Option<TopKSpec>,
    /// A level moved up and down by conditions (occupancy), carried from window to window:
    /// each result reports the group's level at its window's end (never a sum over
    /// overlapping windows or sliding buckets).
    #[serde(default)]
    pub gauge: Option<GaugeSpec>,
    /// Only events for which this Rhai condition is true count.
    #[serde(default, rename = "where")]
    pub condition: Option<String>,
}

/// `percentiles: { field: data.latencyMs, quantiles: [0.5, 0.95, 0.99] }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PercentilesSpec {
    /// Field with the numeric value.
    pub field: String,
    /// Quantiles between 0 and 1; output keys are `p50`, `p95`, `p99.9`…
    #[serde(default = "default_quantiles")]
    pub quantiles: Vec<f64>,
}

fn default_quantiles() -> Vec<f64> {
    vec![0.5, 0.95, 0.99]
}

/// `top_k: { field: data.zone, k: 5 }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TopKSpec {
    /// Field whose values are counted.
    pub field: String,
    /// How many of the most frequent values are reported.
    pub k: usize,
}

/// `gauge: { value: data.guests, up: 'event.type == "booking_confirmed"', down: '…' }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GaugeSpec {
    /// Field with the amount to move by; unset moves by 1.
    #[serde(default)]
    pub value: Option<String>,
    /// Rhai condition: the event raises the level.
    pub up: String,
    /// Rhai condition: the event lowers the level.
    pub down: String,
}

/// A field path option, or an error pointing at `option`.
pub(crate) fn field_path(text: &str, option: &[&str]) -> Result<FieldPath, BuildError> {
    FieldPath::parse(text).map_err(|e| BuildError::at(option.iter().copied(), e))
}

/// A Rhai condition option, compiled, or an error pointing at `option`
/// (and inside it, at the script's line and column).
pub(crate) fn condition(source: &str, limits: &Limits, option: &[&str]) -> Result<Condition, BuildError> {
    Condition::compile(source, limits).map_err(|e| e.at(option.iter().copied()))
}
