//! `configs/platform.yaml` end to end: tracking calls on the four paths,
//! invalid ones quarantined to a NATS subject, the day's figures and the
//! funnel read over Server-Sent Events.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::run;
use crate::free_addr;

const KEY: &str = "platform-test-key";
const STEPS: [&str; 4] = ["view_event", "select_tickets", "checkout", "purchase"];

/// Visitor `v`'s session: it goes `v % 5` steps into the funnel (0: only a custom event).
fn session(v: usize, at: chrono::DateTime<Utc>) -> Vec<(&'static str, Value)> {
    let organizer = format!("o-{}", v % 3);
    let user = if v % 4 == 3 { Value::Null } else { json!(format!("u-{}", v % 17)) };
    let mut calls = Vec::new();
    for (step, name) in STEPS.iter().enumerate().take(v % 5) {
        let mut event = json!({
            "eventId": format!("v{v}-{step}"), "sessionId": format!("s-{v}"), "userId": user, "eventName": name,
            "timestamp": (at + chrono::Duration::seconds(step as i64)).to_rfc3339(),
            "context": {"organizerId": organizer, "source": "web"},
        });
        let path = match step {
            0 => "/events/page",
            3 => {
                event["properties"] = json!({"amount": 10.0 + (v % 4) as f64 * 2.5, "currency": "EUR"});
                "/events/conversion"
            }
            _ => {
                event["eventType"] = json!("click");
                "/events/track"
            }
        };
        calls.push((path, event));
    }
    if v.is_multiple_of(5) {
        calls.push(("/events/custom", json!({"eventId": format!("v{v}-c"), "sessionId": format!("s-{v}"), "userId": user, "eventName": "newsletter", "timestamp": at.to_rfc3339(), "context": {"organizerId": organizer}})));
    }
    calls
}

/// The figures the pipeline names, computed from the tracked events.
fn figures<'a>(events: impl IntoIterator<Item = &'a (String, Value)>) -> BTreeMap<&'static str, f64> {
    let mut f: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut users = BTreeSet::new();
    let mut steps: [BTreeSet<String>; 4] = Default::default();
    for (kind, e) in events {
        *f.entry("events").or_default() += 1.0;
        *f.entry("page_views").or_default() += f64::from(kind == "page_view");
        if kind == "conversion" {
            *f.entry("conversions").or_default() += 1.0;
            *f.entry("revenue").or_default() += e["properties"]["amount"].as_f64().unwrap();
        }
        if let Some(u) = e["userId"].as_str() {
            users.insert(u.to_string());
        }
        if let Some(step) = STEPS.iter().position(|s| e["eventName"] == *s) {
            steps[step].insert(e["sessionId"].as_str().unwrap().to_string());
        }
    }
    f.insert("dau", users.len() as f64);
    for (name, sessions) in ["funnel_view", "funnel_select", "funnel_checkout", "funnel_purchase"].iter().zip(&steps) {
        f.insert(name, sessions.len() as f64);
    }
    f
}

/// The latest `metrics_update` of each channel on an SSE stream, until `done` holds (30 s at most).
async fn sse_until(url: &str, done: impl Fn(&BTreeMap<String, Value>) -> bool) -> BTreeMap<String, Value> {
    let response = reqwest::Client::new().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let mut latest = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(&latest) {
        let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, body.next()).await else { break };
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let record: String = text.drain(..end + 2).collect();
            for line in record.lines() {
                if let Some(frame) = line.strip_prefix("data: ").and_then(|d| serde_json::from_str::<Value>(d).ok()) {
                    if frame["type"] == "metrics_update" {
                        latest.insert(frame["channel"].as_str().unwrap().to_string(), frame["data"].clone());
                    }
                    for entry in frame["entries"].as_array().into_iter().flatten() {
                        latest.insert(entry["channel"].as_str().unwrap().to_string(), entry["data"].clone());
                    }
                }
            }
        }
    }
    latest
}

fn matches(got: Option<&Value>, expected: &BTreeMap<&'static str, f64>) -> bool {
    got.is_some_and(|g| expected.iter().all(|(k, v)| g[*k].as_f64().unwrap_or(0.0) == *v))
}

