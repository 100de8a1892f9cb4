//! Generated artefacts stay true to the code: registry, schema, plugin reference.

use std::path::PathBuf;

use conflux_api::{Kind, Registration};

use crate::setup;

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

#[test]
fn registry_lists_every_built_in_type() {
    setup();
    let names = |kind: Kind| -> Vec<&str> {
        Registration::all().into_iter().filter(|r| r.kind == kind).map(|r| r.name).collect()
    };
    for expected in ["file", "generate", "stdin"] {
        assert!(names(Kind::Input).contains(&expected), "input `{expected}` is not registered");
    }
    assert!(names(Kind::Stage).contains(&"wasm"), "stage `wasm` is not registered");
    for expected in ["drop", "file", "stdout"] {
        assert!(names(Kind::Output).contains(&expected), "output `{expected}` is not registered");
    }
    for registration in Registration::all() {
        assert!(
            !registration.summary().is_empty(),
            "{} {} has no doc comment",
            registration.kind.as_str(),
            registration.name
        );
    }
}

/// The committed schema and reference must match the code; regenerate with
/// `scripts/generate.sh` when this fails.
#[test]
fn committed_schema_and_reference_are_current() {
    let binary = env!("CARGO_BIN_EXE_conflux");
    let schema = std::process::Command::new(binary).arg("schema").output().unwrap();
    assert!(schema.status.success());
    let committed = std::fs::read_to_string(repo_file("schemas/pipeline.schema.json")).unwrap_or_default();
    assert!(
        committed == String::from_utf8_lossy(&schema.stdout),
        "schemas/pipeline.schema.json is stale: run scripts/generate.sh"
    );
    let reference = std::process::Command::new(binary).args(["plugins", "--markdown"]).output().unwrap();
    let committed = std::fs::read_to_string(repo_file("docs/plugins.md")).unwrap_or_default();
    assert!(
        committed == String::from_utf8_lossy(&reference.stdout),
        "docs/plugins.md is stale: run scripts/generate.sh"
    );
}

#[test]
fn schema_describes_components_and_rejects_unknown_keys() {
    setup();
    let schema = conflux_engine::schema::pipeline_schema();
    assert_eq!(schema["additionalProperties"], serde_json::json!(false));
    let inputs = schema["$defs"]["input"]["oneOf"].as_array().unwrap();
    let generate = inputs.iter().find(|v| v["properties"]["type"]["const"] == "generate").expect("generate in schema");
    assert!(generate["properties"]["rate"].is_object());
    assert_eq!(generate["additionalProperties"], serde_json::json!(false));
    let outputs = schema["$defs"]["output"]["oneOf"].as_array().unwrap();
    assert!(outputs.iter().all(|o| o["properties"]["from"].is_object() && o["properties"]["retry"].is_object()));
}

/// A YAML tree as JSON, values as written: `${VAR}` stays a string, as an
/// editor validating the file against the schema sees it.
fn yaml_to_json(node: &conflux_engine::yaml::Node) -> serde_json::Value {
    use conflux_engine::yaml::Yaml;
    match &node.value {
        Yaml::Null => serde_json::Value::Null,
        Yaml::Bool(b) => (*b).into(),
        Yaml::Int(i) => (*i).into(),
        Yaml::Float(f) => serde_json::json!(f),
        Yaml::Str(s, _) => s.clone().into(),
        Yaml::Seq(items) => items.iter().map(yaml_to_json).collect(),
        Yaml::Map(entries) => entries
            .iter()
            .map(|(k, v)| (k.as_key().unwrap_or_default(), yaml_to_json(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    }
}

fn schema_validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(repo_file("schemas/pipeline.schema.json")).unwrap();
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&serde_json::from_str(&text).unwrap())
        .expect("the committed schema compiles")
}

fn schema_errors(validator: &jsonschema::Validator, yaml: &str) -> Vec<String> {
    let tree = conflux_engine::yaml::parse(yaml).expect("YAML");
    validator.iter_errors(&yaml_to_json(&tree)).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

/// The schema the project's files point their editors at accepts every
/// file the project ships (`${VAR}` in typed fields, `1 minute` durations,
/// `per_connection`), checked by a real JSON Schema validator.
#[test]
fn every_shipped_pipeline_file_validates_against_the_schema() {
    let validator = schema_validator();
    let mut files = Vec::new();
    for folder in ["configs", "tests/cases"] {
        for entry in std::fs::read_dir(repo_file(folder)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    assert!(files.len() >= 5, "{files:?}");
    for path in files {
        let errors = schema_errors(&validator, &std::fs::read_to_string(&path).unwrap());
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
    }
}

/// The same grammar as the binary: interpolations and long-form durations
/// pass, wrong types and values still fail.
#[test]
fn the_schema_takes_interpolations_and_refuses_wrong_values() {
    let validator = schema_validator();
    let pipeline = |options: &str| {
        format!("inputs:\n  api:\n    type: http_server\n    address: \"127.0.0.1:1\"\n    {options}\noutputs:\n  out: {{ type: drop, from: api }}\n")
    };
    for good in [
        "max_batch: ${BATCH:-100}",
        "queue_timeout: ${WAIT}",
        "queue_timeout: 1 minute",
        "queue_timeout: 1.5s",
        "ack: ${ACK:-sync}",
        "rate_limit: { per_connection: 5/s }",
        "rate_limit: { per_client: \"${RATE:-5/s}\" }",
        "connections: { max_connections: 10, idle_timeout: 30s }",
    ] {
        let errors = schema_errors(&validator, &pipeline(good));
        assert!(errors.is_empty(), "{good}: {errors:#?}");
    }
    for bad in ["max_batch: lots", "queue_timeout: soon", "ack: maybe", "rate_limit: { burst: 3 }"] {
        assert!(!schema_errors(&validator, &pipeline(bad)).is_empty(), "{bad} should be refused");
    }
}
