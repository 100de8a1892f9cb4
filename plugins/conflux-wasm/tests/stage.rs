//! The `wasm` stage against real guests built from source
//! (plugins/conflux-wasm/guests, via scripts/build-wasm-guests.sh).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use conflux_api::component::ERROR_META;
use conflux_api::registry::deserialize_options;
use conflux_api::sonic_rs::{self, JsonValueTrait};
use conflux_api::{AckStatus, BuildContext, BuildError, Emitter, Event, Payload, Stage, StageConfig, Timestamp, Value};
use conflux_engine::runtime::RunContext;
use conflux_testkit::{acks, delivered, run_yaml};
use conflux_wasm::WasmConfig;

/// Builds the guests once per test binary and returns the folder of `.wasm` files.
fn guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/build-wasm-guests.sh");
        let output = std::process::Command::new("bash").arg(script).output().expect("run build-wasm-guests.sh");
        assert!(
            output.status.success(),
            "building the wasm guests failed (is the wasm32-wasip2 target installed?):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
    })
}

fn guest(name: &str) -> String {
    guests().join(format!("{name}.wasm")).display().to_string()
}

fn cx() -> BuildContext {
    BuildContext {
        pipeline: "test".into(),
        component: "wasm".into(),
        base_dir: std::env::temp_dir(),
        data_dir: std::env::temp_dir(),
        ..Default::default()
    }
}

fn build(options: serde_json::Value) -> Result<(Box<dyn Stage>, Vec<String>), BuildError> {
    let config: WasmConfig = deserialize_options(options)?;
    let built = config.build(&cx())?;
    Ok((built.stage, built.ports))
}

fn stage(options: serde_json::Value) -> (Box<dyn Stage>, usize) {
    let (stage, ports) = build(options).unwrap_or_else(|e| panic!("build failed: {e:?}"));
    (stage, ports.len())
}

/// Events as inputs make them: JSON text, checked, not parsed.
fn events(docs: &[&str]) -> Vec<Event> {
    docs.iter().map(|d| Event::with_time(Payload::from_json(d.as_bytes()).unwrap(), Timestamp(0))).collect()
}

/// Runs one batch; returns what each port got, the `error` port last.
async fn run(stage: &mut dyn Stage, ports: usize, batch: Vec<Event>) -> Vec<Vec<Event>> {
    let mut out = Emitter::new(ports);
    stage.process(batch, &mut out).await;
    let mut by_port: Vec<Vec<Event>> = (0..ports + 2).map(|_| Vec::new()).collect();
    for (port, batch) in out.drain() {
        by_port[port] = batch;
    }
    by_port
}

fn texts(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.data.to_string()).collect()
}

fn reason(event: &Event) -> String {
    event.meta.get(ERROR_META).and_then(|v| v.as_str()).unwrap_or_default().to_string()
}

