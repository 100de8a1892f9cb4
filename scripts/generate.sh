#!/usr/bin/env bash
# Regenerates the committed artefacts derived from the config types.
# Honours CARGO_TARGET_DIR (default: ./target).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p conflux
BIN=${CARGO_TARGET_DIR:-target}/debug/conflux
"$BIN" schema -o schemas/pipeline.schema.json
"$BIN" plugins --markdown > docs/plugins.md
echo "regenerated schemas/pipeline.schema.json and docs/plugins.md"
