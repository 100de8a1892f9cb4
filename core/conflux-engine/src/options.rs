//! Options the engine handles for every output, declared once: the loader
//! reads them out of each output's mapping, and the JSON Schema, `conflux
//! plugins` and docs/plugins.md are generated from this type.

use conflux_api::config::{ByteSize, Duration};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::RetryConfig;

/// Options every output takes besides its own.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutputOptions {
    /// How a failed write (or connect) is retried.
    pub retry: RetryConfig,
    /// How the engine gathers events into write batches. Without it each
    /// batch is written as it comes from upstream.
    pub batch: Option<BatchConfig>,
    /// Writes allowed at once. Above 1, batches may be written out of
    /// order; each event is still acknowledged only once it is written.
    pub max_in_flight: usize,
}

impl Default for OutputOptions {
    fn default() -> Self {
        OutputOptions { retry: RetryConfig::default(), batch: None, max_in_flight: 1 }
    }
}

impl OutputOptions {
    /// The option names, as they appear in an output's mapping.
    pub const KEYS: [&'static str; 3] = ["retry", "batch", "max_in_flight"];

    /// Problems the types cannot express, as (option path, message).
    pub fn check(&self) -> Result<(), (Vec<&'static str>, String)> {
        if self.max_in_flight == 0 {
            return Err((vec!["max_in_flight"], "must be at least 1".into()));
        }
        if let Some(batch) = &self.batch {
            if batch.max_events == Some(0) {
                return Err((vec!["batch", "max_events"], "must be at least 1".into()));
            }
            if batch.max_bytes.is_some_and(|b| b.0 == 0) {
                return Err((vec!["batch", "max_bytes"], "must be more than 0 bytes".into()));
            }
        }
        Ok(())
    }
}

/// When a write batch is complete: at `max_events` events, at `max_bytes`
/// of payload, or `linger` after its first event, whichever comes first.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Most events in one write (default 1000).
    pub max_events: Option<usize>,
    /// Most payload bytes in one write (JSON text); a single larger event is written alone.
    pub max_bytes: Option<ByteSize>,
    /// Longest wait for a batch to fill after its first event. Without it a
    /// batch is written as soon as nothing more is waiting upstream.
    pub linger: Option<Duration>,
}

impl BatchConfig {
    pub const DEFAULT_MAX_EVENTS: usize = 1000;

    pub fn max_events(&self) -> usize {
        self.max_events.unwrap_or(Self::DEFAULT_MAX_EVENTS)
    }
}

/// The schema of `from`, which every stage and output takes.
pub fn from_schema() -> serde_json::Value {
    serde_json::json!({
        "description": "Components this one reads from: `name`, `name.port` (an output's refused events: `name.error`), or a list of them.",
        "oneOf": [
            { "type": "string" },
            { "type": "array", "items": { "type": "string" }, "minItems": 1 }
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_the_fields() {
        let value = serde_json::to_value(OutputOptions::default()).expect("serializes");
        let mut fields: Vec<&str> = value.as_object().expect("object").keys().map(String::as_str).collect();
        fields.sort_unstable();
        let mut keys = OutputOptions::KEYS.to_vec();
        keys.sort_unstable();
        assert_eq!(fields, keys);
    }

    #[test]
    fn zero_limits_are_refused() {
        let options = OutputOptions { max_in_flight: 0, ..Default::default() };
        assert_eq!(options.check().unwrap_err().0, vec!["max_in_flight"]);
        let options = OutputOptions {
            batch: Some(BatchConfig { max_events: Some(0), ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(options.check().unwrap_err().0, vec!["batch", "max_events"]);
    }
}
