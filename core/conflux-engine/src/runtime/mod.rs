//! Runs a built pipeline: one tokio task per component, joined by bounded
//! channels that carry batches. One file per task kind (`input`, `stage`,
//! `output`); `route` moves batches between them, `connect` connects with
//! backoff, `gather` forms an output's write batches.
//!
//! Backpressure: a full channel makes the upstream `send` wait, up to the
//! input, which stops reading. Shutdown: `stop` ends the inputs; what is in
//! flight drains to the outputs; after `shutdown_timeout` whatever is left
//! is failed back to its sources as `Errored`, never acknowledged.

mod connect;
mod gather;
mod input;
mod output;
mod route;
mod stage;

use std::collections::HashMap;
use std::sync::Arc;

use conflux_api::{Batch, Health, Kind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::graph::{Body, GraphNode, Pipeline};
use crate::metrics::{ComponentMetrics, Metrics, Readiness};
use route::Router;

/// What a running pipeline shares with the process.
#[derive(Clone)]
pub struct RunContext {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// Cancelled on SIGINT/SIGTERM: inputs stop, the rest drains.
    pub stop: CancellationToken,
}

impl RunContext {
    /// The same metrics and readiness with a stop signal of the pipeline's
    /// own, which the process's stop also fires: a pipeline whose component
    /// fails stops alone, and one pipeline can be drained without the rest.
    pub fn for_pipeline(&self) -> RunContext {
        RunContext { metrics: self.metrics.clone(), readiness: self.readiness.clone(), stop: self.stop.child_token() }
    }

    pub fn new() -> Self {
        let readiness = Arc::new(Readiness::default());
        RunContext {
            metrics: Arc::new(Metrics::with_readiness(readiness.clone())),
            readiness,
            stop: CancellationToken::new(),
        }
    }
}

impl Default for RunContext {
    fn default() -> Self {
        Self::new()
    }
}

/// How a pipeline ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    pub pipeline: String,
    /// A component failed for good (panic, fatal input error).
    pub failed: bool,
    /// The shutdown deadline passed with events still in flight.
    pub forced: bool,
    /// What each input heard back during this run, in declaration order.
    pub inputs: Vec<InputOutcome>,
}

impl RunReport {
    /// Whether any event was rejected or errored.
    pub fn lost_events(&self) -> bool {
        self.inputs.iter().any(|i| i.rejected > 0 || i.errored > 0)
    }
}

/// Acknowledgements one input heard during a run, by status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputOutcome {
    pub component: String,
    pub delivered: u64,
    pub rejected: u64,
    pub errored: u64,
}

/// What every component task is given.
struct Task {
    component: Arc<str>,
    /// Where its emitted events go (an output's: its `error` port).
    router: Router,
    metrics: ComponentMetrics,
    /// Cancelled on shutdown: inputs stop reading.
    stop: CancellationToken,
    /// Cancelled at the shutdown deadline: everything still held is failed back.
    hard: CancellationToken,
    health: Health,
    /// Named ports besides the default and `error`.
    declared_ports: usize,
}

