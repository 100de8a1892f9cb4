//! `redis` output: the configured commands for every event of a write
//! batch, in one pipeline (one round trip), each reply checked.

mod fence;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, FailedEvent, Output, OutputConfig, PluginError,
    Registration,
};
use redis::aio::MultiplexedConnection;
use schemars::JsonSchema;
use serde::Deserialize;

use conflux_api::template::TemplateFields;

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
    #[serde(default = "crate::default_url")]
    pub url: String,
    /// Commands run for each event, in order.
    pub commands: Vec<CommandConfig>,
    /// Wrap each batch in `MULTI`/`EXEC`: other clients see all of it or none of it.
    #[serde(default)]
    pub atomic: bool,
    /// Fence each event's commands by its source position (a Lua script keeps
    /// the last applied position per source stream in `fence_key`): an event
    /// redelivered after a crash is not applied twice, so increments stay
    /// exact. Events without a source position (HTTP intake) run unfenced.
    /// Writes then run one at a time.
    #[serde(default)]
    pub idempotent: bool,
    /// With `idempotent`: the hash holding the last applied position per
    /// stream (default `conflux:fence:<pipeline>:<output>`).
    #[serde(default)]
    pub fence_key: Option<String>,
}

impl OutputConfig for RedisOutputConfig {
    const TYPE: &'static str = "redis";
    fn build(self, cx: &BuildContext) -> Result<Box<dyn Output>, BuildError> {
        if self.idempotent {
            if let Some(why) = cx.writes.unfit_for_a_fence() {
                return Err(BuildError::at(["idempotent"], format!("`idempotent` {why}")));
            }
        }
        if self.fence_key.is_some() && !self.idempotent {
            return Err(BuildError::at(["fence_key"], "`fence_key` applies with `idempotent: true` only"));
        }
        if self.commands.is_empty() {
            return Err(BuildError::at(["commands"], "name at least one command"));
        }
        let commands =
            self.commands.iter().enumerate().map(|(i, c)| Command::build(c, i)).collect::<Result<Vec<_>, _>>()?;
        let conn = RedisConn::open(&self.url).map_err(|e| BuildError::at(["url"], format!("bad Redis URL: {e}")))?;
        let shown = conn.url().to_string();
        let fence = self.idempotent.then(|| Fence {
            key: self.fence_key.unwrap_or_else(|| format!("conflux:fence:{}:{}", cx.pipeline, cx.component)),
            digest: Mutex::default(),
            serial: tokio::sync::Mutex::new(()),
            skipped: cx.counter(
                "redis_events_skipped",
                "Events `idempotent` left out: their source position was already applied",
            ),
        });
        let fields = TemplateFields::new(commands.iter().flat_map(Command::templates));
        Ok(Box::new(RedisOutput { commands, fields, atomic: self.atomic, conn, shown, live: Mutex::default(), fence }))
    }
}

inventory::submit!(Registration::output::<RedisOutputConfig>());

struct RedisOutput {
    commands: Vec<Command>,
    /// Every field the commands' templates read: one scan per event.
    fields: TemplateFields,
    atomic: bool,
    conn: RedisConn,
    /// The URL with its password masked.
    shown: String,
    /// The open connection, shared by concurrent writes (`max_in_flight`).
    live: Mutex<Option<MultiplexedConnection>>,
    fence: Option<Fence>,
}

/// `idempotent`: where positions are kept and the script that checks them.
struct Fence {
    key: String,
    /// The script's digest, loaded on each connection.
    digest: Mutex<String>,
    /// One fenced write at a time: a later batch fencing its positions
    /// before an earlier one failed would make the earlier one's retry
    /// skip events never applied.
    serial: tokio::sync::Mutex<()>,
    skipped: conflux_api::metrics::Counter,
}

