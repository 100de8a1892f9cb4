#!/usr/bin/env bash
# Regenerates the committed artefacts derived from the config types.
# Honours CARGO_TARGET_DIR (default: ./target).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p conflux
bin=${CARGO_TARGET_DIR:-target}/debug/conflux
"$bin" schema -o schemas/pipeline.schema.json
"$bin" plugins --markdown > docs/plugins.md
echo "regenerated schemas/pipeline.schema.json and docs/plugins.md"