/// Runs a pipeline to its end: all finite inputs exhausted, or `stop` and drain.
pub async fn run(pipeline: Pipeline, cx: RunContext) -> RunReport {
    let name = pipeline.name.clone();
    conflux_json::guard::set_max_depth(pipeline.runtime.max_json_depth);
    let capacity = pipeline.runtime.channel_capacity.max(1);
    let deadline = pipeline.runtime.shutdown_timeout.0;
    let nodes = pipeline.nodes;
    let hard = CancellationToken::new();

    let mut senders = Vec::with_capacity(nodes.len());
    let mut receivers = Vec::with_capacity(nodes.len());
    for node in &nodes {
        if node.kind == Kind::Input {
            senders.push(None);
            receivers.push(None);
        } else {
            let (tx, rx) = mpsc::channel::<Batch>(capacity);
            senders.push(Some(tx));
            receivers.push(Some(rx));
        }
    }
    let mut targets: Vec<Vec<Vec<mpsc::Sender<Batch>>>> =
        nodes.iter().map(|n| vec![Vec::new(); n.ports.len()]).collect();
    for (i, node) in nodes.iter().enumerate() {
        for &(src, port) in &node.from {
            if let Some(tx) = &senders[i] {
                targets[src][port].push(tx.clone());
            }
        }
    }
    drop(senders);

    let mut tasks = JoinSet::new();
    let mut task_names = HashMap::new();
    let mut ready_keys = Vec::new();
    let mut inputs = Vec::new();
    for ((node, rx), targets) in nodes.into_iter().zip(receivers).zip(targets) {
        let GraphNode { name: component, kind, ports, output, body, counters, health, .. } = node;
        let metrics = cx.metrics.component(&name, &component, kind.as_str(), &ports);
        cx.metrics.adopt(&name, &component, counters);
        let ready_key = format!("{name}/{component}");
        cx.readiness.register(&ready_key, health.clone());
        ready_keys.push(ready_key);
        if kind == Kind::Input {
            inputs.push((component.clone(), metrics.acks.clone(), metrics.acks.clone().map(|c| c.get())));
        }
        let task = Task {
            component: component.as_str().into(),
            router: Router {
                name: component.as_str().into(),
                error_port: ports.len().saturating_sub(1),
                ports: ports.clone(),
                targets,
                metrics: metrics.clone(),
            },
            metrics,
            stop: cx.stop.clone(),
            hard: hard.clone(),
            health,
            declared_ports: ports.len().saturating_sub(2),
        };
        let handle = match (body, rx) {
            (Body::Input(body), _) => tasks.spawn(input::run(task, body, output.retry)),
            (Body::Stage(body), Some(rx)) => tasks.spawn(stage::run(task, body, rx)),
            (Body::Output(body), Some(rx)) => tasks.spawn(output::run(task, body, rx, output)),
            _ => unreachable!("non-input nodes always have a channel"),
        };
        task_names.insert(handle.id(), component);
    }

    let mut report = RunReport { pipeline: name.clone(), failed: false, forced: false, inputs: Vec::new() };
    let deadline_timer = async {
        cx.stop.cancelled().await;
        tokio::time::sleep(deadline).await;
    };
    tokio::pin!(deadline_timer);
    loop {
        tokio::select! {
            joined = tasks.join_next_with_id() => match joined {
                None => break,
                Some(Ok((_, Ok(())))) => {}
                Some(Ok((id, Err(message)))) => {
                    error!(pipeline = %name, component = %task_names.get(&id).map(String::as_str).unwrap_or("?"), %message, "component stopped");
                    report.failed = true;
                    cx.stop.cancel();
                }
                Some(Err(join_error)) => {
                    let component = task_names.get(&join_error.id()).map(String::as_str).unwrap_or("?");
                    error!(pipeline = %name, %component, error = %join_error, "component crashed; stopping the pipeline");
                    report.failed = true;
                    cx.stop.cancel();
                }
            },
            _ = &mut deadline_timer => {
                report.forced = true;
                warn!(pipeline = %name, timeout = ?deadline, "shutdown deadline passed; failing what is still in flight back to the sources");
                hard.cancel();
                let grace = tokio::time::sleep(std::time::Duration::from_secs(2));
                tokio::pin!(grace);
                loop {
                    tokio::select! {
                        joined = tasks.join_next() => if joined.is_none() { break },
                        _ = &mut grace => { tasks.abort_all(); }
                    }
                }
                break;
            }
        }
    }
    // A pipeline that ended is neither ready nor down: it is gone.
    for key in &ready_keys {
        cx.readiness.remove(key);
    }
    report.inputs = inputs
        .into_iter()
        .map(|(component, acks, before)| {
            let heard = |i: usize| acks[i].get().saturating_sub(before[i]);
            InputOutcome { component, delivered: heard(0), rejected: heard(1), errored: heard(2) }
        })
        .collect();
    info!(pipeline = %name, failed = report.failed, forced = report.forced, "pipeline finished");
    report
}
