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
