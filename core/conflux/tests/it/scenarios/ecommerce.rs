//! `configs/ecommerce.yaml` end to end: shop sessions produced to a Kafka
//! topic (tansu), read back from Redis, PostgreSQL and a dashboard client.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};

use super::{eventually, fresh_database, fresh_redis, redis_cli, redis_hash, run};
use crate::broadcast::next_json;
use crate::free_addr;
use crate::kafka::{brokers, create_topic};
use crate::postgres_output::psql_in;

const REDIS_DB: u8 = 12;

fn price(product: usize) -> f64 {
    // Quarters add up exactly in binary floating point.
    (product + 1) as f64 * 1.25
}

/// 200 sessions: each views one to three products; every second one puts
/// the first in a cart, and every fourth buys it (the others abandon it).
fn sessions(start: DateTime<Utc>) -> Vec<Value> {
    let mut events = Vec::new();
    let mut at = start;
    let mut push = |fields: Value| {
        at += chrono::Duration::milliseconds(5);
        let mut event = fields;
        event["id"] = json!(format!("e-{}", events.len()));
        event["timestamp"] = json!(at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        events.push(event);
    };
    for s in 0..200usize {
        let session = format!("s-{s}");
        let products: Vec<usize> = (0..s % 3 + 1).map(|j| (s * 7 + j) % 12).collect();
        for p in &products {
            push(
                json!({"type": "page_view", "sessionId": session, "userId": format!("u-{}", s % 50), "productId": format!("p-{p}"), "price": price(*p)}),
            );
        }
        if s % 2 == 0 {
            let p = products[0];
            let line = json!({"sessionId": session, "productId": format!("p-{p}"), "price": price(p), "cartId": format!("c-{s}"), "quantity": s % 3 + 1});
            let mut add = line.clone();
            add["type"] = json!("add_to_cart");
            push(add);
            if s % 4 == 0 {
                let mut buy = line;
                buy["type"] = json!("purchase");
                push(buy);
            }
        }
    }
    events
}

#[derive(Debug, Default, PartialEq)]
struct Product {
    views: i64,
    added: i64,
    purchases: i64,
    revenue: f64,
}

#[tokio::test]
async fn shop_sessions_from_kafka_reach_redis_postgres_and_the_dashboard_exactly() {
    let brokers = brokers().await;
    let topic = crate::key("shop");
    create_topic(&brokers, &topic, 3).await;
    let postgres = fresh_database("shop");
    let redis = fresh_redis(REDIS_DB);
    let data_dir = tempfile::tempdir().unwrap();
    let (admin, live) = (free_addr(), free_addr());
    let env = [
        ("KAFKA_BROKERS", brokers.clone()),
        ("ECOMMERCE_TOPIC", topic.clone()),
        ("ECOMMERCE_GROUP", crate::key("shop-group")),
        ("REDIS_URL", redis),
        ("POSTGRES_URL", postgres.clone()),
        ("DATA_DIR", data_dir.path().display().to_string()),
        ("ECOMMERCE_LIVE", live.to_string()),
        ("ABANDON_AFTER", "2s".to_string()),
    ];
    let _run = run(&[super::config("ecommerce.yaml")], &env, admin).await;
    crate::wait_listening(live).await;
    let (mut dashboard, _) =
        tokio_tungstenite::connect_async(format!("ws://{live}/live?channels=shop:orders,shop:products,shop:minute"))
            .await
            .unwrap();

    let now = Utc::now();
    let events = sessions(now - chrono::Duration::seconds(20));
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    for event in &events {
        let text = event.to_string();
        let record = FutureRecord::to(&topic).key(event["sessionId"].as_str().unwrap()).payload(&text);
        producer.send(record, Duration::from_secs(10)).await.unwrap();
    }

    // What the pipeline should find, computed here.
    let mut products: BTreeMap<String, Product> = BTreeMap::new();
    let mut minutes: BTreeMap<String, (f64, BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    let mut carts_added = BTreeSet::new();
    let mut carts_bought = BTreeSet::new();
    for e in &events {
        let product = products.entry(e["productId"].as_str().unwrap().to_string()).or_default();
        let at = DateTime::parse_from_rfc3339(e["timestamp"].as_str().unwrap()).unwrap().with_timezone(&Utc);
        let minute = minutes.entry(at.format("%Y-%m-%dT%H:%M:00.000Z").to_string()).or_default();
        let session = e["sessionId"].as_str().unwrap().to_string();
        match e["type"].as_str().unwrap() {
            "page_view" => {
                product.views += 1;
                minute.1.insert(session);
            }
            "add_to_cart" => {
                product.added += 1;
                carts_added.insert(e["cartId"].as_str().unwrap().to_string());
            }
            _ => {
                let amount = e["price"].as_f64().unwrap() * e["quantity"].as_f64().unwrap();
                product.purchases += e["quantity"].as_i64().unwrap();
                product.revenue += amount;
                minute.0 += amount;
                minute.2.insert(session);
                carts_bought.insert(e["cartId"].as_str().unwrap().to_string());
            }
        }
    }

    // Redis: each product's day, each minute's revenue and conversion, the abandoned carts.
    let day = format!("{}T00:00:00.000Z", events[0]["timestamp"].as_str().unwrap().get(..10).unwrap());
    for (id, expected) in &products {
        eventually(Duration::from_secs(30), &format!("product:{id} = {expected:?}"), || {
            let hash = redis_hash(REDIS_DB, &format!("product:{id}"));
            let number = |name: &str| hash.get(name).and_then(|v| v.parse::<f64>().ok()).unwrap_or(-1.0);
            let got = Product {
                views: number("views") as i64,
                added: number("added") as i64,
                purchases: number("purchases") as i64,
                revenue: number("revenue"),
            };
            (got == *expected && hash.get("day") == Some(&day)).then_some(())
        })
        .await;
    }
    for (minute, (revenue, visitors, buyers)) in &minutes {
        let key = format!("revenue:minute:{minute}");
        let rate = buyers.len() as f64 / visitors.len() as f64;
        eventually(
            Duration::from_secs(20),
            &format!("{key}: {revenue} from {} of {} sessions", buyers.len(), visitors.len()),
            || {
                let hash = redis_hash(REDIS_DB, &key);
                let number = |name: &str| hash.get(name).and_then(|v| v.parse::<f64>().ok()).unwrap_or(-1.0);
                (number("revenue") == *revenue
                    && number("visitors") == visitors.len() as f64
                    && number("buyers") == buyers.len() as f64
                    && (number("conversion_rate") - rate).abs() < 1e-9)
                    .then_some(())
            },
        )
        .await;
    }
    let abandoned = carts_added.difference(&carts_bought).count();
    eventually(Duration::from_secs(20), &format!("{abandoned} abandoned carts"), || {
        (redis_cli(REDIS_DB, &["ZCARD", "carts:abandoned"]).trim() == abandoned.to_string()).then_some(())
    })
    .await;
    let bought_flagged =
        carts_bought.iter().filter(|c| !redis_cli(REDIS_DB, &["ZSCORE", "carts:abandoned", c]).trim().is_empty());
    assert_eq!(bought_flagged.count(), 0, "no cart that was bought counts as abandoned");

    // PostgreSQL: every event once; each product's day.
    eventually(Duration::from_secs(30), &format!("{} rows in shop_events", events.len()), || {
        let rows: usize = psql_in(&postgres, "SELECT count(DISTINCT id) FROM shop_events").trim().parse().unwrap();
        (rows == events.len()).then_some(())
    })
    .await;
    assert_eq!(psql_in(&postgres, "SELECT count(*) FROM shop_events").trim(), events.len().to_string());
    let total: f64 = products.values().map(|p| p.revenue).sum();
    assert_eq!(psql_in(&postgres, "SELECT sum(amount) FROM shop_events").trim().parse::<f64>().unwrap(), total);
    let expected_days: String = products
        .iter()
        .map(|(id, p)| format!("{id}|{}|{}|{}|{}\n", p.views, p.added, p.purchases, p.revenue))
        .collect();
    eventually(Duration::from_secs(20), "product_days holds each product's day", || {
        let rows = psql_in(
            &postgres,
            "SELECT product_id, views, added, purchases, revenue FROM product_days ORDER BY product_id",
        );
        (rows == expected_days).then_some(())
    })
    .await;

    // The dashboard: every order once on the ticker, the day's revenue per product.
    let purchases: BTreeSet<String> =
        events.iter().filter(|e| e["type"] == "purchase").map(|e| e["id"].as_str().unwrap().to_string()).collect();
    let mut orders = BTreeMap::new();
    let mut product_revenue: BTreeMap<String, f64> = BTreeMap::new();
    while orders.len() < purchases.len()
        || product_revenue.len() < products.len()
        || products.iter().any(|(id, p)| product_revenue.get(id) != Some(&p.revenue))
    {
        let frame = next_json(&mut dashboard, Duration::from_secs(20)).await.expect("dashboard frames");
        match (frame["type"].as_str(), frame["channel"].as_str()) {
            (Some("purchase"), Some("shop:orders")) => {
                *orders.entry(frame["data"]["id"].as_str().unwrap().to_string()).or_insert(0) += 1;
            }
            (Some("metrics_update"), Some("shop:products")) => {
                let id = frame["data"]["productId"].as_str().unwrap().to_string();
                product_revenue.insert(id, frame["data"]["revenue"].as_f64().unwrap());
            }
            _ => {}
        }
    }
    assert_eq!(orders.keys().cloned().collect::<BTreeSet<_>>(), purchases);
    assert!(orders.values().all(|n| *n == 1), "each order once on the ticker");
    super::screenshot(format!("http://{admin}/"), "ecommerce-dashboard").await;
}
