//! Events to WIT records and outcomes back to routed events.

use conflux_api::sonic_rs::{self, JsonValueTrait};
use conflux_api::{Batch, Emitter, Event, Payload, PortId, Timestamp, Value};

use crate::sandbox::{Outcome, Record};

/// Metadata entry that carries the record's `key`.
pub const KEY_META: &str = "key";

/// One record per event: the payload as JSON bytes, copied from the text it
/// was parsed from when it is unchanged, serialized otherwise.
pub fn to_records(batch: &Batch) -> Vec<Record> {
    batch.iter().map(to_record).collect()
}

fn to_record(event: &Event) -> Record {
    let mut value = Vec::new();
    event.data.write_json(&mut value);
    let mut key = None;
    let mut metadata = Vec::with_capacity(event.meta.len());
    for (name, value) in event.meta.iter() {
        if name == KEY_META {
            if let Some(text) = value.as_str() {
                key = Some(text.to_string());
                continue;
            }
        }
        metadata.push((name.to_string(), sonic_rs::to_string(value).unwrap_or_else(|_| "null".into())));
    }
    Record { key, value, metadata, timestamp: event.event_time.map(|t| t.0) }
}

/// Routes every event by its outcome. `port_of` maps a guest's port name to a declared port.
pub fn route(batch: Batch, outcomes: Vec<Outcome>, out: &mut Emitter, port_of: impl Fn(&str) -> Option<PortId>) {
    for (event, outcome) in batch.into_iter().zip(outcomes) {
        match outcome {
            Outcome::Keep => out.emit(event),
            Outcome::KeepTo(port) => match port_of(&port) {
                Some(id) => out.emit_to(id, event),
                None => out.fail(event, format_args!("wasm guest sent the event to undeclared port `{port}`")),
            },
            Outcome::Drop => drop(event),
            Outcome::Fail(reason) => out.fail(event, reason),
            Outcome::Emit(emitted) => {
                // Check every emitted event first: one bad one fails the input whole,
                // so a split is never half delivered.
                let mut derived = Vec::with_capacity(emitted.len());
                let mut problem = None;
                for item in emitted {
                    let port = match item.port.as_deref() {
                        None => PortId::DEFAULT,
                        Some(name) => match port_of(name) {
                            Some(id) => id,
                            None => {
                                problem = Some(format!("wasm guest sent an event to undeclared port `{name}`"));
                                break;
                            }
                        },
                    };
                    match from_record(&event, item.event) {
                        Ok(e) => derived.push((port, e)),
                        Err(reason) => {
                            problem = Some(reason);
                            break;
                        }
                    }
                }
                match problem {
                    Some(reason) => out.fail(event, reason),
                    None => {
                        for (port, e) in derived {
                            if port == PortId::DEFAULT {
                                out.emit(e);
                            } else {
                                out.emit_to(port, e);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A new event from a guest's record. It keeps the source event's
/// acknowledgement, ingest time and metadata; the record's metadata entries,
/// key and timestamp are laid over them, so a split made from scratch still
/// carries where its source came from.
fn from_record(source: &Event, record: Record) -> Result<Event, String> {
    // Checked and kept as text (no tree, no copy), as the inputs do.
    let data = Payload::from_json_bytes(record.value.into())
        .map_err(|e| format!("wasm guest emitted a payload that is not JSON: {e}"))?;
    let mut event = source.derive(data);
    for (name, text) in record.metadata {
        let value = sonic_rs::from_str::<Value>(&text).unwrap_or_else(|_| Value::from(text.as_str()));
        event.meta.insert(name, value);
    }
    if let Some(key) = record.key {
        event.meta.insert(KEY_META, key.as_str());
    }
    if let Some(nanos) = record.timestamp {
        event.event_time = Some(Timestamp(nanos));
    }
    Ok(event)
}
