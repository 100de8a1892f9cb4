//! Differential check of the fast JSON scanner against sonic-rs, plus the
//! paths every input line takes (`Payload::from_json`, `json_guard::check`).
#![no_main]

use conflux_api::{sonic_rs, Payload, Value};
use conflux_json::{check as json_check, guard as json_guard};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // One-sided: `true` promises that sonic-rs builds a tree of the text.
    if json_check::is_valid(data) {
        if let Err(e) = sonic_rs::from_slice::<Value>(data) {
            panic!("json_check::is_valid said true but sonic-rs refused: {e}");
        }
    }

    let guard = json_guard::check(data);
    if let Ok(payload) = Payload::from_json(data) {
        // Nothing the input paths accept may get past the guard's limits.
        if let Err(refusal) = guard {
            panic!("Payload::from_json accepted what json_guard::check refuses: {refusal}");
        }
        // A kept text must parse when someone reads the value (a text that
        // does not parse silently becomes null).
        if let Some(raw) = payload.raw_json() {
            if let Err(e) = sonic_rs::from_slice::<Value>(raw) {
                panic!("Payload::from_json kept a text that does not parse as a Value: {e}");
            }
        }
        let _ = payload.field(&["data", "restaurantId"]);
        let _ = payload.into_value();
    }
});
