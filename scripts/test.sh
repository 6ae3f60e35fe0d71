#!/usr/bin/env bash
# The README's test command: installs what is missing, builds everything (the wasm policy
# component included) and runs every test: unit, golden vectors, component, end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export PATH="$PATH:/usr/sbin:/sbin"
# One profile (release) for build, tests and benches, so wasmtime is compiled once.
cargo build --release --locked --workspace --all-targets
web/build.sh
status=0
cargo nextest run --release --locked --workspace --no-fail-fast || status=1
# The browser bindings under Node (wasm-bindgen-test), then the widget in headless Chromium.
CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
  cargo test --locked -p mxrelay-policy-web --target wasm32-unknown-unknown --test node || status=1
(cd web && node --test tests/) || status=1
exit $status
