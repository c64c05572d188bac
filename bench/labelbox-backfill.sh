#!/usr/bin/env bash
# The memory of `labelhook labelbox backfill`: one backfill of ROWS data rows (default 100000,
# about 1 KiB a line) from the stand-in of Labelbox's API (examples/labelbox_standin.rs; it is
# not Labelbox), beside a running `labelhook serve` on a fresh SQLite store, then one of
# ROWS/10 rows, so that the two peaks can be compared: a backfill streams its export, so its
# peak resident memory does not grow with the export's size.
# Prints, per run: rows, export bytes, seconds, deliveries stored, and the labelhook backfill
# process's peak RSS ("Maximum resident set size" of /usr/bin/time -v).
# Usage: bench/labelbox-backfill.sh        (env: ROWS, default 100000; STANDIN_CHUNK_BYTES,
#                                           default 1 MiB)
# Needs: /usr/bin/time (GNU time), awk.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rows=${ROWS:-100000}
target=${CARGO_TARGET_DIR:-$root/target}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
[ -x /usr/bin/time ] || { echo "bench/labelbox-backfill.sh: GNU time (/usr/bin/time) is missing"; exit 1; }

(cd "$root" && cargo build --release --locked -q --bin labelhook --example labelbox_standin)
bin=$target/release/labelhook
standin=$target/release/examples/labelbox_standin

# Waits (bounded) for the "listening on URL" line a program prints first to `file`.
listening() {
  local file=$1 line
  for _ in $(seq 600); do
    line=$(grep -m1 '^listening on ' "$file" 2>/dev/null || true)
    [ -n "$line" ] && { echo "${line#listening on }"; return; }
    sleep 0.1
  done
  echo "bench/labelbox-backfill.sh: no listening line in $file" >&2; exit 1
}

one_run() {
  local n=$1 dir="$work/run-$1"
  mkdir -p "$dir"
  "$standin" "$n" > "$dir/standin.out" & pids+=($!)
  local api; api=$(listening "$dir/standin.out")/graphql
  local key project
  key=$(sed -n 's/^api_key = "\(.*\)"/\1/p' "$dir/standin.out")
  project=$(sed -n 's/^project = "\([^"]*\)".*/\1/p' "$dir/standin.out")
  cat > "$dir/labelhook.toml" <<TOML
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[network]
allowlist = ["127.0.0.1/32"]

[store]
url = "sqlite://$dir/labelhook.db"

[[endpoint]]
name = "labelbox"
secrets = [{ value = "bench-secret" }]

[labelbox]
api_url = "$api"
api_key = { env = "BENCH_LABELBOX_KEY" }
export_poll_interval = "100ms"
TOML
  "$bin" serve --config "$dir/labelhook.toml" > "$dir/serve.out" 2> "$dir/serve.err" & pids+=($!)
  listening "$dir/serve.out" > /dev/null
  local started; started=$(date +%s.%N)
  BENCH_LABELBOX_KEY=$key /usr/bin/time -v -o "$dir/time.txt" \
    "$bin" labelbox backfill --project "$project" --since 2024-05-01 --config "$dir/labelhook.toml" \
    > "$dir/backfill.out" 2> "$dir/backfill.err"
  local ended; ended=$(date +%s.%N)
  local rss; rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$dir/time.txt")
  local bytes; bytes=$(grep -o 'backfill: [0-9]* rows, [^,]*' "$dir/backfill.err" | tail -1 | sed 's/.*rows, //')
  printf '%8d rows  %10s  %6.1f s  %s  peak RSS %d KiB\n' "$n" "$bytes" \
    "$(awk "BEGIN { print $ended - $started }")" "$(grep -o '[0-9]* new deliveries stored' "$dir/backfill.out")" "$rss"
}

echo "labelhook labelbox backfill against the stand-in (chunks of ${STANDIN_CHUNK_BYTES:-1048576} bytes):"
one_run "$rows"
one_run $((rows / 10))
