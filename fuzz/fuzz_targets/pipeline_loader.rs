//! Pipeline files: YAML parsing, `${VAR}` interpolation and the loader's
//! checks, on arbitrary text with a small fixed environment.
#![no_main]

use std::path::Path;
use std::time::{Duration, Instant};

use conflux_engine::config::{interpolate, load_str};
use libfuzzer_sys::fuzz_target;

fn env(name: &str) -> Option<String> {
    match name {
        "HOME" => Some("/home/conflux".into()),
        "RATE" => Some("50/s".into()),
        "EMPTY" => Some(String::new()),
        "SECRET" => Some("hush".into()),
        "NESTED" => Some("${RATE}".into()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let started = Instant::now();
    let _ = interpolate(text, &env);
    let _ = load_str(Path::new("/fuzz/pipeline.yaml"), text, &env);
    // Inputs are capped at a few KiB (fuzz.sh): anything slower than this is
    // a blow-up (aliases, backtracking), not honest work.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "loading {} bytes took {took:?}", text.len());
});
