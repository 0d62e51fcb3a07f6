#!/usr/bin/env bash
# Installs what the test suite needs when it is absent (Debian packages,
# rustfmt and clippy, the FHIR R4 examples, the interop tools in a local
# virtualenv), so that a machine with only Rust passes. Idempotent: a
# second run only checks. Needs root or sudo for the packages.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=()
[ "$(id -u)" = 0 ] || sudo=(sudo)

need_apt=()
command -v npm >/dev/null || need_apt+=(npm)
command -v curl >/dev/null || need_apt+=(curl)
# The NATS tests start their own nats-server (JetStream) on a free port.
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || need_apt+=(nats-server)
command -v python3 >/dev/null || need_apt+=(python3)
# The console's browser test drives Debian's headless Chromium; the SMART
# tests make RSA keys with openssl.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
command -v openssl >/dev/null || need_apt+=(openssl)
# The binlog tests start their own MariaDB (server and client).
[ -x /usr/sbin/mariadbd ] || need_apt+=(mariadb-server)
command -v mariadb >/dev/null || need_apt+=(mariadb-client)
# The PostgreSQL tests run initdb and postgres from Debian's packages.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv python3-pip)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "deps: installing ${need_apt[*]}"
  "${sudo[@]}" apt-get update -q && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

# The official FHIR R4 examples for the round-trip test (fetched, never committed).
scripts/fetch-fhir-examples.sh
# The independent FHIR server and the Synthea generator for the interop test.
scripts/setup-interop.sh

