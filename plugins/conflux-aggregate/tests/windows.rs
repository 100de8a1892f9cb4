//! The aggregate stage with hand-computed expectations.

use conflux_aggregate::AggregateConfig;
use conflux_api::{AckStatus, AckToken, BuildContext, BuiltStage, Emitter, Event, StageConfig};
use serde_json::{json, Value as J};
use std::collections::BTreeMap;

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

/// A result's JSON text lists its keys in one order (sorted), whatever the
/// run: outputs write it as is, and a file or topic should not change from
/// one run to the next.
#[tokio::test]
async fn results_are_written_with_their_keys_in_one_order() {
    let mut texts = Vec::new();
    for _ in 0..5 {
        let mut s = stage(json!({
            "group_by": ["data.restaurantId"],
            "time": { "field": "timestamp" },
            "window": { "tumbling": "1m" },
            "metrics": {
                "n": { "count": {} },
                "guests": { "sum": "data.guests" },
                "zones": { "top_k": { "field": "type", "k": 2 } }
            }
        }));
        let mut out = Emitter::new(s.ports.len());
        s.stage.process(vec![at(0, 1, "a", "booking_created", 2), at(0, 2, "a", "x", 3)], &mut out).await;
        s.stage.finish(&mut out).await;
        let results: Vec<String> = out.drain().flat_map(|(_, b)| b).map(|e| e.data.to_string()).collect();
        texts.push(results);
    }
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:#?}");
    assert_eq!(
        texts[0],
        vec![concat!(
            r#"{"data":{"restaurantId":"a"},"final":true,"guests":5,"n":2,"#,
            r#""window":{"end":"2026-11-22T10:01:00.000Z","start":"2026-11-22T10:00:00.000Z"},"#,
            r#""zones":[{"count":1,"value":"booking_created"},{"count":1,"value":"x"}]}"#
        )]
    );
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

/// (start, end, count) of each session result, by time of day, sorted.
fn session_rows(results: &[(usize, J)]) -> Vec<(String, String, i64)> {
    let mut rows: Vec<(String, String, i64)> = results
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
    rows
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
    let rows = session_rows(&all);
    assert_eq!(rows, vec![("10:00:00".into(), "10:01:15".into(), 3), ("10:02:00".into(), "10:02:30".into(), 1)]);
}

/// Out-of-order events join the session they belong to: two early events
/// more than the gap before an open session form their own session (not
/// one window each), and an event that fills a gap merges two sessions.
#[tokio::test]
async fn out_of_order_events_join_and_bridge_sessions() {
    let mut s = stage(json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp", "allowed_lateness": "5m" },
        "window": { "session": { "gap": "30s" } },
        "metrics": { "n": { "count": {} } }
    }));
    let events = vec![
        at(2, 0, "a", "x", 1),
        // Before the open session, and then within the gap of each other.
        at(0, 0, "a", "x", 1),
        at(0, 10, "a", "x", 1),
        // Sessions [10:01:00, 10:01:30) and [10:01:50, 10:02:30): 10:01:25 reaches both.
        at(1, 0, "a", "x", 1),
        at(1, 50, "a", "x", 1),
        at(1, 25, "a", "x", 1),
    ];
    let mut all = feed(&mut s, events).await;
    all.extend(finish(&mut s).await);
    let rows = session_rows(&all);
    assert_eq!(rows, vec![("10:00:00".into(), "10:00:40".into(), 2), ("10:01:00".into(), "10:02:30".into(), 4),]);
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
    // The watermark reached 10:01:05: every step up to 10:01:00 is emitted,
    // each `[t − 1m, t)` with the buckets it holds.
    let rows = rows_of(&out, "n");
    assert_eq!(
        rows,
        vec![("09:59:20".into(), json!(1)), ("09:59:40".into(), json!(2)), ("10:00:00".into(), json!(3))],
        "{out:?}"
    );
    let p50 = |results: &[(usize, J)], start: &str| {
        let r = results.iter().find(|(_, r)| r["window"]["start"].as_str().unwrap()[11..19] == *start).unwrap();
        r.1["p"]["p50"].as_f64().unwrap()
    };
    assert!((p50(&out, "10:00:00") - 3.0).abs() < 0.03, "1, 3, 5: {}", p50(&out, "10:00:00"));
    // The end of input emits the windows still holding events after the last step.
    let rest = finish(&mut s).await;
    assert_eq!(
        rows_of(&rest, "n"),
        vec![("10:00:20".into(), json!(3)), ("10:00:40".into(), json!(2)), ("10:01:00".into(), json!(1))],
        "10:00:25, 10:00:45, 10:01:05 in the first; {rest:?}"
    );
    assert!((p50(&rest, "10:00:20") - 5.0).abs() < 0.05, "3, 5, 7: {}", p50(&rest, "10:00:20"));
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
    // Minute 0's results were final: a later event for it is late (port 1),
    // not the start of a second, smaller result for (a, 10:00).
    let mut after = feed(&mut s, vec![at(0, 30, "a", "booking_created", 1)]).await;
    assert_eq!(after.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![1], "{after:?}");
    after.extend(finish(&mut s).await);
    let finals: Vec<(&str, &str, &J)> = after
        .iter()
        .filter(|(p, _)| *p == 0)
        .map(|(_, r)| (r["data"]["restaurantId"].as_str().unwrap(), r["window"]["start"].as_str().unwrap(), &r["n"]))
        .collect();
    assert_eq!(finals, vec![("a", "2026-11-22T10:01:00.000Z", &json!(1))], "only minute 1 closes at the end");
}

