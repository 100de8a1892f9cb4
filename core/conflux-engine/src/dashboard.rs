//! The page at the admin address: what it is told about the running
//! pipelines (their graph, and the analytics widgets a pipeline declares in
//! `dashboard:`), and the page itself, compiled into the binary.
//!
//! The page reads everything else itself: figures per component from
//! `/metrics`, and the widgets' data from a `broadcast` output's SSE. It is
//! told the output's port and path only: no other option value of any
//! component leaves the process.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use conflux_api::Kind;

use crate::config::PipelineSpec;

/// The page: HTML, CSS and JavaScript in one file, no external asset.
pub const PAGE: &str = include_str!("../assets/dashboard.html");

/// Analytics widgets on the admin page, fed by a `broadcast` output of
/// this pipeline over Server-Sent Events.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DashboardConfig {
    /// Heading of the pipeline's widgets (default: the pipeline's name).
    #[serde(default)]
    pub title: Option<String>,
    /// The `broadcast` output whose frames feed the widgets.
    pub from: String,
    /// Channels to read from it.
    pub channels: Vec<String>,
    /// What to show, in order.
    pub widgets: Vec<WidgetConfig>,
}

/// One widget. Paths (`field`, `group_by`, `time`, `fields`) read the
/// event a frame carries (`bookings`, `data.restaurantId`, `window.start`).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WidgetConfig {
    /// `series` (a line per group over time), `rate` (events per second per
    /// group), `bars` (latest value per group, largest first), `gauge` (sum of
    /// the latest value of every group against `max`), `table` (the latest events).
    #[serde(rename = "type")]
    pub kind: WidgetKind,
    pub title: String,
    /// The number shown (not for `rate` and `table`).
    #[serde(default)]
    pub field: Option<String>,
    /// One line, bar or row per value of this path.
    #[serde(default)]
    pub group_by: Option<String>,
    /// For `series`: the time of a point (default `window.start`).
    #[serde(default)]
    pub time: Option<String>,
    /// For `table`: the columns.
    #[serde(default)]
    pub fields: Vec<String>,
    /// For `gauge`: the full scale.
    #[serde(default)]
    pub max: Option<f64>,
    /// For `bars` and `table`: how many (default 10).
    #[serde(default)]
    pub top: Option<usize>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WidgetKind {
    Series,
    Rate,
    Bars,
    Gauge,
    Table,
}

/// What the page is told: for `GET /api/overview`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overview {
    pub pipelines: Vec<PipelineView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineView {
    pub name: String,
    pub components: Vec<ComponentView>,
    pub dashboard: Option<DashboardView>,
}

/// A component: its name, kind, type and what feeds it; no option values.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentView {
    pub name: String,
    pub kind: &'static str,
    #[serde(rename = "type")]
    pub type_name: String,
    pub from: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DashboardView {
    pub title: String,
    /// Where the broadcast output listens: the page connects to its own host on this port.
    pub port: u16,
    pub path: String,
    pub tls: bool,
    pub channels: Vec<String>,
    pub widgets: Vec<WidgetConfig>,
}

/// The `broadcast` output a dashboard names, as `(port, path, tls)`, or why it cannot feed it.
pub fn source(spec: &PipelineSpec, dashboard: &DashboardConfig) -> Result<(u16, String, bool), String> {
    let output = spec
        .components
        .iter()
        .find(|c| c.kind == Kind::Output && c.name == dashboard.from)
        .ok_or_else(|| format!("`dashboard.from`: no output named `{}`", dashboard.from))?;
    if output.type_name != "broadcast" {
        return Err(format!(
            "`dashboard.from`: `{}` is a `{}` output, not a `broadcast`",
            output.name, output.type_name
        ));
    }
    let address = output.options.get("address").and_then(|a| a.as_str()).unwrap_or_default();
    let port = address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
    let port = port.ok_or_else(|| format!("`dashboard.from`: `{}` has no address with a port", output.name))?;
    let path = match output.options.get("path") {
        Some(serde_json::Value::String(p)) => p.clone(),
        Some(serde_json::Value::Array(paths)) => paths.first().and_then(|p| p.as_str()).unwrap_or("/").to_string(),
        _ => "/".to_string(),
    };
    Ok((port, path, output.options.get("tls").is_some_and(|t| !t.is_null())))
}

impl Overview {
    pub fn of(specs: &[PipelineSpec]) -> Overview {
        let pipelines = specs
            .iter()
            .map(|spec| PipelineView {
                name: spec.name.clone(),
                components: spec
                    .components
                    .iter()
                    .map(|c| ComponentView {
                        name: c.name.clone(),
                        kind: match c.kind {
                            Kind::Input => "input",
                            Kind::Stage => "stage",
                            Kind::Output => "output",
                        },
                        type_name: c.type_name.clone(),
                        from: c
                            .from
                            .iter()
                            .map(|r| match &r.port {
                                Some(port) => format!("{}.{port}", r.component),
                                None => r.component.clone(),
                            })
                            .collect(),
                    })
                    .collect(),
                dashboard: spec.dashboard.as_ref().and_then(|d| {
                    let (port, path, tls) = source(spec, d).ok()?;
                    Some(DashboardView {
                        title: d.title.clone().unwrap_or_else(|| spec.name.clone()),
                        port,
                        path,
                        tls,
                        channels: d.channels.clone(),
                        widgets: d.widgets.clone(),
                    })
                }),
            })
            .collect();
        Overview { pipelines }
    }
}
