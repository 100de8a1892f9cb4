//! A sandboxed, compiled Rhai program and how it runs against one event.

use std::sync::{Arc, Mutex};

use conflux_api::{Event, Metadata, Value};
use rhai::{ASTNode, Caches, Dynamic, Engine, Expr, GlobalRuntimeState, ImmutableString, Map, Scope, AST};

use crate::handle::{to_dynamic, to_value, EventHandle};
use crate::limits::Limits;
use crate::native::{Bail, Ending, Native};

/// A compile error with its position inside the script (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptError {
    pub message: String,
    pub line: usize,
    pub column: usize,
}

impl ScriptError {
    /// The build error for the option holding the script, pointing inside it.
    pub fn at<S: Into<String>>(self, path: impl IntoIterator<Item = S>) -> conflux_api::BuildError {
        conflux_api::BuildError::at(path, format!("script does not compile: {}", self.message))
            .with_offset(self.line, self.column)
    }
}

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (script line {}, column {})", self.message, self.line, self.column)
    }
}

/// An engine with the limits applied, no module loading, no `eval`, and our helpers.
fn sandboxed_engine(limits: &Limits) -> Engine {
    let mut engine = Engine::new();
    engine
        .set_max_operations(limits.max_operations)
        .set_max_call_levels(limits.max_call_depth)
        .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth)
        .set_max_string_size(limits.max_string_size)
        .set_max_array_size(limits.max_array_size)
        .set_max_map_size(limits.max_map_size)
        .set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    engine.disable_symbol("eval");
    engine.on_print(|text| tracing::info!(target: "rhai", "{text}"));
    engine.on_debug(|text, _, pos| tracing::debug!(target: "rhai", %pos, "{text}"));
    engine
        .register_type_with_name::<EventHandle>("Event")
        .register_indexer_get(|h: &mut EventHandle, name: ImmutableString| h.get(&name))
        .register_indexer_set(|h: &mut EventHandle, name: ImmutableString, value: Dynamic| h.set(&name, value))
        .register_fn("has", |h: &mut EventHandle, name: &str| h.has(name))
        .register_fn("remove", |h: &mut EventHandle, name: &str| h.remove(name))
        .register_fn("keys", |h: &mut EventHandle| h.keys())
        .register_fn("to_map", |h: &mut EventHandle| h.as_map())
        .register_fn("to_string", |h: &mut EventHandle| h.value().to_string())
        .register_fn("to_debug", |h: &mut EventHandle| h.value().to_string());
    crate::helpers::register(&mut engine);
    engine
}

/// A compiled script or expression, ready to run on events.
pub struct Script {
    engine: Arc<Engine>,
    ast: AST,
    /// Whether the source mentions `meta`; if not, metadata is not converted.
    uses_meta: bool,
    /// The same program evaluated natively, when it fits that subset.
    native: Option<Native>,
    /// Where a line and column of the script are for the user (the
    /// pipeline file's line, or the script file's): runtime errors point there.
    locator: Option<Locator>,
}

/// Maps a (line, column) of the script to `file:line:col`.
pub type Locator = Arc<dyn Fn(usize, usize) -> String + Send + Sync>;

/// What one caller keeps from run to run of a script, so that a run does not
/// set up Rhai afresh: the scope, Rhai's runtime state, its function
/// resolution cache, and the payload slot `event` points to.
pub struct RunState {
    /// Boxed, like the state and caches: together they are about a kilobyte,
    /// and conditions sit inside enums.
    scope: Box<Scope<'static>>,
    global: Box<GlobalRuntimeState>,
    caches: Box<Caches>,
    slot: Arc<Mutex<Value>>,
}

/// What one run produced; the payload stays reachable through the run state.
pub struct Run<'s> {
    pub result: Dynamic,
    root: &'s Arc<Mutex<Value>>,
}