fn occupancy_metric() -> J {
    json!({ "gauge": {
        "value": "data.guests",
        "up": "event.type == \"booking_confirmed\"",
        "down": "event.type == \"booking_cancelled\" || event.type == \"booking_completed\""
    } })
}

/// (window start as HH:MM:SS, metric value) for every result on the default port, sorted.
fn rows_of(results: &[(usize, J)], metric: &str) -> Vec<(String, J)> {
    let mut rows: Vec<(String, J)> = results
        .iter()
        .filter(|(p, _)| *p == 0)
        .map(|(_, r)| (r["window"]["start"].as_str().unwrap()[11..19].to_string(), r[metric].clone()))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

#[tokio::test]
async fn a_gauge_is_a_level_in_sliding_windows_not_a_sum_of_buckets() {
    let mut s = stage(json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp" },
        "window": { "sliding": { "size": "1m", "every": "20s" } },
        "metrics": { "occupancy": occupancy_metric(), "n": { "count": {} }, "per_second": { "rate": {} } }
    }));
    // Buckets of 20 s: [10:00:00) +4, [10:00:20) +2, [10:00:40) −4, [10:01:00) +3.
    let out = feed(
        &mut s,
        vec![
            at(0, 5, "r", "booking_confirmed", 4),
            at(0, 25, "r", "booking_confirmed", 2),
            at(0, 45, "r", "booking_completed", 4),
            at(1, 5, "r", "booking_confirmed", 3),
        ],
    )
    .await;
    // Steps 10:00:20, 10:00:40, 10:01:00: the levels at those times, 4, 4 + 2 and
    // 4 + 2 − 4 = 2 (not 4 + 6 + 2 = 12 for the last).
    assert_eq!(
        rows_of(&out, "occupancy"),
        vec![("09:59:20".into(), json!(4.0)), ("09:59:40".into(), json!(6.0)), ("10:00:00".into(), json!(2.0))],
        "{out:?}"
    );
    assert_eq!(
        rows_of(&out, "n"),
        vec![("09:59:20".into(), json!(1)), ("09:59:40".into(), json!(2)), ("10:00:00".into(), json!(3))]
    );
    let last = out.iter().find(|(_, r)| r["window"]["start"] == "2026-11-22T10:00:00.000Z").unwrap();
    assert!((last.1["per_second"].as_f64().unwrap() - 3.0 / 60.0).abs() < 1e-12, "3 events over the 60 s window");
    // [10:00:20, 10:01:20) and later: the first bucket left the window but its +4
    // stays in the level: 4 + 2 − 4 + 3 = 5.
    let rest = finish(&mut s).await;
    assert_eq!(
        rows_of(&rest, "occupancy"),
        vec![("10:00:20".into(), json!(5.0)), ("10:00:40".into(), json!(5.0)), ("10:01:00".into(), json!(5.0))],
        "{rest:?}"
    );
    assert_eq!(
        rows_of(&rest, "n"),
        vec![("10:00:20".into(), json!(3)), ("10:00:40".into(), json!(2)), ("10:01:00".into(), json!(1))]
    );
}

