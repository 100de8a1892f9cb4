//! The deployment files under docker/ agree with the pipelines they run and
//! with the code: the compose stack, the Kubernetes manifests, the Dockerfile,
//! Prometheus and the Grafana dashboards. Nothing is started (no container
//! engine runs in CI): every file is parsed and checked against the pipeline
//! files, read at test time, and against the metric names the sources
//! register, so a renamed variable, port or metric fails here first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

/// The admin server's port (`run --admin 0.0.0.0:9464`) in every deployment.
const ADMIN_PORT: u16 = 9464;

/// Variables the container runtime sets by itself (Docker and Kubernetes both
/// set HOSTNAME), so pipelines may use them without a default.
const RUNTIME_ENV: &[&str] = &["HOSTNAME"];

/// Environment variables by name.
type Env = BTreeMap<String, String>;

// ---------------------------------------------------------------------------
// Files and YAML

/// The repository's root (this crate is core/conflux).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("core/conflux has two parents").to_path_buf()
}

fn docker_dir() -> PathBuf {
    root().join("docker")
}

/// A path as messages show it: relative to the repository's root.
fn shown(path: &Path) -> String {
    path.strip_prefix(root()).unwrap_or(path).display().to_string()
}

/// `a/b/../c` → `a/c` without the file system: image paths do not exist here.
fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn file_name(path: &str) -> String {
    Path::new(path).file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", shown(path)))
}

/// The files of `dir` whose names end with one of `extensions`, sorted.
fn files_in(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", shown(dir)));
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.extension().and_then(|e| e.to_str()).is_some_and(|e| extensions.contains(&e)))
        .collect();
    files.sort();
    files
}

/// Every document of a YAML file.
fn yaml_docs(path: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", shown(path)))
}

/// The one document of a YAML file.
fn yaml_file(path: &Path) -> Yaml {
    yaml_docs(path).into_iter().next().unwrap_or_else(|| panic!("{} is empty", shown(path)))
}

/// A scalar as text: YAML reads `9464` as a number and `"9464"` as a string.
fn text(node: &Yaml) -> Option<String> {
    match node {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The items of a sequence (none for anything else).
fn items(node: &Yaml) -> &[Yaml] {
    node.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

/// The entries of a mapping whose keys are text (none for anything else).
fn entries(node: &Yaml) -> Vec<(String, &Yaml)> {
    node.as_hash().map(|map| map.iter().filter_map(|(k, v)| Some((text(k)?, v))).collect()).unwrap_or_default()
}

/// A command line: a YAML list, or one string split at spaces.
fn words(node: &Yaml) -> Vec<String> {
    match node {
        Yaml::String(line) => line.split_whitespace().map(String::from).collect(),
        _ => items(node).iter().filter_map(text).collect(),
    }
}

/// Fails the test with every problem found, one per line.
fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(problems.is_empty(), "{what}:\n  - {}", problems.join("\n  - "));
}

// ---------------------------------------------------------------------------
// Pipelines

/// A pipeline file as a deployment runs it.
struct Pipeline {
    /// The file, for messages (`configs/bookings.yaml`).
    name: String,
    tree: Yaml,
    /// Every string option with its key path (`inputs.api.address`).
    strings: Vec<(String, String)>,
}

impl Pipeline {
    fn load(path: &Path) -> Pipeline {
        let tree = yaml_file(path);
        let mut strings = Vec::new();
        collect_strings(&tree, "", &mut strings);
        Pipeline { name: shown(path), tree, strings }
    }

    /// Options that read the environment, but `admin.*`, which `--admin` overrides.
    fn settings(&self) -> impl Iterator<Item = &(String, String)> + '_ {
        self.strings.iter().filter(|(path, value)| value.contains("${") && !path.starts_with("admin."))
    }

    /// Listening addresses.
    fn listeners(&self) -> impl Iterator<Item = &(String, String)> + '_ {
        self.strings.iter().filter(|(path, _)| is_listener(path))
    }

    /// Paths the pipeline writes, resolved under `env`: `file` outputs, and
    /// `runtime.data_dir` when a checkpoint is kept in files rather than Redis.
    fn written_paths(&self, env: &Env) -> Vec<(String, String)> {
        let mut written: Vec<(String, String)> = self
            .strings
            .iter()
            .filter(|(path, _)| path.starts_with("outputs.") && path.ends_with(".path"))
            .filter(|(path, _)| {
                let output = path.strip_suffix(".path").unwrap_or(path);
                self.strings.iter().any(|(p, v)| *p == format!("{output}.type") && v == "file")
            })
            .cloned()
            .collect();
        let file_checkpoint = entries(&self.tree["stages"])
            .iter()
            .any(|(_, stage)| !stage["checkpoint"].is_badvalue() && stage["checkpoint"]["redis"].is_badvalue());
        if file_checkpoint {
            let data_dir = text(&self.tree["runtime"]["data_dir"])
                .unwrap_or_else(|| conflux_engine::config::RuntimeConfig::default().data_dir);
            written.push(("runtime.data_dir".into(), data_dir));
        }
        written.into_iter().filter_map(|(path, raw)| Some((path, resolve(&raw, env).ok()?))).collect()
    }

    /// `runtime.shutdown_timeout` under `env` (the engine's default when unset).
    fn shutdown_timeout(&self, env: &Env) -> Duration {
        text(&self.tree["runtime"]["shutdown_timeout"])
            .and_then(|raw| resolve(&raw, env).ok())
            .and_then(|value| value.parse::<conflux_api::config::Duration>().ok())
            .map_or_else(|| conflux_engine::config::RuntimeConfig::default().shutdown_timeout.0, |d| d.0)
    }

    /// The tables and rollup views the pipeline's `postgres` outputs write.
    fn postgres_tables(&self) -> Vec<String> {
        entries(&self.tree["outputs"])
            .into_iter()
            .filter(|(_, output)| text(&output["type"]).as_deref() == Some("postgres"))
            .flat_map(|(_, output)| {
                let rollups = items(&output["rollups"]).iter().filter_map(|rollup| text(&rollup["name"]));
                text(&output["table"]).into_iter().chain(rollups).collect::<Vec<_>>()
            })
            .filter_map(|table| resolve(&table, &Env::new()).ok())
            .map(|table| table.to_lowercase())
            .collect()
    }

    /// Files the pipeline reads, relative to itself (event schemas, wasm modules, keys).
    fn read_files(&self) -> Vec<String> {
        let reads = [".schema", ".module", ".public_key", ".tls.cert", ".tls.key"];
        self.strings
            .iter()
            .filter(|(path, _)| reads.iter().any(|suffix| path.ends_with(suffix)))
            .filter_map(|(_, raw)| resolve(raw, &Env::new()).ok())
            .filter(|file| !Path::new(file).is_absolute())
            .collect()
    }
}

