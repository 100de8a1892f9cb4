//! The `wasm` stage: user transforms as WebAssembly components, sandboxed.
//!
//! A guest implements the `conflux:stage` world (`schemas/wit/`): whole
//! batches cross the boundary per call, payloads as JSON bytes. Each call
//! runs under an epoch deadline and every instance under a memory cap, with
//! WASI but no filesystem or network unless a directory is granted. A guest
//! that traps, runs too long or exhausts its memory fails that batch's
//! events to the `error` port; the instance is replaced and the pipeline
//! goes on. Components are compiled once per content and instances are
//! reused across batches. The module file is watched: a new build is
//! compiled off the hot path and swapped in between two batches.

mod convert;
mod reload;
mod sandbox;

use std::path::PathBuf;

use conflux_api::config::{ByteSize, Duration};
use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, BuiltStage, Emitter, PortId, Registration, Stage,
    StageConfig,
};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::reload::Watcher;
use crate::sandbox::{CallError, Grant, Instance, Sandbox};

/// Bindings generated from `schemas/wit/conflux-stage.wit`.
mod bindings {
    wasmtime::component::bindgen!({
        world: "stage",
        path: "../../schemas/wit",
    });
}

pub use sandbox::LoadError;

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}

/// Runs each batch through a WebAssembly component (the `conflux:stage` WIT world).
///
/// The guest answers one outcome per event: keep it, send it to a named
/// port, drop it, replace it with new events, or fail it to the `error`
/// port. A guest that traps, runs past `timeout` or grows past `max_memory`
/// fails the whole batch to `error`, and a fresh instance takes the next
/// batch. The module file is watched and a new build replaces the running
/// one between two batches. See docs/wasm.md.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WasmConfig {
    /// The component (`.wasm`, built for `wasm32-wasip2`), relative to the pipeline file.
    pub module: String,
    /// Options for the guest, handed to its `init` as JSON text.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// Named ports the guest may send events to, besides the default one.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Longest one call into the guest may run; past it the batch fails.
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
    /// Most linear memory one instance may use; past it the batch fails.
    #[serde(default = "default_max_memory")]
    pub max_memory: ByteSize,
    /// Directories the guest may open; it sees no filesystem otherwise (and never the network).
    #[serde(default)]
    pub dirs: Vec<DirConfig>,
    /// Watch the module file and switch to a new build without losing or repeating events.
    #[serde(default = "yes")]
    pub reload: bool,
    /// How often the module file is checked for a new build.
    #[serde(default = "default_reload_interval")]
    pub reload_interval: Duration,
}

/// A host directory granted to the guest.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DirConfig {
    /// Folder on the host, relative to the pipeline file.
    pub host: String,
    /// Path under which the guest sees it, such as `/data`.
    pub guest: String,
    /// Let the guest create and change files there (read-only by default).
    #[serde(default)]
    pub writable: bool,
}

fn default_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_max_memory() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(1)
}

fn yes() -> bool {
    true
}

impl StageConfig for WasmConfig {
    const TYPE: &'static str = "wasm";

    fn build(self, cx: &BuildContext) -> Result<BuiltStage, BuildError> {
        if self.timeout.0.is_zero() {
            return Err(BuildError::at(["timeout"], "timeout must be more than zero"));
        }
        let max_memory = usize::try_from(self.max_memory.0).unwrap_or(usize::MAX);
        if max_memory < 1024 * 1024 {
            return Err(BuildError::at(["max_memory"], "max_memory must be at least 1MiB"));
        }
        if self.reload && self.reload_interval.0.is_zero() {
            return Err(BuildError::at(["reload_interval"], "reload_interval must be more than zero"));
        }
        for (i, port) in self.ports.iter().enumerate() {
            if port.is_empty() || port == conflux_api::component::ERROR_PORT {
                return Err(BuildError::at(
                    ["ports".to_string(), i.to_string()],
                    format!("`{port}` cannot be a port name"),
                ));
            }
            if self.ports[..i].contains(port) {
                return Err(BuildError::at(
                    ["ports".to_string(), i.to_string()],
                    format!("port `{port}` is declared twice"),
                ));
            }
        }
        let mut dirs = Vec::new();
        for (i, dir) in self.dirs.iter().enumerate() {
            let host = cx.resolve(&dir.host);
            if !host.is_dir() {
                return Err(BuildError::at(
                    ["dirs".to_string(), i.to_string(), "host".to_string()],
                    format!("{} is not a directory", host.display()),
                ));
            }
            dirs.push(Grant { host, guest: dir.guest.clone(), writable: dir.writable });
        }
        let config = self.config.as_ref().map_or_else(|| "null".to_string(), serde_json::Value::to_string);
        let sandbox = Sandbox { timeout: self.timeout.0, max_memory, dirs, config };
        let path = cx.resolve(&self.module);
        let watcher = Watcher::new(path.clone());
        let pre = sandbox::load(&path).map_err(|e| BuildError::at(["module"], e.to_string()))?;
        let instance = Instance::start(&pre, &sandbox).map_err(|e| {
            let at = if matches!(e, LoadError::Init(_)) { "config" } else { "module" };
            BuildError::at([at], e.to_string())
        })?;
        let stage = WasmStage {
            component: cx.component.clone(),
            path,
            sandbox: std::sync::Arc::new(sandbox),
            pre,
            instance: Some(instance),
            ports: self.ports.clone(),
            reload: self.reload.then_some((watcher, self.reload_interval.0)),
            generation: 0,
        };
        Ok(BuiltStage::new(stage).with_ports(self.ports))
    }
}

