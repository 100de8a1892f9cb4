//! PII masking and enrichment for booking events.
//!
//! - Replaces each configured field of `data` (default: `userId`, `email`,
//!   `phone`) with a salted 64-bit FNV-1a hash, `anon-<16 hex digits>`, so
//!   the same user still groups together but cannot be read back.
//! - Adds `data.guestBand` (`solo`, `couple`, `group`) from `data.guests`.
//!
//! Config: `{ "salt": "…", "fields": ["userId", …] }`.

use conflux_wasm_guest::{export_stage, string_text, Event, Fields, Outcome, Stage};
use serde::Deserialize;

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
    /// The pseudonym of a raw JSON value, as a JSON string: strings are
    /// hashed by their text, anything else by its JSON.
    fn pseudonym(&self, raw: &str) -> String {
        let hash = match string_text(raw) {
            Some(text) => fnv1a(self.salt.as_bytes(), text.as_bytes()),
            None => fnv1a(self.salt.as_bytes(), raw.as_bytes()),
        };
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(23);
        out.push_str("\"anon-");
        for shift in (0..16).rev() {
            out.push(char::from(HEX[(hash >> (shift * 4)) as usize & 15]));
        }
        out.push('"');
        out
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

    /// Edits `data` shallowly: one scan finds the members, only the touched
    /// ones are decoded, and the rest of the payload is copied through as it is.
    fn process(&mut self, mut event: Event) -> Result<Outcome, String> {
        let mut top = Fields::parse(&event.value)?;
        let mut data = top.object("data").ok_or("event has no `data` object")??;
        for field in &self.fields {
            let masked = match data.get(field) {
                Some(raw) if raw != "null" => self.pseudonym(raw),
                _ => continue,
            };
            data.set_raw(field, masked);
        }
        if let Some(guests) = data.get("guests").and_then(|raw| raw.parse::<u64>().ok()) {
            let band = match guests {
                0 | 1 => "\"solo\"",
                2 => "\"couple\"",
                _ => "\"group\"",
            };
            data.set_raw("guestBand", band);
        }
        let data = data.to_raw();
        top.set_raw("data", data);
        let value = top.to_vec();
        drop(top);
        event.value = value;
        Ok(Outcome::one(event))
    }
}

export_stage!(Mask);
