//! Every kind of pipeline-file mistake is reported, all at once, with line and column.

use std::path::Path;

use conflux_engine::config::{load_str, Diagnostic};
use conflux_engine::graph::compile;

use crate::setup;

fn problems(yaml: &str) -> Vec<String> {
    setup();
    let env = |name: &str| (name == "SET_VAR").then(|| "value".to_string());
    let result = load_str(Path::new("p.yaml"), yaml, &env).and_then(compile);
    match result {
        Ok(_) => Vec::new(),
        Err(diags) => diags.iter().map(Diagnostic::to_string).collect(),
    }
}

fn assert_has(problems: &[String], expected: &str) {
    assert!(problems.iter().any(|p| p.starts_with(expected)), "no problem starting with `{expected}` in {problems:#?}");
}

#[test]
fn component_level_mistakes_are_all_reported() {
    let p = problems(
        "inputs:
  a: { type: generate, count: 10, speed: 3 }
  b: { type: generat }
  c: { type: generate, count: many }
  d: { type: file }
  e: { type: file, path: \"${NOT_SET_ANYWHERE}\" }
outputs:
  o: { type: stdout, from: [a, b, c, d, e] }
",
    );
    assert_has(&p, "p.yaml:2:35: input `a`: unknown field `speed`");
    assert_has(&p, "p.yaml:3:14: unknown input type `generat` (did you mean `generate`?)");
    assert_has(&p, "p.yaml:4:31: input `c`: invalid type: a string of 4 characters");
    assert_has(&p, "p.yaml:5:3: input `d`: missing field `path`");
    assert_has(&p, "p.yaml:6:26: environment variable `NOT_SET_ANYWHERE` is not set");
}

#[test]
fn graph_mistakes_are_all_reported() {
    let p = problems(
        "inputs:
  src: { type: test_source, key: v }
stages:
  one: { type: test_split, from: [src, two] }
  two: { type: test_split, from: one.odd }
  three: { type: test_split, from: one.even }
outputs:
  out: { type: test_sink, key: v, from: [two, nowhere, out] }
",
    );
    assert_has(&p, "p.yaml:6:36: `one` has no port `even`; its ports are: odd, error");
    assert_has(&p, "p.yaml:8:47: `out` reads from `nowhere`, which is not a component of this pipeline");
    assert_has(&p, "p.yaml:8:56: `out` reads from output `out`");
}

#[test]
fn cycles_are_reported_at_the_closing_edge() {
    let p = problems(
        "inputs:
  src: { type: test_source, key: v }
stages:
  one: { type: test_split, from: [src, two] }
  two: { type: test_split, from: one }
outputs:
  out: { type: test_sink, key: v, from: two.odd }
",
    );
    assert_has(&p, "p.yaml:5:34: cycle: `two` reads from `one`, which depends on `two`");
}

#[test]
fn unused_components_and_missing_from_are_reported() {
    let p = problems(
        "inputs:
  src: { type: test_source, key: v }
  idle: { type: test_source, key: v }
outputs:
  out: { type: test_sink, key: v, from: src }
  lost: { type: test_sink, key: v }
",
    );
    assert_has(&p, "p.yaml:6:3: output `lost` has no `from`");
    let p = problems(
        "inputs:
  src: { type: test_source, key: v }
  idle: { type: test_source, key: v }
outputs:
  out: { type: test_sink, key: v, from: src }
",
    );
    assert_has(&p, "p.yaml:3:3: input `idle` is not used");
}

#[test]
fn syntax_errors_stop_with_a_position() {
    let p = problems("inputs:\n  a: { type: generate\n");
    assert_eq!(p.len(), 1);
    assert!(p[0].starts_with("p.yaml:3:1: YAML syntax error"), "{p:?}");
}

#[test]
fn set_variables_and_defaults_interpolate() {
    let p = problems(
        "inputs:
  a: { type: generate, count: \"${COUNT:-5}\", profile: \"${PROFILE:-counter}\" }
outputs:
  o: { type: file, path: \"/tmp/${SET_VAR}.ndjson\", from: a }
",
    );
    assert!(p.is_empty(), "{p:#?}");
}

/// The servers' shared options are spliced into each config (not flattened),
/// so a bad one still names its own line and column.
#[test]
fn shared_server_option_mistakes_point_at_the_option() {
    let p = problems(
        "inputs:
  h: { type: http_server, address: \"127.0.0.1:0\", queue: many, cors: { allow_origins: [x] } }
  c: { type: http_server, address: \"127.0.0.1:0\", queue: 1000, cors: { allow_origins: [x], spede: 1 } }
  w: { type: websocket_server, address: \"127.0.0.1:0\", max_message: 1KiB, tls: { cert: c.pem } }
outputs:
  o: { type: drop, from: [h, c, w] }
",
    );
    assert_has(&p, "p.yaml:2:58: input `h`: invalid type: a string of 4 characters");
    assert_has(&p, "p.yaml:3:92: input `c`: unknown field `spede`");
    assert_has(&p, "p.yaml:4:75: input `w`: missing field `key`");
}

#[test]
fn a_nats_msg_id_without_jetstream_is_refused() {
    let p = problems(
        "inputs:
  g: { type: generate, count: 1 }
outputs:
  n: { type: nats, subject: x, msg_id: \"{{ id }}\", from: g }
",
    );
    assert_has(&p, "p.yaml:4:40: output `n`: msg_id needs `jetstream: true`");
}
