//! The `broadcast` output on the real binary, against real clients: a
//! WebSocket client (tokio-tungstenite) and an SSE client (reqwest reading
//! the event stream). Events come in over `http_server`; every expectation
//! is computed from what the test posted.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::{free_addr, rss_kib};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

pub(crate) type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const SECRET: &str = "broadcast-test-secret";

/// A pipeline `http_server` → `broadcast` running in the real binary.
struct Live {
    run: crate::Conflux,
    admin: SocketAddr,
    intake: SocketAddr,
    out: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Starts the binary with the broadcast output's options `options` (YAML
/// lines indented by 4) after the common ones.
async fn start(options: &str) -> Live {
    let (admin, intake, out) = (free_addr(), free_addr(), free_addr());
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("live.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: live
admin: {{ address: \"{admin}\" }}
inputs:
  in: {{ type: http_server, address: \"{intake}\", path: /events }}
outputs:
  live:
    type: broadcast
    from: in
    address: \"{out}\"
    path: /live
    channel: \"restaurant:{{{{ restaurantId }}}}\"
    message_type: \"{{{{ type }}}}\"
{options}
"
        ),
    )
    .unwrap();
    let run = crate::start_conflux(&pipeline);
    let live = Live { run, admin, intake, out, _dir: dir };
    crate::wait_ready(admin, 200, Duration::from_secs(20)).await;
    crate::wait_listening(out).await;
    live
}

impl Live {
    async fn post(&self, events: &[Value]) {
        let response =
            reqwest::Client::new().post(format!("http://{}/events", self.intake)).json(&events).send().await.unwrap();
        assert!(response.status().is_success(), "intake answered {}", response.status());
    }

    fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/live{query}", self.out)
    }

    async fn ws(&self, query: &str) -> Ws {
        tokio_tungstenite::connect_async(self.ws_url(query)).await.unwrap().0
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, text) = crate::http_get(self.admin, "/metrics").await;
        text.lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn booking(restaurant: &str, id: u64) -> Value {
    json!({"type": "booking_created", "restaurantId": restaurant, "id": id, "guests": 2})
}

/// The next JSON text frame, within `wait`.
pub(crate) async fn next_json(ws: &mut Ws, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Some(serde_json::from_str(&text).unwrap()),
            Ok(Some(Ok(Message::Close(frame)))) => {
                eprintln!("closed by the server: {frame:?}");
                return None;
            }
            Ok(None) | Ok(Some(Err(_))) | Err(_) => return None,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

async fn expect_json(ws: &mut Ws) -> Value {
    next_json(ws, Duration::from_secs(10)).await.expect("a frame within 10 s")
}

/// Frames until one of `kind` arrives.
async fn until(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let frame = expect_json(ws).await;
        if frame["type"] == kind {
            return frame;
        }
    }
}

/// A Server-Sent Events client: `(id, data)` per event, comments skipped.
struct Sse {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<conflux_api::Bytes>> + Send>>,
    buffer: String,
}

impl Sse {
    async fn open(url: &str, last_event_id: Option<&str>) -> Result<Sse, reqwest::StatusCode> {
        let mut request = reqwest::Client::new().get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        if !response.status().is_success() {
            return Err(response.status());
        }
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Ok(Sse { body: Box::pin(response.bytes_stream()), buffer: String::new() })
    }

    async fn next(&mut self, wait: Duration) -> Option<(Option<String>, Value)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut id = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str::<Value>(v).expect("each data line is one JSON value"));
                    }
                }
                if let Some(data) = data {
                    return Some((id, data));
                }
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.push_str(std::str::from_utf8(&chunk).unwrap()),
                _ => return None,
            }
        }
    }
}

