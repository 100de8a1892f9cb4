//! PII masking and enrichment for booking events.
//!
//! - Replaces each configured field of `data` (default: `userId`, `email`,
//!   `phone`) with a salted 64-bit FNV-1a hash, `anon-<16 hex digits>`, so
//!   the same user still groups together but cannot be read back.
//! - Adds `data.guestBand` (`solo`, `couple`, `group`) from `data.guests`.
//!
//! Config: `{ "salt": "…", "fields": ["userId", …] }`.

use conflux_wasm_guest::{export_stage, Event, Outcome, Stage};
use serde::Deserialize;
use serde_json::Value;

struct Mask {
    salt: String,
    fields: Vec<String>,
}

impl Default for Mask {
    fn default() -> Self {
        Mask { salt: String::new(), fields: vec!["userId".into(), "email".into(), "phone".into()] }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    salt: Option<String>,
    #[serde(default)]
    fields: Option<Vec<String>>,
}

fn fnv1a(salt: &[u8], text: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in salt.iter().chain(text) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

impl Mask {
    fn pseudonym(&self, value: &Value) -> String {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        format!("anon-{:016x}", fnv1a(self.salt.as_bytes(), text.as_bytes()))
    }
}

impl Stage for Mask {
    fn configure(&mut self, config: serde_json::Value) -> Result<(), String> {
        if !config.is_null() {
            let config: Config = serde_json::from_value(config).map_err(|e| format!("mask config: {e}"))?;
            if let Some(salt) = config.salt {
                self.salt = salt;
            }
            if let Some(fields) = config.fields {
                self.fields = fields;
            }
        }
        Ok(())
    }

    fn process(&mut self, mut event: Event) -> Result<Outcome, String> {
        let mut doc: Value = event.json()?;
        let data = doc.get_mut("data").and_then(Value::as_object_mut).ok_or("event has no `data` object")?;
        for field in &self.fields {
            if let Some(value) = data.get_mut(field.as_str()) {
                if !value.is_null() {
                    *value = Value::String(self.pseudonym(value));
                }
            }
        }
        if let Some(guests) = data.get("guests").and_then(Value::as_u64) {
            let band = match guests {
                0 | 1 => "solo",
                2 => "couple",
                _ => "group",
            };
            data.insert("guestBand".into(), Value::from(band));
        }
        event.set_json(&doc)?;
        Ok(Outcome::one(event))
    }
}

export_stage!(Mask);
