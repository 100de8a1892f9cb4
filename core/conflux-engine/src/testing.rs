//! `conflux test`: pipeline unit tests declared beside the pipeline.
//!
//! Each test rebuilds the pipeline with its inputs replaced by the test's
//! events and its outputs replaced by collectors (no connection is opened),
//! taps every component named in an expectation, runs it to the end, and
//! compares payloads.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use conflux_api::{async_trait, Batch, Emitter, Event, Input, Kind, Output, PluginError, Timestamp, Value};

use crate::config::{Diagnostic, PipelineSpec, TestExpectation, TestSpec};
use crate::graph::{compile, Body, GraphNode, Pipeline};
use crate::runtime::{run, RunContext};

/// The result of one test.
#[derive(Debug, Clone)]
pub struct TestOutcome {
    pub name: String,
    /// Empty when the test passed.
    pub failures: Vec<String>,
}

impl TestOutcome {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Type name of the nodes a test adds (feeds and taps).
const TEST_NODE: &str = "test";

/// Longest a single test may run.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs every test of a pipeline. Errors are problems with the file itself.
pub async fn run_tests(spec: &PipelineSpec) -> Result<Vec<TestOutcome>, Vec<Diagnostic>> {
    compile(spec.clone())?;
    let mut outcomes = Vec::new();
    for test in &spec.tests {
        // Each test keeps its state (checkpoints) in a folder of its own,
        // never in the pipeline's: a test must not read or overwrite what a
        // running pipeline saved, nor what an earlier test left.
        let state = tempfile::tempdir().map_err(|e| {
            // Line 0: about the run, not a place in the file.
            vec![spec.diag(Default::default(), format!("cannot create a folder for the test's state: {e}"))]
        })?;
        let mut isolated = spec.clone();
        isolated.runtime.data_dir = state.path().display().to_string();
        let pipeline = compile(isolated)?;
        let failures = match run_one(pipeline, test).await {
            Ok(failures) => failures,
            Err(message) => vec![message],
        };
        outcomes.push(TestOutcome { name: test.name.clone(), failures });
    }
    Ok(outcomes)
}

type Collected = Arc<Mutex<Vec<serde_json::Value>>>;

async fn run_one(mut pipeline: Pipeline, test: &TestSpec) -> Result<Vec<String>, String> {
    for feed in &test.input {
        let idx = pipeline
            .index_of(&feed.at)
            .ok_or_else(|| format!("input.at: `{}` is not a component of this pipeline", feed.at))?;
        let events = to_events(&feed.events)?;
        match pipeline.nodes[idx].kind {
            Kind::Input => {
                if let Body::Input(existing) = &mut pipeline.nodes[idx].body {
                    *existing = Box::new(MemoryInput { events: Some(events) });
                }
            }
            Kind::Stage => {
                let feed_idx = pipeline.nodes.len();
                pipeline.nodes.push(GraphNode {
                    name: format!("test feed for {}", feed.at),
                    kind: Kind::Input,
                    type_name: TEST_NODE.into(),
                    ports: vec![String::new(), "error".into()],
                    from: Vec::new(),
                    output: Default::default(),
                    body: Body::Input(Box::new(MemoryInput { events: Some(events) })),
                    counters: Vec::new(),
                    health: Default::default(),
                });
                pipeline.nodes[idx].from.push((feed_idx, 0));
            }
            Kind::Output => return Err(format!("input.at: `{}` is an output; feed an input or a stage", feed.at)),
        }
    }
    // Inputs without test events produce nothing; outputs only collect.
    let fed: Vec<&str> = test.input.iter().map(|f| f.at.as_str()).collect();
    let mut collectors: Vec<(String, Collected)> = Vec::new();
    for node in pipeline.nodes.iter_mut() {
        match &mut node.body {
            Body::Input(input) if node.type_name != TEST_NODE && !fed.contains(&node.name.as_str()) => {
                *input = Box::new(MemoryInput { events: Some(Vec::new()) })
            }
            Body::Output(output) => {
                let collected = Collected::default();
                *output = Box::new(Collector(collected.clone()));
                collectors.push((node.name.clone(), collected));
            }
            _ => {}
        }
    }
    let mut taps: Vec<(&TestExpectation, Collected)> = Vec::new();
    for expectation in &test.expect {
        let at = expectation.at.as_str();
        let existing = collectors.iter().find(|(name, _)| name == at).map(|(_, c)| c.clone());
        let collected = match existing {
            Some(c) => c,
            None => {
                let (node, port) = pipeline.resolve(at).map_err(|e| format!("expect.at: {e}"))?;
                let collected = Collected::default();
                pipeline.nodes.push(GraphNode {
                    name: format!("test tap on {at}"),
                    kind: Kind::Output,
                    type_name: TEST_NODE.into(),
                    ports: vec![String::new(), "error".into()],
                    from: vec![(node, port)],
                    output: Default::default(),
                    body: Body::Output(Box::new(Collector(collected.clone()))),
                    counters: Vec::new(),
                    health: Default::default(),
                });
                collected
            }
        };
        taps.push((expectation, collected));
    }

    let report = tokio::time::timeout(TEST_TIMEOUT, run(pipeline, RunContext::new()))
        .await
        .map_err(|_| format!("the pipeline did not finish within {TEST_TIMEOUT:?}"))?;
    let mut failures = Vec::new();
    if report.failed {
        failures.push("a component failed while the test ran (see the log)".to_string());
    }
    for (expectation, collected) in taps {
        let actual = collected.lock().expect("collector lock").clone();
        failures.extend(check(expectation, &actual));
    }
    Ok(failures)
}

fn to_events(values: &[serde_json::Value]) -> Result<Vec<Event>, String> {
    let now = Timestamp::now();
    values
        .iter()
        .map(|v| {
            conflux_api::sonic_rs::from_str::<Value>(&v.to_string())
                .map(|data| Event::with_time(data, now))
                .map_err(|e| format!("test event is not valid JSON: {e}"))
        })
        .collect()
}

/// Compares what arrived with one expectation; returns readable failures.
pub fn check(expectation: &TestExpectation, actual: &[serde_json::Value]) -> Vec<String> {
    let at = &expectation.at;
    let mut failures = Vec::new();
    if let Some(count) = expectation.count {
        if actual.len() != count {
            failures.push(format!("at `{at}`: expected {count} events, got {}", actual.len()));
        }
    }
    if let Some(expected) = &expectation.events {
        let same = expected.len() == actual.len() && expected.iter().zip(actual).all(|(e, a)| matches(e, a, false));
        if !same {
            failures.push(format!("at `{at}`: events differ (- expected, + actual)\n{}", diff(expected, actual)));
        }
    }
    if let Some(wanted) = &expectation.contains {
        for w in wanted {
            if !actual.iter().any(|a| matches(w, a, true)) {
                failures.push(format!(
                    "at `{at}`: no event contains {}\n  got {} events:\n{}",
                    w,
                    actual.len(),
                    actual.iter().take(10).map(|a| format!("    {a}")).collect::<Vec<_>>().join("\n")
                ));
            }
        }
    }
    failures
}

/// Equality on payloads (numbers compare by value); with `subset`, objects in
/// `actual` may have more fields than `expected`.
pub fn matches(expected: &serde_json::Value, actual: &serde_json::Value, subset: bool) -> bool {
    use serde_json::Value as J;
    match (expected, actual) {
        (J::Number(a), J::Number(b)) => a.as_f64() == b.as_f64(),
        (J::Object(e), J::Object(a)) => {
            (subset || e.len() == a.len()) && e.iter().all(|(k, v)| a.get(k).is_some_and(|av| matches(v, av, subset)))
        }
        (J::Array(e), J::Array(a)) => e.len() == a.len() && e.iter().zip(a).all(|(x, y)| matches(x, y, subset)),
        _ => expected == actual,
    }
}

fn diff(expected: &[serde_json::Value], actual: &[serde_json::Value]) -> String {
    let render = |v: &[serde_json::Value]| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    let (e, a) = (render(expected), render(actual));
    similar::TextDiff::from_lines(&e, &a)
        .iter_all_changes()
        .map(|c| {
            let sign = match c.tag() {
                similar::ChangeTag::Delete => "-",
                similar::ChangeTag::Insert => "+",
                similar::ChangeTag::Equal => " ",
            };
            format!("    {sign} {}", c.value().trim_end())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Emits its events once, then ends.
struct MemoryInput {
    events: Option<Vec<Event>>,
}

#[async_trait]
impl Input for MemoryInput {
    async fn read(&mut self, out: &mut Emitter) -> Result<bool, PluginError> {
        if let Some(events) = self.events.take() {
            out.emit_batch(events);
        }
        Ok(false)
    }
}

/// Keeps every payload it receives.
struct Collector(Collected);

#[async_trait]
impl Output for Collector {
    async fn write(&self, batch: &Batch) -> Result<(), PluginError> {
        let mut seen = self.0.lock().expect("collector lock");
        for event in batch {
            let json =
                serde_json::to_value(&event.data).map_err(|e| PluginError::fatal_from("payload is not JSON", e))?;
            seen.push(json);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subset_and_numeric_matching() {
        assert!(matches(&json!({"a": 1}), &json!({"a": 1.0, "b": 2}), true));
        assert!(!matches(&json!({"a": 1}), &json!({"a": 1, "b": 2}), false));
        assert!(!matches(&json!({"a": [1, 2]}), &json!({"a": [1]}), true));
    }

    #[test]
    fn failures_are_readable() {
        let expectation =
            TestExpectation { at: "out".into(), events: Some(vec![json!({"n": 1})]), contains: None, count: Some(2) };
        let failures = check(&expectation, &[json!({"n": 2})]);
        assert_eq!(failures.len(), 2);
        assert!(failures[0].contains("expected 2 events, got 1"));
        assert!(failures[1].contains("-     \"n\": 1") && failures[1].contains("+     \"n\": 2"), "{}", failures[1]);
    }
}
