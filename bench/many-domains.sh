#!/usr/bin/env bash
# Start-up time (to within the 10 ms the launcher polls its log at) and idle RSS of a relay
# with many customer domains (two servers each, the built-in policy), for two builds side by
# side in alternating rounds; prints the medians.
#   usage: bench/many-domains.sh     env: DOMAINS="1000 10000" ROUNDS=3 BIN_A=... BIN_B=(this checkout)
# Nothing is delivered: the servers are documentation addresses and names no DNS answers.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
DOMAINS=${DOMAINS:-1000 10000}; ROUNDS=${ROUNDS:-3}
BIN_A=${BIN_A:-$BIN}; BIN_B=${BIN_B:-$BIN}
W=$(mktemp -d); P=
trap 'if [ -n "$P" ]; then kill "$P" 2>/dev/null; wait "$P" 2>/dev/null; fi; rm -rf "$W"' EXIT

domains_toml() {  # domains_toml COUNT
  printf '[relay]\nhostname = "bench.test"\nlisten = ["127.0.0.1:2720"]\nqueue = "queue"\n\n[delivery]\n'
  awk -v n="$1" 'BEGIN { for (i = 0; i < n; i++) {
    printf "[[domain]]\nname = \"customer%d.test\"\n", i
    printf "[[domain.server]]\nhost = \"192.0.2.%d\"\npreference = 10\n", i % 250 + 1
    printf "[[domain.server]]\nhost = \"mx.customer%d.test\"\npreference = 20\n", i } }'
}

# one_start BINARY CONFIG: prints the seconds until ready and the RSS in MB, then stops it.
one_start() {
  rm -rf "$W/queue"
  local t0 t1
  t0=$(date +%s.%N)
  relay_launch "$2" "$W/relay.log" "$1" MXRELAY_LOG=warn,mxrelay=info
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" '/VmRSS/{printf "%.3f %.1f\n", b - a, $2 / 1024}' "/proc/$P/status"
  kill "$P"; wait "$P" || true; P=
}

for n in $DOMAINS; do
  domains_toml "$n" > "$W/relay.toml"
  declare -A secs=() rss=()
  for round in $(seq 1 "$ROUNDS"); do
    for which in A B; do
      bin=BIN_$which
      # Not `< <(...)`: that would go on while the relay still shuts down.
      out=$(one_start "${!bin}" "$W/relay.toml")
      read -r s r <<< "$out"
      secs[$which]+="$s "; rss[$which]+="$r "
    done
  done
  for which in A B; do
    # shellcheck disable=SC2086 # the lists are space-separated numbers
    echo "$n domains, $which: ready after $(median ${secs[$which]}) s (${secs[$which]% }), RSS $(median ${rss[$which]}) MB (${rss[$which]% })"
  done
  unset secs rss
done
