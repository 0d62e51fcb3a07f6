#!/usr/bin/env bash
# Benchmarks of a node: NDJSON import, transaction Bundles over HTTP, read
# and search latency on the largest imported store; figures go to
# docs/benchmarks.md.
# Usage: scripts/bench.sh [--smoke] [WORKDIR] [COUNTS...]
#   default counts: 100000 1000000 (release build; a few GB of free disk)
#   --smoke: 1,000 resources, short runs, debug build (CI runs it)
smoke_counts=(1000)
full_counts=(100000 1000000)
source "$(dirname "$0")/lib-bench.sh"
if [ $smoke = 1 ]; then bundles=4; seconds=2; searches=5; else bundles=40; seconds=20; searches=300; fi

echo "== import (NDJSON, 1 Patient : 4 Observations, ~1 KB each)"
for n in "${counts[@]}"; do
  "$bench" gen-ndjson --count "$n" --out "$work/data-$n.ndjson" >/dev/null
  rm -rf "$work/import-$n"
  timed "$bin" import --data-dir "$work/import-$n" "$work/data-$n.ndjson"
  du -sh "$work/import-$n" | sed 's/^/store size /'
done

echo "== transaction Bundles over HTTP (4 clients)"
rm -rf "$work/http"
serve "$work/http" 18181
"$bench" http-tx --base http://127.0.0.1:18181/fhir --clients 4 --bundles "$bundles"

largest="${counts[${#counts[@]}-1]}"
echo "== read latency at 200 reads/s (store of $largest resources)"
serve "$work/import-$largest" 18182
"$bench" read-latency --base http://127.0.0.1:18182/fhir --rate 200 --seconds "$seconds" --prefix Patient/p --ids $((largest / 5))

echo "== search latency (store of $largest resources, first page of 50)"
for q in 'Patient?_id=p{n}' 'Observation?subject=Patient/p{n}' 'Patient?identifier=https://example.org/mrn|p{n}' \
  'Patient?family=Odhiambo' 'Observation?status=final' 'Observation?code=http://loinc.org|8310-5' 'Observation?code=8310-5' \
  'Patient?gender=female' 'Patient?birthdate=1981-09-22' 'Observation?value-quantity=gt39' 'Observation?date=ge2024-06-01' \
  'Observation?patient=p{n}&code=http://loinc.org|8310-5' 'Observation?code=http://loinc.org|8310-5&status=final' \
  'Observation?subject:Patient.identifier=https://example.org/mrn|p{n}&_include=Observation:subject' \
  'Observation?subject:Patient.family=Odhiambo&_include=Observation:subject' 'Patient?_id=p{n}&_revinclude=Observation:subject'; do
  "$bench" search-latency --base http://127.0.0.1:18182/fhir --query "$q" --count "$searches" --ids $((largest / 5))
done
