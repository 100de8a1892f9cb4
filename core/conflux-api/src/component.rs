//! The three component traits and what the engine hands them.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use crate::error::PluginError;
use crate::event::{Batch, Event};

/// Index of an output port. `PortId::DEFAULT` is the unnamed main port;
/// declared ports follow in declaration order (`PortId(1)` is the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortId(pub usize);

impl PortId {
    pub const DEFAULT: PortId = PortId(0);
}

/// Name of the port every input and stage has for events it could not process.
pub const ERROR_PORT: &str = "error";

/// Metadata key under which a component records why an event failed.
pub const ERROR_META: &str = "error";

/// Metadata key of a windowed result's stable identity: the same for every
/// update of one group's window, so an output can upsert or overwrite by it.
pub const RESULT_KEY_META: &str = "result_key";

/// Metadata key of a windowed result's revision within its window: updates
/// count up from 1 and the final result has the highest.
pub const RESULT_REVISION_META: &str = "result_revision";

/// Collects what a component emits during one call, per port.
///
/// The engine owns it and routes its contents after the call returns, so
/// a component never waits on a channel itself.
pub struct Emitter {
    batches: Vec<Batch>,
}

impl Emitter {
    /// An emitter for a component with `declared_ports` named ports
    /// (the default port and the `error` port come on top).
    pub fn new(declared_ports: usize) -> Self {
        Emitter { batches: (0..declared_ports + 2).map(|_| Vec::new()).collect() }
    }

    /// Emits on the default port.
    pub fn emit(&mut self, event: Event) {
        self.batches[0].push(event);
    }

    /// Emits a whole batch on the default port without copying it when it is the first.
    pub fn emit_batch(&mut self, batch: Batch) {
        let slot = &mut self.batches[0];
        if slot.is_empty() {
            *slot = batch;
        } else {
            slot.extend(batch);
        }
    }

    /// Emits on a declared port.
    pub fn emit_to(&mut self, port: PortId, event: Event) {
        let last = self.batches.len() - 1;
        self.batches[port.0.min(last)].push(event);
    }

    /// Sends an event to the `error` port with the reason in its metadata.
    pub fn fail(&mut self, mut event: Event, reason: impl Display) {
        event.meta.insert(ERROR_META, reason.to_string().as_str());
        let last = self.batches.len() - 1;
        self.batches[last].push(event);
    }

    /// Number of ports, default and `error` included.
    pub fn port_count(&self) -> usize {
        self.batches.len()
    }

    /// Whether nothing was emitted since the last drain.
    pub fn is_empty(&self) -> bool {
        self.batches.iter().all(Vec::is_empty)
    }

    /// Takes what was emitted, as `(port index, batch)` pairs with non-empty batches.
    /// The `error` port is the last index.
    pub fn drain(&mut self) -> impl Iterator<Item = (usize, Batch)> + '_ {
        self.batches.iter_mut().enumerate().filter(|(_, b)| !b.is_empty()).map(|(i, b)| (i, std::mem::take(b)))
    }
}

/// What a component is built with. Building opens no connections.
#[derive(Debug, Clone, Default)]
pub struct BuildContext {
    /// Pipeline name.
    pub pipeline: String,
    /// Component name (its key in the pipeline file).
    pub component: String,
    /// Folder of the pipeline file: relative paths in options are resolved from here.
    pub base_dir: PathBuf,
    /// Folder where components keep local state (checkpoints).
    pub data_dir: PathBuf,
    /// Counters the component declares; the engine exports them.
    pub metrics: crate::metrics::PluginMetrics,
    /// Where a line and column inside a string option are in the pipeline
    /// file (`file:line:col`), for errors found while running.
    pub source_map: Option<SourceMap>,
    /// Up or down, for `/ready`: a stage that does I/O of its own reports
    /// here; the engine reports for inputs and outputs.
    pub health: crate::health::Health,
    /// For an output: how the engine will run its writes.
    pub writes: WriteOptions,
}

/// How the engine runs an output's writes (`max_in_flight`, `retry`), for
/// an output whose guarantee depends on it: a position fence is exact only
/// when writes run one at a time and a batch is never failed back while
/// later ones go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// Writes at once (`max_in_flight`).
    pub max_in_flight: usize,
    /// Whether a batch is failed back to its sources after some attempts
    /// (`retry.max_attempts` above 0) rather than retried until shutdown.
    pub fails_back: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { max_in_flight: 1, fails_back: false }
    }
}

impl WriteOptions {
    /// Why a position fence would not be exact under these options, if it would not.
    pub fn unfit_for_a_fence(&self) -> Option<&'static str> {
        if self.max_in_flight > 1 {
            Some("needs `max_in_flight: 1`: a later batch written before an earlier one would fence it out")
        } else if self.fails_back {
            Some("needs `retry.max_attempts: 0`: a batch failed back while later ones are written would be fenced out when it comes again")
        } else {
            None
        }
    }
}