inventory::submit!(Registration::stage::<WasmConfig>());

struct WasmStage {
    component: String,
    path: PathBuf,
    sandbox: std::sync::Arc<Sandbox>,
    /// The linked component new instances come from.
    pre: bindings::StagePre<sandbox::Host>,
    /// The instance serving batches; `None` after a trap until the next batch starts a fresh one.
    instance: Option<Instance>,
    ports: Vec<String>,
    reload: Option<(Watcher, std::time::Duration)>,
    /// How many times the module was swapped (for logs).
    generation: u64,
}

impl WasmStage {
    /// Takes a reloaded module if one finished compiling. Runs only between
    /// batches, so each batch is served whole by one module.
    fn adopt_reload(&mut self) {
        let Some((watcher, _)) = self.reload.as_mut() else { return };
        if let Some((pre, instance)) = watcher.ready(&self.component) {
            self.pre = pre;
            self.instance = Some(instance);
            self.generation += 1;
            tracing::info!(component = %self.component, generation = self.generation, path = %self.path.display(), "wasm module reloaded");
        }
    }

    fn port_of(&self, name: &str) -> Option<PortId> {
        self.ports.iter().position(|p| p == name).map(|i| PortId(i + 1))
    }
}

#[async_trait]
impl Stage for WasmStage {
    async fn process(&mut self, batch: Batch, out: &mut Emitter) {
        self.adopt_reload();
        let records = convert::to_records(&batch);
        let instance = self.instance.take();
        let pre = self.pre.clone();
        let sandbox = self.sandbox.clone();
        // The call runs on a blocking thread: a batch may take up to `timeout`,
        // and the async workers must keep routing meanwhile.
        let joined = tokio::task::spawn_blocking(move || {
            let mut instance = match instance {
                Some(instance) => instance,
                None => match Instance::start(&pre, &sandbox) {
                    Ok(instance) => instance,
                    Err(e) => return (None, Err(CallError::Trap(e.to_string()))),
                },
            };
            let result = instance.process(&sandbox, &records);
            (Some(instance), result)
        })
        .await;
        let (instance, result) = match joined {
            Ok(pair) => pair,
            Err(e) => (None, Err(CallError::Trap(format!("wasm call panicked: {e}")))),
        };
        match result {
            Ok(outcomes) => {
                self.instance = instance;
                convert::route(batch, outcomes, out, |name| self.port_of(name));
            }
            Err(error) => {
                if error.instance_survives() {
                    self.instance = instance;
                } else {
                    tracing::warn!(component = %self.component, events = batch.len(), %error, "wasm batch failed; starting a fresh instance");
                }
                let reason = error.to_string();
                for event in batch {
                    out.fail(event, &reason);
                }
            }
        }
    }

    fn tick_interval(&self) -> Option<std::time::Duration> {
        self.reload.as_ref().map(|(_, every)| *every)
    }

    async fn tick(&mut self, _out: &mut Emitter) {
        if let Some((watcher, _)) = self.reload.as_mut() {
            watcher.poll(&self.sandbox, &self.component);
        }
        self.adopt_reload();
    }
}
