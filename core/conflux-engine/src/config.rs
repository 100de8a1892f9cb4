//! Pipeline files: YAML → interpolated, typed specs with a position for everything.
//!
//! Loading never stops at the first problem: every mistake in a file becomes a
//! [`Diagnostic`] with file, line and column. Loading opens no connections.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use conflux_api::config::Duration;
use conflux_api::error::BuildErrorKind;
use conflux_api::registry::deserialize_options;
use conflux_api::{BuildError, Kind};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::options::OutputOptions;
use crate::yaml::{self, Node, Pos, Style, Yaml};

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub pos: Pos,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Line 0: about the file as a whole (it cannot be read), not a place in it.
        if self.pos.line == 0 {
            return write!(f, "{}: {}", self.file, self.message);
        }
        write!(f, "{}:{}:{}: {}", self.file, self.pos.line, self.pos.column, self.message)
    }
}

/// Reads environment variables for `${VAR}` interpolation.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The admin HTTP server (`/health`, `/ready`, `/metrics`).
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on, e.g. `127.0.0.1:9464`.
    pub address: String,
}

/// Engine settings of one pipeline.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Batches that may wait between two components. Memory in flight is
    /// bounded by this times the batch size times the number of hops.
    pub channel_capacity: usize,
    /// On SIGINT/SIGTERM, how long in-flight events may take to drain to the
    /// outputs before the rest is failed back to the sources.
    pub shutdown_timeout: Duration,
    /// Folder for local state such as checkpoints, relative to the pipeline file.
    pub data_dir: String,
    /// Deepest nesting of arrays and objects accepted in any payload (HTTP
    /// and WebSocket bodies, lines, Kafka and NATS messages, `from_json`);
    /// deeper ones are refused with this limit named. At most 1024.
    pub max_json_depth: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            channel_capacity: 8,
            shutdown_timeout: Duration::from_secs(10),
            data_dir: ".conflux".into(),
            max_json_depth: conflux_json::guard::DEFAULT_MAX_DEPTH,
        }
    }
}

/// How an output retries a failed write: exponential backoff.
#[derive(Debug, Clone, Deserialize, serde::Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Wait before the first retry.
    pub initial_backoff: Duration,
    /// Longest wait between two retries.
    pub max_backoff: Duration,
    /// Attempts before the batch is failed back to its sources; 0 = retry until shutdown.
    pub max_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            max_attempts: 0,
        }
    }
}

impl RetryConfig {
    /// Backoff before retry number `attempt` (1-based), doubling up to the maximum.
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        conflux_api::Backoff::new(self.initial_backoff.0, self.max_backoff.0).wait(attempt)
    }
}

/// A pipeline unit test declared beside the pipeline.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TestSpec {
    /// What the test checks.
    pub name: String,
    /// Events to inject. `at` names an input (its events replace what it would
    /// read) or a stage (fed directly).
    pub input: Vec<TestFeed>,
    /// What must come out, and where.
    pub expect: Vec<TestExpectation>,
}

/// Events injected at one component.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TestFeed {
    /// An input or stage name.
    pub at: String,
    /// Event payloads, in order.
    pub events: Vec<serde_json::Value>,
}

/// Events expected out of a component, a port (`stage.port`) or into an output.
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TestExpectation {
    /// A component, `stage.port`, or an output (what it would receive).
    pub at: String,
    /// Exactly these payloads, in this order.
    #[serde(default)]
    pub events: Option<Vec<serde_json::Value>>,
    /// Each of these must match some payload; a match may have more fields.
    #[serde(default)]
    pub contains: Option<Vec<serde_json::Value>>,
    /// Exactly this many events.
    #[serde(default)]
    pub count: Option<usize>,
}

/// A reference in `from:`: a component, optionally one of its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref {
    pub component: String,
    pub port: Option<String>,
    pub pos: Pos,
}

impl Ref {
    pub fn parse(text: &str, pos: Pos) -> Self {
        match text.split_once('.') {
            Some((component, port)) => Ref { component: component.into(), port: Some(port.into()), pos },
            None => Ref { component: text.into(), port: None, pos },
        }
    }
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            Some(port) => write!(f, "{}.{port}", self.component),
            None => f.write_str(&self.component),
        }
    }
}

