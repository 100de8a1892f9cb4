//! The `aggregate` stage at run time: events into windows and groups.
//!
//! What depends on a metric's kind is in `crate::metric`; building from
//! options in `build`, results in `results`, checkpoints in `snapshot`.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use conflux_api::{async_trait, AckToken, Batch, Emitter, Event, Field, PortId, Stage, Timestamp, Value};
use conflux_json::path::{FieldPath, FieldSet};
use tracing::warn;

use crate::accumulator::{detached, Acc};
use crate::config::{Emit, MissingGroup};
use crate::durable::Durability;
use crate::metric::{Contribution, Metric};
use crate::window::Windower;

mod build;
mod results;
mod snapshot;

const LATE: PortId = PortId(1);
const INVALID: PortId = PortId(2);

struct GroupState {
    group: Vec<Value>,
    accs: Vec<Acc>,
    tokens: Vec<AckToken>,
    dirty: bool,
    /// Results emitted for this group's window so far.
    revision: u64,
}

/// Windows by (start, end), then groups by key.
type Windows = BTreeMap<(i64, i64), HashMap<String, GroupState>>;

pub struct AggregateStage {
    windower: Windower,
    group_paths: Vec<FieldPath>,
    missing_group: MissingGroup,
    default_group: Value,
    time_field: Option<FieldPath>,
    lateness: i64,
    metrics: Vec<Metric>,
    emit: Emit,
    idle_timeout: std::time::Duration,
    max_groups: usize,
    windows: Windows,
    states: usize,
    /// Open sessions per group (several while out-of-order events arrive).
    sessions: HashMap<String, Vec<(i64, i64)>>,
    /// Gauge levels per group carried from closed windows (expired sliding buckets).
    gauges: HashMap<String, Vec<f64>>,
    has_gauge: bool,
    max_event_time: Option<i64>,
    /// The last window the state limit closed early: its result was final,
    /// so an event for it or an older window is late, not the start of a
    /// second, smaller result that would overwrite the first.
    closed_early: Option<(i64, i64)>,
    last_event_wall: Instant,
    last_updates: Instant,
    last_slide_emitted: i64,
    evictions: crate::Evictions,
    key: String,
    assigned: Vec<(i64, i64)>,
    contributions: Vec<Contribution>,
    /// Every path read per event, found in one scan: the time field (if
    /// any), the group paths, then each metric's field.
    fields: FieldSet,
    /// Set when `checkpoint` is configured.
    durability: Option<Durability>,
    component: String,
    /// `pipeline/stage/`, the start of every result key.
    key_prefix: String,
}

impl AggregateStage {
    /// Highest event time seen minus the allowed lateness; with no events for
    /// `idle_timeout`, it moves on with the wall clock so quiet windows close.
    fn watermark(&self) -> i64 {
        if self.time_field.is_none() {
            return Timestamp::now().0 - self.lateness;
        }
        let Some(max) = self.max_event_time else { return i64::MIN };
        let idle = self.last_event_wall.elapsed();
        let extra = if idle >= self.idle_timeout { idle.as_nanos() as i64 } else { 0 };
        max.saturating_add(extra) - self.lateness
    }

    /// `found`: the time field as read by `self.fields` (first of its paths).
    fn event_time(&self, found: Option<Field<'_>>) -> Result<i64, String> {
        match &self.time_field {
            None => Ok(Timestamp::now().0),
            Some(field) => match found {
                None => Err(format!("no event time: field `{field}` is missing")),
                Some(v) => Timestamp::from_field(&v)
                    .map(|t| t.0)
                    .ok_or_else(|| format!("field `{field}` is not a time (RFC 3339 or epoch): {}", v.to_value())),
            },
        }
    }

