//! Results: closing windows, sliding steps, updates, and the gauge levels
//! they report.

use std::collections::HashMap;

use conflux_api::component::{RESULT_KEY_META, RESULT_REVISION_META};
use conflux_api::{AckToken, Emitter, Event, Timestamp, Value};

use super::{AggregateStage, GroupState};
use crate::accumulator::{object, Acc};
use crate::durable::Pending;
use crate::metric::add_gauges;

impl AggregateStage {
    /// Gauge levels of a group at time `end`: the level carried from the
    /// windows already closed (or sliding buckets already expired) plus the
    /// increments of every open window of the group ending by `end`. An
    /// event's increment is held by exactly one window (the earliest it falls
    /// in, see `process`), so overlapping (hopping) windows and merged
    /// (sliding) buckets never count it twice, and an out-of-order event
    /// still reaches every later level. `None` without gauge metrics.
    pub(super) fn levels(&self, key: &str, end: i64) -> Option<Vec<f64>> {
        if !self.has_gauge {
            return None;
        }
        let mut levels = self.gauges.get(key).cloned().unwrap_or_else(|| vec![0.0; self.metrics.len()]);
        levels.resize(self.metrics.len(), 0.0);
        for (_, groups) in self.windows.range(..(end, i64::MIN)).filter(|(w, _)| w.1 <= end) {
            if let Some(state) = groups.get(key) {
                add_gauges(&mut levels, &state.accs);
            }
        }
        Some(levels)
    }

    /// A window (or sliding bucket) leaves the state: its gauge increments
    /// join the group's carried level.
    pub(super) fn carry_gauges(&mut self, key: &str, accs: &[Acc]) {
        if !self.has_gauge {
            return;
        }
        let n = self.metrics.len();
        let levels = self.gauges.entry(key.to_string()).or_insert_with(|| vec![0.0; n]);
        levels.resize(n, 0.0);
        add_gauges(levels, accs);
    }

    /// `levels`: the gauges' levels at the window's end (from [`Self::levels`]).
    pub(super) fn result(
        &self,
        window: &WindowText,
        state: &GroupState,
        levels: Option<&[f64]>,
        final_: bool,
    ) -> Value {
        let mut payload = Value::new_object();
        for (path, value) in self.group_paths.iter().zip(&state.group) {
            let _ = path.set(&mut payload, value.clone());
        }
        let mut fields: Vec<(String, Value)> = Vec::new();
        fields.push((
            "window".into(),
            object([
                ("start".to_string(), Value::from(window.start.as_str())),
                ("end".to_string(), Value::from(window.end.as_str())),
            ]),
        ));
        let seconds = (window.bounds.1 - window.bounds.0) as f64 / 1e9;
        for (i, (metric, acc)) in self.metrics.iter().zip(&state.accs).enumerate() {
            let level = levels.and_then(|l| l.get(i).copied());
            fields.push((metric.name.clone(), metric.value(acc, seconds, level)));
        }
        fields.push(("final".into(), Value::from(final_)));
        if let Some(obj) = conflux_api::sonic_rs::JsonValueMutTrait::as_object_mut(&mut payload) {
            for (k, v) in fields {
                obj.insert(&k, v);
            }
        }
        payload
    }

    /// Emits a closed window's groups as final results carrying their sources' acknowledgements.
    pub(super) fn close(&mut self, window: (i64, i64), out: &mut Emitter) {
        let Some(groups) = self.windows.remove(&window) else { return };
        self.states -= groups.len();
        let text = WindowText::of(window);
        for (key, mut state) in groups {
            // Windows close in order of their end, so the carried level plus the
            // open windows ending by this one's end is the level at its end.
            self.carry_gauges(&key, &state.accs);
            let levels = self.levels(&key, window.1);
            let payload = self.result(&text, &state, levels.as_deref(), true);
            let (result_key, revision) = (self.result_key(&text, &state.group), state.revision + 1);
            if let Some(sessions) = self.sessions.get_mut(&key) {
                sessions.retain(|w| *w != window);
                if sessions.is_empty() {
                    self.sessions.remove(&key);
                }
            }
            let tokens = std::mem::take(&mut state.tokens);
            let ack = if let Some(durability) = &mut self.durability {
                // Sources were (or will be) acknowledged by a snapshot; the result stays in
                // snapshots until an output confirms it.
                durability.track(Pending {
                    payload: payload.clone(),
                    event_time: window.1,
                    key: result_key.clone(),
                    revision,
                })
            } else if tokens.is_empty() {
                AckToken::untracked()
            } else {
                AckToken::new(move |status| tokens.iter().for_each(|t| t.mark(status)))
            };
            out.emit(result_event(payload, window.1, result_key, revision).with_ack(ack));
        }
    }

    /// The stable identity of one group's window (see [`RESULT_KEY_META`]):
    /// `pipeline/stage/[group values]/window start`.
    pub(super) fn result_key(&self, window: &WindowText, group: &[Value]) -> String {
        let values = conflux_api::sonic_rs::to_string(group).unwrap_or_default();
        let mut key = String::with_capacity(self.key_prefix.len() + values.len() + window.start.len() + 1);
        key.push_str(&self.key_prefix);
        key.push_str(&values);
        key.push('/');
        key.push_str(&window.start);
        key
    }

    pub(super) fn close_due(&mut self, watermark: i64, out: &mut Emitter) {
        if self.windower.is_sliding().is_some() {
            return;
        }
        let due: Vec<(i64, i64)> = self
            .windows
            .keys()
            .take_while(|(start, _)| *start < watermark)
            .filter(|(_, end)| *end <= watermark)
            .copied()
            .collect();
        for window in due {
            self.close(window, out);
        }
    }

