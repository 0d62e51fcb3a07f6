#!/usr/bin/env bash
# Tests the deployment files where this machine allows: the systemd unit
# (docs/fhirsync.service) with `systemd-analyze verify`, and the container
# image's build steps (Dockerfile) run outside a container: deploy/build.sh
# as the image's build stage runs it, then the binary started with the
# image's environment, healthy by the image's HEALTHCHECK command, and
# stopped by its STOPSIGNAL with exit status 0. With a Docker daemon
# reachable, the image itself is built and run too.
# Usage: scripts/check-deploy.sh [--smoke]   (--smoke: debug build; CI runs it)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
profile=release
[ "${1:-}" = "--smoke" ] && profile=debug
tmp=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$tmp"' EXIT

echo "== container build steps (deploy/build.sh, $profile)"
deploy/build.sh "$tmp/root" "$profile"
bin="$tmp/root/bin/fhirsync"

echo "== systemd unit"
if command -v systemd-analyze >/dev/null; then
  sed "s|/usr/local/bin/fhirsync|$bin|" docs/fhirsync.service > "$tmp/fhirsync.service"
  out=$(systemd-analyze verify --man=no "$tmp/fhirsync.service" 2>&1 || true)
  # Only what concerns the unit itself (the host's other units may warn).
  mine=$(grep -F "fhirsync.service" <<<"$out" || true)
  [ -z "$mine" ] || { echo "check-deploy: systemd-analyze verify: $mine" >&2; exit 1; }
  echo "systemd-analyze verify: clean"
else
  echo "systemd-analyze not here: unit not verified"
fi

echo "== the image's environment, health check and stop signal"
env_of() { sed -n "s/^.*\b$1=\([^ ]*\).*$/\1/p" Dockerfile | head -1; }
[ "$(env_of FHIRSYNC_CONSOLE_LISTEN)" = off ] || { echo "check-deploy: Dockerfile must keep the console off" >&2; exit 1; }
grep -q '^USER fhirsync' Dockerfile || { echo "check-deploy: Dockerfile must run as the fhirsync user" >&2; exit 1; }
health=$(sed -n 's/^ *CMD \(curl .*\) || exit 1$/\1/p' Dockerfile)
[ -n "$health" ] || { echo "check-deploy: no HEALTHCHECK command in Dockerfile" >&2; exit 1; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
FHIRSYNC_DATA_DIR="$tmp/data" FHIRSYNC_LISTEN="127.0.0.1:$port" FHIRSYNC_CONSOLE_LISTEN=off \
  "$bin" serve > "$tmp/serve.log" 2>&1 &
pid=$!
healthy=0
for _ in $(seq 100); do
  if ${health//8080/$port} >/dev/null 2>&1; then healthy=1; break; fi
  sleep 0.1
done
[ $healthy = 1 ] || { echo "check-deploy: never healthy:" >&2; cat "$tmp/serve.log" >&2; exit 1; }
echo "healthy: ${health//8080/$port}"
kill -TERM "$pid"
status=0; wait "$pid" || status=$?
pid=
[ $status = 0 ] || { echo "check-deploy: exit status $status after SIGTERM" >&2; cat "$tmp/serve.log" >&2; exit 1; }
if grep -q "ERROR" "$tmp/serve.log"; then echo "check-deploy: errors while stopping:" >&2; cat "$tmp/serve.log" >&2; exit 1; fi
echo "stopped cleanly by SIGTERM"

if [ $profile = release ] && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  echo "== docker build and run"
  docker build -q -t fhirsync:check .
  cid=$(docker run -d -p "127.0.0.1:$port:8080" fhirsync:check)
  for _ in $(seq 60); do curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 1; done
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null
  docker stop "$cid" >/dev/null; docker rm "$cid" >/dev/null
  echo "image built and healthy"
else
  echo "no Docker daemon (or --smoke): the image itself not built"
fi
