//! The stores through crashes: a pipeline killed with SIGKILL ten times
//! under load and restarted each time (its file input read again from the
//! top, as a replay after a crash would) ends with exactly what an
//! independent count of the input says: `exactly_once` appends with no
//! duplicate and no gap, Redis counters fenced by `idempotent`, window
//! results upserted by key.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use crate::postgres_output::{database_url, psql};
use crate::redis_output::REDIS;

const LINES: u64 = 120_000;
const KILLS: u64 = 10;

/// Line `i`: an order of restaurant r{i%7}, `g` guests, three seconds of event time apart.
fn line(i: u64) -> String {
    format!("{{\"id\":{i},\"r\":\"r{}\",\"g\":{},\"t\":{}}}\n", i % 7, i % 9 + 1, 1_795_860_000 + i * 3)
}

fn write_input(dir: &Path) {
    let text: String = (0..LINES).map(line).collect();
    std::fs::write(dir.join("in.ndjson"), text).unwrap();
}

/// Starts the pipeline `KILLS` times, killing each run with SIGKILL after a
/// different time, then lets a last run read the input to its end.
fn kill_and_restart(pipeline: &Path, mut progress: impl FnMut() -> u64) {
    let mut last = 0;
    for kill in 0..KILLS {
        let mut run = crate::start_conflux(pipeline);
        // Wait for the run to write something new, then kill it a little later, mid-batch.
        let started = Instant::now();
        while progress() <= last && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(5 + kill * 7));
        run.0.kill().unwrap();
        run.0.wait().unwrap();
        let now = progress();
        assert!(now > last, "run {kill} made progress before its SIGKILL ({last} → {now})");
        last = now;
    }
    assert!(last < LINES, "the kills came mid-stream, not after the end ({last} of {LINES})");
    let mut run = crate::start_conflux(pipeline);
    let status = run.0.wait().unwrap();
    assert!(status.success(), "the last run reads the input to its end and exits: {status}");
}

#[test]
fn exactly_once_appends_survive_ten_sigkills_with_no_duplicate_and_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    write_input(dir.path());
    let table = crate::key("pg_crash").replace('-', "_");
    let offsets = format!("{table}_offsets");
    let pipeline = dir.path().join("append.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: append
inputs:
  in: {{ type: file, path: in.ndjson, batch_size: 200 }}
outputs:
  pg:
    type: postgres
    from: in
    url: \"{}\"
    table: {table}
    create: true
    exactly_once: true
    offsets_table: {offsets}
    columns: {{ id: {{ from: id, type: integer }}, r: {{ from: r, type: text }}, g: {{ from: g, type: integer }} }}
    batch: {{ max_events: 100 }}
",
            database_url()
        ),
    )
    .unwrap();
    let count = || {
        let out = psql(&format!("SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT {LINES}) t"));
        out.trim().parse::<u64>().unwrap_or(0)
    };
    // The table exists once the first run connected.
    let rows = || if psql(&format!("SELECT to_regclass('{table}') IS NOT NULL")).trim() == "t" { count() } else { 0 };
    kill_and_restart(&pipeline, rows);
    let sum_g: u64 = (0..LINES).map(|i| i % 9 + 1).sum();
    let expected = format!("{LINES}|{LINES}|0|{}|{sum_g}", LINES - 1);
    let got = psql(&format!("SELECT count(*), count(DISTINCT id), min(id), max(id), sum(g) FROM {table}"));
    assert_eq!(got.trim(), expected, "every line once: count, distinct ids, first, last, sum of guests");
    psql(&format!("DROP TABLE {table}; DROP TABLE {offsets}"));
}

