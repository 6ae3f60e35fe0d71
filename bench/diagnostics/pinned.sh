#!/bin/sh
# Diagnostic wrapper, given to relay-ab.sh as BIN_B: this checkout's relay held to the CPUs
# in MX_CPUS (default 1), e.g. ROUNDS=10 BIN_B=bench/diagnostics/pinned.sh bench/relay-ab.sh "" "MX_CPUS=1"
exec taskset -c "${MX_CPUS:-1}" "$(dirname "$0")/../../target/release/mxrelay" "$@"
