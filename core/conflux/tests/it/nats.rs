//! `nats` input and output against the real NATS server (JetStream on).
//! Unreachable, these tests fail and say how to start it.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use conflux_engine::runtime::RunContext;
use conflux_testkit::{acks, attempts, delivered, release, run_yaml};
use futures_util::StreamExt;

use crate::{key, setup};

/// The server's URL, after checking it answers.
pub async fn nats_url() -> String {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let connect = tokio::time::timeout(Duration::from_secs(3), async_nats::connect(&url)).await;
    match connect {
        Ok(Ok(_)) => url,
        _ => panic!(
            "NATS (with JetStream) is not reachable at {url}: run `scripts/test.sh`, which starts it, \
             or `source scripts/services.sh && ensure_services nats` (or `nats-server -js`)"
        ),
    }
}

fn ns(values: &[serde_json::Value]) -> BTreeSet<u64> {
    values.iter().map(|v| v["n"].as_u64().unwrap()).collect()
}

async fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn core_nats_round_trip_with_subject_template_and_queue_group() {
    setup();
    let url = nats_url().await;
    let (src, sink1, sink2, tag) = (key("src"), key("s1"), key("s2"), key("core").replace('-', "_"));
    let consumer = |sink: &str| {
        format!(
            "inputs:\n  in: {{ type: nats, url: \"{url}\", subjects: [\"cf.{tag}.>\"], queue_group: workers }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: in }}\n"
        )
    };
    let (c1, c2) = (RunContext::new(), RunContext::new());
    let r1 = tokio::spawn({
        let (y, cx) = (consumer(&sink1), c1.clone());
        async move { run_yaml(&y, cx).await }
    });
    let r2 = tokio::spawn({
        let (y, cx) = (consumer(&sink2), c2.clone());
        async move { run_yaml(&y, cx).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let producer = format!(
        "inputs:\n  src: {{ type: test_source, key: {src}, count: 400, batch_size: 50 }}\noutputs:\n  out: {{ type: nats, url: \"{url}\", subject: \"cf.{tag}.{{{{ n }}}}\", from: src }}\n"
    );
    run_yaml(&producer, RunContext::new()).await;
    assert_eq!(acks(&src).len(), 400);
    wait_for(|| delivered(&sink1).len() + delivered(&sink2).len() >= 400, "400 events across the group").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (a, b) = (delivered(&sink1), delivered(&sink2));
    assert_eq!(a.len() + b.len(), 400, "each message reaches one member of the queue group");
    assert!(!a.is_empty() && !b.is_empty(), "both members got work: {} / {}", a.len(), b.len());
    let all: BTreeSet<u64> = ns(&a).union(&ns(&b)).copied().collect();
    assert_eq!(all, (0..400).collect());
    c1.stop.cancel();
    c2.stop.cancel();
    r1.await.unwrap();
    r2.await.unwrap();
}

async fn stream_state(url: &str, stream: &str, durable: &str) -> (u64, u64, usize) {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let mut s = js.get_stream(stream).await.unwrap();
    let messages = s.info().await.unwrap().state.messages;
    let mut c: async_nats::jetstream::consumer::PullConsumer = s.get_consumer(durable).await.unwrap();
    let info = c.info().await.unwrap();
    (messages, info.num_pending, info.num_ack_pending)
}

#[tokio::test]
async fn jetstream_publish_waits_for_the_server_and_consume_acks_after_delivery() {
    publish_then_consume("explicit").await;
}

#[tokio::test]
async fn jetstream_cumulative_acks_cover_everything_delivered() {
    publish_then_consume("all").await;
}

async fn publish_then_consume(policy: &str) {
    setup();
    let url = nats_url().await;
    let (src, sink, tag) = (key("src"), key("sink"), key("js").replace('-', "_"));
    let stream = format!("CF_{tag}");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("js.{tag}.>")],
        ..Default::default()
    })
    .await
    .unwrap();
    let producer = format!(
        "inputs:\n  src: {{ type: test_source, key: {src}, count: 1000, batch_size: 100 }}\noutputs:\n  out: {{ type: nats, url: \"{url}\", jetstream: true, subject: \"js.{tag}.{{{{ n }}}}\", from: src }}\n"
    );
    run_yaml(&producer, RunContext::new()).await;
    assert_eq!(acks(&src).len(), 1000);
    let info = js.get_stream(&stream).await.unwrap().info().await.unwrap().state.messages;
    assert_eq!(info, 1000, "every acknowledged event is in the stream");

    let consumer = format!(
        "inputs:\n  in: {{ type: nats, url: \"{url}\", jetstream: {{ stream: {stream}, durable: d1, max_ack_pending: 200, ack_policy: {policy} }}, batch_size: 100 }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: in }}\n"
    );
    let cx = RunContext::new();
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&consumer, cx).await }
    });
    wait_for(|| delivered(&sink).len() >= 1000, "1000 events from JetStream").await;
    for _ in 0..100 {
        if stream_state(&url, &stream, "d1").await.2 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, pending, ack_pending) = stream_state(&url, &stream, "d1").await;
    assert_eq!((pending, ack_pending), (0, 0), "everything delivered was acknowledged");
    assert_eq!(ns(&delivered(&sink)), (0..1000).collect());
    cx.stop.cancel();
    run.await.unwrap();
    js.delete_stream(&stream).await.ok();
}

