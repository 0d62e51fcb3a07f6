#!/usr/bin/env bash
# Release-mode benchmarks of a node; figures go to docs/benchmarks.md.
# Usage: scripts/bench.sh [WORKDIR]   (needs a few GB of free disk)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work="${1:-$(mktemp -d)}"
cd "$root"
cargo build --release -q -p fhirsync -p fhirsync-testkit
bin="$root/target/release/fhirsync"
bench="$root/target/release/fhirsync-bench"

echo "== import (NDJSON, 1 Patient : 4 Observations, ~1 KB each)"
for n in 100000 1000000; do
  "$bench" gen-ndjson --count "$n" --out "$work/data-$n.ndjson" >/dev/null
  rm -rf "$work/import-$n"
  /usr/bin/time -f "peak RSS %M KB" "$bin" import --data-dir "$work/import-$n" "$work/data-$n.ndjson"
  du -sh "$work/import-$n" | sed 's/^/store size /'
done

echo "== transaction Bundles over HTTP (4 clients)"
rm -rf "$work/http"
"$bin" serve --data-dir "$work/http" --listen 127.0.0.1:18181 --anonymous --console-listen off >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
sleep 1
"$bench" http-tx --base http://127.0.0.1:18181/fhir --clients 4 --bundles 40
kill $pid; wait $pid || true

echo "== read latency at 200 reads/s (store of 1M resources)"
"$bin" serve --data-dir "$work/import-1000000" --listen 127.0.0.1:18182 --anonymous --console-listen off >/dev/null 2>&1 &
pid=$!
sleep 1
"$bench" read-latency --base http://127.0.0.1:18182/fhir --rate 200 --seconds 20 --prefix Patient/p --ids 200000

echo "== search latency (store of 1M resources, first page of 50)"
for q in 'Patient?_id=p{n}' 'Observation?subject=Patient/p{n}' 'Patient?identifier=https://example.org/mrn|p{n}' \
  'Patient?family=Odhiambo' 'Observation?status=final' 'Observation?code=http://loinc.org|8310-5' 'Observation?code=8310-5' \
  'Patient?gender=female' 'Patient?birthdate=1981-09-22' 'Observation?value-quantity=gt39' 'Observation?date=ge2024-06-01' \
  'Observation?patient=p{n}&code=http://loinc.org|8310-5' 'Observation?code=http://loinc.org|8310-5&status=final' \
  'Observation?subject:Patient.identifier=https://example.org/mrn|p{n}&_include=Observation:subject' \
  'Observation?subject:Patient.family=Odhiambo&_include=Observation:subject' 'Patient?_id=p{n}&_revinclude=Observation:subject'; do
  "$bench" search-latency --base http://127.0.0.1:18182/fhir --query "$q" --count 300
done
kill $pid; wait $pid || true
