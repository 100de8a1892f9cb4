//! The JSON Schema of a whole pipeline file and the plugin reference, both
//! generated from the registered config types so they cannot drift.

use conflux_api::{Kind, Registration};
use schemars::generate::SchemaSettings;
use schemars::Schema;
use serde_json::{json, Map, Value};

use crate::config::{AdminConfig, RetryConfig, RuntimeConfig, TestSpec};

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
    let from = json!({
        "description": "Components this one reads from: `name` or `name.port`.",
        "oneOf": [
            { "type": "string" },
            { "type": "array", "items": { "type": "string" }, "minItems": 1 }
        ]
    });
    let retry = generator.subschema_for::<RetryConfig>().to_value();
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
            props.insert("retry".into(), retry.clone());
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
    let runtime = generator.subschema_for::<RuntimeConfig>().to_value();
    let tests = generator.subschema_for::<Vec<TestSpec>>().to_value();
    let mut defs = generator.take_definitions(true);
    let [inputs, stages, outputs] = variants;
    defs.insert("input".into(), json!({ "oneOf": inputs }));
    defs.insert("stage".into(), json!({ "oneOf": stages }));
    defs.insert("output".into(), json!({ "oneOf": outputs }));
    let section =
        |kind: &str| json!({ "type": "object", "additionalProperties": { "$ref": format!("#/$defs/{kind}") } });
    json!({
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
            "runtime": runtime,
            "inputs": section("input"),
            "stages": section("stage"),
            "outputs": section("output"),
            "tests": tests,
        },
        "$defs": defs,
    })
}

/// One option of a component, for the reference.
pub struct OptionDoc {
    pub name: String,
    pub type_text: String,
    pub required: bool,
    pub default: Option<String>,
    pub description: String,
}

/// Options of a registered type, resolved from its schema.
pub fn options(registration: &Registration) -> Vec<OptionDoc> {
    let schema = registration.options_schema().to_value();
    let defs = schema.get("$defs").cloned().unwrap_or(json!({}));
    let required: Vec<&str> = schema
        .get("required")
        .and_then(|r| r.as_array())
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let mut docs = Vec::new();
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (name, prop) in props {
            let resolved = resolve(prop, &defs);
            let description = prop
                .get("description")
                .or_else(|| resolved.get("description"))
                .and_then(|d| d.as_str())
                .unwrap_or("")
                .replace('\n', " ");
            docs.push(OptionDoc {
                name: name.clone(),
                type_text: type_text(prop, &defs),
                required: required.contains(&name.as_str()),
                default: prop.get("default").filter(|d| !d.is_null()).map(|d| d.to_string()),
                description,
            });
        }
    }
    docs
}

fn resolve<'a>(schema: &'a Value, defs: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(|r| r.as_str()).and_then(|r| r.strip_prefix("#/$defs/")) {
        Some(name) => defs.get(name).unwrap_or(schema),
        None => schema,
    }
}

fn type_text(schema: &Value, defs: &Value) -> String {
    let schema = resolve(schema, defs);
    if let Some(values) = schema.get("enum").and_then(|e| e.as_array()) {
        return values.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(" | ");
    }
    if let Some(variants) = schema.get("oneOf").or_else(|| schema.get("anyOf")).and_then(|v| v.as_array()) {
        let parts: Vec<String> = variants
            .iter()
            .map(|v| match v.get("const").and_then(|c| c.as_str()) {
                Some(c) => c.to_string(),
                None => type_text(v, defs),
            })
            .filter(|t| t != "null")
            .collect();
        return parts.join(" | ");
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
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => {
            ts.iter().filter_map(|t| t.as_str()).filter(|t| *t != "null").collect::<Vec<_>>().join(" | ")
        }
        _ => "any".into(),
    }
}

/// The plugin reference as Markdown (`docs/plugins.md`).
pub fn plugins_markdown() -> String {
    let mut out = String::from(
        "# Component reference\n\nGenerated by `conflux plugins --markdown` from the config types; do not edit by hand.\n\
         Every stage and output also takes `from` (a name, `name.port`, or a list of them); every output takes `retry`\n\
         (`initial_backoff`, `max_backoff`, `max_attempts`).\n",
    );
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
            out.push_str("\n| option | type | required | default | description |\n|---|---|---|---|---|\n");
            for o in opts {
                out.push_str(&format!(
                    "| `{}` | {} | {} | {} | {} |\n",
                    o.name,
                    o.type_text.replace('|', "\\|"),
                    if o.required { "yes" } else { "" },
                    o.default.map(|d| format!("`{d}`")).unwrap_or_default(),
                    o.description.replace('|', "\\|"),
                ));
            }
        }
    }
    out
}
