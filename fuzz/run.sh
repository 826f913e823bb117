#!/usr/bin/env bash
# Run one fuzz target for SECONDS (default 300) at low priority and print its final figures. FORK=1
# (default) continues past crashes (libFuzzer fork mode; the last job may overrun SECONDS); FORK=0 runs
# in-process and stops at the first crash. Build first (docs/fuzzing.md):
#   cd fuzz && RUSTC_BOOTSTRAP=1 nice -n 15 cargo fuzz build -s none --target-dir "$FUZZ_TARGET_DIR"
# Usage: fuzz/run.sh TARGET [SECONDS]
set -euo pipefail
t=$1
secs=${2:-300}
here=$(cd "$(dirname "$0")" && pwd)
bin=${FUZZ_TARGET_DIR:-/root/.cache/mkts-fuzz-target}/x86_64-unknown-linux-gnu/release/$t
mkdir -p "$here/corpus/$t" "$here/corpus-work/$t" "$here/artifacts/$t" "$here/logs"
log=$here/logs/$t.log
start=$(date +%s)
# The first corpus directory receives new inputs; seeds and the committed corpus are read.
mode=()
[ "${FORK:-1}" = 1 ] && mode=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
nice -n 15 "$bin" "${mode[@]}" -timeout="${TIMEOUT:-10}" -rss_limit_mb=2048 \
  -max_total_time="$secs" -artifact_prefix="$here/artifacts/$t/" -print_final_stats=1 \
  "$here/corpus-work/$t" "$here/seeds/$t" "$here/corpus/$t" >"$log" 2>&1 || true
end=$(date +%s)
echo "$t: wall $((end - start)) s"
grep -E '^#[0-9]+:?[[:space:]].*cov' "$log" | tail -1
grep -E '^stat::' "$log" || true
grep -cE 'CRASH|deadly signal|panicked' "$log" | sed 's/^/crash reports: /'
ls "$here/artifacts/$t" | wc -l | sed 's/^/artifacts: /'
