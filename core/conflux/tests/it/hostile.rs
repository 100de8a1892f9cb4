//! The real binary against hostile input: every body here once crashed the
//! process or altered an accepted event. Each test checks the refusal and
//! that the process goes on serving.

use std::time::Duration;

use serde_json::Value;

use crate::{free_addr, start_conflux, wait_listening, Conflux};

/// A `conflux run` of `yaml` (where `{addr}` is a free loopback address)
/// in a temporary folder, listening.
pub struct Served {
    pub dir: tempfile::TempDir,
    pub addr: std::net::SocketAddr,
    pub process: Conflux,
}

impl Served {
    pub async fn start(yaml: &str) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_addr();
        let pipeline = dir.path().join("p.yaml");
        std::fs::write(&pipeline, yaml.replace("{addr}", &addr.to_string())).unwrap();
        let process = start_conflux(&pipeline);
        wait_listening(addr).await;
        Served { dir, addr, process }
    }

    pub fn alive(&mut self) -> bool {
        self.process.0.try_wait().unwrap().is_none()
    }

    /// The lines the pipeline wrote to `name` in its folder.
    pub fn lines(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default().lines().map(str::to_string).collect()
    }

    /// Waits until `name` has `n` lines (10 s at most) and returns them.
    pub async fn wait_lines(&self, name: &str, n: usize) -> Vec<String> {
        for _ in 0..1000 {
            if self.lines(name).len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.lines(name)
    }
}

/// `conflux run` of a pipeline file until it ends by itself.
fn run_to_end(pipeline: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_conflux"))
        .env("CONFLUX_LOG", "warn")
        .arg("run")
        .arg(pipeline)
        .output()
        .unwrap()
}

