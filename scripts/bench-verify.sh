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
smoke_counts=(2000)
full_counts=(100000 1000000)
source "$(dirname "$0")/lib-bench.sh"
if [ $smoke = 1 ]; then diffs=10; merges=500; else diffs=100; merges=100000; fi
for n in "${counts[@]}"; do
  "$bench" verify --bin "$bin" --count "$n" --diffs "$diffs" --work "$work/verify-$n"
done
"$bench" merge --count "$merges" --work "$work"
