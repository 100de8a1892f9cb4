//! The `conflux` command as a user runs it.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

fn conflux() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_conflux"));
    cmd.env("CONFLUX_LOG", "warn");
    cmd
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn lint_prints_every_mistake_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "broken.yaml",
        "inputs:
  gen: { type: generate, count: 10, speed: 3 }
  other: { type: generat }
outputs:
  out: { type: stdot, from: gen }
  out2: { type: file, from: [gen, nowhere] }
",
    );
    let output = conflux().arg("lint").arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let f = file.display();
    for expected in [
        format!("{f}:2:37: input `gen`: unknown field `speed`"),
        format!("{f}:3:18: unknown input type `generat`"),
        format!("{f}:5:16: unknown output type `stdot` (did you mean `stdout`?)"),
        format!("{f}:6:3: output `out2`: missing field `path`"),
        format!("{f}:6:35: `out2` reads from `nowhere`"),
        "5 problems found".to_string(),
    ] {
        assert!(stderr.contains(&expected), "missing `{expected}` in:\n{stderr}");
    }
}

#[test]
fn lint_accepts_the_shipped_configs() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs");
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let output = conflux().arg("lint").arg(&path).output().unwrap();
            assert!(output.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&output.stderr));
        }
    }
}

#[test]
fn quickstart_runs_on_embedded_defaults_and_ends() {
    let quickstart = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/quickstart.yaml");
    let output = conflux()
        .args(["run", quickstart])
        .env("QUICKSTART_EVENTS", "300")
        .env("QUICKSTART_RATE", "2000/s")
        .env("CONFLUX_ADMIN", "127.0.0.1:0")
        .env("CONFLUX_LIVE", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("dashboard: http://127.0.0.1:"), "the page's URL is printed: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let finals: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["final"] == true)
        .collect();
    assert!(!finals.is_empty(), "{stdout}");
    let restaurants: std::collections::BTreeSet<&str> =
        finals.iter().map(|e| e["data"]["restaurantId"].as_str().unwrap()).collect();
    assert_eq!(restaurants.len(), 3, "{stdout}");
    let bookings: u64 = finals.iter().map(|e| e["bookings"].as_u64().unwrap()).sum();
    let cancelled: u64 = finals.iter().map(|e| e["cancelled"].as_u64().unwrap()).sum();
    assert!(bookings > 0 && bookings + cancelled <= 300, "{stdout}");
    assert!(finals.iter().all(|e| e["window"]["start"].is_string() && e["users"].as_u64().unwrap() > 0));
}

#[test]
fn file_to_file_with_env_and_invalid_lines() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "in.ndjson", "{\"n\":1}\nnot json\n{\"n\":2}\n");
    let pipeline = write(
        &dir,
        "p.yaml",
        "inputs:
  src: { type: file, path: in.ndjson }
outputs:
  out: { type: file, path: \"${OUT_NAME}.ndjson\", from: src }
  rejects: { type: file, path: rejects.ndjson, from: src.invalid }
",
    );
    let output = conflux().arg("run").arg(&pipeline).env("OUT_NAME", "result").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let result = std::fs::read_to_string(dir.path().join("result.ndjson")).unwrap();
    assert_eq!(result, "{\"n\":1}\n{\"n\":2}\n");
    let rejects = std::fs::read_to_string(dir.path().join("rejects.ndjson")).unwrap();
    assert_eq!(rejects, "\"not json\"\n");
}

#[test]
fn stdin_to_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline =
        write(&dir, "p.yaml", "inputs:\n  in: { type: stdin }\noutputs:\n  out: { type: stdout, from: in }\n");
    let mut child = conflux().arg("run").arg(&pipeline).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"{\"a\":1}\n{\"a\":2}\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), "{\"a\":1}\n{\"a\":2}\n");
}

#[test]
fn sigterm_drains_in_flight_events_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write(
        &dir,
        "p.yaml",
        "inputs:
  gen: { type: generate, profile: counter, rate: 2000/s }
outputs:
  out: { type: file, path: out.ndjson, from: gen }
  slow: { type: drop, delay: 20ms, from: gen }
",
    );
    let child = conflux().arg("run").arg(&pipeline).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let written = std::fs::read_to_string(dir.path().join("out.ndjson")).unwrap();
    let ns: Vec<u64> =
        written.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["n"].as_u64().unwrap()).collect();
    assert!(ns.len() > 100, "only {} events written", ns.len());
    assert_eq!(ns, (0..ns.len() as u64).collect::<Vec<_>>(), "events lost or reordered");
}

#[test]
fn conflux_test_passes_and_fails_with_a_diff() {
    let cases = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/cases");
    let output = conflux().args(["test", &format!("{cases}/passing.yaml")]).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("3 passed, 0 failed"), "{stdout}");

    let output = conflux().args(["test", &format!("{cases}/failing.yaml")]).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("expected 5 events, got 3"), "{stdout}");
    assert!(stdout.contains("-     \"n\": 9"), "{stdout}");
    assert!(stdout.contains("no event contains {\"n\":42}"), "{stdout}");
    assert!(stdout.contains("0 passed, 1 failed"), "{stdout}");
}

