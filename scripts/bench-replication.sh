#!/usr/bin/env bash
# Release-mode benchmarks of parent/child replication between two
# `fhirsync serve` processes: initial pull of 100k resources, and lag from
# a commit on a child to its visibility at the parent at 100 writes/s.
# Usage: scripts/bench-replication.sh [WORKDIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work="${1:-$(mktemp -d)}"
cd "$root"
cargo build --release -q -p fhirsync -p fhirsync-testkit
bin="$root/target/release/fhirsync"
bench="$root/target/release/fhirsync-bench"
for batch in 500 1000; do
  "$bench" replicate-pull --bin "$bin" --count 100000 --work "$work" --batch "$batch"
done
"$bench" replicate-lag --bin "$bin" --rate 100 --seconds 30 --work "$work"
"$bench" replicate-lag --bin "$bin" --rate 1000 --writers 8 --seconds 30 --work "$work"
