//! The task that runs an output: gathers write batches (`batch:`), keeps up
//! to `max_in_flight` writes going, retries and reconnects with the output's
//! own `retry`, sends refused events to its `error` port, and marks the
//! output up or down for `/ready`.
//!
//! Every batch handed to a write is held by a [`Write`] until its outcome
//! is settled; dropping an unsettled one (a write cut off at the deadline)
//! fails its events back as `Errored`, so nothing is acknowledged unwritten.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use conflux_api::component::ERROR_META;
use conflux_api::{AckStatus, Batch, FailedEvent, Health, Output, PluginError};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::connect::{connect_with_backoff, Connect, Connectable};
use super::gather::Gather;
use super::route::{fail_batch, fail_queue, Router};
use super::Task;
use crate::config::RetryConfig;
use crate::metrics::ComponentMetrics;
use crate::options::OutputOptions;

pub(super) async fn run(
    task: Task,
    mut output: Box<dyn Output>,
    rx: mpsc::Receiver<Batch>,
    options: OutputOptions,
) -> Result<(), String> {
    let Task { component, router, metrics, hard, health, .. } = task;
    let shared = Arc::new(Shared { component, retry: options.retry.clone(), metrics, health });
    let mut driver = Driver {
        gather: Gather::new(options.batch.as_ref()),
        max_in_flight: options.max_in_flight.max(1),
        shared: shared.clone(),
        router,
        rx,
        hard,
        waiting: VecDeque::new(),
        connected: false,
        upstream_closed: false,
    };
    let result = loop {
        if !driver.connected {
            let connect = connect_with_backoff(
                &shared.component,
                &driver.hard,
                &shared.retry,
                &shared.health,
                Connectable::Output(&mut *output),
            )
            .await;
            match connect {
                Connect::Connected => driver.connected = true,
                // Each later batch tries again and is failed back promptly if it cannot.
                Connect::GaveUp(_) => driver.fail_held("the output cannot connect"),
                Connect::Stopped => {
                    driver.fail_everything("output stopped at the deadline");
                    break Ok(());
                }
                Connect::Fatal(e) => {
                    driver.fail_everything("output cannot connect");
                    break Err(format!("output failed: {e}"));
                }
            }
        }
        match driver.write_until_reconnect(&*output).await {
            Phase::Finished | Phase::Stopped => break Ok(()),
            Phase::Reconnect => driver.connected = false,
        }
    };
    if let Err(e) = output.close().await {
        error!(component = %shared.component, error = %e.chain(), "output close failed");
    }
    result
}

/// What every write of one output reads.
struct Shared {
    component: Arc<str>,
    retry: RetryConfig,
    metrics: ComponentMetrics,
    health: Health,
}

struct Driver {
    gather: Gather,
    max_in_flight: usize,
    shared: Arc<Shared>,
    /// Routes refused events to the `error` port.
    router: Router,
    rx: mpsc::Receiver<Batch>,
    hard: CancellationToken,
    /// Writes that wait for a reconnect, oldest first.
    waiting: VecDeque<Write>,
    connected: bool,
    upstream_closed: bool,
}

enum Phase {
    /// Upstream ended and everything was written or failed back.
    Finished,
    /// The shutdown deadline passed; everything held was failed back.
    Stopped,
    /// A write said the connection is gone (or none was made yet).
    Reconnect,
}

impl Driver {
    /// Writes while the connection holds, `max_in_flight` at once.
    async fn write_until_reconnect(&mut self, output: &dyn Output) -> Phase {
        let mut in_flight = FuturesUnordered::new();
        let mut reconnect = false;
        loop {
            while !reconnect && in_flight.len() < self.max_in_flight {
                let next = match self.waiting.pop_front() {
                    Some(write) => write,
                    None => match self.gather.take(self.rx.is_empty(), self.upstream_closed) {
                        Some(batch) => Write::new(batch),
                        None => break,
                    },
                };
                if !self.connected {
                    self.waiting.push_front(next);
                    reconnect = true;
                    break;
                }
                in_flight.push(write_with_retry(output, next, self.shared.clone()));
            }
            if in_flight.is_empty() {
                if reconnect {
                    return Phase::Reconnect;
                }
                if self.upstream_closed && self.gather.is_empty() && self.waiting.is_empty() {
                    return Phase::Finished;
                }
            }
            let receive = !self.upstream_closed && !reconnect && self.gather.has_room();
            // Only while a write could start: a passed deadline must not spin.
            let deadline = self.gather.deadline().filter(|_| in_flight.len() < self.max_in_flight && !reconnect);
            tokio::select! {
                biased;
                _ = self.hard.cancelled() => {
                    // Dropping the writes in flight fails their batches back.
                    drop(in_flight);
                    self.fail_everything("output stopped at the deadline");
                    return Phase::Stopped;
                }
                Some(settled) = in_flight.next(), if !in_flight.is_empty() => {
                    if let Some(write) = self.settle(settled).await {
                        self.waiting.push_back(write);
                        reconnect = true;
                    }
                }
                batch = self.rx.recv(), if receive => match batch {
                    Some(batch) => {
                        self.shared.metrics.queued.set(self.rx.len() as i64);
                        self.shared.metrics.received.inc_by(batch.len() as u64);
                        self.gather.push(batch);
                    }
                    None => self.upstream_closed = true,
                },
                _ = sleep_until(deadline), if deadline.is_some() => {}
            }
        }
    }

