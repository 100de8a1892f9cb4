//! The `alert` and `dedupe` stages on the booking scenario's rules.

use conflux_aggregate::AggregateConfig;
use conflux_api::{BuildContext, BuiltStage, Emitter, Event, StageConfig, Timestamp};
use serde::de::DeserializeOwned;
use serde_json::{json, Value as J};

fn stage<C: StageConfig + DeserializeOwned>(options: J) -> BuiltStage {
    let config: C = serde_json::from_value(options).unwrap();
    let cx = BuildContext { pipeline: "p".into(), component: "s".into(), ..Default::default() };
    config.build(&cx).map_err(|e| format!("{:?}: {}", e.path, e.message)).unwrap()
}

fn metric(minute: u32, payload: J) -> Event {
    let mut e = Event::new(conflux_api::sonic_rs::from_str(&payload.to_string()).unwrap());
    e.event_time = Timestamp::parse_rfc3339(&format!("2026-11-22T10:{minute:02}:00Z"));
    e
}

async fn run(s: &mut BuiltStage, events: Vec<Event>) -> Vec<J> {
    let mut out = Emitter::new(s.ports.len());
    s.stage.process(events, &mut out).await;
    out.drain().flat_map(|(_, b)| b).map(|e| serde_json::to_value(&e.data).unwrap()).collect()
}

fn alerts_config() -> J {
    json!({
        "group_by": ["data.restaurantId"],
        "rules": [
            { "name": "high_cancellation", "when": "event.bookings > 0 && event.cancelled / event.bookings.to_float() > 0.2",
              "value": "event.cancelled / event.bookings.to_float()", "for": "5m", "severity": "critical" },
            { "name": "almost_full", "when": "event.occupancy >= 0.9 * event.capacity", "resolve_when": "event.occupancy < 0.8 * event.capacity",
              "value": "event.occupancy" }
        ]
    })
}

#[tokio::test]
async fn cancellation_rate_must_hold_for_five_minutes() {
    type Alert = conflux_aggregate_alert::AlertConfig;
    let mut s = stage::<Alert>(alerts_config());
    let r = |m, b, c| {
        metric(
            m,
            json!({ "data": { "restaurantId": "r1" }, "bookings": b, "cancelled": c, "occupancy": 0, "capacity": 50 }),
        )
    };
    assert!(run(&mut s, vec![r(0, 10, 3)]).await.is_empty(), "pending, not firing yet");
    assert!(run(&mut s, vec![r(3, 10, 4)]).await.is_empty());
    let fired = run(&mut s, vec![r(5, 10, 3)]).await;
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0]["alert"], "high_cancellation");
    assert_eq!(fired[0]["state"], "firing");
    assert_eq!(fired[0]["severity"], "critical");
    assert_eq!(fired[0]["data"]["restaurantId"], "r1");
    assert_eq!(fired[0]["since"], "2026-11-22T10:00:00.000Z");
    assert!((fired[0]["value"].as_f64().unwrap() - 0.3).abs() < 1e-9);
    assert!(run(&mut s, vec![r(6, 10, 5)]).await.is_empty(), "still firing: no repeat");
    let resolved = run(&mut s, vec![r(7, 10, 1)]).await;
    assert_eq!(resolved[0]["state"], "resolved");
    // A dip below the threshold resets the hold time.
    assert!(run(&mut s, vec![r(8, 10, 3), r(9, 10, 1), r(12, 10, 3)]).await.is_empty());
}

#[tokio::test]
async fn occupancy_uses_hysteresis_so_flapping_does_not_spam() {
    type Alert = conflux_aggregate_alert::AlertConfig;
    let mut s = stage::<Alert>(alerts_config());
    let o = |m, occ| {
        metric(
            m,
            json!({ "data": { "restaurantId": "r2" }, "bookings": 0, "cancelled": 0, "occupancy": occ, "capacity": 100 }),
        )
    };
    let fired = run(&mut s, vec![o(0, 95)]).await;
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0]["alert"], "almost_full");
    assert!(run(&mut s, vec![o(1, 88), o(2, 91), o(3, 85)]).await.is_empty(), "between 80% and 90%: stays firing");
    let resolved = run(&mut s, vec![o(4, 70)]).await;
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0]["state"], "resolved");
    assert_eq!(resolved[0]["value"], 70);
}

