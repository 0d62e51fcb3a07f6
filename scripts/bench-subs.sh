#!/usr/bin/env bash
# Benchmark of topic-based subscriptions: write throughput of a node with
# 100 active REST-hook subscriptions against none (every write notified /
# none notified), and notification latency at 200 writes/s.
# Usage: scripts/bench-subs.sh [--smoke] [WORKDIR]
#   --smoke: 10 subscriptions, 200 writes, 2 s at 50/s, debug build (CI runs it)
smoke_counts=()
full_counts=()
source "$(dirname "$0")/lib-bench.sh"
if [ $smoke = 1 ]; then args=(--subs 10 --count 200 --rate 50 --seconds 2); else args=(--subs 100 --count 10000 --rate 200 --seconds 20); fi
"$bench" subs --bin "$bin" "${args[@]}" --work "$work"
