//! The `aggregate` stage at run time.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use conflux_api::component::{RESULT_KEY_META, RESULT_REVISION_META};
use conflux_api::{
    async_trait, inventory, AckToken, Batch, BuildContext, BuildError, BuiltStage, Emitter, Event, Field, PortId,
    Registration, Stage, StageConfig, Timestamp, Value,
};
use conflux_json::path::{FieldPath, FieldSet};
use conflux_rhai::Condition;
use tracing::{debug, error, info, warn};

use crate::accumulator::{array, detached, float, object, quantile, string_hash, value_hash, Acc, Distinct, Sum, TopK};
use crate::checkpoint::Store;
use crate::config::{AggregateConfig, Emit, MissingGroup, WindowConfig};
use crate::durable::{Durability, GroupRef, Pending, SavedSnapshot, WindowRef, SNAPSHOT_VERSION};
use crate::window::Windower;

const LATE: PortId = PortId(1);
const INVALID: PortId = PortId(2);

enum Kind {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    First,
    Last,
    Rate,
    Distinct,
    Percentiles(Vec<(String, f64)>),
    TopK(usize),
    Gauge { up: Box<Condition>, down: Box<Condition> },
}

struct Metric {
    name: String,
    kind: Kind,
    field: Option<FieldPath>,
    condition: Option<Condition>,
}

impl Metric {
    fn empty(&self) -> Acc {
        match &self.kind {
            Kind::Count => Acc::Count(0),
            Kind::Sum => Acc::Sum(Sum::default()),
            Kind::Avg => Acc::Avg(Sum::default(), 0),
            Kind::Min => Acc::Min(None),
            Kind::Max => Acc::Max(None),
            Kind::First => Acc::First(None),
            Kind::Last => Acc::Last(None),
            Kind::Rate => Acc::Rate(0),
            Kind::Distinct => Acc::Distinct(Distinct::default()),
            Kind::Percentiles(_) => Acc::percentiles(),
            Kind::TopK(k) => Acc::TopK(TopK::new(*k)),
            Kind::Gauge { .. } => Acc::Gauge(0.0),
        }
    }
}

/// What one event contributes to one metric, worked out once per event.
enum Contribution {
    Skip,
    One,
    /// The number as a float, and as an integer when it is one (sums stay exact).
    Number(f64, Option<i64>),
    Timed(Value),
    Hash(u64),
    Key(String),
    Delta(f64),
}

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
    pipeline: String,
}

fn path(option: &[&str], text: &str) -> Result<FieldPath, BuildError> {
    FieldPath::parse(text).map_err(|e| BuildError::at(option.iter().copied(), e))
}

fn nanos(d: conflux_api::config::Duration, option: &[&str]) -> Result<i64, BuildError> {
    let n = d.0.as_nanos() as i64;
    if n <= 0 {
        return Err(BuildError::at(option.iter().copied(), "must be longer than zero"));
    }
    Ok(n)
}

fn condition(source: &str, limits: &conflux_rhai::Limits, option: &[&str]) -> Result<Condition, BuildError> {
    Condition::compile(source, limits).map_err(|e| e.at(option.iter().copied()))
}

