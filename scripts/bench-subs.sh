#!/usr/bin/env bash
# Release-mode benchmark of topic-based subscriptions: write throughput of a
# node with 100 active REST-hook subscriptions against none (every write
# notified / none notified), and notification latency at 200 writes/s.
# Usage: scripts/bench-subs.sh [WORKDIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work="${1:-$(mktemp -d)}"
cd "$root"
cargo build --release -q -p fhirsync -p fhirsync-testkit
"$root/target/release/fhirsync-bench" subs --bin "$root/target/release/fhirsync" \
  --subs 100 --count 10000 --rate 200 --seconds 20 --work "$work"
