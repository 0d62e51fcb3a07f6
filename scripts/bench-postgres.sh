#!/usr/bin/env bash
# Benchmarks of the PostgreSQL store next to SQLite, on one machine:
# NDJSON import (`fhirsync import`) into each, and HTTP transaction ingest
# (Synthea-sized Bundles from 4 clients) into one process on SQLite, one
# on PostgreSQL, and two processes on one PostgreSQL database. The
# PostgreSQL server is the tests' harness (initdb in a temporary
# directory, a free port; Debian's `postgresql` package). Last, the
# replication lag from a write on one of two processes on one database to
# a child that pulls through the other, at 100 writes/s.
# Usage: scripts/bench-postgres.sh [--smoke] [WORKDIR] [COUNTS...]
#   default counts: 100000 1000000 (release build)
#   --smoke: 2,000 resources and 4 Bundles with the debug build (CI runs it)
smoke_counts=(2000)
full_counts=(100000 1000000)
source "$(dirname "$0")/lib-bench.sh"
if [ $smoke = 1 ]; then
  bundles=4
  lag=(--rate 20 --seconds 3)
else
  bundles=40
  lag=(--rate 100 --seconds 30)
fi
cleanup() { kill "${pids[@]}" 2>/dev/null || true; exec 3>&- 2>/dev/null || true; }
trap cleanup EXIT
# The PostgreSQL server lives while fd 3 (its stdin) is open.
dbs=(tx1 tx2 lag)
for n in "${counts[@]}"; do dbs+=("import$n"); done
rm -f "$work/pg.in" "$work/pg.urls"; mkfifo "$work/pg.in"
"$bench" postgres $(printf -- '--db %s ' "${dbs[@]}") <"$work/pg.in" >"$work/pg.urls" &
pids+=($!)
exec 3>"$work/pg.in"
for _ in $(seq 600); do [ "$(wc -l <"$work/pg.urls")" -ge ${#dbs[@]} ] && break; sleep 0.1; done
[ "$(wc -l <"$work/pg.urls")" -ge ${#dbs[@]} ] || { echo "bench-postgres: no PostgreSQL server" >&2; exit 1; }
url_of() { grep "/$1\$" "$work/pg.urls"; }
pg_config() {
  printf 'node_id = "bench"\n[storage]\nbackend = "postgres"\nurl = "%s"\n[console]\nlisten = "off"\n' "$(url_of "$1")" >"$2"
}
for n in "${counts[@]}"; do
  echo "== import of $n resources"
  mkdir -p "$work/src-$n"
  [ -f "$work/src-$n/data.ndjson" ] || "$bench" gen-ndjson --count "$n" --out "$work/src-$n/data.ndjson" >/dev/null
  rm -rf "$work/sqlite-$n" "$work/pgdir-$n"
  echo "-- SQLite"
  timed "$bin" import --data-dir "$work/sqlite-$n" "$work/src-$n/data.ndjson" 2>&1 | tail -2
  echo "-- PostgreSQL"
  pg_config "import$n" "$work/import$n.toml"
  timed "$bin" import --config "$work/import$n.toml" --data-dir "$work/pgdir-$n" "$work/src-$n/data.ndjson" 2>&1 | tail -2
done
port=$((18900 + RANDOM % 500))
echo "== HTTP transaction ingest ($bundles Bundles, 4 clients)"
rm -rf "$work"/tx-*
serve "$work/tx-sqlite" $((port + 1))
pg_config tx1 "$work/tx1.toml"; serve "$work/tx-pg" $((port + 2)) --config "$work/tx1.toml"
pg_config tx2 "$work/tx2.toml"
serve "$work/tx-pg2a" $((port + 3)) --config "$work/tx2.toml"
serve "$work/tx-pg2b" $((port + 4)) --config "$work/tx2.toml"
echo "-- one process, SQLite"
"$bench" http-tx --base "http://127.0.0.1:$((port + 1))/fhir" --clients 4 --bundles $bundles
echo "-- one process, PostgreSQL"
"$bench" http-tx --base "http://127.0.0.1:$((port + 2))/fhir" --clients 4 --bundles $bundles
echo "-- two processes, one PostgreSQL database"
"$bench" http-tx --base "http://127.0.0.1:$((port + 3))/fhir" --base "http://127.0.0.1:$((port + 4))/fhir" --clients 4 --bundles $bundles
a=$(count_of "http://127.0.0.1:$((port + 1))/fhir" Observation)
b=$(count_of "http://127.0.0.1:$((port + 2))/fhir" Observation)
c=$(count_of "http://127.0.0.1:$((port + 3))/fhir" Observation)
[ "$a" = "$b" ] && [ "$b" = "$c" ] || { echo "bench-postgres: Observation counts differ: $a $b $c" >&2; exit 1; }
kill "${pids[@]:1}" 2>/dev/null || true
echo "== replication lag, two processes on one PostgreSQL database"
"$bench" replicate-lag --bin "$bin" --postgres "$(url_of lag)" "${lag[@]}" --work "$work/lag"
[ $smoke = 1 ] && rm -rf "$work"
echo "bench-postgres: ok"
