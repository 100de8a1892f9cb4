//! A load client for `configs/ecommerce.yaml` (`scripts/bench.sh ecommerce`):
//! shop sessions produced to Kafka, and the order ticker read back.
//!
//! - `produce <brokers> <topic> <events>`: creates the topic (3 partitions)
//!   and produces `events` shop events as fast as the broker takes them.
//! - `latency <ws-url> <brokers> <topic> <rate> <seconds>`: produces at
//!   `rate` events per second, each stamped (`sentAt`, epoch µs), while a
//!   client of the order ticker (`shop:orders`) takes the time each purchase
//!   reached it; prints the Kafka → pipeline → WebSocket latency. A first
//!   purchase, awaited before the timed run, lets the consumer join its group.
//!
//! Output: one line of `key=value` pairs, for the script to read.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use tokio_tungstenite::tungstenite::Message;

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

/// The `n`th event of an endless run of sessions: eight events a session,
/// views of three products, two carts lines, one purchase, more views.
fn event(n: u64) -> (String, String) {
    let session = n / 8;
    let product = (session * 7 + n % 8) % 50;
    let price = (product + 1) as f64 * 1.25;
    let kind = match n % 8 {
        3 | 5 => "add_to_cart",
        6 => "purchase",
        _ => "page_view",
    };
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let cart = if kind == "page_view" { String::new() } else { format!(",\"cartId\":\"c-{session}\",\"quantity\":1") };
    let json = format!(
        "{{\"id\":\"e-{n}\",\"type\":\"{kind}\",\"timestamp\":\"{time}\",\"sessionId\":\"s-{session}\",\"userId\":\"u-{}\",\"productId\":\"p-{product}\",\"price\":{price}{cart},\"sentAt\":{}}}",
        session % 1000,
        now_us()
    );
    (format!("s-{session}"), json)
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "2")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("a Kafka producer")
}

async fn create_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("a Kafka admin client");
    let created = admin
        .create_topics(&[NewTopic::new(topic, 3, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .expect("the broker answers");
    for result in created {
        if let Err((name, e)) = result {
            if e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                panic!("cannot create {name}: {e}");
            }
        }
    }
}

/// Sends `count` events from `first`, at most `rate` a second (0: as fast as they go).
async fn send(producer: &FutureProducer, topic: &str, first: u64, count: u64, rate: u64) {
    let started = Instant::now();
    let mut pending = Vec::with_capacity(1024);
    for n in first..first + count {
        if rate > 0 {
            let due = started + Duration::from_secs_f64((n - first) as f64 / rate as f64);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let (key, json) = event(n);
        match producer.send_result(FutureRecord::to(topic).key(&key).payload(&json)) {
            Ok(delivery) => pending.push(delivery),
            Err((e, _)) => panic!("cannot queue a message: {e}"),
        }
        if pending.len() == 1024 {
            for delivery in pending.drain(..) {
                delivery.await.expect("delivered").expect("acknowledged by the broker");
            }
        }
    }
    for delivery in pending {
        delivery.await.expect("delivered").expect("acknowledged by the broker");
    }
    producer.flush(Duration::from_secs(30)).expect("flushed");
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: shop_load produce <brokers> <topic> <events> | latency <ws-url> <brokers> <topic> <rate> <seconds>";
    match args.get(1).map(String::as_str) {
        Some("produce") if args.len() == 5 => {
            let (brokers, topic) = (&args[2], &args[3]);
            let events: u64 = args[4].parse().expect(usage);
            create_topic(brokers, topic).await;
            let started = Instant::now();
            send(&producer(brokers), topic, 0, events, 0).await;
            println!("produced={events} seconds={:.2}", started.elapsed().as_secs_f64());
        }
        Some("latency") if args.len() == 7 => {
            let (url, brokers, topic) = (&args[2], &args[3], &args[4]);
            let rate: u64 = args[5].parse().expect(usage);
            let seconds: u64 = args[6].parse().expect(usage);
            create_topic(brokers, topic).await;
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("the ticker");
            // One purchase first, until it shows: the consumer has joined its group
            // (tansu takes seconds) and the timed run measures the pipeline, not that.
            let warm_up = 1_000_000_006;
            send(&producer(brokers), topic, warm_up, 1, 0).await;
            let joined = Instant::now() + Duration::from_secs(120);
            loop {
                assert!(Instant::now() < joined, "the warm-up purchase never reached the ticker");
                let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await
                else {
                    continue;
                };
                let frame: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if frame["data"]["id"] == format!("e-{warm_up}").as_str() {
                    break;
                }
            }
            let count = rate * seconds;
            let producing = {
                let (brokers, topic) = (brokers.clone(), topic.clone());
                tokio::spawn(async move { send(&producer(&brokers), &topic, 0, count, rate).await })
            };
            let expected = count / 8;
            let mut latencies = Vec::with_capacity(expected as usize);
            let deadline = Instant::now() + Duration::from_secs(seconds + 30);
            while (latencies.len() as u64) < expected && Instant::now() < deadline {
                let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await
                else {
                    continue;
                };
                let received = now_us();
                let frame: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if let Some(sent) = frame["data"]["sentAt"].as_u64() {
                    latencies.push(received.saturating_sub(sent));
                }
            }
            producing.await.expect("the producer finished");
            latencies.sort_unstable();
            println!(
                "events={count} rate={rate}/s orders={} of {expected} p50_ms={:.1} p90_ms={:.1} p99_ms={:.1} max_ms={:.1}",
                latencies.len(),
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.9),
                percentile(&latencies, 0.99),
                percentile(&latencies, 1.0)
            );
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
