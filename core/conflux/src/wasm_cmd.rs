//! `conflux wasm new` and `conflux wasm build`: write and build a guest crate
//! for the `wasm` stage without a checkout of this repository.
//!
//! The guest SDK (`plugins/conflux-wasm-guest`) and its WIT contract are
//! embedded in the binary and written beside the new crate, so the binary a
//! user has is all it takes to start a stage.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context};

/// The target guests build for: a WASI 0.2 component.
const TARGET: &str = "wasm32-wasip2";

#[derive(clap::Subcommand)]
pub enum WasmCommand {
    /// Write a ready guest crate NAME/ (a Rust `wasm` stage) that builds outside this repository.
    New {
        /// Crate name (letters, digits, `-`, `_`); also the folder written.
        name: String,
        /// Folder to create NAME/ in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Build a guest crate for wasm32-wasip2 and print the path of its `.wasm`.
    Build {
        /// The crate's folder.
        #[arg(default_value = ".")]
        path: PathBuf,
    },
}

pub fn run(command: WasmCommand) -> anyhow::Result<ExitCode> {
    match command {
        WasmCommand::New { name, dir } => {
            let root = dir.join(&name);
            new_crate(&name, &root)?;
            println!("wrote {}", root.display());
            println!("build it with: conflux wasm build {}", root.display());
            Ok(ExitCode::SUCCESS)
        }
        WasmCommand::Build { path } => {
            let wasm = build(&path)?;
            println!("{}", wasm.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The SDK's files, at the paths they have in this repository.
const SDK_MANIFEST: &str = include_str!("../../../plugins/conflux-wasm-guest/Cargo.toml");
const SDK_SOURCES: &[(&str, &str)] = &[
    ("lib.rs", include_str!("../../../plugins/conflux-wasm-guest/src/lib.rs")),
    ("fields.rs", include_str!("../../../plugins/conflux-wasm-guest/src/fields.rs")),
    ("paths.rs", include_str!("../../../plugins/conflux-wasm-guest/src/paths.rs")),
];
const WIT: &str = include_str!("../../../schemas/wit/conflux-stage.wit");
/// Where the SDK's `[dependencies]` take their versions from (`x.workspace = true`).
const ROOT_MANIFEST: &str = include_str!("../../../Cargo.toml");
/// The lock the repository's example guests are built and tested with: a new
/// crate starts from the same dependency versions (cargo drops what it does not use).
const GUESTS_LOCK: &str = include_str!("../../../plugins/conflux-wasm/guests/Cargo.lock");

const LIB_RS: &str = include_str!("wasm_cmd/lib.rs.tmpl");
const README: &str = include_str!("wasm_cmd/README.md.tmpl");
const PIPELINE: &str = include_str!("wasm_cmd/pipeline.yaml.tmpl");
const EVENTS: &str = include_str!("wasm_cmd/events.ndjson");
const GITIGNORE: &str = include_str!("wasm_cmd/gitignore.tmpl");

/// Where the SDK lands in a new crate. `generate!` reads the WIT at
/// `../../schemas/wit` from the SDK's manifest folder; keeping the
/// repository's layout under `sdk/` lets the SDK sources go out unchanged.
const SDK_DIR: &str = "sdk/plugins/conflux-wasm-guest";
const WIT_DIR: &str = "sdk/schemas/wit";

/// Writes the crate `name` at `root` (which must be missing or empty).
fn new_crate(name: &str, root: &Path) -> anyhow::Result<()> {
    check_name(name)?;
    if root.exists() {
        let mut entries =
            std::fs::read_dir(root).with_context(|| format!("{} exists and is not a folder", root.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} already exists and is not empty: not overwriting it (pick another name or --dir)",
                root.display()
            );
        }
    }
    let lib = name.replace('-', "_");
    let fill = |text: &str| text.replace("{{name}}", name).replace("{{lib}}", &lib);
    let mut files = vec![
        ("Cargo.toml".to_string(), guest_manifest(name)?),
        ("Cargo.lock".to_string(), GUESTS_LOCK.to_string()),
        ("src/lib.rs".to_string(), fill(LIB_RS)),
        ("README.md".to_string(), fill(README)),
        ("pipeline.yaml".to_string(), fill(PIPELINE)),
        ("events.ndjson".to_string(), EVENTS.to_string()),
        (".gitignore".to_string(), GITIGNORE.to_string()),
        (format!("{SDK_DIR}/Cargo.toml"), sdk_manifest()?),
        (format!("{WIT_DIR}/conflux-stage.wit"), WIT.to_string()),
    ];
    for (file, text) in SDK_SOURCES {
        files.push((format!("{SDK_DIR}/src/{file}"), text.to_string()));
    }
    for (file, text) in files {
        let path = root.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Cargo's rules for a package name, plus names that would clash with the
/// SDK or the standard crates, so the mistake shows here rather than in cargo.
fn check_name(name: &str) -> anyhow::Result<()> {
    const TAKEN: &[&str] = &[
        "conflux-wasm-guest",
        "conflux_wasm_guest",
        "std",
        "core",
        "alloc",
        "proc_macro",
        "proc-macro",
        "test",
        "self",
        "super",
        "crate",
        "Self",
    ];
    let Some(first) = name.chars().next() else { bail!("the crate name is empty") };
    if name.len() > 64 {
        bail!("`{name}` is not a valid crate name: at most 64 characters");
    }
    if !first.is_ascii_alphabetic() {
        bail!("`{name}` is not a valid crate name: it must start with a letter");
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
        bail!("`{name}` is not a valid crate name: `{bad}` (use letters, digits, `-` and `_`)");
    }
    if TAKEN.contains(&name) || is_keyword(name) {
        bail!("`{name}` is not a valid crate name: it is reserved or taken by the SDK");
    }
    Ok(())
}

fn is_keyword(name: &str) -> bool {
    const KEYWORDS: &[&str] = &[
        "as", "async", "await", "break", "const", "continue", "dyn", "else", "enum", "extern", "false", "fn", "for",
        "if", "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return", "static", "struct",
        "trait", "true", "type", "unsafe", "use", "where", "while", "abstract", "become", "box", "do", "final", "gen",
        "macro", "override", "priv", "try", "typeof", "unsized", "virtual", "yield",
    ];
    KEYWORDS.contains(&name)
}

/// The SDK's `[dependencies]` as standalone lines: `x.workspace = true`
/// becomes the root workspace's `x = …`, so versions follow this repository.
fn sdk_dependencies() -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for line in section(SDK_MANIFEST, "dependencies") {
        match line.split_once(".workspace") {
            Some((dep, _)) => {
                let dep = dep.trim();
                let resolved = section(ROOT_MANIFEST, "workspace.dependencies")
                    .find(|l| toml_key(l) == dep)
                    .with_context(|| format!("the SDK's dependency `{dep}` is not in the workspace's"))?;
                lines.push(resolved.to_string());
            }
            None => lines.push(line.to_string()),
        }
    }
    Ok(lines)
}

/// The key of a `key = value` line.
fn toml_key(line: &str) -> &str {
    line.split_once('=').map_or("", |(key, _)| key.trim())
}

/// The non-empty, non-comment lines of a TOML table.
fn section<'a>(manifest: &'a str, table: &str) -> impl Iterator<Item = &'a str> {
    let header = format!("[{table}]");
    manifest
        .lines()
        .map(str::trim)
        .skip_while(move |l| *l != header)
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// The SDK's manifest without workspace inheritance.
fn sdk_manifest() -> anyhow::Result<String> {
    let version = env!("CARGO_PKG_VERSION");
    Ok(format!(
        "# The Conflux guest SDK, written by `conflux wasm new` (conflux {version}).\n\
         [package]\n\
         name = \"conflux-wasm-guest\"\n\
         version = \"{version}\"\n\
         edition = \"2021\"\n\
         license = \"Apache-2.0\"\n\
         publish = false\n\n\
         [dependencies]\n{}\n",
        sdk_dependencies()?.join("\n")
    ))
}

/// The new crate's manifest: the SDK's own dependency lines, so both agree.
fn guest_manifest(name: &str) -> anyhow::Result<String> {
    let deps: Vec<String> =
        sdk_dependencies()?.into_iter().filter(|l| matches!(toml_key(l), "serde" | "serde_json")).collect();
    Ok(format!(
        "[package]\n\
         name = \"{name}\"\n\
         version = \"0.1.0\"\n\
         edition = \"2021\"\n\
         publish = false\n\n\
         [lib]\n\
         crate-type = [\"cdylib\"]\n\n\
         [dependencies]\n\
         conflux-wasm-guest = {{ path = \"{SDK_DIR}\" }}\n{}\n\n\
         # Its own workspace, so a parent folder's workspace does not claim it.\n\
         [workspace]\n\n\
         # Small, fast components; a panic traps (the host fails the batch) either way.\n\
         [profile.release]\n\
         opt-level = 3\n\
         lto = true\n\
         codegen-units = 1\n\
         panic = \"abort\"\n",
        deps.join("\n")
    ))
}

/// Builds the crate at `path` for wasm32-wasip2 and returns its component.
fn build(path: &Path) -> anyhow::Result<PathBuf> {
    let manifest = path.join("Cargo.toml");
    if !manifest.is_file() {
        bail!("no Cargo.toml in {} (make a guest crate with `conflux wasm new NAME`)", path.display());
    }
    check_target(path)?;
    // JSON messages on stdout name the artifacts wherever the target folder is
    // (CARGO_TARGET_DIR, .cargo/config.toml); diagnostics still go to stderr as text.
    let mut child = Command::new("cargo")
        .args(["build", "--release", "--target", TARGET, "--message-format=json-render-diagnostics", "--manifest-path"])
        .arg(&manifest)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run cargo (is Rust installed? https://rustup.rs)")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut wasm = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.context("cannot read cargo's output")?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        let cdylib = message["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib"));
        if message["reason"] == "compiler-artifact" && cdylib {
            let files = message["filenames"].as_array().into_iter().flatten().filter_map(|f| f.as_str());
            if let Some(file) = files.into_iter().find(|f| f.ends_with(".wasm")) {
                wasm = Some(PathBuf::from(file));
            }
        }
    }
    let status = child.wait().context("cargo did not finish")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    wasm.context("cargo built no .wasm (is the crate a `cdylib`?)")
}

/// Fails with the fix when rustup knows the target is missing. Without
/// rustup (a distribution's Rust, say) the build is tried and cargo says.
fn check_target(path: &Path) -> anyhow::Result<()> {
    // In the crate's folder, so a rust-toolchain file there picks the toolchain asked about.
    let output = match Command::new("rustup").args(["target", "list", "--installed"]).current_dir(path).output() {
        Ok(output) if output.status.success() => output,
        _ => return Ok(()),
    };
    if String::from_utf8_lossy(&output.stdout).lines().any(|l| l.trim() == TARGET) {
        return Ok(());
    }
    bail!("the {TARGET} target is not installed; add it with:\n    rustup target add {TARGET}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_take_the_sdks_dependency_versions() {
        let sdk = sdk_manifest().unwrap();
        assert!(!sdk.contains("workspace"), "{sdk}");
        for dep in ["serde =", "serde_json =", "wit-bindgen ="] {
            assert!(sdk.contains(dep), "{dep} in {sdk}");
        }
        let guest = guest_manifest("my-stage").unwrap();
        assert!(guest.contains("serde = ") && guest.contains("serde_json = "), "{guest}");
        assert!(guest.contains("[workspace]") && guest.contains("cdylib"), "{guest}");
    }

    #[test]
    fn names_follow_cargos_rules() {
        for good in ["demo", "my-stage", "a_1"] {
            check_name(good).unwrap();
        }
        for bad in ["", "1st", "-x", "a b", "a/b", "ü", "fn", "std", "conflux-wasm-guest", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
