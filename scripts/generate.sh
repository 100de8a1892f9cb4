#!/usr/bin/env bash
# Regenerates the committed artefacts derived from the config types.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p conflux
./target/debug/conflux schema -o schemas/pipeline.schema.json
./target/debug/conflux plugins --markdown > docs/plugins.md
echo "regenerated schemas/pipeline.schema.json and docs/plugins.md"