/// Where an option stands: its key, its value, and how a string value was written.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub key: Pos,
    pub value: Pos,
    pub style: Option<Style>,
    /// The value came out of `${...}` interpolation.
    pub interpolated: bool,
}

/// Positions of every option of one component, by path.
#[derive(Debug, Clone, Default)]
pub struct Spans(HashMap<Vec<String>, Span>);

impl Spans {
    /// A quoted `"${COUNT:-5}"` stays a string; when an option needs a number
    /// or boolean there, this retypes the interpolated value in `options`.
    /// Returns whether it changed anything.
    pub fn retype_interpolated(&self, path: &[String], options: &mut serde_json::Value) -> bool {
        if !self.0.get(path).is_some_and(|s| s.interpolated) {
            return false;
        }
        let mut target = options;
        for segment in path {
            target = match target {
                serde_json::Value::Object(map) => match map.get_mut(segment) {
                    Some(v) => v,
                    None => return false,
                },
                serde_json::Value::Array(items) => match segment.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(v) => v,
                    None => return false,
                },
                _ => return false,
            };
        }
        match target.as_str().and_then(typed_scalar) {
            Some(typed) => {
                *target = typed;
                true
            }
            None => false,
        }
    }
}

/// The number or boolean a text reads as under the YAML core schema, if any.
fn typed_scalar(text: &str) -> Option<serde_json::Value> {
    match yaml::resolve_plain(text) {
        Yaml::Int(i) => Some(serde_json::Value::from(i)),
        Yaml::Bool(b) => Some(serde_json::Value::Bool(b)),
        Yaml::Float(f) => serde_json::Number::from_f64(f).map(serde_json::Value::Number),
        _ => None,
    }
}

/// One component as declared.
#[derive(Debug, Clone)]
pub struct ComponentSpec {
    pub name: String,
    /// False when loading already reported a problem inside it (it is not built).
    pub valid: bool,
    pub kind: Kind,
    pub type_name: String,
    pub from: Vec<Ref>,
    /// Plugin options: everything but `type`, `from` and engine options.
    pub options: serde_json::Value,
    /// The engine's options of an output (defaults for inputs and stages).
    pub output: OutputOptions,
    pub spans: Spans,
}

impl ComponentSpec {
    /// Position of the `type` value (or of the name when missing).
    pub fn spans_type_pos(&self) -> Pos {
        self.spans.0.get(&vec!["type".to_string()]).map(|s| s.value).unwrap_or_else(|| self.pos())
    }

    /// Position of the component's name.
    pub fn pos(&self) -> Pos {
        self.spans.0.get(&Vec::new()).map(|s| s.key).unwrap_or_default()
    }
}

/// A pipeline file, loaded and interpolated, not yet built.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub name: String,
    pub file: PathBuf,
    pub source: String,
    pub admin: Option<AdminConfig>,
    /// Widgets on the admin page.
    pub dashboard: Option<crate::dashboard::DashboardConfig>,
    pub runtime: RuntimeConfig,
    pub components: Vec<ComponentSpec>,
    pub tests: Vec<TestSpec>,
    pub test_spans: Spans,
    /// Problems found while loading; building adds its own and reports all.
    pub problems: Vec<Diagnostic>,
}

impl PipelineSpec {
    /// A diagnostic at a position of this file.
    pub fn diag(&self, pos: Pos, message: impl Into<String>) -> Diagnostic {
        Diagnostic { file: self.file.display().to_string(), pos, message: message.into() }
    }

