//! `postgres` output: typed rows from events, one transaction per write
//! batch, acknowledged after commit. A batch the database refuses (a
//! constraint, a bad value) is split in halves until the refused rows stand
//! alone: they go to `error` with the database's message, the rest commit.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use conflux_api::columns::{ColumnConfig, ColumnType, Columns, TypedValue};
use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, FailedEvent, Output, OutputConfig, PluginError,
    Registration,
};
use schemars::JsonSchema;
use serde::Deserialize;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Executor, PgConnection, Row};

use crate::encode::{copy_header, copy_row, copy_trailer, ColumnArray, Wire};
use crate::offsets::{advance, already_committed, Committed, Offsets};
use crate::sql::{quote, Statements};
use crate::timescale::{HypertableConfig, Options, RollupConfig, Server, TimeSeries};

/// How rows are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Append through `COPY … FROM STDIN (FORMAT binary)`: the fastest way in.
    #[default]
    Copy,
    /// Append through `INSERT … SELECT FROM UNNEST(…)`: one statement per batch.
    Insert,
    /// `INSERT … ON CONFLICT (key) DO UPDATE`: the last row per key wins,
    /// within a batch too, so a replay overwrites instead of adding.
    Upsert,
}

/// Writes events as rows of a PostgreSQL (or TimescaleDB) table.
///
/// Each event gives one row, its columns typed by `columns`; an event with
/// a missing or mistyped value goes to `error` (nothing is converted
/// silently). Each write batch is one transaction, acknowledged after
/// commit. Connection loss, serialization failures and too many connections
/// are retried; a row the database refuses goes to `error` with its message
/// while the rest of its batch commits.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresOutputConfig {
    /// `postgres://user:password@host:port/database` (the password is never logged).
    pub url: String,
    /// Table, optionally schema-qualified (`analytics.bookings`).
    pub table: String,
    /// Column name → where its value comes from and its type.
    pub columns: BTreeMap<String, ColumnConfig>,
    /// `copy` (default: appends, fastest), `insert` or `upsert` (with `key`).
    #[serde(default)]
    pub mode: Mode,
    /// The conflict columns of an upsert (the table's primary key or a unique index).
    #[serde(default)]
    pub key: Vec<String>,
    /// Create the table (and `indexes`) from the mapping if it does not exist; with `key`,
    /// the key is its primary key.
    #[serde(default)]
    pub create: bool,
    /// With `create`, indexes to create: each a list of columns.
    #[serde(default)]
    pub indexes: Vec<Vec<String>>,
    /// Write each batch's source positions to `offsets_table` in the same
    /// transaction and skip events at positions already committed: after a
    /// crash and a replay, no row is missing and none is written twice.
    /// Needs a replayable source (Kafka, NATS JetStream, files, Redis
    /// streams); events without a position are written as usual. Writes run
    /// one at a time.
    #[serde(default)]
    pub exactly_once: bool,
    /// With `exactly_once`: the table keeping the last committed position
    /// per (target table, source stream); created if missing.
    #[serde(default = "default_offsets_table")]
    pub offsets_table: String,
    /// Make the table a TimescaleDB hypertable partitioned by `time_column`
    /// into chunks of `chunk_interval`, when the server has the extension;
    /// on plain PostgreSQL the table stays plain (its time column indexed
    /// when `create` makes it).
    #[serde(default)]
    pub hypertable: Option<HypertableConfig>,
    /// With `hypertable`: keep this much history (`90d`). TimescaleDB drops
    /// older chunks by a retention policy; on plain PostgreSQL the output
    /// deletes older rows at connect and then once an hour.
    #[serde(default)]
    pub retention: Option<conflux_api::config::Duration>,
    /// With `hypertable`: figures per time bucket, kept as TimescaleDB
    /// continuous aggregates (refreshed once a bucket, real-time for the
    /// rest), or as plain views of the same names on plain PostgreSQL.
    #[serde(default)]
    pub rollups: Vec<RollupConfig>,
    /// Connections the output keeps to the database (default 4). `1` for a
    /// server that serves one connection at a time.
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
}

fn default_offsets_table() -> String {
    "conflux_offsets".to_string()
}

fn default_pool_size() -> u32 {
    4
}

