//! End-to-end tests across crates: one binary keeps link times down.

mod broadcast;
mod checkpoint;
mod cli;
mod conformance;
mod crash;
mod dashboard;
mod deploy;
mod engine;
mod generated;
mod hostile;
mod http;
mod kafka;
mod nats;
mod outage;
mod outputs;
mod postgres_output;
mod redis_input;
mod redis_output;
mod scenarios;
mod timescale;
mod validation;
mod wasm;

/// Registers the test components and the built-in plugins.
pub fn setup() {
    conflux_testkit::link();
    conflux_std::link();
    conflux_wasm::link();
    conflux_rhai::link();
    conflux_http::link();
    conflux_validate::link();
    conflux_nats::link();
    conflux_kafka::link();
    conflux_aggregate::link();
    conflux_redis::link();
    conflux_postgres::link();
    conflux_broadcast::link();
}

/// A unique key per test and run, so parallel tests keep their testkit state
/// apart and a broker left running by an earlier run holds no stale topic.
pub fn key(name: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{name}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A minimal HTTP/1.1 GET against loopback: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to admin server");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// [`http_get`]'s answer, or `None` while nothing listens at `addr`.
pub async fn http_get_maybe(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    tokio::net::TcpStream::connect(addr).await.ok()?;
    Some(http_get(addr, path).await)
}

/// Waits until an admin server (perhaps still starting) answers `/ready`
/// with `status`; its body. Fails the test after `within`.
pub async fn wait_ready(admin: std::net::SocketAddr, status: u16, within: std::time::Duration) -> String {
    let started = std::time::Instant::now();
    loop {
        match http_get_maybe(admin, "/ready").await {
            Some((got, body)) if got == status => return body,
            other => assert!(started.elapsed() < within, "/ready was {other:?} (wanted {status}) for {within:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The admin server (`/health`, `/ready`, `/metrics`) of a run context, on a free port.
pub struct AdminServer {
    pub addr: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl AdminServer {
    pub async fn start(cx: &conflux_engine::runtime::RunContext) -> AdminServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(conflux_engine::admin::serve(
            listener,
            cx.metrics.clone(),
            cx.readiness.clone(),
            Default::default(),
            stop.clone(),
        ));
        AdminServer { addr, stop, task }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A loopback address with a port free right now.
pub fn free_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.local_addr().unwrap()
}

/// Waits until something accepts connections on `addr`.
pub async fn wait_listening(addr: std::net::SocketAddr) {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("nothing listens on {addr}");
}

/// A file of the test fixtures folder.
pub fn fixture(name: &str) -> String {
    format!("{}/tests/it/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A `conflux run` process, killed when dropped so a failing test leaves none behind.
pub struct Conflux(pub std::process::Child);

impl Drop for Conflux {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the real binary on a pipeline file (logs at warn, to the test's stderr).
pub fn start_conflux(pipeline: &std::path::Path) -> Conflux {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_conflux"))
        .env("CONFLUX_LOG", "warn")
        .arg("run")
        .arg(pipeline)
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    Conflux(child)
}