#[test]
fn conflux_test_runs_the_rhai_cases() {
    let cases = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/cases/rhai.yaml");
    let output = conflux().args(["test", cases]).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("6 passed, 0 failed"), "{stdout}");
}

#[test]
fn conflux_test_runs_the_analytics_scenarios() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    // Every shipped pipeline, and the scenario cases.
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(format!("{root}/configs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files.push(format!("{root}/tests/cases/clickstream.yaml").into());
    files.push(format!("{root}/tests/cases/booking.yaml").into());
    let output = conflux().arg("test").args(&files).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    // Each file declares at least one test.
    let summary = stdout.lines().last().unwrap_or_default();
    let passed: usize = summary.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(summary.ends_with("passed, 0 failed") && passed >= files.len(), "{stdout}");
}

#[test]
fn conflux_test_keeps_checkpoints_away_from_the_pipelines_state() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "p.yaml",
        "name: counted
runtime: { data_dir: state }
inputs:
  gen: { type: generate, profile: counter, count: 1 }
stages:
  per_second:
    type: aggregate
    from: gen
    window: { tumbling: 1s }
    checkpoint: { interval: 100ms }
    metrics: { events: { count: {} } }
outputs:
  out: { type: drop, from: per_second }
tests:
  - name: one event
    input: [{ at: gen, events: [{ n: 1 }] }]
    expect: [{ at: out, count: 1 }]
",
    );
    for _ in 0..2 {
        let output = conflux().arg("test").arg(&file).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    }
    // A running pipeline's snapshots live there: a test must neither read nor write them.
    assert!(!dir.path().join("state").exists(), "conflux test wrote into the pipeline's data_dir");
}

#[test]
fn lint_points_inside_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "p.yaml",
        "inputs:
  gen: { type: generate }
stages:
  clean:
    type: rhai
    from: gen
    script: |
      let a = 1;
      let b = ;
      event
  keep: { type: filter, from: clean, condition: \"event.n >\" }
outputs:
  out: { type: drop, from: keep }
",
    );
    let output = conflux().arg("lint").arg(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let f = file.display();
    assert!(stderr.contains(&format!("{f}:9:15: stage `clean`: script does not compile")), "{stderr}");
    assert!(
        stderr.contains(&format!("{f}:11:")) && stderr.contains("stage `keep`: script does not compile"),
        "{stderr}"
    );
}