impl OutputConfig for PostgresOutputConfig {
    const TYPE: &'static str = "postgres";
    fn build(self, cx: &BuildContext) -> Result<Box<dyn Output>, BuildError> {
        if self.exactly_once {
            if let Some(why) = cx.writes.unfit_for_a_fence() {
                return Err(BuildError::at(["exactly_once"], format!("`exactly_once` {why}")));
            }
        }
        if self.columns.is_empty() {
            return Err(BuildError::at(["columns"], "map at least one column"));
        }
        let columns = Columns::new(self.columns.iter().map(|(n, c)| (n.as_str(), c)))
            .map_err(|e| BuildError::at(["columns"], e))?;
        match (self.mode, self.key.is_empty()) {
            (Mode::Upsert, true) => return Err(BuildError::at(["key"], "an upsert needs `key`: its conflict columns")),
            (Mode::Copy | Mode::Insert, false) => {
                return Err(BuildError::at(["key"], "`key` applies to `mode: upsert` only"))
            }
            _ => {}
        }
        for k in &self.key {
            if !self.columns.contains_key(k) {
                return Err(BuildError::at(["key"], format!("key column `{k}` is not in `columns`")));
            }
        }
        for (i, index) in self.indexes.iter().enumerate() {
            if !self.create {
                return Err(BuildError::at(["indexes"], "indexes are created with `create: true` only"));
            }
            if let Some(missing) = index.iter().find(|c| !self.columns.contains_key(*c)) {
                return Err(BuildError::at(
                    ["indexes", &i.to_string()],
                    format!("column `{missing}` is not in `columns`"),
                ));
            }
        }
        if self.pool_size == 0 {
            return Err(BuildError::at(["pool_size"], "the pool needs at least one connection"));
        }
        let series = TimeSeries::build(Options {
            table: &self.table,
            columns: &self.columns,
            key: &self.key,
            hypertable: self.hypertable.as_ref(),
            retention: self.retention,
            rollups: &self.rollups,
        })?;
        let described: Vec<(String, ColumnType, bool)> =
            self.columns.iter().map(|(n, c)| (n.clone(), c.kind, c.nullable)).collect();
        let statements = Statements::new(&self.table, &described, &self.key);
        let shown = conflux_api::secrets::mask_url_passwords(self.url.as_str().into()).into_owned();
        let pool = PgPoolOptions::new()
            .max_connections(self.pool_size)
            .acquire_timeout(Duration::from_secs(5))
            // A server whose connections share one session (PGlite) keeps
            // the statements an earlier connection prepared, under the names
            // this one would give its own; on any other it frees nothing.
            .after_connect(|conn, _| Box::pin(async move { conn.execute("DEALLOCATE ALL").await.map(|_| ()) }))
            .connect_lazy(&self.url)
            .map_err(|e| BuildError::at(["url"], format!("bad PostgreSQL URL: {}", describe(&e))))?;
        let key_positions: Vec<usize> =
            described.iter().enumerate().filter(|(_, (n, _, _))| self.key.contains(n)).map(|(i, _)| i).collect();
        Ok(Box::new(PostgresOutput {
            wires: vec![Wire::Native; described.len()],
            names: described.iter().map(|(n, _, _)| n.clone()).collect(),
            types: described.iter().map(|(_, t, _)| *t).collect(),
            columns,
            statements,
            key_positions,
            pool,
            shown,
            offsets: self.exactly_once.then(|| Offsets::new(&self.offsets_table, &self.table)),
            fence: self.exactly_once.then(|| tokio::sync::Mutex::new(None)),
            skipped: cx.counter(
                "postgres_rows_skipped",
                "Events left out by `exactly_once`: their source position was already committed",
            ),
            series,
            server: None,
            config: self,
        }))
    }
}

inventory::submit!(Registration::output::<PostgresOutputConfig>());

