//! A load client for the `broadcast` output, written in Rust so that the
//! client is not what limits a benchmark (`scripts/bench.sh` runs it).
//!
//! - `hold <ws-url> <connections> <seconds>`: opens the connections (each
//!   subscribed by the URL's query), prints `held N` once every one got its
//!   `initial_state`, keeps them open (answering pings) for `seconds`.
//! - `fanout <ws-base> <intake> <channels> <per-channel> <events> [rate]`:
//!   opens `per-channel` subscribers on each channel `c0…`, posts `events`
//!   events spread over the channels (as fast as requests of 1,000 go, or
//!   paced at `rate` per second), each stamped with the time it was sent,
//!   and prints deliveries per second and the publish → receive latency.
//! - `latency <ws-url> <intake> <rate> <seconds>`: posts events at `rate`
//!   per second (stamped) through a pipeline whose frames carry the newest
//!   stamp they reflect (`max` of it), and prints the latency of each frame.
//!
//! Output: one line of `key=value` pairs, for the script to read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

/// This process's CPU seconds (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0
}

/// Connects `n` WebSockets to `url(i)`, at most 256 handshakes at once, and
/// returns each once it got its `initial_state` (the subscription is live).
async fn connect_all(n: usize, url: impl Fn(usize) -> String) -> Vec<Ws> {
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (gate, url) = (gate.clone(), url(i));
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let (mut ws, _) = loop {
                match tokio_tungstenite::connect_async(&url).await {
                    Ok(ws) => break ws,
                    Err(e) => {
                        eprintln!("connect {url}: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            while let Some(Ok(message)) = ws.next().await {
                if let Message::Text(text) = message {
                    if text.contains("\"initial_state\"") {
                        break;
                    }
                }
            }
            ws
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.push(t.await.unwrap());
    }
    all
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

async fn hold(url: String, n: usize, seconds: u64) {
    let all = connect_all(n, |_| url.clone()).await;
    println!("held {}", all.len());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let readers: Vec<_> = all
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                // Reading answers pings; nothing else arrives.
                while tokio::time::timeout_at(deadline.into(), ws.next()).await.is_ok_and(|m| m.is_some()) {}
            })
        })
        .collect();
    for r in readers {
        let _ = r.await;
    }
}

/// Reads frames until `done`, recording the latency of each that carries a stamp (no timer
/// per frame: the client must cost less than the server it measures).
fn spawn_reader(
    mut ws: Ws,
    stamp: &'static str,
    latencies: Arc<Mutex<Vec<u64>>>,
    received: Arc<AtomicU64>,
    done: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut mine = Vec::new();
        let needle = format!("\"{stamp}\":");
        loop {
            let message = tokio::select! {
                biased;
                message = ws.next() => message,
                _ = done.cancelled() => break,
            };
            let Some(Ok(message)) = message else { break };
            let Message::Text(text) = message else { continue };
            let at = now_us();
            let Some(start) = text.find(&needle) else { continue };
            let digits: String = text[start + needle.len()..].chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(sent) = digits.parse::<u64>() {
                mine.push(at.saturating_sub(sent));
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
        latencies.lock().unwrap().extend(mine);
    })
}

async fn post_all(intake: &str, events: Vec<String>, per_request: usize, pace: Option<Duration>) {
    let client = reqwest::Client::new();
    let mut next = Instant::now();
    for chunk in events.chunks(per_request) {
        if let Some(every) = pace {
            next += every;
            tokio::time::sleep_until(next.into()).await;
        }
        let stamped: Vec<String> = chunk.iter().map(|e| e.replace("STAMP", &now_us().to_string())).collect();
        let body = format!("[{}]", stamped.join(","));
        let response = client.post(intake).header("content-type", "application/json").body(body).send().await;
        match response {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => eprintln!("intake answered {}", r.status()),
            Err(e) => eprintln!("intake: {e}"),
        }
    }
}

