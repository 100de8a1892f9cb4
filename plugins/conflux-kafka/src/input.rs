//! `kafka` input.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration as StdDuration, Instant};

use conflux_api::config::Duration;
use conflux_api::metrics::{Counter, Gauge};
use conflux_api::sonic_rs::JsonValueMutTrait;
use conflux_api::{
    async_trait, inventory, AckToken, BuildContext, BuildError, BuiltInput, Emitter, Event, Input, InputConfig,
    PluginError, PortId, Registration, Timestamp, Value,
};
use futures_util::{FutureExt, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::tracker::{Backoff, Tp, Tracker};

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
/// everything after it. A failed event pauses its partition, which reads
/// again from that event after `redelivery_backoff` (doubling with each
/// consecutive failure up to `max_redelivery_backoff`, back to the start
/// after a success), so a failing output does not spin the consumer;
/// rejected events count as done. At most `max_unacked` events are in
/// flight: at that point the input pauses its partitions until the pipeline
/// has acknowledged half of them. Partitions revoked in a rebalance commit what is
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
    /// Where to start without a committed offset (default `earliest`).
    #[serde(default)]
    pub start: StartAt,
    /// Most events per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Most events in flight (read, not yet acknowledged) before pausing.
    #[serde(default = "default_max_unacked")]
    pub max_unacked: usize,
    /// How often acknowledged offsets are committed (default 1s).
    #[serde(default)]
    pub commit_interval: Option<Duration>,
    /// Wait before reading a failed event again (default 100ms); doubles with each consecutive failure.
    #[serde(default)]
    pub redelivery_backoff: Option<Duration>,
    /// Longest wait before reading a failed event again (default 10s).
    #[serde(default)]
    pub max_redelivery_backoff: Option<Duration>,
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
    fn build(self, cx: &BuildContext) -> Result<BuiltInput, BuildError> {
        if self.brokers.is_empty() {
            return Err(BuildError::at(["brokers"], "give at least one broker"));
        }
        if self.topics.is_empty() {
            return Err(BuildError::at(["topics"], "give at least one topic"));
        }
        if self.batch_size == 0 || self.max_unacked == 0 {
            return Err(BuildError::new("batch_size and max_unacked must be at least 1"));
        }
        let backoff = Backoff {
            initial: self.redelivery_backoff.map_or(StdDuration::from_millis(100), |d| d.0),
            max: self.max_redelivery_backoff.map_or(StdDuration::from_secs(10), |d| d.0),
        };
        if backoff.initial > backoff.max {
            return Err(BuildError::at(["redelivery_backoff"], "must not exceed max_redelivery_backoff"));
        }
        Ok(BuiltInput::new(KafkaInput {
            config: self,
            consumer: None,
            tracker: Arc::new(Mutex::new(Tracker::default())),
            last_commit: Instant::now(),
            held: false,
            backoff,
            paused_partitions: cx
                .gauge("kafka_paused_partitions", "Partitions paused: pipeline full, or waiting after a failure"),
            redeliveries: cx.counter("kafka_redeliveries", "Seeks back to read a failed event again"),
        })
        .with_ports(&["invalid"]))
    }
}

inventory::submit!(Registration::input::<KafkaInputConfig>());

/// Commits what is done for partitions taken away in a rebalance, and
/// says when partitions arrive: joining a group takes 15–30 s in which the
/// input would otherwise be silent.
struct Context {
    tracker: Arc<Mutex<Tracker>>,
    /// When the consumer subscribed; cleared at the first assignment.
    waiting_since: Mutex<Option<Instant>>,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else { return };
        let mut commit = TopicPartitionList::new();
        let mut waiting = TopicPartitionList::new();
        {
            let mut tracker = self.tracker.lock().expect("tracker");
            for elem in revoked.elements() {
                let tp: Tp = (Arc::from(elem.topic()), elem.partition());
                if tracker.waiting(&tp) {
                    waiting.add_partition(elem.topic(), elem.partition());
                }
                if let Some(offset) = tracker.reset(&tp, false) {
                    let _ = commit.add_partition_offset(elem.topic(), elem.partition(), Offset::Offset(offset));
                }
            }
        }
        // Forgotten with their state, so no pause of ours may outlive them (the next owner starts fresh).
        if waiting.count() > 0 {
            let _ = consumer.resume(&waiting);
        }
        if commit.count() > 0 {
            if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                tracing::warn!(error = %e, "commit on rebalance failed; those events will be read again");
            }
        }
        tracing::info!(partitions = revoked.count(), "partitions revoked");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(assigned) = rebalance else { return };
        let waited = self.waiting_since.lock().expect("waiting_since").take().map(|since| since.elapsed());
        match waited {
            Some(waited) => {
                tracing::info!(partitions = assigned.count(), ?waited, "consumer group joined; partitions assigned")
            }
            None => tracing::info!(partitions = assigned.count(), "partitions assigned"),
        }
    }
}