impl Run<'_> {
    /// Whether the script returned `event` itself.
    pub fn returned_event(&self) -> bool {
        self.result.read_lock::<EventHandle>().is_some_and(|h| h.points_to_root_of(self.root))
    }

    /// The payload after the script ran (with its changes).
    pub fn take_payload(&self) -> Value {
        std::mem::take(&mut *self.root.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Converts one returned item to a payload (the event itself is copied out).
    pub fn item_to_value(&self, item: &Dynamic) -> Value {
        if item.read_lock::<EventHandle>().is_some_and(|h| h.points_to_root_of(self.root)) {
            return self.root.lock().unwrap_or_else(|p| p.into_inner()).clone();
        }
        to_value(item)
    }
}

fn compile_error(e: rhai::ParseError) -> ScriptError {
    ScriptError { message: e.0.to_string(), line: e.1.line().unwrap_or(1), column: e.1.position().unwrap_or(1) }
}

impl Script {
    /// Compiles a whole script (statements; the last value is the result).
    pub fn compile(source: &str, limits: &Limits) -> Result<Self, ScriptError> {
        let engine = sandboxed_engine(limits);
        let ast = engine.compile(source).map_err(compile_error)?;
        let mut script = Script::new(engine, ast, source);
        if !script.uses_meta {
            script.native = Native::script(&script.ast, limits);
        }
        Ok(script)
    }

    /// Compiles a single expression (conditions: `event.type == "booking_created"`).
    pub fn compile_expression(source: &str, limits: &Limits) -> Result<Self, ScriptError> {
        let engine = sandboxed_engine(limits);
        let ast = engine.compile_expression(source).map_err(compile_error)?;
        let mut script = Script::new(engine, ast, source);
        if !script.uses_meta {
            script.native = Native::expression(&script.ast, limits);
        }
        Ok(script)
    }

    fn new(mut engine: Engine, ast: AST, source: &str) -> Self {
        register_properties(&mut engine, &ast);
        Script { engine: Arc::new(engine), ast, uses_meta: source.contains("meta"), native: None, locator: None }
    }

    /// Runtime errors name `locator`'s position instead of one inside the script.
    pub fn located(mut self, locator: Option<Locator>) -> Self {
        self.locator = locator;
        self
    }

    /// A runtime error's text, its position mapped by the locator.
    fn describe(&self, mut error: Box<rhai::EvalAltResult>) -> String {
        let position = error.position();
        match (&self.locator, position.line()) {
            (Some(locate), Some(line)) => {
                error.clear_position();
                format!("{error} at {}", locate(line, position.position().unwrap_or(1)))
            }
            _ => error.to_string(),
        }
    }

    /// Whether events usually skip the interpreter (see `native`).
    pub fn is_native(&self) -> bool {
        self.native.is_some()
    }

    /// The same script without its native form: every event interpreted
    /// (tests compare the two).
    #[cfg(test)]
    pub(crate) fn native_form(&self) -> Option<&Native> {
        self.native.as_ref()
    }

    #[cfg(test)]
    pub(crate) fn interpreted(mut self) -> Self {
        self.native = None;
        self
    }

    /// Runs the native form on a script's event: `Err(Bail)` (nothing
    /// changed) when there is none or the event needs the interpreter.
    pub(crate) fn run_native(&self, event: &mut Event) -> Result<Ending, Bail> {
        self.native.as_ref().ok_or(Bail)?.run(&mut event.data)
    }

    /// Fresh state for running this script; keep it and pass it to every run.
    pub fn state(&self) -> RunState {
        let slot = Arc::default();
        let mut scope = Scope::new();
        scope.push("event", EventHandle::new(Arc::clone(&slot)));
        if self.uses_meta {
            scope.push("meta", Map::new());
        }
        let mut state = RunState {
            scope: Box::new(scope),
            global: Box::new(self.engine.new_global_runtime_state()),
            caches: Box::default(),
            slot,
        };
        state.global.lib.push(self.ast.shared_lib().clone());
        state
    }

    /// Runs on one event, moving its payload behind the `event` handle.
    /// On error the payload is put back and the message returned: the event
    /// as it came, text and field order included, when it had its text
    /// (kept at the cost of a reference count), else the tree as the script
    /// left it.
    pub fn run<'s>(&self, state: &'s mut RunState, event: &mut Event) -> Result<Run<'s>, String> {
        let original = event.data.text_copy();
        *state.slot.lock().unwrap_or_else(|p| p.into_inner()) = std::mem::take(&mut *event.data);
        // Drop the script's own variables; `event` (and `meta`) stay first.
        state.scope.rewind(1 + usize::from(self.uses_meta));
        // The script may have assigned `event` or `meta`: start from ours again.
        if !state
            .scope
            .get("event")
            .is_some_and(|v| v.read_lock::<EventHandle>().is_some_and(|h| h.points_to_root_of(&state.slot)))
        {
            state.scope.set_value("event", EventHandle::new(Arc::clone(&state.slot)));
        }
        if self.uses_meta {
            state.scope.set_value("meta", meta_to_map(&event.meta));
        }
        // Each run gets its own operation budget and call depth, as a fresh
        // evaluation would; the function resolution cache carries over.
        let global = &mut state.global;
        global.num_operations = Default::default();
        global.level = 0;
        global.scope_level = 0;
        global.always_search_scope = false;
        global.truncate_imports(0);
        global.constants = None;
        global.lib.truncate(1);
        #[allow(deprecated)] // the raw entry point is the one that takes reusable state
        let result =
            self.engine.eval_statements_raw(global, &mut state.caches, &mut state.scope, self.ast.statements());
        if self.uses_meta {
            if let Some(meta) = state.scope.get_value::<Map>("meta") {
                if !event.meta.is_empty() || !meta.is_empty() {
                    event.meta = map_to_meta(&meta);
                }
            }
        }
        match result {
            Ok(result) => Ok(Run { result, root: &state.slot }),
            Err(error) => {
                // An error can leave cache levels pushed; start clean.
                *state.caches = Caches::new();
                let left = std::mem::take(&mut *state.slot.lock().unwrap_or_else(|p| p.into_inner()));
                match original {
                    Some(original) => event.data = original,
                    None => *event.data = left,
                }
                Err(self.describe(error))
            }
        }
    }
}

