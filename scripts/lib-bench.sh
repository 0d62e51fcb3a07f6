# Sourced by scripts/bench-*.sh: reads `[--smoke] [WORKDIR] [COUNTS...]`,
# builds the binaries (debug for --smoke, release otherwise) and sets
# root, smoke (0 or 1), work, counts (the caller's smoke_counts or
# full_counts unless given), bin, bench and timed (wall time and peak RSS
# of a command, in release runs), and serve (a benchmark node: anonymous,
# no console, waited for) with the pids killed on exit.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
work="${1:-$(mktemp -d)}"
shift || true
counts=("$@")
cd "$root"
if [ $smoke = 1 ]; then
  [ ${#counts[@]} -gt 0 ] || counts=("${smoke_counts[@]}")
  cargo build -q -p fhirsync -p fhirsync-testkit
  bin="$root/target/debug/fhirsync"; bench="$root/target/debug/fhirsync-bench"
  timed() { "$@"; }
else
  [ ${#counts[@]} -gt 0 ] || counts=("${full_counts[@]}")
  cargo build --release -q -p fhirsync -p fhirsync-testkit
  bin="$root/target/release/fhirsync"; bench="$root/target/release/fhirsync-bench"
  timed() { /usr/bin/time -f "wall %e s, peak RSS %M KB" "$@"; }
fi
mkdir -p "$work"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
# serve DATA_DIR PORT [ARGS...]: a node in the background, anonymous
# (benchmarks send no tokens) and without a console (several nodes run at
# once).
serve() {
  "$bin" serve --data-dir "$1" --listen "127.0.0.1:$2" --anonymous --console-listen off "${@:3}" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$2/healthz" >/dev/null && return; sleep 0.1; done
  echo "$(basename "$0"): node on port $2 did not start" >&2; exit 1
}
# count_of BASE TYPE: how many resources of TYPE a node holds.
count_of() { curl -sf "$1/$2?_summary=count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])'; }
