#!/usr/bin/env bash
# Benchmarks of bulk data: `fhirsync export` of a node into NDJSON files,
# and `fhirsync sync -m COPY` node -> empty node reading through $export
# (and, for comparison, page by page with --no-bulk).
# Usage: scripts/bench-bulk.sh [--smoke] [WORKDIR] [COUNTS...]
#   default counts: 100000 1000000 (release build; ~6 GB of free disk)
#   --smoke: 2,000 resources with the debug build, checking every count
#            (seconds; CI runs it so that the benchmark cannot rot)
smoke_counts=(2000)
full_counts=(100000 1000000)
source "$(dirname "$0")/lib-bench.sh"
port=$((18400 + RANDOM % 500))
for n in "${counts[@]}"; do
  echo "== $n resources"
  mkdir -p "$work/src-$n"
  [ -f "$work/src-$n/data.ndjson" ] || "$bench" gen-ndjson --count "$n" --out "$work/src-$n/data.ndjson" >/dev/null
  rm -rf "$work/a-$n" "$work/b-$n" "$work/c-$n" "$work/out-$n"
  "$bin" import --data-dir "$work/a-$n" "$work/src-$n/data.ndjson" | tail -1
  a="http://127.0.0.1:$((port + 1))/fhir"; b="http://127.0.0.1:$((port + 2))/fhir"
  serve "$work/a-$n" $((port + 1)); serve "$work/b-$n" $((port + 2))
  echo "-- export node A -> NDJSON files"
  timed "$bin" export -s "$a" -o "$work/out-$n" 2>&1 | tail -2
  got=$(cat "$work"/out-$n/*.ndjson | wc -l)
  [ "$got" = "$n" ] || { echo "bench-bulk: exported $got lines of $n" >&2; exit 1; }
  echo "-- COPY node A -> empty node B (bulk)"
  timed "$bin" sync -s "$a" -t "$b" -m COPY 2>&1 | grep -E "^total|note: read|wall" || true
  for t in Patient Observation; do
    [ "$(count_of "$a" $t)" = "$(count_of "$b" $t)" ] || { echo "bench-bulk: $t counts differ after COPY" >&2; exit 1; }
  done
  if [ $smoke = 1 ] || [ "$n" -le 100000 ]; then
    serve "$work/c-$n" $((port + 3))
    echo "-- COPY node A -> empty node C (--no-bulk, page by page)"
    timed "$bin" sync -s "$a" -t "http://127.0.0.1:$((port + 3))/fhir" -m COPY --no-bulk 2>&1 | grep -E "^total|wall" || true
  fi
  kill "${pids[@]}" 2>/dev/null || true; pids=(); sleep 1
  port=$((port + 10))
done
[ $smoke = 1 ] && rm -rf "$work"
echo "bench-bulk: ok"