fn token(claims: Value) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn state_updates_and_replies_over_websocket_and_sse_then_resume_by_cursor() {
    let live = start("    state: { key: \"{{ id }}\" }\n    history: 100\n").await;
    live.post(&[booking("r-1", 1), booking("r-1", 2), booking("r-1", 1), booking("r-2", 9)]).await;
    // An event without the channel's field goes to the error port; the rest still go out.
    live.post(&[json!({"type": "booking_created", "id": 5}), booking("r-1", 3)]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut ws = live.ws("?channels=restaurant:r-1").await;
    assert_eq!(expect_json(&mut ws).await, json!({"type": "subscribed", "channels": ["restaurant:r-1"]}));
    let state = expect_json(&mut ws).await;
    assert_eq!(state["type"], "initial_state");
    assert_eq!(state["channel"], "restaurant:r-1");
    let entries = state["entries"].as_array().unwrap();
    let keys: Vec<&str> = entries.iter().map(|e| e["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["2", "1", "3"], "the latest event per key, in sequence order");
    assert!(entries.iter().all(|e| e["channel"] == "restaurant:r-1" && e["type"] == "booking_created"));
    let as_of = state["seq"].as_u64().unwrap();
    assert_eq!(as_of, 5, "five events were published before (four on r-1, one on r-2)");

    live.post(&[json!({"type": "booking_cancelled", "restaurantId": "r-1", "id": 2})]).await;
    let update = expect_json(&mut ws).await;
    assert_eq!(update["type"], "booking_cancelled");
    assert_eq!(update["seq"], 6);
    assert_eq!(update["key"], "2");
    assert_eq!(update["data"], json!({"type": "booking_cancelled", "restaurantId": "r-1", "id": 2}));

    // Subscribe and unsubscribe by message, and a message that makes no sense.
    ws.send(Message::Text(json!({"type": "subscribe", "channels": ["restaurant:r-2"]}).to_string().into()))
        .await
        .unwrap();
    assert_eq!(expect_json(&mut ws).await["type"], "subscribed");
    let other = expect_json(&mut ws).await;
    assert_eq!((other["type"].as_str(), other["channel"].as_str()), (Some("initial_state"), Some("restaurant:r-2")));
    assert_eq!(other["entries"][0]["key"], "9");
    ws.send(Message::Text(json!({"type": "unsubscribe", "channels": ["restaurant:r-2"]}).to_string().into()))
        .await
        .unwrap();
    assert_eq!(expect_json(&mut ws).await, json!({"type": "unsubscribed", "channels": ["restaurant:r-2"]}));
    ws.send(Message::Text("{not json".into())).await.unwrap();
    let error = expect_json(&mut ws).await;
    assert_eq!((error["type"].as_str(), error["status"].as_u64()), (Some("error"), Some(400)));
    live.post(&[booking("r-2", 10), booking("r-1", 4)]).await;
    let next = expect_json(&mut ws).await;
    assert_eq!((next["channel"].as_str(), next["seq"].as_u64()), (Some("restaurant:r-1"), Some(8)), "r-2 no more");
    let cursor = next["id"].as_str().unwrap().to_string();
    drop(ws);

    // SSE: the same frames; then a reconnect with Last-Event-ID gets exactly what it missed.
    let url = format!("http://{}/live/restaurant:r-1", live.out);
    let mut sse = Sse::open(&url, None).await.unwrap();
    assert_eq!(sse.next(Duration::from_secs(5)).await.unwrap().1["type"], "subscribed");
    let (id, state) = sse.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(state["type"], "initial_state");
    assert_eq!(id.as_deref(), state["id"].as_str());
    assert_eq!(state["entries"].as_array().unwrap().len(), 4, "keys 1, 2, 3, 4");
    drop(sse);
    live.post(&[booking("r-1", 5), booking("r-2", 11), booking("r-1", 6)]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sse = Sse::open(&url, Some(&cursor)).await.unwrap();
    assert_eq!(sse.next(Duration::from_secs(5)).await.unwrap().1["type"], "subscribed");
    let missed: Vec<(Option<String>, Value)> =
        vec![sse.next(Duration::from_secs(5)).await.unwrap(), sse.next(Duration::from_secs(5)).await.unwrap()];
    assert_eq!(missed.iter().map(|(_, f)| f["data"]["id"].as_u64().unwrap()).collect::<Vec<_>>(), [5, 6]);
    assert_eq!(missed[1].0.as_deref(), missed[1].1["id"].as_str(), "the SSE id is the cursor");
    assert!(sse.next(Duration::from_millis(300)).await.is_none(), "nothing else: no duplicate");

    // The WebSocket resumes with ?since= the same way.
    let mut ws = live.ws(&format!("?channels=restaurant:r-1&since={cursor}")).await;
    assert_eq!(expect_json(&mut ws).await["type"], "subscribed");
    assert_eq!(expect_json(&mut ws).await["data"]["id"], 5);
    assert_eq!(expect_json(&mut ws).await["data"]["id"], 6);
    assert!(next_json(&mut ws, Duration::from_millis(300)).await.is_none());
    assert_eq!(live.metric("conflux_broadcast_events_published_total").await, 11.0, "4 + 1 + 1 + 2 + 3 good events");
}

#[tokio::test]
async fn a_cursor_older_than_the_history_gets_a_fresh_initial_state() {
    let live = start("    state: { key: \"{{ id }}\" }\n    history: 3\n").await;
    live.post(&[booking("r-1", 1)]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ws = live.ws("?channels=restaurant:r-1").await;
    let cursor = until(&mut ws, "initial_state").await["id"].as_str().unwrap().to_string();
    drop(ws);
    live.post(&(2..12).map(|i| booking("r-1", i)).collect::<Vec<_>>()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ws = live.ws(&format!("?channels=restaurant:r-1&since={cursor}")).await;
    assert_eq!(expect_json(&mut ws).await["type"], "subscribed");
    let state = expect_json(&mut ws).await;
    assert_eq!(state["type"], "initial_state", "ten events happened and three are kept: start over");
    assert_eq!(state["entries"].as_array().unwrap().len(), 11);
    assert_eq!(state["seq"], 11);
    // A cursor from another epoch (an earlier process) is not trusted either.
    let mut ws = live.ws("?channels=restaurant:r-1&since=earlier-10").await;
    assert_eq!(until(&mut ws, "initial_state").await["seq"], 11);
}

const AUTH: &str = "    auth: { jwt: { secret: broadcast-test-secret } }
    allow: [\"restaurant:{claims.restaurant_id}\"]
";

#[tokio::test]
async fn auth_refuses_bad_tokens_and_forbidden_channels_and_closes_at_expiry() {
    let live = start(AUTH).await;
    let owner = token(json!({"sub": "o1", "restaurant_id": "r-1", "exp": now() + 600}));
    let url = |query: &str| format!("http://{}/live{query}", live.out);

    assert_eq!(Sse::open(&url("?channels=restaurant:r-1"), None).await.err(), Some(reqwest::StatusCode::UNAUTHORIZED));
    let forged = token(json!({"sub": "o1", "restaurant_id": "r-1", "exp": now() + 600})).replace('.', "x.");
    assert_eq!(
        Sse::open(&url(&format!("?channels=restaurant:r-1&token={forged}")), None).await.err(),
        Some(reqwest::StatusCode::UNAUTHORIZED)
    );
    let expired = token(json!({"sub": "o1", "restaurant_id": "r-1", "exp": now() - 60}));
    assert_eq!(
        Sse::open(&url(&format!("?channels=restaurant:r-1&token={expired}")), None).await.err(),
        Some(reqwest::StatusCode::UNAUTHORIZED)
    );
    assert_eq!(
        Sse::open(&url(&format!("?channels=restaurant:r-2&token={owner}")), None).await.err(),
        Some(reqwest::StatusCode::FORBIDDEN),
        "an owner may not read another restaurant"
    );
    assert!(Sse::open(&url(&format!("?channels=restaurant:r-1&token={owner}")), None).await.is_ok());
    // The WebSocket upgrade is refused the same way, before it happens.
    match tokio_tungstenite::connect_async(live.ws_url(&format!("?channels=restaurant:r-2&token={owner}"))).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected a 403, got {:?}", other.map(|_| "a connection")),
    }
    // A cookie carries the token too.
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        live.ws_url("?channels=restaurant:r-1"),
    )
    .unwrap();
    request.headers_mut().insert("cookie", format!("theme=dark; conflux_token={owner}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(expect_json(&mut ws).await["type"], "subscribed");

    // No credentials: the first message authenticates; a subscribe to a forbidden channel is an error frame.
    let mut ws = live.ws("?channels=restaurant:r-1").await;
    ws.send(Message::Text(json!({"type": "auth", "token": owner}).to_string().into())).await.unwrap();
    assert_eq!(expect_json(&mut ws).await["type"], "subscribed");
    ws.send(Message::Text(json!({"type": "subscribe", "channels": ["restaurant:r-2"]}).to_string().into()))
        .await
        .unwrap();
    let refused = until(&mut ws, "error").await;
    assert_eq!(refused["status"], 403);
    let mut ws = live.ws("").await;
    ws.send(Message::Text(json!({"type": "subscribe", "channels": ["restaurant:r-1"]}).to_string().into()))
        .await
        .unwrap();
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4003),
        other => panic!("a first message that is not auth closes with 4003: {other:?}"),
    }

    // A token that expires while connected: the connection is closed then, with 4001.
    let short = token(json!({"sub": "o1", "restaurant_id": "r-1", "exp": now() + 2}));
    let mut ws = live.ws(&format!("?channels=restaurant:r-1&token={short}")).await;
    let started = Instant::now();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(6), ws.next()).await.expect("closed within 6 s") {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame: {other:?}"),
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(4001));
    assert!(started.elapsed() >= Duration::from_millis(900), "not before the token expired");
    assert!(live.metric("conflux_broadcast_subscriptions_denied_total").await >= 3.0);
}

#[tokio::test]
async fn many_clients_of_different_tenants_each_receive_only_their_channels() {
    let live = start(AUTH).await;
    let restaurants: Vec<String> = (0..5).map(|i| format!("r-{i}")).collect();
    let mut clients = Vec::new();
    for (i, restaurant) in restaurants.iter().cycle().take(25).enumerate() {
        let owner = token(json!({"sub": format!("o{i}"), "restaurant_id": restaurant, "exp": now() + 600}));
        let mut ws = live.ws(&format!("?channels=restaurant:{restaurant}&token={owner}")).await;
        until(&mut ws, "initial_state").await;
        // Every owner also tries to read its neighbour's channel.
        let neighbour = &restaurants[(i + 1) % restaurants.len()];
        ws.send(Message::Text(
            json!({"type": "subscribe", "channels": [format!("restaurant:{neighbour}")]}).to_string().into(),
        ))
        .await
        .unwrap();
        assert_eq!(until(&mut ws, "error").await["status"], 403);
        clients.push((Some(restaurant.clone()), ws));
    }
    for a in 0..3 {
        let admin = token(json!({"sub": format!("admin{a}"), "channels": ["restaurant:*"], "exp": now() + 600}));
        let all: Vec<String> = restaurants.iter().map(|r| format!("restaurant:{r}")).collect();
        let mut ws = live.ws(&format!("?channels={}&token={admin}", all.join(","))).await;
        for _ in 0..restaurants.len() {
            until(&mut ws, "initial_state").await;
        }
        clients.push((None, ws));
    }
    // 600 events, spread unevenly over the restaurants (and one no one reads).
    let mut posted: HashMap<String, usize> = HashMap::new();
    let events: Vec<Value> = (0..600u64)
        .map(|n| {
            let restaurant = if n % 7 == 0 { "r-secret".to_string() } else { format!("r-{}", (n * n) % 5) };
            *posted.entry(restaurant.clone()).or_default() += 1;
            booking(&restaurant, n)
        })
        .collect();
    for chunk in events.chunks(50) {
        live.post(chunk).await;
    }
    let every_restaurant: usize = restaurants.iter().map(|r| posted.get(r).copied().unwrap_or(0)).sum();
    for (restaurant, mut ws) in clients {
        let expected = match &restaurant {
            Some(r) => posted.get(r).copied().unwrap_or(0),
            None => every_restaurant,
        };
        let mut got = 0;
        while let Some(frame) =
            next_json(&mut ws, Duration::from_millis(if got < expected { 10_000 } else { 300 })).await
        {
            let channel = frame["channel"].as_str().unwrap_or_default().to_string();
            match &restaurant {
                Some(r) => assert_eq!(channel, format!("restaurant:{r}"), "an owner of {r} received {frame}"),
                None => assert_ne!(channel, "restaurant:r-secret", "admins were never given r-secret"),
            }
            assert_eq!(frame["type"], "booking_created", "{frame}");
            got += 1;
        }
        assert_eq!(got, expected, "client of {restaurant:?}: every event of its channels, once");
    }
}

#[tokio::test]
async fn subscribers_joining_under_load_get_the_state_then_every_update_with_no_gap() {
    let live = start("    state: { key: \"{{ id }}\" }\n    history: 50\n    max_queue_bytes: 8MiB\n").await;
    const EVENTS: u64 = 20_000;
    const KEYS: u64 = 50;
    let publisher = {
        let intake = live.intake;
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for start in (0..EVENTS).step_by(100) {
                let events: Vec<Value> = (start..start + 100)
                    .map(|n| json!({"type": "booking_updated", "restaurantId": "r-1", "id": n % KEYS, "n": n}))
                    .collect();
                let response = client.post(format!("http://{intake}/events")).json(&events).send().await.unwrap();
                assert!(response.status().is_success());
            }
        })
    };
    let mut joiners = Vec::new();
    for i in 0..8u64 {
        tokio::time::sleep(Duration::from_millis(40 * i)).await;
        let url = live.ws_url("?channels=restaurant:r-1");
        joiners.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let state = until(&mut ws, "initial_state").await;
            let as_of = state["seq"].as_u64().unwrap();
            // The state is each key's latest event as of `as_of`: n ≡ key (mod KEYS), the highest ≤ as_of.
            let mut latest: HashMap<u64, u64> = HashMap::new();
            for entry in state["entries"].as_array().unwrap() {
                let entry_seq = entry["seq"].as_u64().unwrap();
                assert!(entry_seq <= as_of);
                latest.insert(entry["data"]["id"].as_u64().unwrap(), entry["data"]["n"].as_u64().unwrap());
            }
            let mut next = as_of + 1;
            while next <= EVENTS {
                let frame = next_json(&mut ws, Duration::from_secs(20)).await.expect("updates until the last event");
                assert_eq!(frame["seq"].as_u64(), Some(next), "updates follow the state with no gap and no duplicate");
                latest.insert(frame["data"]["id"].as_u64().unwrap(), frame["data"]["n"].as_u64().unwrap());
                next += 1;
            }
            (as_of, latest)
        }));
    }
    publisher.await.unwrap();
    let expected: HashMap<u64, u64> = (EVENTS - KEYS..EVENTS).map(|n| (n % KEYS, n)).collect();
    let mut starts = Vec::new();
    for joiner in joiners {
        let (as_of, latest) = joiner.await.unwrap();
        starts.push(as_of);
        assert_eq!(latest, expected, "state + updates converge to each key's last event");
    }
    assert!(starts.iter().any(|&s| s > 0 && s < EVENTS), "some clients joined mid-stream: {starts:?}");
}

