#!/usr/bin/env bash
# Benchmarks of the NATS JetStream transport: lag at 1,000 writes/s
# between two nodes, and a 100k-resource load through the stream. Needs
# nats-server on PATH or in /usr/sbin.
# Usage: scripts/bench-nats.sh [--smoke] [WORKDIR]
#   --smoke: 1,000 resources, 2 s at 100 writes/s, debug build (CI runs it)
smoke_counts=()
full_counts=()
source "$(dirname "$0")/lib-bench.sh"
if [ $smoke = 1 ]; then args=(--count 1000 --rate 100 --seconds 2); else args=(--count 100000 --rate 1000 --seconds 30); fi
"$bench" nats --bin "$bin" "${args[@]}" --work "$work" --lag-after-load
