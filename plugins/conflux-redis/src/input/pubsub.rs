//! Pub/sub: `SUBSCRIBE` to channels and `PSUBSCRIBE` to patterns on one
//! connection. Redis keeps nothing for a subscriber: a message published
//! while the connection is down is never seen (at most once), so events
//! carry no acknowledgement and no position.

use conflux_api::{async_trait, Emitter, Event, Input, Payload, PluginError, Timestamp, Value};
use futures_util::{FutureExt, StreamExt};
use redis::aio::PubSubStream;

use super::entries::NOT_JSON;
use super::INVALID;

pub(super) struct PubSubReader {
    client: redis::Client,
    /// The URL with its password masked.
    shown: String,
    channels: Vec<String>,
    patterns: Vec<String>,
    batch_size: usize,
    messages: Option<PubSubStream>,
}

impl PubSubReader {
    pub fn new(
        client: redis::Client,
        shown: String,
        channels: Vec<String>,
        patterns: Vec<String>,
        batch_size: usize,
    ) -> Self {
        PubSubReader { client, shown, channels, patterns, batch_size, messages: None }
    }
}

#[async_trait]
impl Input for PubSubReader {
    async fn connect(&mut self) -> Result<(), PluginError> {
        self.messages = None;
        let lost = |what: &str, e: redis::RedisError| {
            PluginError::not_connected(format!("Redis at {}: {what}: {e}", self.shown))
        };
        let mut pubsub = self.client.get_async_pubsub().await.map_err(|e| lost("cannot connect", e))?;
        for channel in &self.channels {
            pubsub.subscribe(channel).await.map_err(|e| lost("cannot subscribe", e))?;
        }
        for pattern in &self.patterns {
            pubsub.psubscribe(pattern).await.map_err(|e| lost("cannot subscribe to a pattern", e))?;
        }
        self.messages = Some(pubsub.into_on_message());
        Ok(())
    }

    async fn read(&mut self, out: &mut Emitter) -> Result<bool, PluginError> {
        let messages = self.messages.as_mut().ok_or_else(|| PluginError::not_connected("not subscribed"))?;
        let Some(first) = messages.next().await else {
            self.messages = None;
            return Err(PluginError::not_connected(format!(
                "Redis at {}: the subscription connection closed; messages published until it is back are missed",
                self.shown
            )));
        };
        let now = Timestamp::now();
        route(out, &first, now);
        for _ in 1..self.batch_size {
            match messages.next().now_or_never() {
                Some(Some(message)) => route(out, &message, now),
                _ => break,
            }
        }
        Ok(true)
    }
}

/// A message as an event: on, or to port `invalid` when it is not JSON.
fn route(out: &mut Emitter, message: &redis::Msg, now: Timestamp) {
    let body = message.get_payload_bytes();
    let (data, valid) = match Payload::from_json(body) {
        Ok(data) => (data, true),
        Err(_) => (Value::from(String::from_utf8_lossy(body).as_ref()).into(), false),
    };
    let mut event = Event::with_time(data, now);
    event.meta.insert("redis.channel", Value::from(message.get_channel_name()));
    if message.from_pattern() {
        if let Ok(pattern) = message.get_pattern::<String>() {
            event.meta.insert("redis.pattern", Value::from(pattern.as_str()));
        }
    }
    if valid {
        out.emit(event);
    } else {
        event.meta.insert(conflux_api::component::ERROR_META, Value::from(NOT_JSON));
        out.emit_to(INVALID, event);
    }
}
