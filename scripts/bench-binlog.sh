#!/usr/bin/env bash
# Release-mode benchmark of the binlog reader (issue 8): rows written to a
# MariaDB started here (binlog ROW, full metadata), then read back as
# change records; in 1,000-row transactions and in one-row transactions.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release -q -p fhirsync-testkit
"$root/target/release/fhirsync-bench" binlog --rows 100000 --tx 1000
"$root/target/release/fhirsync-bench" binlog --rows 10000 --tx 1