fn build_metric(
    name: &str,
    spec: &crate::config::MetricSpec,
    limits: &conflux_rhai::Limits,
) -> Result<Metric, BuildError> {
    let mut chosen: Vec<(Kind, Option<FieldPath>)> = Vec::new();
    let at = |kind: &str| ["metrics", name, kind].map(str::to_string);
    let field = |kind: &str, text: &String| {
        let option = at(kind);
        path(&option.iter().map(String::as_str).collect::<Vec<_>>(), text)
    };
    if spec.count.is_some() {
        chosen.push((Kind::Count, None));
    }
    if let Some(f) = &spec.sum {
        chosen.push((Kind::Sum, Some(field("sum", f)?)));
    }
    if let Some(f) = &spec.avg {
        chosen.push((Kind::Avg, Some(field("avg", f)?)));
    }
    if let Some(f) = &spec.min {
        chosen.push((Kind::Min, Some(field("min", f)?)));
    }
    if let Some(f) = &spec.max {
        chosen.push((Kind::Max, Some(field("max", f)?)));
    }
    if let Some(f) = &spec.first {
        chosen.push((Kind::First, Some(field("first", f)?)));
    }
    if let Some(f) = &spec.last {
        chosen.push((Kind::Last, Some(field("last", f)?)));
    }
    if spec.rate.is_some() {
        chosen.push((Kind::Rate, None));
    }
    if let Some(f) = &spec.count_distinct {
        chosen.push((Kind::Distinct, Some(field("count_distinct", f)?)));
    }
    if let Some(p) = &spec.percentiles {
        let mut names = Vec::new();
        for q in &p.quantiles {
            if !(0.0..=1.0).contains(q) {
                return Err(BuildError::at(at("percentiles"), format!("quantile {q} is not between 0 and 1")));
            }
            names.push((format!("p{}", q * 100.0), *q));
        }
        chosen.push((Kind::Percentiles(names), Some(field("percentiles", &p.field)?)));
    }
    if let Some(t) = &spec.top_k {
        if t.k == 0 {
            return Err(BuildError::at(at("top_k"), "k must be at least 1"));
        }
        chosen.push((Kind::TopK(t.k), Some(field("top_k", &t.field)?)));
    }
    if let Some(g) = &spec.gauge {
        let base = at("gauge");
        let up_at: Vec<&str> = base.iter().map(String::as_str).chain(["up"]).collect();
        let down_at: Vec<&str> = base.iter().map(String::as_str).chain(["down"]).collect();
        let value = match &g.value {
            Some(v) => Some(field("gauge", v)?),
            None => None,
        };
        chosen.push((
            Kind::Gauge {
                up: Box::new(condition(&g.up, limits, &up_at)?),
                down: Box::new(condition(&g.down, limits, &down_at)?),
            },
            value,
        ));
    }
    if chosen.len() != 1 {
        return Err(BuildError::at(["metrics", name], format!(
            "metric `{name}` needs exactly one kind (count, sum, avg, min, max, first, last, rate, count_distinct, percentiles, top_k, gauge); found {}",
            chosen.len()
        )));
    }
    let (kind, field) = chosen.pop().expect("one kind");
    let condition = match &spec.condition {
        Some(source) => Some(condition(source, limits, &["metrics", name, "where"])?),
        None => None,
    };
    Ok(Metric { name: name.to_string(), kind, field, condition })
}

/// Opens (lazily) where snapshots go; the fingerprint ties them to this configuration.
fn durability(config: &AggregateConfig, cx: &BuildContext) -> Result<Option<Durability>, BuildError> {
    let Some(checkpoint) = &config.checkpoint else { return Ok(None) };
    if checkpoint.interval.0.is_zero() {
        return Err(BuildError::at(["checkpoint", "interval"], "must be longer than zero"));
    }
    let store = match &checkpoint.redis {
        Some(url) => {
            let key = checkpoint
                .key
                .clone()
                .unwrap_or_else(|| format!("conflux:checkpoint:{}:{}", cx.pipeline, cx.component));
            Store::redis(url, key)
                .map_err(|e| BuildError::at(["checkpoint", "redis"], format!("bad Redis URL: {e}")))?
        }
        None => {
            if checkpoint.key.is_some() {
                return Err(BuildError::at(["checkpoint", "key"], "key only applies with `redis`"));
            }
            Store::file(cx.data_dir.join(&cx.pipeline).join(format!("{}.checkpoint.json", cx.component)))
        }
    };
    let mut fingerprint = format!("{:?} {:?} {:?}", config.window, config.group_by, config.metrics);
    if config.metrics.values().any(|m| m.gauge.is_some()) {
        // Gauge state changed meaning (per-window increments, not levels): older snapshots do not apply.
        fingerprint.push_str(" gauge-increments");
    }
    Ok(Some(Durability::new(store, checkpoint.interval.0, fingerprint, crate::durable::Counters::declare(cx))))
}

