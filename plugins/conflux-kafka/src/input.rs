//! `kafka` input.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use conflux_api::config::Duration;
use conflux_api::sonic_rs::JsonValueMutTrait;
use conflux_api::{
    async_trait, inventory, AckToken, BuildContext, BuildError, BuiltInput, Emitter, Event, Input, InputConfig,
    PluginError, PortId, Registration, Timestamp, Value,
};
use futures_util::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::tracker::{Tp, Tracker};

/// Where a group with no committed offset starts reading.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// The oldest retained message.
    #[default]
    Earliest,
    /// Only messages produced from now on.
    Latest,
}

/// Consumes Kafka topics in a consumer group.
///
/// Offsets are committed only for events the pipeline acknowledged, in
/// order per partition: an unacknowledged event holds back the commit of
/// everything after it. A failed event makes the partition seek back to it
/// (redelivery); rejected events count as done. With more than
/// `max_unacked` events in flight the input pauses its partitions until the
/// pipeline catches up. Partitions revoked in a rebalance commit what is
/// done and forget the rest (the next owner reads it again). Metadata:
/// `kafka.topic`, `kafka.partition`, `kafka.offset`, `kafka.key`,
/// `kafka.headers`, `kafka.timestamp` (ms). Payloads that are not JSON go
/// to port `invalid` as text.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaInputConfig {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Topics; a name starting with `^` is a regular expression.
    pub topics: Vec<String>,
    /// Consumer group id: instances in one group share the partitions.
    pub group: String,
    /// Where to start without a committed offset.
    #[serde(default)]
    pub start: StartAt,
    /// Most events per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Most events in flight (read, not yet acknowledged) before pausing.
    #[serde(default = "default_max_unacked")]
    pub max_unacked: usize,
    /// How often acknowledged offsets are committed.
    #[serde(default)]
    pub commit_interval: Option<Duration>,
    /// Extra librdkafka consumer properties (values are never logged).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn default_batch_size() -> usize {
    1024
}

fn default_max_unacked() -> usize {
    100_000
}

impl InputConfig for KafkaInputConfig {
    const TYPE: &'static str = "kafka";
    fn build(self, _cx: &BuildContext) -> Result<BuiltInput, BuildError> {
        if self.brokers.is_empty() {
            return Err(BuildError::at(["brokers"], "give at least one broker"));
        }
        if self.topics.is_empty() {
            return Err(BuildError::at(["topics"], "give at least one topic"));
        }
        if self.batch_size == 0 || self.max_unacked == 0 {
            return Err(BuildError::new("batch_size and max_unacked must be at least 1"));
        }
        Ok(BuiltInput::new(KafkaInput {
            config: self,
            consumer: None,
            tracker: Arc::new(Mutex::new(Tracker::default())),
            last_commit: std::time::Instant::now(),
            paused: None,
        })
        .with_ports(&["invalid"]))
    }
}

inventory::submit!(Registration::input::<KafkaInputConfig>());

/// Commits what is done for partitions taken away in a rebalance.
struct Context {
    tracker: Arc<Mutex<Tracker>>,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else { return };
        let mut commit = TopicPartitionList::new();
        {
            let mut tracker = self.tracker.lock().expect("tracker");
            for elem in revoked.elements() {
                let tp: Tp = (Arc::from(elem.topic()), elem.partition());
                if let Some(offset) = tracker.reset(&tp, false) {
                    let _ = commit.add_partition_offset(elem.topic(), elem.partition(), Offset::Offset(offset));
                }
            }
        }
        if commit.count() > 0 {
            if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                tracing::warn!(error = %e, "commit on rebalance failed; those events will be read again");
            }
        }
        tracing::info!(partitions = revoked.count(), "partitions revoked");
    }
}

struct KafkaInput {
    config: KafkaInputConfig,
    consumer: Option<StreamConsumer<Context>>,
    tracker: Arc<Mutex<Tracker>>,
    last_commit: std::time::Instant,
    paused: Option<TopicPartitionList>,
}

const INVALID: PortId = PortId(1);

