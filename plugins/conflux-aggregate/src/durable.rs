//! Effectively-once bookkeeping for the `aggregate` stage.
//!
//! Three promises make a restart neither lose nor double-count:
//! - source acknowledgements are held until a snapshot containing their
//!   effect is durable, so an unsaved event is always redelivered;
//! - a snapshot records, per source stream, the highest position whose
//!   effect it contains, and a replayed event at or below it is skipped;
//! - results of closed windows stay in the snapshot until an output confirms
//!   them, and are emitted again after a restore (they are absolute values
//!   per group and window, so a repeat is harmless).
//!
//! Positions are taken at batch boundaries: the events one source event
//! became (a split) travel in one batch, so a position is never half-counted.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conflux_api::metrics::Counter;
use conflux_api::{AckStatus, AckToken, BuildContext, Event, Value};
use serde::{Deserialize, Serialize};

use crate::accumulator::Acc;
use crate::checkpoint::Store;

/// Bumped when the snapshot layout changes incompatibly.
pub const SNAPSHOT_VERSION: u32 = 1;

/// A closed window's result an output has not confirmed yet.
#[derive(Clone, Serialize, Deserialize)]
pub struct Pending {
    pub payload: Value,
    pub event_time: i64,
}

/// What a snapshot holds; written from borrowed state, read back owned.
#[derive(Serialize, Deserialize)]
pub struct Snapshot<W, P> {
    pub version: u32,
    /// Window shape, grouping and metrics the state was built with.
    pub fingerprint: String,
    /// Highest source position per stream whose effect the state contains.
    pub positions: BTreeMap<String, u64>,
    pub windows: Vec<W>,
    pub sessions: Vec<(String, (i64, i64))>,
    pub gauges: Vec<(String, Vec<f64>)>,
    pub max_event_time: Option<i64>,
    pub last_slide_emitted: i64,
    pub pending: Vec<P>,
}

#[derive(Serialize)]
pub struct WindowRef<'a> {
    pub start: i64,
    pub end: i64,
    pub groups: Vec<GroupRef<'a>>,
}

#[derive(Serialize)]
pub struct GroupRef<'a> {
    pub key: &'a str,
    pub group: &'a [Value],
    pub accs: &'a [Acc],
}

#[derive(Deserialize)]
pub struct SavedWindow {
    pub start: i64,
    pub end: i64,
    pub groups: Vec<SavedGroup>,
}

#[derive(Deserialize)]
pub struct SavedGroup {
    pub key: String,
    pub group: Vec<Value>,
    pub accs: Vec<Acc>,
}

pub type SnapshotRef<'a> = Snapshot<WindowRef<'a>, &'a Pending>;
pub type SavedSnapshot = Snapshot<SavedWindow, Pending>;

/// The checkpointing side of one aggregate stage.
pub struct Durability {
    pub store: Store,
    pub interval: Duration,
    pub fingerprint: String,
    pub restored: bool,
    last_save: Instant,
    failures: u32,
    /// Source acknowledgements waiting for the next durable snapshot.
    held: Vec<AckToken>,
    /// Highest position per stream counted as of the last whole batch.
    counted: HashMap<Arc<str>, u64>,
    /// Highest position per stream seen in the batch being processed.
    in_batch: HashMap<Arc<str>, u64>,
    pending: BTreeMap<u64, Pending>,
    next_id: u64,
    /// Results' fates as outputs report them; drained at each snapshot.
    confirmations: Arc<Mutex<Vec<(u64, AckStatus)>>>,
    pub counters: Counters,
}

/// What `/metrics` shows of checkpointing.
#[derive(Clone, Default)]
pub struct Counters {
    pub saved: Counter,
    pub failed: Counter,
    /// Replayed events skipped because the state already counted them.
    pub skipped: Counter,
}

impl Counters {
    pub fn declare(cx: &BuildContext) -> Self {
        Counters {
            saved: cx.counter("aggregate_checkpoints", "Aggregate state snapshots made durable"),
            failed: cx.counter("aggregate_checkpoint_failures", "Aggregate snapshots that could not be written"),
            skipped: cx.counter(
                "aggregate_replays_skipped",
                "Replayed events an aggregate skipped because its restored state already counted them",
            ),
        }
    }
}

impl Durability {
    pub fn new(store: Store, interval: Duration, fingerprint: String, counters: Counters) -> Self {
        Durability {
            store,
            interval,
            fingerprint,
            restored: false,
            last_save: Instant::now(),
            failures: 0,
            held: Vec::new(),
            counted: HashMap::new(),
            in_batch: HashMap::new(),
            pending: BTreeMap::new(),
            next_id: 0,
            confirmations: Arc::default(),
            counters,
        }
    }

    /// Whether the event's effect is already in the state (a replay); records its position otherwise.
    pub fn already_counted(&mut self, event: &Event) -> bool {
        let Some(position) = &event.position else { return false };
        if self.counted.get(&position.stream).is_some_and(|done| position.offset <= *done) {
            self.counters.skipped.inc();
            return true;
        }
        let seen = self.in_batch.entry(position.stream.clone()).or_insert(position.offset);
        *seen = (*seen).max(position.offset);
        false
    }

    /// The batch is fully applied: its positions now count.
    pub fn end_batch(&mut self) {
        for (stream, offset) in self.in_batch.drain() {
            let done = self.counted.entry(stream).or_insert(offset);
            *done = (*done).max(offset);
        }
    }

    /// Keeps a source acknowledgement until the next durable snapshot.
    pub fn hold(&mut self, ack: &AckToken) {
        if ack.is_tracked() && !self.held.last().is_some_and(|t| t.same(ack)) {
            self.held.push(ack.clone());
        }
    }