fn report(name: &str, latencies: &Mutex<Vec<u64>>, elapsed: Duration, cpu: f64) {
    let mut all = latencies.lock().unwrap().clone();
    all.sort_unstable();
    println!(
        "{name} deliveries={} seconds={:.3} per_second={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} client_cpu_s={cpu:.2}",
        all.len(),
        elapsed.as_secs_f64(),
        all.len() as f64 / elapsed.as_secs_f64(),
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        percentile(&all, 1.0),
    );
}

async fn fanout(base: String, intake: String, channels: usize, per_channel: usize, events: usize, rate: Option<usize>) {
    let all = connect_all(channels * per_channel, |i| format!("{base}?channels=c{}", i % channels)).await;
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(events * per_channel)));
    let received = Arc::new(AtomicU64::new(0));
    let done = CancellationToken::new();
    let cpu_before = cpu_seconds();
    let readers: Vec<_> =
        all.into_iter().map(|ws| spawn_reader(ws, "t", latencies.clone(), received.clone(), done.clone())).collect();
    let payloads: Vec<String> = (0..events).map(|i| format!("{{\"ch\":\"c{}\",\"t\":STAMP}}", i % channels)).collect();
    let started = Instant::now();
    // As fast as requests of 1,000 go, or paced: `rate` events per second in requests every 10 ms.
    let (per_request, pace) = match rate {
        Some(rate) => ((rate / 100).max(1), Some(Duration::from_secs_f64((rate / 100).max(1) as f64 / rate as f64))),
        None => (1000, None),
    };
    post_all(&intake, payloads, per_request, pace).await;
    let expected = (events * per_channel) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_seconds() - cpu_before;
    done.cancel();
    for reader in readers {
        let _ = reader.await;
    }
    let got = received.load(Ordering::Relaxed);
    if got < expected {
        eprintln!("only {got} of {expected} deliveries arrived");
    }
    let paced = rate.map_or("as fast as posted".to_string(), |r| format!("paced at {r} events/s"));
    report(&format!("fanout channels={channels} per_channel={per_channel} ({paced})"), &latencies, elapsed, cpu);
}

async fn latency(url: String, intake: String, rate: usize, seconds: usize) {
    let mut all = connect_all(1, |_| url.clone()).await;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let received = Arc::new(AtomicU64::new(0));
    let done = CancellationToken::new();
    let reader = spawn_reader(all.remove(0), "newest", latencies.clone(), received, done.clone());
    let per_request = (rate / 200).max(1);
    let payloads: Vec<String> = (0..rate * seconds).map(|i| format!("{{\"k\":\"g{}\",\"t\":STAMP}}", i % 10)).collect();
    let pace = Duration::from_secs_f64(per_request as f64 / rate as f64);
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    post_all(&intake, payloads, per_request, Some(pace)).await;
    let elapsed = started.elapsed();
    // The last updates are out within a second of the last post.
    tokio::time::sleep(Duration::from_secs(1)).await;
    done.cancel();
    let _ = reader.await;
    report(&format!("latency rate={rate}"), &latencies, elapsed, cpu_seconds() - cpu_before);
}

#[tokio::main]
async fn main() {
    // Thousands of sockets: the default soft limit of 1,024 files would stop us.
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg =
        |i: usize| args.get(i).cloned().unwrap_or_else(|| panic!("missing argument {i}: see the file's doc comment"));
    let num = |i: usize| arg(i).parse::<usize>().expect("a number");
    match args.first().map(String::as_str) {
        Some("hold") => hold(arg(1), num(2), num(3) as u64).await,
        Some("fanout") => {
            fanout(arg(1), arg(2), num(3), num(4), num(5), args.get(6).and_then(|r| r.parse().ok())).await
        }
        Some("latency") => latency(arg(1), arg(2), num(3), num(4)).await,
        _ => eprintln!("usage: broadcast_load hold|fanout|latency …"),
    }
}
