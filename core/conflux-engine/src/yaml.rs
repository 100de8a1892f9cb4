//! YAML parsed into a tree that remembers where every node stands.
//!
//! Validation reports line and column for every problem, so the loader keeps
//! positions instead of going straight to serde. Scalars are resolved with the
//! YAML 1.2 core schema (`yes` stays a string); quoted scalars are always strings.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn from_marker(m: &Marker) -> Self {
        Pos { line: m.line(), column: m.col() + 1 }
    }
}

/// How a string scalar was written; needed to point inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Plain,
    Quoted,
    Block,
}

/// A YAML node and its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Yaml,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Yaml {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String, Style),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The string content of a scalar key or value; numbers and booleans as written.
    pub fn as_key(&self) -> Option<String> {
        match &self.value {
            Yaml::Str(s, _) => Some(s.clone()),
            Yaml::Int(i) => Some(i.to_string()),
            Yaml::Bool(b) => Some(b.to_string()),
            Yaml::Float(f) => Some(f.to_string()),
            Yaml::Null => Some("null".into()),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Yaml::Str(s, _) => Some(s),
            _ => None,
        }
    }

    /// A short name of the node's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self.value {
            Yaml::Null => "null",
            Yaml::Bool(_) => "a boolean",
            Yaml::Int(_) | Yaml::Float(_) => "a number",
            Yaml::Str(..) => "a string",
            Yaml::Seq(_) => "a list",
            Yaml::Map(_) => "a mapping",
        }
    }
}

/// A YAML syntax error with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Most nodes aliases may produce in one document. Each `*alias` copies its
/// anchor's tree, so nested aliases grow exponentially ("billion laughs": a
/// 658-byte file expanding to billions of nodes); past this the file is refused.
pub const MAX_ALIAS_NODES: usize = 100_000;

/// Most bytes of scalar text aliases may produce in one document (one big
/// string repeated through aliases grows as fast as nested aliases do).
pub const MAX_ALIAS_BYTES: usize = 64 << 20;

/// Parses one YAML document. An empty document is `Null`.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, false)
        .map_err(|e| SyntaxError { pos: Pos::from_marker(e.marker()), message: e.info().to_string() })?;
    if let Some(message) = builder.error {
        return Err(SyntaxError { pos: builder.error_pos, message });
    }
    Ok(builder.root.unwrap_or(Node { value: Yaml::Null, pos: Pos { line: 1, column: 1 } }))
}

/// Resolves a plain scalar with the YAML 1.2 core schema.
pub fn resolve_plain(text: &str) -> Yaml {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Yaml::Null,
        "true" | "True" | "TRUE" => return Yaml::Bool(true),
        "false" | "False" | "FALSE" => return Yaml::Bool(false),
        ".inf" | "+.inf" | ".Inf" | "+.Inf" | ".INF" => return Yaml::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Yaml::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Yaml::Float(f64::NAN),
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = text.parse::<i64>() {
            return Yaml::Int(i);
        }
    }
    if let Some(hex) = text.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(hex, 16) {
            return Yaml::Int(i);
        }
    }
    if let Some(oct) = text.strip_prefix("0o") {
        if let Ok(i) = i64::from_str_radix(oct, 8) {
            return Yaml::Int(i);
        }
    }
    let looks_numeric = digits.bytes().next().is_some_and(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if looks_numeric {
        if let Ok(f) = text.parse::<f64>() {
            return Yaml::Float(f);
        }
    }
    Yaml::Str(text.to_string(), Style::Plain)
}

enum Open {
    Seq(Node, usize),
    Map(Node, Option<Node>, usize),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    /// Each anchor's tree with its size (nodes, scalar bytes).
    anchors: std::collections::HashMap<usize, (Node, usize, usize)>,
    /// Nodes and scalar bytes produced through aliases so far.
    alias_nodes: usize,
    alias_bytes: usize,
    root: Option<Node>,
    error: Option<String>,
    error_pos: Pos,
}