impl KafkaInput {
    fn commit_interval(&self) -> StdDuration {
        self.config.commit_interval.map_or(StdDuration::from_secs(1), |d| d.0)
    }

    /// Commits what is due, seeks failed partitions back, pauses or resumes.
    fn maintain(&mut self, mode: CommitMode) -> Result<(), PluginError> {
        let Some(consumer) = &self.consumer else { return Ok(()) };
        let (due, failed, unacked) = {
            let mut tracker = self.tracker.lock().expect("tracker");
            let failed = tracker.take_failed();
            (tracker.due(), failed, tracker.unacked)
        };
        for ((topic, partition), offset) in failed {
            tracing::warn!(topic = %topic, partition, offset, "delivery failed; reading again from the failed offset");
            if let Err(e) = consumer.seek(&topic, partition, Offset::Offset(offset), StdDuration::from_secs(5)) {
                return Err(PluginError::retryable(format!("cannot seek back to redeliver: {e}")));
            }
        }
        if !due.is_empty() && (matches!(mode, CommitMode::Sync) || self.last_commit.elapsed() >= self.commit_interval())
        {
            let mut list = TopicPartitionList::new();
            for ((topic, partition), offset) in &due {
                let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*offset));
            }
            match consumer.commit(&list, mode) {
                Ok(()) => {
                    let mut tracker = self.tracker.lock().expect("tracker");
                    for (tp, offset) in &due {
                        tracker.committed(tp, *offset);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "offset commit failed; retrying later"),
            }
            self.last_commit = std::time::Instant::now();
        }
        let max = self.config.max_unacked;
        match &self.paused {
            None if unacked >= max => {
                let assignment = consumer.assignment().map_err(|e| PluginError::retryable(e.to_string()))?;
                consumer.pause(&assignment).map_err(|e| PluginError::retryable(e.to_string()))?;
                tracing::debug!(unacked, "pausing consumption until the pipeline catches up");
                self.paused = Some(assignment);
            }
            Some(list) if unacked <= max / 2 => {
                consumer.resume(list).map_err(|e| PluginError::retryable(e.to_string()))?;
                self.paused = None;
            }
            _ => {}
        }
        Ok(())
    }

    fn event(
        &self,
        message: &BorrowedMessage<'_>,
        now: Timestamp,
        token: AckToken,
        stream: &Arc<str>,
    ) -> (Event, bool) {
        let payload = message.payload().unwrap_or_default();
        let (data, valid) = match conflux_api::sonic_rs::from_slice::<Value>(payload) {
            Ok(v) => (v, true),
            Err(_) => (Value::from(String::from_utf8_lossy(payload).as_ref()), false),
        };
        let mut event = Event::with_time(data, now).with_ack(token).at(stream, message.offset().max(0) as u64);
        event.meta.insert("kafka.topic", Value::from(message.topic()));
        event.meta.insert("kafka.partition", Value::from(message.partition()));
        event.meta.insert("kafka.offset", Value::from(message.offset()));
        if let Some(key) = message.key() {
            event.meta.insert("kafka.key", Value::from(String::from_utf8_lossy(key).as_ref()));
        }
        if let Some(ts) = message.timestamp().to_millis() {
            event.meta.insert("kafka.timestamp", Value::from(ts));
        }
        if let Some(headers) = message.headers() {
            let mut object = Value::new_object();
            for header in headers.iter() {
                let value = header.value.map(|v| String::from_utf8_lossy(v).into_owned());
                if let Some(map) = object.as_object_mut() {
                    map.insert(header.key, value.map_or(Value::default(), |v| Value::from(v.as_str())));
                }
            }
            event.meta.insert("kafka.headers", object);
        }
        (event, valid)
    }
}

