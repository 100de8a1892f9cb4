//! The JSON Schema of a whole pipeline file and the plugin reference, both
//! generated from the registered config types so they cannot drift.

use conflux_api::{Kind, Registration};
use schemars::generate::SchemaSettings;
use schemars::Schema;
use serde_json::{json, Map, Value};

use crate::config::{AdminConfig, RuntimeConfig, TestSpec};
use crate::options::{from_schema, OutputOptions};

fn object(schema: Schema) -> Map<String, Value> {
    match schema.to_value() {
        Value::Object(map) => map,
        other => {
            let mut map = Map::new();
            map.insert("allOf".into(), json!([other]));
            map
        }
    }
}

/// The JSON Schema (draft 2020-12) of a pipeline file.
pub fn pipeline_schema() -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let from = from_schema();
    let output_options = output_option_properties(&mut generator);
    let mut variants: [Vec<Value>; 3] = Default::default();
    for registration in Registration::all() {
        let mut schema = object((registration.schema)(&mut generator));
        let props = schema.entry("properties").or_insert_with(|| json!({}));
        let props = props.as_object_mut().expect("properties is an object");
        props.insert("type".into(), json!({ "const": registration.name }));
        if registration.kind != Kind::Input {
            props.insert("from".into(), from.clone());
        }
        if registration.kind == Kind::Output {
            props.extend(output_options.clone());
        }
        let mut required: Vec<Value> = schema.get("required").and_then(|r| r.as_array()).cloned().unwrap_or_default();
        required.insert(0, json!("type"));
        if registration.kind != Kind::Input {
            required.insert(1, json!("from"));
        }
        schema.insert("required".into(), Value::Array(required));
        schema.insert("title".into(), json!(format!("{} {}", registration.name, registration.kind.as_str())));
        schema.insert("additionalProperties".into(), json!(false));
        variants[registration.kind as usize].push(Value::Object(schema));
    }
    let admin = generator.subschema_for::<AdminConfig>().to_value();
    let dashboard = generator.subschema_for::<crate::dashboard::DashboardConfig>().to_value();
    let runtime = generator.subschema_for::<RuntimeConfig>().to_value();
    let tests = generator.subschema_for::<Vec<TestSpec>>().to_value();
    let mut defs = generator.take_definitions(true);
    let [inputs, stages, outputs] = variants;
    defs.insert("input".into(), json!({ "oneOf": inputs }));
    defs.insert("stage".into(), json!({ "oneOf": stages }));
    defs.insert("output".into(), json!({ "oneOf": outputs }));
    let section =
        |kind: &str| json!({ "type": "object", "additionalProperties": { "$ref": format!("#/$defs/{kind}") } });
    let mut schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://conflux.dev/schemas/pipeline.schema.json",
        "title": "Conflux pipeline",
        "description": "A Conflux pipeline file: named inputs, stages and outputs wired by `from`.",
        "type": "object",
        "additionalProperties": false,
        "required": ["inputs"],
        "properties": {
            "name": { "type": "string", "description": "Pipeline name (defaults to the file name)." },
            "admin": admin,
            "dashboard": dashboard,
            "runtime": runtime,
            "inputs": section("input"),
            "stages": section("stage"),
            "outputs": section("output"),
            "tests": tests,
        },
        "$defs": defs,
    });
    accept_interpolation(&mut schema);
    schema
}

/// A `${VAR}` (or `${VAR:-default}`) anywhere in a string: the loader
/// interpolates it before the value is typed.
const INTERPOLATION: &str = "\\$\\{[A-Za-z_][A-Za-z0-9_]*";

/// Lets every typed value (number, boolean, enum, patterned string such as
/// a duration) be written as an interpolation too, as the loader accepts:
/// `rate: ${RATE:-50/s}`, `count: ${N:-600}`. Without it the schema
/// flagged the project's own quickstart file.
fn accept_interpolation(schema: &mut Value) {
    match schema {
        Value::Array(items) => items.iter_mut().for_each(accept_interpolation),
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                // `type: <plugin>` selects the component: it is never interpolated.
                if key != "const" {
                    accept_interpolation(value);
                }
            }
            if let Some(Value::String(pattern)) = map.get_mut("pattern") {
                *pattern = format!("{pattern}|{INTERPOLATION}");
                return;
            }
            let typed = |t: &Value| matches!(t.as_str(), Some("integer" | "number" | "boolean"));
            let is_typed = match map.get("type") {
                Some(Value::Array(types)) => types.iter().any(typed),
                Some(t) => typed(t),
                None => false,
            };
            // An enum as schemars writes a documented one: `oneOf` of `const`s.
            let consts = |key: &str| {
                map.get(key)
                    .and_then(Value::as_array)
                    .is_some_and(|v| !v.is_empty() && v.iter().all(|x| x.get("const").is_some()))
            };
            if is_typed || map.contains_key("enum") || consts("oneOf") || consts("anyOf") {
                let mut inner = std::mem::take(map);
                let mut outer = serde_json::Map::new();
                for kept in ["description", "default", "title"] {
                    if let Some(v) = inner.remove(kept) {
                        outer.insert(kept.into(), v);
                    }
                }
                outer.insert(
                    "anyOf".into(),
                    json!([Value::Object(inner), { "type": "string", "pattern": INTERPOLATION }]),
                );
                *map = outer;
            }
        }
        _ => {}
    }
}

