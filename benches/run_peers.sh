#!/usr/bin/env bash
# Run the peer benchmark (../shared/bench) with the mkts server peers, all in one run, so ratios are
# measured side by side. Starts a release mkts on a fresh data directory, stops it afterwards.
#
#   benches/run_peers.sh small                      # all peers + server-flight + server-pymarketstore
#   benches/run_peers.sh tiny --reps 3 --appends 100
#   PEERS=ref-flight-ram,ref-file-fsync,arcticdb benches/run_peers.sh small
#
# Env: MKTS_BIN_BASE (a second binary, served on HTTP 6993 / gRPC 6995 for the `server-flight-base` peers of
# benches/local_read_bench.py), PEERS_SCRIPT (default: the bench's peers.py), MKTS_BIN (default: release build in ~/.cache/mkts-target-release), BENCH_DIR (default ../shared/bench
# beside the repo), BENCH_VENV (default ~/.cache/mkts-bench-venv, created from the bench's requirements.txt).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
size="${1:-small}"; shift || true
BENCH_DIR="${BENCH_DIR:-$repo/../shared/bench}"
BENCH_VENV="${BENCH_VENV:-$HOME/.cache/mkts-bench-venv}"
MKTS_BIN="${MKTS_BIN:-$HOME/.cache/mkts-target-release/release/mkts}"
if [ ! -x "$MKTS_BIN" ]; then
  echo "building release mkts (first time ~25 min on 2 cores)"; (cd "$repo" && CARGO_TARGET_DIR="$HOME/.cache/mkts-target-release" cargo build --release --bin mkts)
fi
if [ ! -x "$BENCH_VENV/bin/python" ]; then
  python3 -m venv "$BENCH_VENV" && "$BENCH_VENV/bin/pip" install -q -r "$BENCH_DIR/requirements.txt"
fi
work="$(mktemp -d /tmp/mkts-bench.XXXXXX)"
http_port="${HTTP_PORT:-5993}"; grpc_port="${GRPC_PORT:-5995}"
printf 'root_directory: %s/data\nlisten_host: 127.0.0.1\nlisten_port: %s\ngrpc_listen_port: %s\nlog_level: warning\n' \
  "$work" "$http_port" "$grpc_port" > "$work/mkts.yml"
"$MKTS_BIN" start --config "$work/mkts.yml" > "$work/server.log" 2>&1 &
pid=$!
base_pid=""
if [ -n "${MKTS_BIN_BASE:-}" ]; then
  printf 'root_directory: %s/data-base\nlisten_host: 127.0.0.1\nlisten_port: 6993\ngrpc_listen_port: 6995\nlog_level: warning\n' \
    "$work" > "$work/mkts-base.yml"
  "$MKTS_BIN_BASE" start --config "$work/mkts-base.yml" > "$work/server-base.log" 2>&1 &
  base_pid=$!
  export MKTS_BASE_SERVER="grpc://127.0.0.1:6995"
fi
trap 'kill $pid $base_pid 2>/dev/null; wait $pid $base_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$http_port/heartbeat" >/dev/null && break; sleep 0.1; done
if [ -n "$base_pid" ]; then
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:6993/heartbeat" >/dev/null && break; sleep 0.1; done
fi
peers_arg=()
if [ -n "${PEERS:-}" ]; then peers_arg=(--peers "$PEERS,server-flight,server-pymarketstore"); fi
out="${OUT:-$here/results-$size}"
# PEERS_SCRIPT: a wrapper that adds peers (benches/local_read_bench.py adds server-local and server-flight-stream).
script="${PEERS_SCRIPT:-$BENCH_DIR/peers.py}"
"$BENCH_VENV/bin/python" "$script" --size "$size" \
  --server "grpc://127.0.0.1:$grpc_port" --rpc "http://127.0.0.1:$http_port/rpc" \
  --json "$out.json" --md "$out.md" "${peers_arg[@]}" "$@"
echo "server data dir size: $(du -sh "$work/data" | cut -f1)"
