//! From a loaded spec to a built, checked graph of components.
//!
//! Building runs every plugin's `build` (compiling scripts, reading schema
//! files) but opens no connections; then the graph is checked: dangling
//! `from`, unknown ports, outputs used as sources, cycles, unused components.

use std::collections::HashMap;
use std::path::PathBuf;

use conflux_api::component::ERROR_PORT;
use conflux_api::error::BuildErrorKind;
use conflux_api::registry::Factory;
use conflux_api::{BuildContext, Input, Kind, Output, Registration, Stage};

use crate::config::{did_you_mean, AdminConfig, Diagnostic, PipelineSpec, Ref, RuntimeConfig, TestSpec};
use crate::options::OutputOptions;
use crate::yaml::Pos;

/// A built component.
pub enum Body {
    Input(Box<dyn Input>),
    Stage(Box<dyn Stage>),
    Output(Box<dyn Output>),
}

/// One component in the graph.
pub struct GraphNode {
    pub name: String,
    pub kind: Kind,
    pub type_name: String,
    /// Ports it emits on: `""` (default) first, declared ports, `error` last.
    /// An output has only `error` besides the default, on which it emits nothing.
    pub ports: Vec<String>,
    /// Upstream (node index, port index) pairs.
    pub from: Vec<(usize, usize)>,
    /// The engine's options of an output (defaults for the rest; inputs use its `retry`).
    pub output: OutputOptions,
    pub body: Body,
    /// Counters the component declared while built; exported by the runtime.
    pub counters: Vec<conflux_api::metrics::Declared>,
    /// Up or down, shared with the component.
    pub health: conflux_api::Health,
}

impl GraphNode {
    /// The declared port names (without the default and `error`).
    pub fn declared_ports(&self) -> usize {
        self.ports.len().saturating_sub(2)
    }

    /// `name` or `name.port` for a port index.
    pub fn port_label(&self, port: usize) -> String {
        match self.ports.get(port).map(String::as_str) {
            None | Some("") => self.name.clone(),
            Some(p) => format!("{}.{p}", self.name),
        }
    }
}

/// A pipeline ready to run.
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    pub admin: Option<AdminConfig>,
    pub runtime: RuntimeConfig,
    pub nodes: Vec<GraphNode>,
    pub tests: Vec<TestSpec>,
    pub spec: PipelineSpec,
}

impl Pipeline {
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Resolves `name` or `name.port` to (node, port).
    pub fn resolve(&self, text: &str) -> Result<(usize, usize), String> {
        let r = Ref::parse(text, Default::default());
        let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        let node = self.index_of(&r.component).ok_or_else(|| {
            format!("`{}` is not a component of this pipeline{}", r.component, did_you_mean(&r.component, names))
        })?;
        resolve_port(&self.nodes[node], &r).map(|port| (node, port))
    }
}

fn resolve_port(node: &GraphNode, r: &Ref) -> Result<usize, String> {
    match &r.port {
        None => Ok(0),
        Some(port) => node.ports.iter().skip(1).position(|p| p == port).map(|i| i + 1).ok_or_else(|| {
            let list: Vec<&str> = node.ports.iter().skip(1).map(String::as_str).collect();
            format!(
                "`{}` has no port `{port}`{}; its ports are: {}",
                node.name,
                did_you_mean(port, list.iter().copied()),
                list.join(", ")
            )
        }),
    }
}

/// A problem with a pipeline's components or wiring, before any I/O.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("unknown {kind} type `{type_name}`{hint}; known {kind} types: {}", known.join(", "))]
    UnknownType { kind: &'static str, type_name: String, hint: String, known: Vec<&'static str> },
    /// A component's own `build` refused its options.
    #[error("{kind} `{component}`: {message}")]
    Build { kind: &'static str, component: String, message: String },
    #[error("`{reader}` reads from `{source_name}`, which is not a component of this pipeline{hint}")]
    UnknownSource { reader: String, source_name: String, hint: String },
    #[error(
        "`{reader}` reads from output `{output}`; an output emits only the events it refused, on `{output}.error`"
    )]
    ReadsFromOutput { reader: String, output: String },
    /// `name.port` names a port the component does not have.
    #[error("{0}")]
    NoSuchPort(String),
    #[error("cycle: `{reader}` reads from `{source_name}`, which depends on `{reader}`")]
    Cycle { reader: String, source_name: String },
    #[error("{kind} `{component}` is not used: no stage or output reads from it")]
    Unused { kind: &'static str, component: String },
}

/// Problems found by the passes, each with where it is in the file.
type Found = Vec<(Pos, GraphError)>;

