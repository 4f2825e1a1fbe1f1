#!/usr/bin/env bash
# cmqd next to RabbitMQ, NATS JetStream and Redis streams, measured back to back by one harness:
# ../shared/peerbench with our adapter (benches/peerbench/cmqd.rs) added.
#
#   benches/peerbench/run.sh                       # cmqd memory + durable, RabbitMQ, NATS, Redis; 3 runs each
#   RUNS=1 SCALE=0.1 benches/peerbench/run.sh      # quick look
#   SYSTEMS="cmqd" benches/peerbench/run.sh        # only ours (cmqd rabbitmq nats redis)
#   WORKLOADS=w2,w4 benches/peerbench/run.sh
#
# Needs: the peers from Debian (apt-get install -y rabbitmq-server nats-server redis-server)
# unless SYSTEMS leaves them out. Redis runs streams + XACK (the variant with acknowledgements,
# like ours) twice: in memory, and with the AOF fsynced on every write (`appendfsync always`,
# the durable comparison). peerbench itself is read-only in ../shared: it is copied to a scratch
# directory (PB_DIR, default $TMPDIR/cmqd-peerbench) and built there. Every server is started
# on 127.0.0.1 by this script or peerbench's servers.sh, and only those are stopped.
# Results: $PB_DIR/results/<UTC timestamp>/{*.jsonl,report.md,versions.txt}.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SRC="${PEERBENCH_SRC:-$ROOT/../shared/peerbench}"
PB_DIR="${PB_DIR:-${TMPDIR:-/tmp}/cmqd-peerbench}"
RUNS=${RUNS:-3}
SCALE=${SCALE:-1}
SYSTEMS=${SYSTEMS:-"cmqd rabbitmq nats redis"}
REDIS_VARIANTS=${REDIS_VARIANTS:-"stream"}
CMQD_VARIANTS=${CMQD_VARIANTS:-"memory durable"}
WORKLOADS=${WORKLOADS:-w1,w2,w3,w4,w5}
PORT=${CMQD_PORT:-7390}
CMQD_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/cmqd"
has() { [[ " $SYSTEMS " == *" $1 "* ]]; }

# A fresh copy with the adapter, unless it is already there (the build is kept between runs).
if [ ! -f "$PB_DIR/src/peers/cmqd.rs" ]; then
  rm -rf "$PB_DIR"
  mkdir -p "$PB_DIR"
  cp -r "$SRC/." "$PB_DIR/"
  (cd "$PB_DIR" && patch -p1 --quiet < "$HERE/peerbench.patch")
  sed -i "s#CMQD_PATH#$ROOT#" "$PB_DIR/Cargo.toml"
fi
cp "$HERE/cmqd.rs" "$PB_DIR/src/peers/cmqd.rs"
(cd "$ROOT" && cargo build --release --bin cmqd)
(cd "$PB_DIR" && cargo build --release)
BIN="$PB_DIR/target/release/peerbench"
OUT="$PB_DIR/results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
COMMON=(--runs "$RUNS" --scale "$SCALE" --workloads "$WORKLOADS")

CMQD_PID=""
CMQD_DIR=""
stop_cmqd() {
  if [ -n "$CMQD_PID" ] && kill -0 "$CMQD_PID" 2>/dev/null; then
    kill "$CMQD_PID"
    wait "$CMQD_PID" 2>/dev/null || true
  fi
  CMQD_PID=""
  [ -n "$CMQD_DIR" ] && rm -rf "$CMQD_DIR"
  CMQD_DIR=""
}
cleanup() {
  stop_cmqd
  if has rabbitmq || has nats || has redis; then (cd "$PB_DIR" && scripts/servers.sh stop all) || true; fi
}
trap cleanup EXIT

start_cmqd() { # variant
  CMQD_DIR="$(mktemp -d)"
  local storage=(--storage log --fsync always)
  case "$1" in
    memory) storage=(--storage memory) ;;
    durable-interval) storage=(--storage log --fsync interval) ;;
  esac
  cat > "$CMQD_DIR/cmqd.toml" <<EOF
listen = "127.0.0.1:$PORT"
data_dir = "$CMQD_DIR/data"
[metrics]
enabled = false
[http_api]
enabled = false
[log]
level = "warn"
[[accounts]]
name = "bench"
secret_id = "AKIDpeerbench"
secret_key = "peerbench-secret-key-0123456789"
EOF
  "$CMQD_BIN" --config "$CMQD_DIR/cmqd.toml" "${storage[@]}" > "$CMQD_DIR/cmqd.log" 2>&1 &
  CMQD_PID=$!
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "cmqd did not start; its log:" >&2
  cat "$CMQD_DIR/cmqd.log" >&2
  return 1
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "kernel: $(uname -r); cpus: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); memory: $(free -g | awk '/Mem:/{print $2}') GiB"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "cmqd: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  has rabbitmq && echo "rabbitmq-server: $(dpkg-query -W -f='${Version}' rabbitmq-server)"
  has nats && echo "nats-server: $(nats-server --version)"
  has redis && echo "redis-server: $(redis-server --version)"
  echo "runs: $RUNS; scale: $SCALE; workloads: $WORKLOADS"
} > "$OUT/versions.txt"
cat "$OUT/versions.txt"

if has cmqd; then
  for v in $CMQD_VARIANTS; do
    start_cmqd "$v"
    CMQ_SECRET_ID=AKIDpeerbench CMQ_SECRET_KEY=peerbench-secret-key-0123456789 \
      "$BIN" cmqd --endpoint "127.0.0.1:$PORT" --variant "$v" "${COMMON[@]}" \
      --broker-pid "$CMQD_PID" --out "$OUT/cmqd-$v.jsonl"
    stop_cmqd
  done
fi
if has rabbitmq; then
  (cd "$PB_DIR" && scripts/servers.sh start rabbitmq)
  for v in transient durable; do
    "$BIN" rabbitmq --variant "$v" "${COMMON[@]}" \
      --broker-pid "$(cd "$PB_DIR" && scripts/servers.sh pid rabbitmq)" --out "$OUT/rabbitmq-$v.jsonl"
  done
  (cd "$PB_DIR" && scripts/servers.sh stop rabbitmq)
fi
if has nats; then
  (cd "$PB_DIR" && scripts/servers.sh start nats)
  for v in js-mem js-file; do
    "$BIN" nats --variant "$v" "${COMMON[@]}" \
      --broker-pid "$(cd "$PB_DIR" && scripts/servers.sh pid nats)" --out "$OUT/nats-$v.jsonl"
  done
  (cd "$PB_DIR" && scripts/servers.sh stop nats)
fi
if has redis; then
  (cd "$PB_DIR" && scripts/servers.sh start redis)
  # servers.sh starts three instances on consecutive ports: mem, aof-everysec, aof-always.
  for p in mem:6379 aof-always:6381; do
    for v in $REDIS_VARIANTS; do
      "$BIN" redis --url "redis://127.0.0.1:${p#*:}/" --variant "$v" "${COMMON[@]}" \
        --broker-pid "$(cd "$PB_DIR" && scripts/servers.sh pid "redis-${p%%:*}")" \
        --out "$OUT/redis-$v-${p%%:*}.jsonl"
    done
  done
  (cd "$PB_DIR" && scripts/servers.sh stop redis)
fi
"$BIN" report "$OUT"/*.jsonl > "$OUT/report.md"
echo "report: $OUT/report.md"
cat "$OUT/report.md"
