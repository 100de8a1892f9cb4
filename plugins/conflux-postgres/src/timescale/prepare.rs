//! At connect: asks the server whether TimescaleDB is installed, then makes
//! the table a hypertable with its retention policy and continuous
//! aggregates, or, on plain PostgreSQL, indexes the time column, deletes
//! expired rows and creates the rollups as views. Every statement is
//! idempotent, so a reconnect runs them again harmlessly.

use std::time::Instant;

use sqlx::PgPool;

use super::statements::{
    create_hypertable, interval_param, ADD_REFRESH_POLICY, ADD_RETENTION, REMOVE_RETENTION, SET_CHUNK_INTERVAL,
};
use super::TimeSeries;
use crate::output::describe;

/// What the output found at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    TimescaleDb,
    /// Without the extension: `retention` is a `DELETE` the output runs itself.
    Plain,
}

/// How often plain PostgreSQL's retention `DELETE` runs (after a write).
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// A failed statement, named by what it was for.
fn step(what: &'static str) -> impl Fn(sqlx::Error) -> String {
    move |e| format!("{what}: {}", describe(&e))
}

impl TimeSeries {
    /// `created`: the table was created by this connect (then, on plain
    /// PostgreSQL, its time column is indexed too).
    pub async fn prepare(&self, pool: &PgPool, created: bool) -> Result<Server, String> {
        let version: Option<String> =
            sqlx::query_scalar("SELECT extversion::text FROM pg_extension WHERE extname = 'timescaledb'")
                .fetch_optional(pool)
                .await
                .map_err(step("looking for TimescaleDB"))?;
        match version {
            Some(version) => {
                self.on_timescale(pool, &version).await?;
                Ok(Server::TimescaleDb)
            }
            None => {
                tracing::info!(
                    "TimescaleDB is absent: plain-PostgreSQL fallbacks (a plain table{}{})",
                    if self.retention.is_some() { ", retention by an hourly DELETE" } else { "" },
                    if self.rollups.is_empty() { "" } else { ", rollups as plain views" }
                );
                self.on_plain(pool, created).await?;
                Ok(Server::Plain)
            }
        }
    }

    async fn on_timescale(&self, pool: &PgPool, version: &str) -> Result<(), String> {
        let table = self.quoted_table();
        sqlx::query(create_hypertable(has_by_range(version)))
            .bind(&table)
            .bind(&self.time_column)
            .bind(interval_param(self.chunk_interval))
            .execute(pool)
            .await
            .map_err(step("create_hypertable"))?;
        sqlx::query(SET_CHUNK_INTERVAL)
            .bind(&table)
            .bind(interval_param(self.chunk_interval))
            .execute(pool)
            .await
            .map_err(step("set_chunk_time_interval"))?;
        if let Some(keep) = self.retention {
            sqlx::query(REMOVE_RETENTION).bind(&table).execute(pool).await.map_err(step("remove_retention_policy"))?;
            sqlx::query(ADD_RETENTION)
                .bind(&table)
                .bind(interval_param(keep))
                .execute(pool)
                .await
                .map_err(step("add_retention_policy"))?;
        }
        for rollup in &self.rollups {
            sqlx::query(&self.continuous_aggregate(rollup))
                .execute(pool)
                .await
                .map_err(step("creating a rollup's continuous aggregate"))?;
            // Refreshed from `retention` ago (aggregates outlive the rows
            // they sum up) to one bucket ago, once a bucket.
            sqlx::query(ADD_REFRESH_POLICY)
                .bind(crate::sql::quote(&rollup.name))
                .bind(self.retention.map(interval_param))
                .bind(interval_param(rollup.bucket))
                .bind(interval_param(rollup.bucket))
                .execute(pool)
                .await
                .map_err(step("add_continuous_aggregate_policy"))?;
        }
        Ok(())
    }

    async fn on_plain(&self, pool: &PgPool, created: bool) -> Result<(), String> {
        if created {
            sqlx::query(&self.time_index()).execute(pool).await.map_err(step("indexing the time column"))?;
        }
        if let Some(keep) = self.retention {
            self.trim(pool, keep).await.map_err(step("deleting expired rows"))?;
        }
        for rollup in &self.rollups {
            sqlx::query(&self.plain_view(rollup)).execute(pool).await.map_err(step("creating a rollup's view"))?;
        }
        Ok(())
    }

    /// Plain PostgreSQL's retention, run after a write once `TRIM_EVERY`
    /// has passed since the last. A failure is logged, not the write's: its
    /// rows are committed; the next try comes after another `TRIM_EVERY`.
    pub async fn trim_if_due(&self, pool: &PgPool) {
        let Some(keep) = self.retention else { return };
        {
            let Ok(mut last) = self.last_trim.lock() else { return };
            if last.is_some_and(|at| at.elapsed() < TRIM_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        if let Err(e) = self.trim(pool, keep).await {
            tracing::warn!(error = %describe(&e), "deleting rows older than `retention` failed; trying again in an hour");
        }
    }

    async fn trim(&self, pool: &PgPool, keep: u64) -> Result<(), sqlx::Error> {
        if let Ok(mut last) = self.last_trim.lock() {
            *last = Some(Instant::now());
        }
        let deleted = sqlx::query(&self.delete_expired(keep)).execute(pool).await?.rows_affected();
        if deleted > 0 {
            tracing::info!(deleted, "deleted rows older than `retention`");
        }
        Ok(())
    }
}

/// Whether this TimescaleDB takes `create_hypertable(…, by_range(…))` (2.13 and later).
fn has_by_range(version: &str) -> bool {
    let mut parts = version.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (2, 13)
}

#[cfg(test)]
mod tests {
    use super::has_by_range;

    #[test]
    fn by_range_from_two_thirteen() {
        assert!(has_by_range("2.23.0-dev"));
        assert!(has_by_range("2.13.0"));
        assert!(has_by_range("3.0.0"));
        assert!(!has_by_range("2.12.2"));
        assert!(!has_by_range("1.7.5"));
    }
}