#[tokio::test]
async fn a_gauge_is_a_level_in_hopping_windows_counted_once_per_event() {
    let mut s = stage(json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp" },
        "window": { "hopping": { "size": "1m", "slide": "30s" } },
        "metrics": { "occupancy": occupancy_metric(), "n": { "count": {} } }
    }));
    let mut all = feed(
        &mut s,
        vec![
            at(0, 10, "r", "booking_confirmed", 4),
            at(0, 40, "r", "booking_confirmed", 2),
            at(1, 10, "r", "booking_completed", 4),
        ],
    )
    .await;
    all.extend(finish(&mut s).await);
    // Each window reports the level at its end: 10:00:30 → 4, 10:01:00 → 6, 10:01:30 → 2, 10:02:00 → 2.
    assert_eq!(
        rows_of(&all, "occupancy"),
        vec![
            ("09:59:30".into(), json!(4.0)),
            ("10:00:00".into(), json!(6.0)),
            ("10:00:30".into(), json!(2.0)),
            ("10:01:00".into(), json!(2.0)),
        ]
    );
    assert_eq!(
        rows_of(&all, "n"),
        vec![
            ("09:59:30".into(), json!(1)),
            ("10:00:00".into(), json!(2)),
            ("10:00:30".into(), json!(2)),
            ("10:01:00".into(), json!(1))
        ]
    );
}

#[tokio::test]
async fn a_gauge_level_includes_out_of_order_events_of_earlier_windows() {
    let mut s = stage(json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp", "allowed_lateness": "1m" },
        "window": { "tumbling": "1m" },
        "metrics": { "occupancy": occupancy_metric() }
    }));
    // The 10:01 window opens first; the 10:00:50 booking arrives after it (still in time).
    let mut all =
        feed(&mut s, vec![at(1, 10, "r", "booking_confirmed", 2), at(0, 50, "r", "booking_confirmed", 4)]).await;
    all.extend(feed(&mut s, vec![at(2, 30, "r", "booking_cancelled", 2)]).await);
    all.extend(finish(&mut s).await);
    // Levels at 10:01, 10:02, 10:03: 4, 4 + 2 = 6, 6 − 2 = 4.
    assert_eq!(
        rows_of(&all, "occupancy"),
        vec![("10:00:00".into(), json!(4.0)), ("10:01:00".into(), json!(6.0)), ("10:02:00".into(), json!(4.0))]
    );
}

#[tokio::test]
async fn a_missing_group_field_joins_the_default_group() {
    let mut s = stage(json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp" },
        "window": { "tumbling": "1m" },
        "metrics": { "n": { "count": {} } }
    }));
    let mut all = feed(
        &mut s,
        vec![
            at(0, 10, "r1", "booking_created", 2),
            ev(json!({ "timestamp": "2026-11-22T10:00:20Z", "data": { "guests": 1 } })),
            ev(json!({ "timestamp": "2026-11-22T10:00:30Z", "data": { "restaurantId": null } })),
        ],
    )
    .await;
    all.extend(finish(&mut s).await);
    let rows: Vec<(String, i64)> = by_group(&all).into_iter().map(|(g, _, r)| (g, r["n"].as_i64().unwrap())).collect();
    assert_eq!(rows, vec![("r1".into(), 1), ("unknown".into(), 2)], "missing and null both join `unknown`");
    assert!(all.iter().all(|(p, _)| *p == 0), "nothing goes to `invalid` by default: {all:?}");

    // A chosen default value, with one of two group fields missing.
    let mut s = stage(json!({
        "group_by": ["data.restaurantId", "data.zone"],
        "default_group": "walk-in",
        "time": { "field": "timestamp" },
        "window": { "tumbling": "1m" },
        "metrics": { "n": { "count": {} } }
    }));
    feed(&mut s, vec![ev(json!({ "timestamp": "2026-11-22T10:00:20Z", "data": { "restaurantId": "r1" } }))]).await;
    let out = finish(&mut s).await;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1["data"], json!({ "restaurantId": "r1", "zone": "walk-in" }));
    assert_eq!(out[0].1["n"], 1);
}