#[tokio::test]
async fn no_show_fires_when_a_confirmed_booking_is_not_completed_in_time() {
    type Alert = conflux_aggregate_alert::AlertConfig;
    let mut s = stage::<Alert>(json!({
        "group_by": ["data.restaurantId"],
        "rules": [{ "name": "no_show", "severity": "info", "expect": {
            "start": "event.type == \"booking_confirmed\"",
            "end": "event.type == \"booking_completed\" || event.type == \"booking_cancelled\"",
            "key": "data.bookingId", "within": "15m", "after": "data.bookingTime" } }]
    }));
    let b = |m, kind: &str, id: &str| {
        metric(
            m,
            json!({ "type": kind, "data": { "restaurantId": "r1", "bookingId": id, "bookingTime": "2026-11-22T10:10:00Z" } }),
        )
    };
    assert!(run(&mut s, vec![b(0, "booking_confirmed", "b1"), b(1, "booking_confirmed", "b2")]).await.is_empty());
    // b2 completes before its deadline: its expectation ends without any alert
    // (no `resolved` for an alert that never fired), and 10:20 is before b1's 10:25.
    let done = run(&mut s, vec![b(20, "booking_completed", "b2")]).await;
    assert!(done.is_empty(), "{done:?}");
    // The clock reached 10:26 (> 10:10 + 15m): b1 never completed.
    let fired = run(&mut s, vec![b(26, "booking_created", "b3")]).await;
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0]["alert"], "no_show");
    assert_eq!(fired[0]["value"], "b1");
    assert_eq!(fired[0]["since"], "2026-11-22T10:25:00.000Z");
    let late = run(&mut s, vec![b(40, "booking_completed", "b1")]).await;
    assert_eq!(late[0]["state"], "resolved");
}

