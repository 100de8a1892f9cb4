#!/usr/bin/env bash
# Throughput and memory benchmarks on a release build. Prints events/s (median
# of RUNS runs) and peak RSS per scenario. Usage: scripts/bench.sh [scenario…]
# Scenarios: generate_drop file_drop rhai wasm_identity wasm_mask wasm_filter idle slow_output
# (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
EVENTS=${EVENTS:-1000000}
WORK=${BENCH_DIR:-/tmp/conflux-bench}
mkdir -p "$WORK"
cargo build --release -q -p conflux
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/conflux
export CONFLUX_LOG=warn

# Runs a command, prints "<seconds> <peak RSS KiB>", polling /proc for VmHWM.
measure() {
  local start end pid hwm=0 cur
  start=$(date +%s.%N)
  "$@" >/dev/null &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    cur=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    [ -n "$cur" ] && [ "$cur" -gt "$hwm" ] && hwm=$cur
    sleep 0.02
  done
  wait "$pid"
  end=$(date +%s.%N)
  echo "$(awk -v a="$end" -v b="$start" 'BEGIN {print a - b}') $hwm"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Runs a pipeline file RUNS times; prints a result row.
throughput() { # name events pipeline-file
  local name=$1 events=$2 file=$3 rates=() rss=() i out
  for ((i = 0; i < RUNS; i++)); do
    out=$(measure "$BIN" run "$file")
    rates+=("$(awk -v n="$events" -v t="$(echo "$out" | cut -d' ' -f1)" 'BEGIN {print n / t}')")
    rss+=("$(echo "$out" | cut -d' ' -f2)")
  done
  printf '%-28s %12.0f events/s   peak RSS %6.1f MiB   (runs: %s)\n' "$name" \
    "$(printf '%s\n' "${rates[@]}" | median)" \
    "$(printf '%s\n' "${rss[@]}" | sort -n | tail -1 | awk '{print $1 / 1024}')" \
    "$(printf '%.0f ' "${rates[@]}")"
}

events_file() {
  local file=$WORK/bookings-$EVENTS.ndjson
  if [ ! -s "$file" ]; then
    cat >"$WORK/make-events.yaml" <<YAML
inputs:
  gen: { type: generate, profile: booking, count: $EVENTS, seed: 42, keys: 100 }
outputs:
  out: { type: file, path: $file, append: false, from: gen }
YAML
    "$BIN" run "$WORK/make-events.yaml"
  fi
  echo "$file"
}

generate_drop() {
  local n=$((EVENTS * 5))
  cat >"$WORK/generate-drop.yaml" <<YAML
inputs:
  gen: { type: generate, profile: booking, count: $n }
outputs:
  out: { type: drop, from: gen }
YAML
  throughput "generate → drop" "$n" "$WORK/generate-drop.yaml"
  cat >"$WORK/generate-templates-drop.yaml" <<YAML
inputs:
  gen: { type: generate, profile: booking, count: $n, templates: 4096 }
outputs:
  out: { type: drop, from: gen }
YAML
  throughput "generate (templates) → drop" "$n" "$WORK/generate-templates-drop.yaml"
}

file_drop() {
  local file
  file=$(events_file)
  cat >"$WORK/file-drop.yaml" <<YAML
inputs:
  in: { type: file, path: $file }
outputs:
  out: { type: drop, from: in }
YAML
  printf '(file: %s lines, %s bytes/line on average)\n' "$(wc -l <"$file")" "$(( $(stat -c %s "$file") / $(wc -l <"$file") ))"
  throughput "file (NDJSON) → drop" "$EVENTS" "$WORK/file-drop.yaml"
}

# Issue 3: a filter dropping cancelled bookings and a 3-line map script.
rhai() {
  local file
  file=$(events_file)
  cat >"$WORK/rhai.yaml" <<YAML
inputs:
  in: { type: file, path: $file }
stages:
  active: { type: filter, from: in, condition: 'event.type != "booking_cancelled"' }
  enrich:
    type: rhai
    from: active
    script: |
      let guests = event.data.guests;
      event.data.large = guests > 4 && event.data.zone == "terrace";
      event
outputs:
  out: { type: drop, from: enrich }
YAML
  throughput "file → filter → rhai → drop" "$EVENTS" "$WORK/rhai.yaml"
}

# file → wasm → drop with one of the example guests (built from source).
wasm_scenario() { # name guest [config-json]
  local name=$1 guest=$2 config=${3:-null} file guests
  file=$(events_file)
  guests=$(bash scripts/build-wasm-guests.sh)
  cat >"$WORK/wasm-$guest.yaml" <<YAML
inputs:
  in: { type: file, path: $file }
stages:
  guest: { type: wasm, module: $guests/$guest.wasm, config: $config, from: in }
outputs:
  out: { type: drop, from: guest }
  failed: { type: drop, from: guest.error }
YAML
  throughput "$name" "$EVENTS" "$WORK/wasm-$guest.yaml"
}

wasm_identity() { wasm_scenario "file → wasm identity → drop" identity; }
wasm_mask() { wasm_scenario "file → wasm mask → drop" mask '{ salt: bench }'; }
wasm_filter() { wasm_scenario "file → wasm filter → drop" filter '{ types: [booking_created] }'; }

# Peak RSS of a pipeline that sits idle: a slow generator into drop.
idle() {
  cat >"$WORK/idle.yaml" <<YAML
inputs:
  gen: { type: generate, profile: booking, rate: 1/s }
outputs:
  out: { type: drop, from: gen }
YAML
  "$BIN" run "$WORK/idle.yaml" & local pid=$!
  sleep 3
  printf '%-28s peak RSS %6.1f MiB\n' "idle pipeline" "$(awk '/VmHWM/ {print $2 / 1024}' /proc/$pid/status)"
  kill -TERM "$pid"; wait "$pid" || true
}

# A fast input into an output that takes 10 ms per batch: RSS must stay flat.
slow_output() {
  cat >"$WORK/slow.yaml" <<YAML
runtime: { channel_capacity: 8 }
inputs:
  gen: { type: generate, profile: booking }
outputs:
  out: { type: drop, delay: 10ms, from: gen }
YAML
  "$BIN" run "$WORK/slow.yaml" & local pid=$! samples=()
  for _ in 1 2 3 4 5; do sleep 2; samples+=("$(awk '/VmRSS/ {print $2}' /proc/$pid/status)"); done
  kill -TERM "$pid"; wait "$pid" || true
  printf '%-28s RSS every 2 s: %s KiB (flat = bounded)\n' "slow output (10ms/batch)" "${samples[*]}"
}

echo "conflux bench: $(nproc) cores, RUNS=$RUNS, EVENTS=$EVENTS"
for scenario in "${@:-generate_drop file_drop rhai wasm_identity wasm_mask wasm_filter idle slow_output}"; do
  for s in $scenario; do "$s"; done
done
