#!/usr/bin/env bash
# Regenerates BENCHMARKS.md and bench/throughput.svg from one run on this machine, measuring
# every target of the performance issue (issue 20) and the rows kept from before:
#   disk      dd's durable write rate (the one-copy bound of large deliveries);
#   tp-SIZE   throughput: ../shared/bench/run-anchors.sh (wrk, 32 connections, 2,000 labels)
#             for each payload size, labelhook (SQLite) beside the HTTP ceiling and its peers;
#   pg-SIZE   the same many-label wrk load against labelhook on PostgreSQL, fresh database;
#   pgbench   PostgreSQL's one-2-KiB-row-per-transaction rate, same server, same seconds;
#   labels1   LABELS=1 (one busy label), 2 KiB: the anchors and labelhook, then labelhook-postgres;
#   huge      a 512 MiB delivery: accepted, stored, handed to `file`, peak RSS growth;
#   hmac      `labelhook sign` against `openssl dgst -sha1 -hmac` on the same 512 MiB;
#   sustained-* bench/sustained.sh: SQLite without and with retention, then PostgreSQL;
#   replicas  bench/replicas.sh: two replicas on one PostgreSQL database against one;
#   backfill  bench/labelbox-backfill.sh: peak RSS of a 100,000- and a 10,000-row backfill.
# Each step runs on its own, bounded by a timeout, its output in LOG_DIR/STEP.log; a step that
# fails or times out leaves "failed: reason" for its rows and the run goes on, so one broken
# piece never costs the others. bench/report.py then writes BENCHMARKS.md from whatever was
# measured.
# Usage: bench/run.sh   (env: SECS per throughput row and for pgbench, default 15; SIZES in
#                        bytes; SHARED dir; SUSTAINED_SECS, default 60; REPLICA_SECS, default
#                        30; BACKFILL_ROWS, default 100000; LOG_DIR, default target/bench-logs;
#                        STEPS, a space-separated subset of the steps above, to try one piece)
# Needs: wrk, webhook (adnanh), openssl, python3 with flask and gunicorn, curl, psql, pgbench,
# bc, GNU time.
set -u
# Everything below is exported (set -a) because each step runs in a child bash under timeout.
set -a
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${SHARED:-$root/../shared}
secs=${SECS:-15}
sizes=${SIZES:-"2176 32768 314026 1048576"}
sustained_secs=${SUSTAINED_SECS:-60}
replica_secs=${REPLICA_SECS:-30}
backfill_rows=${BACKFILL_ROWS:-100000}
pg_url=${PG_URL:-postgres://postgres@127.0.0.1:5432}
steps=${STEPS:-}
work=$(mktemp -d)
logs=${LOG_DIR:-$root/target/bench-logs}
kv=$work/kv.tsv
bin=$root/target/release/labelhook
small_payload=$shared/bench/payloads/label_updated_small.json
set +a
mkdir -p "$logs"
: > "$kv"
: > "$work/results.tsv"
: > "$work/labels1.tsv"
: > "$work/sustained.tsv"
trap 'rm -rf "$work"' EXIT
run_started=$(date +%s)

# A result for report.py: one "key<TAB>value" line.
put() { printf '%s\t%s\n' "$1" "$2" >> "$kv"; }
export -f put

# Runs step NAME (shell function FN) with a time limit; its failure is recorded, not fatal.
# timeout puts the step in a process group of its own and ends the whole group on expiry, so
# servers and wrk a timed-out step started do not outlive it.
step() {
  local name=$1 limit=$2 fn=$3 started rc reason
  if [ -n "$steps" ] && ! [[ " $steps " == *" ${name%%-*} "* || " $steps " == *" $name "* ]]; then
    return 0
  fi
  started=$(date +%s)
  # Other engineers build Rust on this machine: rustc running as a step starts is noise to note.
  put "rustc.$name" "$(pgrep -c -x rustc 2>/dev/null || true)"
  echo "== $(date -u +%H:%M:%S) $name (limit ${limit}s; load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  timeout -k 10 "$limit" bash -c "set -euo pipefail; $fn" > "$logs/$name.log" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      reason="timed out after ${limit} s"
    else
      reason="exit $rc: $(grep -v '^[[:space:]]*$' "$logs/$name.log" | tail -n 1 | sed 's/^[[:space:]]*//' | cut -c1-160)"
    fi
    put "fail.$name" "$reason"
    echo "   $name failed: $reason (log: $logs/$name.log)" >&2
  fi
  put "took.$name" "$(( $(date +%s) - started ))"
  put "loadavg.$name" "$(cut -d' ' -f1 /proc/loadavg)"
  tail -n 12 "$logs/$name.log" | sed 's/^/   /' >&2
}

# Build: the server, the CLI and the stand-in of Labelbox's API that the backfill rows need.
build() {
  cd "$root" && cargo build --release --locked -q --bin labelhook --example labelbox_standin
}

# The disk's sustained durable write rate bounds any receiver that fsyncs bodies before 2xx.
disk() {
  local rate
  rate=$(dd if=/dev/zero of="$work/dd" bs=1M count=1024 conv=fdatasync 2>&1 | awk -F', ' '/copied/ {print $NF}')
  rm -f "$work/dd"
  [ -n "$rate" ] || { echo "dd printed no rate"; exit 1; }
  echo "disk: $rate"
  put disk "$rate"
}

# The payload file of SIZE bytes: the shared ones for 2 KiB and 307 KiB, else generated.
payload_for() {
  case $1 in
    2176) echo "$shared/bench/payloads/label_updated_small.json" ;;
    314026) echo "$shared/bench/payloads/label_updated_1k_objects.json" ;;
    *) [ -s "$work/payload-$1.json" ] || python3 "$root/bench/make_payload.py" "$work/payload-$1.json" "$1"
       echo "$work/payload-$1.json" ;;
  esac
}
export -f payload_for

