//! `redis` input: streams read in a consumer group (at least once), or
//! pub/sub channels and patterns (at most once). Which one follows from the
//! options given; mixing them is a build error at the option that does not
//! belong.

mod acks;
pub(crate) mod entries;
mod pubsub;
mod stream;

use std::time::Duration as StdDuration;

use conflux_api::config::Duration;
use conflux_api::error::BuildErrorKind;
use conflux_api::{inventory, BuildContext, BuildError, BuiltInput, InputConfig, PortId, Registration};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::RedisConn;
use pubsub::PubSubReader;
use stream::{StreamReader, StreamSettings};

/// Where a consumer group starts when this input creates it.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// Every entry the stream holds (`XGROUP CREATE … 0`).
    #[default]
    All,
    /// Only entries added after the group is created (`XGROUP CREATE … $`).
    New,
}

/// Reads Redis streams in a consumer group, or subscribes to pub/sub
/// channels and patterns.
///
/// Streams (`stream` or `streams`, with `group`): entries are read with
/// `XREADGROUP` and acknowledged (`XACK`) once the pipeline is done with
/// them: delivered, or rejected (a dead letter, or discarded). A failed
/// entry stays pending and is claimed again (`XAUTOCLAIM`) once idle for
/// `claim_after`, as are a crashed consumer's; after a (re)connect this
/// consumer's own pending entries are read first. At least once. The
/// payload is the JSON text in entry field `field` (default `data`, what
/// the `redis` output's `xadd` writes); an entry without that field becomes
/// an object of all its fields. Metadata: `redis.stream`, `redis.id`;
/// position `redis:<stream>`, offset `ms × 2^20 + seq` of the entry id.
///
/// Pub/sub (`channels`, `patterns`): at most once, nothing acknowledged.
/// Metadata: `redis.channel`, and `redis.pattern` for a pattern's messages.
///
/// Payloads that are not JSON go to port `invalid` as text.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisInputConfig {
    /// `redis://[user:password@]host:port/db`, or `rediss://` for TLS.
    #[serde(default = "crate::default_url")]
    pub url: String,
    /// One stream to read (a key; created empty with the group when missing).
    #[serde(default)]
    pub stream: Option<String>,
    /// Several streams to read in one group.
    #[serde(default)]
    pub streams: Vec<String>,
    /// Consumer group (streams): created when missing; instances in one group share the entries.
    #[serde(default)]
    pub group: Option<String>,
    /// This consumer's name in the group (default: the component's name). Give each instance its own,
    /// such as `"${HOSTNAME}"`: a consumer's pending entries are read again by whoever has its name.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Where a group this input creates starts (default `all`); an existing group goes on where it is.
    #[serde(default)]
    pub start: Option<StartAt>,
    /// Entry field holding the payload as JSON text (default `data`).
    #[serde(default)]
    pub field: Option<String>,
    /// Claim pending entries idle this long (default 30s): a crashed consumer's, or ones the
    /// pipeline failed. Longer than an event may take through the pipeline.
    #[serde(default)]
    pub claim_after: Option<Duration>,
    /// Longest wait in `XREADGROUP` for new entries (default 1s).
    #[serde(default)]
    pub block: Option<Duration>,
    /// Most entries read and not yet acknowledged (default 10000); reading stops at it.
    #[serde(default)]
    pub max_unacked: Option<usize>,
    /// Pub/sub channels to subscribe to.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Pub/sub channel patterns to subscribe to (`PSUBSCRIBE`), such as `alerts.*`.
    #[serde(default)]
    pub patterns: Vec<String>,
    /// Most events per batch (streams: `XREADGROUP`'s `COUNT`).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_batch_size() -> usize {
    1024
}

const INVALID: PortId = PortId(1);