/// An `address` option anywhere but `admin`: something the pipeline listens on.
fn is_listener(path: &str) -> bool {
    path.rsplit('.').next() == Some("address") && !path.starts_with("admin.")
}

fn collect_strings(node: &Yaml, path: &str, out: &mut Vec<(String, String)>) {
    let child = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    match node {
        Yaml::String(value) => out.push((path.to_string(), value.clone())),
        Yaml::Hash(map) => {
            for (key, value) in map {
                collect_strings(value, &child(&text(key).unwrap_or_default()), out);
            }
        }
        Yaml::Array(list) => {
            for (index, value) in list.iter().enumerate() {
                collect_strings(value, &child(&index.to_string()), out);
            }
        }
        _ => {}
    }
}

/// A value as the engine reads it under `env`, by the engine's own `${VAR:-default}` rules.
fn resolve(raw: &str, env: &Env) -> Result<String, String> {
    conflux_engine::config::interpolate(raw, &|name: &str| env.get(name).cloned()).map(|value| value.into_owned())
}

/// The variables a value reads (`${NAME}`, `${NAME:-default}`; `$${` is a literal).
fn variables(raw: &str) -> Vec<String> {
    raw.match_indices("${")
        .filter(|(at, _)| !raw[..*at].ends_with('$'))
        .filter_map(|(at, _)| raw[at + 2..].split([':', '}']).next())
        .map(String::from)
        .collect()
}

/// The port an address listens on when nothing is set: `${X:-127.0.0.1:8080}` → 8080.
fn default_port(raw: &str) -> Result<u16, String> {
    let address = resolve(raw, &Env::new())?;
    port_of(&address).ok_or_else(|| format!("`{address}` names no port"))
}

/// The port of `host:port`.
fn port_of(address: &str) -> Option<u16> {
    address.rsplit_once(':')?.1.parse().ok()
}

/// Whether a value still points at this machine: a pipeline's default for
/// running beside its services, wrong inside a container.
fn is_loopback(value: &str) -> bool {
    ["127.0.0.1", "localhost", "[::1]"].iter().any(|host| value.contains(host))
}

/// The hosts of a URL or of a comma-separated list (`kafka:9092,b:9092`, `nats://a:4222`).
fn hosts(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter_map(|item| {
            let item = item.trim();
            let item = item.split_once("://").map_or(item, |(_, rest)| rest);
            let authority = item.split('/').next()?;
            let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
            let host = host_port.rsplit_once(':').map_or(host_port, |(host, _)| host);
            (!host.is_empty()).then(|| host.to_string())
        })
        .collect()
}

fn runtime_env() -> Env {
    RUNTIME_ENV.iter().map(|name| (name.to_string(), "set-by-the-runtime".to_string())).collect()
}

/// `run --admin ADDRESS FILE…`: the admin address and the files.
fn run_args(args: &[String]) -> Result<(String, Vec<String>), String> {
    let line = args.join(" ");
    let Some(("run", rest)) = args.split_first().map(|(first, rest)| (first.as_str(), rest)) else {
        return Err(format!("`{line}` does not start with `run`"));
    };
    let mut admin = None;
    let mut files = Vec::new();
    let mut rest = rest.iter();
    while let Some(word) = rest.next() {
        if word == "--admin" {
            admin = rest.next().cloned();
        } else if let Some(address) = word.strip_prefix("--admin=") {
            admin = Some(address.to_string());
        } else {
            files.push(word.clone());
        }
    }
    Ok((admin.ok_or_else(|| format!("`{line}` has no --admin"))?, files))
}

/// The admin server listens on every interface at [`ADMIN_PORT`], which is open.
fn admin_problems(source: &str, admin: &str, ports: &BTreeSet<u16>) -> Vec<String> {
    let mut problems = Vec::new();
    if admin != format!("0.0.0.0:{ADMIN_PORT}") {
        problems.push(format!("{source}: --admin is `{admin}`, not 0.0.0.0:{ADMIN_PORT}"));
    }
    if !ports.contains(&ADMIN_PORT) {
        problems.push(format!("{source}: the admin port {ADMIN_PORT} is not open"));
    }
    problems
}

/// What one deployment runs: pipeline files, their environment, the ports it opens.
struct Deployment {
    /// The deployment file, for messages.
    source: String,
    /// The pipeline files, as repository paths.
    files: Vec<PathBuf>,
    env: Env,
    /// The container ports it publishes (compose) or declares (Kubernetes).
    ports: BTreeSet<u16>,
}

impl Deployment {
    /// The deployed pipelines that exist (a missing one is among [`Deployment::problems`]).
    fn pipelines(&self) -> Vec<Pipeline> {
        self.files.iter().filter(|file| file.is_file()).map(|file| Pipeline::load(file)).collect()
    }

    /// The ports the pipelines listen on, by their defaults.
    fn listening_ports(&self) -> BTreeSet<u16> {
        let pipelines = self.pipelines();
        pipelines.iter().flat_map(|p| p.listeners()).filter_map(|(_, raw)| default_port(raw).ok()).collect()
    }

    /// Every file exists, and under this environment each option that reads
    /// the environment is set, each listening address is 0.0.0.0 on an open
    /// port, no service is looked for on loopback, and what is written goes to
    /// an absolute path (the configs folder is read-only in the image).
    fn problems(&self) -> Vec<String> {
        let missing = self.files.iter().filter(|file| !file.is_file());
        let mut problems: Vec<String> =
            missing.map(|file| format!("{}: runs {}, which does not exist", self.source, shown(file))).collect();
        for pipeline in self.pipelines() {
            for (path, raw) in pipeline.listeners().filter(|(_, raw)| !raw.contains("${")) {
                problems.push(format!(
                    "{} {path}: listens on the fixed `{raw}`; write \"${{SOME_ADDRESS:-{raw}}}\" so a deployment can open it",
                    pipeline.name
                ));
            }
            for (path, raw) in pipeline.settings() {
                let at = format!("{}: {} {path} `{raw}`", self.source, pipeline.name);
                match resolve(raw, &self.env) {
                    Err(error) => problems.push(format!("{at}: {error}")),
                    Ok(value) if is_listener(path) => problems.extend(self.listener_problem(&at, raw, &value)),
                    Ok(value) if is_loopback(&value) => {
                        problems.push(format!("{at} becomes `{value}`: set its variable to the service's address"))
                    }
                    Ok(_) => {}
                }
            }
            for (path, written) in pipeline.written_paths(&self.env) {
                if !Path::new(&written).is_absolute() {
                    problems.push(format!(
                        "{}: {} {path} writes `{written}`, relative to the read-only configs folder; use ${{DATA_DIR}}",
                        self.source, pipeline.name
                    ));
                }
            }
        }
        problems
    }

