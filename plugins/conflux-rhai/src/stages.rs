//! The `rhai`, `filter` and `switch` stages.

use std::sync::Arc;

use conflux_api::{
    async_trait, inventory, Batch, BuildContext, BuildError, BuiltStage, Emitter, PortId, Registration, Stage,
    StageConfig,
};
use rhai::Array;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::limits::Limits;
use crate::native::{Bail, Ending};
use crate::script::{Condition, RunState, Script};

/// Runs a Rhai script on every event.
///
/// The payload is `event` (read and assign fields: `event.data.userId = hash(event.data.userId)`),
/// the metadata `meta`. The script returns `event` (or a new map) to pass it on,
/// an array of maps to split it into several events, or `()` to drop it. A
/// script that throws or exceeds a limit sends the event to the `error` port
/// with the reason in its metadata.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RhaiConfig {
    /// The script, inline.
    #[serde(default)]
    pub script: Option<String>,
    /// A script file, relative to the pipeline file (instead of `script`).
    #[serde(default)]
    pub file: Option<String>,
    /// Sandbox limits.
    #[serde(default)]
    pub limits: Limits,
}

impl StageConfig for RhaiConfig {
    const TYPE: &'static str = "rhai";
    fn build(self, cx: &BuildContext) -> Result<BuiltStage, BuildError> {
        let script = match (&self.script, &self.file) {
            (Some(source), None) => {
                Script::compile(source, &self.limits).map_err(|e| e.at(["script"]))?.located(in_option(cx, &["script"]))
            }
            (None, Some(file)) => {
                let path = cx.resolve(file);
                let source = conflux_api::files::read_config_text(&path, conflux_api::files::CONFIG_FILE_LIMIT)
                    .map_err(|e| BuildError::at(["file"], e.to_string()))?;
                let shown = path.display().to_string();
                Script::compile(&source, &self.limits)
                    .map_err(|e| BuildError::at(["file"], format!("{shown}:{}:{}: {}", e.line, e.column, e.message)))?
                    .located(Some(Arc::new(move |line, column| format!("{shown}:{line}:{column}"))))
            }
            _ => return Err(BuildError::new("give exactly one of `script` (inline) or `file`")),
        };
        Ok(BuiltStage::new(RhaiStage { state: script.state(), script }))
    }
}

inventory::submit!(Registration::stage::<RhaiConfig>());

/// Positions inside the string option at `path`, as the pipeline file's.
pub fn in_option(cx: &BuildContext, path: &[&str]) -> Option<crate::script::Locator> {
    let map = cx.source_map.clone()?;
    let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
    Some(Arc::new(move |line, column| {
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        (map.0)(&path, line, column)
    }))
}

struct RhaiStage {
    script: Script,
    state: RunState,
}

#[async_trait]
impl Stage for RhaiStage {
    async fn process(&mut self, batch: Batch, out: &mut Emitter) {
        for mut event in batch {
            match self.script.run_native(&mut event) {
                Ok(Ending::Event) => {
                    out.emit(event);
                    continue;
                }
                // Dropped on purpose: the acknowledgement goes back as delivered.
                Ok(Ending::Drop) => continue,
                Err(Bail) => {}
            }
            let run = match self.script.run(&mut self.state, &mut event) {
                Ok(run) => run,
                Err(reason) => {
                    out.fail(event, reason);
                    continue;
                }
            };
            if run.result.is_unit() {
                // Dropped on purpose: the acknowledgement goes back as delivered.
                continue;
            }
            if run.returned_event() {
                *event.data = run.take_payload();
                out.emit(event);
            } else if let Some(items) = run.result.read_lock::<Array>() {
                for item in items.iter() {
                    out.emit(event.derive(run.item_to_value(item)));
                }
            } else if run.result.is_map() || run.result.is::<crate::handle::EventHandle>() {
                *event.data = run.item_to_value(&run.result);
                out.emit(event);
            } else {
                let kind = run.result.type_name();
                *event.data = run.take_payload();
                out.fail(
                    event,
                    format!("script returned {kind}; return the event, a map, an array of them, or () to drop"),
                );
            }
        }
    }
}

