#!/usr/bin/env bash
# The README's run command: builds mxrelay and runs it on examples/relay.toml
# (listens on 127.0.0.1:2525, queue in var/queue; no external service needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -p mxrelay
# As the systemd unit does (contrib/systemd): two malloc arenas, which keep a large queue's
# memory down.
export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-2}
exec "${CARGO_TARGET_DIR:-target}/release/mxrelay" run "${1:-examples/relay.toml}"
