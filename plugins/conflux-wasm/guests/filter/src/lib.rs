//! Keeps events whose `type` is one of the configured types and drops the
//! rest; events with no string `type` go to the `error` port.
//!
//! Config: `{ "types": ["booking_created", …] }` (default: `booking_created`).

use conflux_wasm_guest::{export_stage, Event, Fields, Outcome, Stage};
use serde::Deserialize;

struct Filter {
    types: Vec<String>,
}

impl Default for Filter {
    fn default() -> Self {
        Filter { types: vec!["booking_created".into()] }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    types: Vec<String>,
}

impl Stage for Filter {
    fn configure(&mut self, config: serde_json::Value) -> Result<(), String> {
        if !config.is_null() {
            let config: Config = serde_json::from_value(config).map_err(|e| format!("filter config: {e}"))?;
            self.types = config.types;
        }
        Ok(())
    }

    fn process(&mut self, event: Event) -> Result<Outcome, String> {
        // One scan for the members; only `type` is decoded.
        let top = Fields::parse(&event.value)?;
        let kind = top.get_str("type").ok_or("event has no string `type`")?;
        Ok(if self.types.iter().any(|t| *t == kind) { Outcome::Keep } else { Outcome::Drop })
    }
}

export_stage!(Filter);
