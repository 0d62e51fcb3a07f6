#!/usr/bin/env bash
# Benchmark of the binlog reader (issue 8): rows written to a MariaDB
# started here (binlog ROW, full metadata), then read back as change
# records; in 1,000-row transactions and in one-row transactions.
# Usage: scripts/bench-binlog.sh [--smoke]
#   --smoke: 1,000 and 100 rows, debug build (CI runs it)
smoke_counts=()
full_counts=()
source "$(dirname "$0")/lib-bench.sh"
if [ $smoke = 1 ]; then rows=(1000 100); else rows=(100000 10000); fi
"$bench" binlog --rows "${rows[0]}" --tx 1000
"$bench" binlog --rows "${rows[1]}" --tx 1
