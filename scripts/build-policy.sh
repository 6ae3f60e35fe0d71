#!/usr/bin/env bash
# Builds policies/NAME into a component at target/policies/NAME.wasm and checks it.
#   usage: scripts/build-policy.sh NAME [SETTINGS_JSON]
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: scripts/build-policy.sh NAME [SETTINGS_JSON]}
scripts/setup.sh
package=mxrelay-policy-$name
lib=${package//-/_}
cargo build --package "$package" --target wasm32-unknown-unknown --profile wasm
mkdir -p target/policies
cargo run --release -q -p mxrelay-wasm-build --bin mxrelay-componentize -- \
  "target/wasm32-unknown-unknown/wasm/$lib.wasm" "target/policies/$name.wasm"
cargo run --release -q -p mxrelay -- policy check "target/policies/$name.wasm" --settings "${2:-{\}}"
echo "component: target/policies/$name.wasm  (set policy = \"$PWD/target/policies/$name.wasm\" for a domain)"
