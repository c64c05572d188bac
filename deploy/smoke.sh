#!/usr/bin/env bash
# Builds the container image and runs README.md's "Docker image" section as written, top to
# bottom: every ```sh block in order, each output the README shows compared with what the
# block printed. Then checks what the README claims about the image beyond that section's
# commands: its size, no LABELHOOK__ variable in it (a mounted file is what configures it),
# and an unwritable /data making it unhealthy with an error that says what to do.
#
#   deploy/smoke.sh                  (from anywhere; needs Docker and a reachable registry)
#   deploy/smoke.sh --host-network   (where containers share the host's network)
#
# With SMOKE_SKIP_BUILD=1 the README's `docker build` is left out and the image already
# tagged `labelhook` is tried (one built by another step, or from another Dockerfile).
# DOCKER names the client to use (e.g. /usr/bin/docker); DOCKER_BUILDKIT=0 makes the build
# use the legacy builder.
#
# --host-network is for a machine whose Docker has no bridge (dockerd --bridge=none), where
# `-p` cannot publish a port: each container then runs with `--network host`, and what `-p`
# did is done with the variables the README names: `-p 127.0.0.1:8090:8080` becomes
# LABELHOOK__SERVER__LISTEN=127.0.0.1:8090 (and the admin listener 1000 above it, 9090 in the
# container otherwise clashing on the host). The README's container lets in Docker's bridge
# networks, where a published port's requests come from; on the host's network they come from
# 127.0.0.1, so that one container (not the one that must refuse this machine) also lets in
# 127.0.0.1/32. The build runs on the host's network too (cargo fetches crates there). No
# base image has to be pulled when deploy/offline-base-images.sh made stand-ins.
#
# It uses the README's names (container "labelhook", volume "labelhook-data", port 8090) and
# refuses to start when they are taken; it removes what it created when it ends. The README's
# files (try-container/, body.json) are made in a temporary directory, not in the clone.
set -euo pipefail

host_network=0
case "${1:-}" in
  --host-network) host_network=1 ;;
  "") ;;
  *)
    echo "usage: $0 [--host-network]" >&2
    exit 2
    ;;
esac

repo=$(cd "$(dirname "$0")/.." && pwd)
readme="$repo/README.md"
work=$(mktemp -d)
# The client named by DOCKER, for this script and for the README's `sh -c` lines alike.
if [ -n "${DOCKER:-}" ]; then
  mkdir -p "$work/bin"
  ln -s "$(command -v "$DOCKER")" "$work/bin/docker"
  PATH="$work/bin:$PATH"
fi
image=labelhook
containers=(labelhook labelhook-baked labelhook-unwritable)
# Bounds for what the README says; the image is about 35 MB today.
max_image_bytes=$((45 * 1000 * 1000))

say() { printf '\n== %s\n' "$*"; }
fail() {
  printf 'FAILED: %s\n' "$*" >&2
  exit 1
}

for c in "${containers[@]}"; do
  if docker container inspect "$c" >/dev/null 2>&1; then
    fail "a container named $c exists; remove it first (docker rm -f $c)"
  fi
done
if docker volume inspect labelhook-data >/dev/null 2>&1; then
  fail "the volume labelhook-data exists; remove it first (docker volume rm labelhook-data)"
fi

cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    for c in "${containers[@]}"; do
      if docker container inspect "$c" >/dev/null 2>&1; then
        printf '\n== logs of %s\n' "$c"
        docker logs "$c" 2>&1 | tail -n 50 || true
      fi
    done
  fi
  for c in "${containers[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
  docker volume rm labelhook-data >/dev/null 2>&1 || true
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

# The README's docker commands, as written, or adapted to the host's network (see the top).
# The README's blocks are sourced in this shell, so their `docker` is this function.
next_host_port=8092
docker() {
  if [ "$host_network" = 0 ]; then
    command docker "$@"
    return
  fi
  case "${1:-}" in
    build)
      shift
      command docker build --network host "$@"
      ;;
    run)
      shift
      host_network_run "$@"
      ;;
    *) command docker "$@" ;;
  esac
}

