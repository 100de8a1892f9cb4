//! Runs a built pipeline: one tokio task per component, joined by bounded
//! channels that carry batches.
//!
//! Backpressure: a full channel makes the upstream `send` wait, up to the
//! input, which stops reading. Shutdown: `stop` ends the inputs; what is in
//! flight drains to the outputs; after `shutdown_timeout` whatever is left
//! is failed back to its sources as `Errored`, never acknowledged.

use std::sync::Arc;
use std::time::Instant;

use conflux_api::{AckStatus, AckToken, Batch, Emitter, Input, Kind, Output, PluginError, Stage};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::RetryConfig;
use crate::graph::{Body, GraphNode, Pipeline};
use crate::metrics::{ComponentMetrics, Metrics, Readiness};

/// What a running pipeline shares with the process.
#[derive(Clone)]
pub struct RunContext {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// Cancelled on SIGINT/SIGTERM: inputs stop, the rest drains.
    pub stop: CancellationToken,
}

impl RunContext {
    pub fn new() -> Self {
        RunContext {
            metrics: Arc::new(Metrics::new()),
            readiness: Arc::new(Readiness::default()),
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
}

/// Sends one component's emitted batches to the channels that read each port.
struct Router {
    name: Arc<str>,
    /// Port names by index (`""` is the default port), for logs.
    ports: Vec<String>,
    targets: Vec<Vec<mpsc::Sender<Batch>>>,
    error_port: usize,
    metrics: ComponentMetrics,
}

impl Router {
    async fn route_all(&self, out: &mut Emitter) {
        let emitted: Vec<(usize, Batch)> = out.drain().collect();
        for (port, batch) in emitted {
            self.route(port, batch).await;
        }
    }

    async fn route(&self, port: usize, batch: Batch) {
        let n = batch.len() as u64;
        if let Some(c) = self.metrics.sent.get(port) {
            c.inc_by(n);
        }
        if port == self.error_port {
            self.metrics.errors.inc_by(n);
        }
        let targets = &self.targets[port];
        let Some((last, rest)) = targets.split_last() else {
            if port != 0 {
                // A named or error port nobody reads: never silent.
                let reason = batch
                    .first()
                    .and_then(|e| e.meta.get(conflux_api::component::ERROR_META))
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                let port_name = self.ports.get(port).map_or("?", String::as_str);
                warn!(component = %self.name, port = %port_name, events = n, %reason, "events on an unwired port were discarded");
                self.metrics.discarded.get(port).inspect(|c| {
                    c.inc_by(n);
                });
                for e in &batch {
                    e.ack.mark(AckStatus::Rejected);
                }
            }
            return;
        };
        for target in rest {
            if let Err(mpsc::error::SendError(b)) = target.send(batch.clone()).await {
                fail_batch(&b, AckStatus::Errored);
            }
        }
        if let Err(mpsc::error::SendError(b)) = last.send(batch).await {
            fail_batch(&b, AckStatus::Errored);
        }
    }
}

fn fail_batch(batch: &Batch, status: AckStatus) {
    for e in batch {
        e.ack.mark(status);
    }
}

/// One clone of each acknowledgement unit in a batch (usually one).
fn distinct_tokens(batch: &Batch) -> Vec<AckToken> {
    let mut tokens: Vec<AckToken> = Vec::new();
    for event in batch {
        if event.ack.is_tracked() && !tokens.last().is_some_and(|t| t.same(&event.ack)) {
            tokens.push(event.ack.clone());
        }
    }
    tokens
}

/// Fails everything still queued in a channel (hard stop).
fn fail_queue(rx: &mut mpsc::Receiver<Batch>) -> usize {
    rx.close();
    let mut n = 0;
    while let Ok(batch) = rx.try_recv() {
        n += batch.len();
        fail_batch(&batch, AckStatus::Errored);
    }
    n
}

/// Runs a pipeline to its end: all finite inputs exhausted, or `stop` and drain.
pub async fn run(pipeline: Pipeline, cx: RunContext) -> RunReport {
    let name = pipeline.name.clone();
    conflux_api::json_guard::set_max_depth(pipeline.runtime.max_json_depth);
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
    let mut task_names = std::collections::HashMap::new();
    for ((node, rx), targets) in nodes.into_iter().zip(receivers).zip(targets) {
        let GraphNode { name: component, kind, ports, retry, body, counters, .. } = node;
        let metrics = cx.metrics.component(&name, &component, kind.as_str(), &ports);
        cx.metrics.adopt(&name, &component, counters);
        let ready_key = format!("{name}/{component}");
        cx.readiness.register(&ready_key);
        let router = Router {
            name: component.as_str().into(),
            error_port: ports.len().saturating_sub(1),
            ports: ports.clone(),
            targets,
            metrics: metrics.clone(),
        };
        let readiness = cx.readiness.clone();
        let stop = cx.stop.clone();
        let hard = hard.clone();
        let declared = ports.len().saturating_sub(2);
        let handle = match (body, rx) {
            (Body::Input(input), _) => {
                tasks.spawn(run_input(input, declared, router, retry, stop, readiness, ready_key))
            }
            (Body::Stage(stage), Some(rx)) => {
                tasks.spawn(run_stage(stage, declared, rx, router, stop, hard, readiness, ready_key))
            }
            (Body::Output(output), Some(rx)) => {
                tasks.spawn(run_output(output, component.clone(), rx, retry, metrics, hard, readiness, ready_key))
            }
            _ => unreachable!("non-input nodes always have a channel"),
        };
        task_names.insert(handle.id(), component);
    }

    let mut report = RunReport { pipeline: name.clone(), failed: false, forced: false };
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
    info!(pipeline = %name, failed = report.failed, forced = report.forced, "pipeline finished");
    report
}

/// Wraps the source's tokens so the engine counts unacknowledged events.
fn track_acks(batch: &mut Batch, metrics: &ComponentMetrics) {
    let mut i = 0;
    while i < batch.len() {
        let parent = batch[i].ack.clone();
        let mut j = i + 1;
        while j < batch.len() && batch[j].ack.same(&parent) {
            j += 1;
        }
        let n = (j - i) as u64;
        let unacked = metrics.unacked.clone();
        let acks = metrics.acks.clone();
        unacked.inc_by(n as i64);
        let token = AckToken::chain(parent, move |status| {
            unacked.dec_by(n as i64);
            acks[status as usize].inc_by(n);
        });
        for e in &mut batch[i..j] {
            e.ack = token.clone();
        }
        i = j;
    }
}

/// Something the engine connects with backoff.
enum Connectable<'a> {
    Input(&'a mut dyn Input),
    Output(&'a mut dyn Output),
}

impl Connectable<'_> {
    async fn connect(&mut self) -> Result<(), PluginError> {
        match self {
            Connectable::Input(i) => i.connect().await,
            Connectable::Output(o) => o.connect().await,
        }
    }
}

/// How a connect with backoff ended.
#[derive(Debug, PartialEq)]
enum Connect {
    Connected,
    /// `stop` fired first.
    Stopped,
    /// `retry.max_attempts` attempts failed; a later batch may try again.
    GaveUp(String),
    /// The plugin says retrying cannot help (bad settings, a server-side
    /// object that contradicts the configuration).
    Fatal(String),
}

/// Connects, retrying with backoff, at most `retry.max_attempts` times (0 = until stopped).
async fn connect_with_backoff(
    component: &str,
    stop: &CancellationToken,
    retry: &RetryConfig,
    mut target: Connectable<'_>,
) -> Connect {
    let mut attempt = 0;
    loop {
        match target.connect().await {
            Ok(()) => return Connect::Connected,
            Err(e) if !e.is_retryable() => return Connect::Fatal(format!("cannot connect: {}", e.chain())),
            Err(e) => {
                attempt += 1;
                if retry.max_attempts > 0 && attempt >= retry.max_attempts {
                    warn!(%component, attempt, error = %e.chain(), "connect failed; giving up (retry.max_attempts)");
                    return Connect::GaveUp(format!("cannot connect after {attempt} attempts: {}", e.chain()));
                }
                let wait = retry.backoff(attempt);
                warn!(%component, attempt, error = %e.chain(), retry_in = ?wait, "connect failed");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return Connect::Stopped,
                }
            }
        }
    }
}

async fn run_input(
    mut input: Box<dyn Input>,
    declared_ports: usize,
    router: Router,
    retry: RetryConfig,
    stop: CancellationToken,
    readiness: Arc<Readiness>,
    ready_key: String,
) -> Result<(), String> {
    let component = router.name.clone();
    match connect_with_backoff(&component, &stop, &retry, Connectable::Input(&mut *input)).await {
        Connect::Connected => {}
        Connect::Stopped => return Ok(()),
        Connect::GaveUp(e) | Connect::Fatal(e) => return Err(format!("input failed: {e}")),
    }
    readiness.set_ready(&ready_key);
    debug!(%component, "input started");
    let mut out = Emitter::new(declared_ports);
    let mut failures = 0;
    let result = loop {
        let read = tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            read = input.read(&mut out) => read,
        };
        let more = match read {
            Ok(more) => {
                failures = 0;
                more
            }
            Err(e) if e.is_retryable() => {
                failures += 1;
                let wait = retry.backoff(failures);
                warn!(%component, error = %e.chain(), retry_in = ?wait, "read failed");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => break Ok(()),
                }
                if matches!(e, PluginError::NotConnected { .. }) {
                    match connect_with_backoff(&component, &stop, &retry, Connectable::Input(&mut *input)).await {
                        Connect::Connected => {}
                        Connect::Stopped => break Ok(()),
                        Connect::GaveUp(e) | Connect::Fatal(e) => break Err(format!("input failed: {e}")),
                    }
                }
                true
            }
            Err(e) => break Err(format!("input failed: {}", e.chain())),
        };
        let emitted: Vec<(usize, Batch)> = out.drain().collect();
        for (port, mut batch) in emitted {
            track_acks(&mut batch, &router.metrics);
            router.route(port, batch).await;
        }
        if !more {
            break Ok(());
        }
    };
    // A read cancelled at shutdown may have left events behind: they were never sent.
    for (_, batch) in out.drain() {
        fail_batch(&batch, AckStatus::Errored);
    }
    input.close().await;
    debug!(%component, "input finished");
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_stage(
    mut stage: Box<dyn Stage>,
    declared_ports: usize,
    mut rx: mpsc::Receiver<Batch>,
    router: Router,
    stop: CancellationToken,
    hard: CancellationToken,
    readiness: Arc<Readiness>,
    ready_key: String,
) -> Result<(), String> {
    readiness.set_ready(&ready_key);
    let mut out = Emitter::new(declared_ports);
    let mut ticker = stage.tick_interval().map(|every| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let metrics = router.metrics.clone();
    loop {
        let tick = async {
            match ticker.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = hard.cancelled() => {
                let lost = fail_queue(&mut rx);
                warn!(component = %router.name, events = lost, "stage stopped at the deadline; queued events failed back");
                return Ok(());
            }
            batch = rx.recv() => match batch {
                Some(batch) => {
                    metrics.queued.set(rx.len() as i64);
                    metrics.received.inc_by(batch.len() as u64);
                    let started = Instant::now();
                    // If the deadline interrupts the stage, its batch is failed, not acknowledged.
                    let tokens = distinct_tokens(&batch);
                    tokio::select! {
                        biased;
                        _ = stage.process(batch, &mut out) => {}
                        _ = hard.cancelled() => {
                            for token in &tokens {
                                token.mark(AckStatus::Errored);
                            }
                            drop(tokens);
                            for (_, emitted) in out.drain() {
                                fail_batch(&emitted, AckStatus::Errored);
                            }
                            fail_queue(&mut rx);
                            return Ok(());
                        }
                    }
                    metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
                    router.route_all(&mut out).await;
                }
                None => break,
            },
            _ = tick => {
                stage.tick(&mut out).await;
                router.route_all(&mut out).await;
            }
        }
    }
    if stop.is_cancelled() {
        stage.stop(&mut out).await;
    } else {
        stage.finish(&mut out).await;
    }
    router.route_all(&mut out).await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_output(
    mut output: Box<dyn Output>,
    component: String,
    mut rx: mpsc::Receiver<Batch>,
    retry: RetryConfig,
    metrics: ComponentMetrics,
    hard: CancellationToken,
    readiness: Arc<Readiness>,
    ready_key: String,
) -> Result<(), String> {
    // False while the output has given up connecting (`retry.max_attempts`):
    // each batch then tries again and is failed back promptly if it cannot.
    let mut connected = match connect_with_backoff(&component, &hard, &retry, Connectable::Output(&mut *output)).await {
        Connect::Connected => true,
        Connect::GaveUp(_) => false,
        stopped_or_fatal => {
            let lost = fail_queue(&mut rx);
            warn!(%component, events = lost, "output never connected; queued events failed back");
            return match stopped_or_fatal {
                Connect::Fatal(e) => Err(format!("output failed: {e}")),
                _ => Ok(()),
            };
        }
    };
    if connected {
        readiness.set_ready(&ready_key);
    }
    loop {
        tokio::select! {
            biased;
            _ = hard.cancelled() => {
                let lost = fail_queue(&mut rx);
                warn!(%component, events = lost, "output stopped at the deadline; queued events failed back");
                break;
            }
            batch = rx.recv() => match batch {
                Some(batch) => {
                    metrics.queued.set(rx.len() as i64);
                    metrics.received.inc_by(batch.len() as u64);
                    if !connected {
                        match connect_with_backoff(&component, &hard, &retry, Connectable::Output(&mut *output)).await {
                            Connect::Connected => {
                                connected = true;
                                readiness.set_ready(&ready_key);
                            }
                            _ => {
                                fail_batch(&batch, AckStatus::Errored);
                                continue;
                            }
                        }
                    }
                    write_with_retry(&mut *output, &component, batch, &retry, &metrics, &hard).await;
                }
                None => break,
            }
        }
    }
    if let Err(e) = output.close().await {
        error!(%component, error = %e.chain(), "output close failed");
    }
    Ok(())
}

async fn write_with_retry(
    output: &mut dyn Output,
    component: &str,
    batch: Batch,
    retry: &RetryConfig,
    metrics: &ComponentMetrics,
    hard: &CancellationToken,
) {
    let mut attempt = 0;
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            biased;
            result = output.write(&batch) => result,
            _ = hard.cancelled() => {
                fail_batch(&batch, AckStatus::Errored);
                return;
            }
        };
        metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(()) => {
                metrics.sent[0].inc_by(batch.len() as u64);
                return;
            }
            Err(e) => e,
        };
        metrics.errors.inc();
        attempt += 1;
        if !error.is_retryable() || (retry.max_attempts > 0 && attempt >= retry.max_attempts) {
            error!(%component, attempt, events = batch.len(), error = %error.chain(), "write failed for good; events failed back to their sources");
            fail_batch(&batch, AckStatus::Errored);
            return;
        }
        metrics.retries.inc();
        let wait = retry.backoff(attempt);
        warn!(%component, attempt, events = batch.len(), error = %error.chain(), retry_in = ?wait, "write failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = hard.cancelled() => {
                fail_batch(&batch, AckStatus::Errored);
                return;
            }
        }
        if matches!(error, PluginError::NotConnected { .. })
            && connect_with_backoff(component, hard, retry, Connectable::Output(&mut *output)).await
                != Connect::Connected
        {
            fail_batch(&batch, AckStatus::Errored);
            return;
        }
    }
}