struct PostgresOutput {
    config: PostgresOutputConfig,
    columns: Columns,
    names: Vec<String>,
    types: Vec<ColumnType>,
    /// How each column takes binary COPY data, from the table's own types.
    wires: Vec<Wire>,
    statements: Statements,
    key_positions: Vec<usize>,
    pool: PgPool,
    /// The URL with its password masked.
    shown: String,
    /// `exactly_once`: the offsets table's statements.
    offsets: Option<Offsets>,
    /// `exactly_once`: committed positions (read at the first write and
    /// after any failed one), the lock that runs one fenced write at a time.
    fence: Option<tokio::sync::Mutex<Option<Committed>>>,
    skipped: conflux_api::metrics::Counter,
    /// `hypertable`, `retention`, `rollups`, checked.
    series: Option<TimeSeries>,
    /// With `series`: what the server turned out to be at connect.
    server: Option<Server>,
}

/// What a failed statement means for its rows.
enum Failure {
    /// The rows are bad (SQLSTATE classes 22 and 23): isolate them.
    Refused(String),
    /// The database or the connection is (for now): retry the batch.
    Retry,
}

/// A database error's message with its SQLSTATE, never the URL.
pub(crate) fn describe(e: &sqlx::Error) -> String {
    match e.as_database_error() {
        Some(db) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_string(),
        },
        None => e.to_string(),
    }
}

fn classify(e: &sqlx::Error) -> Failure {
    let code = e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned()).unwrap_or_default();
    if code.starts_with("22") || code.starts_with("23") {
        Failure::Refused(describe(e))
    } else {
        Failure::Retry
    }
}

