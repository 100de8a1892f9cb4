//! Moving batches between tasks, and failing them back when they cannot move.

use conflux_api::{AckStatus, AckToken, Batch, Emitter};
use tokio::sync::mpsc;
use tracing::warn;

use crate::metrics::ComponentMetrics;

/// Sends one component's emitted batches to the channels that read each port.
pub(super) struct Router {
    pub name: std::sync::Arc<str>,
    /// Port names by index (`""` is the default port), for logs.
    pub ports: Vec<String>,
    pub targets: Vec<Vec<mpsc::Sender<Batch>>>,
    pub error_port: usize,
    pub metrics: ComponentMetrics,
}

impl Router {
    pub async fn route_all(&self, out: &mut Emitter) {
        let emitted: Vec<(usize, Batch)> = out.drain().collect();
        for (port, batch) in emitted {
            self.route(port, batch).await;
        }
    }

    pub async fn route(&self, port: usize, batch: Batch) {
        let n = batch.len() as u64;
        if let Some(c) = self.metrics.sent.get(port) {
            c.inc_by(n);
        }
        self.metrics.tap.record(self.ports.get(port).map_or("", String::as_str), &batch);
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

pub(super) fn fail_batch(batch: &Batch, status: AckStatus) {
    for e in batch {
        e.ack.mark(status);
    }
}

/// One clone of each acknowledgement unit in a batch (usually one).
pub(super) fn distinct_tokens(batch: &Batch) -> Vec<AckToken> {
    let mut tokens: Vec<AckToken> = Vec::new();
    for event in batch {
        if event.ack.is_tracked() && !tokens.last().is_some_and(|t| t.same(&event.ack)) {
            tokens.push(event.ack.clone());
        }
    }
    tokens
}

/// Fails everything still queued in a channel (hard stop).
pub(super) fn fail_queue(rx: &mut mpsc::Receiver<Batch>) -> usize {
    rx.close();
    let mut n = 0;
    while let Ok(batch) = rx.try_recv() {
        n += batch.len();
        fail_batch(&batch, AckStatus::Errored);
    }
    n
}

/// Wraps the source's tokens so the engine counts unacknowledged events.
pub(super) fn track_acks(batch: &mut Batch, metrics: &ComponentMetrics) {
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
