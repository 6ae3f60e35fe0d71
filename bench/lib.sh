# Shared by the bench scripts: where things are, the usual sizes, the binary, the config.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/bench/postfix}
N=${N:-5000}; SIZE=${SIZE:-2048}; SESS=${SESS:-20}; RUNS=${RUNS:-3}
# BIN: the mxrelay to measure. Given, it is used as it is (to compare builds side by side);
# otherwise this checkout's release build, brought up to date first so no stale binary is measured.
if [ -z "${BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p mxrelay) || exit 1
  BIN=$ROOT/target/release/mxrelay
fi

# Clock ticks per second, the unit of CPU times in /proc/PID/stat.
HZ=$(getconf CLK_TCK)
# cpu_seconds PID: user + system CPU the process has used so far.
cpu_seconds() { awk -v hz="$HZ" '{print ($14+$15)/hz}' "/proc/$1/stat"; }
# us_per_msg BEFORE AFTER: CPU seconds between two cpu_seconds readings, in µs per message of N.
us_per_msg() { awk -v a="$1" -v b="$2" -v n="$N" 'BEGIN{printf "%.0f", (b-a)*1e6/n}'; }
# thread_cpu PID: "name seconds" per thread name (threads of one name summed), sorted by name.
thread_cpu() {
  local t
  for t in /proc/"$1"/task/*; do
    awk -v hz="$HZ" '{c = $0; sub(/^[0-9]+ \(/, "", c); name = substr(c, 1, index(c, ")") - 1)
      sub(/^[^)]*\) /, "", c); split(c, f, " "); print name, (f[12] + f[13]) / hz}' "$t/stat"
  done | awk '{s[$1] += $2} END{for (k in s) print k, s[k]}' | sort
}
# threads_per_msg BEFORE_FILE AFTER_FILE: from two thread_cpu outputs, "name µs" per message of N.
threads_per_msg() { join "$1" "$2" | awk -v n="$N" '{printf "%s %.0f  ", $1, ($3 - $2) * 1e6 / n}'; }

# relay_toml LISTEN QUEUE DELIVERY_LINES SERVER...
#   One domain, customer.test, whose servers (host or host:port) all have preference 10.
#   DELIVERY_LINES go under [delivery] (\n-separated, may be empty).
relay_toml() {
  local listen=$1 queue=$2 delivery=$3 s; shift 3
  printf '[relay]\nhostname = "bench.test"\nlisten = ["%s"]\nqueue = "%s"\nmax_connections_per_client = 1000\n' "$listen" "$queue"
  printf '[delivery]\n%b\n[[domain]]\nname = "customer.test"\n' "$delivery"
  for s in "$@"; do
    printf '[[domain.server]]\nhost = "%s"\n' "${s%%:*}"
    if [ "$s" != "${s%%:*}" ]; then printf 'port = %s\n' "${s#*:}"; fi
    printf 'preference = 10\n'
  done
}

# The measuring helpers below work in the calling script's WORK (a scratch directory, with
# the relay's config in $WORK/relay.toml) on the sinks whose IPs are in SINKS, with the shared
# Postfix bench's helpers (sinks_total, now, elapsed).

wait_total() {  # wait_total TARGET: returns once the sinks hold TARGET messages; fails after 600 s
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

# two_sink_scene: what the throughput scripts share: SINKS (two smtp-sinks' IPs), MX_ADDR,
# WORK (a scratch directory) holding a relay config whose two equal-preference servers are
# host names, and the shared bench's dnsmasq answering for them (started here). The caller
# sets its EXIT trap first (dns_stop, sinks_stop_all, rm -rf $WORK).
two_sink_scene() {
  SINKS=(127.0.1.1 127.0.1.2); MX_ADDR=127.0.0.1:2626; WORK=$(mktemp -d); P=
  relay_toml "$MX_ADDR" queue "resolver = \"$DNS_IP:53\"" mx1.customer.test mx2.customer.test > "$WORK/relay.toml"
  dns_start mx1:127.0.1.1:10 mx2:127.0.1.2:10
}

# relay_launch CONFIG LOG BINARY [VAR=VALUE...]: starts BINARY on CONFIG with the environment
# given and its log in LOG; sets P to its PID and returns once it is ready. A relay that exits
# instead (its port taken, say) ends the script with the log's last lines.
relay_launch() {
  local config=$1 log=$2 bin=$3; shift 3
  env "$@" "$bin" run "$config" 2> "$log" & P=$!
  until grep -q "mxrelay ready" "$log"; do
    if ! kill -0 "$P" 2>/dev/null; then
      echo "mxrelay exited before it was ready:" >&2; tail -3 "$log" >&2; P=; exit 1
    fi
    sleep 0.01
  done
}

# mx_start BINARY [VAR=VALUE...]: starts BINARY on $WORK/relay.toml with an empty queue and
# the environment given (per-message log lines on); sets P and returns once it is ready.
mx_start() {
  local bin=$1; shift
  rm -rf "$WORK/queue"
  relay_launch "$WORK/relay.toml" "$WORK/mx.log" "$bin" MXRELAY_LOG=info "$@"
}
