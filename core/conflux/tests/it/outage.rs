//! A store cut away for ten seconds mid-stream and restored, on the real
//! binary: `/ready` is red while it is down and green after, the process
//! holds its memory (backpressure up to the file input, not buffering) and
//! every line of the input ends up stored.

use crate::{free_addr, rss_kib};
use std::path::Path;
use std::time::{Duration, Instant};

use conflux_testkit::FaultProxy;

const LINES: u64 = 1_000_000;
/// Each line carries this much padding: a process buffering what it cannot
/// write would grow by about 100 MiB over the file.
const PAD: usize = 100;
/// What the process may grow by while the store is away.
const MAX_GROWTH_KIB: u64 = 48 * 1024;

fn write_input(dir: &Path) {
    let pad = "x".repeat(PAD);
    let mut text = String::with_capacity(LINES as usize * (PAD + 24));
    for n in 0..LINES {
        text.push_str(&format!("{{\"n\":{n},\"pad\":\"{pad}\"}}\n"));
    }
    std::fs::write(dir.join("in.ndjson"), text).unwrap();
}

/// Runs `output` (a YAML mapping naming the store at `{addr}`) behind a
/// fault proxy to `service`, cuts the proxy for 10 s once writes are going,
/// and returns once the run has written the whole input and exited.
/// `stored` counts the distinct lines the store holds.
fn cut_for_ten_seconds(service: &str, output: impl Fn(&str) -> String, mut stored: impl FnMut() -> u64) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime.block_on(FaultProxy::start(service)).expect("fault proxy");
    let dir = tempfile::tempdir().unwrap();
    write_input(dir.path());
    let admin = free_addr();
    let pipeline = dir.path().join("outage.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: outage
admin: {{ address: \"{admin}\" }}
inputs:
  in: {{ type: file, path: in.ndjson }}
outputs:
  store: {}
",
            output(&proxy.host_port())
        ),
    )
    .unwrap();
    let ready = || runtime.block_on(crate::http_get(admin, "/ready")).0;
    let wait = |what: &str, timeout: Duration, done: &mut dyn FnMut() -> bool| {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < timeout, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut run = crate::start_conflux(&pipeline);
    let pid = run.0.id();
    wait("the first writes", Duration::from_secs(60), &mut || stored() > 0);
    wait("/ready to answer 200", Duration::from_secs(10), &mut || ready() == 200);
    let before = rss_kib(pid);
    proxy.cut();
    let cut_at = Instant::now();
    wait("/ready to answer 503 while the store is away", Duration::from_secs(10), &mut || ready() == 503);
    let mut peak = before;
    while cut_at.elapsed() < Duration::from_secs(10) {
        peak = peak.max(rss_kib(pid));
        assert!(run.0.try_wait().unwrap().is_none(), "the run keeps going while the store is away");
        std::thread::sleep(Duration::from_millis(100));
    }
    let during = stored();
    eprintln!("outage of {service}: {during} of {LINES} lines stored during the cut, RSS {before} KiB before, {peak} KiB at most during");
    proxy.restore();
    wait("/ready to answer 200 again", Duration::from_secs(30), &mut || {
        ready() == 200 || run.0.try_wait().unwrap().is_some()
    });
    let status = run.0.wait().unwrap();
    assert!(status.success(), "the run reads its input to the end and exits: {status}");
    assert!(during < LINES, "the cut came mid-stream ({during} of {LINES} stored by then)");
    assert!(
        peak.saturating_sub(before) < MAX_GROWTH_KIB,
        "memory while the store was away: {before} KiB before the cut, {peak} KiB at most during it"
    );
    assert_eq!(stored(), LINES, "every line stored after the store came back");
}

#[test]
fn postgres_cut_away_for_ten_seconds_loses_nothing_and_holds_memory() {
    let table = crate::key("pg_outage").replace('-', "_");
    let count = || {
        let out = std::process::Command::new("psql")
            .arg(crate::postgres_output::database_url())
            .args(["-Atq", "-c", &format!("SELECT count(DISTINCT n) FROM {table}")])
            .output()
            .expect("psql (scripts/test.sh starts PostgreSQL)");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    };
    cut_for_ten_seconds(
        "127.0.0.1:5432",
        |addr| {
            format!(
                "{{ type: postgres, from: in, url: \"postgres://postgres@{addr}/postgres\", table: {table}, create: true, columns: {{ n: {{ from: n, type: integer }}, pad: {{ from: pad, type: text }} }}, batch: {{ max_events: 5000 }}, retry: {{ initial_backoff: 100ms, max_backoff: 1s }} }}"
            )
        },
        count,
    );
    crate::postgres_output::psql(&format!("DROP TABLE {table}"));
}

#[test]
fn redis_cut_away_for_ten_seconds_loses_nothing_and_holds_memory() {
    use redis::AsyncCommands;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let redis = runtime.block_on(crate::redis_output::redis());
    let key = crate::key("outage");
    let count = || runtime.block_on(async { redis.clone().hlen::<_, u64>(&key).await.unwrap() });
    cut_for_ten_seconds(
        crate::redis_output::REDIS,
        |addr| {
            format!(
                "{{ type: redis, from: in, url: \"redis://{addr}\", commands: [{{ hincrby: {{ key: \"{key}\", field: \"{{{{ n }}}}\" }} }}], batch: {{ max_events: 5000 }}, retry: {{ initial_backoff: 100ms, max_backoff: 1s }} }}"
            )
        },
        count,
    );
    // UNLINK: a hash of a million fields is freed in the background.
    let _: () = runtime.block_on(redis::cmd("UNLINK").arg(&key).query_async(&mut redis.clone())).unwrap();
}