# Appends "size<TAB>name<TAB>rps<TAB>p99" for each "name … rps=… p99=…" line of FILE to OUT.
rows_of() {
  awk -v size="$1" '/ rps=/ {
      name=$1; rps=""; p99=""
      for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1]=="rps") rps=kv[2]; if (kv[1]=="p99") p99=kv[2] }
      if (rps == "") rps = 0
      print size "\t" name "\t" rps "\t" p99
    }' "$2" >> "$3"
}
export -f rows_of

# labelhook (SQLite) as run-anchors.sh starts it: a fresh store each time, on port 9105.
export LABELHOOK_CMD="d=\$(mktemp -d $work/store.XXXX); sed \"s|STORE_DIR|\$d|g\" $root/bench/labelhook.toml > \$d/labelhook.toml; BENCH_SECRET=bench-secret exec $bin serve --config \$d/labelhook.toml"

# Throughput of the anchors and labelhook (SQLite) for payload SIZE, LABELS labels (default
# 2,000, as run-anchors.sh caps them for large payloads), into results.tsv (or OUT).
throughput() {
  local size=$1 out=${2:-$work/results.tsv} payload actual
  payload=$(payload_for "$size")
  actual=$(stat -c %s "$payload")
  bash "$shared/bench/run-anchors.sh" "$payload" "$secs" | tee "$work/run-$actual-${LABELS:-many}.txt"
  rows_of "$actual" "$work/run-$actual-${LABELS:-many}.txt" "$out"
  # A receiver that printed no rate (it did not start, or wrk failed) is recorded as failed.
  for name in ceiling-bare ceiling-hmac webhook-go flask-gunicorn labelhook; do
    grep -q "^$name .*rps=[0-9]" "$work/run-$actual-${LABELS:-many}.txt" \
      || put "fail.row.${LABELS:-many}.$actual.$name" "$(grep "^$name" "$work/run-$actual-${LABELS:-many}.txt" || echo "no rate printed")"
  done
}
export -f throughput