struct KafkaInput {
    config: KafkaInputConfig,
    consumer: Option<StreamConsumer<Context>>,
    tracker: Arc<Mutex<Tracker>>,
    last_commit: Instant,
    /// Every partition paused because `max_unacked` events are in flight.
    held: bool,
    backoff: Backoff,
    paused_partitions: Gauge,
    redeliveries: Counter,
}

const INVALID: PortId = PortId(1);

/// Consecutive offsets of one partition read in one batch.
struct Run {
    tp: Tp,
    first: i64,
    last: i64,
}

impl KafkaInput {
    fn commit_interval(&self) -> StdDuration {
        self.config.commit_interval.map_or(StdDuration::from_secs(1), |d| d.0)
    }

    /// Commits what is due, pauses failed partitions and reads them again
    /// once their wait is over, pauses or resumes everything for backpressure.
    fn maintain(&mut self, mode: CommitMode) -> Result<(), PluginError> {
        let Some(consumer) = &self.consumer else { return Ok(()) };
        let now = Instant::now();
        let (due, failed, unacked) = {
            let mut tracker = self.tracker.lock().expect("tracker");
            let failed = tracker.take_failed(now, self.backoff);
            (tracker.due(), failed, tracker.unacked)
        };
        for ((topic, partition), offset, wait) in failed {
            tracing::warn!(topic = %topic, partition, offset, retry_in = ?wait, "delivery failed; the partition reads it again after a pause");
            self.redeliveries.inc();
            let mut list = TopicPartitionList::new();
            list.add_partition(&topic, partition);
            consumer
                .pause(&list)
                .map_err(|e| PluginError::retryable(format!("cannot pause a failed partition: {e}")))?;
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
            self.last_commit = now;
        }
        let max = self.config.max_unacked;
        if !self.held && unacked >= max {
            let assignment = consumer.assignment().map_err(|e| PluginError::retryable(e.to_string()))?;
            consumer.pause(&assignment).map_err(|e| PluginError::retryable(e.to_string()))?;
            tracing::debug!(unacked, "pausing consumption until the pipeline catches up");
            self.held = true;
        } else if self.held && unacked <= max / 2 {
            // Partitions still waiting after a failure stay paused.
            let assignment = consumer.assignment().map_err(|e| PluginError::retryable(e.to_string()))?;
            let mut resume = TopicPartitionList::new();
            {
                let tracker = self.tracker.lock().expect("tracker");
                for elem in assignment.elements() {
                    if !tracker.waiting(&(Arc::from(elem.topic()), elem.partition())) {
                        resume.add_partition(elem.topic(), elem.partition());
                    }
                }
            }
            consumer.resume(&resume).map_err(|e| PluginError::retryable(e.to_string()))?;
            self.held = false;
        }
        if !self.held {
            let retries = self.tracker.lock().expect("tracker").due_retries(now);
            for ((topic, partition), offset) in retries {
                let mut list = TopicPartitionList::new();
                list.add_partition(&topic, partition);
                // Seek after resuming: a resume restarts fetching where the application stopped reading.
                let seek = consumer
                    .resume(&list)
                    .and_then(|()| consumer.seek(&topic, partition, Offset::Offset(offset), StdDuration::from_secs(5)));
                if let Err(e) = seek {
                    // Reading on past the failed offset would lose it: stay paused and try again.
                    let _ = consumer.pause(&list);
                    let retry_at = Instant::now() + self.backoff.initial;
                    self.tracker.lock().expect("tracker").retry_later(&(topic, partition), offset, retry_at);
                    return Err(PluginError::retryable(format!("cannot seek back to redeliver: {e}")));
                }
            }
        }
        let paused = if self.held {
            consumer.assignment().map_or(0, |a| a.count())
        } else {
            self.tracker.lock().expect("tracker").waiting_count()
        };
        self.paused_partitions.set(paused as i64);
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
        let (data, valid) = match conflux_api::Payload::from_json(payload) {
            Ok(v) => (v, true),
            Err(_) => (Value::from(String::from_utf8_lossy(payload).as_ref()).into(), false),
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
            .set("queued.max.messages.kbytes", "32768")
            // With a full prefetch queue librdkafka stops fetching for this long (default 1 s): the
            // queue drains in far less, and the consumer then sat idle for most of each second.
            .set("fetch.queue.backoff.ms", "10");
        for (k, v) in &self.config.options {
            config.set(k, v);
        }
        let consumer: StreamConsumer<Context> = config
            .create_with_context(Context {
                tracker: self.tracker.clone(),
                waiting_since: Mutex::new(Some(Instant::now())),
            })
            .map_err(|e| PluginError::fatal(format!("invalid Kafka consumer settings: {e}")))?;
        let topics: Vec<&str> = self.config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| PluginError::not_connected(format!("cannot subscribe: {e}")))?;
        tracing::info!(
            group = %self.config.group,
            topics = ?self.config.topics,
            "subscribed; waiting for the consumer group to assign partitions (a join can take 15-30 s)"
        );
        self.consumer = Some(consumer);
        Ok(())
    }

