//! The SQL of the time-series options. Names are quoted with `sql::quote`,
//! intervals are whole seconds written as numbers, and aggregates come from
//! a fixed list: nothing of an option's text reaches SQL unquoted.
//! TimescaleDB's functions take their arguments as bind parameters.

use super::{Rollup, TimeSeries, BUCKET};
use crate::sql::quote;

/// `INTERVAL 'N seconds'`.
pub(super) fn interval(seconds: u64) -> String {
    format!("INTERVAL '{seconds} seconds'")
}

/// `'N seconds'`, bound as a parameter cast to `interval`.
pub(super) fn interval_param(seconds: u64) -> String {
    format!("{seconds} seconds")
}

/// Binds: table, time column, chunk interval. `by_range` came with TimescaleDB 2.13.
pub(super) fn create_hypertable(by_range: bool) -> &'static str {
    if by_range {
        "SELECT create_hypertable($1::text::regclass, by_range($2::name, $3::interval), if_not_exists => true)"
    } else {
        "SELECT create_hypertable($1::text::regclass, $2::name, chunk_time_interval => $3::interval, if_not_exists => true)"
    }
}

/// Binds: table, chunk interval (for chunks created from now on).
pub(super) const SET_CHUNK_INTERVAL: &str = "SELECT set_chunk_time_interval($1::text::regclass, $2::interval)";

/// Binds: table. A policy of another `retention` is replaced, not kept.
pub(super) const REMOVE_RETENTION: &str = "SELECT remove_retention_policy($1::text::regclass, if_exists => true)";

/// Binds: table, retention.
pub(super) const ADD_RETENTION: &str =
    "SELECT add_retention_policy($1::text::regclass, drop_after => $2::interval, if_not_exists => true)";

/// Binds: view, start offset (NULL: from the start), end offset, schedule.
pub(super) const ADD_REFRESH_POLICY: &str = "SELECT add_continuous_aggregate_policy($1::text::regclass, \
     start_offset => $2::interval, end_offset => $3::interval, schedule_interval => $4::interval, if_not_exists => true)";

impl TimeSeries {
    pub(super) fn quoted_table(&self) -> String {
        quote(&self.table)
    }

    pub(super) fn quoted_time(&self) -> String {
        quote(&self.time_column)
    }

    /// Plain PostgreSQL's retention: rows older than `retention` (seconds).
    pub(super) fn delete_expired(&self, retention: u64) -> String {
        format!("DELETE FROM {} WHERE {} < now() - {}", self.quoted_table(), self.quoted_time(), interval(retention))
    }

    /// Plain PostgreSQL: an index on the time column, which TimescaleDB makes itself.
    pub(super) fn time_index(&self) -> String {
        // An index lives in its table's schema: its name is unqualified.
        let name = format!("{}_{}_idx", self.table, self.time_column).replace('.', "_");
        format!("CREATE INDEX IF NOT EXISTS {} ON {} ({})", quote(&name), self.quoted_table(), self.quoted_time())
    }

    /// A continuous aggregate (TimescaleDB), with real-time aggregation so
    /// that the view includes rows its refresh policy has not reached yet.
    pub(super) fn continuous_aggregate(&self, rollup: &Rollup) -> String {
        let bucket = format!("time_bucket({}, {})", interval(rollup.bucket), self.quoted_time());
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {} WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS {} WITH NO DATA",
            quote(&rollup.name),
            self.rollup_select(rollup, &bucket)
        )
    }

    /// The same figures as a plain view. `date_bin` from TimescaleDB's
    /// `time_bucket` origin (Monday 2000-01-03) gives the same buckets.
    pub(super) fn plain_view(&self, rollup: &Rollup) -> String {
        let bucket = format!("date_bin({}, {}, '2000-01-03 00:00:00+00')", interval(rollup.bucket), self.quoted_time());
        format!("CREATE OR REPLACE VIEW {} AS {}", quote(&rollup.name), self.rollup_select(rollup, &bucket))
    }

    fn rollup_select(&self, rollup: &Rollup, bucket: &str) -> String {
        let mut outputs = vec![format!("{bucket} AS {}", quote(BUCKET))];
        outputs.extend(rollup.group_by.iter().map(|c| quote(c)));
        outputs.extend(rollup.metrics.iter().map(|(name, function, column)| {
            let argument = column.as_deref().map(quote).unwrap_or_else(|| "*".to_string());
            format!("{function}({argument}) AS {}", quote(name))
        }));
        let positions: Vec<String> = (1..=1 + rollup.group_by.len()).map(|i| i.to_string()).collect();
        format!("SELECT {} FROM {} GROUP BY {}", outputs.join(", "), self.quoted_table(), positions.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{AllRows, HypertableConfig, Options, RollupConfig, RollupMetric};
    use super::*;
    use conflux_api::columns::{ColumnConfig, ColumnType};
    use conflux_api::config::Duration;
    use std::collections::BTreeMap;

    #[test]
    fn rollups_are_the_same_select_with_either_bucket() {
        let column = |kind| ColumnConfig { from: "x".into(), kind, nullable: false };
        let columns = BTreeMap::from([
            ("at".to_string(), column(ColumnType::Timestamp)),
            ("guests".to_string(), column(ColumnType::Integer)),
            ("restaurant_id".to_string(), column(ColumnType::Text)),
        ]);
        let hypertable = HypertableConfig { time_column: "at".into(), chunk_interval: Duration::from_secs(86400) };
        let rollups = [RollupConfig {
            name: "stats.hourly".into(),
            bucket: Duration::from_secs(3600),
            group_by: vec!["restaurant_id".into()],
            metrics: BTreeMap::from([
                ("bookings".to_string(), RollupMetric::Count(AllRows {})),
                ("guests".to_string(), RollupMetric::Sum("guests".into())),
            ]),
        }];
        let series = TimeSeries::build(Options {
            table: "bookings",
            columns: &columns,
            key: &[],
            hypertable: Some(&hypertable),
            retention: None,
            rollups: &rollups,
        })
        .unwrap()
        .unwrap();
        let select = "\"restaurant_id\", count(*) AS \"bookings\", sum(\"guests\") AS \"guests\" FROM \"bookings\" GROUP BY 1, 2";
        assert_eq!(
            series.continuous_aggregate(&series.rollups[0]),
            format!("CREATE MATERIALIZED VIEW IF NOT EXISTS \"stats\".\"hourly\" WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS SELECT time_bucket(INTERVAL '3600 seconds', \"at\") AS \"bucket\", {select} WITH NO DATA")
        );
        assert_eq!(
            series.plain_view(&series.rollups[0]),
            format!("CREATE OR REPLACE VIEW \"stats\".\"hourly\" AS SELECT date_bin(INTERVAL '3600 seconds', \"at\", '2000-01-03 00:00:00+00') AS \"bucket\", {select}")
        );
        assert_eq!(series.delete_expired(60), "DELETE FROM \"bookings\" WHERE \"at\" < now() - INTERVAL '60 seconds'");
    }
}
