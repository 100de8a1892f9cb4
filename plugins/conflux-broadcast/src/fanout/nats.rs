//! The NATS JetStream bus: each event is published on one subject with its
//! channel, type and key in headers, and confirmed by JetStream; followers
//! read the stream through an ordered consumer from the sequence after
//! the last one they saw. The stream sequence is the sequence.

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::stream::{Config as StreamConfig, Stream};
use conflux_api::{BuildContext, BuildError, PluginError};
use futures_util::StreamExt;
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{BusEntry, Follower, Outgoing};

/// A JetStream stream as the fan-out bus.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsBusConfig {
    /// Server URL (default `nats://127.0.0.1:4222`).
    #[serde(default = "default_url")]
    pub url: String,
    /// Stream name (default `CONFLUX_BROADCAST_<pipeline>_<output>`), created when missing.
    #[serde(default)]
    pub stream: Option<String>,
    /// Subject events are published on (default `conflux.broadcast.<pipeline>.<output>`).
    #[serde(default)]
    pub subject: Option<String>,
    /// Messages the stream keeps (default 100000).
    #[serde(default = "default_max_messages")]
    pub max_messages: i64,
}

fn default_url() -> String {
    "nats://127.0.0.1:4222".into()
}

fn default_max_messages() -> i64 {
    100_000
}

const CHANNEL: &str = "Conflux-Channel";
const KEY: &str = "Conflux-Key";
const KIND: &str = "Conflux-Type";

pub struct NatsBus {
    url: String,
    stream: String,
    subject: String,
    max_messages: i64,
    context: Mutex<Option<async_nats::jetstream::Context>>,
}

/// Stream names allow letters, digits, `-` and `_`.
fn stream_name(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

impl NatsBus {
    pub fn build(config: NatsBusConfig, cx: &BuildContext) -> Result<NatsBus, BuildError> {
        let stream = config
            .stream
            .unwrap_or_else(|| stream_name(&format!("CONFLUX_BROADCAST_{}_{}", cx.pipeline, cx.component)));
        if stream.is_empty() || stream != stream_name(&stream) {
            return Err(BuildError::at(["fanout", "nats", "stream"], "a stream name has letters, digits, `-` and `_`"));
        }
        let subject = config.subject.unwrap_or_else(|| format!("conflux.broadcast.{}.{}", cx.pipeline, cx.component));
        if subject.is_empty() || subject.contains([' ', '*', '>']) {
            return Err(BuildError::at(["fanout", "nats", "subject"], "a subject without spaces or wildcards"));
        }
        Ok(NatsBus {
            url: config.url,
            stream,
            subject,
            max_messages: config.max_messages.max(1),
            context: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.stream
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> PluginError {
        PluginError::retryable(format!("fan-out bus {} ({}): {what}: {e}", self.url, self.stream))
    }

    /// The JetStream context and the stream, opened (and the stream created) when needed.
    async fn open(&self) -> Result<(async_nats::jetstream::Context, Stream), PluginError> {
        let mut context = self.context.lock().await;
        let js = match &*context {
            Some(js) => js.clone(),
            None => {
                let client = async_nats::connect(&self.url).await.map_err(|e| self.fail("cannot connect", e))?;
                let js = async_nats::jetstream::new(client);
                *context = Some(js.clone());
                js
            }
        };
        let config = StreamConfig {
            name: self.stream.clone(),
            subjects: vec![self.subject.clone()],
            max_messages: self.max_messages,
            ..Default::default()
        };
        match js.get_or_create_stream(config).await {
            Ok(stream) => Ok((js, stream)),
            Err(e) => {
                *context = None;
                Err(self.fail("cannot open or create the stream", e))
            }
        }
    }

    pub async fn connect(&self) -> Result<(), PluginError> {
        self.open().await.map(|_| ())
    }

    pub async fn publish(&self, batch: &Outgoing<'_>) -> Result<(), PluginError> {
        let (js, _) = self.open().await?;
        let mut pending: Vec<PublishAckFuture> = Vec::with_capacity(batch.events.len());
        for (index, (r, json)) in batch.events.iter().enumerate() {
            let mut headers = async_nats::HeaderMap::new();
            // JetStream drops a message whose id it saw within its duplicate window (2 minutes).
            headers.insert("Nats-Msg-Id", format!("{}-{}-{index}", batch.publisher, batch.token).as_str());
            headers.insert(CHANNEL, r.channel.as_str());
            headers.insert(KIND, r.kind.as_str());
            if let Some(key) = &r.key {
                headers.insert(KEY, key.as_str());
            }
            let sent = js.publish_with_headers(self.subject.clone(), headers, json.clone()).await;
            pending.push(sent.map_err(|e| self.fail("publish failed", e))?);
        }
        for ack in pending {
            ack.await.map_err(|e| self.fail("JetStream did not confirm", e))?;
        }
        Ok(())
    }

    pub async fn follow(&self, follower: &mut Follower, stop: &CancellationToken) {
        let mut last: u64 = 0;
        loop {
            let messages = async {
                let (_, stream) = self.open().await?;
                let deliver_policy = match last {
                    0 => DeliverPolicy::All,
                    seen => DeliverPolicy::ByStartSequence { start_sequence: seen + 1 },
                };
                let consumer = stream
                    .create_consumer(pull::OrderedConfig { deliver_policy, ..Default::default() })
                    .await
                    .map_err(|e| self.fail("cannot create a consumer", e))?;
                consumer.messages().await.map_err(|e| self.fail("cannot read", e))
            };
            let mut messages = tokio::select! {
                _ = stop.cancelled() => return,
                opened = messages => match opened {
                    Ok(messages) => messages,
                    Err(e) => {
                        *self.context.lock().await = None;
                        if follower.retry(&self.url, &e.to_string(), stop).await { continue } else { return }
                    }
                },
            };
            follower.healthy();
            let error = loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => return,
                    message = messages.next() => message,
                };
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => break e.to_string(),
                    None => break "the consumer ended".to_string(),
                };
                let Ok(info) = message.info() else { continue };
                let seq = info.stream_sequence;
                last = seq;
                let headers = message.headers.as_ref();
                let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
                let (Some(channel), Some(kind)) = (header(CHANNEL), header(KIND)) else {
                    tracing::debug!(seq, "a fan-out message without channel or type; skipped");
                    continue;
                };
                follower.apply(seq, BusEntry { channel, kind, key: header(KEY), data: &message.payload });
            };
            *self.context.lock().await = None;
            if !follower.retry(&self.url, &error, stop).await {
                return;
            }
        }
    }
}