    async fn read(&mut self, out: &mut Emitter) -> Result<bool, PluginError> {
        let tick = self.commit_interval().min(StdDuration::from_millis(200));
        loop {
            self.maintain(CommitMode::Async)?;
            if self.held {
                tokio::time::sleep(StdDuration::from_millis(10)).await;
                continue;
            }
            let (room, next_retry, any_waiting) = {
                let tracker = self.tracker.lock().expect("tracker");
                let next = tracker.next_retry();
                (self.config.max_unacked.saturating_sub(tracker.unacked), next, next.is_some())
            };
            // Wake up for the next partition due to read a failed event again, or to commit.
            let wait = next_retry.map_or(tick, |at| at.saturating_duration_since(Instant::now()).min(tick));
            let consumer = self.consumer.as_ref().ok_or_else(|| PluginError::not_connected("not connected"))?;
            // One stream for the whole batch: creating one per message registers a waker each time.
            let mut stream = consumer.stream();
            let first = tokio::select! {
                m = stream.next() => m.expect("Kafka streams never end"),
                _ = tokio::time::sleep(wait) => continue,
            };
            let first = first.map_err(|e| PluginError::retryable(format!("Kafka receive failed: {e}")))?;
            // Never more than `max_unacked` in flight: the batch takes only what is left of it.
            let limit = self.config.batch_size.min(room).max(1);
            let mut messages = Vec::with_capacity(limit.min(1024));
            messages.push(first);
            while messages.len() < limit {
                match stream.next().now_or_never() {
                    Some(Some(Ok(m))) => messages.push(m),
                    _ => break,
                }
            }
            drop(stream);
            if any_waiting {
                // Read before a failed partition paused: it will be read again from the failed offset.
                let tracker = self.tracker.lock().expect("tracker");
                messages.retain(|m| !tracker.waiting(&(Arc::from(m.topic()), m.partition())));
            }
            // One token per run of consecutive offsets of a partition: the unit Kafka can commit.
            let mut runs: Vec<Run> = Vec::new();
            let mut run_of: Vec<usize> = Vec::with_capacity(messages.len());
            for m in &messages {
                let (partition, offset) = (m.partition(), m.offset());
                let topic = m.topic();
                let found = runs.iter().rposition(|r| r.tp.1 == partition && r.last + 1 == offset && &*r.tp.0 == topic);
                match found {
                    Some(r) => {
                        runs[r].last = offset;
                        run_of.push(r);
                    }
                    None => {
                        let tp: Tp = (Arc::from(topic), partition);
                        runs.push(Run { tp, first: offset, last: offset });
                        run_of.push(runs.len() - 1);
                    }
                }
            }
            let mut tokens = Vec::with_capacity(runs.len());
            let mut streams = Vec::with_capacity(runs.len());
            {
                let mut tracker = self.tracker.lock().expect("tracker");
                for Run { tp, first, last } in runs {
                    let generation = tracker.track(&tp, first, last);
                    // Offsets only grow within a partition: the position checkpointing stages compare.
                    streams.push(Arc::<str>::from(format!("kafka:{}/{}", tp.0, tp.1)));
                    let shared = self.tracker.clone();
                    tokens.push(AckToken::new(move |status| {
                        shared.lock().expect("tracker").done(&tp, first, generation, status)
                    }));
                }
            }
            let now = Timestamp::now();
            for (m, r) in messages.iter().zip(run_of) {
                let (event, valid) = self.event(m, now, tokens[r].clone(), &streams[r]);
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
