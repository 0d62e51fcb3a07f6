#!/usr/bin/env bash
# Benchmark of anti-entropy (`fhirsync verify`): a parent and a child
# process that hold the same COUNT resources (the child's store a copy of
# the parent's) and DIFFS resources at one end only, half at each. It
# times finding the differences, repairing them, and verifying the then
# identical stores, and prints what each run exchanged; then backs the
# child up while it serves and restores it. Last, applying pages of
# conflicting versions under hlc-lww and under merge (in-process stores).
# Usage: scripts/bench-verify.sh [--smoke] [WORKDIR] [COUNTS...]
#   default counts: 100000 1000000, 100 differences (release build)
#   --smoke: 2,000 resources, 10 differences, debug build (CI runs it)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
work="${1:-$(mktemp -d)}"
shift || true
counts=("$@")
cd "$root"
if [ $smoke = 1 ]; then
  [ ${#counts[@]} -gt 0 ] || counts=(2000)
  diffs=10
  merges=500
  cargo build -q -p fhirsync -p fhirsync-testkit
  bin="$root/target/debug/fhirsync"; bench="$root/target/debug/fhirsync-bench"
else
  [ ${#counts[@]} -gt 0 ] || counts=(100000 1000000)
  diffs=100
  merges=100000
  cargo build --release -q -p fhirsync -p fhirsync-testkit
  bin="$root/target/release/fhirsync"; bench="$root/target/release/fhirsync-bench"
fi
mkdir -p "$work"
for n in "${counts[@]}"; do
  "$bench" verify --bin "$bin" --count "$n" --diffs "$diffs" --work "$work/verify-$n"
done
"$bench" merge --count "$merges" --work "$work"
