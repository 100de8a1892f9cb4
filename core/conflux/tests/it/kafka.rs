//! `kafka` input and output against a real Kafka-protocol broker (tansu,
//! started by scripts/test.sh) and librdkafka's mock cluster for failures.

use std::collections::BTreeSet;
use std::time::Duration;

use conflux_api::AckStatus;
use conflux_engine::runtime::RunContext;
use conflux_testkit::{acks, attempts, delivered, release, run_yaml};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};

use crate::{key, setup};

/// The broker address, after checking something listens there.
async fn brokers() -> String {
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

async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
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
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create().unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let sum = {
        let got = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
        got.elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum()
    };
    drop(consumer);
    sum
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
