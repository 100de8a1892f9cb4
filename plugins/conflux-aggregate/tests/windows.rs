//! The aggregate stage with hand-computed expectations.

use conflux_aggregate::AggregateConfig;
use conflux_api::{AckStatus, AckToken, BuildContext, BuiltStage, Emitter, Event, StageConfig};
use serde_json::{json, Value as J};

fn stage(options: J) -> BuiltStage {
    let config: AggregateConfig = serde_json::from_value(options).unwrap();
    let cx = BuildContext { pipeline: "p".into(), component: "agg".into(), ..Default::default() };
    config.build(&cx).map_err(|e| format!("{:?}: {}", e.path, e.message)).unwrap()
}

fn ev(payload: J) -> Event {
    Event::new(conflux_api::sonic_rs::from_str(&payload.to_string()).unwrap())
}

fn at(minute: u32, second: u32, restaurant: &str, kind: &str, guests: i64) -> Event {
    ev(json!({
        "type": kind,
        "timestamp": format!("2026-11-22T10:{minute:02}:{second:02}Z"),
        "data": { "restaurantId": restaurant, "guests": guests, "zone": if guests > 4 { "terrace" } else { "bar" }, "userId": format!("u{guests}") }
    }))
}

/// Emitted events per port as JSON.
fn drain(out: &mut Emitter) -> Vec<(usize, J)> {
    out.drain().flat_map(|(p, b)| b.into_iter().map(move |e| (p, serde_json::to_value(&e.data).unwrap()))).collect()
}

async fn feed(stage: &mut BuiltStage, events: Vec<Event>) -> Vec<(usize, J)> {
    let mut out = Emitter::new(stage.ports.len());
    stage.stage.process(events, &mut out).await;
    drain(&mut out)
}

async fn finish(stage: &mut BuiltStage) -> Vec<(usize, J)> {
    let mut out = Emitter::new(stage.ports.len());
    stage.stage.finish(&mut out).await;
    drain(&mut out)
}

fn by_group(results: &[(usize, J)]) -> Vec<(String, String, J)> {
    let mut rows: Vec<(String, String, J)> = results
        .iter()
        .filter(|(p, _)| *p == 0)
        .map(|(_, r)| {
            (
                r["data"]["restaurantId"].as_str().unwrap_or("").to_string(),
                r["window"]["start"].as_str().unwrap().to_string(),
                r.clone(),
            )
        })
        .collect();
    rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    rows
}

fn tumbling_config() -> J {
    json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp", "allowed_lateness": "30s" },
        "window": { "tumbling": "1m" },
        "metrics": {
            "bookings": { "count": {}, "where": "event.type == \"booking_created\"" },
            "cancelled": { "count": {}, "where": "event.type == \"booking_cancelled\"" },
            "guests": { "sum": "data.guests" },
            "avg_guests": { "avg": "data.guests" },
            "max_guests": { "max": "data.guests" },
            "first_type": { "first": "type" },
            "users": { "count_distinct": "data.userId" },
            "zones": { "top_k": { "field": "data.zone", "k": 1 } }
        }
    })
}

