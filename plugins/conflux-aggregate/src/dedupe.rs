//! The `dedupe` stage: drops repeats of a key seen within a time window.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use conflux_api::config::Duration as ConfigDuration;
use conflux_api::{
    async_trait, inventory, AckStatus, Batch, BuildContext, BuildError, BuiltStage, Emitter, Event, PortId,
    Registration, Stage, StageConfig,
};
use conflux_redis::RedisConn;
use conflux_rhai::{Condition, Limits};
use schemars::JsonSchema;
use serde::Deserialize;
use tracing::warn;

/// Passes the first event of each key and sends repeats within `window` to
/// port `duplicate` (idempotent intake: retried HTTP posts, redelivered messages).
///
/// Keys are kept in memory, oldest first, bounded by `max_keys`; the oldest
/// are forgotten first when the bound bites. With `redis`, keys live in Redis
/// (`SET NX PX`, one round trip per batch) and are shared by every instance.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DedupeConfig {
    /// Rhai expression giving the key, e.g. `event.id` or `event.data.bookingId + ":" + event.type`.
    pub key: String,
    /// How long a key is remembered.
    #[serde(default = "ten_minutes")]
    pub window: ConfigDuration,
    /// Most keys remembered.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// Sandbox limits for the key expression.
    #[serde(default)]
    pub limits: Limits,
    /// Keep keys in Redis instead of memory, shared by several instances.
    #[serde(default)]
    pub redis: Option<RedisKeys>,
}

/// Where shared dedupe keys live.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisKeys {
    /// Redis URL, e.g. `redis://127.0.0.1:6379`.
    pub url: String,
    /// Prefix of every key (default `conflux:dedupe:<pipeline>:<component>:`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// How long a batch waits for Redis (retrying) before its events fail back to their sources.
    #[serde(default = "five_seconds")]
    pub timeout: ConfigDuration,
}

fn five_seconds() -> ConfigDuration {
    ConfigDuration::from_secs(5)
}

fn ten_minutes() -> ConfigDuration {
    ConfigDuration::from_secs(600)
}

fn default_max_keys() -> usize {
    1_000_000
}

impl StageConfig for DedupeConfig {
    const TYPE: &'static str = "dedupe";
    fn build(self, cx: &BuildContext) -> Result<BuiltStage, BuildError> {
        let key = Condition::compile(&self.key, &self.limits).map_err(|e| e.at(["key"]))?;
        if self.max_keys == 0 {
            return Err(BuildError::at(["max_keys"], "max_keys must be at least 1"));
        }
        if self.window.0.as_millis() == 0 {
            return Err(BuildError::at(["window"], "window must be at least 1ms"));
        }
        let memory = match self.redis {
            None => Memory::Local { seen: HashMap::new(), order: VecDeque::new() },
            Some(redis) => Memory::Redis(SharedKeys {
                redis: Box::new(
                    RedisConn::open(redis.url.as_str())
                        .map_err(|e| BuildError::at(["redis", "url"], format!("bad Redis URL: {e}")))?,
                ),
                prefix: redis.prefix.unwrap_or_else(|| format!("conflux:dedupe:{}:{}:", cx.pipeline, cx.component)),
                timeout: redis.timeout.0,
                nonce: fastrand::u64(..),
            }),
        };
        Ok(BuiltStage::new(Dedupe { key, window: self.window.0, max_keys: self.max_keys, memory, keyed: Vec::new() })
            .with_ports(["duplicate"]))
    }
}

inventory::submit!(Registration::stage::<DedupeConfig>());

const DUPLICATE: PortId = PortId(1);

struct Dedupe {
    key: Condition,
    window: Duration,
    max_keys: usize,
    memory: Memory,
    /// The batch's events with their keys, reused between batches.
    keyed: Vec<(Event, String)>,
}

enum Memory {
    /// Key → when it was first seen, and the same keys oldest first for expiry.
    Local {
        seen: HashMap<String, Instant>,
        order: VecDeque<(String, Instant)>,
    },
    Redis(SharedKeys),
}

