#!/usr/bin/env bash
# Benchmarks of parent/child replication between two `fhirsync serve`
# processes: initial pull and initial push (pages of 500 and 1,000), and lag from a commit
# on a child to its visibility at the parent at 100 writes/s and at
# 1,000 writes/s from 8 writers.
# Usage: scripts/bench-replication.sh [--smoke] [WORKDIR] [COUNTS...]
#   default count: 100000 (release build)
#   --smoke: 1,000 resources, 2 s of lag, debug build (CI runs it)
smoke_counts=(1000)
full_counts=(100000)
source "$(dirname "$0")/lib-bench.sh"
if [ $smoke = 1 ]; then seconds=2; rate=(20 100); else seconds=30; rate=(100 1000); fi
for n in "${counts[@]}"; do
  for batch in 500 1000; do
    "$bench" replicate-pull --bin "$bin" --count "$n" --work "$work" --batch "$batch"
    "$bench" replicate-pull --bin "$bin" --count "$n" --work "$work" --batch "$batch" --push
  done
done
"$bench" replicate-lag --bin "$bin" --rate "${rate[0]}" --seconds "$seconds" --work "$work"
"$bench" replicate-lag --bin "$bin" --rate "${rate[1]}" --writers 8 --seconds "$seconds" --work "$work"
