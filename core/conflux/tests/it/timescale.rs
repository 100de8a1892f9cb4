//! The `postgres` output's time-series options: one pipeline with
//! `hypertable`, `retention` and a rollup, run on the WASM TimescaleDB
//! (PGlite on 5433, `scripts/services.sh`) and on the machine's plain
//! PostgreSQL; read back with `psql`, expectations computed from the input.

use std::collections::BTreeMap;
use std::path::Path;

use conflux_engine::config::{load_str, Diagnostic};
use conflux_engine::graph::compile;
use conflux_engine::runtime::{RunContext, RunReport};
use conflux_testkit::run_yaml;

use crate::postgres_output::database_url;
use crate::{key, setup};

fn timescale_url() -> String {
    std::env::var("TIMESCALE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5433/postgres?sslmode=disable".into())
}

/// Runs SQL through `psql` against `url`; unaligned rows, `|` between fields.
fn psql_at(url: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .arg(url)
        .env("PGTZ", "UTC")
        .args(["-v", "ON_ERROR_STOP=1", "-Atq", "-c", sql])
        .output()
        .unwrap_or_else(|e| panic!("psql: {e}"));
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The WASM TimescaleDB, or a panic saying how to start it.
fn timescale() -> String {
    let url = timescale_url();
    let out = std::process::Command::new("psql")
        .arg(&url)
        .args(["-Atqc", "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"])
        .output();
    match out {
        Ok(out) if out.status.success() && !out.stdout.is_empty() => url,
        _ => panic!(
            "no TimescaleDB at {url}: `bash scripts/test.sh` starts the WASM one (scripts/services.sh: ensure_services timescale)"
        ),
    }
}

fn table(name: &str) -> String {
    key(name).replace('-', "_").to_lowercase()
}

/// Booking-shaped events over the last ten hours: (restaurant, guests, epoch seconds).
fn bookings(n: u64, now: u64) -> Vec<(String, u64, u64)> {
    let base = (now / 3600 - 10) * 3600;
    (0..n).map(|i| (format!("r{}", i % 3), i % 6 + 1, base + (i * 937) % (10 * 3600))).collect()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn ndjson(rows: &[(String, u64, u64)]) -> String {
    rows.iter()
        .enumerate()
        .map(|(i, (restaurant, guests, at))| {
            format!("{{\"id\":\"b-{i}\",\"data\":{{\"restaurantId\":\"{restaurant}\",\"guests\":{guests}}},\"timestamp\":{at}}}\n")
        })
        .collect()
}

/// `bucket epoch|restaurant|bookings|guests` per hour and restaurant, computed here.
fn hourly(rows: &[(String, u64, u64)]) -> Vec<String> {
    let mut figures: BTreeMap<(u64, &str), (u64, u64)> = BTreeMap::new();
    for (restaurant, guests, at) in rows {
        let entry = figures.entry((at / 3600 * 3600, restaurant)).or_default();
        entry.0 += 1;
        entry.1 += guests;
    }
    figures.into_iter().map(|((bucket, r), (count, sum))| format!("{bucket}|{r}|{count}|{sum}")).collect()
}

/// The pipeline both servers run; `extra` adds output options (`pool_size`).
fn pipeline(dir: &Path, url: &str, t: &str, extra: &str) -> String {
    format!(
        "inputs:
  in: {{ type: file, path: \"{dir}/in.ndjson\" }}
outputs:
  pg:
    type: postgres
    from: in
    url: \"{url}\"
    table: {t}
    create: true{extra}
    batch: {{ max_events: 100 }}
    hypertable: {{ time_column: at, chunk_interval: 1d }}
    retention: 90d
    rollups:
      - name: {t}_hourly
        bucket: 1h
        group_by: [restaurant_id]
        metrics: {{ bookings: {{ count: {{}} }}, guests: {{ sum: guests }} }}
    columns:
      id: {{ from: id, type: text }}
      restaurant_id: {{ from: data.restaurantId, type: text }}
      guests: {{ from: data.guests, type: integer }}
      at: {{ from: timestamp, type: timestamp }}
  dead: {{ type: file, path: \"{dir}/dead.ndjson\", from: pg.error }}
",
        dir = dir.display()
    )
}

/// Runs a pipeline, failing the test rather than waiting on an output that cannot connect.
async fn run(yaml: &str) -> RunReport {
    let report = tokio::time::timeout(std::time::Duration::from_secs(90), run_yaml(yaml, RunContext::new()))
        .await
        .expect("the pipeline ends within 90 s (an output that cannot connect retries forever)");
    assert!(!report.lost_events() && !report.failed, "{report:?}");
    report
}

fn rollup_rows(url: &str, view: &str) -> Vec<String> {
    psql_at(
        url,
        &format!(
            "SELECT extract(epoch FROM bucket)::bigint, restaurant_id, bookings, guests FROM {view} ORDER BY 1, 2"
        ),
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// On TimescaleDB the table becomes a hypertable with 1-day chunks and a
/// 90-day retention policy, and the rollup a continuous aggregate whose
/// materialized figures equal those computed from the input; a second
/// connect changes nothing.
#[tokio::test]
async fn on_timescaledb_a_hypertable_retention_and_a_continuous_aggregate() {
    setup();
    let url = timescale();
    let t = table("ts_bookings");
    let view = format!("{t}_hourly");
    let rows = bookings(600, now());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.ndjson"), ndjson(&rows)).unwrap();
    // The WASM server takes one connection at a time, and COPY FROM STDIN
    // (text or binary) crashes it.
    let yaml = pipeline(dir.path(), &url, &t, "\n    pool_size: 1\n    mode: insert");
    run(&yaml).await;
    std::fs::write(dir.path().join("in.ndjson"), "").unwrap();
    run(&yaml).await; // connects again to the hypertable, policy and aggregate it made
    assert!(
        !dir.path().join("dead.ndjson").exists()
            || std::fs::read_to_string(dir.path().join("dead.ndjson")).unwrap().is_empty()
    );

    let sql = |q: &str| psql_at(&url, q).trim().to_string();
    assert_eq!(sql(&format!("SELECT count(*) FROM {t}")), "600");
    assert_eq!(
        sql(&format!("SELECT hypertable_name FROM timescaledb_information.hypertables WHERE hypertable_name = '{t}'")),
        t
    );
    assert_eq!(
        sql(&format!(
            "SELECT column_name || ' ' || (time_interval = INTERVAL '1 day') FROM timescaledb_information.dimensions WHERE hypertable_name = '{t}'"
        )),
        "at true",
        "partitioned by `at` in chunks of a day"
    );
    assert_eq!(
        sql(&format!(
            "SELECT count(*) || ' ' || bool_and((config->>'drop_after')::interval = INTERVAL '90 days') FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention' AND hypertable_name = '{t}'"
        )),
        "1 true",
        "one retention policy of 90 days"
    );
    assert_eq!(
        sql(&format!(
            "SELECT count(*) FROM timescaledb_information.continuous_aggregates WHERE view_name = '{view}' AND hypertable_name = '{t}'"
        )),
        "1"
    );
    assert_eq!(
        sql(&format!(
            "SELECT count(*) FROM timescaledb_information.jobs WHERE proc_name = 'policy_refresh_continuous_aggregate' AND hypertable_name = '{view}'"
        )),
        "1",
        "one refresh policy"
    );
    let expected = hourly(&rows);
    assert!(expected.len() >= 20, "ten hours × three restaurants: {expected:?}");
    assert_eq!(rollup_rows(&url, &view), expected, "real-time figures before any refresh");
    sql(&format!("CALL refresh_continuous_aggregate('{view}', NULL, NULL)"));
    sql(&format!("ALTER MATERIALIZED VIEW {view} SET (timescaledb.materialized_only = true)"));
    assert_eq!(rollup_rows(&url, &view), expected, "the materialized figures");
    sql(&format!("DROP MATERIALIZED VIEW {view}"));
    sql(&format!("DROP TABLE {t}"));
}

/// The same pipeline on plain PostgreSQL: a plain table, a view of the
/// same figures under the rollup's name, rows older than `retention`
/// deleted at the next connect.
#[tokio::test]
async fn on_plain_postgresql_the_same_pipeline_falls_back() {
    setup();
    let url = database_url();
    let t = table("plain_bookings");
    let view = format!("{t}_hourly");
    let rows = bookings(600, now());
    let old = vec![("r0".to_string(), 5, now() - 100 * 86400), ("r1".to_string(), 2, now() - 91 * 86400)];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.ndjson"), ndjson(&[rows.clone(), old].concat())).unwrap();
    let yaml = pipeline(dir.path(), &url, &t, "");
    run(&yaml).await;
    let sql = |q: &str| psql_at(&url, q).trim().to_string();
    assert_eq!(sql(&format!("SELECT count(*) FROM {t}")), "602", "every row written, old ones too");
    std::fs::write(dir.path().join("in.ndjson"), "").unwrap();
    run(&yaml).await;
    assert_eq!(sql(&format!("SELECT count(*) FROM {t}")), "600", "the next connect deleted what is past retention");
    assert_eq!(sql(&format!("SELECT relkind FROM pg_class WHERE relname = '{t}'")), "r");
    assert_eq!(sql(&format!("SELECT relkind FROM pg_class WHERE relname = '{view}'")), "v");
    assert_eq!(
        sql(&format!("SELECT count(*) FROM pg_indexes WHERE tablename = '{t}' AND indexdef LIKE '%(at)%'")),
        "1",
        "the time column is indexed"
    );
    assert_eq!(rollup_rows(&url, &view), hourly(&rows));
    sql(&format!("DROP VIEW {view}"));
    sql(&format!("DROP TABLE {t}"));
}

fn problems(output: &str) -> Vec<String> {
    setup();
    let yaml = format!(
        "inputs:\n  in: {{ type: generate, count: 1 }}\noutputs:\n  pg: {{ type: postgres, from: in, url: \"postgres://x@127.0.0.1/x\", table: t, {output}, columns: {{ at: {{ from: at, type: timestamp }}, n: {{ from: n, type: integer }}, name: {{ from: name, type: text }} }} }}\n"
    );
    match load_str(Path::new("p.yaml"), &yaml, &|_: &str| None).and_then(compile) {
        Ok(_) => Vec::new(),
        Err(diags) => diags.iter().map(Diagnostic::to_string).collect(),
    }
}

#[test]
fn time_series_mistakes_are_reported_at_their_option() {
    let rollup = |metric: &str| {
        format!("hypertable: {{ time_column: at }}, rollups: [ {{ name: h, bucket: 1h, metrics: {{ x: {{ {metric} }} }} }} ]")
    };
    for (options, expected) in [
        ("retention: 90d".to_string(), "p.yaml:4:89: output `pg`: `retention` needs `hypertable` (its `time_column` says how old a row is)"),
        (
            "hypertable: { time_column: n }".to_string(),
            "p.yaml:4:105: output `pg`: column `n` is of type `integer`; the time column must be a `timestamp` column",
        ),
        (rollup("median: n"), "p.yaml:4:159: output `pg`: unknown variant (a string of 6 characters), expected one of `count`, `sum`, `avg`, `min`, `max`"),
        (
            rollup("sum: name"),
            "p.yaml:4:166: output `pg`: column `name` is of type `text`; `sum` takes a column of type integer, double",
        ),
        ("hypertable: { time_column: at }, mode: upsert, key: [name]".to_string(), "p.yaml:4:130: output `pg`: on a hypertable every unique key includes the time column: add `at` to `key`"),
    ] {
        let found = problems(&options);
        assert_eq!(found, [expected], "{options}");
    }
}
