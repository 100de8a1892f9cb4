//! `configs/multichannel.yaml` and `configs/multichannel_store.yaml` run
//! together: apps POST to /analytics, events go through a Kafka topic
//! (tansu) keyed by session, then into PostgreSQL and hourly NDJSON files.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, TopicPartitionList};
use serde_json::{json, Value};

use super::{eventually, fresh_database, run};
use crate::free_addr;
use crate::kafka::{brokers, create_topic};
use crate::postgres_output::psql_in;

const CHANNELS: [&str; 3] = ["web", "mobile", "chat"];

/// Interaction `i`: 30 s apart from 09:30, so 300 of them fill three hours of the archive.
fn interaction(i: usize) -> Value {
    let at = chrono::DateTime::parse_from_rfc3339("2026-11-22T09:30:00Z").unwrap()
        + chrono::Duration::seconds(30 * i as i64);
    let channel = CHANNELS[i % 3];
    let kind = ["page_view", "button_click", "message"][i % 3];
    let mut event = json!({
        "event_type": kind, "channel": channel,
        "session_id": format!("s-{}", i % 11), "user_id": format!("u-{}", i % 13),
        "timestamp": at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "context": {"page_url": format!("/p/{}", i % 5)}, "properties": {"n": i},
    });
    if i.is_multiple_of(2) {
        event["event_id"] = json!(format!("given-{i}"));
    }
    event
}

#[tokio::test]
async fn interactions_go_through_kafka_into_postgres_and_hourly_files() {
    let brokers = brokers().await;
    let topic = crate::key("analytics");
    create_topic(&brokers, &topic, 3).await;
    let postgres = fresh_database("analytics");
    let data_dir = tempfile::tempdir().unwrap();
    let (admin, intake) = (free_addr(), free_addr());
    let env = [
        ("KAFKA_BROKERS", brokers.clone()),
        ("ANALYTICS_TOPIC", topic.clone()),
        ("ANALYTICS_STORE_GROUP", crate::key("store")),
        ("ANALYTICS_LAKE_GROUP", crate::key("lake")),
        ("POSTGRES_URL", postgres.clone()),
        ("DATA_DIR", data_dir.path().display().to_string()),
        ("MULTICHANNEL_ADDRESS", intake.to_string()),
    ];
    let files = [super::config("multichannel.yaml"), super::config("multichannel_store.yaml")];
    let _run = run(&files, &env, admin).await;

    let client = reqwest::Client::new();
    let url = format!("http://{intake}/analytics");
    let events: Vec<Value> = (0..300).map(interaction).collect();
    for chunk in events.chunks(60) {
        // `ack: sync`: 200 once Kafka confirmed every event.
        let response = client.post(&url).json(&chunk).send().await.unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    // An app sending a broken event is told why, and nothing of it goes on.
    let mut broken = interaction(999);
    broken["channel"] = json!("fax");
    broken.as_object_mut().unwrap().remove("session_id");
    let response = client.post(&url).json(&broken).send().await.unwrap();
    assert_eq!(response.status(), 422);
    let answer: Value = response.json().await.unwrap();
    let paths: Vec<&str> =
        answer["violations"].as_array().unwrap().iter().map(|v| v["path"].as_str().unwrap()).collect();
    assert!(paths.contains(&"/channel") && paths.contains(&""), "{answer}");

    // The topic: every event, keyed by its session, each session on one partition in order.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", crate::key("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..3 {
        list.add_partition_offset(&topic, p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&list).unwrap();
    let mut on_topic: Vec<(i32, String, Value)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while on_topic.len() < events.len() && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            on_topic.push((m.partition(), key, serde_json::from_slice(m.payload().unwrap()).unwrap()));
        }
    }
    assert_eq!(on_topic.len(), events.len(), "every event on the topic");
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    let mut last_n: HashMap<String, i64> = HashMap::new();
    for (partition, key, event) in &on_topic {
        assert_eq!(key, event["session_id"].as_str().unwrap(), "keyed by session");
        assert_eq!(*partition_of.entry(key.clone()).or_insert(*partition), *partition, "one partition per session");
        let n = event["properties"]["n"].as_i64().unwrap();
        assert!(last_n.insert(key.clone(), n).is_none_or(|before| before < n), "a session's events in order");
        let sent = &events[n as usize];
        match sent["event_id"].as_str() {
            Some(given) => assert_eq!(event["event_id"], given, "a client's id is kept"),
            None => assert_eq!(event["event_id"].as_str().unwrap().len(), 36, "an id is given: {event}"),
        }
        assert!(event["received_at"].is_string());
    }
    let ids: HashMap<i64, String> = on_topic
        .iter()
        .map(|(_, _, e)| (e["properties"]["n"].as_i64().unwrap(), e["event_id"].as_str().unwrap().to_string()))
        .collect();

    // PostgreSQL: each event once, with the indexes the seed asks for and the hourly rollup.
    eventually(Duration::from_secs(30), "300 rows in analytics_events", || {
        let rows = psql_in(&postgres, "SELECT count(DISTINCT event_id) FROM analytics_events");
        (rows.trim() == "300").then_some(())
    })
    .await;
    assert_eq!(psql_in(&postgres, "SELECT count(*) FROM analytics_events").trim(), "300");
    let indexed = psql_in(&postgres, "SELECT indexdef FROM pg_indexes WHERE tablename = 'analytics_events'");
    for column in ["event_type", "channel", "session_id", "at"] {
        assert!(indexed.contains(&format!("({column})")), "an index on {column}: {indexed}");
    }
    let mut per_channel: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &events {
        *per_channel.entry(e["channel"].as_str().unwrap()).or_default() += 1;
    }
    let expected: String = per_channel.iter().map(|(c, n)| format!("{c}|{n}\n")).collect();
    let rollup = psql_in(
        &postgres,
        "SELECT channel, sum(events) FROM analytics_events_hourly GROUP BY channel ORDER BY channel",
    );
    assert_eq!(rollup, expected);

    // The archive: one file per hour of the events' own time, each line the event as on the topic.
    let mut per_hour: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for e in &events {
        let at = e["timestamp"].as_str().unwrap();
        let hour = format!("{}/{}/{}/{}", &at[..4], &at[5..7], &at[8..10], &at[11..13]);
        per_hour.entry(hour).or_default().push(e["properties"]["n"].as_i64().unwrap());
    }
    assert_eq!(per_hour.len(), 3);
    for (hour, ns) in &per_hour {
        let path = data_dir.path().join(format!("lake/analytics-events/{hour}.ndjson"));
        let lines = eventually(Duration::from_secs(30), &format!("{} lines in {}", ns.len(), path.display()), || {
            let text = std::fs::read_to_string(&path).ok()?;
            (text.lines().count() == ns.len()).then_some(text)
        })
        .await;
        let mut archived: Vec<i64> = lines
            .lines()
            .map(|l| {
                let e: Value = serde_json::from_str(l).unwrap();
                let n = e["properties"]["n"].as_i64().unwrap();
                assert_eq!(e["event_id"].as_str(), Some(ids[&n].as_str()), "the event as on the topic");
                n
            })
            .collect();
        archived.sort_unstable();
        assert_eq!(&archived, ns, "{hour}");
    }
}
