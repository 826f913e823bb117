#!/usr/bin/env bash
# Minimize a target's corpus into fuzz/corpus/TARGET (what `cargo fuzz cmin` does): keep the smallest set of
# inputs from the committed corpus, the seeds and the work corpus that covers the same features.
# Usage: fuzz/cmin.sh TARGET
set -euo pipefail
t=$1
here=$(cd "$(dirname "$0")" && pwd)
bin=${FUZZ_TARGET_DIR:-/root/.cache/mkts-fuzz-target}/x86_64-unknown-linux-gnu/release/$t
mkdir -p "$here/corpus/$t" "$here/corpus-work/$t"
new=$(mktemp -d)
nice -n 15 "$bin" ${MERGE:--merge=1} -timeout=10 -rss_limit_mb=2048 "$new" "$here/corpus/$t" "$here/corpus-work/$t" >/dev/null 2>&1
rm -rf "$here/corpus/$t"
mv "$new" "$here/corpus/$t"
echo "$t: $(ls "$here/corpus/$t" | wc -l) files, $(du -sk "$here/corpus/$t" | cut -f1) KiB"
