//! Effectively-once aggregation on the real binary: a run killed with
//! SIGKILL mid-stream and restarted ends with exactly the right figures.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LINES: u64 = 6_000;
const RESTAURANTS: u64 = 5;

/// Line `i`: restaurant r{i%5}, three seconds of event time per line (20 a minute).
fn line(i: u64) -> String {
    let t = 1_795_860_000 + i * 3; // epoch seconds, on a minute boundary
    format!("{{\"r\":\"r{}\",\"t\":{t},\"g\":{}}}\n", i % RESTAURANTS, i % 10)
}

/// (restaurant, window start in epoch seconds) → (count, sum) of every window the sentinel closes.
fn expected() -> BTreeMap<(String, i64), (u64, u64)> {
    let mut figures = BTreeMap::new();
    for i in 0..LINES {
        let t = 1_795_860_000 + i as i64 * 3;
        let entry = figures.entry((format!("r{}", i % RESTAURANTS), t - t.rem_euclid(60))).or_insert((0, 0));
        entry.0 += 1;
        entry.1 += i % 10;
    }
    figures
}

fn append(path: &Path, lines: std::ops::Range<u64>) {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    let text: String = lines.map(line).collect();
    file.write_all(text.as_bytes()).unwrap();
}

fn start(pipeline: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_conflux"))
        .env("CONFLUX_LOG", "warn")
        .arg("run")
        .arg(pipeline)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Every complete result line written so far, as (key, (count, sum)).
fn results(path: &Path) -> Vec<((String, i64), (u64, u64))> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["r"] != "sentinel")
        .map(|r| {
            let start = chrono::DateTime::parse_from_rfc3339(r["window"]["start"].as_str().unwrap()).unwrap();
            (
                (r["r"].as_str().unwrap().to_string(), start.timestamp()),
                (r["n"].as_u64().unwrap(), r["guests"].as_u64().unwrap()),
            )
        })
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigkill_mid_stream_then_restart_gives_exact_window_results() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.ndjson");
    let output = dir.path().join("out.ndjson");
    let checkpoint = dir.path().join(".conflux/restart/agg.checkpoint.json");
    std::fs::write(&input, "").unwrap();
    let pipeline = dir.path().join("restart.yaml");
    std::fs::write(
        &pipeline,
        "name: restart
inputs:
  in: { type: file, path: in.ndjson, follow: true, poll_interval: 10ms, batch_size: 50 }
stages:
  agg:
    type: aggregate
    from: in
    group_by: [r]
    time: { field: t }
    window: { tumbling: 1m }
    idle_timeout: 1h
    metrics:
      n: { count: {} }
      guests: { sum: g }
    checkpoint: { interval: 50ms }
outputs:
  out: { type: file, path: out.ndjson, append: true, from: agg }
",
    )
    .unwrap();

    // First run: a stream arriving in chunks; killed once snapshots and results exist
    // and more lines have arrived since.
    let mut first = start(&pipeline);
    for chunk in 0..12 {
        append(&input, chunk * 200..(chunk + 1) * 200);
        std::thread::sleep(Duration::from_millis(30));
    }
    wait_for("a first checkpoint and results", Duration::from_secs(60), || {
        checkpoint.exists() && results(&output).len() > 20
    });
    append(&input, 2_400..3_600);
    std::thread::sleep(Duration::from_millis(40));
    first.kill().unwrap(); // SIGKILL: no drain, no final snapshot
    first.wait().unwrap();
    let before_restart = results(&output).len();
    assert!(before_restart > 20, "the first run got somewhere: {before_restart} results");

    // Second run: the file is read again from the top; what the snapshot counted is skipped.
    let mut second = start(&pipeline);
    append(&input, 3_600..LINES);
    // A line far ahead in event time pushes the watermark past every real window.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .unwrap()
        .write_all(b"{\"r\":\"sentinel\",\"t\":1795990000,\"g\":0}\n")
        .unwrap();
    let expected = expected();
    wait_for("every window's result", Duration::from_secs(120), || {
        let got: BTreeMap<_, _> = results(&output).into_iter().collect();
        expected.keys().all(|k| got.contains_key(k))
    });
    assert!(Command::new("kill").args(["-TERM", &second.id().to_string()]).status().unwrap().success());
    assert!(second.wait().unwrap().success());

    let all = results(&output);
    for (key, figures) in &all {
        assert_eq!(
            Some(figures),
            expected.get(key),
            "window {key:?}: every result written, before or after the crash, is exact"
        );
    }
    let got: BTreeMap<_, _> = all.into_iter().collect();
    assert_eq!(got, expected, "no window lost");
}
