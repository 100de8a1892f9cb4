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