    /// Folder of the file, for relative paths.
    pub fn base_dir(&self) -> PathBuf {
        self.file.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    /// The position a build error points to, inside strings when it can.
    pub fn locate(&self, spans: &Spans, err: &BuildError) -> Pos {
        locate(spans, err, &self.source)
    }
}

/// Where a build error points: the key of an unknown or missing option, the
/// value of a bad one, or a line and column inside a string value.
pub(crate) fn locate(spans: &Spans, err: &BuildError, source: &str) -> Pos {
    let mut path = err.path.clone();
    if let BuildErrorKind::UnknownField(field) = &err.kind {
        if path.last() != Some(field) {
            path.push(field.to_string());
        }
        if let Some(span) = spans.0.get(&path) {
            return span.key;
        }
        path.pop();
    }
    while !path.is_empty() && !spans.0.contains_key(&path) {
        path.pop();
    }
    let Some(span) = spans.0.get(&path) else { return Pos::default() };
    if matches!(err.kind, BuildErrorKind::MissingField(_)) {
        return span.key;
    }
    match (err.offset, span.style) {
        (Some((line, column)), Some(Style::Block)) => {
            // Block scalar: content starts after the `|`/`>` indicator line.
            let at = source.lines().nth(span.value.line.saturating_sub(1)).unwrap_or("");
            let indicator = at.trim_end().trim_end_matches(['-', '+']).trim_end_matches(|c: char| c.is_ascii_digit());
            let on_indicator = indicator.ends_with('|') || indicator.ends_with('>');
            let first = span.value.line + usize::from(on_indicator);
            let indent = source
                .lines()
                .skip(first - 1)
                .find(|l| !l.trim().is_empty())
                .map(|l| l.len() - l.trim_start().len())
                .unwrap_or(0);
            Pos { line: first + line - 1, column: indent + column }
        }
        (Some((line, column)), Some(style)) => {
            let quote = usize::from(style == Style::Quoted);
            if line == 1 {
                Pos { line: span.value.line, column: span.value.column + quote + column - 1 }
            } else {
                Pos { line: span.value.line + line - 1, column }
            }
        }
        _ => span.value,
    }
}

/// Replaces `${VAR}` and `${VAR:-default}`; `$${` stays a literal `${`.
pub fn interpolate<'t>(text: &'t str, env: Env) -> Result<Cow<'t, str>, String> {
    if !text.contains("${") {
        return Ok(Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        out.push_str(&rest[..start]);
        let body_start = start + 2;
        let end = rest[body_start..].find('}').ok_or_else(|| format!("unclosed `${{` in `{text}`"))?;
        let body = &rest[body_start..body_start + end];
        let (name, default) = match body.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (body, None),
        };
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "`${{{body}}}` is not a valid variable reference; write ${{NAME}} or ${{NAME:-default}}"
            ));
        }
        match (env(name).filter(|v| !v.is_empty() || default.is_none()), default) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err(format!(
                    "environment variable `{name}` is not set and has no default (write ${{{name}:-default}})"
                ))
            }
        }
        rest = &rest[body_start + end + 1..];
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

