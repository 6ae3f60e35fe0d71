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
WORK=; P=
trap '[ -n "$P" ] && kill $P 2>/dev/null && wait $P; sinks_stop_all; pf_stop; dns_stop; rm -rf $WORK' EXIT
two_sink_scene
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
  mx_start "$BIN"
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
