//! The intake both receiving servers share: the queue into the pipeline,
//! schema checks, acknowledgement waiting and the rate limiter's buckets.
//! Each request (or WebSocket message) becomes one batch with one
//! acknowledgement token.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use axum::http::StatusCode;
use conflux_api::config::{ByteSize, Duration, Rate};
use conflux_api::{AckStatus, AckToken, Batch, BuildContext, BuildError, Event, Timestamp, Value};
use conflux_validate::EventSchema;
use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::auth::Identity;

/// When the server answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// `202` as soon as the events are queued into the pipeline.
    #[default]
    Async,
    /// `200` only once every output confirmed the events; `5xx` if they failed.
    Sync,
}

/// What happens to the valid events of a batch in which some break the schema.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PartialMode {
    /// Refuse the whole batch: nothing is queued; `422` with `violations`, one
    /// `{index, path, reason}` per violation (`index`: the event's position in the batch).
    #[default]
    RejectAll,
    /// Queue the valid events and answer as usual (`202`, or `200` with `ack: sync`) with
    /// `accepted` (how many were queued) and `violations` for the refused ones; `422` only
    /// if none is valid.
    AcceptValid,
}

/// A token bucket per client: `per_client: 100/min` refills 100 tokens a minute.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = with_per_connection_alias)]
pub struct RateLimitConfig {
    /// Sustained rate per client (per connection for `websocket_server`), such as `100/min`.
    #[serde(alias = "per_connection")]
    pub per_client: Rate,
    /// Bucket size: requests allowed in a burst. Defaults to the rate's count.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// schemars does not describe serde aliases: the schema takes
/// `per_connection` (the WebSocket's name) as `per_client`, one of the two required.
fn with_per_connection_alias(schema: &mut schemars::Schema) {
    let Some(object) = schema.as_object_mut() else { return };
    if let Some(per_client) = object.get("properties").and_then(|p| p.get("per_client")).cloned() {
        if let Some(props) = object.get_mut("properties").and_then(|p| p.as_object_mut()) {
            props.insert("per_connection".into(), per_client);
        }
        object.remove("required");
        object.insert(
            "oneOf".into(),
            serde_json::json!([{ "required": ["per_client"] }, { "required": ["per_connection"] }]),
        );
    }
}

impl RateLimitConfig {
    pub fn quota(&self) -> Result<Quota, BuildError> {
        let bad = || BuildError::at(["rate_limit", "per_client"], "rate must be above zero");
        if self.per_client.count == 0 {
            return Err(bad());
        }
        let period = self.per_client.per / self.per_client.count as u32;
        let quota = Quota::with_period(period).ok_or_else(bad)?;
        let burst = self.burst.unwrap_or(self.per_client.count.min(u32::MAX as u64) as u32);
        let burst = NonZeroU32::new(burst)
            .ok_or_else(|| BuildError::at(["rate_limit", "burst"], "burst must be at least 1"))?;
        Ok(quota.allow_burst(burst))
    }
}

/// Per-client token buckets.
pub struct Limiter {
    limiter: governor::DefaultKeyedRateLimiter<String>,
}

impl Limiter {
    pub fn new(quota: Quota) -> Self {
        Limiter { limiter: RateLimiter::keyed(quota) }
    }

    /// `Err(seconds to wait)` when the client is over its rate.
    pub fn check(&self, client: &str) -> Result<(), u64> {
        self.limiter.check_key(&client.to_string()).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }

    /// Forgets idle clients so the table stays small.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// An answer, the same for HTTP and WebSocket.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: serde_json::Value,
    pub retry_after: Option<u64>,
}

impl Reply {
    pub fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Reply { status, body: json!({ "error": message.into() }), retry_after: None }
    }

    pub fn retry(status: StatusCode, message: impl Into<String>, seconds: u64) -> Self {
        Reply { retry_after: Some(seconds.max(1)), ..Reply::error(status, message) }
    }
}

/// Shared by every request of one server.
pub struct Intake {
    pub tx: mpsc::Sender<Batch>,
    pub schema: Option<Arc<EventSchema>>,
    pub partial: PartialMode,
    pub ack: AckMode,
    pub queue_timeout: StdDuration,
    pub ack_timeout: StdDuration,
    /// Body bytes of requests whose events are still in the pipeline.
    pub held: Arc<AtomicUsize>,
    /// Most body bytes in flight (`max_queue_bytes`): a count of requests
    /// alone let 20,000 bodies of 153 KiB reach 428 MB.
    pub max_bytes: usize,
}

