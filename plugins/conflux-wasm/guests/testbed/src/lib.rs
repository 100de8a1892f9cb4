//! A guest for the stage's own tests: what it does depends on each event's
//! `op` field, so one module exercises every outcome and every way to fail.
//!
//! - no `op`: emits the event with `"via": "testbed"` added
//! - `split`: one event per element of `parts`
//! - `drop`, `fail`, `odd` (keep it on port `odd`), `keep`
//! - `trap`: panics (a wasm trap); `spin`: loops forever; `bomb`: allocates until memory runs out
//! - `init_fail` in the config refuses to start.

use conflux_wasm_guest::{export_stage, Event, Outcome, Stage};
use serde_json::Value;

#[derive(Default)]
struct Testbed;

impl Stage for Testbed {
    fn configure(&mut self, config: Value) -> Result<(), String> {
        if config.get("init_fail").is_some() {
            return Err("asked to refuse init".into());
        }
        Ok(())
    }

    fn process(&mut self, event: Event) -> Result<Outcome, String> {
        let mut doc: Value = event.json()?;
        let op = doc.get("op").and_then(Value::as_str).unwrap_or("").to_string();
        match op.as_str() {
            "" => {
                doc["via"] = Value::from("testbed");
                let mut out = event;
                out.set_json(&doc)?;
                Ok(Outcome::one(out))
            }
            "split" => {
                let parts = doc.get("parts").and_then(Value::as_array).cloned().unwrap_or_default();
                let events = parts.iter().map(Event::from_json).collect::<Result<Vec<_>, _>>()?;
                Ok(Outcome::many(events))
            }
            "drop" => Ok(Outcome::Drop),
            "fail" => Err("asked to fail".into()),
            "odd" => Ok(Outcome::KeepTo("odd".into())),
            "keep" => Ok(Outcome::Keep),
            "trap" => panic!("asked to trap"),
            "spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            other => Err(format!("unknown op `{other}`")),
        }
    }
}

export_stage!(Testbed);
