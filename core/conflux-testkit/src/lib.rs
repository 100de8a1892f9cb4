//! Test support: components that record what they see, fail on demand or
//! hold writes, registered like any plugin so tests drive real pipeline files
//! through the real engine. Linked only into test builds.
//!
//! State is kept per `key` option so tests running in parallel stay apart.

pub mod conformance;
pub mod fault_proxy;
pub use fault_proxy::{Fault, FaultProxy};

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex};

use conflux_api::config::Duration;
use conflux_api::{
    async_trait, inventory, AckStatus, AckToken, Batch, BuildContext, BuildError, BuiltInput, BuiltStage, Emitter,
    Event, Input, InputConfig, Output, OutputConfig, PluginError, PortId, Registration, Stage, StageConfig, Value,
};
use conflux_engine::config::load_str;
use conflux_engine::graph::compile;
use conflux_engine::runtime::{run, RunContext, RunReport};
use schemars::JsonSchema;
use serde::Deserialize;
use tokio::sync::Semaphore;

/// Call from test binaries so the linker keeps the registrations.
pub fn link() {}

#[derive(Default)]
struct KeyState {
    acks: Vec<AckStatus>,
    emitted: usize,
    delivered: Vec<serde_json::Value>,
    attempts: usize,
    gate: Option<Arc<Semaphore>>,
    /// Sizes of the batches handed to `write`, in call order.
    batches: Vec<usize>,
    writing: usize,
    most_writing: usize,
}

static STATE: LazyLock<Mutex<HashMap<String, KeyState>>> = LazyLock::new(Default::default);

fn with_state<T>(key: &str, f: impl FnOnce(&mut KeyState) -> T) -> T {
    let mut all = STATE.lock().expect("testkit state");
    f(all.entry(key.to_string()).or_default())
}

/// Acknowledgement status of every event a `test_source` emitted, in ack order.
pub fn acks(key: &str) -> Vec<AckStatus> {
    with_state(key, |s| s.acks.clone())
}

/// How many events a `test_source` emitted.
pub fn emitted(key: &str) -> usize {
    with_state(key, |s| s.emitted)
}

/// Payloads a `test_sink` wrote successfully, in order.
pub fn delivered(key: &str) -> Vec<serde_json::Value> {
    with_state(key, |s| s.delivered.clone())
}

/// Write attempts a `test_sink` saw, failed ones included.
pub fn attempts(key: &str) -> usize {
    with_state(key, |s| s.attempts)
}

/// Sizes of the batches a `test_sink` was asked to write, in call order.
pub fn batches(key: &str) -> Vec<usize> {
    with_state(key, |s| s.batches.clone())
}

/// Most writes a `test_sink` had in progress at once.
pub fn most_concurrent_writes(key: &str) -> usize {
    with_state(key, |s| s.most_writing)
}

/// Lets a gated `test_sink` write `n` more batches.
pub fn release(key: &str, n: usize) {
    gate(key).add_permits(n);
}

fn gate(key: &str) -> Arc<Semaphore> {
    with_state(key, |s| s.gate.get_or_insert_with(|| Arc::new(Semaphore::new(0))).clone())
}

/// Loads, builds and runs a pipeline from YAML text with the process environment.
pub async fn run_yaml(yaml: &str, cx: RunContext) -> RunReport {
    let spec = load_str(Path::new("test.yaml"), yaml, &conflux_engine::config::process_env)
        .unwrap_or_else(|d| panic!("{d:#?}"));
    let pipeline = compile(spec).unwrap_or_else(|d| panic!("{d:#?}"));
    run(pipeline, cx).await
}

/// Emits `{"n": i}` events with tracked acknowledgements, one token per batch.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestSourceConfig {
    pub key: String,
    /// Events to emit; unset = until stopped.
    #[serde(default)]
    pub count: Option<usize>,
    #[serde(default = "one_hundred")]
    pub batch_size: usize,
    /// Pause between batches.
    #[serde(default)]
    pub interval: Option<Duration>,
}

fn one_hundred() -> usize {
    100
}

impl InputConfig for TestSourceConfig {
    const TYPE: &'static str = "test_source";
    fn build(self, _cx: &BuildContext) -> Result<BuiltInput, BuildError> {
        Ok(BuiltInput::new(TestSource { next: 0, config: self }))
    }
}

inventory::submit!(Registration::input::<TestSourceConfig>());

struct TestSource {
    config: TestSourceConfig,
    next: usize,
}

#[async_trait]
impl Input for TestSource {
    async fn read(&mut self, out: &mut Emitter) -> Result<bool, PluginError> {
        if let Some(interval) = self.config.interval {
            tokio::time::sleep(interval.0).await;
        }
        let end =
            self.config.count.map_or(self.next + self.config.batch_size, |c| c.min(self.next + self.config.batch_size));
        let n = end - self.next;
        let key = self.config.key.clone();
        let token = AckToken::new(move |status| with_state(&key, |s| s.acks.extend(std::iter::repeat_n(status, n))));
        for i in self.next..end {
            let data: Value = conflux_api::sonic_rs::from_str(&format!("{{\"n\":{i}}}")).expect("valid JSON");
            out.emit(Event::new(data).with_ack(token.clone()));
        }
        with_state(&self.config.key, |s| s.emitted += n);
        self.next = end;
        Ok(self.config.count.is_none_or(|c| self.next < c))
    }
}

