//! The `conflux` command.

use std::path::PathBuf;
use std::process::ExitCode;

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use conflux_engine::config::{load_file, process_env, Diagnostic, PipelineSpec};
use conflux_engine::graph::{compile, mermaid, Pipeline};
use conflux_engine::runtime::{run, RunContext};
use conflux_engine::{admin, schema, testing};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

mod plugins;
mod wasm_cmd;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "conflux",
    version,
    about = "A stream processor for real-time analytics, driven by YAML pipeline files."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter: a level (info, debug) or tracing directives (conflux_engine=debug).
    /// Default: info, but warn for `test`, which prints its results.
    #[arg(long, global = true, env = "CONFLUX_LOG")]
    log_level: Option<String>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, env = "CONFLUX_LOG_FORMAT", default_value = "human")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run pipelines side by side until their inputs end or SIGINT/SIGTERM.
    Run {
        /// Pipeline files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Admin server address (overrides the files' `admin.address`).
        #[arg(long)]
        admin: Option<String>,
    },
    /// Check pipeline files without running them; prints every problem.
    Lint {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run the unit tests declared in pipeline files (`tests:`).
    Test {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print a pipeline's graph.
    Graph {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "mermaid")]
        format: GraphFormat,
    },
    /// List every component type with its options.
    Plugins {
        /// Machine-readable JSON (name, kind, options schema).
        #[arg(long, conflicts_with = "markdown")]
        json: bool,
        /// The Markdown reference (docs/plugins.md).
        #[arg(long)]
        markdown: bool,
    },
    /// Print the JSON Schema of pipeline files.
    Schema {
        /// Write to this file instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Write and build Rust guests for the `wasm` stage.
    Wasm {
        #[command(subcommand)]
        command: wasm_cmd::WasmCommand,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Mermaid,
    Dot,
}

/// Prints to stdout, returning the error instead of panicking (a closed pipe,
/// as under `conflux plugins | head`, must end the command quietly).
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout().lock(), $($arg)*)?
    };
}

/// [`outln!`] without the newline.
macro_rules! out {
    ($($arg:tt)*) => {
        write!(std::io::stdout().lock(), $($arg)*)?
    };
}