#[tokio::test]
async fn processing_time_windows_follow_the_wall_clock() {
    let mut s = stage(json!({
        "window": { "tumbling": "200ms" },
        "metrics": { "n": { "count": {} } }
    }));
    let before = conflux_api::Timestamp::now().0;
    // No time field: an event's own `timestamp` (even a bad one) is not read.
    let out = feed(
        &mut s,
        vec![
            ev(json!({ "timestamp": "2020-01-01T00:00:00Z" })),
            ev(json!({ "timestamp": "not a time" })),
            ev(json!({})),
        ],
    )
    .await;
    let after = conflux_api::Timestamp::now().0;
    assert!(out.is_empty(), "the window is still open: {out:?}");
    tokio::time::sleep(std::time::Duration::from_millis(450)).await;
    let mut tick = Emitter::new(s.ports.len());
    s.stage.tick(&mut tick).await;
    let closed = drain(&mut tick);
    assert!(!closed.is_empty(), "the wall clock passed the window's end");
    let total: i64 = closed.iter().map(|(_, r)| r["n"].as_i64().unwrap()).sum();
    assert_eq!(total, 3, "{closed:?}");
    for (port, r) in &closed {
        assert_eq!(*port, 0);
        assert_eq!(r["final"], true);
        let start = conflux_api::Timestamp::parse_rfc3339(r["window"]["start"].as_str().unwrap()).unwrap().0;
        let end = conflux_api::Timestamp::parse_rfc3339(r["window"]["end"].as_str().unwrap()).unwrap().0;
        assert_eq!(end - start, 200_000_000);
        assert!(start <= after && end > before, "window [{start}, {end}) is not around now ({before}..{after})");
    }
    assert!(finish(&mut s).await.is_empty());
}

#[tokio::test]
async fn min_last_and_rate() {
    let mut s = stage(json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp" },
        "window": { "tumbling": "10s" },
        "metrics": {
            "min_guests": { "min": "data.guests" },
            "min_large": { "min": "data.guests", "where": "event.data.guests > 2" },
            "last_type": { "last": "type" },
            "per_second": { "rate": {} }
        }
    }));
    let mut all = feed(
        &mut s,
        vec![
            at(0, 8, "r", "booking_completed", 2), // the latest event time arrives first
            at(0, 1, "r", "booking_created", 5),
            at(0, 3, "r", "booking_confirmed", 7),
            at(0, 5, "r", "booking_cancelled", 3),
        ],
    )
    .await;
    all.extend(finish(&mut s).await);
    assert_eq!(all.len(), 1, "{all:?}");
    let r = &all[0].1;
    assert_eq!(r["window"]["start"], "2026-11-22T10:00:00.000Z");
    assert_eq!(r["min_guests"], 2.0);
    assert_eq!(r["min_large"], 3.0);
    assert_eq!(r["last_type"], "booking_completed", "last by event time, not arrival");
    assert!((r["per_second"].as_f64().unwrap() - 0.4).abs() < 1e-12, "4 events over 10 s: {}", r["per_second"]);
}

async fn tick(s: &mut BuiltStage) -> Vec<(usize, J)> {
    let mut out = Emitter::new(s.ports.len());
    s.stage.tick(&mut out).await;
    drain(&mut out)
}

#[tokio::test]
async fn throttled_updates_while_open_then_the_final_result() {
    let mut s = stage(json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp" },
        "window": { "tumbling": "1m" },
        "emit": { "updates": "500ms" },
        "metrics": { "n": { "count": {} } }
    }));
    let wait = || tokio::time::sleep(std::time::Duration::from_millis(550));
    let out = feed(&mut s, vec![at(0, 1, "r1", "x", 1), at(0, 2, "r1", "x", 1), at(0, 3, "r2", "x", 1)]).await;
    assert!(out.is_empty(), "updates leave on ticks, not per batch: {out:?}");
    assert!(tick(&mut s).await.is_empty(), "less than 500 ms since the stage started");
    wait().await;
    let updates: Vec<(String, String, J)> = by_group(&tick(&mut s).await);
    let seen: Vec<(&str, &J, &J)> = updates.iter().map(|(g, _, r)| (g.as_str(), &r["n"], &r["final"])).collect();
    assert_eq!(seen, vec![("r1", &json!(2), &json!(false)), ("r2", &json!(1), &json!(false))]);
    assert!(tick(&mut s).await.is_empty(), "throttled, and nothing changed");
    assert!(feed(&mut s, vec![at(0, 4, "r1", "x", 1)]).await.is_empty());
    assert!(tick(&mut s).await.is_empty(), "throttled: the last update was just sent");
    wait().await;
    let updates = tick(&mut s).await;
    assert_eq!(updates.len(), 1, "only the group that changed: {updates:?}");
    assert_eq!((&updates[0].1["data"]["restaurantId"], &updates[0].1["n"]), (&json!("r1"), &json!(3)));
    assert_eq!(updates[0].1["final"], false);
    wait().await;
    assert!(tick(&mut s).await.is_empty(), "no change, no update");
    // The watermark passes 10:01: the final results.
    let finals = by_group(&feed(&mut s, vec![at(1, 1, "r1", "x", 1)]).await);
    let seen: Vec<(&str, &J, &J)> = finals.iter().map(|(g, _, r)| (g.as_str(), &r["n"], &r["final"])).collect();
    assert_eq!(seen, vec![("r1", &json!(3), &json!(true)), ("r2", &json!(1), &json!(true))]);
    let last = finish(&mut s).await;
    assert_eq!(last.len(), 1);
    assert_eq!((&last[0].1["n"], &last[0].1["final"]), (&json!(1), &json!(true)));
}