/// Body bytes counted in [`Intake::held`] until the request's events are done.
struct Held {
    held: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The intake's options (queue, acknowledgement, schema), as
/// [`server_config!`](crate::server_config)`{ intake; … }` declares them.
#[derive(Debug, Clone)]
pub struct IntakeOptions {
    pub ack: AckMode,
    pub queue_timeout: Option<Duration>,
    pub ack_timeout: Option<Duration>,
    pub queue: usize,
    pub max_queue_bytes: ByteSize,
    pub schema: Option<PathBuf>,
    pub partial: PartialMode,
}

pub(crate) fn default_queue() -> usize {
    256
}

pub(crate) fn default_max_queue_bytes() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}

impl IntakeOptions {
    /// The intake and the receiving end of its queue, for the input half.
    pub fn build(self, cx: &BuildContext) -> Result<(Arc<Intake>, mpsc::Receiver<Batch>), BuildError> {
        if self.queue == 0 {
            return Err(BuildError::at(["queue"], "queue must be at least 1"));
        }
        let schema = self
            .schema
            .map(|p| {
                EventSchema::load(&cx.resolve(&p)).map(Arc::new).map_err(|e| BuildError::at(["schema"], e.to_string()))
            })
            .transpose()?;
        let (tx, rx) = mpsc::channel(self.queue);
        let intake = Intake {
            tx,
            schema,
            partial: self.partial,
            ack: self.ack,
            queue_timeout: self.queue_timeout.map_or(StdDuration::from_secs(1), |d| d.0),
            ack_timeout: self.ack_timeout.map_or(StdDuration::from_secs(30), |d| d.0),
            held: Arc::default(),
            max_bytes: usize::try_from(self.max_queue_bytes.0).unwrap_or(usize::MAX),
        };
        Ok((Arc::new(intake), rx))
    }
}

impl Intake {
    /// Counts `bytes` as in flight, or `None` past `max_bytes` (a body
    /// larger than the whole budget still passes when nothing else is held).
    fn hold(&self, bytes: usize) -> Option<Held> {
        let mut current = self.held.load(Ordering::Acquire);
        loop {
            if current > 0 && current.saturating_add(bytes) > self.max_bytes {
                return None;
            }
            match self.held.compare_exchange_weak(current, current + bytes, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Held { held: self.held.clone(), bytes }),
                Err(now) => current = now,
            }
        }
    }

    /// Queues payloads as one batch and answers per the ack mode.
    /// `bytes` is the body's size, held against `max_queue_bytes` until
    /// every event of the batch is delivered or failed.
    pub async fn submit(&self, payloads: Vec<Value>, bytes: usize, identity: &Identity, path: &str) -> Reply {
        let mut payloads = payloads;
        let mut refused = Vec::new();
        if let Some(schema) = &self.schema {
            let mut kept = Vec::with_capacity(payloads.len());
            for (index, data) in payloads.into_iter().enumerate() {
                let violations = schema.violations(&data);
                if violations.is_empty() {
                    kept.push(data);
                } else {
                    for v in violations {
                        refused.push(json!({ "index": index, "path": v.path, "reason": v.reason }));
                    }
                }
            }
            payloads = kept;
            if !refused.is_empty() && (self.partial == PartialMode::RejectAll || payloads.is_empty()) {
                return Reply {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    body: json!({ "error": "events do not match the schema", "violations": refused }),
                    retry_after: None,
                };
            }
        }
        let count = payloads.len();
        let Some(held) = self.hold(bytes) else {
            return Reply::retry(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("more than {} bytes of events in flight (max_queue_bytes), retry later", self.max_bytes),
                1,
            );
        };
        let (token, done) = match self.ack {
            AckMode::Sync => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let token = AckToken::new(move |status| {
                    drop(held);
                    let _ = tx.send(status);
                });
                (token, Some(rx))
            }
            AckMode::Async => (
                AckToken::new(move |status| {
                    drop(held);
                    if status != AckStatus::Delivered {
                        tracing::debug!(status = status.as_str(), "events accepted asynchronously were not delivered");
                    }
                }),
                None,
            ),
        };
        let now = Timestamp::now();
        let path_value = Value::from(path);
        let batch: Batch = payloads
            .into_iter()
            .map(|data| {
                let mut event = Event::with_time(data, now).with_ack(token.clone());
                event.meta.insert("http.path", path_value.clone());
                for (k, v) in &identity.meta {
                    event.meta.insert(k.clone(), v.clone());
                }
                event
            })
            .collect();
        drop(token);
        match self.tx.send_timeout(batch, self.queue_timeout).await {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(batch)) => {
                // Never queued: tell the source (metrics) the events errored, the client to come back.
                reject(batch);
                let secs = self.queue_timeout.as_secs().max(1);
                return Reply::retry(StatusCode::SERVICE_UNAVAILABLE, "pipeline is full, retry later", secs);
            }
            Err(mpsc::error::SendTimeoutError::Closed(batch)) => {
                reject(batch);
                return Reply::retry(StatusCode::SERVICE_UNAVAILABLE, "pipeline is shutting down", 5);
            }
        }
        let mut body = json!({ "accepted": count });
        if !refused.is_empty() {
            body["violations"] = serde_json::Value::Array(refused);
        }
        let Some(done) = done else {
            return Reply { status: StatusCode::ACCEPTED, body, retry_after: None };
        };
        match tokio::time::timeout(self.ack_timeout, done).await {
            Ok(Ok(AckStatus::Delivered)) => {
                body["delivered"] = json!(count);
                Reply { status: StatusCode::OK, body, retry_after: None }
            }
            Ok(Ok(AckStatus::Rejected)) => {
                Reply::error(StatusCode::UNPROCESSABLE_ENTITY, "the pipeline rejected the events")
            }
            Ok(Ok(AckStatus::Errored)) | Ok(Err(_)) => {
                Reply::error(StatusCode::BAD_GATEWAY, "delivery failed: an output could not write the events")
            }
            Err(_) => {
                Reply::error(StatusCode::GATEWAY_TIMEOUT, "outputs did not confirm in time; delivery may still happen")
            }
        }
    }
}

