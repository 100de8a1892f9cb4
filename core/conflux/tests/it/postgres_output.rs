//! The `postgres` output against the machine's PostgreSQL, read back with
//! `psql` (the server's own client); expectations come from the input.

use conflux_engine::runtime::RunContext;
use conflux_testkit::run_yaml;

use crate::{key, setup};

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Runs SQL through `psql`; its unaligned output, one row per line, `|` between fields.
pub fn psql(sql: &str) -> String {
    psql_in(&database_url(), sql)
}

/// [`psql`] against the database at `url`.
pub fn psql_in(url: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .arg(url)
        .env("PGTZ", "UTC")
        .args(["-v", "ON_ERROR_STOP=1", "-Atq", "-c", sql])
        .output()
        .unwrap_or_else(|e| panic!("psql (scripts/test.sh starts PostgreSQL): {e}"));
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn table(name: &str) -> String {
    key(name).replace('-', "_").to_lowercase()
}

/// `n` bookings: every column type, `note` null on every third.
fn bookings(n: u64) -> String {
    (0..n)
        .map(|i| {
            let note = if i.is_multiple_of(3) { "null".to_string() } else { format!("\"note {i}\"") };
            format!(
                "{{\"id\":\"b-{i}\",\"guests\":{},\"price\":{}.25,\"vip\":{},\"at\":\"2026-11-22T10:{:02}:{:02}.5Z\",\"data\":{{\"zone\":\"z{}\",\"tags\":[{i}]}},\"note\":{note}}}\n",
                i % 7 + 1,
                i,
                i.is_multiple_of(2),
                (i / 60) % 60,
                i % 60,
                i % 5
            )
        })
        .collect()
}

/// What psql prints for booking `i` (columns in name order: at, data, guests, id, note, price, vip).
fn expected_row(i: u64) -> String {
    let note = if i.is_multiple_of(3) { String::new() } else { format!("note {i}") };
    format!(
        "2026-11-22 10:{:02}:{:02}.5+00|{{\"tags\": [{i}], \"zone\": \"z{}\"}}|{}|b-{i}|{note}|{}.25|{}",
        (i / 60) % 60,
        i % 60,
        i % 5,
        i % 7 + 1,
        i,
        if i.is_multiple_of(2) { "t" } else { "f" }
    )
}

const COLUMNS: &str = "{ id: { from: id, type: text }, guests: { from: guests, type: integer }, price: { from: price, type: double }, vip: { from: vip, type: boolean }, at: { from: at, type: timestamp }, data: { from: data, type: json }, note: { from: note, type: text, nullable: true } }";

fn pipeline(dir: &std::path::Path, output: &str) -> String {
    format!(
        "inputs:\n  in: {{ type: file, path: \"{}/in.ndjson\" }}\noutputs:\n  pg: {output}\n  dead: {{ type: file, path: \"{}/dead.ndjson\", from: pg.error }}\n",
        dir.display(),
        dir.display()
    )
}

fn dead(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("dead.ndjson")).unwrap_or_default().lines().map(str::to_string).collect()
}