    fn listener_problem(&self, at: &str, raw: &str, value: &str) -> Option<String> {
        let port = match default_port(raw) {
            Ok(port) => port,
            Err(error) => return Some(format!("{at}: {error}")),
        };
        if value != format!("0.0.0.0:{port}") {
            Some(format!("{at} becomes `{value}`: set its variable to 0.0.0.0:{port}"))
        } else if !self.ports.contains(&port) {
            Some(format!("{at} listens on port {port}, which is not open"))
        } else {
            None
        }
    }

    /// The orchestrator waits, after SIGTERM, longer than the slowest pipeline drains.
    fn grace_problem(&self, grace: Duration) -> Option<String> {
        let longest = self.pipelines().iter().map(|p| p.shutdown_timeout(&self.env)).max().unwrap_or_default();
        (grace <= longest).then(|| {
            format!(
                "{}: waits {grace:?} after SIGTERM, no longer than the pipelines' shutdown_timeout {longest:?}",
                self.source
            )
        })
    }
}

// ---------------------------------------------------------------------------
// Dockerfile

/// A `COPY` from the build context: its sources and where they land.
struct CopyLine {
    sources: Vec<String>,
    dest: PathBuf,
    /// Several sources, or a destination ending in `/`: files land inside it.
    into_dir: bool,
}

impl CopyLine {
    /// Where `source` lands: a folder's content at the destination, a file
    /// at the destination or inside it.
    fn landing(&self, source: &str, context: &Path) -> PathBuf {
        if self.into_dir && !context.join(source).is_dir() {
            self.dest.join(file_name(source))
        } else {
            self.dest.clone()
        }
    }
}

/// docker/Dockerfile (or the one compose names), split into stages.
struct Dockerfile {
    path: PathBuf,
    /// Each stage's instructions: (INSTRUCTION, arguments).
    stages: Vec<Vec<(String, String)>>,
}

impl Dockerfile {
    fn load(path: &Path) -> Dockerfile {
        let mut stages: Vec<Vec<(String, String)>> = Vec::new();
        for (word, args) in dockerfile_instructions(&read(path)) {
            if word == "FROM" {
                stages.push(Vec::new());
            }
            if let Some(stage) = stages.last_mut() {
                stage.push((word, args));
            }
        }
        assert!(!stages.is_empty(), "{} has no FROM", shown(path));
        Dockerfile { path: path.to_path_buf(), stages }
    }

    /// The final stage: what the image is.
    fn image(&self) -> &[(String, String)] {
        self.stages.last().map(Vec::as_slice).unwrap_or(&[])
    }

    /// The arguments of the image's `word` instructions.
    fn image_args<'a>(&'a self, word: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.image().iter().filter(move |(w, _)| w.as_str() == word).map(|(_, args)| args.as_str())
    }

    /// The image's working directory (`/` unless WORKDIR says).
    fn workdir(&self) -> PathBuf {
        self.image_args("WORKDIR").fold(PathBuf::from("/"), |dir, args| clean(&dir.join(args)))
    }

    /// The image's ENV.
    fn env(&self) -> Env {
        let mut env = Env::new();
        for args in self.image_args("ENV") {
            let pairs: Vec<&str> = args.split_whitespace().collect();
            match pairs.first() {
                Some(first) if !first.contains('=') => {
                    env.insert(first.to_string(), pairs[1..].join(" "));
                }
                _ => env.extend(
                    pairs.iter().filter_map(|p| p.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())),
                ),
            }
        }
        env
    }

    /// The ports the image EXPOSEs.
    fn exposed(&self) -> BTreeSet<u16> {
        self.image_args("EXPOSE")
            .flat_map(str::split_whitespace)
            .filter_map(|port| port.split('/').next()?.parse().ok())
            .collect()
    }

    /// Every COPY or ADD of a stage that reads the build context (not `--from` another stage).
    fn context_copies(stage: &[(String, String)]) -> Vec<CopyLine> {
        let mut workdir = PathBuf::from("/");
        let mut copies = Vec::new();
        for (word, args) in stage {
            match word.as_str() {
                "WORKDIR" => workdir = clean(&workdir.join(args)),
                "COPY" | "ADD" if !args.contains("--from") => {
                    let paths: Vec<&str> = args.split_whitespace().filter(|w| !w.starts_with("--")).collect();
                    if let Some((dest, sources)) = paths.split_last() {
                        copies.push(CopyLine {
                            sources: sources.iter().map(|s| s.to_string()).collect(),
                            dest: clean(&workdir.join(dest)),
                            into_dir: sources.len() > 1 || dest.ends_with('/'),
                        });
                    }
                }
                _ => {}
            }
        }
        copies
    }

    /// The build-context file the image holds at `image_path`, through the
    /// image's COPY lines (a later one wins).
    fn context_file(&self, context: &Path, image_path: &Path) -> Option<PathBuf> {
        let copies = Self::context_copies(self.image());
        copies.iter().rev().find_map(|copy| {
            copy.sources.iter().find_map(|source| {
                let rest = image_path.strip_prefix(copy.landing(source, context)).ok()?;
                Some(clean(&context.join(source).join(rest)))
            })
        })
    }
}

/// A Dockerfile's instructions, continuation lines joined and comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut line = String::new();
    for raw in text.lines() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(part) = trimmed.strip_suffix('\\') {
            line.push_str(part);
            line.push(' ');
            continue;
        }
        line.push_str(trimmed);
        let (word, args) = line.split_once(char::is_whitespace).unwrap_or((line.as_str(), ""));
        instructions.push((word.to_ascii_uppercase(), args.trim().to_string()));
        line.clear();
    }
    instructions
}

// ---------------------------------------------------------------------------
// docker/compose.yaml

const COMPOSE: &str = "docker/compose.yaml";

/// docker/compose.yaml and the service built from this repository (the one running conflux).
struct Compose {
    tree: Yaml,
    /// The service with a `build:`.
    service: String,
    /// Its build context.
    context: PathBuf,
    dockerfile: Dockerfile,
}

impl Compose {
    fn load() -> Compose {
        let tree = yaml_file(&root().join(COMPOSE));
        let (service, build) = entries(&tree["services"])
            .into_iter()
            .find(|(_, service)| !service["build"].is_badvalue())
            .map(|(name, service)| (name, service["build"].clone()))
            .unwrap_or_else(|| panic!("no service of {COMPOSE} has a `build:`"));
        let context = text(&build["context"]).or_else(|| text(&build)).unwrap_or_else(|| ".".into());
        let context = clean(&docker_dir().join(context));
        let dockerfile = context.join(text(&build["dockerfile"]).unwrap_or_else(|| "Dockerfile".into()));
        Compose { dockerfile: Dockerfile::load(&dockerfile), tree, service, context }
    }