impl StageConfig for AggregateConfig {
    const TYPE: &'static str = "aggregate";
    fn build(self, cx: &BuildContext) -> Result<BuiltStage, BuildError> {
        let durability = durability(&self, cx)?;
        let windower = match &self.window {
            WindowConfig::Tumbling(size) => Windower::Tumbling { size: nanos(*size, &["window", "tumbling"])? },
            WindowConfig::Hopping { size, slide } => {
                let (size, slide) =
                    (nanos(*size, &["window", "hopping", "size"])?, nanos(*slide, &["window", "hopping", "slide"])?);
                if slide > size || size / slide > 1000 {
                    return Err(BuildError::at(
                        ["window", "hopping", "slide"],
                        "slide must be at most size, and size at most 1000 slides (use sliding for finer refresh)",
                    ));
                }
                Windower::Hopping { size, slide }
            }
            WindowConfig::Sliding { size, every } => {
                let (size, every) =
                    (nanos(*size, &["window", "sliding", "size"])?, nanos(*every, &["window", "sliding", "every"])?);
                if every > size {
                    return Err(BuildError::at(["window", "sliding", "every"], "every must be at most size"));
                }
                Windower::Sliding { size, every }
            }
            WindowConfig::Session { gap } => Windower::Session { gap: nanos(*gap, &["window", "session", "gap"])? },
            WindowConfig::Cumulative { period, timezone } => Windower::Cumulative {
                period: *period,
                tz: timezone.parse().map_err(|_| {
                    BuildError::at(
                        ["window", "cumulative", "timezone"],
                        format!("unknown time zone `{timezone}` (use an IANA name such as Europe/Paris)"),
                    )
                })?,
            },
        };
        if self.metrics.is_empty() {
            return Err(BuildError::at(["metrics"], "name at least one metric"));
        }
        let metrics = self
            .metrics
            .iter()
            .map(|(name, spec)| build_metric(name, spec, &self.limits))
            .collect::<Result<Vec<_>, _>>()?;
        let group_paths = self
            .group_by
            .iter()
            .enumerate()
            .map(|(i, g)| path(&["group_by", &i.to_string()], g))
            .collect::<Result<Vec<_>, _>>()?;
        let time_field = match &self.time.field {
            Some(f) => Some(path(&["time", "field"], f)?),
            None => None,
        };
        let has_gauge = metrics.iter().any(|m| matches!(m.kind, Kind::Gauge { .. }));
        let fields = FieldSet::new(
            time_field.iter().chain(&group_paths).chain(metrics.iter().filter_map(|m| m.field.as_ref())).cloned(),
        );
        let stage = AggregateStage {
            fields,
            windower,
            group_paths,
            missing_group: self.missing_group,
            default_group: Value::from(self.default_group.as_str()),
            time_field,
            lateness: self.time.allowed_lateness.0.as_nanos() as i64,
            metrics,
            emit: self.emit,
            idle_timeout: self.idle_timeout.0,
            max_groups: self.max_groups.max(1),
            windows: BTreeMap::new(),
            states: 0,
            sessions: HashMap::new(),
            gauges: HashMap::new(),
            has_gauge,
            max_event_time: None,
            closed_early: None,
            last_event_wall: Instant::now(),
            last_updates: Instant::now(),
            last_slide_emitted: i64::MIN,
            evictions: crate::Evictions::new(cx.counter(
                "aggregate_windows_evicted",
                "Windows an aggregate closed early because max_groups was reached",
            )),
            key: String::new(),
            assigned: Vec::new(),
            contributions: Vec::new(),
            durability,
            component: cx.component.clone(),
            pipeline: cx.pipeline.clone(),
        };
        Ok(BuiltStage::new(stage).with_ports(["late", "invalid"]))
    }
}