struct SharedKeys {
    redis: Box<RedisConn>,
    prefix: String,
    timeout: Duration,
    /// Tells this process's writes apart, so a retried batch recognises keys it set itself.
    nonce: u64,
}

impl SharedKeys {
    /// Whether each key is new: `SET key token NX PX window GET` per key, one round
    /// trip. A key already holding our own token was set by an earlier attempt of
    /// this same batch whose reply was lost, so it still counts as new.
    async fn first_seen(&mut self, keys: &[&str], window: Duration, batch: u64) -> Result<Vec<bool>, String> {
        let tokens: Vec<String> = (0..keys.len()).map(|i| format!("{:x}-{batch:x}-{i}", self.nonce)).collect();
        let mut pipe = redis::pipe();
        for (key, token) in keys.iter().zip(&tokens) {
            pipe.cmd("SET")
                .arg(format!("{}{key}", self.prefix))
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(window.as_millis() as u64)
                .arg("GET");
        }
        let backoff = conflux_api::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let previous: Vec<Option<String>> = self
            .redis
            .query_pipe_retrying(&pipe, backoff, self.timeout)
            .await
            .map_err(|e| format!("dedupe keys in Redis are unreachable: {e}"))?;
        Ok(previous.iter().zip(&tokens).map(|(before, ours)| before.as_ref().is_none_or(|b| b == ours)).collect())
    }
}

impl Dedupe {
    fn forget_old(&mut self, now: Instant) {
        let Memory::Local { seen, order } = &mut self.memory else { return };
        while let Some((key, at)) = order.front() {
            let expired = now.duration_since(*at) >= self.window;
            if !expired && order.len() <= self.max_keys {
                break;
            }
            if seen.get(key) == Some(at) {
                seen.remove(key);
            }
            order.pop_front();
        }
    }
}

