#!/usr/bin/env bash
# Regenerates BENCHMARKS.md and bench/throughput.svg from one run on this machine:
#   1. throughput: ../shared/bench/run-anchors.sh (wrk, 32 connections) for each payload size,
#      labelhook beside the HTTP ceiling and its peers, labelhook as deployed (fsync before
#      2xx, every label event routed to a `file` handler); then the same wrk load against
#      labelhook on the PostgreSQL back-end (PG_URL, default the machine's server);
#   2. a 512 MiB delivery: accepted, stored and handed to the `file` handler, with the growth
#      of the process's peak resident memory;
#   3. HMAC-SHA1 speed: `labelhook sign` against `openssl dgst -sha1 -hmac` on the same bytes;
#   4. sustained load end to end (bench/sustained.sh): SQLite without and with retention
#      pruning, then PostgreSQL, each SUSTAINED_SECS of load and its drain.
# Usage: bench/run.sh            (env: SECS per row, default 8; SIZES in bytes; SHARED dir;
#                                 SUSTAINED_SECS, default 60)
# Needs: wrk, webhook (adnanh), openssl, python3 with flask and gunicorn, curl, psql.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=${SHARED:-$root/../shared}
secs=${SECS:-8}
sizes=${SIZES:-"2176 32768 314026 1048576"}
work=$(mktemp -d)
trap 'pkill -f "labelhook serve --config $work" 2>/dev/null || true; rm -rf "$work"' EXIT

pg_url=${PG_URL:-postgres://postgres@127.0.0.1:5432}
for tool in wrk webhook openssl python3 curl psql; do
  command -v "$tool" >/dev/null || { echo "bench/run.sh: $tool is missing (see the header)"; exit 1; }
done
python3 -c 'import flask, gunicorn' 2>/dev/null || { echo "bench/run.sh: pip install flask gunicorn"; exit 1; }

(cd "$root" && cargo build --release --locked -q)
bin=$root/target/release/labelhook

# A labelhook with a fresh store, serving on the port run-anchors.sh expects.
fresh_config() {
  local dir; dir=$(mktemp -d "$work/store.XXXX")
  sed "s|STORE_DIR|$dir|g" "$root/bench/labelhook.toml" > "$dir/labelhook.toml"
  echo "$dir"
}
export LABELHOOK_CMD="d=\$(mktemp -d $work/store.XXXX); sed \"s|STORE_DIR|\$d|g\" $root/bench/labelhook.toml > \$d/labelhook.toml; BENCH_SECRET=bench-secret exec $bin serve --config \$d/labelhook.toml"

# 1. Throughput per payload size.
: > "$work/results.tsv"
for size in $sizes; do
  case $size in
    2176) payload=$shared/bench/payloads/label_updated_small.json ;;
    314026) payload=$shared/bench/payloads/label_updated_1k_objects.json ;;
    *) payload=$work/payload-$size.json; python3 "$root/bench/make_payload.py" "$payload" "$size" ;;
  esac
  actual=$(stat -c %s "$payload")
  echo "== $actual bytes" >&2
  bash "$shared/bench/run-anchors.sh" "$payload" "$secs" | tee "$work/run-$actual.txt" >&2
  # The PostgreSQL back-end under the same load, right after: a fresh database per size.
  db=lh_bench_$$_$actual
  psql -q "$pg_url/postgres" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
  dir=$(mktemp -d "$work/store.XXXX")
  sed "s|STORE_DIR|$dir|g; s|postgres://postgres@127.0.0.1:5432/PG_DB|$pg_url/$db|" \
    "$root/bench/labelhook-postgres.toml" > "$dir/labelhook.toml"
  BENCH_SECRET=bench-secret "$bin" serve --config "$dir/labelhook.toml" > "$dir/out" 2> "$dir/err" &
  pg_server=$!
  for _ in $(seq 100); do grep -q "listening on" "$dir/out" 2>/dev/null && break; sleep 0.1; done
  sig="sha1=$(openssl dgst -sha1 -hmac bench-secret -r < "$payload" | cut -d' ' -f1)"
  out=$(BODY_FILE=$payload SIG=$sig wrk -t1 -c"${CONNS:-32}" -d"${secs}s" --latency \
    -s "$shared/bench/post.lua" http://127.0.0.1:9105/webhooks/labelbox 2>&1)
  kill "$pg_server"; wait "$pg_server" 2>/dev/null || true
  psql -q "$pg_url/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
  printf 'labelhook-postgres rps=%s p99=%s non2xx=%s\n' \
    "$(echo "$out" | awk '/Requests\/sec/ {print $2}')" \
    "$(echo "$out" | awk '$1=="99%" {print $2}')" \
    "$(echo "$out" | awk '/Non-2xx/ {print $4}')" | tee -a "$work/run-$actual.txt" >&2
  awk -v size="$actual" '/ rps=/ {
      name=$1; rps=""; p99=""
      for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1]=="rps") rps=kv[2]; if (kv[1]=="p99") p99=kv[2] }
      if (rps == "") rps = 0
      print size "\t" name "\t" rps "\t" p99
    }' "$work/run-$actual.txt" >> "$work/results.tsv"
