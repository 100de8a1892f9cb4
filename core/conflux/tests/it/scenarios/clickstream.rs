//! `configs/clickstream.yaml` end to end: beacons over HTTP and WebSocket
//! (with retried beacons and a client over its token bucket), read back from
//! Redis, PostgreSQL and a dashboard client.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{eventually, fresh_database, fresh_redis, redis_hash, run};
use crate::broadcast::next_json;
use crate::free_addr;
use crate::postgres_output::psql_in;

const REDIS_DB: u8 = 14;
const ROUTES: [&str; 4] = ["/", "/menu", "/api/book", "/api/pay"];

/// Event `i` of the run: a few users on four routes, every ninth an error.
fn beacon(i: usize, at: DateTime<Utc>) -> Value {
    let status = if i.is_multiple_of(9) { 503 } else { 200 };
    json!({
        "id": format!("c-{i}"), "type": if i.is_multiple_of(3) { "page_view" } else { "api_call" },
        "timestamp": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "clientId": "web",
        "sessionId": format!("s-{}", i % 7), "userId": format!("u-{}", i % 5), "route": ROUTES[i % 4],
        "durationMs": 10 + (i % 50) as i64, "status": status,
    })
}

#[derive(Debug, Default)]
struct Window {
    events: usize,
    users: BTreeSet<String>,
    errors: usize,
}

#[tokio::test]
async fn beacons_reach_redis_postgres_and_the_dashboard_per_window() {
    let postgres = fresh_database("clicks");
    let redis = fresh_redis(REDIS_DB);
    let data_dir = tempfile::tempdir().unwrap();
    let (admin, http, ws, live) = (free_addr(), free_addr(), free_addr(), free_addr());
    let env = [
        ("REDIS_URL", redis),
        ("POSTGRES_URL", postgres.clone()),
        ("DATA_DIR", data_dir.path().display().to_string()),
        ("CLICKSTREAM_ADDRESS", http.to_string()),
        ("CLICKSTREAM_WS_ADDRESS", ws.to_string()),
        ("CLICKSTREAM_LIVE", live.to_string()),
    ];
    let _run = run(&[super::config("clickstream.yaml")], &env, admin).await;
    crate::wait_listening(live).await;
    let (mut dashboard, _) =
        tokio_tungstenite::connect_async(format!("ws://{live}/live?channels=traffic:5s")).await.unwrap();

    // 400 events, 25 ms apart, ending 12 s ago: their windows close on the last tick below.
    let start = Utc::now() - chrono::Duration::seconds(22);
    let events: Vec<Value> =
        (0..400).map(|i| beacon(i, start + chrono::Duration::milliseconds(25 * i as i64))).collect();
    let client = reqwest::Client::new();
    let url = format!("http://{http}/events");
    for chunk in events[..300].chunks(50) {
        let status = client.post(&url).json(&chunk).send().await.unwrap().status();
        assert_eq!(status, 202);
    }
    // The rest over the WebSocket, with every tenth sent twice (a retried beacon),
    // 40 a second: under the connection's 50 a second.
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{ws}/ws")).await.unwrap();
    for (n, event) in events[300..].iter().enumerate() {
        for _ in 0..if n % 10 == 0 { 2 } else { 1 } {
            socket.send(Message::Text(event.to_string().into())).await.unwrap();
            let reply = next_json(&mut socket, Duration::from_secs(10)).await.expect("a reply per message");
            assert_eq!(reply["status"], 202, "{reply}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    // A page gone wild: its token bucket (burst 100, 50/s) refuses it with 429, not the others.
    let mut accepted = Vec::new();
    let mut refused = 0;
    let last = start + chrono::Duration::seconds(10); // after the others: in a window still open
    for i in 0..150 {
        let event = beacon(10_000 + i, last);
        match client.post(&url).json(&event).send().await.unwrap().status().as_u16() {
            202 => accepted.push(event),
            429 => refused += 1,
            other => panic!("{other}"),
        }
    }
    assert!(refused > 0 && accepted.len() >= 90, "{} accepted, {refused} refused", accepted.len());
    // Once the bucket refilled, the tick whose time closes the windows above.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tick = beacon(20_000, Utc::now());
    assert_eq!(client.post(&url).json(&tick).send().await.unwrap().status(), 202);

    // Expected per 5-second window, from what was accepted.
    let mut all = events.clone();
    all.extend(accepted.iter().cloned());
    let mut windows: BTreeMap<String, Window> = BTreeMap::new();
    for e in &all {
        let at = DateTime::parse_from_rfc3339(e["timestamp"].as_str().unwrap()).unwrap().with_timezone(&Utc);
        let seconds = at.timestamp() - at.timestamp().rem_euclid(5);
        let key = DateTime::from_timestamp(seconds, 0).unwrap().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
        let w = windows.entry(key).or_default();
        w.events += 1;
        w.users.insert(e["userId"].as_str().unwrap().to_string());
        w.errors += usize::from(e["status"] == 503);
    }
    for (start, w) in &windows {
        let key = format!("traffic:5s:{start}");
        eventually(Duration::from_secs(30), &format!("{key} = {w:?}"), || {
            let hash = redis_hash(REDIS_DB, &key);
            let rate = w.errors as f64 / w.events as f64;
            (hash.get("events") == Some(&w.events.to_string())
                && hash.get("users") == Some(&w.users.len().to_string())
                && hash.get("errors") == Some(&w.errors.to_string())
                && hash.get("error_rate").and_then(|r| r.parse::<f64>().ok()).is_some_and(|r| (r - rate).abs() < 1e-9))
            .then_some(())
        })
        .await;
    }
    // PostgreSQL: every accepted event once (retried beacons dropped).
    let expected_rows = all.len();
    eventually(Duration::from_secs(30), &format!("{expected_rows} rows in click_events"), || {
        let before_tick =
            format!("SELECT count(*) FROM click_events WHERE at < '{}'", tick["timestamp"].as_str().unwrap());
        let rows: usize = psql_in(&postgres, &before_tick).trim().parse().unwrap();
        (rows == expected_rows).then_some(())
    })
    .await;
    // The dashboard got each window's figures.
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    while windows.iter().any(|(start, w)| seen.get(start) != Some(&(w.events as u64))) {
        let frame = next_json(&mut dashboard, Duration::from_secs(20)).await.expect("traffic:5s frames");
        if frame["type"] == "metrics_update" {
            let start = frame["data"]["window"]["start"].as_str().unwrap().to_string();
            seen.insert(start, frame["data"]["events"].as_u64().unwrap());
        }
    }
    super::screenshot(format!("http://{admin}/"), "clickstream-dashboard").await;
}