#[async_trait]
impl Stage for Dedupe {
    async fn process(&mut self, batch: Batch, out: &mut Emitter) {
        let now = Instant::now();
        self.forget_old(now);
        let mut keyed = std::mem::take(&mut self.keyed);
        for mut event in batch {
            match self.key.evaluate(&mut event) {
                Ok(k) if !k.is_unit() => keyed.push((event, k.to_string())),
                Ok(_) => out.fail(event, "dedupe key is empty (the expression returned ())"),
                Err(reason) => out.fail(event, reason),
            }
        }
        match &mut self.memory {
            Memory::Local { seen, order } => {
                for (event, key) in keyed.drain(..) {
                    if seen.get(&key).is_some_and(|at| now.duration_since(*at) < self.window) {
                        out.emit_to(DUPLICATE, event);
                        continue;
                    }
                    seen.insert(key.clone(), now);
                    order.push_back((key, now));
                    out.emit(event);
                }
            }
            Memory::Redis(shared) if !keyed.is_empty() => {
                let keys: Vec<&str> = keyed.iter().map(|(_, k)| k.as_str()).collect();
                match shared.first_seen(&keys, self.window, fastrand::u64(..)).await {
                    Ok(first) => {
                        for ((event, _), first) in keyed.drain(..).zip(first) {
                            if first {
                                out.emit(event);
                            } else {
                                out.emit_to(DUPLICATE, event);
                            }
                        }
                    }
                    Err(reason) => {
                        // Unclassified events go back to their sources to be redelivered, not guessed at.
                        warn!(events = keyed.len(), %reason, "dedupe: failing the batch back to its sources");
                        for (event, _) in keyed.drain(..) {
                            event.ack.mark(AckStatus::Errored);
                        }
                    }
                }
            }
            Memory::Redis(_) => {}
        }
        self.keyed = keyed;
        self.forget_old(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(options: serde_json::Value) -> BuiltStage {
        let config: DedupeConfig = serde_json::from_value(options).unwrap();
        let cx = BuildContext { pipeline: "p".into(), component: "d".into(), ..Default::default() };
        config.build(&cx).map_err(|e| e.message).unwrap()
    }

    fn ev(json: &str) -> Event {
        Event::new(conflux_api::sonic_rs::from_str(json).unwrap())
    }

    async fn ports(s: &mut BuiltStage, events: Vec<Event>) -> Vec<usize> {
        let mut out = Emitter::new(1);
        s.stage.process(events, &mut out).await;
        let mut ports: Vec<(usize, usize)> =
            out.drain().flat_map(|(p, b)| b.into_iter().map(move |_| p).enumerate()).map(|(i, p)| (p, i)).collect();
        ports.sort();
        ports.into_iter().map(|(p, _)| p).collect()
    }

    #[tokio::test]
    async fn repeats_within_the_window_go_to_duplicate() {
        let mut s = stage(serde_json::json!({ "key": "event.id", "window": "100ms" }));
        let got = ports(&mut s, vec![ev(r#"{"id":1}"#), ev(r#"{"id":2}"#), ev(r#"{"id":1}"#)]).await;
        assert_eq!(got, vec![0, 0, 1]);
        assert_eq!(ports(&mut s, vec![ev(r#"{"id":2}"#)]).await, vec![1]);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(ports(&mut s, vec![ev(r#"{"id":2}"#)]).await, vec![0], "forgotten after the window");
        assert_eq!(ports(&mut s, vec![ev(r#"{"other":2}"#)]).await, vec![2], "no key → error port");
    }

    #[tokio::test]
    async fn instances_sharing_redis_see_each_others_keys() {
        let prefix = format!("conflux-test:dedupe:{}:", fastrand::u64(..));
        let options = serde_json::json!({ "key": "event.id", "window": "1m", "redis": { "url": "redis://127.0.0.1:6379", "prefix": prefix } });
        let mut a = stage(options.clone());
        let mut b = stage(options);
        let got = ports(&mut a, vec![ev(r#"{"id":1}"#), ev(r#"{"id":1}"#), ev(r#"{"id":2}"#)]).await;
        assert_eq!(got, vec![0, 0, 1], "a repeat within one batch is a duplicate (Redis must run on 6379)");
        let got = ports(&mut b, vec![ev(r#"{"id":2}"#), ev(r#"{"id":3}"#)]).await;
        assert_eq!(got, vec![0, 1], "the other instance already saw id 2");
    }

    #[tokio::test]
    async fn a_retried_batch_recognises_its_own_keys() {
        let prefix = format!("conflux-test:dedupe:{}:", fastrand::u64(..));
        let mut shared = SharedKeys {
            redis: Box::new(RedisConn::open("redis://127.0.0.1:6379").unwrap()),
            prefix,
            timeout: Duration::from_secs(2),
            nonce: 7,
        };
        let window = Duration::from_secs(60);
        assert_eq!(shared.first_seen(&["k"], window, 1).await.unwrap(), vec![true]);
        assert_eq!(shared.first_seen(&["k"], window, 1).await.unwrap(), vec![true], "same attempt, reply lost");
        assert_eq!(shared.first_seen(&["k"], window, 2).await.unwrap(), vec![false], "a later batch");
    }

    #[tokio::test]
    async fn unreachable_redis_fails_events_back_to_their_sources() {
        let options =
            serde_json::json!({ "key": "event.id", "redis": { "url": "redis://127.0.0.1:1", "timeout": "200ms" } });
        let mut s = stage(options);
        let (token, rx) = conflux_api::AckToken::channel();
        let got = ports(&mut s, vec![ev(r#"{"id":1}"#).with_ack(token)]).await;
        assert!(got.is_empty(), "nothing is passed on as new or duplicate when Redis cannot say");
        assert_eq!(rx.await.unwrap(), AckStatus::Errored, "the source redelivers it");
    }

    #[tokio::test]
    async fn memory_is_bounded_by_max_keys() {
        let mut s = stage(serde_json::json!({ "key": "event.id", "max_keys": 2 }));
        ports(&mut s, vec![ev(r#"{"id":1}"#), ev(r#"{"id":2}"#), ev(r#"{"id":3}"#)]).await;
        assert_eq!(ports(&mut s, vec![ev(r#"{"id":1}"#)]).await, vec![0], "the oldest key was forgotten");
        assert_eq!(ports(&mut s, vec![ev(r#"{"id":3}"#)]).await, vec![1]);
    }
}
