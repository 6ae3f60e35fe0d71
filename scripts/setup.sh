#!/usr/bin/env bash
# Installs what building and testing mxrelay needs on a fresh Debian machine (idempotent).
#   scripts/setup.sh          Rust wasm targets only (enough to build and run the relay)
#   scripts/setup.sh --test   also the test peers: Postfix (smtp-sink/smtp-source and test-owned
#                             instances for interop), swaks with TLS,
#                             dnsmasq, dig, GNU time (for a bench script), systemd-analyze
#                             and the browser-test tools
set -euo pipefail
cd "$(dirname "$0")/.."

need_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# The built-in policy is compiled to WebAssembly during the build.
installed=$(rustup target list --installed)
for t in wasm32-unknown-unknown; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

[ "${1:-}" = "--test" ] || exit 0

pkgs=()
command -v smtp-sink >/dev/null || command -v /usr/sbin/smtp-sink >/dev/null || pkgs+=(postfix)
command -v swaks >/dev/null || pkgs+=(swaks)
# swaks --tls needs Perl's TLS modules (Recommends, which --no-install-recommends leaves out).
perl -MIO::Socket::SSL -MNet::SSLeay -e1 2>/dev/null || pkgs+=(libio-socket-ssl-perl libnet-ssleay-perl)
command -v dnsmasq >/dev/null || command -v /usr/sbin/dnsmasq >/dev/null || pkgs+=(dnsmasq-base)
command -v dig >/dev/null || pkgs+=(bind9-dnsutils)
# GNU time: bench/relay-vs-postfix.sh reads smtp-source's CPU and context switches from it.
[ -x /usr/bin/time ] || pkgs+=(time)
# The hung-disk test freezes a small ext4 filesystem on a loop device.
[ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || pkgs+=(e2fsprogs)
[ -x /usr/sbin/fsfreeze ] || [ -x /sbin/fsfreeze ] || pkgs+=(util-linux)
command -v mount >/dev/null || pkgs+=(mount)
# A test watches the admin API's file writes and syncs with it.
command -v strace >/dev/null || pkgs+=(strace)
[ -x /usr/bin/chromium ] || pkgs+=(chromium)
# systemd-analyze checks the systemd unit in contrib/ (no systemd needs to run).
command -v systemd-analyze >/dev/null || pkgs+=(systemd)
command -v node >/dev/null || pkgs+=(nodejs npm)
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "setup: installing ${pkgs[*]}"
  need_root apt-get -o DPkg::Lock::Timeout=600 update -qq
  # No system-wide mail system is configured or started: the tests run smtp-sink/smtp-source
  # and their own Postfix instances (postfix -c DIR) on loopback ports.
  echo "postfix postfix/main_mailer_type select No configuration" | need_root debconf-set-selections
  need_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
# The browser module's CLI must match the wasm-bindgen crate exactly (--locked fails on this
# registry mirror: its lockfile wants a newer webpki-roots than the mirror serves).
wb=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
[ "$(wasm-bindgen --version 2>/dev/null | cut -d' ' -f2)" = "$wb" ] || cargo install wasm-bindgen-cli --version "$wb"
# Browser tests drive Debian's chromium through playwright-core; no browser is downloaded.
(cd web && npm ci --no-audit --no-fund --loglevel=error)