#[tokio::test]
async fn tracking_calls_become_live_figures_and_bad_ones_are_quarantined_on_nats() {
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let nats = async_nats::connect(&nats_url).await.expect("NATS (scripts/test.sh starts it)");
    let subject = crate::key("platform.quarantine").replace('-', "_");
    let mut quarantine = nats.subscribe(subject.clone()).await.unwrap();
    nats.flush().await.unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let (admin, intake, live) = (free_addr(), free_addr(), free_addr());
    let env = [
        ("NATS_URL", nats_url.clone()),
        ("QUARANTINE_SUBJECT", subject),
        ("PLATFORM_API_KEY", KEY.to_string()),
        ("PLATFORM_ADDRESS", intake.to_string()),
        ("PLATFORM_LIVE", live.to_string()),
        ("DATA_DIR", data_dir.path().display().to_string()),
        // A fan-out stream of this run's own: the bus outlives runs.
        ("PLATFORM_LIVE_STREAM", crate::key("PLATFORM_LIVE").replace('-', "_")),
        ("PLATFORM_LIVE_SUBJECT", crate::key("platform.live").replace('-', "_")),
    ];
    let _run = run(&[super::config("platform.yaml")], &env, admin).await;
    crate::wait_listening(live).await;

    let client = reqwest::Client::new();
    let post = |path: &str, body: &Value, key: &str| {
        client.post(format!("http://{intake}{path}")).header("X-Api-Key", key).json(body).send()
    };
    assert_eq!(post("/events/page", &json!({}), "wrong").await.unwrap().status(), 403);
    let start = Utc::now() - chrono::Duration::seconds(30);
    let mut tracked: Vec<(String, Value)> = Vec::new();
    for v in 0..60 {
        for (path, event) in session(v, start + chrono::Duration::milliseconds(200 * v as i64)) {
            assert_eq!(post(path, &event, KEY).await.unwrap().status(), 202);
            let kind = match path {
                "/events/page" => "page_view",
                "/events/conversion" => "conversion",
                "/events/custom" => "custom",
                _ => "click",
            };
            tracked.push((kind.to_string(), event.clone()));
            if v % 7 == 0 {
                // A retried call: dropped by its event id.
                assert_eq!(post(path, &event, KEY).await.unwrap().status(), 202);
            }
        }
    }
    // Invalid calls: a conversion without an amount, an unknown kind.
    let no_amount =
        json!({"eventId": "bad-1", "sessionId": "s-x", "eventName": "purchase", "timestamp": start.to_rfc3339()});
    let unknown = json!({"eventId": "bad-2", "sessionId": "s-x", "eventType": "teleport", "eventName": "x", "timestamp": start.to_rfc3339()});
    assert_eq!(post("/events/conversion", &no_amount, KEY).await.unwrap().status(), 202);
    assert_eq!(post("/events/track", &unknown, KEY).await.unwrap().status(), 202);
    let mut quarantined = Vec::new();
    while quarantined.len() < 2 {
        let message =
            tokio::time::timeout(Duration::from_secs(20), quarantine.next()).await.expect("quarantined events");
        quarantined.push(serde_json::from_slice::<Value>(&message.unwrap().payload).unwrap());
    }
    let reasons: Vec<(&str, &str, &str)> = quarantined
        .iter()
        .map(|q| {
            let first = &q["violations"][0];
            (q["event"]["eventId"].as_str().unwrap(), q["path"].as_str().unwrap(), first["path"].as_str().unwrap())
        })
        .collect();
    assert_eq!(
        reasons,
        [("bad-1", "/events/conversion", ""), ("bad-2", "/events/track", "/eventType")],
        "{quarantined:?}"
    );

    // The day's figures and the funnel, and one organizer's, over SSE.
    let today = figures(&tracked);
    let o1: Vec<(String, Value)> =
        tracked.iter().filter(|(_, e)| e["context"]["organizerId"] == "o-1").cloned().collect();
    let organizer = figures(&o1);
    let url = format!("http://{live}/live?channels=platform:today,organizer:o-1");
    let latest = sse_until(&url, |latest| {
        matches(latest.get("platform:today"), &today) && matches(latest.get("organizer:o-1"), &organizer)
    })
    .await;
    assert!(matches(latest.get("platform:today"), &today), "today {today:?}, got {:?}", latest.get("platform:today"));
    assert!(
        matches(latest.get("organizer:o-1"), &organizer),
        "o-1 {organizer:?}, got {:?}",
        latest.get("organizer:o-1")
    );
    super::screenshot(format!("http://{admin}/"), "platform-dashboard").await;
}
