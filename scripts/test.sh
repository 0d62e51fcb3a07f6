#!/usr/bin/env bash
# The test suite: installs what it needs when absent (scripts/deps.sh),
# then `cargo test --workspace` (extra arguments are passed on), and ends
# with the total over all test binaries. About 20 minutes on 2 cores from
# a clean checkout (build ~9, tests ~10), plus any package installs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f; if (p == 0 || f > 0) exit 1 }' "$log" || status=1
exit $status
