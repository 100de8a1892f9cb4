#!/usr/bin/env bash
# Throughput and memory benchmarks on a release build. Prints events/s (median
# of RUNS runs) and peak RSS per scenario. Usage: scripts/bench.sh [scenario…]
# Scenarios: generate_drop file_drop file_drop_batched rhai wasm_identity wasm_mask wasm_filter aggregate idle slow_output
# http_single http_ndjson kafka_drop jetstream_drop redis_hset pg_copy (default: all but the last six,
# which need wrk, tansu / NATS via scripts/services.sh, Redis with redis-benchmark, PostgreSQL with psql),
# broadcast_hold broadcast_fanout broadcast_latency (the broadcast output with its Rust load client),
# ecommerce (configs/ecommerce.yaml on tansu, Redis and PostgreSQL, with its Rust load client).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
EVENTS=${EVENTS:-1000000}
WORK=${BENCH_DIR:-/tmp/conflux-bench}
mkdir -p "$WORK"
# CONFLUX_BIN benches a given binary (say, a copy of an earlier build) as is.
if [ -z "${CONFLUX_BIN:-}" ]; then
  cargo build --release -q -p conflux
fi
BIN=${CONFLUX_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/release/conflux}
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
    [ -n "${RESET_STATE:-}" ] && rm -rf "$RESET_STATE"
    [ -n "${BEFORE_RUN:-}" ] && eval "$BEFORE_RUN"
    out=$(measure "$BIN" run "$file")
    rates+=("$(awk -v n="$events" -v t="$(echo "$out" | cut -d' ' -f1)" 'BEGIN {print n / t}')")
    rss+=("$(echo "$out" | cut -d' ' -f2)")
  done
  printf '%-28s %12.0f events/s   peak RSS %6.1f MiB   (runs: %s)\n' "$name" \
    "$(printf '%s\n' "${rates[@]}" | median)" \
    "$(printf '%s\n' "${rss[@]}" | sort -n | tail -1 | awk '{print $1 / 1024}')" \
    "$(printf '%.0f ' "${rates[@]}")"
}

