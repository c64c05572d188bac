#!/usr/bin/env bash
# Two `labelhook serve` replicas on one PostgreSQL database against one, under the same
# many-label 2 KiB load for the same seconds.
#   one: a fresh database, one replica (9105, admin 9106), one wrk of 32 connections;
#   two: a fresh database, two replicas (9105/9106 and 9107/9108, the same configuration
#        otherwise), two wrk of 16 connections each at the same time, each with its own
#        X-Labelbox-Id prefix (bench/post-many-prefixed.lua) so that they never send the same id.
# Handled is the `file` handler's successful attempts from each replica's /metrics at the end
# of the load, summed over the replicas (a delivery accepted by one replica may be handled by
# the other); the lines in the handlers' files are counted as a check.
# Both replicas, both wrk and PostgreSQL share this machine's cores: the comparison shows
# whether a second replica takes throughput away, not what a second machine would add.
# Usage: bench/replicas.sh [SECS]   (env: PG_URL, LABELS=2000, PAYLOAD, SHARED)
# Prints one line per setup: "replicas=N accepted_s=… handled_s=… wrk_rps=… lines=… non2xx=…".
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${SHARED:-$root/../shared}
secs=${1:-30}
labels=${LABELS:-2000}
payload=${PAYLOAD:-$shared/bench/payloads/label_updated_small.json}
pg_url=${PG_URL:-postgres://postgres@127.0.0.1:5432}
bin=${LABELHOOK_BIN:-$root/target/release/labelhook}
work=$(mktemp -d)
pids=""
dbs=""
cleanup() {
  for p in $pids; do kill "$p" 2>/dev/null || true; done
  for p in $pids; do wait "$p" 2>/dev/null || true; done
  for d in $dbs; do
    psql -q "$pg_url/postgres" -c "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

python3 "$shared/bench/make-many.py" "$payload" "$labels" bench-secret > "$work/many"

# Starts replica NAME on PORT (admin PORT+1) against database DB; waits for it to listen.
start_replica() {
  local name=$1 port=$2 db=$3 dir=$work/$1
  mkdir -p "$dir"
  sed "s|STORE_DIR|$dir|g; s|postgres://postgres@127.0.0.1:5432/PG_DB|$pg_url/$db|;
       s|127.0.0.1:9105|127.0.0.1:$port|; s|127.0.0.1:9106|127.0.0.1:$((port + 1))|" \
    "$root/bench/labelhook-postgres.toml" > "$dir/labelhook.toml"
  BENCH_SECRET=bench-secret "$bin" serve --config "$dir/labelhook.toml" > "$dir/out" 2> "$dir/err" &
  pids="$pids $!"
  for _ in $(seq 300); do grep -q "listening on" "$dir/out" 2>/dev/null && return 0; sleep 0.1; done
  echo "replica $name did not start: $(tail -n 3 "$dir/err")" >&2
  return 1
}

# "accepted handled" of the replica whose admin port is given, from its /metrics.
counts() {
  curl -s "http://127.0.0.1:$1/metrics" | awk '
    /^labelhook_deliveries_total/ && /outcome="accepted"/ {a += $NF}
    /^labelhook_handler_attempts_total/ && /outcome="ok"/ {h += $NF}
    END {print a + 0, h + 0}'
}

# wrk for SECS against PORT with CONNS connections and id PREFIX; output to FILE.
load() {
  MANY_FILE=$work/many PREFIX=$4 wrk -t1 -c"$2" -d"${secs}s" --latency \
    -s "$root/bench/post-many-prefixed.lua" "http://127.0.0.1:$1/webhooks/labelbox" > "$3" 2>&1
}

# Runs one setup: N replicas (1 or 2) on a fresh database.
run() {
  local n=$1 db=lh_replicas_$$_$1
  psql -q "$pg_url/postgres" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
  dbs="$dbs $db"
  start_replica "r${n}a" 9105 "$db"
  if [ "$n" = 2 ]; then
    start_replica "r${n}b" 9107 "$db"
    load 9105 16 "$work/wrk-${n}a" "r${n}a" & local w1=$!
    load 9107 16 "$work/wrk-${n}b" "r${n}b" & local w2=$!
    wait "$w1" "$w2"
  else
    load 9105 32 "$work/wrk-${n}a" "r${n}a"
  fi
  # Sampled as soon as the load is over: what was handled during it.
  local accepted=0 handled=0 a h port
  for port in 9106 $([ "$n" = 2 ] && echo 9108); do
    read -r a h <<< "$(counts "$port")"
    accepted=$((accepted + a)); handled=$((handled + h))
  done
  local lines rps non2xx
  lines=$(cat "$work"/r"$n"?/events.jsonl 2>/dev/null | wc -l)
  rps=$(cat "$work"/wrk-"$n"? | awk '/Requests\/sec/ {s += $2} END {printf "%.0f", s}')
  non2xx=$(cat "$work"/wrk-"$n"? | awk '/Non-2xx/ {s += $4} END {print s + 0}')
  for p in $pids; do kill "$p" 2>/dev/null || true; done
  for p in $pids; do wait "$p" 2>/dev/null || true; done
  pids=""
  psql -q "$pg_url/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
  echo "replicas=$n accepted_s=$(echo "scale=1; $accepted / $secs" | bc)" \
    "handled_s=$(echo "scale=1; $handled / $secs" | bc) wrk_rps=$rps lines=$lines" \
    "handled=$handled accepted=$accepted non2xx=$non2xx"
}

run 1
run 2
