//! Per-line cost of what every input does to a JSON line (the check in
//! `Payload::from_json`) and of one `TextScan` over it, on booking events as
//! `scripts/bench.sh` feeds them. `cargo bench -p conflux-api`; divide the
//! time by the batch size for ns/line.

use conflux_json::path::TextScan;
use conflux_json::Payload;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const LINES: usize = 1024;
const TYPES: [&str; 4] = ["booking_created", "booking_confirmed", "booking_cancelled", "booking_completed"];
const ZONES: [&str; 3] = ["indoor", "terrace", "private_room"];

/// Booking lines as the `generate` input's booking profile writes them;
/// `names` gives every restaurant a name with non-ASCII letters.
fn lines(names: &str) -> Vec<Vec<u8>> {
    (0..LINES)
        .map(|n| {
            format!(
                r#"{{"id":"evt-{n}","type":"{}","timestamp":"2026-11-30T12:17:10.535Z","data":{{"bookingId":"b-{}","restaurantId":"r-{}","restaurantName":"{names} {}","tableId":"t-{}","zone":"{}","userId":"u-{}","guests":{},"date":"2026-11-30","time":"21:30","status":"pending"}}}}"#,
                TYPES[n % 4],
                n * 31 % 500_000,
                n % 100,
                n % 100,
                n % 40,
                ZONES[n % 3],
                n * 7 % 50_000,
                n % 8 + 1,
            )
            .into_bytes()
        })
        .collect()
}

fn check(c: &mut Criterion) {
    let mut group = c.benchmark_group("check");
    group.throughput(Throughput::Elements(LINES as u64));
    for (name, lines) in [("ascii", lines("Restaurant")), ("non_ascii", lines("Café Ålborg"))] {
        group.bench_function(name, |b| {
            b.iter(|| lines.iter().map(|line| Payload::from_json(line).is_ok() as usize).sum::<usize>())
        });
    }
    group.finish();
}

fn text_scan(c: &mut Criterion) {
    let payloads: Vec<Payload> = lines("Restaurant").iter().map(|line| Payload::from_json(line).unwrap()).collect();
    // What the bench's Rhai script reads and writes: two reads in `data`, one new member.
    let mut scan = TextScan::default();
    scan.value(&["type"]);
    scan.value(&["data", "guests"]);
    scan.value(&["data", "zone"]);
    scan.close(&["data"]);
    let mut group = c.benchmark_group("text_scan");
    group.throughput(Throughput::Elements(LINES as u64));
    group.bench_function("booking", |b| {
        b.iter(|| payloads.iter().filter(|payload| scan.locate(payload).is_some()).count())
    });
    group.finish();
}

criterion_group!(benches, check, text_scan);
criterion_main!(benches);
