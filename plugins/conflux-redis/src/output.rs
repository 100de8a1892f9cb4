//! `redis` output: the configured commands for every event of a write
//! batch, in one pipeline (one round trip), each reply checked.

use std::sync::Mutex;

use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, FailedEvent, Output, OutputConfig, PluginError,
    Registration,
};
use redis::aio::MultiplexedConnection;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::command::{Command, CommandConfig};
use crate::RedisConn;

/// Runs Redis commands for each event: counters, hashes, leaderboards,
/// HyperLogLogs, streams, recent-items lists, pub/sub.
///
/// A write batch (see `batch:`) goes as one pipeline; events are
/// acknowledged once Redis answered every command. A command Redis refuses
/// (`WRONGTYPE`) sends its event to `error` alone, with Redis's message;
/// an event whose templates cannot be rendered sends nothing and goes to
/// `error` too. A lost connection retries the whole batch (see
/// docs/redis.md for which commands a retry can apply twice).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisOutputConfig {
    /// `redis://[user:password@]host:port/db`, or `rediss://` for TLS.
    #[serde(default = "default_url")]
    pub url: String,
    /// Commands run for each event, in order.
    pub commands: Vec<CommandConfig>,
    /// Wrap each batch in `MULTI`/`EXEC`: other clients see all of it or none of it.
    #[serde(default)]
    pub atomic: bool,
}

fn default_url() -> String {
    "redis://127.0.0.1:6379".into()
}

impl OutputConfig for RedisOutputConfig {
    const TYPE: &'static str = "redis";
    fn build(self, _cx: &BuildContext) -> Result<Box<dyn Output>, BuildError> {
        if self.commands.is_empty() {
            return Err(BuildError::at(["commands"], "name at least one command"));
        }
        let commands =
            self.commands.iter().enumerate().map(|(i, c)| Command::build(c, i)).collect::<Result<Vec<_>, _>>()?;
        let conn = RedisConn::open(&self.url).map_err(|e| BuildError::at(["url"], format!("bad Redis URL: {e}")))?;
        let shown = conn.url().to_string();
        Ok(Box::new(RedisOutput { commands, atomic: self.atomic, conn, shown, live: Mutex::default() }))
    }
}

inventory::submit!(Registration::output::<RedisOutputConfig>());

struct RedisOutput {
    commands: Vec<Command>,
    atomic: bool,
    conn: RedisConn,
    /// The URL with its password masked.
    shown: String,
    /// The open connection, shared by concurrent writes (`max_in_flight`).
    live: Mutex<Option<MultiplexedConnection>>,
}

impl RedisOutput {
    fn live(&self) -> Option<MultiplexedConnection> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn drop_connection(&self) {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[async_trait]
impl Output for RedisOutput {
    async fn connect(&mut self) -> Result<(), PluginError> {
        // A fresh connection: the engine reconnects after the old one broke.
        self.conn.reset();
        let opened = self
            .conn
            .connection()
            .await
            .map_err(|e| PluginError::not_connected(format!("cannot connect to Redis at {}: {e}", self.shown)))?
            .clone();
        *self.live.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(opened);
        Ok(())
    }

    async fn write(&self, batch: &Batch) -> Result<(), PluginError> {
        let mut conn = self.live().ok_or_else(|| PluginError::not_connected("not connected to Redis"))?;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        if self.atomic {
            pipe.atomic();
        }
        // (event index, how many commands it sent), in pipeline order.
        let mut sent: Vec<(usize, usize)> = Vec::with_capacity(batch.len());
        let mut refused = Vec::new();
        let mut cmds = Vec::new();
        for (index, event) in batch.iter().enumerate() {
            cmds.clear();
            let mut payload = None;
            match self.commands.iter().try_for_each(|c| c.render(event, &mut payload, &mut cmds)) {
                Ok(()) => {
                    sent.push((index, cmds.len()));
                    for cmd in cmds.drain(..) {
                        pipe.add_command(cmd);
                    }
                }
                Err(reason) => refused.push(FailedEvent::new(index, reason)),
            }
        }
        if !sent.is_empty() {
            let replies: Vec<redis::RedisResult<redis::Value>> = match pipe.query_async(&mut conn).await {
                Ok(replies) => replies,
                Err(e) => {
                    self.drop_connection();
                    return Err(PluginError::not_connected(format!("Redis at {}: {e}", self.shown)));
                }
            };
            let mut replies = replies.into_iter();
            for (index, count) in sent {
                // Every reply is read, so the next event's stay in step.
                let errors: Vec<String> =
                    replies.by_ref().take(count).filter_map(|r| r.err()).map(|e| e.to_string()).collect();
                if let Some(first) = errors.into_iter().next() {
                    refused.push(FailedEvent::new(index, format!("Redis refused a command: {first}")));
                }
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            refused.sort_by_key(|f| f.index);
            Err(PluginError::Partial(refused))
        }
    }
}
