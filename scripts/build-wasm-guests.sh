#!/usr/bin/env bash
# Builds the example and test guests of the `wasm` stage from source
# (plugins/conflux-wasm/guests) and prints the folder holding the .wasm files.
# Needs the wasm32-wasip2 target: `rustup target add wasm32-wasip2`.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CONFLUX_GUEST_TARGET_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/wasm-guests}
cargo build --release --quiet --locked --target wasm32-wasip2 \
  --manifest-path plugins/conflux-wasm/guests/Cargo.toml --target-dir "$target" >&2
echo "$target/wasm32-wasip2/release"
