//! Aggregate state that survives restarts: snapshots with source positions,
//! acknowledgements held until durable, replays skipped, results resent.

use std::sync::Arc;
use std::time::Duration;

use conflux_aggregate::AggregateConfig;
use conflux_api::sonic_rs::JsonValueTrait;
use conflux_api::{AckStatus, AckToken, BuildContext, BuiltStage, Emitter, Event, StageConfig};
use serde_json::{json, Value as J};

fn stage(options: J, data_dir: &std::path::Path) -> BuiltStage {
    let config: AggregateConfig = serde_json::from_value(options).unwrap();
    let cx = BuildContext {
        pipeline: "p".into(),
        component: "agg".into(),
        base_dir: ".".into(),
        data_dir: data_dir.to_path_buf(),
        ..Default::default()
    };
    config.build(&cx).map_err(|e| format!("{:?}: {}", e.path, e.message)).unwrap()
}

fn config() -> J {
    json!({
        "group_by": ["r"],
        "time": { "field": "t" },
        "window": { "tumbling": "1m" },
        "metrics": { "n": { "count": {} }, "guests": { "sum": "g" }, "users": { "count_distinct": "u" } },
        "checkpoint": { "interval": "1h" }
    })
}

/// Line `i` of a known input: restaurant r{i%3}, minute i/10, i guests.
fn line(stream: &Arc<str>, i: u64) -> Event {
    let payload = json!({ "r": format!("r{}", i % 3), "t": format!("2026-11-22T10:{:02}:00Z", i / 10), "g": i, "u": format!("u{}", i % 7) });
    Event::new(conflux_api::sonic_rs::from_str(&payload.to_string()).unwrap()).at(stream, i)
}

fn results(out: &mut Emitter) -> Vec<(String, J)> {
    out.drain()
        .filter(|(port, _)| *port == 0)
        .flat_map(|(_, b)| b.into_iter())
        .map(|e| {
            let r: J = serde_json::to_value(&e.data).unwrap();
            (format!("{}@{}", r["r"].as_str().unwrap(), r["window"]["start"].as_str().unwrap()), r)
        })
        .collect()
}

/// Every (group, window) result of one uninterrupted run over lines 0..n.
async fn reference(n: u64) -> std::collections::BTreeMap<String, J> {
    let dir = tempfile::tempdir().unwrap();
    let mut s = stage(config(), dir.path());
    let stream: Arc<str> = Arc::from("file:in");
    let mut out = Emitter::new(s.ports.len());
    s.stage.process((0..n).map(|i| line(&stream, i)).collect(), &mut out).await;
    s.stage.finish(&mut out).await;
    results(&mut out).into_iter().collect()
}

#[tokio::test]
async fn a_restart_resumes_without_losing_or_double_counting() {
    let dir = tempfile::tempdir().unwrap();
    let stream: Arc<str> = Arc::from("file:in");
    let mut seen = std::collections::BTreeMap::new();

    // First run: lines 0..45 in three batches, then the pipeline is stopped (not drained).
    let mut first = stage(config(), dir.path());
    let mut out = Emitter::new(first.ports.len());
    let (token, mut acked) = AckToken::channel();
    for range in [0..15u64, 15..30, 30..45] {
        let batch = range.map(|i| line(&stream, i).with_ack(token.clone())).collect();
        first.stage.process(batch, &mut out).await;
    }
    drop(token);
    assert!(acked.try_recv().is_err(), "nothing is acknowledged before a snapshot is durable");
    seen.extend(results(&mut out));
    first.stage.stop(&mut out).await;
    assert!(results(&mut out).is_empty(), "stopping saves open windows instead of closing them early");
    assert_eq!(acked.try_recv().unwrap(), AckStatus::Delivered, "the snapshot acknowledged the sources");
    assert!(dir.path().join("p/agg.checkpoint.json").exists());
    drop(first);

    // Second run: the source replays from line 20 (its last commit) to the end.
    let mut second = stage(config(), dir.path());
    let mut out = Emitter::new(second.ports.len());
    second.stage.process((20..60).map(|i| line(&stream, i)).collect(), &mut out).await;
    second.stage.finish(&mut out).await;
    for (key, result) in results(&mut out) {
        seen.insert(key, result);
    }

    assert_eq!(seen, reference(60).await, "same figures as a run that never stopped");
}