pub async fn post(addr: std::net::SocketAddr, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/"))
        .header("content-type", content_type)
        .timeout(Duration::from_secs(10))
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("no answer: {e}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

const HTTP_TO_FILE: &str = "inputs:
  api: { type: http_server, address: \"{addr}\", ack: sync }
outputs:
  out: { type: file, path: out.ndjson, from: api }
";

#[tokio::test]
async fn deep_nesting_is_refused_over_http_and_the_process_keeps_serving() {
    let mut served = Served::start(HTTP_TO_FILE).await;
    let deep = "[".repeat(10_000);
    let bodies = [
        ("application/json", deep.clone()),
        ("application/json", format!(r#"{{"ok":true,"data":{{"x":{deep}}}}}"#)),
        ("application/json", format!(r#"[{{"a":1}},{{"b":{deep}}}]"#)),
        ("application/x-ndjson", format!("{{\"a\":1}}\n{{\"b\":{deep}}}\n")),
    ];
    for (content_type, body) in bodies {
        let (status, answer) = post(served.addr, content_type, body.into_bytes()).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer.to_string().contains("nested deeper than 128 levels"), "the limit is named: {answer}");
        assert!(served.alive(), "conflux died on a deep body");
    }
    let (status, answer) = post(served.addr, "application/json", br#"{"n":1}"#.to_vec()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(served.wait_lines("out.ndjson", 1).await, vec![r#"{"n":1}"#]);
}

#[tokio::test]
async fn deep_nesting_is_refused_over_websocket() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut served = Served::start(
        "inputs:
  ws: { type: websocket_server, address: \"{addr}\", ack: sync }
outputs:
  out: { type: file, path: out.ndjson, from: ws }
",
    )
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", served.addr)).await.unwrap();
    for text in [format!(r#"{{"x":{}}}"#, "[".repeat(10_000)), r#"{"n":2}"#.to_string()] {
        ws.send(Message::Text(text.into())).await.unwrap();
    }
    let mut replies = Vec::new();
    while replies.len() < 2 {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => replies.push(serde_json::from_str::<Value>(&t).unwrap()),
            other => panic!("no reply: {other:?}"),
        }
    }
    assert_eq!(replies[0]["status"], 400, "{replies:?}");
    assert!(replies[0]["error"].to_string().contains("nested deeper"), "{replies:?}");
    assert_eq!(replies[1]["status"], 200, "{replies:?}");
    assert!(served.alive());
    assert_eq!(served.wait_lines("out.ndjson", 1).await, vec![r#"{"n":2}"#]);
}

/// A line of a file input deeper than the limit goes to `invalid`; the next
/// line is delivered. A lower limit set in `runtime` applies.
#[test]
fn deep_lines_of_a_file_go_to_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let deep = "[".repeat(100_000);
    std::fs::write(dir.path().join("in.ndjson"), format!("{{\"a\":[[[1]]]}}\n{deep}\n{{\"b\":[[1]]}}\n")).unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "runtime: { max_json_depth: 3 }
inputs:
  src: { type: file, path: in.ndjson }
outputs:
  out: { type: file, path: out.ndjson, from: src }
  bad: { type: file, path: bad.ndjson, from: src.invalid }
",
    )
    .unwrap();
    let output = run_to_end(&dir.path().join("p.yaml"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let out = std::fs::read_to_string(dir.path().join("out.ndjson")).unwrap();
    assert_eq!(out, "{\"b\":[[1]]}\n", "three levels pass, four do not");
    let bad = std::fs::read_to_string(dir.path().join("bad.ndjson")).unwrap();
    assert_eq!(bad.lines().count(), 2, "{}", &bad[..bad.len().min(300)]);
}

/// Numbers leave as they came or are refused, naming the field: never rounded.
#[tokio::test]
async fn numbers_are_kept_exactly_or_refused_naming_the_field() {
    let served = Served::start(HTTP_TO_FILE).await;
    let hundred = "1".repeat(100);
    for (body, field) in [
        (r#"{"id":1,"big":18446744073709551616}"#.to_string(), "big"),
        (format!(r#"{{"data":{{"n":{hundred}}}}}"#), "data.n"),
        (r#"[{"ok":1},{"tiny":1e-400}]"#.to_string(), "tiny"),
        (r#"{"x":{"y":[0.1234567890123456789]}}"#.to_string(), "x.y[0]"),
    ] {
        let (status, answer) = post(served.addr, "application/json", body.into_bytes()).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer.to_string().contains(&format!("`{field}`")), "names {field}: {answer}");
    }
    // Numbers that a double or a 64-bit integer holds come out with their value.
    let (status, answer) = post(
        served.addr,
        "application/json",
        br#"{"u":18446744073709551615,"i":-9223372036854775808,"f":0.1,"e":2.5e-300,"g":129.5}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let lines = served.wait_lines("out.ndjson", 1).await;
    assert_eq!(lines.len(), 1, "only the exact body was accepted: {lines:?}");
    // Compared as text with Python's reading of the same numbers: decimal
    // module equality, so a rounded double would show.
    let script = "import sys, json, decimal\nout = json.loads(sys.argv[1], parse_float=decimal.Decimal)\n\
                  want = json.loads(sys.argv[2], parse_float=decimal.Decimal)\nprint(out == want)";
    let verdict = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &lines[0],
            r#"{"u":18446744073709551615,"i":-9223372036854775808,"f":0.1,"e":2.5e-300,"g":129.5}"#,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&verdict.stdout).trim(), "True", "{}", lines[0]);
}

/// A followed file whose writer appends each line in two writes 150 ms
/// apart: every line arrives whole (they all went to `invalid` before).
/// Then the file is rotated (renamed, a new one created) and truncated in
/// place, as logrotate does: `tail -F` semantics, nothing lost.
#[tokio::test]
async fn a_followed_file_holds_half_written_lines_and_survives_rotation_and_truncation() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    std::fs::write(&log, "").unwrap();
    let pipeline = dir.path().join("p.yaml");
    std::fs::write(
        &pipeline,
        "inputs:
  src: { type: file, path: app.log, follow: true, poll_interval: 20ms }
outputs:
  out: { type: file, path: out.ndjson, from: src }
  bad: { type: file, path: bad.ndjson, from: src.invalid }
",
    )
    .unwrap();
    let _process = start_conflux(&pipeline);
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    let wait_for = |n: usize| async move {
        for _ in 0..500 {
            if read("out.ndjson").lines().count() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let mut expected = Vec::new();
    {
        let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        for i in 0..20 {
            let line = format!(r#"{{"n":{i},"text":"half and half"}}"#);
            let (a, b) = line.split_at(line.len() / 2);
            file.write_all(a.as_bytes()).unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
            file.write_all(format!("{b}\n").as_bytes()).unwrap();
            expected.push(line);
        }
    }
    wait_for(20).await;
    // Rotation: the old file gets one more line after the rename, then a new file appears.
    let mut old = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::fs::rename(&log, dir.path().join("app.log.1")).unwrap();
    writeln!(old, r#"{{"n":20}}"#).unwrap();
    expected.push(r#"{"n":20}"#.into());
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&log, "{\"n\":21}\n{\"n\":22}\n").unwrap();
    expected.extend([r#"{"n":21}"#.into(), r#"{"n":22}"#.into()]);
    wait_for(23).await;
    // Truncation in place (copytruncate), then shorter content.
    std::fs::write(&log, "{\"n\":23}\n").unwrap();
    expected.push(r#"{"n":23}"#.into());
    wait_for(24).await;
    let got: Vec<String> = read("out.ndjson").lines().map(str::to_string).collect();
    assert_eq!(got, expected);
    assert_eq!(read("bad.ndjson"), "", "no line was split");
}

/// A missing input file (not followed) is a start error naming the path, not a retry loop.
#[test]
fn a_missing_input_file_is_a_start_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "inputs:\n  src: { type: file, path: nowhere.ndjson }\noutputs:\n  out: { type: drop, from: src }\n",
    )
    .unwrap();
    let started = std::time::Instant::now();
    let output = run_to_end(&dir.path().join("p.yaml"));
    assert!(!output.status.success());
    assert!(started.elapsed() < Duration::from_secs(5), "it failed at once");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nowhere.ndjson") && stderr.contains("does not exist"), "{stderr}");
    assert_eq!(stderr.matches("connect failed").count(), 0, "no retries: {stderr}");
}

/// `retry.max_attempts` bounds connect attempts: an output that can never
/// connect fails its events back, so `ack: sync` answers 502 at once, not
/// after `ack_timeout`; the next request tries again.
#[tokio::test]
async fn an_output_that_cannot_connect_fails_requests_promptly() {
    let served = Served::start(
        "inputs:
  api: { type: http_server, address: \"{addr}\", ack: sync, ack_timeout: 30s }
outputs:
  out:
    type: file
    path: p.yaml/out.ndjson   # under a file: no folder can be made there
    from: api
    retry: { max_attempts: 2, initial_backoff: 10ms }
",
    )
    .await;
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let (status, answer) = post(served.addr, "application/json", br#"{"n":1}"#.to_vec()).await;
        assert_eq!(status, 502, "{answer}");
        assert!(started.elapsed() < Duration::from_secs(5), "answered promptly");
    }
}

/// Slowloris: 2,000 connections that never finish their headers or their
/// chunked bodies, from one client, while normal POSTs keep getting
/// answered in under a second (1,100 such connections starved them before).
/// Then the stalled ones are closed by the header and body timeouts.
#[tokio::test]
async fn stalled_connections_do_not_starve_normal_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let served = Served::start(
        "inputs:
  api:
    type: http_server
    address: \"{addr}\"
    connections: { header_timeout: 3s, body_timeout: 3s }
outputs:
  out: { type: drop, from: api }
",
    )
    .await;
    let mut stalled = Vec::new();
    for i in 0..2000 {
        let mut stream = tokio::net::TcpStream::connect(served.addr).await.expect("connect");
        let part: &[u8] = if i % 2 == 0 {
            b"POST / HTTP/1.1\r\nHost: x\r\nX-Slow: "
        } else {
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":"
        };
        stream.write_all(part).await.unwrap();
        stalled.push(stream);
    }
    for _ in 0..10 {
        let started = std::time::Instant::now();
        let (status, answer) = post(served.addr, "application/json", br#"{"n":1}"#.to_vec()).await;
        assert_eq!(status, 202, "{answer}");
        assert!(started.elapsed() < Duration::from_secs(1), "answered in {:?}", started.elapsed());
    }
    // Past the timeouts every stalled connection has been answered or closed.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut closed = 0;
    let mut timed_out_bodies = 0;
    for stream in &mut stalled {
        let mut answer = Vec::new();
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await {
            closed += 1;
            timed_out_bodies += usize::from(answer.starts_with(b"HTTP/1.1 408"));
        }
    }
    assert_eq!(closed, 2000, "every stalled connection was closed");
    assert_eq!(timed_out_bodies, 1000, "each stalled body was answered 408");
}

/// Past `max_connections` a connection is answered 503 at once; an idle
/// keep-alive connection is closed after `idle_timeout`.
#[tokio::test]
async fn the_connection_limit_answers_at_once_and_idle_connections_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let served = Served::start(
        "inputs:
  api:
    type: http_server
    address: \"{addr}\"
    connections: { max_connections: 3, idle_timeout: 1s }
outputs:
  out: { type: drop, from: api }
",
    )
    .await;
    // wait_listening's probe connections may still hold places: let them go.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(served.addr).await.unwrap();
        let request =
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"n\":1}";
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 202");
        held.push(stream);
    }
    let started = std::time::Instant::now();
    let mut extra = tokio::net::TcpStream::connect(served.addr).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 503"), "{}", String::from_utf8_lossy(&answer));
    assert!(String::from_utf8_lossy(&answer).contains("Retry-After: 1"));
    assert!(started.elapsed() < Duration::from_secs(1));
    // The three kept-alive connections fall idle and are closed, which frees their places.
    for stream in &mut held {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(_))), "closed when idle");
    }
    let (status, _) = post(served.addr, "application/json", br#"{"n":2}"#.to_vec()).await;
    assert_eq!(status, 202);
}

/// Memory in flight is bounded in bytes: with an output that cannot write,
/// accepted bodies stay in the pipeline, and past `max_queue_bytes` a
/// request gets 503 with Retry-After instead of more memory.
#[tokio::test]
async fn bytes_in_flight_are_bounded_by_max_queue_bytes() {
    let served = Served::start(
        "inputs:
  api: { type: http_server, address: \"{addr}\", max_queue_bytes: 2KiB }
outputs:
  out: { type: file, path: p.yaml/out.ndjson, from: api }   # can never open: events stay in flight
",
    )
    .await;
    let body = format!(r#"{{"pad":"{}"}}"#, "x".repeat(900)).into_bytes();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(post(served.addr, "application/json", body.clone()).await.0);
    }
    assert_eq!(statuses, vec![202, 202, 503, 503], "two 910-byte bodies fit in 2 KiB, a third does not");
    let response = reqwest::Client::new()
        .post(format!("http://{}/", served.addr))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(response.text().await.unwrap().contains("max_queue_bytes"));
}

/// At debug and trace, in both log formats, no secret of the pipeline
/// reaches the logs: async-nats logged the password of a
/// `nats://user:password@…` URL (in its Url's Debug) before.
#[test]
fn secrets_never_reach_the_logs_at_debug_or_trace() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let pipeline = dir.path().join("p.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "inputs:
  bus: {{ type: nats, url: \"nats://app:Sup3rS3cretPw@127.0.0.1:4222\", subjects: [secrets.in] }}
  api: {{ type: http_server, address: \"{addr}\", auth: {{ api_keys: {{ keys: [\"${{API_KEY}}\"] }} }} }}
stages:
  counted:
    type: aggregate
    from: [bus, api]
    window: {{ tumbling: 1m }}
    metrics: {{ n: {{ count: {{}} }} }}
    checkpoint: {{ redis: \"redis://:R3disS3cretPw@127.0.0.1:6379/0\" }}
outputs:
  out: {{ type: nats, url: \"nats://app:Sup3rS3cretPw@127.0.0.1:4222\", subject: secrets.out, from: counted }}
"
        ),
    )
    .unwrap();
    for (level, format) in [("debug", "human"), ("trace", "human"), ("debug", "json"), ("trace", "json")] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_conflux"))
            .args(["--log-level", level, "--log-format", format, "run"])
            .arg(&pipeline)
            .env("API_KEY", "K3yS3cretFromEnv")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        // A request with the key and one with a wrong one, so auth paths log too.
        let _ = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-H",
                "x-api-key: K3yS3cretFromEnv",
                "-H",
                "content-type: application/json",
            ])
            .args(["-d", "{\"n\":1}", &format!("http://{addr}/")])
            .status();
        std::thread::sleep(Duration::from_millis(500));
        let _ = child.kill();
        let output = child.wait_with_output().unwrap();
        let logs = String::from_utf8_lossy(&output.stderr);
        assert!(logs.lines().count() > 5, "{level}/{format}: the run logged: {logs}");
        for secret in ["Sup3rS3cretPw", "R3disS3cretPw", "K3yS3cretFromEnv"] {
            let at = logs.find(secret).map(|i| &logs[i.saturating_sub(200)..(i + 40).min(logs.len())]);
            assert!(at.is_none(), "{level}/{format} logged {secret}: …{}…", at.unwrap_or_default());
        }
    }
}

/// A Rhai runtime error names the pipeline file's line and column (it
/// named `line 2, position 13` inside the script), and a `file:` script's
/// error names that file.
#[test]
fn rhai_runtime_errors_point_into_the_pipeline_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.ndjson"), "{\"n\":1}\n").unwrap();
    std::fs::write(dir.path().join("bad.rhai"), "let x = 1;\nlet y = no_such_fn(x);\nevent\n").unwrap();
    let pipeline = dir.path().join("p.yaml");
    std::fs::write(
        &pipeline,
        "inputs:
  src: { type: file, path: in.ndjson }
stages:
  inline:
    type: rhai
    from: src
    script: |
      let x = 1;
      let y = no_such_fn(x);
      event
  from_file: { type: rhai, from: src, file: bad.rhai }
  why:
    type: rhai
    from: [inline.error, from_file.error]
    script: |
      event.why = meta.error;
      event
outputs:
  out: { type: file, path: out.ndjson, from: why }
  rest: { type: drop, from: [inline, from_file] }
",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_conflux"))
        .env("CONFLUX_LOG", "warn")
        .arg("run")
        .arg(&pipeline)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let out = std::fs::read_to_string(dir.path().join("out.ndjson")).unwrap();
    let file = pipeline.display().to_string();
    // Line 9 of p.yaml, column 15: where `no_such_fn` starts ("      let y = " is 14 characters).
    assert!(out.contains(&format!("at {file}:9:15")), "{out}");
    assert!(out.contains(&format!("at {}:2:9", dir.path().join("bad.rhai").display())), "{out}");
    assert!(!out.contains("position"), "no script-relative position left: {out}");
}
