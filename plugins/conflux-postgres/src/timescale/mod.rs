//! Time series on TimescaleDB, with plain-PostgreSQL fallbacks: the
//! `hypertable`, `retention` and `rollups` options, checked at build
//! against the column mapping so that a mistake is reported before any
//! connection. `statements` writes their SQL; `prepare` runs it at connect,
//! after asking the server whether the extension is there. One pipeline
//! file so serves both: TimescaleDB gets a hypertable, a retention policy
//! and continuous aggregates; plain PostgreSQL a table, a periodic
//! `DELETE` and views of the same names and figures.

mod prepare;
mod statements;

use std::collections::{BTreeMap, BTreeSet};

use conflux_api::columns::{ColumnConfig, ColumnType};
use conflux_api::config::Duration;
use conflux_api::BuildError;
use schemars::JsonSchema;
use serde::Deserialize;

pub use prepare::Server;

/// The table as a TimescaleDB hypertable, partitioned by time into chunks.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HypertableConfig {
    /// The column that partitions the table: a non-nullable `timestamp` column of `columns`.
    pub time_column: String,
    /// The span of time each chunk holds (default 7d, TimescaleDB's own);
    /// a whole number of seconds. Applies to chunks created from now on.
    #[serde(default = "default_chunk_interval")]
    pub chunk_interval: Duration,
}

fn default_chunk_interval() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

/// A view of the table's figures per time bucket: a TimescaleDB continuous
/// aggregate, or a plain view on PostgreSQL without the extension.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollupConfig {
    /// The view's name, optionally schema-qualified.
    pub name: String,
    /// The bucket width (`1h`, `1d`): a whole number of seconds. Buckets are
    /// aligned as TimescaleDB's `time_bucket` aligns them (UTC, weeks from a Monday).
    pub bucket: Duration,
    /// Columns of `columns` to group by within each bucket.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Result column name → its aggregate over a column of `columns`.
    pub metrics: BTreeMap<String, RollupMetric>,
}

/// One aggregate of a rollup: a known function over a mapped column, never SQL text.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RollupMetric {
    /// Number of rows: `count: {}`.
    Count(AllRows),
    /// Sum of an `integer` or `double` column.
    Sum(String),
    /// Mean of an `integer` or `double` column.
    Avg(String),
    /// Smallest value of an `integer`, `double`, `timestamp` or `text` column.
    Min(String),
    /// Largest value of an `integer`, `double`, `timestamp` or `text` column.
    Max(String),
}

/// `count: {}`: counts rows, so it takes no column.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllRows {}

/// What the time-series options ask of the table, checked.
#[derive(Debug)]
pub struct TimeSeries {
    table: String,
    time_column: String,
    chunk_interval: u64,
    /// Seconds of rows to keep.
    retention: Option<u64>,
    rollups: Vec<Rollup>,
    /// When plain PostgreSQL's retention `DELETE` last ran.
    last_trim: std::sync::Mutex<Option<std::time::Instant>>,
}

/// A checked rollup.
#[derive(Debug)]
struct Rollup {
    name: String,
    /// Seconds.
    bucket: u64,
    group_by: Vec<String>,
    /// (result column, SQL function, its argument column; `None`: `*`).
    metrics: Vec<(String, &'static str, Option<String>)>,
}

/// The time-series options of a `postgres` output, as written.
pub struct Options<'a> {
    pub table: &'a str,
    pub columns: &'a BTreeMap<String, ColumnConfig>,
    pub key: &'a [String],
    pub hypertable: Option<&'a HypertableConfig>,
    pub retention: Option<Duration>,
    pub rollups: &'a [RollupConfig],
}

/// The name of the bucket column of every rollup.
pub const BUCKET: &str = "bucket";