impl PostgresOutput {
    /// Creates the table if asked, then reads its column types: binary COPY
    /// must send each value in its column's own wire format.
    async fn prepare_table(&mut self) -> Result<(), String> {
        let table = quote(&self.config.table);
        let mut created = false;
        let exists = |table: String| {
            sqlx::query_scalar::<_, Option<String>>("SELECT to_regclass($1)::text").bind(table).fetch_one(&self.pool)
        };
        if exists(table.clone()).await.map_err(|e| describe(&e))?.is_none() {
            if !self.config.create {
                return Err(format!("table `{}` does not exist (create it, or set `create: true`)", self.config.table));
            }
            sqlx::query(&self.statements.create).execute(&self.pool).await.map_err(|e| describe(&e))?;
            created = true;
            for index in &self.config.indexes {
                let name = format!("{}_{}_idx", self.config.table.replace('.', "_"), index.join("_"));
                let columns: Vec<String> = index.iter().map(|c| quote(c)).collect();
                let statement =
                    format!("CREATE INDEX IF NOT EXISTS {} ON {table} ({})", quote(&name), columns.join(", "));
                sqlx::query(&statement).execute(&self.pool).await.map_err(|e| describe(&e))?;
            }
        }
        let rows = sqlx::query(
            "SELECT a.attname::text, t.typname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(&table)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| describe(&e))?;
        let found: HashMap<String, String> =
            rows.iter().map(|r| (r.get::<String, _>(0), r.get::<String, _>(1))).collect();
        for (i, (name, kind)) in self.names.iter().zip(&self.types).enumerate() {
            let Some(actual) = found.get(name) else {
                return Err(format!("table `{}` has no column `{name}`", self.config.table));
            };
            self.wires[i] = wire(*kind, actual).ok_or_else(|| {
                format!("column `{name}` is `{actual}` in the table, which a `{kind:?}` value cannot be written to")
            })?;
        }
        if let Some(series) = &self.series {
            self.server = Some(series.prepare(&self.pool, created).await?);
        }
        if let Some(offsets) = &self.offsets {
            let mut conn = self.pool.acquire().await.map_err(|e| describe(&e))?;
            offsets.create(&mut conn).await.map_err(|e| describe(&e))?;
        }
        if let Some(fence) = &mut self.fence {
            *fence.get_mut() = None;
        }
        Ok(())
    }

    /// Reads the committed offsets (`exactly_once`).
    async fn read_offsets(&self) -> Result<Committed, sqlx::Error> {
        let Some(offsets) = &self.offsets else { return Ok(Committed::new()) };
        let mut conn = self.pool.acquire().await?;
        offsets.read(&mut conn).await
    }

    fn retry(&self, e: &sqlx::Error) -> PluginError {
        PluginError::retryable(format!("PostgreSQL at {}: {}", self.shown, describe(e)))
    }

    /// Writes a batch in one transaction: the rows it can, its positions
    /// with `exactly_once`. A part the database refuses is rolled back to
    /// its savepoint and split until each refused row stands alone. Returns
    /// the refused events.
    async fn write_batch(
        &self,
        batch: &Batch,
        committed: Option<&mut Committed>,
    ) -> Result<Vec<FailedEvent>, PluginError> {
        let mut rows = self.rows(batch, committed.as_deref());
        let mut failed = std::mem::take(&mut rows.failed);
        let mut tx = self.pool.begin().await.map_err(|e| self.retry(&e))?;
        let whole = rows.whole();
        // The whole batch first, without a savepoint: the common case costs one statement.
        if let Err(e) = self.write_part(&mut tx, whole, &rows.encoded).await {
            match classify(&e) {
                Failure::Retry => return Err(self.retry(&e)),
                Failure::Refused(reason) if whole.len() == 1 => {
                    failed.push(FailedEvent::new(whole.first_index(), reason));
                    tx.rollback().await.map_err(|e| self.retry(&e))?;
                    tx = self.pool.begin().await.map_err(|e| self.retry(&e))?;
                }
                Failure::Refused(_) => {
                    tx.rollback().await.map_err(|e| self.retry(&e))?;
                    tx = self.pool.begin().await.map_err(|e| self.retry(&e))?;
                    let (first, second) = whole.halves();
                    let mut parts = vec![second, first];
                    while let Some(part) = parts.pop() {
                        if part.len() == 0 {
                            continue;
                        }
                        tx.execute("SAVEPOINT conflux_part").await.map_err(|e| self.retry(&e))?;
                        let Err(e) = self.write_part(&mut tx, part, &rows.encoded).await else {
                            tx.execute("RELEASE SAVEPOINT conflux_part").await.map_err(|e| self.retry(&e))?;
                            continue;
                        };
                        let Failure::Refused(reason) = classify(&e) else { return Err(self.retry(&e)) };
                        tx.execute("ROLLBACK TO SAVEPOINT conflux_part").await.map_err(|e| self.retry(&e))?;
                        if part.len() == 1 {
                            failed.push(FailedEvent::new(part.first_index(), reason));
                        } else {
                            let (first, second) = part.halves();
                            parts.push(second);
                            parts.push(first);
                        }
                    }
                }
            }
        }
        if let Some(offsets) = &self.offsets {
            offsets.write(&mut tx, &rows.advanced).await.map_err(|e| self.retry(&e))?;
        }
        tx.commit().await.map_err(|e| self.retry(&e))?;
        if let Some(committed) = committed {
            for (stream, offset) in rows.advanced {
                committed.insert(stream, offset);
            }
        }
        for refused in &failed {
            tracing::warn!(index = refused.index, reason = %refused.reason, "PostgreSQL refused a row; it goes to `error`");
        }
        failed.sort_by_key(|f| f.index);
        Ok(failed)
    }

    /// Turns a batch into rows: binary COPY data encoded once, or typed rows
    /// for UNNEST (an upsert's last row per key). Events whose value does
    /// not fit its column are refused here; events at committed positions
    /// are left out.
    fn rows(&self, batch: &Batch, committed: Option<&Committed>) -> Rows {
        let mut out = Rows::default();
        for (index, event) in batch.iter().enumerate() {
            let row = match self.columns.values(event) {
                Ok(row) => row,
                Err(e) => {
                    out.failed.push(FailedEvent::new(index, e.to_string()));
                    continue;
                }
            };
            if let (Some(committed), Some(position)) = (committed, &event.position) {
                if already_committed(committed, position) {
                    self.skipped.inc();
                    continue;
                }
                advance(&mut out.advanced, position);
            }
            if self.config.mode == Mode::Copy {
                out.encode(index, &row, &self.wires, &self.names);
            } else {
                out.typed.push((index, row));
            }
        }
        if self.config.mode == Mode::Upsert {
            // Upserts are copied too (into the stage), once the last row per key is known.
            out.keep_last_per_key(&self.key_positions);
            for (index, row) in std::mem::take(&mut out.typed) {
                out.encode(index, &row, &self.wires, &self.names);
            }
        }
        out
    }

    /// Writes one part of a batch inside the batch's transaction.
    async fn write_part(&self, conn: &mut PgConnection, part: Part<'_>, encoded: &[u8]) -> Result<(), sqlx::Error> {
        match part {
            Part::Copy(rows) => {
                let (Some(first), Some(last)) = (rows.first(), rows.last()) else { return Ok(()) };
                // A part's rows are neighbours in the encoded batch: one slice.
                let body = &encoded[first.1.start..last.1.end];
                let mut data = Vec::with_capacity(body.len() + 32);
                copy_header(&mut data);
                data.extend_from_slice(body);
                copy_trailer(&mut data);
                let stage = &self.statements.stage;
                let upsert = self.config.mode == Mode::Upsert;
                if upsert {
                    conn.execute(stage.create.as_str()).await?;
                }
                let mut copy = conn.copy_in_raw(if upsert { &stage.copy } else { &self.statements.copy }).await?;
                if let Err(e) = copy.send(data).await {
                    let _ = copy.abort("write failed").await;
                    return Err(e);
                }
                copy.finish().await?;
                if upsert {
                    conn.execute(stage.merge.as_str()).await?;
                    // Emptied for the next part of a bisected batch (and at commit).
                    conn.execute(stage.clear.as_str()).await?;
                }
            }
            Part::Rows(rows) => {
                let mut arrays: Vec<ColumnArray> =
                    self.types.iter().map(|t| ColumnArray::new(*t, rows.len())).collect();
                for (_, row) in rows {
                    for (array, value) in arrays.iter_mut().zip(row) {
                        array.push(value);
                    }
                }
                let mut query = sqlx::query(&self.statements.insert);
                for array in arrays {
                    query = match array {
                        ColumnArray::Text(v) => query.bind(v),
                        ColumnArray::Integer(v) => query.bind(v),
                        ColumnArray::Double(v) => query.bind(v),
                        ColumnArray::Boolean(v) => query.bind(v),
                    };
                }
                query.execute(conn).await?;
            }
        }
        Ok(())
    }
}

/// A batch turned into rows.
#[derive(Default)]
struct Rows {
    /// Binary COPY rows: (event index, bytes in `encoded`).
    copied: Vec<(usize, std::ops::Range<usize>)>,
    encoded: Vec<u8>,
    /// Typed rows for UNNEST: (event index, values).
    typed: Vec<(usize, Vec<TypedValue>)>,
    failed: Vec<FailedEvent>,
    /// The highest position per stream among the rows (`exactly_once`).
    advanced: Committed,
}

impl Rows {
    /// Encodes a row as binary COPY data; a value out of an `integer`
    /// column's range is refused here.
    fn encode(&mut self, index: usize, row: &[TypedValue], wires: &[Wire], names: &[String]) {
        let start = self.encoded.len();
        match copy_row(&mut self.encoded, row, wires, names) {
            Ok(()) => self.copied.push((index, start..self.encoded.len())),
            Err(reason) => self.failed.push(FailedEvent::new(index, reason)),
        }
    }

