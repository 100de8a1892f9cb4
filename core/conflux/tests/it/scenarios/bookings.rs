//! `configs/bookings.yaml` end to end: bookings of three restaurants posted
//! over HTTP and WebSocket (with a duplicate, invalid events and a client
//! past its rate limit), read back from Redis, PostgreSQL, the rejects file
//! and broadcast clients of an owner and an admin.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{eventually, fresh_database, fresh_redis, redis_cli, redis_hash, run, sha256sum, token};
use crate::broadcast::{next_json, Ws};
use crate::free_addr;
use crate::postgres_output::psql_in;

const SECRET: &str = "bookings-test-secret-0123456789abcdef";
const REDIS_DB: u8 = 11;
const CAPACITY: i64 = 40;
const ZONES: [&str; 3] = ["terrace", "bar", "hall"];

/// One booking's events: created, then (by `i % 4`) cancelled, confirmed
/// and completed, confirmed, or left pending. Timestamps one second apart from `at`.
fn lifecycle(restaurant: &str, i: usize, at: DateTime<Utc>) -> Vec<Value> {
    let booking = format!("{restaurant}-b{i}");
    let guests = (i % 6 + 1) as i64;
    let kinds: &[&str] = match i % 4 {
        0 => &["booking_created", "booking_cancelled"],
        1 => &["booking_created", "booking_confirmed", "booking_completed"],
        2 => &["booking_created", "booking_confirmed"],
        _ => &["booking_created"],
    };
    kinds
        .iter()
        .enumerate()
        .map(|(step, kind)| {
            let mut data = json!({
                "bookingId": booking, "restaurantId": restaurant, "zone": ZONES[i % 3], "userId": format!("u-{i}"),
                "guests": guests, "date": at.format("%Y-%m-%d").to_string(), "time": "20:00",
                "status": kind.trim_start_matches("booking_").replace("created", "pending"),
            });
            if step == 0 {
                data["customerName"] = json!(format!("Anna{i} Marachkina"));
                data["phone"] = json!(format!("+33 6 12 34 {:02} {:02}", i, i + 10));
                data["email"] = json!(format!("guest{i}@example.com"));
            }
            let time = at + chrono::Duration::seconds(step as i64);
            json!({"id": format!("{booking}-{step}"), "type": kind, "timestamp": time.to_rfc3339(), "data": data})
        })
        .collect()
}

/// Today's figures over `events`, as the pipeline defines them.
#[derive(Debug, Default, PartialEq, Clone)]
struct Figures {
    bookings: i64,
    confirmed: i64,
    cancelled: i64,
    completed: i64,
    guests: i64,
    occupancy: i64,
}

fn figures<'a>(events: impl IntoIterator<Item = &'a Value>) -> Figures {
    let mut f = Figures::default();
    for e in events {
        let guests = e["data"]["guests"].as_i64().unwrap();
        match e["type"].as_str().unwrap() {
            "booking_created" => {
                f.bookings += 1;
                f.guests += guests;
                f.occupancy += guests;
            }
            "booking_confirmed" => f.confirmed += 1,
            "booking_cancelled" => {
                f.cancelled += 1;
                f.occupancy -= guests;
            }
            _ => {
                f.completed += 1;
                f.occupancy -= guests;
            }
        }
    }
    f
}

impl Figures {
    /// The six figures, each read by name.
    fn read(number: impl Fn(&str) -> i64) -> Figures {
        Figures {
            bookings: number("bookings"),
            confirmed: number("confirmed"),
            cancelled: number("cancelled"),
            completed: number("completed"),
            guests: number("guests"),
            occupancy: number("occupancy"),
        }
    }
}

fn from_hash(hash: &HashMap<String, String>) -> Figures {
    Figures::read(|name| hash.get(name).and_then(|v| v.parse::<f64>().ok()).unwrap_or(-1.0) as i64)
}

fn from_frame(frame: &Value) -> Figures {
    Figures::read(|name| frame["data"][name].as_f64().unwrap_or(-1.0) as i64)
}

async fn post(url: &str, bearer: &str, events: &[Value]) -> u16 {
    let client = reqwest::Client::new();
    client.post(url).bearer_auth(bearer).json(&events).send().await.unwrap().status().as_u16()
}

async fn ws_with_token(url: &str, bearer: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("Authorization", format!("Bearer {bearer}").parse().unwrap());
    tokio_tungstenite::connect_async(request).await.map(|(ws, _)| ws)
}