#[tokio::test]
async fn unconfirmed_results_are_sent_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let stream: Arc<str> = Arc::from("file:in");
    let mut first = stage(config(), dir.path());
    let mut out = Emitter::new(first.ports.len());
    // Minute 0 closes once minute 1 is seen; its results are emitted but never confirmed.
    first.stage.process((0..15).map(|i| line(&stream, i)).collect(), &mut out).await;
    let emitted: Vec<Event> = out.drain().flat_map(|(_, b)| b).collect();
    assert_eq!(emitted.len(), 3, "minute 0, one result per restaurant");
    emitted.iter().for_each(|e| e.ack.mark(AckStatus::Errored));
    drop(emitted);
    first.stage.stop(&mut out).await;
    // The failed results are resent at the snapshot; the process then dies before they land.
    let resent = results(&mut out);
    assert_eq!(resent.len(), 3, "an output's failure brings the results back: {resent:?}");
    drop(out);
    drop(first);

    let mut second = stage(config(), dir.path());
    let mut out = Emitter::new(second.ports.len());
    second.stage.process(Vec::new(), &mut out).await;
    let again: Vec<Event> = out.drain().flat_map(|(_, b)| b).collect();
    // Sent again with the same key and revision, so an output overwrites.
    for event in &again {
        let key = event.meta.get("result_key").and_then(|v| v.as_str()).expect("result_key");
        let r = serde_json::to_value(&event.data).unwrap()["r"].as_str().unwrap().to_string();
        assert_eq!(key, format!(r#"p/agg/["{r}"]/2026-11-22T10:00:00.000Z"#));
        assert_eq!(event.meta.get("result_revision").and_then(|v| v.as_u64()), Some(1));
    }
    let mut out = Emitter::new(second.ports.len());
    out.emit_batch(again);
    let again = results(&mut out);
    let keys: Vec<&str> = again.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys.len(), 3, "restored results are resent: {keys:?}");
    assert!(keys.iter().all(|k| k.ends_with("10:00:00.000Z")), "{keys:?}");
}

#[tokio::test]
async fn a_checkpoint_from_another_configuration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let stream: Arc<str> = Arc::from("file:in");
    let mut first = stage(config(), dir.path());
    let mut out = Emitter::new(first.ports.len());
    first.stage.process((0..5).map(|i| line(&stream, i)).collect(), &mut out).await;
    first.stage.stop(&mut out).await;
    drop(first);

    let mut changed = config();
    changed["window"] = json!({ "tumbling": "5m" });
    let mut second = stage(changed, dir.path());
    let mut out = Emitter::new(second.ports.len());
    let processing = second.stage.process((5..10).map(|i| line(&stream, i)).collect(), &mut out);
    let waited = tokio::time::timeout(Duration::from_millis(700), processing).await;
    assert!(waited.is_err(), "the stage must wait rather than mix state built for another window");
}

#[tokio::test]
async fn snapshots_go_to_redis_when_configured() {
    let key = format!("conflux-test:aggregate:{}", std::process::id());
    let mut options = config();
    options["checkpoint"] = json!({ "interval": "1h", "redis": "redis://127.0.0.1:6379", "key": key });
    let stream: Arc<str> = Arc::from("kafka:bookings/0");
    let dir = tempfile::tempdir().unwrap();

    let mut first = stage(options.clone(), dir.path());
    let mut out = Emitter::new(first.ports.len());
    first.stage.process((0..15).map(|i| line(&stream, i)).collect(), &mut out).await;
    let mut seen: std::collections::BTreeMap<String, J> = results(&mut out).into_iter().collect();
    first.stage.stop(&mut out).await;
    drop(first);
    assert!(!dir.path().join("p").exists(), "nothing written locally");

    let mut second = stage(options, dir.path());
    let mut out = Emitter::new(second.ports.len());
    second.stage.process((0..30).map(|i| line(&stream, i)).collect(), &mut out).await;
    second.stage.finish(&mut out).await;
    seen.extend(results(&mut out));
    assert_eq!(seen, reference(30).await);

    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.unwrap();
}
