//! The `dedupe` stage: drops repeats of a key seen within a time window.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use conflux_api::config::Duration as ConfigDuration;
use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, BuiltStage, Emitter, PortId, Registration, Stage,
    StageConfig,
};
use conflux_rhai::{Condition, Limits};
use schemars::JsonSchema;
use serde::Deserialize;

/// Passes the first event of each key and sends repeats within `window` to
/// port `duplicate` (idempotent intake: retried HTTP posts, redelivered messages).
///
/// Keys are kept in memory, oldest first, bounded by `max_keys`; the oldest
/// are forgotten first when the bound bites.
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
}

fn ten_minutes() -> ConfigDuration {
    ConfigDuration::from_secs(600)
}

fn default_max_keys() -> usize {
    1_000_000
}

impl StageConfig for DedupeConfig {
    const TYPE: &'static str = "dedupe";
    fn build(self, _cx: &BuildContext) -> Result<BuiltStage, BuildError> {
        let key = Condition::compile(&self.key, &self.limits).map_err(|e| e.at(["key"]))?;
        if self.max_keys == 0 {
            return Err(BuildError::at(["max_keys"], "max_keys must be at least 1"));
        }
        Ok(BuiltStage::new(Dedupe {
            key,
            window: self.window.0,
            max_keys: self.max_keys,
            seen: HashMap::new(),
            order: VecDeque::new(),
        })
        .with_ports(["duplicate"]))
    }
}

inventory::submit!(Registration::stage::<DedupeConfig>());

struct Dedupe {
    key: Condition,
    window: Duration,
    max_keys: usize,
    seen: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
}

impl Dedupe {
    fn forget_old(&mut self, now: Instant) {
        while let Some((key, at)) = self.order.front() {
            let expired = now.duration_since(*at) >= self.window;
            if !expired && self.order.len() <= self.max_keys {
                break;
            }
            if self.seen.get(key) == Some(at) {
                self.seen.remove(key);
            }
            self.order.pop_front();
        }
    }
}

#[async_trait]
impl Stage for Dedupe {
    async fn process(&mut self, batch: Batch, out: &mut Emitter) {
        let now = Instant::now();
        self.forget_old(now);
        for mut event in batch {
            let key = match self.key.evaluate(&mut event) {
                Ok(k) if !k.is_unit() => k.to_string(),
                Ok(_) => {
                    out.fail(event, "dedupe key is empty (the expression returned ())");
                    continue;
                }
                Err(reason) => {
                    out.fail(event, reason);
                    continue;
                }
            };
            if self.seen.get(&key).is_some_and(|at| now.duration_since(*at) < self.window) {
                out.emit_to(PortId(1), event);
                continue;
            }
            self.seen.insert(key.clone(), now);
            self.order.push_back((key, now));
            out.emit(event);
        }
        self.forget_old(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_api::Event;

    fn stage(options: serde_json::Value) -> BuiltStage {
        let config: DedupeConfig = serde_json::from_value(options).unwrap();
        let cx =
            BuildContext { pipeline: "p".into(), component: "d".into(), base_dir: ".".into(), data_dir: ".".into() };
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
    async fn memory_is_bounded_by_max_keys() {
        let mut s = stage(serde_json::json!({ "key": "event.id", "max_keys": 2 }));
        ports(&mut s, vec![ev(r#"{"id":1}"#), ev(r#"{"id":2}"#), ev(r#"{"id":3}"#)]).await;
        assert_eq!(ports(&mut s, vec![ev(r#"{"id":1}"#)]).await, vec![0], "the oldest key was forgotten");
        assert_eq!(ports(&mut s, vec![ev(r#"{"id":3}"#)]).await, vec![1]);
    }
}