/// Whether a frame the client received (kept in `seen`, with every frame
/// read meanwhile) satisfies `done`, waiting up to 30 s for it.
async fn frames_until(ws: &mut Ws, seen: &mut Vec<Value>, done: impl Fn(&Value) -> bool) -> bool {
    if seen.iter().any(&done) {
        return true;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Some(frame) = next_json(ws, Duration::from_secs(1)).await else { continue };
        let hit = done(&frame);
        seen.push(frame);
        if hit {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn bookings_from_http_and_websocket_reach_redis_postgres_and_owners_exactly() {
    let postgres = fresh_database("bookings");
    let redis = fresh_redis(REDIS_DB);
    let data_dir = tempfile::tempdir().unwrap();
    let (admin, api, socket, live) = (free_addr(), free_addr(), free_addr(), free_addr());
    let env = [
        ("JWT_SECRET", SECRET.to_string()),
        ("REDIS_URL", redis),
        ("POSTGRES_URL", postgres.clone()),
        ("DATA_DIR", data_dir.path().display().to_string()),
        ("BOOKINGS_ADDRESS", api.to_string()),
        ("BOOKINGS_WS_ADDRESS", socket.to_string()),
        ("BOOKINGS_LIVE", live.to_string()),
        ("BOOKINGS_CAPACITY", CAPACITY.to_string()),
        ("BOOKINGS_TZ", "UTC".to_string()),
        ("NO_SHOW_AFTER", "2s".to_string()),
    ];
    let _run = run(&[super::config("bookings.yaml")], &env, admin).await;
    crate::wait_listening(live).await;
    let exp = (Utc::now() + chrono::Duration::hours(1)).timestamp();
    let backend = token(SECRET, json!({"sub": "backend", "exp": exp}));
    let owner = token(SECRET, json!({"sub": "owner-1", "restaurant_id": "r-1", "exp": exp}));
    let admin_token = token(SECRET, json!({"sub": "admin", "channels": ["restaurant:*"], "exp": exp}));

    // An owner reads their restaurant and nothing else; an admin reads any.
    let live_url = format!("ws://{live}/live");
    let forbidden = ws_with_token(&format!("{live_url}?channels=restaurant:r-2"), &owner).await;
    assert!(forbidden.is_err_and(|e| e.to_string().contains("403")), "an owner asking for another restaurant");
    let mut owner_ws = ws_with_token(&format!("{live_url}?channels=restaurant:r-1"), &owner).await.unwrap();
    let mut admin_ws =
        ws_with_token(&format!("{live_url}?channels=restaurant:r-2,restaurant:r-3,restaurant:r-9"), &admin_token)
            .await
            .unwrap();
    let (mut owner_frames, mut admin_frames) = (Vec::new(), Vec::new());
    assert!(frames_until(&mut owner_ws, &mut owner_frames, |f| f["type"] == "initial_state").await);

    // Today, within the last minutes (never before midnight UTC, so one day holds them all).
    let now = Utc::now();
    let midnight = now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let start = (now - chrono::Duration::minutes(5)).max(midnight);
    let mut sent: Vec<Value> = Vec::new();
    let batch = |restaurant: &str| -> Vec<Value> {
        (0..20).flat_map(|i| lifecycle(restaurant, i, start + chrono::Duration::seconds(i as i64 * 4))).collect()
    };
    let api_url = format!("http://{api}/api/events");
    for restaurant in ["r-1", "r-2"] {
        let events = batch(restaurant);
        assert_eq!(post(&api_url, &backend, &events).await, 202);
        sent.extend(events);
    }
    // r-3 comes over the WebSocket intake, ten events a message.
    let mut intake = ws_with_token(&format!("ws://{socket}/ws/events"), &backend).await.unwrap();
    let events = batch("r-3");
    for chunk in events.chunks(10) {
        intake.send(Message::Text(Value::from(chunk.to_vec()).to_string().into())).await.unwrap();
        let reply = next_json(&mut intake, Duration::from_secs(10)).await.expect("a reply per message");
        assert_eq!(reply["status"], 202, "{reply}");
    }
    sent.extend(events);
    // A retried delivery of an event already sent, and two invalid events.
    let duplicate = sent[0].clone();
    let mut lost = lifecycle("r-1", 99, start).remove(0);
    lost["type"] = json!("booking_lost");
    let mut empty = lifecycle("r-2", 98, start).remove(0);
    empty["data"]["guests"] = json!(0);
    assert_eq!(post(&api_url, &backend, &[duplicate, lost, empty]).await, 202);

    // A client past 100 requests a minute gets 429; what it sent before counts.
    let flooder = token(SECRET, json!({"sub": "flood", "exp": exp}));
    let mut statuses = Vec::new();
    for i in 0..101 {
        let event = lifecycle("r-9", 1000 + i, start).remove(0);
        let status = post(&api_url, &flooder, std::slice::from_ref(&event)).await;
        if status == 202 {
            sent.push(event);
        }
        statuses.push(status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 202).count(), 100, "{statuses:?}");
    assert_eq!(statuses[100], 429);

    // From POST to the owner's page: one more booking, timed.
    let probe = lifecycle("r-1", 50, now).remove(0);
    let posted = Instant::now();
    assert_eq!(post(&api_url, &backend, std::slice::from_ref(&probe)).await, 202);
    let probe_id = probe["data"]["bookingId"].clone();
    let arrived = frames_until(&mut owner_ws, &mut owner_frames, |f| {
        f["type"] == "booking_created" && f["data"]["data"]["bookingId"] == probe_id
    })
    .await;
    let latency = posted.elapsed();
    assert!(arrived, "the probe booking reached the owner");
    eprintln!("bookings: POST to the owner's WebSocket client in {latency:?}");
    assert!(latency < Duration::from_millis(500), "POST to client took {latency:?} (the scenario promises < 500 ms)");
    sent.push(probe);

    // Redis: today's totals, each hour's, each zone's; all expire within a day.
    let today = figures(&sent);
    let hash = eventually(Duration::from_secs(30), "metrics:today reached the expected figures", || {
        let hash = redis_hash(REDIS_DB, "metrics:today");
        (from_hash(&hash) == today).then_some(hash)
    })
    .await;
    assert_eq!(hash["day"], format!("{}T00:00:00.000Z", now.format("%Y-%m-%d")));
    let mut hourly: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut zones: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for e in sent.iter().filter(|e| e["type"] == "booking_created") {
        let at = DateTime::parse_from_rfc3339(e["timestamp"].as_str().unwrap()).unwrap().with_timezone(&Utc);
        let guests = e["data"]["guests"].as_i64().unwrap();
        let hour = hourly.entry(at.format("%Y-%m-%dT%H:00:00.000Z").to_string()).or_default();
        *hour = (hour.0 + 1, hour.1 + guests);
        let zone = zones.entry(e["data"]["zone"].as_str().unwrap().to_string()).or_default();
        *zone = (zone.0 + 1, zone.1 + guests);
    }
    for (prefix, expected) in [("metrics:hourly:", &hourly), ("metrics:zones:", &zones)] {
        for (name, (bookings, guests)) in expected {
            let key = format!("{prefix}{name}");
            eventually(Duration::from_secs(10), &format!("{key} = {bookings} bookings, {guests} guests"), || {
                let hash = redis_hash(REDIS_DB, &key);
                (hash.get("bookings") == Some(&bookings.to_string()) && hash.get("guests") == Some(&guests.to_string()))
                    .then_some(())
            })
            .await;
        }
    }
    for key in ["metrics:today".to_string(), format!("metrics:zones:{}", ZONES[0])] {
        let ttl: i64 = redis_cli(REDIS_DB, &["TTL", &key]).trim().parse().unwrap();
        assert!(ttl > 86_000 && ttl <= 86_400, "{key} expires within a day: TTL {ttl}");
    }

    // PostgreSQL: every valid event once, personal data masked, the hourly rollup agrees.
    let expected_rows = sent.len();
    eventually(Duration::from_secs(30), &format!("{expected_rows} rows in booking_events"), || {
        let rows: usize = psql_in(&postgres, "SELECT count(*) FROM booking_events").trim().parse().unwrap();
        (rows == expected_rows).then_some(())
    })
    .await;
    let distinct = psql_in(&postgres, "SELECT count(DISTINCT id) FROM booking_events");
    assert_eq!(distinct.trim(), expected_rows.to_string(), "no event twice");
    let first = &sent[0]["data"];
    let row = psql_in(
        &postgres,
        &format!(
            "SELECT payload->>'customerName', payload->>'phone', payload->>'email' FROM booking_events WHERE id = '{}'",
            sent[0]["id"].as_str().unwrap()
        ),
    );
    let name = first["customerName"].as_str().unwrap();
    let short = format!("{} {}.", name.split(' ').next().unwrap(), &name.split(' ').nth(1).unwrap()[..1]);
    let phone_digits: String = first["phone"].as_str().unwrap().chars().filter(char::is_ascii_digit).collect();
    let masked_phone = format!("{}{}", "*".repeat(phone_digits.len() - 4), &phone_digits[phone_digits.len() - 4..]);
    assert_eq!(row.trim(), format!("{short}|{masked_phone}|{}", sha256sum(first["email"].as_str().unwrap())));
    let leaked = psql_in(&postgres, "SELECT count(*) FROM booking_events WHERE payload::text LIKE '%Marachkina%' OR payload::text LIKE '%@example.com%'");
    assert_eq!(leaked.trim(), "0", "no name, phone or e-mail in the clear");
    let mut per_type: BTreeMap<String, usize> = BTreeMap::new();
    for e in &sent {
        *per_type.entry(e["type"].as_str().unwrap().to_string()).or_default() += 1;
    }
    let rollup = psql_in(&postgres, "SELECT type, sum(events) FROM booking_events_hourly GROUP BY type ORDER BY type");
    let expected_rollup: String = per_type.iter().map(|(t, n)| format!("{t}|{n}\n")).collect();
    assert_eq!(rollup, expected_rollup, "the hourly rollup counts every event");

    // The rejects file: both invalid events, with every reason.
    let rejects = std::fs::read_to_string(data_dir.path().join("bookings-rejects.ndjson")).unwrap();
    let rejects: Vec<Value> = rejects.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let refused: Vec<(&str, &str)> = rejects
        .iter()
        .flat_map(|r| {
            let id = r["event"]["id"].as_str().unwrap();
            r["violations"].as_array().unwrap().iter().map(move |v| (id, v["path"].as_str().unwrap()))
        })
        .collect();
    assert_eq!(refused, [("r-1-b99-0", "/type"), ("r-2-b98-0", "/data/guests")], "{rejects:?}");

    // The owner's page: r-1 alone, its latest figures exact, the cancellation alert.
    let r1 = figures(sent.iter().filter(|e| e["data"]["restaurantId"] == "r-1"));
    let reached =
        frames_until(&mut owner_ws, &mut owner_frames, |f| f["type"] == "metrics_update" && from_frame(f) == r1).await;
    assert!(reached, "the owner's latest figures {r1:?}");
    assert!(owner_frames.iter().all(|f| f["channel"].is_null() || f["channel"] == "restaurant:r-1"));
    let alert = |f: &Value, name: &str| f["type"] == "alert" && f["data"]["alert"] == name;
    // 5 of 20 cancelled: 25%, over the 20% threshold once 10 bookings were made.
    assert!(frames_until(&mut owner_ws, &mut owner_frames, |f| alert(f, "high_cancellation")).await);
    // Bookings confirmed and neither completed nor cancelled within NO_SHOW_AFTER (i % 4 == 2).
    let no_shows: BTreeSet<String> = sent
        .iter()
        .filter(|e| e["data"]["restaurantId"] == "r-1" && e["type"] == "booking_confirmed")
        .filter(|c| {
            !sent.iter().any(|e| e["data"]["bookingId"] == c["data"]["bookingId"] && e["type"] == "booking_completed")
        })
        .map(|c| c["data"]["bookingId"].as_str().unwrap().to_string())
        .collect();
    let firing =
        |frames: &[Value]| frames.iter().filter(|f| alert(f, "no_show") && f["data"]["state"] == "firing").count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while firing(&owner_frames) < no_shows.len() && Instant::now() < deadline {
        if let Some(frame) = next_json(&mut owner_ws, Duration::from_secs(1)).await {
            owner_frames.push(frame);
        }
    }
    // Two seconds more: nothing beyond them fires.
    let settle = Instant::now() + Duration::from_secs(2);
    while Instant::now() < settle {
        if let Some(frame) = next_json(&mut owner_ws, Duration::from_millis(200)).await {
            owner_frames.push(frame);
        }
    }
    assert_eq!(firing(&owner_frames), no_shows.len(), "one no_show per open confirmed booking of r-1: {no_shows:?}");
    // The admin's: r-2 and r-3 figures.
    for restaurant in ["r-2", "r-3"] {
        let expected = figures(sent.iter().filter(|e| e["data"]["restaurantId"] == restaurant));
        let channel = format!("restaurant:{restaurant}");
        let reached = frames_until(&mut admin_ws, &mut admin_frames, |f| {
            f["type"] == "metrics_update" && f["channel"] == channel.as_str() && from_frame(f) == expected
        })
        .await;
        assert!(reached, "the admin sees {restaurant} at {expected:?}");
    }
    // r-9's 100 open bookings pass 90% of 40 seats.
    let r9 = figures(sent.iter().filter(|e| e["data"]["restaurantId"] == "r-9"));
    assert!(r9.occupancy as f64 > 0.9 * CAPACITY as f64);
    let almost_full = |f: &Value| f["type"] == "alert" && f["data"]["alert"] == "almost_full";
    let fired = frames_until(&mut admin_ws, &mut admin_frames, almost_full).await;
    assert!(fired, "almost_full for r-9 at {} guests", r9.occupancy);
    // What an admin's dashboard shows.
    super::screenshot(format!("http://{admin}/?token={admin_token}"), "bookings-dashboard").await;
}
