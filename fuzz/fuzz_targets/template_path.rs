//! Topic / subject templates (`events.{{ type }}`) and dotted field paths
//! on a fixed booking event.
#![no_main]

use std::sync::OnceLock;

use conflux_json::path::FieldPath;
use conflux_api::template::Template;
use conflux_api::{sonic_rs, Event, Payload, Value};
use libfuzzer_sys::fuzz_target;

const EVENT: &str = r#"{"type":"booking_created","timestamp":"2026-11-22T10:00:05Z",
"data":{"restaurantId":"r-1","userId":"u-1","guests":2,"zone":"bar","price":12.5,
"tags":["vip",null,true,{"x":[1,2,{"y":"z"}]}],"empty":{},"none":null,"":"blank","0":"zero"}}"#;

fn event() -> &'static Value {
    static EVENT_VALUE: OnceLock<Value> = OnceLock::new();
    EVENT_VALUE.get_or_init(|| sonic_rs::from_str(EVENT).expect("the fixed event parses"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let value = event();
    if let Ok(template) = Template::parse(text) {
        let _ = template.is_static();
        let mut event = Event::new(value.clone());
        event.meta.insert("kafka.key", "k");
        event.meta.insert("kafka.headers", value.clone());
        let parsed = template.render(&event);
        // Reading the fields from the unparsed text must find the same fields.
        // (The strings may differ where an object is inserted: a tree writes
        // its keys sorted, a text as it came.)
        let payload = Payload::from_json(EVENT.replace('\n', "").as_bytes()).expect("the fixed event is accepted");
        event.data = payload;
        let from_text = template.render(&event);
        assert_eq!(parsed.is_ok(), from_text.is_ok(), "tree and text disagree on `{text}`: {parsed:?} / {from_text:?}");
        if !parsed.as_deref().unwrap_or("").contains('{') {
            assert_eq!(parsed, from_text, "tree and text render `{text}` differently");
        }
    }
    if let Ok(path) = FieldPath::parse(text) {
        let got = path.get(value);
        // Reading the same path from the unparsed text must agree.
        let payload = Payload::from_json(EVENT.replace('\n', "").as_bytes()).expect("the fixed event is accepted");
        let looked = path.lookup(&payload);
        assert_eq!(got.is_some(), looked.is_some(), "get and lookup disagree on `{text}`");
    }
});
