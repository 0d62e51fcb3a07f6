#!/usr/bin/env bash
# Benchmarks of `fhirsync sync`: COPY of an NDJSON directory into an empty
# node, COPY node to node, and COMPARE of the two then identical nodes (by
# summaries, and as against a generic FHIR server).
# Usage: scripts/bench-sync.sh [--smoke] [WORKDIR] [COUNTS...]
#   default counts: 100000 1000000 (release build; ~8 GB of free disk)
#   --smoke: 500 resources, debug build (CI runs it)
smoke_counts=(500)
full_counts=(100000 1000000)
source "$(dirname "$0")/lib-bench.sh"
port=18300
for n in "${counts[@]}"; do
  echo "== $n resources"
  mkdir -p "$work/src-$n"
  [ -f "$work/src-$n/data.ndjson" ] || "$bench" gen-ndjson --count "$n" --out "$work/src-$n/data.ndjson" >/dev/null
  rm -rf "$work/a-$n" "$work/b-$n"
  a="http://127.0.0.1:$((port + 1))/fhir"; b="http://127.0.0.1:$((port + 2))/fhir"
  serve "$work/a-$n" $((port + 1)); serve "$work/b-$n" $((port + 2))
  echo "-- COPY directory -> node A"
  timed "$bin" sync -s "file:$work/src-$n" -t "$a" -m COPY 2>&1 | tail -2
  echo "-- COPY node A -> node B"
  timed "$bin" sync -s "$a" -t "$b" -m COPY 2>&1 | tail -2
  echo "-- COMPARE identical nodes A, B"
  timed "$bin" sync -s "$a" -t "$b" -m COMPARE 2>&1 | tail -2
  echo "-- COMPARE identical nodes A, B as generic servers (--no-summary: every resource read)"
  timed "$bin" sync -s "$a" -t "$b" -m COMPARE --no-summary 2>&1 | tail -2
  for t in Patient Observation; do
    ca=$(count_of "$a" "$t"); cb=$(count_of "$b" "$t")
    [ "$ca" = "$cb" ] && [ "$ca" -gt 0 ] || { echo "bench-sync: $t: A holds $ca, B holds $cb" >&2; exit 1; }
  done
  kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; pids=()
  port=$((port + 10))
done