#[tokio::test]
async fn tumbling_windows_with_out_of_order_and_late_events() {
    let mut s = stage(tumbling_config());
    let first = feed(
        &mut s,
        vec![
            at(0, 10, "r1", "booking_created", 2),
            at(0, 50, "r1", "booking_created", 6),
            at(0, 5, "r1", "booking_cancelled", 3), // out of order, same window
            at(0, 20, "r2", "booking_created", 4),
            at(1, 10, "r1", "booking_created", 1), // next window; watermark 10:00:40
        ],
    )
    .await;
    assert!(first.is_empty(), "nothing closes before the watermark passes 10:01:00: {first:?}");
    // Watermark → 10:01:05: closes [10:00, 10:01). An event at 10:00:30 is now late.
    let second = feed(&mut s, vec![at(1, 35, "r2", "booking_created", 2), at(0, 30, "r1", "booking_created", 9)]).await;
    let late: Vec<&J> = second.iter().filter(|(p, _)| *p == 1).map(|(_, e)| e).collect();
    assert_eq!(late.len(), 1);
    assert_eq!(late[0]["data"]["guests"], 9);
    let rows = by_group(&second);
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let r1 = &rows[0].2;
    assert_eq!(r1["window"], json!({ "start": "2026-11-22T10:00:00.000Z", "end": "2026-11-22T10:01:00.000Z" }));
    assert_eq!(r1["bookings"], 2);
    assert_eq!(r1["cancelled"], 1);
    assert_eq!(r1["guests"], 11);
    assert!((r1["avg_guests"].as_f64().unwrap() - 11.0 / 3.0).abs() < 1e-9);
    assert_eq!(r1["max_guests"], 6.0);
    assert_eq!(r1["first_type"], "booking_cancelled", "first by event time, not arrival");
    assert_eq!(r1["users"], 3);
    assert_eq!(r1["zones"], json!([{ "value": "bar", "count": 2 }]));
    assert_eq!(r1["final"], true);
    assert_eq!(rows[1].0, "r2");
    assert_eq!(rows[1].2["guests"], 4);
    // End of input flushes the open window.
    let rest = by_group(&finish(&mut s).await);
    assert_eq!(rest.len(), 2);
    assert_eq!(rest[0].2["guests"], 1);
    assert_eq!(rest[1].2["guests"], 2);
}

#[tokio::test]
async fn results_carry_the_acknowledgement_of_their_inputs() {
    let mut s = stage(tumbling_config());
    let (token, status) = AckToken::channel();
    let events = vec![
        at(0, 1, "r1", "booking_created", 2).with_ack(token.clone()),
        at(0, 2, "r2", "booking_created", 2).with_ack(token),
    ];
    let mut out = Emitter::new(s.ports.len());
    s.stage.process(events, &mut out).await;
    s.stage.finish(&mut out).await;
    let results: Vec<Event> = out.drain().flat_map(|(_, b)| b).collect();
    assert_eq!(results.len(), 2);
    let mut status = status;
    assert!(status.try_recv().is_err(), "acknowledged before the results were delivered");
    drop(results);
    assert_eq!(status.await.unwrap(), AckStatus::Delivered);
}

#[tokio::test]
async fn hopping_windows_count_an_event_in_each_overlap() {
    let mut s = stage(json!({
        "time": { "field": "timestamp" },
        "window": { "hopping": { "size": "1m", "slide": "30s" } },
        "metrics": { "n": { "count": {} } }
    }));
    let mut all = feed(&mut s, vec![at(0, 10, "r", "x", 1), at(0, 40, "r", "x", 1), at(1, 10, "r", "x", 1)]).await;
    all.extend(finish(&mut s).await);
    let mut rows: Vec<(String, i64)> = all
        .iter()
        .map(|(_, r)| (r["window"]["start"].as_str().unwrap()[11..19].to_string(), r["n"].as_i64().unwrap()))
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        vec![("09:59:30".into(), 1), ("10:00:00".into(), 2), ("10:00:30".into(), 2), ("10:01:00".into(), 1),]
    );
}

#[tokio::test]
async fn sessions_grow_and_split_on_the_gap() {
    let mut s = stage(json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp" },
        "window": { "session": { "gap": "30s" } },
        "metrics": { "n": { "count": {} } }
    }));
    let mut all = feed(
        &mut s,
        vec![at(0, 0, "a", "x", 1), at(0, 20, "a", "x", 1), at(0, 45, "a", "x", 1), at(2, 0, "a", "x", 1)],
    )
    .await;
    all.extend(finish(&mut s).await);
    let mut rows: Vec<(String, String, i64)> = all
        .iter()
        .map(|(_, r)| {
            (
                r["window"]["start"].as_str().unwrap()[11..19].to_string(),
                r["window"]["end"].as_str().unwrap()[11..19].to_string(),
                r["n"].as_i64().unwrap(),
            )
        })
        .collect();
    rows.sort();
    assert_eq!(rows, vec![("10:00:00".into(), "10:01:15".into(), 3), ("10:02:00".into(), "10:02:30".into(), 1)]);
}