host_network_run() {
  local args=() listen="" name="" detached=0 hp
  while [ "$#" -gt 0 ]; do
    case "$1" in
      -p | --publish)
        # [address:]host_port:container_port -> the address and host port to listen on.
        hp=${2%:*}
        case "$hp" in *:*) listen=$hp ;; *) listen="0.0.0.0:$hp" ;; esac
        shift 2
        continue
        ;;
      --name) name=$2 ;;
      -d | --detach) detached=1 ;;
    esac
    args+=("$1")
    shift
  done
  # A detached container serves: give it ports of its own on the host.
  if [ -z "$listen" ] && [ "$detached" = 1 ]; then
    listen="127.0.0.1:$next_host_port"
    next_host_port=$((next_host_port + 1))
  fi
  local extra=(--network host)
  if [ -n "$listen" ]; then
    extra+=(-e "LABELHOOK__SERVER__LISTEN=$listen"
      -e "LABELHOOK__SERVER__ADMIN_LISTEN=${listen%:*}:$((${listen##*:} + 1000))")
  fi
  if [ "$name" = labelhook ]; then
    extra+=(-e "LABELHOOK__NETWORK__ALLOWLIST=35.223.142.181/32,34.135.127.45/32,35.224.108.6/32,34.10.80.254/32,127.0.0.1/32")
  fi
  echo "(host network: docker run ${extra[*]} ...)" >&2
  command docker run "${extra[@]}" "${args[@]}"
}

