//! The wasmtime side: one engine per process, a compiled-component cache,
//! and sandboxed instances with a time limit per call and a memory cap.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Components compiled so far, by content: two stages (or a reload to
/// identical bytes) share one compilation.
static COMPILED: LazyLock<ComponentCache> = LazyLock::new(|| ComponentCache::new(CACHE_CAPACITY));

/// How many compiled components the cache keeps.
const CACHE_CAPACITY: usize = 8;

/// What identifies a module's bytes: their SHA-256 (a collision would run
/// the wrong module, so not a 64-bit hash).
type Key = [u8; 32];

/// Compiled components by content, least recently used first, at most
/// `capacity` of them. A stage holds its own component (through its linked
/// `StagePre`), so an evicted entry stays alive while in use: eviction only
/// means a later load of the same bytes compiles them again. Unbounded, every
/// hot reload to a new build would keep the old compilation forever.
pub(crate) struct ComponentCache {
    capacity: usize,
    entries: Mutex<VecDeque<(Key, Component)>>,
    /// Compilations done, cache misses (for tests).
    compilations: AtomicUsize,
}

impl ComponentCache {
    pub(crate) fn new(capacity: usize) -> Self {
        ComponentCache { capacity: capacity.max(1), entries: Mutex::default(), compilations: AtomicUsize::new(0) }
    }

    fn key(bytes: &[u8]) -> Key {
        use sha2::Digest;
        sha2::Sha256::digest(bytes).into()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, VecDeque<(Key, Component)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes an entry out and puts it back as the most recently used.
    fn take(&self, key: Key) -> Option<Component> {
        let mut entries = self.entries();
        let at = entries.iter().position(|(k, _)| *k == key)?;
        let entry = entries.remove(at)?;
        let component = entry.1.clone();
        entries.push_back(entry);
        Some(component)
    }

    /// The compiled component for these bytes: from the cache, or compiled
    /// now (outside the lock, so other loads go on meanwhile) and kept.
    pub(crate) fn get_or_compile(&self, bytes: &[u8]) -> wasmtime::Result<Component> {
        let key = Self::key(bytes);
        if let Some(component) = self.take(key) {
            return Ok(component);
        }
        let component = Component::new(&ENGINE, bytes)?;
        self.compilations.fetch_add(1, Ordering::Relaxed);
        // Another thread may have compiled the same bytes meanwhile: keep one.
        if let Some(first) = self.take(key) {
            return Ok(first);
        }
        let mut entries = self.entries();
        entries.push_back((key, component.clone()));
        while entries.len() > self.capacity {
            entries.pop_front();
        }
        Ok(component)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries().len()
    }

    #[cfg(test)]
    fn compilations(&self) -> usize {
        self.compilations.load(Ordering::Relaxed)
    }
}

/// Why a module could not be loaded or started.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Read(conflux_api::files::ReadError),
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
    let bytes =
        conflux_api::files::read_config_file(path, conflux_api::files::MODULE_FILE_LIMIT).map_err(LoadError::Read)?;
    let component = COMPILED
        .get_or_compile(&bytes)
        .map_err(|e| LoadError::Compile { path: path.to_path_buf(), reason: format!("{e:#}") })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest valid component, `(component)`, with a custom section
    /// holding `tag` so that each tag gives different bytes.
    fn component_bytes(tag: &str) -> Vec<u8> {
        let mut bytes = b"\0asm\x0d\x00\x01\x00".to_vec();
        let name = b"tag";
        let size = 1 + name.len() + tag.len();
        assert!(size < 128 && tag.len() < 128, "one-byte LEB128 lengths only");
        bytes.extend([0, size as u8, name.len() as u8]);
        bytes.extend(name);
        bytes.extend(tag.as_bytes());
        bytes
    }

    #[test]
    fn same_bytes_compile_once() {
        let cache = ComponentCache::new(4);
        let first = cache.get_or_compile(&component_bytes("a")).unwrap();
        let again = cache.get_or_compile(&component_bytes("a")).unwrap();
        assert_eq!(cache.compilations(), 1, "the second load is a cache hit");
        assert_eq!(first.image_range(), again.image_range(), "one compiled image, shared");
        let other = cache.get_or_compile(&component_bytes("b")).unwrap();
        assert_eq!(cache.compilations(), 2);
        assert_ne!(first.image_range(), other.image_range());
        assert_eq!(cache.len(), 2);
        assert!(cache.get_or_compile(b"not wasm").is_err());
        assert_eq!(cache.len(), 2, "a failed compilation is not kept");
    }

    #[test]
    fn reloads_do_not_grow_the_cache_without_bound() {
        let cache = ComponentCache::new(3);
        // A stage reloading 50 new builds, each loaded twice (say, by two stages).
        for build in 0..50 {
            let bytes = component_bytes(&format!("build-{build}"));
            let running = cache.get_or_compile(&bytes).unwrap();
            let shared = cache.get_or_compile(&bytes).unwrap();
            assert_eq!(running.image_range(), shared.image_range());
            assert!(cache.len() <= 3, "{} entries after build {build}", cache.len());
        }
        assert_eq!(cache.compilations(), 50, "each build compiled once");
        assert_eq!(cache.len(), 3);
        // The most recent builds are still shared; an evicted one compiles again.
        cache.get_or_compile(&component_bytes("build-49")).unwrap();
        assert_eq!(cache.compilations(), 50);
        cache.get_or_compile(&component_bytes("build-0")).unwrap();
        assert_eq!(cache.compilations(), 51);
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn least_recently_used_goes_first() {
        let cache = ComponentCache::new(2);
        cache.get_or_compile(&component_bytes("old")).unwrap();
        cache.get_or_compile(&component_bytes("new")).unwrap();
        // Using `old` again makes `new` the least recently used.
        cache.get_or_compile(&component_bytes("old")).unwrap();
        cache.get_or_compile(&component_bytes("third")).unwrap();
        assert_eq!(cache.compilations(), 3);
        cache.get_or_compile(&component_bytes("old")).unwrap();
        assert_eq!(cache.compilations(), 3, "`old` stayed");
        cache.get_or_compile(&component_bytes("new")).unwrap();
        assert_eq!(cache.compilations(), 4, "`new` was evicted");
    }
}
