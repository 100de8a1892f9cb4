//! `nats` input.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use async_nats::jetstream::consumer::pull::{Config as PullConfig, Stream as PullStream};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::AckKind;
use conflux_api::config::Duration;
use conflux_api::{
    async_trait, inventory, AckStatus, AckToken, BuildContext, BuildError, BuiltInput, Bytes, Emitter, Event, Input,
    InputConfig, PluginError, PortId, Registration, Timestamp, Value,
};
use futures_util::stream::{select_all, SelectAll};
use futures_util::{FutureExt, StreamExt};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::cumulative::{CumulativeAcks, Sequences};

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
    /// Only messages on this subject (wildcards allowed); unset reads every subject of the stream.
    #[serde(default)]
    pub filter_subject: Option<String>,
    /// Where a new consumer starts (default `all`); an existing durable consumer resumes where it was.
    #[serde(default)]
    pub start: StartAt,
    /// Most messages delivered but not yet acknowledged; the server stops delivering beyond it.
    #[serde(default = "default_max_ack_pending")]
    pub max_ack_pending: i64,
    /// How long the server waits for an acknowledgement before redelivering (default 30s).
    #[serde(default)]
    pub ack_wait: Option<Duration>,
    /// First redelivery delay after a failure (nak) (default 1s); doubles with each delivery, up to 60s.
    #[serde(default)]
    pub nak_delay: Option<Duration>,
    /// How confirmed messages are acknowledged (default `explicit`); the consumer is created with this policy.
    #[serde(default)]
    pub ack_policy: AckMode,
}

/// How a JetStream input acknowledges what the pipeline confirmed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// One acknowledgement per message (JetStream's `explicit` policy). Safe
    /// when several instances share the durable consumer.
    #[default]
    Explicit,
    /// JetStream's `all` policy: once every message up to one in stream order
    /// is confirmed, that message alone is acknowledged and covers them all
    /// (as Kafka commits an offset). A failed message holds the
    /// acknowledgement of later ones back until its redelivery is confirmed;
    /// after a restart nothing is acknowledged until the messages the last
    /// run left unacknowledged have come back. For a consumer read by one
    /// instance only, with no `max_deliver` limit.
    All,
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
/// rejected (invalid, unwired) → term; or, with `jetstream.ack_policy: all`
/// (one instance per consumer), one ack per run of done messages in stream
/// order. Metadata: `nats.subject`, and for JetStream `nats.stream_sequence`
/// and `nats.delivered`.
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

/// What the reader and the acknowledgement tokens tell the acknowledging task.
/// Only a message's reply subject travels (an acknowledgement is a publish
/// to it): the message itself is dropped once its event is built.
enum AckEvent {
    /// A message with this stream sequence was handed to the pipeline (`all` policy only).
    Delivered(u64),
    /// The pipeline is done with a message: acked, termed or nak'ed on its
    /// own (under `all`, only failures, which are nak'ed). `delivered` is its
    /// delivery count, which sets the nak's backoff.
    Done { reply: async_nats::Subject, delivered: i64, status: AckStatus },
    /// `all` policy: the pipeline confirmed (or rejected) a message. Its
    /// reply subject is all an acknowledgement needs; the message itself is
    /// dropped at once rather than kept until the run is acknowledged.
    Settled(async_nats::Subject, Sequences),
}