/// Registers a getter and setter on `event` handles for every property name
/// the script uses, so `event.data.guests` is one native call instead of a
/// failed getter lookup (which builds an error message) and an indexer call.
fn register_properties(engine: &mut Engine, ast: &AST) {
    let mut names: Vec<ImmutableString> = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Expr(Expr::Property(property, _))) = path.last() {
            if !names.contains(&property.2) {
                names.push(property.2.clone());
            }
        }
        true
    });
    for name in names {
        let key = name.clone();
        engine.register_get(name.as_str(), move |h: &mut EventHandle| h.get(&key));
        let key = name.clone();
        engine.register_set(name.as_str(), move |h: &mut EventHandle, value: Dynamic| h.set(&key, value));
    }
}

fn meta_to_map(meta: &Metadata) -> Map {
    meta.iter().map(|(k, v)| (k.into(), to_dynamic(v))).collect()
}

fn map_to_meta(map: &Map) -> Metadata {
    let mut meta = Metadata::default();
    for (k, v) in map {
        meta.insert(k.to_string(), to_value(v));
    }
    meta
}

/// A boolean condition over an event: the one expression language of the product.
pub struct Condition {
    script: Script,
    state: RunState,
    source: String,
}

impl Condition {
    pub fn compile(source: &str, limits: &Limits) -> Result<Self, ScriptError> {
        let script = Script::compile_expression(source, limits)?;
        Ok(Condition { state: script.state(), script, source: source.into() })
    }

    /// Runtime errors name `locator`'s position instead of one inside the expression.
    pub fn located(mut self, locator: Option<Locator>) -> Self {
        self.script = self.script.located(locator);
        self
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether events usually skip the interpreter (see `native`).
    pub fn is_native(&self) -> bool {
        self.script.is_native()
    }

    #[cfg(test)]
    pub(crate) fn interpreted(self) -> Self {
        let script = self.script.interpreted();
        Condition { state: script.state(), script, source: self.source }
    }

    /// Evaluates to a value (numbers for alert rules, anything for templates).
    pub fn evaluate(&mut self, event: &mut Event) -> Result<Dynamic, String> {
        if let Some(native) = &self.script.native {
            if let Ok(value) = native.evaluate(&event.data) {
                return Ok(value.to_dynamic());
            }
        }
        let run = self.script.run(&mut self.state, event)?;
        let result = if run.result.is::<EventHandle>() { Dynamic::from_map(Map::new()) } else { run.result.clone() };
        *event.data = run.take_payload();
        Ok(result)
    }

    /// Whether the event matches; a non-boolean result is an error.
    pub fn matches(&mut self, event: &mut Event) -> Result<bool, String> {
        if let Some(native) = &self.script.native {
            if let Ok(crate::native::Val::Bool(b)) = native.evaluate(&event.data) {
                return Ok(b);
            }
        }
        let value = self.evaluate(event)?;
        value.as_bool().map_err(|t| format!("condition `{}` returned {t}, not a boolean", self.source))
    }
}
