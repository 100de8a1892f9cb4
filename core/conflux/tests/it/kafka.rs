//! `kafka` input and output against a real Kafka-protocol broker (tansu,
//! started by scripts/test.sh) and librdkafka's mock cluster for failures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use conflux_api::AckStatus;
use conflux_engine::runtime::RunContext;
use conflux_testkit::{acks, attempts, delivered, release, run_yaml};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::{key, setup, start_conflux};

/// The broker address, after checking something listens there.
pub async fn brokers() -> String {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let first = brokers.split(',').next().unwrap().to_string();
    let reachable = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(&first)).await;
    if !matches!(reachable, Ok(Ok(_))) {
        panic!(
            "Kafka is not reachable at {brokers}: run `scripts/test.sh`, which starts tansu, \
             or `source scripts/services.sh && ensure_services kafka`"
        );
    }
    brokers
}

pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let results = admin
        .create_topics(&[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .unwrap();
    for r in results {
        r.unwrap();
    }
}

/// Sum of the offsets committed by `group` on `topic`.
fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    committed_per_partition(brokers, group, topic, partitions).iter().sum()
}

/// The offset committed by `group` on each partition of `topic` (0 when none).
fn committed_per_partition(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create().unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let offsets = {
        let got = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
        let mut offsets = vec![0; partitions as usize];
        for e in got.elements() {
            if let Offset::Offset(o) = e.offset() {
                offsets[e.partition() as usize] = o;
            }
        }
        offsets
    };
    drop(consumer);
    offsets
}

fn ns(values: &[serde_json::Value]) -> BTreeSet<u64> {
    values.iter().map(|v| v["n"].as_u64().unwrap()).collect()
}

async fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    for _ in 0..3000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn produce(brokers: &str, topic: &str, count: usize) {
    produce_with(brokers, topic, count, "lz4").await;
}

async fn produce_with(brokers: &str, topic: &str, count: usize, compression: &str) {
    let src = key("producer");
    let yaml = format!(
        "inputs:\n  src: {{ type: test_source, key: {src}, count: {count}, batch_size: 500 }}\noutputs:\n  out: {{ type: kafka, brokers: [\"{brokers}\"], topic: {topic}, key: \"{{{{ n }}}}\", headers: {{ origin: test }}, compression: {compression}, from: src }}\n"
    );
    run_yaml(&yaml, RunContext::new()).await;
    let statuses = acks(&src);
    assert_eq!(statuses, vec![AckStatus::Delivered; count], "every event confirmed by its delivery report");
}