/// Builds every component and checks the graph, reporting every problem.
///
/// Four passes: build the components, wire each `from` to a built port,
/// look for a cycle among the declared components, and (when all else is
/// right) look for components nothing reads. Wiring and cycles are checked
/// for every declared component, built or not, so one broken component
/// hides no graph errors.
pub fn compile(spec: PipelineSpec) -> Result<Pipeline, Vec<Diagnostic>> {
    let mut diags = spec.problems.clone();
    let (mut nodes, mut found) = build_components(&spec);
    found.extend(wire(&spec, &mut nodes));
    found.extend(find_cycle_in(&spec));
    if diags.is_empty() && found.is_empty() {
        found.extend(unused(&spec, &nodes));
    }
    diags.extend(found.into_iter().map(|(pos, e)| spec.diag(pos, e.to_string())));
    diags.sort_by_key(|d| d.pos);
    if !diags.is_empty() {
        return Err(diags);
    }
    Ok(Pipeline {
        name: spec.name.clone(),
        file: spec.file.clone(),
        admin: spec.admin.clone(),
        runtime: spec.runtime.clone(),
        nodes,
        tests: spec.tests.clone(),
        spec,
    })
}

/// Pass 1: runs each valid component's `build` (no I/O).
fn build_components(spec: &PipelineSpec) -> (Vec<GraphNode>, Found) {
    let base_dir = spec.base_dir();
    let data_dir = base_dir.join(&spec.runtime.data_dir);
    let mut nodes = Vec::new();
    let mut found = Found::new();
    for component in spec.components.iter().filter(|c| c.valid) {
        let kind = component.kind.as_str();
        let Some(registration) = Registration::find(component.kind, &component.type_name) else {
            let known: Vec<&str> =
                Registration::all().into_iter().filter(|r| r.kind == component.kind).map(|r| r.name).collect();
            let hint = did_you_mean(&component.type_name, known.iter().copied());
            let type_name = component.type_name.clone();
            found.push((component.spans_type_pos(), GraphError::UnknownType { kind, type_name, hint, known }));
            continue;
        };
        let cx = BuildContext {
            pipeline: spec.name.clone(),
            component: component.name.clone(),
            base_dir: base_dir.clone(),
            data_dir: data_dir.clone(),
            metrics: Default::default(),
            source_map: Some(source_map(spec, component)),
            health: Default::default(),
            writes: conflux_api::WriteOptions {
                max_in_flight: component.output.max_in_flight,
                fails_back: component.output.retry.max_attempts > 0,
            },
        };
        let mut options = component.options.clone();
        let built = loop {
            let built = build(registration, options.clone(), &cx);
            match &built {
                Err(err)
                    if err.kind == BuildErrorKind::StringForOtherType
                        && component.spans.retype_interpolated(&err.path, &mut options) =>
                {
                    continue
                }
                _ => break built,
            }
        };
        match built {
            Ok((body, ports)) => nodes.push(GraphNode {
                name: component.name.clone(),
                kind: component.kind,
                type_name: component.type_name.clone(),
                ports,
                from: Vec::new(),
                output: component.output.clone(),
                body,
                counters: cx.metrics.declared(),
                health: cx.health.clone(),
            }),
            Err(err) => {
                let pos = spec.locate(&component.spans, &err);
                let component = component.name.clone();
                found.push((pos, GraphError::Build { kind, component, message: err.message }));
            }
        }
    }
    (nodes, found)
}

/// Pass 2: resolves every `from` of every declared component; the built
/// readers get their upstream (node, port) pairs.
fn wire(spec: &PipelineSpec, nodes: &mut [GraphNode]) -> Found {
    let declared: HashMap<&str, Kind> = spec.components.iter().map(|c| (c.name.as_str(), c.kind)).collect();
    let mut found = Found::new();
    for component in &spec.components {
        let reader = nodes.iter().position(|n| n.name == component.name);
        for r in &component.from {
            let problem = match declared.get(r.component.as_str()) {
                None => Some(GraphError::UnknownSource {
                    reader: component.name.clone(),
                    source_name: r.component.clone(),
                    hint: did_you_mean(&r.component, declared.keys().copied()),
                }),
                Some(Kind::Output) if r.port.as_deref() != Some(ERROR_PORT) => {
                    Some(GraphError::ReadsFromOutput { reader: component.name.clone(), output: r.component.clone() })
                }
                Some(_) => {
                    // A source that failed to build has been reported already.
                    let Some(src) = nodes.iter().position(|n| n.name == r.component) else { continue };
                    match resolve_port(&nodes[src], r) {
                        Ok(port) => {
                            if let Some(reader) = reader {
                                nodes[reader].from.push((src, port));
                            }
                            None
                        }
                        Err(message) => Some(GraphError::NoSuchPort(message)),
                    }
                }
            };
            found.extend(problem.map(|e| (r.pos, e)));
        }
    }
    found
}