# The lines of the README section whose heading is exactly $1, up to the next heading of the
# same or a higher level (headings inside code blocks do not count).
section() {
  awk -v want="$1" '
    /^```/ { fence = !fence; if (on) print; next }
    !fence && /^#+ / {
      match($0, /^#+/)
      if (on && RLENGTH <= level) on = 0
      if ($0 == want) { on = 1; level = RLENGTH; next }
    }
    on { print }
  ' "$readme"
}

# Splits README text on stdin into its code blocks, in order, as files in $1: NN.sh for ```sh
# blocks, NN.out for bare ``` blocks (what the block before printed), NN.other for the rest.
blocks() {
  awk -v dir="$1" '
    /^```/ && !fence {
      fence = 1; n++; lang = substr($0, 4)
      kind = (lang == "sh") ? "sh" : (lang == "" ? "out" : "other")
      file = sprintf("%s/%02d.%s", dir, n, kind)
      printf "" > file
      next
    }
    /^```/ && fence { fence = 0; close(file); next }
    fence { print > file }
  '
}

# Runs the sh blocks in $1 in this shell (so that variables and functions carry over from
# one block to the next), each in $2 unless it builds the image (that one runs in the clone,
# the build context), comparing each with the output block that follows it.
run_blocks() {
  local dir=$1 cwd=$2 block expected actual
  for block in "$dir"/*.sh; do
    expected="${block%.sh}"
    expected=$(printf '%s/%02d.out' "$dir" $((10#$(basename "$expected") + 1)))
    printf '\n--- %s\n' "$(basename "$block")"
    cat "$block"
    printf -- '---\n'
    if grep -q '^docker build' "$block"; then
      if [ "${SMOKE_SKIP_BUILD:-}" = 1 ]; then
        echo "(skipped: SMOKE_SKIP_BUILD=1)"
      else
        # shellcheck source=/dev/null
        (cd "$repo" && source "$block")
      fi
      continue
    fi
    cd "$cwd"
    if [ -f "$expected" ]; then
      actual="$work/actual"
      # shellcheck source=/dev/null
      source "$block" >"$actual"
      cat "$actual"
      if ! diff -u "$expected" "$actual"; then
        fail "the output differs from README.md's (- README, + this run)"
      fi
    else
      # shellcheck source=/dev/null
      source "$block"
    fi
  done
}

# Waits (bounded) until container $1's health is $2.
wait_health() {
  local status=""
  for _ in $(seq 1 60); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$1")
    if [ "$status" = "$2" ]; then return 0; fi
    sleep 1
  done
  fail "$1 stayed $status, expected $2"
}

mkdir -p "$work/try" "$work/body" "$work/container"

say "body.json, from README.md's \"Try it with curl\""
section '### Try it with curl' | blocks "$work/body"
body_block=$(grep -l '^cat > body.json' "$work/body"/*.sh | head -n 1)
[ -n "$body_block" ] || fail "no block writes body.json in \"Try it with curl\""
(cd "$work/try" && bash -euo pipefail "$body_block")

say "README.md, \"Docker image\", top to bottom"
section '### Docker image' | blocks "$work/container"
ls "$work/container"/*.sh >/dev/null 2>&1 || fail "no sh blocks in \"Docker image\""
run_blocks "$work/container" "$work/try"
cd "$work"

say "the image is small"
size=$(docker image inspect -f '{{.Size}}' "$image")
echo "image size: $size bytes (at most $max_image_bytes)"
[ "$size" -le "$max_image_bytes" ] || fail "the image is $size bytes"

say "the image sets no LABELHOOK__ variable and its health is readiness"
env_vars=$(docker image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$image")
echo "$env_vars"
if grep -q '^LABELHOOK__' <<<"$env_vars"; then
  fail "the image sets LABELHOOK__ variables, which would override a mounted configuration"
fi
healthcheck=$(docker image inspect -f '{{json .Config.Healthcheck.Test}}' "$image")
echo "HEALTHCHECK $healthcheck"
grep -q -- '--ready' <<<"$healthcheck" || fail "the HEALTHCHECK does not probe readiness"

say "without the mounted configuration (the image's own), this machine is refused"
docker run -d --name labelhook-baked -p 127.0.0.1:8091:8080 \
  -e LABELBOX_WEBHOOK_SECRET=smoke -e LABELHOOK__LOG__FORMAT=pretty "$image" >/dev/null
wait_health labelhook-baked healthy
answer=$(curl -sS -w ' %{http_code}' http://127.0.0.1:8091/webhooks/labelbox \
  -H 'Content-Type: application/json' -H 'X-Labelbox-Event: LABEL_UPDATED' \
  -H 'X-Hub-Signature: sha1=0000000000000000000000000000000000000000' \
  --data-binary @"$work/try/body.json")
echo "$answer"
[ "$answer" = '{"error":"source address not allowed"} 403' ] || fail "expected 403, got $answer"
# The variable passed overrides the file's log.format: labelhook says so.
docker logs labelhook-baked 2>&1 | grep 'overrides this key' ||
  fail "no log line about LABELHOOK__LOG__FORMAT overriding the file"

say "a /data the image's user cannot write: an error saying what to do, and unhealthy"
if [ "$(id -u)" = 65532 ]; then
  echo "skipped: this user is uid 65532, so its directories are writable by the image's user"
else
  mkdir "$work/unwritable-data"
  chmod 755 "$work/unwritable-data"
  # 1ms, not 0s: 0 means "the image's own start period" (30 s) to Docker.
  docker run -d --name labelhook-unwritable -v "$work/unwritable-data:/data" \
    -e LABELBOX_WEBHOOK_SECRET=smoke \
    --health-start-period 1ms --health-interval 1s --health-retries 2 "$image" >/dev/null
  wait_health labelhook-unwritable unhealthy
  logs=$(docker logs labelhook-unwritable 2>&1)
  grep '"level":"ERROR"' <<<"$logs" | grep 'not writable' | grep 'chown' ||
    fail "no ERROR line saying the directory is not writable and how to fix it"
  # Alive all the same: liveness is /healthz, readiness /readyz.
  docker exec labelhook-unwritable labelhook healthcheck
  if docker exec labelhook-unwritable labelhook healthcheck --ready; then
    fail "healthcheck --ready passed with an unwritable store"
  fi
fi

say "ok"