    fn services(&self) -> Vec<(String, &Yaml)> {
        entries(&self.tree["services"])
    }

    fn service_names(&self) -> BTreeSet<String> {
        self.services().into_iter().map(|(name, _)| name).collect()
    }

    fn conflux(&self) -> &Yaml {
        &self.tree["services"][self.service.as_str()]
    }

    fn source(&self) -> String {
        format!("{COMPOSE} service {}", self.service)
    }

    /// The admin address and the pipeline files (image paths) of the service's command.
    fn command(&self) -> Result<(String, Vec<PathBuf>), String> {
        let (admin, files) = run_args(&words(&self.conflux()["command"]))?;
        let workdir = self.dockerfile.workdir();
        Ok((admin, files.iter().map(|file| clean(&workdir.join(file))).collect()))
    }

    /// What the service runs; problems with its command or environment go to `problems`.
    fn deployment(&self, problems: &mut Vec<String>) -> Deployment {
        let ports = published(self.conflux());
        let mut files = Vec::new();
        match self.command() {
            Err(error) => problems.push(format!("{}: {error}", self.source())),
            Ok((admin, image_files)) => {
                problems.extend(admin_problems(&self.source(), &admin, &ports));
                for image_file in image_files {
                    match self.dockerfile.context_file(&self.context, &image_file) {
                        Some(file) => files.push(file),
                        None => problems.push(format!(
                            "{}: runs {}, which {} does not COPY into the image",
                            self.source(),
                            image_file.display(),
                            shown(&self.dockerfile.path)
                        )),
                    }
                }
            }
        }
        let mut env = self.dockerfile.env();
        env.extend(runtime_env());
        env.extend(compose_env(&self.source(), self.conflux(), problems));
        Deployment { source: self.source(), files, env, ports }
    }

    /// Whether `name` has a healthcheck: its own, or its image's HEALTHCHECK.
    fn has_healthcheck(&self, name: &str) -> bool {
        !self.tree["services"][name]["healthcheck"].is_badvalue()
            || (name == self.service && self.dockerfile.image_args("HEALTHCHECK").next().is_some())
    }
}

/// A service's `environment:` (a map, or a list of `KEY=VALUE`) as
/// `docker compose up` passes it on a fresh checkout: compose's own
/// `${VAR:-default}` at their defaults, a bare `KEY` (taken from the host) unset.
fn compose_env(source: &str, service: &Yaml, problems: &mut Vec<String>) -> Env {
    let pairs: Vec<(String, Option<String>)> = match &service["environment"] {
        Yaml::Array(list) => list
            .iter()
            .filter_map(text)
            .map(|item| match item.split_once('=') {
                Some((key, value)) => (key.to_string(), Some(value.to_string())),
                None => (item.clone(), None),
            })
            .collect(),
        map => entries(map).into_iter().map(|(key, value)| (key, text(value))).collect(),
    };
    let mut env = Env::new();
    for (key, value) in pairs {
        let Some(value) = value else { continue };
        match resolve(&value, &Env::new()) {
            Ok(value) => {
                env.insert(key, value);
            }
            Err(error) => problems.push(format!("{source} environment {key}: {error}: give it a default")),
        }
    }
    env
}

/// The container ports a service publishes (`"8080:8080"`, `"127.0.0.1:8080:8080"`, `{ target: 8080 }`).
fn published(service: &Yaml) -> BTreeSet<u16> {
    items(&service["ports"])
        .iter()
        .filter_map(|port| match port {
            Yaml::Hash(_) => u16::try_from(port["target"].as_i64()?).ok(),
            _ => text(port)?.rsplit(':').next()?.split('/').next()?.parse().ok(),
        })
        .collect()
}

/// A service's `depends_on` (a list, or a map with conditions): (service, condition).
fn depends_on(service: &Yaml) -> Vec<(String, String)> {
    let started = || "service_started".to_string();
    match &service["depends_on"] {
        Yaml::Array(list) => list.iter().filter_map(text).map(|name| (name, started())).collect(),
        map => entries(map)
            .into_iter()
            .map(|(name, dependency)| (name, text(&dependency["condition"]).unwrap_or_else(started)))
            .collect(),
    }
}

/// A service's bind mounts: (host path relative to docker/, path in the container).
fn bind_mounts(service: &Yaml) -> Vec<(String, String)> {
    items(&service["volumes"])
        .iter()
        .filter_map(|volume| {
            let (source, target) = match volume {
                Yaml::Hash(_) => (text(&volume["source"])?, text(&volume["target"])?),
                _ => {
                    let spec = text(volume)?;
                    let mut parts = spec.split(':');
                    (parts.next()?.to_string(), parts.next()?.to_string())
                }
            };
            (source.starts_with('.') || source.starts_with('/')).then_some((source, target))
        })
        .collect()
}

#[test]
fn compose_runs_existing_pipelines_with_everything_they_read() {
    let compose = Compose::load();
    let mut problems = Vec::new();
    let deployment = compose.deployment(&mut problems);
    problems.extend(deployment.problems());
    let grace = text(&compose.conflux()["stop_grace_period"])
        .and_then(|value| value.parse::<conflux_api::config::Duration>().ok())
        .map_or(Duration::from_secs(10), |d| d.0);
    problems.extend(deployment.grace_problem(grace));
    assert_no_problems(COMPOSE, &problems);
}

#[test]
fn compose_dependencies_mounts_and_service_urls_exist() {
    let compose = Compose::load();
    let names = compose.service_names();
    let mut problems = Vec::new();
    for (name, service) in compose.services() {
        for (dependency, condition) in depends_on(service) {
            if !names.contains(&dependency) {
                problems.push(format!("service {name} depends on {dependency}, which is no service"));
            } else if condition == "service_healthy" && !compose.has_healthcheck(&dependency) {
                problems.push(format!("service {name} waits for {dependency} to be healthy; it has no healthcheck"));
            }
        }
        for (host, _) in bind_mounts(service) {
            if !docker_dir().join(&host).exists() {
                problems.push(format!("service {name} mounts {host}, which does not exist under docker/"));
            }
        }
    }
    let deployment = compose.deployment(&mut Vec::new());
    let urls = deployment.env.iter().filter(|(key, _)| ["_URL", "_URLS", "_BROKERS"].iter().any(|s| key.ends_with(s)));
    for (key, value) in urls {
        for host in hosts(value).into_iter().filter(|host| !names.contains(host)) {
            problems.push(format!("{} sets {key} to host {host}, which is no service", compose.source()));
        }
    }
    assert_no_problems(COMPOSE, &problems);
}

