#!/usr/bin/env bash
# Builds policies/NAME into a component at target/policies/NAME.wasm and checks it.
#   usage: scripts/build-policy.sh NAME [SETTINGS_JSON]
# The check uses mxrelay and mxrelay-componentize from $MXRELAY_BIN_DIR when it is set (a
# directory where they are built already); otherwise they are built here, in release.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: scripts/build-policy.sh NAME [SETTINGS_JSON]}
scripts/setup.sh
package=mxrelay-policy-$name
lib=${package//-/_}
target=${CARGO_TARGET_DIR:-target}
cargo build --package "$package" --target wasm32-unknown-unknown --profile wasm
bin=${MXRELAY_BIN_DIR:-}
if [ -z "$bin" ]; then
  cargo build --release -q -p mxrelay -p mxrelay-wasm-build --bin mxrelay --bin mxrelay-componentize
  bin=$target/release
fi
mkdir -p "$target/policies"
"$bin/mxrelay-componentize" "$target/wasm32-unknown-unknown/wasm/$lib.wasm" "$target/policies/$name.wasm"
"$bin/mxrelay" policy check "$target/policies/$name.wasm" --settings "${2:-{\}}"
component=$(realpath "$target/policies/$name.wasm")
echo "component: $component  (set policy = \"$component\" for a domain)"
