#!/usr/bin/env bash
# Diagnostic wrapper, given to relay-ab.sh as BIN_B: this checkout's relay with its threads
# named NICE_COMM (default queue-writer) reniced to NICE_VAL (default -10), e.g.
#   ROUNDS=10 BIN_B=bench/diagnostics/reniced.sh bench/relay-ab.sh "" "NICE_COMM=tokio-rt-worker NICE_VAL=5"
# A watcher renices each such thread as soon as it exists; those threads start before the
# relay says it is ready, so the whole load runs reniced.
( until ls /proc/$$/task > /dev/null 2>&1 && grep -qx "${NICE_COMM:-queue-writer}" /proc/$$/task/*/comm 2> /dev/null; do sleep 0.005; done
  sleep 0.05  # the runtime starts its workers together
  for t in /proc/$$/task/*; do
    [ "$(cat "$t/comm")" = "${NICE_COMM:-queue-writer}" ] && renice -n "${NICE_VAL:--10}" -p "${t##*/}" > /dev/null
  done ) &
exec "$(dirname "$0")/../../target/release/mxrelay" "$@"
