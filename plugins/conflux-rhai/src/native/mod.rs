//! The native path: the straight-line Rhai most pipeline scripts are written
//! in (field reads and writes on `event`, `let`, `if`, comparisons,
//! `&&`/`||`/`!` and arithmetic), run without the interpreter.
//!
//! Rhai's interpreter costs microseconds per event even for a one-line
//! condition (scope, dynamic dispatch, a value per field). A script inside
//! this subset is translated once, at build time ([`translate`]), into the
//! small plan below, which each event then runs ([`evaluate`]) where the
//! payload lies. Whenever Rhai's answer is not obvious the run ends in
//! [`Bail`] and the caller runs the interpreter on that event instead.

mod evaluate;
mod translate;

use std::borrow::Cow;

use conflux_api::Value;
use conflux_json::path::TextScan;
use rhai::{Dynamic, ImmutableString};

/// This event needs the interpreter.
#[derive(Debug, PartialEq, Eq)]
pub struct Bail;

/// What a native run of a whole script ended with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ending {
    /// The script returned `event` (its writes are applied).
    Event,
    /// The script returned `()`: drop the event.
    Drop,
}

/// A scalar value during a run; strings borrow from the payload or the script.
#[derive(Debug, Clone, PartialEq)]
pub enum Val<'a> {
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
}

impl Val<'_> {
    /// The script value Rhai would have produced.
    pub fn to_dynamic(&self) -> Dynamic {
        match self {
            Val::Unit => Dynamic::UNIT,
            Val::Bool(b) => Dynamic::from_bool(*b),
            Val::Int(i) => Dynamic::from_int(*i),
            Val::Float(f) => Dynamic::from_float(*f),
            Val::Str(s) => Dynamic::from(ImmutableString::from(s.as_ref())),
        }
    }

    /// The payload value the `event` setter would have written.
    fn to_value(&self) -> Value {
        match self {
            Val::Unit => Value::new_null(),
            Val::Bool(b) => Value::from(*b),
            Val::Int(i) => Value::from(*i),
            Val::Float(f) => Value::try_from(*f).unwrap_or_default(),
            Val::Str(s) => Value::from(s.as_ref()),
        }
    }
}

type Path = Box<[ImmutableString]>;

/// Where a path's value and each of its parents land in a [`TextScan`].
#[derive(Debug, Default)]
struct Slots {
    value: usize,
    parents: Box<[usize]>,
}

/// A field a script writes: its path, and the scan slots that place the
/// write (the member's value if present, else its object's closing brace).
#[derive(Debug)]
struct Target {
    path: Path,
    slots: Slots,
    close: usize,
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
}

/// An expression of the plan; translation caps how many a script may have.
#[derive(Debug)]
enum Node {
    Const(Val<'static>),
    /// `event.a.b` / `event["a"]`.
    Read(Path, Slots),
    /// A `let` variable, by slot.
    Local(usize),
    Not(Box<Node>),
    Neg(Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
    Cmp(Cmp, Box<Node>, Box<Node>),
    Arith(Arith, Box<Node>, Box<Node>),
}

/// A statement of the plan; a run holds its writes until the plan has finished.
#[derive(Debug)]
enum Step {
    Let(usize, Node),
    Write(Target, Node),
    If(Node, Vec<Step>, Vec<Step>),
    /// The script's result is known: stop here.
    Finish(Ending),
}

/// A script (or condition) translated to native steps.
#[derive(Debug)]
pub struct Native {
    /// A script's statements; running off their end means `()`.
    steps: Vec<Step>,
    /// A condition's expression.
    value: Option<Node>,
    slots: usize,
    /// Strings at most this long are handled natively; longer ones (which
    /// may meet the sandbox's string limit) go to the interpreter.
    max_string: usize,
    /// Every field the script reads or writes, found in one pass over a
    /// payload's text; None when some path cannot be scanned plainly.
    scan: Option<TextScan>,
}
