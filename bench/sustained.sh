#!/usr/bin/env bash
# Sustained load, end to end: what the handlers get, not only what is acknowledged.
# wrk posts signed 2 KiB LABEL_UPDATED deliveries cycling over LABELS labels for SECS seconds
# (32 connections) to labelhook as deployed (durable acks, every label event routed to a `file`
# handler); every 5 s the script samples, from labelhook's own /metrics and /proc: deliveries
# accepted, deliveries handled (the file handler's successful attempts), the backlog (queue
# depth), resident memory and the SQLite WAL's size. After the load it keeps sampling until the
# backlog is gone (or DRAIN_SECS pass), to see how fast it drains.
# RETENTION=on prunes while the load runs (delivered deliveries kept 20 s, bodies 10 s, the
# pruner every 2 s), to compare with a run without it (the default keeps everything 14 days, so
# the pruner finds nothing in a minute).
# Usage: bench/sustained.sh [sqlite|postgres]
#   (env: SECS=60 LABELS=2000 CONNS=32 DRAIN_SECS=120 RETENTION=off SUMMARY=)
# Prints a markdown section on stdout; with SUMMARY=FILE, also appends one tab-separated line
# to FILE for bench/report.py: backend, retention, accepted/s, handled/s, handled/accepted,
# backlog at the end, p99, peak RSS (MiB), non-2xx, seconds to drain (or -), the SQLite writer
# thread's CPU during the load per delivery accepted during it, in us (or -).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
backend=${1:-sqlite}
secs=${SECS:-60}
labels=${LABELS:-2000}
conns=${CONNS:-32}
drain_secs=${DRAIN_SECS:-120}
retention=${RETENTION:-off}
pg_url=${PG_URL:-postgres://postgres@127.0.0.1:5432}
bin=$root/target/release/labelhook
work=$(mktemp -d)
db=lh_sustained_$$
server=""
load=""
# Ends only what this script started, by process id.
cleanup() {
  [ -n "$load" ] && kill "$load" 2>/dev/null || true
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  if [ "$backend" = postgres ]; then psql -q "$pg_url/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

python3 "$root/bench/make_bodies.py" "$work/bodies.tsv" "$labels" bench-secret
if [ "$backend" = postgres ]; then
  psql -q "$pg_url/postgres" -c "CREATE DATABASE $db"
  sed "s|STORE_DIR|$work|g; s|postgres://postgres@127.0.0.1:5432/PG_DB|$pg_url/$db|" \
    "$root/bench/labelhook-postgres.toml" > "$work/labelhook.toml"
else
  sed "s|STORE_DIR|$work|g" "$root/bench/labelhook.toml" > "$work/labelhook.toml"
fi
if [ "$retention" = on ]; then
  printf '\n[store.retention]\ndelivered = "20s"\nbodies = "10s"\ninterval = "2s"\n' >> "$work/labelhook.toml"
fi
BENCH_SECRET=bench-secret "$bin" serve --config "$work/labelhook.toml" > "$work/out" 2> "$work/err" &
server=$!
for _ in $(seq 300); do grep -q "listening on" "$work/out" 2>/dev/null && break; sleep 0.1; done
grep -q "listening on" "$work/out" || { echo "labelhook did not start: $(tail -n 3 "$work/err")" >&2; exit 1; }

# accepted handled depth rss_mib wal_mib, from /metrics and /proc.
sample() {
  local metrics
  metrics=$(curl -s http://127.0.0.1:9106/metrics)
  local accepted handled depth rss wal
  accepted=$(echo "$metrics" | awk '/^labelhook_deliveries_total/ && /outcome="accepted"/ {s += $NF} END {print s + 0}')
  handled=$(echo "$metrics" | awk '/^labelhook_handler_attempts_total/ && /outcome="ok"/ {s += $NF} END {print s + 0}')
  depth=$(echo "$metrics" | awk '/^labelhook_queue_depth / {print $2}')
  rss=$(awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$server/status")
  wal=$( [ -f "$work/labelhook.db-wal" ] && stat -c %s "$work/labelhook.db-wal" || echo 0)
  echo "$accepted ${handled:-0} ${depth:-0} $rss $(( wal / 1048576 ))"
}

# The SQLite writer thread (named lh-store-writer): its utime + stime in clock ticks, read from
# /proc before and right after the load, so that its CPU per delivery covers the load and not
# the drain after it. Prints nothing on PostgreSQL (no such thread).
writer_ticks() {
  local task
  for task in /proc/"$server"/task/*; do
    if [ "$(cat "$task/comm" 2>/dev/null)" = lh-store-writer ]; then
      awk '{sub(/^.*\) /, ""); print $12 + $13}' "$task/stat"
      return
    fi
  done
}
ticks_before=$(writer_ticks)
accepted_before=$(sample | awk '{print $1}')
BODIES_FILE=$work/bodies.tsv wrk -t1 -c"$conns" -d"${secs}s" --latency \
  -s "$root/bench/sustained.lua" http://127.0.0.1:9105/webhooks/labelbox > "$work/wrk" 2>&1 &
load=$!
start=$(date +%s.%N)
rows=()
elapsed=0
while kill -0 "$load" 2>/dev/null; do
  sleep 5
  elapsed=$(( elapsed + 5 ))
  rows+=("$elapsed $(sample) load")
done
wait "$load" || true
load=""
load_end=$elapsed
ticks_after=$(writer_ticks)
end_sample=$(sample)
drained_at=""
while [ $(( elapsed - load_end )) -lt "$drain_secs" ]; do
  sleep 5
  elapsed=$(( elapsed + 5 ))
  s=$(sample)
  rows+=("$elapsed $s drain")
  if [ "$(echo "$s" | awk '{print ($3 == 0 && $2 >= $1) ? "yes" : "no"}')" = yes ]; then
    drained_at=$elapsed
    break
  fi
done
pruned=$(curl -s http://127.0.0.1:9106/metrics | awk '/^labelhook_pruned_deliveries_total/ {s += $NF} END {print s + 0}')
hwm=$(awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$server/status")
# The SQLite writer thread's CPU time (user + system) during the load per delivery accepted
# during it: what one delivery costs the store's single writer.
writer_us=-
if [ -n "$ticks_before" ] && [ -n "$ticks_after" ]; then
  accepted_load=$(( $(echo "$end_sample" | awk '{print $1}') - accepted_before ))
  writer_us=$(echo "scale=1; ($ticks_after - $ticks_before) * 1000000 / $(getconf CLK_TCK) / ($accepted_load + 0.0001)" | bc)
fi
kill "$server"; wait "$server" 2>/dev/null || true
server=""
# Handlers see a delivery at least once; how often more than once shows here.
lines=$(wc -l < "$work/events.jsonl")
unique=$(python3 -c 'import json,sys; print(len({json.loads(l)["delivery_id"] for l in open(sys.argv[1])}))' "$work/events.jsonl")

p99=$(awk '$1=="99%" {print $2}' "$work/wrk")
non2xx=$(awk '/Non-2xx/ {print $4}' "$work/wrk")
read -r accepted_end handled_end depth_end _ _ <<< "$end_sample"
accept_rate=$(echo "scale=0; $accepted_end / $load_end" | bc)
handle_rate=$(echo "scale=0; $handled_end / $load_end" | bc)
ratio=$(echo "scale=2; $handled_end / ($accepted_end + 0.0001)" | bc)
echo "### Sustained load, $backend, retention $retention: ${secs} s of wrk ($conns connections), 2 KiB label deliveries over $labels labels, routed to \`file\`"
echo
echo "| t (s) | accepted | handled | backlog | RSS (MiB) | WAL (MiB) | phase |"
echo "|---|---|---|---|---|---|---|"
for row in "${rows[@]}"; do
  set -- $row
  echo "| $1 | $2 | $3 | $4 | $5 | $6 | $7 |"
done
echo
echo "- during the load: accepted $accept_rate/s, handled $handle_rate/s: handled / accepted = **$ratio**; backlog at the end of the load: $depth_end"
echo "- answers: p99 $p99, non-2xx ${non2xx:-0} (503s are the queue-full answer when the writer's queue is full)"
if [ -n "$drained_at" ]; then
  echo "- backlog drained $(( drained_at - load_end )) s after the load ended"
else
  echo "- backlog not drained within ${drain_secs} s after the load"
fi
echo "- peak RSS: $hwm MiB"
if [ "$writer_us" != - ]; then
  echo "- the store's writer thread (\`lh-store-writer\`, utime + stime from /proc before and after the load): $writer_us us of CPU per delivery accepted during the load"
fi
if [ "$retention" = on ]; then
  echo "- pruned while running: $pruned deliveries"
fi
echo "- the file handler wrote $lines lines for $unique deliveries ($(( lines - unique )) handed on twice)"
if [ -n "${SUMMARY:-}" ]; then
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$backend" "$retention" \
    "$accept_rate" "$handle_rate" "$ratio" "$depth_end" "$p99" "$hwm" "${non2xx:-0}" \
    "$( [ -n "$drained_at" ] && echo $(( drained_at - load_end )) || echo -)" "$writer_us" \
    >> "$SUMMARY"
fi
