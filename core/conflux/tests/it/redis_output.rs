//! The `redis` output against the machine's Redis, read back with the redis
//! client; expectations are computed from the input, apart from the output.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use conflux_engine::runtime::RunContext;
use conflux_testkit::run_yaml;
use futures_util::StreamExt;
use redis::AsyncCommands;

use crate::{key, setup};

pub const REDIS: &str = "127.0.0.1:6379";

pub async fn redis() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(format!("redis://{REDIS}")).unwrap();
    client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("Redis on {REDIS} (scripts/test.sh starts it): {e}"))
}

struct Booking {
    id: u64,
    zone: String,
    guests: i64,
    user: String,
    kind: String,
}

fn bookings(n: u64) -> Vec<Booking> {
    (0..n)
        .map(|i| Booking {
            id: i,
            zone: format!("z{}", i % 5),
            guests: (i % 7) as i64 + 1,
            user: format!("u{}", i % 50),
            kind: format!("k{}", i % 3),
        })
        .collect()
}

fn ndjson(bookings: &[Booking]) -> String {
    bookings
        .iter()
        .map(|b| {
            format!(
                "{{\"id\":{},\"zone\":\"{}\",\"guests\":{},\"user\":\"{}\",\"kind\":\"{}\",\"vip\":{}}}\n",
                b.id,
                b.zone,
                b.guests,
                b.user,
                b.kind,
                b.id % 2 == 0
            )
        })
        .collect()
}

#[tokio::test]
async fn every_command_is_written_and_reads_back() {
    for atomic in [false, true] {
        every_command(atomic).await;
    }
}

async fn every_command(atomic: bool) {
    setup();
    let p = key("redis");
    let mut r = redis().await;
    let _: () = r.set(format!("{p}:gone"), "x").await.unwrap();
    let input = bookings(500);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.ndjson"), ndjson(&input)).unwrap();
    let mut subscriber = redis::Client::open(format!("redis://{REDIS}")).unwrap().get_async_pubsub().await.unwrap();
    subscriber.subscribe(format!("{p}:chan")).await.unwrap();
    let yaml = format!(
        r#"inputs:
  in: {{ type: file, path: "{dir}/in.ndjson", batch_size: 64 }}
outputs:
  r:
    type: redis
    url: redis://{REDIS}
    from: in
    atomic: {atomic}
    batch: {{ max_events: 100 }}
    commands:
      - hincrby: {{ key: "{p}:today", field: bookings }}
      - hincrby: {{ key: "{p}:today", field: guests, by: "{{{{ guests }}}}" }}
      - hincrbyfloat: {{ key: "{p}:halves", field: "{{{{ zone }}}}", by: 0.5 }}
      - incrby: {{ key: "{p}:total", by: "{{{{ guests }}}}", ttl: 1h }}
      - zincrby: {{ key: "{p}:zones", member: "{{{{ zone }}}}", by: "{{{{ guests }}}}" }}
      - zadd: {{ key: "{p}:max", member: "{{{{ zone }}}}", score: "{{{{ guests }}}}", gt: true }}
      - pfadd: {{ key: "{p}:users", element: "{{{{ user }}}}" }}
      - set: {{ key: "{p}:last:{{{{ zone }}}}", value: "{{{{ id }}}}", ttl: 10m }}
      - hset: {{ key: "{p}:booking:{{{{ id }}}}" }}
      - hset: {{ key: "{p}:kinds", fields: {{ last: "{{{{ kind }}}}" }} }}
      - xadd: {{ key: "{p}:stream", maxlen: 1000 }}
      - lpush: {{ key: "{p}:recent", value: "{{{{ id }}}}", keep: 10 }}
      - rpush: {{ key: "{p}:all", value: "{{{{ id }}}}" }}
      - publish: {{ channel: "{p}:chan" }}
      - del: {{ key: "{p}:gone" }}
"#,
        dir = dir.path().display()
    );
    let report = run_yaml(&yaml, RunContext::new()).await;
    assert!(!report.lost_events(), "{report:?}");
    assert_eq!(report.inputs[0].delivered, 500);

    let guests: i64 = input.iter().map(|b| b.guests).sum();
    let today: HashMap<String, i64> = r.hgetall(format!("{p}:today")).await.unwrap();
    assert_eq!(today, HashMap::from([("bookings".to_string(), 500), ("guests".to_string(), guests)]));
    let halves: HashMap<String, f64> = r.hgetall(format!("{p}:halves")).await.unwrap();
    assert_eq!(halves, (0..5).map(|z| (format!("z{z}"), 50.0)).collect());
    let total: i64 = r.get(format!("{p}:total")).await.unwrap();
    assert_eq!(total, guests);
    let ttl: i64 = r.pttl(format!("{p}:total")).await.unwrap();
    assert!(ttl > 3_500_000 && ttl <= 3_600_000, "incrby's ttl: {ttl} ms");
    let mut per_zone: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for b in &input {
        let e = per_zone.entry(b.zone.clone()).or_default();
        e.0 += b.guests;
        e.1 = e.1.max(b.guests);
    }
    for (zone, (sum, max)) in &per_zone {
        let score: f64 = r.zscore(format!("{p}:zones"), zone).await.unwrap();
        assert_eq!(score, *sum as f64, "zincrby {zone}");
        let best: f64 = r.zscore(format!("{p}:max"), zone).await.unwrap();
        assert_eq!(best, *max as f64, "zadd gt {zone}");
    }
    let users: i64 = redis::cmd("PFCOUNT").arg(format!("{p}:users")).query_async(&mut r).await.unwrap();
    assert!((49..=51).contains(&users), "pfcount of 50 users: {users}");
    for z in 0..5u64 {
        let last: u64 = r.get(format!("{p}:last:z{z}")).await.unwrap();
        assert_eq!(last, 495 + z, "the last booking of z{z} wins");
        let ttl: i64 = r.pttl(format!("{p}:last:z{z}")).await.unwrap();
        assert!(ttl > 590_000 && ttl <= 600_000, "set's ttl: {ttl} ms");
    }
    let booking: HashMap<String, String> = r.hgetall(format!("{p}:booking:42")).await.unwrap();
    let expected: HashMap<String, String> =
        [("id", "42"), ("zone", "z2"), ("guests", "1"), ("user", "u42"), ("kind", "k0"), ("vip", "true")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    assert_eq!(booking, expected, "hset of every member: strings as they are, the rest as JSON");
    let kind: String = r.hget(format!("{p}:kinds"), "last").await.unwrap();
    assert_eq!(kind, "k1", "499 % 3 = 1");
    let entries: usize = redis::cmd("XLEN").arg(format!("{p}:stream")).query_async(&mut r).await.unwrap();
    assert_eq!(entries, 500);
    let first: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(format!("{p}:stream"))
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(first[0].1[0], "data", "xadd writes one field, data");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&first[0].1[1]).unwrap()["id"], 0, "the payload");
    let recent: Vec<u64> = r.lrange(format!("{p}:recent"), 0, -1).await.unwrap();
    assert_eq!(recent, (490..500).rev().collect::<Vec<_>>(), "lpush keeps the newest 10, newest first");
    let all: Vec<u64> = r.lrange(format!("{p}:all"), 0, -1).await.unwrap();
    assert_eq!(all, (0..500).collect::<Vec<_>>(), "rpush in input order");
    let gone: bool = r.exists(format!("{p}:gone")).await.unwrap();
    assert!(!gone, "del");
    let mut messages = subscriber.on_message();
    for i in 0..500u64 {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next()).await.unwrap().unwrap();
        let payload: String = message.get_payload().unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&payload).unwrap()["id"], i, "publish in order");
    }
}