/// The last `${...}` written unquoted inside a flow collection (`{ n: ${N:-3} }`)
/// at or before line `until`: there its braces end the scalar, a syntax error
/// the parser cannot explain. A rough scan (quotes, comments, flow depth).
fn unquoted_interpolation_in_flow(text: &str, until: usize) -> Option<(Pos, String)> {
    let mut found = None;
    for (index, line) in text.lines().enumerate().take(until.max(1)) {
        let mut depth = 0usize;
        let mut quote = None;
        let mut chars = line.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') if at == 0 || line[..at].ends_with([' ', '\t']) => break,
                (None, '$') if depth > 0 && line[at..].starts_with("${") => {
                    let end = line[at..].find('}').map_or(line.len(), |e| at + e + 1);
                    found = Some((Pos { line: index + 1, column: at + 1 }, line[at..end].to_string()));
                    while chars.peek().is_some_and(|&(i, _)| i < end) {
                        chars.next();
                    }
                }
                (None, '{' | '[') => depth += 1,
                (None, '}' | ']') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    found
}

/// Suggests the closest candidate to a misspelt name.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let best =
        candidates.into_iter().map(|c| (edit_distance(name, c), c)).filter(|(d, c)| *d <= 2.max(c.len() / 3)).min();
    match best {
        Some((_, c)) => format!(" (did you mean `{c}`?)"),
        None => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

struct Loader<'a> {
    file: String,
    env: Env<'a>,
    diags: Vec<Diagnostic>,
}

impl Loader<'_> {
    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.diags.push(Diagnostic { file: self.file.clone(), pos, message: message.into() });
    }

    /// Converts a node to JSON, interpolating strings and recording positions.
    fn convert(&mut self, node: &Node, key: Pos, path: &mut Vec<String>, spans: &mut Spans) -> serde_json::Value {
        let style = match &node.value {
            Yaml::Str(_, style) => Some(*style),
            _ => None,
        };
        spans.0.insert(path.clone(), Span { key, value: node.pos, style, interpolated: false });
        match &node.value {
            Yaml::Null => serde_json::Value::Null,
            Yaml::Bool(b) => serde_json::Value::Bool(*b),
            Yaml::Int(i) => serde_json::Value::from(*i),
            Yaml::Float(f) => {
                serde_json::Number::from_f64(*f).map(serde_json::Value::Number).unwrap_or(serde_json::Value::Null)
            }
            Yaml::Str(text, style) => match interpolate(text, self.env) {
                Ok(Cow::Borrowed(s)) => serde_json::Value::String(s.to_string()),
                Ok(Cow::Owned(s)) => {
                    if let Some(span) = spans.0.get_mut(path.as_slice()) {
                        span.interpolated = true;
                    }
                    self.interpolated(s, *style)
                }
                Err(message) => {
                    self.error(node.pos, message);
                    serde_json::Value::Null
                }
            },
            Yaml::Seq(items) => serde_json::Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        path.push(i.to_string());
                        let v = self.convert(item, item.pos, path, spans);
                        path.pop();
                        v
                    })
                    .collect(),
            ),
            Yaml::Map(entries) => {
                let mut map = serde_json::Map::new();
                for (k, v) in entries {
                    let Some(name) = k.as_key() else {
                        self.error(k.pos, "mapping keys must be plain strings");
                        continue;
                    };
                    path.push(name.clone());
                    let value = self.convert(v, k.pos, path, spans);
                    path.pop();
                    map.insert(name, value);
                }
                serde_json::Value::Object(map)
            }
        }
    }

    /// A plain scalar written as `${PORT:-8080}` takes the type of what it became.
    fn interpolated(&self, s: String, style: Style) -> serde_json::Value {
        match style {
            Style::Plain => typed_scalar(&s).unwrap_or(serde_json::Value::String(s)),
            _ => serde_json::Value::String(s),
        }
    }

    /// Deserializes a section into a typed value, reporting errors at their position.
    /// The engine's options of an output, from the entries that name them.
    fn output_options(&mut self, entries: Vec<(Node, Node)>, pos: Pos) -> OutputOptions {
        if entries.is_empty() {
            return OutputOptions::default();
        }
        let node = Node { value: Yaml::Map(entries), pos };
        let Some((options, spans)) = self.typed::<OutputOptions>(&node, pos) else {
            return OutputOptions::default();
        };
        match options.check() {
            Ok(()) => options,
            Err((path, message)) => {
                let err = BuildError::at(path.iter().copied(), "");
                let at = locate(&spans, &err, "");
                self.error(at, format!("`{}` {message}", path.join(".")));
                OutputOptions::default()
            }
        }
    }

    fn typed<T: DeserializeOwned>(&mut self, node: &Node, key: Pos) -> Option<(T, Spans)> {
        let mut spans = Spans::default();
        let json = self.convert(node, key, &mut Vec::new(), &mut spans);
        match deserialize_options::<T>(json) {
            Ok(v) => Some((v, spans)),
            Err(err) => {
                let pos = locate(&spans, &err, "");
                self.error(pos, err.message);
                None
            }
        }
    }

    fn component(&mut self, kind: Kind, name: &Node, body: &Node) -> Option<ComponentSpec> {
        let name_text = name.as_key().unwrap_or_default();
        let valid_name =
            !name_text.is_empty() && name_text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            self.error(name.pos, format!("component name `{name_text}` may only contain letters, digits, `_` and `-`"));
        }
        let Yaml::Map(entries) = &body.value else {
            self.error(
                body.pos,
                format!(
                    "{} `{name_text}` must be a mapping with at least `type`, found {}",
                    kind.as_str(),
                    body.type_name()
                ),
            );
            return None;
        };
        let problems_before = self.diags.len();
        let mut spans = Spans::default();
        spans.0.insert(Vec::new(), Span { key: name.pos, value: body.pos, style: None, interpolated: false });
        let mut type_name = None;
        let mut from = Vec::new();
        let mut saw_from = false;
        let mut engine_options = Vec::new();
        let mut options = serde_json::Map::new();
        for (k, v) in entries {
            let key = k.as_key().unwrap_or_default();
            match key.as_str() {
                "type" => match v.as_str() {
                    Some(t) => {
                        type_name = Some(t.to_string());
                        spans.0.insert(
                            vec!["type".into()],
                            Span { key: k.pos, value: v.pos, style: None, interpolated: false },
                        );
                    }
                    None => self.error(v.pos, format!("`type` must be a string, found {}", v.type_name())),
                },
                "from" if kind != Kind::Input => {
                    saw_from = true;
                    match &v.value {
                        Yaml::Str(s, _) => from.push(Ref::parse(s, v.pos)),
                        Yaml::Seq(items) => {
                            for item in items {
                                match item.as_str() {
                                    Some(s) => from.push(Ref::parse(s, item.pos)),
                                    None => self.error(
                                        item.pos,
                                        format!("`from` entries must be component names, found {}", item.type_name()),
                                    ),
                                }
                            }
                            if items.is_empty() {
                                self.error(
                                    v.pos,
                                    format!("`from` of `{name_text}` is empty: name at least one input or stage"),
                                );
                            }
                        }
                        _ => self
                            .error(v.pos, format!("`from` must be a name or a list of names, found {}", v.type_name())),
                    }
                }
                "from" => {
                    self.error(k.pos, format!("input `{name_text}` cannot have `from`: inputs are where events enter"))
                }
                key if kind == Kind::Output && OutputOptions::KEYS.contains(&key) => {
                    engine_options.push((k.clone(), v.clone()));
                }
                _ => {
                    let mut path = vec![key.clone()];
                    let value = self.convert(v, k.pos, &mut path, &mut spans);
                    options.insert(key, value);
                }
            }
        }
        let output = self.output_options(engine_options, body.pos);
        let Some(type_name) = type_name else {
            self.error(name.pos, format!("{} `{name_text}` has no `type`", kind.as_str()));
            return None;
        };
        if kind != Kind::Input && !saw_from {
            self.error(
                name.pos,
                format!("{} `{name_text}` has no `from`: say which inputs or stages feed it", kind.as_str()),
            );
        }
        Some(ComponentSpec {
            name: name_text,
            valid: self.diags.len() == problems_before,
            kind,
            type_name,
            from,
            options: serde_json::Value::Object(options),
            output,
            spans,
        })
    }
}

