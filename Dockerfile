# labelhook container image. README.md, "Docker image", runs it step by step, and
# deploy/smoke.sh (run by CI) follows that section to the letter.
#
#   docker build -t labelhook .                        (BuildKit or the legacy builder)
#   podman build --format docker -t labelhook .        (Podman or Buildah: `buildah bud`)
#
# It builds with every engine: BuildKit and the legacy builder (DOCKER_BUILDKIT=0), Docker
# Engine 20.10 and later, Podman and Buildah. So it uses only instructions and flags all of
# them know: no `# syntax=` line (BuildKit would fetch that frontend from a registry, and the
# built-in one has all this file needs), no RUN --mount, no --start-interval on the health
# check (Engine 25 and later only; older engines refuse the whole file). Podman and Buildah
# write OCI images by default, which have no health check: `--format docker` keeps it.
#
# The binary needs no system libraries beyond glibc: rusqlite bundles SQLite (libsqlite3-sys,
# compiled in), sqlx's PostgreSQL driver is pure Rust (no libpq) and reqwest uses rustls (no
# libssl). Hence the distroless "cc" base.
#
# Base images are referenced by tag. For reproducible builds, pin them by digest
# (`FROM rust:1-slim-bookworm@sha256:...`) and let a bot such as Renovate or Dependabot bump it.

# ---------------------------------------------------------------------------------------------
FROM rust:1-slim-bookworm AS builder
WORKDIR /src

# cargo-auditable embeds the exact crate versions of Cargo.lock in the binary (a `.dep-v0`
# section), so that image scanners (Trivy, Grype, `cargo audit bin`) see what is inside rather
# than guessing from the file. Its own layer: built once, kept while this line stays the same.
RUN cargo install --locked cargo-auditable@0.7.7

# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml or Cargo.lock
# change, not on every source edit. The dummy lib.rs, main.rs and benches/pipeline.rs stand in
# for the targets Cargo.toml declares (cargo refuses a manifest whose declared bench is
# missing, even for a build that does not compile benches). rust-toolchain.toml is copied when it exists (the [l] glob matches nothing
# otherwise) so that both builds use the same toolchain.
COPY Cargo.toml Cargo.lock rust-toolchain.tom[l] ./
RUN mkdir src benches \
 && echo '' > src/lib.rs \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > benches/pipeline.rs \
 && cargo auditable build --profile docker --locked \
 && rm -rf src

# The real source, with the build script (build.rs, found by cargo at the crate root) and the
# SQL migrations under src/store/{postgres,sqlite}/migrations that the crate embeds at compile
# time (`sqlx::migrate!` reads its directory, relative to Cargo.toml, while compiling; the SQLite
# ones are include_str!'d). build.rs is copied here rather than into the dependency layer: it
# only names the migration directory for cargo's change tracking, so the dummy build does not
# need it, and editing it does not throw away the cached dependencies.
# COPY keeps the files' modification times, which can be older than the dummy build's output;
# touch them so cargo rebuilds the crate itself instead of reusing the dummy.
COPY build.rs ./
COPY src ./src
# The `docker` profile is the release build stripped of symbols and line tables (Cargo.toml):
# about a seventh of the size. A panic still says where, as its message carries the file and
# line. readelf checks that the symbol table is gone and the dependency list is there.
RUN touch src/lib.rs src/main.rs \
 && cargo auditable build --profile docker --locked \
 && cp target/docker/labelhook /labelhook \
 && /labelhook --version \
 && if readelf -S /labelhook | grep -q '\.symtab'; then echo 'labelhook is not stripped' >&2; exit 1; fi \
 && if ! readelf -S /labelhook | grep -q '\.dep-v0'; then echo 'no cargo-auditable section' >&2; exit 1; fi

# The data directory, owned by the distroless "nonroot" user (65532), copied into the runtime
# image so that a fresh named volume mounted at /data starts out writable.
RUN mkdir -p /out/data && chown 65532:65532 /out/data

# ---------------------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="labelhook" \
      org.opencontainers.image.description="Receives Labelbox webhooks, verifies them, stores them durably and dispatches typed events in per-entity order" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

COPY --from=builder /labelhook /usr/local/bin/labelhook
COPY --from=builder --chown=65532:65532 /out/data /data
# The image's configuration: listeners on 0.0.0.0, the store on /data, JSON logs, Labelbox's
# addresses only. It is a file rather than LABELHOOK__ variables so that a file mounted over it
# (-v ./labelhook.toml:/etc/labelhook/labelhook.toml:ro) replaces it whole: variables would win
# over every mounted file without a word.
COPY config/labelhook.container.toml /etc/labelhook/labelhook.toml

# Relative paths in a configuration resolve against the working directory: "/" puts
# data/events.jsonl on the /data volume.
WORKDIR /

ENV LABELHOOK_CONFIG=/etc/labelhook/labelhook.toml

VOLUME /data
# The distroless "nonroot" user. /data belongs to it; a bind mount over /data must be writable
# by uid 65532 (`chown -R 65532:65532 <dir>`), which labelhook checks at start.
USER 65532:65532

# 8080: webhooks (route this through the ingress).
# 9090: /healthz, /readyz, /metrics (cluster-internal only; never through the ingress).
EXPOSE 8080 9090

# Healthy means ready: `labelhook healthcheck --ready` GETs /readyz on the configured admin
# listener (127.0.0.1:9090 here), which answers 200 only while the store takes writes, so a
# container whose /data is not writable is unhealthy rather than "healthy" and answering 503.
# (The image has no curl or shell.) Every 10 s, from 10 s after the start: healthy within
# about 10 s, unhealthy about 30 s after the store stops taking writes. There is no
# --start-interval (Engine 25 and later only, refused by older engines): on Engine 25 or later,
# `docker run --health-start-interval 1s` (compose: `start_interval: 1s`) probes every second
# during the start period instead, so the container is healthy within a second or two.
HEALTHCHECK --interval=10s --timeout=6s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/labelhook", "healthcheck", "--ready"]

ENTRYPOINT ["/usr/local/bin/labelhook"]
CMD ["serve"]