/// Records what it writes; can fail the first writes, fail for good, act slow, or wait for `release`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestSinkConfig {
    pub key: String,
    /// Fail this many writes (retryable) before succeeding.
    #[serde(default)]
    pub fail_first: usize,
    /// Every write fails with a fatal error.
    #[serde(default)]
    pub fatal: bool,
    /// Every write waits for `release(key)`.
    #[serde(default)]
    pub gated: bool,
    /// Time each write takes.
    #[serde(default)]
    pub delay: Option<Duration>,
    /// Refuses for good (alone, the rest of the batch is written) every
    /// event whose `n` is a multiple of this.
    #[serde(default)]
    pub refuse_multiples_of: Option<u64>,
}

impl OutputConfig for TestSinkConfig {
    const TYPE: &'static str = "test_sink";
    fn build(self, _cx: &BuildContext) -> Result<Box<dyn Output>, BuildError> {
        Ok(Box::new(TestSink(self)))
    }
}

inventory::submit!(Registration::output::<TestSinkConfig>());

struct TestSink(TestSinkConfig);

#[async_trait]
impl Output for TestSink {
    async fn write(&self, batch: &Batch) -> Result<(), PluginError> {
        let attempt = with_state(&self.0.key, |s| {
            s.attempts += 1;
            s.batches.push(batch.len());
            s.writing += 1;
            s.most_writing = s.most_writing.max(s.writing);
            s.attempts
        });
        let _done = Writing(&self.0.key);
        if self.0.gated {
            gate(&self.0.key).acquire().await.expect("gate open").forget();
        }
        if let Some(delay) = self.0.delay {
            tokio::time::sleep(delay.0).await;
        }
        if self.0.fatal {
            return Err(PluginError::fatal("test sink refuses everything"));
        }
        if attempt <= self.0.fail_first {
            return Err(PluginError::retryable(format!("test sink failure {attempt}")));
        }
        use conflux_api::sonic_rs::JsonValueTrait;
        let refused = |e: &Event| {
            let n = e.data.get("n").and_then(|n| n.as_u64());
            self.0.refuse_multiples_of.zip(n).is_some_and(|(m, n)| m > 0 && n % m == 0)
        };
        let payloads: Vec<serde_json::Value> =
            batch.iter().filter(|e| !refused(e)).map(|e| serde_json::to_value(&e.data).expect("JSON")).collect();
        with_state(&self.0.key, |s| s.delivered.extend(payloads));
        let failed: Vec<conflux_api::FailedEvent> = batch
            .iter()
            .enumerate()
            .filter(|(_, e)| refused(e))
            .map(|(i, _)| conflux_api::FailedEvent::new(i, "test sink refuses this n"))
            .collect();
        if !failed.is_empty() {
            return Err(PluginError::Partial(failed));
        }
        Ok(())
    }
}

/// Counts a write as finished when dropped, however it ends.
struct Writing<'a>(&'a str);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        with_state(self.0, |s| s.writing -= 1);
    }
}

/// Sets `route: "r"` on every event, or with `skip_multiples_of` on every
/// event except those whose `n` is a multiple of it, so an output templated
/// on `route` refuses those.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestRouteConfig {
    #[serde(default)]
    pub skip_multiples_of: Option<u64>,
}

impl StageConfig for TestRouteConfig {
    const TYPE: &'static str = "test_route";
    fn build(self, _cx: &BuildContext) -> Result<BuiltStage, BuildError> {
        Ok(BuiltStage::new(TestRoute(self.skip_multiples_of)))
    }
}

inventory::submit!(Registration::stage::<TestRouteConfig>());

struct TestRoute(Option<u64>);

#[async_trait]
impl Stage for TestRoute {
    async fn process(&mut self, batch: Batch, out: &mut Emitter) {
        use conflux_api::sonic_rs::JsonValueTrait;
        for mut event in batch {
            let n = event.data.get("n").and_then(|n| n.as_u64()).unwrap_or(0);
            if self.0.is_none_or(|m| m == 0 || n % m != 0) {
                event.data.set_fields(vec![(&["route"][..], Value::from("r"))]);
            }
            out.emit(event);
        }
    }
}

/// Sends events whose `n` is odd to port `odd`, events with a `fail` field to `error`, the rest on.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestSplitConfig {}

impl StageConfig for TestSplitConfig {
    const TYPE: &'static str = "test_split";
    fn build(self, _cx: &BuildContext) -> Result<BuiltStage, BuildError> {
        Ok(BuiltStage::new(TestSplit).with_ports(["odd"]))
    }
}

inventory::submit!(Registration::stage::<TestSplitConfig>());

struct TestSplit;

#[async_trait]
impl Stage for TestSplit {
    async fn process(&mut self, batch: Batch, out: &mut Emitter) {
        use conflux_api::sonic_rs::JsonValueTrait;
        for event in batch {
            if event.data.get("fail").is_some() {
                out.fail(event, "asked to fail");
            } else if event.data.get("n").and_then(|n| n.as_u64()).is_some_and(|n| n % 2 == 1) {
                out.emit_to(PortId(1), event);
            } else {
                out.emit(event);
            }
        }
    }
}