#[test]
fn fenced_redis_counters_survive_ten_sigkills_exactly() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut redis = runtime.block_on(crate::redis_output::redis());
    let dir = tempfile::tempdir().unwrap();
    write_input(dir.path());
    let prefix = crate::key("crash");
    let pipeline = dir.path().join("counters.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: counters
inputs:
  in: {{ type: file, path: in.ndjson, batch_size: 200 }}
outputs:
  counters:
    type: redis
    from: in
    url: redis://{REDIS}
    idempotent: true
    fence_key: \"{prefix}:fence\"
    commands:
      - {{ hincrby: {{ key: \"{prefix}:guests\", field: \"{{{{ r }}}}\", by: \"{{{{ g }}}}\" }} }}
      - {{ incrby: {{ key: \"{prefix}:orders\", by: 1 }} }}
    batch: {{ max_events: 500 }}
"
        ),
    )
    .unwrap();
    let orders_key = format!("{prefix}:orders");
    let progress =
        || runtime.block_on(async { redis.clone().get::<_, Option<u64>>(&orders_key).await.unwrap().unwrap_or(0) });
    kill_and_restart(&pipeline, progress);
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..LINES {
        *expected.entry(format!("r{}", i % 7)).or_default() += (i % 9 + 1) as i64;
    }
    let (orders, guests): (u64, BTreeMap<String, i64>) = runtime.block_on(async {
        (redis.get(&orders_key).await.unwrap(), redis.hgetall(format!("{prefix}:guests")).await.unwrap())
    });
    assert_eq!(orders, LINES, "one increment per line, none twice across the replays");
    assert_eq!(guests, expected, "guests per restaurant");
    let _: () =
        runtime.block_on(redis.del(&[orders_key, format!("{prefix}:guests"), format!("{prefix}:fence")])).unwrap();
}

/// A fence is exact only when writes run one at a time and are never
/// failed back while later ones go on: other engine options are refused.
#[test]
fn fences_refuse_engine_options_that_would_break_them() {
    crate::setup();
    let lint = |output: &str| {
        let yaml = format!("inputs:\n  in: {{ type: file, path: in.ndjson }}\noutputs:\n  out: {output}\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_conflux")).arg("lint").arg(&path).output().unwrap();
        assert!(!out.status.success(), "lint accepts {output}");
        format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout))
    };
    let pg = "type: postgres, from: in, url: \"postgres://h/db\", table: t, columns: { n: { from: n, type: integer } }, exactly_once: true";
    let message = lint(&format!("{{ {pg}, max_in_flight: 4 }}"));
    assert!(message.contains("exactly_once") && message.contains("max_in_flight: 1"), "{message}");
    let message = lint(&format!("{{ {pg}, retry: {{ max_attempts: 3 }} }}"));
    assert!(message.contains("retry.max_attempts: 0"), "{message}");
    let redis = "type: redis, from: in, idempotent: true, commands: [{ incrby: { key: k } }]";
    let message = lint(&format!("{{ {redis}, max_in_flight: 2 }}"));
    assert!(message.contains("idempotent") && message.contains("max_in_flight: 1"), "{message}");
}

/// Window results (absolute figures per key) upserted into PostgreSQL and
/// written to Redis hashes by key, through ten SIGKILLs: the aggregate's
/// checkpoint skips what it had counted, a result written again overwrites.
#[test]
fn upserted_window_results_survive_ten_sigkills_exactly() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut redis = runtime.block_on(crate::redis_output::redis());
    let dir = tempfile::tempdir().unwrap();
    write_input(dir.path());
    let table = crate::key("pg_windows").replace('-', "_");
    let prefix = crate::key("windows");
    let pipeline = dir.path().join("windows.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: windows
inputs:
  in: {{ type: file, path: in.ndjson, batch_size: 200 }}
stages:
  per_minute:
    type: aggregate
    from: in
    group_by: [r]
    time: {{ field: t }}
    window: {{ tumbling: 1m }}
    idle_timeout: 1h
    metrics: {{ n: {{ count: {{}} }}, guests: {{ sum: g }} }}
    checkpoint: {{ interval: 20ms }}
outputs:
  history:
    type: postgres
    from: per_minute
    url: \"{}\"
    table: {table}
    create: true
    mode: upsert
    key: [result_key]
    columns:
      result_key: {{ from: meta.result_key, type: text }}
      r: {{ from: r, type: text }}
      start: {{ from: window.start, type: timestamp }}
      n: {{ from: n, type: integer }}
      guests: {{ from: guests, type: integer }}
    batch: {{ max_events: 200 }}
  hot:
    type: redis
    from: per_minute
    url: redis://{REDIS}
    commands:
      - hset: {{ key: \"{prefix}:{{{{ r }}}}:{{{{ window.start }}}}\", fields: {{ n: \"{{{{ n }}}}\", guests: \"{{{{ guests }}}}\" }} }}
",
            database_url()
        ),
    )
    .unwrap();
    let rows = || {
        if psql(&format!("SELECT to_regclass('{table}') IS NOT NULL")).trim() != "t" {
            return 0;
        }
        psql(&format!("SELECT count(*) FROM {table}")).trim().parse::<u64>().unwrap_or(0)
    };
    kill_and_restart(&pipeline, rows);

    // Computed from the input alone: (restaurant, minute start) → (lines, guests).
    let mut expected: BTreeMap<(String, i64), (u64, u64)> = BTreeMap::new();
    for i in 0..LINES {
        let t = 1_795_860_000 + i as i64 * 3;
        let figures = expected.entry((format!("r{}", i % 7), t - t.rem_euclid(60))).or_default();
        figures.0 += 1;
        figures.1 += i % 9 + 1;
    }
    let stored: BTreeMap<(String, i64), (u64, u64)> =
        psql(&format!("SELECT r, extract(epoch FROM start)::bigint, n, guests FROM {table}"))
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split('|').collect();
                ((f[0].to_string(), f[1].parse().unwrap()), (f[2].parse().unwrap(), f[3].parse().unwrap()))
            })
            .collect();
    assert_eq!(stored.len(), expected.len(), "one row per window");
    let wrong: Vec<_> = stored.iter().filter(|(k, v)| expected.get(*k) != Some(*v)).take(5).collect();
    assert!(wrong.is_empty(), "windows whose upserted figures differ from the input's: {wrong:?}");

    let keys: Vec<String> = runtime.block_on(async {
        let mut keys = Vec::new();
        let mut iter: redis::AsyncIter<String> = redis.scan_match(format!("{prefix}:*")).await.unwrap();
        while let Some(Ok(key)) = futures_util::StreamExt::next(&mut iter).await {
            keys.push(key);
        }
        keys
    });
    assert_eq!(keys.len(), expected.len(), "one Redis hash per window");
    for key in keys.iter().step_by(37) {
        // `<prefix>:<restaurant>:<window start, RFC 3339>`
        let rest = key.strip_prefix(&format!("{prefix}:")).unwrap();
        let (r, at) = rest.split_once(':').unwrap();
        let start = chrono::DateTime::parse_from_rfc3339(at).unwrap_or_else(|e| panic!("{key}: {e}")).timestamp();
        let hash: BTreeMap<String, u64> = runtime.block_on(redis.hgetall(key)).unwrap();
        let want = expected.get(&(r.to_string(), start)).unwrap_or_else(|| panic!("{key}: no such window"));
        assert_eq!((hash.get("n"), hash.get("guests")), (Some(&want.0), Some(&want.1)), "{key}");
    }
    let _: () = runtime.block_on(redis::cmd("UNLINK").arg(&keys).query_async(&mut redis)).unwrap();
    psql(&format!("DROP TABLE {table}"));
}