impl Builder {
    fn insert(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            let (nodes, bytes) = size(&node);
            self.anchors.insert(anchor, (node.clone(), nodes, bytes));
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Open::Seq(seq, _)) => {
                if let Yaml::Seq(items) = &mut seq.value {
                    items.push(node);
                }
            }
            Some(Open::Map(map, pending, _)) => match pending.take() {
                None => *pending = Some(node),
                Some(key) => {
                    if let Yaml::Map(entries) = &mut map.value {
                        if let Some(name) = key.as_key() {
                            if entries.iter().any(|(k, _)| k.as_key().as_deref() == Some(&name)) && self.error.is_none()
                            {
                                self.error = Some(format!("duplicate key `{name}`"));
                                self.error_pos = key.pos;
                            }
                        }
                        entries.push((key, node));
                    }
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let pos = Pos::from_marker(&mark);
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let value = match style {
                    TScalarStyle::Plain => resolve_plain(&text),
                    TScalarStyle::Literal | TScalarStyle::Folded => Yaml::Str(text, Style::Block),
                    _ => Yaml::Str(text, Style::Quoted),
                };
                self.insert(Node { value, pos }, anchor);
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push(Open::Seq(Node { value: Yaml::Seq(Vec::new()), pos }, anchor));
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push(Open::Map(Node { value: Yaml::Map(Vec::new()), pos }, None, anchor));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(open) = self.stack.pop() {
                    let (node, anchor) = match open {
                        Open::Seq(node, anchor) => (node, anchor),
                        Open::Map(node, _, anchor) => (node, anchor),
                    };
                    self.insert(node, anchor);
                }
            }
            Event::Alias(id) => {
                let Some((anchor, nodes, bytes)) = self.anchors.get(&id) else {
                    if self.error.is_none() {
                        self.error = Some("alias to an unknown anchor".into());
                        self.error_pos = pos;
                    }
                    return;
                };
                // Counted before copying, so a refused expansion allocates nothing.
                self.alias_nodes = self.alias_nodes.saturating_add(*nodes);
                self.alias_bytes = self.alias_bytes.saturating_add(*bytes);
                let node = if self.alias_nodes > MAX_ALIAS_NODES || self.alias_bytes > MAX_ALIAS_BYTES {
                    if self.error.is_none() {
                        self.error = Some(format!(
                            "this alias makes the document expand past {MAX_ALIAS_NODES} nodes or {} MiB produced \
                             through aliases; write the repeated parts out or use fewer aliases",
                            MAX_ALIAS_BYTES >> 20
                        ));
                        self.error_pos = pos;
                    }
                    None
                } else {
                    let mut n = anchor.clone();
                    n.pos = pos;
                    Some(n)
                };
                match node {
                    Some(node) => self.insert(node, 0),
                    None => self.insert(Node { value: Yaml::Null, pos }, 0),
                }
            }
            _ => {}
        }
    }
}

/// Nodes in a tree and bytes of its scalar text.
fn size(node: &Node) -> (usize, usize) {
    let mut nodes = 0usize;
    let mut bytes = 0usize;
    let mut todo = vec![node];
    while let Some(n) = todo.pop() {
        nodes += 1;
        match &n.value {
            Yaml::Str(s, _) => bytes += s.len(),
            Yaml::Seq(items) => todo.extend(items),
            Yaml::Map(entries) => todo.extend(entries.iter().flat_map(|(k, v)| [k, v])),
            _ => {}
        }
    }
    (nodes, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let root = parse("a: 1\nb:\n  c: \"x\"\n  d: [true, 2.5, null]\n").unwrap();
        let Yaml::Map(entries) = &root.value else { panic!() };
        assert_eq!(entries[0].0.pos, Pos { line: 1, column: 1 });
        assert_eq!(entries[0].1.value, Yaml::Int(1));
        let Yaml::Map(inner) = &entries[1].1.value else { panic!() };
        assert_eq!(inner[0].1.pos, Pos { line: 3, column: 6 });
        assert_eq!(inner[0].1.value, Yaml::Str("x".into(), Style::Quoted));
        let Yaml::Seq(items) = &inner[1].1.value else { panic!() };
        assert_eq!(items[0].value, Yaml::Bool(true));
        assert_eq!(items[1].value, Yaml::Float(2.5));
        assert_eq!(items[2].value, Yaml::Null);
    }

    #[test]
    fn core_schema_keeps_yes_a_string() {
        assert_eq!(resolve_plain("yes"), Yaml::Str("yes".into(), Style::Plain));
        assert_eq!(resolve_plain("0x1f"), Yaml::Int(31));
        assert_eq!(resolve_plain("1e3"), Yaml::Float(1000.0));
        assert_eq!(resolve_plain("5m"), Yaml::Str("5m".into(), Style::Plain));
        assert_eq!(resolve_plain("127.0.0.1:80"), Yaml::Str("127.0.0.1:80".into(), Style::Plain));
    }

    #[test]
    fn syntax_and_duplicate_errors_have_positions() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.pos.line >= 1, "{err:?}");
        let err = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(err.pos, Pos { line: 3, column: 1 });
        assert!(err.message.contains("duplicate key `a`"));
    }

    #[test]
    fn aliases_copy_the_anchor() {
        let root = parse("x: &v {k: 1}\ny: *v\n").unwrap();
        let Yaml::Map(entries) = &root.value else { panic!() };
        assert_eq!(entries[0].1.value, entries[1].1.value);
    }

    #[test]
    fn alias_expansion_is_bounded() {
        // One anchor of 1,001 nodes used 200 times: 200,200 nodes through aliases.
        let mut text = format!("x: &v [{}]\n", vec!["1"; 1000].join(","));
        for i in 0..200 {
            text.push_str(&format!("y{i}: *v\n"));
        }
        let err = parse(&text).unwrap_err();
        assert_eq!(err.pos.line, 101, "{err:?}");
        assert!(err.message.contains("100000 nodes"), "{err:?}");
        assert!(parse(&text.lines().take(90).collect::<Vec<_>>().join("\n")).is_ok());
    }
}
