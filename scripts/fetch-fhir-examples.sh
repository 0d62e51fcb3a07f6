#!/usr/bin/env bash
# Fetches the official FHIR R4 example resources (npm package
# hl7.fhir.r4.examples@4.0.1) into DEST (default .cache/fhir-r4-examples).
# Nothing of it is committed; tests call this when the directory is absent.
set -euo pipefail
dest="${1:-$(cd "$(dirname "$0")/.." && pwd)/.cache/fhir-r4-examples}"
if [ -f "$dest/.complete" ]; then
  exit 0
fi
command -v npm >/dev/null || { echo "fetch-fhir-examples: npm is needed" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent hl7.fhir.r4.examples@4.0.1 >/dev/null)
tar xzf "$tmp"/hl7.fhir.r4.examples-4.0.1.tgz -C "$tmp"
mkdir -p "$dest"
find "$tmp/package" -maxdepth 1 -name '*.json' ! -name 'package.json' ! -name '.index.json' -exec cp {} "$dest/" \;
touch "$dest/.complete"
echo "fetch-fhir-examples: $(ls "$dest" | wc -l) resources in $dest"