/// One option of a component, for the reference. Options nested in an
/// object option are listed after it under dotted names (`auth.jwt.secret`);
/// items of a list of objects as `name[].key`, entries of a map as
/// `name.<name>.key`.
pub struct OptionDoc {
    pub name: String,
    pub type_text: String,
    /// Required (for a nested option: whenever its parent is given).
    pub required: bool,
    pub default: Option<String>,
    pub description: String,
    /// For an option taking one of a fixed set of values: each value and what it means.
    pub values: Vec<(String, String)>,
}

/// Deepest nesting listed; guards against recursive types.
const MAX_DEPTH: usize = 8;

/// Options of a registered type, resolved from its schema.
pub fn options(registration: &Registration) -> Vec<OptionDoc> {
    options_of(&registration.options_schema().to_value())
}

/// Options of an object schema whose definitions are in its `$defs`, nested ones included.
fn options_of(schema: &Value) -> Vec<OptionDoc> {
    let defs = schema.get("$defs").cloned().unwrap_or(json!({}));
    let mut docs = Vec::new();
    collect(schema, &defs, "", 0, &mut docs);
    docs
}

/// Lists the properties of an object schema, each followed by its nested options.
fn collect(object: &Value, defs: &Value, prefix: &str, depth: usize, docs: &mut Vec<OptionDoc>) {
    let required: Vec<&str> = object
        .get("required")
        .and_then(|r| r.as_array())
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let Some(props) = object.get("properties").and_then(|p| p.as_object()) else { return };
    for (name, prop) in props {
        push_option(&format!("{prefix}{name}"), prop, required.contains(&name.as_str()), "", defs, depth, docs);
    }
}

/// One option row, then the options nested in it. `fallback` describes the
/// option when neither it nor its type has a description.
fn push_option(
    name: &str,
    prop: &Value,
    required: bool,
    fallback: &str,
    defs: &Value,
    depth: usize,
    docs: &mut Vec<OptionDoc>,
) {
    let target = unwrap(prop, defs);
    // A patterned string type (duration, size, rate) describes itself in the type column.
    fn own(schema: &Value) -> Option<&str> {
        schema.get("pattern").is_none().then(|| schema.get("description").and_then(|d| d.as_str())).flatten()
    }
    let description = prop
        .get("description")
        .and_then(|d| d.as_str())
        .or_else(|| Some(fallback).filter(|f| !f.is_empty()))
        .or_else(|| own(resolve(prop, defs)))
        .or_else(|| own(target))
        .unwrap_or("");
    let (default, mut description) = split_default(prop.get("default"), one_line(description));
    // An enum with data, written as a map with one key: name the keys.
    let shapes = variants(target, defs);
    let keys: Vec<&String> = shapes
        .iter()
        .filter_map(|v| v.get("properties").and_then(|p| p.as_object()).filter(|p| p.len() == 1))
        .flat_map(|p| p.keys())
        .collect();
    if !keys.is_empty() && keys.len() == shapes.len() {
        let keys: Vec<String> = keys.iter().map(|k| format!("`{k}`")).collect();
        description = format!("{description} Exactly one of {}.", keys.join(", ")).trim_start().to_string();
    }
    let values = shapes.iter().copied().chain([target]).flat_map(|v| {
        let text = match v == target {
            true => String::new(),
            false => one_line(v.get("description").and_then(|d| d.as_str()).unwrap_or("")),
        };
        let consts = v.get("const").into_iter().chain(v.get("enum").and_then(|e| e.as_array()).into_iter().flatten());
        consts.filter_map(|c| c.as_str()).map(|c| (c.to_string(), text.clone())).collect::<Vec<_>>()
    });
    let values = values.collect();
    docs.push(OptionDoc {
        name: name.to_string(),
        type_text: type_text(prop, defs),
        required,
        default,
        description,
        values,
    });
    if depth < MAX_DEPTH {
        nested(target, defs, name, depth + 1, docs);
    }
}