/// Maps (option path, line, column inside the option's text) to `file:line:col`.
#[derive(Clone)]
pub struct SourceMap(pub std::sync::Arc<LocateFn>);

/// (option path, line, column) → `file:line:col`.
pub type LocateFn = dyn Fn(&[&str], usize, usize) -> String + Send + Sync;

impl std::fmt::Debug for SourceMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceMap")
    }
}

impl BuildContext {
    /// `file:line:col` of a position inside the string option at `path`,
    /// when the component came from a pipeline file.
    pub fn locate(&self, path: &[&str], line: usize, column: usize) -> Option<String> {
        self.source_map.as_ref().map(|map| (map.0)(path, line, column))
    }

    /// Declares a counter exported as `conflux_<name>_total{pipeline, component}`.
    pub fn counter(&self, name: &'static str, help: &'static str) -> crate::metrics::Counter {
        self.metrics.counter(name, help)
    }

    /// Declares a gauge exported as `conflux_<name>{pipeline, component}`.
    pub fn gauge(&self, name: &'static str, help: &'static str) -> crate::metrics::Gauge {
        self.metrics.gauge(name, help)
    }

    /// Resolves a path option relative to the pipeline file.
    pub fn resolve(&self, path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref();
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

/// An input together with the named ports it declares besides the default one.
pub struct BuiltInput {
    pub input: Box<dyn Input>,
    pub ports: Vec<String>,
}

impl BuiltInput {
    pub fn new(input: impl Input + 'static) -> Self {
        BuiltInput { input: Box::new(input), ports: Vec::new() }
    }

    pub fn with_ports(mut self, ports: &[&str]) -> Self {
        self.ports = ports.iter().map(|p| p.to_string()).collect();
        self
    }
}

/// A stage together with the named ports it declares besides the default one.
pub struct BuiltStage {
    pub stage: Box<dyn Stage>,
    pub ports: Vec<String>,
}

impl BuiltStage {
    pub fn new(stage: impl Stage + 'static) -> Self {
        BuiltStage { stage: Box::new(stage), ports: Vec::new() }
    }

    pub fn with_ports(mut self, ports: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.ports = ports.into_iter().map(Into::into).collect();
        self
    }
}

/// A source of events.
#[async_trait::async_trait]
pub trait Input: Send {
    /// Opens connections. The engine retries a failure with backoff until shutdown.
    async fn connect(&mut self) -> Result<(), PluginError> {
        Ok(())
    }

    /// Emits the next events. Returns `Ok(false)` at the end of a finite input.
    ///
    /// Must be cancel-safe: at shutdown the engine drops the future at an
    /// await point, and fails whatever the emitter holds by then.
    async fn read(&mut self, out: &mut Emitter) -> Result<bool, PluginError>;

    /// Releases resources after the last read.
    async fn close(&mut self) {}
}

/// A transform between inputs and outputs.
///
/// Per-event failures go to [`Emitter::fail`]; dropping an event (not
/// emitting it) acknowledges it as done.
#[async_trait::async_trait]
pub trait Stage: Send {
    /// Processes one batch.
    async fn process(&mut self, batch: Batch, out: &mut Emitter);

    /// How often the engine calls [`Stage::tick`] (windows closing on time); `None` = never.
    fn tick_interval(&self) -> Option<std::time::Duration> {
        None
    }

    /// Periodic call while the pipeline runs.
    async fn tick(&mut self, _out: &mut Emitter) {}

    /// All upstreams have ended: emit whatever is held (open windows).
    async fn finish(&mut self, _out: &mut Emitter) {}

    /// The pipeline is shutting down (a signal, a failed component) rather
    /// than running out of input. A stage that persists its state saves it
    /// here instead of flushing partial results; by default this is `finish`.
    async fn stop(&mut self, out: &mut Emitter) {
        self.finish(out).await
    }
}

/// A destination for events.
#[async_trait::async_trait]
pub trait Output: Send + Sync {
    /// Opens connections. The engine retries a failure with backoff.
    async fn connect(&mut self) -> Result<(), PluginError> {
        Ok(())
    }

    /// Writes one batch. Retryable errors are retried with backoff by the
    /// engine, the whole batch again; `NotConnected` triggers a reconnect
    /// first. [`PluginError::Partial`] says the rest was written and names
    /// the events that never will be: they go to the `error` port alone.
    ///
    /// Takes `&self`: with `max_in_flight` above 1 the engine runs several
    /// writes at once, so an output that must write in order (a file) holds
    /// a lock across its write.
    async fn write(&self, batch: &Batch) -> Result<(), PluginError>;

    /// Flushes and closes at the end of the pipeline.
    async fn close(&mut self) -> Result<(), PluginError> {
        Ok(())
    }
}
