# Shared by the bench scripts: the relay config they run.
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
