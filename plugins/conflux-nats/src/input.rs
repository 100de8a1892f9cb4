//! `nats` input.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use async_nats::jetstream::consumer::pull::{Config as PullConfig, Stream as PullStream};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::AckKind;
use conflux_api::config::Duration;
use conflux_api::{
    async_trait, inventory, AckStatus, AckToken, BuildContext, BuildError, BuiltInput, Emitter, Event, Input,
    InputConfig, PluginError, PortId, Registration, Timestamp, Value,
};
use futures_util::stream::{select_all, SelectAll};
use futures_util::{FutureExt, StreamExt};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::mpsc;

/// Where a JetStream consumer starts the first time it is created.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// Every message the stream holds.
    #[default]
    All,
    /// Only messages published after the consumer is created.
    New,
}

/// A JetStream durable pull consumer.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JetStreamInputConfig {
    /// Stream name. Created over `subjects` when it does not exist and `subjects` is given.
    pub stream: String,
    /// Durable consumer name: restarts resume where the last run's acknowledgements stopped.
    pub durable: String,
    /// Only messages on this subject (wildcards allowed).
    #[serde(default)]
    pub filter_subject: Option<String>,
    /// Where a new consumer starts.
    #[serde(default)]
    pub start: StartAt,
    /// Most messages delivered but not yet acknowledged; the server stops delivering beyond it.
    #[serde(default = "default_max_ack_pending")]
    pub max_ack_pending: i64,
    /// How long the server waits for an acknowledgement before redelivering.
    #[serde(default)]
    pub ack_wait: Option<Duration>,
    /// First redelivery delay after a failure (nak); doubles with each delivery, up to 60 s.
    #[serde(default)]
    pub nak_delay: Option<Duration>,
}

fn default_max_ack_pending() -> i64 {
    10_000
}

/// Receives events from NATS: core subjects (optionally in a queue group so
/// instances share the work), or a JetStream durable pull consumer.
///
/// Payloads must be JSON; others go to port `invalid` with the raw text.
/// With JetStream each message is acknowledged once the pipeline is done
/// with it: delivered → ack, failed → nak with backoff (redelivered),
/// rejected (invalid, unwired) → term. Metadata: `nats.subject`, and for
/// JetStream `nats.stream_sequence` and `nats.delivered`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsInputConfig {
    /// Server URL(s), comma-separated.
    #[serde(default = "crate::default_url")]
    pub url: String,
    /// Subjects to subscribe to (core), or the subjects of a JetStream stream created when missing.
    #[serde(default)]
    pub subjects: Vec<String>,
    /// Core queue group: each message goes to one member.
    #[serde(default)]
    pub queue_group: Option<String>,
    /// Consume through JetStream instead of core subscriptions.
    #[serde(default)]
    pub jetstream: Option<JetStreamInputConfig>,
    /// Most events per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_batch_size() -> usize {
    1024
}

impl InputConfig for NatsInputConfig {
    const TYPE: &'static str = "nats";
    fn build(self, _cx: &BuildContext) -> Result<BuiltInput, BuildError> {
        if self.jetstream.is_none() && self.subjects.is_empty() {
            return Err(BuildError::at(["subjects"], "give subjects to subscribe to, or `jetstream`"));
        }
        if self.jetstream.is_some() && self.queue_group.is_some() {
            return Err(BuildError::at(
                ["queue_group"],
                "queue groups are for core subjects; JetStream consumers share work by `durable`",
            ));
        }
        if self.batch_size == 0 {
            return Err(BuildError::at(["batch_size"], "batch_size must be at least 1"));
        }
        Ok(BuiltInput::new(NatsInput { config: self, source: None }).with_ports(&["invalid"]))
    }
}

inventory::submit!(Registration::input::<NatsInputConfig>());

enum Source {
    Core(SelectAll<async_nats::Subscriber>),
    JetStream {
        messages: Box<PullStream>,
        acks: mpsc::UnboundedSender<(async_nats::jetstream::Message, AckStatus)>,
        /// `jetstream:<stream>`, the position stream of every event (built once, not per event).
        position: Arc<str>,
    },
}

struct NatsInput {
    config: NatsInputConfig,
    source: Option<Source>,
}

const INVALID: PortId = PortId(1);

fn not_connected(what: &str, e: impl std::fmt::Display) -> PluginError {
    PluginError::not_connected(format!("{what}: {e}"))
}