inventory::submit!(Registration::stage::<AggregateConfig>());

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
            let c = match (&metric.kind, value) {
                (Kind::Count | Kind::Rate, _) => Contribution::One,
                // The amount for an increment; `apply_conditions` picks the sign or skips it.
                (Kind::Gauge { .. }, v) => Contribution::Delta(match (&metric.field, v) {
                    (None, _) => 1.0,
                    (Some(_), Some(v)) => v.as_f64().unwrap_or(0.0),
                    (Some(_), None) => 0.0,
                }),
                (_, None) => Contribution::Skip,
                (Kind::Sum | Kind::Avg | Kind::Min | Kind::Max | Kind::Percentiles(_), Some(v)) => match v.as_f64() {
                    Some(f) => Contribution::Number(f, v.as_i64()),
                    None => Contribution::Skip,
                },
                (Kind::First | Kind::Last, Some(v)) => Contribution::Timed(detached(&v.to_value())),
                (Kind::Distinct, Some(v)) => Contribution::Hash(match v.as_str() {
                    Some(s) => string_hash(&s),
                    None => value_hash(&v.to_value()),
                }),
                (Kind::TopK(_), Some(v)) => {
                    Contribution::Key(v.as_str().map(Cow::into_owned).unwrap_or_else(|| v.to_value().to_string()))
                }
            };
            self.contributions.push(c);
        }
    }

    /// Skips what a metric's `where` condition rules out, and turns gauge
    /// amounts into increments or decrements by their conditions.
    fn apply_conditions(&mut self, event: &mut Event) -> Result<(), String> {
        for (metric, c) in self.metrics.iter_mut().zip(&mut self.contributions) {
            if let Some(condition) = &mut metric.condition {
                if !condition.matches(event)? {
                    *c = Contribution::Skip;
                    continue;
                }
            }
            if let (Kind::Gauge { up, down }, Contribution::Delta(amount)) = (&mut metric.kind, &mut *c) {
                if !up.matches(event)? {
                    if down.matches(event)? {
                        *amount = -*amount;
                    } else {
                        *c = Contribution::Skip;
                    }
                }
            }
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

    /// Gauge levels of a group at time `end`: the level carried from the
    /// windows already closed (or sliding buckets already expired) plus the
    /// increments of every open window of the group ending by `end`. An
    /// event's increment is held by exactly one window (the earliest it falls
    /// in, see `process`), so overlapping (hopping) windows and merged
    /// (sliding) buckets never count it twice, and an out-of-order event
    /// still reaches every later level. `None` without gauge metrics.
    fn levels(&self, key: &str, end: i64) -> Option<Vec<f64>> {
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
    fn carry_gauges(&mut self, key: &str, accs: &[Acc]) {
        if !self.has_gauge {
            return;
        }
        let n = self.metrics.len();
        let levels = self.gauges.entry(key.to_string()).or_insert_with(|| vec![0.0; n]);
        levels.resize(n, 0.0);
        add_gauges(levels, accs);
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
            match (acc, c) {
                (_, Contribution::Skip) => {}
                (Acc::Count(n) | Acc::Rate(n), Contribution::One) => *n += 1,
                (Acc::Sum(s), Contribution::Number(f, i)) => s.add_number(*f, *i),
                (Acc::Avg(s, n), Contribution::Number(f, i)) => {
                    s.add_number(*f, *i);
                    *n += 1;
                }
                (Acc::Min(m), Contribution::Number(f, _)) => *m = Some(m.map_or(*f, |m| m.min(*f))),
                (Acc::Max(m), Contribution::Number(f, _)) => *m = Some(m.map_or(*f, |m| m.max(*f))),
                (Acc::Percentiles(s), Contribution::Number(f, _)) => s.add(*f),
                (Acc::First(first), Contribution::Timed(v)) if first.as_ref().is_none_or(|(ft, _)| t < *ft) => {
                    *first = Some((t, v.clone()))
                }
                (Acc::Last(last), Contribution::Timed(v)) if last.as_ref().is_none_or(|(lt, _)| t >= *lt) => {
                    *last = Some((t, v.clone()))
                }
                (Acc::Distinct(d), Contribution::Hash(h)) => d.insert_hash(*h),
                (Acc::TopK(top), Contribution::Key(k)) => top.add(k, 1),
                (Acc::Gauge(g), Contribution::Delta(d)) if gauge => *g += d,
                _ => {}
            }
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

    /// `levels`: the gauges' levels at the window's end (from [`Self::levels`]).
    fn result(&self, window: (i64, i64), state: &GroupState, levels: Option<&[f64]>, final_: bool) -> Value {
        let mut payload = Value::new_object();
        for (path, value) in self.group_paths.iter().zip(&state.group) {
            let _ = path.set(&mut payload, value.clone());
        }
        let mut fields: Vec<(String, Value)> = Vec::new();
        fields.push((
            "window".into(),
            object([
                ("start".to_string(), Value::from(Timestamp(window.0).to_rfc3339().as_str())),
                ("end".to_string(), Value::from(Timestamp(window.1).to_rfc3339().as_str())),
            ]),
        ));
        let seconds = (window.1 - window.0) as f64 / 1e9;
        for (i, (metric, acc)) in self.metrics.iter().zip(&state.accs).enumerate() {
            let value = match (acc, &metric.kind) {
                (Acc::Count(n), _) => Value::from(*n),
                (Acc::Rate(n), _) => float(*n as f64 / seconds),
                (Acc::Sum(s), _) => s.to_value(),
                (Acc::Avg(s, n), _) => {
                    if *n == 0 {
                        Value::new_null()
                    } else {
                        float(s.as_f64() / *n as f64)
                    }
                }
                (Acc::Min(m) | Acc::Max(m), _) => m.map(float).unwrap_or_default(),
                (Acc::First(v) | Acc::Last(v), _) => v.as_ref().map(|(_, v)| v.clone()).unwrap_or_default(),
                (Acc::Distinct(d), _) => Value::from(d.estimate()),
                (Acc::Percentiles(sketch), Kind::Percentiles(names)) => {
                    object(names.iter().map(|(name, q)| (name.clone(), quantile(sketch, *q))))
                }
                (Acc::TopK(top), Kind::TopK(k)) => array(top.top(*k).into_iter().map(|(value, count)| {
                    object([
                        ("value".to_string(), Value::from(value.as_str())),
                        ("count".to_string(), Value::from(count)),
                    ])
                })),
                (Acc::Gauge(g), _) => float(levels.and_then(|l| l.get(i).copied()).unwrap_or(*g)),
                _ => Value::new_null(),
            };
            fields.push((metric.name.clone(), value));
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
    fn close(&mut self, window: (i64, i64), out: &mut Emitter) {
        let Some(groups) = self.windows.remove(&window) else { return };
        self.states -= groups.len();
        for (key, mut state) in groups {
            // Windows close in order of their end, so the carried level plus the
            // open windows ending by this one's end is the level at its end.
            self.carry_gauges(&key, &state.accs);
            let levels = self.levels(&key, window.1);
            let payload = self.result(window, &state, levels.as_deref(), true);
            let (result_key, revision) = (self.result_key(window, &state.group), state.revision + 1);
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
    fn result_key(&self, window: (i64, i64), group: &[Value]) -> String {
        let values = conflux_api::sonic_rs::to_string(group).unwrap_or_default();
        format!("{}/{}/{values}/{}", self.pipeline, self.component, Timestamp(window.0).to_rfc3339())
    }

    fn close_due(&mut self, watermark: i64, out: &mut Emitter) {
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
    fn emit_sliding(&mut self, upto: i64, out: &mut Emitter) {
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
    fn emit_step(&self, t: i64, size: i64, out: &mut Emitter) {
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
        for (key, state) in &merged {
            let levels = self.levels(key, t);
            let window = (t - size, t);
            let payload = self.result(window, state, levels.as_deref(), true);
            // Each step's window is reported once, final.
            out.emit(result_event(payload, t, self.result_key(window, &state.group), 1));
        }
    }

    /// Buckets that left every window still to come are done: their events are acknowledged.
    fn expire_buckets_before(&mut self, start: i64) {
        while let Some(&window) = self.windows.keys().next().filter(|w| w.0 < start) {
            self.expire_bucket(window);
        }
    }

    /// The end of the last sliding window an event of `bucket` counts in:
    /// the event is late once the watermark has reached it.
    fn last_sliding_end(bucket: (i64, i64), size: i64, every: i64) -> i64 {
        bucket.0.saturating_add(size).div_euclid(every) * every
    }

    /// Drops a sliding bucket, keeping its gauge increments in the carried levels.
    fn expire_bucket(&mut self, window: (i64, i64)) {
        if let Some(groups) = self.windows.remove(&window) {
            self.states -= groups.len();
            for (key, state) in &groups {
                self.carry_gauges(key, &state.accs);
            }
        }
    }

    fn emit_updates(&mut self, out: &mut Emitter) {
        let mut results = Vec::new();
        for (window, groups) in self.windows.iter_mut() {
            for (key, state) in groups.iter_mut().filter(|(_, s)| s.dirty) {
                state.dirty = false;
                state.revision += 1;
                results.push((*window, key.clone(), state.group.clone(), state.accs.clone(), state.revision));
            }
        }
        for (window, key, group, accs, revision) in results {
            let result_key = self.result_key(window, &group);
            let state = GroupState { group, accs, tokens: Vec::new(), dirty: false, revision };
            let levels = self.levels(&key, window.1);
            let payload = self.result(window, &state, levels.as_deref(), false);
            out.emit(result_event(payload, window.1, result_key, revision));
        }
    }

    /// Loads the last snapshot before the first event is processed. Until it
    /// can (store unreachable, unreadable or from another configuration), the
    /// stage waits: processing without its state would double-count.
    async fn ensure_restored(&mut self, out: &mut Emitter) {
        let backoff =
            conflux_api::Backoff::new(std::time::Duration::from_millis(500), std::time::Duration::from_secs(30));
        let mut failures = 0;
        loop {
            let Some(durability) = self.durability.as_mut() else { return };
            if durability.restored {
                return;
            }
            let loaded = durability.store.load().await.map_err(|e| e.to_string());
            let place = durability.store.describe();
            match loaded.and_then(|bytes| self.restore(bytes.as_deref(), out)) {
                Ok(()) => return,
                Err(reason) => {
                    failures += 1;
                    let wait = backoff.wait(failures);
                    error!(
                        component = %self.component,
                        checkpoint = %place,
                        %reason,
                        retry_in = ?wait,
                        "cannot restore the aggregate checkpoint; nothing is processed until it can"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn restore(&mut self, bytes: Option<&[u8]>, out: &mut Emitter) -> Result<(), String> {
        let durability = self.durability.as_mut().expect("checked by the caller");
        let Some(bytes) = bytes else {
            info!(component = %self.component, checkpoint = %durability.store.describe(), "no checkpoint yet; starting empty");
            durability.restored = true;
            return Ok(());
        };
        let snapshot: SavedSnapshot = conflux_api::sonic_rs::from_slice(bytes)
            .map_err(|e| format!("the checkpoint is not readable ({e}); remove it to start empty"))?;
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(format!(
                "the checkpoint has layout version {}, this build reads {SNAPSHOT_VERSION}; remove it to start empty",
                snapshot.version
            ));
        }
        if snapshot.fingerprint != durability.fingerprint {
            return Err("the checkpoint was written with a different window, group_by or metrics;                  restore that configuration, or remove the checkpoint to start empty"
                .into());
        }
        self.windows.clear();
        self.states = 0;
        for window in snapshot.windows {
            let groups: HashMap<String, GroupState> = window
                .groups
                .into_iter()
                .map(|g| {
                    let state = GroupState {
                        group: g.group,
                        accs: g.accs,
                        tokens: Vec::new(),
                        dirty: false,
                        revision: g.revision,
                    };
                    (g.key, state)
                })
                .collect();
            self.states += groups.len();
            self.windows.insert((window.start, window.end), groups);
        }
        for (key, session) in snapshot.sessions {
            self.sessions.entry(key).or_default().push(session);
        }
        self.gauges = snapshot.gauges.into_iter().collect();
        self.max_event_time = snapshot.max_event_time;
        self.closed_early = snapshot.closed_early;
        self.last_slide_emitted = snapshot.last_slide_emitted;
        let replay = durability.restore(snapshot.positions, snapshot.counted, snapshot.pending);
        info!(
            component = %self.component,
            checkpoint = %durability.store.describe(),
            states = self.states,
            results_to_resend = replay.len(),
            "restored aggregate state from checkpoint"
        );
        emit_pending(replay, out);
        Ok(())
    }

    fn snapshot_bytes(&self) -> Vec<u8> {
        let durability = self.durability.as_ref().expect("checked by the caller");
        let windows = self
            .windows
            .iter()
            .map(|(&(start, end), groups)| WindowRef {
                start,
                end,
                groups: groups
                    .iter()
                    .map(|(key, state)| GroupRef {
                        key,
                        group: &state.group,
                        accs: &state.accs,
                        revision: state.revision,
                    })
                    .collect(),
            })
            .collect();
        let mut snapshot = durability.snapshot(windows);
        snapshot.sessions = self.sessions.iter().flat_map(|(k, list)| list.iter().map(|w| (k.clone(), *w))).collect();
        snapshot.gauges = self.gauges.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        snapshot.max_event_time = self.max_event_time;
        snapshot.closed_early = self.closed_early;
        snapshot.last_slide_emitted = self.last_slide_emitted;
        // Values and accumulators always serialize; an empty snapshot would only mean a fresh start.
        conflux_api::sonic_rs::to_vec(&snapshot).unwrap_or_default()
    }

    /// Writes a snapshot; once durable, the sources of everything in it are acknowledged.
    async fn checkpoint(&mut self, out: &mut Emitter) {
        let Some(durability) = self.durability.as_mut() else { return };
        emit_pending(durability.settle(), out);
        let bytes = self.snapshot_bytes();
        let size = bytes.len();
        let durability = self.durability.as_mut().expect("checked above");
        let started = Instant::now();
        match durability.store.save(bytes).await {
            Ok(()) => {
                debug!(
                    component = %self.component,
                    bytes = size,
                    acknowledged = durability.held(),
                    took = ?started.elapsed(),
                    "checkpoint saved"
                );
                durability.saved();
            }
            Err(e) => {
                durability.failed();
                warn!(
                    component = %self.component,
                    error = %e,
                    waiting = durability.held(),
                    "checkpoint failed; sources stay unacknowledged until one succeeds"
                );
            }
        }
    }

    async fn checkpoint_if_due(&mut self, out: &mut Emitter) {
        if self.durability.as_ref().is_some_and(Durability::due) {
            self.checkpoint(out).await;
        }
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

/// Adds the gauge increments in `accs` to `levels` (other metrics' slots stay).
fn add_gauges(levels: &mut [f64], accs: &[Acc]) {
    for (level, acc) in levels.iter_mut().zip(accs) {
        if let Acc::Gauge(g) = acc {
            *level += g;
        }
    }
}

/// Emits results again: restored from a snapshot, or failed by an output.
fn emit_pending(results: Vec<(Pending, AckToken)>, out: &mut Emitter) {
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