/// The options inside an option of type `schema` named `name`.
fn nested(schema: &Value, defs: &Value, name: &str, depth: usize, docs: &mut Vec<OptionDoc>) {
    if schema.get("properties").is_some() {
        collect(schema, defs, &format!("{name}."), depth, docs);
    } else if schema.get("type").and_then(|t| t.as_str()) == Some("array") {
        if let Some(items) = schema.get("items") {
            let items = unwrap(items, defs);
            if items.get("properties").is_some() {
                collect(items, defs, &format!("{name}[]."), depth, docs);
            }
        }
    } else if let Some(entries) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        let entries = unwrap(entries, defs);
        if entries.get("properties").is_some() {
            collect(entries, defs, &format!("{name}.<name>."), depth, docs);
        }
    } else {
        // One of several shapes (an enum with data): the keys of each object shape.
        for variant in variants(schema, defs) {
            let fallback = variant.get("description").and_then(|d| d.as_str()).unwrap_or("");
            let Some(props) = variant.get("properties").and_then(|p| p.as_object()) else { continue };
            for (key, prop) in props {
                push_option(&format!("{name}.{key}"), prop, false, fallback, defs, depth, docs);
            }
        }
    }
}

/// A doc comment's text on one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The schema a `$ref` points to, or the schema itself.
fn resolve<'a>(schema: &'a Value, defs: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(|r| r.as_str()).and_then(|r| r.strip_prefix("#/$defs/")) {
        Some(name) => defs.get(name).unwrap_or(schema),
        None => schema,
    }
}

/// The schema of the value itself: through `$ref`, a single `allOf`, and the
/// `anyOf`/`oneOf` with `null` of an optional value.
fn unwrap<'a>(schema: &'a Value, defs: &'a Value) -> &'a Value {
    let mut schema = resolve(schema, defs);
    for _ in 0..MAX_DEPTH {
        let inner = ["allOf", "anyOf", "oneOf"].iter().find_map(|key| {
            let list = schema.get(*key)?.as_array()?;
            let mut rest = list.iter().filter(|v| v.get("type").and_then(|t| t.as_str()) != Some("null"));
            let only = rest.next()?;
            (rest.next().is_none() && (*key == "allOf" || list.len() == 2)).then_some(only)
        });
        match inner {
            Some(inner) => schema = resolve(inner, defs),
            None => break,
        }
    }
    schema
}

/// The alternatives of a `oneOf`/`anyOf` schema, resolved, without `null`.
fn variants<'a>(schema: &'a Value, defs: &'a Value) -> Vec<&'a Value> {
    schema
        .get("oneOf")
        .or_else(|| schema.get("anyOf"))
        .and_then(|v| v.as_array())
        .map(|list| {
            list.iter()
                .map(|v| unwrap(v, defs))
                .filter(|v| v.get("type").and_then(|t| t.as_str()) != Some("null"))
                .collect()
        })
        .unwrap_or_default()
}

/// A default as written in a pipeline file: strings without quotes.
fn default_text(value: &Value) -> String {
    match value {
        Value::String(s) if !s.is_empty() => s.clone(),
        other => other.to_string(),
    }
}

/// The default of an option: from the schema, else from a `(default X)` in
/// its description (for defaults the schema cannot carry, such as enum values
/// and unset optional values), which is then taken out of the description.
fn split_default(schema_default: Option<&Value>, description: String) -> (Option<String>, String) {
    let schema_default = schema_default.filter(|d| !d.is_null()).map(default_text);
    let Some(start) = description.find(" (default ") else { return (schema_default, description) };
    let rest = &description[start + " (default ".len()..];
    let Some(end) = rest.find(')').filter(|&end| !rest[..end].contains('(')) else {
        return (schema_default, description);
    };
    let text = rest[..end].trim();
    let text = text.strip_prefix('`').and_then(|t| t.strip_suffix('`')).filter(|t| !t.contains('`')).unwrap_or(text);
    if schema_default.as_ref().is_some_and(|d| d != text) {
        return (schema_default, description);
    }
    let stripped = format!("{}{}", &description[..start], &rest[end + 1..]);
    (Some(text.to_string()), stripped)
}