/// How the events of a batch went into the pipeline, in pipeline order.
enum Sent {
    /// An event's own commands: (batch index, how many).
    Plain(usize, usize),
    /// One stream's fenced events, one script call: their batch indexes.
    Fenced(Vec<usize>),
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
        if let Some(fence) = &self.fence {
            // Loaded on every connection: a restarted Redis has forgotten it.
            let digest: String =
                self.conn.query(redis::cmd("SCRIPT").arg("LOAD").arg(fence::SCRIPT)).await.map_err(|e| {
                    PluginError::not_connected(format!("Redis at {}: loading the fence script: {e}", self.shown))
                })?;
            *fence.digest.lock().unwrap_or_else(|p| p.into_inner()) = digest;
        }
        *self.live.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(opened);
        Ok(())
    }

    async fn write(&self, batch: &Batch) -> Result<(), PluginError> {
        let _serial = match &self.fence {
            Some(fence) => Some(fence.serial.lock().await),
            None => None,
        };
        let mut conn = self.live().ok_or_else(|| PluginError::not_connected("not connected to Redis"))?;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        if self.atomic {
            pipe.atomic();
        }
        let mut sent: Vec<Sent> = Vec::with_capacity(batch.len());
        let mut refused = Vec::new();
        let mut fenced: HashMap<Arc<str>, fence::Fenced> = HashMap::new();
        let mut cmds = Vec::new();
        // The script's digest, read once per batch rather than per event.
        let digest = self.fence.as_ref().map(|f| f.digest.lock().unwrap_or_else(|p| p.into_inner()).clone());
        for (index, event) in batch.iter().enumerate() {
            cmds.clear();
            let mut payload = None;
            let read = self.fields.read(event);
            if let Err(reason) = self.commands.iter().try_for_each(|c| c.render(event, &read, &mut payload, &mut cmds))
            {
                refused.push(FailedEvent::new(index, reason));
                continue;
            }
            match (&self.fence, &event.position) {
                (Some(fence), Some(position)) => {
                    let digest = digest.as_deref().unwrap_or_default();
                    fenced
                        .entry(position.stream.clone())
                        .or_insert_with(|| fence::Fenced::new(digest, &fence.key, &position.stream))
                        .push(index, position.offset, &cmds);
                }
                _ => {
                    sent.push(Sent::Plain(index, cmds.len()));
                    for cmd in cmds.drain(..) {
                        pipe.add_command(cmd);
                    }
                }
            }
        }
        for (_, group) in fenced {
            let (cmd, events) = group.into_cmd();
            pipe.add_command(cmd);
            sent.push(Sent::Fenced(events));
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
            for sent in sent {
                match sent {
                    Sent::Plain(index, count) => {
                        // Every reply is read, so the next event's stay in step.
                        let errors: Vec<String> =
                            replies.by_ref().take(count).filter_map(|r| r.err()).map(|e| e.to_string()).collect();
                        if let Some(first) = errors.into_iter().next() {
                            refused.push(FailedEvent::new(index, format!("Redis refused a command: {first}")));
                        }
                    }
                    Sent::Fenced(events) => {
                        let fence_skipped = &self.fence.as_ref().expect("fenced events need a fence").skipped;
                        let reply = replies.next().unwrap_or(Ok(redis::Value::Nil));
                        let outcomes = match reply {
                            Ok(value) => fence::outcomes(value, events.len()),
                            Err(e) => Err(e.to_string()),
                        };
                        let outcomes = match outcomes {
                            Ok(outcomes) => outcomes,
                            Err(reason) => {
                                // NOSCRIPT (Redis restarted or flushed its scripts) or worse:
                                // reconnecting loads the script again; nothing was applied.
                                self.drop_connection();
                                return Err(PluginError::not_connected(format!(
                                    "Redis at {}: fence script: {reason}",
                                    self.shown
                                )));
                            }
                        };
                        for (index, outcome) in events.into_iter().zip(outcomes) {
                            match outcome {
                                fence::Outcome::Applied => {}
                                fence::Outcome::Skipped => fence_skipped.inc(),
                                fence::Outcome::Refused(reason) => {
                                    refused.push(FailedEvent::new(index, format!("Redis refused a command: {reason}")))
                                }
                            }
                        }
                    }
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
