#!/usr/bin/env bash
# Regenerates the committed artefacts derived from the config types.
set -euo pipefail
cd "$(dirname "$0")/.."
flock /tmp/conflux-cargo.lock cargo build -q -p conflux
"${CARGO_TARGET_DIR:-target}/debug/conflux" schema -o schemas/pipeline.schema.json
"${CARGO_TARGET_DIR:-target}/debug/conflux" plugins --markdown > docs/plugins.md
echo "regenerated schemas/pipeline.schema.json and docs/plugins.md"
