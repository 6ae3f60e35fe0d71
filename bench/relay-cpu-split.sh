#!/usr/bin/env bash
# mxrelay's own CPU per message, intake and delivery measured apart (its /proc CPU time).
#   usage: bench/relay-cpu-split.sh        env: N=5000 SIZE=2048 SESS=20 RUNS=3 BIN=(this checkout)
# Intake: smtp-source -> mxrelay while the two servers are down (mail stays queued).
# Delivery: the two smtp-sinks start; the relay's probe sees them and drains the queue.
# Prints msg/s and µs of mxrelay CPU per message for each phase, per run.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
source "$SHARED/lib.sh"
WORK=$(mktemp -d); P=
trap '[ -n "$P" ] && kill $P 2>/dev/null && wait $P; sinks_stop_all; rm -rf $WORK' EXIT
relay_toml 127.0.0.1:2626 queue "probe_interval = \"300ms\"" 127.0.1.1 127.0.1.2 > "$WORK/relay.toml"
rate() { awk -v n="$N" -v t="$1" 'BEGIN{printf "%.0f", n/t}'; }
for i in $(seq "$RUNS"); do
  sinks_stop_all; mx_start "$BIN"
  c0=$(cpu_seconds $P); t0=$(now)
  smtp-source -s "$SESS" -l "$SIZE" -m "$N" -f a@src.test -t user@customer.test 127.0.0.1:2626
  ta=$(now); c1=$(cpu_seconds $P)
  sleep 0.5; c2=$(cpu_seconds $P)   # settle: the deferrals of the last messages
  t1=$(now); sink_start 127.0.1.1; sink_start 127.0.1.2
  until [ "$(sinks_total 127.0.1.1 127.0.1.2)" -ge "$N" ]; do sleep 0.02; done
  te=$(now); c3=$(cpu_seconds $P)
  echo "run $i: intake $(rate "$(elapsed "$t0" "$ta")") msg/s, $(us_per_msg "$c0" "$c1") µs CPU/msg | delivery $(rate "$(elapsed "$t1" "$te")") msg/s, $(us_per_msg "$c2" "$c3") µs CPU/msg"
  kill $P; wait $P 2>/dev/null; P=
done