#[test]
fn prometheus_scrapes_the_conflux_admin_port() {
    let compose = Compose::load();
    let config = yaml_file(&docker_dir().join("prometheus.yml"));
    let target = format!("{}:{ADMIN_PORT}", compose.service);
    let scraped = items(&config["scrape_configs"]).iter().any(|job| {
        text(&job["metrics_path"]).is_none_or(|path| path == "/metrics")
            && items(&job["static_configs"])
                .iter()
                .any(|group| items(&group["targets"]).iter().any(|t| text(t).as_deref() == Some(target.as_str())))
    });
    assert!(scraped, "docker/prometheus.yml: no scrape job targets {target} at /metrics");
}

#[test]
fn dockerfile_copies_existing_files_runs_unprivileged_and_exposes_every_port() {
    let compose = Compose::load();
    let dockerfile = &compose.dockerfile;
    let name = shown(&dockerfile.path);
    let mut problems = Vec::new();
    for copy in dockerfile.stages.iter().flat_map(|stage| Dockerfile::context_copies(stage)) {
        for source in copy.sources.iter().filter(|source| !compose.context.join(source).exists()) {
            problems.push(format!("{name}: COPY {source}, which is not in the build context"));
        }
    }
    let user = dockerfile.image_args("USER").last().map(|user| user.split(':').next().unwrap_or("").to_string());
    match user.as_deref() {
        None => problems.push(format!("{name}: the image sets no USER, so it runs as root")),
        Some(user) if !user.parse::<u32>().is_ok_and(|uid| uid != 0) => problems.push(format!(
            "{name}: USER {user} should be a numeric uid other than 0 (Kubernetes' runAsNonRoot checks the number)"
        )),
        Some(_) => {}
    }
    let deployment = compose.deployment(&mut Vec::new());
    let exposed = dockerfile.exposed();
    let wanted = deployment.listening_ports().into_iter().chain([ADMIN_PORT]);
    for port in wanted.filter(|port| !exposed.contains(port)) {
        problems.push(format!("{name}: does not EXPOSE {port}"));
    }
    // Files a pipeline reads relative to itself must be in the image at the same place.
    let (_, image_files) = compose.command().unwrap_or_default();
    for image_file in &image_files {
        let Some(file) = dockerfile.context_file(&compose.context, image_file).filter(|f| f.is_file()) else {
            continue;
        };
        let folder = image_file.parent().unwrap_or(Path::new("/"));
        for needed in Pipeline::load(&file).read_files() {
            let in_image = clean(&folder.join(&needed));
            if !dockerfile.context_file(&compose.context, &in_image).is_some_and(|f| f.exists()) {
                problems.push(format!(
                    "{name}: {} reads {needed}, but the image has no {}",
                    shown(&file),
                    in_image.display()
                ));
            }
        }
    }
    assert_no_problems(&name, &problems);
}

// ---------------------------------------------------------------------------
// Kubernetes

/// Every document of every manifest under docker/k8s (the Secret example and
/// the kustomization too), with its file.
struct Manifests {
    docs: Vec<(String, Yaml)>,
}

impl Manifests {
    fn load() -> Manifests {
        let docs = files_in(&docker_dir().join("k8s"), &["yaml", "yml"])
            .iter()
            .flat_map(|file| {
                let name = shown(file);
                yaml_docs(file).into_iter().filter(|doc| !doc.is_null()).map(move |doc| (name.clone(), doc))
            })
            .collect();
        Manifests { docs }
    }

    fn of_kind<'a, 'k>(&'a self, kind: &'k str) -> impl Iterator<Item = &'a Yaml> + use<'a, 'k> {
        self.docs.iter().map(|(_, doc)| doc).filter(move |doc| text(&doc["kind"]).as_deref() == Some(kind))
    }

    fn named(&self, kind: &str, name: &str) -> Option<&Yaml> {
        self.of_kind(kind).find(|doc| text(&doc["metadata"]["name"]).as_deref() == Some(name))
    }

    /// The one document of `kind`.
    fn only(&self, kind: &str) -> &Yaml {
        let all: Vec<&Yaml> = self.of_kind(kind).collect();
        assert_eq!(all.len(), 1, "docker/k8s should hold one {kind}, it holds {}", all.len());
        all[0]
    }

    fn deployment(&self) -> &Yaml {
        self.only("Deployment")
    }

    fn kustomization(&self) -> &Yaml {
        self.only("Kustomization")
    }

    /// The value `valueFrom` takes from a ConfigMap or Secret of the manifests;
    /// a reference to nothing is a problem.
    fn value_from(&self, from: &Yaml, var: &str, problems: &mut Vec<String>) -> Option<String> {
        for (kind, reference) in [("ConfigMap", &from["configMapKeyRef"]), ("Secret", &from["secretKeyRef"])] {
            let (Some(name), Some(key)) = (text(&reference["name"]), text(&reference["key"])) else { continue };
            let value = self.named(kind, &name).and_then(|doc| object_data(doc).remove(&key));
            if value.is_none() {
                problems.push(format!("env {var} reads key {key} of {kind} {name}, which no manifest holds"));
            }
            return value;
        }
        None
    }

    /// A container's environment, every reference looked up in the manifests.
    fn container_env(&self, container: &Yaml, problems: &mut Vec<String>) -> Env {
        let mut env = Env::new();
        for source in items(&container["envFrom"]) {
            for (kind, reference) in [("ConfigMap", &source["configMapRef"]), ("Secret", &source["secretRef"])] {
                let Some(name) = text(&reference["name"]) else { continue };
                match self.named(kind, &name) {
                    Some(doc) => env.extend(object_data(doc)),
                    None => problems.push(format!("envFrom names {kind} {name}, which no manifest defines")),
                }
            }
        }
        for var in items(&container["env"]) {
            let Some(name) = text(&var["name"]) else { continue };
            let value = text(&var["value"]).or_else(|| self.value_from(&var["valueFrom"], &name, problems));
            env.extend(value.map(|value| (name, value)));
        }
        env
    }

    /// The variables a container takes from Secrets (`secretKeyRef`, `envFrom.secretRef`).
    fn secret_vars(&self, container: &Yaml) -> BTreeSet<String> {
        let single = items(&container["env"])
            .iter()
            .filter(|var| !var["valueFrom"]["secretKeyRef"].is_badvalue())
            .filter_map(|var| text(&var["name"]));
        let whole = items(&container["envFrom"])
            .iter()
            .filter_map(|source| self.named("Secret", &text(&source["secretRef"]["name"])?))
            .flat_map(|secret| object_data(secret).into_keys());
        single.chain(whole).collect()
    }

    /// The repository file behind a pipeline path of the args: the ConfigMap
    /// volume mounted there, its key, the file kustomize fills that key from;
    /// the image must keep that file at the same path, so that paths relative
    /// to the pipeline (`../schemas/…`) resolve as they do in the image.
    fn pipeline_file(&self, path: &Path, compose: &Compose) -> Result<PathBuf, String> {
        let pod = &self.deployment()["spec"]["template"]["spec"];
        let shown_path = path.display();
        let (volume, key) = items(&pod["containers"][0]["volumeMounts"])
            .iter()
            .find_map(|mount| {
                let key = path.strip_prefix(text(&mount["mountPath"])?).ok()?;
                Some((text(&mount["name"])?, key.to_str()?.to_string()))
            })
            .ok_or_else(|| format!("args name {shown_path}, under no volumeMount"))?;
        let config_map = items(&pod["volumes"])
            .iter()
            .find(|v| text(&v["name"]).as_deref() == Some(volume.as_str()))
            .and_then(|v| text(&v["configMap"]["name"]))
            .ok_or_else(|| format!("args name {shown_path}, but volume {volume} is no ConfigMap"))?;
        if !self.named("ConfigMap", &config_map).is_some_and(|doc| object_data(doc).contains_key(&key)) {
            return Err(format!("args name {shown_path}, but no ConfigMap {config_map} of docker/k8s lists key {key}"));
        }
        let file = generated(self.kustomization(), &config_map)
            .remove(&key)
            .ok_or_else(|| format!("the configMapGenerator {config_map} of kustomization.yaml does not fill {key}"))?;
        if compose.dockerfile.context_file(&compose.context, &clean(path)).as_ref() != Some(&file) {
            return Err(format!(
                "{shown_path} is not where the image keeps {}: relative paths (../schemas) would not resolve",
                shown(&file)
            ));
        }
        Ok(file)
    }

    /// What the Deployment runs; problems with its args or references go to `problems`.
    fn run(&self, compose: &Compose, problems: &mut Vec<String>) -> Deployment {
        let source =
            format!("docker/k8s Deployment {}", text(&self.deployment()["metadata"]["name"]).unwrap_or_default());
        let container = container(self.deployment());
        let ports = container_ports(container);
        let mut files = Vec::new();
        match run_args(&words(&container["args"])) {
            Err(error) => problems.push(format!("{source}: {error}")),
            Ok((admin, paths)) => {
                problems.extend(admin_problems(&source, &admin, &ports));
                for path in paths {
                    match self.pipeline_file(Path::new(&path), compose) {
                        Ok(file) => files.push(file),
                        Err(error) => problems.push(format!("{source}: {error}")),
                    }
                }
            }
        }
        let mut env = compose.dockerfile.env();
        env.extend(runtime_env());
        env.extend(self.container_env(container, problems));
        Deployment { source, files, env, ports }
    }
}