/// Pass 3: one cycle among the declared components, if any.
fn find_cycle_in(spec: &PipelineSpec) -> Option<(Pos, GraphError)> {
    let index: HashMap<&str, usize> = spec.components.iter().enumerate().map(|(i, c)| (c.name.as_str(), i)).collect();
    let edges: Vec<Vec<(usize, &Ref)>> = spec
        .components
        .iter()
        .map(|c| c.from.iter().filter_map(|r| index.get(r.component.as_str()).map(|&src| (src, r))).collect())
        .collect();
    let (node, edge) = find_cycle(&edges)?;
    let r = edges[node][edge].1;
    Some((r.pos, GraphError::Cycle { reader: spec.components[node].name.clone(), source_name: r.component.clone() }))
}

/// Pass 4: inputs and stages whose events nobody reads (their `error` port aside).
fn unused(spec: &PipelineSpec, nodes: &[GraphNode]) -> Found {
    let mut found = Found::new();
    for (i, node) in nodes.iter().enumerate() {
        if node.kind == Kind::Output {
            continue;
        }
        let error_port = node.ports.len() - 1;
        if !nodes.iter().any(|n| n.from.iter().any(|&(src, port)| src == i && port != error_port)) {
            let pos = spec.components.iter().find(|c| c.name == node.name).map(|c| c.pos()).unwrap_or_default();
            found.push((pos, GraphError::Unused { kind: node.kind.as_str(), component: node.name.clone() }));
        }
    }
    found
}

fn build(
    registration: &Registration,
    options: serde_json::Value,
    cx: &BuildContext,
) -> Result<(Body, Vec<String>), conflux_api::BuildError> {
    match &registration.factory {
        Factory::Input(build) => build(options, cx).map(|b| (Body::Input(b.input), ports_with_defaults(b.ports))),
        Factory::Stage(build) => build(options, cx).map(|b| (Body::Stage(b.stage), ports_with_defaults(b.ports))),
        Factory::Output(build) => build(options, cx).map(|o| (Body::Output(o), ports_with_defaults(Vec::new()))),
    }
}

fn ports_with_defaults(declared: Vec<String>) -> Vec<String> {
    let mut ports = vec![String::new()];
    ports.extend(declared.into_iter().filter(|p| p != ERROR_PORT));
    ports.push(ERROR_PORT.to_string());
    ports
}

/// Finds one edge (node, index into its upstream list) that closes a cycle.
fn find_cycle<T>(from: &[Vec<(usize, T)>]) -> Option<(usize, usize)> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit<T>(n: usize, from: &[Vec<(usize, T)>], marks: &mut [Mark]) -> Option<(usize, usize)> {
        marks[n] = Mark::Active;
        for (edge, (src, _)) in from[n].iter().enumerate() {
            let src = *src;
            match marks[src] {
                Mark::Active => return Some((n, edge)),
                Mark::New => {
                    if let Some(found) = visit(src, from, marks) {
                        return Some(found);
                    }
                }
                Mark::Done => {}
            }
        }
        marks[n] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; from.len()];
    (0..from.len()).find_map(|n| if marks[n] == Mark::New { visit(n, from, &mut marks) } else { None })
}

/// The graph as a Mermaid flowchart.
pub fn mermaid(pipeline: &Pipeline) -> String {
    let mut out = String::from("flowchart LR\n");
    for node in &pipeline.nodes {
        let label = format!("{}<br/><i>{}</i>", node.name, node.type_name);
        let shape = match node.kind {
            Kind::Input => format!("{}[/\"{label}\"/]", node.name),
            Kind::Stage => format!("{}[\"{label}\"]", node.name),
            Kind::Output => format!("{}[(\"{label}\")]", node.name),
        };
        out.push_str(&format!("    {shape}\n"));
    }
    for node in &pipeline.nodes {
        for &(src, port) in &node.from {
            let src_node = &pipeline.nodes[src];
            match src_node.ports.get(port).map(String::as_str) {
                None | Some("") => out.push_str(&format!("    {} --> {}\n", src_node.name, node.name)),
                Some(p) => out.push_str(&format!("    {} -->|{p}| {}\n", src_node.name, node.name)),
            }
        }
    }
    out
}

/// Positions inside a component's string options, in the pipeline file.
fn source_map(spec: &PipelineSpec, component: &crate::config::ComponentSpec) -> conflux_api::component::SourceMap {
    let spans = component.spans.clone();
    let source: std::sync::Arc<str> = spec.source.as_str().into();
    let file = spec.file.display().to_string();
    conflux_api::component::SourceMap(std::sync::Arc::new(move |path: &[&str], line: usize, column: usize| {
        let at = conflux_api::BuildError::at(path.iter().copied(), "").with_offset(line, column);
        let pos = crate::config::locate(&spans, &at, &source);
        format!("{file}:{}:{}", pos.line, pos.column)
    }))
}