fn type_text(schema: &Value, defs: &Value) -> String {
    let schema = resolve(schema, defs);
    if let Some(values) = schema.get("enum").and_then(|e| e.as_array()) {
        return values.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(" | ");
    }
    if let Some(variants) = schema.get("oneOf").or_else(|| schema.get("anyOf")).and_then(|v| v.as_array()) {
        let mut parts: Vec<String> = Vec::new();
        for variant in variants {
            let part = match variant.get("const").and_then(|c| c.as_str()) {
                Some(c) => c.to_string(),
                None => type_text(variant, defs),
            };
            if part != "null" && !parts.contains(&part) {
                parts.push(part);
            }
        }
        return parts.join(" | ");
    }
    if let Some(all) = schema.get("allOf").and_then(|a| a.as_array()).filter(|a| a.len() == 1) {
        return type_text(&all[0], defs);
    }
    if let Some(pattern_desc) = schema.get("pattern").and(schema.get("description")).and_then(|d| d.as_str()) {
        return pattern_desc
            .trim_start_matches("a ")
            .trim_start_matches("an ")
            .split(" such as")
            .next()
            .unwrap_or("string")
            .to_string();
    }
    match schema.get("type") {
        Some(Value::String(t)) if t == "array" => {
            format!("list of {}", schema.get("items").map(|i| type_text(i, defs)).unwrap_or_else(|| "any".into()))
        }
        Some(Value::String(t)) if t == "object" => match schema.get("additionalProperties").filter(|a| a.is_object()) {
            Some(entries) => format!("map of {}", type_text(entries, defs)),
            None => t.clone(),
        },
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => {
            ts.iter().filter_map(|t| t.as_str()).filter(|t| *t != "null").collect::<Vec<_>>().join(" | ")
        }
        _ => "any".into(),
    }
}

/// Markdown table cell text.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// A table of options.
fn options_table(opts: Vec<OptionDoc>) -> String {
    let mut out = String::from("\n| option | type | required | default | description |\n|---|---|---|---|---|\n");
    for o in opts {
        let mut description = o.description;
        if o.values.iter().any(|(_, text)| !text.is_empty()) {
            for (value, text) in &o.values {
                let mark = if o.default.as_deref() == Some(value.as_str()) { " (default)" } else { "" };
                let sep = if text.is_empty() { "" } else { ": " };
                description.push_str(&format!("<br>`{value}`{mark}{sep}{text}"));
            }
        }
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            o.name,
            cell(&o.type_text),
            if o.required { "yes" } else { "" },
            o.default.map(|d| format!("`{d}`")).unwrap_or_default(),
            cell(&description),
        ));
    }
    out
}

/// The options every stage and output takes besides its own.
fn common_options() -> Vec<OptionDoc> {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let mut props = Map::new();
    props.insert("from".into(), from_schema());
    for (name, mut prop) in output_option_properties(&mut generator) {
        if let Some(Value::String(d)) = prop.get_mut("description") {
            *d = format!("Outputs only. {d}");
        }
        props.insert(name, prop);
    }
    let schema = json!({
        "type": "object",
        "required": ["from"],
        "properties": props,
        "$defs": generator.take_definitions(true),
    });
    options_of(&schema)
}

/// The properties of [`OutputOptions`], which every output takes.
fn output_option_properties(generator: &mut schemars::SchemaGenerator) -> Map<String, Value> {
    let schema = object(<OutputOptions as schemars::JsonSchema>::json_schema(generator));
    match schema.get("properties") {
        Some(Value::Object(props)) => props.clone(),
        _ => Map::new(),
    }
}

