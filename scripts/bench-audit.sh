#!/usr/bin/env bash
# Release-mode benchmark of the API with its audit trail: 10,000 writes and
# 10,000 reads (8 clients each) against a real node, and whether the node's
# AuditEvents number its requests. Pass a second binary (an older build) to
# compare: scripts/bench-audit.sh [WORKDIR] [OTHER_FHIRSYNC_BINARY]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work="${1:-$(mktemp -d)}"
cd "$root"
cargo build --release -q -p fhirsync -p fhirsync-testkit
for bin in "$root/target/release/fhirsync" ${2:+"$2"}; do
  echo "== $bin"
  "$root/target/release/fhirsync-bench" audit --bin "$bin" --count 10000 --work "$work"
done
echo "== $root/target/release/fhirsync with [api] audit_wait = true"
"$root/target/release/fhirsync-bench" audit --bin "$root/target/release/fhirsync" --count 10000 --wait --work "$work"
