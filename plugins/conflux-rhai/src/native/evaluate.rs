//! Evaluation: running a native plan on one event's payload, where it lies:
//! in its JSON text when the payload was not parsed (a payload from an input
//! never is until someone needs the tree), else in the parsed tree. Nothing
//! is converted, and a filter that only reads keeps the payload's original
//! text.
//!
//! Correctness rule: the native run answers only when Rhai's answer is
//! obvious (both operands numbers, both strings, both booleans, every object
//! on a written path present). Anything else — a missing field compared, a
//! type mismatch, an overflow, a division by zero — makes it [`Bail`], and the
//! caller runs the real interpreter on that event. Writes are held until the
//! run has finished, so a bail never leaves a half-changed event behind.

use std::borrow::Cow;
use std::cell::RefCell;

use conflux_api::sonic_rs::JsonType;
use conflux_api::{Field, Payload, Value};
use conflux_json::edit::Splice;
use conflux_json::path::Located;
use rhai::ImmutableString;

use super::{Arith, Bail, Cmp, Ending, Native, Node, Slots, Step, Target, Val};

impl Native {
    /// Runs a script: applies its writes to `data` and says how it ended.
    /// On `Bail` nothing was changed.
    /// A run that only reads keeps the payload's original JSON text.
    pub fn run(&self, payload: &mut Payload) -> Result<Ending, Bail> {
        let mut writes = Vec::new();
        let located = self.scan.as_ref().and_then(|scan| scan.locate(payload));
        let mut run = Run::new(payload.root(), located, self.slots, self.max_string);
        let ending = run.steps(&self.steps, &mut writes)?.unwrap_or(Ending::Drop);
        if !writes.is_empty() {
            let splices = run.splices(&writes);
            drop(run);
            if !splices.is_some_and(|splices| payload.splice(splices)) {
                payload.set_fields(writes.into_iter().map(|(target, value)| (&target.path[..], value)).collect());
            }
        }
        Ok(ending)
    }

    /// Evaluates a condition.
    pub fn evaluate<'a>(&'a self, data: &'a Payload) -> Result<Val<'a>, Bail> {
        let node = self.value.as_ref().ok_or(Bail)?;
        let located = self.scan.as_ref().and_then(|scan| scan.locate(data));
        Run::new(data.root(), located, 0, self.max_string).eval(node)
    }
}

/// One run's view of the payload (its tree, or its text when it was not
/// parsed) and its `let` variables.
struct Run<'a> {
    data: Field<'a>,
    /// The script's fields found in the payload's text, when it has text.
    located: Option<Located<'a>>,
    locals: Vec<Val<'a>>,
    max_string: usize,
    /// Objects already found, by path: `event.data.a` and `event.data.b`
    /// (and a write to `event.data.c`) look for `data` once, not three times.
    objects: RefCell<[Option<FoundObject<'a>>; OBJECTS_KEPT]>,
}

/// An object a run found, and the path it was found at.
type FoundObject<'a> = (&'a [ImmutableString], Field<'a>);

/// How many distinct parent objects a run remembers; more are looked up again.
const OBJECTS_KEPT: usize = 4;

impl<'a> Run<'a> {
    fn new(data: Field<'a>, located: Option<Located<'a>>, slots: usize, max_string: usize) -> Self {
        Run { data, located, locals: vec![Val::Unit; slots], max_string, objects: RefCell::new([None; OBJECTS_KEPT]) }
    }

    /// Checks, as Rhai's property getters need, that every parent on a path
    /// is an object that is there; found by the scan or one lookup at a time.
    fn parents_are_objects(&self, path: &'a [ImmutableString], slots: &Slots) -> Result<(), Bail> {
        match &self.located {
            Some(located) => match slots.parents.iter().all(|slot| located.is_object(*slot)) {
                true => Ok(()),
                false => Err(Bail),
            },
            None => self.object_at(&path[..path.len() - 1]).map(drop),
        }
    }

