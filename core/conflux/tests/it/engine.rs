//! The engine through real pipeline files: wiring, acknowledgements, retries,
//! drain, backpressure and metrics.

use std::time::Duration;

use conflux_api::AckStatus;
use conflux_engine::runtime::RunContext;
use conflux_testkit::{acks, delivered, emitted, release, run_yaml};

use crate::{http_get, key, setup, AdminServer};

fn ns(values: &[serde_json::Value]) -> Vec<u64> {
    let mut n: Vec<u64> = values.iter().map(|v| v["n"].as_u64().unwrap()).collect();
    n.sort_unstable();
    n
}

#[tokio::test]
async fn fan_in_and_fan_out_deliver_every_event_everywhere() {
    setup();
    let (a, b, out1, out2) = (key("a"), key("b"), key("o1"), key("o2"));
    let yaml = format!(
        "inputs:
  a: {{ type: test_source, key: {a}, count: 250, batch_size: 50 }}
  b: {{ type: test_source, key: {b}, count: 120 }}
outputs:
  one: {{ type: test_sink, key: {out1}, from: [a, b] }}
  two: {{ type: test_sink, key: {out2}, from: a }}
"
    );
    let report = run_yaml(&yaml, RunContext::new()).await;
    assert!(!report.failed && !report.forced);
    assert_eq!(delivered(&out1).len(), 370, "fan-in: both inputs reach `one`");
    assert_eq!(ns(&delivered(&out2)), (0..250).collect::<Vec<_>>(), "fan-out: `two` gets all of `a`");
    assert_eq!(acks(&a), vec![AckStatus::Delivered; 250]);
    assert_eq!(acks(&b), vec![AckStatus::Delivered; 120]);
}

#[tokio::test]
async fn named_ports_route_events_to_their_readers() {
    setup();
    let (src, even, odd) = (key("src"), key("even"), key("odd"));
    let yaml = format!(
        "inputs:
  src: {{ type: test_source, key: {src}, count: 10, batch_size: 1 }}
stages:
  split: {{ type: test_split, from: src }}
outputs:
  evens: {{ type: test_sink, key: {even}, from: split }}
  odds: {{ type: test_sink, key: {odd}, from: split.odd }}
"
    );
    run_yaml(&yaml, RunContext::new()).await;
    assert_eq!(ns(&delivered(&even)), vec![0, 2, 4, 6, 8]);
    assert_eq!(ns(&delivered(&odd)), vec![1, 3, 5, 7, 9]);
    assert_eq!(acks(&src).len(), 10);
    assert!(acks(&src).iter().all(|s| *s == AckStatus::Delivered));
}

