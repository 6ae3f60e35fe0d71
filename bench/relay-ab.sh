#!/usr/bin/env bash
# Two variants of mxrelay side by side, for levers too small to see across separate runs.
# Each round measures smtp-source -> smtp-sink (direct), then smtp-source -> mxrelay -> two
# smtp-sinks for variant A and for variant B, in alternating order. A variant is an
# environment for the relay (e.g. "TOKIO_WORKER_THREADS=1"; "" for none) and a binary.
#   usage: bench/relay-ab.sh "ENV_A" "ENV_B"
#   env: ROUNDS=10 BIN_A=BIN_B=(this checkout, or BIN) N=5000 SIZE=2048 SESS=20
# Needs the shared bench's DNS and sinks: bash ../shared/bench/postfix/setup.sh
# Prints each round, then the medians of mxrelay/direct and of the relay's CPU per message.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
source "$SHARED/lib.sh"
ENV_A=${1-}; ENV_B=${2-}; ROUNDS=${ROUNDS:-10}
BIN_A=${BIN_A:-$BIN}; BIN_B=${BIN_B:-$BIN}
WORK=; P=
trap '[ -n "$P" ] && kill $P 2>/dev/null && wait $P; sinks_stop_all; dns_stop; rm -rf $WORK' EXIT
two_sink_scene

variant() {  # variant BINARY ENV -> "msg/s relay-µs-per-message"
  local c0 rate
  sinks_stop_all; for ip in "${SINKS[@]}"; do sink_start "$ip"; done
  # shellcheck disable=SC2086  # ENV is a list of VAR=VALUE words
  mx_start "$1" $2
  c0=$(cpu_seconds $P)
  rate=$(measure $MX_ADDR)
  echo "$rate $(us_per_msg "$c0" "$(cpu_seconds $P)")"
  kill $P; wait $P 2>/dev/null; P=
}
ratio() { awk -v a="$1" -v d="$2" 'BEGIN{printf "%.2f", a/d}'; }

ra=(); rb=(); ca=(); cb=()
for i in $(seq "$ROUNDS"); do
  sinks_stop_all; sink_start 127.0.1.1
  d=$(measure 127.0.1.1:25)
  if [ $((i % 2)) = 1 ]; then
    read -r a ac < <(variant "$BIN_A" "$ENV_A"); read -r b bc < <(variant "$BIN_B" "$ENV_B")
  else
    read -r b bc < <(variant "$BIN_B" "$ENV_B"); read -r a ac < <(variant "$BIN_A" "$ENV_A")
  fi
  ra+=("$(ratio "$a" "$d")"); rb+=("$(ratio "$b" "$d")"); ca+=("$ac"); cb+=("$bc")
  echo "round $i: direct $d  A $a msg/s (${ra[-1]} of direct, relay ${ac} µs/msg)  B $b msg/s (${rb[-1]}, ${bc} µs/msg)"
done
echo "A [$ENV_A]: mxrelay/direct median $(median "${ra[@]}"), relay CPU median $(median "${ca[@]}") µs/msg"
echo "B [$ENV_B]: mxrelay/direct median $(median "${rb[@]}"), relay CPU median $(median "${cb[@]}") µs/msg"