#[tokio::test]
async fn identity_keeps_events_and_their_metadata() {
    let (mut s, ports) = stage(serde_json::json!({ "module": guest("identity") }));
    let mut batch = events(&[r#"{"n":1}"#, r#"{"n":2}"#]);
    batch[0].meta.insert("key", "k1");
    let got = run(&mut *s, ports, batch).await;
    assert_eq!(texts(&got[0]), vec![r#"{"n":1}"#, r#"{"n":2}"#]);
    assert_eq!(got[0][0].meta.get("key").and_then(|v| v.as_str()), Some("k1"));
    assert!(got[1].is_empty());
}

#[tokio::test]
async fn split_drop_fail_and_ports() {
    let (mut s, ports) = stage(serde_json::json!({ "module": guest("testbed"), "ports": ["odd"] }));
    assert_eq!(ports, 1);
    let mut batch = events(&[
        r#"{"op":"split","parts":[{"p":1},{"p":2},{"p":3}]}"#,
        r#"{"op":"drop"}"#,
        r#"{"op":"fail"}"#,
        r#"{"op":"odd","n":1}"#,
        r#"{"n":4}"#,
    ]);
    let (token, done) = conflux_api::AckToken::channel();
    batch[0].ack = token;
    batch[0].meta.insert("source", "test");
    let got = run(&mut *s, ports, batch).await;
    assert_eq!(texts(&got[0]), vec![r#"{"p":1}"#, r#"{"p":2}"#, r#"{"p":3}"#, r#"{"n":4,"via":"testbed"}"#]);
    assert!(got[0][..3].iter().all(|e| e.ack.is_tracked()), "split parts keep the source's acknowledgement");
    assert_eq!(got[0][0].meta.get("source").and_then(|v| v.as_str()), Some("test"), "metadata crosses both ways");
    assert_eq!(texts(&got[1]), vec![r#"{"op":"odd","n":1}"#]);
    assert_eq!(texts(&got[2]), vec![r#"{"op":"fail"}"#]);
    assert_eq!(reason(&got[2][0]), "asked to fail");
    drop(got);
    assert_eq!(done.await.unwrap(), AckStatus::Delivered);
}

#[tokio::test]
async fn undeclared_port_fails_the_event() {
    let (mut s, ports) = stage(serde_json::json!({ "module": guest("testbed") }));
    let got = run(&mut *s, ports, events(&[r#"{"op":"odd"}"#, r#"{"op":"keep"}"#])).await;
    assert_eq!(texts(&got[0]), vec![r#"{"op":"keep"}"#]);
    assert!(reason(&got[1][0]).contains("undeclared port `odd`"), "{}", reason(&got[1][0]));
}

/// A guest failure fails its whole batch to `error`, and the next batch runs on a fresh instance.
async fn fails_batch_then_recovers(op: &str, options: serde_json::Value, expect: &str) {
    let (mut s, ports) = stage(options);
    let started = Instant::now();
    let got = run(&mut *s, ports, events(&[r#"{"n":1}"#, &format!(r#"{{"op":"{op}"}}"#), r#"{"n":3}"#])).await;
    assert!(got[0].is_empty(), "nothing of a failed batch goes on");
    assert_eq!(got[1].len(), 3, "every event of the batch goes to `error`");
    assert!(reason(&got[1][0]).contains(expect), "reason: {}", reason(&got[1][0]));
    assert!(started.elapsed() < Duration::from_secs(10));
    let again = run(&mut *s, ports, events(&[r#"{"n":5}"#])).await;
    assert_eq!(texts(&again[0]), vec![r#"{"n":5,"via":"testbed"}"#], "a fresh instance serves the next batch");
}

#[tokio::test]
async fn guest_that_traps_fails_its_batch() {
    fails_batch_then_recovers("trap", serde_json::json!({ "module": guest("testbed") }), "trapped").await;
}

#[tokio::test]
async fn infinite_loop_is_cut_off_by_the_deadline() {
    let options = serde_json::json!({ "module": guest("testbed"), "timeout": "200ms" });
    fails_batch_then_recovers("spin", options, "ran longer than its 200ms limit").await;
}

#[tokio::test]
async fn memory_bomb_hits_the_cap() {
    let options = serde_json::json!({ "module": guest("testbed"), "max_memory": "16MiB" });
    fails_batch_then_recovers("bomb", options, "memory limit of 16777216 bytes").await;
}

#[tokio::test]
async fn filter_keeps_configured_types() {
    let options = serde_json::json!({ "module": guest("filter"), "config": { "types": ["booking_created"] } });
    let (mut s, ports) = stage(options);
    let got = run(
        &mut *s,
        ports,
        events(&[r#"{"type":"booking_created","id":1}"#, r#"{"type":"booking_cancelled","id":2}"#, r#"{"id":3}"#]),
    )
    .await;
    assert_eq!(texts(&got[0]), vec![r#"{"type":"booking_created","id":1}"#]);
    assert_eq!(got[1].len(), 1);
    assert!(reason(&got[1][0]).contains("no string `type`"));
}

#[tokio::test]
async fn mask_hashes_pii_and_enriches() {
    let options = serde_json::json!({ "module": guest("mask"), "config": { "salt": "s1" } });
    let (mut s, ports) = stage(options);
    let got = run(
        &mut *s,
        ports,
        events(&[
            r#"{"id":1,"data":{"userId":"u-7","guests":2}}"#,
            r#"{"id":2,"data":{"userId":"u-7","email":"a@b.c","guests":6}}"#,
        ]),
    )
    .await;
    assert_eq!(got[0].len(), 2);
    let first = &got[0][0].data;
    let user = first.pointer(["data", "userId"]).and_then(|v| v.as_str()).unwrap().to_string();
    assert!(user.starts_with("anon-") && user.len() == 21, "{user}");
    assert_eq!(got[0][1].data.pointer(["data", "userId"]).and_then(|v| v.as_str()), Some(user.as_str()));
    assert_ne!(got[0][1].data.pointer(["data", "email"]).and_then(|v| v.as_str()), Some("a@b.c"));
    assert_eq!(first.pointer(["data", "guestBand"]).and_then(|v| v.as_str()), Some("couple"));
    assert_eq!(got[0][1].data.pointer(["data", "guestBand"]).and_then(|v| v.as_str()), Some("group"));
    // A different salt gives a different pseudonym.
    let (mut other, _) = stage(serde_json::json!({ "module": guest("mask"), "config": { "salt": "s2" } }));
    let got = run(&mut *other, 0, events(&[r#"{"data":{"userId":"u-7"}}"#])).await;
    assert_ne!(got[0][0].data.pointer(["data", "userId"]).and_then(|v| v.as_str()), Some(user.as_str()));
}

#[test]
fn build_errors_point_at_the_option() {
    let missing = build(serde_json::json!({ "module": "/nonexistent/guest.wasm" })).err().unwrap();
    assert_eq!(missing.path, vec!["module"]);
    assert!(missing.message.contains("does not exist"), "{}", missing.message);

    let not_wasm = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_wasm.path(), b"not wasm").unwrap();
    let bad = build(serde_json::json!({ "module": not_wasm.path() })).err().unwrap();
    assert_eq!(bad.path, vec!["module"]);
    assert!(bad.message.contains("not a valid WebAssembly component"), "{}", bad.message);

    let refused =
        build(serde_json::json!({ "module": guest("testbed"), "config": { "init_fail": true } })).err().unwrap();
    assert_eq!(refused.path, vec!["config"]);
    assert!(refused.message.contains("asked to refuse init"), "{}", refused.message);

    let unknown = build(serde_json::json!({ "module": guest("identity"), "fuel": 1 })).err().unwrap();
    assert!(unknown.message.contains("unknown field"), "{}", unknown.message);

    let port = build(serde_json::json!({ "module": guest("identity"), "ports": ["a", "error"] })).err().unwrap();
    assert_eq!(port.path, vec!["ports", "1"]);
}

/// Replaces a file the way deployments should: write beside it, then rename.
fn swap_in(from: &str, to: &Path) {
    let staging = to.with_extension("staging");
    std::fs::copy(from, &staging).unwrap();
    std::fs::rename(&staging, to).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_loses_and_repeats_nothing() {
    conflux_testkit::link();
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("live.wasm");
    std::fs::copy(guest("identity"), &module).unwrap();
    let (src, sink) = ("swap-src", "swap-sink");
    // 600 batches, 20 ms apart: after the swap (at a fifth) the source still
    // runs for about ten seconds, time enough for a debug build to compile
    // the new module on a slow, busy machine (1 ms apart was not, in CI).
    const N: usize = 30_000;
    let yaml = format!(
        "inputs:
  src: {{ type: test_source, key: {src}, count: {N}, batch_size: 50, interval: 20ms }}
stages:
  live: {{ type: wasm, module: {}, reload_interval: 20ms, from: src }}
outputs:
  out: {{ type: test_sink, key: {sink}, from: live }}
",
        module.display()
    );
    let running = tokio::spawn(async move { run_yaml(&yaml, RunContext::new()).await });
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered(sink).len() < N / 5 {
        assert!(Instant::now() < deadline, "pipeline too slow to start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    swap_in(&guest("testbed"), &module);
    let report = running.await.unwrap();
    assert!(!report.failed && !report.forced);

    let out = delivered(sink);
    let mut seen: Vec<u64> = out.iter().map(|v| v["n"].as_u64().unwrap()).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..N as u64).collect::<Vec<_>>(), "every event exactly once");
    let swapped_at = out.iter().position(|v| v["via"] == "testbed").expect("the new module took over before the end");
    assert!(swapped_at > 0, "the old module served the first events");
    assert!(out[swapped_at..].iter().all(|v| v["via"] == "testbed"), "never back to the old module");
    assert_eq!(acks(src), vec![AckStatus::Delivered; N]);
}

/// The probe guest's answers, one JSON document per event of the default port.
fn answers(events: &[Event]) -> Vec<serde_json::Value> {
    events.iter().map(|e| serde_json::from_str(&sonic_rs::to_string(&e.data).unwrap()).unwrap()).collect()
}

fn probe(ops: &[serde_json::Value]) -> Vec<Event> {
    ops.iter().map(|op| Event::new(sonic_rs::from_str::<Value>(&op.to_string()).unwrap())).collect()
}

/// A folder with `hello.txt` in it.
fn lookup_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "hello from the host").unwrap();
    dir
}

#[tokio::test]
async fn without_dirs_the_guest_opens_no_file_and_no_socket() {
    let dir = lookup_dir();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let host_file = dir.path().join("hello.txt").display().to_string();
    let written = dir.path().join("written.txt").display().to_string();

    let (mut s, ports) = stage(serde_json::json!({ "module": guest("probe") }));
    let got = run(
        &mut *s,
        ports,
        probe(&[
            serde_json::json!({ "op": "read", "path": "/data/hello.txt" }),
            serde_json::json!({ "op": "read", "path": host_file }),
            serde_json::json!({ "op": "write", "path": written, "text": "x" }),
            serde_json::json!({ "op": "connect", "addr": addr }),
        ]),
    )
    .await;
    assert!(got[1].is_empty(), "the guest reports its errors itself: {:?}", texts(&got[1]));
    let said = answers(&got[0]);
    assert_eq!(said.len(), 4, "{said:?}");
    // No directory is preopened, so no path exists for the guest at all;
    // the socket is refused by the host (wasi `access-denied`).
    let kinds: Vec<(&serde_json::Value, &serde_json::Value)> = said.iter().map(|a| (&a["ok"], &a["kind"])).collect();
    assert_eq!(
        kinds,
        vec![
            (&false.into(), &"NotFound".into()),
            (&false.into(), &"NotFound".into()),
            (&false.into(), &"NotFound".into()),
            (&false.into(), &"PermissionDenied".into()),
        ],
        "{said:?}"
    );
    assert!(!dir.path().join("written.txt").exists(), "nothing written on the host");
    assert_eq!(
        listener.accept().err().map(|e| e.kind()),
        Some(std::io::ErrorKind::WouldBlock),
        "no connection reached the listener"
    );
    // The process and the instance survive: the next batch is served.
    let again = run(&mut *s, ports, probe(&[serde_json::json!({ "op": "count" })])).await;
    assert_eq!(answers(&again[0]), vec![serde_json::json!({ "events": 5 })]);
}

#[tokio::test]
async fn a_granted_directory_is_readable_and_read_only_by_default() {
    let dir = lookup_dir();
    let grant = |writable: bool| {
        serde_json::json!({ "module": guest("probe"),
            "dirs": [{ "host": dir.path(), "guest": "/data", "writable": writable }] })
    };
    let (mut s, ports) = stage(grant(false));
    let got = run(
        &mut *s,
        ports,
        probe(&[
            serde_json::json!({ "op": "read", "path": "/data/hello.txt" }),
            serde_json::json!({ "op": "write", "path": "/data/new.txt", "text": "x" }),
            serde_json::json!({ "op": "read", "path": "/data/../outside.txt" }),
            serde_json::json!({ "op": "connect", "addr": "127.0.0.1:9" }),
        ]),
    )
    .await;
    let said = answers(&got[0]);
    assert_eq!(said[0], serde_json::json!({ "ok": true, "text": "hello from the host" }));
    let refused = |answer: &serde_json::Value| answer["ok"] == false && answer["kind"] == "PermissionDenied";
    assert!(refused(&said[1]), "read-only grant: {said:?}");
    assert!(!dir.path().join("new.txt").exists());
    assert!(refused(&said[2]), "no way out of the granted folder: {said:?}");
    assert!(refused(&said[3]), "a directory grants no network: {said:?}");

    let (mut s, ports) = stage(grant(true));
    let got = run(
        &mut *s,
        ports,
        probe(&[serde_json::json!({ "op": "write", "path": "/data/new.txt", "text": "from the guest" })]),
    )
    .await;
    assert_eq!(answers(&got[0]), vec![serde_json::json!({ "ok": true })]);
    assert_eq!(std::fs::read_to_string(dir.path().join("new.txt")).unwrap(), "from the guest");
}

#[tokio::test]
async fn instances_are_reused_across_batches_until_one_fails() {
    let (mut s, ports) = stage(serde_json::json!({ "module": guest("probe") }));
    let count = || serde_json::json!({ "op": "count" });
    let events_seen =
        |got: &[Vec<Event>]| -> Vec<u64> { answers(&got[0]).iter().map(|a| a["events"].as_u64().unwrap()).collect() };
    let got = run(&mut *s, ports, probe(&[count(), count()])).await;
    assert_eq!(events_seen(&got), vec![1, 2]);
    for expected in 3..6 {
        let got = run(&mut *s, ports, probe(&[count()])).await;
        assert_eq!(events_seen(&got), vec![expected], "one instance serves batch after batch");
    }
    // A refused event keeps the instance; a trap replaces it.
    let got = run(&mut *s, ports, probe(&[serde_json::json!({ "op": "nonsense" }), count()])).await;
    assert_eq!(events_seen(&got), vec![7]);
    assert!(reason(&got[1][0]).contains("unknown op"), "{}", reason(&got[1][0]));
    let got = run(&mut *s, ports, probe(&[count(), serde_json::json!({ "op": "trap" })])).await;
    assert!(got[0].is_empty() && got[1].len() == 2, "the trap fails the batch");
    let got = run(&mut *s, ports, probe(&[count()])).await;
    assert_eq!(events_seen(&got), vec![1], "a fresh instance after the trap");
}