#[tokio::test]
async fn unwired_error_port_rejects_the_failed_event_and_counts_it() {
    setup();
    conflux_rhai::link();
    let (src, sink) = (key("src"), key("sink"));
    // One event per batch, so each acknowledgement is one event's.
    let yaml = format!(
        "name: unwired
inputs:
  src: {{ type: test_source, key: {src}, count: 10, batch_size: 1 }}
stages:
  strict:
    type: rhai
    from: src
    script: |
      if event.n % 3 == 0 {{ throw \"multiple of three\" }}
      event
outputs:
  out: {{ type: test_sink, key: {sink}, from: strict }}
"
    );
    let cx = RunContext::new();
    let report = run_yaml(&yaml, cx.clone()).await;
    assert!(!report.failed && !report.forced);
    assert_eq!(ns(&delivered(&sink)), vec![1, 2, 4, 5, 7, 8], "the other events flow on");
    let acks = acks(&src);
    assert_eq!(acks.len(), 10);
    let rejected = acks.iter().filter(|s| **s == AckStatus::Rejected).count();
    let delivered = acks.iter().filter(|s| **s == AckStatus::Delivered).count();
    assert_eq!((rejected, delivered), (4, 6), "0, 3, 6, 9 go back to the source as rejected: {acks:?}");
    let metrics = cx.metrics.encode();
    for line in [
        r#"conflux_events_discarded_total{pipeline="unwired",component="strict",kind="stage",port="error"} 4"#,
        r#"conflux_errors_total{pipeline="unwired",component="strict",kind="stage"} 4"#,
        r#"conflux_events_sent_total{pipeline="unwired",component="strict",kind="stage",port="default"} 6"#,
    ] {
        assert!(metrics.contains(line), "missing `{line}` in\n{metrics}");
    }
}

#[tokio::test]
async fn ack_waits_for_every_output_the_event_reached() {
    setup();
    let (src, fast, slow) = (key("src"), key("fast"), key("slow"));
    let yaml = format!(
        "inputs:
  src: {{ type: test_source, key: {src}, count: 5, batch_size: 5 }}
outputs:
  fast: {{ type: test_sink, key: {fast}, from: src }}
  slow: {{ type: test_sink, key: {slow}, from: src, gated: true }}
"
    );
    let run = tokio::spawn(async move { run_yaml(&yaml, RunContext::new()).await });
    // The fast output has everything, yet nothing is acknowledged while `slow` holds the batch.
    for _ in 0..100 {
        if delivered(&fast).len() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(delivered(&fast).len(), 5);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(acks(&src).is_empty(), "acknowledged before the second output confirmed");
    release(&slow, 1);
    let report = run.await.unwrap();
    assert!(!report.failed);
    assert_eq!(acks(&src), vec![AckStatus::Delivered; 5]);
}

#[tokio::test]
async fn failing_output_is_retried_without_loss() {
    setup();
    let (src, sink) = (key("src"), key("sink"));
    let yaml = format!(
        "inputs:
  src: {{ type: test_source, key: {src}, count: 300, batch_size: 100 }}
outputs:
  flaky:
    type: test_sink
    key: {sink}
    fail_first: 3
    from: src
    retry: {{ initial_backoff: 5ms, max_backoff: 20ms }}
"
    );
    let cx = RunContext::new();
    run_yaml(&yaml, cx.clone()).await;
    assert_eq!(ns(&delivered(&sink)), (0..300).collect::<Vec<_>>());
    assert_eq!(acks(&src), vec![AckStatus::Delivered; 300]);
    let metrics = cx.metrics.encode();
    assert!(
        metrics.contains(r#"conflux_output_retries_total{pipeline="test",component="flaky",kind="output"} 3"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn exhausted_retries_fail_back_to_the_source_not_acknowledge() {
    setup();
    let (src, sink) = (key("src"), key("sink"));
    let yaml = format!(
        "inputs:
  src: {{ type: test_source, key: {src}, count: 10, batch_size: 10 }}
outputs:
  broken: {{ type: test_sink, key: {sink}, fail_first: 100, from: src, retry: {{ initial_backoff: 1ms, max_attempts: 3 }} }}
"
    );
    run_yaml(&yaml, RunContext::new()).await;
    assert_eq!(acks(&src), vec![AckStatus::Errored; 10]);
    assert!(delivered(&sink).is_empty());
}

#[tokio::test]
async fn fatal_write_errors_fail_the_events() {
    setup();
    let (src, sink) = (key("src"), key("sink"));
    let yaml = format!(
        "inputs:
  src: {{ type: test_source, key: {src}, count: 4, batch_size: 2 }}
outputs:
  refuses: {{ type: test_sink, key: {sink}, fatal: true, from: src }}
"
    );
    run_yaml(&yaml, RunContext::new()).await;
    assert_eq!(acks(&src), vec![AckStatus::Errored; 4]);
}

#[tokio::test]
async fn stop_drains_in_flight_events_before_returning() {
    setup();
    let (src, sink) = (key("src"), key("sink"));
    let yaml = format!(
        "runtime: {{ channel_capacity: 4, shutdown_timeout: 10s }}
inputs:
  src: {{ type: test_source, key: {src}, batch_size: 10 }}
outputs:
  slow: {{ type: test_sink, key: {sink}, delay: 20ms, from: src }}
"
    );
    let cx = RunContext::new();
    let stop = cx.stop.clone();
    let run = tokio::spawn(async move { run_yaml(&yaml, cx).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let report = run.await.unwrap();
    assert!(!report.forced && !report.failed);
    let n = emitted(&src);
    assert!(n > 0);
    assert_eq!(delivered(&sink).len(), n, "every emitted event reached the output");
    assert_eq!(acks(&src), vec![AckStatus::Delivered; n]);
}

#[tokio::test]
async fn deadline_fails_back_what_could_not_drain() {
    setup();
    let (src, sink) = (key("src"), key("sink"));
    let yaml = format!(
        "runtime: {{ channel_capacity: 2, shutdown_timeout: 200ms }}
inputs:
  src: {{ type: test_source, key: {src}, batch_size: 10 }}
outputs:
  stuck: {{ type: test_sink, key: {sink}, gated: true, from: src }}
"
    );
    let cx = RunContext::new();
    let stop = cx.stop.clone();
    let run = tokio::spawn(async move { run_yaml(&yaml, cx).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    let report = run.await.unwrap();
    assert!(report.forced);
    let statuses = acks(&src);
    assert_eq!(statuses.len(), emitted(&src), "every emitted event got an answer");
    assert!(statuses.iter().all(|s| *s == AckStatus::Errored), "nothing undelivered was acknowledged");
}

#[tokio::test]
async fn slow_output_bounds_events_in_flight() {
    setup();
    let (src, sink) = (key("src"), key("sink"));
    let yaml = format!(
        "runtime: {{ channel_capacity: 2 }}
inputs:
  src: {{ type: test_source, key: {src}, batch_size: 100 }}
stages:
  pass: {{ type: test_split, from: src }}
outputs:
  slow: {{ type: test_sink, key: {sink}, delay: 50ms, from: [pass, pass.odd] }}
"
    );
    let cx = RunContext::new();
    let stop = cx.stop.clone();
    let run = tokio::spawn(async move { run_yaml(&yaml, cx).await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let in_flight = emitted(&src) - acks(&src).len();
    stop.cancel();
    run.await.unwrap();
    // 2 channels × 2 batches × 100 events, plus a batch being handled at each hop.
    assert!(in_flight <= 800, "{in_flight} events in flight: backpressure did not reach the input");
    assert!(emitted(&src) < 5_000, "the input kept reading ({}) while the output crawled", emitted(&src));
}

#[tokio::test]
async fn admin_server_reports_health_readiness_and_counters() {
    setup();
    let (src, sink) = (key("src"), key("sink"));
    let yaml = format!(
        "name: metered
inputs:
  src: {{ type: test_source, key: {src}, count: 42, batch_size: 10 }}
stages:
  split: {{ type: test_split, from: src }}
outputs:
  out: {{ type: test_sink, key: {sink}, from: [split, split.odd] }}
"
    );
    let cx = RunContext::new();
    let admin = AdminServer::start(&cx).await;
    let addr = admin.addr;

    let (status, body) = http_get(addr, "/ready").await;
    assert_eq!(status, 503, "not ready before any pipeline started: {body}");
    run_yaml(&yaml, cx.clone()).await;
    let (status, _) = http_get(addr, "/health").await;
    assert_eq!(status, 200);
    let (status, body) = http_get(addr, "/ready").await;
    assert_eq!(status, 503, "a pipeline that ended is gone from readiness: {body}");
    let (status, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"conflux_events_sent_total{pipeline="metered",component="src",kind="input",port="default"} 42"#,
        r#"conflux_events_received_total{pipeline="metered",component="split",kind="stage"} 42"#,
        r#"conflux_events_sent_total{pipeline="metered",component="split",kind="stage",port="odd"} 21"#,
        r#"conflux_events_sent_total{pipeline="metered",component="out",kind="output",port="default"} 42"#,
        r#"conflux_input_acks_total{pipeline="metered",component="src",kind="input",status="delivered"} 42"#,
        r#"conflux_input_unacked_events{pipeline="metered",component="src",kind="input"} 0"#,
        r#"conflux_batch_duration_seconds_count{pipeline="metered",component="out",kind="output"}"#,
        r#"conflux_queued_batches{pipeline="metered",component="out",kind="output"}"#,
    ] {
        assert!(metrics.contains(line), "missing `{line}` in\n{metrics}");
    }
    admin.stop().await;
}

#[tokio::test]
async fn a_failing_pipeline_stops_alone_and_the_others_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let addr = crate::free_addr();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "inputs:\n  in: { type: file, path: missing.ndjson }\noutputs:\n  out: { type: drop, from: in }\n",
    )
    .unwrap();
    let serving = dir.path().join("serving.yaml");
    std::fs::write(
        &serving,
        format!(
            "inputs:\n  api: {{ type: http_server, address: \"{addr}\", ack: sync }}\noutputs:\n  out: {{ type: file, path: out.ndjson, from: api }}\n"
        ),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_conflux"))
        .env("CONFLUX_LOG", "error")
        .arg("run")
        .arg(&broken)
        .arg(&serving)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut process = crate::Conflux(child);
    crate::wait_listening(addr).await;
    // The broken pipeline fails at once; give it time to take others down if it would.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, answer) = crate::hostile::post(addr, "application/json", br#"{"n":1}"#.to_vec()).await;
    assert_eq!(status, 200, "the other pipeline still serves: {answer}");
    assert_eq!(std::fs::read_to_string(dir.path().join("out.ndjson")).unwrap(), "{\"n\":1}\n");
    assert!(process.0.try_wait().unwrap().is_none(), "the process keeps running");

    let pid = process.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = process.0.wait().unwrap();
    assert_eq!(status.code(), Some(1), "a pipeline failed, so the run did not end clean");
    let mut stderr = String::new();
    std::io::Read::read_to_string(process.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("missing.ndjson"), "the failure names the file: {stderr}");
}

/// A pipeline that ends takes its series and readiness entries with it,
/// while the process goes on serving the others.
#[tokio::test]
async fn an_ended_pipeline_leaves_metrics_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let (api, admin) = (crate::free_addr(), crate::free_addr());
    let finite = dir.path().join("finite.yaml");
    std::fs::write(
        &finite,
        "name: finite\ninputs:\n  gen: { type: generate, count: 30, rate: 20/s }\noutputs:\n  out: { type: drop, from: gen }\n",
    )
    .unwrap();
    let serving = dir.path().join("serving.yaml");
    std::fs::write(
        &serving,
        format!("name: serving\ninputs:\n  api: {{ type: http_server, address: \"{api}\" }}\noutputs:\n  out: {{ type: drop, from: api }}\n"),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_conflux"))
        .env("CONFLUX_LOG", "error")
        .args(["run", "--admin", &admin.to_string()])
        .arg(&finite)
        .arg(&serving)
        .spawn()
        .unwrap();
    let process = crate::Conflux(child);
    crate::wait_listening(admin).await;
    let (_, running) = http_get(admin, "/metrics").await;
    assert!(running.contains(r#"pipeline="finite""#), "the finite pipeline is counted while it runs:\n{running}");
    // 30 events at 20/s: done in about 1.5 s.
    let mut ended = String::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (_, ended) = http_get(admin, "/metrics").await;
        if !ended.contains(r#"pipeline="finite""#) {
            break;
        }
    }
    assert!(!ended.contains(r#"pipeline="finite""#), "an ended pipeline's series stay:\n{ended}");
    assert!(
        ended.contains(concat!("\n", r#"conflux_component_up{pipeline="serving",component="api"} 1"#)),
        "the running pipeline is still exported:\n{ended}"
    );
    let (status, ready) = http_get(admin, "/ready").await;
    assert_eq!(status, 200, "only the running pipeline counts for readiness: {ready}");
    drop(process);
}
