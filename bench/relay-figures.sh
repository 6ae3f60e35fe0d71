#!/usr/bin/env bash
# Acceptance latency (p50/p99) and memory: RSS idle, with 10k queued messages, and after a
# restart with them.
#   usage: bench/relay-figures.sh          env: N=5000 SESS=20 QUEUED=10000 BIN=(this checkout)
# Latency: mxrelay-loadgen -> mxrelay -> two smtp-sinks (fsync on).
# Memory: the domain's only server refuses connections, so accepted mail stays queued.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
QUEUED=${QUEUED:-10000}
(cd "$ROOT" && cargo build --release -q -p mxrelay-e2e)
GEN=$ROOT/target/release/mxrelay-loadgen
W=$(mktemp -d); PIDS=()
# The relays finish their shutdown (a last journal write) before their directory goes.
trap 'kill "${PIDS[@]}" 2>/dev/null; wait; rm -rf "$W"' EXIT
rss() { awk '/VmRSS/{printf "%.1f MB", $2/1024}' "/proc/$1/status"; }
start_relay() {  # start_relay NAME PORT SERVERS...
  local name=$1 port=$2; shift 2
  relay_toml "127.0.0.1:$port" "$name-queue" 'retry = ["1h"]' "$@" > "$W/$name.toml"
  relay_launch "$W/$name.toml" "$W/$name.log" "$BIN" MXRELAY_LOG=warn,mxrelay=info; PIDS+=("$P")
}
smtp-sink -u nobody 127.0.1.1:2701 256 & PIDS+=($!)
smtp-sink -u nobody 127.0.1.2:2701 256 & PIDS+=($!)
start_relay lat 2700 127.0.1.1:2701 127.0.1.2:2701
echo "latency: $("$GEN" 127.0.0.1:2700 user@customer.test "$N" "$SESS")"

start_relay mem 2710 127.0.1.250:9
sleep 1; echo "RSS idle: $(rss "$P")"
"$GEN" 127.0.0.1:2710 user@customer.test "$QUEUED" "$SESS" > "$W/fill.txt"
echo "queued: $(cat "$W/fill.txt")"
echo "RSS with $QUEUED queued: $(rss "$P")"

# The same queue after a restart: every message is read back and retried at once (its server
# still refuses), from several threads.
kill "$P"; wait "$P" || true
relay_launch "$W/mem.toml" "$W/mem-again.log" "$BIN" MXRELAY_LOG=warn,mxrelay=info; PIDS+=("$P")
sleep 3; echo "RSS 3 s after a restart with $QUEUED queued: $(rss "$P")"