/// Keeps the events for which a Rhai condition is true and drops the others.
///
/// A condition that fails or returns a non-boolean sends the event to `error`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Rhai expression over `event` and `meta`, e.g. `event.type != "booking_cancelled"`.
    pub condition: String,
    /// Sandbox limits.
    #[serde(default)]
    pub limits: Limits,
}

impl StageConfig for FilterConfig {
    const TYPE: &'static str = "filter";
    fn build(self, cx: &BuildContext) -> Result<BuiltStage, BuildError> {
        let condition = Condition::compile(&self.condition, &self.limits)
            .map_err(|e| e.at(["condition"]))?
            .located(in_option(cx, &["condition"]));
        Ok(BuiltStage::new(FilterStage { condition }))
    }
}

inventory::submit!(Registration::stage::<FilterConfig>());

struct FilterStage {
    condition: Condition,
}

#[async_trait]
impl Stage for FilterStage {
    async fn process(&mut self, batch: Batch, out: &mut Emitter) {
        for mut event in batch {
            match self.condition.matches(&mut event) {
                Ok(true) => out.emit(event),
                Ok(false) => {}
                Err(reason) => out.fail(event, reason),
            }
        }
    }
}

/// Routes each event to the port of the first case whose condition is true,
/// or to port `default` (read them as `stage.case_name`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    /// Cases, tried in order.
    pub cases: Vec<SwitchCase>,
    /// Sandbox limits.
    #[serde(default)]
    pub limits: Limits,
}

/// One case of a `switch`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchCase {
    /// Port name for matching events.
    pub name: String,
    /// Rhai condition.
    pub when: String,
}

impl StageConfig for SwitchConfig {
    const TYPE: &'static str = "switch";
    fn build(self, _cx: &BuildContext) -> Result<BuiltStage, BuildError> {
        if self.cases.is_empty() {
            return Err(BuildError::at(["cases"], "a switch needs at least one case"));
        }
        let mut conditions = Vec::new();
        let mut ports: Vec<String> = Vec::new();
        for (i, case) in self.cases.iter().enumerate() {
            let index = i.to_string();
            if ["default", "error"].contains(&case.name.as_str())
                || ports.contains(&case.name)
                || case.name.contains('.')
            {
                return Err(BuildError::at(
                    ["cases", index.as_str(), "name"],
                    format!("case name `{}` is reserved, repeated or has a dot", case.name),
                ));
            }
            let condition =
                Condition::compile(&case.when, &self.limits).map_err(|e| e.at(["cases", index.as_str(), "when"]))?;
            conditions.push(condition);
            ports.push(case.name.clone());
        }
        ports.push("default".into());
        let default_port = PortId(ports.len());
        Ok(BuiltStage::new(SwitchStage { conditions, default_port }).with_ports(ports))
    }
}

inventory::submit!(Registration::stage::<SwitchConfig>());

struct SwitchStage {
    conditions: Vec<Condition>,
    default_port: PortId,
}

