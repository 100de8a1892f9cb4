//! HTTP / WebSocket body decoding: one object, an array of objects, NDJSON.
#![no_main]

use conflux_api::sonic_rs::JsonValueTrait;
use conflux_http::body::{parse, Format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for format in [Format::Json, Format::Ndjson] {
        match parse(format, data) {
            Ok(events) => {
                assert!(!events.is_empty(), "{format:?}: accepted a body with no events");
                for (i, event) in events.iter().enumerate() {
                    assert!(event.is_object(), "{format:?}: event {i} is not a JSON object");
                }
            }
            Err(bad) => {
                assert!(!bad.reason.is_empty(), "{format:?}: refused without a reason");
            }
        }
    }
});