# The booking events every file scenario reads. The generator stamps them
# with the wall clock (a million fall within a second or two), so their
# event times are then spread 10 ms apart (about 2.8 hours: 167 one-minute
# windows per restaurant), as a real stream's would be.
events_file() {
  local file=$WORK/bookings-$EVENTS-spread.ndjson
  if [ ! -s "$file" ]; then
    cat >"$WORK/make-events.yaml" <<YAML
inputs:
  gen: { type: generate, profile: booking, count: $EVENTS, seed: 42, keys: 100 }
outputs:
  out: { type: file, path: $file.raw, append: false, from: gen }
YAML
    "$BIN" run "$WORK/make-events.yaml"
    python3 - "$file.raw" "$file" <<'PY'
import re, sys
from datetime import datetime, timedelta, timezone
start = datetime(2026, 11, 22, 8, 0, tzinfo=timezone.utc)
stamp = re.compile(r'"timestamp":"[^"]*"')
with open(sys.argv[1]) as raw, open(sys.argv[2], "w") as out:
    for i, line in enumerate(raw):
        t = (start + timedelta(milliseconds=10 * i)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        out.write(stamp.sub(f'"timestamp":"{t}"', line, count=1))
PY
    rm -f "$file.raw"
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

# file → drop; extra options of the drop output, if any, as `, key: value`.
file_to_drop() { # name pipeline-name [output-options]
  local file
  file=$(events_file)
  cat >"$WORK/$2.yaml" <<YAML
inputs:
  in: { type: file, path: $file }
outputs:
  out: { type: drop, from: in${3:-} }
YAML
  throughput "$1" "$EVENTS" "$WORK/$2.yaml"
}

file_drop() {
  local file
  file=$(events_file)
  printf '(file: %s lines, %s bytes/line on average)\n' "$(wc -l <"$file")" "$(( $(stat -c %s "$file") / $(wc -l <"$file") ))"
  file_to_drop "file (NDJSON) → drop" file-drop
}

# The same with write batches the engine gathers (`batch:`), as COPY and
# Redis pipelines want them.
file_drop_batched() { file_to_drop "file → drop (batch 10000)" file-drop-batched ", batch: { max_events: 10000 }"; }

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

# Issue 4: count + sum by restaurant in 1-minute event-time tumbling windows,
# then the same with count_distinct, p99 and top_k; and peak RSS with 100,000 groups.
aggregate_scenario() { # name file metrics-yaml [extra stage options]
  cat >"$WORK/aggregate-$1.yaml" <<YAML
runtime: { data_dir: $WORK/state-$1 }
inputs:
  in: { type: file, path: $2 }
stages:
  agg:
    type: aggregate
    from: in
    group_by: [data.restaurantId]
    time: { field: timestamp, allowed_lateness: 5s }
    window: { tumbling: 1m }
    metrics: $3
    ${4:-}
outputs:
  out: { type: drop, from: agg }
YAML
  rm -rf "$WORK/state-$1"
}

# The count+sum pipeline once more, its results to a file, checked against
# counts and sums computed by Python from the same input (the bench events
# are in time order, so none is late).
aggregate_exact() { # events-file
  sed -e "s|out: { type: drop, from: agg }|out: { type: file, path: $WORK/aggregate-results.ndjson, append: false, from: agg }|" \
    -e "s|state-simple|state-exact|" "$WORK/aggregate-simple.yaml" >"$WORK/aggregate-exact.yaml"
  rm -rf "$WORK/state-exact"
  "$BIN" run "$WORK/aggregate-exact.yaml" >/dev/null
  python3 - "$1" "$WORK/aggregate-results.ndjson" <<'PY'
import json, sys
from collections import defaultdict
from datetime import datetime, timezone

def minute(stamp):
    t = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return t.replace(second=0, microsecond=0).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M")

expected = defaultdict(lambda: [0, 0])
with open(sys.argv[1]) as events:
    for line in events:
        e = json.loads(line)
        key = (e["data"]["restaurantId"], minute(e["timestamp"]))
        expected[key][0] += 1
        expected[key][1] += e["data"]["guests"]
got = {}
with open(sys.argv[2]) as results:
    for line in results:
        r = json.loads(line)
        if r["final"]:
            key = (r["data"]["restaurantId"], r["window"]["start"][:16])
            if key in got:
                sys.exit(f"aggregate count+sum: window {key} emitted twice")
            got[key] = [r["bookings"], r["guests"]]
wrong = [k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k)]
if wrong:
    k = sorted(wrong)[0]
    sys.exit(f"aggregate count+sum: {len(wrong)} of {len(expected)} windows differ, e.g. {k}: expected {expected.get(k)}, got {got.get(k)}")
print(f"{'aggregate count+sum, exact':<28} every one of {len(expected)} (restaurant, minute) windows matches Python's count and sum")
PY
}

aggregate() {
  local file groups
  file=$(events_file)
  aggregate_scenario simple "$file" '{ bookings: { count: {} }, guests: { sum: data.guests } }'
  throughput "aggregate count+sum" "$EVENTS" "$WORK/aggregate-simple.yaml"
  aggregate_exact "$file"
  # The same with 1 s snapshots to the local data_dir (each run starts from an empty state).
  aggregate_scenario checkpointed "$file" '{ bookings: { count: {} }, guests: { sum: data.guests } }' \
    'checkpoint: { interval: 1s }'
  RESET_STATE=$WORK/state-checkpointed throughput "aggregate count+sum, checkpoints" "$EVENTS" "$WORK/aggregate-checkpointed.yaml"
  aggregate_scenario sketches "$file" '{ bookings: { count: {} }, users: { count_distinct: data.userId }, p99: { percentiles: { field: data.guests, quantiles: [0.99] } }, zones: { top_k: { field: data.zone, k: 3 } } }'
  throughput "aggregate distinct+p99+top_k" "$EVENTS" "$WORK/aggregate-sketches.yaml"
  groups=$WORK/bookings-100k-groups.ndjson
  if [ ! -s "$groups" ]; then
    cat >"$WORK/make-groups.yaml" <<YAML
inputs:
  gen: { type: generate, profile: booking, count: $EVENTS, seed: 7, keys: 100000 }
outputs:
  out: { type: file, path: $groups, append: false, from: gen }
YAML
    "$BIN" run "$WORK/make-groups.yaml"
  fi
  aggregate_scenario groups "$groups" '{ bookings: { count: {} }, guests: { sum: data.guests } }'
  throughput "aggregate, 100k groups" "$EVENTS" "$WORK/aggregate-groups.yaml"
}

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

# CPU time (clock ticks) a process has used so far; 0 when it is not there.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# A process's CPU share, in % of one core, from two tick readings over an interval.
cpu_share() { # ticks-before ticks-after start end
  awk -v x="$(($2 - $1))" -v b="$3" -v a="$4" -v hz="$(getconf CLK_TCK)" 'BEGIN {print 100 * x / hz / (a - b)}'
}

# Runs a never-ending pipeline until its `out` output received N events; prints
# the rate and the broker's and conflux's CPU shares (which side bounds the rate).
drain_rate() { # name events pipeline-file admin-port broker-process-name
  local name=$1 events=$2 file=$3 port=$4 broker start end got=0 pid b0 c0 b1 c1
  broker=$(pgrep -x "$5" | head -1 || true)
  "$BIN" run --admin "127.0.0.1:$port" "$file" & pid=$!
  # The clock starts at the first event, so group joins and connects are not counted.
  local base=0 metric='/^conflux_events_received_total.*component="out"/ {print $2}'
  until [ "${base%.*}" -gt 0 ]; do sleep 0.02; base=$(curl -s "127.0.0.1:$port/metrics" | awk "$metric"); base=${base:-0}; done
  start=$(date +%s.%N)
  b0=$(cpu_ticks "${broker:-0}") c0=$(cpu_ticks "$pid")
  got=$base
  while [ "${got%.*}" -lt "$events" ]; do
    sleep 0.05
    got=$(curl -s "127.0.0.1:$port/metrics" | awk '/^conflux_events_received_total.*component="out"/ {print $2}')
    got=${got:-0}
  done
  end=$(date +%s.%N)
  b1=$(cpu_ticks "${broker:-0}") c1=$(cpu_ticks "$pid")
  kill -TERM "$pid"; wait "$pid" || true
  printf '%-28s %12.0f events/s   (%s events in %.2f s; CPU: %s %.0f%%, conflux %.0f%%)\n' "$name" \
    "$(awk -v n="$got" -v m="$base" -v a="$end" -v b="$start" 'BEGIN {print (n - m) / (a - b)}')" "$((${got%.*} - ${base%.*}))" "$(awk -v a="$end" -v b="$start" 'BEGIN {print a - b}')" \
    "$5" "$(cpu_share "$b0" "$b1" "$start" "$end")" "$(cpu_share "$c0" "$c1" "$start" "$end")"
}

# wrk against an http_server → drop pipeline; BODY is a file holding each request's body.
http_wrk() { # name content-type body-file events-per-request
  local name=$1 ctype=$2 body=$3 per=$4 port=18080 pid out rps
  cat >"$WORK/http.yaml" <<YAML
inputs:
  api: { type: http_server, address: 127.0.0.1:$port, path: /events, queue: 1024 }
outputs:
  out: { type: drop, from: api }
YAML
  cat >"$WORK/post.lua" <<LUA
local f = io.open("$body", "rb"); wrk.body = f:read("*a"); f:close()
wrk.method = "POST"; wrk.headers["Content-Type"] = "$ctype"
LUA
  "$BIN" run "$WORK/http.yaml" & pid=$!
  until curl -s -o /dev/null "127.0.0.1:$port/"; do sleep 0.05; done
  out=$(wrk -t2 -c64 -d${HTTP_SECONDS:-10}s --latency -s "$WORK/post.lua" "http://127.0.0.1:$port/events")
  kill -TERM "$pid"; wait "$pid" || true
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  printf '%-28s %12.0f req/s %12.0f events/s   p50 %s  p99 %s  (non-2xx: %s)\n' "$name" "$rps" \
    "$(awk -v r="$rps" -v n="$per" 'BEGIN {print r * n}')" \
    "$(echo "$out" | awk '$1 == "50%" {print $2}')" "$(echo "$out" | awk '$1 == "99%" {print $2}')" \
    "$(echo "$out" | awk '/Non-2xx/ {print $NF}' | grep . || echo 0)"
}

http_single() {
  "$BIN" run "$(printf 'inputs:\n  g: { type: generate, count: 1, seed: 1 }\noutputs:\n  o: { type: file, path: %s, append: false, from: g }\n' "$WORK/one.json" > "$WORK/one.yaml"; echo "$WORK/one.yaml")"
  http_wrk "HTTP single event (64 conn)" application/json "$WORK/one.json" 1
}

http_ndjson() {
  "$BIN" run "$(printf 'inputs:\n  g: { type: generate, count: 100, seed: 1 }\noutputs:\n  o: { type: file, path: %s, append: false, from: g }\n' "$WORK/hundred.ndjson" > "$WORK/hundred.yaml"; echo "$WORK/hundred.yaml")"
  http_wrk "HTTP NDJSON x100 (64 conn)" application/x-ndjson "$WORK/hundred.ndjson" 100
}

kafka_drop() {
  local topic=bench_$RANDOM$RANDOM
  cat >"$WORK/kafka-fill.yaml" <<YAML
inputs:
  gen: { type: generate, profile: booking, count: $EVENTS, seed: 42 }
outputs:
  out: { type: kafka, brokers: ["${KAFKA_BROKERS:-127.0.0.1:9092}"], topic: $topic, linger: 20ms, from: gen }
YAML
  # FILL_BIN fills the topic with another binary: the drain rate depends on how
  # the producer batched the records, so before/after comparisons fill alike.
  "${FILL_BIN:-$BIN}" run "$WORK/kafka-fill.yaml"
  cat >"$WORK/kafka-drop.yaml" <<YAML
inputs:
  in: { type: kafka, brokers: ["${KAFKA_BROKERS:-127.0.0.1:9092}"], topics: [$topic], group: bench-$topic, batch_size: 4096 }
outputs:
  out: { type: drop, from: in }
YAML
  drain_rate "Kafka (tansu) → drop" "$EVENTS" "$WORK/kafka-drop.yaml" 19464 tansu
}

jetstream_drop() {
  local stream=BENCH$RANDOM$RANDOM
  cat >"$WORK/js-fill.yaml" <<YAML
inputs:
  gen: { type: generate, profile: booking, count: $EVENTS, seed: 42 }
outputs:
  out: { type: nats, url: "${NATS_URL:-nats://127.0.0.1:4222}", jetstream: true, subject: "bench.$stream", from: gen }
YAML
  # One durable consumer per acknowledgement policy, each draining the same stream.
  local policy
  for policy in explicit all; do
    cat >"$WORK/js-drop-$policy.yaml" <<YAML
inputs:
  in: { type: nats, url: "${NATS_URL:-nats://127.0.0.1:4222}", subjects: ["bench.$stream"], batch_size: 4096,
        jetstream: { stream: $stream, durable: bench_$policy, max_ack_pending: 100000, ack_policy: $policy } }
outputs:
  out: { type: drop, from: in }
YAML
  done
  # Creates the stream (the input creates it over its subjects), then fills it.
  timeout 3 "$BIN" run "$WORK/js-drop-explicit.yaml" >/dev/null 2>&1 || true
  "$BIN" run "$WORK/js-fill.yaml"
  drain_rate "JetStream → drop (ack each)" "$EVENTS" "$WORK/js-drop-explicit.yaml" 19465 nats-server
  drain_rate "JetStream → drop (ack all)" "$EVENTS" "$WORK/js-drop-all.yaml" 19465 nats-server
  js_delete_stream "$stream"
}

# Redis: 1M booking events written with one HSET each (a key per booking), and
# with three commands each (hincrby + zincrby + pfadd), against redis-benchmark's
# own pipelined HSET (-P 64) on the same server in the same run. Database 15,
# emptied before each run.
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
redis_db() { redis-cli -u "$REDIS_URL/15" "$@"; }

redis_reference() {
  local rate
  redis_db flushdb >/dev/null
  rate=$(redis-benchmark -u "$REDIS_URL" --dbnum 15 -P 64 -t hset -n "$EVENTS" -q 2>/dev/null \
    | tr '\r' '\n' | awk '/^HSET:/ {print $2}' | tail -1)
  printf '%-28s %12.0f events/s   (redis-benchmark -P 64 -t hset -n %s)\n' "redis-benchmark HSET" "$rate" "$EVENTS"
}

redis_scenario() { # name pipeline-name commands
  local file
  file=$(events_file)
  cat >"$WORK/$2.yaml" <<YAML
inputs:
  in: { type: file, path: $file }
outputs:
  out:
    type: redis
    url: $REDIS_URL/15
    from: in
    batch: { max_events: ${REDIS_BATCH:-10000} }
    ${REDIS_EXTRA:-}
    commands: $3
YAML
  redis_db flushdb >/dev/null
  throughput "$1" "$EVENTS" "$WORK/$2.yaml"
  redis_db flushdb >/dev/null
}

redis_hset() {
  redis_reference
  # redis-benchmark's own shape: one field of few keys written again and again
  # (HSET myhash element:… value), so the server does the same work per command.
  redis_scenario "file → redis hset (same shape)" redis-hset-shape \
    '[{ hset: { key: "status:{{ data.restaurantId }}", fields: { last: "{{ data.status }}" } } }]'
  # Two writes in flight: rendering the next batch overlaps Redis answering this one.
  REDIS_EXTRA="max_in_flight: 2" redis_scenario "file → redis hset (same shape, 2 in flight)" redis-hset-shape2 \
    '[{ hset: { key: "status:{{ data.restaurantId }}", fields: { last: "{{ data.status }}" } } }]'
  # One hash per booking: a million new keys, the server's allocations on top.
  redis_scenario "file → redis hset" redis-hset \
    '[{ hset: { key: "b:{{ data.bookingId }}", fields: { status: "{{ data.status }}" } } }]'
  redis_scenario "file → redis 3 commands" redis-three \
    '[{ hincrby: { key: "r:{{ data.restaurantId }}", field: guests, by: "{{ data.guests }}" } }, { zincrby: { key: "zones", member: "{{ data.zone }}" } }, { pfadd: { key: "users", element: "{{ data.userId }}" } }]'
}

# PostgreSQL: 1M booking rows of 8 typed columns through `copy`, against psql's
# own `\copy` of the same rows as CSV in the same run; `upsert` of the same rows
# keyed by id. The table is emptied before each run.
PG_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
PG_COLUMNS="id text, kind text, at timestamptz, restaurant text, zone text, user_id text, guests bigint, data jsonb"

bookings_csv() {
  local file csv=$WORK/bookings-$EVENTS.csv
  file=$(events_file)
  if [ ! -s "$csv" ]; then
    python3 - "$file" "$csv" <<'PY'
import csv, json, sys
with open(sys.argv[1]) as src, open(sys.argv[2], "w", newline="") as out:
    w = csv.writer(out)
    for line in src:
        e = json.loads(line)
        d = e["data"]
        w.writerow([e["id"], e["type"], e["timestamp"], d["restaurantId"], d["zone"], d["userId"], d["guests"],
                    json.dumps(d, separators=(",", ":"))])
PY
  fi
  echo "$csv"
}

pg_table() { # name [primary key]
  psql -q "$PG_URL" -c "DROP TABLE IF EXISTS $1" -c "CREATE TABLE $1 ($PG_COLUMNS${2:+, PRIMARY KEY ($2)})" >/dev/null
}

pg_pipeline() { # file mode table [key]
  local events
  events=$(events_file)
  cat >"$1" <<YAML
inputs:
  in: { type: file, path: $events }
outputs:
  out:
    type: postgres
    url: $PG_URL
    table: $3
    mode: $2${4:+
    key: [$4]}
    batch: { max_events: ${PG_BATCH:-10000}, linger: 50ms }
    from: in
    columns:
      id: { from: id, type: text }
      kind: { from: type, type: text }
      at: { from: timestamp, type: timestamp }
      restaurant: { from: data.restaurantId, type: text }
      zone: { from: data.zone, type: text }
      user_id: { from: data.userId, type: text }
      guests: { from: data.guests, type: integer }
      data: { from: data, type: json }
YAML
}

pg_copy() {
  local csv rates=() i out
  csv=$(bookings_csv)
  for ((i = 0; i < RUNS; i++)); do
    pg_table bench_copy
    out=$(measure psql -q "$PG_URL" -c "\\copy bench_copy FROM '$csv' WITH (FORMAT csv)")
    rates+=("$(awk -v n="$EVENTS" -v t="$(echo "$out" | cut -d' ' -f1)" 'BEGIN {print n / t}')")
  done
  printf '%-28s %12.0f rows/s     (psql \\copy of the same rows as CSV; runs: %s)\n' "psql \\copy (reference)" \
    "$(printf '%s\n' "${rates[@]}" | median)" "$(printf '%.0f ' "${rates[@]}")"
  pg_pipeline "$WORK/pg-copy.yaml" copy bench_copy
  BEFORE_RUN="pg_table bench_copy" throughput "file → postgres copy" "$EVENTS" "$WORK/pg-copy.yaml"
  pg_pipeline "$WORK/pg-upsert.yaml" upsert bench_upsert id
  BEFORE_RUN="pg_table bench_upsert id" throughput "file → postgres upsert" "$EVENTS" "$WORK/pg-upsert.yaml"
  psql -q "$PG_URL" -c "DROP TABLE IF EXISTS bench_copy" -c "DROP TABLE IF EXISTS bench_upsert" >/dev/null
}

# How the store figures change with the write batch size (docs/benchmarks.md).
batch_sizes() {
  local size
  for size in 100 1000 10000; do
    echo "batch.max_events: $size"
    REDIS_BATCH=$size redis_scenario "  file → redis hset (same shape)" redis-hset-shape \
      '[{ hset: { key: "status:{{ data.restaurantId }}", fields: { last: "{{ data.status }}" } } }]'
    REDIS_BATCH=$size redis_scenario "  file → redis 3 commands" redis-three \
      '[{ hincrby: { key: "r:{{ data.restaurantId }}", field: guests, by: "{{ data.guests }}" } }, { zincrby: { key: "zones", member: "{{ data.zone }}" } }, { pfadd: { key: "users", element: "{{ data.userId }}" } }]'
    PG_BATCH=$size pg_pipeline "$WORK/pg-copy.yaml" copy bench_copy
    BEFORE_RUN="pg_table bench_copy" throughput "  file → postgres copy" "$EVENTS" "$WORK/pg-copy.yaml"
    PG_BATCH=$size pg_pipeline "$WORK/pg-upsert.yaml" upsert bench_upsert id
    BEFORE_RUN="pg_table bench_upsert id" throughput "  file → postgres upsert" "$EVENTS" "$WORK/pg-upsert.yaml"
  done
  psql -q "$PG_URL" -c "DROP TABLE IF EXISTS bench_copy" -c "DROP TABLE IF EXISTS bench_upsert" >/dev/null
}

# The broadcast output, driven by its own load client (core/conflux/examples/broadcast_load.rs),
# built in release like the binary. Connections, fan-out and end-to-end latency (issue 18).
LOAD=${CARGO_TARGET_DIR:-$PWD/target}/release/examples/broadcast_load
load_client() { [ -x "$LOAD" ] && [ -z "${REBUILD_LOAD:-}" ] || cargo build --release -q -p conflux --example broadcast_load; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# Waits until something listens on a loopback port (a GET on the broadcast path would stream forever).
wait_port() { until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do sleep 0.05; done; }

broadcast_pipeline() { # file extra-stage-yaml from channel-template
  cat >"$1" <<YAML
name: bench-live
inputs:
  in: { type: http_server, address: 127.0.0.1:18090, path: /events, queue: 4096 }
$2
outputs:
  live:
    type: broadcast
    from: $3
    address: 127.0.0.1:18091
    path: /live
    channel: "$4"
    history: 100
    max_queue_bytes: 4MiB
    connections: { max_connections: 30000 }
YAML
}

# 20,000 idle WebSocket connections on one instance: RSS growth per connection. The clients
# run as two processes (each under the open-file limit); where the hard limit is 20,000 files
# (as on our machines, and it cannot be raised there), the server holds 19,950.
broadcast_hold() {
  local limit n pid c1 c2 before after held
  limit=$(ulimit -Hn)
  n=${HOLD_CONNECTIONS:-$(( limit > 20100 ? 20000 : limit - 50 ))}
  load_client
  broadcast_pipeline "$WORK/hold.yaml" "" in "c0"
  "$BIN" run "$WORK/hold.yaml" & pid=$!
  wait_port 18091
  sleep 0.5
  before=$(rss_kib "$pid")
  rm -f "$WORK"/hold-*.out
  "$LOAD" hold "ws://127.0.0.1:18091/live?channels=c0" $((n / 2)) 3600 >"$WORK/hold-1.out" & c1=$!
  "$LOAD" hold "ws://127.0.0.1:18091/live?channels=c0" $((n - n / 2)) 3600 >"$WORK/hold-2.out" & c2=$!
  until [ "$(cat "$WORK"/hold-*.out 2>/dev/null | grep -c held)" = 2 ]; do
    sleep 0.2
    kill -0 "$c1" && kill -0 "$c2" || break
  done
  sleep 2
  after=$(rss_kib "$pid")
  held=$(awk '{s += $2} END {print s}' "$WORK"/hold-*.out)
  kill "$c1" "$c2" 2>/dev/null; wait "$c1" "$c2" 2>/dev/null || true
  kill -TERM "$pid"; wait "$pid" || true
  printf '%-28s %s connections: RSS %.1f MiB → %.1f MiB, %.1f KiB per connection\n' "broadcast: idle WebSockets" \
    "$held" "$(awk -v k="$before" 'BEGIN {print k / 1024}')" "$(awk -v k="$after" 'BEGIN {print k / 1024}')" \
    "$(awk -v a="$after" -v b="$before" -v n="$held" 'BEGIN {print (a - b) / n}')"
}

# Fan-out: 1,000 subscribers of one channel, and 100 on each of 100 channels, as fast as
# events can be posted; deliveries/s, publish → receive latency, both processes' CPU.
broadcast_fanout() {
  local pid shape channels per events out c0 c1 start end
  load_client
  broadcast_pipeline "$WORK/fanout.yaml" "" in "{{ ch }}"
  # channels, subscribers per channel, events, pace (events/s; 0: as fast as requests go)
  for shape in "1 1000 1000 0" "1 1000 3000 300" "100 100 10000 0" "100 100 30000 3000"; do
    read -r channels per events rate <<<"$shape"
    "$BIN" run "$WORK/fanout.yaml" & pid=$!
    wait_port 18091
    c0=$(cpu_ticks "$pid") start=$(date +%s.%N)
    out=$("$LOAD" fanout "ws://127.0.0.1:18091/live" "http://127.0.0.1:18090/events" "$channels" "$per" "$events" "${rate#0}")
    c1=$(cpu_ticks "$pid") end=$(date +%s.%N)
    kill -TERM "$pid"; wait "$pid" || true
    printf '%-28s %s (conflux CPU over the run incl. connecting: %.0f%%)\n' "broadcast: fan-out" "$out" "$(cpu_share "$c0" "$c1" "$start" "$end")"
  done
}

# HTTP POST → aggregate (every batch) → broadcast → client, at 10,000 events/s.
broadcast_latency() {
  local pid out rate=${LATENCY_RATE:-10000}
  load_client
  broadcast_pipeline "$WORK/latency.yaml" "stages:
  agg:
    type: aggregate
    from: in
    group_by: [k]
    window: { tumbling: 1s }
    emit: every_batch
    metrics:
      events: { count: {} }
      newest: { max: t }" agg "all"
  "$BIN" run "$WORK/latency.yaml" & pid=$!
  wait_port 18091
  out=$("$LOAD" latency "ws://127.0.0.1:18091/live?channels=all" "http://127.0.0.1:18090/events" "$rate" "${LATENCY_SECONDS:-10}")
  kill -TERM "$pid"; wait "$pid" || true
  printf '%-28s %s\n' "broadcast: end to end" "$out"
}

# configs/ecommerce.yaml as shipped, on tansu Kafka, Redis (db 13) and a fresh PostgreSQL
# database: how fast it drains a topic of EVENTS_SHOP events (every event to PostgreSQL
# exactly once, aggregates to Redis), then Kafka → order ticker latency at 10,000 events/s.
SHOP=${CARGO_TARGET_DIR:-$PWD/target}/release/examples/shop_load
ecommerce() {
  local brokers=${KAFKA_BROKERS:-127.0.0.1:9092} n=${EVENTS_SHOP:-200000} run db url pid start end rows out
  [ -x "$SHOP" ] && [ -z "${REBUILD_LOAD:-}" ] || cargo build --release -q -p conflux --example shop_load
  for run in $(seq "$RUNS"); do
    db=bench_shop_$$_$run url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
    psql "$url" -qc "CREATE DATABASE $db" && url=${url%/*}/$db
    redis-cli -n 13 FLUSHDB >/dev/null
    "$SHOP" produce "$brokers" "bench-shop-$$-$run" "$n" >/dev/null
    rm -rf "$WORK/shop"
    start=$(date +%s.%N)
    KAFKA_BROKERS=$brokers ECOMMERCE_TOPIC=bench-shop-$$-$run ECOMMERCE_GROUP=bench-shop-$$-$run \
      REDIS_URL=redis://127.0.0.1:6379/13 POSTGRES_URL=$url DATA_DIR=$WORK/shop ECOMMERCE_LIVE=127.0.0.1:18092 \
      CONFLUX_ADMIN=127.0.0.1:18093 "$BIN" run configs/ecommerce.yaml & pid=$!
    # From the first rows committed (the consumer joined its group) to the last.
    rows=0
    until [ "$rows" -gt 0 ]; do sleep 0.1; rows=$(psql "$url" -Atqc "SELECT count(*) FROM shop_events" 2>/dev/null || echo 0); done
    start=$(date +%s.%N) first=$rows
    until [ "$rows" -ge "$n" ]; do sleep 0.1; rows=$(psql "$url" -Atqc "SELECT count(*) FROM shop_events" 2>/dev/null || echo 0); done
    end=$(date +%s.%N)
    kill -TERM "$pid"; wait "$pid" || true
    awk -v n="$((n - first))" -v a="$end" -v b="$start" 'BEGIN {printf "%.0f\n", n / (a - b)}'
  done | median | xargs printf '%-28s %s events/s (every event into PostgreSQL exactly once, aggregates to Redis)\n' "ecommerce: drain $n"
  psql "${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}" -qc "CREATE DATABASE bench_shop_$$_latency"
  url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}; url=${url%/*}/bench_shop_$$_latency
  rm -rf "$WORK/shop"
  "$SHOP" produce "$brokers" "bench-shop-$$-latency" 0 >/dev/null   # the topic exists before the consumer subscribes
  KAFKA_BROKERS=$brokers ECOMMERCE_TOPIC=bench-shop-$$-latency ECOMMERCE_GROUP=bench-shop-$$-latency \
    REDIS_URL=redis://127.0.0.1:6379/13 POSTGRES_URL=$url DATA_DIR=$WORK/shop ECOMMERCE_LIVE=127.0.0.1:18092 \
    CONFLUX_ADMIN=127.0.0.1:18093 "$BIN" run configs/ecommerce.yaml & pid=$!
  wait_port 18092
  out=$("$SHOP" latency "ws://127.0.0.1:18092/live?channels=shop:orders" "$brokers" "bench-shop-$$-latency" \
    "${SHOP_RATE:-10000}" "${SHOP_SECONDS:-20}")
  kill -TERM "$pid"; wait "$pid" || true
  printf '%-28s %s\n' "ecommerce: Kafka → ticker" "$out"
}

# Deletes a stream through the JetStream API over the NATS protocol (no CLI needed): runs
# leave 1M-message streams behind otherwise, and a server holding many of them drains slower.
js_delete_stream() { # name
  local url=${NATS_URL:-nats://127.0.0.1:4222} hostport
  hostport=${url#nats://}
  exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}" || return 0
  printf 'CONNECT {"verbose":false}\r\nSUB _bench.del 1\r\nPUB $JS.API.STREAM.DELETE.%s _bench.del 0\r\n\r\nPING\r\n' "$1" >&3
  timeout 2 head -c 512 <&3 >/dev/null || true
  exec 3>&-
}

echo "conflux bench: $(nproc) cores, RUNS=$RUNS, EVENTS=$EVENTS"
for scenario in "${@:-generate_drop file_drop file_drop_batched rhai wasm_identity wasm_mask wasm_filter aggregate idle slow_output}"; do
  for s in $scenario; do "$s"; done
done