    /// Sliding windows: emits every step `t` up to `upto` not yet emitted
    /// whose `[t - size, t)` holds buckets, merged from them. The watermark
    /// may pass many steps at once (a large batch, a jump in event time), so
    /// each is emitted; steps without events are skipped, not walked.
    pub(super) fn emit_sliding(&mut self, upto: i64, out: &mut Emitter) {
        let Some((size, every)) = self.windower.is_sliding() else { return };
        let last = upto.div_euclid(every).saturating_mul(every);
        if last <= self.last_slide_emitted {
            return;
        }
        let mut t = match self.last_slide_emitted {
            i64::MIN => i64::MIN,
            emitted => emitted + every,
        };
        loop {
            // A bucket starting before this window is in no later one either.
            self.expire_buckets_before(t.saturating_sub(size));
            let Some(&(first, _)) = self.windows.keys().next() else { break };
            if first >= t {
                // Nothing in [t - size, t): on to the first step holding the next bucket.
                t = (first.div_euclid(every) + 1) * every;
                continue;
            }
            if t > last {
                break;
            }
            self.emit_step(t, size, out);
            t += every;
        }
        self.last_slide_emitted = last;
    }

    /// One sliding result per group for `[t - size, t)`, merged from its buckets.
    pub(super) fn emit_step(&self, t: i64, size: i64, out: &mut Emitter) {
        let mut merged: HashMap<&str, GroupState> = HashMap::new();
        for (_, groups) in self.windows.range((t - size, i64::MIN)..).take_while(|(w, _)| w.0 < t) {
            for (key, state) in groups {
                match merged.get_mut(key.as_str()) {
                    Some(m) => m.accs.iter_mut().zip(&state.accs).for_each(|(a, b)| a.merge(b)),
                    None => {
                        let copy = GroupState {
                            group: state.group.clone(),
                            accs: state.accs.clone(),
                            tokens: Vec::new(),
                            dirty: false,
                            revision: 0,
                        };
                        merged.insert(key, copy);
                    }
                }
            }
        }
        let text = WindowText::of((t - size, t));
        for (key, state) in &merged {
            let levels = self.levels(key, t);
            let payload = self.result(&text, state, levels.as_deref(), true);
            // Each step's window is reported once, final.
            out.emit(result_event(payload, t, self.result_key(&text, &state.group), 1));
        }
    }

    /// Buckets that left every window still to come are done: their events are acknowledged.
    pub(super) fn expire_buckets_before(&mut self, start: i64) {
        while let Some(&window) = self.windows.keys().next().filter(|w| w.0 < start) {
            self.expire_bucket(window);
        }
    }

    /// The end of the last sliding window an event of `bucket` counts in:
    /// the event is late once the watermark has reached it.
    pub(super) fn last_sliding_end(bucket: (i64, i64), size: i64, every: i64) -> i64 {
        bucket.0.saturating_add(size).div_euclid(every) * every
    }

    /// Drops a sliding bucket, keeping its gauge increments in the carried levels.
    pub(super) fn expire_bucket(&mut self, window: (i64, i64)) {
        if let Some(groups) = self.windows.remove(&window) {
            self.states -= groups.len();
            for (key, state) in &groups {
                self.carry_gauges(key, &state.accs);
            }
        }
    }

    pub(super) fn emit_updates(&mut self, out: &mut Emitter) {
        let mut results = Vec::new();
        for (window, groups) in self.windows.iter_mut() {
            for (key, state) in groups.iter_mut().filter(|(_, s)| s.dirty) {
                state.dirty = false;
                state.revision += 1;
                results.push((*window, key.clone(), state.group.clone(), state.accs.clone(), state.revision));
            }
        }
        // Results come window by window: each window's text is made once.
        let mut text: Option<WindowText> = None;
        for (window, key, group, accs, revision) in results {
            let text = match &mut text {
                Some(t) if t.bounds == window => t,
                slot => slot.insert(WindowText::of(window)),
            };
            let result_key = self.result_key(text, &group);
            let state = GroupState { group, accs, tokens: Vec::new(), dirty: false, revision };
            let levels = self.levels(&key, window.1);
            let payload = self.result(text, &state, levels.as_deref(), false);
            out.emit(result_event(payload, window.1, result_key, revision));
        }
    }
}

/// A window's bounds and their RFC 3339 text, made once per window rather
/// than once per group's result.
pub(super) struct WindowText {
    pub(super) bounds: (i64, i64),
    pub(super) start: String,
    pub(super) end: String,
}

impl WindowText {
    pub(super) fn of(bounds: (i64, i64)) -> Self {
        WindowText { bounds, start: Timestamp(bounds.0).to_rfc3339(), end: Timestamp(bounds.1).to_rfc3339() }
    }
}

/// Emits results again: restored from a snapshot, or failed by an output.
pub(super) fn emit_pending(results: Vec<(Pending, AckToken)>, out: &mut Emitter) {
    for (pending, ack) in results {
        out.emit(result_event(pending.payload, pending.event_time, pending.key, pending.revision).with_ack(ack));
    }
}

/// A result event: timed at its window's end, with its key and revision in the metadata.
fn result_event(payload: Value, end: i64, key: String, revision: u64) -> Event {
    let mut event = Event::new(payload);
    event.event_time = Some(Timestamp(end));
    event.meta.insert(RESULT_KEY_META, key.as_str());
    event.meta.insert(RESULT_REVISION_META, revision);
    event
}
