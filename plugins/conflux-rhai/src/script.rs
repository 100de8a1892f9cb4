//! A sandboxed, compiled Rhai program and how it runs against one event.

use std::sync::{Arc, Mutex};

use conflux_api::{Event, Metadata, Value};
use rhai::{Dynamic, Engine, Map, Scope, AST};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::handle::{to_dynamic, to_value, EventHandle};

/// Limits that keep a runaway script from hurting the process. A script that
/// exceeds one fails the event it was running on, not the pipeline.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Operations one run may take (an infinite loop stops here).
    pub max_operations: u64,
    /// Depth of nested function calls.
    pub max_call_depth: usize,
    /// Depth of nested expressions.
    pub max_expr_depth: usize,
    /// Longest string a script may build, in bytes.
    pub max_string_size: usize,
    /// Most items in an array a script builds.
    pub max_array_size: usize,
    /// Most entries in a map a script builds.
    pub max_map_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 100_000,
            max_call_depth: 32,
            max_expr_depth: 64,
            max_string_size: 1 << 20,
            max_array_size: 10_000,
            max_map_size: 10_000,
        }
    }
}

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
        .register_indexer_get(|h: &mut EventHandle, name: &str| h.get(name))
        .register_indexer_set(|h: &mut EventHandle, name: &str, value: Dynamic| h.set(name, value))
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
    /// The payload slot `event` points to, reused from event to event.
    slot: Arc<Mutex<Value>>,
}

/// What one run produced; the payload stays reachable through `root`.
pub struct Run {
    pub result: Dynamic,
    root: Arc<Mutex<Value>>,
}

impl Run {
    /// Whether the script returned `event` itself.
    pub fn returned_event(&self) -> bool {
        self.result.read_lock::<EventHandle>().is_some_and(|h| h.points_to_root_of(&self.root))
    }

    /// The payload after the script ran (with its changes).
    pub fn take_payload(&self) -> Value {
        std::mem::take(&mut *self.root.lock().unwrap_or_else(|p| p.into_inner()))
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
        Ok(Script::new(engine, ast, source))
    }

    fn new(engine: Engine, ast: AST, source: &str) -> Self {
        Script { engine: Arc::new(engine), ast, uses_meta: source.contains("meta"), slot: Arc::default() }
    }

    /// Compiles a single expression (conditions: `event.type == "booking_created"`).
    pub fn compile_expression(source: &str, limits: &Limits) -> Result<Self, ScriptError> {
        let engine = sandboxed_engine(limits);
        let ast = engine.compile_expression(source).map_err(compile_error)?;
        Ok(Script::new(engine, ast, source))
    }

    /// Runs on one event, moving its payload behind the `event` handle.
    /// On error the payload is put back and the message returned.
    pub fn run(&self, scope: &mut Scope<'static>, event: &mut Event) -> Result<Run, String> {
        let root = self.slot.clone();
        *root.lock().unwrap_or_else(|p| p.into_inner()) = std::mem::take(&mut *event.data);
        scope.clear();
        scope.push("event", EventHandle::new(root.clone()));
        if self.uses_meta {
            scope.push("meta", meta_to_map(&event.meta));
        }
        let result = self.engine.eval_ast_with_scope::<Dynamic>(scope, &self.ast);
        if self.uses_meta {
            if let Some(meta) = scope.get_value::<Map>("meta") {
                if !event.meta.is_empty() || !meta.is_empty() {
                    event.meta = map_to_meta(&meta);
                }
            }
        }
        scope.clear();
        match result {
            Ok(result) => Ok(Run { result, root }),
            Err(error) => {
                *event.data = std::mem::take(&mut *root.lock().unwrap_or_else(|p| p.into_inner()));
                Err(error.to_string())
            }
        }
    }
}

fn meta_to_map(meta: &Metadata) -> Map {
    meta.iter().map(|(k, v)| (k.as_str().into(), to_dynamic(v))).collect()
}

fn map_to_meta(map: &Map) -> Metadata {
    let mut meta = Metadata::default();
    for (k, v) in map {
        meta.insert(k.as_str(), to_value(v));
    }
    meta
}

/// A boolean condition over an event: the one expression language of the product.
pub struct Condition {
    script: Script,
    scope: Scope<'static>,
    source: String,
}

impl Condition {
    pub fn compile(source: &str, limits: &Limits) -> Result<Self, ScriptError> {
        Ok(Condition {
            script: Script::compile_expression(source, limits)?,
            scope: Scope::new(),
            source: source.into(),
        })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to a value (numbers for alert rules, anything for templates).
    pub fn evaluate(&mut self, event: &mut Event) -> Result<Dynamic, String> {
        let run = self.script.run(&mut self.scope, event)?;
        let result = if run.result.is::<EventHandle>() { Dynamic::from_map(Map::new()) } else { run.result.clone() };
        *event.data = run.take_payload();
        Ok(result)
    }

    /// Whether the event matches; a non-boolean result is an error.
    pub fn matches(&mut self, event: &mut Event) -> Result<bool, String> {
        let value = self.evaluate(event)?;
        value.as_bool().map_err(|t| format!("condition `{}` returned {t}, not a boolean", self.source))
    }
}

/// Converts a script result to a payload.
pub fn result_to_value(run: &Run, item: &Dynamic) -> Value {
    if item.read_lock::<EventHandle>().is_some_and(|h| h.points_to_root_of(&run.root)) {
        return run.root.lock().unwrap_or_else(|p| p.into_inner()).clone();
    }
    to_value(item)
}