#[async_trait]
impl Stage for SwitchStage {
    async fn process(&mut self, batch: Batch, out: &mut Emitter) {
        'events: for mut event in batch {
            for (i, condition) in self.conditions.iter_mut().enumerate() {
                match condition.matches(&mut event) {
                    Ok(true) => {
                        out.emit_to(PortId(i + 1), event);
                        continue 'events;
                    }
                    Ok(false) => {}
                    Err(reason) => {
                        out.fail(event, reason);
                        continue 'events;
                    }
                }
            }
            out.emit_to(self.default_port, event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conflux_api::component::ERROR_META;
    use conflux_api::{AckStatus, AckToken, Event};
    use serde::de::DeserializeOwned;

    fn build<C: StageConfig + DeserializeOwned>(options: serde_json::Value) -> Result<BuiltStage, BuildError> {
        let config: C = serde_json::from_value(options).map_err(|e| BuildError::new(e.to_string()))?;
        let cx = BuildContext {
            pipeline: "p".into(),
            component: "s".into(),
            base_dir: ".".into(),
            data_dir: ".".into(),
            ..Default::default()
        };
        config.build(&cx)
    }

    /// An event as inputs make them: its JSON text, checked, not parsed.
    fn event(json: &str) -> Event {
        Event::with_time(conflux_api::Payload::from_json(json.as_bytes()).unwrap(), conflux_api::Timestamp(0))
    }

    /// Runs one batch; returns (port, payload JSON, error reason) per emitted event.
    async fn run(stage: &mut BuiltStage, events: Vec<Event>) -> Vec<(usize, String, Option<String>)> {
        let mut out = Emitter::new(stage.ports.len());
        stage.stage.process(events, &mut out).await;
        out.drain()
            .flat_map(|(port, batch)| {
                batch
                    .into_iter()
                    .map(move |e| (port, e.data.to_string(), e.meta.get(ERROR_META).map(|m| m.to_string())))
            })
            .collect()
    }

    #[tokio::test]
    async fn map_script_reads_and_sets_fields() {
        let mut stage = build::<RhaiConfig>(serde_json::json!({ "script":
            "let g = event.data.guests; event.data.large = g > 4; event.data.userId = hash(event.data.userId); event" }))
        .unwrap();
        let got = run(&mut stage, vec![event(r#"{"type":"x","data":{"guests":6,"userId":"abc"}}"#)]).await;
        assert_eq!(got.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&got[0].1).unwrap();
        assert_eq!(v["data"]["large"], true);
        assert_eq!(v["data"]["guests"], 6);
        assert_eq!(v["data"]["userId"], "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(v["type"], "x");
    }

    #[tokio::test]
    async fn split_drop_and_new_maps() {
        let mut split = build::<RhaiConfig>(
            serde_json::json!({ "script": "let id = event.id; event.items.map(|i| #{ sku: i, order: id })" }),
        )
        .unwrap();
        let got = run(&mut split, vec![event(r#"{"id":7,"items":["a","b","c"]}"#)]).await;
        let payloads: Vec<serde_json::Value> = got.iter().map(|g| serde_json::from_str(&g.1).unwrap()).collect();
        assert!(got.iter().all(|g| g.0 == 0), "{got:?}");
        let expected: Vec<serde_json::Value> =
            ["a", "b", "c"].iter().map(|s| serde_json::json!({ "sku": s, "order": 7 })).collect();
        assert_eq!(payloads, expected);

        let mut dropper =
            build::<RhaiConfig>(serde_json::json!({ "script": "if event.n > 1 { () } else { event }" })).unwrap();
        let (token, status) = AckToken::channel();
        let events = vec![event(r#"{"n":1}"#).with_ack(token.clone()), event(r#"{"n":2}"#).with_ack(token)];
        let got = run(&mut dropper, events).await;
        assert_eq!(got.len(), 1);
        assert_eq!(status.await.unwrap(), AckStatus::Delivered, "a dropped event counts as done");
    }

    #[tokio::test]
    async fn runaway_scripts_fail_their_event_only() {
        let mut looping =
            build::<RhaiConfig>(serde_json::json!({ "script": "loop { }", "limits": { "max_operations": 10000 } }))
                .unwrap();
        let got = run(&mut looping, vec![event(r#"{"n":1}"#)]).await;
        assert_eq!(got[0].0, 1, "goes to the error port");
        assert!(got[0].2.as_deref().unwrap().contains("Too many operations"), "{got:?}");
        assert_eq!(got[0].1, r#"{"n":1}"#, "the payload is kept for the dead letter");

        let mut bomb = build::<RhaiConfig>(serde_json::json!({
            "script": "let s = \"xxxxxxxxxx\"; loop { s += s; }", "limits": { "max_string_size": 1000 } }))
        .unwrap();
        let got = run(&mut bomb, vec![event(r#"{"n":1}"#)]).await;
        assert!(got[0].2.as_deref().unwrap().to_lowercase().contains("length of string"), "{got:?}");

        let mut deep = build::<RhaiConfig>(serde_json::json!({ "script": "fn f(x) { f(x + 1) } f(0)" })).unwrap();
        let got = run(&mut deep, vec![event("{}")]).await;
        assert!(got[0].2.as_deref().unwrap().contains("Stack overflow"), "{got:?}");

        let mut throws = build::<RhaiConfig>(serde_json::json!({ "script": "throw \"bad booking\"" })).unwrap();
        let got = run(&mut throws, vec![event("{}"), event("{}")]).await;
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|g| g.0 == 1 && g.2.as_deref().unwrap().contains("bad booking")));

        let mut wrong = build::<RhaiConfig>(serde_json::json!({ "script": "42" })).unwrap();
        let got = run(&mut wrong, vec![event(r#"{"n":1}"#)]).await;
        assert!(got[0].2.as_deref().unwrap().contains("script returned i64"), "{got:?}");
    }

    /// Runs `[big, small]` through a script whose size depends on `event.n`:
    /// the first event breaks `limit` and goes to `error` with `reason`, the
    /// second passes.
    async fn size_limit_fails_one_event(script: &str, limit: &str, reason: &str) {
        let mut stage = build::<RhaiConfig>(serde_json::json!({ "script": script, "limits": { limit: 10 } })).unwrap();
        let got = run(&mut stage, vec![event(r#"{"n":11}"#), event(r#"{"n":10}"#)]).await;
        assert_eq!(got.len(), 2, "{got:?}");
        let (ok, failed): (Vec<_>, Vec<_>) = got.iter().partition(|g| g.0 == 0);
        assert_eq!(failed.len(), 1, "{got:?}");
        assert_eq!(failed[0].0, 1, "goes to the error port");
        assert_eq!(failed[0].1, r#"{"n":11}"#, "the payload is kept for the dead letter");
        let why = failed[0].2.as_deref().unwrap();
        assert!(why.contains(reason), "{limit}: {why}");
        assert_eq!(ok.len(), 1, "{got:?}");
        // Parsed: a field added to a parsed payload lands in no fixed order.
        let next: serde_json::Value = serde_json::from_str(&ok[0].1).unwrap();
        assert_eq!(next, serde_json::json!({ "n": 10, "size": 10 }), "the next event runs under the same limit");
    }

    #[tokio::test]
    async fn array_size_limit_fails_one_event() {
        size_limit_fails_one_event(
            "let a = []; for i in 0..event.n { a.push(i); } event.size = a.len(); event",
            "max_array_size",
            "Size of array/BLOB too large",
        )
        .await;
    }

    #[tokio::test]
    async fn map_size_limit_fails_one_event() {
        size_limit_fails_one_event(
            "let m = #{}; for i in 0..event.n { m[`k${i}`] = i; } event.size = m.len(); event",
            "max_map_size",
            "Size of object map too large",
        )
        .await;
    }

    #[tokio::test]
    async fn expression_depth_limit_is_a_compile_error() {
        // Rhai checks nesting while parsing, so a script nested deeper than
        // `max_expr_depth` never runs: the stage does not build, and says where.
        let deep = format!("{}1{}", "(".repeat(20), ")".repeat(20));
        let err = build::<RhaiConfig>(serde_json::json!({ "script": format!("event.x = {deep}; event"),
            "limits": { "max_expr_depth": 12 } }))
        .err()
        .unwrap();
        assert_eq!(err.path, vec!["script"]);
        assert!(err.message.contains("exceeds maximum complexity"), "{err:?}");
        assert!(err.offset.is_some(), "{err:?}");
        // Within the limit the same shape runs.
        let shallow = format!("{}1{}", "(".repeat(2), ")".repeat(2));
        let mut ok = build::<RhaiConfig>(serde_json::json!({ "script": format!("event.x = {shallow}; event"),
            "limits": { "max_expr_depth": 12 } }))
        .unwrap();
        let got = run(&mut ok, vec![event("{}")]).await;
        assert_eq!(got, vec![(0, r#"{"x":1}"#.to_string(), None)]);
    }

    /// A folder of its own under the system temp dir (no tempfile here).
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("conflux-rhai-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn build_in<C: StageConfig + DeserializeOwned>(
        dir: &std::path::Path,
        options: serde_json::Value,
    ) -> Result<BuiltStage, BuildError> {
        let config: C = serde_json::from_value(options).map_err(|e| BuildError::new(e.to_string()))?;
        config.build(&BuildContext {
            pipeline: "p".into(),
            component: "s".into(),
            base_dir: dir.to_path_buf(),
            data_dir: dir.to_path_buf(),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn script_from_a_file() {
        let dir = scratch("file");
        std::fs::write(dir.join("tag.rhai"), "// tags each event\nevent.tag = \"from file\";\nevent\n").unwrap();
        let mut stage = build_in::<RhaiConfig>(&dir, serde_json::json!({ "file": "tag.rhai" })).unwrap();
        let got = run(&mut stage, vec![event(r#"{"n":1}"#)]).await;
        assert_eq!((got.len(), got[0].0, got[0].2.as_deref()), (1, 0, None), "{got:?}");
        let tagged: serde_json::Value = serde_json::from_str(&got[0].1).unwrap();
        assert_eq!(tagged, serde_json::json!({ "n": 1, "tag": "from file" }));

        std::fs::write(dir.join("broken.rhai"), "let a = 1;\nlet b = ;\nevent\n").unwrap();
        let err = build_in::<RhaiConfig>(&dir, serde_json::json!({ "file": "broken.rhai" })).err().unwrap();
        assert_eq!(err.path, vec!["file"]);
        let at = format!("{}:2:9: ", dir.join("broken.rhai").display());
        assert!(err.message.starts_with(&at), "expected `{at}…`, got {err:?}");

        let err = build_in::<RhaiConfig>(&dir, serde_json::json!({ "file": "missing.rhai" })).err().unwrap();
        assert_eq!(err.path, vec!["file"]);
        assert!(err.message.contains("does not exist") && err.message.contains("missing.rhai"), "{err:?}");
        let err =
            build_in::<RhaiConfig>(&dir, serde_json::json!({ "file": "tag.rhai", "script": "event" })).err().unwrap();
        assert!(err.message.contains("exactly one"), "{err:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn state_kept_between_events_does_not_leak() {
        // Each event gets the whole operation budget: 3 × ~700 operations
        // would exceed 1,000 if the count carried over.
        let mut busy = build::<RhaiConfig>(serde_json::json!({
            "script": "let n = 0; for i in 0..100 { n += i; } event.n = n; event",
            "limits": { "max_operations": 1000 } }))
        .unwrap();
        let got = run(&mut busy, vec![event("{}"), event("{}"), event("{}")]).await;
        assert!(got.iter().all(|g| g.0 == 0 && g.1 == r#"{"n":4950}"#), "{got:?}");

        // Variables and a reassigned `event` do not survive into the next run,
        // nor does a failed run disturb the next one.
        let mut shadow = build::<RhaiConfig>(serde_json::json!({ "script":
            "if is_def_var(\"x\") { throw \"leaked\" } let x = 1; if event.bad == true { throw \"bad\" } let out = event.id; event = #{ id: out }; event" }))
        .unwrap();
        let got = run(
            &mut shadow,
            vec![event(r#"{"id":1,"k":0}"#), event(r#"{"id":2,"bad":true}"#), event(r#"{"id":3,"k":0}"#)],
        )
        .await;
        let by_port: Vec<(usize, &str)> = got.iter().map(|g| (g.0, g.1.as_str())).collect();
        assert_eq!(by_port, vec![(0, r#"{"id":1}"#), (0, r#"{"id":3}"#), (1, r#"{"id":2,"bad":true}"#)]);
    }

    /// The error port gets the event as it came, not as the script had
    /// half changed it before it threw.
    #[tokio::test]
    async fn a_failed_event_keeps_its_original_payload() {
        let mut changes_then_throws = build::<RhaiConfig>(serde_json::json!({
            "script": "event.added = 1; event.id = 99; if event.k == 0 { throw \"no\" } event" }))
        .unwrap();
        let got = run(&mut changes_then_throws, vec![event(r#"{"id":7,"k":0,"z":true}"#)]).await;
        let by_port: Vec<(usize, &str)> = got.iter().map(|g| (g.0, g.1.as_str())).collect();
        assert_eq!(by_port, vec![(1, r#"{"id":7,"k":0,"z":true}"#)]);
    }

    #[tokio::test]
    async fn no_file_or_module_access() {
        let err = build::<RhaiConfig>(serde_json::json!({ "script": "eval(\"1\")" })).err().unwrap();
        assert!(err.message.contains("does not compile"), "{err:?}");
        let mut import =
            build::<RhaiConfig>(serde_json::json!({ "script": "import \"/etc/passwd\" as p; event" })).unwrap();
        let got = run(&mut import, vec![event("{}")]).await;
        assert_eq!(got[0].0, 1, "{got:?}");
    }

    #[test]
    fn compile_errors_point_inside_the_script() {
        let err = build::<RhaiConfig>(serde_json::json!({ "script": "let a = 1;\nlet b = ;\nevent" })).err().unwrap();
        assert_eq!(err.path, vec!["script"]);
        assert_eq!(err.offset, Some((2, 9)));
        let err = build::<FilterConfig>(serde_json::json!({ "condition": "event.n >" })).err().unwrap();
        assert_eq!(err.path, vec!["condition"]);
        let err = build::<RhaiConfig>(serde_json::json!({})).err().unwrap();
        assert!(err.message.contains("exactly one"));
    }

    #[tokio::test]
    async fn filter_keeps_true_and_fails_non_boolean() {
        let mut filter =
            build::<FilterConfig>(serde_json::json!({ "condition": "event.type != \"booking_cancelled\"" })).unwrap();
        let got = run(
            &mut filter,
            vec![event(r#"{"type":"booking_created"}"#), event(r#"{"type":"booking_cancelled"}"#), event("{}")],
        )
        .await;
        assert_eq!(got.len(), 2, "cancelled dropped, missing field compares as () != string");
        let mut bad = build::<FilterConfig>(serde_json::json!({ "condition": "event.n" })).unwrap();
        let got = run(&mut bad, vec![event(r#"{"n":1}"#)]).await;
        assert_eq!(got[0].0, 1);
        assert!(got[0].2.as_deref().unwrap().contains("not a boolean"));
    }

    #[tokio::test]
    async fn switch_routes_to_named_ports() {
        let mut switch = build::<SwitchConfig>(serde_json::json!({ "cases": [
            { "name": "vip", "when": "event.guests >= 8" },
            { "name": "large", "when": "event.guests >= 4" },
        ]}))
        .unwrap();
        assert_eq!(switch.ports, vec!["vip", "large", "default"]);
        let got =
            run(&mut switch, vec![event(r#"{"guests":10}"#), event(r#"{"guests":5}"#), event(r#"{"guests":2}"#)]).await;
        let ports: Vec<usize> = got.iter().map(|g| g.0).collect();
        assert_eq!(ports, vec![1, 2, 3]);
        assert!(build::<SwitchConfig>(serde_json::json!({ "cases": [{ "name": "default", "when": "true" }] })).is_err());
    }

    #[tokio::test]
    async fn meta_is_readable_and_writable() {
        let mut stage =
            build::<RhaiConfig>(serde_json::json!({ "script": "meta.seen = true; event.src = meta.source; event" }))
                .unwrap();
        let mut e = event("{}");
        e.meta.insert("source", "kafka");
        let mut out = Emitter::new(0);
        stage.stage.process(vec![e], &mut out).await;
        let emitted: Vec<Event> = out.drain().flat_map(|(_, b)| b).collect();
        assert_eq!(emitted[0].data.to_string(), r#"{"src":"kafka"}"#);
        assert_eq!(emitted[0].meta.get("seen").map(|v| v.to_string()).as_deref(), Some("true"));
    }
}
