#!/usr/bin/env bash
# Regenerates the fuzz targets' seed corpora under fuzz/seeds/ from the test fixtures
# (tests/fixtures/*.json, and the forwarding headers the integration tests send), then
# minimises each with `cargo fuzz cmin`. The minimised seeds are committed; run this again when
# the fixtures change. Needs openssl (for the HMACs) and cargo-fuzz; on a stable toolchain it
# sets RUSTC_BOOTSTRAP=1, as `cargo fuzz` needs nightly flags.
#
#   fuzz/seed.sh            # regenerate and minimise all three
#   fuzz/seed.sh --no-cmin  # regenerate only (no build needed)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
fixtures="$root/tests/fixtures"
seeds="$here/seeds"
# The secret the signature_header target checks against (see its source).
secret="fuzz-secret"

# The X-Labelbox-Event each fixture is sent under, as the integration tests send it.
topic_of() {
    case "$1" in
        label_created*) echo LABEL_CREATED ;;
        label_deleted*) echo LABEL_DELETED ;;
        label_updated*) echo LABEL_UPDATED ;;
        workflow_action*) echo WORKFLOW_ACTION ;;
        review_created*) echo REVIEW_CREATED ;;
        model_run*) echo MODEL_RUN ;;
        *) echo SOMETHING_NEW ;;
    esac
}

hmac() { # algorithm file -> lowercase hex
    openssl dgst "-$1" -hmac "$secret" -r "$2" | cut -d' ' -f1
}

rm -rf "$seeds"
mkdir -p "$seeds/signature_header" "$seeds/client_address" "$seeds/events_gate"

# events_gate: each fixture alone, then runs of them (one record after another, separated by
# 0x1E) so the gate sees an entity more than once: every fixture in order, and in reverse.
sequence="$seeds/events_gate/all-in-order"
reverse="$seeds/events_gate/all-reversed"
: > "$sequence"
: > "$reverse"
for body in "$fixtures"/*.json; do
    name="$(basename "$body" .json)"
    topic="$(topic_of "$name")"
    { printf '%s\n' "$topic"; cat "$body"; } > "$seeds/events_gate/$name"
    [ -s "$sequence" ] && printf '\036' >> "$sequence"
    { printf '%s\n' "$topic"; cat "$body"; } >> "$sequence"
    { printf '%s\n' "$topic"; cat "$body"; printf '\036'; cat "$reverse"; } > "$reverse.tmp"
    mv "$reverse.tmp" "$reverse"
done
# A label created, updated twice (out of order) and deleted, then updated after its deletion.
{
    for name in label_created label_updated label_updated_whole_seconds label_deleted label_updated; do
        printf '%s\n' "$(topic_of "$name")"
        cat "$fixtures/$name.json"
        printf '\036'
    done
} > "$seeds/events_gate/label-lifecycle"

# signature_header: flags, SHA-256 value, newline, SHA-1 value, newline, body. Genuine
# signatures of each fixture in both headers, and the same with one digit changed.
for body in "$fixtures"/*.json; do
    name="$(basename "$body" .json)"
    s256="sha256=$(hmac sha256 "$body")"
    s1="sha1=$(hmac sha1 "$body")"
    { printf '\007%s\n%s\n' "$s256" "$s1"; cat "$body"; } > "$seeds/signature_header/$name-both"
    { printf '\006\n%s\n' "$s1" | tr 'a-f' 'A-F'; cat "$body"; } > "$seeds/signature_header/$name-sha1-upper"
    { printf '\001 %s \n\n' "${s256%?}0"; cat "$body"; } > "$seeds/signature_header/$name-sha256-wrong"
done

# client_address: kind, peer, trusted proxies, then header lines. The forwarding headers the
# integration tests send, behind proxies they trust, plus the dual-stack and port forms.
n=0
grep -ohE '"(X-Forwarded-For|Forwarded): [^"]*"' "$root"/tests/it/*.rs | sort -u |
    while IFS= read -r line; do
        line="${line#\"}"
        line="${line%\"}"
        value="${line#*: }"
        case "$line" in
            Forwarded:*) kind=fwd ;;
            *) kind=xff ;;
        esac
        n=$((n + 1))
        printf '%s\n127.0.0.1\n127.0.0.0/8, 10.0.0.0/8\n%s' "$kind" "$value" \
            > "$seeds/client_address/from-tests-$n"
    done
printf 'xff\n::ffff:127.0.0.1\n127.0.0.0/8\n35.223.142.181, 10.1.2.3\n192.0.2.1:8080' \
    > "$seeds/client_address/mapped-peer-two-lines"
printf 'fwd\n10.0.0.2\n10.0.0.0/8, ::1/128\nfor="[2001:db8::1]:443";proto=https, for=10.0.0.9\nfor=_hidden' \
    > "$seeds/client_address/forwarded-ipv6-obfuscated"
printf 'xff\n127.0.0.1\n127.0.0.0/8\n198.51.100.7, 35.223.142.181' \
    > "$seeds/client_address/spoofed-left"

if [ "${1:-}" = "--no-cmin" ]; then
    exit 0
fi
export RUSTC_BOOTSTRAP="${RUSTC_BOOTSTRAP:-1}"
cd "$here"
for target in signature_header client_address events_gate; do
    cargo fuzz cmin "$target" "seeds/$target"
done
