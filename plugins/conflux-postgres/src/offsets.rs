//! `exactly_once`: the last committed source position per (target table,
//! source stream), kept in an offsets table and written in the same
//! transaction as the rows. A replay after a crash re-sends events the
//! table already holds; their positions are at or below the committed one,
//! so they are skipped: no gap (nothing is acknowledged before its commit)
//! and no duplicate (nothing committed is written again).

use std::collections::HashMap;
use std::sync::Arc;

use conflux_api::Position;
use sqlx::PgConnection;

use crate::sql::quote;

/// Committed position per source stream.
pub type Committed = HashMap<Arc<str>, u64>;

/// The offsets table's statements for one target table.
pub struct Offsets {
    /// The written table's name: several outputs share one offsets table.
    target: String,
    create: String,
    select: String,
    upsert: String,
}

impl Offsets {
    pub fn new(offsets_table: &str, target: &str) -> Offsets {
        let table = quote(offsets_table);
        Offsets {
            target: target.to_string(),
            create: format!(
                "CREATE TABLE IF NOT EXISTS {table} (target text NOT NULL, stream text NOT NULL, \
                 \"offset\" bigint NOT NULL, PRIMARY KEY (target, stream))"
            ),
            select: format!("SELECT stream, \"offset\" FROM {table} WHERE target = $1"),
            upsert: format!(
                "INSERT INTO {table} (target, stream, \"offset\") SELECT $1, * FROM UNNEST($2::text[], $3::int8[]) \
                 ON CONFLICT (target, stream) DO UPDATE SET \"offset\" = GREATEST({table}.\"offset\", EXCLUDED.\"offset\")"
            ),
        }
    }

    pub async fn create(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query(&self.create).execute(conn).await.map(|_| ())
    }

    pub async fn read(&self, conn: &mut PgConnection) -> Result<Committed, sqlx::Error> {
        let rows: Vec<(String, i64)> = sqlx::query_as(&self.select).bind(&self.target).fetch_all(conn).await?;
        Ok(rows.into_iter().map(|(stream, offset)| (Arc::from(stream), offset as u64)).collect())
    }

    /// Records `advanced` inside the batch's transaction.
    pub async fn write(&self, conn: &mut PgConnection, advanced: &Committed) -> Result<(), sqlx::Error> {
        if advanced.is_empty() {
            return Ok(());
        }
        let streams: Vec<&str> = advanced.keys().map(|s| &**s).collect();
        let offsets: Vec<i64> = advanced.values().map(|&o| o as i64).collect();
        sqlx::query(&self.upsert).bind(&self.target).bind(streams).bind(offsets).execute(conn).await.map(|_| ())
    }
}

/// Whether an event at `position` is already in the table.
pub fn already_committed(committed: &Committed, position: &Position) -> bool {
    committed.get(&position.stream).is_some_and(|&c| position.offset <= c)
}

/// Notes that the batch holds `position`.
pub fn advance(advanced: &mut Committed, position: &Position) {
    let at = advanced.entry(position.stream.clone()).or_insert(position.offset);
    *at = (*at).max(position.offset);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_at_or_below_the_committed_one_are_skipped() {
        let stream: Arc<str> = Arc::from("kafka:orders/0");
        let mut advanced = Committed::new();
        for offset in [5, 9, 7] {
            advance(&mut advanced, &Position { stream: stream.clone(), offset });
        }
        assert_eq!(advanced[&stream], 9);
        let at = |offset| Position { stream: stream.clone(), offset };
        assert!(already_committed(&advanced, &at(9)));
        assert!(already_committed(&advanced, &at(1)));
        assert!(!already_committed(&advanced, &at(10)));
        let other = Position { stream: Arc::from("kafka:orders/1"), offset: 0 };
        assert!(!already_committed(&advanced, &other));
    }
}