    /// Registers a final result; the returned token reports its delivery back here.
    pub fn track(&mut self, pending: Pending) -> AckToken {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, pending);
        self.token_for(id)
    }

    fn token_for(&self, id: u64) -> AckToken {
        let confirmations = self.confirmations.clone();
        AckToken::new(move |status| {
            if let Ok(mut list) = confirmations.lock() {
                list.push((id, status));
            }
        })
    }

    /// Forgets confirmed results; returns the ones an output failed, with fresh tokens, to emit again.
    pub fn settle(&mut self) -> Vec<(Pending, AckToken)> {
        let confirmed = std::mem::take(&mut *self.confirmations.lock().unwrap_or_else(|p| p.into_inner()));
        let mut retry = Vec::new();
        for (id, status) in confirmed {
            match status {
                AckStatus::Delivered | AckStatus::Rejected => {
                    self.pending.remove(&id);
                }
                AckStatus::Errored => {
                    if let Some(pending) = self.pending.get(&id) {
                        retry.push((pending.clone(), self.token_for(id)));
                    }
                }
            }
        }
        retry
    }

    /// Whether a snapshot is due (sooner after success, backing off after failures).
    pub fn due(&self) -> bool {
        let backoff = self.interval.saturating_mul(1 << self.failures.min(4)).min(Duration::from_secs(60));
        self.last_save.elapsed() >= backoff.max(self.interval)
    }

    /// The bookkeeping a snapshot records, with state filled in by the stage.
    pub fn snapshot<'a>(&'a self, windows: Vec<WindowRef<'a>>) -> SnapshotRef<'a> {
        Snapshot {
            version: SNAPSHOT_VERSION,
            fingerprint: self.fingerprint.clone(),
            positions: self.counted.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            windows,
            sessions: Vec::new(),
            gauges: Vec::new(),
            max_event_time: None,
            last_slide_emitted: i64::MIN,
            pending: self.pending.values().collect(),
        }
    }

    /// The snapshot is durable: its events' sources may now hear they are done.
    pub fn saved(&mut self) {
        self.held.clear();
        self.failures = 0;
        self.counters.saved.inc();
        self.last_save = Instant::now();
    }

    pub fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.counters.failed.inc();
        self.last_save = Instant::now();
    }

    /// Takes back a restored snapshot's positions and unconfirmed results (re-emitted with fresh tokens).
    pub fn restore(&mut self, positions: BTreeMap<String, u64>, pending: Vec<Pending>) -> Vec<(Pending, AckToken)> {
        self.counted = positions.into_iter().map(|(k, v)| (Arc::from(k.as_str()), v)).collect();
        self.restored = true;
        pending.into_iter().map(|p| (p.clone(), self.track(p))).collect()
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }
}

impl Drop for Durability {
    /// Whatever no snapshot saved must be redelivered: the stage is gone with its state.
    fn drop(&mut self) {
        for token in self.held.drain(..) {
            token.mark(AckStatus::Errored);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_api::Timestamp;

    fn at(stream: &Arc<str>, offset: u64) -> Event {
        Event::with_time(Value::from(1), Timestamp(0)).at(stream, offset)
    }

    #[test]
    fn replays_are_recognised_only_after_their_batch_counts() {
        let file: Arc<str> = Arc::from("file:a");
        let mut d =
            Durability::new(Store::file("x".into()), Duration::from_secs(1), String::new(), Counters::default());
        assert!(!d.already_counted(&at(&file, 1)));
        // A split: two events from one line in the same batch both count.
        assert!(!d.already_counted(&at(&file, 2)));
        assert!(!d.already_counted(&at(&file, 2)));
        d.end_batch();
        assert!(d.already_counted(&at(&file, 2)));
        assert!(!d.already_counted(&at(&file, 3)));
        assert_eq!(d.counters.skipped.get(), 1);
        let unpositioned = Event::new(Value::from(1));
        assert!(!d.already_counted(&unpositioned));
    }

    #[test]
    fn unsaved_acknowledgements_fail_back_when_dropped() {
        let (token, mut rx) = AckToken::channel();
        let mut d =
            Durability::new(Store::file("x".into()), Duration::from_secs(1), String::new(), Counters::default());
        d.hold(&token);
        drop(token);
        drop(d);
        assert_eq!(rx.try_recv().unwrap(), AckStatus::Errored);
    }

    #[test]
    fn saved_acknowledgements_are_delivered() {
        let (token, mut rx) = AckToken::channel();
        let mut d =
            Durability::new(Store::file("x".into()), Duration::from_secs(1), String::new(), Counters::default());
        d.hold(&token);
        drop(token);
        assert!(rx.try_recv().is_err(), "held until the snapshot is durable");
        d.saved();
        assert_eq!(rx.try_recv().unwrap(), AckStatus::Delivered);
    }

    #[test]
    fn failed_results_come_back_confirmed_ones_go() {
        let mut d =
            Durability::new(Store::file("x".into()), Duration::from_secs(1), String::new(), Counters::default());
        let ok = d.track(Pending { payload: Value::from("a"), event_time: 1 });
        let bad = d.track(Pending { payload: Value::from("b"), event_time: 2 });
        bad.mark(AckStatus::Errored);
        drop((ok, bad));
        let retry = d.settle();
        assert_eq!(retry.len(), 1);
        assert_eq!(retry[0].0.payload, Value::from("b"));
        assert_eq!(d.snapshot(Vec::new()).pending.len(), 1, "the failed one stays pending");
    }
}