/// Fails events that never entered the pipeline.
pub fn reject(batch: Batch) {
    for event in &batch {
        event.ack.mark(AckStatus::Errored);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_api::sonic_rs::JsonValueTrait;

    #[tokio::test]
    async fn events_carry_path_and_identity_and_share_one_token() {
        let (tx, mut rx) = mpsc::channel(4);
        let intake = Intake {
            tx,
            schema: None,
            partial: PartialMode::RejectAll,
            ack: AckMode::Async,
            queue_timeout: StdDuration::from_millis(10),
            ack_timeout: StdDuration::from_secs(1),
            held: Arc::default(),
            max_bytes: 1 << 20,
        };
        let identity = Identity {
            client: Some("sub:u1".into()),
            meta: vec![("auth.subject".into(), Value::from("u1")), ("auth.claim.tenant".into(), Value::from("t1"))],
            ..Identity::default()
        };
        let payloads = vec![Value::new_object(), Value::new_object()];
        let reply = intake.submit(payloads, 2, &identity, "/events").await;
        assert_eq!(reply.status, StatusCode::ACCEPTED);
        let batch = rx.recv().await.unwrap();
        assert_eq!(batch.len(), 2);
        assert!(batch[0].ack.same(&batch[1].ack));
        assert_eq!(batch[0].meta.get("http.path").and_then(|v| v.as_str()), Some("/events"));
        assert_eq!(batch[1].meta.get("auth.subject").and_then(|v| v.as_str()), Some("u1"));
        assert_eq!(batch[1].meta.get("auth.claim.tenant").and_then(|v| v.as_str()), Some("t1"));
    }

    #[test]
    fn limiter_gives_a_retry_after_and_keeps_clients_apart() {
        let quota = RateLimitConfig { per_client: "2/min".parse().unwrap(), burst: None }.quota().unwrap();
        let limiter = Limiter::new(quota);
        assert!(limiter.check("a").is_ok());
        assert!(limiter.check("a").is_ok());
        let wait = limiter.check("a").unwrap_err();
        assert!((1..=30).contains(&wait), "{wait}");
        assert!(limiter.check("b").is_ok());
    }
}