#[tokio::test]
async fn every_column_type_round_trips_in_each_mode() {
    setup();
    for mode in ["copy", "insert", "upsert"] {
        let t = table(&format!("pg_types_{mode}"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.ndjson"), bookings(500)).unwrap();
        let key = if mode == "upsert" { ", key: [id]" } else { "" };
        let output = format!(
            "{{ type: postgres, url: \"{}\", table: {t}, create: true, mode: {mode}{key}, columns: {COLUMNS}, batch: {{ max_events: 128 }}, from: in }}",
            database_url()
        );
        let report = run_yaml(&pipeline(dir.path(), &output), RunContext::new()).await;
        assert!(!report.lost_events(), "{mode}: {report:?}");
        assert!(dead(dir.path()).is_empty(), "{mode}: nothing refused");
        let rows =
            psql(&format!("SELECT at, data, guests, id, note, price, vip FROM {t} ORDER BY guests, id COLLATE \"C\""));
        let mut expected: Vec<(u64, String, String)> =
            (0..500).map(|i| (i % 7 + 1, format!("b-{i}"), expected_row(i))).collect();
        expected.sort();
        let expected: Vec<String> = expected.into_iter().map(|(_, _, row)| row).collect();
        assert_eq!(rows.lines().collect::<Vec<_>>(), expected, "{mode}");
        let types = psql(&format!(
            "SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY column_name) FROM information_schema.columns WHERE table_name = '{t}'"
        ));
        assert_eq!(
            types.trim(),
            "at timestamp with time zone, data jsonb, guests bigint, id text, note text, price double precision, vip boolean",
            "{mode}: create: true made the mapping's types"
        );
        psql(&format!("DROP TABLE {t}"));
    }
}

/// An upsert of the same batch twice leaves the same rows; within a batch
/// the last row per key wins.
#[tokio::test]
async fn upserts_overwrite_and_duplicate_keys_in_a_batch_keep_the_last() {
    setup();
    let t = table("pg_upsert");
    let dir = tempfile::tempdir().unwrap();
    let lines: String = (0..100).map(|i| format!("{{\"k\":\"k{}\",\"v\":{i}}}\n", i % 10)).collect();
    std::fs::write(dir.path().join("in.ndjson"), lines).unwrap();
    let output = format!(
        "{{ type: postgres, url: \"{}\", table: {t}, create: true, mode: upsert, key: [k], columns: {{ k: {{ from: k, type: text }}, v: {{ from: v, type: integer }} }}, batch: {{ max_events: 1000 }}, from: in }}",
        database_url()
    );
    for run in 1..=2 {
        let report = run_yaml(&pipeline(dir.path(), &output), RunContext::new()).await;
        assert!(!report.lost_events(), "run {run}: {report:?}");
        let rows = psql(&format!("SELECT k, v FROM {t} ORDER BY k"));
        let expected: Vec<String> = (0..10).map(|k| format!("k{k}|{}", 90 + k)).collect();
        assert_eq!(rows.lines().collect::<Vec<_>>(), expected, "run {run}: one row per key, the last value");
    }
    psql(&format!("DROP TABLE {t}"));
}

/// One row the database refuses among 10,000: 9,999 commit, the one goes to
/// `error` (bisection), in COPY, INSERT and UPSERT alike; values that do not fit the
/// table's own column types are refused before they are sent.
#[tokio::test]
async fn a_poison_row_among_ten_thousand_goes_to_error_alone() {
    setup();
    for mode in ["copy", "insert", "upsert"] {
        let t = table(&format!("pg_poison_{mode}"));
        let (primary, key) = if mode == "upsert" { (" PRIMARY KEY", ", key: [n]") } else { ("", "") };
        psql(&format!("CREATE TABLE {t} (n integer NOT NULL{primary} CHECK (n <> 4242), small smallint)"));
        let dir = tempfile::tempdir().unwrap();
        let mut lines: String = (0..10_000).map(|n| format!("{{\"n\":{n},\"small\":1}}\n")).collect();
        // Past `smallint`: refused by the output itself, in copy mode; by the database in insert mode.
        lines.push_str("{\"n\":10000,\"small\":70000}\n");
        std::fs::write(dir.path().join("in.ndjson"), lines).unwrap();
        let output = format!(
            "{{ type: postgres, url: \"{}\", table: {t}, mode: {mode}{key}, columns: {{ n: {{ from: n, type: integer }}, small: {{ from: small, type: integer }} }}, batch: {{ max_events: 10001 }}, from: in }}",
            database_url()
        );
        let report = run_yaml(&pipeline(dir.path(), &output), RunContext::new()).await;
        assert!(!report.lost_events(), "{mode}: refused rows are dead-lettered, not lost: {report:?}");
        let stored = psql(&format!("SELECT count(*), sum(n) FROM {t}"));
        let sum: u64 = (0..10_000u64).filter(|n| *n != 4242).sum();
        assert_eq!(stored.trim(), format!("9999|{sum}"), "{mode}");
        let dead: Vec<u64> = dead(dir.path())
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["n"].as_u64().unwrap())
            .collect();
        assert_eq!(dead, vec![4242, 10000], "{mode}");
        psql(&format!("DROP TABLE {t}"));
    }
}

/// `exactly_once`: the same file read twice (a replay) appends its rows
/// once; a refused row still goes to `error` and the rest commit with the
/// batch's positions in one transaction.
#[tokio::test]
async fn exactly_once_appends_skip_positions_already_committed() {
    setup();
    for mode in ["copy", "insert"] {
        let t = table(&format!("pg_once_{mode}"));
        let offsets = format!("{t}_offsets");
        psql(&format!("CREATE TABLE {t} (n bigint NOT NULL CHECK (n <> 77))"));
        let dir = tempfile::tempdir().unwrap();
        let lines: String = (0..1_000).map(|n| format!("{{\"n\":{n}}}\n")).collect();
        std::fs::write(dir.path().join("in.ndjson"), lines).unwrap();
        let output = format!(
            "{{ type: postgres, url: \"{}\", table: {t}, mode: {mode}, exactly_once: true, offsets_table: {offsets}, columns: {{ n: {{ from: n, type: integer }} }}, batch: {{ max_events: 300 }}, from: in }}",
            database_url()
        );
        for run in 1..=2 {
            let report = run_yaml(&pipeline(dir.path(), &output), RunContext::new()).await;
            assert!(!report.lost_events(), "{mode} run {run}: {report:?}");
            let sum: u64 = (0..1_000u64).filter(|n| *n != 77).sum();
            let stored = psql(&format!("SELECT count(*), count(DISTINCT n), sum(n) FROM {t}"));
            assert_eq!(stored.trim(), format!("999|999|{sum}"), "{mode} run {run}: every row once");
            let committed = psql(&format!("SELECT target, \"offset\" FROM {offsets}"));
            assert_eq!(committed.lines().count(), 1, "{mode}: one source stream: {committed}");
            assert!(committed.starts_with(&format!("{t}|")), "{mode}: keyed by the target table: {committed}");
        }
        // Refused on the first run only: the second run skipped its position.
        assert_eq!(dead(dir.path()).len(), 1, "{mode}: {:?}", dead(dir.path()));
        psql(&format!("DROP TABLE {t}; DROP TABLE {offsets}"));
    }
}
