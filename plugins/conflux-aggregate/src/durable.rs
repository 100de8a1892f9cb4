//! Effectively-once bookkeeping for the `aggregate` stage.
//!
//! Three promises make a restart neither lose nor double-count:
//! - source acknowledgements are held until a snapshot containing their
//!   effect is durable, so an unsaved event is always redelivered;
//! - a snapshot records, per source stream, the positions whose effect it
//!   contains (as runs: a JetStream redelivery comes after newer messages,
//!   so "everything up to the highest" would skip it), and a replayed event
//!   at one of them is skipped;
//! - results of closed windows stay in the snapshot until an output confirms
//!   them, and are emitted again after a restore (they are absolute values
//!   per group and window, so a repeat is harmless).
//!
//! Positions are taken at batch boundaries: the events one source event
//! became (a split) travel in one batch, so a position is never half-counted.

use std::collections::{BTreeMap, HashMap, VecDeque};
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
    /// The result's key and revision (its metadata), sent again with it.
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub revision: u64,
}

/// What a snapshot holds; written from borrowed state, read back owned.
#[derive(Serialize, Deserialize)]
pub struct Snapshot<W, P> {
    pub version: u32,
    /// Window shape, grouping and metrics the state was built with.
    pub fingerprint: String,
    /// Highest source position per stream whose effect the state contains
    /// (what a snapshot without `counted` means: everything up to it).
    pub positions: BTreeMap<String, u64>,
    /// Every position per stream whose effect the state contains.
    #[serde(default)]
    pub counted: BTreeMap<String, Counted>,
    pub windows: Vec<W>,
    pub sessions: Vec<(String, (i64, i64))>,
    pub gauges: Vec<(String, Vec<f64>)>,
    pub max_event_time: Option<i64>,
    pub last_slide_emitted: i64,
    /// The last window the state limit closed early (see the stage's `closed_early`).
    #[serde(default)]
    pub closed_early: Option<(i64, i64)>,
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
    pub revision: u64,
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
    /// Results emitted for the group's window so far (absent in older snapshots).
    #[serde(default)]
    pub revision: u64,
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
    /// Positions per stream counted as of the last whole batch.
    counted: HashMap<Arc<str>, Counted>,
    /// Positions seen in the batch being processed.
    in_batch: Vec<(Arc<str>, u64)>,
    pending: BTreeMap<u64, Pending>,
    next_id: u64,
    /// Results' fates as outputs report them; drained at each snapshot.
    confirmations: Arc<Mutex<Vec<(u64, AckStatus)>>>,
    pub counters: Counters,
}

/// Most runs of counted positions kept per stream. Past it the lowest gap
/// is closed as if counted (a message that never came: filtered out or
/// deleted), so a stream with many gaps costs at most ~1 MiB.
const MAX_RUNS: usize = 65_536;

/// The positions of one source stream whose effect the state holds:
/// everything up to `floor`, and disjoint runs above it. A gap is a message
/// not counted yet: after a crash, JetStream redelivers the ones the lost
/// state had counted after newer messages, and they must count then.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counted {
    floor: Option<u64>,
    /// (first, last) of each run, in order. A deque: new positions join at
    /// the back, a full list drops its lowest run at the front.
    runs: VecDeque<(u64, u64)>,
}

impl Counted {
    fn up_to(highest: u64) -> Self {
        Counted { floor: Some(highest), runs: VecDeque::new() }
    }

    pub fn contains(&self, at: u64) -> bool {
        if self.floor.is_some_and(|floor| at <= floor) {
            return true;
        }
        // The last run starting at or before `at`.
        let i = self.runs.partition_point(|&(first, _)| first <= at);
        i > 0 && at <= self.runs[i - 1].1
    }

    fn highest(&self) -> Option<u64> {
        self.runs.back().map(|&(_, last)| last).or(self.floor)
    }