#[tokio::test]
async fn a_resolved_alert_fires_again_when_the_condition_returns() {
    type Alert = conflux_aggregate_alert::AlertConfig;
    let mut s = stage::<Alert>(alerts_config());
    let o = |m, occ| {
        metric(
            m,
            json!({ "data": { "restaurantId": "r3" }, "bookings": 0, "cancelled": 0, "occupancy": occ, "capacity": 100 }),
        )
    };
    let mut all = Vec::new();
    for (minute, occupancy) in [(0, 95), (1, 70), (2, 92), (3, 93), (4, 60)] {
        all.extend(run(&mut s, vec![o(minute, occupancy)]).await);
    }
    let seen: Vec<(&str, &str, &str)> = all
        .iter()
        .map(|a| (a["alert"].as_str().unwrap(), a["state"].as_str().unwrap(), a["since"].as_str().unwrap()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("almost_full", "firing", "2026-11-22T10:00:00.000Z"),
            ("almost_full", "resolved", "2026-11-22T10:00:00.000Z"),
            ("almost_full", "firing", "2026-11-22T10:02:00.000Z"),
            ("almost_full", "resolved", "2026-11-22T10:02:00.000Z"),
        ],
        "re-armed after resolving: two firing events, no repeat while firing"
    );
    assert_eq!(all[2]["value"], 92);
    assert_eq!(all[2]["data"]["restaurantId"], "r3");

    // With a hold time, the re-armed rule must hold for the full `for:` again.
    let mut s = stage::<Alert>(alerts_config());
    let r = |m, c| {
        metric(
            m,
            json!({ "data": { "restaurantId": "r1" }, "bookings": 10, "cancelled": c, "occupancy": 0, "capacity": 50 }),
        )
    };
    let mut states = Vec::new();
    for (minute, cancelled) in [(0, 3), (5, 3), (6, 0), (7, 3), (10, 3), (12, 3)] {
        for a in run(&mut s, vec![r(minute, cancelled)]).await {
            states.push((minute, a["state"].as_str().unwrap().to_string(), a["since"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(
        states,
        vec![
            (5, "firing".to_string(), "2026-11-22T10:00:00.000Z".to_string()),
            (6, "resolved".to_string(), "2026-11-22T10:00:00.000Z".to_string()),
            (12, "firing".to_string(), "2026-11-22T10:07:00.000Z".to_string()),
        ]
    );
}

#[tokio::test]
async fn open_expectations_are_bounded_and_the_oldest_is_forgotten() {
    type Alert = conflux_aggregate_alert::AlertConfig;
    let config: Alert = serde_json::from_value(json!({
        "group_by": ["data.restaurantId"],
        "max_pending": 2,
        "rules": [{ "name": "no_show", "expect": {
            "start": "event.type == \"booking_confirmed\"",
            "end": "event.type == \"booking_completed\"",
            "key": "data.bookingId", "within": "15m" } }]
    }))
    .unwrap();
    let cx = BuildContext { pipeline: "p".into(), component: "s".into(), ..Default::default() };
    let mut s = config.build(&cx).unwrap();
    let b =
        |m, kind: &str, id: &str| metric(m, json!({ "type": kind, "data": { "restaurantId": "r1", "bookingId": id } }));
    let evicted = || {
        let declared = cx.metrics.declared().into_iter().find(|d| d.name == "alert_expectations_evicted").unwrap();
        match declared.metric {
            conflux_api::metrics::Metric::Counter(c) => c.get(),
            _ => panic!("not a counter"),
        }
    };
    let started =
        vec![b(0, "booking_confirmed", "b1"), b(1, "booking_confirmed", "b2"), b(2, "booking_confirmed", "b3")];
    assert!(run(&mut s, started).await.is_empty());
    assert_eq!(evicted(), 1, "b1 was forgotten to keep two");
    // Confirming b2 again replaces its expectation: nothing more is evicted.
    assert!(run(&mut s, vec![b(3, "booking_confirmed", "b2")]).await.is_empty());
    assert_eq!(evicted(), 1);
    // 10:30 is past every deadline (b3 10:17, b2 10:18, b1 10:15): only the kept two fire.
    let fired = run(&mut s, vec![b(30, "booking_created", "b9")]).await;
    let values: Vec<&str> = fired.iter().map(|a| a["value"].as_str().unwrap()).collect();
    assert_eq!(values, vec!["b2", "b3"], "{fired:?}");
    assert_eq!(fired[0]["since"], "2026-11-22T10:18:00.000Z");
    assert!(run(&mut s, vec![b(31, "booking_completed", "b1")]).await.is_empty(), "b1 is forgotten");
    let resolved = run(&mut s, vec![b(32, "booking_completed", "b3")]).await;
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0]["state"], "resolved");
    assert_eq!(resolved[0]["value"], "b3");
    let config: Alert =
        serde_json::from_value(json!({ "max_pending": 0, "rules": [{ "name": "x", "when": "true" }] })).unwrap();
    assert_eq!(config.build(&cx).err().unwrap().path, vec!["max_pending"]);
}

#[test]
fn rules_need_exactly_one_kind() {
    type Alert = conflux_aggregate_alert::AlertConfig;
    let config: Alert = serde_json::from_value(json!({ "rules": [{ "name": "x" }] })).unwrap();
    let cx = BuildContext { pipeline: "p".into(), component: "s".into(), ..Default::default() };
    let err = config.build(&cx).err().unwrap();
    assert_eq!(err.path, vec!["rules", "0"]);
    let _ = std::marker::PhantomData::<AggregateConfig>;
}

mod conflux_aggregate_alert {
    pub use conflux_aggregate::AlertConfig;
}