impl TimeSeries {
    /// Checks the options against the mapping; `None` without `hypertable`
    /// (then `retention` and `rollups` are refused: both need a time column
    /// and TimescaleDB needs a hypertable for them).
    pub fn build(options: Options<'_>) -> Result<Option<TimeSeries>, BuildError> {
        let Some(hypertable) = options.hypertable else {
            if options.retention.is_some() {
                return Err(BuildError::at(
                    ["retention"],
                    "`retention` needs `hypertable` (its `time_column` says how old a row is)",
                ));
            }
            if !options.rollups.is_empty() {
                return Err(BuildError::at(
                    ["rollups"],
                    "`rollups` need `hypertable` (its `time_column` is what they bucket)",
                ));
            }
            return Ok(None);
        };
        let time = &hypertable.time_column;
        let at_time = ["hypertable", "time_column"];
        match options.columns.get(time) {
            None => return Err(BuildError::at(at_time, format!("column `{time}` is not in `columns`"))),
            Some(c) if c.kind != ColumnType::Timestamp => {
                return Err(BuildError::at(
                    at_time,
                    format!(
                        "column `{time}` is of type `{}`; the time column must be a `timestamp` column",
                        kind_name(c.kind)
                    ),
                ))
            }
            Some(c) if c.nullable => {
                return Err(BuildError::at(
                    at_time,
                    format!("column `{time}` is nullable; the time column must not be"),
                ))
            }
            Some(_) => {}
        }
        if !options.key.is_empty() && !options.key.contains(time) {
            return Err(BuildError::at(
                ["key"],
                format!("on a hypertable every unique key includes the time column: add `{time}` to `key`"),
            ));
        }
        let chunk_interval = seconds(hypertable.chunk_interval, &["hypertable", "chunk_interval"])?;
        let retention = match options.retention {
            Some(r) => Some(seconds(r, &["retention"])?),
            None => None,
        };
        let mut names = BTreeSet::from([options.table.to_string()]);
        let rollups = options
            .rollups
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let rollup = Rollup::build(i, r, options.columns)?;
                if !names.insert(r.name.clone()) {
                    return Err(BuildError::at(
                        ["rollups", &i.to_string(), "name"],
                        format!("`{}` is already the name of the table or of another rollup", r.name),
                    ));
                }
                if let Some(keep) = retention {
                    // TimescaleDB refreshes between `retention` ago and one
                    // bucket ago, a window that must hold two buckets.
                    if rollup.bucket.saturating_mul(3) > keep {
                        return Err(BuildError::at(
                            ["rollups", &i.to_string(), "bucket"],
                            "a rollup's bucket can be at most a third of `retention` (its refresh window spans retention less one bucket, at least two buckets)",
                        ));
                    }
                }
                Ok(rollup)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(TimeSeries {
            table: options.table.to_string(),
            time_column: time.clone(),
            chunk_interval,
            retention,
            rollups,
            last_trim: std::sync::Mutex::new(None),
        }))
    }
}

impl Rollup {
    fn build(i: usize, config: &RollupConfig, columns: &BTreeMap<String, ColumnConfig>) -> Result<Rollup, BuildError> {
        let index = i.to_string();
        let at = |option: &str| ["rollups".to_string(), index.clone(), option.to_string()];
        if config.name.trim().is_empty() {
            return Err(BuildError::at(at("name"), "name the rollup's view"));
        }
        let bucket = seconds(config.bucket, &["rollups", &index, "bucket"])?;
        let mut seen = BTreeSet::from([BUCKET.to_string()]);
        for column in &config.group_by {
            if !columns.contains_key(column) {
                return Err(BuildError::at(at("group_by"), format!("column `{column}` is not in `columns`")));
            }
            if !seen.insert(column.clone()) {
                return Err(BuildError::at(
                    at("group_by"),
                    format!("`{column}` is named twice, or is `{BUCKET}` (the rollup's bucket column)"),
                ));
            }
        }
        if config.metrics.is_empty() {
            return Err(BuildError::at(at("metrics"), "name at least one metric"));
        }
        let mut metrics = Vec::with_capacity(config.metrics.len());
        for (name, metric) in &config.metrics {
            let at_metric = ["rollups", &index, "metrics", name.as_str()];
            if !seen.insert(name.clone()) {
                return Err(BuildError::at(
                    at_metric,
                    format!("`{name}` is already a column of the rollup (`{BUCKET}` or in `group_by`)"),
                ));
            }
            let (function, column, fits): (&'static str, Option<&String>, &[ColumnType]) = match metric {
                RollupMetric::Count(AllRows {}) => ("count", None, &[]),
                RollupMetric::Sum(c) => ("sum", Some(c), &[ColumnType::Integer, ColumnType::Double]),
                RollupMetric::Avg(c) => ("avg", Some(c), &[ColumnType::Integer, ColumnType::Double]),
                RollupMetric::Min(c) => ("min", Some(c), ORDERED),
                RollupMetric::Max(c) => ("max", Some(c), ORDERED),
            };
            if let Some(column) = column {
                let at_function = [at_metric.as_slice(), &[function]].concat();
                let Some(mapped) = columns.get(column) else {
                    return Err(BuildError::at(at_function, format!("column `{column}` is not in `columns`")));
                };
                if !fits.contains(&mapped.kind) {
                    let allowed: Vec<&str> = fits.iter().map(|k| kind_name(*k)).collect();
                    return Err(BuildError::at(
                        at_function,
                        format!(
                            "column `{column}` is of type `{}`; `{function}` takes a column of type {}",
                            kind_name(mapped.kind),
                            allowed.join(", ")
                        ),
                    ));
                }
            }
            metrics.push((name.clone(), function, column.cloned()));
        }
        Ok(Rollup { name: config.name.clone(), bucket, group_by: config.group_by.clone(), metrics })
    }
}