    fn whole(&self) -> Part<'_> {
        if self.typed.is_empty() {
            Part::Copy(&self.copied)
        } else {
            Part::Rows(&self.typed)
        }
    }

    /// ON CONFLICT cannot touch one row twice in a statement: the last row per key wins.
    fn keep_last_per_key(&mut self, key_positions: &[usize]) {
        let mut last: HashMap<Vec<u8>, usize> = HashMap::with_capacity(self.typed.len());
        let mut key = Vec::new();
        for (position, (_, row)) in self.typed.iter().enumerate() {
            key.clear();
            for &k in key_positions {
                key_bytes(&row[k], &mut key);
            }
            last.insert(key.clone(), position);
        }
        if last.len() < self.typed.len() {
            let mut keep = vec![false; self.typed.len()];
            for position in last.into_values() {
                keep[position] = true;
            }
            let mut flags = keep.into_iter();
            self.typed.retain(|_| flags.next().unwrap_or(false));
        }
    }
}

/// Appends a value's identity: a tag, then its bytes (text length-prefixed,
/// so `("a", "bc")` and `("ab", "c")` differ).
fn key_bytes(value: &TypedValue, out: &mut Vec<u8>) {
    let (tag, bytes): (u8, &[u8]) = match value {
        TypedValue::Null => (0, &[]),
        TypedValue::Text(t) => (1, t.as_bytes()),
        TypedValue::Json(t) => (2, t.as_bytes()),
        TypedValue::Integer(i) => {
            out.push(3);
            out.extend_from_slice(&i.to_le_bytes());
            return;
        }
        TypedValue::Double(d) => {
            out.push(4);
            out.extend_from_slice(&d.to_bits().to_le_bytes());
            return;
        }
        TypedValue::Boolean(b) => (5, if *b { &[1] } else { &[0] }),
        TypedValue::Timestamp(t) => {
            out.push(6);
            out.extend_from_slice(&t.0.to_le_bytes());
            return;
        }
    };
    out.push(tag);
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Rows of a batch still to write: binary COPY rows (event index, bytes in
/// the encoded batch), or typed rows for UNNEST.
#[derive(Clone, Copy)]
enum Part<'a> {
    Copy(&'a [(usize, std::ops::Range<usize>)]),
    Rows(&'a [(usize, Vec<TypedValue>)]),
}

impl<'a> Part<'a> {
    fn len(&self) -> usize {
        match self {
            Part::Copy(r) => r.len(),
            Part::Rows(r) => r.len(),
        }
    }

    fn first_index(&self) -> usize {
        match self {
            Part::Copy(r) => r[0].0,
            Part::Rows(r) => r[0].0,
        }
    }

    fn halves(self) -> (Part<'a>, Part<'a>) {
        match self {
            Part::Copy(r) => {
                let (a, b) = r.split_at(r.len() / 2);
                (Part::Copy(a), Part::Copy(b))
            }
            Part::Rows(r) => {
                let (a, b) = r.split_at(r.len() / 2);
                (Part::Rows(a), Part::Rows(b))
            }
        }
    }
}

/// How a mapping type is written into a column of PostgreSQL type `actual` (`typname`).
fn wire(kind: ColumnType, actual: &str) -> Option<Wire> {
    match (kind, actual) {
        (ColumnType::Text, "text" | "varchar" | "bpchar" | "name" | "citext") => Some(Wire::Native),
        (ColumnType::Integer, "int8") => Some(Wire::Native),
        (ColumnType::Integer, "int4") => Some(Wire::Int4),
        (ColumnType::Integer, "int2") => Some(Wire::Int2),
        (ColumnType::Double, "float8") => Some(Wire::Native),
        (ColumnType::Double, "float4") => Some(Wire::Float4),
        (ColumnType::Boolean, "bool") => Some(Wire::Native),
        (ColumnType::Timestamp, "timestamptz" | "timestamp") => Some(Wire::Native),
        (ColumnType::Json, "jsonb") => Some(Wire::Native),
        (ColumnType::Json, "json") => Some(Wire::Json),
        _ => None,
    }
}

#[async_trait]
impl Output for PostgresOutput {
    async fn connect(&mut self) -> Result<(), PluginError> {
        self.prepare_table().await.map_err(|e| PluginError::not_connected(format!("PostgreSQL at {}: {e}", self.shown)))
    }

    async fn write(&self, batch: &Batch) -> Result<(), PluginError> {
        let outcome = match &self.fence {
            None => self.write_batch(batch, None).await,
            Some(fence) => {
                // One fenced write at a time: a later batch committing its
                // positions before an earlier one failed would make the
                // earlier one's retry skip rows never written.
                let mut committed = fence.lock().await;
                if committed.is_none() {
                    *committed = Some(self.read_offsets().await.map_err(|e| self.retry(&e))?);
                }
                let outcome = self.write_batch(batch, committed.as_mut()).await;
                if outcome.is_err() {
                    // The commit may have landed before the error: read the offsets again.
                    *committed = None;
                }
                outcome
            }
        };
        let failed = outcome?;
        if let (Some(series), Some(Server::Plain)) = (&self.series, self.server) {
            series.trim_if_due(&self.pool).await;
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(PluginError::Partial(failed))
        }
    }

    async fn close(&mut self) -> Result<(), PluginError> {
        self.pool.close().await;
        Ok(())
    }
}
