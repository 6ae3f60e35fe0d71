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