#[tokio::test]
async fn each_late_event_reaches_the_late_port_and_counts_nowhere_else() {
    // Tumbling: the watermark (no lateness allowed) reaches 10:01:30 and closes [10:00, 10:01).
    let mut s = stage(json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp" },
        "window": { "tumbling": "1m" },
        "metrics": { "n": { "count": {} } }
    }));
    let mut all = feed(
        &mut s,
        vec![
            at(0, 10, "r1", "x", 1),
            at(1, 30, "r1", "x", 2),
            at(0, 50, "r1", "x", 3), // late
            at(0, 59, "r2", "x", 4), // late
            at(1, 0, "r1", "x", 5),  // in the open window
        ],
    )
    .await;
    all.extend(finish(&mut s).await);
    let late: Vec<i64> =
        all.iter().filter(|(p, _)| *p == 1).map(|(_, e)| e["data"]["guests"].as_i64().unwrap()).collect();
    assert_eq!(late, vec![3, 4], "each late event once, unchanged, on `late`");
    let rows: Vec<(String, String, i64)> =
        by_group(&all).into_iter().map(|(g, w, r)| (g, w[11..19].to_string(), r["n"].as_i64().unwrap())).collect();
    assert_eq!(rows, vec![("r1".into(), "10:00:00".into(), 1), ("r1".into(), "10:01:00".into(), 2)]);

    // Hopping: late only when every window it falls in has closed.
    let mut s = stage(json!({
        "time": { "field": "timestamp" },
        "window": { "hopping": { "size": "1m", "slide": "30s" } },
        "metrics": { "n": { "count": {} } }
    }));
    let out = feed(
        &mut s,
        vec![at(1, 30, "r", "x", 1), at(0, 40, "r", "x", 2), at(0, 50, "r", "x", 3), at(1, 0, "r", "x", 4)],
    )
    .await;
    let late: Vec<i64> =
        out.iter().filter(|(p, _)| *p == 1).map(|(_, e)| e["data"]["guests"].as_i64().unwrap()).collect();
    assert_eq!(late, vec![2, 3]);

    // Sessions: late when its own session would already have closed (t + gap <= watermark).
    let mut s = stage(json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp" },
        "window": { "session": { "gap": "30s" } },
        "metrics": { "n": { "count": {} } }
    }));
    let mut all = feed(
        &mut s,
        vec![at(0, 0, "a", "x", 1), at(2, 0, "a", "x", 2), at(1, 20, "a", "x", 3), at(1, 40, "a", "x", 4)],
    )
    .await;
    all.extend(finish(&mut s).await);
    let late: Vec<i64> =
        all.iter().filter(|(p, _)| *p == 1).map(|(_, e)| e["data"]["guests"].as_i64().unwrap()).collect();
    assert_eq!(late, vec![3]);
    let mut sessions: Vec<(String, String, i64)> = all
        .iter()
        .filter(|(p, _)| *p == 0)
        .map(|(_, r)| {
            (
                r["window"]["start"].as_str().unwrap()[11..19].to_string(),
                r["window"]["end"].as_str().unwrap()[11..19].to_string(),
                r["n"].as_i64().unwrap(),
            )
        })
        .collect();
    sessions.sort();
    assert_eq!(sessions, vec![("10:00:00".into(), "10:00:30".into(), 1), ("10:01:40".into(), "10:02:30".into(), 2)]);
}

/// Deterministic pseudo-random numbers (xorshift64*), so the stream is the same in every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: i64) -> i64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as i64 % n
    }
}

