//! The `alert` stage: rules over metric events, with hold times, hysteresis
//! and absence detection, emitting `firing` and `resolved` events.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use conflux_api::config::Duration;
use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, BuiltStage, Emitter, Event, Registration, Stage,
    StageConfig, Timestamp, Value,
};
use conflux_json::path::FieldPath;
use conflux_rhai::{Condition, Limits};
use schemars::JsonSchema;
use serde::Deserialize;
use tracing::warn;

use crate::accumulator::{detached, float};
use crate::config::{condition, field_path};

/// Evaluates alert rules on incoming events (typically `aggregate` results)
/// and emits an event when a rule starts firing and when it resolves.
///
/// Alert events carry `alert` (rule name), `state` (`firing`/`resolved`),
/// `severity`, `value`, `since`, `at`, and the group fields at their paths.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Field paths that identify the group an event is about (e.g. `data.restaurantId`).
    #[serde(default)]
    pub group_by: Vec<String>,
    /// The rules.
    pub rules: Vec<RuleConfig>,
    /// Sandbox limits for the conditions.
    #[serde(default)]
    pub limits: Limits,
    /// Most open absence expectations (a `start` seen, its `end` not yet) kept across
    /// all `expect` rules; beyond it the oldest is forgotten (it never fires or
    /// resolves), counted and logged.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
}

fn default_max_pending() -> usize {
    100_000
}

/// One rule: a threshold (`when`) or an absence (`expect`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Rule name, reported as `alert`.
    pub name: String,
    /// Rhai condition over the event, e.g. `event.cancelled / event.bookings > 0.2`.
    #[serde(default)]
    pub when: Option<String>,
    /// Rhai expression reported as `value` (default: none).
    #[serde(default)]
    pub value: Option<String>,
    /// The condition must hold this long (in event time) before the alert fires (default 0s).
    #[serde(default, rename = "for")]
    pub hold: Option<Duration>,
    /// Condition that resolves a firing alert (hysteresis); default: `when` no longer holds.
    #[serde(default)]
    pub resolve_when: Option<String>,
    /// Reported severity.
    #[serde(default = "warning")]
    pub severity: String,
    /// Absence rule: an event matching `start` must be followed by one matching `end` with the same key.
    #[serde(default)]
    pub expect: Option<ExpectConfig>,
}

fn warning() -> String {
    "warning".into()
}

/// `expect: { start: …, end: …, key: data.bookingId, within: 30m, after: data.bookingTime }`
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpectConfig {
    /// Rhai condition: this event opens an expectation (`event.type == "booking_confirmed"`).
    pub start: String,
    /// Rhai condition: this event fulfils it (`event.type == "booking_completed"`).
    pub end: String,
    /// Field path joining start and end events.
    pub key: String,
    /// Deadline after the start (or after the `after` time).
    pub within: Duration,
    /// Field with the time the deadline counts from (e.g. the booking time); default: the start event's time.
    #[serde(default)]
    pub after: Option<String>,
}

enum RuleKind {
    Threshold { when: Condition, resolve: Option<Condition>, hold: i64 },
    Absence { start: Condition, end: Condition, key: FieldPath, within: i64, after: Option<FieldPath> },
}

struct Rule {
    name: String,
    severity: String,
    value: Option<Condition>,
    kind: RuleKind,
}

enum Status {
    Pending(i64),
    Firing(i64),
}

struct Pending {
    deadline: i64,
    group: Vec<Value>,
    fired: bool,
    /// Position in `AlertStage::order`.
    seq: u64,
}

struct AlertStage {
    group_by: Vec<FieldPath>,
    rules: Vec<Rule>,
    /// Threshold state by (rule, group key).
    status: HashMap<(usize, String), Status>,
    /// Absence expectations by (rule, key).
    pending: HashMap<(usize, String), Pending>,
    /// The same expectations oldest first (by when their `start` arrived), for eviction.
    order: BTreeMap<u64, (usize, String)>,
    next_seq: u64,
    max_pending: usize,
    evictions: crate::Evictions,
    clock: Option<i64>,
    last_event_wall: Instant,
}

