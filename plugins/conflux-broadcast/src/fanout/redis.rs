//! The Redis stream bus: one script per batch that `XADD`s its entries
//! (`MAXLEN ~`) unless the batch is there already, and
//! `XREAD BLOCK` from the last id seen. The entry id (milliseconds and a
//! counter, as a position) is the sequence; a Redis that restarted empty
//! gives later ids (they are times), so cursors stay ordered.

use std::time::Duration as StdDuration;

use conflux_api::{BuildContext, BuildError, PluginError};
use conflux_redis::streams::{offset, read_reply};
use conflux_redis::RedisConn;
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{BusEntry, Follower, Outgoing};

/// A Redis stream as the fan-out bus.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisBusConfig {
    /// `redis://` or `rediss://`, with user and password when needed (default `redis://127.0.0.1:6379`).
    #[serde(default = "default_url")]
    pub url: String,
    /// Stream key (default `conflux:broadcast:<pipeline>:<output>`): every instance names the same.
    #[serde(default)]
    pub stream: Option<String>,
    /// Entries the stream keeps, about (`MAXLEN ~`; default 100000): what an instance
    /// that starts replays, and how long a follower may be away.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
}

fn default_url() -> String {
    "redis://127.0.0.1:6379".into()
}

fn default_max_len() -> usize {
    100_000
}

/// Appends a batch unless this publisher appended it before: `KEYS[1]`
/// the stream, `KEYS[2]` the publisher's list of its last batches;
/// `ARGV[1]` the batch's name, `ARGV[2]` the `MAXLEN ~`, then per entry its
/// field count and fields. A script runs whole or not at all (and lands so
/// in the append-only file), so a batch is never half written.
const APPEND: &str = r#"
for _, seen in ipairs(redis.call('LRANGE', KEYS[2], 0, 63)) do
  if seen == ARGV[1] then return 0 end
end
local i = 3
while i <= #ARGV do
  local fields = tonumber(ARGV[i])
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, i + 1, i + fields))
  i = i + 1 + fields
end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], 0, 63)
redis.call('EXPIRE', KEYS[2], 86400)
return 1
"#;

/// Fields of a bus entry.
const CHANNEL: &str = "c";
const KEY: &str = "k";
const KIND: &str = "t";
const DATA: &str = "d";

pub struct RedisBus {
    append: redis::Script,
    publisher: Mutex<RedisConn>,
    follower: Mutex<RedisConn>,
    stream: String,
    max_len: usize,
}

impl RedisBus {
    pub fn build(config: RedisBusConfig, cx: &BuildContext) -> Result<RedisBus, BuildError> {
        let open =
            || RedisConn::open(&config.url).map_err(|e| BuildError::at(["fanout", "redis", "url"], e.to_string()));
        Ok(RedisBus {
            append: redis::Script::new(APPEND),
            publisher: Mutex::new(open()?),
            follower: Mutex::new(open()?),
            max_len: config.max_len.max(1),
            stream: config.stream.unwrap_or_else(|| format!("conflux:broadcast:{}:{}", cx.pipeline, cx.component)),
        })
    }

    pub fn name(&self) -> &str {
        &self.stream
    }

    pub async fn connect(&self) -> Result<(), PluginError> {
        let mut conn = self.publisher.lock().await;
        let opened = conn.connection().await.map(|_| ());
        opened.map_err(|e| PluginError::retryable(format!("fan-out bus {}: cannot connect: {e}", conn.url())))
    }

    pub async fn publish(&self, batch: &Outgoing<'_>) -> Result<(), PluginError> {
        let recent = format!("{}:published:{}", self.stream, batch.publisher);
        let mut call = self.append.key(&self.stream);
        call.key(recent).arg(&batch.token).arg(self.max_len);
        for (r, json) in &batch.events {
            match &r.key {
                Some(key) => call.arg(8).arg(CHANNEL).arg(&r.channel).arg(KIND).arg(&r.kind).arg(KEY).arg(key),
                None => call.arg(6).arg(CHANNEL).arg(&r.channel).arg(KIND).arg(&r.kind),
            };
            call.arg(DATA).arg(&json[..]);
        }
        let mut conn = self.publisher.lock().await;
        let written = match conn.connection().await {
            Ok(c) => {
                // fsync per write and a loaded server answer late; a late
                // answer is retried (harmlessly), but needlessly.
                c.set_response_timeout(StdDuration::from_secs(5));
                call.invoke_async::<i64>(c).await
            }
            Err(e) => Err(e),
        };
        if written.is_err() {
            conn.reset();
        }
        written.map(|_| ()).map_err(|e| PluginError::retryable(format!("fan-out bus {}: {e}", conn.url())))
    }

    pub async fn follow(&self, follower: &mut Follower, stop: &CancellationToken) {
        let mut last = "0-0".to_string();
        let mut conn = self.follower.lock().await;
        loop {
            let mut read = redis::cmd("XREAD");
            read.arg("COUNT").arg(1000).arg("BLOCK").arg(1000).arg("STREAMS").arg(&self.stream).arg(&last);
            let reply = tokio::select! {
                _ = stop.cancelled() => return,
                reply = async {
                    // The read waits in Redis for a second: the client waits longer.
                    let opened = conn.connection().await.map(|c| c.set_response_timeout(StdDuration::from_secs(6)));
                    match opened {
                        Ok(()) => conn.query::<redis::Value>(&read).await,
                        Err(e) => Err(e),
                    }
                } => reply,
            };
            let streams = match reply.map_err(|e| e.to_string()).and_then(read_reply) {
                Ok(streams) => streams,
                Err(e) => {
                    conn.reset();
                    if follower.retry(conn.url(), &e, stop).await {
                        continue;
                    }
                    return;
                }
            };
            follower.healthy();
            for entry in streams.into_iter().flat_map(|(_, entries)| entries) {
                let Some(seq) = offset(&entry.id) else { continue };
                last.clone_from(&entry.id);
                let Some(fields) = entry.fields else { continue };
                let field = |name: &str| fields.iter().find(|(n, _)| n == name.as_bytes()).map(|(_, v)| v.as_slice());
                let text = |name| field(name).and_then(|v| std::str::from_utf8(v).ok());
                let (Some(channel), Some(kind), Some(data)) = (text(CHANNEL), text(KIND), field(DATA)) else {
                    tracing::debug!(id = %entry.id, "a fan-out entry without channel, type or data; skipped");
                    continue;
                };
                follower.apply(seq, BusEntry { channel, kind, key: text(KEY), data });
            }
        }
    }
}
