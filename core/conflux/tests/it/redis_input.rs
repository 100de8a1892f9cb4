//! The `redis` input against the machine's Redis: entries are added and
//! pending lists read back with the redis client, apart from the input;
//! expectations are computed from what the test wrote.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use conflux_engine::config::{load_str, Diagnostic};
use conflux_engine::graph::compile;
use conflux_engine::runtime::{RunContext, RunReport};
use conflux_testkit::{batches, delivered, release, run_yaml, FaultProxy};
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use tokio::task::JoinHandle;

use crate::redis_output::{redis, REDIS};
use crate::{key, setup};

/// Adds entries `{"n": i}` for `ns` in field `data`; their ids, in order.
async fn add(r: &mut MultiplexedConnection, stream: &str, ns: std::ops::Range<u64>) -> Vec<String> {
    let mut ids = Vec::new();
    for n in ns {
        ids.push(xadd(r, stream, &[("data", &format!("{{\"n\":{n}}}"))]).await);
    }
    ids
}

/// `XADD stream * field value …`; the new entry's id.
async fn xadd(r: &mut MultiplexedConnection, stream: &str, fields: &[(&str, &str)]) -> String {
    let mut add = redis::cmd("XADD");
    add.arg(stream).arg("*");
    for (name, value) in fields {
        add.arg(name).arg(value);
    }
    add.query_async(r).await.unwrap()
}

/// The group's pending count and last-delivered id, from `XINFO GROUPS`.
/// `(-1, "")` while there is no such group.
async fn group(r: &mut MultiplexedConnection, stream: &str, name: &str) -> (i64, String) {
    let groups: Vec<HashMap<String, redis::Value>> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(r).await.unwrap_or_default();
    let named = |g: &HashMap<String, redis::Value>| {
        g.get("name").is_some_and(|n| *n == redis::Value::BulkString(name.as_bytes().to_vec()))
    };
    let Some(group) = groups.into_iter().find(named) else { return (-1, String::new()) };
    let pending: i64 = redis::from_redis_value(group["pending"].clone()).unwrap();
    let last: String = redis::from_redis_value(group["last-delivered-id"].clone()).unwrap();
    (pending, last)
}

fn ns(values: &[serde_json::Value]) -> Vec<u64> {
    values.iter().map(|v| v["n"].as_u64().unwrap()).collect()
}

async fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    for _ in 0..1500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Waits for an asynchronous condition (one read of Redis per try).
async fn eventually<F: Future<Output = bool>>(mut done: impl FnMut() -> F, what: &str) {
    for _ in 0..300 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A metric of component `in` from the engine's exposition.
fn metric(cx: &RunContext, name: &str) -> Option<f64> {
    cx.metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("component=\"in\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn start(yaml: String) -> (RunContext, JoinHandle<RunReport>) {
    let cx = RunContext::new();
    let run = tokio::spawn({
        let cx = cx.clone();
        async move { run_yaml(&yaml, cx).await }
    });
    (cx, run)
}

async fn stop(cx: RunContext, run: JoinHandle<RunReport>) -> RunReport {
    cx.stop.cancel();
    run.await.unwrap()
}

#[tokio::test]
async fn stream_entries_arrive_once_in_order_and_are_acknowledged() {
    setup();
    let (stream, sink) = (key("rin"), key("sink"));
    let mut r = redis().await;
    let ids = add(&mut r, &stream, 0..500).await;
    let (cx, run) = start(format!(
        "inputs:\n  in: {{ type: redis, url: \"redis://{REDIS}\", stream: \"{stream}\", group: g, batch_size: 64 }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: in }}\n"
    ));
    wait_for(|| delivered(&sink).len() >= 500, "500 entries").await;
    eventually(|| async { group(&mut redis().await, &stream, "g").await.0 == 0 }, "every entry acknowledged").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = stop(cx, run).await;
    assert!(!report.lost_events(), "{report:?}");
    assert_eq!(ns(&delivered(&sink)), (0..500).collect::<Vec<_>>(), "each entry once, in stream order");
    assert_eq!(group(&mut r, &stream, "g").await, (0, ids[499].clone()), "nothing pending; the last entry delivered");
    let _: () = r.del(&stream).await.unwrap();
}

#[tokio::test]
async fn failed_entries_stay_pending_and_are_claimed_again() {
    setup();
    let (stream, sink) = (key("rfail"), key("sink"));
    let mut r = redis().await;
    add(&mut r, &stream, 0..50).await;
    // The first write fails for good (one attempt): its 10 entries stay pending until claimed, 2s later.
    let (cx, run) = start(format!(
        "inputs:\n  in: {{ type: redis, url: \"redis://{REDIS}\", stream: \"{stream}\", group: g, batch_size: 10, claim_after: 2s }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, fail_first: 1, retry: {{ initial_backoff: 1ms, max_attempts: 1 }}, from: in }}\n"
    ));
    wait_for(|| delivered(&sink).len() >= 40, "the entries of the writes that succeeded").await;
    assert_eq!(batches(&sink)[0], 10, "the failed write held one read of 10 entries");
    eventually(|| async { group(&mut redis().await, &stream, "g").await.0 == 10 }, "the failed entries pending").await;
    assert_eq!(ns(&delivered(&sink)), (10..50).collect::<Vec<_>>());
    wait_for(|| delivered(&sink).len() >= 50, "the failed entries claimed and delivered").await;
    eventually(|| async { group(&mut redis().await, &stream, "g").await.0 == 0 }, "every entry acknowledged").await;
    assert_eq!(metric(&cx, "conflux_redis_claimed_entries_total"), Some(10.0));
    stop(cx, run).await;
    let got: BTreeSet<u64> = ns(&delivered(&sink)).into_iter().collect();
    assert_eq!(got, (0..50).collect(), "every entry delivered in the end");
    assert_eq!(delivered(&sink).len(), 50, "and none twice");
    let _: () = r.del(&stream).await.unwrap();
}

#[tokio::test]
async fn a_crashed_consumers_entries_are_claimed_and_delivered() {
    setup();
    let (stream, sink) = (key("rcrash"), key("sink"));
    let mut r = redis().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut r)
        .await
        .unwrap();
    add(&mut r, &stream, 0..20).await;
    // Consumer `a` reads everything and dies without acknowledging.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("a")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(group(&mut r, &stream, "g").await.0, 20);
    let (cx, run) = start(format!(
        "inputs:\n  in: {{ type: redis, url: \"redis://{REDIS}\", stream: \"{stream}\", group: g, consumer: b, claim_after: 200ms }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: in }}\n"
    ));
    wait_for(|| delivered(&sink).len() >= 20, "a's entries, claimed by b").await;
    eventually(|| async { group(&mut redis().await, &stream, "g").await.0 == 0 }, "the claimed entries acknowledged")
        .await;
    assert_eq!(metric(&cx, "conflux_redis_claimed_entries_total"), Some(20.0));
    stop(cx, run).await;
    assert_eq!(ns(&delivered(&sink)), (0..20).collect::<Vec<_>>());
    let _: () = r.del(&stream).await.unwrap();
}

#[tokio::test]
async fn a_restarted_consumer_reads_its_own_pending_entries_first() {
    setup();
    let (stream, first, second) = (key("rrestart"), key("first"), key("second"));
    let mut r = redis().await;
    add(&mut r, &stream, 0..30).await;
    // The first run's output holds every write: the entries are read, then the run is stopped.
    let yaml = |sink: &str, extra: &str| {
        format!(
            "runtime: {{ shutdown_timeout: 100ms }}\ninputs:\n  in: {{ type: redis, url: \"redis://{REDIS}\", stream: \"{stream}\", group: g, consumer: w, claim_after: 1h }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: in {extra} }}\n"
        )
    };
    let (cx, run) = start(yaml(&first, ", gated: true"));
    eventually(|| async { group(&mut redis().await, &stream, "g").await.0 == 30 }, "30 entries read").await;
    let report = stop(cx, run).await;
    assert!(report.lost_events(), "the held entries were cut off: {report:?}");
    assert!(delivered(&first).is_empty());
    assert_eq!(group(&mut r, &stream, "g").await.0, 30, "unacknowledged entries stay pending");

    // Same consumer name, and no claims for an hour: the entries come back from its own pending list.
    let (cx, run) = start(yaml(&second, ""));
    wait_for(|| delivered(&second).len() >= 30, "the pending entries, read again").await;
    eventually(|| async { group(&mut redis().await, &stream, "g").await.0 == 0 }, "acknowledged this time").await;
    assert_eq!(metric(&cx, "conflux_redis_claimed_entries_total"), Some(0.0));
    stop(cx, run).await;
    release(&first, 100);
    assert_eq!(ns(&delivered(&second)), (0..30).collect::<Vec<_>>());
    let _: () = r.del(&stream).await.unwrap();
}

#[tokio::test]
async fn reading_stops_at_max_unacked_until_the_pipeline_catches_up() {
    setup();
    let (stream, sink) = (key("rbp"), key("sink"));
    let mut r = redis().await;
    add(&mut r, &stream, 0..200).await;
    let (cx, run) = start(format!(
        "inputs:\n  in: {{ type: redis, url: \"redis://{REDIS}\", stream: \"{stream}\", group: g, batch_size: 20, max_unacked: 50 }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, gated: true, from: in }}\n"
    ));
    // The output holds every write: the input reads up to max_unacked entries, then waits.
    eventually(|| async { group(&mut redis().await, &stream, "g").await.0 == 50 }, "50 entries read").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(group(&mut r, &stream, "g").await.0, 50, "nothing more read while 50 are unacknowledged");
    assert_eq!(metric(&cx, "conflux_input_unacked_events"), Some(50.0));
    release(&sink, 10_000);
    wait_for(|| delivered(&sink).len() >= 200, "all 200 once the output writes").await;
    eventually(|| async { group(&mut redis().await, &stream, "g").await.0 == 0 }, "every entry acknowledged").await;
    stop(cx, run).await;
    assert_eq!(ns(&delivered(&sink)), (0..200).collect::<Vec<_>>());
    let _: () = r.del(&stream).await.unwrap();
}

#[tokio::test]
async fn nothing_is_lost_while_redis_is_away() {
    setup();
    let (stream, sink) = (key("rcut"), key("sink"));
    let proxy = FaultProxy::start(REDIS).await.unwrap();
    let (cx, run) = start(format!(
        "inputs:\n  in: {{ type: redis, url: \"redis://{}\", stream: \"{stream}\", group: g, batch_size: 20, block: 200ms, claim_after: 5s }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: in }}\n",
        proxy.host_port()
    ));
    // Entries keep coming, straight to Redis, while the way from the input is cut.
    let producer = tokio::spawn({
        let stream = stream.clone();
        async move {
            let mut r = redis().await;
            for n in 0..300 {
                add(&mut r, &stream, n..n + 1).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    wait_for(|| delivered(&sink).len() >= 80, "some entries before the cut").await;
    proxy.cut();
    let before = delivered(&sink).len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = delivered(&sink).len();
    proxy.restore();
    producer.await.unwrap();
    wait_for(|| ns(&delivered(&sink)).into_iter().collect::<BTreeSet<_>>().len() >= 300, "all 300 entries").await;
    eventually(|| async { group(&mut redis().await, &stream, "g").await.0 == 0 }, "every entry acknowledged").await;
    stop(cx, run).await;
    // At most the batch read just before the cut arrives while it lasts.
    assert!(during <= before + 20, "the cut stopped delivery: {before} before it, {during} after 2s");
    let got = ns(&delivered(&sink));
    let distinct: BTreeSet<u64> = got.iter().copied().collect();
    assert_eq!(distinct, (0..300).collect(), "nothing lost");
    // At least once: an entry whose acknowledgement was cut off may come back once more.
    assert!(got.len() <= 300 + 20, "{} deliveries for 300 entries", got.len());
    let _: () = redis().await.del(&stream).await.unwrap();
}

#[tokio::test]
async fn pubsub_channels_and_patterns_deliver_published_messages() {
    setup();
    let (p, sink) = (key("rps"), key("sink"));
    let (cx, run) = start(format!(
        "inputs:\n  in: {{ type: redis, url: \"redis://{REDIS}\", channels: [\"{p}:news\"], patterns: [\"{p}:alerts.*\"] }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: in }}\n"
    ));
    let mut r = redis().await;
    // Subscribed once a publish reaches a receiver (probes are left out below).
    eventually(
        || async {
            let mut r = redis().await;
            let news: i64 = r.publish(format!("{p}:news"), "{\"probe\":1}").await.unwrap();
            let alerts: i64 = r.publish(format!("{p}:alerts.probe"), "{\"probe\":1}").await.unwrap();
            news > 0 && alerts > 0
        },
        "the subscriptions",
    )
    .await;
    for n in 0..10 {
        let channel = if n % 2 == 0 { format!("{p}:news") } else { format!("{p}:alerts.fire") };
        let _: i64 = r.publish(channel, format!("{{\"n\":{n}}}")).await.unwrap();
    }
    let _: i64 = r.publish(format!("{p}:elsewhere"), "{\"n\":99}").await.unwrap();
    let real = || delivered(&sink).into_iter().filter(|v| v.get("probe").is_none()).collect::<Vec<_>>();
    wait_for(|| real().len() >= 10, "10 published messages").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop(cx, run).await;
    assert_eq!(ns(&real()), (0..10).collect::<Vec<_>>(), "channel and pattern messages, nothing else");
}

#[tokio::test]
async fn a_bad_json_entry_goes_to_invalid_and_the_rest_flow_on() {
    setup();
    let (stream, sink, dead) = (key("rbad"), key("sink"), key("dead"));
    let mut r = redis().await;
    add(&mut r, &stream, 0..3).await;
    xadd(&mut r, &stream, &[("data", "{oops")]).await;
    xadd(&mut r, &stream, &[("user", "u1"), ("n", "3")]).await;
    add(&mut r, &stream, 4..6).await;
    let (cx, run) = start(format!(
        "inputs:\n  in: {{ type: redis, url: \"redis://{REDIS}\", stream: \"{stream}\", group: g }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: in }}\n  dead: {{ type: test_sink, key: {dead}, from: in.invalid }}\n"
    ));
    wait_for(|| delivered(&sink).len() >= 5 && !delivered(&dead).is_empty(), "every entry").await;
    eventually(|| async { group(&mut redis().await, &stream, "g").await.0 == 0 }, "all acknowledged").await;
    stop(cx, run).await;
    let good = delivered(&sink);
    assert_eq!(good.len(), 6, "{good:?}");
    assert_eq!(good[3], serde_json::json!({"user": "u1", "n": "3"}), "an entry without `data`: its fields");
    let numbers: Vec<u64> = good.iter().filter_map(|v| v["n"].as_u64()).collect();
    assert_eq!(numbers, vec![0, 1, 2, 4, 5]);
    assert_eq!(delivered(&dead), vec![serde_json::json!("{oops")], "the bad entry, as text");

    // Unwired, the invalid entry is counted as discarded and acknowledged: it does not come back.
    let (stream, sink) = (key("rbad2"), key("sink"));
    xadd(&mut r, &stream, &[("data", "not json")]).await;
    add(&mut r, &stream, 0..2).await;
    let (cx, run) = start(format!(
        "inputs:\n  in: {{ type: redis, url: \"redis://{REDIS}\", stream: \"{stream}\", group: g, claim_after: 100ms }}\noutputs:\n  out: {{ type: test_sink, key: {sink}, from: in }}\n"
    ));
    wait_for(|| delivered(&sink).len() >= 2, "the good entries").await;
    eventually(|| async { group(&mut redis().await, &stream, "g").await.0 == 0 }, "the bad one acknowledged too").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(metric(&cx, "conflux_redis_claimed_entries_total"), Some(0.0), "nothing to claim again");
    let discarded: f64 = cx
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("conflux_events_discarded_total{") && l.contains("component=\"in\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(discarded, 1.0);
    stop(cx, run).await;
    assert_eq!(ns(&delivered(&sink)), vec![0, 1]);
    let _: () = r.del(&stream).await.unwrap();
}

fn problems(yaml: &str) -> Vec<String> {
    setup();
    let result = load_str(Path::new("p.yaml"), yaml, &|_: &str| None).and_then(compile);
    match result {
        Ok(_) => Vec::new(),
        Err(diags) => diags.iter().map(Diagnostic::to_string).collect(),
    }
}

#[test]
fn bad_redis_input_options_are_reported_at_the_option() {
    // (options, the option the problem points at, the start of its message)
    let cases = [
        ("{ type: redis, stream: s }", None, "missing field `group`"),
        ("{ type: redis, stream: s, group: g, channels: [c] }", Some("channels"), "`channels` is for pub/sub"),
        ("{ type: redis, stream: s, streams: [t], group: g }", Some("streams"), "give `stream` or `streams`, not both"),
        ("{ type: redis, url: \"http://u:hunter2@x\", stream: s, group: g }", Some("url"), "bad Redis URL"),
        ("{ type: redis, channels: [c], group: g }", Some("group"), "`group` is for streams"),
        ("{ type: redis, patterns: [c], claim_after: 1s }", Some("claim_after"), "`claim_after` is for streams"),
        ("{ type: redis, streams: [a, b], group: g, block: 0 }", Some("block"), "block must be at least 1ms"),
        ("{ type: redis, group: g }", Some("{"), "give `stream` or `streams`"),
    ];
    for (options, option, message) in cases {
        // Line 2 is `  in: {options}`: a value's column is 7 past its offset in `options`.
        let column = match option {
            None => 3,
            Some("{") => 7,
            Some(option) => 7 + options.find(&format!("{option}: ")).unwrap() + option.len() + 2,
        };
        let expected = format!("p.yaml:2:{column}: input `in`: {message}");
        let yaml = format!("inputs:\n  in: {options}\noutputs:\n  o: {{ type: drop, from: in }}\n");
        let found = problems(&yaml);
        assert!(found.iter().any(|p| p.starts_with(&expected)), "no problem starting with `{expected}` in {found:#?}");
        assert!(found.iter().all(|p| !p.contains("hunter2")), "a password in {found:#?}");
    }
}