/// The container that runs conflux: the Deployment's first.
fn container(deployment: &Yaml) -> &Yaml {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn container_ports(container: &Yaml) -> BTreeSet<u16> {
    items(&container["ports"]).iter().filter_map(|port| u16::try_from(port["containerPort"].as_i64()?).ok()).collect()
}

/// A port given by number, or by the name of one of the container's ports.
fn port_number(container: &Yaml, port: &Yaml) -> Option<u16> {
    if let Some(number) = port.as_i64() {
        return u16::try_from(number).ok();
    }
    let name = text(port)?;
    let named = items(&container["ports"]).iter().find(|p| text(&p["name"]).as_deref() == Some(name.as_str()))?;
    u16::try_from(named["containerPort"].as_i64()?).ok()
}

/// The keys and values of a ConfigMap or Secret (`data`, `stringData`); a
/// Secret's base64 `data` counts as set, its value unknown.
fn object_data(doc: &Yaml) -> Env {
    let secret = text(&doc["kind"]).as_deref() == Some("Secret");
    let data = entries(&doc["data"])
        .into_iter()
        .map(|(k, v)| (k, if secret { Some("<secret>".to_string()) } else { text(v) }));
    let string_data = entries(&doc["stringData"]).into_iter().map(|(k, v)| (k, text(v)));
    data.chain(string_data).map(|(k, v)| (k, v.unwrap_or_default())).collect()
}

/// What the kustomization's configMapGenerator `name` fills: key → file
/// (`files:` entries are `path` or `key=path`, relative to docker/k8s).
fn generated(kustomization: &Yaml, name: &str) -> BTreeMap<String, PathBuf> {
    let dir = docker_dir().join("k8s");
    items(&kustomization["configMapGenerator"])
        .iter()
        .filter(|generator| text(&generator["name"]).as_deref() == Some(name))
        .flat_map(|generator| items(&generator["files"]).iter().filter_map(text))
        .map(|spec| match spec.split_once('=') {
            Some((key, path)) => (key.to_string(), clean(&dir.join(path))),
            None => (file_name(&spec), clean(&dir.join(&spec))),
        })
        .collect()
}

/// `probe` of the container is an HTTP GET of `path` on the admin port.
fn probe_problem(container: &Yaml, probe: &str, path: &str) -> Option<String> {
    let get = &container[probe]["httpGet"];
    let right = text(&get["path"]).as_deref() == Some(path) && port_number(container, &get["port"]) == Some(ADMIN_PORT);
    (!right).then(|| format!("{probe} should GET {path} on port {ADMIN_PORT} (it is {:?})", get))
}

#[test]
fn k8s_manifests_parse_and_kustomize_finds_its_files() {
    let manifests = Manifests::load();
    let dir = docker_dir().join("k8s");
    let mut problems = Vec::new();
    for (file, doc) in &manifests.docs {
        if text(&doc["apiVersion"]).is_none() || text(&doc["kind"]).is_none() {
            problems.push(format!("{file}: a document without apiVersion and kind"));
        }
    }
    let kustomization = manifests.kustomization();
    for resource in items(&kustomization["resources"]).iter().filter_map(text) {
        if !dir.join(&resource).exists() {
            problems.push(format!("kustomization.yaml lists resource {resource}, which does not exist"));
        }
    }
    for generator in items(&kustomization["configMapGenerator"]) {
        let name = text(&generator["name"]).unwrap_or_default();
        for (key, file) in generated(kustomization, &name).into_iter().filter(|(_, file)| !file.is_file()) {
            problems.push(format!("configMapGenerator {name} fills {key} from {}, which does not exist", shown(&file)));
        }
    }
    assert_no_problems("docker/k8s", &problems);
}

#[test]
fn k8s_deployment_runs_the_configmap_pipelines_with_everything_they_read() {
    let compose = Compose::load();
    let manifests = Manifests::load();
    let mut problems = Vec::new();
    let deployment = manifests.run(&compose, &mut problems);
    problems.extend(deployment.problems());
    let listening = deployment.listening_ports();
    for port in deployment.ports.iter().filter(|port| **port != ADMIN_PORT && !listening.contains(*port)) {
        problems.push(format!("{}: declares containerPort {port}, on which no pipeline listens", deployment.source));
    }
    // With a read-only root file system, whatever is written needs a volume.
    let container = container(manifests.deployment());
    if container["securityContext"]["readOnlyRootFilesystem"].as_bool() == Some(true) {
        let writable: Vec<String> = items(&container["volumeMounts"])
            .iter()
            .filter(|mount| mount["readOnly"].as_bool() != Some(true))
            .filter_map(|mount| text(&mount["mountPath"]))
            .collect();
        for pipeline in deployment.pipelines() {
            for (path, written) in pipeline.written_paths(&deployment.env) {
                if !writable.iter().any(|mount| Path::new(&written).starts_with(mount)) {
                    problems.push(format!("{} {path} writes {written}, on no writable volumeMount", pipeline.name));
                }
            }
        }
    }
    assert_no_problems("docker/k8s", &problems);
}

#[test]
fn k8s_deployment_probes_scales_and_drains() {
    let compose = Compose::load();
    let manifests = Manifests::load();
    let deployment = manifests.deployment();
    let container = container(deployment);
    let pod = &deployment["spec"]["template"]["spec"];
    let mut problems: Vec<String> = [("livenessProbe", "/health"), ("readinessProbe", "/ready")]
        .into_iter()
        .filter_map(|(probe, path)| probe_problem(container, probe, path))
        .collect();
    if deployment["spec"]["replicas"].as_i64().unwrap_or(1) < 2 {
        problems.push("replicas should be above 1: the pipelines are written to share work".into());
    }
    let non_root = |context: &Yaml| context["runAsNonRoot"].as_bool() == Some(true);
    if !non_root(&pod["securityContext"]) && !non_root(&container["securityContext"]) {
        problems.push("securityContext should set runAsNonRoot: true".into());
    }
    for bound in ["requests", "limits"] {
        if container["resources"][bound].as_hash().is_none() {
            problems.push(format!("the container sets no resources.{bound}"));
        }
    }
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(30);
    let run = manifests.run(&compose, &mut Vec::new());
    problems.extend(run.grace_problem(Duration::from_secs(u64::try_from(grace).unwrap_or(0))));
    assert_no_problems("docker/k8s Deployment", &problems);
}

#[test]
fn k8s_takes_credentials_from_secrets() {
    let compose = Compose::load();
    let manifests = Manifests::load();
    let container = container(manifests.deployment());
    let secrets = manifests.secret_vars(container);
    let mut problems = Vec::new();
    // What an `auth` option reads (JWT secrets, API keys) has a development
    // default in the pipelines; a cluster must not run with it.
    for pipeline in manifests.run(&compose, &mut Vec::new()).pipelines() {
        for (path, raw) in pipeline.settings().filter(|(path, _)| path.contains(".auth.")) {
            for var in variables(raw).into_iter().filter(|var| !secrets.contains(var)) {
                problems
                    .push(format!("{} {path} reads {var}, which the Deployment takes from no Secret", pipeline.name));
            }
        }
    }
    let literals = items(&container["env"]).iter().filter_map(|var| Some((text(&var["name"])?, text(&var["value"])?)));
    for (var, _) in literals.filter(|(var, _)| ["SECRET", "PASSWORD", "TOKEN", "_KEY"].iter().any(|w| var.contains(w)))
    {
        problems.push(format!("env {var} is written in the Deployment; read it from a Secret"));
    }
    assert_no_problems("docker/k8s Deployment", &problems);
}

#[test]
fn k8s_services_select_the_pods_and_target_declared_ports() {
    let manifests = Manifests::load();
    let deployment = manifests.deployment();
    let container = container(deployment);
    let declared = container_ports(container);
    let labels = entries(&deployment["spec"]["template"]["metadata"]["labels"]);
    let mut problems = Vec::new();
    for service in manifests.of_kind("Service") {
        let name = text(&service["metadata"]["name"]).unwrap_or_default();
        for (key, value) in entries(&service["spec"]["selector"]) {
            if !labels.iter().any(|(k, v)| *k == key && text(v) == text(value)) {
                problems.push(format!("Service {name} selects {key}={value:?}, a label the pods do not carry"));
            }
        }
        for port in items(&service["spec"]["ports"]) {
            let target = if port["targetPort"].is_badvalue() { &port["port"] } else { &port["targetPort"] };
            if !port_number(container, target).is_some_and(|number| declared.contains(&number)) {
                problems.push(format!("Service {name} targets port {target:?}, which the container does not declare"));
            }
        }
    }
    assert_no_problems("docker/k8s Services", &problems);
}

// ---------------------------------------------------------------------------
// Grafana and the metrics the code exports

/// What a registration declares, which decides the names it is exported under.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    /// The scan could not tell: any of the names.
    Unknown,
}