const MS: i64 = 1_000_000;
const EVERY_MS: i64 = 60_000;
const SIZE_MS: i64 = 120_000;
const LATENESS_MS: i64 = 30_000;

/// One generated event: (id, event time in ms, group, type, value).
type Gen = (usize, i64, &'static str, &'static str, i64);

/// ~4,000 events over three groups: mostly small steps forward, some
/// out-of-order ones within the allowed lateness, jumps of up to seconds,
/// minutes, beyond the window size and of hours, and a few events far
/// behind the watermark (late for every window they fall in).
fn jumpy_stream() -> Vec<Gen> {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut max = 1_795_000_000_000i64; // 2026-11-18, in ms
    let mut events = Vec::new();
    for id in 0..4000 {
        let watermark = max - LATENESS_MS;
        let roll = rng.below(100);
        let ts = if roll < 3 {
            watermark - SIZE_MS - EVERY_MS - rng.below(300_000)
        } else if roll < 18 {
            max - rng.below(LATENESS_MS + 1)
        } else {
            let jump = match rng.below(100) {
                0..70 => rng.below(5_000),
                70..90 => 5_000 + rng.below(85_000),
                90..97 => 90_000 + rng.below(510_000),
                _ => 600_000 + rng.below(3 * 3_600_000),
            };
            max += jump;
            max
        };
        let group = ["a", "b", "c"][rng.below(3) as usize];
        let kind = ["in", "out", "x"][rng.below(3) as usize];
        events.push((id, ts, group, kind, 1 + rng.below(20)));
    }
    events
}

/// (group, window start ms, window end ms) → (count, sum, gauge level).
type Expected = BTreeMap<(String, i64, i64), (i64, i64, i64)>;

/// Brute force, written apart from the stage: which events are late (each
/// is classified against the watermark when it arrives: highest time so far
/// minus the lateness), then, for every step `t` between the first and the
/// last event, every group's count and sum over `t − size <= ts < t` and its
/// gauge level (increments of every event before `t`). Only windows with
/// events are reported.
fn brute_force(events: &[Gen]) -> (Expected, Vec<usize>) {
    let mut max: Option<i64> = None;
    let mut on_time: Vec<&Gen> = Vec::new();
    let mut late = Vec::new();
    for e in events {
        let ts = e.1;
        match max.map(|m| m - LATENESS_MS) {
            Some(w) if ts < w => {
                // Every window holding it, [t − size, t) with t − size <= ts < t, ends by the watermark.
                let last_window_end = ts.div_euclid(EVERY_MS) * EVERY_MS + SIZE_MS;
                assert!(last_window_end <= w, "the generator made an event only partly late: {e:?}");
                late.push(e.0);
            }
            _ => on_time.push(e),
        }
        max = Some(max.map_or(ts, |m| m.max(ts)));
    }
    let first = on_time.iter().map(|e| e.1).min().unwrap();
    let last = on_time.iter().map(|e| e.1).max().unwrap();
    let mut expected = Expected::new();
    for group in ["a", "b", "c"] {
        let mut mine: Vec<&Gen> = on_time.iter().copied().filter(|e| e.2 == group).collect();
        mine.sort_by_key(|e| e.1);
        let mut t = first.div_euclid(EVERY_MS) * EVERY_MS + EVERY_MS;
        while t - SIZE_MS <= last {
            let inside = mine.iter().filter(|e| t - SIZE_MS <= e.1 && e.1 < t);
            let (count, sum) = inside.fold((0, 0), |(n, s), e| (n + 1, s + e.4));
            if count > 0 {
                let level: i64 = mine
                    .iter()
                    .filter(|e| e.1 < t)
                    .map(|e| match e.3 {
                        "in" => e.4,
                        "out" => -e.4,
                        _ => 0,
                    })
                    .sum();
                expected.insert((group.to_string(), t - SIZE_MS, t), (count, sum, level));
            }
            t += EVERY_MS;
        }
    }
    (expected, late)
}

fn jumpy_event(e: &Gen) -> Event {
    ev(json!({
        "id": e.0,
        "type": e.3,
        "ts": conflux_api::Timestamp(e.1 * MS).to_rfc3339(),
        "data": { "g": e.2, "v": e.4 }
    }))
}

