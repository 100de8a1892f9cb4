//! `validate` stage: checks each event against a JSON Schema (draft 2020-12)
//! loaded from a file. Valid events go on; invalid ones go to the `invalid`
//! port carrying every violation, so nothing bad passes and nothing is lost.
//!
//! [`EventSchema`] is public so inputs (`http_server`, `websocket_server`)
//! can refuse invalid events at the door with the same rules.

use std::path::{Path, PathBuf};

use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, BuiltStage, Emitter, PortId, Registration, Stage,
    StageConfig, Value,
};
use schemars::JsonSchema;
use serde::Deserialize;

/// Metadata key holding the list of violations of an invalid event.
pub const VIOLATIONS_META: &str = "violations";

/// Why a schema file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schema: {0}")]
    Read(conflux_api::files::ReadError),
    #[error("schema {path} is not JSON: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("schema {path} is not a valid JSON Schema: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// One way an event breaks its schema.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    /// JSON Pointer into the event (`/data/guests`); empty for the event itself.
    pub path: String,
    /// What is wrong, in the validator's words.
    pub reason: String,
}

/// A compiled event schema, cheap to share between threads.
pub struct EventSchema {
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for EventSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSchema")
    }
}

impl EventSchema {
    /// Loads and compiles a schema file; draft 2020-12 unless the file's `$schema` says otherwise.
    pub fn load(path: &Path) -> Result<Self, SchemaError> {
        let text = conflux_api::files::read_config_text(path, conflux_api::files::CONFIG_FILE_LIMIT)
            .map_err(SchemaError::Read)?;
        let schema: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| SchemaError::Parse { path: path.into(), source })?;
        Self::compile(&schema).map_err(|reason| SchemaError::Invalid { path: path.into(), reason })
    }

    /// Compiles a schema value.
    pub fn compile(schema: &serde_json::Value) -> Result<Self, String> {
        let explicit = schema.get("$schema").is_some();
        let mut options = jsonschema::options();
        if !explicit {
            options = options.with_draft(jsonschema::Draft::Draft202012);
        }
        let validator = options.build(schema).map_err(|e| e.to_string())?;
        Ok(EventSchema { validator })
    }

    /// Every violation of `data`, empty when it is valid.
    pub fn violations(&self, data: &Value) -> Vec<Violation> {
        // The validator works on serde_json values; events are sonic-rs values.
        let instance = match serde_json::to_value(data) {
            Ok(v) => v,
            Err(e) => {
                return vec![Violation { path: String::new(), reason: format!("not representable as JSON: {e}") }]
            }
        };
        self.violations_json(&instance)
    }

    /// Every violation of a serde_json value.
    pub fn violations_json(&self, instance: &serde_json::Value) -> Vec<Violation> {
        if self.validator.is_valid(instance) {
            return Vec::new();
        }
        self.validator
            .iter_errors(instance)
            .map(|e| Violation { path: e.instance_path().to_string(), reason: e.to_string() })
            .collect()
    }
}

/// The violations as a metadata value: `[{"path": "/data/guests", "reason": "…"}]`.
pub fn violations_value(violations: &[Violation]) -> Value {
    let text = serde_json::to_string(violations).unwrap_or_else(|_| "[]".into());
    conflux_api::sonic_rs::from_str(&text).unwrap_or_default()
}

/// Checks each event against a JSON Schema (draft 2020-12) read from a file.
///
/// Valid events go on unchanged. Invalid ones go to the `invalid` port with
/// every violation in metadata `violations` (`[{path, reason}]`, path as a
/// JSON Pointer); `conflux_events_sent_total{port="invalid"}` counts them.
/// Left unwired, the `invalid` port's events are counted, logged and
/// rejected back to their source, never dropped silently.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateConfig {
    /// Schema file, relative to the pipeline file.
    pub schema: PathBuf,
}

impl StageConfig for ValidateConfig {
    const TYPE: &'static str = "validate";
    fn build(self, cx: &BuildContext) -> Result<BuiltStage, BuildError> {
        let schema =
            EventSchema::load(&cx.resolve(&self.schema)).map_err(|e| BuildError::at(["schema"], e.to_string()))?;
        Ok(BuiltStage::new(Validate { schema }).with_ports(["invalid"]))
    }
}

inventory::submit!(Registration::stage::<ValidateConfig>());

struct Validate {
    schema: EventSchema,
}

const INVALID: PortId = PortId(1);

#[async_trait]
impl Stage for Validate {
    async fn process(&mut self, batch: Batch, out: &mut Emitter) {
        for mut event in batch {
            let violations = self.schema.violations(&event.data);
            if violations.is_empty() {
                out.emit(event);
            } else {
                event.meta.insert(VIOLATIONS_META, violations_value(&violations));
                out.emit_to(INVALID, event);
            }
        }
    }
}

/// Call from the binary so the linker keeps this crate's registrations.
pub fn link() {}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_api::Event;

    fn schema() -> EventSchema {
        EventSchema::compile(&serde_json::json!({
            "type": "object",
            "required": ["type", "data"],
            "properties": {
                "type": { "type": "string" },
                "data": { "type": "object", "properties": { "guests": { "type": "integer", "minimum": 1 } } }
            }
        }))
        .unwrap()
    }

    fn event(text: &str) -> Event {
        Event::new(conflux_api::sonic_rs::from_str(text).unwrap())
    }

    #[tokio::test]
    async fn routes_invalid_events_with_every_violation() {
        let mut stage = Validate { schema: schema() };
        let mut out = Emitter::new(1);
        stage
            .process(
                vec![event(r#"{"type":"a","data":{"guests":2}}"#), event(r#"{"type":3,"data":{"guests":0}}"#)],
                &mut out,
            )
            .await;
        let ports: Vec<(usize, Batch)> = out.drain().collect();
        assert_eq!(ports.len(), 2);
        assert_eq!(ports[0].0, 0);
        assert_eq!(ports[1].0, 1);
        let bad = &ports[1].1[0];
        let violations: serde_json::Value = serde_json::to_value(bad.meta.get(VIOLATIONS_META).unwrap()).unwrap();
        let paths: Vec<&str> = violations.as_array().unwrap().iter().map(|v| v["path"].as_str().unwrap()).collect();
        assert_eq!(paths.len(), 2, "{violations}");
        assert!(paths.contains(&"/type") && paths.contains(&"/data/guests"), "{violations}");
    }

    #[test]
    fn refuses_a_broken_schema_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        std::fs::write(&path, r#"{"type": 12}"#).unwrap();
        assert!(matches!(EventSchema::load(&path), Err(SchemaError::Invalid { .. })));
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(EventSchema::load(&path), Err(SchemaError::Parse { .. })));
    }
}
