//! Hot reload: notices a new module file on tick, compiles and starts it on
//! a background thread, and hands it over for the stage to swap in between
//! two batches.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::oneshot;

use crate::bindings::StagePre;
use crate::sandbox::{self, Host, Instance, LoadError, Sandbox};

type Loaded = Result<(StagePre<Host>, Instance), LoadError>;

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp { modified: meta.modified().ok(), len: meta.len() })
}

pub struct Watcher {
    path: PathBuf,
    /// The version last loaded or tried.
    seen: Option<Stamp>,
    pending: Option<oneshot::Receiver<Loaded>>,
}

impl Watcher {
    /// Takes the file's stamp now, before the first load, so a change that
    /// lands during that load is still noticed.
    pub fn new(path: PathBuf) -> Self {
        let seen = stamp(&path);
        Watcher { path, seen, pending: None }
    }

    /// Starts compiling the file if it changed since the last look.
    pub fn poll(&mut self, sandbox: &Arc<Sandbox>, component: &str) {
        if self.pending.is_some() {
            return;
        }
        let now = stamp(&self.path);
        if now.is_none() || now == self.seen {
            return;
        }
        self.seen = now;
        tracing::info!(%component, path = %self.path.display(), "wasm module changed; compiling the new build");
        let (tx, rx) = oneshot::channel();
        let path = self.path.clone();
        let sandbox = sandbox.clone();
        let spawned = std::thread::Builder::new().name("conflux-wasm-reload".into()).spawn(move || {
            let loaded = sandbox::load(&path).and_then(|pre| Instance::start(&pre, &sandbox).map(|i| (pre, i)));
            let _ = tx.send(loaded);
        });
        match spawned {
            Ok(_) => self.pending = Some(rx),
            Err(e) => tracing::warn!(%component, error = %e, "cannot start the wasm reload thread"),
        }
    }

    /// The new module and a started instance, once the background load succeeded.
    /// A failed load is logged and the running module stays.
    pub fn ready(&mut self, component: &str) -> Option<(StagePre<Host>, Instance)> {
        let rx = self.pending.as_mut()?;
        match rx.try_recv() {
            Ok(Ok(loaded)) => {
                self.pending = None;
                Some(loaded)
            }
            Ok(Err(error)) => {
                self.pending = None;
                tracing::error!(%component, path = %self.path.display(), %error, "wasm reload failed; the running module stays");
                None
            }
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                self.pending = None;
                None
            }
        }
    }
}
