//! The `wasm` stage from the command line, with guests built from source.

use std::process::Command;

/// Builds the example guests and returns the folder of `.wasm` files.
fn guests() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/build-wasm-guests.sh");
    let output = Command::new("bash").arg(script).output().expect("run build-wasm-guests.sh");
    assert!(
        output.status.success(),
        "building the wasm guests failed (is the wasm32-wasip2 target installed?):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

#[test]
fn conflux_test_runs_the_wasm_case() {
    let case = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/cases/wasm.yaml");
    let output =
        Command::new(env!("CARGO_BIN_EXE_conflux")).args(["test", case]).env("WASM_GUESTS", guests()).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("4 passed, 0 failed"), "{stdout}");
}

#[test]
fn lint_points_at_a_missing_module() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        "inputs:\n  in: { type: generate }\nstages:\n  g:\n    type: wasm\n    from: in\n    module: ./missing.wasm\noutputs:\n  out: { type: drop, from: g }\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_conflux")).args(["lint", file.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(format!("{stdout}{stderr}").contains("p.yaml:7:"), "{stdout}{stderr}");
}

/// `conflux wasm new` in a folder far from this repository, `conflux wasm
/// build`, then the crate's own example pipeline run on the built module.
#[test]
fn wasm_new_builds_and_runs_outside_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    let conflux = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_conflux"));
        command.current_dir(dir.path()).env("CONFLUX_LOG", "warn");
        command
    };
    let output = conflux().args(["wasm", "new", "demo"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let demo = dir.path().join("demo");
    for file in ["Cargo.toml", "src/lib.rs", "README.md", "pipeline.yaml", "events.ndjson"] {
        assert!(demo.join(file).is_file(), "{file}");
    }

    // A target folder kept between runs, so the SDK's dependencies build once.
    let target = concat!(env!("CARGO_TARGET_TMPDIR"), "/wasm-new");
    let output = conflux().args(["wasm", "build", "demo"]).env("CARGO_TARGET_DIR", target).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "wasm build failed (is the wasm32-wasip2 target installed?):\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let wasm = stdout.trim();
    assert!(wasm.ends_with("wasm32-wasip2/release/demo.wasm"), "{wasm}");
    assert!(std::path::Path::new(wasm).is_file(), "{wasm}");

    // The generated pipeline points at the crate's own target folder; this build went elsewhere.
    let pipeline = std::fs::read_to_string(demo.join("pipeline.yaml")).unwrap();
    let default = "./target/wasm32-wasip2/release/demo.wasm";
    assert!(pipeline.contains(default), "{pipeline}");
    std::fs::write(demo.join("pipeline.yaml"), pipeline.replace(default, wasm)).unwrap();
    let output = conflux().args(["run", "demo/pipeline.yaml"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let out = std::fs::read_to_string(demo.join("out.ndjson")).unwrap();
    let events: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 3, "{out}");
    for (n, event) in events.iter().enumerate() {
        assert_eq!(event["id"], n + 1, "{out}");
        assert_eq!(event["stamped_by"], "demo", "the example stage adds its field: {out}");
        assert_eq!(event["data"]["userId"], if n < 2 { "u-1" } else { "u-2" }, "{out}");
    }
}

#[test]
fn wasm_new_refuses_a_folder_that_is_not_empty() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    std::fs::create_dir(&demo).unwrap();
    std::fs::write(demo.join("keep.txt"), "mine").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_conflux"))
        .args(["wasm", "new", "demo", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already exists and is not empty"), "{stderr}");
    assert_eq!(std::fs::read_to_string(demo.join("keep.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_dir(&demo).unwrap().count(), 1, "nothing was written");

    // An empty folder is fine, and a name cargo would refuse is refused first.
    std::fs::remove_file(demo.join("keep.txt")).unwrap();
    let new = |name: &str| {
        Command::new(env!("CARGO_BIN_EXE_conflux"))
            .args(["wasm", "new", name, "--dir"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    assert!(new("demo").status.success());
    assert!(demo.join("Cargo.toml").is_file());
    let output = new("1-bad name");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a valid crate name"));
}
