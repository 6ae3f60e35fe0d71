#!/usr/bin/env bash
# Builds the widget's WebAssembly module into web/pkg (wasm-bindgen --target web) and
# prints its size. Needs wasm-bindgen-cli at exactly the wasm-bindgen crate's version.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
if [ "$(wasm-bindgen --version 2>/dev/null | cut -d' ' -f2)" != "$version" ]; then
  echo "installing wasm-bindgen-cli $version (about 11 minutes on 2 cores)"
  cargo install wasm-bindgen-cli --version "$version"   # --locked fails on this registry mirror
fi
cargo build --locked -p mxrelay-policy-web --target wasm32-unknown-unknown --profile wasm
wasm-bindgen --target web --no-typescript --out-dir web/pkg "${CARGO_TARGET_DIR:-target}"/wasm32-unknown-unknown/wasm/mxrelay_policy_web.wasm
raw=$(stat -c %s web/pkg/mxrelay_policy_web_bg.wasm)
gz=$(gzip -9c web/pkg/mxrelay_policy_web_bg.wasm | wc -c)
echo "web/pkg: wasm ${raw} bytes, ${gz} bytes gzipped (target <= 61440)"