#[tokio::test]
async fn jetstream_naks_failed_events_and_a_restarted_consumer_loses_nothing() {
    failures_and_restart("explicit").await;
}

#[tokio::test]
async fn jetstream_cumulative_acks_hold_back_at_a_failure_and_lose_nothing_on_restart() {
    failures_and_restart("all").await;
}

async fn failures_and_restart(policy: &str) {
    setup();
    let url = nats_url().await;
    let (first, second, tag) = (key("first"), key("second"), key("jsr").replace('-', "_"));
    let stream = format!("CF_{tag}");
    let client = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("jsr.{tag}")],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut acks_pending = Vec::new();
    for n in 0..3000 {
        acks_pending.push(js.publish(format!("jsr.{tag}"), format!("{{\"n\":{n}}}").into()).await.unwrap());
    }
    for a in acks_pending {
        a.await.unwrap();
    }
    // First run: a flaky, slow output (its first writes fail: those events are nak'ed and come back),
    // stopped mid-stream with a short drain so some events are cut off.
    let yaml = |sink: &str, extra: &str| {
        format!(
            "runtime: {{ shutdown_timeout: 100ms, channel_capacity: 2 }}\ninputs:\n  in: {{ type: nats, url: \"{url}\", jetstream: {{ stream: {stream}, durable: worker, ack_wait: 2s, nak_delay: 50ms, max_ack_pending: 500, ack_policy: {policy} }}, batch_size: 50 }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: in, retry: {{ initial_backoff: 1ms, max_attempts: 1 }} {extra} }}\n"
        )
    };
    let cx = RunContext::new();
    let run = tokio::spawn({
        let (y, cx) = (yaml(&first, ", fail_first: 3, delay: 5ms"), cx.clone());
        async move { run_yaml(&y, cx).await }
    });
    wait_for(|| delivered(&first).len() >= 600, "the first consumer to make progress").await;
    cx.stop.cancel();
    run.await.unwrap();
    let got_first = ns(&delivered(&first));
    assert!(got_first.len() < 3000, "stopped mid-stream");

    let cx = RunContext::new();
    let run = tokio::spawn({
        let (y, cx) = (yaml(&second, ""), cx.clone());
        async move { run_yaml(&y, cx).await }
    });
    wait_for(
        || ns(&delivered(&first)).union(&ns(&delivered(&second))).count() >= 3000,
        "every event across both runs (unacknowledged ones are redelivered)",
    )
    .await;
    let all: BTreeSet<u64> = got_first.union(&ns(&delivered(&second))).copied().collect();
    assert_eq!(all, (0..3000).collect::<BTreeSet<u64>>());
    for _ in 0..100 {
        if stream_state(&url, &stream, "worker").await.1 == 0 && stream_state(&url, &stream, "worker").await.2 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stream_state(&url, &stream, "worker").await.1, 0);
    cx.stop.cancel();
    run.await.unwrap();
    js.delete_stream(&stream).await.ok();
}