#[async_trait]
impl Input for KafkaInput {
    async fn connect(&mut self) -> Result<(), PluginError> {
        if self.consumer.is_some() {
            return Ok(());
        }
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.config.brokers.join(","))
            .set("group.id", &self.config.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match self.config.start {
                    StartAt::Earliest => "earliest",
                    StartAt::Latest => "latest",
                },
            )
            .set("queued.max.messages.kbytes", "32768");
        for (k, v) in &self.config.options {
            config.set(k, v);
        }
        let consumer: StreamConsumer<Context> =
            config
                .create_with_context(Context { tracker: self.tracker.clone() })
                .map_err(|e| PluginError::fatal(format!("invalid Kafka consumer settings: {e}")))?;
        let topics: Vec<&str> = self.config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| PluginError::not_connected(format!("cannot subscribe: {e}")))?;
        self.consumer = Some(consumer);
        Ok(())
    }

    async fn read(&mut self, out: &mut Emitter) -> Result<bool, PluginError> {
        let tick = self.commit_interval().min(StdDuration::from_millis(200));
        loop {
            self.maintain(CommitMode::Async)?;
            if self.paused.is_some() {
                tokio::time::sleep(StdDuration::from_millis(10)).await;
                continue;
            }
            let consumer = self.consumer.as_ref().ok_or_else(|| PluginError::not_connected("not connected"))?;
            let first = tokio::select! {
                m = consumer.recv() => m,
                _ = tokio::time::sleep(tick) => continue,
            };
            let first = first.map_err(|e| PluginError::retryable(format!("Kafka receive failed: {e}")))?;
            let mut messages = vec![first];
            while messages.len() < self.config.batch_size {
                match consumer.recv().now_or_never() {
                    Some(Ok(m)) => messages.push(m),
                    _ => break,
                }
            }
            // One token per run of consecutive offsets of a partition: the unit Kafka can commit.
            let now = Timestamp::now();
            let mut runs: Vec<(Tp, i64, i64, Vec<usize>)> = Vec::new();
            for (i, m) in messages.iter().enumerate() {
                match runs
                    .iter_mut()
                    .find(|(tp, _, last, _)| &*tp.0 == m.topic() && tp.1 == m.partition() && *last + 1 == m.offset())
                {
                    Some(run) => {
                        run.2 = m.offset();
                        run.3.push(i);
                    }
                    None => runs.push(((Arc::from(m.topic()), m.partition()), m.offset(), m.offset(), vec![i])),
                }
            }
            let mut events: Vec<Option<(Event, bool)>> = (0..messages.len()).map(|_| None).collect();
            for (tp, first, last, indexes) in runs {
                // Offsets only grow within a partition: the position checkpointing stages compare.
                let stream: Arc<str> = Arc::from(format!("kafka:{}/{}", tp.0, tp.1));
                let generation = self.tracker.lock().expect("tracker").track(&tp, first, last);
                let tracker = self.tracker.clone();
                let token =
                    AckToken::new(move |status| tracker.lock().expect("tracker").done(&tp, first, generation, status));
                for i in indexes {
                    events[i] = Some(self.event(&messages[i], now, token.clone(), &stream));
                }
            }
            drop(messages);
            for (event, valid) in events.into_iter().flatten() {
                if valid {
                    out.emit(event);
                } else {
                    out.fail_to_invalid(event);
                }
            }
            return Ok(true);
        }
    }

    async fn close(&mut self) {
        // The pipeline drains while we wait: commit what it acknowledges, for a while.
        let deadline = std::time::Instant::now() + StdDuration::from_secs(10);
        while self.tracker.lock().expect("tracker").unacked > 0 && std::time::Instant::now() < deadline {
            let _ = self.maintain(CommitMode::Async);
            tokio::time::sleep(StdDuration::from_millis(20)).await;
        }
        let _ = self.maintain(CommitMode::Sync);
        if let Some(consumer) = self.consumer.take() {
            consumer.unsubscribe();
        }
    }
}

trait InvalidPort {
    fn fail_to_invalid(&mut self, event: Event);
}

impl InvalidPort for Emitter {
    fn fail_to_invalid(&mut self, mut event: Event) {
        event.meta.insert(conflux_api::component::ERROR_META, Value::from("payload is not JSON"));
        self.emit_to(INVALID, event);
    }
}