# labelhook on PostgreSQL (fresh database) under run-anchors.sh's load for payload SIZE: the
# same many labels (make-many.py, capped at 64 MiB as run-anchors.sh caps them) and the same
# wrk, or with LABELS=1 the one body again and again (post.lua). Into results.tsv (or OUT).
pg_throughput() {
  local size=$1 out=${2:-$work/results.tsv} payload actual labels db dir server wrk_out
  payload=$(payload_for "$size")
  actual=$(stat -c %s "$payload")
  labels=${LABELS:-2000}
  [ "$labels" -gt 1 ] && [ $((labels * actual)) -gt $((64 << 20)) ] && labels=$(( (64 << 20) / actual ))
  db=lh_bench_$$_${actual}_$labels
  psql -q "$pg_url/postgres" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
  dir=$(mktemp -d "$work/store.XXXX")
  sed "s|STORE_DIR|$dir|g; s|postgres://postgres@127.0.0.1:5432/PG_DB|$pg_url/$db|" \
    "$root/bench/labelhook-postgres.toml" > "$dir/labelhook.toml"
  BENCH_SECRET=bench-secret "$bin" serve --config "$dir/labelhook.toml" > "$dir/out" 2> "$dir/err" &
  server=$!
  # Expanded now: the function's locals are gone when the step's shell exits.
  trap "kill $server 2>/dev/null; psql -q $pg_url/postgres -c 'DROP DATABASE IF EXISTS $db WITH (FORCE)' >/dev/null 2>&1" EXIT
  for _ in $(seq 300); do grep -q "listening on" "$dir/out" 2>/dev/null && break; sleep 0.1; done
  grep -q "listening on" "$dir/out" || { echo "labelhook-postgres did not start: $(tail -n 2 "$dir/err")"; exit 1; }
  if [ "$labels" -gt 1 ]; then
    python3 "$shared/bench/make-many.py" "$payload" "$labels" bench-secret > "$dir/many"
    wrk_out=$(MANY_FILE=$dir/many wrk -t1 -c"${CONNS:-32}" -d"${secs}s" --latency \
      -s "$shared/bench/post-many.lua" http://127.0.0.1:9105/webhooks/labelbox 2>&1)
  else
    wrk_out=$(BODY_FILE=$payload SIG="sha1=$(openssl dgst -sha1 -hmac bench-secret -r < "$payload" | cut -d' ' -f1)" \
      wrk -t1 -c"${CONNS:-32}" -d"${secs}s" --latency \
      -s "$shared/bench/post.lua" http://127.0.0.1:9105/webhooks/labelbox 2>&1)
  fi
  echo "$wrk_out"
  printf 'labelhook-postgres rps=%s p99=%s non2xx=%s\n' \
    "$(echo "$wrk_out" | awk '/Requests\/sec/ {print $2}')" \
    "$(echo "$wrk_out" | awk '$1=="99%" {print $2}')" \
    "$(echo "$wrk_out" | awk '/Non-2xx/ {print $4}')" | tee "$dir/row"
  grep -q 'rps=[0-9]' "$dir/row" || { echo "wrk printed no rate"; exit 1; }
  rows_of "$actual" "$dir/row" "$out"
}
export -f pg_throughput

# pgbench on the same server for the same seconds as wrk: the PostgreSQL row's yardstick.
pgbench_step() {
  local line
  line=$(bash "$root/bench/pgbench.sh" "$small_payload" "$secs")
  echo "$line"
  put pgbench.tps "$(echo "$line" | sed -n 's/.*tps=\([0-9.]*\).*/\1/p')"
  put pgbench.latency_ms "$(echo "$line" | sed -n 's/.*latency_ms=\([0-9.]*\).*/\1/p')"
}

# One busy label (LABELS=1): every receiver of run-anchors.sh, then labelhook-postgres.
labels1() { LABELS=1 throughput 2176 "$work/labels1.tsv"; }
labels1_pg() { LABELS=1 pg_throughput 2176 "$work/labels1.tsv"; }

# A 512 MiB delivery through the whole path: answer, the file handler's line, peak RSS growth.
huge() {
  local huge=$work/huge.json huge_size dir server rss_before sig start acked handled hwm archived
  python3 "$root/bench/make_payload.py" "$huge" $((512 * 1024 * 1024))
  huge_size=$(stat -c %s "$huge")
  dir=$(mktemp -d "$work/store.XXXX")
  sed "s|STORE_DIR|$dir|g" "$root/bench/labelhook.toml" > "$dir/labelhook.toml"
  BENCH_SECRET=bench-secret "$bin" serve --config "$dir/labelhook.toml" > "$dir/out" 2> "$dir/err" &
  server=$!
  trap "kill $server 2>/dev/null; rm -rf $dir" EXIT
  for _ in $(seq 300); do grep -q "listening on" "$dir/out" 2>/dev/null && break; sleep 0.1; done
  grep -q "listening on" "$dir/out" || { echo "labelhook did not start: $(tail -n 2 "$dir/err")"; exit 1; }
  rss_before=$(awk '/VmRSS/ {print $2}' "/proc/$server/status")
  sig="sha1=$(openssl dgst -sha1 -hmac bench-secret -r < "$huge" | cut -d' ' -f1)"
  echo "$sig" > "$work/huge.sig"
  start=$(date +%s.%N)
  code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -T "$huge" \
    -H 'Content-Type: application/json' -H 'X-Labelbox-Event: LABEL_UPDATED' \
    -H 'X-Labelbox-Id: cbenchhuge000000000000001' -H "X-Hub-Signature: $sig" \
    http://127.0.0.1:9105/webhooks/labelbox)
  acked=$(date +%s.%N)
  # Handed to the file handler: its line is complete once the file is larger than the body and
  # ends with a newline.
  for _ in $(seq 600); do
    if [ -s "$dir/events.jsonl" ] && [ "$(stat -c %s "$dir/events.jsonl")" -gt "$huge_size" ] \
       && [ "$(tail -c 1 "$dir/events.jsonl" | od -An -c | tr -d ' ')" = '\n' ]; then break; fi
    sleep 0.2
  done
  handled=$(date +%s.%N)
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$server/status")
  archived=$(stat -c %s "$dir/events.jsonl" 2>/dev/null || echo 0)
  put huge.size "$huge_size"
  put huge.code "$code"
  put huge.archived "$archived"
  put huge.growth_mib "$(echo "scale=1; ($hwm - $rss_before) / 1024" | bc)"
  put huge.ack_s "$(echo "scale=2; ($acked - $start) / 1" | bc)"
  put huge.handled_s "$(echo "scale=2; ($handled - $start) / 1" | bc)"
  echo "HTTP $code, archived $archived of $huge_size bytes, VmHWM $hwm KiB, VmRSS before $rss_before KiB"
}

# HMAC-SHA1 against OpenSSL on the same 512 MiB (best of five each, from the page cache). The
# two take turns, so that both meet the same moments of a shared machine.
hmac() {
  local huge=$work/huge.json o s
  [ -s "$huge" ] || python3 "$root/bench/make_payload.py" "$huge" $((512 * 1024 * 1024))
  timed() { local s e; s=$(date +%s.%N); "$@" > /dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }
  : > "$work/hmac-openssl"; : > "$work/hmac-ours"
  for _ in 1 2 3 4 5; do
    timed openssl dgst -sha1 -hmac bench-secret -r "$huge" >> "$work/hmac-openssl"
    timed env LABELBOX_WEBHOOK_SECRET=bench-secret "$bin" sign "$huge" >> "$work/hmac-ours"
  done
  o=$(sort -n "$work/hmac-openssl" | head -1)
  s=$(sort -n "$work/hmac-ours" | head -1)
  put hmac.openssl_s "$o"
  put hmac.ours_s "$s"
  put hmac.ratio "$(echo "scale=2; $o / $s" | bc)"
  put hmac.same "$([ "$(LABELBOX_WEBHOOK_SECRET=bench-secret "$bin" sign "$huge")" \
    = "sha1=$(openssl dgst -sha1 -hmac bench-secret -r < "$huge" | cut -d' ' -f1)" ] && echo yes || echo NO)"
  echo "openssl $o s, labelhook sign $s s"
  rm -f "$huge"
}

# Sustained load (bench/sustained.sh BACKEND with RETENTION): its section and its summary line.
sustained() {
  SECS=$sustained_secs RETENTION=$2 SUMMARY=$work/sustained.tsv \
    bash "$root/bench/sustained.sh" "$1" > "$work/sustained-$1-$2.md"
  cat "$work/sustained-$1-$2.md"
}
export -f sustained

# Two replicas against one on one PostgreSQL database (bench/replicas.sh).
replicas() {
  local out
  out=$(bash "$root/bench/replicas.sh" "$replica_secs")
  echo "$out"
  echo "$out" | grep -q '^replicas=1 ' || { echo "no result for one replica"; exit 1; }
  echo "$out" | grep -q '^replicas=2 ' || { echo "no result for two replicas"; exit 1; }
  echo "$out" | while read -r line; do
    n=$(echo "$line" | sed -n 's/^replicas=\([0-9]*\).*/\1/p')
    put "replicas.$n" "$line"
  done
}

# A backfill's peak RSS for BACKFILL_ROWS and a tenth of them (bench/labelbox-backfill.sh).
backfill() {
  local out
  out=$(ROWS=$backfill_rows bash "$root/bench/labelbox-backfill.sh")
  echo "$out"
  # "  100000 rows  135 MiB   27.3 s  100000 new deliveries stored  peak RSS 22410 KiB"
  echo "$out" | awk '/ rows .*peak RSS/ {print}' | while read -r line; do
    put "backfill.$(echo "$line" | awk '{print $1}')" "$line"
  done
  [ "$(echo "$out" | grep -c 'peak RSS')" -ge 2 ] || { echo "fewer than two backfill runs reported"; exit 1; }
}

export -f build disk pgbench_step labels1 labels1_pg huge hmac replicas backfill

put started "$(date -u '+%Y-%m-%d %H:%M')"
put commit "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
put secs "$secs"
put replica_secs "$replica_secs"
put backfill_rows "$backfill_rows"
put loadavg.start "$(cut -d' ' -f1-3 /proc/loadavg)"
step build 1200 build
step disk 300 disk
for size in $sizes; do
  step "tp-$size" 600 "throughput $size"
  step "pg-$size" 300 "pg_throughput $size"
  # PostgreSQL's own rate right after the PostgreSQL row of 2 KiB, for the same seconds.
  [ "$size" = 2176 ] && step pgbench 300 pgbench_step
done
step labels1 600 labels1
step labels1pg 300 labels1_pg
step huge 600 huge
step hmac 600 hmac
step sustained-sqlite-off 600 "sustained sqlite off"
step sustained-sqlite-on 600 "sustained sqlite on"
step sustained-postgres-off 600 "sustained postgres off"
step replicas 600 replicas
step backfill 900 backfill
put loadavg.end "$(cut -d' ' -f1-3 /proc/loadavg)"
put wall_s "$(( $(date +%s) - run_started ))"

# The report and the plot are written from whatever was measured, failed steps included.
md_files=""
for f in "$work"/sustained-sqlite-off.md "$work"/sustained-sqlite-on.md "$work"/sustained-postgres-off.md; do
  [ -s "$f" ] && md_files="$md_files $f"
done
if [ -s "$work/results.tsv" ]; then
  cut -f1-3 "$work/results.tsv" > "$work/plot.tsv"
  python3 "$root/bench/plot.py" "$work/plot.tsv" "$root/bench/throughput.svg" \
    || echo "bench/run.sh: plot.py failed; throughput.svg left as it was" >&2
fi
# Everything report.py reads is kept with the logs, to write the report again without a run.
cp "$kv" "$work/results.tsv" "$work/labels1.tsv" "$work/sustained.tsv" $md_files "$logs/" 2>/dev/null
SUSTAINED_MD="$md_files" python3 "$root/bench/report.py" "$work/results.tsv" "$work/labels1.tsv" \
  "$work/sustained.tsv" "$kv" "$root/BENCHMARKS.md" \
  && echo "wrote BENCHMARKS.md and bench/throughput.svg ($(( $(date +%s) - run_started )) s; logs in $logs)" >&2
