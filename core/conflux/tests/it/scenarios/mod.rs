//! The shipped scenario pipelines (`configs/*.yaml`) run as a team would
//! run them: the real binary on the file as shipped, pointed by environment
//! at the machine's Redis, PostgreSQL, NATS and Kafka, each in a space of
//! its own (a fresh database, a Redis database number, unique topics).
//! Every expectation is computed in the test from the events it sent.

mod bookings;
mod clickstream;
mod ecommerce;
mod multichannel;
mod platform;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::postgres_output::{database_url, psql_in};

/// A shipped pipeline file.
pub fn config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs").join(name)
}

/// Runs `conflux run <files>` with `env`, its admin server at `admin`; waits until ready.
pub async fn run(files: &[PathBuf], env: &[(&str, String)], admin: SocketAddr) -> crate::Conflux {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_conflux"));
    command.env("CONFLUX_LOG", "warn").arg("run").arg("--admin").arg(admin.to_string()).args(files);
    for (name, value) in env {
        command.env(name, value);
    }
    let run = crate::Conflux(command.stderr(std::process::Stdio::inherit()).spawn().unwrap());
    crate::wait_ready(admin, 200, Duration::from_secs(30)).await;
    run
}

/// A database of its own on the machine's PostgreSQL; its URL.
pub fn fresh_database(name: &str) -> String {
    let database = crate::key(name).replace('-', "_");
    psql_in(&database_url(), &format!("CREATE DATABASE {database}"));
    let base = database_url();
    let server = base.rsplit_once('/').map_or(base.as_str(), |(server, _)| server);
    format!("{server}/{database}")
}

/// A Redis database number of its own (emptied), so fixed key names such
/// as `metrics:today` do not meet another test's; its URL.
pub fn fresh_redis(db: u8) -> String {
    let out = redis_cli(db, &["FLUSHDB"]);
    assert_eq!(out.trim(), "OK", "redis-cli FLUSHDB (scripts/test.sh starts Redis): {out}");
    format!("redis://127.0.0.1:6379/{db}")
}

/// `redis-cli -n db …`, Redis's own client; its output.
pub fn redis_cli(db: u8, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-n", &db.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("redis-cli (scripts/test.sh starts Redis): {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Redis hash as a map (`HGETALL`).
pub fn redis_hash(db: u8, key: &str) -> HashMap<String, String> {
    let out = redis_cli(db, &["HGETALL", key]);
    let lines: Vec<&str> = out.lines().collect();
    lines.chunks(2).filter(|pair| pair.len() == 2).map(|pair| (pair[0].to_string(), pair[1].to_string())).collect()
}

/// Polls `check` until it returns `Some`, at most `within`; fails naming `what`.
pub async fn eventually<T>(within: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(started.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SHA-256 hex of `text` by the system's `sha256sum`.
pub fn sha256sum(text: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// An HS256 token for `claims`.
pub fn token(secret: &str, claims: serde_json::Value) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

/// Opens the dashboard page at `url` in headless Chromium, waits until its
/// feed is live and every widget drew, and saves what a user sees as
/// `target/tmp/<name>.png` (docs/images/ holds copies for the recipes).
pub async fn screenshot(url: String, name: &str) -> PathBuf {
    let browser = crate::dashboard::browser_dir();
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.png"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/browser/screenshot.mjs");
    let path = shot.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node").arg(script).arg(&url).arg(&path).env("PLAYWRIGHT_DIR", &browser).output()
    })
    .await
    .unwrap()
    .expect("node must be installed for the dashboard screenshots");
    assert!(
        output.status.success(),
        "the {name} dashboard: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    shot
}