fn main() -> ExitCode {
    plugins::link_all();
    // Servers hold a descriptor per connection: the soft limit (often 1,024) is not enough.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Test { .. }) { "warn" } else { "info" };
    init_logging(cli.log_level.as_deref().unwrap_or(default_level), cli.log_format);
    match dispatch(cli.command).and_then(|code| {
        std::io::stdout().flush()?;
        Ok(code)
    }) {
        Ok(code) => code,
        // The reader went away (`| head`): stop like a tool killed by SIGPIPE, without a message.
        Err(e) if stdout_closed(&e) => ExitCode::from(141),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

fn init_logging(filter: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal, and never under NO_COLOR (any value, https://no-color.org).
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| RedactingStderr).with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Stderr for log lines, with secrets masked (`conflux_api::secrets`): the
/// formatter writes each event in one call, so a whole line is redacted at once.
struct RedactingStderr;

impl std::io::Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(conflux_api::secrets::redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { files, admin } => runtime()?.block_on(run_files(files, admin)),
        Command::Lint { files } => {
            // Building a component may set up what only runs later, inside a
            // runtime (sqlx's lazy pool starts its upkeep task): give it one.
            let runtime = runtime()?;
            let _inside = runtime.enter();
            lint(&files)
        }
        Command::Test { files } => runtime()?.block_on(test(&files)),
        Command::Graph { file, format } => {
            let Some(pipelines) = load_all(std::slice::from_ref(&file)) else { return Ok(ExitCode::FAILURE) };
            let text = match format {
                GraphFormat::Mermaid => mermaid(&pipelines[0]),
                GraphFormat::Dot => dot(&pipelines[0]),
            };
            out!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugins { json, markdown } => {
            if markdown {
                out!("{}", schema::plugins_markdown());
            } else if json {
                let list: Vec<serde_json::Value> = conflux_api::Registration::all()
                    .into_iter()
                    .map(|r| serde_json::json!({ "kind": r.kind.as_str(), "name": r.name, "options": r.options_schema() }))
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_plugins()?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { output } => {
            let text = serde_json::to_string_pretty(&schema::pipeline_schema())? + "\n";
            match output {
                Some(path) => {
                    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?
                }
                None => out!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Wasm { command } => wasm_cmd::run(command),
    }
}

fn print_diagnostics(diags: &[Diagnostic]) {
    for d in diags {
        eprintln!("{d}");
    }
}

/// Loads and builds every file; prints every problem of every file.
fn load_all(files: &[PathBuf]) -> Option<Vec<Pipeline>> {
    let mut pipelines = Vec::new();
    let mut failed = false;
    for file in files {
        match load_file(file, &process_env).and_then(compile) {
            Ok(p) => pipelines.push(p),
            Err(diags) => {
                print_diagnostics(&diags);
                failed = true;
            }
        }
    }
    (!failed).then_some(pipelines)
}

fn lint(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut problems = 0;
    for file in files {
        match load_file(file, &process_env).and_then(compile) {
            Ok(p) => outln!("ok: {} ({} components)", file.display(), p.nodes.len()),
            Err(diags) => {
                problems += diags.len();
                print_diagnostics(&diags);
            }
        }
    }
    if problems > 0 {
        eprintln!("{problems} problem{} found", if problems == 1 { "" } else { "s" });
        Ok(ExitCode::FAILURE)
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

async fn test(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let (mut passed, mut failed) = (0, 0);
    for file in files {
        let spec: PipelineSpec = match load_file(file, &process_env) {
            Ok(spec) => spec,
            Err(diags) => {
                print_diagnostics(&diags);
                failed += 1;
                continue;
            }
        };
        if !spec.problems.is_empty() {
            print_diagnostics(&spec.problems);
            failed += 1;
            continue;
        }
        if spec.tests.is_empty() {
            outln!("{}: no tests", file.display());
            continue;
        }
        match testing::run_tests(&spec).await {
            Err(diags) => {
                print_diagnostics(&diags);
                failed += 1;
            }
            Ok(outcomes) => {
                for outcome in outcomes {
                    if outcome.passed() {
                        passed += 1;
                        outln!("PASS {}: {}", file.display(), outcome.name);
                    } else {
                        failed += 1;
                        outln!("FAIL {}: {}", file.display(), outcome.name);
                        for failure in &outcome.failures {
                            outln!("  {}", failure.replace('\n', "\n  "));
                        }
                    }
                }
            }
        }
    }
    outln!("{passed} passed, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn run_files(files: Vec<PathBuf>, admin_flag: Option<String>) -> anyhow::Result<ExitCode> {
    let Some(pipelines) = load_all(&files) else { return Ok(ExitCode::FAILURE) };
    let cx = RunContext::new();
    let admin_address =
        admin_flag.or_else(|| pipelines.iter().find_map(|p| p.admin.as_ref().map(|a| a.address.clone())));
    let admin_stop = CancellationToken::new();
    let admin_task = match admin_address {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(&address)
                .await
                .with_context(|| format!("cannot listen on admin address {address}"))?;
            let local = listener.local_addr()?;
            info!(address = %local, "admin server listening (/health /ready /metrics)");
            // stderr: stdout may be the pipeline's own output.
            eprintln!("dashboard: http://{local}/");
            let specs: Vec<_> = pipelines.iter().map(|p| p.spec.clone()).collect();
            let overview = std::sync::Arc::new(conflux_engine::dashboard::Overview::of(&specs));
            Some(tokio::spawn(admin::serve(
                listener,
                cx.metrics.clone(),
                cx.readiness.clone(),
                overview,
                admin_stop.clone(),
            )))
        }
        None => None,
    };
    tokio::spawn(watch_signals(cx.stop.clone()));

    let mut runs = tokio::task::JoinSet::new();
    for pipeline in pipelines {
        info!(pipeline = %pipeline.name, file = %pipeline.file.display(), components = pipeline.nodes.len(), "starting pipeline");
        runs.spawn(run(pipeline, cx.for_pipeline()));
    }
    let mut clean = true;
    while let Some(result) = runs.join_next().await {
        match result {
            Ok(report) => {
                // Its readiness entries went with it; its series go too.
                cx.metrics.forget(&report.pipeline);
                if report.failed || report.forced {
                    clean = false;
                }
                // A run that ended on its own (finite inputs) says what it lost.
                if !cx.stop.is_cancelled() && report.lost_events() {
                    eprintln!("{}", lost_summary(&report));
                    clean = false;
                }
            }
            Err(e) => {
                error!(error = %e, "pipeline task crashed");
                clean = false;
            }
        }
    }
    admin_stop.cancel();
    if let Some(task) = admin_task {
        if let Ok(Err(e)) = task.await {
            warn!(error = %e, "admin server stopped with an error");
        }
    }
    Ok(if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// One line: what each input of a finished pipeline heard back.
fn lost_summary(report: &conflux_engine::runtime::RunReport) -> String {
    let inputs: Vec<String> = report
        .inputs
        .iter()
        .map(|i| format!("`{}` {} delivered, {} rejected, {} errored", i.component, i.delivered, i.rejected, i.errored))
        .collect();
    format!("pipeline `{}` finished with events not delivered: {}", report.pipeline, inputs.join("; "))
}

/// First SIGINT/SIGTERM drains; a second one exits at once.
async fn watch_signals(stop: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM");
            return;
        }
    };
    for round in 0..2 {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        if round == 0 {
            info!("shutdown requested: inputs stop, in-flight events drain (signal again to exit at once)");
            stop.cancel();
        } else {
            warn!("second signal: exiting without draining");
            std::process::exit(130);
        }
    }
}

fn dot(pipeline: &Pipeline) -> String {
    let mut out = format!("digraph \"{}\" {{\n  rankdir=LR;\n", pipeline.name);
    for node in &pipeline.nodes {
        let shape = match node.kind {
            conflux_api::Kind::Input => "invhouse",
            conflux_api::Kind::Stage => "box",
            conflux_api::Kind::Output => "cylinder",
        };
        out.push_str(&format!(
            "  \"{}\" [label=\"{}\\n({})\", shape={shape}];\n",
            node.name, node.name, node.type_name
        ));
    }
    for node in &pipeline.nodes {
        for &(src, port) in &node.from {
            let src_node = &pipeline.nodes[src];
            let label = src_node
                .ports
                .get(port)
                .filter(|p| !p.is_empty())
                .map(|p| format!(" [label=\"{p}\"]"))
                .unwrap_or_default();
            out.push_str(&format!("  \"{}\" -> \"{}\"{label};\n", src_node.name, node.name));
        }
    }
    out.push_str("}\n");
    out
}

fn print_plugins() -> anyhow::Result<()> {
    let mut kind = None;
    for registration in conflux_api::Registration::all() {
        if kind != Some(registration.kind) {
            kind = Some(registration.kind);
            outln!("\n{}:", registration.kind.section().to_uppercase());
        }
        outln!("  {:<12} {}", registration.name, registration.summary());
        for option in schema::options(registration) {
            let mut line = format!("      {:<16} {}", option.name, option.type_text);
            if option.required {
                line.push_str(" (required)");
            }
            if let Some(default) = option.default {
                line.push_str(&format!(" [default: {default}]"));
            }
            outln!("{line}");
            if !option.description.is_empty() {
                outln!("          {}", option.description);
            }
        }
    }
    Ok(())
}