done
cut -f1-3 "$work/results.tsv" > "$work/plot.tsv"
python3 "$root/bench/plot.py" "$work/plot.tsv" "$root/bench/throughput.svg"

# 2. A 512 MiB delivery through the whole path.
huge=$work/huge.json
python3 "$root/bench/make_payload.py" "$huge" $((512 * 1024 * 1024))
huge_size=$(stat -c %s "$huge")
dir=$(fresh_config)
BENCH_SECRET=bench-secret "$bin" serve --config "$dir/labelhook.toml" > "$dir/out" 2> "$dir/err" &
server=$!
for _ in $(seq 100); do grep -q "listening on" "$dir/out" 2>/dev/null && break; sleep 0.1; done
rss_before=$(awk '/VmRSS/ {print $2}' "/proc/$server/status")
sig="sha1=$(openssl dgst -sha1 -hmac bench-secret -r < "$huge" | cut -d' ' -f1)"
start=$(date +%s.%N)
huge_code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -T "$huge" \
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
kill "$server"; wait "$server" 2>/dev/null || true
archived=$(stat -c %s "$dir/events.jsonl" 2>/dev/null || echo 0)
growth_mib=$(echo "scale=1; ($hwm - $rss_before) / 1024" | bc)
ack_s=$(echo "scale=2; ($acked - $start) / 1" | bc)
handled_s=$(echo "scale=2; ($handled - $start) / 1" | bc)
rm -rf "$dir"

# 3. HMAC-SHA1 against OpenSSL on the same 512 MiB (best of five each, from the page cache).
# The two take turns, so that both meet the same moments of a shared machine.
timed() { local s e; s=$(date +%s.%N); "$@" > /dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }
: > "$work/hmac-openssl"; : > "$work/hmac-ours"
for _ in 1 2 3 4 5; do
  timed openssl dgst -sha1 -hmac bench-secret -r "$huge" >> "$work/hmac-openssl"
  timed env LABELBOX_WEBHOOK_SECRET=bench-secret "$bin" sign "$huge" >> "$work/hmac-ours"
done
openssl_s=$(sort -n "$work/hmac-openssl" | head -1)
ours_s=$(sort -n "$work/hmac-ours" | head -1)
same=$([ "$(LABELBOX_WEBHOOK_SECRET=bench-secret "$bin" sign "$huge")" = "$sig" ] && echo yes || echo NO)
hmac_ratio=$(echo "scale=2; $openssl_s / $ours_s" | bc)
rm -f "$huge"

# The disk's sustained durable write rate bounds any receiver that fsyncs bodies before 2xx.
disk=$(dd if=/dev/zero of="$work/dd" bs=1M count=1024 conv=fdatasync 2>&1 | awk -F', ' '/copied/ {print $NF}')
rm -f "$work/dd"

# 4. Sustained load, end to end: what the handlers get.
: > "$work/sustained.tsv"
sustained_md=()
for run in "sqlite off" "sqlite on" "postgres off"; do
  set -- $run
  echo "== sustained $1, retention $2" >&2
  SECS=${SUSTAINED_SECS:-60} RETENTION=$2 SUMMARY=$work/sustained.tsv \
    bash "$root/bench/sustained.sh" "$1" > "$work/sustained-$1-$2.md"
  sustained_md+=("$work/sustained-$1-$2.md")
done

SUSTAINED_TSV=$work/sustained.tsv SUSTAINED_MD="${sustained_md[*]}" \
python3 "$root/bench/report.py" "$work/results.tsv" "$root/BENCHMARKS.md" \
  "$huge_size" "$huge_code" "$growth_mib" "$ack_s" "$handled_s" "$archived" \
  "$openssl_s" "$ours_s" "$hmac_ratio" "$same" "$disk" "$secs"
echo "wrote BENCHMARKS.md and bench/throughput.svg" >&2