#[tokio::test]
async fn non_json_payloads_go_to_the_invalid_port() {
    setup();
    let url = nats_url().await;
    let (ok, bad, tag) = (key("ok"), key("bad"), key("inv").replace('-', "_"));
    let yaml = format!(
        "inputs:\n  in: {{ type: nats, url: \"{url}\", subjects: [\"inv.{tag}\"] }}\noutputs:\n  ok: {{ type: test_sink, key: {ok}, from: in }}\n  bad: {{ type: test_sink, key: {bad}, from: in.invalid }}\n"
    );
    let cx = RunContext::new();
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    let client = async_nats::connect(&url).await.unwrap();
    let mut probe = client.subscribe(format!("inv.{tag}")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.publish(format!("inv.{tag}"), "{\"n\":1}".into()).await.unwrap();
    client.publish(format!("inv.{tag}"), "not json".into()).await.unwrap();
    client.flush().await.unwrap();
    probe.next().await.unwrap();
    wait_for(|| delivered(&ok).len() == 1 && delivered(&bad).len() == 1, "one valid and one invalid").await;
    assert_eq!(delivered(&bad)[0], serde_json::json!("not json"));
    cx.stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn a_consumer_with_another_ack_policy_is_refused_with_the_reason() {
    setup();
    let url = nats_url().await;
    let (sink, tag) = (key("sink"), key("pol").replace('-', "_"));
    let stream = format!("CF_{tag}");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let s = js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("pol.{tag}")],
            ..Default::default()
        })
        .await
        .unwrap();
    use async_nats::jetstream::consumer::AckPolicy;
    // d1 acks each message; d2 acks cumulatively but gives up on a message after 3 deliveries,
    // which a later cumulative ack would then cover unprocessed.
    for (durable, ack_policy, max_deliver) in [("d1", AckPolicy::Explicit, -1), ("d2", AckPolicy::All, 3)] {
        s.create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(durable.into()),
            ack_policy,
            max_deliver,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for durable in ["d1", "d2"] {
        let yaml = format!(
            "inputs:\n  in: {{ type: nats, url: \"{url}\", jetstream: {{ stream: {stream}, durable: {durable}, ack_policy: all }} }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: in }}\n"
        );
        // Retrying cannot mend this: the run ends, failed (the log says why).
        let outcome = tokio::time::timeout(Duration::from_secs(10), run_yaml(&yaml, RunContext::new())).await;
        assert!(outcome.expect("a fatal connect error ends the run").failed, "{durable}");
    }
    js.delete_stream(&stream).await.ok();
}

/// A stream `CF_<tag>` over subject `<tag>`, and its name.
pub async fn stream_over(url: &str, tag: &str) -> (async_nats::jetstream::Context, String) {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let stream = format!("CF_{tag}");
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![tag.to_owned()],
        ..Default::default()
    })
    .await
    .unwrap();
    (js, stream)
}

/// A stream `CF_<tag>` over subject `<tag>` holding `{"n": 0..count}`.
async fn filled_stream(url: &str, tag: &str, count: u64) -> (async_nats::jetstream::Context, String) {
    let (js, stream) = stream_over(url, tag).await;
    let mut published = Vec::new();
    for n in 0..count {
        published.push(js.publish(tag.to_owned(), format!("{{\"n\":{n}}}").into()).await.unwrap());
    }
    for ack in published {
        ack.await.unwrap();
    }
    (js, stream)
}