/// Feeds `events` in batches of `batch`, then ends the input; the results by
/// (group, window), failing on a window reported twice, and the late ids.
async fn run_in_batches(window: J, events: &[Gen], batch: usize) -> (Expected, Vec<usize>) {
    let mut s = stage(json!({
        "group_by": ["data.g"],
        "time": { "field": "ts", "allowed_lateness": "30s" },
        "window": window,
        "metrics": {
            "n": { "count": {} },
            "total": { "sum": "data.v" },
            "level": { "gauge": { "value": "data.v", "up": "event.type == \"in\"", "down": "event.type == \"out\"" } }
        }
    }));
    let mut all = Vec::new();
    for chunk in events.chunks(batch) {
        all.extend(feed(&mut s, chunk.iter().map(jumpy_event).collect()).await);
    }
    all.extend(finish(&mut s).await);
    let mut results = Expected::new();
    let mut late = Vec::new();
    let ms = |r: &J, key: &str| {
        conflux_api::Timestamp::parse_rfc3339(r["window"][key].as_str().unwrap()).unwrap().0.div_euclid(MS)
    };
    for (port, r) in &all {
        match port {
            0 => {
                assert_eq!(r["final"], true, "{r}");
                let key = (r["data"]["g"].as_str().unwrap().to_string(), ms(r, "start"), ms(r, "end"));
                let level = r["level"].as_f64().unwrap();
                let value = (r["n"].as_i64().unwrap(), r["total"].as_i64().unwrap(), level as i64);
                assert_eq!(level, value.2 as f64, "a level of whole numbers: {r}");
                if let Some(before) = results.insert(key.clone(), value) {
                    panic!("batch {batch}: window {key:?} reported twice: {before:?} and {value:?}");
                }
            }
            1 => late.push(r["id"].as_u64().unwrap() as usize),
            other => panic!("batch {batch}: an event on port {other}: {r}"),
        }
    }
    late.sort();
    (results, late)
}

/// Compares a run with the brute force, describing the first differences.
fn assert_same(label: &str, got: &Expected, want: &Expected) {
    if got == want {
        return;
    }
    let missing: Vec<_> = want.iter().filter(|(k, _)| !got.contains_key(*k)).take(5).collect();
    let extra: Vec<_> = got.iter().filter(|(k, _)| !want.contains_key(*k)).take(5).collect();
    let wrong: Vec<_> =
        want.iter().filter_map(|(k, v)| got.get(k).filter(|g| *g != v).map(|g| (k, v, g))).take(5).collect();
    panic!(
        "{label}: {} windows reported, {} expected\n missing (first 5): {missing:?}\n unexpected: {extra:?}\n \
         wrong (key, expected, got): {wrong:?}",
        got.len(),
        want.len()
    );
}

/// Every step `t` whose window `[t − size, t)` holds events of a group is
/// reported once, with the brute-force count, sum and gauge level, whatever
/// the batch size: when the watermark passes several window ends at once
/// (a large batch, or a jump in event time) each closed window is emitted.
#[tokio::test]
async fn sliding_windows_report_every_step_with_events_whatever_the_batch_size() {
    let events = jumpy_stream();
    let (want, want_late) = brute_force(&events);
    assert!(want.len() > 3000 && !want_late.is_empty(), "{} windows, {} late", want.len(), want_late.len());
    for batch in [1, 7, 1024, events.len()] {
        let window = json!({ "sliding": { "size": "2m", "every": "1m" } });
        let (got, late) = run_in_batches(window, &events, batch).await;
        assert_same(&format!("sliding, batch {batch}"), &got, &want);
        assert_eq!(late, want_late, "sliding, batch {batch}: late events");
    }
}

/// Hopping windows of the same size and slide are the same windows.
#[tokio::test]
async fn hopping_windows_report_every_window_with_events_whatever_the_batch_size() {
    let events = jumpy_stream();
    let (want, want_late) = brute_force(&events);
    for batch in [1, 7, 1024, events.len()] {
        let window = json!({ "hopping": { "size": "2m", "slide": "1m" } });
        let (got, late) = run_in_batches(window, &events, batch).await;
        assert_same(&format!("hopping, batch {batch}"), &got, &want);
        assert_eq!(late, want_late, "hopping, batch {batch}: late events");
    }
}