#[async_trait]
impl Input for NatsInput {
    async fn connect(&mut self) -> Result<(), PluginError> {
        let client =
            async_nats::connect(&self.config.url).await.map_err(|e| not_connected("cannot connect to NATS", e))?;
        let source = match &self.config.jetstream {
            None => {
                let mut subs = Vec::new();
                for subject in &self.config.subjects {
                    let sub = match &self.config.queue_group {
                        Some(group) => client.queue_subscribe(subject.clone(), group.clone()).await,
                        None => client.subscribe(subject.clone()).await,
                    }
                    .map_err(|e| not_connected("cannot subscribe", e))?;
                    subs.push(sub);
                }
                client.flush().await.map_err(|e| not_connected("cannot flush subscriptions", e))?;
                Source::Core(select_all(subs))
            }
            Some(js_config) => {
                let js = async_nats::jetstream::new(client.clone());
                let stream = if self.config.subjects.is_empty() {
                    js.get_stream(&js_config.stream).await.map_err(|e| not_connected("cannot open stream", e))?
                } else {
                    js.get_or_create_stream(async_nats::jetstream::stream::Config {
                        name: js_config.stream.clone(),
                        subjects: self.config.subjects.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| not_connected("cannot open or create stream", e))?
                };
                let consumer = stream
                    .get_or_create_consumer(
                        &js_config.durable,
                        PullConfig {
                            durable_name: Some(js_config.durable.clone()),
                            ack_policy: AckPolicy::Explicit,
                            deliver_policy: match js_config.start {
                                StartAt::All => DeliverPolicy::All,
                                StartAt::New => DeliverPolicy::New,
                            },
                            filter_subject: js_config.filter_subject.clone().unwrap_or_default(),
                            max_ack_pending: js_config.max_ack_pending,
                            ack_wait: js_config.ack_wait.map_or(StdDuration::from_secs(30), |d| d.0),
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| not_connected("cannot open or create consumer", e))?;
                let messages = consumer
                    .stream()
                    .max_messages_per_batch(self.config.batch_size.max(1))
                    .messages()
                    .await
                    .map_err(|e| not_connected("cannot pull messages", e))?;
                let (acks, rx) = mpsc::unbounded_channel();
                let nak_delay = js_config.nak_delay.map_or(StdDuration::from_secs(1), |d| d.0);
                tokio::spawn(acknowledge(client, rx, nak_delay));
                let position = Arc::from(format!("jetstream:{}", js_config.stream));
                Source::JetStream { messages: Box::new(messages), acks, position }
            }
        };
        self.source = Some(source);
        Ok(())
    }

    async fn read(&mut self, out: &mut Emitter) -> Result<bool, PluginError> {
        let batch_size = self.config.batch_size;
        match self.source.as_mut() {
            None => Err(PluginError::not_connected("not connected")),
            Some(Source::Core(subs)) => {
                let Some(first) = subs.next().await else {
                    self.source = None;
                    return Err(PluginError::not_connected("subscriptions ended"));
                };
                let now = Timestamp::now();
                let (e, valid) = event(&first.payload, first.subject.as_str(), now, None);
                route(out, e, valid);
                for _ in 1..batch_size {
                    match subs.next().now_or_never() {
                        Some(Some(m)) => {
                            let (e, valid) = event(&m.payload, m.subject.as_str(), now, None);
                            route(out, e, valid);
                        }
                        _ => break,
                    }
                }
                Ok(true)
            }
            Some(Source::JetStream { messages, acks, position }) => {
                let mut taken = 0;
                let now = Timestamp::now();
                while taken < batch_size {
                    let next = if taken == 0 {
                        messages.next().await
                    } else {
                        match messages.next().now_or_never() {
                            Some(n) => n,
                            None => break,
                        }
                    };
                    let message = match next {
                        Some(Ok(m)) => m,
                        Some(Err(e)) if taken == 0 => {
                            return Err(PluginError::retryable(format!("JetStream pull failed: {e}")));
                        }
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "JetStream pull interrupted");
                            break;
                        }
                        None => {
                            self.source = None;
                            return Err(PluginError::not_connected("JetStream message stream ended"));
                        }
                    };
                    let info = message.info().ok().map(|i| (i.stream_sequence, i.delivered, &*position));
                    // The event is built from the borrowed message, which then moves into its token.
                    let (event, valid) = event(&message.payload, message.subject.as_str(), now, info);
                    let tx = acks.clone();
                    let token = AckToken::new(move |status| {
                        let _ = tx.send((message, status));
                    });
                    route(out, event.with_ack(token), valid);
                    taken += 1;
                }
                Ok(true)
            }
        }
    }
}

/// An untracked event and whether its payload is JSON. `info`: JetStream's
/// stream sequence, delivery count and position stream.
fn event(payload: &[u8], subject: &str, now: Timestamp, info: Option<(u64, i64, &Arc<str>)>) -> (Event, bool) {
    let (data, valid) = match conflux_api::Payload::from_json(payload) {
        Ok(v) => (v, true),
        Err(_) => (Value::from(String::from_utf8_lossy(payload).as_ref()).into(), false),
    };
    let mut event = Event::with_time(data, now);
    event.meta.insert("nats.subject", Value::from(subject));
    if let Some((sequence, delivered, position)) = info {
        // Stream sequences only grow: the position checkpointing stages compare.
        event = event.at(position, sequence);
        event.meta.insert("nats.stream_sequence", Value::from(sequence));
        event.meta.insert("nats.delivered", Value::from(delivered));
    }
    (event, valid)
}

/// Sends an event on, or to port `invalid` when its payload is not JSON.
fn route(out: &mut Emitter, mut event: Event, valid: bool) {
    if valid {
        out.emit(event);
    } else {
        event.meta.insert(conflux_api::component::ERROR_META, Value::from("payload is not JSON"));
        out.emit_to(INVALID, event);
    }
}

/// Sends acknowledgements as the pipeline finishes with messages, flushing
/// after each run so a stop loses as few as possible (the rest are redelivered).
async fn acknowledge(
    client: async_nats::Client,
    mut rx: mpsc::UnboundedReceiver<(async_nats::jetstream::Message, AckStatus)>,
    nak_delay: StdDuration,
) {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some((message, status)) = next {
            let kind = match status {
                AckStatus::Delivered => AckKind::Ack,
                AckStatus::Rejected => AckKind::Term,
                AckStatus::Errored => {
                    let delivered = message.info().map(|i| i.delivered).unwrap_or(1).clamp(1, 16) as u32;
                    let delay = nak_delay.saturating_mul(1 << (delivered - 1)).min(StdDuration::from_secs(60));
                    AckKind::Nak(Some(delay))
                }
            };
            if let Err(e) = message.ack_with(kind).await {
                tracing::warn!(error = %e, "cannot acknowledge a JetStream message; it will be redelivered");
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = client.flush().await {
            tracing::warn!(error = %e, "cannot flush JetStream acknowledgements");
        }
    }
}
