//! `generate` input: synthetic events for demos, tests and benchmarks.

use std::fmt::Write as _;

use conflux_api::config::Rate;
use conflux_api::{
    async_trait, inventory, BuildContext, BuildError, BuiltInput, Emitter, Event, Input, InputConfig, PluginError,
    Registration, Timestamp, Value,
};
use schemars::JsonSchema;
use serde::Deserialize;

/// Which synthetic events to produce.
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// Restaurant booking events (`booking_created`, `_confirmed`, `_cancelled`, `_completed`).
    #[default]
    Booking,
    /// Web clickstream events (`page_view`, `click`, `api_call`, `error`) with route, user and session.
    Clickstream,
    /// `{"n": 0}`, `{"n": 1}`, … — handy in tests.
    Counter,
}

/// Produces synthetic events: at a rate, up to a count, or as fast as the pipeline takes them.
///
/// With `count` set the input is finite and the pipeline ends once every
/// event is delivered. `timestamp` fields carry the wall clock at generation.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    /// Built-in event shape.
    #[serde(default)]
    pub profile: Profile,
    /// A fixed payload to emit instead of a profile.
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// Stop after this many events; unset runs until the pipeline is stopped.
    #[serde(default)]
    pub count: Option<u64>,
    /// Pace, such as `1000/s` or `10/min`; unset goes as fast as the pipeline takes them.
    #[serde(default)]
    pub rate: Option<Rate>,
    /// Most events per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Number of distinct restaurants (booking) or routes (clickstream).
    #[serde(default = "default_keys")]
    pub keys: u64,
    /// Seed for a reproducible sequence.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Cycle through this many rendered events instead of rendering each one,
    /// re-rendering them (new ids, values and timestamps) every second. Trades
    /// uniqueness within a second for speed: for load tests. 0 renders every event.
    #[serde(default)]
    pub templates: usize,
}

fn default_batch_size() -> usize {
    1024
}

fn default_keys() -> u64 {
    20
}

impl InputConfig for GenerateConfig {
    const TYPE: &'static str = "generate";
    fn build(self, _cx: &BuildContext) -> Result<BuiltInput, BuildError> {
        if self.batch_size == 0 {
            return Err(BuildError::at(["batch_size"], "batch_size must be at least 1"));
        }
        if self.keys == 0 {
            return Err(BuildError::at(["keys"], "keys must be at least 1"));
        }
        let payload = match &self.payload {
            Some(p) => Some(
                conflux_api::sonic_rs::from_str::<Value>(&p.to_string())
                    .map_err(|e| BuildError::at(["payload"], e.to_string()))?,
            ),
            None => None,
        };
        let rng = match self.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        Ok(BuiltInput::new(Generator {
            payload,
            rng,
            emitted: 0,
            started: None,
            line: String::with_capacity(512),
            pool: Vec::new(),
            pool_rendered_at: None,
            config: self,
        }))
    }
}

inventory::submit!(Registration::input::<GenerateConfig>());

struct Generator {
    config: GenerateConfig,
    payload: Option<Value>,
    rng: fastrand::Rng,
    emitted: u64,
    started: Option<tokio::time::Instant>,
    line: String,
    /// Rendered events cycled through when `templates` > 0 (cloning one is O(1)).
    pool: Vec<Value>,
    pool_rendered_at: Option<std::time::Instant>,
}

const ZONES: &[&str] = &["terrace", "main_hall", "bar", "garden", "private_room"];
const BOOKING_TYPES: &[(&str, &str, u32)] = &[
    ("booking_created", "pending", 50),
    ("booking_confirmed", "confirmed", 30),
    ("booking_cancelled", "cancelled", 10),
    ("booking_completed", "completed", 10),
];
const ROUTES: &[&str] = &["/", "/menu", "/book", "/checkout", "/account", "/search", "/restaurants", "/offers"];
const CLICK_TYPES: &[(&str, u32)] = &[("page_view", 55), ("click", 30), ("api_call", 12), ("error", 3)];

fn pick<'a, T>(rng: &mut fastrand::Rng, table: &'a [T], weight: impl Fn(&T) -> u32) -> &'a T {
    let total: u32 = table.iter().map(&weight).sum();
    let mut roll = rng.u32(0..total);
    for item in table {
        let w = weight(item);
        if roll < w {
            return item;
        }
        roll -= w;
    }
    &table[table.len() - 1]
}

