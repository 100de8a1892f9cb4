//! Several instances, one channel space: with `fanout`, an instance does
//! not publish into its own hub but appends to a Redis stream, and every
//! instance (itself included) follows that stream into its hub. The
//! sequence is the stream entry's id, given where the event was published,
//! so every instance numbers an event alike and a client that moves from
//! one instance to another resumes by its cursor.
//!
//! An event is acknowledged once the stream holds it. A follower that loses
//! the bus reconnects with backoff and reads on from the last id it saw,
//! so nothing is missed while the bus is back before the stream's
//! `max_len` is exceeded; a Redis that restarted empty gives later ids
//! (they are times), so cursors stay ordered.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use conflux_api::{Backoff, BuildContext, BuildError, Event, Payload, PluginError};
use conflux_redis::streams::{offset, read_reply, Entry};
use conflux_redis::RedisConn;
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::frame;
use crate::hub::Hub;
use crate::output::Routed;

/// The bus instances share.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum FanoutConfig {
    /// A Redis stream.
    Redis(RedisFanoutConfig),
}

/// A Redis stream as the fan-out bus.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisFanoutConfig {
    /// `redis://` or `rediss://`, with user and password when needed (default `redis://127.0.0.1:6379`).
    #[serde(default = "default_url")]
    pub url: String,
    /// Stream key (default `conflux:broadcast:<pipeline>:<output>`): every instance names the same.
    #[serde(default)]
    pub stream: Option<String>,
    /// Entries the stream keeps, about (`MAXLEN ~`; default 100000): what an instance
    /// that starts replays to rebuild its channels, and how long a bus outage may last.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
}

fn default_url() -> String {
    "redis://127.0.0.1:6379".into()
}

fn default_max_len() -> usize {
    100_000
}

impl FanoutConfig {
    pub fn build(self, cx: &BuildContext) -> Result<Fanout, BuildError> {
        let FanoutConfig::Redis(config) = self;
        let open = |what| {
            RedisConn::open(&config.url).map_err(|e| BuildError::at(["fanout", "redis", "url"], format!("{what}: {e}")))
        };
        let stream = config.stream.unwrap_or_else(|| format!("conflux:broadcast:{}:{}", cx.pipeline, cx.component));
        Ok(Fanout {
            publisher: Mutex::new(open("bad URL")?),
            follower: Mutex::new(open("bad URL")?),
            max_len: config.max_len.max(1),
            stream,
        })
    }
}

/// A Redis stream shared by the instances of one broadcast output.
pub struct Fanout {
    publisher: Mutex<RedisConn>,
    follower: Mutex<RedisConn>,
    stream: String,
    max_len: usize,
}

/// Fields of a bus entry.
const CHANNEL: &str = "c";
const KEY: &str = "k";
const KIND: &str = "t";
const DATA: &str = "d";

impl Fanout {
    /// The epoch every instance on this bus shares: named after the stream.
    pub fn epoch(&self) -> String {
        // FNV-1a: short, stable across processes and versions.
        let hash =
            self.stream.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        format!("bus{:08x}", hash as u32)
    }

    pub async fn connect(&self) -> Result<(), PluginError> {
        let mut conn = self.publisher.lock().await;
        conn.connection()
            .await
            .map(|_| ())
            .map_err(|e| PluginError::retryable(format!("fan-out bus {}: cannot connect: {e}", conn.url())))
    }

    /// Appends the events to the bus, in order, in one round trip.
    pub async fn publish(&self, routed: &[(&Event, Routed)]) -> Result<(), PluginError> {
        if routed.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let mut json = Vec::new();
        for (event, r) in routed {
            json.clear();
            event.data.write_json(&mut json);
            let cmd = pipe.cmd("XADD").arg(&self.stream).arg("MAXLEN").arg("~").arg(self.max_len).arg("*");
            cmd.arg(CHANNEL).arg(&r.channel).arg(KIND).arg(&r.kind);
            if let Some(key) = &r.key {
                cmd.arg(KEY).arg(key);
            }
            cmd.arg(DATA).arg(&json[..]);
        }
        let mut conn = self.publisher.lock().await;
        conn.query_pipe::<()>(&pipe)
            .await
            .map_err(|e| PluginError::retryable(format!("fan-out bus {}: {e}", conn.url())))
    }

    /// Reads the bus into `hub` until `stop`: first what the stream still
    /// holds (rebuilding the channels' state and history), then what comes.
    pub async fn follow(self: Arc<Self>, hub: Arc<Hub>, stop: CancellationToken) {
        let mut last = "0-0".to_string();
        let mut first = true;
        let mut failures = 0;
        let backoff = Backoff::new(StdDuration::from_millis(100), StdDuration::from_secs(5));
        let epoch = hub.epoch().to_string();
        let mut conn = self.follower.lock().await;
        loop {
            let mut read = redis::cmd("XREAD");
            read.arg("COUNT").arg(1000).arg("BLOCK").arg(1000).arg("STREAMS").arg(&self.stream).arg(&last);
            let reply = tokio::select! {
                _ = stop.cancelled() => return,
                reply = async {
                    let opened = conn.connection().await.map(|c| c.set_response_timeout(StdDuration::from_secs(6)));
                    match opened {
                        Ok(()) => conn.query::<redis::Value>(&read).await,
                        Err(e) => Err(e),
                    }
                } => reply,
            };
            let entries = match reply.map_err(|e| e.to_string()).and_then(read_reply) {
                Ok(streams) => streams.into_iter().flat_map(|(_, entries)| entries).collect::<Vec<Entry>>(),
                Err(e) => {
                    failures += 1;
                    let wait = backoff.wait(failures);
                    tracing::warn!(bus = %conn.url(), stream = %self.stream, error = %e, retry_in = ?wait, "fan-out bus read failed");
                    conn.reset();
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            };
            failures = 0;
            for entry in entries {
                let Some(seq) = offset(&entry.id) else { continue };
                if first {
                    // Entries before the first one still held are unknown here.
                    hub.watch_after(seq.saturating_sub(1));
                    first = false;
                }
                last = entry.id.clone();
                apply(&hub, &epoch, seq, entry);
            }
            first = false;
        }
    }
}

/// Publishes one bus entry in the hub under the sequence it was given.
fn apply(hub: &Hub, epoch: &str, seq: u64, entry: Entry) {
    let Some(fields) = entry.fields else { return };
    let field = |name: &str| fields.iter().find(|(n, _)| n == name.as_bytes()).map(|(_, v)| v.as_slice());
    let text = |name| field(name).and_then(|v| std::str::from_utf8(v).ok());
    let (Some(channel), Some(kind), Some(data)) = (text(CHANNEL), text(KIND), field(DATA)) else {
        tracing::debug!(id = %entry.id, "a fan-out entry without channel, type or data; skipped");
        return;
    };
    let Ok(data) = Payload::from_json(data) else {
        tracing::debug!(id = %entry.id, "a fan-out entry whose data is not JSON; skipped");
        return;
    };
    let key = text(KEY).map(str::to_string);
    hub.publish_at(seq, channel, key.clone(), |seq| frame::update(epoch, seq, kind, channel, key.as_deref(), &data));
}
