//! The metric model: what each kind of metric takes from an event, how it
//! folds into its accumulator, and how its result is written. The stage
//! (`stage/`) walks windows and groups; everything that depends on the
//! metric's kind is here.

use std::borrow::Cow;

use conflux_api::{BuildError, Event, Value};
use conflux_json::path::FieldPath;
use conflux_json::Field;
use conflux_rhai::Condition;

use crate::accumulator::{array, detached, float, object, quantile, string_hash, value_hash, Acc, Distinct, Sum, TopK};
use crate::config::{condition, field_path, MetricSpec};

/// A metric's kind, with what the kind needs besides the field.
pub(crate) enum Kind {
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

/// One named metric of an aggregate.
pub(crate) struct Metric {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) field: Option<FieldPath>,
    pub(crate) condition: Option<Condition>,
}

/// What one event contributes to one metric, worked out once per event.
pub(crate) enum Contribution {
    Skip,
    One,
    /// The number as a float, and as an integer when it is one (sums stay exact).
    Number(f64, Option<i64>),
    Timed(Value),
    Hash(u64),
    Key(String),
    Delta(f64),
}

impl Metric {
    /// One metric from its options: exactly one kind, with its field and `where`.
    pub(crate) fn build(name: &str, spec: &MetricSpec, limits: &conflux_rhai::Limits) -> Result<Metric, BuildError> {
        let mut chosen: Vec<(Kind, Option<FieldPath>)> = Vec::new();
        let at = |kind: &str| ["metrics", name, kind].map(str::to_string);
        let field = |kind: &str, text: &String| {
            let option = at(kind);
            field_path(text, &option.iter().map(String::as_str).collect::<Vec<_>>())
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

    /// The accumulator of a group that has seen no event yet.
    pub(crate) fn empty(&self) -> Acc {
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

    /// What the metric would take from an event whose field reads `value`
    /// (`None`: missing or null); `where` and gauge conditions come after,
    /// in [`Self::apply_conditions`].
    pub(crate) fn contribution(&self, value: Option<Field<'_>>) -> Contribution {
        match (&self.kind, value) {
            (Kind::Count | Kind::Rate, _) => Contribution::One,
            // The amount for an increment; `apply_conditions` picks the sign or skips it.
            (Kind::Gauge { .. }, v) => Contribution::Delta(match (&self.field, v) {
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
        }
    }

    /// Skips what the `where` condition rules out, and turns a gauge's
    /// amount into an increment or a decrement by its conditions.
    pub(crate) fn apply_conditions(&mut self, event: &mut Event, c: &mut Contribution) -> Result<(), String> {
        if let Some(condition) = &mut self.condition {
            if !condition.matches(event)? {
                *c = Contribution::Skip;
                return Ok(());
            }
        }
        if let (Kind::Gauge { up, down }, Contribution::Delta(amount)) = (&mut self.kind, &mut *c) {
            if !up.matches(event)? {
                if down.matches(event)? {
                    *amount = -*amount;
                } else {
                    *c = Contribution::Skip;
                }
            }
        }
        Ok(())
    }

    /// The metric's figure in a result: `seconds`, the window's length (for
    /// rates); `level`, a gauge's level at the window's end when known.
    pub(crate) fn value(&self, acc: &Acc, seconds: f64, level: Option<f64>) -> Value {
        match (acc, &self.kind) {
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
                object([("value".to_string(), Value::from(value.as_str())), ("count".to_string(), Value::from(count))])
            })),
            (Acc::Gauge(g), _) => float(level.unwrap_or(*g)),
            _ => Value::new_null(),
        }
    }
}

impl Contribution {
    /// Folds into `acc` the contribution of an event at time `t`; `gauge`:
    /// whether this window takes the event's gauge increment (only one of
    /// its windows does).
    pub(crate) fn fold_into(&self, acc: &mut Acc, t: i64, gauge: bool) {
        match (acc, self) {
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
}

/// Adds the gauge increments in `accs` to `levels` (other metrics' slots stay).
pub(crate) fn add_gauges(levels: &mut [f64], accs: &[Acc]) {
    for (level, acc) in levels.iter_mut().zip(accs) {
        if let Acc::Gauge(g) = acc {
            *level += g;
        }
    }
}