#[tokio::test]
async fn cumulative_days_split_at_local_midnight() {
    let mut s = stage(json!({
        "time": { "field": "timestamp" },
        "window": { "cumulative": { "period": "day", "timezone": "Europe/Paris" } },
        "metrics": { "n": { "count": {} } }
    }));
    let events = ["2026-11-21T22:59:59Z", "2026-11-21T23:00:00Z", "2026-11-22T10:00:00Z"]
        .iter()
        .map(|t| ev(json!({ "timestamp": t })))
        .collect();
    let mut all = feed(&mut s, events).await;
    all.extend(finish(&mut s).await);
    let mut rows: Vec<(String, i64)> = all
        .iter()
        .map(|(_, r)| (r["window"]["start"].as_str().unwrap().to_string(), r["n"].as_i64().unwrap()))
        .collect();
    rows.sort();
    assert_eq!(rows, vec![("2026-11-20T23:00:00.000Z".into(), 1), ("2026-11-21T23:00:00.000Z".into(), 2)]);
}

#[tokio::test]
async fn sliding_window_merges_buckets() {
    let mut s = stage(json!({
        "time": { "field": "timestamp" },
        "window": { "sliding": { "size": "1m", "every": "20s" } },
        "metrics": { "n": { "count": {} }, "p": { "percentiles": { "field": "data.guests", "quantiles": [0.5] } } }
    }));
    let out = feed(
        &mut s,
        vec![at(0, 5, "r", "x", 1), at(0, 25, "r", "x", 3), at(0, 45, "r", "x", 5), at(1, 5, "r", "x", 7)],
    )
    .await;
    // The watermark reached 10:01:05: the last full step is [10:00:00, 10:01:00).
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].1["window"]["start"], "2026-11-22T10:00:00.000Z");
    assert_eq!(out[0].1["n"], 3);
    let p50 = out[0].1["p"]["p50"].as_f64().unwrap();
    assert!((p50 - 3.0).abs() < 0.1, "{p50}");
    let rest = finish(&mut s).await;
    assert_eq!(rest[0].1["window"]["start"], "2026-11-22T10:00:20.000Z");
    assert_eq!(rest[0].1["n"], 3, "10:00:25, 10:00:45, 10:01:05");
}

#[tokio::test]
async fn quiet_streams_close_after_the_idle_timeout() {
    let mut s = stage(json!({
        "time": { "field": "timestamp" },
        "window": { "tumbling": "1m" },
        "idle_timeout": "50ms",
        "metrics": { "n": { "count": {} } }
    }));
    assert!(feed(&mut s, vec![at(0, 1, "r", "x", 1)]).await.is_empty());
    let mut out = Emitter::new(s.ports.len());
    s.stage.tick(&mut out).await;
    assert!(drain(&mut out).is_empty(), "not idle yet");
    tokio::time::sleep(std::time::Duration::from_millis(80)).await;
    // Idle: the watermark moves with the wall clock (from 10:00:01 on), which is
    // far less than a minute here, so the window still waits …
    s.stage.tick(&mut out).await;
    assert!(drain(&mut out).is_empty());
    // … while a window that ends within the idle advance closes.
    let mut s = stage(json!({
        "time": { "field": "timestamp" },
        "window": { "tumbling": "100ms" },
        "idle_timeout": "50ms",
        "metrics": { "n": { "count": {} } }
    }));
    feed(&mut s, vec![ev(json!({ "timestamp": "2026-11-22T10:00:00.010Z" }))]).await;
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    s.stage.tick(&mut out).await;
    let closed = drain(&mut out);
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].1["final"], true);
}

