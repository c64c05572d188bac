#!/usr/bin/env bash
# PostgreSQL's own rate for what labelhook-postgres must do at least once per delivery: commit
# one 2 KiB row, durably, per transaction. pgbench runs a custom script (one INSERT of the
# given payload as a text literal, so the bytes travel over the wire as a delivery's do) into a
# fresh table of a scratch database, CLIENTS clients, 2 threads, SECS seconds, with
# synchronous_commit forced on, on the same server and cores as labelhook-postgres.
# Usage: bench/pgbench.sh PAYLOAD [SECS]   (env: PG_URL, CLIENTS=32)
# Prints one line: "tps=<transactions per second> latency_ms=<average> clients=<n>".
set -euo pipefail
payload=$1
secs=${2:-10}
clients=${CLIENTS:-32}
pg_url=${PG_URL:-postgres://postgres@127.0.0.1:5432}
db=lh_pgbench_$$
work=$(mktemp -d)
cleanup() {
  psql -q "$pg_url/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

psql -q "$pg_url/postgres" -c "CREATE DATABASE $db"
# bigserial key as a delivery row has one; the body as text, the size of the payload.
psql -q "$pg_url/$db" -c "CREATE TABLE bench_rows (id bigserial PRIMARY KEY, body text NOT NULL)"
# The payload as one SQL string literal: single quotes doubled, newlines kept out of the
# script line (pgbench reads one statement per line unless it ends in a backslash).
python3 - "$payload" "$work/insert.sql" <<'PY'
import sys
body = open(sys.argv[1], encoding="utf-8").read().replace("\n", " ").replace("'", "''")
open(sys.argv[2], "w").write(f"INSERT INTO bench_rows (body) VALUES ('{body}');\n")
PY
# -n: no vacuum of pgbench's own tables (there are none); -M prepared: parsed once per client,
# as labelhook's driver prepares its statements. PGOPTIONS forces a durable commit per row.
PGOPTIONS='-c synchronous_commit=on' pgbench -n -M prepared -c "$clients" -j 2 -T "$secs" \
  -f "$work/insert.sql" "$pg_url/$db" > "$work/out" 2>&1 || { cat "$work/out" >&2; exit 1; }
tps=$(awk '/^tps = / {print $3; exit}' "$work/out")
lat=$(awk '/^latency average = / {print $4; exit}' "$work/out")
rows=$(psql -Atq "$pg_url/$db" -c "SELECT count(*) FROM bench_rows")
[ -n "$tps" ] || { echo "bench/pgbench.sh: no tps in pgbench's output" >&2; cat "$work/out" >&2; exit 1; }
echo "tps=$tps latency_ms=$lat clients=$clients rows=$rows"