impl Generator {
    /// Writes one payload as JSON text into `self.line`; parsing that text
    /// is faster than building the value node by node.
    fn render(&mut self, n: u64, timestamp: &str) {
        let line = &mut self.line;
        line.clear();
        let rng = &mut self.rng;
        let keys = self.config.keys;
        match self.config.profile {
            Profile::Counter => {
                let _ = write!(line, r#"{{"n":{n}}}"#);
            }
            Profile::Booking => {
                let (kind, status, _) = pick(rng, BOOKING_TYPES, |t| t.2);
                let restaurant = rng.u64(0..keys);
                let zone = ZONES[rng.usize(0..ZONES.len())];
                let _ = write!(
                    line,
                    r#"{{"id":"evt-{n}","type":"{kind}","timestamp":"{timestamp}","data":{{"bookingId":"b-{}","restaurantId":"r-{restaurant}","restaurantName":"Restaurant {restaurant}","tableId":"t-{}","zone":"{zone}","userId":"u-{}","guests":{},"date":"{}","time":"{}:{}","status":"{status}"}}}}"#,
                    rng.u32(1..1_000_000),
                    rng.u32(1..40),
                    rng.u32(1..50_000),
                    rng.u32(1..9),
                    &timestamp[..10],
                    rng.u32(12..23),
                    if rng.bool() { "00" } else { "30" },
                );
            }
            Profile::Clickstream => {
                let (kind, _) = pick(rng, CLICK_TYPES, |t| t.1);
                let route = ROUTES[(rng.u64(0..keys) % ROUTES.len() as u64) as usize];
                let user = rng.u32(1..20_000);
                let status = if *kind == "error" {
                    500
                } else if rng.u32(0..50) == 0 {
                    404
                } else {
                    200
                };
                let _ = write!(
                    line,
                    r#"{{"type":"{kind}","timestamp":"{timestamp}","clientId":"c-{}","sessionId":"s-{user}-{}","userId":"u-{user}","route":"{route}","durationMs":{},"status":{status}}}"#,
                    rng.u32(1..500),
                    rng.u32(1..4),
                    rng.u32(5..1500),
                );
            }
        }
    }
}

impl Generator {
    fn fresh(&mut self, n: u64, timestamp: &str) -> Result<Value, PluginError> {
        self.render(n, timestamp);
        conflux_api::sonic_rs::from_str(&self.line)
            .map_err(|e| PluginError::fatal_from("generated an invalid event", e))
    }
}

#[async_trait]
impl Input for Generator {
    async fn read(&mut self, out: &mut Emitter) -> Result<bool, PluginError> {
        let remaining = self.config.count.map(|c| c - self.emitted).unwrap_or(u64::MAX);
        if remaining == 0 {
            return Ok(false);
        }
        let mut size = (self.config.batch_size as u64).min(remaining);
        if let Some(rate) = self.config.rate {
            // Small batches at low rates, so events arrive evenly rather than in bursts.
            let per_tenth = (rate.per_second() / 10.0).ceil().max(1.0) as u64;
            size = size.min(per_tenth);
            let started = *self.started.get_or_insert_with(tokio::time::Instant::now);
            let due = started + std::time::Duration::from_secs_f64(self.emitted as f64 / rate.per_second());
            tokio::time::sleep_until(due).await;
        }
        let now = Timestamp::now();
        let timestamp = now.to_rfc3339();
        let templates = self.config.templates;
        if templates > 0 && self.pool_rendered_at.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)) {
            self.pool.clear();
            for i in 0..templates as u64 {
                let value = self.fresh(self.emitted + i, &timestamp)?;
                self.pool.push(value);
            }
            self.pool_rendered_at = Some(std::time::Instant::now());
        }
        let mut batch = Vec::with_capacity(size as usize);
        for i in 0..size {
            let n = self.emitted + i;
            let data = match &self.payload {
                Some(p) => p.clone(),
                None if templates > 0 => self.pool[(n % templates as u64) as usize].clone(),
                None => self.fresh(n, &timestamp)?,
            };
            batch.push(Event::with_time(data, now));
        }
        self.emitted += size;
        out.emit_batch(batch);
        Ok(self.config.count.is_none_or(|c| self.emitted < c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_api::sonic_rs::JsonValueTrait;

    fn generator(options: serde_json::Value) -> Box<dyn Input> {
        let config: GenerateConfig = serde_json::from_value(options).unwrap();
        let cx = BuildContext {
            pipeline: "p".into(),
            component: "gen".into(),
            base_dir: Default::default(),
            data_dir: Default::default(),
            ..Default::default()
        };
        config.build(&cx).map_err(|e| e.message).unwrap().input
    }

    async fn read_all(input: &mut Box<dyn Input>) -> Vec<Event> {
        let mut out = Emitter::new(0);
        while input.read(&mut out).await.unwrap() {}
        out.drain().flat_map(|(_, b)| b).collect()
    }

    #[tokio::test]
    async fn templates_cycle_through_rendered_events() {
        let mut g = generator(serde_json::json!({ "count": 10, "templates": 4, "seed": 1 }));
        let events = read_all(&mut g).await;
        assert_eq!(events.len(), 10);
        assert_eq!(events[0].data, events[4].data);
        assert_ne!(events[0].data, events[1].data);
    }

    #[tokio::test]
    async fn profiles_produce_valid_events_and_stop_at_count() {
        for profile in [Profile::Booking, Profile::Clickstream, Profile::Counter] {
            let mut g =
                generator(serde_json::json!({ "profile": profile, "count": 150, "batch_size": 100, "seed": 7 }));
            let events = read_all(&mut g).await;
            assert_eq!(events.len(), 150);
            if profile == Profile::Booking {
                let e = &events[0].data;
                assert!(e.get("type").and_then(|t| t.as_str()).unwrap().starts_with("booking_"));
                assert!(e.pointer(["data", "guests"]).and_then(|g| g.as_u64()).unwrap() >= 1);
            }
        }
    }
}