    /// Acts on a finished write; hands back one that must wait for a reconnect.
    async fn settle(&mut self, settled: Settled) -> Option<Write> {
        let shared = &self.shared;
        match settled {
            Settled::Written(mut write) => {
                shared.metrics.sent[0].inc_by(write.batch.len() as u64);
                shared.health.up();
                write.settled = true;
            }
            Settled::Partial(mut write, failed) => {
                shared.health.up();
                let refused = refused_events(&write.batch, &failed, &shared.component);
                shared.metrics.sent[0].inc_by((write.batch.len() - refused.len()) as u64);
                debug!(component = %shared.component, events = refused.len(), "events refused by the output go to its error port");
                write.settled = true;
                // The written events' tokens drop unmarked; the refused ones
                // travel on and are settled where the error port leads.
                drop(write);
                self.router.route(self.router.error_port, refused).await;
            }
            Settled::Failed(write, e) => {
                error!(component = %shared.component, attempt = write.attempt, events = write.batch.len(), error = %e.chain(), "write failed for good; events failed back to their sources");
                // Dropped unsettled: failed back as errored.
            }
            Settled::Reconnect(write) => return Some(write),
        }
        None
    }

    /// Fails back what waits for a connection that could not be made.
    fn fail_held(&mut self, why: &str) {
        let mut lost: usize = self.waiting.drain(..).map(|w| w.batch.len()).sum();
        for batch in self.gather.drain() {
            lost += batch.len();
            fail_batch(&batch, AckStatus::Errored);
        }
        if lost > 0 {
            warn!(component = %self.shared.component, events = lost, "{why}; held events failed back");
        }
    }

    /// Fails back everything held and everything still queued upstream.
    fn fail_everything(&mut self, why: &str) {
        self.fail_held(why);
        let lost = fail_queue(&mut self.rx);
        if lost > 0 {
            warn!(component = %self.shared.component, events = lost, "{why}; queued events failed back");
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A batch handed to the output, failed back as `Errored` if dropped before
/// its outcome was settled.
struct Write {
    batch: Batch,
    /// Failed attempts so far.
    attempt: u32,
    settled: bool,
}

impl Write {
    fn new(batch: Batch) -> Self {
        Write { batch, attempt: 0, settled: false }
    }
}

impl Drop for Write {
    fn drop(&mut self) {
        if !self.settled {
            fail_batch(&self.batch, AckStatus::Errored);
        }
    }
}

enum Settled {
    Written(Write),
    /// Written except these events.
    Partial(Write, Vec<FailedEvent>),
    /// Failed for good (fatal, or `retry.max_attempts` reached).
    Failed(Write, PluginError),
    Reconnect(Write),
}

/// One batch written, retried with backoff while retrying can help.
async fn write_with_retry(output: &dyn Output, mut write: Write, shared: Arc<Shared>) -> Settled {
    let retry = &shared.retry;
    loop {
        let started = Instant::now();
        let result = output.write(&write.batch).await;
        shared.metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(()) => return Settled::Written(write),
            Err(PluginError::Partial(failed)) => return Settled::Partial(write, failed),
            Err(e) => e,
        };
        shared.metrics.errors.inc();
        write.attempt += 1;
        if !error.is_retryable() || (retry.max_attempts > 0 && write.attempt >= retry.max_attempts) {
            if error.is_retryable() {
                shared.health.down(format!("write failed {} times: {}", write.attempt, error.chain()));
            }
            return Settled::Failed(write, error);
        }
        shared.metrics.retries.inc();
        shared.health.down(format!("write failed (attempt {}): {}", write.attempt, error.chain()));
        let wait = retry.backoff(write.attempt);
        warn!(component = %shared.component, attempt = write.attempt, events = write.batch.len(), error = %error.chain(), retry_in = ?wait, "write failed; retrying");
        tokio::time::sleep(wait).await;
        if matches!(error, PluginError::NotConnected { .. }) {
            return Settled::Reconnect(write);
        }
    }
}

/// Copies of the refused events, each with its reason in the metadata.
fn refused_events(batch: &Batch, failed: &[FailedEvent], component: &str) -> Batch {
    let mut refused = Vec::with_capacity(failed.len());
    let mut seen = vec![false; batch.len()];
    for f in failed {
        match batch.get(f.index) {
            Some(event) if !seen[f.index] => {
                seen[f.index] = true;
                let mut event = event.clone();
                event.meta.insert(ERROR_META, f.reason.as_str());
                refused.push(event);
            }
            Some(_) => {}
            None => {
                warn!(%component, index = f.index, events = batch.len(), "the output refused an event index outside its batch; ignored")
            }
        }
    }
    refused
}
