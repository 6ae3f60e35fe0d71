#!/usr/bin/env bash
# The README's test command: installs what is missing, builds everything (the wasm policy
# component included) and runs every test: unit, golden vectors, component, end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export PATH="$PATH:/usr/sbin:/sbin"
# One profile (release) for build, tests and benches, so wasmtime is compiled once.
cargo build --release --locked --workspace --all-targets
cargo nextest run --release --locked --workspace --no-fail-fast