impl StageConfig for AlertConfig {
    const TYPE: &'static str = "alert";
    fn build(self, cx: &BuildContext) -> Result<BuiltStage, BuildError> {
        if self.rules.is_empty() {
            return Err(BuildError::at(["rules"], "name at least one rule"));
        }
        if self.max_pending == 0 {
            return Err(BuildError::at(["max_pending"], "max_pending must be at least 1"));
        }
        let mut rules = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            let i = i.to_string();
            let at = |opt: &'static str| ["rules", i.as_str(), opt];
            let kind = match (&r.when, &r.expect) {
                (Some(when), None) => RuleKind::Threshold {
                    when: condition(when, &self.limits, &at("when"))?,
                    resolve: r
                        .resolve_when
                        .as_deref()
                        .map(|s| condition(s, &self.limits, &at("resolve_when")))
                        .transpose()?,
                    hold: r.hold.map(|d| d.0.as_nanos() as i64).unwrap_or(0),
                },
                (None, Some(e)) => RuleKind::Absence {
                    start: condition(&e.start, &self.limits, &["rules", i.as_str(), "expect", "start"])?,
                    end: condition(&e.end, &self.limits, &["rules", i.as_str(), "expect", "end"])?,
                    key: field_path(&e.key, &["rules", i.as_str(), "expect", "key"])?,
                    within: e.within.0.as_nanos() as i64,
                    after: e
                        .after
                        .as_deref()
                        .map(|a| field_path(a, &["rules", i.as_str(), "expect", "after"]))
                        .transpose()?,
                },
                _ => {
                    return Err(BuildError::at(
                        ["rules", i.as_str()],
                        format!("rule `{}` needs exactly one of `when` or `expect`", r.name),
                    ))
                }
            };
            let value = r.value.as_deref().map(|s| condition(s, &self.limits, &at("value"))).transpose()?;
            rules.push(Rule { name: r.name.clone(), severity: r.severity.clone(), value, kind });
        }
        let group_by = self
            .group_by
            .iter()
            .enumerate()
            .map(|(i, g)| field_path(g, &["group_by", &i.to_string()]))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(BuiltStage::new(AlertStage {
            group_by,
            rules,
            status: HashMap::new(),
            pending: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            max_pending: self.max_pending,
            evictions: crate::Evictions::new(cx.counter(
                "alert_expectations_evicted",
                "Absence expectations an alert stage forgot because max_pending was reached",
            )),
            clock: None,
            last_event_wall: Instant::now(),
        }))
    }
}

inventory::submit!(Registration::stage::<AlertConfig>());

impl AlertStage {
    fn group(&self, event: &Event) -> (String, Vec<Value>) {
        let values: Vec<Value> =
            self.group_by.iter().map(|p| p.get(&event.data).map(detached).unwrap_or_default()).collect();
        let key = values.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\u{1f}");
        (key, values)
    }

    /// Applies one rule to one event; returns the alert it raises, if any.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        r: usize,
        rule: &mut Rule,
        event: &mut Event,
        t: i64,
        group_key: &str,
        group: &[Value],
    ) -> Result<Option<Event>, String> {
        match &mut rule.kind {
            RuleKind::Threshold { when, resolve, hold } => {
                let holds = when.matches(event)?;
                let id = (r, group_key.to_string());
                let resolved = match (self.status.get(&id), resolve) {
                    (Some(Status::Firing(_)), Some(resolve)) => resolve.matches(event)?,
                    _ => !holds,
                };
                let value = match &mut rule.value {
                    Some(v) => number(v.evaluate(event)?),
                    None => Value::new_null(),
                };
                let (next, emit) = match self.status.get(&id) {
                    None if holds && *hold == 0 => (Some(Status::Firing(t)), Some(("firing", t))),
                    None if holds => (Some(Status::Pending(t)), None),
                    None => (None, None),
                    Some(Status::Pending(since)) if holds && t - since >= *hold => {
                        (Some(Status::Firing(*since)), Some(("firing", *since)))
                    }
                    Some(Status::Pending(since)) if holds => (Some(Status::Pending(*since)), None),
                    Some(Status::Pending(_)) => (None, None),
                    Some(Status::Firing(since)) if resolved => (None, Some(("resolved", *since))),
                    Some(Status::Firing(since)) => (Some(Status::Firing(*since)), None),
                };
                match next {
                    Some(status) => self.status.insert(id, status),
                    None => self.status.remove(&id),
                };
                Ok(emit.map(|(state, since)| alert(&self.group_by, rule, state, group, value, since, t)))
            }
            RuleKind::Absence { start, end, key, within, after } => {
                let Some(k) = key.get(&event.data).map(|v| v.as_str_or_json()) else { return Ok(None) };
                let id = (r, k);
                if end.matches(event)? {
                    if let Some(p) = self.pending.remove(&id) {
                        self.order.remove(&p.seq);
                        if p.fired {
                            let value = Value::from(id.1.as_str());
                            return Ok(Some(alert(&self.group_by, rule, "resolved", &p.group, value, p.deadline, t)));
                        }
                    }
                } else if start.matches(event)? {
                    let base = after
                        .as_ref()
                        .and_then(|a| a.get(&event.data))
                        .and_then(Timestamp::from_value)
                        .map(|ts| ts.0)
                        .unwrap_or(t);
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let expectation = Pending { deadline: base + *within, group: group.to_vec(), fired: false, seq };
                    if let Some(replaced) = self.pending.insert(id.clone(), expectation) {
                        self.order.remove(&replaced.seq);
                    }
                    self.order.insert(seq, id);
                    self.enforce_limit();
                }
                Ok(None)
            }
        }
    }
}