    /// Counts `first..=last`, joining the runs (and the floor) it touches.
    pub fn insert_run(&mut self, mut first: u64, mut last: u64) {
        if let Some(floor) = self.floor {
            if last <= floor {
                return;
            }
            first = first.max(floor + 1);
        }
        // Runs that overlap or touch [first, last] sit together in the list.
        let from = self.runs.partition_point(|&(_, end)| end.saturating_add(1) < first);
        let to = self.runs.partition_point(|&(start, _)| start <= last.saturating_add(1));
        for (start, end) in self.runs.drain(from..to) {
            first = first.min(start);
            last = last.max(end);
        }
        self.runs.insert(from, (first, last));
        if let (Some(floor), Some(&(start, end))) = (self.floor, self.runs.front()) {
            if start == floor + 1 {
                self.floor = Some(end);
                self.runs.pop_front();
            }
        }
        if self.runs.len() > MAX_RUNS {
            if let Some((_, end)) = self.runs.pop_front() {
                self.floor = Some(end);
            }
        }
    }
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
            in_batch: Vec::new(),
            pending: BTreeMap::new(),
            next_id: 0,
            confirmations: Arc::default(),
            counters,
        }
    }

    /// Whether the event's effect is already in the state (a replay); records its position otherwise.
    pub fn already_counted(&mut self, event: &Event) -> bool {
        let Some(position) = &event.position else { return false };
        if self.counted.get(&position.stream).is_some_and(|done| done.contains(position.offset)) {
            self.counters.skipped.inc();
            return true;
        }
        self.in_batch.push((position.stream.clone(), position.offset));
        false
    }

    /// The batch is fully applied: its positions now count. Consecutive
    /// positions (a file's lines, a partition's offsets) go in as one run.
    pub fn end_batch(&mut self) {
        if self.in_batch.is_empty() {
            return;
        }
        self.in_batch.sort_unstable();
        let mut batch = self.in_batch.drain(..);
        let Some((mut stream, first)) = batch.next() else { return };
        let mut run = (first, first);
        for (next_stream, at) in batch {
            if next_stream == stream && at <= run.1 + 1 {
                run.1 = run.1.max(at);
                continue;
            }
            self.counted.entry(stream).or_default().insert_run(run.0, run.1);
            (stream, run) = (next_stream, (at, at));
        }
        self.counted.entry(stream).or_default().insert_run(run.0, run.1);
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
        // Up to 16 intervals, and no more than a minute unless the interval is longer.
        let max = self.interval.saturating_mul(16).min(Duration::from_secs(60)).max(self.interval);
        self.last_save.elapsed() >= conflux_api::Backoff::new(self.interval, max).wait(self.failures + 1)
    }

    /// The bookkeeping a snapshot records, with state filled in by the stage.
    pub fn snapshot<'a>(&'a self, windows: Vec<WindowRef<'a>>) -> SnapshotRef<'a> {
        Snapshot {
            version: SNAPSHOT_VERSION,
            fingerprint: self.fingerprint.clone(),
            positions: self.counted.iter().filter_map(|(k, v)| Some((k.to_string(), v.highest()?))).collect(),
            counted: self.counted.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            windows,
            sessions: Vec::new(),
            gauges: Vec::new(),
            max_event_time: None,
            closed_early: None,
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
    /// A snapshot written before `counted` existed has only `positions`
    /// (everything up to each).
    pub fn restore(
        &mut self,
        positions: BTreeMap<String, u64>,
        mut counted: BTreeMap<String, Counted>,
        pending: Vec<Pending>,
    ) -> Vec<(Pending, AckToken)> {
        for (stream, highest) in positions {
            counted.entry(stream).or_insert_with(|| Counted::up_to(highest));
        }
        self.counted = counted.into_iter().map(|(k, done)| (Arc::from(k.as_str()), done)).collect();
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

    /// A redelivered message below newer ones counts once: it is skipped
    /// only if its own position was counted, not because a higher one was.
    #[test]
    fn a_redelivery_after_newer_messages_counts_and_a_repeat_does_not() {
        let js: Arc<str> = Arc::from("jetstream:S");
        let mut d =
            Durability::new(Store::file("x".into()), Duration::from_secs(1), String::new(), Counters::default());
        for seq in [1, 2, 3, 6, 7] {
            assert!(!d.already_counted(&at(&js, seq)));
        }
        d.end_batch();
        assert!(!d.already_counted(&at(&js, 4)), "never counted: 6 and 7 do not cover it");
        assert!(d.already_counted(&at(&js, 6)));
        d.end_batch();
        assert!(d.already_counted(&at(&js, 4)));
        assert!(!d.already_counted(&at(&js, 5)));
        d.end_batch();
        assert_eq!(d.counted[&js], Counted { floor: None, runs: VecDeque::from([(1, 7)]) });
        // Restored from a snapshot that had only the highest position: everything up to it.
        let old = d.restore(BTreeMap::from([("jetstream:S".to_string(), 9)]), BTreeMap::new(), Vec::new());
        assert!(old.is_empty());
        assert!(d.already_counted(&at(&js, 9)) && !d.already_counted(&at(&js, 10)));
    }

    #[test]
    fn runs_merge_and_stay_bounded() {
        let mut c = Counted::default();
        c.insert_run(10, 12);
        c.insert_run(20, 20);
        c.insert_run(14, 15);
        assert_eq!(c.runs, [(10, 12), (14, 15), (20, 20)]);
        c.insert_run(13, 13);
        assert_eq!(c.runs, [(10, 15), (20, 20)]);
        c.insert_run(5, 30);
        assert_eq!(c.runs, [(5, 30)]);
        assert!(c.contains(5) && c.contains(30) && !c.contains(4) && !c.contains(31));
        let mut gappy = Counted::default();
        for i in 0..(MAX_RUNS as u64 + 10) {
            gappy.insert_run(2 * i, 2 * i);
        }
        assert_eq!(gappy.runs.len(), MAX_RUNS);
        assert_eq!(gappy.floor, Some(18), "the ten lowest gaps were closed");
        assert!(gappy.contains(17) && !gappy.contains(21) && gappy.contains(20));
        gappy.insert_run(19, 19);
        assert_eq!((gappy.floor, gappy.runs.front().copied()), (Some(20), Some((22, 22))), "a run joins the floor");
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
        let ok = d.track(Pending { payload: Value::from("a"), event_time: 1, key: String::new(), revision: 1 });
        let bad = d.track(Pending { payload: Value::from("b"), event_time: 2, key: String::new(), revision: 1 });
        bad.mark(AckStatus::Errored);
        drop((ok, bad));
        let retry = d.settle();
        assert_eq!(retry.len(), 1);
        assert_eq!(retry[0].0.payload, Value::from("b"));
        assert_eq!(d.snapshot(Vec::new()).pending.len(), 1, "the failed one stays pending");
    }
}