/// The column types `min` and `max` order.
const ORDERED: &[ColumnType] = &[ColumnType::Integer, ColumnType::Double, ColumnType::Timestamp, ColumnType::Text];

fn kind_name(kind: ColumnType) -> &'static str {
    match kind {
        ColumnType::Text => "text",
        ColumnType::Integer => "integer",
        ColumnType::Double => "double",
        ColumnType::Boolean => "boolean",
        ColumnType::Timestamp => "timestamp",
        ColumnType::Json => "json",
    }
}

/// A duration option as whole seconds (at least one): the intervals it
/// becomes are written as numbers, never as the option's text.
fn seconds(d: Duration, at: &[&str]) -> Result<u64, BuildError> {
    if d.0.subsec_nanos() != 0 || d.0.as_secs() == 0 {
        return Err(BuildError::at(at.iter().copied(), "must be a whole number of seconds, at least 1s"));
    }
    Ok(d.0.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns() -> BTreeMap<String, ColumnConfig> {
        let column = |kind, nullable| ColumnConfig { from: "x".into(), kind, nullable };
        BTreeMap::from([
            ("at".to_string(), column(ColumnType::Timestamp, false)),
            ("maybe_at".to_string(), column(ColumnType::Timestamp, true)),
            ("guests".to_string(), column(ColumnType::Integer, false)),
            ("restaurant_id".to_string(), column(ColumnType::Text, false)),
            ("vip".to_string(), column(ColumnType::Boolean, false)),
        ])
    }

    fn build(
        time: &str,
        key: &[String],
        retention: Option<u64>,
        rollups: &[RollupConfig],
    ) -> Result<Option<TimeSeries>, BuildError> {
        let columns = columns();
        let hypertable = HypertableConfig { time_column: time.into(), chunk_interval: Duration::from_secs(86400) };
        TimeSeries::build(Options {
            table: "bookings",
            columns: &columns,
            key,
            hypertable: Some(&hypertable),
            retention: retention.map(Duration::from_secs),
            rollups,
        })
    }

    fn rollup(metrics: &[(&str, RollupMetric)], bucket: u64) -> RollupConfig {
        RollupConfig {
            name: "hourly".into(),
            bucket: Duration::from_secs(bucket),
            group_by: vec!["restaurant_id".into()],
            metrics: metrics.iter().map(|(n, m)| (n.to_string(), m.clone())).collect(),
        }
    }

    fn refused(result: Result<Option<TimeSeries>, BuildError>) -> (String, String) {
        let e = result.expect_err("refused");
        (e.path.join("."), e.message)
    }

    #[test]
    fn mistakes_point_at_their_option() {
        assert_eq!(refused(build("guests", &[], None, &[])).0, "hypertable.time_column");
        assert_eq!(refused(build("maybe_at", &[], None, &[])).0, "hypertable.time_column");
        assert_eq!(refused(build("nowhere", &[], None, &[])).0, "hypertable.time_column");
        assert_eq!(refused(build("at", &["restaurant_id".into()], None, &[])).0, "key");
        let sum_of_text = rollup(&[("n", RollupMetric::Sum("restaurant_id".into()))], 3600);
        assert_eq!(refused(build("at", &[], None, &[sum_of_text])).0, "rollups.0.metrics.n.sum");
        let max_of_bool = rollup(&[("n", RollupMetric::Max("vip".into()))], 3600);
        assert_eq!(refused(build("at", &[], None, &[max_of_bool])).0, "rollups.0.metrics.n.max");
        let clash = rollup(&[("restaurant_id", RollupMetric::Count(AllRows {}))], 3600);
        assert_eq!(refused(build("at", &[], None, &[clash])).0, "rollups.0.metrics.restaurant_id");
        let wide = rollup(&[("n", RollupMetric::Count(AllRows {}))], 86400);
        assert_eq!(refused(build("at", &[], Some(2 * 86400), &[wide])).0, "rollups.0.bucket");
        let columns = columns();
        let without = |retention, rollups| {
            TimeSeries::build(Options { table: "t", columns: &columns, key: &[], hypertable: None, retention, rollups })
        };
        assert_eq!(refused(without(Some(Duration::from_secs(60)), &[])).0, "retention");
        assert!(without(None, &[]).expect("plain").is_none());
    }

    #[test]
    fn a_good_rollup_is_kept_in_order() {
        let metrics = [("bookings", RollupMetric::Count(AllRows {})), ("guests", RollupMetric::Sum("guests".into()))];
        let series = build("at", &["at".into()], Some(90 * 86400), &[rollup(&metrics, 3600)]).unwrap().unwrap();
        assert_eq!(series.rollups[0].metrics[0], ("bookings".to_string(), "count", None));
        assert_eq!(series.rollups[0].metrics[1], ("guests".to_string(), "sum", Some("guests".to_string())));
        assert_eq!(series.retention, Some(90 * 86400));
    }
}