#[tokio::test]
async fn updates_while_open_and_gauges_carry_over() {
    let mut s = stage(json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp" },
        "window": { "tumbling": "1m" },
        "emit": "every_batch",
        "metrics": {
            "occupancy": { "gauge": { "value": "data.guests", "up": "event.type == \"booking_confirmed\"", "down": "event.type == \"booking_cancelled\" || event.type == \"booking_completed\"" } }
        }
    }));
    let out = feed(&mut s, vec![at(0, 1, "r", "booking_confirmed", 4), at(0, 2, "r", "booking_confirmed", 2)]).await;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1["occupancy"], 6.0);
    assert_eq!(out[0].1["final"], false);
    let out = feed(&mut s, vec![at(1, 30, "r", "booking_completed", 4)]).await;
    let finals: Vec<&J> = out.iter().map(|(_, r)| r).filter(|r| r["final"] == true).collect();
    assert_eq!(finals[0]["occupancy"], 6.0);
    let open: Vec<&J> = out.iter().map(|(_, r)| r).filter(|r| r["final"] == false).collect();
    assert_eq!(open[0]["occupancy"], 2.0, "the next window starts from the level the last one ended at");
}

#[tokio::test]
async fn bad_events_are_routed_not_lost() {
    let mut s = stage(json!({
        "group_by": ["data.restaurantId"],
        "missing_group": "invalid",
        "time": { "field": "timestamp" },
        "window": { "tumbling": "1m" },
        "metrics": { "n": { "count": {} } }
    }));
    let out = feed(
        &mut s,
        vec![
            ev(json!({ "timestamp": "2026-11-22T10:00:00Z" })),
            ev(json!({ "data": { "restaurantId": "r" } })),
            ev(json!({ "timestamp": "soon", "data": { "restaurantId": "r" } })),
        ],
    )
    .await;
    let ports: Vec<usize> = out.iter().map(|(p, _)| *p).collect();
    assert_eq!(ports, vec![2, 3, 3], "missing group → invalid; missing or bad time → error");
}

#[test]
fn config_mistakes_point_at_the_option() {
    let cx = BuildContext { pipeline: "p".into(), component: "agg".into(), ..Default::default() };
    let build = |options: J| {
        let config: AggregateConfig = serde_json::from_value(options).unwrap();
        config.build(&cx).err().map(|e| (e.path, e.message))
    };
    let (path, message) =
        build(json!({ "window": { "tumbling": "1m" }, "metrics": { "x": { "count": {}, "sum": "a" } } })).unwrap();
    assert_eq!(path, vec!["metrics", "x"]);
    assert!(message.contains("exactly one kind"));
    let (path, _) = build(json!({ "window": { "cumulative": { "period": "day", "timezone": "Mars/Olympus" } }, "metrics": { "x": { "count": {} } } })).unwrap();
    assert_eq!(path, vec!["window", "cumulative", "timezone"]);
    let (path, _) =
        build(json!({ "window": { "tumbling": "1m" }, "metrics": { "x": { "count": {}, "where": "event.a ==" } } }))
            .unwrap();
    assert_eq!(path, vec!["metrics", "x", "where"]);
}

#[tokio::test]
async fn the_group_limit_closes_the_oldest_window_and_counts_it() {
    let config: AggregateConfig = serde_json::from_value(json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp", "allowed_lateness": "1h" },
        "window": { "tumbling": "1m" },
        "metrics": { "n": { "count": {} } },
        "max_groups": 2
    }))
    .unwrap();
    let cx = BuildContext { pipeline: "p".into(), component: "agg".into(), ..Default::default() };
    let mut s = config.build(&cx).unwrap();
    let out = feed(
        &mut s,
        vec![
            at(0, 1, "a", "booking_created", 1),
            at(0, 2, "b", "booking_created", 1),
            at(1, 1, "a", "booking_created", 1),
        ],
    )
    .await;
    let closed: Vec<&str> = out.iter().map(|(_, r)| r["window"]["start"].as_str().unwrap()).collect();
    assert_eq!(closed, vec!["2026-11-22T10:00:00.000Z"; 2], "minute 0 closed early for both groups");
    let evicted = cx.metrics.declared().into_iter().find(|d| d.name == "aggregate_windows_evicted").unwrap();
    assert!(matches!(evicted.metric, conflux_api::metrics::Metric::Counter(c) if c.get() == 1));
}
