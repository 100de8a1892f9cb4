//! `nats` output.

use async_nats::jetstream::context::PublishAckFuture;
use conflux_api::template::Template;
use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, FailedEvent, Output, OutputConfig, PluginError,
    Registration,
};
use schemars::JsonSchema;
use serde::Deserialize;

/// Publishes each event's payload as JSON to NATS.
///
/// Core publishing is confirmed by a flush (the server has the bytes);
/// with `jetstream: true` each message is confirmed by the stream's
/// acknowledgement, and only then are the events acknowledged.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsOutputConfig {
    /// Server URL(s), comma-separated.
    #[serde(default = "crate::default_url")]
    pub url: String,
    /// Subject, with `{{ field.path }}` or `{{ meta.key }}` taken from each event (`events.{{ type }}`); an event missing one goes to `error`.
    pub subject: String,
    /// Publish through JetStream and wait for the stream's acknowledgement.
    #[serde(default)]
    pub jetstream: bool,
}

impl OutputConfig for NatsOutputConfig {
    const TYPE: &'static str = "nats";
    fn build(self, _cx: &BuildContext) -> Result<Box<dyn Output>, BuildError> {
        let subject = Template::parse(&self.subject).map_err(|e| BuildError::at(["subject"], e.to_string()))?;
        Ok(Box::new(NatsOutput { config: self, subject, client: None }))
    }
}

inventory::submit!(Registration::output::<NatsOutputConfig>());

struct NatsOutput {
    config: NatsOutputConfig,
    subject: Template,
    client: Option<(async_nats::Client, async_nats::jetstream::Context)>,
}

#[async_trait]
impl Output for NatsOutput {
    async fn connect(&mut self) -> Result<(), PluginError> {
        let client = async_nats::connect(&self.config.url)
            .await
            .map_err(|e| PluginError::not_connected(format!("cannot connect to NATS: {e}")))?;
        let js = async_nats::jetstream::new(client.clone());
        self.client = Some((client, js));
        Ok(())
    }

    async fn write(&self, batch: &Batch) -> Result<(), PluginError> {
        let (client, js) = self.client.as_ref().ok_or_else(|| PluginError::not_connected("not connected"))?;
        let mut pending: Vec<PublishAckFuture> = Vec::new();
        // Events whose subject cannot be rendered; the rest go on without them.
        let mut refused = Vec::new();
        for (index, event) in batch.iter().enumerate() {
            let subject = match self.subject.render(event) {
                Ok(subject) => subject,
                Err(e) => {
                    refused.push(FailedEvent::new(index, format!("subject: {e}")));
                    continue;
                }
            };
            // The payload's own text when it still has it.
            let mut payload = Vec::new();
            event.data.write_json(&mut payload);
            if self.config.jetstream {
                let ack = js
                    .publish(subject, payload.into())
                    .await
                    .map_err(|e| PluginError::retryable(format!("JetStream publish failed: {e}")))?;
                pending.push(ack);
            } else {
                client
                    .publish(subject, payload.into())
                    .await
                    .map_err(|e| PluginError::retryable(format!("publish failed: {e}")))?;
            }
        }
        if self.config.jetstream {
            for ack in
                futures_util::future::join_all(pending.into_iter().map(std::future::IntoFuture::into_future)).await
            {
                ack.map_err(|e| PluginError::retryable(format!("JetStream did not confirm: {e}")))?;
            }
        } else {
            client.flush().await.map_err(|e| PluginError::retryable(format!("flush failed: {e}")))?;
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(PluginError::Partial(refused))
        }
    }

    async fn close(&mut self) -> Result<(), PluginError> {
        if let Some((client, _)) = &self.client {
            client.flush().await.map_err(|e| PluginError::retryable(format!("flush failed: {e}")))?;
        }
        Ok(())
    }
}
