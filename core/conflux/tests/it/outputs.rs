//! The output runtime: write batches gathered by the engine, several writes
//! in flight, refused events routed to an output's `error` port, `/ready`
//! following a real service taken away and brought back, and the summary
//! of a finite run that lost events.

use std::collections::BTreeSet;
use std::time::Duration;

use conflux_api::AckStatus;
use conflux_engine::runtime::RunContext;
use conflux_testkit::{acks, batches, delivered, most_concurrent_writes, run_yaml, FaultProxy};

use crate::{key, setup, AdminServer};

fn ns(values: &[serde_json::Value]) -> BTreeSet<u64> {
    values.iter().map(|v| v["n"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn batch_options_gather_small_upstream_batches_into_write_batches() {
    setup();
    let (src, sink) = (key("src"), key("sink"));
    // Ten upstream batches of one event; writes of four, the rest at the end.
    let yaml = format!(
        "inputs:
  src: {{ type: test_source, key: {src}, count: 10, batch_size: 1 }}
outputs:
  out: {{ type: test_sink, key: {sink}, from: src, batch: {{ max_events: 4, linger: 1h }} }}
"
    );
    let report = run_yaml(&yaml, RunContext::new()).await;
    assert!(!report.failed && !report.lost_events(), "{report:?}");
    assert_eq!(batches(&sink), vec![4, 4, 2]);
    assert_eq!(ns(&delivered(&sink)), (0..10).collect());
    assert_eq!(acks(&src), vec![AckStatus::Delivered; 10]);
}

#[tokio::test]
async fn without_linger_a_batch_is_written_as_soon_as_upstream_is_idle() {
    setup();
    let (src, sink) = (key("src"), key("sink"));
    let yaml = format!(
        "inputs:
  src: {{ type: test_source, key: {src}, count: 4, batch_size: 1, interval: 100ms }}
outputs:
  out: {{ type: test_sink, key: {sink}, from: src, batch: {{ max_events: 1000 }} }}
"
    );
    run_yaml(&yaml, RunContext::new()).await;
    // Nothing waits for a batch that may never fill.
    assert_eq!(batches(&sink), vec![1, 1, 1, 1]);
}

#[tokio::test]
async fn upstream_batches_larger_than_max_events_are_split() {
    setup();
    let (src, sink) = (key("src"), key("sink"));
    let yaml = format!(
        "inputs:
  src: {{ type: test_source, key: {src}, count: 250, batch_size: 250 }}
outputs:
  out: {{ type: test_sink, key: {sink}, from: src, batch: {{ max_events: 100 }} }}
"
    );
    run_yaml(&yaml, RunContext::new()).await;
    assert_eq!(batches(&sink), vec![100, 100, 50]);
    assert_eq!(acks(&src), vec![AckStatus::Delivered; 250]);
}

#[tokio::test]
async fn max_in_flight_runs_that_many_writes_at_once_and_acknowledges_each_event() {
    setup();
    for (in_flight, expected) in [(1, 1), (4, 4)] {
        let (src, sink) = (key("src"), key("sink"));
        let yaml = format!(
            "inputs:
  src: {{ type: test_source, key: {src}, count: 60, batch_size: 5 }}
outputs:
  out: {{ type: test_sink, key: {sink}, from: src, delay: 100ms, max_in_flight: {in_flight} }}
"
        );
        run_yaml(&yaml, RunContext::new()).await;
        assert_eq!(most_concurrent_writes(&sink), expected, "max_in_flight: {in_flight}");
        assert_eq!(ns(&delivered(&sink)), (0..60).collect());
        assert_eq!(acks(&src), vec![AckStatus::Delivered; 60]);
    }
}

#[tokio::test]
async fn refused_events_are_rejected_alone_when_the_error_port_is_unwired() {
    setup();
    let (src, sink) = (key("src"), key("sink"));
    let yaml = format!(
        "inputs:
  src: {{ type: test_source, key: {src}, count: 20, batch_size: 20 }}
outputs:
  out: {{ type: test_sink, key: {sink}, from: src, refuse_multiples_of: 5 }}
"
    );
    let report = run_yaml(&yaml, RunContext::new()).await;
    let expected: BTreeSet<u64> = (0..20).filter(|n| n % 5 != 0).collect();
    assert_eq!(ns(&delivered(&sink)), expected, "the batch-mates of the refused events are written");
    let statuses = acks(&src);
    assert_eq!(statuses.len(), 20);
    // One token covers the batch: its worst outcome is what the source hears.
    assert!(statuses.iter().all(|s| *s == AckStatus::Rejected), "{statuses:?}");
    assert_eq!(batches(&sink), vec![20], "a refused event is not retried");
    assert!(report.lost_events(), "{report:?}");
    assert_eq!(report.inputs[0].rejected, 20);
}

#[tokio::test]
async fn refused_events_go_to_a_dead_letter_output_wired_to_the_error_port() {
    setup();
    let (src, sink, dead) = (key("src"), key("sink"), key("dead"));
    let yaml = format!(
        "inputs:
  src: {{ type: test_source, key: {src}, count: 20, batch_size: 1 }}
outputs:
  out: {{ type: test_sink, key: {sink}, from: src, refuse_multiples_of: 5 }}
  dead: {{ type: test_sink, key: {dead}, from: out.error }}
"
    );
    let cx = RunContext::new();
    let report = run_yaml(&yaml, cx.clone()).await;
    assert_eq!(ns(&delivered(&sink)), (0..20).filter(|n| n % 5 != 0).collect());
    assert_eq!(ns(&delivered(&dead)), [0, 5, 10, 15].into_iter().collect());
    assert_eq!(acks(&src), vec![AckStatus::Delivered; 20], "a dead-lettered event is delivered");
    assert!(!report.lost_events());
    let metrics = cx.metrics.encode();
    let line = r#"conflux_events_sent_total{pipeline="test",component="out",kind="output",port="error"} 4"#;
    assert!(metrics.contains(line), "missing `{line}` in\n{metrics}");
}

#[test]
fn reading_an_output_needs_its_error_port() {
    setup();
    let yaml = "inputs:
  src: { type: test_source, key: k, count: 1 }
outputs:
  out: { type: test_sink, key: k, from: src }
  again: { type: test_sink, key: k, from: out }
";
    let spec = conflux_engine::config::load_str(std::path::Path::new("p.yaml"), yaml, &|_| None).unwrap();
    let Err(diags) = conflux_engine::graph::compile(spec) else { panic!("`from: out` must be refused") };
    let text: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
    assert!(
        text.iter().any(|t| t.contains("p.yaml:5:") && t.contains("`out.error`")),
        "the error says where and what to write instead: {text:?}"
    );
}

#[test]
fn output_options_are_checked_with_their_position() {
    setup();
    for (option, expected) in [
        ("max_in_flight: 0", "`max_in_flight` must be at least 1"),
        ("batch: { max_events: 0 }", "`batch.max_events` must be at least 1"),
        ("batch: { linger: soon }", "invalid duration"),
        ("batch: { max_event: 3 }", "max_event"),
    ] {
        let yaml = format!(
            "inputs:\n  src: {{ type: test_source, key: k, count: 1 }}\noutputs:\n  out: {{ type: test_sink, key: k, from: src, {option} }}\n"
        );
        let diags = match conflux_engine::config::load_str(std::path::Path::new("p.yaml"), &yaml, &|_| None) {
            Err(diags) => diags,
            Ok(spec) => {
                conflux_engine::graph::compile(spec).err().unwrap_or_else(|| panic!("`{option}` must be refused"))
            }
        };
        let text: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
        assert!(text.iter().any(|t| t.starts_with("p.yaml:4:") && t.contains(expected)), "{option}: {text:?}");
    }
}

#[test]
fn a_finite_run_that_lost_events_says_so_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.ndjson"), "{\"n\":1}\nnot json\n{\"n\":2}\n").unwrap();
    let pipeline = dir.path().join("p.yaml");
    let yaml =
        "inputs:\n  in: { type: file, path: in.ndjson }\noutputs:\n  out: { type: file, path: out.ndjson, from: in }\n";
    std::fs::write(&pipeline, yaml).unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_conflux"))
        .env("CONFLUX_LOG", "error")
        .arg("run")
        .arg(&pipeline)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pipeline `p` finished with events not delivered: `in` 2 delivered, 1 rejected, 0 errored"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(dir.path().join("out.ndjson")).unwrap(), "{\"n\":1}\n{\"n\":2}\n");

    // The same run without the bad line is clean.
    std::fs::write(dir.path().join("in.ndjson"), "{\"n\":1}\n").unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_conflux"))
        .env("CONFLUX_LOG", "error")
        .arg("run")
        .arg(&pipeline)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(0), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(run.stderr.is_empty(), "{}", String::from_utf8_lossy(&run.stderr));
}

#[tokio::test]
async fn ready_turns_red_while_nats_is_away_and_green_once_it_is_back_with_nothing_lost() {
    setup();
    let url = crate::nats::nats_url().await;
    let upstream = url.trim_start_matches("nats://").to_string();
    let proxy = FaultProxy::start(&upstream).await.unwrap();
    let tag = key("health").replace('-', "_");
    let stream = format!("CF_HEALTH_{tag}");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("cfh.{tag}.>")],
        ..Default::default()
    })
    .await
    .unwrap();

    let src = key("src");
    let yaml = format!(
        "name: health
inputs:
  src: {{ type: test_source, key: {src}, batch_size: 1, interval: 50ms }}
outputs:
  out:
    type: nats
    url: \"nats://{proxy}\"
    jetstream: true
    subject: \"cfh.{tag}.{{{{ n }}}}\"
    from: src
    retry: {{ initial_backoff: 100ms, max_backoff: 500ms }}
",
        proxy = proxy.host_port()
    );
    let cx = RunContext::new();
    let server = AdminServer::start(&cx).await;
    let admin = server.addr;
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });

    crate::wait_ready(admin, 200, Duration::from_secs(10)).await;
    proxy.cut();
    let body = crate::wait_ready(admin, 503, Duration::from_secs(30)).await;
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["status"], "down", "{answer}");
    let down = answer["down"].as_array().unwrap();
    assert!(
        down.iter().any(|d| d["component"] == "health/out" && !d["error"].as_str().unwrap().is_empty()),
        "{answer}"
    );
    let metrics = cx.metrics.encode();
    assert!(
        metrics.contains(concat!("\n", r#"conflux_component_up{pipeline="health",component="out"} 0"#)),
        "{metrics}"
    );

    proxy.restore();
    crate::wait_ready(admin, 200, Duration::from_secs(60)).await;
    let metrics = cx.metrics.encode();
    assert!(
        metrics.contains(concat!("\n", r#"conflux_component_up{pipeline="health",component="out"} 1"#)),
        "{metrics}"
    );

    cx.stop.cancel();
    run.await.unwrap();
    server.stop().await;

    // Every event the source emitted was acknowledged as delivered, and is in the stream.
    let statuses = acks(&src);
    assert!(statuses.len() > 10, "{} events acknowledged", statuses.len());
    assert!(statuses.iter().all(|s| *s == AckStatus::Delivered), "{statuses:?}");
    let mut stored = BTreeSet::new();
    let mut info = js.get_stream(&stream).await.unwrap();
    let last = info.info().await.unwrap().state.last_sequence;
    for seq in 1..=last {
        let message = info.get_raw_message(seq).await.unwrap();
        let payload: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        stored.insert(payload["n"].as_u64().unwrap());
    }
    let expected: BTreeSet<u64> = (0..statuses.len() as u64).collect();
    assert!(
        expected.is_subset(&stored),
        "missing from the stream: {:?}",
        expected.difference(&stored).collect::<Vec<_>>()
    );
    js.delete_stream(&stream).await.unwrap();
}
