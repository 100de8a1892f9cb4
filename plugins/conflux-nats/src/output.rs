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
    /// With `jetstream`, the `Nats-Msg-Id` of each message, a template such as `{{ id }}`:
    /// the stream drops a message whose id it saw within its duplicate window (2 minutes
    /// unless the stream says otherwise), so a write retried after a lost connection is
    /// stored once. Unset, aggregate results get `<result_key>@<result_revision>` (a replay
    /// writes each revision once) and other events no id. An event missing a value goes to
    /// `error`.
    #[serde(default)]
    pub msg_id: Option<String>,
}

impl OutputConfig for NatsOutputConfig {
    const TYPE: &'static str = "nats";
    fn build(self, _cx: &BuildContext) -> Result<Box<dyn Output>, BuildError> {
        let subject = Template::parse(&self.subject).map_err(|e| BuildError::at(["subject"], e.to_string()))?;
        let msg_id = match &self.msg_id {
            Some(_) if !self.jetstream => {
                return Err(BuildError::at(
                    ["msg_id"],
                    "msg_id needs `jetstream: true` (core NATS has no deduplication)",
                ))
            }
            Some(text) => Some(Template::parse(text).map_err(|e| BuildError::at(["msg_id"], e.to_string()))?),
            None => None,
        };
        Ok(Box::new(NatsOutput { config: self, subject, msg_id, client: None }))
    }
}

inventory::submit!(Registration::output::<NatsOutputConfig>());

/// An aggregate result's identity, `<result_key>@<result_revision>`: the same
/// revision of the same window is the same message.
fn result_id(event: &conflux_api::Event) -> Option<String> {
    use conflux_api::component::{RESULT_KEY_META, RESULT_REVISION_META};
    use conflux_api::sonic_rs::JsonValueTrait;
    let key = event.meta.get(RESULT_KEY_META)?.as_str()?;
    let revision = event.meta.get(RESULT_REVISION_META)?.as_u64()?;
    Some(format!("{key}@{revision}"))
}

struct NatsOutput {
    config: NatsOutputConfig,
    subject: Template,
    msg_id: Option<Template>,
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
                let id = match &self.msg_id {
                    Some(template) => match template.render(event) {
                        Ok(id) => Some(id),
                        Err(e) => {
                            refused.push(FailedEvent::new(index, format!("msg_id: {e}")));
                            continue;
                        }
                    },
                    None => result_id(event),
                };
                let mut headers = async_nats::HeaderMap::new();
                if let Some(id) = id {
                    headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
                }
                let ack = js
                    .publish_with_headers(subject, headers, payload.into())
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