/// The plugin reference as Markdown (`docs/plugins.md`).
pub fn plugins_markdown() -> String {
    let mut out = String::from(
        "# Component reference\n\nGenerated by `conflux plugins --markdown` from the config types; do not edit by hand.\n\
         Options inside an object option are listed after it under dotted names: `auth.jwt.secret` is written\n\
         `auth: { jwt: { secret: … } }`; `name[].key` is a key of each item of a list, `name.<name>.key` one of each\n\
         entry of a map. A nested option marked required is required whenever its parent is given.\n\
         \n## Common options\n\nEvery stage and output also takes `from`; every output takes `retry`, `batch` and `max_in_flight`, which the\n\
         engine handles (an output's refused events come out of its `error` port: `from: name.error`).\n",
    );
    out.push_str(&options_table(common_options()));
    for kind in [Kind::Input, Kind::Stage, Kind::Output] {
        let section = match kind {
            Kind::Input => "Inputs",
            Kind::Stage => "Stages",
            Kind::Output => "Outputs",
        };
        out.push_str(&format!("\n## {section}\n"));
        for registration in Registration::all().into_iter().filter(|r| r.kind == kind) {
            let schema = registration.options_schema();
            let description = schema.get("description").and_then(|d| d.as_str()).unwrap_or("");
            out.push_str(&format!("\n### `{}`\n\n{}\n", registration.name, description));
            let opts = options(registration);
            if opts.is_empty() {
                out.push_str("\nNo options.\n");
                continue;
            }
            out.push_str(&options_table(opts));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use schemars::JsonSchema;
    use serde::Deserialize;

    use super::*;

    /// How to answer.
    #[allow(dead_code)]
    #[derive(Deserialize, JsonSchema, Default)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        /// Right away.
        #[default]
        Fast,
        /// Once done.
        Slow,
    }

    #[allow(dead_code)]
    #[derive(Deserialize, JsonSchema)]
    #[serde(rename_all = "snake_case")]
    enum Shape {
        /// Fixed: `fixed: 1`.
        Fixed(u32),
        /// Two numbers.
        Pair {
            /// The first.
            a: u32,
            /// The second.
            b: u32,
        },
    }

    #[allow(dead_code)]
    #[derive(Deserialize, JsonSchema)]
    struct Inner {
        /// Needed.
        name: String,
        /// Tolerated skew (default 5s).
        #[serde(default)]
        skew: Option<String>,
    }

    #[allow(dead_code)]
    #[derive(Deserialize, JsonSchema)]
    struct Item {
        /// The key.
        key: String,
    }

    /// Top.
    #[allow(dead_code)]
    #[derive(Deserialize, JsonSchema)]
    struct Top {
        /// When to answer (default `fast`).
        #[serde(default)]
        mode: Mode,
        /// Nested options.
        #[serde(default)]
        inner: Option<Inner>,
        /// Items.
        items: Vec<Item>,
        /// The shape.
        shape: Shape,
    }

    fn docs() -> Vec<OptionDoc> {
        options_of(&SchemaSettings::draft2020_12().into_generator().root_schema_for::<Top>().to_value())
    }

    fn find<'a>(docs: &'a [OptionDoc], name: &str) -> &'a OptionDoc {
        docs.iter().find(|d| d.name == name).unwrap_or_else(|| panic!("no option `{name}`"))
    }

    #[test]
    fn nested_options_are_listed_under_dotted_names() {
        let docs = docs();
        let names: Vec<&str> = docs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "inner",
                "inner.name",
                "inner.skew",
                "items",
                "items[].key",
                "mode",
                "shape",
                "shape.fixed",
                "shape.pair",
                "shape.pair.a",
                "shape.pair.b"
            ]
        );
        let name = find(&docs, "inner.name");
        assert!(name.required);
        assert_eq!(name.description, "Needed.");
        assert_eq!(find(&docs, "inner").type_text, "object");
        assert!(find(&docs, "items[].key").required);
        assert_eq!(find(&docs, "shape.fixed").description, "Fixed: `fixed: 1`.");
        assert_eq!(find(&docs, "shape.pair.b").description, "The second.");
        assert!(find(&docs, "shape").description.ends_with("Exactly one of `fixed`, `pair`."));
    }

    #[test]
    fn enum_options_have_their_values_and_default() {
        let docs = docs();
        let mode = find(&docs, "mode");
        assert_eq!(mode.type_text, "fast | slow");
        assert_eq!(mode.default.as_deref(), Some("fast"));
        assert_eq!(mode.description, "When to answer.");
        assert_eq!(
            mode.values,
            [("fast".to_string(), "Right away.".to_string()), ("slow".into(), "Once done.".into())]
        );
        let skew = find(&docs, "inner.skew");
        assert_eq!(skew.default.as_deref(), Some("5s"));
        assert_eq!(skew.description, "Tolerated skew.");
    }

    #[test]
    fn a_default_in_the_text_never_contradicts_the_schema() {
        let (default, text) = split_default(Some(&json!("1m")), "Idle time (default 1m).".into());
        assert_eq!((default.as_deref(), text.as_str()), (Some("1m"), "Idle time."));
        let (default, text) = split_default(Some(&json!("2m")), "Idle time (default 1m).".into());
        assert_eq!((default.as_deref(), text.as_str()), (Some("2m"), "Idle time (default 1m)."));
        let (default, text) = split_default(None, "Append (default) or truncate.".into());
        assert_eq!((default, text.as_str()), (None, "Append (default) or truncate."));
    }
}