#[tokio::test]
async fn jetstream_delivers_no_more_than_max_ack_pending_while_the_pipeline_holds_them() {
    setup();
    let url = nats_url().await;
    let (sink, tag) = (key("sink"), key("map").replace('-', "_"));
    let (js, stream) = filled_stream(&url, &tag, 300).await;
    // The sink holds every write until released, so nothing is acknowledged:
    // the server must stop delivering at max_ack_pending.
    let yaml = format!(
        "inputs:\n  in: {{ type: nats, url: \"{url}\", jetstream: {{ stream: {stream}, durable: held, max_ack_pending: 20 }}, batch_size: 10 }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, gated: true, from: in }}\n"
    );
    let cx = RunContext::new();
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    // The pipeline creates the durable consumer once it connects.
    for _ in 0..200 {
        let consumer = js.get_stream(&stream).await.unwrap().get_consumer::<PullConfig>("held").await;
        if let Ok(mut consumer) = consumer {
            if consumer.info().await.unwrap().num_ack_pending >= 20 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Time for a consumer that ignored the limit to take more.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, pending, ack_pending) = stream_state(&url, &stream, "held").await;
    assert_eq!((ack_pending, pending), (20, 280), "20 in flight, the rest still on the server");
    assert!(delivered(&sink).is_empty(), "the gated sink wrote nothing yet");
    release(&sink, 1000);
    wait_for(|| delivered(&sink).len() >= 300, "all 300 events once released").await;
    assert_eq!(ns(&delivered(&sink)), (0..300).collect());
    cx.stop.cancel();
    run.await.unwrap();
    js.delete_stream(&stream).await.ok();
}

#[tokio::test]
async fn a_failed_jetstream_message_comes_back_after_its_nak_delay_not_the_ack_wait() {
    setup();
    let url = nats_url().await;
    let (sink, tag) = (key("sink"), key("nak").replace('-', "_"));
    let (js, stream) = filled_stream(&url, &tag, 10).await;
    // The first write fails for good (one attempt): its events are nak'ed
    // with a 1.5 s delay. ack_wait is 60 s, so a redelivery within it can
    // only be the nak's.
    let yaml = format!(
        "inputs:\n  in: {{ type: nats, url: \"{url}\", jetstream: {{ stream: {stream}, durable: naks, ack_wait: 60s, nak_delay: 1500ms }}, batch_size: 10 }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, fail_first: 1, from: in, retry: {{ initial_backoff: 1ms, max_attempts: 1 }} }}\n"
    );
    let cx = RunContext::new();
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    wait_for(|| attempts(&sink) >= 1, "the first, failing write").await;
    let failed_at = std::time::Instant::now();
    wait_for(|| delivered(&sink).len() >= 10, "the nak'ed events to come back").await;
    let after = failed_at.elapsed();
    assert!(after >= Duration::from_millis(1300), "redelivered after {after:?}, before the nak delay");
    assert_eq!(ns(&delivered(&sink)), (0..10).collect());
    cx.stop.cancel();
    run.await.unwrap();
    js.delete_stream(&stream).await.ok();
}

/// Aggregate results carry `<result_key>@<revision>` as their `Nats-Msg-Id`:
/// the same input aggregated twice (a replay after a crash) is stored once.
#[tokio::test]
async fn a_replayed_aggregate_is_stored_once_in_jetstream() {
    setup();
    let url = nats_url().await;
    let tag = key("replay").replace('-', "_");
    let (js, stream) = stream_over(&url, &tag).await;
    let dir = tempfile::tempdir().unwrap();
    // Groups a, b, c in two 10 s windows: 6 results, whatever the run.
    let mut lines = String::new();
    for (second, group) in [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (11, "a"), (12, "b"), (13, "c")] {
        lines.push_str(&format!("{{\"t\":\"2026-01-01T00:00:{second:02}Z\",\"g\":\"{group}\"}}\n"));
    }
    let input = dir.path().join("in.ndjson");
    std::fs::write(&input, lines).unwrap();
    let yaml = format!(
        "name: replay
inputs:
  in: {{ type: file, path: \"{}\" }}
stages:
  agg: {{ type: aggregate, from: in, group_by: [g], time: {{ field: t }}, window: {{ tumbling: 10s }}, metrics: {{ n: {{ count: {{}} }} }} }}
outputs:
  out: {{ type: nats, url: \"{url}\", jetstream: true, subject: \"{tag}\", from: agg }}
",
        input.display()
    );
    for run in 1..=2 {
        run_yaml(&yaml, RunContext::new()).await;
        let stored = js.get_stream(&stream).await.unwrap().info().await.unwrap().state.messages;
        assert_eq!(stored, 6, "after run {run}: one message per group and window");
    }
    js.delete_stream(&stream).await.ok();
}