#[test]
fn graph_plugins_and_schema_commands() {
    let quickstart = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/quickstart.yaml");
    let graph = conflux().args(["graph", quickstart]).output().unwrap();
    let text = String::from_utf8_lossy(&graph.stdout);
    assert!(text.starts_with("flowchart LR") && text.contains("per_minute --> console"), "{text}");
    let dot = conflux().args(["graph", "--format", "dot", quickstart]).output().unwrap();
    assert!(String::from_utf8_lossy(&dot.stdout).contains("\"bookings\" -> \"private\""));

    let plugins = conflux().arg("plugins").output().unwrap();
    let text = String::from_utf8_lossy(&plugins.stdout);
    for name in ["generate", "stdin", "file", "stdout", "drop"] {
        assert!(text.contains(name), "{name} missing from `conflux plugins`:\n{text}");
    }
    assert!(text.contains("rate") && text.contains("(required)"), "{text}");

    let help = conflux().args(["run", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--admin"));
    let bad = conflux().args(["run"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2), "usage errors exit 2");
    let missing = conflux().args(["run", "/nonexistent/p.yaml"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("cannot read the pipeline file: /nonexistent/p.yaml does not exist"));
}

/// Runs the binary under a 4 GB address-space limit and a deadline, so a
/// regression (unbounded memory, a read that never ends) fails the test
/// instead of the machine: (exit code, stdout, stderr); `None` when killed.
fn bounded(args: &[&str], env: &[(&str, &str)], deadline: Duration) -> (Option<i32>, String, String) {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg("ulimit -v 4000000; exec \"$0\" \"$@\"").arg(env!("CARGO_BIN_EXE_conflux")).args(args);
    cmd.env("CONFLUX_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let timed_out = started.elapsed() > deadline;
    let code = if timed_out { None } else { output.status.code() };
    (code, String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn lint_refuses_a_billion_laughs() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for (name, prev) in ["b", "c", "d", "e", "f", "g", "h", "i"].iter().zip(["a", "b", "c", "d", "e", "f", "g", "h"]) {
        let refs = vec![format!("*{prev}"); 9].join(",");
        text.push_str(&format!("{name}: &{name} [{refs}]\n"));
    }
    let file = write(&dir, "laughs.yaml", &text);
    let (code, _, stderr) = bounded(&["lint", file.to_str().unwrap()], &[], Duration::from_secs(60));
    assert_eq!(code, Some(1), "{stderr}");
    // f's first `*e` passes 100,000 nodes made through aliases.
    assert!(stderr.contains(&format!("{}:6:", file.display())), "{stderr}");
    assert!(stderr.contains("alias") && stderr.contains("100000"), "{stderr}");
}

#[test]
fn lint_refuses_devices_fifos_and_device_schemas_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.yaml");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let schema = write(
        &dir,
        "schema.yaml",
        "inputs:\n  gen: { type: generate }\nstages:\n  check: { type: validate, from: gen, schema: /dev/zero }\noutputs:\n  out: { type: drop, from: check }\n",
    );
    for (path, named) in [
        ("/dev/zero", "/dev/zero"),
        (fifo.to_str().unwrap(), fifo.to_str().unwrap()),
        (schema.to_str().unwrap(), "/dev/zero"),
    ] {
        let (code, _, stderr) = bounded(&["lint", path], &[], Duration::from_secs(20));
        assert_eq!(code, Some(1), "lint {path} did not end with an error: {stderr}");
        assert!(stderr.contains(named) && stderr.contains("not a regular file"), "{path}: {stderr}");
    }
}

#[test]
fn lint_never_echoes_option_values() {
    let secret = "s3cr3t-Value-0123456789x";
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "p.yaml",
        "inputs:
  gen: { type: generate, count: \"${SECRET}\" }
  web: { type: http_server, address: \"127.0.0.1:0\", auth: { api_keys: { keys: \"${SECRET}\" } } }
outputs:
  out: { type: drop, from: [gen, web], delay: \"${SECRET}\" }
",
    );
    let output = conflux().arg("lint").arg(&file).env("SECRET", secret).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stdout.contains("s3cr3t") && !stderr.contains("s3cr3t"), "the secret leaked:\n{stdout}\n{stderr}");
    assert!(stderr.contains("3 problems found"), "{stderr}");
    assert!(stderr.contains("a string of 24 characters"), "{stderr}");
}

#[test]
fn lint_hints_to_quote_interpolation_in_flow_maps() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "p.yaml",
        "inputs:\n  gen: { type: generate, count: ${N:-3} }\noutputs:\n  out: { type: drop, from: gen }\n",
    );
    let output = conflux().arg("lint").arg(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("YAML syntax error"), "{stderr}");
    assert!(stderr.contains("\"${N:-3}\"") && stderr.contains("block style"), "{stderr}");
}

#[test]
fn lint_says_a_missing_file_does_not_exist() {
    let output = conflux().args(["lint", "/nonexistent/p.yaml"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/p.yaml does not exist"), "{stderr}");
    assert!(!stderr.contains(":0:0"), "{stderr}");
}

#[test]
fn plugins_into_a_closed_pipe_ends_quietly() {
    use std::io::Read;
    for (args, read) in [(vec!["plugins"], 0), (vec!["plugins", "--json"], 16)] {
        let mut child = conflux().args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut head = vec![0u8; read];
        stdout.read_exact(&mut head).unwrap();
        drop(stdout);
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(matches!(output.status.code(), Some(0) | Some(141)), "{args:?}: {:?} {stderr}", output.status);
    }
}

#[test]
fn logs_are_plain_when_stderr_is_not_a_terminal_and_test_prints_only_results() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "p.yaml",
        "inputs:\n  gen: { type: generate, count: 3 }\noutputs:\n  out: { type: drop, from: gen }\n",
    );
    let output = conflux().arg("run").arg(&file).env("CONFLUX_LOG", "info").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && stderr.contains("pipeline finished"), "{stderr}");
    assert!(!stderr.contains("\x1b["), "colour codes in a captured stderr: {stderr:?}");

    let cases = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/cases/passing.yaml");
    let output =
        Command::new(env!("CARGO_BIN_EXE_conflux")).args(["test", cases]).env_remove("CONFLUX_LOG").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.is_empty(), "`conflux test` logged without being asked: {stderr}");
}

#[test]
fn lint_reports_config_errors_cycles_and_ports_together() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "p.yaml",
        "inputs:
  gen: { type: file, path: in.ndjson }
stages:
  broken: { type: filter, from: gen.nope, condition: \"${UNSET_CONDITION}\" }
  a: { type: filter, from: [gen, b], condition: \"true\" }
  b: { type: filter, from: a, condition: \"true\" }
outputs:
  out: { type: drop, from: [broken, b] }
",
    );
    let output = conflux().arg("lint").arg(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let f = file.display();
    assert!(stderr.contains(&format!("{f}:4:")) && stderr.contains("UNSET_CONDITION"), "{stderr}");
    assert!(stderr.contains("`gen` has no port `nope`"), "{stderr}");
    assert!(stderr.contains("cycle:"), "{stderr}");
}

#[test]
fn unwired_port_warnings_name_the_port() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "in.ndjson", "{\"n\":1}\nnot json\n");
    let file = write(
        &dir,
        "p.yaml",
        "inputs:\n  src: { type: file, path: in.ndjson }\noutputs:\n  out: { type: drop, from: src }\n",
    );
    let output = conflux().arg("run").arg(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unwired port"), "{stderr}");
    assert!(stderr.contains("port=invalid") && !stderr.contains("port=1"), "{stderr}");
}
