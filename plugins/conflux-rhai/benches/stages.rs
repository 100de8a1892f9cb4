//! Per-event cost of the `filter` and `rhai` stages on a batch of booking
//! events, the shape of `scripts/bench.sh rhai` without file parsing.
//! `cargo bench -p conflux-rhai`; divide the time by the batch size for ns/event.

use conflux_api::registry::Factory;
use conflux_api::{BuildContext, BuiltStage, Emitter, Event, Kind, Payload, Registration};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

/// The allocator the `conflux` binary uses: allocation costs differ a lot.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 1024;
const TYPES: [&str; 4] = ["booking_created", "booking_confirmed", "booking_cancelled", "booking_completed"];
const ZONES: [&str; 3] = ["indoor", "terrace", "bar"];

/// Booking events as the `generate` input's booking profile writes them.
fn batch() -> Vec<Event> {
    (0..BATCH)
        .map(|n| {
            let line = format!(
                r#"{{"id":"evt-{n}","type":"{}","timestamp":"2026-11-22T10:00:00.000Z","data":{{"bookingId":"b-{n}","restaurantId":"r-{}","restaurantName":"Restaurant {}","tableId":"t-{}","zone":"{}","userId":"u-{}","guests":{},"date":"2026-11-22","time":"19:30","status":"pending"}}}}"#,
                TYPES[n % 4 * (n % 7 + 1) % 4],
                n % 100,
                n % 100,
                n % 40,
                ZONES[n % 3],
                n * 7 % 50_000,
                n % 8 + 1,
            );
            // As the file, Kafka and NATS inputs make them: text checked, not parsed.
            let mut event = Event::new(Default::default());
            event.data = Payload::from_json(line.as_bytes()).unwrap();
            event
        })
        .collect()
}

fn stage(name: &str, options: serde_json::Value) -> BuiltStage {
    conflux_rhai::link();
    let cx = BuildContext { pipeline: "bench".into(), component: name.into(), ..Default::default() };
    let Factory::Stage(build) = Registration::find(Kind::Stage, name).expect("registered").factory else {
        unreachable!("{name} is a stage")
    };
    build(options, &cx).unwrap_or_else(|e| panic!("{e:?}"))
}

fn bench_stage(c: &mut Criterion, label: &str, name: &str, options: serde_json::Value) {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut built = stage(name, options);
    let ports = built.ports.len();
    let events = batch();
    let mut group = c.benchmark_group("stage");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(label, |b| {
        b.iter_batched(
            || events.clone(),
            |batch| {
                let mut out = Emitter::new(ports);
                runtime.block_on(built.stage.process(batch, &mut out));
                out
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// The floor under any script that assigns a nested field: sonic turns the
/// parsed objects on the path into owned maps before it can write.
fn payload_write(c: &mut Criterion) {
    use conflux_api::sonic_rs::{JsonValueMutTrait, JsonValueTrait};
    let events = batch();
    let mut group = c.benchmark_group("payload");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("sonic nested insert", |b| {
        b.iter_batched(
            || events.clone(),
            |mut batch| {
                for event in &mut batch {
                    let large = event.data.get("data").and_then(|d| d.get("guests")).and_then(|g| g.as_i64()) > Some(4);
                    if let Some(data) = event.data.get_mut("data").and_then(|d| d.as_object_mut()) {
                        data.insert("large", large);
                    }
                }
                batch
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("json round trip", |b| {
        let mut buf = Vec::new();
        b.iter_batched(
            || events.clone(),
            |mut batch| {
                for event in &mut batch {
                    buf.clear();
                    conflux_api::sonic_rs::to_writer(&mut buf, &event.data).unwrap();
                    *event.data = conflux_api::sonic_rs::from_slice(&buf).unwrap();
                }
                batch
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn stages(c: &mut Criterion) {
    bench_stage(c, "filter", "filter", serde_json::json!({ "condition": r#"event.type != "booking_cancelled""# }));
    bench_stage(c, "rhai identity", "rhai", serde_json::json!({ "script": "event" }));
    bench_stage(
        c,
        "rhai map (3 lines)",
        "rhai",
        serde_json::json!({ "script": "let guests = event.data.guests;\nevent.data.large = guests > 4 && event.data.zone == \"terrace\";\nevent" }),
    );
}

criterion_group!(benches, stages, payload_write);
criterion_main!(benches);