/// Builds an alert event: group fields at their paths, then the alert fields.
fn alert(
    group_by: &[FieldPath],
    rule: &Rule,
    state: &str,
    group: &[Value],
    value: Value,
    since: i64,
    at: i64,
) -> Event {
    {
        let mut payload = Value::new_object();
        for (path, v) in group_by.iter().zip(group) {
            let _ = path.set(&mut payload, v.clone());
        }
        let fields: BTreeMap<&str, Value> = [
            ("alert", Value::from(rule.name.as_str())),
            ("state", Value::from(state)),
            ("severity", Value::from(rule.severity.as_str())),
            ("value", value),
            ("since", Value::from(Timestamp(since).to_rfc3339().as_str())),
            ("at", Value::from(Timestamp(at).to_rfc3339().as_str())),
        ]
        .into_iter()
        .collect();
        if let Some(obj) = conflux_api::sonic_rs::JsonValueMutTrait::as_object_mut(&mut payload) {
            for (k, v) in fields {
                obj.insert(&k, v);
            }
        }
        let mut event = Event::new(payload);
        event.event_time = Some(Timestamp(at));
        event
    }
}

impl AlertStage {
    /// Forgets the oldest expectations beyond `max_pending`.
    fn enforce_limit(&mut self) {
        while self.pending.len() > self.max_pending {
            let Some((_, id)) = self.order.pop_first() else { break };
            self.pending.remove(&id);
            if let Some(evicted) = self.evictions.record() {
                warn!(
                    pending = self.pending.len(),
                    max_pending = self.max_pending,
                    evicted,
                    "alert expectation limit reached: forgetting the oldest (it will neither fire nor resolve)"
                );
            }
        }
    }

    /// Event-time clock; moves on with the wall clock after a second of silence.
    fn now(&self) -> Option<i64> {
        let idle = self.last_event_wall.elapsed();
        self.clock.map(|c| if idle.as_secs() >= 1 { c + idle.as_nanos() as i64 } else { c })
    }

    fn expire(&mut self, out: &mut Emitter) {
        let Some(now) = self.now() else { return };
        let mut due: Vec<(usize, String)> =
            self.pending.iter().filter(|(_, p)| !p.fired && p.deadline <= now).map(|(k, _)| k.clone()).collect();
        due.sort();
        for id in due {
            let (deadline, group) = {
                let p = self.pending.get_mut(&id).expect("listed above");
                p.fired = true;
                (p.deadline, p.group.clone())
            };
            let event =
                alert(&self.group_by, &self.rules[id.0], "firing", &group, Value::from(id.1.as_str()), deadline, now);
            out.emit(event);
        }
    }
}

fn number(value: conflux_rhai::Dynamic) -> Value {
    if let Ok(f) = value.as_float() {
        return float(f);
    }
    if let Ok(i) = value.as_int() {
        return Value::from(i);
    }
    if let Ok(b) = value.as_bool() {
        return Value::from(b);
    }
    Value::from(value.to_string().as_str())
}

#[async_trait]
impl Stage for AlertStage {
    async fn process(&mut self, batch: Batch, out: &mut Emitter) {
        for mut event in batch {
            let t = event.event_time.map(|t| t.0).unwrap_or_else(|| Timestamp::now().0);
            self.clock = Some(self.clock.map_or(t, |c| c.max(t)));
            self.last_event_wall = Instant::now();
            let (group_key, group) = self.group(&event);
            let mut rules = std::mem::take(&mut self.rules);
            for (r, rule) in rules.iter_mut().enumerate() {
                match self.apply(r, rule, &mut event, t, &group_key, &group) {
                    Ok(Some(alert)) => out.emit(alert),
                    Ok(None) => {}
                    Err(reason) => {
                        let mut failed = event.derive(event.data.clone());
                        failed.ack = conflux_api::AckToken::untracked();
                        out.fail(failed, format!("rule `{}`: {reason}", rule.name));
                    }
                }
            }
            self.rules = rules;
            // The metric event ends here; the alerts are new events.
        }
        self.expire(out);
    }

    fn tick_interval(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(1))
    }

    async fn tick(&mut self, out: &mut Emitter) {
        self.expire(out);
    }
}

trait AsKey {
    fn as_str_or_json(&self) -> String;
}

impl AsKey for Value {
    fn as_str_or_json(&self) -> String {
        use conflux_api::sonic_rs::JsonValueTrait;
        self.as_str().map(str::to_string).unwrap_or_else(|| self.to_string())
    }
}