impl Kind {
    fn named(word: &str) -> Kind {
        match word {
            "Counter" => Kind::Counter,
            "Gauge" => Kind::Gauge,
            "Histogram" => Kind::Histogram,
            _ => Kind::Unknown,
        }
    }

    /// The suffixes Prometheus exporting adds (counters `_total`, histograms their series).
    fn suffixes(self) -> &'static [&'static str] {
        match self {
            Kind::Counter => &["_total"],
            Kind::Gauge => &[""],
            Kind::Histogram => &["_bucket", "_sum", "_count"],
            Kind::Unknown => &["", "_total", "_bucket", "_sum", "_count"],
        }
    }
}

/// Every metric name the code exports (`conflux_` + name + suffix), read
/// from the registration calls in the sources at test time.
fn exported_metrics() -> BTreeSet<String> {
    let mut sources = Vec::new();
    for dir in ["core", "plugins"] {
        rust_sources(&root().join(dir), &mut sources);
    }
    sources
        .iter()
        .flat_map(|file| registrations(&read(file)))
        .flat_map(|(name, kind)| kind.suffixes().iter().map(move |suffix| format!("conflux_{name}{suffix}")))
        .collect()
}

/// The `.rs` files of the crates' `src/` folders (tests and build output left out).
fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && name != "tests" {
                rust_sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") && path.components().any(|c| c.as_os_str() == "src") {
            out.push(path);
        }
    }
}

/// The metrics a source file registers: a plugin's `counter`/`gauge`
/// declarations, the engine's registry families and its own collectors.
fn registrations(source: &str) -> Vec<(String, Kind)> {
    let source = source.split("#[cfg(test)]\nmod tests").next().unwrap_or(source);
    let mut found = Vec::new();
    for call in [".counter(", ".gauge(", ".register(", ".encode_descriptor("] {
        for (at, _) in source.match_indices(call) {
            let rest = source[at + call.len()..].trim_start();
            let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) else { continue };
            let statement = rest.split(';').next().unwrap_or(rest);
            let kind = match call {
                ".counter(" => Kind::Counter,
                ".gauge(" => Kind::Gauge,
                ".register(" => family_kind(source, statement),
                _ => identifier_after(statement, "MetricType::").map_or(Kind::Unknown, Kind::named),
            };
            found.push((name.to_string(), kind));
        }
    }
    found
}