/// A command Redis refuses (WRONGTYPE) and an event whose template cannot be
/// rendered go to `error` alone; their batch-mates are written.
#[tokio::test]
async fn refused_events_go_to_the_error_port_alone() {
    setup();
    let p = key("redis_refused");
    let mut r = redis().await;
    let _: () = r.set(format!("{p}:str"), "not a hash").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for i in 0..10 {
        let target = match i {
            3 => "\"target\":\"str\",",
            7 => "",
            _ => "\"target\":\"h\",",
        };
        lines.push_str(&format!("{{{target}\"n\":{i}}}\n"));
    }
    std::fs::write(dir.path().join("in.ndjson"), lines).unwrap();
    let yaml = format!(
        r#"inputs:
  in: {{ type: file, path: "{dir}/in.ndjson" }}
outputs:
  r:
    type: redis
    url: redis://{REDIS}
    from: in
    commands:
      - hincrby: {{ key: "{p}:{{{{ target }}}}", field: seen }}
  dead: {{ type: file, path: "{dir}/dead.ndjson", from: r.error }}
"#,
        dir = dir.path().display()
    );
    let report = run_yaml(&yaml, RunContext::new()).await;
    assert!(!report.lost_events(), "dead-lettered events are delivered: {report:?}");
    let seen: i64 = r.hget(format!("{p}:h"), "seen").await.unwrap();
    assert_eq!(seen, 8);
    let dead = std::fs::read_to_string(dir.path().join("dead.ndjson")).unwrap();
    let ns: Vec<u64> =
        dead.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["n"].as_u64().unwrap()).collect();
    assert_eq!(ns, vec![3, 7]);
}

/// A large batch (one pipeline of 6,000 commands): every command lands in
/// the batch's order, and the one event Redis refuses, far into it, is the
/// one that goes to `error` (replies stay in step with their events).
#[tokio::test]
async fn a_large_batch_keeps_its_order_and_its_replies_in_step() {
    setup();
    let p = key("redis_chunks");
    let mut r = redis().await;
    let _: () = r.set(format!("{p}:str"), "not a list").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lines: String = (0..6000)
        .map(|i| format!("{{\"target\":\"{}\",\"n\":{i}}}\n", if i == 4500 { "str" } else { "list" }))
        .collect();
    std::fs::write(dir.path().join("in.ndjson"), lines).unwrap();
    let yaml = format!(
        r#"inputs:
  in: {{ type: file, path: "{dir}/in.ndjson", batch_size: 6000 }}
outputs:
  r:
    type: redis
    url: redis://{REDIS}
    from: in
    batch: {{ max_events: 6000, linger: 1s }}
    commands:
      - rpush: {{ key: "{p}:{{{{ target }}}}", value: "{{{{ n }}}}" }}
  dead: {{ type: file, path: "{dir}/dead.ndjson", from: r.error }}
"#,
        dir = dir.path().display()
    );
    let report = run_yaml(&yaml, RunContext::new()).await;
    assert!(!report.lost_events(), "{report:?}");
    let items: Vec<u64> = r.lrange(format!("{p}:list"), 0, -1).await.unwrap();
    let expected: Vec<u64> = (0..6000).filter(|i| *i != 4500).collect();
    assert_eq!(items, expected, "in the batch's order");
    let dead = std::fs::read_to_string(dir.path().join("dead.ndjson")).unwrap();
    assert_eq!(dead.lines().count(), 1, "{dead}");
    assert!(dead.contains("\"n\":4500"), "{dead}");
    let _: () = r.del(&[format!("{p}:list"), format!("{p}:str")]).await.unwrap();
}
