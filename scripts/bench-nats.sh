#!/usr/bin/env bash
# Release-mode benchmarks of the NATS JetStream transport: lag at 1,000
# writes/s between two nodes, and a 100k-resource load through the stream.
# Needs nats-server on PATH or in /usr/sbin. Usage: scripts/bench-nats.sh [WORKDIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work="${1:-$(mktemp -d)}"
cd "$root"
cargo build --release -q -p fhirsync -p fhirsync-testkit
"$root/target/release/fhirsync-bench" nats --bin "$root/target/release/fhirsync" \
  --count 100000 --rate 1000 --seconds 30 --work "$work" --lag-after-load
