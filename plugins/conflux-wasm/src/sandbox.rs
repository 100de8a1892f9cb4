//! The wasmtime side: one engine per process, a compiled-component cache,
//! and sandboxed instances with a time limit per call and a memory cap.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::bindings::{Stage as GuestStage, StagePre};

/// How often the engine's epoch advances; call deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The process-wide engine. Epoch interruption costs a counter check at
/// loop heads and calls, much less than fuel metering; a background thread
/// advances the epoch so a guest that never returns is cut off.
static ENGINE: LazyLock<Engine> = LazyLock::new(|| {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    // `CONFLUX_WASM_PERFMAP=1` writes /tmp/perf-<pid>.map so `perf report`
    // names the guest's functions instead of showing anonymous JIT code.
    if std::env::var_os("CONFLUX_WASM_PERFMAP").is_some_and(|v| v == "1") {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let engine = Engine::new(&config).expect("wasmtime engine configuration is valid");
    let ticker = engine.weak();
    std::thread::Builder::new()
        .name("conflux-wasm-epoch".into())
        .spawn(move || {
            while let Some(engine) = ticker.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawn the wasm epoch thread");
    engine
});

/// Components compiled so far, by content hash: two stages (or a reload to
/// identical bytes) share one compilation.
static COMPILED: LazyLock<Mutex<HashMap<u64, Component>>> = LazyLock::new(Default::default);

/// Why a module could not be loaded or started.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid WebAssembly component (build guests with `--target wasm32-wasip2`): {reason}")]
    Compile { path: PathBuf, reason: String },
    #[error("{path} does not fit the conflux:stage world (schemas/wit): {reason}")]
    Link { path: PathBuf, reason: String },
    #[error("the guest refused to start: {0}")]
    Init(String),
    #[error("the guest failed while starting: {0}")]
    Trap(String),
    #[error("cannot grant directory {host}: {reason}")]
    Dir { host: PathBuf, reason: String },
}

/// Reads and compiles (or takes from the cache) a component, then links it against WASI.
pub fn load(path: &Path) -> Result<StagePre<Host>, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read { path: path.to_path_buf(), source })?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    let key = hasher.finish();
    let cached = COMPILED.lock().expect("component cache").get(&key).cloned();
    let component = match cached {
        Some(component) => component,
        None => {
            let component = Component::new(&ENGINE, &bytes)
                .map_err(|e| LoadError::Compile { path: path.to_path_buf(), reason: format!("{e:#}") })?;
            COMPILED.lock().expect("component cache").insert(key, component.clone());
            component
        }
    };
    let mut linker = Linker::<Host>::new(&ENGINE);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
        .map_err(|e| LoadError::Link { path: path.to_path_buf(), reason: format!("{e:#}") })?;
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| LoadError::Link { path: path.to_path_buf(), reason: format!("{e:#}") })?;
    StagePre::new(pre).map_err(|e| LoadError::Link { path: path.to_path_buf(), reason: format!("{e:#}") })
}

/// A directory the guest may open.
#[derive(Debug, Clone)]
pub struct Grant {
    pub host: PathBuf,
    pub guest: String,
    pub writable: bool,
}

/// Limits every instance of one stage runs under.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// Longest one call may run.
    pub timeout: Duration,
    /// Most bytes of linear memory per instance.
    pub max_memory: usize,
    pub dirs: Vec<Grant>,
    /// The `config` option as JSON text, for `init`.
    pub config: String,
}

impl Sandbox {
    fn deadline_ticks(&self) -> u64 {
        (self.timeout.as_nanos() / EPOCH_TICK.as_nanos()).max(1) as u64 + 1
    }
}

/// Per-store state: WASI (no ambient authority) and the memory cap.
pub struct Host {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: Limits,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Refuses memory growth past the cap and remembers that it did, so the
/// resulting trap can be reported as what it is.
struct Limits {
    max_memory: usize,
    exceeded: bool,
}

impl ResourceLimiter for Limits {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.exceeded = true;
            wasmtime::bail!("memory limit of {} bytes reached", self.max_memory);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// Why a call failed. Any of these but `Refused` leaves the instance unusable.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("wasm guest ran longer than its {0:?} limit")]
    Timeout(Duration),
    #[error("wasm guest went over its memory limit of {0} bytes")]
    Memory(usize),
    #[error("wasm guest trapped: {0}")]
    Trap(String),
    #[error("wasm guest refused the batch: {0}")]
    Refused(String),
    #[error("wasm guest answered {got} outcomes for {sent} events")]
    Mismatch { sent: usize, got: usize },
}

impl CallError {
    /// Whether the instance may keep serving after this error.
    pub fn instance_survives(&self) -> bool {
        matches!(self, CallError::Refused(_) | CallError::Mismatch { .. })
    }
}

/// A live guest instance, reused batch after batch until it traps.
pub struct Instance {
    store: Store<Host>,
    guest: GuestStage,
}

impl Instance {
    /// Instantiates a component in a fresh store and calls its `init`.
    pub fn start(pre: &StagePre<Host>, sandbox: &Sandbox) -> Result<Instance, LoadError> {
        // No ambient authority: no environment, arguments, stdin, stdout or
        // network; stderr is shared for the guest's diagnostics.
        let mut wasi = WasiCtxBuilder::new();
        wasi.inherit_stderr().allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        for dir in &sandbox.dirs {
            let perms = if dir.writable { FsPerms::ReadWrite } else { FsPerms::ReadOnly };
            wasi.preopened_dir(&dir.host, &dir.guest, perms)
                .map_err(|e| LoadError::Dir { host: dir.host.clone(), reason: format!("{e:#}") })?;
        }
        let host = Host {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits: Limits { max_memory: sandbox.max_memory, exceeded: false },
        };
        let mut store = Store::new(&ENGINE, host);
        store.limiter(|host| &mut host.limits);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(sandbox.deadline_ticks());
        let guest =
            pre.instantiate(&mut store).map_err(|e| LoadError::Trap(describe(&store, sandbox, e).to_string()))?;
        store.set_epoch_deadline(sandbox.deadline_ticks());
        match guest.call_init(&mut store, &sandbox.config) {
            Ok(Ok(())) => Ok(Instance { store, guest }),
            Ok(Err(reason)) => Err(LoadError::Init(reason)),
            Err(e) => Err(LoadError::Trap(describe(&store, sandbox, e).to_string())),
        }
    }

    /// Runs one batch through the guest: one outcome per event, in order.
    pub fn process(&mut self, sandbox: &Sandbox, batch: &[Record]) -> Result<Vec<Outcome>, CallError> {
        self.store.set_epoch_deadline(sandbox.deadline_ticks());
        match self.guest.call_process(&mut self.store, batch) {
            Ok(Ok(outcomes)) if outcomes.len() == batch.len() => Ok(outcomes),
            Ok(Ok(outcomes)) => Err(CallError::Mismatch { sent: batch.len(), got: outcomes.len() }),
            Ok(Err(reason)) => Err(CallError::Refused(reason)),
            Err(e) => Err(describe(&self.store, sandbox, e)),
        }
    }
}

pub use crate::bindings::conflux::stage::types::{Event as Record, Outcome};

fn describe(store: &Store<Host>, sandbox: &Sandbox, error: wasmtime::Error) -> CallError {
    if store.data().limits.exceeded {
        return CallError::Memory(sandbox.max_memory);
    }
    // The trap code alone: the full chain carries a multi-line wasm backtrace.
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => CallError::Timeout(sandbox.timeout),
        Some(trap) => CallError::Trap(trap.to_string()),
        None => CallError::Trap(error.to_string()),
    }
}