    /// The writes as splices of the scanned text (the last write to a path
    /// wins); None without a scan.
    fn splices(&self, writes: &[(&Target, Value)]) -> Option<Vec<Splice>> {
        let located = self.located.as_ref()?;
        let mut splices = Vec::with_capacity(writes.len());
        let mut json = Vec::new();
        for (i, (target, value)) in writes.iter().enumerate() {
            if writes[i + 1..].iter().any(|(later, _)| later.path == target.path) {
                continue;
            }
            json.clear();
            conflux_api::sonic_rs::to_writer(&mut json, value).ok()?;
            let name = target.path.last()?;
            splices.push(located.set(target.slots.value, target.close, name.as_str(), &json)?);
        }
        Some(splices)
    }

    /// The object at `path`, every step of the way an object (as Rhai's
    /// property getters need), else `Bail`.
    fn object_at(&self, path: &'a [ImmutableString]) -> Result<Field<'a>, Bail> {
        if path.is_empty() {
            return if self.data.is_object() { Ok(self.data) } else { Err(Bail) };
        }
        let mut objects = self.objects.borrow_mut();
        if let Some((_, object)) = objects.iter().flatten().find(|(p, _)| *p == path) {
            return Ok(*object);
        }
        let mut current = self.data;
        for segment in path {
            if !current.is_object() {
                return Err(Bail);
            }
            current = current.get(segment.as_str()).ok_or(Bail)?;
        }
        if !current.is_object() {
            return Err(Bail);
        }
        if let Some(free) = objects.iter_mut().find(|slot| slot.is_none()) {
            *free = Some((path, current));
        }
        Ok(current)
    }

    /// Runs steps until one finishes the script.
    fn steps<'p: 'a>(
        &mut self,
        steps: &'p [Step],
        writes: &mut Vec<(&'p Target, Value)>,
    ) -> Result<Option<Ending>, Bail> {
        for step in steps {
            match step {
                Step::Let(slot, node) => self.locals[*slot] = self.eval(node)?,
                Step::Write(target, node) => {
                    let value = self.eval(node)?;
                    // Every object on the way must already be there, as
                    // Rhai's getters need; the root must be an object.
                    self.parents_are_objects(&target.path, &target.slots)?;
                    writes.push((target, value.to_value()));
                }
                Step::If(condition, then, otherwise) => {
                    let branch = match self.eval(condition)? {
                        Val::Bool(true) => then,
                        Val::Bool(false) => otherwise,
                        _ => return Err(Bail),
                    };
                    if let Some(ending) = self.steps(branch, writes)? {
                        return Ok(Some(ending));
                    }
                }
                Step::Finish(ending) => return Ok(Some(*ending)),
            }
        }
        Ok(None)
    }

    /// Reads a field the way the `event` getter converts it; objects and
    /// arrays (handles and script arrays in Rhai) are left to the interpreter.
    fn read(&self, path: &'a [ImmutableString], slots: &Slots) -> Result<Val<'a>, Bail> {
        // A property of a scalar is an error in Rhai, and so is a property
        // of `()`: every parent must be an object that is there.
        let (last, parents) = path.split_last().ok_or(Bail)?;
        let found = match &self.located {
            Some(located) => {
                self.parents_are_objects(path, slots)?;
                located.value(slots.value)
            }
            None => self.object_at(parents)?.get(last.as_str()),
        };
        let Some(current) = found else { return Ok(Val::Unit) };
        match current.kind() {
            JsonType::String => self.string(current.as_str().ok_or(Bail)?),
            JsonType::Number => match current.as_i64() {
                Some(i) => Ok(Val::Int(i)),
                None => current.as_f64().map(Val::Float).ok_or(Bail),
            },
            JsonType::Boolean => current.as_bool().map(Val::Bool).ok_or(Bail),
            JsonType::Null => Ok(Val::Unit),
            JsonType::Object | JsonType::Array => Err(Bail),
        }
    }

    fn string(&self, s: Cow<'a, str>) -> Result<Val<'a>, Bail> {
        if s.len() > self.max_string {
            return Err(Bail);
        }
        Ok(Val::Str(s))
    }

    fn eval<'p: 'a>(&self, node: &'p Node) -> Result<Val<'a>, Bail> {
        Ok(match node {
            Node::Const(Val::Str(s)) => Val::Str(Cow::Borrowed(s.as_ref())),
            Node::Const(v) => v.clone(),
            Node::Read(path, slots) => self.read(path, slots)?,
            Node::Local(slot) => self.locals[*slot].clone(),
            Node::Not(inner) => match self.eval(inner)? {
                Val::Bool(b) => Val::Bool(!b),
                _ => return Err(Bail),
            },
            Node::Neg(inner) => match self.eval(inner)? {
                Val::Int(i) => Val::Int(i.checked_neg().ok_or(Bail)?),
                Val::Float(f) => Val::Float(-f),
                _ => return Err(Bail),
            },
            Node::And(items) | Node::Or(items) => {
                // `&&` stops at the first false, `||` at the first true.
                let stop_at = matches!(node, Node::Or(_));
                for item in items {
                    match self.eval(item)? {
                        Val::Bool(b) if b == stop_at => return Ok(Val::Bool(b)),
                        Val::Bool(_) => {}
                        _ => return Err(Bail),
                    }
                }
                Val::Bool(!stop_at)
            }
            Node::Cmp(op, a, b) => Val::Bool(compare(*op, &self.eval(a)?, &self.eval(b)?)?),
            Node::Arith(op, a, b) => match arith(*op, self.eval(a)?, self.eval(b)?)? {
                Val::Str(s) => self.string(s)?,
                v => v,
            },
        })
    }
}

fn compare(op: Cmp, a: &Val, b: &Val) -> Result<bool, Bail> {
    use std::cmp::Ordering;
    let ordering: Option<Ordering> = match (a, b) {
        (Val::Int(x), Val::Int(y)) => Some(x.cmp(y)),
        (Val::Float(x), Val::Float(y)) => x.partial_cmp(y),
        (Val::Int(x), Val::Float(y)) => (*x as f64).partial_cmp(y),
        (Val::Float(x), Val::Int(y)) => x.partial_cmp(&(*y as f64)),
        (Val::Str(x), Val::Str(y)) => Some(x.as_ref().cmp(y.as_ref())),
        (Val::Bool(x), Val::Bool(y)) if matches!(op, Cmp::Eq | Cmp::Ne) => Some(x.cmp(y)),
        _ => return Err(Bail),
    };
    // NaN compares unequal and unordered, as f64 does.
    let Some(ordering) = ordering else { return Ok(matches!(op, Cmp::Ne)) };
    Ok(match op {
        Cmp::Eq => ordering.is_eq(),
        Cmp::Ne => ordering.is_ne(),
        Cmp::Lt => ordering.is_lt(),
        Cmp::Le => ordering.is_le(),
        Cmp::Gt => ordering.is_gt(),
        Cmp::Ge => ordering.is_ge(),
    })
}

fn arith<'a>(op: Arith, a: Val<'a>, b: Val<'a>) -> Result<Val<'a>, Bail> {
    let float = |x: f64, y: f64| -> Result<Val<'a>, Bail> {
        Ok(Val::Float(match op {
            Arith::Add => x + y,
            Arith::Sub => x - y,
            Arith::Mul => x * y,
            Arith::Div if y != 0.0 => x / y,
            Arith::Div => return Err(Bail),
        }))
    };
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => Ok(Val::Int(
            match op {
                Arith::Add => x.checked_add(y),
                Arith::Sub => x.checked_sub(y),
                Arith::Mul => x.checked_mul(y),
                Arith::Div => x.checked_div(y),
            }
            .ok_or(Bail)?,
        )),
        (Val::Float(x), Val::Float(y)) => float(x, y),
        (Val::Int(x), Val::Float(y)) => float(x as f64, y),
        (Val::Float(x), Val::Int(y)) => float(x, y as f64),
        (Val::Str(x), Val::Str(y)) if matches!(op, Arith::Add) => Ok(Val::Str(Cow::Owned(format!("{x}{y}")))),
        _ => Err(Bail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;
    use crate::script::{Condition, Script};
    use conflux_api::Event;
    use rhai::Dynamic;

    fn events() -> Vec<&'static str> {
        vec![
            r#"{"type":"booking_created","data":{"guests":6,"zone":"terrace","price":12.5,"name":"Anna"}}"#,
            r#"{"type":"booking_cancelled","data":{"guests":2,"zone":"hall","price":0,"name":"Bo"}}"#,
            r#"{"type":"booking_created","data":{"guests":9223372036854775807,"zone":"terrace","price":-1.5}}"#,
            r#"{"type":"booking_created","data":{"guests":"6","zone":null}}"#,
            r#"{"type":"booking_created","data":"not an object"}"#,
            r#"{"type":7,"data":{"guests":4.0,"zone":"x"}}"#,
            r#"{"data":{"guests":0,"zone":"terrace","nested":{"a":1}}}"#,
            r#"{"type":"x","data":{"guests":1e300,"zone":true}}"#,
            r#"{"type":true}"#,
            r#"[1,2,3]"#,
            r#""just a string""#,
            r#"{}"#,
            r#"{"type":"booking_\u0063reated","data":{"guests":3,"zone":"ter\"race","name":"\u017b\n"}}"#,
            r#"{"data":{},"type":"booking_created"}"#,
            r#" { "type" : "booking_created" , "data" : { "guests" : 5 , "zone" : "terrace" } , "tail" : [ {} ] } "#,
            r#"{"t\u0079pe":"x","type":"booking_created","data":{"guests":5,"zone":"terrace"}}"#,
            r#"{"type":"booking_created","data":{"d\u0061ta":1,"guests":5,"zone":"terrace","large":false,"size":"?"}}"#,
            r#"{"type":"booking_created","data":{"nested":{},"guests":5},"x":1,"kind":null}"#,
        ]
    }

    fn event(json: &str) -> Event {
        Event::new(conflux_api::sonic_rs::from_str(json).unwrap())
    }

    /// An event as inputs make them: its text checked, not parsed.
    fn with_text(json: &str) -> Event {
        let mut e = Event::new(Value::default());
        e.data = conflux_api::Payload::from_json(json.as_bytes()).unwrap();
        e
    }

    /// JSON with sorted keys: a written object's field order is not part of
    /// the result (sonic may reorder an object it makes writable).
    fn normal(value: &Value) -> String {
        serde_json::from_str::<serde_json::Value>(&value.to_string()).unwrap().to_string()
    }

    /// What an interpreted run of a whole script made of an event.
    fn interpret(script: &Script, json: &str) -> String {
        let mut state = script.state();
        let mut e = event(json);
        match script.run(&mut state, &mut e) {
            Err(reason) => format!("error: {reason}"),
            Ok(run) if run.result.is_unit() => "drop".into(),
            Ok(run) if run.returned_event() => format!("event {}", normal(&run.take_payload())),
            Ok(run) => format!("other {}", run.result.type_name()),
        }
    }

    const SCRIPTS: &[&str] = &[
        "event",
        "()",
        "let guests = event.data.guests;\nevent.data.large = guests > 4 && event.data.zone == \"terrace\";\nevent",
        "event.data.total = event.data.guests * 2 + 1; event",
        "event.data.price2 = event.data.price / 2; event.data.neg = -event.data.guests; event",
        "event.data.guests += 1; event",
        "event.data.ratio = event.data.guests / 0; event",
        "if event.data.guests > 4 { event.data.size = \"large\" } else { event.data.size = \"small\" } event",
        "if event.type == \"booking_cancelled\" { () } else { event }",
        "let t = event[\"type\"]; event.kind = t + \"!\"; event",
        "event.data.nested.b = event.data.nested.a; event",
        "event.label = event.data.name; event",
        "event.flag = !(event.data.guests >= 2 || event.data.zone != \"hall\"); event",
        "event.top = 1; event.top = 2; event",
        "let x = 1; let x = x + event.data.guests; event.x = x; event",
        "event.data.guests = 1",
        "event.data.a = 1; event.data.b = event.data.guests; event.data.guests = 0; event.z = 2; event",
        "event.data.zone = \"x\"; event.data.zone = \"y\"; event",
        "event.data.nested.n = 1; event.data.nested.m = 2; event.data.nested.n = 3; event",
        "return event;",
    ];

    #[test]
    fn scripts_agree_with_the_interpreter_on_every_event() {
        let limits = Limits::default();
        let (mut native_count, mut answered) = (0, 0);
        for source in SCRIPTS {
            let script = Script::compile(source, &limits).unwrap();
            let Some(native) = script.native_form() else {
                eprintln!("not native: {source:?}");
                continue;
            };
            native_count += 1;
            for json in events() {
                let expected = interpret(&script, json);
                // With the payload's text (edited in place) and without it.
                for mut e in [event(json), with_text(json)] {
                    let got = match native.run(&mut e.data) {
                        Err(Bail) => {
                            assert_eq!(normal(&e.data), normal(&event(json).data), "bail changed {json} ({source})");
                            continue;
                        }
                        Ok(Ending::Drop) => "drop".to_string(),
                        Ok(Ending::Event) => format!("event {}", normal(&e.data)),
                    };
                    if let Some(text) = e.data.raw_json() {
                        let reparsed: Value = conflux_api::sonic_rs::from_slice(text).unwrap();
                        assert_eq!(normal(&reparsed), normal(&e.data), "kept text agrees with the value");
                    }
                    answered += 1;
                    assert_eq!(got, expected, "script {source:?} on {json}");
                }
            }
        }
        assert_eq!(native_count, SCRIPTS.len(), "every script here is in the native subset");
        assert!(answered > SCRIPTS.len() * 4, "most runs answered natively, not bailed: {answered}");
    }

    const CONDITIONS: &[&str] = &[
        "event.type != \"booking_cancelled\"",
        "event.type == \"booking_created\" && event.data.guests >= 4",
        "event.data.guests > 4.5 || event.data.zone == \"hall\"",
        "!(event.data.price < 0)",
        "event.data.guests + 1",
        "event.data.price * 2.0 - 1",
        "event.data.zone",
        "event.data.guests == 6 && event.data.zone",
        "event.type < \"c\"",
        "event.data.zone == true",
        "event.data.guests != 4",
        "-event.data.guests < -5",
    ];

    #[test]
    fn conditions_agree_with_the_interpreter_on_every_event() {
        let limits = Limits::default();
        for source in CONDITIONS {
            let mut native = Condition::compile(source, &limits).unwrap();
            assert!(native.is_native(), "{source}");
            let mut interpreted = Condition::compile(source, &limits).unwrap().interpreted();
            for json in events() {
                let show = |r: Result<Dynamic, String>| match r {
                    Ok(v) => format!("{} {v}", v.type_name()),
                    Err(e) => format!("error {e}"),
                };
                let expected = show(interpreted.evaluate(&mut event(json)));
                let expected_match = interpreted.matches(&mut event(json));
                // On the parsed tree and on the text as inputs keep it.
                for make in [event, with_text] {
                    let got = show(native.evaluate(&mut make(json)));
                    assert_eq!(got, expected, "condition {source:?} on {json}");
                    let got = native.matches(&mut make(json));
                    assert_eq!(got, expected_match, "matches {source:?} on {json}");
                }
            }
        }
    }

    #[test]
    fn reading_keeps_the_original_text() {
        let limits = Limits::default();
        let script = Script::compile("if event.data.guests > 100 { () } else { event }", &limits).unwrap();
        let mut e = with_text(r#"{"data":{"guests":2}}"#);
        assert_eq!(script.run_native(&mut e), Ok(Ending::Event));
        assert!(e.data.raw_json().is_some(), "a read-only run kept the payload text");

        let script =
            Script::compile("event.data.large = event.data.guests > 1; event.a = \"x\"; event", &limits).unwrap();
        let mut e = with_text(r#"{"z":0,"data":{"guests":2,"b":[]}}"#);
        assert_eq!(script.run_native(&mut e), Ok(Ending::Event));
        assert_eq!(
            e.data.raw_json().map(|t| std::str::from_utf8(t).unwrap()),
            Some(r#"{"z":0,"data":{"guests":2,"b":[],"large":true},"a":"x"}"#),
            "writes edit the text: field order kept"
        );
    }
}