/// A metric of component `in` from the engine's exposition (plugin metrics included).
fn metric(cx: &RunContext, name: &str) -> Option<f64> {
    cx.metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("component=\"in\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn consumer_yaml(brokers: &str, topic: &str, group: &str, sink: &str, extra_sink: &str) -> String {
    format!(
        "runtime: {{ shutdown_timeout: 200ms, channel_capacity: 2 }}\ninputs:\n  in: {{ type: kafka, brokers: [\"{brokers}\"], topics: [{topic}], group: {group}, batch_size: 100, commit_interval: 100ms, options: {{ session.timeout.ms: \"6000\" }} }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: in {extra_sink} }}\n"
    )
}

#[tokio::test]
async fn kafka_round_trip_commits_every_delivered_offset() {
    setup();
    let brokers = brokers().await;
    let (topic, group, sink) = (key("rt").replace('-', "_"), key("g"), key("sink"));
    create_topic(&brokers, &topic, 3).await;
    produce(&brokers, &topic, 600).await;
    let cx = RunContext::new();
    let yaml = consumer_yaml(&brokers, &topic, &group, &sink, "");
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    wait_for(|| delivered(&sink).len() >= 600, "600 events from Kafka").await;
    cx.stop.cancel();
    run.await.unwrap();
    assert_eq!(ns(&delivered(&sink)), (0..600).collect());
    assert_eq!(committed(&brokers, &group, &topic, 3), 600, "every delivered offset committed");
}

#[tokio::test]
async fn kafka_consumer_stopped_mid_stream_loses_nothing() {
    setup();
    let brokers = brokers().await;
    let (topic, group, first, second) = (key("kill").replace('-', "_"), key("g"), key("first"), key("second"));
    create_topic(&brokers, &topic, 2).await;
    produce(&brokers, &topic, 3000).await;
    let cx = RunContext::new();
    let yaml = consumer_yaml(&brokers, &topic, &group, &first, ", delay: 10ms, gated: false");
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    wait_for(|| delivered(&first).len() >= 400, "the first consumer to make progress").await;
    cx.stop.cancel();
    run.await.unwrap();
    let got_first = ns(&delivered(&first));
    assert!(got_first.len() < 3000, "stopped mid-stream");
    let done = committed(&brokers, &group, &topic, 2);
    assert!(done as usize <= got_first.len(), "committed {done} offsets but delivered only {}", got_first.len());

    let cx = RunContext::new();
    let yaml = consumer_yaml(&brokers, &topic, &group, &second, "");
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    wait_for(|| got_first.union(&ns(&delivered(&second))).count() >= 3000, "all 3000 events across both runs").await;
    cx.stop.cancel();
    run.await.unwrap();
    assert_eq!(committed(&brokers, &group, &topic, 2), 3000);
}

#[tokio::test]
async fn two_kafka_consumers_in_one_group_share_the_partitions() {
    setup();
    let brokers = brokers().await;
    let (topic, group, a, b) = (key("share").replace('-', "_"), key("g"), key("a"), key("b"));
    create_topic(&brokers, &topic, 4).await;
    let (ca, cb) = (RunContext::new(), RunContext::new());
    let ra = tokio::spawn({
        let (y, cx) = (consumer_yaml(&brokers, &topic, &group, &a, ""), ca.clone());
        async move { run_yaml(&y, cx).await }
    });
    let rb = tokio::spawn({
        let (y, cx) = (consumer_yaml(&brokers, &topic, &group, &b, ""), cb.clone());
        async move { run_yaml(&y, cx).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    produce(&brokers, &topic, 2000).await;
    wait_for(|| ns(&delivered(&a)).union(&ns(&delivered(&b))).count() >= 2000, "2000 events across the group").await;
    let (got_a, got_b) = (delivered(&a).len(), delivered(&b).len());
    ca.stop.cancel();
    cb.stop.cancel();
    ra.await.unwrap();
    rb.await.unwrap();
    assert!(got_a > 0 && got_b > 0, "both members consumed: {got_a} / {got_b}");
    assert_eq!(committed(&brokers, &group, &topic, 4), 2000);
}

#[tokio::test]
async fn kafka_output_rides_out_broker_errors_and_fails_back_when_the_broker_is_down() {
    setup();
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("mocked", 2, 1).unwrap();
    let servers = mock.bootstrap_servers();

    // Transient produce errors: librdkafka retries, every event still confirmed once.
    mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 4]);
    let src = key("src");
    let yaml = format!(
        "inputs:\n  src: {{ type: test_source, key: {src}, count: 200, batch_size: 50 }}\noutputs:\n  out: {{ type: kafka, brokers: [\"{servers}\"], topic: mocked, from: src }}\n"
    );
    run_yaml(&yaml, RunContext::new()).await;
    assert_eq!(acks(&src), vec![AckStatus::Delivered; 200]);

    // A slow broker only slows acknowledgement down.
    mock.broker_round_trip_time(1, Duration::from_millis(300)).unwrap();
    let src = key("src");
    let yaml = format!(
        "inputs:\n  src: {{ type: test_source, key: {src}, count: 20, batch_size: 20 }}\noutputs:\n  out: {{ type: kafka, brokers: [\"{servers}\"], topic: mocked, from: src }}\n"
    );
    let started = std::time::Instant::now();
    run_yaml(&yaml, RunContext::new()).await;
    assert_eq!(acks(&src), vec![AckStatus::Delivered; 20]);
    assert!(started.elapsed() >= Duration::from_millis(300));
    mock.broker_round_trip_time(1, Duration::from_millis(0)).unwrap();

    // Broker down: delivery reports fail, the events fail back to the source instead of being acknowledged.
    mock.broker_down(1).unwrap();
    let src = key("src");
    let yaml = format!(
        "inputs:\n  src: {{ type: test_source, key: {src}, count: 10, batch_size: 10 }}\noutputs:\n  out: {{ type: kafka, brokers: [\"{servers}\"], topic: mocked, delivery_timeout: 500ms, from: src, retry: {{ initial_backoff: 10ms, max_attempts: 2 }} }}\n"
    );
    run_yaml(&yaml, RunContext::new()).await;
    assert_eq!(acks(&src), vec![AckStatus::Errored; 10]);
    mock.broker_up(1).unwrap();
}

#[tokio::test]
async fn kafka_input_pauses_at_max_unacked_and_resumes_once_acknowledged() {
    setup();
    let brokers = brokers().await;
    let (topic, group, sink) = (key("bp").replace('-', "_"), key("g"), key("sink"));
    create_topic(&brokers, &topic, 1).await;
    produce(&brokers, &topic, 1000).await;
    let cx = RunContext::new();
    let yaml = format!(
        "runtime: {{ shutdown_timeout: 200ms, channel_capacity: 8 }}\ninputs:\n  in: {{ type: kafka, brokers: [\"{brokers}\"], topics: [{topic}], group: {group}, batch_size: 30, max_unacked: 100, commit_interval: 100ms, options: {{ session.timeout.ms: \"6000\" }} }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, gated: true, from: in }}\n"
    );
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    // The output holds every write: the input reads up to max_unacked, then pauses its partition.
    wait_for(|| metric(&cx, "conflux_kafka_paused_partitions") == Some(1.0), "the partition to pause").await;
    let in_flight = metric(&cx, "conflux_input_unacked_events");
    assert_eq!(in_flight, Some(100.0), "exactly max_unacked events in flight");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(metric(&cx, "conflux_input_unacked_events"), in_flight, "nothing more read while paused");
    assert_eq!(metric(&cx, "conflux_kafka_paused_partitions"), Some(1.0));
    assert!(delivered(&sink).is_empty());

    release(&sink, 10_000);
    wait_for(|| delivered(&sink).len() >= 1000, "all 1000 events once the output writes again").await;
    wait_for(|| metric(&cx, "conflux_kafka_paused_partitions") == Some(0.0), "the partition to resume").await;
    wait_for(|| committed(&brokers, &group, &topic, 1) == 1000, "every offset committed").await;
    cx.stop.cancel();
    run.await.unwrap();
    assert_eq!(ns(&delivered(&sink)), (0..1000).collect());
}

#[tokio::test]
async fn a_failing_output_makes_the_partition_wait_longer_before_each_redelivery() {
    setup();
    let brokers = brokers().await;
    let (topic, group, sink) = (key("backoff").replace('-', "_"), key("g"), key("sink"));
    create_topic(&brokers, &topic, 1).await;
    produce(&brokers, &topic, 10).await;
    let cx = RunContext::new();
    // Four failed writes, then success: waits of 100 + 200 + 400 + 400 ms before the four redeliveries.
    let yaml = format!(
        "runtime: {{ shutdown_timeout: 200ms }}\ninputs:\n  in: {{ type: kafka, brokers: [\"{brokers}\"], topics: [{topic}], group: {group}, commit_interval: 100ms, redelivery_backoff: 100ms, max_redelivery_backoff: 400ms, options: {{ session.timeout.ms: \"6000\" }} }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, fail_first: 4, retry: {{ initial_backoff: 1ms, max_attempts: 1 }}, from: in }}\n"
    );
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    wait_for(|| attempts(&sink) >= 1, "the first write").await;
    let first = std::time::Instant::now();
    wait_for(|| delivered(&sink).len() >= 10, "the events once the output recovers").await;
    let took = first.elapsed();
    assert!(took >= Duration::from_millis(1000), "redelivered after growing waits, not at once: {took:?}");
    assert_eq!(attempts(&sink), 5, "one write per redelivery, no spinning");
    assert_eq!(metric(&cx, "conflux_kafka_redeliveries_total"), Some(4.0));
    wait_for(|| committed(&brokers, &group, &topic, 1) == 10, "the offsets committed after success").await;
    cx.stop.cancel();
    run.await.unwrap();
    assert_eq!(ns(&delivered(&sink)), (0..10).collect());
}

#[tokio::test]
async fn every_compression_codec_round_trips_through_the_broker() {
    setup();
    let brokers = brokers().await;
    let (group, sink) = (key("g"), key("sink"));
    let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
    let base = key("codec").replace('-', "_");
    let mut topics = Vec::new();
    for codec in codecs {
        let topic = format!("{base}_{codec}");
        create_topic(&brokers, &topic, 1).await;
        produce_with(&brokers, &topic, 50, codec).await;
        topics.push(topic);
    }
    let cx = RunContext::new();
    let yaml = consumer_yaml(&brokers, &topics.join(", "), &group, &sink, "");
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    wait_for(|| delivered(&sink).len() >= 250, "50 events from each codec's topic").await;
    cx.stop.cancel();
    run.await.unwrap();
    let got = delivered(&sink);
    assert_eq!(got.len(), 250);
    for n in 0..50u64 {
        assert_eq!(got.iter().filter(|v| v["n"] == n).count(), 5, "event {n} once per codec");
    }
}

/// A message read back from the broker: topic, key, headers, payload.
#[derive(Debug)]
pub struct ReadBack {
    pub topic: String,
    pub key: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub payload: serde_json::Value,
}

/// Reads `count` messages from the start of partition 0 of each of `topics`, without a group commit.
pub async fn read_back(brokers: &str, topics: &[&str], count: usize) -> Vec<ReadBack> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", key("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for topic in topics {
        list.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    }
    consumer.assign(&list).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < count {
        assert!(Instant::now() < deadline, "read back only {} of {count} messages: {got:?}", got.len());
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            tokio::task::yield_now().await;
            continue;
        };
        let m = message.unwrap();
        let headers = m.headers().map_or_else(BTreeMap::new, |hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                .collect()
        });
        got.push(ReadBack {
            topic: m.topic().to_string(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            payload: serde_json::from_slice(m.payload().unwrap_or_default()).unwrap(),
        });
    }
    // Nothing beyond the expected messages.
    if let Some(extra) = consumer.poll(Duration::from_millis(500)) {
        panic!("more messages than expected: {:?}", extra.map(|m| m.detach()));
    }
    drop(list);
    drop(consumer);
    got
}