impl InputConfig for RedisInputConfig {
    const TYPE: &'static str = "redis";
    fn build(self, cx: &BuildContext) -> Result<BuiltInput, BuildError> {
        let conn = RedisConn::open(&self.url).map_err(|e| BuildError::at(["url"], format!("bad Redis URL: {e}")))?;
        if self.batch_size == 0 {
            return Err(BuildError::at(["batch_size"], "batch_size must be at least 1"));
        }
        let streams = self.streams()?;
        let pubsub = !self.channels.is_empty() || !self.patterns.is_empty();
        let built = match (streams.is_empty(), pubsub) {
            (true, false) => {
                return Err(BuildError::new(
                    "give `stream` or `streams` (read in a consumer group), or `channels` or `patterns` (pub/sub)",
                ))
            }
            (false, true) => {
                let option = if self.channels.is_empty() { "patterns" } else { "channels" };
                return Err(BuildError::at(
                    [option],
                    format!("`{option}` is for pub/sub, but this input reads streams; use one `redis` input for each"),
                ));
            }
            (false, false) => {
                let settings = self.stream_settings(streams, cx)?;
                let ack_conn =
                    RedisConn::open(&self.url).map_err(|e| BuildError::at(["url"], format!("bad Redis URL: {e}")))?;
                let claimed = cx.counter(
                    "redis_claimed_entries",
                    "Pending stream entries claimed after claim_after: a crashed consumer's, or ones the pipeline failed",
                );
                BuiltInput::new(StreamReader::new(settings, conn, ack_conn, claimed))
            }
            (true, true) => {
                self.no_stream_options()?;
                let named = |list: &[String], option: &str| match list.iter().position(String::is_empty) {
                    Some(i) => Err(BuildError::at([option.to_string(), i.to_string()], "an empty name")),
                    None => Ok(()),
                };
                named(&self.channels, "channels")?;
                named(&self.patterns, "patterns")?;
                let client = redis::Client::open(self.url.as_str())
                    .map_err(|e| BuildError::at(["url"], format!("bad Redis URL: {e}")))?;
                let shown = conn.url().to_string();
                BuiltInput::new(PubSubReader::new(client, shown, self.channels, self.patterns, self.batch_size))
            }
        };
        Ok(built.with_ports(&["invalid"]))
    }
}

impl RedisInputConfig {
    /// The streams named by `stream` or `streams`, each once.
    fn streams(&self) -> Result<Vec<String>, BuildError> {
        if self.stream.is_some() && !self.streams.is_empty() {
            return Err(BuildError::at(["streams"], "give `stream` or `streams`, not both"));
        }
        if self.stream.as_deref() == Some("") {
            return Err(BuildError::at(["stream"], "an empty stream name"));
        }
        for (i, name) in self.streams.iter().enumerate() {
            if name.is_empty() {
                return Err(BuildError::at(["streams".to_string(), i.to_string()], "an empty stream name"));
            }
            if self.streams[..i].contains(name) {
                return Err(BuildError::at(["streams".to_string(), i.to_string()], "a stream named twice"));
            }
        }
        Ok(self.stream.iter().chain(&self.streams).cloned().collect())
    }

    fn stream_settings(&self, streams: Vec<String>, cx: &BuildContext) -> Result<StreamSettings, BuildError> {
        let Some(group) = self.group.clone() else {
            return Err(BuildError {
                kind: BuildErrorKind::MissingField("group".into()),
                ..BuildError::new("missing field `group`: streams are read in a consumer group (created when missing)")
            });
        };
        if group.is_empty() {
            return Err(BuildError::at(["group"], "an empty group name"));
        }
        let consumer = self.consumer.clone().unwrap_or_else(|| cx.component.clone());
        if consumer.is_empty() {
            return Err(BuildError::at(["consumer"], "an empty consumer name"));
        }
        let field = self.field.clone().unwrap_or_else(|| "data".into());
        if field.is_empty() {
            return Err(BuildError::at(["field"], "an empty field name"));
        }
        let at_least_1ms = |value: Option<Duration>, option: &str, default: StdDuration| match value {
            Some(d) if d.0 < StdDuration::from_millis(1) => {
                Err(BuildError::at([option], format!("{option} must be at least 1ms")))
            }
            Some(d) => Ok(d.0),
            None => Ok(default),
        };
        let claim_after = at_least_1ms(self.claim_after, "claim_after", StdDuration::from_secs(30))?;
        let block = at_least_1ms(self.block, "block", StdDuration::from_secs(1))?;
        let max_unacked = self.max_unacked.unwrap_or(10_000);
        if max_unacked == 0 {
            return Err(BuildError::at(["max_unacked"], "max_unacked must be at least 1"));
        }
        Ok(StreamSettings {
            streams,
            group,
            consumer,
            start: self.start.unwrap_or_default(),
            field,
            batch_size: self.batch_size,
            block,
            claim_after,
            max_unacked,
        })
    }

    /// Pub/sub has no group, pending list or entry fields: a stream option there is a mistake.
    fn no_stream_options(&self) -> Result<(), BuildError> {
        let given = [
            ("group", self.group.is_some()),
            ("consumer", self.consumer.is_some()),
            ("start", self.start.is_some()),
            ("field", self.field.is_some()),
            ("claim_after", self.claim_after.is_some()),
            ("block", self.block.is_some()),
            ("max_unacked", self.max_unacked.is_some()),
        ];
        match given.iter().find(|(_, given)| *given) {
            Some((option, _)) => Err(BuildError::at(
                [*option],
                format!("`{option}` is for streams; pub/sub messages are not kept or acknowledged"),
            )),
            None => Ok(()),
        }
    }
}

inventory::submit!(Registration::input::<RedisInputConfig>());