/// A WebSocket client that completes the handshake and then never reads.
async fn stalled_client(out: SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(out).await.unwrap();
    let request = format!(
        "GET /live?channels=restaurant:r-1 HTTP/1.1\r\nHost: {out}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    stream
}

/// Publishes 40 MB through one channel with a client that never reads and
/// one that does: the reader gets what its policy promises, memory stays
/// flat, and the policy's counter moves.
async fn stalled_client_under(policy: &str) -> (Live, HashMap<u64, u64>, usize) {
    let live = start(&format!(
        "    state: {{ key: \"{{{{ id }}}}\" }}\n    max_queue_bytes: 4MiB\n    slow_client: {policy}\n"
    ))
    .await;
    let _stalled = stalled_client(live.out).await;
    let mut reader = live.ws("?channels=restaurant:r-1").await;
    until(&mut reader, "initial_state").await;
    let pid = live.run.0.id();
    let before = rss_kib(pid);
    let pad = "x".repeat(2000);
    let mut peak = before;
    let reading = tokio::spawn(async move {
        let mut last: HashMap<u64, u64> = HashMap::new();
        let mut frames = 0;
        while let Some(frame) = next_json(&mut reader, Duration::from_secs(3)).await {
            last.insert(frame["data"]["id"].as_u64().unwrap(), frame["data"]["n"].as_u64().unwrap());
            frames += 1;
        }
        (last, frames)
    });
    for start in (0..20_000u64).step_by(200) {
        let events: Vec<Value> = (start..start + 200)
            .map(|n| json!({"type": "u", "restaurantId": "r-1", "id": n % 10, "n": n, "pad": pad}))
            .collect();
        live.post(&events).await;
        peak = peak.max(rss_kib(pid));
        // Paced (about 20 MB/s) so that the reading client keeps up; the stalled one cannot.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (last, frames) = reading.await.unwrap();
    assert!(
        peak.saturating_sub(before) < 64 * 1024,
        "{policy}: RSS {before} KiB before, {peak} KiB at most with a client that never reads"
    );
    (live, last, frames)
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_and_never_slows_the_others() {
    let (live, _, frames) = stalled_client_under("disconnect").await;
    assert_eq!(frames, 20_000, "the reading client got every event");
    assert_eq!(live.metric("conflux_broadcast_slow_clients_disconnected_total").await, 1.0);
}

#[tokio::test]
async fn drop_oldest_and_conflate_bound_a_client_that_never_reads() {
    let (live, _, frames) = stalled_client_under("drop_oldest").await;
    assert_eq!(frames, 20_000);
    assert!(live.metric("conflux_broadcast_frames_dropped_total").await > 0.0);
    drop(live);
    let (live, last, _) = stalled_client_under("conflate").await;
    let expected: HashMap<u64, u64> = (19_990..20_000).map(|n| (n % 10, n)).collect();
    assert_eq!(last, expected, "the reader converged to every key's last value");
    assert!(live.metric("conflux_broadcast_updates_conflated_total").await > 0.0);
}

/// A bus server of the test's own (the machine's are shared), so that it
/// can be killed and restarted mid-stream, each keeping what it acknowledged
/// in a folder across the restart (Redis's append-only file, JetStream's store).
#[derive(Clone, Copy, PartialEq)]
enum Bus {
    Redis,
    Nats,
}

struct OwnBus {
    bus: Bus,
    port: u16,
    store: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl OwnBus {
    fn start(bus: Bus) -> OwnBus {
        let mut own = OwnBus { bus, port: free_addr().port(), store: tempfile::tempdir().unwrap(), child: None };
        own.restart();
        own
    }

    fn restart(&mut self) {
        let port = self.port.to_string();
        let mut command = match self.bus {
            Bus::Redis => {
                let mut c = std::process::Command::new("redis-server");
                // A bus must keep what it acknowledged: an append-only file, synced per write.
                c.args(["--port", &port, "--save", "", "--appendonly", "yes", "--appendfsync", "always"]);
                c.args(["--bind", "127.0.0.1", "--dir"]).arg(self.store.path());
                c
            }
            Bus::Nats => {
                let mut c = std::process::Command::new("nats-server");
                c.args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"]).arg(self.store.path());
                c
            }
        };
        let child = command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn();
        self.child = Some(child.expect("redis-server and nats-server must be installed for the fan-out tests"));
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "the bus did not start on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn fanout(&self, name: &str) -> String {
        self.fanout_at(name, self.port)
    }

    /// The `fanout` option for a bus reached at `port` (the bus's own, or a proxy's).
    fn fanout_at(&self, name: &str, port: u16) -> String {
        match self.bus {
            Bus::Redis => format!("{{ redis: {{ url: \"redis://127.0.0.1:{port}\", stream: \"{name}\" }} }}"),
            Bus::Nats => format!(
                "{{ nats: {{ url: \"nats://127.0.0.1:{port}\", stream: \"{name}\", subject: \"live.{name}\" }} }}"
            ),
        }
    }
}

impl Drop for OwnBus {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every `data.n` a client receives until `count` arrived (or 30 s passed), with the frames' ids.
async fn collect(ws: &mut Ws, count: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while got.len() < count {
        let Some(frame) = next_json(ws, Duration::from_secs(30)).await else { break };
        if let Some(n) = frame["data"]["n"].as_u64() {
            got.push((n, frame["id"].as_str().unwrap().to_string()));
        }
    }
    got
}

#[tokio::test]
async fn two_instances_share_one_channel_space_through_redis_and_survive_a_bus_restart() {
    two_instances_share_one_channel_space(Bus::Redis).await;
}

#[tokio::test]
async fn two_instances_share_one_channel_space_through_nats_and_survive_a_bus_restart() {
    two_instances_share_one_channel_space(Bus::Nats).await;
}

async fn two_instances_share_one_channel_space(bus: Bus) {
    let mut server = OwnBus::start(bus);
    let name = crate::key("fanout");
    let options = format!("    fanout: {}\n", server.fanout(&name));
    let a = start(&options).await;
    let b = start(&options).await;
    let mut on_a = a.ws("?channels=restaurant:r-1").await;
    let mut on_b = b.ws("?channels=restaurant:r-1").await;
    until(&mut on_a, "initial_state").await;
    until(&mut on_b, "initial_state").await;
    let mut moving = a.ws("?channels=restaurant:r-1").await;
    until(&mut moving, "initial_state").await;
    let event = |n: u64| json!({"type": "u", "restaurantId": "r-1", "n": n});

    // Half the events come in at A, half at B.
    for n in (0..300).step_by(2) {
        a.post(&[event(n)]).await;
        b.post(&[event(n + 1)]).await;
    }
    // The moving client leaves A after 100 and resumes on B by its cursor.
    let first = collect(&mut moving, 100).await;
    drop(moving);
    let cursor = first.last().unwrap().1.clone();
    // The bus restarts mid-stream; events posted meanwhile wait in the pipelines.
    server.kill();
    for n in 300..400 {
        if n % 2 == 0 {
            a.post(&[event(n)]).await
        } else {
            b.post(&[event(n)]).await
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart();
    for n in 400..500 {
        a.post(&[event(n)]).await;
    }
    let mut moved = b.ws(&format!("?channels=restaurant:r-1&since={cursor}")).await;
    let seen_a = collect(&mut on_a, 500).await;
    let seen_b = collect(&mut on_b, 500).await;
    let rest = collect(&mut moved, 400).await;

    let all: Vec<u64> = (0..500).collect();
    let sorted = |seen: &[(u64, String)]| {
        let mut ns: Vec<u64> = seen.iter().map(|(n, _)| *n).collect();
        ns.sort_unstable();
        ns
    };
    assert_eq!(sorted(&seen_a), all, "the client on A got every event once");
    assert_eq!(sorted(&seen_b), all, "the client on B got every event once");
    assert_eq!(seen_a, seen_b, "both instances number and order the events alike");
    let mut moving_client = first.clone();
    moving_client.extend(rest);
    assert_eq!(sorted(&moving_client), all, "a client that moved from A to B missed nothing and got nothing twice");
}

#[tokio::test]
async fn a_fanout_write_whose_reply_was_lost_lands_once_on_redis() {
    a_fanout_write_whose_reply_was_lost_lands_once(Bus::Redis).await;
}

#[tokio::test]
async fn a_fanout_write_whose_reply_was_lost_lands_once_on_nats() {
    a_fanout_write_whose_reply_was_lost_lands_once(Bus::Nats).await;
}

/// The bus takes a write but its answer never comes back (a cut at the
/// wrong moment, or a reply later than the client waits): the engine
/// retries the write, and the bus must not hold the events twice.
async fn a_fanout_write_whose_reply_was_lost_lands_once(bus: Bus) {
    let server = OwnBus::start(bus);
    let proxy = conflux_testkit::FaultProxy::start(&format!("127.0.0.1:{}", server.port)).await.unwrap();
    let name = crate::key("lost");
    let live = start(&format!("    fanout: {}\n", server.fanout_at(&name, proxy.addr().port()))).await;
    let mut ws = live.ws("?channels=restaurant:r-1").await;
    until(&mut ws, "initial_state").await;
    let event = |n: u64| json!({"type": "u", "restaurantId": "r-1", "n": n});
    for n in 0..20 {
        live.post(&[event(n)]).await;
    }
    let mut seen = collect(&mut ws, 20).await;
    // These writes reach the bus; their answers are dropped, then the connection is cut.
    proxy.lose_replies();
    for n in 20..40 {
        live.post(&[event(n)]).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    for n in 40..60 {
        live.post(&[event(n)]).await;
    }
    seen.extend(collect(&mut ws, 40).await);
    // Anything delivered twice would come after the sixtieth.
    while let Some(frame) = next_json(&mut ws, Duration::from_secs(2)).await {
        if let Some(n) = frame["data"]["n"].as_u64() {
            seen.push((n, frame["id"].as_str().unwrap().to_string()));
        }
    }
    let mut ns: Vec<u64> = seen.iter().map(|(n, _)| *n).collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..60).collect::<Vec<u64>>(), "every event once");
    // The bus's own count.
    let held = match bus {
        Bus::Redis => {
            let port = server.port.to_string();
            let xlen = std::process::Command::new("redis-cli").args(["-p", &port, "XLEN", &name]).output().unwrap();
            String::from_utf8_lossy(&xlen.stdout).trim().parse::<u64>().unwrap()
        }
        Bus::Nats => {
            let client = async_nats::connect(format!("127.0.0.1:{}", server.port)).await.unwrap();
            let mut stream = async_nats::jetstream::new(client).get_stream(&name).await.unwrap();
            stream.info().await.unwrap().state.messages
        }
    };
    assert_eq!(held, 60, "the bus holds each event once");
}

#[tokio::test]
async fn heartbeats_keep_live_clients_and_close_silent_ones() {
    use tokio::io::AsyncReadExt;
    let live = start("    heartbeat: 200ms\n    client_timeout: 700ms\n").await;
    // A WebSocket client that answers pings (tungstenite does, while it reads) stays.
    let mut answering = live.ws("?channels=restaurant:r-1").await;
    until(&mut answering, "initial_state").await;
    // It keeps reading (so answering pings) while the silent one is timed out.
    let answering = tokio::spawn(async move { until(&mut answering, "booking_created").await });
    // One that never reads, so never answers, is closed with 4009 once the timeout passed.
    let mut silent = stalled_client(live.out).await;
    let started = Instant::now();
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut bytes)).await;
    assert!(started.elapsed() < Duration::from_secs(4), "the silent client was closed");
    // Server frames are unmasked: a close is 0x88, its length, then the code (4009 = 0x0fa9).
    assert!(
        bytes.windows(4).any(|w| w[0] == 0x88 && w[2] == 0x0f && w[3] == 0xa9),
        "a close frame with code 4009: {bytes:?}"
    );
    assert!(bytes.windows(2).filter(|w| w == &[0x89, 0x00]).count() >= 2, "empty pings were sent first");
    // The answering client is still served.
    live.post(&[booking("r-1", 1)]).await;
    assert_eq!(answering.await.unwrap()["data"]["id"], 1);
    // SSE gets comments as heartbeats.
    let response = reqwest::Client::new().get(format!("http://{}/live/restaurant:r-1", live.out)).send().await.unwrap();
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !text.contains(": heartbeat") {
        let chunk =
            tokio::time::timeout_at(deadline, body.next()).await.expect("a heartbeat within 3 s").unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn subscriptions_per_connection_and_channel_names_are_bounded() {
    let live = start("    max_subscriptions: 2\n").await;
    match tokio_tungstenite::connect_async(live.ws_url("?channels=a,b,c")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("three channels over a limit of two: {:?}", other.map(|_| "a connection")),
    }
    let mut ws = live.ws("?channels=a,b").await;
    until(&mut ws, "initial_state").await;
    until(&mut ws, "initial_state").await;
    ws.send(Message::Text(json!({"type": "subscribe", "channels": ["c"]}).to_string().into())).await.unwrap();
    assert_eq!(until(&mut ws, "error").await["status"], 429);
    ws.send(Message::Text(json!({"type": "unsubscribe", "channels": ["b"]}).to_string().into())).await.unwrap();
    until(&mut ws, "unsubscribed").await;
    let long = "x".repeat(300);
    ws.send(Message::Text(json!({"type": "subscribe", "channels": [long]}).to_string().into())).await.unwrap();
    assert_eq!(until(&mut ws, "error").await["status"], 400, "a channel name of 300 bytes");
    ws.send(Message::Text(json!({"type": "subscribe", "channels": ["c"]}).to_string().into())).await.unwrap();
    assert_eq!(until(&mut ws, "initial_state").await["channel"], "c", "room again after the unsubscribe");
    assert_eq!(live.metric("conflux_broadcast_subscriptions").await, 2.0);
    assert!(live.metric("conflux_broadcast_subscriptions_denied_total").await >= 3.0);
}