#[tokio::test]
async fn kafka_input_events_carry_topic_partition_offset_key_headers_and_timestamp() {
    setup();
    conflux_rhai::link();
    let brokers = brokers().await;
    let (topic, group, sink) = (key("meta").replace('-', "_"), key("g"), key("sink"));
    create_topic(&brokers, &topic, 2).await;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let ts = 1_700_000_000_123_i64;
    // Partition 1 (not the default 0): a message with key, headers and timestamp, then one with neither key nor headers.
    let headers = OwnedHeaders::new()
        .insert(Header { key: "trace", value: Some("t-42") })
        .insert(Header { key: "origin", value: Some("metadata test") });
    let keyed = FutureRecord::to(&topic).partition(1).key("alpha").payload(r#"{"n":0}"#).headers(headers).timestamp(ts);
    let keyed = producer.send(keyed, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    let bare = FutureRecord::<(), str>::to(&topic).partition(1).payload(r#"{"n":1}"#).timestamp(ts + 1_000);
    let bare = producer.send(bare, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    assert_eq!((keyed.partition, bare.partition), (1, 1));
    assert_eq!(bare.offset, keyed.offset + 1);

    // The test sink records payloads only: a rhai stage copies the metadata into the payload.
    let cx = RunContext::new();
    let yaml = format!(
        "runtime: {{ shutdown_timeout: 200ms }}
inputs:
  in: {{ type: kafka, brokers: [\"{brokers}\"], topics: [{topic}], group: {group}, commit_interval: 100ms, options: {{ session.timeout.ms: \"6000\" }} }}
stages:
  copy:
    type: rhai
    from: in
    script: 'event.m = meta; event'
outputs:
  out: {{ type: test_sink, key: {sink}, from: copy }}
"
    );
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    wait_for(|| delivered(&sink).len() >= 2, "both messages through the pipeline").await;
    cx.stop.cancel();
    run.await.unwrap();
    let got = delivered(&sink);
    assert_eq!(got.len(), 2, "{got:?}");
    let (first, second) = (&got[0], &got[1]);
    assert_eq!(first["n"], 0, "in partition order: {got:?}");

    let m = &first["m"];
    assert_eq!(m["kafka.topic"], topic.as_str(), "{m}");
    assert_eq!(m["kafka.partition"], 1, "{m}");
    assert_eq!(m["kafka.offset"], keyed.offset, "{m}");
    assert_eq!(m["kafka.key"], "alpha", "{m}");
    assert_eq!(m["kafka.headers"], serde_json::json!({ "trace": "t-42", "origin": "metadata test" }), "{m}");
    assert_eq!(m["kafka.timestamp"], ts, "the producer's timestamp, in ms: {m}");

    let m = &second["m"];
    assert_eq!(m["kafka.topic"], topic.as_str(), "{m}");
    assert_eq!(m["kafka.partition"], 1, "{m}");
    assert_eq!(m["kafka.offset"], bare.offset, "{m}");
    assert!(m.get("kafka.key").is_none(), "no key, no kafka.key: {m}");
    assert!(m.get("kafka.headers").is_none_or(|h| h.as_object().is_some_and(|h| h.is_empty())), "no headers: {m}");
    assert_eq!(m["kafka.timestamp"], ts + 1_000, "{m}");
}

#[tokio::test]
async fn kafka_output_renders_topic_key_and_headers_from_each_event() {
    setup();
    conflux_rhai::link();
    let brokers = brokers().await;
    let (base, src) = (key("tmpl").replace('-', "_"), key("src"));
    let (even, odd) = (format!("{base}_even"), format!("{base}_odd"));
    create_topic(&brokers, &even, 1).await;
    create_topic(&brokers, &odd, 1).await;
    let yaml = format!(
        "inputs:
  src: {{ type: test_source, key: {src}, count: 20, batch_size: 5 }}
stages:
  shape:
    type: rhai
    from: src
    script: |
      event.route = if event.n % 2 == 0 {{ \"even\" }} else {{ \"odd\" }};
      event.user = #{{ id: \"user-\" + event.n }};
      event
outputs:
  out:
    type: kafka
    brokers: [\"{brokers}\"]
    topic: \"{base}_{{{{ route }}}}\"
    key: \"{{{{ user.id }}}}\"
    headers: {{ origin: conflux, n: \"{{{{ n }}}}\", route: \"r-{{{{ route }}}}\" }}
    from: shape
"
    );
    run_yaml(&yaml, RunContext::new()).await;
    assert_eq!(acks(&src), vec![AckStatus::Delivered; 20], "every event confirmed by its delivery report");

    let got = read_back(&brokers, &[&even, &odd], 20).await;
    let mut seen = BTreeSet::new();
    for m in &got {
        let n = m.payload["n"].as_u64().unwrap();
        let route = if n % 2 == 0 { "even" } else { "odd" };
        assert_eq!(m.topic, format!("{base}_{route}"), "topic from the event's `route`: {m:?}");
        assert_eq!(m.key.as_deref(), Some(format!("user-{n}").as_str()), "key from `user.id`: {m:?}");
        let expected: BTreeMap<String, String> =
            [("origin", "conflux".to_string()), ("n", n.to_string()), ("route", format!("r-{route}"))]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        assert_eq!(m.headers, expected, "static and templated headers: {m:?}");
        assert_eq!(m.payload["user"]["id"], format!("user-{n}"), "the payload is the event: {m:?}");
        assert!(seen.insert(n), "event {n} produced once");
    }
    assert_eq!(seen, (0..20).collect());
}

#[tokio::test]
async fn kafka_input_subscribes_to_every_topic_matching_a_regex() {
    setup();
    conflux_rhai::link();
    let brokers = brokers().await;
    let (base, group, sink) = (key("rx").replace('-', "_"), key("g"), key("sink"));
    let (a, b, other) = (format!("{base}_a"), format!("{base}_b"), format!("{base}x_c"));
    for topic in [&a, &b, &other] {
        create_topic(&brokers, topic, 1).await;
        produce(&brokers, topic, 50).await;
    }
    let cx = RunContext::new();
    let yaml = format!(
        "runtime: {{ shutdown_timeout: 200ms }}
inputs:
  in: {{ type: kafka, brokers: [\"{brokers}\"], topics: [\"^{base}_.*\"], group: {group}, commit_interval: 100ms, options: {{ session.timeout.ms: \"6000\" }} }}
stages:
  tag:
    type: rhai
    from: in
    script: 'event.topic = meta[\"kafka.topic\"]; event'
outputs:
  out: {{ type: test_sink, key: {sink}, from: tag }}
"
    );
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    wait_for(|| delivered(&sink).len() >= 100, "50 events from each matching topic").await;
    wait_for(
        || committed(&brokers, &group, &a, 1) == 50 && committed(&brokers, &group, &b, 1) == 50,
        "both topics committed",
    )
    .await;
    // Time for anything from a topic that should not match to show up.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cx.stop.cancel();
    run.await.unwrap();
    let got = delivered(&sink);
    let from =
        |topic: &str| -> Vec<serde_json::Value> { got.iter().filter(|v| v["topic"] == topic).cloned().collect() };
    assert_eq!(ns(&from(&a)), (0..50).collect(), "every event of {a}");
    assert_eq!(ns(&from(&b)), (0..50).collect(), "every event of {b}");
    assert_eq!(got.len(), 100, "nothing from {other} or read twice: {} events", got.len());
    assert_eq!(committed(&brokers, &group, &other, 1), 0, "the group never consumed {other}");
}

/// (partition, offset, n) of every complete line an output file holds.
fn written(path: &Path) -> Vec<(i64, i64, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| (v["p"].as_i64().unwrap(), v["o"].as_i64().unwrap(), v["n"].as_u64().unwrap()))
        .collect()
}

#[tokio::test]
async fn kafka_consumer_killed_mid_stream_loses_no_acknowledged_event() {
    setup();
    let brokers = brokers().await;
    let (topic, group) = (key("sigkill").replace('-', "_"), key("g"));
    const N: usize = 4000;
    create_topic(&brokers, &topic, 2).await;
    produce(&brokers, &topic, N).await;

    let dir = tempfile::tempdir().unwrap();
    // Kafka → file (fsync per batch) and, beside it, a slow `drop` that paces the run (≤ 1000 events/s)
    // so the kill lands mid-stream with events read, maybe written, not yet acknowledged.
    let pipeline = |name: &str, out: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "runtime: {{ shutdown_timeout: 2s, channel_capacity: 2 }}
inputs:
  in: {{ type: kafka, brokers: [\"{brokers}\"], topics: [{topic}], group: {group}, batch_size: 20, commit_interval: 100ms, options: {{ session.timeout.ms: \"6000\" }} }}
stages:
  tag:
    type: rhai
    from: in
    script: 'event.p = meta[\"kafka.partition\"]; event.o = meta[\"kafka.offset\"]; event'
outputs:
  out: {{ type: file, path: {out}, sync: true, from: tag }}
  pace: {{ type: drop, delay: 20ms, from: tag }}
"
            ),
        )
        .unwrap();
        path
    };
    let (out1, out2) = (dir.path().join("out1.ndjson"), dir.path().join("out2.ndjson"));

    let mut first = start_conflux(&pipeline("first.yaml", "out1.ndjson"));
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(60), "the first run made no progress");
        if let Ok(Some(status)) = first.0.try_wait() {
            panic!("the first run exited on its own: {status}");
        }
        if written(&out1).len() >= 400 && committed(&brokers, &group, &topic, 2) >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.0.kill().unwrap(); // SIGKILL: no drain, no final commit
    first.0.wait().unwrap();

    // Every offset the group committed is in the file: nothing acknowledged was lost with the process.
    let at_kill = committed_per_partition(&brokers, &group, &topic, 2);
    let run1 = written(&out1);
    let offsets1: BTreeSet<(i64, i64)> = run1.iter().map(|&(p, o, _)| (p, o)).collect();
    for (p, &c) in at_kill.iter().enumerate() {
        let missing: Vec<i64> = (0..c).filter(|&o| !offsets1.contains(&(p as i64, o))).collect();
        assert!(missing.is_empty(), "partition {p} committed up to {c} but never wrote offsets {missing:?}");
    }
    let ns1: BTreeSet<u64> = run1.iter().map(|&(_, _, n)| n).collect();
    assert!(ns1.len() < N, "killed mid-stream: the first run wrote {} of {N}", ns1.len());

    // Restarted in the same group: it resumes from the committed offsets and catches up.
    let mut second = start_conflux(&pipeline("second.yaml", "out2.ndjson"));
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "after the restart only {} of {N} events were written",
            ns1.union(&written(&out2).iter().map(|&(_, _, n)| n).collect()).count()
        );
        if let Ok(Some(status)) = second.0.try_wait() {
            panic!("the second run exited on its own: {status}");
        }
        let ns2: BTreeSet<u64> = written(&out2).iter().map(|&(_, _, n)| n).collect();
        if ns1.union(&ns2).count() >= N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(Command::new("kill").args(["-TERM", &second.0.id().to_string()]).status().unwrap().success());
    assert!(second.0.wait().unwrap().success(), "the second run stops cleanly");

    let run2 = written(&out2);
    for &(p, o, n) in &run2 {
        assert!(
            o >= at_kill[p as usize],
            "event {n} ({p}/{o}) read again below the committed offset {}",
            at_kill[p as usize]
        );
    }
    let all: BTreeSet<u64> = run1.iter().chain(&run2).map(|&(_, _, n)| n).collect();
    assert_eq!(all, (0..N as u64).collect(), "every event written at least once");
    let duplicates = run1.len() + run2.len() - N;
    let committed_at_kill: i64 = at_kill.iter().sum();
    assert!(
        duplicates <= run1.len() - committed_at_kill as usize,
        "{duplicates} duplicates, more than the {} events written but not committed at the kill",
        run1.len() - committed_at_kill as usize
    );
    eprintln!(
        "SIGKILL after {} events written, {committed_at_kill} committed; {} written after the restart; {duplicates} redelivered",
        run1.len(),
        run2.len()
    );
    assert_eq!(committed(&brokers, &group, &topic, 2), N as i64, "every offset committed after the restart");
}

/// The real binary says it waits for partitions while the group join
/// completes, then how long that took (it was silent for 15-30 s).
#[tokio::test]
async fn the_kafka_input_logs_its_wait_for_partitions_and_how_long_it_took() {
    let brokers = brokers().await;
    let (topic, group) = (key("join").replace('-', "_"), key("g"));
    create_topic(&brokers, &topic, 1).await;
    produce(&brokers, &topic, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("p.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "inputs:\n  in: {{ type: kafka, brokers: [\"{brokers}\"], topics: [{topic}], group: {group} }}\noutputs:\n  out: {{ type: file, path: out.ndjson, from: in }}\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_conflux"))
        .args(["--log-level", "info", "run"])
        .arg(&pipeline)
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = dir.path().join("out.ndjson");
    let started = Instant::now();
    while std::fs::read_to_string(&out).unwrap_or_default().lines().count() < 3
        && started.elapsed() < Duration::from_secs(90)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let logs = String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).into_owned();
    assert!(logs.contains("waiting for the consumer group to assign partitions"), "{logs}");
    let joined = logs.lines().find(|l| l.contains("consumer group joined")).unwrap_or_else(|| panic!("{logs}"));
    assert!(joined.contains("waited"), "{joined}");
}

#[tokio::test]
async fn a_poison_event_goes_to_the_dead_letter_output_alone_and_its_batch_mates_are_written_once() {
    setup();
    conflux_rhai::link();
    let brokers = brokers().await;
    let (base, group, dead) = (key("poison").replace('-', "_"), key("g"), key("dead"));
    let (source, target) = (format!("{base}_in"), format!("{base}_out"));
    create_topic(&brokers, &source, 1).await;
    create_topic(&brokers, &target, 1).await;
    produce(&brokers, &source, 50).await;
    // Event 13 has no `route`, so the output cannot name its topic: it is
    // refused for good, alone; the other 49 are written in the same batches.
    let yaml = format!(
        "runtime: {{ shutdown_timeout: 200ms }}
inputs:
  in: {{ type: kafka, brokers: [\"{brokers}\"], topics: [{source}], group: {group}, batch_size: 100, commit_interval: 100ms, options: {{ session.timeout.ms: \"6000\" }} }}
stages:
  shape:
    type: rhai
    from: in
    script: |
      if event.n != 13 {{ event.route = \"out\"; }}
      event
outputs:
  out: {{ type: kafka, brokers: [\"{brokers}\"], topic: \"{base}_{{{{ route }}}}\", from: shape, retry: {{ initial_backoff: 50ms }} }}
  dead: {{ type: test_sink, key: {dead}, from: out.error }}
"
    );
    let cx = RunContext::new();
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    wait_for(|| committed(&brokers, &group, &source, 1) >= 50, "all 50 offsets committed").await;
    cx.stop.cancel();
    run.await.unwrap();
    assert_eq!(ns(&delivered(&dead)), [13].into_iter().collect(), "only the poison event is dead-lettered");
    let written = read_back(&brokers, &[&target], 49).await;
    let seen: Vec<u64> = written.iter().map(|m| m.payload["n"].as_u64().unwrap()).collect();
    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(seen.len(), 49, "each batch-mate written once: {seen:?}");
    assert_eq!(unique, (0..50).filter(|n| *n != 13).collect());
    let metrics = cx.metrics.encode();
    let line = r#"conflux_output_retries_total{pipeline="test",component="out",kind="output"} 0"#;
    assert!(metrics.contains(line), "a refused event is not retried: missing `{line}` in\n{metrics}");
}
