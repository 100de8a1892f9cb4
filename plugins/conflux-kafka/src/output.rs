//! `kafka` output.

use std::collections::BTreeMap;
use std::time::Duration as StdDuration;

use conflux_api::config::Duration;
use conflux_api::template::Template;
use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, FailedEvent, Output, OutputConfig, PluginError,
    Registration,
};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use schemars::JsonSchema;
use serde::Deserialize;

/// Compression of produced batches (consumers decompress transparently).
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Uncompressed.
    #[default]
    None,
    /// Widely supported; the most CPU per byte.
    Gzip,
    /// Fast, with a modest ratio.
    Snappy,
    /// Fastest, with a ratio close to `snappy`'s.
    Lz4,
    /// Best ratio for JSON at little CPU cost; needs brokers from Kafka 2.1 on.
    Zstd,
}

impl Compression {
    /// librdkafka's `compression.type` value.
    fn codec(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// Produces each event's payload as JSON to Kafka.
///
/// A batch is acknowledged once every delivery report confirmed it (with
/// `acks=all`); a failed report fails the write and the engine retries it.
/// The producer is idempotent by default, so retries inside librdkafka
/// neither duplicate nor reorder messages.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaOutputConfig {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Topic, with `{{ field.path }}` or `{{ meta.key }}` taken from each event; an event missing one goes to `error`.
    pub topic: String,
    /// Message key, with `{{ field.path }}` (`{{ data.restaurantId }}`) or `{{ meta.result_key }}`; unset sends no key.
    #[serde(default)]
    pub key: Option<String>,
    /// Headers to add: name → value template.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Compression codec of produced batches (default `none`).
    #[serde(default)]
    pub compression: Compression,
    /// How long librdkafka waits to fill a batch before sending (`linger.ms`) (default 5ms).
    #[serde(default)]
    pub linger: Option<Duration>,
    /// Most messages per produce request (`batch.num.messages`).
    #[serde(default = "default_batch_messages")]
    pub batch_messages: usize,
    /// Idempotent producer: no duplicates or reordering from internal retries.
    #[serde(default = "default_true")]
    pub idempotent: bool,
    /// How long a message may take to be delivered before its report says it failed
    /// (`message.timeout.ms`) (default 30s).
    #[serde(default)]
    pub delivery_timeout: Option<Duration>,
    /// Extra librdkafka producer properties (values are never logged).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn default_batch_messages() -> usize {
    10_000
}

fn default_true() -> bool {
    true
}

impl OutputConfig for KafkaOutputConfig {
    const TYPE: &'static str = "kafka";
    fn build(self, _cx: &BuildContext) -> Result<Box<dyn Output>, BuildError> {
        if self.brokers.is_empty() {
            return Err(BuildError::at(["brokers"], "give at least one broker"));
        }
        let topic = Template::parse(&self.topic).map_err(|e| BuildError::at(["topic"], e.to_string()))?;
        let key =
            self.key.as_deref().map(Template::parse).transpose().map_err(|e| BuildError::at(["key"], e.to_string()))?;
        let headers = self
            .headers
            .iter()
            .map(|(k, v)| {
                Template::parse(v)
                    .map(|t| (k.clone(), t))
                    .map_err(|e| BuildError::at(["headers", k.as_str()], e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Box::new(KafkaOutput { config: self, topic, key, headers, producer: None }))
    }
}

inventory::submit!(Registration::output::<KafkaOutputConfig>());

struct KafkaOutput {
    config: KafkaOutputConfig,
    topic: Template,
    key: Option<Template>,
    headers: Vec<(String, Template)>,
    producer: Option<FutureProducer>,
}

/// Errors about one message that sending it again cannot fix.
fn refuses_the_message(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::InvalidTopic
        )
    )
}

#[async_trait]
impl Output for KafkaOutput {
    async fn connect(&mut self) -> Result<(), PluginError> {
        if self.producer.is_some() {
            return Ok(());
        }
        let c = &self.config;
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", c.brokers.join(","))
            .set("enable.idempotence", c.idempotent.to_string())
            .set("acks", "all")
            .set("compression.type", c.compression.codec())
            .set("linger.ms", c.linger.map_or(5, |d| d.0.as_millis()).to_string())
            .set("batch.num.messages", c.batch_messages.to_string())
            .set("message.timeout.ms", c.delivery_timeout.map_or(30_000, |d| d.0.as_millis()).to_string());
        for (k, v) in &c.options {
            config.set(k, v);
        }
        let producer: FutureProducer =
            config.create().map_err(|e| PluginError::fatal(format!("invalid Kafka producer settings: {e}")))?;
        self.producer = Some(producer);
        Ok(())
    }

    async fn write(&self, batch: &Batch) -> Result<(), PluginError> {
        let producer = self.producer.as_ref().ok_or_else(|| PluginError::not_connected("not connected"))?;
        let mut reports = Vec::with_capacity(batch.len());
        // Events that can never be sent (a template field missing, too
        // large); the rest of the batch goes on without them.
        let mut refused = Vec::new();
        for (index, event) in batch.iter().enumerate() {
            let rendered = (|| {
                let topic = self.topic.render(event).map_err(|e| format!("topic: {e}"))?;
                let key = self.key.as_ref().map(|k| k.render(event)).transpose().map_err(|e| format!("key: {e}"))?;
                let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
                for (name, template) in &self.headers {
                    let value = template.render(event).map_err(|e| format!("header `{name}`: {e}"))?;
                    headers = headers.insert(Header { key: name, value: Some(value.as_bytes()) });
                }
                Ok::<_, String>((topic, key, headers))
            })();
            let (topic, key, headers) = match rendered {
                Ok(parts) => parts,
                Err(reason) => {
                    refused.push(FailedEvent::new(index, reason));
                    continue;
                }
            };
            // The payload's own text when it still has it.
            let mut payload = Vec::new();
            event.data.write_json(&mut payload);
            let mut record = FutureRecord::to(&topic).payload(&payload).headers(headers);
            if let Some(key) = &key {
                record = record.key(key);
            }
            loop {
                match producer.send_result(record) {
                    Ok(report) => {
                        reports.push((index, report));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // librdkafka's queue is full: let it send some before enqueueing more.
                        record = back;
                        producer.poll(StdDuration::from_millis(0));
                        tokio::time::sleep(StdDuration::from_millis(5)).await;
                    }
                    Err((e, _)) if refuses_the_message(&e) => {
                        refused.push(FailedEvent::new(index, format!("Kafka refuses the message: {e}")));
                        break;
                    }
                    Err((e, _)) => return Err(PluginError::retryable(format!("cannot enqueue a message: {e}"))),
                }
            }
        }
        let (indexes, reports): (Vec<usize>, Vec<_>) = reports.into_iter().unzip();
        for (index, report) in indexes.into_iter().zip(futures_util::future::join_all(reports).await) {
            match report {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) if refuses_the_message(&e) => {
                    refused.push(FailedEvent::new(index, format!("Kafka refuses the message: {e}")))
                }
                Ok(Err((e, _))) => return Err(PluginError::retryable(format!("delivery failed: {e}"))),
                Err(_) => return Err(PluginError::retryable("delivery report lost")),
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            refused.sort_by_key(|f| f.index);
            Err(PluginError::Partial(refused))
        }
    }

    async fn close(&mut self) -> Result<(), PluginError> {
        if let Some(producer) = &self.producer {
            producer
                .flush(StdDuration::from_secs(10))
                .map_err(|e| PluginError::retryable(format!("flush failed: {e}")))?;
        }
        Ok(())
    }
}