/// A sliding event is late once every window holding it has ended by the
/// watermark, not only once its bucket is older than the watermark minus
/// `size`: such an event used to be taken into a bucket no result would
/// include. One with a window still to come counts in that window only.
#[tokio::test]
async fn a_sliding_event_is_late_once_every_window_holding_it_has_closed() {
    let mut s = stage(json!({
        "time": { "field": "timestamp" },
        "window": { "sliding": { "size": "1m", "every": "20s" } },
        "metrics": { "n": { "count": {} }, "guests": { "sum": "data.guests" } }
    }));
    let mut all = feed(&mut s, vec![at(1, 5, "r", "x", 1)]).await;
    // Watermark 10:01:05. 10:00:02 falls in windows ending 10:00:20 … 10:01:00, all closed;
    // 10:00:30 in windows ending 10:00:40 … 10:01:20, of which 10:01:20 is still open.
    all.extend(feed(&mut s, vec![at(0, 2, "r", "x", 10), at(0, 30, "r", "x", 100)]).await);
    all.extend(finish(&mut s).await);
    let late: Vec<i64> =
        all.iter().filter(|(p, _)| *p == 1).map(|(_, e)| e["data"]["guests"].as_i64().unwrap()).collect();
    assert_eq!(late, vec![10]);
    assert_eq!(
        rows_of(&all, "guests"),
        vec![("10:00:20".into(), json!(101)), ("10:00:40".into(), json!(1)), ("10:01:00".into(), json!(1))]
    );
}

/// `percentiles` reports the nearest rank, ⌈q·n⌉ of the sorted values: p99
/// of seven values is the largest, p50 the 4th (⌈3.5⌉), p0 the smallest.
#[tokio::test]
async fn percentiles_report_the_nearest_rank() {
    let mut s = stage(json!({
        "time": { "field": "timestamp" },
        "window": { "tumbling": "1m" },
        "metrics": { "p": { "percentiles": { "field": "data.guests", "quantiles": [0.0, 0.5, 0.99, 1.0] } } }
    }));
    let events = [4, 100, 1, 6, 2, 5, 3].iter().enumerate().map(|(i, g)| at(0, i as u32, "r", "x", *g)).collect();
    let mut all = feed(&mut s, events).await;
    all.extend(finish(&mut s).await);
    assert_eq!(all.len(), 1, "{all:?}");
    let p = &all[0].1["p"];
    for (key, want) in [("p0", 1.0), ("p50", 4.0), ("p99", 100.0), ("p100", 100.0)] {
        let got = p[key].as_f64().unwrap();
        assert!((got - want).abs() <= 0.01 * want, "{key}: {got}, want {want} ({p})");
    }
}

/// (result_key, result_revision, final) of each default-port result.
fn keyed(out: &mut Emitter) -> Vec<(String, u64, bool)> {
    out.drain()
        .filter(|(port, _)| *port == 0)
        .flat_map(|(_, b)| b.into_iter())
        .map(|e| {
            let key = e.meta.get("result_key").and_then(|v| v.as_str()).expect("result_key").to_string();
            let revision = e.meta.get("result_revision").and_then(|v| v.as_u64()).expect("result_revision");
            let final_ = serde_json::to_value(&e.data).unwrap()["final"].as_bool().unwrap();
            (key, revision, final_)
        })
        .collect()
}

use conflux_api::sonic_rs::JsonValueTrait;

#[tokio::test]
async fn results_carry_a_stable_key_and_a_revision_that_ends_highest_at_the_final() {
    let mut s = stage(json!({
        "group_by": ["data.restaurantId"],
        "time": { "field": "timestamp" },
        "window": { "tumbling": "1m" },
        "emit": "every_batch",
        "metrics": { "bookings": { "count": {} } }
    }));
    let mut out = Emitter::new(s.ports.len());
    s.stage.process(vec![at(0, 1, "r-1", "booking_created", 2), at(0, 2, "r-2", "booking_created", 2)], &mut out).await;
    s.stage.process(vec![at(0, 3, "r-1", "booking_created", 2)], &mut out).await;
    s.stage.finish(&mut out).await;
    let mut got = keyed(&mut out);
    got.sort();
    let r1 = r#"p/agg/["r-1"]/2026-11-22T10:00:00.000Z"#.to_string();
    let r2 = r#"p/agg/["r-2"]/2026-11-22T10:00:00.000Z"#.to_string();
    assert_eq!(
        got,
        vec![(r1.clone(), 1, false), (r1.clone(), 2, false), (r1, 3, true), (r2.clone(), 1, false), (r2, 2, true)]
    );
}
