//! PII masking and enrichment for booking events.
//!
//! - Replaces each configured field of `data` (default: `userId`, `email`,
//!   `phone`) with a salted 64-bit FNV-1a hash, `anon-<16 hex digits>`, so
//!   the same user still groups together but cannot be read back.
//! - Adds `data.guestBand` (`solo`, `couple`, `group`) from `data.guests`.
//!
//! Config: `{ "salt": "…", "fields": ["userId", …] }`.

use conflux_wasm_guest::{export_stage, string_text, Event, Outcome, Paths, Stage};
use serde::Deserialize;

struct Mask {
    salt: String,
    /// `data`, `data.guests`, `data.guestBand` and `data.<field>` for each masked field.
    paths: Paths,
    /// The numbers of the masked fields' paths.
    masked: Vec<usize>,
}

/// The numbers of the fixed paths in [`Mask::paths`].
const DATA: usize = 0;
const GUESTS: usize = 1;
const BAND: usize = 2;

impl Mask {
    fn new(salt: String, fields: &[String]) -> Mask {
        let mut paths = Paths::new([&["data"][..], &["data", "guests"], &["data", "guestBand"]]);
        let masked = fields.iter().map(|field| paths.add(&["data", field.as_str()])).collect();
        Mask { salt, paths, masked }
    }
}

impl Default for Mask {
    fn default() -> Self {
        Mask::new(String::new(), &["userId".into(), "email".into(), "phone".into()])
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
            let defaults = ["userId", "email", "phone"].map(String::from).to_vec();
            *self = Mask::new(config.salt.unwrap_or_default(), &config.fields.unwrap_or(defaults));
        }
        Ok(())
    }

    /// One scan finds `data` and the members it touches; the output is the
    /// input with those values replaced (and `guestBand` added), every other
    /// byte copied through.
    fn process(&mut self, mut event: Event) -> Result<Outcome, String> {
        let mut found = self.paths.find(&event.value)?;
        if !found.get(DATA).is_some_and(|raw| raw.starts_with('{')) {
            return Err("event has no `data` object".into());
        }
        for &path in &self.masked {
            let masked = match found.get(path) {
                Some(raw) if raw != "null" => self.pseudonym(raw),
                _ => continue,
            };
            found.set_raw(path, masked)?;
        }
        if let Some(guests) = found.get(GUESTS).and_then(|raw| raw.parse::<u64>().ok()) {
            let band = match guests {
                0 | 1 => "\"solo\"",
                2 => "\"couple\"",
                _ => "\"group\"",
            };
            found.set_raw(BAND, band)?;
        }
        let value = found.to_vec();
        drop(found);
        event.value = value;
        Ok(Outcome::one(event))
    }
}

export_stage!(Mask);
