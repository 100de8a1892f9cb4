//! A guest for the stage's sandbox tests: it tries what the sandbox should
//! refuse and reports what happened instead of failing, so the host can
//! check the guest's own view. Each event's `op` field picks the probe:
//!
//! - `read` (`path`): reads a file; answers `{"ok":true,"text":…}` or `{"ok":false,"error":…}`
//! - `write` (`path`, `text`): writes a file, same answer
//! - `connect` (`addr`, such as `127.0.0.1:8080`): opens a TCP connection, same answer
//! - `count`: `{"events":n}`, the events this instance has seen so far, this
//!   one included (state kept in the guest shows whether instances are reused)
//! - `trap`: panics

use conflux_wasm_guest::{export_stage, Event, Outcome, Stage};
use serde_json::{json, Value};

#[derive(Default)]
struct Probe {
    /// Events this instance processed.
    events: u64,
}

fn answer<T: std::fmt::Debug>(result: Result<T, std::io::Error>, ok: impl FnOnce(T) -> Value) -> Value {
    match result {
        Ok(value) => ok(value),
        Err(e) => json!({ "ok": false, "error": e.to_string(), "kind": format!("{:?}", e.kind()) }),
    }
}

fn text<'a>(doc: &'a Value, field: &str) -> Result<&'a str, String> {
    doc.get(field).and_then(Value::as_str).ok_or_else(|| format!("no string `{field}`"))
}

impl Stage for Probe {
    fn process(&mut self, event: Event) -> Result<Outcome, String> {
        self.events += 1;
        let doc: Value = event.json()?;
        let op = doc.get("op").and_then(Value::as_str).unwrap_or("");
        let report = match op {
            "read" => answer(std::fs::read_to_string(text(&doc, "path")?), |t| json!({ "ok": true, "text": t })),
            "write" => answer(std::fs::write(text(&doc, "path")?, text(&doc, "text")?), |_| json!({ "ok": true })),
            "connect" => answer(std::net::TcpStream::connect(text(&doc, "addr")?), |_| json!({ "ok": true })),
            "count" => json!({ "events": self.events }),
            "trap" => panic!("asked to trap"),
            other => return Err(format!("unknown op `{other}`")),
        };
        Ok(Outcome::one(Event::from_json(&report)?))
    }
}

export_stage!(Probe);
