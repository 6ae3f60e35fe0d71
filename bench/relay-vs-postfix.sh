#!/usr/bin/env bash
# End-to-end throughput, side by side in one run: smtp-source -> {direct sink, Postfix,
# mxrelay} -> two equal-preference smtp-sinks, fsync on (the methodology of
# ../shared/bench/postfix/bench-throughput.sh, whose helpers this sources).
#   usage: bench/relay-vs-postfix.sh      env: N=5000 SIZE=2048 SESS=20 RUNS=3 BIN=(this checkout)
# Needs Postfix set up as the reference relay first: bash ../shared/bench/postfix/setup.sh
# Prints a table of medians, the ratios mxrelay/Postfix and mxrelay/direct, the CPU per
# message of smtp-source and of mxrelay (also per relay thread), smtp-source's context
# switches, and how idle the machine was during each run.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
source "$SHARED/lib.sh"
SINKS=(127.0.1.1 127.0.1.2)
MX_ADDR=127.0.0.1:2626
WORK=$(mktemp -d); P=
trap '[ -n "$P" ] && kill $P 2>/dev/null && wait $P; sinks_stop_all; pf_stop; dns_stop; rm -rf $WORK' EXIT

relay_toml "$MX_ADDR" queue "resolver = \"$DNS_IP:53\"" mx1.customer.test mx2.customer.test > "$WORK/relay.toml"

wait_total() {  # wait_total TARGET -> seconds timestamp when the sinks reached it
  local end=$(( $(date +%s) + 600 ))
  while [ "$(date +%s)" -lt "$end" ]; do
    [ "$(sinks_total "${SINKS[@]}")" -ge "$1" ] && return 0; sleep 0.05; done
  return 1
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
# Idle and total ticks of all CPUs so far (idle includes iowait).
ticks() { awk '/^cpu /{print $5+$6, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
measure() {  # measure TARGET_ADDR -> msg/s end to end; smtp-source's own CPU per message to
  # $WORK/cpu, its context switches per 1000 messages (involuntary/voluntary) to
  # $WORK/switches, the machine's idle share (%) to $WORK/idle. GNU time prints CPU seconds
  # to 10 ms: 2 µs per message at N=5000.
  local t0 te i0 a0 i1 a1
  read -r i0 a0 < <(ticks)
  t0=$(now)
  /usr/bin/time -f "%U %S %c %w" -o "$WORK/time" \
    smtp-source -s "$SESS" -l "$SIZE" -m "$N" -f a@src.test -t user@customer.test "$1" > "$WORK/source.out" 2>&1
  wait_total "$N" || echo "TIMEOUT" >&2
  te=$(now)
  read -r i1 a1 < <(ticks)
  awk -v n="$N" '{printf "%.0f", ($1+$2)*1e6/n}' "$WORK/time" > "$WORK/cpu"
  awk -v n="$N" '{printf "%.0f/%.0f", $3*1000/n, $4*1000/n}' "$WORK/time" > "$WORK/switches"
  awk -v i="$((i1 - i0))" -v a="$((a1 - a0))" 'BEGIN{printf "%.0f", i*100/a}' > "$WORK/idle"
  awk -v n="$N" -v t="$(elapsed "$t0" "$te")" 'BEGIN{printf "%.1f", n/t}'
}

dns_start mx1:127.0.1.1:10 mx2:127.0.1.2:10
direct=(); postfix=(); mx=(); split=(); src_direct=(); src_mx=(); sw_direct=(); sw_mx=(); relay_cpu=(); relay_threads=(); idle_direct=(); idle_mx=()
for i in $(seq "$RUNS"); do
  sinks_stop_all; sink_start 127.0.1.1
  direct+=("$(measure 127.0.1.1:25)"); src_direct+=("$(cat "$WORK/cpu")"); idle_direct+=("$(cat "$WORK/idle")")
  sw_direct+=("$(cat "$WORK/switches")")

  sinks_stop_all; for ip in "${SINKS[@]}"; do sink_start "$ip"; done
  pf_stop; queue_purge; pf_start; sleep 1
  postfix+=("$(measure 127.0.0.1:2525)")
  pf_stop

  sinks_stop_all; for ip in "${SINKS[@]}"; do sink_start "$ip"; done
  rm -rf "$WORK/queue"
  "$BIN" run "$WORK/relay.toml" 2> "$WORK/mx.log" & P=$!
  until grep -q "mxrelay ready" "$WORK/mx.log"; do sleep 0.05; done
  c0=$(cpu_seconds $P); thread_cpu $P > "$WORK/threads0"
  mx+=("$(measure $MX_ADDR)"); src_mx+=("$(cat "$WORK/cpu")"); idle_mx+=("$(cat "$WORK/idle")")
  sw_mx+=("$(cat "$WORK/switches")")
  relay_cpu+=("$(us_per_msg "$c0" "$(cpu_seconds $P)")"); thread_cpu $P > "$WORK/threads1"
  relay_threads+=("run $i: $(threads_per_msg "$WORK/threads0" "$WORK/threads1")")
  split+=("$(sink_count 127.0.1.1)/$(sink_count 127.0.1.2)")
  kill $P; wait $P 2>/dev/null; P=
  echo "run $i: direct ${direct[-1]}  postfix ${postfix[-1]}  mxrelay ${mx[-1]} msg/s (mxrelay split ${split[-1]})"
done
d=$(median "${direct[@]}"); p=$(median "${postfix[@]}"); m=$(median "${mx[@]}")
echo
echo "| path (N=$N, $SIZE-byte, $SESS sessions, fsync on, $(nproc) cores) | runs (msg/s) | median msg/s |"
echo "|---|---|---|"
echo "| smtp-source -> smtp-sink (direct) | ${direct[*]} | $d |"
echo "| smtp-source -> Postfix $(postconf -h mail_version) -> 2 sinks | ${postfix[*]} | $p |"
echo "| smtp-source -> mxrelay -> 2 sinks | ${mx[*]} | $m |"
echo
awk -v m="$m" -v p="$p" -v d="$d" 'BEGIN{printf "mxrelay / Postfix = %.2fx   mxrelay / direct = %.2f\n", m/p, m/d}'
echo "mxrelay per-sink split: ${split[*]}"
echo "smtp-source's own CPU per message (µs): direct ${src_direct[*]} (median $(median "${src_direct[@]}")), into mxrelay ${src_mx[*]} (median $(median "${src_mx[@]}"))"
echo "smtp-source's context switches per 1000 messages, involuntary/voluntary: direct ${sw_direct[*]}, into mxrelay ${sw_mx[*]}"
echo "mxrelay's CPU per message (µs), intake and delivery: ${relay_cpu[*]} (median $(median "${relay_cpu[@]}"))"
printf "mxrelay's CPU per message by thread (µs), %s\n" "${relay_threads[@]}"
echo "machine idle while measuring (%): direct ${idle_direct[*]} (median $(median "${idle_direct[@]}")), mxrelay ${idle_mx[*]} (median $(median "${idle_mx[@]}"))"
