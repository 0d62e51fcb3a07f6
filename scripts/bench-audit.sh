#!/usr/bin/env bash
# Benchmark of the API with its audit trail: COUNT writes and COUNT reads
# (8 clients each) against a real node, and whether the node's AuditEvents
# number its requests; then with `[api] audit_wait = true`. OTHER, a second
# `fhirsync` binary (an older build), is measured the same way to compare.
# Usage: scripts/bench-audit.sh [--smoke] [WORKDIR] [OTHER]
#   default: 10,000 requests each way (release build)
#   --smoke: 200 each way, debug build (CI runs it)
smoke_counts=()
full_counts=()
source "$(dirname "$0")/lib-bench.sh"
other="${counts[0]:-}"
if [ $smoke = 1 ]; then n=200; else n=10000; fi
for b in "$bin" ${other:+"$other"}; do
  echo "== $b"
  "$bench" audit --bin "$b" --count "$n" --work "$work"
done
echo "== $bin with [api] audit_wait = true"
"$bench" audit --bin "$bin" --count "$n" --wait --work "$work"
