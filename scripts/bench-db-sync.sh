#!/usr/bin/env bash
# Benchmark of database sync (issue 8): db-sender → receiver over HTTP and
# over NATS JetStream, against a MariaDB started here (the site's and the
# central database on one server): sustained row changes per second, then
# lag at 200 single-row transactions per second.
# Usage: scripts/bench-db-sync.sh [--smoke]
#   --smoke: 1,000 rows, 2 s of lag at 50/s, debug build (CI runs it)
smoke_counts=()
full_counts=()
source "$(dirname "$0")/lib-bench.sh"
if [ $smoke = 1 ]; then args=(--rows 1000 --tx 100 --rate 50 --seconds 2); else args=(--rows 100000 --tx 100 --rate 200 --seconds 20); fi
for transport in http nats; do
  "$bench" db-sync "${args[@]}" --transport "$transport"
done
