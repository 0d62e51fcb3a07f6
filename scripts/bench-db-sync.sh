#!/usr/bin/env bash
# Release-mode benchmark of database sync (issue 8): db-sender → receiver
# over HTTP and over NATS JetStream, against a MariaDB started here (the
# site's and the central database on one server): sustained row changes
# per second, then lag at 200 single-row transactions per second.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release -q -p fhirsync-testkit
for transport in http nats; do
  "$root/target/release/fhirsync-bench" db-sync --rows 100000 --tx 100 --rate 200 --seconds 20 --transport "$transport"
done