const TOP_LEVEL: &[&str] = &["name", "admin", "dashboard", "runtime", "inputs", "stages", "outputs", "tests"];

/// Loads a pipeline file from disk.
pub fn load_file(path: &Path, env: Env) -> Result<PipelineSpec, Vec<Diagnostic>> {
    match conflux_api::files::read_config_text(path, conflux_api::files::CONFIG_FILE_LIMIT) {
        Ok(text) => load_str(path, &text, env),
        Err(e) => Err(vec![Diagnostic {
            file: path.display().to_string(),
            pos: Pos::default(),
            message: format!("cannot read the pipeline file: {e}"),
        }]),
    }
}

/// Loads a pipeline from text; `path` names it in messages and anchors relative paths.
///
/// Fails only when the file is not a YAML mapping; other problems are kept
/// in [`PipelineSpec::problems`] so building can report its own alongside.
pub fn load_str(path: &Path, text: &str, env: Env) -> Result<PipelineSpec, Vec<Diagnostic>> {
    let file = path.display().to_string();
    let mut loader = Loader { file: file.clone(), env, diags: Vec::new() };
    let root = match yaml::parse(text) {
        Ok(root) => root,
        Err(e) => {
            let hint = unquoted_interpolation_in_flow(text, e.pos.line)
                .map(|(at, reference)| {
                    format!(
                        " (hint: `{reference}` on line {} is unquoted inside `{{ }}` or `[ ]`, where `{{`, `}}` and `,` \
                         are YAML syntax; quote it (\"{reference}\") or use block style)",
                        at.line
                    )
                })
                .unwrap_or_default();
            loader.error(e.pos, format!("YAML syntax error: {}{hint}", e.message));
            return Err(loader.diags);
        }
    };
    let Yaml::Map(entries) = &root.value else {
        loader.error(
            root.pos,
            format!("a pipeline file is a mapping with `inputs`, `stages` and `outputs`; found {}", root.type_name()),
        );
        return Err(loader.diags);
    };
    let mut spec = PipelineSpec {
        name: path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        file: path.to_path_buf(),
        source: text.to_string(),
        admin: None,
        dashboard: None,
        runtime: RuntimeConfig::default(),
        components: Vec::new(),
        tests: Vec::new(),
        test_spans: Spans::default(),
        problems: Vec::new(),
    };
    let mut seen: HashMap<String, Pos> = HashMap::new();
    let mut dashboard_at = None;
    for (k, v) in entries {
        let key = k.as_key().unwrap_or_default();
        match key.as_str() {
            "name" => match v.as_str() {
                Some(name) => spec.name = name.to_string(),
                None => loader.error(v.pos, format!("`name` must be a string, found {}", v.type_name())),
            },
            "admin" => spec.admin = loader.typed::<AdminConfig>(v, k.pos).map(|(a, _)| a),
            "dashboard" => {
                spec.dashboard = loader.typed::<crate::dashboard::DashboardConfig>(v, k.pos).map(|(d, _)| d);
                dashboard_at = Some(v.pos);
            }
            "runtime" => {
                if let Some((r, _)) = loader.typed::<RuntimeConfig>(v, k.pos) {
                    let limit = conflux_json::guard::LIMIT_MAX_DEPTH;
                    if !(1..=limit).contains(&r.max_json_depth) {
                        loader.error(v.pos, format!("runtime.max_json_depth must be between 1 and {limit}"));
                    }
                    spec.runtime = r;
                }
            }
            "tests" => {
                if let Some((tests, spans)) = loader.typed::<Vec<TestSpec>>(v, k.pos) {
                    spec.tests = tests;
                    spec.test_spans = spans;
                }
            }
            "inputs" | "stages" | "outputs" => {
                let kind = match key.as_str() {
                    "inputs" => Kind::Input,
                    "stages" => Kind::Stage,
                    _ => Kind::Output,
                };
                match &v.value {
                    Yaml::Map(components) => {
                        for (name, body) in components {
                            let Some(component) = loader.component(kind, name, body) else { continue };
                            if let Some(first) = seen.get(&component.name) {
                                loader.error(
                                    name.pos,
                                    format!("component name `{}` is already used at line {}; names are unique across inputs, stages and outputs", component.name, first.line),
                                );
                                continue;
                            }
                            seen.insert(component.name.clone(), name.pos);
                            // Masked in every log line from now on, ours or a library's.
                            conflux_api::secrets::register_options(&component.options);
                            spec.components.push(component);
                        }
                    }
                    Yaml::Null => {}
                    _ => loader.error(
                        v.pos,
                        format!("`{key}` must be a mapping of names to components, found {}", v.type_name()),
                    ),
                }
            }
            other => {
                let hint = did_you_mean(other, TOP_LEVEL.iter().copied());
                loader.error(
                    k.pos,
                    format!("unknown top-level key `{other}`{hint}; expected one of: {}", TOP_LEVEL.join(", ")),
                );
            }
        }
    }
    if let (Some(dashboard), Some(at)) = (&spec.dashboard, dashboard_at) {
        if let Err(message) = crate::dashboard::source(&spec, dashboard) {
            loader.error(at, message);
        }
    }
    if !spec.components.iter().any(|c| c.kind == Kind::Input) && loader.diags.is_empty() {
        loader.error(root.pos, "the pipeline has no inputs");
    }
    spec.problems = loader.diags;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("db.local".into()),
            "PORT" => Some("5433".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn interpolation_forms() {
        assert_eq!(interpolate("pg://${HOST}:${PORT}", &env).unwrap(), "pg://db.local:5433");
        assert_eq!(interpolate("${MISSING:-fallback}", &env).unwrap(), "fallback");
        assert_eq!(interpolate("${EMPTY:-fallback}", &env).unwrap(), "fallback");
        assert_eq!(interpolate("${EMPTY}", &env).unwrap(), "");
        assert_eq!(interpolate("cost $${HOST}", &env).unwrap(), "cost ${HOST}");
        assert_eq!(interpolate("no vars", &env).unwrap(), "no vars");
        let err = interpolate("${MISSING}", &env).unwrap_err();
        assert!(err.contains("`MISSING` is not set"), "{err}");
        assert!(interpolate("${UNCLOSED", &env).is_err());
        assert!(interpolate("${1BAD}", &env).is_err());
    }

    #[test]
    fn plain_interpolated_scalars_take_their_type() {
        let spec = load_str(
            Path::new("p.yaml"),
            "inputs:\n  a:\n    type: generate\n    count: ${PORT}\n    label: \"${PORT}\"\n",
            &env,
        )
        .unwrap();
        let opts = &spec.components[0].options;
        assert_eq!(opts["count"], serde_json::json!(5433));
        assert_eq!(opts["label"], serde_json::json!("5433"));
    }

    #[test]
    fn reports_every_structural_problem_with_positions() {
        let text = "\
name: demo
inputs:
  a: { type: generate }
  b: 7
stages:
  s: { type: x }
outputs:
  o: { type: stdout, from: [a, 3] }
  a: { type: drop, from: s }
bogus: 1
";
        let diags = load_str(Path::new("p.yaml"), text, &env).map(|s| s.problems).unwrap_or_else(|d| d);
        let lines: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
        assert!(lines.iter().any(|l| l.starts_with("p.yaml:4:6: input `b` must be a mapping")), "{lines:#?}");
        assert!(lines.iter().any(|l| l.starts_with("p.yaml:6:3: stage `s` has no `from`")), "{lines:#?}");
        assert!(lines.iter().any(|l| l.starts_with("p.yaml:8:32: `from` entries must be")), "{lines:#?}");
        assert!(lines.iter().any(|l| l.starts_with("p.yaml:9:3: component name `a` is already used")), "{lines:#?}");
        assert!(lines.iter().any(|l| l.starts_with("p.yaml:10:1: unknown top-level key `bogus`")), "{lines:#?}");
    }

    #[test]
    fn unset_variable_points_at_the_value() {
        let diags = load_str(Path::new("p.yaml"), "inputs:\n  a:\n    type: generate\n    url: ${NOPE}\n", &env)
            .map(|s| s.problems)
            .unwrap_or_else(|d| d);
        assert_eq!(diags[0].pos, Pos { line: 4, column: 10 });
        assert!(diags[0].message.contains("`NOPE` is not set"));
    }

    #[test]
    fn typed_sections_report_positions() {
        let diags = load_str(
            Path::new("p.yaml"),
            "runtime:\n  channel_capacity: lots\n  speed: 3\ninputs:\n  a: { type: generate }\n",
            &env,
        )
        .map(|s| s.problems)
        .unwrap_or_else(|d| d);
        assert_eq!(diags[0].pos, Pos { line: 2, column: 21 }, "{diags:?}");
        assert!(diags[0].message.contains("invalid type"), "{diags:?}");
    }

    #[test]
    fn unquoted_interpolation_in_a_flow_map_gets_a_hint() {
        let text = "inputs:\n  a: { type: generate, count: ${N:-3} }\n";
        let diags = load_str(Path::new("p.yaml"), text, &env).map(|s| s.problems).unwrap_or_else(|d| d);
        assert!(diags[0].message.starts_with("YAML syntax error"), "{diags:?}");
        assert!(diags[0].message.contains("`${N:-3}` on line 2 is unquoted"), "{diags:?}");
        assert!(diags[0].message.contains("quote it (\"${N:-3}\") or use block style"), "{diags:?}");
        assert_eq!(unquoted_interpolation_in_flow("a: { b: \"${N:-3}\" }\nc: ${M}\n", 2), None);
    }

    #[test]
    fn suggestions() {
        assert_eq!(did_you_mean("stdot", ["stdout", "file"]), " (did you mean `stdout`?)");
        assert_eq!(did_you_mean("zzzzzz", ["stdout", "file"]), "");
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let r = RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_attempts: 0,
        };
        assert_eq!(r.backoff(1).as_millis(), 100);
        assert_eq!(r.backoff(3).as_millis(), 400);
        assert_eq!(r.backoff(10).as_millis(), 1000);
    }
}