enum Source {
    Core(SelectAll<async_nats::Subscriber>),
    JetStream {
        messages: Box<PullStream>,
        acks: mpsc::UnboundedSender<AckEvent>,
        /// Whether the reader announces deliveries (`all` policy).
        cumulative: bool,
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
                            ack_policy: match js_config.ack_policy {
                                AckMode::Explicit => AckPolicy::Explicit,
                                AckMode::All => AckPolicy::All,
                            },
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
                let mut consumer = consumer;
                let info =
                    consumer.info().await.map_err(|e| not_connected("cannot read the consumer's state", e))?.clone();
                let cumulative = match (js_config.ack_policy, info.config.ack_policy) {
                    (AckMode::Explicit, AckPolicy::Explicit) => false,
                    (AckMode::All, AckPolicy::All) if info.config.max_deliver <= 0 => true,
                    (AckMode::All, AckPolicy::All) => {
                        return Err(PluginError::fatal(format!(
                            "JetStream consumer `{}` has max_deliver {}: with `ack_policy: all` a message the \
                             server gives up on would be covered by a later acknowledgement; remove the limit \
                             or use `ack_policy: explicit`",
                            js_config.durable, info.config.max_deliver
                        )))
                    }
                    (wanted, found) => {
                        return Err(PluginError::fatal(format!(
                            "JetStream consumer `{}` exists with ack policy {found:?}, but `ack_policy` is {wanted:?}: \
                             set `ack_policy` to match, or delete the consumer so it is created again",
                            js_config.durable
                        )))
                    }
                };
                let tracker = cumulative.then(|| {
                    if info.num_ack_pending > 0 {
                        tracing::info!(
                            durable = %js_config.durable,
                            pending = info.num_ack_pending,
                            "the last run left messages unacknowledged; acknowledgements wait until they are redelivered"
                        );
                    }
                    (CumulativeAcks::new(info.num_ack_pending as u64), consumer.clone())
                });
                let messages = consumer
                    .stream()
                    .max_messages_per_batch(self.config.batch_size.max(1))
                    .messages()
                    .await
                    .map_err(|e| not_connected("cannot pull messages", e))?;
                let (acks, rx) = mpsc::unbounded_channel();
                let nak_delay = js_config.nak_delay.map_or(StdDuration::from_secs(1), |d| d.0);
                tokio::spawn(acknowledge(client, rx, nak_delay, tracker));
                let position = Arc::from(format!("jetstream:{}", js_config.stream));
                Source::JetStream { messages: Box::new(messages), acks, cumulative, position }
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
            Some(Source::JetStream { messages, acks, cumulative, position }) => {
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
                    let parsed = message
                        .info()
                        .ok()
                        .map(|i| (Sequences { stream: i.stream_sequence, delivery: i.consumer_sequence }, i.delivered));
                    let Some(reply) = message.reply.clone() else {
                        return Err(PluginError::retryable("a JetStream message without its reply subject"));
                    };
                    let settle = match (*cumulative, parsed) {
                        (false, _) => None,
                        (true, Some((at, _))) => {
                            // Announced before the event can finish, so the task knows of the gap.
                            let _ = acks.send(AckEvent::Delivered(at.stream));
                            Some(at)
                        }
                        (true, None) => {
                            return Err(PluginError::retryable("a JetStream message without its sequence numbers"));
                        }
                    };
                    let delivered = parsed.map_or(1, |(_, delivered)| delivered);
                    let info = parsed.map(|(at, delivered)| (at.stream, delivered, &*position));
                    let (event, valid) = event(&message.payload, message.subject.as_str(), now, info);
                    let tx = acks.clone();
                    let token = AckToken::new(move |status| {
                        let _ = tx.send(match (settle, status) {
                            (Some(at), AckStatus::Delivered | AckStatus::Rejected) => AckEvent::Settled(reply, at),
                            _ => AckEvent::Done { reply, delivered, status },
                        });
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
fn event(payload: &Bytes, subject: &str, now: Timestamp, info: Option<(u64, i64, &Arc<str>)>) -> (Event, bool) {
    // The body is shared with the message, not copied.
    let (data, valid) = match conflux_api::Payload::from_json_bytes(payload.clone()) {
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
/// Under the `all` policy, `cumulative` decides which single message to ack.
async fn acknowledge(
    client: async_nats::Client,
    mut rx: mpsc::UnboundedReceiver<AckEvent>,
    nak_delay: StdDuration,
    mut cumulative: Option<(CumulativeAcks<async_nats::Subject>, PullConsumer)>,
) {
    let mut asked = tokio::time::Instant::now();
    loop {
        // While acks wait for an earlier run's pending messages, the server's
        // pending count is asked for now and then even if nothing arrives.
        let gated = cumulative.as_ref().is_some_and(|(acks, _)| acks.gated());
        let mut next = match gated {
            true => match tokio::time::timeout(GATE_CHECK, rx.recv()).await {
                Ok(None) => break,
                Ok(first) => first,
                Err(_elapsed) => None,
            },
            false => match rx.recv().await {
                None => break,
                first => first,
            },
        };
        while let Some(event) = next {
            match event {
                AckEvent::Delivered(sequence) => {
                    if let Some((acks, _)) = cumulative.as_mut() {
                        acks.delivered(sequence);
                    }
                }
                AckEvent::Done { reply, delivered, status: AckStatus::Errored } => {
                    let delivered = delivered.clamp(1, 16) as u32;
                    let delay = conflux_api::Backoff::new(nak_delay, StdDuration::from_secs(60)).wait(delivered);
                    send(&client, reply, AckKind::Nak(Some(delay))).await;
                }
                // Under `all`, a term would count as an ack of everything below
                // it: a rejected message is covered by the run's ack instead.
                AckEvent::Settled(reply, at) => {
                    if let Some((acks, _)) = cumulative.as_mut() {
                        acks.done(reply, at);
                    }
                }
                AckEvent::Done { reply, status: AckStatus::Delivered, .. } => send(&client, reply, AckKind::Ack).await,
                AckEvent::Done { reply, status: AckStatus::Rejected, .. } => send(&client, reply, AckKind::Term).await,
            }
            next = rx.try_recv().ok();
        }
        if let Some((acks, consumer)) = cumulative.as_mut() {
            if acks.gated() && asked.elapsed() >= GATE_CHECK {
                asked = tokio::time::Instant::now();
                let held = acks.held();
                match consumer.info().await {
                    Ok(info) => acks.server_pending(held, info.num_ack_pending as u64),
                    Err(e) => tracing::debug!(error = %e, "cannot read the consumer's pending count"),
                }
            }
            if let Some(reply) = acks.ack_point() {
                // One `+ACK` to the reply subject of the run's last message.
                send(&client, reply, AckKind::Ack).await;
            }
        }
        if let Err(e) = client.flush().await {
            tracing::warn!(error = %e, "cannot flush JetStream acknowledgements");
        }
    }
}

/// How often a gated `all` consumer asks the server for its pending count.
const GATE_CHECK: StdDuration = StdDuration::from_millis(500);

/// Acknowledges one message as `Message::ack_with` does: `kind` published to its reply subject.
async fn send(client: &async_nats::Client, reply: async_nats::Subject, kind: AckKind) {
    if let Err(e) = client.publish(reply, kind.into()).await {
        tracing::warn!(error = %e, "cannot acknowledge a JetStream message; it will be redelivered");
    }
}
