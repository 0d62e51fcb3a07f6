#!/usr/bin/env bash
# Release-mode benchmarks of `fhirsync sync`: COPY of an NDJSON directory
# into an empty node, and COMPARE of two identical nodes, at 100k and 1M.
# Usage: scripts/bench-sync.sh [WORKDIR]   (needs ~8 GB of free disk)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work="${1:-$(mktemp -d)}"
cd "$root"
cargo build --release -q -p fhirsync -p fhirsync-testkit
bin="$root/target/release/fhirsync"
bench="$root/target/release/fhirsync-bench"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
# benchmark nodes: no tokens, no console (two nodes run at once)
serve() { "$bin" serve --data-dir "$1" --listen "127.0.0.1:$2" --anonymous --console-listen off >/dev/null 2>&1 & pids+=($!); sleep 1; }
port=18300
for n in 100000 1000000; do
  echo "== $n resources"
  mkdir -p "$work/src-$n"
  [ -f "$work/src-$n/data.ndjson" ] || "$bench" gen-ndjson --count "$n" --out "$work/src-$n/data.ndjson" >/dev/null
  rm -rf "$work/a-$n" "$work/b-$n"
  serve "$work/a-$n" $((port + 1)); serve "$work/b-$n" $((port + 2))
  echo "-- COPY directory -> node A"
  /usr/bin/time -f "wall %e s, peak RSS %M KB" "$bin" sync -s "file:$work/src-$n" -t "http://127.0.0.1:$((port + 1))/fhir" -m COPY 2>&1 | tail -2
  echo "-- COPY node A -> node B"
  /usr/bin/time -f "wall %e s, peak RSS %M KB" "$bin" sync -s "http://127.0.0.1:$((port + 1))/fhir" -t "http://127.0.0.1:$((port + 2))/fhir" -m COPY 2>&1 | tail -2
  echo "-- COMPARE identical nodes A, B"
  /usr/bin/time -f "wall %e s, peak RSS %M KB" "$bin" sync -s "http://127.0.0.1:$((port + 1))/fhir" -t "http://127.0.0.1:$((port + 2))/fhir" -m COMPARE 2>&1 | tail -2
  kill "${pids[@]}" 2>/dev/null || true; pids=(); sleep 1
  port=$((port + 10))
done