    /// Writes the group key into `self.key` from the group fields' values;
    /// false if a field is missing and that is invalid.
    fn group_key(&mut self, found: &[Option<Field<'_>>]) -> bool {
        self.key.clear();
        for found in found {
            let value = match *found {
                Some(v) if !v.is_null() => v,
                _ if self.missing_group == MissingGroup::Invalid => return false,
                _ => Field::Parsed(&self.default_group),
            };
            match value.as_str() {
                Some(s) => self.key.push_str(&s),
                None => self.key.push_str(&value.to_value().to_string()),
            }
            self.key.push('\u{1f}');
        }
        true
    }

    /// The group's field values, copied out of the event (only for a group's first event in a window).
    fn group_values(&self, event: &Event) -> Vec<Value> {
        self.group_paths
            .iter()
            .map(|path| match path.lookup(&event.data) {
                Some(v) if !v.is_null() => detached(&v.to_value()),
                _ => self.default_group.clone(),
            })
            .collect()
    }

    /// What each metric would take from the event, from its field's value
    /// (`found`: the metric fields, in metric order, for metrics with one);
    /// conditions are applied after, by [`Self::apply_conditions`].
    fn contributions(&mut self, found: &[Option<Field<'_>>]) {
        self.contributions.clear();
        let mut found = found.iter();
        for metric in &self.metrics {
            let value = match metric.field {
                Some(_) => found.next().copied().flatten().filter(|v| !v.is_null()),
                None => None,
            };
            self.contributions.push(metric.contribution(value));
        }
    }

    /// Skips what a metric's `where` condition rules out, and turns gauge
    /// amounts into increments or decrements by their conditions.
    fn apply_conditions(&mut self, event: &mut Event) -> Result<(), String> {
        for (metric, c) in self.metrics.iter_mut().zip(&mut self.contributions) {
            metric.apply_conditions(event, c)?;
        }
        Ok(())
    }

    /// A group's first state in a window. A gauge's accumulator holds only the
    /// window's own increments; its level is worked out when a result is built
    /// (see [`Self::levels`]).
    fn new_state(&self, group: Vec<Value>) -> GroupState {
        let accs: Vec<Acc> = self.metrics.iter().map(Metric::empty).collect();
        GroupState { group, accs, tokens: Vec::new(), dirty: false, revision: 0 }
    }

    /// `gauge`: whether this window takes the event's gauge increments (only one of its windows does).
    fn add(&mut self, window: (i64, i64), event: &Event, t: i64, gauge: bool) {
        let ack = &event.ack;
        if !self.windows.get(&window).is_some_and(|w| w.contains_key(self.key.as_str())) {
            let state = self.new_state(self.group_values(event));
            self.windows.entry(window).or_default().insert(self.key.clone(), state);
            self.states += 1;
        }
        let state = self.windows.get_mut(&window).and_then(|w| w.get_mut(self.key.as_str())).expect("just inserted");
        for (acc, c) in state.accs.iter_mut().zip(&self.contributions) {
            c.fold_into(acc, t, gauge);
        }
        if let Some(durability) = &mut self.durability {
            durability.hold(ack);
        } else if ack.is_tracked() && !state.tokens.last().is_some_and(|t| t.same(ack)) {
            state.tokens.push(ack.clone());
        }
        state.dirty = true;
    }

    /// Places a session event: grows the group's open session or starts a new one.
    /// The session of the current group that an event at `t` belongs to.
    /// The event's own span `[t, t + gap)` joins every open session it
    /// reaches, and so may bridge two (an out-of-order event filling a gap):
    /// they become one session, their states merged.
    fn session_window(&mut self, t: i64, gap: i64) -> (i64, i64) {
        let key = self.key.clone();
        let sessions = self.sessions.entry(key.clone()).or_default();
        let mut merged = (t, t + gap);
        let mut joined = Vec::new();
        // Repeat until nothing more joins: a grown session may reach another one.
        loop {
            let before = joined.len();
            sessions.retain(|&(start, end)| {
                let reaches = merged.0 < end && merged.1 >= start;
                if reaches {
                    merged = (merged.0.min(start), merged.1.max(end));
                    joined.push((start, end));
                }
                !reaches
            });
            if joined.len() == before {
                break;
            }
        }
        sessions.push(merged);
        for window in joined.into_iter().filter(|w| *w != merged) {
            let Some(groups) = self.windows.get_mut(&window) else { continue };
            let state = groups.remove(&key);
            if groups.is_empty() {
                self.windows.remove(&window);
            }
            let Some(state) = state else { continue };
            match self.windows.entry(merged).or_default().entry(key.clone()) {
                Entry::Occupied(mut into) => {
                    let into = into.get_mut();
                    into.accs.iter_mut().zip(&state.accs).for_each(|(a, b)| a.merge(b));
                    into.tokens.extend(state.tokens);
                    into.dirty |= state.dirty;
                    self.states -= 1;
                }
                Entry::Vacant(slot) => {
                    slot.insert(state);
                }
            }
        }
        merged
    }

    fn enforce_limit(&mut self, out: &mut Emitter) {
        while self.states > self.max_groups {
            let Some(oldest) = self.windows.keys().next().copied() else { break };
            if let Some(evicted) = self.evictions.record() {
                warn!(
                    states = self.states,
                    max_groups = self.max_groups,
                    evicted,
                    "aggregate state limit reached: closing the oldest window early"
                );
            }
            self.closed_early = self.closed_early.max(Some(oldest));
            self.close(oldest, out);
        }
    }
}

impl Drop for AggregateStage {
    /// Events whose windows never produced a result (the stage was cut off) must be redelivered.
    fn drop(&mut self) {
        for groups in self.windows.values() {
            for state in groups.values() {
                state.tokens.iter().for_each(|t| t.mark(conflux_api::AckStatus::Errored));
            }
        }
    }
}

#[async_trait]
impl Stage for AggregateStage {
    async fn process(&mut self, batch: Batch, out: &mut Emitter) {
        self.ensure_restored(out).await;
        let mut watermark = self.watermark();
        self.emit_sliding(watermark, out);
        // One clock reading per batch: the idle timeout is far coarser than a batch.
        let now = Instant::now();
        for mut event in batch {
            if self.durability.as_mut().is_some_and(|d| d.already_counted(&event)) {
                continue;
            }
            let found = self.fields.lookup(&event.data);
            let times = usize::from(self.time_field.is_some());
            let groups = times + self.group_paths.len();
            let t = match self.event_time(found.first().copied().flatten().filter(|_| times == 1)) {
                Ok(t) => t,
                Err(reason) => {
                    out.fail(event, reason);
                    continue;
                }
            };
            let grouped = self.group_key(&found[times..groups]);
            self.contributions(&found[groups..]);
            drop(found);
            event.event_time = Some(Timestamp(t));
            if !grouped {
                event.meta.insert(conflux_api::component::ERROR_META, "a group_by field is missing");
                out.emit_to(INVALID, event);
                continue;
            }
            match self.windower {
                Windower::Session { gap } => {
                    if t + gap <= watermark {
                        out.emit_to(LATE, event);
                        continue;
                    }
                    let window = self.session_window(t, gap);
                    self.assigned.clear();
                    self.assigned.push(window);
                }
                _ => {
                    let mut assigned = std::mem::take(&mut self.assigned);
                    self.windower.assign(t, &mut assigned);
                    // Late once every window it counts in has ended by the watermark
                    // (for a sliding bucket, the last window holding it).
                    let sliding = self.windower.is_sliding();
                    let end = |w: &(i64, i64)| match sliding {
                        Some((size, every)) => Self::last_sliding_end(*w, size, every),
                        None => w.1,
                    };
                    let closed_early = self.closed_early;
                    assigned.retain(|w| end(w) > watermark && closed_early.is_none_or(|c| *w > c));
                    self.assigned = assigned;
                    if self.assigned.is_empty() {
                        out.emit_to(LATE, event);
                        continue;
                    }
                }
            }
            if let Err(reason) = self.apply_conditions(&mut event) {
                out.fail(event, reason);
                continue;
            }
            if self.max_event_time.is_none_or(|m| t > m) {
                self.max_event_time = Some(t);
                watermark = self.watermark();
                // Sliding steps close as the watermark passes them, before later
                // events arrive, so what a window holds does not depend on batching.
                self.emit_sliding(watermark, out);
            }
            self.last_event_wall = now;
            let windows = std::mem::take(&mut self.assigned);
            // Gauge increments go to the earliest (still open) window only: a
            // level is not a sum, and hopping windows overlap.
            for (i, window) in windows.iter().enumerate() {
                self.add(*window, &event, t, i == 0);
            }
            self.assigned = windows;
            // The event itself ends here; its acknowledgement rides on the results.
        }
        self.close_due(watermark, out);
        self.emit_sliding(watermark, out);
        if self.emit == Emit::EveryBatch {
            self.emit_updates(out);
        }
        self.enforce_limit(out);
        if let Some(durability) = &mut self.durability {
            durability.end_batch();
        }
        // Under steady load ticks may not get a turn, so snapshots are also taken here.
        self.checkpoint_if_due(out).await;
    }

    fn tick_interval(&self) -> Option<std::time::Duration> {
        let mut every = std::time::Duration::from_secs(1);
        if let Emit::Updates(d) = self.emit {
            every = every.min(d.0);
        }
        if let Some((_, step)) = self.windower.is_sliding() {
            every = every.min(std::time::Duration::from_nanos(step as u64));
        }
        Some(every.max(std::time::Duration::from_millis(10)))
    }

    async fn tick(&mut self, out: &mut Emitter) {
        self.ensure_restored(out).await;
        let watermark = self.watermark();
        self.close_due(watermark, out);
        self.emit_sliding(watermark, out);
        if let Emit::Updates(every) = self.emit {
            if self.last_updates.elapsed() >= every.0 {
                self.last_updates = Instant::now();
                self.emit_updates(out);
            }
        }
        self.checkpoint_if_due(out).await;
    }

    async fn finish(&mut self, out: &mut Emitter) {
        self.ensure_restored(out).await;
        self.flush(out);
        // The results just emitted are in this snapshot as pending; a later start resends them.
        self.checkpoint(out).await;
    }

    /// With checkpoints, open windows are saved rather than closed early with partial
    /// figures; the next start continues them. Without, they are flushed as at the end.
    async fn stop(&mut self, out: &mut Emitter) {
        self.ensure_restored(out).await;
        if self.durability.is_some() {
            self.checkpoint(out).await;
        } else {
            self.flush(out);
        }
    }
}

impl AggregateStage {
    /// Closes every window: the input has ended.
    fn flush(&mut self, out: &mut Emitter) {
        if let Some((size, every)) = self.windower.is_sliding() {
            // Up to the last window holding the newest bucket: a window after the
            // last event still holds the events before it.
            if let Some(&newest) = self.windows.keys().next_back() {
                self.emit_sliding(Self::last_sliding_end(newest, size, every), out);
            }
            self.expire_buckets_before(i64::MAX);
            return;
        }
        let all: Vec<(i64, i64)> = self.windows.keys().copied().collect();
        for window in all {
            self.close(window, out);
        }
    }
}