/// The identifier right after the first `marker` in `text`.
fn identifier_after<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The kind of a family handed to `registry.register(name, help, family.clone())`,
/// read from its field's type (`received: Family<Labels, Counter>`).
fn family_kind(source: &str, statement: &str) -> Kind {
    let family = statement
        .split_once(".clone()")
        .and_then(|(before, _)| before.rsplit(|c: char| !(c.is_alphanumeric() || c == '_')).next())
        .filter(|family| !family.is_empty());
    family.and_then(|f| identifier_after(source, &format!("{f}: Family<Labels, "))).map_or(Kind::Unknown, Kind::named)
}

/// The metric names of a PromQL expression (or of any text): identifiers starting with `conflux_`.
fn metric_names(expr: &str) -> Vec<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    expr.match_indices("conflux_")
        .filter(|(at, _)| !expr[..*at].ends_with(ident))
        .map(|(at, _)| expr[at..].chars().take_while(|c| ident(*c)).collect::<String>())
        .collect()
}

/// Every value stored under `key` at any depth of a JSON document.
fn json_under<'a>(value: &'a Value, key: &str) -> Vec<&'a Value> {
    let mut found = Vec::new();
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Value::Object(map) => {
                found.extend(map.iter().filter(|(k, _)| k.as_str() == key).map(|(_, v)| v));
                pending.extend(map.values());
            }
            Value::Array(list) => pending.extend(list),
            _ => {}
        }
    }
    found
}

/// The strings under any of `keys` in a JSON document.
fn json_strings<'a>(value: &'a Value, keys: &[&str]) -> Vec<&'a str> {
    keys.iter().flat_map(|key| json_under(value, key)).filter_map(Value::as_str).collect()
}

/// The tables an SQL query reads: the name after each FROM and JOIN.
fn sql_tables(sql: &str) -> Vec<String> {
    let words: Vec<&str> =
        sql.split(|c: char| c.is_whitespace() || c == ',' || c == ';').filter(|w| !w.is_empty()).collect();
    words
        .windows(2)
        .filter(|pair| pair[0].eq_ignore_ascii_case("from") || pair[0].eq_ignore_ascii_case("join"))
        .map(|pair| pair[1].trim_matches('"').to_lowercase())
        .filter(|name| !name.contains(['(', ')']))
        .collect()
}

/// The dashboard JSON files Grafana is provisioned with, parsed.
fn dashboards() -> Vec<(String, Value)> {
    files_in(&docker_dir().join("grafana/dashboards"), &["json"])
        .iter()
        .map(|file| {
            let dashboard = serde_json::from_str::<Value>(&read(file))
                .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", shown(file)));
            (shown(file), dashboard)
        })
        .collect()
}

#[test]
fn grafana_dashboards_query_metrics_the_code_exports() {
    let exported = exported_metrics();
    let all = dashboards();
    assert!(all.len() >= 2, "docker/grafana/dashboards should hold the metrics and the TimescaleDB dashboards");
    let mut problems = Vec::new();
    let mut queried = 0;
    for (file, dashboard) in &all {
        for expr in json_strings(dashboard, &["expr", "definition", "query"]) {
            for metric in metric_names(expr) {
                queried += 1;
                if !exported.contains(&metric) {
                    problems.push(format!("{file}: `{expr}` reads {metric}, which the code does not export"));
                }
            }
        }
    }
    assert!(queried > 0, "no dashboard queries a conflux_ metric");
    assert_no_problems("Grafana dashboards", &problems);
}

#[test]
fn metric_scan_finds_every_metric_docs_operations_md_lists() {
    let exported = exported_metrics();
    let documented = metric_names(&read(&root().join("docs/operations.md")));
    assert!(documented.len() > 10, "docs/operations.md lists too few conflux_ metrics: {documented:?}");
    // The docs name a histogram by its family (`conflux_batch_duration_seconds`).
    let missing: Vec<String> = documented
        .into_iter()
        .filter(|name| !exported.contains(name) && !exported.contains(&format!("{name}_bucket")))
        .collect();
    assert!(missing.is_empty(), "docs/operations.md lists metrics the code does not export: {missing:?}");
}

#[test]
fn grafana_provisioning_matches_the_dashboards_and_the_stack() {
    let compose = Compose::load();
    let names = compose.service_names();
    let provisioning = docker_dir().join("grafana/provisioning");
    let mut problems = Vec::new();
    let sources = yaml_file(&provisioning.join("datasources/datasources.yaml"));
    let mut uids: BTreeSet<String> = BTreeSet::new();
    for source in items(&sources["datasources"]) {
        uids.extend(text(&source["uid"]));
        let url = text(&source["url"]).unwrap_or_default();
        for host in hosts(&url).into_iter().filter(|host| !names.contains(host)) {
            problems.push(format!("datasource {:?} points at host {host}, which is no service", text(&source["name"])));
        }
    }
    for (file, dashboard) in dashboards() {
        let used = json_under(&dashboard, "datasource").into_iter().filter_map(|ds| ds.get("uid")?.as_str());
        for uid in used.filter(|uid| !uids.contains(*uid)) {
            problems.push(format!("{file} uses datasource uid {uid}, which datasources.yaml does not provision"));
        }
    }
    // Each dashboards provider reads a folder the compose file mounts from docker/grafana/dashboards.
    let providers = yaml_file(&provisioning.join("dashboards/dashboards.yaml"));
    let mounts: Vec<(String, String)> = compose.services().into_iter().flat_map(|(_, s)| bind_mounts(s)).collect();
    for provider in items(&providers["providers"]) {
        let path = text(&provider["options"]["path"]).unwrap_or_default();
        let mounted = mounts.iter().any(|(host, target)| {
            *target == path && clean(&docker_dir().join(host)) == docker_dir().join("grafana/dashboards")
        });
        if !mounted {
            problems.push(format!("dashboards provider reads {path}, where {COMPOSE} mounts no ./grafana/dashboards"));
        }
    }
    assert_no_problems("docker/grafana", &problems);
}

#[test]
fn timescale_dashboard_reads_tables_the_pipelines_write() {
    let compose = Compose::load();
    let deployment = compose.deployment(&mut Vec::new());
    let written: BTreeSet<String> = deployment.pipelines().iter().flat_map(Pipeline::postgres_tables).collect();
    let mut problems = Vec::new();
    for (file, dashboard) in dashboards() {
        for sql in json_strings(&dashboard, &["rawSql"]) {
            for table in sql_tables(sql).into_iter().filter(|table| !written.contains(table)) {
                problems
                    .push(format!("{file}: `{sql}` reads {table}, which no deployed pipeline writes ({written:?})"));
            }
        }
    }
    assert_no_problems("Grafana SQL panels", &problems);
}
