#!/usr/bin/env bash
# The whole test suite: checks (or starts) the local services the tests need,
# then runs every test of the workspace. Usage: scripts/test.sh [cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

# Services the integration tests talk to; each test that needs one fails
# with a message naming it when it is unreachable.
NEEDED_SERVICES=${CONFLUX_TEST_SERVICES:-redis postgres nats kafka timescale browser}
if [ -n "$NEEDED_SERVICES" ]; then
  # shellcheck disable=SC2086
  ensure_services $NEEDED_SERVICES
  trap stop_started_services EXIT
fi

cargo test --workspace --locked "$@"
