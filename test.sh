#!/usr/bin/env bash
# Run every test: Rust unit + integration tests, then the Python client suites against the real server.
# Creates its own Python venv (default ~/.cache/mkts-venv; override with MKTS_VENV).
set -euo pipefail
cd "$(dirname "$0")"

# A target dir outside the clone survives fresh clones (CI) and turns a cold build into an incremental one.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mkts-target}"
VENV="${MKTS_VENV:-$HOME/.cache/mkts-venv}"
PY_REQ=tests/python/requirements.txt

# The browser test (tests/python/test_console.py) drives Debian's Chromium: Playwright cannot download its own.
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (for the console's browser test)"
  export DEBIAN_FRONTEND=noninteractive
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo -E)
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" apt-get install -y -qq chromium
fi

echo "== python venv: $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.mkts-req-$(sha256sum "$PY_REQ" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$PY_REQ"
  touch "$stamp"
fi

# One build of every target with one feature set: the example plugins (shared libraries the plugin tests
# load) come out of the same build as the tests, so nothing is compiled twice.
echo "== cargo build (debug, whole workspace, all targets)"
cargo build --workspace --all-targets

echo "== cargo test (debug, whole workspace)"
cargo test --workspace

echo "== python client tests"
export MKTS_BIN="$CARGO_TARGET_DIR/debug/mkts"
"$VENV/bin/python" -m pytest tests/python -q -p no:cacheprovider "$@"
