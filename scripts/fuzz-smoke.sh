#!/usr/bin/env bash
# A short run of every fuzz target (cargo-fuzz, nightly), starting from the committed corpus.
#   usage: scripts/fuzz-smoke.sh [SECONDS_PER_TARGET=10]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for target in smtp_data smtp_command config servers_and_plan journal dsn_report; do
  echo "fuzz: $target for ${secs}s"
  # A copy of the corpus: the committed one stays as it is; findings go to fuzz/artifacts.
  work=$(mktemp -d)
  cp -r "fuzz/corpus/$target/." "$work/"
  (cd fuzz && cargo +nightly fuzz run --release "$target" "$work" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -3)
  rm -rf "$work"
done
